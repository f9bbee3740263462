//! Memory the device host owns and shares with a back-end: one memfd, mapped here as
//! guest memory at the address the back-end knows it by (its memory-table address).

use std::fs::File;
use std::os::fd::FromRawFd;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// A memfd of `size` bytes, mapped as one region at address `base`.
#[derive(Debug)]
pub struct ShadowMemory {
    file: File,
    mem: GuestMemoryMmap,
    base: u64,
    size: u64,
}

impl ShadowMemory {
    /// Creates and maps `size` bytes (zeroed) at address `base`.
    ///
    /// # Errors
    /// The kernel's, if the memfd cannot be created, sized or mapped; `InvalidInput`
    /// if `base + size` passes the top of the address space.
    pub fn new(name: &str, base: u64, size: u64) -> std::io::Result<Self> {
        if base.checked_add(size).is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("shadow memory of {size:#x} bytes at {base:#x} passes the top of the address space"),
            ));
        }
        let cname = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: `cname` is a valid NUL-terminated string; the result is checked below.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created above, is valid, and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let len = usize::try_from(size).map_err(std::io::Error::other)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(base),
            len,
            Some(FileOffset::new(file.try_clone()?, 0)),
        )])
        .map_err(std::io::Error::other)?;
        Ok(Self {
            file,
            mem,
            base,
            size,
        })
    }

    /// The memory, as the device host accesses it.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The memfd, for the back-end's memory table.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The address it is mapped at (in `mem` and in the back-end's memory table).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}
