//! The guest's DMA API in grant mode (Linux `drivers/xen/grant-dma-ops.c`), used by
//! the fake guest driver: [`GrantDma::map`] grants the pages of a buffer to the
//! backend domain under consecutive refs and returns the grant DMA address
//! `1 << 63 | first_ref << 12 | offset`; device-bound data (`ToDevice`) is granted
//! read-only. [`GrantDma::unmap`] revokes the grants; a grant the backend still uses
//! marks the device broken (every later map fails, as Linux's `data->broken`) and goes
//! to deferred reclaim, so its page is not reused until the backend lets go (Linux
//! `xen_grant_dma_unmap_page`, `gnttab_end_foreign_access`).
//!
//! **Persistent grants** ([`PersistentConfig`], as Xen blkfront's
//! `feature-persistent`): a pool of pages is granted read-write once; `map` copies the
//! buffer into pool pages (for `ToDevice`/`Bidirectional`) and returns their grant
//! address, `unmap` copies back (for `FromDevice`/`Bidirectional`) and keeps the grants.
//! The backend maps each pool page once and keeps it ([`crate::IommuMode::Persistent`]).
//! Coherent mappings (rings) always grant the real pages.

use crate::abi::PAGE_SIZE;
use crate::guest::{EndAccess, GuestError, GuestGrants};
use crate::{DomId, Gfn, Gpa, GrantDmaAddr, GrantRef};
use dma_types::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vm_memory::{Bytes, GuestAddress};

pub use dma_types::DmaDirection;

/// Why a DMA call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// A grant could not be revoked earlier: the device is disabled for further use.
    #[error("grant still in use by backend domain {0}, device disabled for further use")]
    Broken(DomId),
    /// This unmap found grants the backend still uses; they went to deferred reclaim.
    #[error("{count} grant(s) from {first} still in use by backend domain {backend}; deferred, device disabled")]
    StillInUse {
        /// First ref of the mapping.
        first: GrantRef,
        /// Refs that could not be revoked.
        count: u32,
        /// The backend.
        backend: DomId,
    },
    /// A zero-length buffer, or one whose end overflows.
    #[error("a DMA buffer at {gpa} of {len} bytes is empty or wraps the address space")]
    BadBuffer {
        /// Start.
        gpa: Gpa,
        /// Length.
        len: usize,
    },
    /// Unmap of an address this API did not map (or with another length/direction).
    #[error("{addr} of {len} bytes ({dir:?}) is not a live mapping")]
    NotMapped {
        /// Address given.
        addr: GrantDmaAddr,
        /// Length given.
        len: usize,
        /// Direction given.
        dir: DmaDirection,
    },
    /// The persistent pool has no run of free pages long enough.
    #[error("the persistent-grant pool has no {pages} consecutive free pages")]
    PoolFull {
        /// Pages needed.
        pages: u32,
    },
    /// Copying between the buffer and the persistent pool failed.
    #[error("copying {len} bytes at {gpa} to or from the persistent pool failed")]
    Copy {
        /// Buffer start.
        gpa: Gpa,
        /// Length.
        len: usize,
    },
    /// The grant table refused.
    #[error(transparent)]
    Grant(#[from] GuestError),
}

/// Persistent grants: pool pages granted read-write once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersistentConfig {
    /// First page of the pool (guest RAM the driver owns).
    pub base: Gfn,
    /// Pages in the pool (blkfront grants up to 1056 per device).
    pub pages: u32,
}

#[derive(Clone, Copy, Debug)]
struct Mapping {
    gpa: u64,
    len: usize,
    dir: DmaDirection,
    first: u32,
    pages: u32,
    /// First pool page used (persistent mode).
    pool_page: Option<u32>,
}

struct Pool {
    base_gpa: u64,
    first_ref: u32,
    pages: u32,
    used: Vec<bool>,
}

