//! virtio-blk, the block device (virtio spec §5.2), on a raw image file: one queue,
//! IN, OUT, FLUSH and GET_ID requests, positioned I/O straight between the image and
//! guest memory (`preadv`/`pwritev` over the translated buffers).
//!
//! Each chain goes through three steps. The shell walks it once ([`Layout`]), finds the
//! status byte (the last writable byte) and translates it first: a request whose status
//! the guest could not read is returned with used length 0 and does nothing. It reads
//! the header and hands it to [`request::decode`], which validates everything the guest
//! chose against the disk. Only then are the data buffers translated, all of them,
//! before the file is touched; a buffer the guest did not make reachable (outside RAM,
//! or not mapped in the IOMMU) fails the request with `VIRTIO_BLK_S_IOERR` and leaves
//! the file as it was.

pub mod request;

use crate::chain::{self, ChainError, Layout, Segment};
use request::{decode, Disk, Request, Shape, Status, HEADER_SIZE, ID_BYTES, SECTOR_SIZE};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_contract::{
    DeviceError, DeviceIdentity, VirtioDevice, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemory, Permissions};

/// Virtio device type of the block device (§5.2.1).
pub const DEVICE_TYPE: u16 = VIRTIO_ID_BLOCK as u16;
/// Size of the one queue, `requestq` (§5.2.2).
pub const QUEUE_SIZE: u16 = 256;
/// PCI class code to put the device under: mass storage, SCSI, as QEMU's
/// virtio-blk-pci.
pub const PCI_CLASS_CODE: u32 = 0x01_00_00;
/// Descriptors one chain may have: header, [`request::SEG_MAX`] data segments, status.
pub const MAX_DESCRIPTORS: usize = request::SEG_MAX as usize + 2;

/// The device configuration (§5.2.4, `struct virtio_blk_config`): offsets of the fields
/// the device fills. Everything else in it reads as zero.
pub mod config {
    /// `capacity`, le64: disk size in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `size_max`, le32: bytes per data segment ([`super::request::SIZE_MAX`]).
    pub const SIZE_MAX: usize = 8;
    /// `seg_max`, le32: data segments per request ([`super::request::SEG_MAX`]).
    pub const SEG_MAX: usize = 12;
    /// `geometry`, 4 bytes: zero (`VIRTIO_BLK_F_GEOMETRY` is not offered).
    pub const GEOMETRY: usize = 16;
    /// `blk_size`, le32: 512.
    pub const BLK_SIZE: usize = 20;
    /// Bytes of configuration exposed: up to and including `blk_size`.
    pub const SIZE: usize = 24;
}

/// Why the block device could not be built, or why one request failed (the latter
/// never leave the device: the guest gets `VIRTIO_BLK_S_IOERR`).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// A `seg_max` the device cannot advertise.
    #[error("seg_max {0} is outside 1..={max}", max = request::SEG_MAX)]
    SegMax(u32),
    /// The image cannot be opened with the access asked for.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image's path.
        path: PathBuf,
        /// What the host said.
        source: std::io::Error,
    },
    /// The image's type or size cannot be found.
    #[error("cannot find the size of disk image {}: {source}", path.display())]
    Size {
        /// The image's path.
        path: PathBuf,
        /// What the host said.
        source: std::io::Error,
    },
    /// The image is a directory, socket or the like.
    #[error("disk image {} is neither a regular file nor a block device", path.display())]
    NotAnImage {
        /// The image's path.
        path: PathBuf,
    },
    /// The image is not a whole number of 512-byte sectors.
    #[error("disk image {} is {len} bytes, not a multiple of 512-byte sectors", path.display())]
    UnalignedSize {
        /// The image's path.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// A request's buffers could not be reached.
    #[error("request buffers unreachable: {0}")]
    Guest(#[from] ChainError),
    /// The image failed a read, write or sync.
    #[error("disk I/O at byte {offset} failed: {source}")]
    Disk {
        /// Byte offset of the failed operation (0 for a sync).
        offset: u64,
        /// What the host said.
        source: std::io::Error,
    },
}

/// How to build a [`Block`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The raw image: a regular file or a block device, a whole number of sectors.
    pub path: PathBuf,
    /// Open it read-only and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM`: the device sits behind an IOMMU and its
    /// memory is an `IommuMemory`.
    pub access_platform: bool,
    /// Test switch, never set in normal use: a read covering this sector sends its
    /// data to [`STRAY_IOVA`], which no guest maps, so an IOMMU must deny it. It lets the
    /// end-to-end tests show a denied device access failing one request cleanly.
    pub test_stray_sector: Option<u64>,
}

