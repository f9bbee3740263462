//! Running one cell: a device access pattern served by one device backend under one
//! sharing mode, with the guest's driver doing what Linux's drivers do per request
//! (write the request, map every buffer, post one chain, wait, unmap in order, check
//! the status), timed on the wall clock and on the thread's CPU clock.

use crate::modes::{Mapping, ModeError, ModeStats, Sharing};
use crate::net::{NetTx, NET_HDR_LEN};
use crate::remote::RemoteError;
use crate::ring::{Buf, GuestRing, RingError};
use dma_types::DmaDirection;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use virtio_contract::{DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_devices::{Block, BlockConfig, BlockError, Rng, RngConfig, RngError};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// Where the driver keeps a request header.
const HDR: u64 = 0x20_0000;
/// Where it keeps the status byte.
const STATUS: u64 = 0x21_0000;
/// Where its data buffers start.
const DATA: u64 = 0x100_0000;
/// A blk read's data buffer is not one contiguous piece of guest-physical memory:
/// O_DIRECT reads land in user pages the guest allocated wherever it could, and the
/// guest's own counters show about two pages per contiguous piece (129.5 MAPs per
/// 1 MiB read, `aperture bench --guest`). So the model's blk data comes in pieces of
/// [`PIECE`] bytes, [`PIECE_STRIDE`] apart, each mapped and described on its own, as
/// Linux's DMA layer maps each contiguous piece of a scatterlist.
pub const PIECE: usize = 8192;
/// Distance between the starts of two pieces (so that no two are contiguous).
pub const PIECE_STRIDE: u64 = 2 * PIECE as u64;
/// Size of the disk image the blk patterns read.
pub const DISK_BYTES: u64 = 64 << 20;
const SECTOR: u64 = 512;
const VIRTIO_BLK_T_IN: u32 = 0;

/// Why a cell failed: its setup, a request, or the check of what a request moved.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The sharing mode could not be set up, or refused to map or unmap a buffer.
    #[error(transparent)]
    Mode(#[from] ModeError),
    /// The driver's side of the ring failed.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The backend in another process failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// The disk image cannot be written or read.
    #[error("{}: {source}", .path.display())]
    DiskImage {
        /// The image.
        path: PathBuf,
        /// What the file system reported.
        #[source]
        source: std::io::Error,
    },
    /// The virtio-blk device cannot open the disk image.
    #[error("{}: {source}", .path.display())]
    Block {
        /// The image.
        path: PathBuf,
        /// What the device reported.
        #[source]
        source: BlockError,
    },
    /// The virtio-rng device cannot be built.
    #[error("virtio-rng: {0}")]
    Rng(#[source] RngError),
    /// The device failed to process its queue.
    #[error(transparent)]
    Device(#[from] virtio_contract::DeviceError),
    /// The driver cannot reach its own memory (a request header, a status byte, a
    /// buffer) at guest-physical `addr`.
    #[error("guest memory at {addr:#x}: {source}")]
    GuestMemory {
        /// The guest-physical address accessed.
        addr: u64,
        /// What guest memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// The device served the request without returning its chain.
    #[error("the device returned no chain")]
    NoChain {
        /// The pattern.
        pattern: Pattern,
    },
    /// The device returned the chain with another used length than the request needs.
    #[error(
        "{}: used length {used}, want {want} (blk status byte {status:?})",
        .pattern.name()
    )]
    UsedLength {
        /// The pattern.
        pattern: Pattern,
        /// The used length returned.
        used: u32,
        /// The used length the request needs.
        want: u32,
        /// The blk status byte, if readable.
        status: Option<u8>,
    },
    /// A blk request completed with a status other than `VIRTIO_BLK_S_OK`.
    #[error("{}: status {status}", .pattern.name())]
    Status {
        /// The pattern.
        pattern: Pattern,
        /// The status byte.
        status: u8,
    },
    /// The data a blk read returned differs from the image.
    #[error(
        "{}: the data read differs from the image at {offset:#x}",
        .pattern.name()
    )]
    DataMismatch {
        /// The pattern.
        pattern: Pattern,
        /// The image offset read.
        offset: u64,
    },
    /// An rng read returned only zero bytes.
    #[error("{}: {len} zero bytes", .pattern.name())]
    AllZero {
        /// The pattern.
        pattern: Pattern,
        /// Bytes read.
        len: usize,
    },
    /// The net sink did not take exactly the one frame sent.
    #[error("{}: the sink took {frames} frames, refused {errors}", .pattern.name())]
    NetSink {
        /// The pattern.
        pattern: Pattern,
        /// Frames taken.
        frames: u64,
        /// Chains refused.
        errors: u64,
    },
}

