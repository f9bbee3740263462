//! `aperture`, the one binary of the Aperture workspace.
//!
//! Its subcommands: `serve` ([`serve`]) serves our virtio-iommu and the devices behind
//! it to QEMU over vfio-user (and devices run by vhost-user back-ends); `backend`
//! ([`backend`]) runs one of our devices as such a back-end; `demo` boots an unmodified
//! Linux guest against them ([`demo`]), or with `--model` plays the requests Linux's
//! virtio-iommu driver sends against the device model through its fake guest driver
//! ([`demo_model`], rendered by [`report`]); `bench` ([`mod@bench`]) measures what each way
//! of sharing costs, and with `--guest` in-guest disk throughput against QEMU's own
//! devices ([`bench_guest`]); `layout` ([`layout`]) plans a guest's memory around reserved
//! device memory. What `demo` and `bench` share to boot the guest lives in [`vm`].
//! Every step of `demo` is checked, so it doubles as an end-to-end smoke test. The
//! command line is defined here.

mod backend;
mod backend_process;
#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "bench")]
mod bench_guest;
mod demo;
mod demo_arm64;
#[cfg(feature = "bench")]
mod demo_model;
mod dt_pool;
mod layout;
mod poll_budget;
#[cfg(feature = "bench")]
mod report;
mod serve;
mod vm;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Largest `--endpoints` value: the demo gives each endpoint a PCI slot and a domain.
#[cfg(feature = "bench")]
const MAX_ENDPOINTS: u32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "aperture",
    version,
    about = "Aperture hands virtio device backends only the guest memory the guest opens for them.\n\
A backend (virtual disk, NIC, RNG...) normally sees all of guest RAM; here it sees only the\n\
apertures the guest maps, through our virtio-iommu, which an unmodified Linux guest drives:\n\
Aperture serves it and the devices behind it to QEMU over vfio-user, and runs devices in\n\
their own processes over vhost-user. It also models Xen grant tables and a restricted DMA\n\
pool, and measures what each way of sharing costs (bench).",
    after_help = "Examples:\n  \
aperture demo                  boot Linux with a disk and an RNG behind our virtio-iommu\n  \
aperture demo --iommu off      the same without it: every device reaches all RAM\n  \
aperture demo --model          the device model driven as Linux drives it (no QEMU)\n  \
aperture demo --arch arm64 --pool 16M   an arm64 guest whose devices reach only a restricted DMA pool\n  \
aperture serve --dir /tmp/vm --disk disk.img --rng   serve them to your own QEMU\n  \
aperture backend blk --socket /tmp/blk.sock --disk disk.img   a disk in its own process\n  \
aperture serve --dir /tmp/vm --disk vhost-user=/tmp/blk.sock    ...served through it\n  \
aperture layout --ram 8G --dmar /sys/firmware/acpi/tables/DMAR --assign 00:02.0\n  \
aperture bench                 what each way of sharing costs, per access pattern\n\n\
Exit status: 0 success, 1 a demo check failed, 2 bad command line.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--iommu` of `serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IommuArg {
    /// Devices behind our virtio-iommu; boot bypass off: nothing reachable until mapped.
    On,
    /// No virtio-iommu: devices reach all guest RAM.
    Off,
    /// virtio-iommu present, boot bypass on: unattached devices reach all RAM.
    Bypass,
}

/// `--arch` of `serve`: the guest machine the QEMU arguments are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum ArchArg {
    /// q35 (ACPI; our virtio-iommu announced by a VIOT table).
    #[value(name = "x86_64")]
    X86_64,
    /// arm64 virt booted with a device tree (no ACPI, so no VIOT: --iommu off; pool
    /// mode with --pool).
    Arm64,
}

/// One `--disk PATH[,ro]` or `--disk vhost-user=SOCK`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiskArg {
    path: std::path::PathBuf,
    read_only: bool,
    /// `path` is the socket of an external vhost-user back-end, not an image.
    vhost_user: bool,
}

/// Prefix of a device argument served by an external vhost-user back-end.
const VHOST_USER: &str = "vhost-user=";

/// The socket of `vhost-user=SOCK`, `None` when `s` is not of that form.
fn vhost_user_socket(s: &str) -> Option<Result<std::path::PathBuf, String>> {
    let sock = s.strip_prefix(VHOST_USER)?;
    Some(if sock.is_empty() {
        Err(format!("'{s}' names no socket after '{VHOST_USER}'"))
    } else if sock.ends_with(",ro") {
        Err(format!(
            "'{s}': ',ro' does not apply to a vhost-user back-end (the back-end decides)"
        ))
    } else {
        Ok(sock.into())
    })
}