/// Where [`BlockConfig::test_stray_sector`] aims a read: below 2^48 (inside the
/// default IOMMU input range) and far from where Linux allocates IOVAs (top down).
pub const STRAY_IOVA: u64 = 0xdead_0000_0000;

/// What happened to the requests the device saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Completed with `VIRTIO_BLK_S_OK`.
    pub ok: u64,
    /// Completed with `VIRTIO_BLK_S_IOERR`.
    pub ioerr: u64,
    /// Completed with `VIRTIO_BLK_S_UNSUPP`.
    pub unsupp: u64,
    /// Returned with used length 0: misshapen, or no reachable status byte.
    pub dropped: u64,
}

/// The virtio block device.
pub struct Block {
    file: File,
    path: PathBuf,
    disk: Disk,
    id: [u8; ID_BYTES],
    access_platform: bool,
    acked: u64,
    counters: BlockCounters,
    test_stray_sector: Option<u64>,
    /// Where a read of `test_stray_sector` is aimed ([`STRAY_IOVA`] unless set).
    test_stray_addr: u64,
    /// What `seg_max` advertises (at most [`request::SEG_MAX`]).
    seg_max: u32,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("disk", &self.disk)
            .field("access_platform", &self.access_platform)
            .field("acked", &self.acked)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Test switch, with [`BlockConfig::test_stray_sector`]: aim that sector's reads
    /// at `addr` instead of [`STRAY_IOVA`] (pool mode aims at guest RAM outside the
    /// pool, which the device's memory must refuse).
    pub fn set_test_stray_addr(&mut self, addr: u64) {
        self.test_stray_addr = addr;
    }