/// [`RunError::GuestMemory`] at `addr`.
fn mem_at(addr: u64) -> impl FnOnce(GuestMemoryError) -> RunError {
    move |source| RunError::GuestMemory { addr, source }
}

/// A device access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    /// virtio-blk 4 KiB reads at random 4 KiB-aligned offsets.
    Blk4kRandom,
    /// virtio-blk 64 KiB sequential reads.
    Blk64k,
    /// virtio-blk 1 MiB sequential reads (split at the mode's longest mapping).
    Blk1mSeq,
    /// Network-like transmit of 64-byte packets: a 12-byte header buffer + payload.
    Net64,
    /// The same with 1500-byte packets.
    Net1500,
    /// virtio-rng 64-byte reads.
    Rng64,
}

impl Pattern {
    /// Every pattern, in report order.
    pub const ALL: [Pattern; 6] = [
        Pattern::Blk4kRandom,
        Pattern::Blk64k,
        Pattern::Blk1mSeq,
        Pattern::Net64,
        Pattern::Net1500,
        Pattern::Rng64,
    ];

    /// The name in tables and JSON.
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Blk4kRandom => "blk-4k-random",
            Pattern::Blk64k => "blk-64k",
            Pattern::Blk1mSeq => "blk-1m-seq",
            Pattern::Net64 => "net-64",
            Pattern::Net1500 => "net-1500",
            Pattern::Rng64 => "rng-64",
        }
    }

    /// Buffers the guest maps per request: blk header, data pieces ([`PIECE`]) and
    /// status; net header and payload; rng one.
    pub fn buffers(self) -> u64 {
        match self {
            Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq => {
                self.bytes().div_ceil(PIECE) as u64 + 2
            }
            Pattern::Net64 | Pattern::Net1500 => 2,
            Pattern::Rng64 => 1,
        }
    }

    /// Guest-physical pieces of the data buffer: `(address, length)`.
    fn pieces(self) -> impl Iterator<Item = (u64, usize)> {
        let len = self.bytes();
        (0..len.div_ceil(PIECE))
            .map(move |i| (DATA + i as u64 * PIECE_STRIDE, (len - i * PIECE).min(PIECE)))
    }

    /// Payload bytes one request moves (headers and status bytes not counted).
    pub fn bytes(self) -> usize {
        match self {
            Pattern::Blk4kRandom => 4096,
            Pattern::Blk64k => 64 << 10,
            Pattern::Blk1mSeq => 1 << 20,
            Pattern::Net64 | Pattern::Rng64 => 64,
            Pattern::Net1500 => 1500,
        }
    }
}

/// What one cell measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Requests completed in the timed part.
    pub requests: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall time of the timed part.
    pub wall: Duration,
    /// CPU time in it: in process, this thread's (driver, device and backend all run
    /// on it); out of process, this process's and the backend process's
    /// ([`crate::remote`]).
    pub cpu: Duration,
    /// The mode's counters over the timed part (exposure: the peak over the whole cell).
    pub stats: ModeStats,
    /// CPU nanoseconds per request in each of [`SLICES`] equal parts of the timed part,
    /// sorted: their spread is the cell's noise.
    pub slice_cpu_ns_per_request: Vec<f64>,
    /// Out of process: what the backend process did (its CPU is in `cpu` too, its
    /// exposure is `stats.exposure_peak`).
    pub backend: Option<crate::remote::BackendFigures>,
}

/// Parts the timed part of a cell is cut into, to see its noise.
pub const SLICES: u32 = 5;

/// The device serving a cell.
pub(crate) enum Device {
    Blk(Block),
    Rng(Rng),
    Net(NetTx),
    /// A backend in another process, through the vhost-user front-end.
    Remote(Box<crate::remote::Remote>),
}