/// One `--rng vhost-user=SOCK` (the in-process virtio-rng is `--rng` alone).
#[derive(Clone, Debug, PartialEq, Eq)]
struct RngArg(Option<std::path::PathBuf>);

fn parse_rng(s: &str) -> Result<RngArg, String> {
    match vhost_user_socket(s) {
        _ if s.is_empty() => Ok(RngArg(None)),
        Some(sock) => sock.map(|p| RngArg(Some(p))),
        None => Err(format!(
            "'{s}' is not vhost-user=SOCK (give --rng alone for our own virtio-rng)"
        )),
    }
}

/// `--inflight FORM`.
fn parse_inflight(s: &str) -> Result<serve::InflightForm, String> {
    match s {
        "copy" => Ok(serve::InflightForm::Copy),
        "map" => Ok(serve::InflightForm::Map),
        _ => Err(format!(
            "'{s}' is not a form of implicit grants (forms: 'copy', 'map')"
        )),
    }
}

fn parse_disk(s: &str) -> Result<DiskArg, String> {
    if let Some(sock) = vhost_user_socket(s) {
        return sock.map(|path| DiskArg {
            path,
            read_only: false,
            vhost_user: true,
        });
    }
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (only 'ro' is known)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty path".into());
    }
    Ok(DiskArg {
        path: path.into(),
        read_only,
        vhost_user: false,
    })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Plan a q35 guest's memory around the reserved memory (Intel DMAR RMRRs, AMD IVRS
    /// IVMDs, Arm IORT RMRs, reserved_regions) of the devices to assign: low RAM ends below the regions, the rest goes above
    /// 4 GiB, nothing is lost. Prints the e820, each region with its devices and what
    /// was done with it (reserved, identity, dropped), and every conflict.
    #[command(after_help = "Examples:\n  \
aperture layout --ram 8G --dmar /sys/firmware/acpi/tables/DMAR --assign 00:02.0\n  \
aperture layout --ram 4G --reserved-regions /sys/kernel/iommu_groups/7/reserved_regions --assign 00:14.0,relaxed --json\n  \
aperture layout --ram 8G --dmar DMAR --group 00:14.0,00:1a.0,00:1d.0   USB controllers sharing one RMRR, together\n  \
aperture layout --ram 8G --ivrs /sys/firmware/acpi/tables/IVRS --assign c4:00.7 --rdm-mem-boundary 1G   AMD IVMDs\n  \
aperture layout --ram 4G --iort /sys/firmware/acpi/tables/IORT --strategy host --json   Arm IORT RMR nodes\n\n\
A region several devices share is refused under strict unless every sharer is assigned\n\
in the same run (repeated --assign, or one --group); relaxed assigns with a warning.\n\n\
Exit status: 0 planned, 1 a strict conflict makes the plan impossible, 2 bad input.")]
    Layout(layout::Args),
    /// Give PCI devices of an arm64 virt guest a restricted DMA pool through the device
    /// tree: adds a /reserved-memory restricted-dma-pool node (placed at the top of RAM
    /// unless --pool-base says where) and, under the PCI host bridge, a node per device
    /// (by devfn on bus 0) with memory-region pointing at it, then compiles it with dtc.
    /// Prints POOL_NODE, POOL_BASE, POOL_SIZE, POOL_PHANDLE, PCI_BRIDGE and POOL_DEVICES
    /// as KEY=VALUE lines.
    #[command(after_help = "Examples:\n  \
qemu-system-aarch64 -M virt,dumpdtb=virt.dtb -cpu cortex-a57 -smp 1 -m 512M\n  \
aperture dt-pool --dtb virt.dtb --out pool.dtb --pool-size 16M --device 2\n  \
qemu-system-aarch64 -M virt -cpu cortex-a57 -smp 1 -m 512M -dtb pool.dtb \\\n      \
-device virtio-blk-pci,addr=2,iommu_platform=on,disable-legacy=on,drive=d0 ...\n\n\
The dump must come from the same QEMU with the same -m, -smp and -cpu as the boot.\n\
Exit status: 0 written, 1 the pool cannot be placed or dtc failed, 2 bad command line.")]
    DtPool(dt_pool::Args),
    /// Run one of our devices as an out-of-process vhost-user back-end (blk or rng).
    ///
    /// With iommu_platform=on at the front-end (VIRTIO_F_IOMMU_PLATFORM), the back-end
    /// maps only the guest memory windows the guest's IOMMU opened for the device
    /// (vhost-user IOTLB updates and misses) and unmaps them on invalidate, never the
    /// whole of guest RAM; without it, it maps guest RAM like any vhost-user back-end.
    /// After each connection it prints its peak exposure (--stats writes it as JSON).
    #[command(after_help = "Examples:\n  \