    /// Opens the image (`O_RDWR`, or `O_RDONLY` when read-only) and builds the device.
    /// Its GET_ID answer is the image's file name, cut to 20 bytes, zero-padded.
    ///
    /// # Errors
    /// [`BlockError::Open`], [`BlockError::Size`], [`BlockError::NotAnImage`], or
    /// [`BlockError::UnalignedSize`] for an image that is not whole sectors; each
    /// names the image.
    pub fn new(config: &BlockConfig) -> Result<Self, BlockError> {
        let path = config.path.clone();
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(&path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                source,
            })?;
        let size_err = |source| BlockError::Size {
            path: path.clone(),
            source,
        };
        let kind = file.metadata().map_err(size_err)?.file_type();
        if !(kind.is_file() || kind.is_block_device()) {
            return Err(BlockError::NotAnImage { path });
        }
        // Seeking to the end sizes block devices too, whose metadata length is 0.
        let len = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize { path, len });
        }
        let mut id = [0u8; ID_BYTES];
        if let Some(name) = path.file_name() {
            let name = name.as_bytes();
            let n = name.len().min(ID_BYTES);
            id[..n].copy_from_slice(&name[..n]);
        }
        Ok(Self {
            file,
            path,
            disk: Disk {
                capacity: len / SECTOR_SIZE,
                read_only: config.read_only,
            },
            id,
            access_platform: config.access_platform,
            acked: 0,
            counters: BlockCounters::default(),
            test_stray_sector: config.test_stray_sector,
            test_stray_addr: STRAY_IOVA,
            seg_max: request::SEG_MAX,
        })
    }

    /// Advertises `seg_max` data segments per request instead of
    /// [`request::SEG_MAX`]. A carrier whose ring is smaller than the device's own
    /// queue needs it: Linux, without indirect descriptors, must fit `seg_max + 2`
    /// descriptors in the ring, and refuses (and retries for ever) a longer chain. QEMU's
    /// vhost-user-blk front-end gives the queue 128 entries, so a back-end behind it
    /// advertises at most 126.
    ///
    /// # Errors
    /// [`BlockError::SegMax`] unless `1 <= seg_max <= request::SEG_MAX`; nothing changes.
    pub fn set_seg_max(&mut self, seg_max: u32) -> Result<(), BlockError> {
        if !(1..=request::SEG_MAX).contains(&seg_max) {
            return Err(BlockError::SegMax(seg_max));
        }
        self.seg_max = seg_max;
        Ok(())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity
    }

    /// Whether the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// Features the driver accepted (0 before negotiation and after reset).
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    /// What happened to the requests so far.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Writeback cache mode. §5.2.5: without `VIRTIO_BLK_F_CONFIG_WCE` the cache is
    /// writeback if and only if `VIRTIO_BLK_F_FLUSH` was negotiated; otherwise every
    /// write is made durable before it completes.
    fn writeback(&self) -> bool {
        self.acked & (1 << VIRTIO_BLK_F_FLUSH) != 0
    }

    fn config_bytes(&self) -> [u8; config::SIZE] {
        let mut c = [0u8; config::SIZE];
        c[config::CAPACITY..config::CAPACITY + 8]
            .copy_from_slice(&self.disk.capacity.to_le_bytes());
        c[config::SIZE_MAX..config::SIZE_MAX + 4].copy_from_slice(&request::SIZE_MAX.to_le_bytes());
        c[config::SEG_MAX..config::SEG_MAX + 4].copy_from_slice(&self.seg_max.to_le_bytes());
        c[config::BLK_SIZE..config::BLK_SIZE + 4]
            .copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c
    }

    /// Handles one chain; returns the used length: data bytes written plus the status
    /// byte, or 0 when the chain has no status byte the device can write.
    fn handle<M: GuestMemory>(&mut self, chain: DescriptorChain<&M>, mem: &M) -> u32 {
        // §2.7.4.2 and §5.2.6: readable part (header, OUT data) first, then the writable
        // part, whose last byte is the status.
        let Ok(layout) = Layout::walk(chain, MAX_DESCRIPTORS) else {
            self.counters.dropped += 1;
            return 0;
        };
        let Some(status_addr) = layout.last_writable_byte() else {
            self.counters.dropped += 1;
            return 0;
        };
        // Translated before anything happens: a request whose outcome the guest cannot
        // learn is not carried out.
        let status_seg = [Segment {
            addr: status_addr,
            len: 1,
        }];
        let Ok(status_slot) = chain::translate(mem, &status_seg, 0, 1, Permissions::Write) else {
            self.counters.dropped += 1;
            return 0;
        };
        let (status, written) = self.run(&layout, mem);
        if status_slot.write_at(0, &[status as u8]).is_err() {
            self.counters.dropped += 1;
            return 0;
        }
        match status {
            Status::Ok => self.counters.ok += 1,
            Status::IoErr => self.counters.ioerr += 1,
            Status::Unsupp => self.counters.unsupp += 1,
        }
        written.saturating_add(1)
    }

    /// Decodes and carries out the request of a chain that has a status byte; returns
    /// its status and the data bytes written to the guest.
    fn run<M: GuestMemory>(&mut self, layout: &Layout, mem: &M) -> (Status, u32) {
        let readable = layout.readable_len();
        let shape = Shape {
            readable,
            // The status byte is one of the writable bytes.
            writable_data: layout.writable_len().saturating_sub(1),
        };
        let mut header = [0u8; HEADER_SIZE];
        let header_len = readable.min(HEADER_SIZE as u64) as usize;
        let read_header = chain::translate(
            mem,
            layout.readable(),
            0,
            header_len as u64,
            Permissions::Read,
        )
        .and_then(|t| t.read_at(0, &mut header[..header_len]));
        if read_header.is_err() {
            return (Status::IoErr, 0);
        }
        let request = match decode(&header[..header_len], shape, self.disk) {
            Ok(r) => r,
            Err(e) => return (e.status(), 0),
        };
        match self.execute(request, layout, mem) {
            Ok(written) => (Status::Ok, written),
            Err(_) => (Status::IoErr, 0),
        }
    }

    /// Carries out a validated request; returns the data bytes written to the guest.
    fn execute<M: GuestMemory>(
        &mut self,
        request: Request,
        layout: &Layout,
        mem: &M,
    ) -> Result<u32, BlockError> {
        match request {
            Request::Read { offset, len } => {
                let stray = [Segment {
                    addr: vm_memory::GuestAddress(self.test_stray_addr),
                    len,
                }];
                let aimed_astray = self.test_stray_sector.is_some_and(|s| {
                    s.checked_mul(512)
                        .is_some_and(|b| offset <= b && b < offset + u64::from(len))
                });
                let target = if aimed_astray {
                    &stray[..]
                } else {
                    layout.writable()
                };
                // Every destination byte translated before the first one is read; then
                // the file goes straight into guest memory (inside the disk: decode
                // checked the range).
                let dst = chain::translate(mem, target, 0, u64::from(len), Permissions::Write)?;
                dst.read_from_file_at(&self.file, offset)
                    .map_err(|source| BlockError::Disk { offset, source })?;
                Ok(len)
            }
            Request::Write { offset, len } => {
                // Every source byte translated before the first byte reaches the file.
                let src = chain::translate(
                    mem,
                    layout.readable(),
                    HEADER_SIZE as u64,
                    u64::from(len),
                    Permissions::Read,
                )?;
                src.write_to_file_at(&self.file, offset)
                    .map_err(|source| BlockError::Disk { offset, source })?;
                if !self.writeback() {
                    self.sync()?;
                }
                Ok(0)
            }
            Request::Flush => {
                // A read-only image has nothing of ours to make durable.
                if !self.disk.read_only {
                    self.sync()?;
                }
                Ok(0)
            }
            Request::GetId { len } => {
                let dst = chain::translate(
                    mem,
                    layout.writable(),
                    0,
                    u64::from(len),
                    Permissions::Write,
                )?;
                dst.write_at(0, &self.id[..dst.len()])?;
                Ok(len)
            }
        }
    }

    fn sync(&self) -> Result<(), BlockError> {
        self.file
            .sync_data()
            .map_err(|source| BlockError::Disk { offset: 0, source })
    }
}

