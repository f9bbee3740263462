//! `aperture backend blk|rng|net-tx`: our devices as out-of-process vhost-user
//! back-ends.
//!
//! The same device code as in-process (`virtio_devices::Block` and `Rng`, and the cost
//! survey's transmit sink `survey::net::NetTx`) runs over
//! [`vhost_iotlb::GuestView`]: with `iommu_platform=on` at the front-end the back-end
//! maps only the windows the guest's IOMMU opened (IOTLB updates and misses) and loses
//! them on invalidate; without it, it maps guest RAM as any vhost-user back-end.
//! Listens on a Unix socket (the front-end connects, as QEMU's `-chardev socket` does),
//! serves one front-end at a time, and after each connection prints its exposure
//! figures and, with `--stats`, writes them as JSON.
//!
//! Exit status: 0 after the front-end disconnected (`--once`), 1 a socket failure, 2 bad
//! command line or input (a disk that cannot be opened, a socket path in use).

use serde_json::json;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
#[cfg(feature = "bench")]
use survey::net::NetTx;
use vhost_iotlb::{Limits, MapPolicy, Mode, Report, Session, SessionConfig};
use virtio_devices::{Block, BlockConfig, Rng, RngConfig};

/// Arguments of `aperture backend`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    device: Device,
}

/// Options every back-end takes.
#[derive(Debug, clap::Args)]
struct Common {
    /// Unix socket to listen on (created; a stale socket there is replaced).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Refuse a front-end that does not negotiate VIRTIO_F_IOMMU_PLATFORM, so this
    /// back-end never maps all of guest RAM.
    #[arg(long)]
    require_iommu: bool,
    /// After each connection, write the exposure figures there as JSON.
    #[arg(long, value_name = "FILE")]
    stats: Option<PathBuf>,
    /// Exit after the first front-end disconnects (default: wait for the next).
    #[arg(long)]
    once: bool,
    /// Most IOTLB windows held at once; past it the oldest is dropped (16 to 60000).
    #[arg(long, value_name = "N", default_value_t = 16384,
          value_parser = clap::value_parser!(u32).range(16..=60000))]
    max_windows: u32,
    /// Longest the device worker keeps polling the rings for new buffers after the
    /// last one, in microseconds, with the driver's kicks off while it polls; the
    /// window adapts below this as `aperture serve --poll-us` does. 0 never polls
    /// (every request waits for its kick).
    #[arg(long, value_name = "MAX", default_value_t = crate::DEFAULT_BACKEND_POLL_US,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    poll_us: u32,
    /// How IOTLB windows reach guest memory behind an IOMMU. `windows`: each one is its
    /// own mapping of exactly what the guest mapped, unmapped when invalidated, so
    /// this process never maps a page the guest did not map for the device.
    /// `whole`: guest RAM is mapped once and every access is checked against the
    /// IOTLB, as the device host checks its own in process; an invalidation then
    /// needs no `munmap`, and from our own device host no answer from this process
    /// between requests (a stray pointer here can then reach all of guest RAM).
    #[arg(long, value_name = "HOW", value_enum, default_value_t = IotlbMap::Windows)]
    iotlb_map: IotlbMap,
    #[command(flatten)]
    poll_budget: crate::poll_budget::BudgetArgs,
}

/// `--iotlb-map` (see there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum IotlbMap {
    /// One mapping per IOTLB window.
    Windows,
    /// Guest RAM mapped whole, windows checked in software.
    Whole,
}

impl IotlbMap {
    /// The option as written on a command line.
    pub(crate) fn arg(self) -> &'static str {
        match self {
            Self::Windows => "windows",
            Self::Whole => "whole",
        }
    }
}

