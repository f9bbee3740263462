//! A virtio-blk request as Linux's `virtio_blk` driver makes it in pool mode (feature
//! `test-utils`): the header, the data and the status byte in the guest's own memory,
//! each mapped through [`GuestDma`] (so bounced through the pool) before the chain is
//! posted, and unmapped (read data and status copied back) after the device used it.
//! The tests that serve virtio-blk from the pool, here and in `aperture`'s vhost-user
//! pool test, build their requests this way.

use crate::{DmaAddr, DmaDirection, DmaError, Gpa, GuestDma};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// `VIRTIO_BLK_T_IN`: a read, whose data the device writes.
const VIRTIO_BLK_T_IN: u32 = 0;

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

/// One mapped request.
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
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&request_type.to_le_bytes());
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(at.hdr))?;
        mem.write_obj(0xffu8, GuestAddress(at.status))?;
        let data_dir = if request_type == VIRTIO_BLK_T_IN {
            DmaDirection::FromDevice
        } else {
            DmaDirection::ToDevice
        };
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