impl Device {
    fn new(p: Pattern, disk: &Path) -> Result<Self, RunError> {
        let features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM);
        Ok(match p {
            Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq => {
                let mut b = Block::new(&BlockConfig {
                    path: disk.to_path_buf(),
                    read_only: true,
                    access_platform: true,
                    test_stray_sector: None,
                })
                .map_err(|source| RunError::Block {
                    path: disk.to_path_buf(),
                    source,
                })?;
                b.set_acked_features(features);
                Device::Blk(b)
            }
            Pattern::Rng64 => {
                let mut r = Rng::new(&RngConfig {
                    access_platform: true,
                    ..RngConfig::default()
                })
                .map_err(RunError::Rng)?;
                r.set_acked_features(features);
                Device::Rng(r)
            }
            Pattern::Net64 | Pattern::Net1500 => Device::Net(NetTx::default()),
        })
    }

    fn process<M: GuestMemory>(
        &mut self,
        q: &mut virtio_queue::Queue,
        mem: &M,
    ) -> Result<bool, RunError> {
        match self {
            Device::Blk(d) => Ok(d.process_queue(0, q, mem)?),
            Device::Rng(d) => Ok(d.process_queue(0, q, mem)?),
            Device::Net(d) => Ok(d.process_queue(0, q, mem)?),
            Device::Remote(r) => Ok(r.notify_and_wait(q).map(|()| true)?),
        }
    }

    /// The CPU time that counts for this device's cells (see [`Measured::cpu`]).
    fn cpu(&self) -> Result<Duration, RunError> {
        match self {
            Device::Remote(r) => Ok(r.cpu()?),
            _ => Ok(thread_cpu()),
        }
    }
}

/// Where the next request of a pattern goes, deterministic per cell.
struct Cursor {
    pattern: Pattern,
    n: u64,
    lcg: u64,
}

impl Cursor {
    fn next_offset(&mut self) -> u64 {
        let len = self.pattern.bytes() as u64;
        let slots = DISK_BYTES / len;
        self.n += 1;
        match self.pattern {
            Pattern::Blk4kRandom => {
                // Knuth's MMIX LCG; the high bits are the random ones.
                self.lcg = self
                    .lcg
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.lcg >> 33) % slots) * len
            }
            _ => (self.n % slots) * len,
        }
    }
}

/// Creates (or reuses, reading it once) the disk image the blk patterns read:
/// [`DISK_BYTES`] of a position-dependent pattern, so a read can be checked.
///
/// # Errors
/// The file cannot be written.
pub fn prepare_disk(path: &Path) -> Result<(), RunError> {
    let image = |source| RunError::DiskImage {
        path: path.to_path_buf(),
        source,
    };
    if std::fs::metadata(path).is_ok_and(|m| m.len() == DISK_BYTES) {
        // Read it once, so that every mode reads from the page cache, not the disk.
        return std::fs::read(path).map(drop).map_err(image);
    }
    let mut data = vec![0u8; DISK_BYTES as usize];
    for (i, chunk) in data.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(i as u64 * 8).to_le_bytes());
    }
    std::fs::write(path, data).map_err(image)
}

/// One request: write it, map its buffers, post, serve, reap, unmap, check.
fn request<S: Sharing>(
    s: &mut S,
    dev: &mut Device,
    ring: &mut GuestRing,
    queue: &mut virtio_queue::Queue,
    pattern: Pattern,
    offset: u64,
    maps: &mut Vec<Mapping>,
) -> Result<(), RunError> {
    let len = pattern.bytes();
    maps.clear();
    match pattern {
        Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq => {
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
            hdr[8..16].copy_from_slice(&(offset / SECTOR).to_le_bytes());
            s.guest_memory()
                .write_slice(&hdr, GuestAddress(HDR))
                .map_err(mem_at(HDR))?;
            s.guest_memory()
                .write_obj(0xffu8, GuestAddress(STATUS))
                .map_err(mem_at(STATUS))?;
            maps.push(s.map(HDR, 16, DmaDirection::ToDevice)?);
            for (gpa, n) in pattern.pieces() {
                maps.push(s.map(gpa, n, DmaDirection::FromDevice)?);
            }
            maps.push(s.map(STATUS, 1, DmaDirection::FromDevice)?);
        }
        Pattern::Net64 | Pattern::Net1500 => {
            maps.push(s.map(HDR, NET_HDR_LEN, DmaDirection::ToDevice)?);
            maps.push(s.map(DATA, len, DmaDirection::ToDevice)?);
        }
        Pattern::Rng64 => maps.push(s.map(DATA, len, DmaDirection::FromDevice)?),
    }
    let bufs: Vec<Buf> = maps
        .iter()
        .map(|m| Buf {
            addr: m.addr,
            len: m.len as u32,
            write: m.dir == DmaDirection::FromDevice,
        })
        .collect();
    ring.post(s.guest_memory(), &bufs)?;
    s.serve(queue, |q, m| dev.process(q, m))?;
    s.after_process();
    let used = ring
        .reap(s.guest_memory())?
        .ok_or(RunError::NoChain { pattern })?;
    for m in maps.drain(..) {
        s.unmap(m)?;
    }
    let want = match pattern {
        Pattern::Net64 | Pattern::Net1500 => 0,
        Pattern::Rng64 => len as u32,
        _ => len as u32 + 1,
    };
    if used != want {
        let st: Option<u8> = s.guest_memory().read_obj(GuestAddress(STATUS)).ok();
        return Err(RunError::UsedLength {
            pattern,
            used,
            want,
            status: st,
        });
    }
    if want == len as u32 + 1 {
        let st: u8 = s
            .guest_memory()
            .read_obj(GuestAddress(STATUS))
            .map_err(mem_at(STATUS))?;
        if st != 0 {
            return Err(RunError::Status {
                pattern,
                status: st,
            });
        }
    }
    Ok(())
}