impl From<IotlbMap> for MapPolicy {
    fn from(m: IotlbMap) -> Self {
        match m {
            IotlbMap::Windows => Self::Windows,
            IotlbMap::Whole => Self::Whole,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
enum Device {
    /// virtio-blk on a raw image (a whole number of 512-byte sectors).
    #[command(
        after_help = "Example (QEMU as the front-end, guest behind its virtio-iommu):\n  \
aperture backend blk --socket /tmp/blk.sock --disk disk.img --stats /tmp/blk.json --once &\n  \
qemu-system-x86_64 -M q35,memory-backend=mem -m 512M \\\n    \
-object memory-backend-memfd,id=mem,size=512M,share=on \\\n    \
-device virtio-iommu-pci -chardev socket,id=blk,path=/tmp/blk.sock \\\n    \
-device vhost-user-blk-pci,chardev=blk,iommu_platform=on,disable-legacy=on ..."
    )]
    Blk {
        #[command(flatten)]
        common: Common,
        /// The disk image.
        #[arg(long, value_name = "FILE")]
        disk: PathBuf,
        /// Open the image read-only and offer VIRTIO_BLK_F_RO.
        #[arg(long)]
        read_only: bool,
    },
    /// virtio-rng reading the host's /dev/urandom.
    #[command(after_help = "Example:\n  \
aperture backend rng --socket /tmp/rng.sock &\n  \
qemu-system-x86_64 ... -chardev socket,id=rng,path=/tmp/rng.sock \\\n    \
-device vhost-user-rng-pci,chardev=rng,iommu_platform=on")]
    Rng {
        #[command(flatten)]
        common: Common,
    },
    /// The cost survey's virtio-net transmit sink: one transmit queue whose frames
    /// (a 12-byte virtio_net_hdr_v1 and up to 1514 bytes) are read and dropped.
    ///
    /// Not a whole virtio-net device (no receive queue, no tap), so no guest driver
    /// binds it; `aperture bench` drives it for the network patterns out of process.
    #[cfg(feature = "bench")]
    #[command(name = "net-tx")]
    NetTx {
        #[command(flatten)]
        common: Common,
    },
}

/// Runs `aperture backend`.
pub fn run(args: Args) -> ExitCode {
    match args.device {
        Device::Blk {
            common,
            disk,
            read_only,
        } => {
            let config = BlockConfig {
                path: disk,
                read_only,
                // Offered always; the front-end decides (iommu_platform=on).
                access_platform: true,
                test_stray_sector: None,
            };
            // Opened once up front so a bad image is a command-line error.
            if let Err(e) = Block::new(&config) {
                eprintln!("aperture backend blk: --disk: {e}");
                return ExitCode::from(2);
            }
            // The front-end's ring may be smaller than the device's own queue: leave
            // room for header and status (see `Block::set_seg_max`).
            let make = || {
                let mut b = Block::new(&config).map_err(|e| e.to_string())?;
                b.set_seg_max(FRONTEND_QUEUE_SIZE - 2)
                    .map_err(|e| e.to_string())?;
                Ok(b)
            };
            serve(&common, "blk", make, |b| {
                let c = b.counters();
                json!({"ok": c.ok, "ioerr": c.ioerr, "unsupp": c.unsupp, "dropped": c.dropped})
            })
        }
        Device::Rng { common } => {
            let config = RngConfig {
                access_platform: true,
                ..RngConfig::default()
            };
            serve(
                &common,
                "rng",
                || Rng::new(&config).map_err(|e| e.to_string()),
                |_| json!({}),
            )
        }
        #[cfg(feature = "bench")]
        Device::NetTx { common } => serve(
            &common,
            "net-tx",
            || Ok(NetTx::default()),
            |n| json!({"frames": n.frames, "errors": n.errors}),
        ),
    }
}

/// Ring size a vhost-user front-end gives the block queue unless told otherwise
/// (QEMU's `vhost-user-blk` `queue-size` default).
const FRONTEND_QUEUE_SIZE: u32 = 128;

/// Binds the socket: refuses a path that exists and is not a socket, replaces a socket
/// nobody listens on.
fn bind(path: &Path) -> Result<UnixListener, String> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(format!("{} is in use by a running server", path.display()));
        }
        std::fs::remove_file(path)
            .map_err(|e| format!("cannot replace {}: {e}", path.display()))?;
    }
    UnixListener::bind(path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))
}

