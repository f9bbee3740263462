//! Guest RAM with the restricted pool as its own memory file (issue 6, VM
//! integration): [`SplitRam`] backs the guest's RAM by two memfds — one for all RAM
//! except the pool, one for the pool — so that a device backend in its own process
//! can be handed the pool's file and nothing else of the guest (the pKVM model, Linux
//! `Documentation/virt/kvm/arm/hypercalls.rst`, `ARM_SMCCC_KVM_FUNC_MEM_SHARE`: the
//! pool is the only memory shared with the host side). [`map_pool_file`] is the
//! backend's half: guest memory made of the pool file alone, at the pool's
//! guest-physical address, so every other address is simply not there.
//!
//! Both memfds are sealed against shrinking and growing (`F_SEAL_SHRINK`,
//! `F_SEAL_GROW`, then `F_SEAL_SEAL`): a backend holding the pool's file cannot
//! truncate it under the VMM's mapping (which would turn the VMM's next access into
//! `SIGBUS`). Both are close-on-exec, so no child process inherits either unless it
//! is passed on purpose.

use crate::{Gpa, PAGE_SIZE, SEGMENT_BYTES};
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::{FromRawFd, OwnedFd};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Why split guest RAM could not be built or mapped.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The pool's base or size is not page-aligned, its size is not a whole number
    /// of 256 KiB segments, or it does not lie inside RAM.
    #[error(
        "pool at {base:#x} of {size:#x} bytes does not fit {ram_size:#x} bytes of RAM \
         (base page-aligned, size a non-zero multiple of {SEGMENT_BYTES:#x}, all inside RAM)"
    )]
    BadPool {
        /// Pool base asked for.
        base: u64,
        /// Pool size asked for.
        size: u64,
        /// RAM size asked for.
        ram_size: u64,
    },
    /// RAM size not a whole number of pages, or not addressable on this host.
    #[error("RAM size {0:#x} is not a non-zero multiple of {PAGE_SIZE:#x} that fits in memory")]
    BadRamSize(u64),
    /// A memfd could not be created, sized or sealed.
    #[error("memfd {name}: {op} failed: {source}")]
    Memfd {
        /// The memfd's name.
        name: &'static str,
        /// What failed.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The pool file given to [`map_pool_file`] is not the size expected.
    #[error("pool file is {actual:#x} bytes, expected {expected:#x}")]
    PoolFileSize {
        /// Its size.
        actual: u64,
        /// The pool size given.
        expected: u64,
    },
    /// vm-memory refused the regions.
    #[error("cannot map guest memory: {0}")]
    Map(String),
}

/// Name of the RAM memfd (shows as `/memfd:aperture-ram (deleted)` in
/// `/proc/<pid>/maps`).
pub const RAM_MEMFD_NAME: &str = "aperture-ram";
/// Name of the pool memfd.
pub const POOL_MEMFD_NAME: &str = "aperture-pool";

/// Guest RAM of `ram_size` bytes at guest-physical 0, whose pool range is backed by
/// its own memfd.
#[derive(Debug)]
pub struct SplitRam {
    mem: GuestMemoryMmap<()>,
    ram: File,
    pool: File,
    pool_range: Range<u64>,
    ram_size: u64,
}

/// A sealed, close-on-exec memfd of `len` bytes named `cname` (`name` in errors).
fn memfd(name: &'static str, cname: &'static CStr, len: u64) -> Result<File, RamError> {
    let err = |op| move |source| RamError::Memfd { name, op, source };
    // SAFETY: `cname` is a NUL-terminated string that outlives the call; the flags
    // are valid memfd_create flags. The result is checked before use.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(err("memfd_create")(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create (checked non-negative above) and
    // nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len).map_err(err("ftruncate"))?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on an fd this function owns, with an integer argument;
    // the result is checked.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&file),
            libc::F_ADD_SEALS,
            seals,
        )
    };
    if rc < 0 {
        return Err(err("F_ADD_SEALS")(io::Error::last_os_error()));
    }
    Ok(file)
}

fn checked_len(n: u64) -> Option<usize> {
    usize::try_from(n).ok()
}

