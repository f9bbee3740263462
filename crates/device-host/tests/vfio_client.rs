//! The device host driven over a real vfio-user socket by `vfio_user::Client`, as QEMU
//! drives it: config space, DMA_MAP of a memfd-like file, MSI-X eventfds, virtio-pci
//! initialisation of the virtio-iommu, one ATTACH and one PROBE through its requestq
//! (the PROBE lists the reserved region the memory layout gave the endpoint), the
//! interrupt, reset, and the host returning once the client disconnects.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use device_host::host::{
    endpoint_id, endpoint_slot, plain_layout, slot_bdf, DeviceHost, IommuMode, DEFAULT_POLL_MAX,
    IOMMU_SLOT,
};
use mem_layout::reserved_regions::ResvRegion;
use mem_layout::{Layout, LayoutConfig, MemRange, RdmDatabase, RegionKind};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use test_kit::{pci, r, w, TempDir, TempImage};
use vfio_user::Client;

mod common;
use common::{init_queue0, map_ram_and_irqs, queue0, ram_file};

const BAR0: u32 = 0;
const CONFIG: u32 = 7;

fn read_u32(c: &mut Client, region: u32, off: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b[..len]).unwrap();
    u32::from_le_bytes(b)
}

/// The RMRR-like region the layout keeps for the first endpoint.
const RESERVED: (u64, u64) = (0x9030_1000, 0x9030_1fff);

/// 2.5 GiB of RAM with [`RESERVED`] for the first endpoint: low RAM must end below it.
fn layout_with_reserved_region() -> Layout {
    let bdf = slot_bdf(endpoint_slot(0).unwrap());
    let mut db = RdmDatabase::new();
    let region = ResvRegion {
        range: MemRange::new(RESERVED.0, RESERVED.1).unwrap(),
        kind: RegionKind::Direct,
    };
    db.add_reserved_regions(&[region], &BTreeSet::from([bdf]), "test")
        .unwrap();
    let mut cfg = LayoutConfig::new(2560 << 20);
    cfg.assigned.push((bdf, None));
    mem_layout::plan(&cfg, &db).unwrap()
}

#[test]
fn plain_layout_needs_no_max_ram_below_4g() {
    let dir = TempDir::new("host-plain");
    let host = DeviceHost::new(
        dir.path(),
        IommuMode::Off,
        &plain_layout(64).unwrap(),
        Vec::new(),
        DEFAULT_POLL_MAX,
    )
    .unwrap();
    let args = host.qemu_args().join(" ");
    assert!(args.contains("-m 67108864B"), "{args}");
    assert!(!args.contains("max-ram-below-4g"), "{args}");
    drop(host);
}