aperture backend blk --socket /tmp/blk.sock --disk disk.img --stats /tmp/blk.json --once\n  \
aperture backend rng --socket /tmp/rng.sock --require-iommu\n\n\
Exit status: 0 after the front-end disconnected (--once), 1 a socket failure, 2 bad input.")]
    Backend(backend::Args),
    /// Serve virtio-pci devices to QEMU over vfio-user: our virtio-iommu and the
    /// devices behind it.
    ///
    /// Creates one socket per PCI function in DIR, the VIOT table (DIR/viot.aml) that
    /// tells the guest our virtio-iommu translates for the other devices, and
    /// DIR/qemu-args: the QEMU arguments to append, one per line (guest RAM becomes a
    /// shared memfd, which vfio-user needs). Then serves until QEMU goes away. QEMU 10.1
    /// or newer with -device vfio-user-pci is needed (scripts/provision.sh installs one).
    #[command(after_help = "Examples:\n  \
aperture serve --dir /tmp/vm --disk disk.img --rng\n  \
qemu-system-x86_64 -M q35 -nographic -kernel vmlinuz ... $(cat /tmp/vm/qemu-args)\n  \
aperture serve --dir /tmp/vm --disk base.img,ro --iommu bypass\n  \
aperture serve --dir /tmp/vm --disk vhost-user=/tmp/blk.sock   (after: aperture backend blk --socket /tmp/blk.sock --disk disk.img)\n  \
aperture serve --dir /tmp/vm --rng vhost-user=/tmp/rng.sock --iommu off   (a third-party back-end, e.g. vhost-device-rng)\n  \
aperture serve --dir /tmp/vm --disk vhost-user=/tmp/blk.sock --rng vhost-user=/tmp/rng.sock --iommu off --inflight copy\n      \
(implicit grants: the back-ends get bounce copies of the buffers in flight, never guest RAM)\n  \
aperture serve --dir /tmp/vm --disk vhost-user=/tmp/blk.sock --iommu off --inflight map   (large buffers through per-request IOTLB windows)\n  \
aperture serve --dir /tmp/vm --disk disk.img --rng --mem 2560 \\\n      \
--reserved 0x90301000-0x90301fff@blk0 --reserved 0x98000000-0x980fffff@rng\n  \
aperture serve --dir /tmp/vm --disk disk.img --mem 2560 \\\n      \
--dmar /sys/firmware/acpi/tables/DMAR --host-device 0000:00:02.0=blk0   (the IGD's RMRRs reserved for blk0)\n  \
aperture serve --dir /tmp/vm --disk disk.img --ivrs IVRS --host-device c4:00.7=blk0\n  \
aperture serve --dir /tmp/vm --disk disk.img --rng --arch arm64 --iommu off --pool 16M --dtb virt.dtb\n      \
(pool mode: an arm64 virt guest whose devices reach only a restricted DMA pool)\n  \
aperture serve --dir /tmp/vm --disk a.img --disk b.img --dmar DMAR \\\n      \
--host-device 00:14.0=blk0 --host-device 00:1a.0=blk0 --host-device 00:1d.0=blk1   (USB controllers sharing an RMRR)\n\n\
Exit status: 0 after QEMU disconnected, 1 a device failed, 2 bad command line.")]
    Serve {
        /// Directory for the sockets, viot.aml and qemu-args (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A virtio-blk backed by a raw image (size a multiple of 512); ",ro" for read-only.
        /// "vhost-user=SOCK": a virtio-blk run by the vhost-user back-end listening at
        /// SOCK (start it first, e.g. aperture backend blk); behind the virtio-iommu it
        /// must offer VIRTIO_F_ACCESS_PLATFORM and gets only IOTLB windows.
        #[arg(long, value_name = "PATH[,ro]|vhost-user=SOCK", value_parser = parse_disk)]
        disk: Vec<DiskArg>,
        /// Add a virtio-rng: ours alone, or with "vhost-user=SOCK" one run by the
        /// vhost-user back-end at SOCK (a back-end without VIRTIO_F_ACCESS_PLATFORM,
        /// such as vhost-device-rng, needs --iommu off).
        #[arg(long, value_name = "vhost-user=SOCK", num_args = 0..=1, default_missing_value = "",
              value_parser = parse_rng)]
        rng: Option<RngArg>,
        /// How the virtio-iommu is presented.
        #[arg(long, value_enum, default_value_t = IommuArg::On)]
        iommu: IommuArg,
        /// Test switch for the end-to-end tests: reads of this sector of the first disk
        /// are aimed at an IOVA the guest never mapped, so the IOMMU must deny them.
        #[arg(long, value_name = "SECTOR", hide = true)]
        test_fault_sector: Option<u64>,
        /// Guest RAM in MiB (QEMU's -m; RAM is a shared memfd of that size).
        #[arg(long, value_name = "MIB", default_value_t = 512,
              value_parser = clap::value_parser!(u32).range(64..=65536))]
        mem: u32,
        /// Reserved device memory (like an Intel RMRR) of a served device: START and END
        /// (inclusive) are guest-physical addresses, DEVICE is blk0, blk1... (the --disk
        /// order) or rng. The guest layout keeps RAM off the range (low RAM ends below
        /// it, the rest goes above 4 GiB: no RAM is lost; QEMU gets max-ram-below-4g)
        /// and the device's virtio-iommu PROBE lists it. A range that cannot be kept
        /// free is refused (the policy is strict, as for an assigned device).
        #[arg(long, value_name = "START-END@DEVICE", value_parser = serve::parse_reserved)]
        reserved: Vec<serve::ReservedArg>,
        /// The host's ACPI DMAR table (Intel), to read --host-device regions from.
        #[arg(long, value_name = "FILE")]
        dmar: Option<std::path::PathBuf>,
        /// The host's ACPI IVRS table (AMD), to read --host-device regions from.
        #[arg(long, value_name = "FILE")]
        ivrs: Option<std::path::PathBuf>,
        /// The host's ACPI IORT table (Arm), to read --host-device regions from.
        #[arg(long, value_name = "FILE")]
        iort: Option<std::path::PathBuf>,
        /// Give served DEVICE (blk0, blk1..., rng) the reserved regions that the host
        /// tables list for host function HOSTBDF, as if each were a --reserved range. A
        /// region HOSTBDF shares with other host functions is refused unless each of
        /// them is given too (any served device), or with ",relaxed" at the end.
        #[arg(long = "host-device", value_name = "HOSTBDF=DEVICE[,relaxed]",
              value_parser = serve::parse_host_device)]
        host_device: Vec<serve::HostDeviceArg>,
        /// Longest a device thread keeps polling the queues for new requests after
        /// the last one, in microseconds, with the guest's notifications off while it
        /// polls (a busy guest then sends no doorbell at all). The window adapts below
        /// this as QEMU's does; 0 never polls (every request waits for its doorbell).
        #[arg(long, value_name = "MAX", default_value_t = DEFAULT_POLL_US,
              value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        poll_us: u32,
        #[command(flatten)]
        poll_budget: poll_budget::BudgetArgs,
        /// Implicit grants for every vhost-user device (issue 16): the device host reads
        /// the guest's rings and gives the back-end only what is in flight. "copy": the
        /// back-end's memory table holds shadow rings and bounce buffers the device host
        /// made, never a descriptor of guest RAM; the guest's data is copied in before a
        /// request is posted and copied back (at most what the back-end says it wrote)
        /// before the guest sees it done. Needs no IOMMU driver in the guest and no
        /// IOMMU support in the back-end; works with --iommu off and on. "map": buffers
        /// of at least --inflight-map-kib are shown in place through IOTLB windows opened
        /// per request (acknowledged before the back-end is kicked, closed before the
        /// guest sees the request done) instead of copied; needs a back-end with
        /// VIRTIO_F_ACCESS_PLATFORM (aperture backend blk) and --iommu off, and gives it
        /// guest RAM's descriptor, so only a cooperating back-end is confined.
        /// virtio-blk and virtio-rng only.
        #[arg(long, value_name = "copy|map", value_parser = parse_inflight)]
        inflight: Option<serve::InflightForm>,
        /// With --inflight map: the size in KiB from which a buffer is shown in place
        /// rather than copied.
        #[arg(long, value_name = "KIB", requires = "inflight",
              default_value_t = (device_host::vhost_user::DEFAULT_MAP_THRESHOLD >> 10) as u32,
              value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
        inflight_map_kib: u32,
        /// With --inflight: MiB of bounce buffers per queue (what can be in flight at
        /// once). A request larger than this fails with the device's error status;
        /// smaller ones wait for space.
        #[arg(long, value_name = "MIB", requires = "inflight",
              default_value_t = (device_host::vhost_user::DEFAULT_ARENA_BYTES >> 20) as u32,
              value_parser = clap::value_parser!(u32).range(1..=1024))]
        inflight_arena_mib: u32,
        /// The guest machine: x86_64 (q35) or arm64 (virt, device tree).
        #[arg(long, value_enum, default_value_t = ArchArg::X86_64)]
        arch: ArchArg,
        /// Pool mode (arm64, --iommu off, --dtb): a restricted DMA pool of SIZE bytes
        /// (K, M, G suffixes) at the top of guest RAM, written into the guest's device
        /// tree (DIR/pool.dtb, added to qemu-args with -dtb) for every served function.
        /// Each device offers VIRTIO_F_ACCESS_PLATFORM, so the guest bounces all its DMA
        /// through the pool, and reaches only the pool: any other guest address fails
        /// the request. Guest RAM is then two memfds split at the pool (two NUMA
        /// nodes), and a vhost-user back-end (--disk vhost-user=SOCK) is given the
        /// pool's alone.
        #[arg(long, value_name = "SIZE", value_parser = layout::parse_size, requires = "dtb")]
        pool: Option<u64>,
        /// With --pool: the virt machine's device tree as QEMU dumps it, with the -cpu,
        /// -smp and -m the guest boots with (-m must be --mem):
        /// qemu-system-aarch64 -M virt,dumpdtb=FILE -cpu cortex-a57 -smp 1 -m 512M.
        #[arg(long, value_name = "FILE")]
        dtb: Option<std::path::PathBuf>,
        /// The device tree compiler (with --pool).
        #[arg(long, value_name = "PATH", default_value = "dtc")]
        dtc: std::path::PathBuf,
    },
    /// Boot an unmodified Linux guest whose disk and RNG sit behind our virtio-iommu,
    /// run a workload in it, and report what each device could reach.
    ///
    /// Provisions what is missing (QEMU >= 10.1 with vfio-user-pci and Debian's 6.12
    /// guest kernel, cached under ~/.cache/aperture; needs root for apt the first
    /// time), serves a virtio-blk and a virtio-rng behind our virtio-iommu from this
    /// process over vfio-user, boots the guest under QEMU (TCG), reads, writes and reads
    /// back the disk with checksums checked on both sides, reads the RNG, and prints:
    /// time to the guest's init, I/O throughput, MAP/UNMAP counts, faults, and each
    /// device's exposure: the most guest memory it could reach at one moment (100%
    /// with --iommu off). Exit status 1 if any check fails.
    ///
    /// With --model it instead plays Linux's driver sequence against the device model
    /// through a fake guest driver, in-process and in a second (no QEMU needed).
    #[command(
        after_help = "Examples:\n  aperture demo\n  aperture demo --iommu off        the same with no IOMMU: exposure 100%\n  aperture demo --iommu off --inflight copy   back-end processes that hold no guest RAM\n  aperture demo --lazy --mib 64\n  aperture demo --model --endpoints 8 --json"
    )]
    Demo {
        /// How the virtio-iommu is presented (as for serve).
        #[arg(long, value_enum, default_value_t = IommuArg::On)]
        iommu: IommuArg,
        /// Let the guest defer IOTLB flushes (Linux's default) instead of iommu.strict=1.
        #[arg(long)]
        lazy: bool,
        /// MiB the guest reads, then writes, then reads back.
        #[arg(long, value_name = "MIB", default_value_t = 128,
              value_parser = clap::value_parser!(u32).range(1..=4096))]
        mib: u32,
        /// Implicit grants (as for serve): the disk and the RNG run in `aperture backend`
        /// processes given only the device host's shadow rings and bounce buffers; the
        /// report shows what they could read. Works with any --iommu.
        #[arg(long, value_name = "copy", value_parser = parse_inflight)]
        inflight: Option<serve::InflightForm>,
        /// Play the driver sequence against the device model instead (no guest, no QEMU).
        #[cfg(feature = "bench")]
        #[arg(long)]
        model: bool,
        /// With --model: number of endpoints (1 to 64); the first two are virtio-blk and virtio-rng.
        #[cfg(feature = "bench")]
        #[arg(
            long,
            value_name = "N",
            default_value_t = 2,
            requires = "model",
            value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_ENDPOINTS))
        )]
        endpoints: u32,
        /// Print a JSON summary instead of the human-readable report.
        #[arg(long)]
        json: bool,
        /// The guest: x86_64 (q35, our virtio-iommu) or arm64 (virt with a device tree;
        /// needs --pool).
        #[arg(long, value_enum, default_value_t = ArchArg::X86_64)]
        arch: ArchArg,
        /// Pool mode (with --arch arm64): the devices reach only a restricted DMA pool
        /// of SIZE bytes (K, M, G suffixes; a multiple of 2 MiB) at the top of guest
        /// RAM, which the guest bounces all their DMA through.
        #[arg(long, value_name = "SIZE", value_parser = layout::parse_size)]
        pool: Option<u64>,
    },
    #[cfg(feature = "bench")]
    /// The cost survey: what each way of sharing guest memory with a device costs, per
    /// device access pattern, measured in one run.
    ///
    /// Every sharing mode — none (the backend reaches all RAM), viommu-strict and
    /// viommu-lazy (every buffer a MAP and an UNMAP request to our virtio-iommu, the
    /// UNMAP waited for or deferred to the next sync), grant-map, grant-persistent and
    /// grant-copy (Xen grant tables: pages granted and mapped per I/O, a pool granted
    /// once and copied through, or granted and copied by the backend), pool (every
    /// buffer bounced through a restricted DMA pool, swiotlb's rules) and auto (small
    /// buffers bounced through the pool, which is mapped once, large ones mapped) —
    /// against every pattern — blk 4 KiB random, 64 KiB and 1 MiB sequential reads,
    /// network-like transmits of 64 and 1500 bytes (header + payload buffers), rng 64 B
    /// reads — with the same device backends driven by a model of the guest's driver
    /// and DMA layer. Per cell: throughput, CPU per byte and per request, mapping
    /// operations per request, bytes copied per byte moved, and exposure (most guest
    /// memory the backend could reach). Every cell runs with the backend in this
    /// process; those a backend process exists for (blk and rng under none, viommu,
    /// pool and auto) run again with `aperture backend` in a child process over
    /// vhost-user.
    ///
    /// First it measures where mapping one buffer becomes cheaper than bouncing it, and
    /// auto bounces below that size unless --auto-threshold says otherwise; the table
    /// ends with auto against the cheaper of pool and viommu-strict per pattern.
    ///
    /// Writes JSON (every figure and the machine) and an SVG plot of CPU per byte
    /// against request size. With --guest it also boots the Linux guest (QEMU TCG) to
    /// measure in-guest disk reads with our device host and with QEMU's own devices,
    /// and reports how the model's cost of isolation agrees with the guest's.
    #[command(after_help = "Examples:\n  \