impl Pool {
    fn take(&mut self, n: u32) -> Option<u32> {
        let n_us = n as usize;
        (0..self.used.len().saturating_sub(n_us - 1)).find_map(|i| {
            let run = self.used.get(i..i + n_us)?;
            if run.iter().any(|&u| u) {
                return None;
            }
            for u in &mut self.used[i..i + n_us] {
                *u = true;
            }
            Some(i as u32)
        })
    }
    fn give(&mut self, first: u32, n: u32) {
        for i in first..first + n {
            if let Some(u) = self.used.get_mut(i as usize) {
                *u = false;
            }
        }
    }
}

/// Counters of a [`GrantDma`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaCounters {
    /// Successful maps.
    pub maps: u64,
    /// Successful unmaps.
    pub unmaps: u64,
    /// Grants handed to deferred reclaim.
    pub deferred: u64,
}

/// The DMA API of one grant-mode device (backed by one backend domain).
pub struct GrantDma {
    grants: Arc<GuestGrants>,
    backend: DomId,
    broken: AtomicBool,
    maps: Mutex<HashMap<u32, Mapping>>,
    pool: Option<Mutex<Pool>>,
    counters: Mutex<DmaCounters>,
}

impl std::fmt::Debug for GrantDma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantDma")
            .field("backend", &self.backend)
            .field("broken", &self.broken)
            .field("persistent", &self.pool.is_some())
            .finish_non_exhaustive()
    }
}

impl GrantDma {
    /// Per-I/O grants for a device served by `backend`.
    pub fn new(grants: Arc<GuestGrants>, backend: DomId) -> Self {
        Self {
            grants,
            backend,
            broken: AtomicBool::new(false),
            maps: Mutex::new(HashMap::new()),
            pool: None,
            counters: Mutex::new(DmaCounters::default()),
        }
    }

    /// Persistent grants: grants `cfg.pages` pages from `cfg.base` read-write to
    /// `backend` once, under consecutive refs.
    ///
    /// # Errors
    /// [`DmaError::Grant`] if the refs cannot be allocated or granted.
    pub fn persistent(
        grants: Arc<GuestGrants>,
        backend: DomId,
        cfg: &PersistentConfig,
    ) -> Result<Self, DmaError> {
        let base_gpa = cfg
            .base
            .gpa()
            .filter(|g| g.0.checked_add(u64::from(cfg.pages) * PAGE_SIZE).is_some())
            .ok_or(DmaError::BadBuffer {
                gpa: Gpa(cfg.base.0),
                len: cfg.pages as usize,
            })?;
        let first = grants.alloc_refs(cfg.pages)?;
        for i in 0..cfg.pages {
            let r = GrantRef(first.0 + i);
            let page = Gfn(cfg.base.0 + u64::from(i));
            if let Err(e) = grants.grant_foreign_access_ref(r, backend, page, false) {
                for j in 0..i {
                    grants.end_foreign_access_ref(GrantRef(first.0 + j));
                }
                grants.free_refs(first, cfg.pages);
                return Err(e.into());
            }
        }
        let mut d = Self::new(grants, backend);
        d.pool = Some(Mutex::new(Pool {
            base_gpa: base_gpa.0,
            first_ref: first.0,
            pages: cfg.pages,
            used: vec![false; cfg.pages as usize],
        }));
        Ok(d)
    }

    /// The guest's grant table.
    pub fn grants(&self) -> &Arc<GuestGrants> {
        &self.grants
    }

    /// The backend domain.
    pub fn backend(&self) -> DomId {
        self.backend
    }

    /// Whether an earlier unmap found a grant still in use (Linux `data->broken`).
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Counters.
    pub fn counters(&self) -> DmaCounters {
        *lock(&self.counters)
    }

    fn check(&self, gpa: Gpa, len: usize) -> Result<(), DmaError> {
        if self.is_broken() {
            return Err(DmaError::Broken(self.backend));
        }
        if len == 0 || gpa.0.checked_add(len as u64).is_none() {
            return Err(DmaError::BadBuffer { gpa, len });
        }
        Ok(())
    }

