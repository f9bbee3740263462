//! What the vfio-user client test and the doorbell bench share (the bench includes this
//! file by path): a scratch directory, a guest RAM file, and a client set up as QEMU
//! sets one up on connect — the RAM DMA-mapped at guest-physical 0, MSI-X vectors
//! routed to eventfds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;

/// Guest RAM the client maps (one file, at guest-physical 0).
pub const RAM: u64 = 1 << 20;

/// An empty directory `aperture-TAG-PID` under the temporary directory.
pub fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("aperture-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `dir/ram`, [`RAM`] bytes of zeros.
pub fn ram_file(dir: &Path) -> File {
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("ram"))
        .unwrap();
    f.set_len(RAM).unwrap();
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd(2) takes no pointers; the result is checked before use and then
    // owned by exactly one File.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd failed");
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    unsafe { File::from_raw_fd(fd) }
}

/// DMA-maps `ram` at guest-physical 0 and routes MSI-X vectors 0 to `vectors - 1` to
/// fresh non-blocking eventfds, which it returns (vector `i` signals element `i`).
pub fn map_ram_and_irqs(c: &mut Client, ram: &File, vectors: u32) -> Vec<File> {
    c.dma_map(0, 0, RAM, ram.as_raw_fd()).unwrap();
    let fds: Vec<File> = (0..vectors).map(|_| eventfd()).collect();
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    c.set_irqs(
        VFIO_PCI_MSIX_IRQ_INDEX,
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        0,
        vectors,
        &raw,
    )
    .unwrap();
    fds
}
