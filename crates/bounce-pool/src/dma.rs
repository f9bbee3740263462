//! [`GuestDma`]: the guest-side bounce DMA API a fake guest driver calls in pool mode —
//! what Linux's DMA API does for a device whose `memory-region` is a
//! `restricted-dma-pool` (`force_bounce`: every streaming map bounces; `for_alloc`:
//! coherent allocations come from the pool). It owns a handle on guest memory and
//! shares a [`BouncePool`]; like `CONFIG_DMA_API_DEBUG` it also checks the driver's own
//! calls (unmap of what was never mapped, length or direction different from the map).

use crate::{Attrs, BouncePool, DeviceDma, DmaAddr, DmaDirection, Gpa, PoolError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use vm_memory::GuestMemory;

/// Why a DMA API call failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// The pool refused (full, too large, bad buffer…).
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The driver unmapped or synced an address it has no live mapping at.
    #[error("driver bug: {addr} is not a live mapping of this device")]
    NotMapped {
        /// The address given.
        addr: DmaAddr,
    },
    /// The driver unmapped with another length or direction than it mapped with.
    #[error(
        "driver bug: {addr} was mapped as {mapped_len} bytes {mapped_dir:?}, unmapped as {len} bytes {dir:?}"
    )]
    Mismatch {
        /// The mapping.
        addr: DmaAddr,
        /// Length at map time.
        mapped_len: usize,
        /// Direction at map time.
        mapped_dir: DmaDirection,
        /// Length given now.
        len: usize,
        /// Direction given now.
        dir: DmaDirection,
    },
}

/// One device's DMA API over a restricted pool.
#[derive(Debug)]
pub struct GuestDma<M: GuestMemory> {
    mem: M,
    pool: Arc<BouncePool>,
    dev: DeviceDma,
    live: Mutex<HashMap<DmaAddr, (Gpa, usize, DmaDirection)>>,
}

impl<M: GuestMemory> GuestDma<M> {
    /// The DMA API of a device with parameters `dev`, bouncing through `pool` in `mem`.
    pub fn new(mem: M, pool: Arc<BouncePool>, dev: DeviceDma) -> Self {
        Self {
            mem,
            pool,
            dev,
            live: Mutex::new(HashMap::new()),
        }
    }

    /// The DMA API of a device with default parameters that has a pool of its own: a
    /// one-area pool at `base`, `size` bytes, in `mem` (what Linux sets up for a device
    /// whose `memory-region` is a `restricted-dma-pool`).
    ///
    /// # Errors
    /// [`BouncePool::new`]'s.
    pub fn with_own_pool(mem: M, base: Gpa, size: u64) -> Result<Self, PoolError> {
        let pool = BouncePool::new(
            &mem,
            &crate::PoolConfig {
                base,
                size,
                areas: 1,
            },
        )?;
        Ok(Self::new(mem, Arc::new(pool), DeviceDma::default()))
    }

    /// The guest memory.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// The pool.
    pub fn pool(&self) -> &Arc<BouncePool> {
        &self.pool
    }

    /// `dma_max_mapping_size()`: what a driver must cap one segment at.
    pub fn max_mapping_size(&self) -> usize {
        self.dev.max_mapping_size()
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<DmaAddr, (Gpa, usize, DmaDirection)>> {
        dma_types::lock(&self.live)
    }

    /// `dma_map_single`: bounces `len` bytes at `buf` into the pool; the device gets
    /// the returned address.
    ///
    /// # Errors
    /// [`DmaError::Pool`] as [`BouncePool::map`] (`dma_mapping_error()`).
    pub fn map(&self, buf: Gpa, len: usize, dir: DmaDirection) -> Result<DmaAddr, DmaError> {
        let addr = self.pool.map(&self.mem, &self.dev, buf, len, dir)?;
        self.live().insert(addr, (buf, len, dir));
        Ok(addr)
    }

    fn check(&self, addr: DmaAddr, len: usize, dir: DmaDirection) -> Result<(), DmaError> {
        match self.live().get(&addr) {
            None => Err(DmaError::NotMapped { addr }),
            Some(&(_, mapped_len, mapped_dir)) if mapped_len != len || mapped_dir != dir => {
                Err(DmaError::Mismatch {
                    addr,
                    mapped_len,
                    mapped_dir,
                    len,
                    dir,
                })
            }
            Some(_) => Ok(()),
        }
    }

    /// `dma_unmap_single`: copies a `FromDevice`/`Bidirectional` buffer back and frees
    /// its slots.
    ///
    /// # Errors
    /// [`DmaError::NotMapped`] / [`DmaError::Mismatch`] for a driver bug (nothing is
    /// freed); [`DmaError::Pool`] as [`BouncePool::unmap`].
    pub fn unmap(&self, addr: DmaAddr, len: usize, dir: DmaDirection) -> Result<(), DmaError> {
        self.unmap_attrs(addr, len, dir, Attrs::NONE)
    }

    /// `dma_unmap_single_attrs`, e.g. with `DMA_ATTR_SKIP_CPU_SYNC`.
    ///
    /// # Errors
    /// As [`Self::unmap`].
    pub fn unmap_attrs(
        &self,
        addr: DmaAddr,
        len: usize,
        dir: DmaDirection,
        attrs: Attrs,
    ) -> Result<(), DmaError> {
        self.check(addr, len, dir)?;
        self.live().remove(&addr);
        Ok(self.pool.unmap(&self.mem, addr, len, dir, attrs)?)
    }

    /// `dma_sync_single_for_device` of `len` bytes at `addr`, anywhere inside a
    /// mapping.
    ///
    /// # Errors
    /// [`DmaError::Pool`] as [`BouncePool::sync_for_device`].
    pub fn sync_for_device(
        &self,
        addr: DmaAddr,
        len: usize,
        dir: DmaDirection,
    ) -> Result<(), DmaError> {
        Ok(self.pool.sync_for_device(&self.mem, addr, len, dir)?)
    }

    /// `dma_sync_single_for_cpu` of `len` bytes at `addr`, anywhere inside a mapping.
    ///
    /// # Errors
    /// [`DmaError::Pool`] as [`BouncePool::sync_for_cpu`].
    pub fn sync_for_cpu(
        &self,
        addr: DmaAddr,
        len: usize,
        dir: DmaDirection,
    ) -> Result<(), DmaError> {
        Ok(self.pool.sync_for_cpu(&self.mem, addr, len, dir)?)
    }

    /// `dma_alloc_coherent`: zeroed memory in the pool, for rings and headers.
    ///
    /// # Errors
    /// [`DmaError::Pool`] as [`BouncePool::alloc_coherent`].
    pub fn alloc_coherent(&self, size: usize) -> Result<DmaAddr, DmaError> {
        Ok(self.pool.alloc_coherent(&self.mem, size)?)
    }

    /// `dma_free_coherent`.
    ///
    /// # Errors
    /// [`DmaError::Pool`] as [`BouncePool::free_coherent`].
    pub fn free_coherent(&self, addr: DmaAddr) -> Result<(), DmaError> {
        Ok(self.pool.free_coherent(addr)?)
    }
}