    /// Grants the pages of `[gpa, gpa + len)` under consecutive refs.
    fn grant_buffer(
        &self,
        gpa: Gpa,
        len: usize,
        readonly: bool,
    ) -> Result<(GrantRef, u32), DmaError> {
        let off = gpa.0 & (PAGE_SIZE - 1);
        let pages = u32::try_from((off + len as u64).div_ceil(PAGE_SIZE))
            .map_err(|_| DmaError::BadBuffer { gpa, len })?;
        let first = self.grants.alloc_refs(pages)?;
        let gfn0 = gpa.0 / PAGE_SIZE;
        for i in 0..pages {
            let r = GrantRef(first.0 + i);
            let g = Gfn(gfn0 + u64::from(i));
            if let Err(e) = self
                .grants
                .grant_foreign_access_ref(r, self.backend, g, readonly)
            {
                for j in 0..i {
                    self.grants.end_foreign_access_ref(GrantRef(first.0 + j));
                }
                self.grants.free_refs(first, pages);
                return Err(e.into());
            }
        }
        Ok((first, pages))
    }

    /// `dma_map_page`: maps `[gpa, gpa + len)` for `dir`.
    ///
    /// # Errors
    /// [`DmaError::Broken`], [`DmaError::BadBuffer`], [`DmaError::PoolFull`],
    /// [`DmaError::Copy`], [`DmaError::Grant`].
    pub fn map(&self, gpa: Gpa, len: usize, dir: DmaDirection) -> Result<GrantDmaAddr, DmaError> {
        self.check(gpa, len)?;
        let (addr, m) = if let Some(pool) = &self.pool {
            let pages = u32::try_from((len as u64).div_ceil(PAGE_SIZE))
                .map_err(|_| DmaError::BadBuffer { gpa, len })?;
            let (first_page, pool_gpa, first_ref) = {
                let mut p = lock(pool);
                let i = p.take(pages).ok_or(DmaError::PoolFull { pages })?;
                (i, p.base_gpa + u64::from(i) * PAGE_SIZE, p.first_ref + i)
            };
            if dir.to_device() {
                if let Err(e) = self.copy(gpa.0, pool_gpa, len) {
                    lock(pool).give(first_page, pages);
                    return Err(e);
                }
            }
            (
                GrantDmaAddr::new(GrantRef(first_ref), 0),
                Mapping {
                    gpa: gpa.0,
                    len,
                    dir,
                    first: first_ref,
                    pages,
                    pool_page: Some(first_page),
                },
            )
        } else {
            let (first, pages) = self.grant_buffer(gpa, len, dir == DmaDirection::ToDevice)?;
            let off = (gpa.0 & (PAGE_SIZE - 1)) as u16;
            (
                GrantDmaAddr::new(first, off),
                Mapping {
                    gpa: gpa.0,
                    len,
                    dir,
                    first: first.0,
                    pages,
                    pool_page: None,
                },
            )
        };
        lock(&self.maps).insert(m.first, m);
        lock(&self.counters).maps += 1;
        Ok(addr)
    }

    /// `dma_alloc_coherent`'s grant half: grants the real pages of `[gpa, gpa + len)`
    /// read-write (rings live here), also in persistent mode.
    ///
    /// # Errors
    /// As [`Self::map`].
    pub fn map_coherent(&self, gpa: Gpa, len: usize) -> Result<GrantDmaAddr, DmaError> {
        self.check(gpa, len)?;
        let (first, pages) = self.grant_buffer(gpa, len, false)?;
        lock(&self.maps).insert(
            first.0,
            Mapping {
                gpa: gpa.0,
                len,
                dir: DmaDirection::Bidirectional,
                first: first.0,
                pages,
                pool_page: None,
            },
        );
        lock(&self.counters).maps += 1;
        Ok(GrantDmaAddr::new(first, (gpa.0 & (PAGE_SIZE - 1)) as u16))
    }

    fn copy(&self, from: u64, to: u64, len: usize) -> Result<(), DmaError> {
        let m = self.grants.memory();
        let mut buf = vec![0u8; len];
        m.read_slice(&mut buf, GuestAddress(from))
            .and_then(|()| m.write_slice(&buf, GuestAddress(to)))
            .map_err(|_| DmaError::Copy {
                gpa: Gpa(from),
                len,
            })
    }

