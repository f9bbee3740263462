//! Guest RAM for tests: memfds, guest memory whose regions are memfds, and the memory
//! a driver writes its rings and buffers through ([`DriverMemory`]).

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{fence, Ordering};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap};

/// Guest memory of the tests.
pub type Mem = GuestMemoryMmap<()>;

/// A memfd of `len` bytes named `name`: `/memfd:NAME (deleted)` in `/proc/*/maps` of a
/// process that maps it. Close-on-exec.
pub fn memfd(name: &str, len: u64) -> File {
    let cname = std::ffi::CString::new(name).expect("a memfd name without NUL bytes");
    // SAFETY: memfd_create(2) reads the NUL-terminated name and takes plain flags; the
    // result is checked before use.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(
        fd >= 0,
        "memfd_create({name}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len)
        .unwrap_or_else(|e| panic!("cannot size memfd {name} to {len}: {e}"));
    f
}

/// Guest RAM whose every region is a memfd of its own, mapped shared into this process:
/// what a VMM hands a vhost-user back-end (the `File`s go in the memory table).
#[derive(Debug)]
pub struct MemfdRam {
    memory: Mem,
    regions: Vec<(GuestAddress, u64, File)>,
}

impl MemfdRam {
    /// One memfd per `(start, len)` range, named `NAME` for a single range and
    /// `NAME-I` for range `I` of several.
    pub fn new(name: &str, ranges: &[(GuestAddress, usize)]) -> Self {
        let files: Vec<(GuestAddress, u64, File)> = ranges
            .iter()
            .enumerate()
            .map(|(i, &(start, len))| {
                let n = if ranges.len() == 1 {
                    name.to_string()
                } else {
                    format!("{name}-{i}")
                };
                (start, len as u64, memfd(&n, len as u64))
            })
            .collect();
        let memory = Mem::from_ranges_with_files(files.iter().map(|(start, len, f)| {
            let f = f.try_clone().expect("a memfd can be duplicated");
            (*start, *len as usize, Some(FileOffset::new(f, 0)))
        }))
        .expect("memfd regions map");
        Self {
            memory,
            regions: files,
        }
    }

    /// The guest memory.
    pub fn memory(&self) -> &Mem {
        &self.memory
    }

    /// `(guest-physical start, length, memfd)` of each region.
    pub fn regions(&self) -> &[(GuestAddress, u64, File)] {
        &self.regions
    }

    /// The memfd of region `i`.
    pub fn file(&self, i: usize) -> &File {
        &self.regions[i].2
    }
}

/// Guest RAM that a driver reaches through its file (`pread`/`pwrite` at offset =
/// guest-physical address) without mapping it into this process: the test then sees in
/// its own `/proc/self/maps` only what the code under test mapped, and a device host in
/// another process or thread maps the same file.
#[derive(Debug)]
pub struct FileRam(pub File);

/// The memory a driver writes its rings and buffers through. Panics on failure.
pub trait DriverMemory {
    /// Writes `data` at `addr`.
    fn write_at(&self, addr: u64, data: &[u8]);
    /// Reads `data.len()` bytes at `addr`.
    fn read_at(&self, addr: u64, data: &mut [u8]);
    /// Stores a little-endian `u16` at `addr` with `order` (a ring index or flags).
    fn store_u16(&self, addr: u64, v: u16, order: Ordering);
    /// Loads a little-endian `u16` at `addr` with `order`.
    fn load_u16(&self, addr: u64, order: Ordering) -> u16;
}

impl<M: GuestMemory> DriverMemory for M {
    fn write_at(&self, addr: u64, data: &[u8]) {
        self.write_slice(data, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("driver write at {addr:#x}: {e}"));
    }

    fn read_at(&self, addr: u64, data: &mut [u8]) {
        self.read_slice(data, GuestAddress(addr))
            .unwrap_or_else(|e| panic!("driver read at {addr:#x}: {e}"));
    }

    fn store_u16(&self, addr: u64, v: u16, order: Ordering) {
        self.store(v.to_le(), GuestAddress(addr), order)
            .unwrap_or_else(|e| panic!("driver store at {addr:#x}: {e}"));
    }

    fn load_u16(&self, addr: u64, order: Ordering) -> u16 {
        u16::from_le(
            self.load(GuestAddress(addr), order)
                .unwrap_or_else(|e| panic!("driver load at {addr:#x}: {e}")),
        )
    }
}

impl DriverMemory for FileRam {
    fn write_at(&self, addr: u64, data: &[u8]) {
        self.0
            .write_all_at(data, addr)
            .unwrap_or_else(|e| panic!("driver write at {addr:#x}: {e}"));
    }

    fn read_at(&self, addr: u64, data: &mut [u8]) {
        self.0
            .read_exact_at(data, addr)
            .unwrap_or_else(|e| panic!("driver read at {addr:#x}: {e}"));
    }

    fn store_u16(&self, addr: u64, v: u16, order: Ordering) {
        // The system call orders it against this thread's earlier writes; the fence
        // keeps the compiler from moving plain accesses across it.
        fence(order_for_fence(order));
        self.write_at(addr, &v.to_le_bytes());
    }

    fn load_u16(&self, addr: u64, order: Ordering) -> u16 {
        let mut b = [0u8; 2];
        self.read_at(addr, &mut b);
        fence(order_for_fence(order));
        u16::from_le_bytes(b)
    }
}

/// `fence` refuses `Relaxed`; anything stronger is kept.
fn order_for_fence(order: Ordering) -> Ordering {
    match order {
        Ordering::Relaxed => Ordering::Acquire,
        o => o,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_ram_regions_are_the_files_and_the_memory() {
        let ram = MemfdRam::new(
            "test-kit-ram",
            &[(GuestAddress(0), 0x10000), (GuestAddress(0x100000), 0x1000)],
        );
        ram.memory().write_at(0x100010, b"kit");
        let mut b = [0u8; 3];
        ram.file(1).read_exact_at(&mut b, 0x10).expect("read");
        assert_eq!(&b, b"kit");
        assert_eq!(ram.regions()[0].1, 0x10000);
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        assert!(maps.contains("/memfd:test-kit-ram-1"));
        let f = FileRam(ram.file(0).try_clone().expect("dup"));
        f.store_u16(2, 0xabcd, Ordering::Release);
        assert_eq!(ram.memory().load_u16(2, Ordering::Acquire), 0xabcd);
    }
}