impl SplitRam {
    /// `ram_size` bytes of guest RAM at guest-physical 0, the pool
    /// `[pool_base, pool_base + pool_size)` among them: the pool's bytes live in the
    /// pool memfd, the rest in the RAM memfd (`ram_size - pool_size` bytes: RAM
    /// below the pool at file offset 0, RAM above it right after).
    ///
    /// # Errors
    /// [`RamError::BadRamSize`], [`RamError::BadPool`] for a pool the allocator
    /// could not use or that is not inside RAM, [`RamError::Memfd`] or
    /// [`RamError::Map`] if the host refuses.
    pub fn new(ram_size: u64, pool_base: Gpa, pool_size: u64) -> Result<Self, RamError> {
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE) || checked_len(ram_size).is_none() {
            return Err(RamError::BadRamSize(ram_size));
        }
        let base = pool_base.0;
        let bad = RamError::BadPool {
            base,
            size: pool_size,
            ram_size,
        };
        let Some(pool_end) = base.checked_add(pool_size) else {
            return Err(bad);
        };
        if !base.is_multiple_of(PAGE_SIZE)
            || pool_size == 0
            || !pool_size.is_multiple_of(SEGMENT_BYTES)
            || pool_end > ram_size
        {
            return Err(bad);
        }
        let ram = memfd(RAM_MEMFD_NAME, c"aperture-ram", ram_size - pool_size)?;
        let pool = memfd(POOL_MEMFD_NAME, c"aperture-pool", pool_size)?;
        // All lengths below are at most ram_size, which fits usize (checked above).
        let len = |n: u64| checked_len(n).unwrap_or(usize::MAX);
        let mut regions = Vec::with_capacity(3);
        if base > 0 {
            regions.push((
                GuestAddress(0),
                len(base),
                Some(FileOffset::new(clone(&ram)?, 0)),
            ));
        }
        regions.push((
            GuestAddress(base),
            len(pool_size),
            Some(FileOffset::new(clone(&pool)?, 0)),
        ));
        if pool_end < ram_size {
            regions.push((
                GuestAddress(pool_end),
                len(ram_size - pool_end),
                Some(FileOffset::new(clone(&ram)?, base)),
            ));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(regions)
            .map_err(|e| RamError::Map(e.to_string()))?;
        Ok(Self {
            mem,
            ram,
            pool,
            pool_range: base..pool_end,
            ram_size,
        })
    }

    /// The guest's memory: all of RAM, the pool included (what the guest side uses).
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }

    /// The pool's memfd: the one file to hand to a device backend.
    pub fn pool_file(&self) -> &File {
        &self.pool
    }

    /// The memfd of RAM outside the pool: never handed to a backend.
    pub fn ram_file(&self) -> &File {
        &self.ram
    }

    /// The pool's guest-physical range.
    pub fn pool_range(&self) -> Range<u64> {
        self.pool_range.clone()
    }

    /// Bytes of guest RAM, the pool included.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }
}

fn clone(f: &File) -> Result<File, RamError> {
    // A duplicate is close-on-exec too (File::try_clone uses F_DUPFD_CLOEXEC).
    f.try_clone().map_err(|source| RamError::Memfd {
        name: POOL_MEMFD_NAME,
        op: "dup",
        source,
    })
}