aperture bench                       the survey, about 2 min (release build)\n  \
aperture bench --quick               every cell briefly, for CI and smoke checks\n  \
aperture bench --auto-threshold 4096 --json /tmp/s.json --svg /tmp/s.svg\n  \
aperture bench --guest --runs 3      also in the Linux guest (minutes per boot)\n\n\
Figures compare paths on this machine; the guest runs under TCG, not at hardware speed.\n\
Exit status: 0 done, 1 a cell or a boot failed, 2 bad command line.")]
    Bench {
        /// Every cell for 100 ms instead of 1 s (under a minute in all).
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON [default: target/bench/survey.json in the workspace].
        #[arg(long, value_name = "FILE")]
        json: Option<std::path::PathBuf>,
        /// Where to write the plot [default: target/bench/survey.svg in the workspace].
        #[arg(long, value_name = "FILE")]
        svg: Option<std::path::PathBuf>,
        /// auto bounces buffers shorter than this and maps the rest [default: the
        /// measured crossover].
        #[arg(long, value_name = "BYTES",
              value_parser = clap::value_parser!(u32).range(1..=262144))]
        auto_threshold: Option<u32>,
        /// Also measure in the Linux guest: 4 KiB random and 1 MiB sequential O_DIRECT
        /// reads (scripts/guest/diskbench.c) through our device host and through QEMU's
        /// own virtio-blk-pci / virtio-iommu-pci, strict, lazy and without an IOMMU;
        /// each boot's guest must report the IOMMU mode asked for.
        #[arg(long)]
        guest: bool,
        /// With --guest: boot each configuration N times and report the median.
        #[arg(long, value_name = "N", default_value_t = 1, requires = "guest",
              value_parser = clap::value_parser!(u32).range(1..=100))]
        runs: u32,
        /// With --guest: only these configurations (comma-separated).
        #[arg(
            long,
            value_name = "NAME,...",
            value_enum,
            value_delimiter = ',',
            requires = "guest"
        )]
        only: Vec<bench_guest::Config>,
        /// With --guest: timed seconds of each workload in each boot.
        #[arg(long, value_name = "S", default_value_t = 10, requires = "guest",
              value_parser = clap::value_parser!(u32).range(1..=3600))]
        seconds: u32,
        /// With --guest: size of the disk image in MiB (random reads span all of it).
        #[arg(long, value_name = "MIB", default_value_t = 256, requires = "guest",
              value_parser = clap::value_parser!(u32).range(16..=65536))]
        disk_mib: u32,
        /// With --guest: where to write the guest's JSON [default:
        /// target/bench/guest-disk.json in the workspace].
        #[arg(long, value_name = "PATH", requires = "guest")]
        out: Option<std::path::PathBuf>,
        /// With --guest: our device host's poll window maximum, as `serve --poll-us`.
        #[arg(long, value_name = "MAX", default_value_t = DEFAULT_POLL_US, requires = "guest",
              value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        poll_us: u32,
        /// With --guest: the out-of-process back-end's poll window maximum, as
        /// `backend --poll-us`.
        #[arg(long, value_name = "MAX", default_value_t = DEFAULT_BACKEND_POLL_US,
              requires = "guest", value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
        backend_poll_us: u32,
        /// With --guest: the poll budget our device host and back-ends share, as
        /// `serve`'s.
        #[command(flatten)]
        poll_budget: poll_budget::BudgetArgs,
    },
}

