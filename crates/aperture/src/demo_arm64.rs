//! `aperture demo --arch arm64 --pool SIZE`: the demo in pool mode (issue 17 scope 4).
//! Provisions the arm64 guest (`scripts/provision-arm64.sh`: QEMU for aarch64, a
//! kernel built from Debian's 6.12 source with `DMA_RESTRICTED_POOL`), dumps the virt
//! machine's device tree, serves a disk and an RNG from this process in pool mode
//! ([`DeviceHost::new_pool`]: each device reaches only the restricted DMA pool, which
//! the guest's device tree names, planned once by [`crate::serve::plan_pool`]), boots
//! the guest under QEMU TCG with `scripts/e2e-arm64-init.sh` as its init, checks what
//! the guest itself reports (the pool created and assigned, its swiotlb counters, the
//! data both ways), and prints the same report as the x86 demo with each device's
//! exposure: the pool's size.

use crate::demo::Check;
use crate::vm::{self, RAM_MIB};
use device_host::endpoints::{BlockFactory, RngFactory};
use device_host::host::{DeviceHost, EndpointFactory};
use std::collections::BTreeMap;
use std::process::{Command, ExitCode, Stdio};
use std::time::Duration;

/// How long the guest may take before the demo gives up on it.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// The CPU model: the same for the device-tree dump and the boot.
const CPU: &str = "cortex-a57";
/// Slabs of the global swiotlb (2 KiB each), forced on: any device DMA that missed the
/// pool would show in its counters (scripts/README.md: arm64 sizes it at 512 KiB
/// otherwise).
const GLOBAL_SLABS: u32 = 8192;

/// What the demo was asked to do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Options {
    pub(crate) pool_size: u64,
    pub(crate) mib: u32,
    pub(crate) json: bool,
}

fn say(msg: &str) {
    eprintln!("aperture demo: {msg}");
}