/// The backend's guest memory: the pool file mapped (shared) at the pool's
/// guest-physical base, and nothing else — an access anywhere outside
/// `[base, base + size)` finds no region.
///
/// # Errors
/// [`RamError::PoolFileSize`] if `file` is not `size` bytes; [`RamError::BadPool`]
/// for a base or size the pool could not have; [`RamError::Map`] if mapping fails.
pub fn map_pool_file(file: File, base: Gpa, size: u64) -> Result<GuestMemoryMmap<()>, RamError> {
    let bad = RamError::BadPool {
        base: base.0,
        size,
        ram_size: base.0.saturating_add(size),
    };
    if !base.0.is_multiple_of(PAGE_SIZE)
        || size == 0
        || !size.is_multiple_of(SEGMENT_BYTES)
        || base.0.checked_add(size).is_none()
    {
        return Err(bad);
    }
    let Some(len) = checked_len(size) else {
        return Err(bad);
    };
    let actual = file
        .metadata()
        .map_err(|source| RamError::Memfd {
            name: POOL_MEMFD_NAME,
            op: "fstat",
            source,
        })?
        .len();
    if actual != size {
        return Err(RamError::PoolFileSize {
            actual,
            expected: size,
        });
    }
    GuestMemoryMmap::from_ranges_with_files([(
        GuestAddress(base.0),
        len,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| RamError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    #[test]
    fn pool_bytes_live_in_the_pool_file_and_the_rest_in_the_ram_file() {
        let r = SplitRam::new(16 * MIB, Gpa(8 * MIB), 2 * MIB).unwrap();
        let m = r.memory();
        assert_eq!(m.num_regions(), 3);
        m.write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        m.write_obj(0x22u8, GuestAddress(8 * MIB + 5)).unwrap();
        m.write_obj(0x33u8, GuestAddress(12 * MIB)).unwrap();
        let byte = |f: &File, off: u64| {
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).unwrap();
            b[0]
        };
        assert_eq!(byte(r.ram_file(), 0x1000), 0x11);
        assert_eq!(byte(r.pool_file(), 5), 0x22);
        // RAM above the pool follows RAM below it in the RAM file.
        assert_eq!(byte(r.ram_file(), 8 * MIB + (12 * MIB - 10 * MIB)), 0x33);
        assert_eq!(r.ram_file().metadata().unwrap().len(), 14 * MIB);
        assert_eq!(r.pool_file().metadata().unwrap().len(), 2 * MIB);
    }

    #[test]
    fn pool_at_either_end_of_ram_needs_only_two_regions() {
        let low = SplitRam::new(4 * MIB, Gpa(0), MIB).unwrap();
        let high = SplitRam::new(4 * MIB, Gpa(3 * MIB), MIB).unwrap();
        assert_eq!(low.memory().num_regions(), 2);
        assert_eq!(high.memory().num_regions(), 2);
        let all = SplitRam::new(MIB, Gpa(0), MIB).unwrap();
        assert_eq!(all.memory().num_regions(), 1);
    }

    #[test]
    fn memfds_are_sealed_so_a_backend_cannot_truncate_the_pool() {
        let r = SplitRam::new(4 * MIB, Gpa(MIB), MIB).unwrap();
        assert!(r.pool_file().set_len(0).is_err(), "shrink sealed");
        assert!(r.pool_file().set_len(4 * MIB).is_err(), "grow sealed");
        assert!(r.ram_file().set_len(0).is_err());
    }

    #[test]
    fn bad_layouts_are_refused_with_the_values() {
        for (ram, base, size) in [
            (4 * MIB, MIB + 1, MIB),
            (4 * MIB, MIB, 4096),
            (4 * MIB, MIB, 0),
            (4 * MIB, 3 * MIB + 4096, MIB),
            (4 * MIB, u64::MAX - 4095, MIB),
        ] {
            let e = SplitRam::new(ram, Gpa(base), size).unwrap_err();
            assert!(matches!(e, RamError::BadPool { .. }), "{e}");
            assert!(e.to_string().contains(&format!("{base:#x}")), "{e}");
        }
        assert!(matches!(
            SplitRam::new(4 * MIB + 1, Gpa(0), MIB),
            Err(RamError::BadRamSize(_))
        ));
    }

    #[test]
    fn backend_memory_from_the_pool_file_sees_the_pool_and_nothing_else() {
        let r = SplitRam::new(16 * MIB, Gpa(8 * MIB), MIB).unwrap();
        r.memory()
            .write_obj(0xabu8, GuestAddress(8 * MIB + 7))
            .unwrap();
        r.memory().write_obj(0x5eu8, GuestAddress(0x1000)).unwrap();
        let dev = map_pool_file(r.pool_file().try_clone().unwrap(), Gpa(8 * MIB), MIB).unwrap();
        assert_eq!(dev.read_obj::<u8>(GuestAddress(8 * MIB + 7)).unwrap(), 0xab);
        assert!(dev.read_obj::<u8>(GuestAddress(0x1000)).is_err());
        assert!(dev.read_obj::<u8>(GuestAddress(8 * MIB - 1)).is_err());
        assert!(dev.read_obj::<u8>(GuestAddress(9 * MIB)).is_err());
        // Shared mapping: the backend's writes are the guest's pool bytes.
        dev.write_obj(0xcdu8, GuestAddress(8 * MIB + 8)).unwrap();
        assert_eq!(
            r.memory()
                .read_obj::<u8>(GuestAddress(8 * MIB + 8))
                .unwrap(),
            0xcd
        );
        assert!(matches!(
            map_pool_file(r.pool_file().try_clone().unwrap(), Gpa(8 * MIB), 2 * MIB),
            Err(RamError::PoolFileSize { .. })
        ));
    }
}
