//! virtio-blk requests as a guest driver makes them (virtio 1.2 §5.2.6): the 16-byte
//! header, and a request bounced through a restricted DMA pool as Linux's `virtio_blk`
//! driver makes it in pool mode ([`BlkRequest`]).

use bounce_pool::{DmaAddr, DmaDirection, DmaError, Gpa, GuestDma};
use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// The request header (`struct virtio_blk_outhdr`): type, reserved, sector.
pub fn header(request_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Writes the header of a `request_type` request at `hdr` and a 0xff sentinel in the
/// status byte at `status`, as a driver prepares a request.
pub fn prepare<M: GuestMemory>(mem: &M, hdr: u64, status: u64, request_type: u32, sector: u64) {
    mem.write_slice(&header(request_type, sector), GuestAddress(hdr))
        .expect("the header is in guest RAM");
    mem.write_obj(0xffu8, GuestAddress(status))
        .expect("the status byte is in guest RAM");
}

/// The direction of a request's data: the device writes it for a read
/// (`VIRTIO_BLK_T_IN`), reads it otherwise.
pub fn data_direction(request_type: u32) -> DmaDirection {
    if request_type == VIRTIO_BLK_T_IN {
        DmaDirection::FromDevice
    } else {
        DmaDirection::ToDevice
    }
}

/// Why a request could not be built or completed.
#[derive(Debug, thiserror::Error)]
pub enum BlkRequestError {
    /// Writing the header or status, or reading the status, failed.
    #[error("guest memory: {0}")]
    Memory(#[from] GuestMemoryError),
    /// The DMA API refused a map or an unmap.
    #[error(transparent)]
    Dma(#[from] DmaError),
}

/// Where a request's buffers lie in guest-physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkLayout {
    /// The 16-byte header.
    pub hdr: u64,
    /// The data.
    pub data: u64,
    /// The status byte.
    pub status: u64,
}

/// One request mapped through a restricted pool's DMA API ([`GuestDma`]): the header,
/// the data and the status byte in the guest's own memory, each bounced through the
/// pool before the chain is posted, and unmapped (read data and status copied back)
/// after the device used it.
#[derive(Debug)]
pub struct BlkRequest {
    hdr: DmaAddr,
    /// Data mappings (split at the pool's largest mapping), or the one raw address.
    data: Vec<(DmaAddr, usize)>,
    raw: bool,
    data_dir: DmaDirection,
    status: DmaAddr,
    status_gpa: u64,
}

impl BlkRequest {
    /// Writes the header (`request_type`, `sector`) and a status of 0xff at `at`, then
    /// maps the header (to the device), `len` bytes of data in pieces of at most
    /// [`GuestDma::max_mapping_size`] (from the device for a read, to it otherwise) and
    /// the status (from the device). `raw_data`, if given, is put in the one data
    /// descriptor unmapped (a confused or hostile guest's address).
    ///
    /// # Errors
    /// Guest memory or the DMA API refused.
    pub fn map<M: GuestMemory>(
        dma: &GuestDma<M>,
        at: BlkLayout,
        request_type: u32,
        sector: u64,
        len: usize,
        raw_data: Option<u64>,
    ) -> Result<Self, BlkRequestError> {
        let mem = dma.memory();
        mem.write_slice(&header(request_type, sector), GuestAddress(at.hdr))?;
        mem.write_obj(0xffu8, GuestAddress(at.status))?;
        let data_dir = data_direction(request_type);
        let hdr = dma.map(Gpa(at.hdr), 16, DmaDirection::ToDevice)?;
        let data = match raw_data {
            Some(addr) => vec![(DmaAddr(addr), len)],
            None => {
                let mut pieces = Vec::new();
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(dma.max_mapping_size());
                    pieces.push((dma.map(Gpa(at.data + done as u64), n, data_dir)?, n));
                    done += n;
                }
                pieces
            }
        };
        let status = dma.map(Gpa(at.status), 1, DmaDirection::FromDevice)?;
        Ok(Self {
            hdr,
            data,
            raw: raw_data.is_some(),
            data_dir,
            status,
            status_gpa: at.status,
        })
    }

    /// The chain to post: `(device address, length, device writes)`, header first.
    pub fn chain(&self) -> Vec<(u64, usize, bool)> {
        let writes = self.data_dir == DmaDirection::FromDevice;
        let mut c = vec![(self.hdr.0, 16, false)];
        c.extend(self.data.iter().map(|&(a, n)| (a.0, n, writes)));
        c.push((self.status.0, 1, true));
        c
    }

    /// The chain as split-ring descriptors, for [`crate::SplitRing::post`].
    pub fn descriptors(&self) -> Vec<virtio_queue::desc::RawDescriptor> {
        self.chain()
            .into_iter()
            .map(|(a, n, writes)| crate::ring::buf(a, n as u32, writes))
            .collect()
    }

    /// After the device used the chain: unmaps every buffer (read data and status are
    /// copied back) and returns the status byte the guest reads.
    ///
    /// # Errors
    /// The DMA API or guest memory refused.
    pub fn complete<M: GuestMemory>(self, dma: &GuestDma<M>) -> Result<u8, BlkRequestError> {
        dma.unmap(self.hdr, 16, DmaDirection::ToDevice)?;
        if !self.raw {
            for (a, n) in self.data {
                dma.unmap(a, n, self.data_dir)?;
            }
        }
        dma.unmap(self.status, 1, DmaDirection::FromDevice)?;
        Ok(dma.memory().read_obj(GuestAddress(self.status_gpa))?)
    }
}

/// A virtio-blk device on the image at `path`, read-write, offering ACCESS_PLATFORM,
/// with VERSION_1 and ACCESS_PLATFORM acknowledged: what a guest driver that maps its
/// buffers through a DMA API (an IOMMU, grants, a restricted pool) has negotiated.
pub fn access_platform_block(path: &std::path::Path) -> virtio_devices::Block {
    use virtio_contract::{DeviceIdentity, VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
    let mut b = virtio_devices::Block::new(&virtio_devices::BlockConfig {
        path: path.to_path_buf(),
        read_only: false,
        access_platform: true,
        test_stray_sector: None,
    })
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    DeviceIdentity::set_acked_features(
        &mut b,
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_ACCESS_PLATFORM),
    );
    b
}
