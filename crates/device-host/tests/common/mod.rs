//! What the vfio-user client test and the doorbell bench share (the bench includes this
//! file by path): guest RAM as a memfd the client DMA-maps at guest-physical 0, a
//! client set up as QEMU sets one up on connect — the RAM DMA-mapped, MSI-X vectors
//! routed to eventfds — and Linux's virtio-pci bring-up of queue 0 with the driver's
//! side of that queue (the test kit's split ring, written through the RAM file).

#![allow(dead_code)] // the test and the bench each use their own part

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use test_kit::pci::{self, Bar0, QueueSetup};
use test_kit::{memfd, FileRam, RingLayout, SplitRing};
use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_MSIX_IRQ_INDEX,
};
use vfio_user::Client;

/// Guest RAM the client maps (one memfd, at guest-physical 0).
pub const RAM: u64 = 1 << 20;
/// Queue 0's size.
pub const QSIZE: u16 = 16;
/// Queue 0's rings: table, available ring and used ring on pages 1, 2 and 3 of RAM.
pub const RING: RingLayout = RingLayout {
    desc: 0x1000,
    avail: 0x2000,
    used: 0x3000,
};

/// [`RAM`] bytes of zeros in a memfd named `name`.
pub fn ram_file(name: &str) -> File {
    memfd(name, RAM)
}

/// The driver's side of queue 0, written through `ram` (not mapped here).
pub fn queue0(ram: &File) -> SplitRing<FileRam> {
    SplitRing::new(FileRam(ram.try_clone().unwrap()), RING, QSIZE)
}

/// Linux's virtio-pci init of queue 0: status, every offered feature, queue 0 of
/// [`QSIZE`] entries at [`RING`] with MSI-X vector 1, DRIVER_OK; checks that
/// FEATURES_OK and DRIVER_OK stuck.
pub fn init_queue0<B: Bar0 + ?Sized>(b: &mut B) {
    assert!(pci::negotiate(b, None).features_ok, "FEATURES_OK");
    assert_eq!(pci::status(b), 1 | 2 | 8, "FEATURES_OK");
    let queue = QueueSetup {
        index: 0,
        size: Some(QSIZE),
        vector: 1,
        layout: RING,
    };
    pci::setup_queue(b, &queue);
    pci::driver_ok(b);
    assert_eq!(pci::status(b), 1 | 2 | 8 | 4, "DRIVER_OK");
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
