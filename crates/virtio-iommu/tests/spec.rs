//! One test per device-normative statement of the virtio-iommu spec, named after its
//! ID in `docs/SPEC-STATEMENTS.md`, plus the spec's UNMAP examples, the
//! request sequence Linux's driver sends, and the strict-invalidation contract. Every
//! request goes through the real queue path with the fake guest driver.

#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use virtio_iommu::fake_driver::{FakeGuest, RawDesc, FREE_RAM};
use virtio_iommu::wire::*;
use virtio_iommu::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, Iommu, IommuMemory, Permissions};

const EP1: u32 = 1;
const EP2: u32 = 2;
const PAGE: u64 = 0x1000;

fn config() -> IommuConfig {
    IommuConfig {
        endpoints: vec![EndpointConfig::new(EP1), EndpointConfig::new(EP2)],
        ..IommuConfig::default()
    }
}

fn setup_with(cfg: &IommuConfig) -> (VirtioIommu, FakeGuest) {
    let mut dev = VirtioIommu::new(cfg).expect("valid config");
    let mut g = FakeGuest::new(cfg.probe_size);
    g.negotiate(&mut dev);
    (dev, g)
}

/// Device with two endpoints, features negotiated, `bypass` turned off as a guest
/// that wants isolation would.
fn setup() -> (VirtioIommu, FakeGuest) {
    let (mut dev, g) = setup_with(&config());
    dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0])
        .expect("bypass write");
    (dev, g)
}

fn attach(domain: u32, ep: u32) -> Request {
    attach_f(domain, ep, 0)
}

fn attach_f(domain: u32, ep: u32, flags: u32) -> Request {
    Request::Attach {
        domain: DomainId(domain),
        endpoint: EndpointId(ep),
        flags,
        reserved_nonzero: false,
    }
}

fn detach(domain: u32, ep: u32) -> Request {
    Request::Detach {
        domain: DomainId(domain),
        endpoint: EndpointId(ep),
    }
}

fn map(domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Request {
    Request::Map {
        domain: DomainId(domain),
        virt_start: Iova(start),
        virt_end: Iova(end),
        phys_start: phys,
        flags,
    }
}

fn unmap(domain: u32, start: u64, end: u64) -> Request {
    Request::Unmap {
        domain: DomainId(domain),
        virt_start: Iova(start),
        virt_end: Iova(end),
        reserved_nonzero: false,
    }
}

const RW: u32 = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
const R: u32 = VIRTIO_IOMMU_MAP_F_READ;
const W: u32 = VIRTIO_IOMMU_MAP_F_WRITE;

/// Translates `[iova, iova+len)` for `ep`; the GPA of its first byte, or `None` if denied.
fn tr(dev: &VirtioIommu, ep: u32, iova: u64, len: usize, access: Permissions) -> Option<u64> {
    let iommu = dev.endpoint_iommu(EndpointId(ep)).expect("configured");
    let mut it = iommu.translate(GuestAddress(iova), len, access).ok()?;
    it.next().map(|m| m.base.0)
}

fn read_ok(dev: &VirtioIommu, ep: u32, iova: u64) -> Option<u64> {
    tr(dev, ep, iova, 8, Permissions::Read)
}

fn send_all(g: &mut FakeGuest, dev: &mut VirtioIommu, reqs: &[Request]) {
    for r in reqs {
        assert_eq!(g.send(dev, r), Status::Ok, "{r:?}");
    }
}

/// Submits `readable` with a writable buffer of `wlen` bytes prefilled with 0xAA, so a
/// test can tell which bytes the device wrote. Returns the used length and the buffer.
fn raw(g: &mut FakeGuest, dev: &mut VirtioIommu, readable: &[u8], wlen: u32) -> (u32, Vec<u8>) {
    let rbuf = FREE_RAM + 0x10_0000;
    let wbuf = rbuf + 0x1_0000;
    g.mem.write_slice(readable, GuestAddress(rbuf)).unwrap();
    g.mem
        .write_slice(&vec![0xaa; wlen as usize], GuestAddress(wbuf))
        .unwrap();
    let descs = [
        RawDesc {
            addr: rbuf,
            len: readable.len() as u32,
            flags: 1,
            next: 129,
        },
        RawDesc {
            addr: wbuf,
            len: wlen,
            flags: 2,
            next: 0,
        },
    ];
    let used = g.submit_raw(dev, &descs, 128).unwrap();
    assert_eq!(used.len(), 1);
    let mut out = vec![0; wlen as usize];
    g.mem.read_slice(&mut out, GuestAddress(wbuf)).unwrap();
    (used[0], out)
}

// ---------------------------------------------------------------------------
// Feature bits
// ---------------------------------------------------------------------------

#[test]
fn dev_feat_1_map_unmap_is_offered() {
    let (dev, _) = setup();
    assert_ne!(dev.device_features() & (1 << VIRTIO_IOMMU_F_MAP_UNMAP), 0);
}

#[test]
fn dev_feat_2_bypass_config_is_offered_and_legacy_bypass_is_not() {
    let (dev, _) = setup();
    let f = dev.device_features();
    assert_ne!(f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG), 0);
    assert_eq!(f & (1 << VIRTIO_IOMMU_F_BYPASS), 0);
}

#[test]
fn dev_feat_3_bypass_and_bypass_config_are_never_both_offered() {
    let f = DEVICE_FEATURES;
    assert!(f & (1 << VIRTIO_IOMMU_F_BYPASS) == 0 || f & (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG) == 0);
    // And the rest of the feature set.
    for bit in [
        VIRTIO_F_VERSION_1,
        VIRTIO_IOMMU_F_INPUT_RANGE,
        VIRTIO_IOMMU_F_DOMAIN_RANGE,
        VIRTIO_IOMMU_F_PROBE,
        VIRTIO_IOMMU_F_MMIO,
    ] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
    }
}

// ---------------------------------------------------------------------------
// Config space
// ---------------------------------------------------------------------------

#[test]
fn dev_cfg_1_page_size_mask_has_a_bit_and_zero_is_refused() {
    let (dev, _) = setup();
    let mut b = [0u8; 8];
    dev.read_config(0, &mut b).unwrap();
    let mask = u64::from_le_bytes(b);
    assert_eq!(mask, !0xfff, "default: every size >= 4 KiB");
    let bad = IommuConfig {
        page_size_mask: 0,
        ..config()
    };
    assert!(matches!(
        VirtioIommu::new(&bad),
        Err(DeviceError::Config(ConfigError::EmptyPageSizeMask))
    ));
}

#[test]
fn config_space_layout_reads_as_the_spec_says() {
    let (dev, _) = setup_with(&config());
    let mut c = [0u8; 40];
    dev.read_config(0, &mut c).unwrap();
    assert_eq!(u64::from_le_bytes(c[8..16].try_into().unwrap()), 0);
    assert_eq!(
        u64::from_le_bytes(c[16..24].try_into().unwrap()),
        (1 << 48) - 1
    );
    assert_eq!(u32::from_le_bytes(c[24..28].try_into().unwrap()), 0);
    assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), u32::MAX);
    assert_eq!(u32::from_le_bytes(c[32..36].try_into().unwrap()), 512);
    assert_eq!(c[36], 1);
    assert_eq!(&c[37..40], &[0, 0, 0]);
    let mut past = [0u8; 2];
    assert!(matches!(
        dev.read_config(39, &mut past),
        Err(DeviceError::ConfigOutOfRange { offset: 39, len: 2 })
    ));
}

#[test]
fn dev_cfg_2_bypass_boots_as_one_and_unattached_endpoints_bypass() {
    let (dev, _) = setup_with(&config());
    let mut b = [0u8; 1];
    dev.read_config(36, &mut b).unwrap();
    assert_eq!(b[0], 1);
    // virtio v1.3 §5.13.6: bypass holds for unattached endpoints: identity translation.
    assert_eq!(read_ok(&dev, EP1, 0x4000), Some(0x4000));
}

