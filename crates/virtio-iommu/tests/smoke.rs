use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};

#[test]
fn smoke() {
    let cfg = IommuConfig {
        endpoints: vec![EndpointConfig::new(8)],
        ..Default::default()
    };
    let mut dev = VirtioIommu::new(&cfg).unwrap();
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut dev);
    let att = Request::Attach {
        domain: DomainId(1),
        endpoint: EndpointId(8),
        flags: 0,
        reserved_nonzero: false,
    };
    assert_eq!(g.send(&mut dev, &att), Status::Ok);
    let map = Request::Map {
        domain: DomainId(1),
        virt_start: Iova(0x10000),
        virt_end: Iova(0x10fff),
        phys_start: 0x90_0000,
        flags: 3,
    };
    assert_eq!(g.send(&mut dev, &map), Status::Ok);
    g.mem
        .write_obj(0xdeadbeef_u32, GuestAddress(0x90_0010))
        .unwrap();
    let m: IommuMemory<GuestMemoryMmap<()>, _> = IommuMemory::new(
        g.mem.clone(),
        dev.endpoint_iommu(EndpointId(8)).unwrap(),
        true,
        (),
    );
    assert_eq!(
        m.read_obj::<u32>(GuestAddress(0x10010)).unwrap(),
        0xdeadbeef
    );
    assert!(m.read_obj::<u32>(GuestAddress(0x20010)).is_err());
    let (s, props) = g.probe(&mut dev, 8);
    assert_eq!(s, Status::Ok);
    assert_eq!(props[0], 1);
}