/// CPU time on clock `id`, or `None` if the kernel refuses (a process clock of a
/// process that has exited).
pub(crate) fn clock_cpu(id: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; an
    // unknown clock id is refused with -1, which is checked.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// CPU time this thread has used (`CLOCK_THREAD_CPUTIME_ID`).
pub(crate) fn thread_cpu() -> Duration {
    clock_cpu(libc::CLOCK_THREAD_CPUTIME_ID).unwrap_or_default()
}

/// CPU time this process has used, all threads (`CLOCK_PROCESS_CPUTIME_ID`).
pub(crate) fn process_cpu() -> Duration {
    clock_cpu(libc::CLOCK_PROCESS_CPUTIME_ID).unwrap_or_default()
}

/// The CPU clock of process `pid` (Linux lets any process read another's).
///
/// # Errors
/// The kernel refuses (no such process).
pub(crate) fn cpu_clock_of(pid: u32) -> Result<libc::clockid_t, RemoteError> {
    let p = libc::pid_t::try_from(pid).map_err(|_| RemoteError::PidOutOfRange { pid })?;
    let mut id: libc::clockid_t = 0;
    // SAFETY: `id` is a valid, writable clockid_t for the duration of the call; the
    // return value is checked.
    let rc = unsafe { libc::clock_getcpuclockid(p, &mut id) };
    if rc == 0 {
        Ok(id)
    } else {
        Err(RemoteError::CpuClock {
            pid,
            source: std::io::Error::from_raw_os_error(rc),
        })
    }
}

/// Checks what the first request moved: blk data equals the image at its offset, rng
/// data is not all zero, the net sink took the frame (out of process, the sink's own
/// count comes back in [`crate::remote::BackendFigures::device`] instead).
fn check_first<S: Sharing>(
    s: &S,
    dev: &Device,
    pattern: Pattern,
    offset: u64,
    disk: &Path,
) -> Result<(), RunError> {
    let len = pattern.bytes();
    let mut got = vec![0u8; len];
    let blk = matches!(
        pattern,
        Pattern::Blk4kRandom | Pattern::Blk64k | Pattern::Blk1mSeq
    );
    if blk {
        let mut at = 0;
        for (gpa, n) in pattern.pieces() {
            s.guest_memory()
                .read_slice(&mut got[at..at + n], GuestAddress(gpa))
                .map_err(mem_at(gpa))?;
            at += n;
        }
    } else {
        s.guest_memory()
            .read_slice(&mut got, GuestAddress(DATA))
            .map_err(mem_at(DATA))?;
    }
    match dev {
        Device::Blk(_) | Device::Remote(_) if blk => {
            use std::os::unix::fs::FileExt;
            let mut want = vec![0u8; len];
            std::fs::File::open(disk)
                .and_then(|f| f.read_exact_at(&mut want, offset))
                .map_err(|source| RunError::DiskImage {
                    path: disk.to_path_buf(),
                    source,
                })?;
            if got != want {
                return Err(RunError::DataMismatch { pattern, offset });
            }
        }
        Device::Rng(_) | Device::Remote(_)
            if pattern == Pattern::Rng64 && got.iter().all(|&b| b == 0) =>
        {
            return Err(RunError::AllZero { pattern, len });
        }
        Device::Net(n) if n.frames != 1 || n.errors != 0 => {
            return Err(RunError::NetSink {
                pattern,
                frames: n.frames,
                errors: n.errors,
            });
        }
        _ => {}
    }
    Ok(())
}

/// Runs `pattern` under `s`: one checked request, a warm-up, then requests until
/// `budget` has passed (at least `min_requests`).
///
/// # Errors
/// The device could not be built, or a request failed (a mode refused, the device
/// returned an error, what it moved was wrong).
pub fn run_cell<S: Sharing>(
    s: &mut S,
    pattern: Pattern,
    disk: &Path,
    budget: Duration,
    min_requests: u64,
) -> Result<Measured, RunError> {
    let dev = Device::new(pattern, disk)?;
    run_device(s, dev, pattern, disk, budget, min_requests)
}

/// [`run_cell`] with the device given (an out-of-process one, already activated).
pub(crate) fn run_device<S: Sharing>(
    s: &mut S,
    mut dev: Device,
    pattern: Pattern,
    disk: &Path,
    budget: Duration,
    min_requests: u64,
) -> Result<Measured, RunError> {
    let (ring_gpa, ring_dev) = s.ring();
    let mut ring = GuestRing::new(s.guest_memory(), ring_gpa)?;
    let mut queue = GuestRing::device_queue(ring_dev)?;
    if pattern == Pattern::Net64 || pattern == Pattern::Net1500 {
        let frame: Vec<u8> = (0..pattern.bytes()).map(|i| i as u8).collect();
        s.guest_memory()
            .write_slice(&frame, GuestAddress(DATA))
            .map_err(mem_at(DATA))?;
    }
    let mut cursor = Cursor {
        pattern,
        n: 0,
        lcg: 0x5eed,
    };
    let mut maps = Vec::with_capacity(8);
    let first = cursor.next_offset();
    request(
        s, &mut dev, &mut ring, &mut queue, pattern, first, &mut maps,
    )?;
    check_first(s, &dev, pattern, first, disk)?;
    let warm_up = min_requests.min(64);
    for _ in 0..warm_up {
        let off = cursor.next_offset();
        request(s, &mut dev, &mut ring, &mut queue, pattern, off, &mut maps)?;
    }
    s.flush()?;
    if let Device::Remote(r) = &mut dev {
        r.mark()?;
    }
    let before = s.stats();
    let (t0, c0) = (Instant::now(), dev.cpu()?);
    let mut requests = 0u64;
    let mut slices = Vec::with_capacity(SLICES as usize);
    for _ in 0..SLICES {
        let (c1, mut n) = (dev.cpu()?, 0u64);
        loop {
            // Check the clock every 16 requests only.
            for _ in 0..16 {
                let off = cursor.next_offset();
                request(s, &mut dev, &mut ring, &mut queue, pattern, off, &mut maps)?;
            }
            n += 16;
            if n * u64::from(SLICES) >= min_requests
                && t0.elapsed() * SLICES >= budget * (slices.len() as u32 + 1)
            {
                break;
            }
        }
        requests += n;
        slices.push(dev.cpu()?.saturating_sub(c1).as_nanos() as f64 / n as f64);
    }
    slices.sort_by(f64::total_cmp);
    s.flush()?;
    let (wall, cpu) = (t0.elapsed(), dev.cpu()?.saturating_sub(c0));
    let after = s.stats();
    let backend = match dev {
        Device::Remote(r) => {
            let b = r.finish()?;
            b.check_served(pattern, 1 + warm_up + requests)?;
            Some(b)
        }
        _ => None,
    };
    Ok(Measured {
        requests,
        bytes: requests * pattern.bytes() as u64,
        wall,
        cpu,
        stats: ModeStats {
            map_ops: after.map_ops - before.map_ops,
            iommu_kicks: after.iommu_kicks - before.iommu_kicks,
            copy_bytes: after.copy_bytes - before.copy_bytes,
            // Out of process, what the backend's own address space held.
            exposure_peak: backend
                .as_ref()
                .map_or(after.exposure_peak, |b| b.peak_mapped_bytes),
        },
        slice_cpu_ns_per_request: slices,
        backend,
    })
}