#[test]
fn dev_cfg_3_bypass_survives_device_reset_and_system_reset_restores_it() {
    let (mut dev, _) = setup();
    let mut b = [0u8; 1];
    dev.reset();
    dev.read_config(36, &mut b).unwrap();
    assert_eq!(b[0], 0, "device reset keeps the written value");
    assert_eq!(read_ok(&dev, EP1, 0x4000), None);
    dev.system_reset();
    dev.read_config(36, &mut b).unwrap();
    assert_eq!(b[0], 1, "system reset restores the boot value");
    assert_eq!(read_ok(&dev, EP1, 0x4000), Some(0x4000));
}

#[test]
fn dev_cfg_4_only_0_or_1_is_ever_presented() {
    let (mut dev, _) = setup_with(&config());
    for v in [2u8, 0x80, 0xff] {
        assert!(matches!(
            dev.write_config(36, &[v]),
            Err(DeviceError::ConfigWriteRefused { .. })
        ));
        let mut b = [0u8; 1];
        dev.read_config(36, &mut b).unwrap();
        assert_eq!(b[0], 1, "a refused write changes nothing");
    }
}

#[test]
fn drv_cfg_1_only_bypass_is_writable_and_only_with_bypass_config() {
    let (mut dev, _) = setup_with(&config());
    assert!(
        dev.write_config(0, &[0; 8]).is_err(),
        "page_size_mask is read-only"
    );
    assert!(
        dev.write_config(36, &[0, 0]).is_err(),
        "2-byte write over bypass"
    );
    assert!(dev.write_config(40, &[0]).is_err(), "past the config space");
    dev.set_acked_features(DEVICE_FEATURES & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert!(
        dev.write_config(36, &[0]).is_err(),
        "BYPASS_CONFIG not negotiated"
    );
    let mut b = [0u8; 1];
    dev.read_config(36, &mut b).unwrap();
    assert_eq!(b[0], 1);
}

// ---------------------------------------------------------------------------
// All requests
// ---------------------------------------------------------------------------

#[test]
fn dev_ops_1_success_is_s_ok() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.send(&mut dev, &attach(1, EP1)), Status::Ok);
    let c = dev.counters();
    assert_eq!(c.count(RequestType::Attach, Status::Ok), 1);
}

#[test]
fn dev_ops_2_unknown_type_gets_no_write_and_used_length_0() {
    let (mut dev, mut g) = setup();
    for t in [0u8, 6, 7, 0xff] {
        let mut req = vec![0u8; 40];
        req[0] = t;
        let (used, buf) = raw(&mut g, &mut dev, &req, 4);
        assert_eq!(used, 0, "type {t}");
        assert_eq!(buf, vec![0xaa; 4], "type {t}: buffer untouched");
    }
    assert_eq!(dev.counters().unparseable, 4);
}

#[test]
fn unparseable_requests_without_head_or_tail_room_get_used_length_0() {
    let (mut dev, mut g) = setup();
    let (used, buf) = raw(&mut g, &mut dev, &[1, 0], 4);
    assert_eq!((used, buf), (0, vec![0xaa; 4]), "no head");
    let (used, buf) = raw(&mut g, &mut dev, &request::encode(&attach(1, EP1)), 3);
    assert_eq!((used, buf), (0, vec![0xaa; 3]), "no room for the tail");
    assert_eq!(
        dev.endpoint_domain(EndpointId(EP1)),
        None,
        "nothing applied"
    );
}

#[test]
fn truncated_known_request_is_s_inval_with_full_used_length() {
    let (mut dev, mut g) = setup();
    let bytes = request::encode(&map(1, 0, 0xfff, 0, RW));
    let (used, buf) = raw(&mut g, &mut dev, &bytes[..20], 4);
    assert_eq!(used, 4);
    assert_eq!(buf, vec![Status::Inval as u8, 0, 0, 0]);
}

#[test]
fn dev_ops_3_head_reserved_is_ignored_and_tail_reserved_is_zeroed() {
    let (mut dev, mut g) = setup();
    let mut bytes = request::encode(&attach(1, EP1));
    bytes[1..4].copy_from_slice(&[0xff; 3]);
    let (used, buf) = raw(&mut g, &mut dev, &bytes, 4);
    assert_eq!(used, 4);
    assert_eq!(buf, vec![Status::Ok as u8, 0, 0, 0]);
}

#[test]
fn dev_ops_4_unattached_endpoint_without_bypass_reaches_nothing() {
    let (dev, _) = setup();
    assert_eq!(read_ok(&dev, EP1, 0x1000), None);
    assert_eq!(tr(&dev, EP1, 0x1000, 8, Permissions::Write), None);
}

#[test]
fn failures_write_their_tail_with_the_exact_writable_length() {
    // Linux's `__viommu_sync_req()` reads a used length other than the writable size as
    // S_OK.
    let (mut dev, mut g) = setup();
    let c = g.submit(&mut dev, &request::encode(&attach(1, 99)), 4);
    assert_eq!(c.used_len, 4);
    assert_eq!(c.status(4), Some(Status::NoEnt));
    let wlen = g.writable_len(&Request::Probe {
        endpoint: EndpointId(99),
    });
    let c = g.submit(
        &mut dev,
        &request::encode(&Request::Probe {
            endpoint: EndpointId(99),
        }),
        wlen,
    );
    assert_eq!(c.used_len, 512 + 4);
    assert_eq!(c.status(wlen), Some(Status::NoEnt));
}

// ---------------------------------------------------------------------------
// ATTACH
// ---------------------------------------------------------------------------

#[test]
fn dev_att_1_nonzero_reserved_is_s_inval() {
    let (mut dev, mut g) = setup();
    let r = Request::Attach {
        domain: DomainId(1),
        endpoint: EndpointId(EP1),
        flags: 0,
        reserved_nonzero: true,
    };
    assert_eq!(g.send(&mut dev, &r), Status::Inval);
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), None);
}

#[test]
fn dev_att_2_unknown_flags_are_s_inval() {
    let (mut dev, mut g) = setup();
    for f in [2u32, 4, 1 << 31] {
        assert_eq!(
            g.send(&mut dev, &attach_f(1, EP1, f)),
            Status::Inval,
            "flags {f:#x}"
        );
    }
    // ATTACH_F_BYPASS is unknown unless BYPASS_CONFIG was negotiated.
    dev.set_acked_features(DEVICE_FEATURES & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    assert_eq!(
        g.send(&mut dev, &attach_f(1, EP1, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), None);
}

#[test]
fn dev_att_3_unknown_endpoint_is_s_noent() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.send(&mut dev, &attach(1, 77)), Status::NoEnt);
    assert_eq!(dev.counters().domains, 0, "no domain created");
}

#[test]
fn dev_att_4_a_domain_may_hold_several_endpoints_sharing_its_mappings() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            attach(1, EP2),
            map(1, 0x10_0000, 0x10_0fff, 0x50_0000, RW),
        ],
    );
    assert_eq!(read_ok(&dev, EP1, 0x10_0008), Some(0x50_0008));
    assert_eq!(read_ok(&dev, EP2, 0x10_0008), Some(0x50_0008));
}

#[test]
fn dev_att_5_bypass_mismatch_with_existing_domain_is_s_inval_and_changes_nothing() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), attach(2, EP2), map(2, 0, 0xfff, 0x5000, RW)],
    );
    assert_eq!(
        g.send(&mut dev, &attach_f(1, EP2, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Inval
    );
    // Unlike QEMU (`hw/virtio/virtio-iommu.c`, `virtio_iommu_attach()`), the failing
    // ATTACH did not detach EP2 first.
    assert_eq!(dev.endpoint_domain(EndpointId(EP2)), Some(DomainId(2)));
    assert_eq!(read_ok(&dev, EP2, 0x10), Some(0x5010));
    send_all(
        &mut g,
        &mut dev,
        &[attach_f(3, EP1, VIRTIO_IOMMU_ATTACH_F_BYPASS)],
    );
    assert_eq!(g.send(&mut dev, &attach(3, EP2)), Status::Inval);
}

#[test]
fn dev_att_6_attach_elsewhere_detaches_first_and_old_domain_dies() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, RW)],
    );
    assert_eq!(read_ok(&dev, EP1, 0), Some(0x5000));
    send_all(&mut g, &mut dev, &[attach(2, EP1)]);
    assert_eq!(
        read_ok(&dev, EP1, 0),
        None,
        "old domain's mapping gone from the IOTLB"
    );
    let c = dev.counters();
    assert_eq!(
        (c.domains, c.mappings),
        (1, 0),
        "domain 1 ceased to exist with its mappings"
    );
    assert_eq!(g.send(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::NoEnt);
}