#[test]
fn iommu_served_over_vfio_user_answers_attach_and_probe_from_the_layout() {
    let dir = TempDir::new("host-attach");
    let eps: Vec<Box<dyn device_host::host::EndpointFactory>> =
        vec![Box::new(device_host::endpoints::RngFactory::new("rng"))];
    let layout = layout_with_reserved_region();
    let host = DeviceHost::new(dir.path(), IommuMode::On, &layout, eps, DEFAULT_POLL_MAX).unwrap();
    let args = host.qemu_args().join(" ");
    assert!(
        args.contains("vfio-user-pci") && args.contains("viot.aml") && args.contains("share=on"),
        "{args}"
    );
    // Low RAM ends at the 2 MiB boundary below the region; q35 puts the rest above 4 GiB.
    assert_eq!(layout.low_ram_end, 0x9020_0000);
    assert!(
        args.contains(&format!("max-ram-below-4g={}B", 0x9020_0000u64)),
        "{args}"
    );
    assert!(dir.join("viot.aml").exists());
    let served = std::thread::spawn(move || host.run(Duration::from_millis(200)));

    let mut c = Client::new(&dir.join("iommu.sock")).unwrap();
    assert_eq!(read_u32(&mut c, CONFIG, 0, 2), 0x1af4);
    assert_eq!(
        read_u32(&mut c, CONFIG, 2, 2),
        0x1057,
        "virtio-iommu PCI ID"
    );
    let ram = ram_file("aperture-host-attach-ram");
    let mut ring = queue0(&ram);
    let fds = map_ram_and_irqs(&mut c, &ram, 3);

    // virtio-pci init (Linux's order): status, features, queue 0, DRIVER_OK.
    init_queue0(&mut c);

    // ATTACH(domain 1, the rng's endpoint) in guest RAM, then kick queue 0.
    let ep = endpoint_id(IOMMU_SLOT + 1);
    let mut req = vec![1u8, 0, 0, 0];
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&ep.to_le_bytes());
    req.extend_from_slice(&[0; 8]);
    ram.write_all_at(&req, 0x10000).unwrap();
    ram.write_all_at(&[0xaa; 4], 0x11000).unwrap();
    let head = ring.post(&[r(0x10000, 20), w(0x11000, 4)]);
    pci::notify(&mut c, 0);
    // The notify is a posted write; a config read after it is answered after it ran.
    read_u32(&mut c, CONFIG, 0, 2);

    assert_eq!(ring.used_idx(), 1, "one chain used");
    assert_eq!(
        ring.used_elem(0),
        (u32::from(head), 4),
        "used length = writable size"
    );
    let mut tail = [0u8; 4];
    ram.read_exact_at(&mut tail, 0x11000).unwrap();
    assert_eq!(tail, [0, 0, 0, 0], "S_OK, reserved zeroed");
    let mut count = [0u8; 8];
    let n = std::io::Read::read(&mut &fds[1], &mut count).unwrap_or(0);
    assert_eq!(n, 8, "queue vector 1 signalled");

    // PROBE(the same endpoint): head, endpoint, 64 reserved bytes; then 512 bytes of
    // properties and the tail, written by the device.
    let mut probe = vec![5u8, 0, 0, 0];
    probe.extend_from_slice(&ep.to_le_bytes());
    probe.extend_from_slice(&[0; 64]);
    ram.write_all_at(&probe, 0x12000).unwrap();
    ram.write_all_at(&[0xaa; 516], 0x13000).unwrap();
    ring.post(&[r(0x12000, 72), w(0x13000, 516)]);
    pci::notify(&mut c, 0);
    read_u32(&mut c, CONFIG, 0, 2);
    assert_eq!(ring.used_idx(), 2, "PROBE chain used");
    let mut props = vec![0u8; 516];
    ram.read_exact_at(&mut props, 0x13000).unwrap();
    assert_eq!(&props[512..], &[0, 0, 0, 0], "PROBE: S_OK");
    // RESV_MEM properties: type 1, length 20, subtype, 3 reserved, start, end.
    let mut resv = Vec::new();
    for p in props[..512].chunks(24).take_while(|p| p[0..2] == [1, 0]) {
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 20);
        let start = u64::from_le_bytes(p[8..16].try_into().unwrap());
        let end = u64::from_le_bytes(p[16..24].try_into().unwrap());
        resv.push((p[4], start, end));
    }
    resv.sort();
    assert_eq!(
        resv,
        vec![
            (0, RESERVED.0, RESERVED.1),   // RESV_MEM_T_RESERVED, from the layout
            (1, 0xfee0_0000, 0xfeef_ffff), // RESV_MEM_T_MSI
        ]
    );

    c.reset().unwrap();
    assert_eq!(read_u32(&mut c, BAR0, 0x14, 1), 0, "reset clears status");
    c.shutdown().unwrap();
    drop(c);
    let results = served.join().unwrap();
    assert!(
        results.iter().any(|(name, r)| name == "iommu" && r.is_ok()),
        "{results:?}"
    );
}

#[test]
fn bad_directory_and_too_many_devices_are_refused() {
    let file = TempImage::new("host-file", b"x");
    assert!(
        DeviceHost::new(
            file.path(),
            IommuMode::On,
            &plain_layout(64).unwrap(),
            Vec::new(),
            DEFAULT_POLL_MAX
        )
        .is_err(),
        "a file is not a directory"
    );
    drop(file);
    let many: Vec<Box<dyn device_host::host::EndpointFactory>> = (0..20)
        .map(|i| Box::new(device_host::endpoints::RngFactory::new(&format!("r{i}"))) as _)
        .collect();
    let dir = TempDir::new("host-many");
    assert!(matches!(
        DeviceHost::new(
            dir.path(),
            IommuMode::On,
            &plain_layout(64).unwrap(),
            many,
            DEFAULT_POLL_MAX
        ),
        Err(device_host::host::HostError::TooManyDevices(20))
    ));
}
