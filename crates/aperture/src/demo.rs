//! `aperture demo`: the project's main job end to end. Provisions what is missing
//! (QEMU with vfio-user-pci, Debian's 6.12 guest kernel: `scripts/provision.sh`),
//! serves a disk and an RNG behind our virtio-iommu from this process, boots an
//! unmodified Linux guest under QEMU, runs a workload inside (`scripts/e2e-init.sh`:
//! read, write and read back the disk with checksums, read the RNG), checks what the
//! guest reports against the host, and prints what each device could reach.

use crate::backend_process::BackendProcess;
use crate::vm::{self, hex, RAM_MIB};
use device_host::endpoints::{BlockFactory, RngFactory, VhostUserFactory};
use device_host::host::{endpoint_id, DeviceHost, EndpointFactory, IommuMode, IOMMU_SLOT};
use device_host::vhost_user::{
    DeviceKind, InflightConfig, VhostUserHandle, DEFAULT_MAP_THRESHOLD, DEFAULT_TIMEOUT,
};
use md5::{Digest, Md5};
use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use virtio_iommu::{RequestType, Status};

/// How long the guest may take before the demo gives up on it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// What the demo was asked to do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) mode: IommuMode,
    pub(crate) strict: bool,
    pub(crate) mib: u32,
    pub(crate) json: bool,
    /// Implicit grants: the disk and the RNG run in `aperture backend` processes that
    /// are given the device host's shadow memory (and, in the map form, windows).
    pub(crate) inflight: Option<crate::serve::InflightForm>,
}

fn say(msg: &str) {
    eprintln!("aperture demo: {msg}");
}

/// md5 of `yes APERTURE | head -c N MiB`, what the guest writes.
pub(crate) fn pattern_md5(mib: u32) -> String {
    let mut stream = b"APERTURE\n".iter().cycle();
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for (b, c) in buf.iter_mut().zip(&mut stream) {
            *b = *c;
        }
        md5.update(&buf);
    }
    hex(&md5.finalize())
}

/// md5 of `len` bytes of a file at `offset`.
pub(crate) fn file_md5(path: &Path, offset: u64, len: u64) -> Result<String, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + done)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        md5.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hex(&md5.finalize()))
}

/// One outcome the demo checks.
pub(crate) struct Check {
    pub(crate) what: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
}

/// The checks every demo makes of its guest's I/O: the disk's data both ways (host
/// data read, pattern written, on the host's disk and read back), the RNG, and that
/// each device host function ended cleanly.
///
/// # Errors
/// The host's disk image cannot be read back.
pub(crate) fn io_checks<E: std::fmt::Debug>(
    first: &dyn Fn(&str) -> String,
    host_md5: &str,
    mib: u32,
    disk: &Path,
    results: &[(String, Result<(), E>)],
    check: &mut dyn FnMut(&str, bool, String),
) -> Result<(), String> {
    check(
        "disk read in the guest matches the host's data",
        first("blk-read-md5") == host_md5,
        first("blk-read-md5"),
    );
    let pat = pattern_md5(mib);
    check(
        "guest's write matches its pattern",
        first("blk-write-md5") == pat,
        first("blk-write-md5"),
    );
    let on_disk = file_md5(disk, u64::from(mib) << 20, u64::from(mib) << 20)?;
    check(
        "what the guest wrote is on the host's disk",
        on_disk == pat && first("blk-readback-md5") == pat,
        on_disk,
    );
    check(
        "RNG read in the guest",
        first("rng").starts_with("ok"),
        first("rng"),
    );
    for (name, r) in results {
        check(
            &format!("device host: {name} ended cleanly"),
            r.is_ok(),
            format!("{r:?}"),
        );
    }
    Ok(())
}

/// The end of a demo's report: each check, then the verdict and where the console is.
pub(crate) fn print_checks(checks: &[Check], console: &Path) {
    let failed = checks.iter().filter(|c| !c.ok).count();
    println!("  checks:");
    for c in checks {
        println!(
            "    [{}] {} ({})",
            if c.ok { " ok " } else { "FAIL" },
            c.what,
            c.detail
        );
    }
    println!(
        "result: {} ({} checks passed, {failed} failed); console log {}",
        if failed == 0 { "PASS" } else { "FAIL" },
        checks.len() - failed,
        console.display()
    );
}