/// `KEY=VALUE` lines of the arm64 provisioning's env file.
fn arm64_env() -> Result<BTreeMap<String, String>, String> {
    let path = vm::cache_dir().join("arm64/env");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// One swiotlb counter line's fields: `nslabs`, `used`, `hiwater`.
fn counters(line: &str) -> BTreeMap<String, u64> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
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

fn run_inner(opts: Options) -> Result<bool, String> {
    say("provisioning the arm64 guest (QEMU for aarch64, a kernel with DMA_RESTRICTED_POOL built from Debian's source: minutes the first time, cached after)");
    vm::script("provision-arm64.sh", &[]).map_err(|e| format!("provisioning failed: {e}"))?;
    let env = arm64_env()?;
    let key = |k: &str| {
        env.get(k)
            .cloned()
            .ok_or(format!("arm64 provisioning left no {k} in its env file"))
    };
    let (qemu, kernel) = (key("APERTURE_ARM64_QEMU")?, key("APERTURE_ARM64_KERNEL")?);

    let work = std::env::temp_dir().join(format!("aperture-demo-arm64-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let initrd = work.join("initramfs.cpio.gz");
    let init = vm::repo().join("scripts/e2e-arm64-init.sh");
    vm::script(
        "mkinitramfs.sh",
        &[
            &initrd.to_string_lossy(),
            "--arch",
            "arm64",
            "--init",
            &init.to_string_lossy(),
        ],
    )?;
    // The machine's own device tree, with the boot's -cpu, -smp and -m.
    let dumped = work.join("virt.dtb");
    let status = Command::new(&qemu)
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-cpu", CPU, "-smp", "1", "-m", &format!("{RAM_MIB}M")])
        .arg("-machine")
        .arg(format!("virt,dumpdtb={}", dumped.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run {qemu}: {e}"))?;
    if !dumped.exists() {
        return Err(format!("QEMU did not dump the virt device tree ({status})"));
    }
    say(&format!("making a {} MiB disk image", 2 * opts.mib));
    let disk = work.join("disk.img");
    let host_md5 = vm::make_disk(&disk, opts.mib, 2 * opts.mib)?;

    let layout = vm::ram_layout()?;
    let dir = work.join("serve");
    let plan = crate::serve::plan_pool(
        &dir,
        &crate::serve::PoolArg {
            size: opts.pool_size,
            dtb: dumped,
            dtc: "dtc".into(),
        },
        &layout,
        2,
    )?;
    let endpoints: Vec<Box<dyn EndpointFactory>> = vec![
        Box::new(BlockFactory::new("blk0", &disk, false).map_err(|e| e.to_string())?),
        Box::new(RngFactory::new("rng")),
    ];
    let mut host = DeviceHost::new_pool(
        &dir,
        &layout,
        plan.ram_start,
        endpoints,
        device_host::host::DEFAULT_POLL_MAX,
        plan.window,
    )
    .map_err(|e| e.to_string())?;
    host.add_qemu_args(&["-dtb".to_string(), plan.dtb.display().to_string()])
        .map_err(|e| e.to_string())?;
    let functions: Vec<String> = host
        .functions()
        .iter()
        .map(|(_, _, slot)| format!("0000:00:{slot:02x}.0"))
        .collect();

    let append = format!(
        "console=ttyAMA0 panic=-1 loglevel=4 swiotlb={GLOBAL_SLABS},force aperture.mib={}",
        opts.mib
    );
    let mut args = vm::machine_args(
        &["-machine", "virt", "-cpu", CPU],
        &kernel,
        &initrd,
        &append,
    );
    args.extend(host.qemu_args().iter().cloned());
    let served = std::thread::spawn(move || host.run(Duration::from_secs(3)));

    say(&format!(
        "booting the arm64 guest under QEMU TCG; its disk and RNG served by this process in pool mode ({} MiB pool at {:#x})",
        plan.window.size >> 20,
        plan.window.base.0
    ));
    let console_path = work.join("console.log");
    let mut t_init = None;
    let guest = vm::boot(
        &qemu,
        &args,
        &console_path,
        "APERTURE-E2E",
        BOOT_TIMEOUT,
        |k, _, elapsed| {
            if k == "start" {
                t_init = Some(elapsed);
                say("guest init is running the workload");
            }
        },
    )?;
    let results = served
        .join()
        .map_err(|_| "the device host panicked".to_string())?;
    let first = |k: &str| guest.first(k);
    let all = |k: &str| guest.markers.get(k).cloned().unwrap_or_default();

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
        guest.status.success(),
        format!("{}", guest.status),
    );
    check(
        "guest init ran to the end",
        guest.markers.contains_key("done"),
        format!("console: {}", console_path.display()),
    );
    let created = first("pool-created");
    let want = format!("{:#018x} {}", plan.window.base.0, plan.window.size >> 20);
    check(
        "guest created the restricted DMA pool where it was planned",
        created == want,
        created,
    );
    let node = format!("restricted-dma-pool@{:x}", plan.window.base.0);
    for f in &functions {
        let line = format!("{f} {node}");
        check(
            &format!("guest assigned the pool to {f}"),
            all("pool-assigned").contains(&line),
            all("pool-assigned").join("; "),
        );
    }
    let swiotlb = all("swiotlb");
    let find = |phase: &str, name: &str| {
        swiotlb
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{phase} {name} ")))
            .map(counters)
            .unwrap_or_default()
    };
    let (probe, io) = (find("probe", &node), find("io", &node));
    let global = find("io", "default");
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied();
    check(
        "the pool's high-water mark rose with I/O (the devices' DMA bounced through it)",
        matches!((get(&io, "hiwater"), get(&probe, "used")), (Some(h), Some(u)) if h > u),
        format!(
            "probe used {:?} slots, I/O peak {:?}",
            get(&probe, "used"),
            get(&io, "hiwater")
        ),
    );
    check(
        "the global swiotlb (forced on) stayed unused",
        get(&global, "hiwater") == Some(0) && get(&global, "nslabs") == Some(GLOBAL_SLABS.into()),
        format!("{global:?}"),
    );
    crate::demo::io_checks(&first, &host_md5, opts.mib, &disk, &results, &mut check)?;

    let secs: f64 = first("blk-seconds").parse().unwrap_or(0.0);
    let moved = 3.0 * f64::from(opts.mib);
    let ram = u64::from(RAM_MIB) << 20;
    let share = plan.window.size as f64 * 100.0 / ram as f64;
    let peak_bytes = get(&io, "hiwater").map(|h| h * 2048);
    let failed = checks.iter().filter(|c| !c.ok).count();
    if opts.json {
        let exposure: Vec<serde_json::Value> = ["virtio-blk", "virtio-rng"]
            .iter()
            .map(|n| serde_json::json!({"device": n, "bytes": plan.window.size, "share_percent": share}))
            .collect();
        let j = serde_json::json!({
            "arch": "arm64",
            "mode": "pool",
            "qemu_version": env.get("APERTURE_ARM64_QEMU_VERSION"),
            "qemu_deb": env.get("APERTURE_ARM64_QEMU_DEB"),
            "guest_kernel": env.get("APERTURE_ARM64_KERNEL_RELEASE"),
            "guest_kernel_source": env.get("APERTURE_ARM64_KERNEL_SOURCE_DEB"),
            "pool_base": plan.window.base.0,
            "pool_bytes": plan.window.size,
            "pool_peak_bytes": peak_bytes,
            "time_to_init_s": t_init.map(|d| d.as_secs_f64()),
            "wall_s": guest.wall.as_secs_f64(),
            "io_mib": moved,
            "io_s": secs,
            "io_mib_per_s": if secs > 0.0 { moved / secs } else { 0.0 },
            "guest_ram_bytes": ram,
            "exposure": exposure,
            "checks": checks.iter().map(|c| serde_json::json!({"check": c.what, "ok": c.ok, "detail": c.detail})).collect::<Vec<_>>(),
            "passed": failed == 0,
        });
        println!("{}", serde_json::to_string_pretty(&j).unwrap_or_default());
    } else {
        println!("Aperture demo: an arm64 Linux guest, its disk and RNG served by our device host in pool mode");
        println!(
            "  ran: QEMU {} ({}), Linux {} (built from {})",
            env.get("APERTURE_ARM64_QEMU_VERSION")
                .map_or("?", String::as_str),
            env.get("APERTURE_ARM64_QEMU_DEB")
                .map_or("?", String::as_str),
            env.get("APERTURE_ARM64_KERNEL_RELEASE")
                .map_or("?", String::as_str),
            env.get("APERTURE_ARM64_KERNEL_SOURCE_DEB")
                .map_or("?", String::as_str)
        );
        println!(
            "  restricted DMA pool: {} MiB at {:#x} ({node}), for {}",
            plan.window.size >> 20,
            plan.window.base.0,
            functions.join(", ")
        );
        println!(
            "  time to the guest's init: {}",
            t_init.map_or("never".into(), |d| format!("{:.1} s", d.as_secs_f64()))
        );
        println!(
            "  disk I/O in the guest: {moved:.0} MiB in {secs:.1} s = {:.1} MiB/s (TCG: slow by nature)",
            if secs > 0.0 { moved / secs } else { 0.0 }
        );
        println!(
            "  pool in use at its peak: {} (vrings and bounce buffers)",
            peak_bytes.map_or("?".into(), |b| format!("{} KiB", b >> 10))
        );
        println!("  exposure (most guest memory a device could reach at one moment; guest RAM {RAM_MIB} MiB):");
        for n in ["virtio-blk", "virtio-rng"] {
            println!(
                "    {n:<10} {:>12} bytes  {share:6.2}% of guest RAM (the pool, fixed at VM creation)",
                plan.window.size
            );
        }
        crate::demo::print_checks(&checks, &console_path);
    }
    if failed == 0 {
        let _ = std::fs::remove_dir_all(&work);
    }
    Ok(failed == 0)
}