#[test]
fn dev_att_7_incompatible_reserved_regions_are_s_unsupp() {
    let mut cfg = config();
    cfg.endpoints[1].reserved.push(ReservedRegion {
        start: Iova(0x10_0000),
        end: Iova(0x1f_ffff),
        kind: ResvKind::Reserved,
    });
    let (mut dev, mut g) = setup_with(&cfg);
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0x10_0000, 0x10_0fff, 0x5000, RW)],
    );
    assert_eq!(g.send(&mut dev, &attach(1, EP2)), Status::Unsupp);
    assert_eq!(dev.endpoint_domain(EndpointId(EP2)), None);
    // A domain whose mappings avoid the region is compatible.
    send_all(&mut g, &mut dev, &[attach(2, EP1), attach(2, EP2)]);
}

#[test]
fn dev_att_8_a_request_not_rejected_attaches_the_endpoint() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(7, EP1)]);
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), Some(DomainId(7)));
    // Re-attaching to the same domain is a successful no-op.
    send_all(&mut g, &mut dev, &[attach(7, EP1)]);
    assert_eq!(dev.counters().domains, 1);
}

#[test]
fn ranges_bind_only_when_their_feature_was_negotiated() {
    let cfg = IommuConfig {
        domain_range: 1..=10,
        ..config()
    };
    let (mut dev, mut g) = setup_with(&cfg);
    dev.set_acked_features(
        DEVICE_FEATURES & !(1 << VIRTIO_IOMMU_F_INPUT_RANGE) & !(1 << VIRTIO_IOMMU_F_DOMAIN_RANGE),
    );
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(0, EP1),
            map(0, 1 << 48, (1 << 48) + 0xfff, 0x5000, RW),
        ],
    );
    assert_eq!(read_ok(&dev, EP1, 1 << 48), Some(0x5000));
}

#[test]
fn attach_outside_domain_range_is_s_range() {
    let cfg = IommuConfig {
        domain_range: 1..=10,
        ..config()
    };
    let (mut dev, mut g) = setup_with(&cfg);
    assert_eq!(g.send(&mut dev, &attach(0, EP1)), Status::Range);
    assert_eq!(g.send(&mut dev, &attach(11, EP1)), Status::Range);
    assert_eq!(g.send(&mut dev, &attach(10, EP1)), Status::Ok);
}

// ---------------------------------------------------------------------------
// DETACH
// ---------------------------------------------------------------------------

#[test]
fn dev_det_1_reserved_is_ignored() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    let mut bytes = request::encode(&detach(1, EP1));
    bytes[12..20].copy_from_slice(&[0xff; 8]);
    let (used, buf) = raw(&mut g, &mut dev, &bytes, 4);
    assert_eq!((used, buf[0]), (4, Status::Ok as u8));
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), None);
}

#[test]
fn dev_det_2_unknown_endpoint_is_s_noent() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.send(&mut dev, &detach(1, 55)), Status::NoEnt);
}

#[test]
fn dev_det_3_wrong_or_missing_domain_is_s_inval() {
    let (mut dev, mut g) = setup();
    assert_eq!(
        g.send(&mut dev, &detach(1, EP1)),
        Status::Inval,
        "not attached"
    );
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    assert_eq!(
        g.send(&mut dev, &detach(2, EP1)),
        Status::Inval,
        "other domain"
    );
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), Some(DomainId(1)));
}

#[test]
fn dev_det_4_detached_endpoint_reaches_no_mapping_of_the_domain() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), attach(1, EP2), map(1, 0, 0xfff, 0x5000, RW)],
    );
    assert_eq!(read_ok(&dev, EP1, 0), Some(0x5000));
    send_all(&mut g, &mut dev, &[detach(1, EP1)]);
    assert_eq!(read_ok(&dev, EP1, 0), None);
    assert_eq!(
        read_ok(&dev, EP2, 0),
        Some(0x5000),
        "the domain lives on with EP2"
    );
    send_all(&mut g, &mut dev, &[detach(1, EP2)]);
    assert_eq!(dev.counters().domains, 0, "last DETACH destroys the domain");
    // With bypass on, a detached endpoint bypasses (spec, DETACH informative text).
    dev.write_config(36, &[1]).unwrap();
    assert_eq!(read_ok(&dev, EP1, 0x3000), Some(0x3000));
}

// ---------------------------------------------------------------------------
// MAP
// ---------------------------------------------------------------------------

#[test]
fn dev_map_1_misalignment_is_s_range() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    for r in [
        map(1, 0x800, 0x17ff, 0x5000, RW),  // virt_start
        map(1, 0x1000, 0x1fff, 0x5800, RW), // phys_start
        map(1, 0x1000, 0x27fe, 0x5000, RW), // virt_end + 1
    ] {
        assert_eq!(g.send(&mut dev, &r), Status::Range, "{r:?}");
    }
    assert_eq!(dev.counters().mappings, 0);
    // A larger page-size hint bit does not change the granule.
    send_all(&mut g, &mut dev, &[map(1, 0x1000, 0x2fff, 0x5000, RW)]);
}

#[test]
fn dev_map_2_overlap_is_s_inval() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0x4000, 0x7fff, 0x10_0000, RW)],
    );
    for (s, e) in [
        (0x4000, 0x7fff),
        (0x3000, 0x4fff),
        (0x7000, 0x8fff),
        (0x5000, 0x5fff),
        (0, 0xffff),
    ] {
        assert_eq!(
            g.send(&mut dev, &map(1, s, e, 0x20_0000, RW)),
            Status::Inval,
            "{s:#x}..={e:#x}"
        );
    }
    send_all(
        &mut g,
        &mut dev,
        &[map(1, 0x3000, 0x3fff, 0, RW), map(1, 0x8000, 0x8fff, 0, RW)],
    );
    assert_eq!(dev.counters().mappings, 3);
}

#[test]
fn dev_map_3_unknown_flags_are_s_inval_and_mmio_needs_f_mmio() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    assert_eq!(
        g.send(&mut dev, &map(1, 0, 0xfff, 0, RW | 8)),
        Status::Inval
    );
    assert_eq!(
        g.send(&mut dev, &map(1, 0, 0xfff, 0, 1 << 31)),
        Status::Inval
    );
    send_all(
        &mut g,
        &mut dev,
        &[map(1, 0, 0xfff, 0xfe00_0000, W | VIRTIO_IOMMU_MAP_F_MMIO)],
    );
    dev.set_acked_features(DEVICE_FEATURES & !(1 << VIRTIO_IOMMU_F_MMIO));
    assert_eq!(
        g.send(
            &mut dev,
            &map(1, 0x1000, 0x1fff, 0, R | VIRTIO_IOMMU_MAP_F_MMIO)
        ),
        Status::Inval
    );
}

#[test]
fn dev_map_4_missing_domain_is_s_noent() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.send(&mut dev, &map(9, 0, 0xfff, 0, RW)), Status::NoEnt);
}

#[test]
fn dev_map_5_bypass_domain_is_s_inval() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach_f(1, EP1, VIRTIO_IOMMU_ATTACH_F_BYPASS)],
    );
    assert_eq!(g.send(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::Inval);
    assert_eq!(
        read_ok(&dev, EP1, 0x2000),
        Some(0x2000),
        "bypass domain is identity"
    );
}

