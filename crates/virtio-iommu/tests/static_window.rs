//! `EndpointIommu::with_static_window`: a host-declared identity window the endpoint
//! reaches without a mapping (the `auto` mode's bounce pool), while everything outside
//! it is translated, and faulted, exactly as before.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, IommuConfig, Iova, Request, Status, VirtioIommu,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

const EP: u32 = 8;
const WINDOW: u64 = 0x10_0000;
const WINDOW_LEN: u64 = 0x4_0000;

#[test]
fn static_window_is_reachable_unmapped_and_nothing_else_is() {
    let cfg = IommuConfig {
        endpoints: vec![EndpointConfig::new(EP)],
        ..IommuConfig::default()
    };
    let mut dev = VirtioIommu::new(&cfg).unwrap();
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut dev);
    let attach = Request::Attach {
        domain: DomainId(1),
        endpoint: EndpointId(EP),
        flags: 0,
        reserved_nonzero: false,
    };
    assert_eq!(g.send(&mut dev, &attach), Status::Ok);
    let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    ram.write_slice(b"in the window", GuestAddress(WINDOW + 0x100))
        .unwrap();
    ram.write_slice(b"private", GuestAddress(0x20_0000))
        .unwrap();
    let ep = dev.endpoint_iommu(EndpointId(EP)).unwrap();
    assert!(ep.with_static_window(WINDOW, 0).is_none(), "empty window");
    assert!(
        ep.with_static_window(u64::MAX, 2).is_none(),
        "wrapping window"
    );
    let mem = IommuMemory::new(
        ram.clone(),
        ep.with_static_window(WINDOW, WINDOW_LEN).unwrap(),
        true,
        (),
    );

    // Inside: read and written at its own address, with no mapping at all.
    let mut buf = [0u8; 13];
    mem.read_slice(&mut buf, GuestAddress(WINDOW + 0x100))
        .unwrap();
    assert_eq!(&buf, b"in the window");
    mem.write_slice(b"dev", GuestAddress(WINDOW + WINDOW_LEN - 3))
        .unwrap();
    // Outside, and straddling the window's end: faulted, nothing written.
    let mut p = [0u8; 7];
    assert!(mem.read_slice(&mut p, GuestAddress(0x20_0000)).is_err());
    assert!(mem
        .write_slice(b"xxxx", GuestAddress(WINDOW + WINDOW_LEN - 2))
        .is_err());
    let mut end = [0u8; 4];
    ram.read_slice(&mut end, GuestAddress(WINDOW + WINDOW_LEN - 3))
        .unwrap();
    assert_eq!(&end[..3], b"dev");
    assert_eq!(
        end[3], 0,
        "the straddling write left the byte past the window alone"
    );

    // A real mapping outside the window works and is strictly unmapped.
    let map = Request::Map {
        domain: DomainId(1),
        virt_start: Iova(1 << 32),
        virt_end: Iova((1 << 32) + 0xfff),
        phys_start: 0x20_0000,
        flags: 1,
    };
    assert_eq!(g.send(&mut dev, &map), Status::Ok);
    mem.read_slice(&mut p, GuestAddress(1 << 32)).unwrap();
    assert_eq!(&p, b"private");
    let unmap = Request::Unmap {
        domain: DomainId(1),
        virt_start: Iova(1 << 32),
        virt_end: Iova((1 << 32) + 0xfff),
        reserved_nonzero: false,
    };
    assert_eq!(g.send(&mut dev, &unmap), Status::Ok);
    assert!(mem.read_slice(&mut p, GuestAddress(1 << 32)).is_err());
    // The window is still there after the domain changes.
    mem.read_slice(&mut buf, GuestAddress(WINDOW + 0x100))
        .unwrap();
}