/// `--poll-us`'s default: the device host's.
const DEFAULT_POLL_US: u32 = {
    let us = device_host::host::DEFAULT_POLL_MAX.as_micros();
    assert!(us <= u32::MAX as u128);
    us as u32
};

/// `backend --poll-us`'s default. Longer than the device host's: out of process, a
/// QD1 guest's next request comes 300-500 µs after the last (the IOTLB round trips of
/// its UNMAPs come in between), past a 256 µs window, so every request would need its
/// kick (docs/ARCHITECTURE.md, "Polling").
const DEFAULT_BACKEND_POLL_US: u32 = 1000;

fn poll_max(us: u32) -> std::time::Duration {
    std::time::Duration::from_micros(u64::from(us))
}

fn main() -> ExitCode {
    // Usage errors exit with status 2 from here, `--help` and `--version` with 0.
    let cli = Cli::parse();
    match cli.command {
        Command::Layout(args) => layout::run(args),
        Command::DtPool(args) => dt_pool::run(args),
        Command::Backend(args) => backend::run(args),
        #[cfg(feature = "bench")]
        Command::Demo {
            model: true,
            inflight: Some(_),
            ..
        } => {
            eprintln!("aperture demo: --inflight needs the guest; --model plays the driver model without one");
            ExitCode::from(2)
        }
        #[cfg(feature = "bench")]
        Command::Demo {
            model: true,
            endpoints,
            json,
            ..
        } => run_demo(endpoints, json),
        Command::Demo {
            arch,
            pool,
            mib,
            json,
            ..
        } if arch == ArchArg::Arm64 || pool.is_some() => {
            match (arch, pool) {
                (ArchArg::Arm64, Some(pool_size)) => demo_arm64::run(demo_arm64::Options {
                    pool_size,
                    mib,
                    json,
                }),
                (ArchArg::Arm64, None) => {
                    eprintln!("aperture demo: --arch arm64 runs in pool mode: give --pool SIZE (e.g. 16M)");
                    ExitCode::from(2)
                }
                _ => {
                    eprintln!("aperture demo: --pool needs a guest that reads a device tree: --arch arm64");
                    ExitCode::from(2)
                }
            }
        }
        Command::Demo {
            iommu,
            lazy,
            mib,
            json,
            inflight,
            ..
        } => demo::run(demo::Options {
            mode: mode(iommu),
            strict: !lazy,
            mib,
            json,
            inflight,
        }),
        #[cfg(feature = "bench")]
        Command::Bench {
            quick,
            json,
            svg,
            auto_threshold,
            guest,
            runs,
            only,
            seconds,
            disk_mib,
            out,
            poll_us,
            backend_poll_us,
            poll_budget,
        } => bench::run(bench::Options {
            quick,
            json,
            svg,
            auto_threshold: auto_threshold.map(|t| t as usize),
            guest: guest.then_some(bench_guest::Options {
                runs,
                only,
                seconds,
                disk_mib,
                out,
                poll: poll_max(poll_us),
                backend_poll: poll_max(backend_poll_us),
                poll_budget,
            }),
        }),
        Command::Serve {
            dir,
            disk,
            rng,
            iommu,
            mem,
            reserved,
            dmar,
            ivrs,
            iort,
            host_device,
            test_fault_sector,
            poll_us,
            poll_budget,
            inflight,
            inflight_arena_mib,
            inflight_map_kib,
            arch,
            pool,
            dtb,
            dtc,
        } => serve::run(serve::Options {
            dir: &dir,
            disks: &disk,
            rng: rng.is_some(),
            iommu,
            mem,
            reserved: &reserved,
            host_tables: serve::HostTables {
                dmar: dmar.as_deref(),
                ivrs: ivrs.as_deref(),
                iort: iort.as_deref(),
            },
            host_devices: &host_device,
            test_fault_sector,
            rng_vhost_user: rng.as_ref().and_then(|r| r.0.as_deref()),
            poll: poll_max(poll_us),
            poll_budget,
            inflight: inflight.map(|form| device_host::vhost_user::InflightConfig {
                arena_bytes: u64::from(inflight_arena_mib) << 20,
                map_threshold: (form == serve::InflightForm::Map)
                    .then_some(u64::from(inflight_map_kib) << 10),
                ..Default::default()
            }),
            arm64: arch == ArchArg::Arm64,
            pool: pool.map(|size| serve::PoolArg {
                size,
                dtb: dtb.unwrap_or_default(),
                dtc,
            }),
        }),
    }
}