pub(crate) fn run(opts: Options) -> ExitCode {
    match run_inner(opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            say(&format!("FAILED: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// The guest's kernel command line.
fn append(opts: Options) -> String {
    let mut append = format!(
        "console=ttyS0 panic=-1 loglevel=4 aperture.mib={}",
        opts.mib
    );
    if opts.strict {
        append.push_str(" iommu.strict=1");
    }
    append
}

fn run_inner(opts: Options) -> Result<bool, String> {
    say(
        "provisioning QEMU (vfio-user-pci) and the Debian guest kernel; cached after the first run",
    );
    let stack = vm::provision()?;
    let (qemu, kernel) = (stack.qemu.clone(), stack.kernel.clone());

    let work = std::env::temp_dir().join(format!("aperture-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let initrd = work.join("initramfs.cpio.gz");
    let init = vm::repo().join("scripts/e2e-init.sh");
    vm::script(
        "mkinitramfs.sh",
        &[&initrd.to_string_lossy(), "--init", &init.to_string_lossy()],
    )?;
    say(&format!("making a {} MiB disk image", 2 * opts.mib));
    let disk = work.join("disk.img");
    let host_md5 = vm::make_disk(&disk, opts.mib, 2 * opts.mib)?;

    let mut backends = Vec::new();
    let mut handles = Vec::new();
    let map = opts.inflight == Some(crate::serve::InflightForm::Map);
    let endpoints: Vec<Box<dyn EndpointFactory>> = if opts.inflight.is_some() {
        say("starting `aperture backend blk` and `aperture backend rng` in their own processes");
        let blk_args = [OsStr::new("blk"), OsStr::new("--disk"), disk.as_os_str()];
        let mut out: Vec<Box<dyn EndpointFactory>> = Vec::new();
        for (name, kind, args) in [
            ("blk0", DeviceKind::Block, &blk_args[..]),
            ("rng", DeviceKind::Rng, &[OsStr::new("rng")][..]),
        ] {
            let b = BackendProcess::spawn(&work, name, args)?;
            let (tx, rx) = std::sync::mpsc::channel();
            let f = VhostUserFactory::new(name, &b.socket, kind, DEFAULT_TIMEOUT)
                .map_err(|e| e.to_string())?
                .with_inflight(InflightConfig {
                    map_threshold: map.then_some(DEFAULT_MAP_THRESHOLD),
                    ..InflightConfig::default()
                })
                .with_handle_sender(tx);
            handles.push((name, rx));
            backends.push(b);
            out.push(Box::new(f));
        }
        out
    } else {
        vec![
            Box::new(BlockFactory::new("blk0", &disk, false).map_err(|e| e.to_string())?),
            Box::new(RngFactory::new("rng")),
        ]
    };
    let host = DeviceHost::new(
        &work.join("serve"),
        opts.mode,
        &vm::ram_layout()?,
        endpoints,
        device_host::host::DEFAULT_POLL_MAX,
    )
    .map_err(|e| e.to_string())?;
    let iommu = host.iommu();
    // Built (and their handles sent) by DeviceHost::new.
    let handles: Vec<(&str, Option<VhostUserHandle>)> = handles
        .into_iter()
        .map(|(n, rx)| (n, rx.try_recv().ok()))
        .collect();
    let mut args = vm::base_args(&kernel, &initrd, &append(opts));
    args.extend(host.qemu_args().iter().cloned());
    let served = std::thread::spawn(move || host.run(Duration::from_secs(3)));

    let served_by = if opts.inflight.is_some() {
        "by back-end processes behind implicit grants"
    } else {
        "by this process"
    };
    say(&format!(
        "booting Linux under QEMU TCG with a disk and an RNG served {served_by} (--iommu {:?}, {})",
        opts.mode,
        if opts.strict { "strict" } else { "lazy" }
    ));
    let console_path = work.join("console.log");
    let mut t_init = None;
    // Host CPU over the block phase: from its first marker to its last.
    let (mut cpu_start, mut cpu) = (None, None);
    let guest = vm::boot(
        &qemu,
        &args,
        &console_path,
        "APERTURE-E2E",
        BOOT_TIMEOUT,
        |k, _, elapsed| match k {
            "start" => {
                t_init = Some(elapsed);
                say("guest init is running the workload");
            }
            "blk-size" => cpu_start = vm::CpuTimes::now(),
            "blk-seconds" => {
                cpu = cpu_start.zip(vm::CpuTimes::now()).map(|(a, b)| b.since(a));
            }
            _ => {}
        },
    )?;
    let (markers, qemu_status, wall) = (&guest.markers, guest.status, guest.wall);
    let results = served
        .join()
        .map_err(|_| "the device host panicked".to_string())?;

    let first = |k: &str| guest.first(k);
    let mut checks = Vec::new();
    let mut check = |what: &str, ok: bool, detail: String| {
        checks.push(Check {
            what: what.into(),
            ok,
            detail,
        })
    };
    check(
        "QEMU exited cleanly",
        qemu_status.success(),
        format!("{qemu_status}"),
    );
    check(
        "guest init ran to the end",
        markers.contains_key("done"),
        format!("console: {}", console_path.display()),
    );
    if opts.mode != IommuMode::Off {
        check(
            "guest's virtio-iommu driver probed our device",
            first("dmesg-viommu") == "ok",
            first("dmesg-viommu"),
        );
        let groups = markers.get("iommu-group").map_or(0, Vec::len);
        check(
            "guest put both devices in IOMMU groups",
            groups >= 2,
            format!("{groups} in groups"),
        );
    }
    io_checks(&first, &host_md5, opts.mib, &disk, &results, &mut check)?;
    // Implicit grants: each back-end held only shadow memory and saw requests.
    let mut shadows = Vec::new();
    for (b, (name, h)) in backends.into_iter().zip(&handles) {
        // The copy form's back-end runs plain over the shadows alone; the map form's
        // translates everything through the windows (IOTLB mode).
        let held = b
            .finish(if map { "iotlb" } else { "plain" })
            .map(|st| st["guest_ram_bytes"].as_u64().unwrap_or(0));
        check(
            &format!(
                "{name}'s back-end process exited cleanly, given {}",
                if map { "windows" } else { "only shadow memory" }
            ),
            held.is_ok(),
            match &held {
                Ok(bytes) => format!("its memory table: {bytes} bytes"),
                Err(e) => e.clone(),
            },
        );
        let stats = h.as_ref().map(|h| h.counters().shadow).unwrap_or_default();
        check(
            &format!("{name}'s requests went through its shadow"),
            stats.posted > 0 && stats.posted == stats.completed,
            format!("{} posted, {} completed", stats.posted, stats.completed),
        );
        shadows.push(stats);
    }

    let secs: f64 = first("blk-seconds").parse().unwrap_or(0.0);
    let moved = 3.0 * f64::from(opts.mib);
    let ram = u128::from(RAM_MIB) << 20;
    let counters = iommu.map(|h| h.counters());
    let mut exposure = Vec::new();
    let ids = [endpoint_id(IOMMU_SLOT + 1), endpoint_id(IOMMU_SLOT + 2)];
    for (i, (name, id)) in [("virtio-blk", ids[0]), ("virtio-rng", ids[1])]
        .into_iter()
        .enumerate()
    {
        if let Some(s) = shadows.get(i) {
            // The back-end could read only copies of what was in flight.
            let b = u128::from(s.peak_exposed_bytes);
            exposure.push((name, b, b as f64 * 100.0 / ram as f64));
            continue;
        }
        let (bytes, share) = match &counters {
            None => (ram, 100.0),
            Some(c) => match c.peak_exposure.iter().find(|(e, _)| e.0 == id) {
                Some((_, p)) if p.identity => (ram, 100.0),
                Some((_, p)) => (p.mapped_bytes, p.mapped_bytes as f64 * 100.0 / ram as f64),
                None => (0, 0.0),
            },
        };
        exposure.push((name, bytes, share));
    }
    let count = |t: RequestType| {
        counters.as_ref().map_or(0, |c| {
            Status::ALL.iter().map(|s| c.count(t, *s)).sum::<u64>()
        })
    };
    let (maps, unmaps) = (count(RequestType::Map), count(RequestType::Unmap));
    let faults = counters.as_ref().map_or(0, |c| c.faults_raised);
    let guest_faults: u64 = first("dmesg-faults").parse().unwrap_or(0);
    let failed = checks.iter().filter(|c| !c.ok).count();

    if opts.json {
        let j = serde_json::json!({
            "iommu": format!("{:?}", opts.mode).to_lowercase(),
            "strict": opts.strict,
            "inflight": match opts.inflight {
                None => "off",
                Some(crate::serve::InflightForm::Copy) => "copy",
                Some(crate::serve::InflightForm::Map) => "map",
            },
            "qemu_version": stack.qemu_version,
            "qemu_deb": stack.qemu_deb,
            "guest_kernel": stack.kernel_release,
            "guest_kernel_deb": stack.kernel_deb,
            "time_to_init_s": t_init.map(|d| d.as_secs_f64()),
            "wall_s": wall.as_secs_f64(),
            "io_mib": moved,
            "io_s": secs,
            "io_mib_per_s": if secs > 0.0 { moved / secs } else { 0.0 },
            "host_cpu_s": cpu.map(|c| serde_json::json!({
                "ours": c.ours_s,
                "qemu": c.children_s,
            })),
            "maps": maps, "unmaps": unmaps, "faults": faults, "faults_logged_by_guest": guest_faults,
            "guest_ram_bytes": ram as u64,
            "exposure": exposure.iter().map(|(n, b, s)| serde_json::json!({"device": n, "bytes": *b as u64, "share_percent": s})).collect::<Vec<_>>(),
            "checks": checks.iter().map(|c| serde_json::json!({"check": c.what, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "passed": failed == 0,
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        println!(
            "Aperture demo: an unmodified Linux guest, its disk and RNG served by our device host"
        );
        println!(
            "  iommu: {:?} ({})",
            opts.mode,
            if opts.strict { "strict" } else { "lazy" }
        );
        if opts.inflight.is_some() {
            println!(
                "  implicit grants: the disk and the RNG ran in `aperture backend` processes given"
            );
            println!(
                "    {}",
                if map {
                    "the device host's shadow rings, bounce buffers and per-request windows (map form)"
                } else {
                    "only the device host's shadow rings and bounce buffers, never guest RAM (copy form)"
                }
            );
        }
        println!(
            "  ran: QEMU {} ({}), Linux {} ({})",
            stack.qemu_version, stack.qemu_deb, stack.kernel_release, stack.kernel_deb
        );
        println!(
            "  time to the guest's init: {}",
            t_init.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
        println!("  disk I/O in the guest: {moved:.0} MiB in {secs:.1} s = {:.1} MiB/s (TCG: slow by nature)", if secs > 0.0 { moved / secs } else { 0.0 });
        if let Some(c) = cpu {
            println!(
                "  host CPU over it: {:.1} s this process (our devices), {:.1} s QEMU (its TCG vCPU included){}",
                c.ours_s, c.children_s, if opts.inflight.is_some() { " and the back-end processes" } else { "" }
            );
        }
        println!("  virtio-iommu requests: {maps} MAP, {unmaps} UNMAP");
        println!("  denied device accesses: {faults} ({guest_faults} logged by the guest; the others came before its");
        println!(
            "    IOMMU driver was up, e.g. the firmware probing the disk while boot bypass is off)"
        );
        println!("  exposure (most guest memory a device could reach at one moment; guest RAM {RAM_MIB} MiB{}):", if opts.inflight.is_some() { "; with implicit grants: the bytes in flight" } else { "" });
        for (n, b, s) in &exposure {
            println!("    {n:<10} {:>12} bytes  {s:6.2}% of guest RAM", b);
        }
        print_checks(&checks, &console_path);
    }
    if failed == 0 {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(failed == 0)
}
