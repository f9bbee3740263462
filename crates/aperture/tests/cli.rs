//! End-to-end tests of the `aperture` binary: they run the built executable the way a
//! user or CI would and check its exit status and output, so the demo's own checks
//! (every step compared against the expected outcome) run as part of `cargo test`.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::process::{Command, Output};

fn aperture(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_aperture"))
        .args(args)
        .output()
        .expect("the aperture binary was built by cargo for this test")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn demo_passes_and_reports_the_key_outcomes() {
    let o = aperture(&["demo", "--model"]);
    let out = stdout(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout:\n{out}\nstderr:\n{}",
        stderr(&o)
    );
    for needle in [
        "RESV_MEM MSI 0xfee00000-0xfeefffff",
        "write config bypass = 0",
        "ATTACH endpoint 0x08 (virtio-blk) to domain 1: S_OK",
        "ATTACH endpoint 0x10 (virtio-rng) to domain 2: S_OK",
        "(READ mapping): allowed",
        "(READ-only mapping): denied",
        "(never mapped; read in step 3): denied",
        "virtio-rng reads IOVA 0x40000000",
        "reason MAPPING, flags WRITE|ADDRESS",
        "after its UNMAP: denied",
        "DETACH endpoint 0x08 (virtio-blk) from domain 1: S_OK",
        "result: PASS",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    assert!(!out.contains("[FAIL]"), "{out}");
}

#[test]
fn demo_json_parses_and_summarises_the_run() {
    let o = aperture(&["demo", "--model", "--json"]);
    assert_eq!(o.status.code(), Some(0), "stderr:\n{}", stderr(&o));
    let v: serde_json::Value =
        serde_json::from_slice(&o.stdout).expect("`demo --json` prints one JSON document");
    assert_eq!(v["ok"], true);
    assert_eq!(v["checks"]["failed"], 0);
    assert_eq!(v["config"]["probe_size"], 512);
    assert_eq!(v["endpoints"][0]["id"], 8);
    assert_eq!(v["endpoints"][0]["name"], "virtio-blk");
    assert_eq!(v["endpoints"][1]["id"], 16);
    assert_eq!(v["endpoints"][0]["resv_mem"][0]["subtype"], "MSI");
    assert_eq!(v["endpoints"][0]["resv_mem"][0]["start"], "0xfee00000");
    assert_eq!(v["counters"]["requests"]["MAP"]["S_OK"], 3);
    assert_eq!(v["counters"]["faults_dropped"], 0);
    let faults = v["faults"].as_array().expect("faults is an array");
    assert!(!faults.is_empty());
    assert!(faults
        .iter()
        .any(|f| f["endpoint"] == 16 && f["reason"] == "MAPPING"));
    let steps = v["steps"].as_array().expect("steps is an array");
    assert!(steps.iter().all(|s| s["result"] == "pass"));
}

#[test]
fn demo_with_one_and_with_the_most_endpoints() {
    let o = aperture(&["demo", "--model", "--endpoints", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("[skip]"));
    let o = aperture(&["demo", "--model", "--endpoints", "64", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["endpoints"].as_array().map(Vec::len), Some(64));
}

#[test]
fn help_explains_and_lists_demo() {
    let o = aperture(&["--help"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0));
    assert!(out.contains("Aperture"), "{out}");
    assert!(out.contains("demo"), "{out}");
    assert!(out.contains("aperture demo --model"), "{out}");
    assert!(out.contains("aperture serve"), "{out}");
}

#[test]
fn demo_model_with_implicit_grants_is_a_usage_error() {
    let o = aperture(&["demo", "--model", "--inflight", "copy"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--inflight needs the guest"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn zero_endpoints_is_a_usage_error_naming_the_flag() {
    let o = aperture(&["demo", "--model", "--endpoints", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--endpoints"), "{}", stderr(&o));
    let o = aperture(&["demo", "--model", "--endpoints", "65"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--endpoints"), "{}", stderr(&o));
}

#[test]
fn unknown_subcommand_and_flag_are_usage_errors() {
    let o = aperture(&["frobnicate"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("frobnicate"), "{}", stderr(&o));
    let o = aperture(&["demo", "--no-such-flag"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--no-such-flag"), "{}", stderr(&o));
}

#[test]
fn serve_bad_input_is_one_line_naming_it_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("aperture-cli-serve-{}", std::process::id()));
    let d = dir.to_string_lossy().to_string();
    // A file that is not a poll budget, which must be left as it is.
    let text = format!("{d}-not-a-budget");
    std::fs::write(&text, "some text").unwrap();
    for (args, needle) in [
        (
            vec!["serve", "--dir", &d, "--disk", "/nonexistent/disk.img"],
            "/nonexistent/disk.img",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--poll-budget", &text],
            "not a poll budget",
        ),
        (
            vec![
                "serve",
                "--dir",
                &d,
                "--rng",
                "--poll-budget",
                "/nonexistent/b",
            ],
            "--poll-budget: poll budget /nonexistent/b",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--poll-cpus", "0"],
            "--poll-cpus",
        ),
        (
            vec!["backend", "rng", "--socket", &d, "--poll-budget", &text],
            "not a poll budget",
        ),
        (vec!["serve", "--dir", &d], "nothing to serve"),
        (
            vec!["serve", "--dir", &d, "--rng", "--inflight", "copy"],
            "none is given",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--inflight-map-kib", "4"],
            "--inflight",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--inflight", "all"],
            "'all' is not a form",
        ),
        (
            vec![
                "serve",
                "--dir",
                &d,
                "--disk",
                "vhost-user=/nonexistent.sock",
                "--inflight",
                "map",
            ],
            "needs --iommu off",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--inflight-arena-mib", "4"],
            "--inflight",
        ),
        (vec!["serve", "--dir", &d, "--disk", "x.img,rw"], "--disk"),
        (
            vec!["serve", "--dir", &d, "--rng", "--iommu", "maybe"],
            "--iommu",
        ),
        (vec!["serve", "--rng"], "--dir"),
        (
            vec!["serve", "--dir", &d, "--rng", "--reserved", "0x1000-0x1fff"],
            "@DEVICE",
        ),
        (
            vec![
                "serve",
                "--dir",
                &d,
                "--rng",
                "--reserved",
                "0x9000-0x1000@rng",
            ],
            "below START",
        ),
        (
            vec![
                "serve",
                "--dir",
                &d,
                "--rng",
                "--reserved",
                "0x90301000-0x90301fff@blk0",
            ],
            "no device 'blk0'",
        ),
        // Under low RAM below the 2 GiB boundary: a strict region the plan cannot keep.
        (
            vec![
                "serve",
                "--dir",
                &d,
                "--rng",
                "--reserved",
                "0x100000-0x100fff@rng",
            ],
            "0x100000",
        ),
        // Pool mode needs a device-tree guest; an arm64 guest cannot be told of our
        // virtio-iommu (no ACPI, so no VIOT).
        (
            vec![
                "serve", "--dir", &d, "--rng", "--pool", "16M", "--dtb", "virt.dtb",
            ],
            "--arch arm64",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--arch", "arm64"],
            "--iommu off",
        ),
        (
            vec!["serve", "--dir", &d, "--rng", "--pool", "16M"],
            "--dtb",
        ),
    ] {
        let o = aperture(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!dir.join("qemu-args").exists(), "nothing half-written");
    assert!(!dir.exists(), "the back-end bound no socket");
    assert_eq!(std::fs::read_to_string(&text).unwrap(), "some text");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&text);
}

#[test]
fn endpoints_is_a_model_demo_option() {
    let o = aperture(&["demo", "--endpoints", "2"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn bench_quick_writes_every_cell_as_json_and_a_plot() {
    let dir = test_kit::TempDir::new("aperture-cli-bench");
    let (json, svg) = (dir.join("s.json"), dir.join("s.svg"));
    let o = aperture(&[
        "bench",
        "--quick",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("blk-4k-random") && out.contains("Crossover"),
        "{out}"
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cells = v["cells"].as_array().unwrap();
    let modes: std::collections::BTreeSet<&str> =
        cells.iter().map(|c| c["mode"].as_str().unwrap()).collect();
    let patterns: std::collections::BTreeSet<&str> = cells
        .iter()
        .map(|c| c["pattern"].as_str().unwrap())
        .collect();
    let placed = |p: &str| cells.iter().filter(|c| c["placement"] == p).count();
    assert_eq!(
        placed("in-process"),
        modes.len() * patterns.len(),
        "one in-process cell per mode x pattern"
    );
    // Out of process: a cell, or a stated reason why not, for every mode x pattern.
    let gaps = v["out_of_process_not_measured"].as_array().unwrap();
    assert!(placed("out-of-process") > 0, "no out-of-process cell");
    assert_eq!(
        placed("out-of-process") + gaps.len(),
        modes.len() * patterns.len(),
        "{gaps:?}"
    );
    assert!(gaps
        .iter()
        .all(|g| g["reason"].as_str().is_some_and(|r| !r.is_empty())));
    assert!(out.contains("Out of process"), "{out}");
    assert!(
        modes.len() >= 5 && patterns.len() == 6,
        "{modes:?} {patterns:?}"
    );
    for c in cells {
        for key in [
            "throughput_bytes_per_s",
            "cpu_ns_per_byte",
            "map_ops_per_request",
            "copy_bytes_per_byte",
        ] {
            assert!(c[key].as_f64().is_some_and(|x| x >= 0.0), "{key}: {c}");
        }
        assert!(c["throughput_bytes_per_s"].as_f64().unwrap() > 0.0, "{c}");
        // Every mode exposes something, but implicit grants for an RNG: its requests
        // have no readable byte, so a back-end given only copies reaches nothing.
        let nothing_readable = c["mode"]
            .as_str()
            .is_some_and(|m| m.starts_with("inflight-"))
            && c["pattern"] == "rng-64";
        assert!(
            c["exposure_peak_bytes"]
                .as_u64()
                .is_some_and(|x| x > 0 || nothing_readable),
            "{c}"
        );
        assert!(c["placement"].is_string(), "{c}");
    }
    assert!(v["machine"]["cpus"].as_u64().is_some_and(|n| n > 0));
    // Per buffer size: bounce, map, and auto against the cheaper of the two.
    let points = v["calibration"]["points"].as_array().unwrap();
    assert_eq!(points.len(), survey::CALIBRATION_SIZES.len());
    for p in points {
        assert!(
            p["auto_over_cheaper"].as_f64().is_some_and(|r| r > 0.0),
            "{p}"
        );
    }
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.contains("viommu-strict"),
        "svg"
    );
}

#[test]
fn backend_net_tx_says_what_it_is_and_needs_a_socket() {
    let o = aperture(&["backend", "net-tx", "--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("transmit sink") && stdout(&o).contains("no guest driver"),
        "{}",
        stdout(&o)
    );
    let o = aperture(&["backend", "net-tx"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--socket"), "{}", stderr(&o));
}

#[test]
fn bench_guest_options_need_guest() {
    let o = aperture(&["bench", "--runs", "3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--guest"), "{}", stderr(&o));
}

/// A committed host-table fixture of `mem-layout`.
fn fixture(name: &str) -> String {
    format!(
        "{}/../mem-layout/fixtures/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn layout_shared_rmrr_strict_single_assignment_exits_1_naming_every_sharer_and_the_range() {
    let dmar = fixture("thinkpad-snb-dmar.bin");
    let o = aperture(&[
        "layout",
        "--ram",
        "8G",
        "--dmar",
        &dmar,
        "--assign",
        "00:14.0,strict",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    for want in ["00:14.0", "00:1a.0", "00:1d.0", "[0xda2f0000-0xda306fff]"] {
        assert!(err.contains(want), "{err} lacks {want}");
    }
}

#[test]
fn layout_group_of_every_sharer_plans_under_strict() {
    let dmar = fixture("thinkpad-snb-dmar.bin");
    for args in [
        vec!["--group", "00:14.0,00:1a.0,00:1d.0,strict"],
        vec![
            "--assign",
            "00:14.0,strict",
            "--assign",
            "00:1a.0",
            "--assign",
            "00:1d.0",
        ],
    ] {
        let mut all = vec!["layout", "--ram", "8G", "--dmar", &dmar, "--json"];
        all.extend(args);
        let o = aperture(&all);
        assert_eq!(o.status.code(), Some(0), "{all:?}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        let r = &v["reserved"][0];
        assert_eq!(r["start"], 0xda2f_0000u64);
        assert_eq!(r["action"], "identity");
        assert_eq!(r["table"][0], "DMAR");
        assert_eq!(r["source"], "DMAR RMRR @0x68");
        assert_eq!(v["warnings"].as_array().map(Vec::len), Some(0));
    }
}

#[test]
fn layout_shared_rmrr_relaxed_single_assignment_plans_with_the_risky_warning() {
    let dmar = fixture("thinkpad-snb-dmar.bin");
    let o = aperture(&[
        "layout",
        "--ram",
        "8G",
        "--dmar",
        &dmar,
        "--assign",
        "00:1a.0,relaxed",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("risky") && err.contains("00:14.0, 00:1d.0"),
        "{err}"
    );
}

#[test]
fn layout_device_named_twice_or_group_of_one_is_bad_input() {
    let dmar = fixture("thinkpad-snb-dmar.bin");
    for (args, needle) in [
        (
            vec!["--group", "00:14.0,00:1a.0", "--assign", "00:14.0"],
            "named twice",
        ),
        (vec!["--group", "00:14.0"], "two or more"),
        (vec!["--group", "00:14.0,zz"], "zz"),
    ] {
        let mut all = vec!["layout", "--ram", "8G", "--dmar", &dmar];
        all.extend(args);
        let o = aperture(&all);
        assert_eq!(o.status.code(), Some(2), "{all:?}");
        assert!(stderr(&o).contains(needle), "{all:?}: {}", stderr(&o));
    }
}

/// A copy of a fixture with `edit` applied and the checksum made right again, in a
/// temporary file the test owns.
fn edited_fixture(name: &str, tag: &str, edit: impl Fn(&mut Vec<u8>)) -> std::path::PathBuf {
    let mut bytes = std::fs::read(fixture(name)).unwrap();
    edit(&mut bytes);
    bytes[9] = 0;
    let sum = bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    bytes[9] = sum.wrapping_neg();
    let path =
        std::env::temp_dir().join(format!("aperture-cli-{}-{tag}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn layout_ivrs_plans_a_real_amd_table_keeping_the_unity_range_reserved() {
    let ivrs = fixture("asus-zenbook-s16-ivrs.bin");
    let o = aperture(&[
        "layout",
        "--ram",
        "8G",
        "--ivrs",
        &ivrs,
        "--assign",
        "c4:00.7",
        "--rdm-mem-boundary",
        "1G",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let r = &v["reserved"][0];
    assert_eq!(r["start"], 0x75e0_0000u64);
    assert_eq!(r["end"], 0x75e1_ffffu64);
    assert_eq!(r["table"][0], "IVRS");
    assert_eq!(r["source"], "IVRS IVMD @0xe8");
    assert_eq!(r["devices"][0], "c4:00.7");
    let e820 = v["e820"].as_array().unwrap();
    assert!(e820
        .iter()
        .any(|e| e["type"] == "reserved" && e["start"] == 0x75e0_0000u64));
    assert!(e820
        .iter()
        .filter(|e| e["type"] == "ram")
        .all(|e| e["end"].as_u64().unwrap() < 0x75e0_0000
            || e["start"].as_u64().unwrap() > 0x75e1_ffff));
}

#[test]
fn layout_iort_plans_a_real_arm_table_naming_its_named_components() {
    let iort = fixture("cix-sky1-orion-o6-iort.bin");
    let o = aperture(&[
        "layout",
        "--ram",
        "4G",
        "--iort",
        &iort,
        "--strategy",
        "host",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let r = &v["reserved"][0];
    assert_eq!(r["start"], 0x8480_0000u64);
    assert_eq!(r["kind"], "direct-relaxable");
    assert_eq!(r["table"][0], "IORT");
    assert_eq!(r["components"][0], "\\_SB_.DPU0");
    assert_eq!(r["action"], "reserved");
}

#[test]
fn layout_malformed_tables_are_one_line_naming_the_table_and_offset_exit_2() {
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        // Bad checksum: byte 9 off by one after the sum was made right.
        (
            "--ivrs",
            {
                let p = edited_fixture("asus-zenbook-s16-ivrs.bin", "sum", |_| {});
                let mut b = std::fs::read(&p).unwrap();
                b[9] = b[9].wrapping_add(1);
                std::fs::write(&p, b).unwrap();
                p
            },
            "IVRS: checksum (offset 9)",
        ),
        // A length past the table: the IVMD at 0xc8 says 0xff00 bytes.
        (
            "--ivrs",
            edited_fixture("asus-zenbook-s16-ivrs.bin", "len", |b| {
                b[0xca] = 0x00;
                b[0xcb] = 0xff;
            }),
            "IVRS: block type 0x21 at offset 0xc8",
        ),
        // A zero-length range: the IVMD at 0xc8's length field cleared.
        (
            "--ivrs",
            edited_fixture("asus-zenbook-s16-ivrs.bin", "zero", |b| {
                b[0xc8 + 24..0xc8 + 32].fill(0);
            }),
            "IVRS IVMD @0xc8: the range at 0x7d900000 has length zero",
        ),
        // Overlapping ranges: the IVMD at 0xe8 moved onto the one at 0xc8.
        (
            "--ivrs",
            edited_fixture("asus-zenbook-s16-ivrs.bin", "overlap", |b| {
                b[0xe8 + 16..0xe8 + 24].copy_from_slice(&0x7d91_0000u64.to_le_bytes());
            }),
            "IVRS IVMD @0xe8",
        ),
        // A truncated node: one node more than the table holds.
        (
            "--iort",
            edited_fixture("cix-sky1-orion-o6-iort.bin", "count", |b| {
                b[36] += 1;
            }),
            "IORT: node 19 at offset 0xad8",
        ),
        // An ID mapping to a missing node: the RMR's first mapping points at 0x999.
        (
            "--iort",
            edited_fixture("cix-sky1-orion-o6-iort.bin", "ref", |b| {
                b[0xa08..0xa0c].copy_from_slice(&0x999u32.to_le_bytes());
            }),
            "IORT: ID mapping at offset 0x9fc refers to offset 0x999",
        ),
    ];
    for (flag, path, needle) in cases {
        let p = path.to_string_lossy().to_string();
        let o = aperture(&["layout", "--ram", "4G", flag, &p]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{needle}: {err}");
        assert!(err.contains(needle), "{err} lacks {needle}");
        assert!(err.contains(&p), "{err} names the file");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        let _ = std::fs::remove_file(&path);
    }
}

#[test]
fn serve_host_table_bad_input_is_one_line_naming_it_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("aperture-cli-hostdev-{}", std::process::id()));
    let d = dir.to_string_lossy().to_string();
    let dmar = fixture("thinkpad-snb-dmar.bin");
    for (args, needle) in [
        (vec!["--dmar", dmar.as_str()], "no --host-device"),
        (
            vec!["--dmar", dmar.as_str(), "--host-device", "00:14.0=blk0"],
            "host devices 00:1a.0, 00:1d.0 need it too",
        ),
        (
            vec!["--dmar", dmar.as_str(), "--host-device", "00:02.0=blk9"],
            "no device 'blk9'",
        ),
        (
            vec!["--dmar", dmar.as_str(), "--host-device", "00:1f.0=blk0"],
            "no reserved region for 00:1f.0",
        ),
        (
            vec![
                "--dmar",
                "/nonexistent/DMAR",
                "--host-device",
                "00:02.0=blk0",
            ],
            "--dmar /nonexistent/DMAR",
        ),
        (vec!["--host-device", "00:02.0"], "HOSTBDF=DEVICE"),
    ] {
        let mut all = vec!["serve", "--dir", &d, "--disk", "/dev/null", "--mem", "2560"];
        all.extend(args);
        let o = aperture(&all);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{all:?}: {err}");
        assert!(err.contains(needle), "{all:?}: {err} lacks {needle}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_arm64_is_pool_mode_and_pool_needs_arm64() {
    let o = aperture(&["demo", "--arch", "arm64"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--pool"), "{}", stderr(&o));
    let o = aperture(&["demo", "--pool", "16M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--arch arm64"), "{}", stderr(&o));
}