impl DeviceIdentity for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        // EVENT_IDX: interrupts only where the driver's used_event asks, and a polling
        // transport keeps the driver from notifying (process_queue asks
        // needs_notification, which honours used_event). INDIRECT_DESC: a request takes
        // one ring slot (virtio-queue walks the table and refuses nested, misaligned
        // and looping ones); Linux then maps the table too, one more IOMMU MAP per
        // request, which docs/ARCHITECTURE.md weighs.
        let mut f: u64 = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if self.disk.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.access_platform {
            f |= 1 << VIRTIO_F_ACCESS_PLATFORM;
        }
        f
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }

    fn config_size(&self) -> u64 {
        config::SIZE as u64
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, b) in data.iter_mut().enumerate() {
            *b = start
                .checked_add(i)
                .and_then(|at| cfg.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The configuration is read-only (`CONFIG_WCE` is not offered): writes are
    /// ignored.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
}

impl<M: GuestMemory> VirtioDevice<M> for Block {
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &M,
    ) -> Result<bool, DeviceError> {
        if index != 0 {
            return Ok(false);
        }
        let mut used = false;
        // At most one ring's worth of chains per call: a driver has no more outstanding
        // at once, so any beyond were added during this call and came with their own
        // notification.
        for _ in 0..queue.size() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = self.handle(chain, mem);
            queue
                .add_used(mem, head, len)
                .map_err(|source| DeviceError::Queue {
                    queue: index,
                    source,
                })?;
            used = true;
        }
        if !used {
            return Ok(false);
        }
        queue
            .needs_notification(mem)
            .map_err(|source| DeviceError::Queue {
                queue: index,
                source,
            })
    }

    fn reset(&mut self) {
        self.acked = 0;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;

    fn image(name: &str, len: usize) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vd-unit-{}-{name}", std::process::id()));
        std::fs::write(&p, vec![0u8; len]).unwrap();
        p
    }

    #[test]
    fn config_space_holds_capacity_limits_and_block_size_and_zero_beyond() {
        let path = image("a-rather-long-image-name.img", 4096);
        let dev = Block::new(&BlockConfig {
            path: path.clone(),
            read_only: true,
            access_platform: false,
            test_stray_sector: None,
        })
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let mut c = [0xffu8; 32];
        DeviceIdentity::read_config(&dev, 0, &mut c);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 8);
        assert_eq!(
            u32::from_le_bytes(c[8..12].try_into().unwrap()),
            request::SIZE_MAX
        );
        assert_eq!(
            u32::from_le_bytes(c[12..16].try_into().unwrap()),
            request::SEG_MAX
        );
        assert_eq!(&c[16..20], &[0; 4], "no geometry");
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(&c[24..], &[0; 8], "past the configuration");
        let mut far = [0xffu8; 2];
        DeviceIdentity::read_config(&dev, u64::MAX, &mut far);
        assert_eq!(far, [0, 0]);
        let name = path.file_name().unwrap().as_bytes();
        assert!(name.len() > ID_BYTES);
        assert_eq!(dev.id()[..], name[..ID_BYTES], "file name cut to 20 bytes");
    }
}