    /// `dma_unmap_page`: revokes the grants of a mapping (or, persistent, copies back
    /// and keeps them). A grant the backend still uses marks the device broken and is
    /// handed to deferred reclaim with its page.
    ///
    /// # Errors
    /// [`DmaError::NotMapped`] for an address/length/direction this API did not hand
    /// out; [`DmaError::StillInUse`] when a grant could not be revoked;
    /// [`DmaError::Copy`] when copying back from the pool failed.
    pub fn unmap(&self, addr: GrantDmaAddr, len: usize, dir: DmaDirection) -> Result<(), DmaError> {
        let not_mapped = DmaError::NotMapped { addr, len, dir };
        let (first, off) = GrantDmaAddr::decode(addr.0).ok_or(not_mapped.clone())?;
        let m = {
            let mut maps = lock(&self.maps);
            let ok = maps.get(&first.0).is_some_and(|m| {
                m.len == len
                    && m.dir == dir
                    && (m.pool_page.is_some() || off == (m.gpa & (PAGE_SIZE - 1)) as u16)
            });
            if !ok {
                return Err(not_mapped);
            }
            maps.remove(&first.0).ok_or(not_mapped)?
        };
        if let (Some(pool), Some(page)) = (&self.pool, m.pool_page) {
            let res = if dir.from_device() {
                let src = lock(pool).base_gpa + u64::from(page) * PAGE_SIZE;
                self.copy(src, m.gpa, len)
            } else {
                Ok(())
            };
            lock(pool).give(page, m.pages);
            lock(&self.counters).unmaps += 1;
            return res;
        }
        self.revoke(m)
    }

    /// Revokes the grants of coherent mapping `addr` of `len` bytes.
    ///
    /// # Errors
    /// As [`Self::unmap`].
    pub fn unmap_coherent(&self, addr: GrantDmaAddr, len: usize) -> Result<(), DmaError> {
        let not_mapped = DmaError::NotMapped {
            addr,
            len,
            dir: DmaDirection::Bidirectional,
        };
        let (first, _) = GrantDmaAddr::decode(addr.0).ok_or(not_mapped.clone())?;
        let m = {
            let mut maps = lock(&self.maps);
            if !maps
                .get(&first.0)
                .is_some_and(|m| m.len == len && m.pool_page.is_none())
            {
                return Err(not_mapped);
            }
            maps.remove(&first.0).ok_or(not_mapped)?
        };
        self.revoke(m)
    }

    fn revoke(&self, m: Mapping) -> Result<(), DmaError> {
        let gfn0 = m.gpa / PAGE_SIZE;
        let mut busy = 0;
        for i in 0..m.pages {
            let r = GrantRef(m.first + i);
            match self
                .grants
                .end_foreign_access(r, Some(Gfn(gfn0 + u64::from(i))))
            {
                EndAccess::Freed => {}
                EndAccess::Deferred | EndAccess::Leaked => busy += 1,
            }
        }
        lock(&self.counters).unmaps += 1;
        if busy > 0 {
            // "Grant still in use by backend domain, disabled for further use"
            self.broken.store(true, Ordering::SeqCst);
            lock(&self.counters).deferred += u64::from(busy);
            return Err(DmaError::StillInUse {
                first: GrantRef(m.first),
                count: busy,
                backend: self.backend,
            });
        }
        Ok(())
    }

    /// Ends the persistent pool's grants (device teardown); pool pages the backend still
    /// maps go to deferred reclaim. Returns how many were deferred.
    pub fn teardown(&self) -> u32 {
        let Some(pool) = &self.pool else {
            return 0;
        };
        let p = lock(pool);
        let mut deferred = 0;
        for i in 0..p.pages {
            let page = Gfn(p.base_gpa / PAGE_SIZE + u64::from(i));
            if self
                .grants
                .end_foreign_access(GrantRef(p.first_ref + i), Some(page))
                != EndAccess::Freed
            {
                deferred += 1;
            }
        }
        deferred
    }
}