#[test]
fn dev_map_6_rights_are_enforced_and_write_only_stays_write_only() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            map(1, 0x1000, 0x1fff, 0x10_0000, R),
            map(1, 0x2000, 0x2fff, 0x20_0000, W),
            map(1, 0x3000, 0x3fff, 0x30_0000, 0),
        ],
    );
    assert_eq!(tr(&dev, EP1, 0x1000, 8, Permissions::Read), Some(0x10_0000));
    assert_eq!(
        tr(&dev, EP1, 0x1000, 8, Permissions::Write),
        None,
        "read-only"
    );
    assert_eq!(
        tr(&dev, EP1, 0x2000, 8, Permissions::Write),
        Some(0x20_0000)
    );
    assert_eq!(
        tr(&dev, EP1, 0x2000, 8, Permissions::Read),
        None,
        "write-only"
    );
    assert_eq!(
        tr(&dev, EP1, 0x3000, 8, Permissions::Read),
        None,
        "no rights"
    );
    assert_eq!(
        tr(&dev, EP1, 0x1ff8, 16, Permissions::Read),
        None,
        "spans into write-only"
    );
}

#[test]
fn map_inverted_range_is_s_inval_and_outside_input_range_is_s_range() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    assert_eq!(
        g.send(&mut dev, &map(1, 0x2000, 0x0fff, 0, RW)),
        Status::Inval
    );
    assert_eq!(
        g.send(&mut dev, &map(1, 1 << 48, (1 << 48) + 0xfff, 0, RW)),
        Status::Range
    );
    assert_eq!(
        g.send(&mut dev, &map(1, 0, 0xfff, u64::MAX - 0xfff + 1, RW)),
        Status::Range,
        "phys wraps"
    );
    assert_eq!(dev.counters().mappings, 0);
}

// ---------------------------------------------------------------------------
// UNMAP
// ---------------------------------------------------------------------------

#[test]
fn dev_unm_1_nonzero_reserved_is_s_inval_and_unmaps_nothing() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, RW)],
    );
    let r = Request::Unmap {
        domain: DomainId(1),
        virt_start: Iova(0),
        virt_end: Iova(0xfff),
        reserved_nonzero: true,
    };
    assert_eq!(g.send(&mut dev, &r), Status::Inval);
    assert_eq!(read_ok(&dev, EP1, 0), Some(0x5000));
}

#[test]
fn dev_unm_2_missing_domain_is_s_noent() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.send(&mut dev, &unmap(3, 0, 0xfff)), Status::NoEnt);
}

#[test]
fn dev_unm_3_bypass_domain_is_s_inval() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach_f(1, EP1, VIRTIO_IOMMU_ATTACH_F_BYPASS)],
    );
    assert_eq!(g.send(&mut dev, &unmap(1, 0, 0xfff)), Status::Inval);
}

#[test]
fn dev_unm_4_split_is_all_or_nothing() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            map(1, 0, 5 * PAGE - 1, 0x10_0000, RW),
            map(1, 5 * PAGE, 10 * PAGE - 1, 0x20_0000, RW),
            map(1, 10 * PAGE, 20 * PAGE - 1, 0x30_0000, RW),
        ],
    );
    // Fully covers a and b but splits c: QEMU removes a and b anyway
    // (`hw/virtio/virtio-iommu.c`, `virtio_iommu_unmap()`).
    assert_eq!(g.send(&mut dev, &unmap(1, 0, 15 * PAGE - 1)), Status::Range);
    // Splits a at its start side.
    assert_eq!(
        g.send(&mut dev, &unmap(1, PAGE, 10 * PAGE - 1)),
        Status::Range
    );
    assert_eq!(dev.counters().mappings, 3);
    for iova in [0, 5 * PAGE, 10 * PAGE] {
        assert!(read_ok(&dev, EP1, iova).is_some(), "{iova:#x} still mapped");
    }
}

#[test]
fn dev_unm_5_unmapped_parts_are_fine_and_every_covered_mapping_goes() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            map(1, 2 * PAGE, 3 * PAGE - 1, 0x10_0000, RW),
            map(1, 6 * PAGE, 8 * PAGE - 1, 0x20_0000, RW),
            map(1, 20 * PAGE, 21 * PAGE - 1, 0x30_0000, RW),
        ],
    );
    send_all(&mut g, &mut dev, &[unmap(1, 0, 10 * PAGE - 1)]);
    assert_eq!(read_ok(&dev, EP1, 2 * PAGE), None);
    assert_eq!(read_ok(&dev, EP1, 6 * PAGE), None);
    assert_eq!(read_ok(&dev, EP1, 20 * PAGE), Some(0x30_0000));
    assert_eq!(dev.counters().mappings, 1);
}

/// The seven UNMAP examples of the spec (virtio v1.3 §5.13.6.6), each from an empty
/// address space; `scale` 1 runs them literally at byte granule, 4096 at page granule.
fn unmap_examples(scale: u64, mask: u64) {
    let s = |a: u64| a * scale;
    let e = |a: u64| (a + 1) * scale - 1;
    type Case = (&'static [(u64, u64)], (u64, u64), Status, &'static [usize]);
    let cases: [Case; 7] = [
        (&[], (0, 4), Status::Ok, &[]),
        (&[(0, 9)], (0, 9), Status::Ok, &[0]),
        (&[(0, 4), (5, 9)], (0, 9), Status::Ok, &[0, 1]),
        (&[(0, 9)], (0, 4), Status::Range, &[]),
        (&[(0, 4), (5, 9)], (0, 4), Status::Ok, &[0]),
        (&[(0, 4)], (0, 9), Status::Ok, &[0]),
        (&[(0, 4), (10, 14)], (0, 14), Status::Ok, &[0, 1]),
    ];
    for (n, (maps, (us, ue), status, removed)) in cases.iter().enumerate() {
        let cfg = IommuConfig {
            page_size_mask: mask,
            ..config()
        };
        let (mut dev, mut g) = setup_with(&cfg);
        send_all(&mut g, &mut dev, &[attach(1, EP1)]);
        for &(ms, me) in maps.iter() {
            send_all(
                &mut g,
                &mut dev,
                &[map(1, s(ms), e(me), 0x10_0000 + s(ms), RW)],
            );
        }
        assert_eq!(
            g.send(&mut dev, &unmap(1, s(*us), e(*ue))),
            *status,
            "example {}",
            n + 1
        );
        for (i, &(ms, _)) in maps.iter().enumerate() {
            let still = tr(&dev, EP1, s(ms), 1, Permissions::Read).is_some();
            assert_eq!(
                still,
                !removed.contains(&i),
                "example {}: mapping {i}",
                n + 1
            );
        }
    }
}

#[test]
fn dev_unm_spec_examples_at_byte_granule() {
    unmap_examples(1, !0);
}

#[test]
fn dev_unm_spec_examples_scaled_by_4k() {
    unmap_examples(PAGE, !0xfff);
}

// ---------------------------------------------------------------------------
// PROBE and RESV_MEM
// ---------------------------------------------------------------------------

fn resv_cfg() -> IommuConfig {
    let mut cfg = config();
    cfg.endpoints[0].reserved.push(ReservedRegion {
        start: Iova(0x1_0000_0000),
        end: Iova(0x1_0000_ffff),
        kind: ResvKind::Reserved,
    });
    cfg
}

/// Parses a property list as Linux does (`viommu_probe_endpoint()` in
/// `drivers/iommu/virtio-iommu.c`); returns (type, length, body).
fn parse_props(props: &[u8]) -> Vec<(u16, u16, Vec<u8>)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= props.len() {
        let t = u16::from_le_bytes([props[off], props[off + 1]]);
        let len = u16::from_le_bytes([props[off + 2], props[off + 3]]);
        if t & 0xfff == VIRTIO_IOMMU_PROBE_T_NONE {
            break;
        }
        out.push((t, len, props[off + 4..off + 4 + usize::from(len)].to_vec()));
        off += 4 + usize::from(len);
    }
    out
}