fn serve<D>(
    common: &Common,
    name: &str,
    make: impl Fn() -> Result<D, String>,
    counters: impl Fn(&D) -> serde_json::Value,
) -> ExitCode
where
    D: virtio_contract::VirtioDevice<vhost_iotlb::GuestView> + Send,
{
    let prog = format!("aperture backend {name}");
    let poll = match common
        .poll_budget
        .config(&prog, crate::poll_max(common.poll_us))
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{prog}: {e}");
            return ExitCode::from(2);
        }
    };
    let listener = match bind(&common.socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{prog}: --socket: {e}");
            return ExitCode::from(2);
        }
    };
    let config = SessionConfig {
        limits: Limits {
            max_windows: common.max_windows as usize,
            ..Limits::default()
        },
        require_iommu: common.require_iommu,
        poll,
        map: common.iotlb_map.into(),
    };
    eprintln!("{prog}: listening on {}", common.socket.display());
    let status = loop {
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("{prog}: accept on {} failed: {e}", common.socket.display());
                break ExitCode::FAILURE;
            }
        };
        let device = match make() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("{prog}: {e}");
                break ExitCode::FAILURE;
            }
        };
        let report = Session::new(device, config.clone()).and_then(|s| s.run(sock));
        let ok = match report {
            Ok(r) => {
                let map = common.iotlb_map;
                let stats = stats_json(name, &r, map, counters(&r.device));
                eprintln!("{prog}: front-end disconnected: {}", summary(&r, map));
                if let Some(path) = &common.stats {
                    let text = serde_json::to_string_pretty(&stats).unwrap_or_default();
                    if let Err(e) = std::fs::write(path, text + "\n") {
                        eprintln!("{prog}: --stats: cannot write {}: {e}", path.display());
                        break ExitCode::FAILURE;
                    }
                }
                true
            }
            Err(e) => {
                eprintln!("{prog}: the connection failed: {e}");
                false
            }
        };
        if common.once {
            break if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
        }
    };
    let _ = std::fs::remove_file(&common.socket);
    status
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Unset => "unset",
        Mode::Plain => "plain",
        Mode::Iotlb => "iotlb",
    }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// The mode as the summary and the JSON name it; in IOTLB mode with how windows are
/// mapped.
fn mode_text(m: Mode, map: IotlbMap) -> &'static str {
    match (m, map) {
        (Mode::Iotlb, IotlbMap::Windows) => "iotlb, windows mapped one by one",
        (Mode::Iotlb, IotlbMap::Whole) => "iotlb, guest RAM mapped whole",
        (m, _) => mode_name(m),
    }
}

fn summary<D>(r: &Report<D>, map: IotlbMap) -> String {
    let e = &r.exposure;
    format!(
        "mode {}, peak exposure {} KiB of {} MiB guest RAM ({:.3}%), peak windows {}, \
updates {} ({} from the push ring, {} refused there), invalidates {} ({} from the ring, {} waited for the device), misses {} ({} failed), \
access failures {}, ring passes found by polling {}, poll windows without a turn of the poll budget {}",
        mode_text(r.mode, map),
        e.peak_mapped_bytes >> 10,
        e.guest_ram_bytes >> 20,
        100.0 * share(e.peak_mapped_bytes, e.guest_ram_bytes),
        e.peak_windows,
        e.updates,
        e.ring_updates,
        e.ring_refused,
        e.invalidates,
        e.ring_invalidates,
        e.deferred_invalidates,
        e.misses,
        e.miss_failures,
        e.access_fails,
        r.polled,
        r.poll_refused
    )
}

fn stats_json<D>(
    name: &str,
    r: &Report<D>,
    map: IotlbMap,
    device: serde_json::Value,
) -> serde_json::Value {
    let e = &r.exposure;
    json!({
        "device": name,
        "mode": mode_name(r.mode),
        "iotlb_map": map.arg(),
        "guest_ram_bytes": e.guest_ram_bytes,
        "mapped_bytes": e.mapped_bytes,
        "peak_mapped_bytes": e.peak_mapped_bytes,
        "peak_share": share(e.peak_mapped_bytes, e.guest_ram_bytes),
        "windows": e.windows,
        "peak_windows": e.peak_windows,
        "updates": e.updates,
        "ring_updates": e.ring_updates,
        "ring_refused": e.ring_refused,
        "ring_invalidates": e.ring_invalidates,
        "invalidates": e.invalidates,
        "deferred_invalidates": e.deferred_invalidates,
        "evictions": e.evictions,
        "revoked_in_use": e.revoked_in_use,
        "misses": e.misses,
        "miss_failures": e.miss_failures,
        "access_fails": e.access_fails,
        "polled": r.polled,
        "poll_refused": r.poll_refused,
        "requests": device,
    })
}