fn mode(iommu: IommuArg) -> device_host::host::IommuMode {
    match iommu {
        IommuArg::On => device_host::host::IommuMode::On,
        IommuArg::Off => device_host::host::IommuMode::Off,
        IommuArg::Bypass => device_host::host::IommuMode::Bypass,
    }
}

#[cfg(feature = "bench")]
fn run_demo(endpoints: u32, json: bool) -> ExitCode {
    // A panic inside the device model or the fake guest is a failed check too: report
    // it as one and exit 1, not with the runtime's 101.
    let report = match std::panic::catch_unwind(|| demo_model::run(endpoints)) {
        Ok(report) => report,
        Err(_) => {
            eprintln!("aperture demo: FAILED: the demo panicked (message above)");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report.to_json()) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("aperture demo: cannot render the JSON summary: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    let failed = report.failed();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "aperture demo: FAILED: {} of {} checks failed:",
            failed.len(),
            report.checked()
        );
        for step in failed {
            eprintln!("  - {}", step.describe_failure());
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vhost_user_device_arguments_name_a_socket() {
        let d = parse_disk("vhost-user=/tmp/b.sock").unwrap_or_else(|e| panic!("{e}"));
        assert!(d.vhost_user && !d.read_only && d.path == std::path::Path::new("/tmp/b.sock"));
        assert!(!parse_disk("disk.img").is_ok_and(|d| d.vhost_user));
        for bad in ["vhost-user=", "vhost-user=/tmp/b.sock,ro"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
            assert!(parse_rng(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_rng(""), Ok(RngArg(None)));
        assert!(parse_rng("/tmp/r.sock").is_err_and(|e| e.contains("vhost-user=SOCK")));
        let rng = |a: &[&str]| {
            let mut v = vec!["aperture", "serve", "--dir", "/tmp/x"];
            v.extend_from_slice(a);
            Cli::try_parse_from(v)
        };
        assert!(
            rng(&["--rng", "--iommu", "off"]).is_ok(),
            "--rng alone still works"
        );
        assert!(rng(&["--rng", "vhost-user=/tmp/r.sock"]).is_ok());
        assert!(rng(&["--rng", "bogus"]).is_err());
    }

    #[test]
    fn endpoints_range_is_enforced() {
        let parse =
            |n: &str| Cli::try_parse_from(["aperture", "demo", "--model", "--endpoints", n]);
        assert!(parse("0").is_err());
        assert!(parse("65").is_err());
        assert!(parse("64").is_ok());
    }
}