#[test]
fn dev_prb_1_request_reserved_is_ignored() {
    let (mut dev, mut g) = setup_with(&config());
    let mut bytes = request::encode(&Request::Probe {
        endpoint: EndpointId(EP1),
    });
    bytes[8..72].fill(0xee);
    let (used, buf) = raw(&mut g, &mut dev, &bytes, 516);
    assert_eq!(used, 516);
    assert_eq!(buf[512], Status::Ok as u8);
}

#[test]
fn dev_prb_2_unknown_endpoint_is_s_noent() {
    let (mut dev, mut g) = setup();
    assert_eq!(g.probe(&mut dev, 1234).0, Status::NoEnt);
}

#[test]
fn dev_prb_3_probe_is_always_offered_so_probe_is_always_answered() {
    // The statement covers devices that do not offer PROBE; this one always does.
    assert_ne!(DEVICE_FEATURES & (1 << VIRTIO_IOMMU_F_PROBE), 0);
    let (mut dev, mut g) = setup();
    assert_eq!(g.probe(&mut dev, EP1).0, Status::Ok);
}

/// The RESV_MEM body (virtio 1.3 §5.13.6.8.2 `struct virtio_iommu_probe_resv_mem`
/// after its header): subtype, 3 reserved bytes, `start`, `end`.
const RESV_MEM_BODY: u16 = 1 + 3 + 8 + 8;

/// The `start`..=`end` pair a RESV_MEM property at `at` carries, read by raw offset.
fn resv_at(props: &[u8], at: usize) -> (u64, u64) {
    let le = |o: usize| u64::from_le_bytes(props[o..o + 8].try_into().expect("8 bytes"));
    (le(at + 8), le(at + 16))
}

#[test]
fn dev_prb_4_property_type_reserved_bits_are_zero() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (status, props) = g.probe(&mut dev, EP1);
    assert_eq!(status, Status::Ok);
    let parsed = parse_props(&props);
    assert_eq!(parsed.len(), 2);
    for (t, _, _) in &parsed {
        assert_eq!(*t, VIRTIO_IOMMU_PROBE_T_RESV_MEM, "reserved type bits zero");
    }
}

#[test]
fn dev_prb_5_property_length_counts_the_body_not_the_header() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (_, props) = g.probe(&mut dev, EP1);
    // The first property's own length field: the body only, 20, never 24.
    assert_eq!(u16::from_le_bytes([props[2], props[3]]), RESV_MEM_BODY);
    // Read with that length as the body size, the body ends on a real `end` field:
    // one of the two regions this endpoint has (the configured one, or the MSI window).
    let (start, end) = resv_at(&props, 0);
    assert!(
        (start, end) == (0x1_0000_0000, 0x1_0000_ffff)
            || (start, end) == (0xfee0_0000, 0xfeef_ffff),
        "{start:#x}-{end:#x}"
    );
}

#[test]
fn dev_prb_6_next_property_starts_exactly_length_plus_4_after() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (_, props) = g.probe(&mut dev, EP1);
    let first_len = usize::from(u16::from_le_bytes([props[2], props[3]]));
    let second = first_len + 4;
    assert_eq!(second, 24);
    assert_eq!(
        u16::from_le_bytes([props[second], props[second + 1]]),
        VIRTIO_IOMMU_PROBE_T_RESV_MEM,
        "a property header exactly length + 4 bytes on"
    );
    // Both regions are there, one at 0 and one at length + 4, nothing in between.
    let mut got = [resv_at(&props, 0), resv_at(&props, second)];
    got.sort();
    assert_eq!(
        got,
        [(0xfee0_0000, 0xfeef_ffff), (0x1_0000_0000, 0x1_0000_ffff)]
    );
    // After the second, length + 4 on again, the list ends (type NONE).
    let third =
        second + usize::from(u16::from_le_bytes([props[second + 2], props[second + 3]])) + 4;
    assert_eq!(
        u16::from_le_bytes([props[third], props[third + 1]]),
        VIRTIO_IOMMU_PROBE_T_NONE
    );
}

#[test]
fn dev_prb_7_short_properties_buffer_is_s_inval_without_properties() {
    let (mut dev, mut g) = setup();
    let bytes = request::encode(&Request::Probe {
        endpoint: EndpointId(EP1),
    });
    let (used, buf) = raw(&mut g, &mut dev, &bytes, 100);
    assert_eq!(used, 100);
    assert_eq!(&buf[96..], &[Status::Inval as u8, 0, 0, 0]);
    assert!(buf[..96].iter().all(|&b| b == 0), "no property written");
}

#[test]
fn dev_prb_8_unused_properties_are_zero_filled() {
    let (mut dev, mut g) = setup();
    let bytes = request::encode(&Request::Probe {
        endpoint: EndpointId(EP1),
    });
    let (used, buf) = raw(&mut g, &mut dev, &bytes, 516);
    assert_eq!(used, 516);
    assert!(
        buf[24..512].iter().all(|&b| b == 0),
        "0xAA prefill overwritten by zeros"
    );
}

#[test]
fn dev_resv_1_property_reserved_bytes_are_zero() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (_, props) = g.probe(&mut dev, EP1);
    for (_, _, body) in parse_props(&props) {
        assert_eq!(&body[1..4], &[0, 0, 0]);
    }
}

#[test]
fn dev_resv_2_exactly_one_msi_region_the_x86_doorbell() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (_, props) = g.probe(&mut dev, EP1);
    let msi: Vec<_> = parse_props(&props)
        .into_iter()
        .filter(|(_, _, b)| b[0] == VIRTIO_IOMMU_RESV_MEM_T_MSI)
        .collect();
    assert_eq!(msi.len(), 1);
    let b = &msi[0].2;
    assert_eq!(
        u64::from_le_bytes(b[4..12].try_into().unwrap()),
        0xfee0_0000
    );
    assert_eq!(
        u64::from_le_bytes(b[12..20].try_into().unwrap()),
        0xfeef_ffff
    );
}

#[test]
fn dev_resv_3_regions_of_an_endpoint_do_not_overlap() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    let (_, props) = g.probe(&mut dev, EP1);
    let mut ranges: Vec<(u64, u64)> = parse_props(&props)
        .iter()
        .map(|(_, _, b)| {
            (
                u64::from_le_bytes(b[4..12].try_into().unwrap()),
                u64::from_le_bytes(b[12..20].try_into().unwrap()),
            )
        })
        .collect();
    ranges.sort();
    assert!(ranges.windows(2).all(|w| w[0].1 < w[1].0));
    // And a configuration that would overlap is refused up front.
    let mut bad = resv_cfg();
    bad.endpoints[0].reserved.push(ReservedRegion {
        start: Iova(0xfee0_1000),
        end: Iova(0xfee0_1fff),
        kind: ResvKind::Reserved,
    });
    assert!(VirtioIommu::new(&bad).is_err());
}

#[test]
fn dev_resv_4_map_over_a_reserved_region_is_refused() {
    let (mut dev, mut g) = setup_with(&resv_cfg());
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    assert_eq!(
        g.send(&mut dev, &map(1, 0xfee0_0000, 0xfee0_0fff, 0xfee0_0000, W)),
        Status::Inval
    );
    assert_eq!(
        g.send(&mut dev, &map(1, 0xfed0_0000, 0xfeff_ffff, 0, RW)),
        Status::Inval,
        "covers MSI"
    );
    assert_eq!(
        g.send(&mut dev, &map(1, 0x1_0000_f000, 0x1_0001_0fff, 0, RW)),
        Status::Inval
    );
    assert_eq!(dev.counters().mappings, 0);
}

#[test]
fn dev_resv_5_reserved_region_accesses_only_fault_to_the_driver() {
    let mut cfg = config();
    cfg.endpoints[0].reserved.push(ReservedRegion {
        start: Iova(FREE_RAM),
        end: Iova(FREE_RAM + 0xfff),
        kind: ResvKind::Reserved,
    });
    let (mut dev, mut g) = setup_with(&cfg); // bypass = 1: identity elsewhere
    g.mem
        .write_obj(0x1122_3344_u32, GuestAddress(FREE_RAM))
        .unwrap();
    let mem = IommuMemory::new(
        g.mem.clone(),
        dev.endpoint_iommu(EndpointId(EP1)).unwrap(),
        true,
        (),
    );
    assert!(mem.write_obj(0u32, GuestAddress(FREE_RAM)).is_err());
    assert_eq!(
        g.mem.read_obj::<u32>(GuestAddress(FREE_RAM)).unwrap(),
        0x1122_3344,
        "RAM untouched"
    );
    assert!(
        mem.read_obj::<u32>(GuestAddress(FREE_RAM + 0x1000)).is_ok(),
        "identity right after it"
    );
    g.post_event_buffers(4, 24);
    let events = g.take_events(&mut dev);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].1.reason, VIRTIO_IOMMU_FAULT_R_MAPPING);
    assert_eq!(events[0].1.endpoint.get(), EP1);
}

// ---------------------------------------------------------------------------
// Fault reporting
// ---------------------------------------------------------------------------

#[test]
fn fault_reasons_domain_and_mapping_with_access_flags_and_address() {
    let (mut dev, mut g) = setup();
    g.post_event_buffers(8, 24);
    assert_eq!(read_ok(&dev, EP1, 0x1234), None);
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, R)],
    );
    assert_eq!(tr(&dev, EP1, 0x10, 4, Permissions::Write), None);
    assert_eq!(read_ok(&dev, EP1, 0x9000), None);
    let ev = g.take_events(&mut dev);
    let got: Vec<(u32, u8, u32, u64)> = ev
        .iter()
        .map(|(len, e)| (*len, e.reason, e.flags.get(), e.address.get()))
        .collect();
    let a = VIRTIO_IOMMU_FAULT_F_ADDRESS;
    assert_eq!(
        got,
        vec![
            (
                24,
                VIRTIO_IOMMU_FAULT_R_DOMAIN,
                a | VIRTIO_IOMMU_FAULT_F_READ,
                0x1234
            ),
            (
                24,
                VIRTIO_IOMMU_FAULT_R_MAPPING,
                a | VIRTIO_IOMMU_FAULT_F_WRITE,
                0x10
            ),
            (
                24,
                VIRTIO_IOMMU_FAULT_R_MAPPING,
                a | VIRTIO_IOMMU_FAULT_F_READ,
                0x9000
            ),
        ]
    );
    assert_eq!(dev.counters().faults_delivered, 3);
}

#[test]
fn dev_flt_1_reserved_fields_are_zero() {
    let (mut dev, mut g) = setup();
    g.post_event_buffers(1, 24);
    read_ok(&dev, EP2, 0x42);
    let (_, e) = g.take_events(&mut dev).pop().expect("one event");
    assert_eq!(e.reserved, [0; 3]);
    assert_eq!(e.reserved1, [0; 4]);
    assert_eq!(e.flags.get() & !0x103, 0, "no undefined flag");
}

#[test]
fn dev_flt_2_the_endpoint_id_is_the_faulting_one() {
    let (mut dev, mut g) = setup();
    g.post_event_buffers(2, 24);
    read_ok(&dev, EP2, 0);
    read_ok(&dev, EP1, 0);
    let ids: Vec<u32> = g
        .take_events(&mut dev)
        .iter()
        .map(|(_, e)| e.endpoint.get())
        .collect();
    assert_eq!(ids, vec![EP2, EP1]);
}

#[test]
fn dev_flt_3_address_is_always_given() {
    let (mut dev, mut g) = setup();
    g.post_event_buffers(1, 24);
    read_ok(&dev, EP1, 0xabc000);
    let (_, e) = g.take_events(&mut dev).pop().expect("one event");
    assert_ne!(e.flags.get() & VIRTIO_IOMMU_FAULT_F_ADDRESS, 0);
    assert_eq!(e.address.get(), 0xabc000);
}

#[test]
fn dev_flt_4_small_buffer_is_not_split_and_event_is_dropped_and_counted() {
    let (mut dev, mut g) = setup();
    g.post_event_buffers(1, 16);
    read_ok(&dev, EP1, 0);
    let ev = g.take_events(&mut dev);
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, 0, "returned unused");
    let c = dev.counters();
    assert_eq!((c.faults_delivered, c.faults_dropped), (0, 1));
}

#[test]
fn faults_without_a_posted_buffer_are_dropped_and_counted() {
    let (mut dev, mut g) = setup();
    read_ok(&dev, EP1, 0);
    read_ok(&dev, EP1, 0x1000);
    assert_eq!(dev.pending_faults(), 2);
    assert!(g.take_events(&mut dev).is_empty());
    let c = dev.counters();
    assert_eq!(
        (c.faults_raised, c.faults_dropped, dev.pending_faults()),
        (2, 2, 0)
    );
}

#[test]
fn fault_flood_is_bounded_by_max_pending_faults() {
    let mut cfg = config();
    cfg.limits.max_pending_faults = 4;
    let (mut dev, _) = setup_with(&cfg);
    dev.write_config(36, &[0]).unwrap();
    for i in 0..100 {
        read_ok(&dev, EP1, i * PAGE);
    }
    assert_eq!(dev.pending_faults(), 4);
    assert_eq!(dev.counters().faults_dropped, 96);
}

#[test]
fn fault_notifier_runs_when_a_fault_is_queued() {
    let (dev, _) = setup();
    let hits = Arc::new(Mutex::new(0));
    let h = Arc::clone(&hits);
    dev.set_fault_notifier(Arc::new(move || *h.lock().unwrap() += 1));
    read_ok(&dev, EP1, 0);
    assert_eq!(*hits.lock().unwrap(), 1);
}

// ---------------------------------------------------------------------------
// Limits, reset, translation contract, subscribers
// ---------------------------------------------------------------------------

#[test]
fn mapping_and_domain_floods_are_s_nomem_and_bounded() {
    let mut cfg = config();
    cfg.limits.max_mappings_per_domain = 8;
    cfg.limits.max_total_mappings = 12;
    cfg.limits.max_domains = 1;
    let (mut dev, mut g) = setup_with(&cfg);
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    assert_eq!(
        g.send(&mut dev, &attach(2, EP2)),
        Status::NoMem,
        "second domain"
    );
    // Moving the sole endpoint to a new domain frees its old one: allowed.
    send_all(&mut g, &mut dev, &[attach(3, EP1), attach(3, EP2)]);
    let mut statuses = Vec::new();
    for i in 0..100 {
        statuses.push(g.send(&mut dev, &map(3, i * PAGE, (i + 1) * PAGE - 1, 0, RW)));
    }
    assert_eq!(statuses.iter().filter(|s| **s == Status::Ok).count(), 8);
    assert!(statuses[8..].iter().all(|s| *s == Status::NoMem));
    assert_eq!(dev.counters().mappings, 8);
}

#[test]
fn device_reset_detaches_everything_and_invalidates_every_iotlb() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), attach(2, EP2), map(1, 0, 0xfff, 0x5000, RW)],
    );
    assert_eq!(read_ok(&dev, EP1, 0), Some(0x5000));
    dev.reset();
    assert_eq!(read_ok(&dev, EP1, 0), None);
    let c = dev.counters();
    assert_eq!((c.domains, c.mappings), (0, 0));
    assert_eq!(dev.endpoint_domain(EndpointId(EP1)), None);
    assert_eq!(
        dev.acked_features(),
        0,
        "features are renegotiated after reset"
    );
}

#[test]
fn strict_unmap_no_access_after_s_ok_uses_the_old_mapping() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, RW)],
    );
    let iommu = dev.endpoint_iommu(EndpointId(EP1)).unwrap();
    let unmapped = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&unmapped);
    let backend = std::thread::spawn(move || {
        let mut stale = 0u32;
        for _ in 0..200_000 {
            let after = flag.load(Ordering::Acquire);
            let ok = iommu
                .translate(GuestAddress(0x10), 8, Permissions::Read)
                .is_ok();
            if after && ok {
                stale += 1;
            }
            if after {
                break;
            }
        }
        stale
    });
    std::thread::sleep(std::time::Duration::from_millis(5));
    assert_eq!(g.send(&mut dev, &unmap(1, 0, 0xfff)), Status::Ok);
    unmapped.store(true, Ordering::Release);
    assert_eq!(
        backend.join().unwrap(),
        0,
        "a translation that started after S_OK succeeded"
    );
}

#[test]
fn mappings_up_to_u64_max_are_accepted_and_translate_below_the_last_byte() {
    let cfg = IommuConfig {
        input_range: 0..=u64::MAX,
        ..config()
    };
    let (mut dev, mut g) = setup_with(&cfg);
    dev.write_config(36, &[0]).unwrap();
    let top = u64::MAX - 0xfff;
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, top, u64::MAX, 0x5000, RW)],
    );
    assert_eq!(read_ok(&dev, EP1, top), Some(0x5000));
    assert_eq!(
        tr(&dev, EP1, u64::MAX - 8, 8, Permissions::Read),
        Some(0x5ff7)
    );
    assert_eq!(
        tr(&dev, EP1, u64::MAX - 7, 8, Permissions::Read),
        None,
        "would end at 2^64"
    );
    send_all(&mut g, &mut dev, &[unmap(1, top, u64::MAX)]);
    assert_eq!(read_ok(&dev, EP1, top), None);
}

#[test]
fn translations_stay_exact_across_iotlb_capacity_flushes() {
    let (mut dev, mut g) = setup();
    send_all(&mut g, &mut dev, &[attach(1, EP1)]);
    let n = 3 * virtio_iommu::translate::IOTLB_ENTRIES as u64;
    for i in 0..n {
        send_all(
            &mut g,
            &mut dev,
            &[map(
                1,
                i * PAGE,
                (i + 1) * PAGE - 1,
                0x8000_0000 + 2 * i * PAGE,
                R,
            )],
        );
    }
    for round in 0..2 {
        for i in (0..n).rev() {
            assert_eq!(
                read_ok(&dev, EP1, i * PAGE + 8),
                Some(0x8000_0000 + 2 * i * PAGE + 8),
                "round {round} page {i}"
            );
        }
    }
    send_all(&mut g, &mut dev, &[unmap(1, 0, n * PAGE - 1)]);
    assert_eq!(read_ok(&dev, EP1, 8), None);
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(EndpointId, MappingEvent)>>);

impl MappingSubscriber for Recorder {
    fn on_event(&self, endpoint: EndpointId, event: &MappingEvent, _: &Settle) {
        self.0.lock().unwrap().push((endpoint, *event));
    }
}

/// A subscriber that, like an out-of-process back-end, finishes each UNMAP only when
/// the test says so.
#[derive(Default)]
struct SlowToAck(Mutex<Vec<Hold>>);

impl MappingSubscriber for SlowToAck {
    fn on_event(&self, _: EndpointId, event: &MappingEvent, settle: &Settle) {
        if matches!(event, MappingEvent::Unmapped { .. }) {
            self.0.lock().unwrap().push(settle.hold());
        }
    }
}

#[test]
fn an_unmap_a_subscriber_holds_completes_after_it_while_other_endpoints_go_on() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            attach(2, EP2),
            map(1, 0, 0xfff, 0x5000, RW),
            map(2, 0, 0xfff, 0x6000, RW),
        ],
    );
    let slow = Arc::new(SlowToAck::default());
    dev.subscribe(EndpointId(EP1), slow.clone()).unwrap();
    let woken = Arc::new(Mutex::new(0));
    let w = Arc::clone(&woken);
    dev.set_requestq_notifier(Arc::new(move || *w.lock().unwrap() += 1));

    let reqs = [unmap(1, 0, 0xfff), map(2, 0x1000, 0x1fff, 0x7000, RW)];
    let batch = g.prepare(&reqs);
    g.post(&batch);
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    // The other endpoint's MAP completed; the held UNMAP did not, but already took
    // effect in process: no new access through it, while EP2 translates on.
    assert_eq!(g.reap(), 1, "only the request nobody holds completed");
    assert_eq!(read_ok(&dev, EP1, 8), None);
    assert_eq!(read_ok(&dev, EP2, 0x1008), Some(0x7008));
    assert_eq!(*woken.lock().unwrap(), 0);
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 0, "a held request stays parked");

    std::thread::sleep(std::time::Duration::from_millis(2));
    slow.0.lock().unwrap().clear();
    assert_eq!(
        *woken.lock().unwrap(),
        1,
        "the last hold woke the request queue"
    );
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 1, "the UNMAP completed once it settled");
    assert_eq!(
        g.batch_statuses(&batch, &reqs),
        vec![Some(Status::Ok), Some(Status::Ok)]
    );
    assert_eq!(dev.counters().deferred, 1);
    assert!(
        dev.counters().parked_ns >= 2_000_000,
        "the time parked counts the wait for the hold"
    );
}

#[test]
fn a_reset_forgets_parked_requests() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, RW)],
    );
    let slow = Arc::new(SlowToAck::default());
    dev.subscribe(EndpointId(EP1), slow.clone()).unwrap();
    let batch = g.prepare(&[unmap(1, 0, 0xfff)]);
    g.post(&batch);
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 0);
    dev.reset();
    // A hold dropped after the reset completes nothing.
    slow.0.lock().unwrap().clear();
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 0);
}

#[test]
fn subscribers_see_replay_then_every_change_in_order() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0, 0xfff, 0x5000, R)],
    );
    let rec = Arc::new(Recorder::default());
    dev.subscribe(EndpointId(EP1), rec.clone()).unwrap();
    send_all(
        &mut g,
        &mut dev,
        &[
            map(1, 0x1000, 0x1fff, 0x6000, W),
            unmap(1, 0, 0xfff),
            detach(1, EP1),
        ],
    );
    dev.write_config(36, &[1]).unwrap();
    let ep = EndpointId(EP1);
    let m = |s: u64, e: u64, p: u64, perms| MappingEvent::Mapped {
        start: Iova(s),
        end: Iova(e),
        phys: Gpa(p),
        perms,
    };
    let u = |s: u64, e: u64| MappingEvent::Unmapped {
        start: Iova(s),
        end: Iova(e),
    };
    assert_eq!(
        *rec.0.lock().unwrap(),
        vec![
            (ep, m(0, 0xfff, 0x5000, Permissions::Read)),
            (ep, m(0x1000, 0x1fff, 0x6000, Permissions::Write)),
            (ep, u(0, 0xfff)),
            (ep, u(0x1000, 0x1fff)),
            (ep, MappingEvent::Identity(true)),
        ]
    );
    assert!(dev.subscribe(EndpointId(99), rec).is_err());
}

#[test]
fn peak_exposure_is_the_most_an_endpoint_could_reach_at_once() {
    // Booting with bypass = 1 would already expose everything.
    let (mut dev, mut g) = setup_with(&IommuConfig {
        boot_bypass: false,
        ..config()
    });
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            map(1, 0, 0x3fff, 0x10_0000, RW),
            unmap(1, 0, 0x3fff),
            map(1, 0, 0xfff, 0x10_0000, RW),
        ],
    );
    let c = dev.counters();
    assert_eq!(
        c.peak_exposure[0],
        (
            EndpointId(EP1),
            Exposure {
                identity: false,
                mapped_bytes: 0x4000
            }
        )
    );
    assert_eq!(
        c.peak_exposure[1].1,
        Exposure::default(),
        "EP2 never reached anything"
    );
    dev.write_config(36, &[1]).unwrap();
    assert!(
        dev.counters().peak_exposure[1].1.identity,
        "unattached EP2 entered bypass"
    );
    assert!(
        !dev.counters().peak_exposure[0].1.identity,
        "attached EP1 did not"
    );
}

#[test]
fn counters_report_requests_mappings_and_bytes_per_endpoint() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(1, EP1),
            map(1, 0, 0x1fff, 0x5000, RW),
            map(1, 0x4000, 0x4fff, 0, R),
        ],
    );
    assert_eq!(g.send(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::Inval);
    let c = dev.counters();
    assert_eq!(c.count(RequestType::Map, Status::Ok), 2);
    assert_eq!(c.count(RequestType::Map, Status::Inval), 1);
    assert_eq!(c.mappings, 2);
    assert_eq!(
        c.mapped_bytes,
        vec![(EndpointId(EP1), 0x3000), (EndpointId(EP2), 0)]
    );
}

// ---------------------------------------------------------------------------
// The sequence Linux's driver sends (drivers/iommu/virtio-iommu.c)
// ---------------------------------------------------------------------------

fn linux_probe_endpoint(g: &mut FakeGuest, dev: &mut VirtioIommu, ep: u32) -> Vec<(u8, u64, u64)> {
    let (status, props) = g.probe(dev, ep);
    assert_eq!(status, Status::Ok);
    parse_props(&props)
        .into_iter()
        .filter(|(t, len, _)| *t & 0xfff == VIRTIO_IOMMU_PROBE_T_RESV_MEM && *len >= 20)
        .map(|(_, _, b)| {
            (
                b[0],
                u64::from_le_bytes(b[4..12].try_into().unwrap()),
                u64::from_le_bytes(b[12..20].try_into().unwrap()),
            )
        })
        .collect()
}

#[test]
fn linux_driver_sequence_dma_domain_with_async_maps() {
    let (mut dev, mut g) = setup_with(&config());
    // viommu_probe: config reads, eventq filled with 24-byte buffers.
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg).unwrap();
    let first_domain = u32::from_le_bytes(cfg[24..28].try_into().unwrap()) + 1; // identity takes first
    g.post_event_buffers(64, 24);
    // viommu_probe_device: PROBE, MSI region found, so no SW-MSI mapping is needed.
    let resv = linux_probe_endpoint(&mut g, &mut dev, EP1);
    assert_eq!(
        resv,
        vec![(VIRTIO_IOMMU_RESV_MEM_T_MSI, 0xfee0_0000, 0xfeef_ffff)]
    );
    // viommu_attach_dev (synchronous), then DMA maps queued asynchronously and kicked
    // together: to-device (READ), from-device (WRITE), bidirectional (RW).
    assert_eq!(g.send(&mut dev, &attach(first_domain, EP1)), Status::Ok);
    let maps = [
        map(first_domain, 0xffff_f000, 0xffff_ffff, 0x40_0000, R),
        map(first_domain, 0xfffe_0000, 0xfffe_ffff, 0x41_0000, W),
        map(first_domain, 0xfffc_0000, 0xfffd_ffff, 0x42_0000, RW),
    ];
    let batch = g.prepare(&maps);
    g.post(&batch);
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 3);
    assert_eq!(g.batch_statuses(&batch, &maps), vec![Some(Status::Ok); 3]);
    assert_eq!(
        tr(&dev, EP1, 0xffff_f010, 8, Permissions::Read),
        Some(0x40_0010)
    );
    assert_eq!(
        tr(&dev, EP1, 0xfffe_0010, 8, Permissions::Write),
        Some(0x41_0010)
    );
    assert_eq!(
        tr(&dev, EP1, 0xfffc_1000, 8, Permissions::ReadWrite),
        Some(0x42_1000)
    );
    // viommu_unmap_pages: whole mappings, queued lazily then synced.
    let unmaps = [
        unmap(first_domain, 0xffff_f000, 0xffff_ffff),
        unmap(first_domain, 0xfffc_0000, 0xfffd_ffff),
    ];
    let batch = g.prepare(&unmaps);
    g.post(&batch);
    dev.process_requestq(&mut g.requestq, &g.mem).unwrap();
    assert_eq!(g.reap(), 2);
    assert_eq!(g.batch_statuses(&batch, &unmaps), vec![Some(Status::Ok); 2]);
    assert_eq!(tr(&dev, EP1, 0xffff_f010, 8, Permissions::Read), None);
    assert_eq!(
        tr(&dev, EP1, 0xfffe_0010, 8, Permissions::Write),
        Some(0x41_0010)
    );
    // viommu_release_device.
    assert_eq!(g.send(&mut dev, &detach(first_domain, EP1)), Status::Ok);
    let events = g.take_events(&mut dev);
    assert_eq!(events.len(), 1, "only the probe after UNMAP faulted");
    assert_eq!(events[0].1.address.get(), 0xffff_f010);
}

#[test]
fn linux_driver_sequence_identity_domain_with_bypass_config() {
    let (mut dev, mut g) = setup();
    linux_probe_endpoint(&mut g, &mut dev, EP1);
    // identity_domain_id = first_domain = 0, attached with ATTACH_F_BYPASS.
    assert_eq!(
        g.send(&mut dev, &attach_f(0, EP1, VIRTIO_IOMMU_ATTACH_F_BYPASS)),
        Status::Ok
    );
    assert_eq!(read_ok(&dev, EP1, 0x1234_5000), Some(0x1234_5000));
    assert_eq!(read_ok(&dev, EP2, 0x1234_5000), None, "EP2 still isolated");
    assert_eq!(
        read_ok(&dev, EP1, 0xfee0_0000),
        None,
        "the doorbell is not memory"
    );
}

#[test]
fn linux_driver_sequence_identity_domain_without_bypass_config_maps_up_to_u64_max() {
    // Without BYPASS_CONFIG, viommu_domain_map_identity fills a paging domain with R|W
    // identity maps over the aperture minus reserved regions; with a 64-bit
    // input_range the top one ends at u64::MAX.
    let cfg = IommuConfig {
        input_range: 0..=u64::MAX,
        ..config()
    };
    let mut dev = VirtioIommu::new(&cfg).unwrap();
    let mut g = FakeGuest::new(cfg.probe_size);
    dev.set_acked_features(DEVICE_FEATURES & !(1 << VIRTIO_IOMMU_F_BYPASS_CONFIG));
    let resv = linux_probe_endpoint(&mut g, &mut dev, EP1);
    let (_, msi_start, msi_end) = resv[0];
    send_all(
        &mut g,
        &mut dev,
        &[
            attach(0, EP1),
            map(0, 0, msi_start - 1, 0, RW),
            map(0, msi_end + 1, u64::MAX, msi_end + 1, RW),
        ],
    );
    assert_eq!(read_ok(&dev, EP1, 0x2000), Some(0x2000));
    assert_eq!(read_ok(&dev, EP1, 0x1_0000_0000), Some(0x1_0000_0000));
    assert_eq!(read_ok(&dev, EP1, 0xfee0_0100), None);
    assert_eq!(
        read_ok(&dev, EP1, u64::MAX - 0x1000),
        Some(u64::MAX - 0x1000)
    );
}

#[test]
fn backend_through_iommu_memory_sees_only_mapped_windows() {
    let (mut dev, mut g) = setup();
    send_all(
        &mut g,
        &mut dev,
        &[attach(1, EP1), map(1, 0x1_0000, 0x1_0fff, FREE_RAM, RW)],
    );
    let mem: IommuMemory<GuestMemoryMmap<()>, _> = IommuMemory::new(
        g.mem.clone(),
        dev.endpoint_iommu(EndpointId(EP1)).unwrap(),
        true,
        (),
    );
    mem.write_obj(0xfeed_u64, GuestAddress(0x1_0008)).unwrap();
    assert_eq!(
        g.mem.read_obj::<u64>(GuestAddress(FREE_RAM + 8)).unwrap(),
        0xfeed
    );
    assert!(
        mem.read_obj::<u64>(GuestAddress(FREE_RAM)).is_err(),
        "raw GPA is not an IOVA"
    );
    assert!(
        mem.read_obj::<u64>(GuestAddress(0x1_0ffc)).is_err(),
        "crosses the window end"
    );
}
