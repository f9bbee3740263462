//! Robustness properties: whatever a guest puts in a request, a descriptor chain or a
//! config access, the device does not panic, answers with the used lengths the crate
//! documents (`src/lib.rs`, `VirtioIommu::handle_request`), and stays usable.

use proptest::prelude::*;
use std::ops::RangeInclusive;
use virtio_iommu::fake_driver::{FakeGuest, RawDesc, FREE_RAM, RAM_SIZE};
use virtio_iommu::request::encode;
use virtio_iommu::{
    decode, DecodeError, DomainId, EndpointConfig, EndpointId, IommuConfig, Iova, Request,
    RequestType, Status, VirtioIommu,
};
use vm_memory::{Bytes, GuestAddress, Iommu, Permissions};

/// Small enough that random writable lengths often fall below `probe_size + 4`.
const PROBE_SIZE: u32 = 64;
const EPS: [u32; 3] = [1, 2, 3];
const TAIL: u32 = 4;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Where the chain tests put a well-formed request and an indirect table.
const REQ_AT: u64 = 0x90_0000;
const INDIRECT_AT: u64 = 0xa0_0000;
/// Guest memory the fake driver's own rings live in; random descriptors stay out of it
/// so that the test harness, not the device, keeps its footing.
const RINGS: RangeInclusive<u64> = 0x1_0000..=0x3_ffff;

fn config() -> IommuConfig {
    IommuConfig {
        endpoints: EPS.iter().map(|&id| EndpointConfig::new(id)).collect(),
        probe_size: PROBE_SIZE,
        ..IommuConfig::default()
    }
}

fn device() -> (VirtioIommu, FakeGuest) {
    let cfg = config();
    let mut dev = VirtioIommu::new(&cfg).expect("valid config");
    let mut guest = FakeGuest::new(cfg.probe_size);
    guest.negotiate(&mut dev);
    (dev, guest)
}

// ---------------------------------------------------------------------------------------
// (a) decode
// ---------------------------------------------------------------------------------------

/// Arbitrary bytes, biased towards a known type byte and the layout sizes.
fn request_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..=256),
        (1u8..=5, prop::collection::vec(any::<u8>(), 0..=90)).prop_map(|(t, mut rest)| {
            rest.insert(0, t);
            rest
        }),
        (
            1u8..=5,
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            0usize..=80
        )
            .prop_map(|(t, a, b, c, d, len)| {
                let mut v = vec![t, 0, 0, 0];
                for x in [a, b, c, d] {
                    v.extend_from_slice(&x.to_le_bytes());
                }
                v.resize(len, 0);
                v
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    /// `decode` never panics, and what it says agrees with the bytes: a decoded request
    /// has its type's full layout and re-encodes to the same request; each error is the
    /// right one.
    #[test]
    fn prop_decode_never_panics_and_classifies_exactly(bytes in request_bytes()) {
        match decode(&bytes) {
            Ok(req) => {
                let kind = req.request_type();
                prop_assert_eq!(RequestType::from_wire(bytes[0]), Some(kind));
                prop_assert!(bytes.len() >= kind.readable_size());
                prop_assert_eq!(decode(&encode(&req)), Ok(req));
            }
            Err(DecodeError::NoHead(n)) => {
                prop_assert_eq!(n, bytes.len());
                prop_assert!(n < 4);
            }
            Err(DecodeError::UnknownType(t)) => {
                prop_assert!(bytes.len() >= 4);
                prop_assert_eq!(t, bytes[0]);
                prop_assert_eq!(RequestType::from_wire(t), None);
            }
            Err(DecodeError::Truncated { kind, needed, got }) => {
                prop_assert_eq!(RequestType::from_wire(bytes[0]), Some(kind));
                prop_assert_eq!(needed, kind.readable_size());
                prop_assert_eq!(got, bytes.len());
                prop_assert!(got < needed);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// (b) arbitrary requests through the queue
// ---------------------------------------------------------------------------------------

/// Writable lengths around every boundary: none, short of the tail, the tail, short of
/// a PROBE reply, a PROBE reply, more.
fn writable_len() -> impl Strategy<Value = u32> {
    prop_oneof![0u32..=8, PROBE_SIZE..=PROBE_SIZE + 8, 0u32..=4096,]
}

/// The used length and status the crate documents for a request whose readable part is
/// `readable` and whose writable part is `wlen` bytes: `None` for "returned unwritten,
/// used length 0"; otherwise the used length and, if the request is known to fail
/// before reaching the tables, its status.
fn documented_response(readable: &[u8], wlen: u32) -> Option<(u32, Option<Status>)> {
    // No room for the tail, no head, or an unknown type (DEV-OPS-2): used length 0.
    if wlen < TAIL || readable.len() < 4 {
        return None;
    }
    let kind = RequestType::from_wire(readable[0])?;
    let truncated = readable.len() < kind.readable_size();
    if kind == RequestType::Probe {
        let full = PROBE_SIZE + TAIL;
        if wlen < full {
            // DEV-PRB-7: S_INVAL in the last 4 bytes of the whole buffer.
            return Some((wlen, Some(Status::Inval)));
        }
        return Some((full, truncated.then_some(Status::Inval)));
    }
    Some((TAIL, truncated.then_some(Status::Inval)))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary readable bytes with arbitrary writable lengths, in sequence on one
    /// device: no panic; the used length is 0 exactly when the crate documents it, and
    /// otherwise exactly 4, `probe_size + 4`, or the whole buffer for a PROBE buffer too
    /// small; the tail holds a defined status with zeroed reserved bytes; nothing past
    /// the used length is written; a too-small PROBE buffer holds zeros before its tail.
    #[test]
    fn prop_arbitrary_requests_answer_documented_used_lengths(
        reqs in prop::collection::vec((request_bytes(), writable_len()), 1..=24),
    ) {
        let (mut dev, mut guest) = device();
        for (readable, wlen) in reqs {
            let c = guest.submit(&mut dev, &readable, wlen);
            let documented = documented_response(&readable, wlen);
            let Some((used, status)) = documented else {
                prop_assert_eq!(c.used_len, 0, "{:?} with {} writable bytes", readable, wlen);
                prop_assert!(c.written.iter().all(|&b| b == 0), "unwritten buffer was written");
                continue;
            };
            prop_assert_eq!(c.used_len, used, "{:?} with {} writable bytes", readable, wlen);
            let u = used as usize;
            let tail = &c.written[u - 4..u];
            prop_assert!(Status::ALL.get(usize::from(tail[0])).is_some(), "status {}", tail[0]);
            prop_assert_eq!(&tail[1..], &[0, 0, 0], "DEV-OPS-3: tail.reserved zeroed");
            if let Some(s) = status {
                prop_assert_eq!(tail[0], s as u8);
            }
            prop_assert!(c.written[u..].iter().all(|&b| b == 0), "written past used length");
            if readable[0] == 5 && wlen < PROBE_SIZE + TAIL {
                prop_assert!(c.written[..u - 4].iter().all(|&b| b == 0), "DEV-PRB-7");
            }
        }
        // Still answering.
        let att = Request::Attach {
            domain: DomainId(0xa11ce),
            endpoint: EndpointId(2),
            flags: 0,
            reserved_nonzero: false,
        };
        prop_assert_eq!(guest.send(&mut dev, &att), Status::Ok);
    }
}

// ---------------------------------------------------------------------------------------
// (c) arbitrary descriptor chains
// ---------------------------------------------------------------------------------------

/// Buffer addresses: the prepared request, the indirect table, free RAM, request and
/// response buffers, the very start and end of RAM, past RAM, near `u64::MAX`.
fn desc_addr() -> impl Strategy<Value = u64> {
    let ram = RAM_SIZE as u64;
    prop_oneof![
        3 => Just(REQ_AT),
        2 => Just(INDIRECT_AT),
        3 => FREE_RAM..ram,
        1 => 0x10_0000u64..0x30_0000,
        1 => 0u64..RINGS.start() - 0x400,
        1 => (ram - 0x100)..ram,
        1 => ram..(ram + 0x1_0000),
        1 => Just(1u64 << 40),
        1 => (u64::MAX - 0x100)..=u64::MAX,
        1 => any::<u64>().prop_filter("not the rings", |a| !RINGS.contains(a)),
    ]
}

fn desc_len() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..=80,
        1 => Just(4u32),
        1 => Just(PROBE_SIZE + TAIL),
        1 => (1u32..=32).prop_map(|n| n * 16),
        1 => any::<u32>(),
        1 => Just(u32::MAX),
    ]
}

fn desc_flags() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => prop::sample::select(vec![0, F_NEXT, F_WRITE, F_NEXT | F_WRITE]),
        1 => Just(F_INDIRECT),
        1 => prop::sample::select(vec![F_INDIRECT | F_NEXT, F_INDIRECT | F_WRITE]),
        1 => any::<u16>(),
    ]
}

/// `next`: mostly the descriptors the test wrote (128..), sometimes the fake driver's
/// own (0..128), sometimes out of range.
fn desc_next() -> impl Strategy<Value = u16> {
    prop_oneof![
        6 => 128u16..136,
        1 => 128u16..=255,
        1 => 0u16..128,
        1 => any::<u16>(),
    ]
}

fn raw_desc() -> impl Strategy<Value = RawDesc> {
    (desc_addr(), desc_len(), desc_flags(), desc_next()).prop_map(|(addr, len, flags, next)| {
        // An indirect table elsewhere in RAM would be read from bytes the device itself
        // wrote, which could name the fake driver's rings; keep indirect tables at
        // INDIRECT_AT (or outside RAM).
        let addr = if flags & F_INDIRECT != 0 && addr < RAM_SIZE as u64 {
            INDIRECT_AT + (addr & 1)
        } else {
            addr
        };
        RawDesc {
            addr,
            len,
            flags,
            next,
        }
    })
}

/// A readable/writable pair the way a driver would chain it, at descriptors 128/129.
fn sane_pair() -> impl Strategy<Value = Vec<RawDesc>> {
    (
        0u32..=80,
        prop_oneof![Just(4u32), Just(PROBE_SIZE + TAIL), 0u32..=600],
    )
        .prop_map(|(rlen, wlen)| {
            vec![
                RawDesc {
                    addr: REQ_AT,
                    len: rlen,
                    flags: F_NEXT,
                    next: 129,
                },
                RawDesc {
                    addr: FREE_RAM,
                    len: wlen,
                    flags: F_WRITE,
                    next: 0,
                },
            ]
        })
}

/// A well-formed request to place at [`REQ_AT`], so random chains often carry one.
fn some_request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (0u32..4, prop::sample::select(vec![1u32, 2, 3, 9]), 0u32..3).prop_map(|(d, e, f)| {
            Request::Attach {
                domain: DomainId(d),
                endpoint: EndpointId(e),
                flags: f,
                reserved_nonzero: false,
            }
        }),
        (0u32..4, 0u64..16).prop_map(|(d, p)| Request::Map {
            domain: DomainId(d),
            virt_start: Iova(p << 12),
            virt_end: Iova(((p + 1) << 12) - 1),
            phys_start: FREE_RAM,
            flags: 3,
        }),
        (0u32..4).prop_map(|d| Request::Unmap {
            domain: DomainId(d),
            virt_start: Iova(0),
            virt_end: Iova(u64::MAX),
            reserved_nonzero: false,
        }),
        prop::sample::select(vec![1u32, 9]).prop_map(|e| Request::Probe {
            endpoint: EndpointId(e)
        }),
    ]
}

fn chain_case() -> impl Strategy<Value = (Vec<RawDesc>, u16, Vec<RawDesc>, Request)> {
    (
        prop_oneof![
            3 => prop::collection::vec(raw_desc(), 1..=8),
            1 => sane_pair(),
            1 => (sane_pair(), prop::collection::vec(raw_desc(), 1..=4)).prop_map(|(mut a, b)| {
                a.extend(b);
                a
            }),
        ],
        prop_oneof![8 => Just(128u16), 1 => 128u16..136, 1 => any::<u16>()],
        prop::collection::vec(raw_desc(), 0..=8),
        some_request(),
    )
}

fn write_indirect_table(guest: &FakeGuest, table: &[RawDesc]) {
    let mut raw = Vec::with_capacity(table.len() * 16);
    for d in table {
        raw.extend_from_slice(&d.addr.to_le_bytes());
        raw.extend_from_slice(&d.len.to_le_bytes());
        raw.extend_from_slice(&d.flags.to_le_bytes());
        // Inside an indirect table, indices are into the table.
        raw.extend_from_slice(&(d.next % 8).to_le_bytes());
    }
    guest
        .mem
        .write_slice(&raw, GuestAddress(INDIRECT_AT))
        .expect("indirect table lies in RAM");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary descriptor chains (any address, in RAM or not, up to `u64::MAX`; any
    /// length; any flags, INDIRECT included, with a random indirect table; any `next`,
    /// loops included; any head): the device never panics, completes each chain it
    /// accepts with used length 0, 4, `probe_size + 4`, or a too-small PROBE buffer's
    /// length, and afterwards still answers a well-formed ATTACH with `S_OK`.
    #[test]
    fn prop_arbitrary_chains_never_panic_and_device_survives(
        cases in prop::collection::vec(chain_case(), 1..=4),
    ) {
        let (mut dev, mut guest) = device();
        for (descs, head, table, req) in cases {
            guest
                .mem
                .write_slice(&encode(&req), GuestAddress(REQ_AT))
                .expect("request lies in RAM");
            write_indirect_table(&guest, &table);
            match guest.submit_raw(&mut dev, &descs, head) {
                Ok(lens) => {
                    prop_assert!(lens.len() <= 1, "one chain posted, {} completed", lens.len());
                    for len in lens {
                        prop_assert!(
                            len == 0 || (TAIL..=PROBE_SIZE + TAIL).contains(&len),
                            "used length {}", len
                        );
                    }
                }
                // Only a head the used ring cannot name makes the queue fail.
                Err(e) => prop_assert!(head >= 256, "queue error {} for head {}", e, head),
            }
        }
        let att = Request::Attach {
            domain: DomainId(0xa11ce),
            endpoint: EndpointId(3),
            flags: 0,
            reserved_nonzero: false,
        };
        prop_assert_eq!(guest.send(&mut dev, &att), Status::Ok);
        let map = Request::Map {
            domain: DomainId(0xa11ce),
            virt_start: Iova(0x5_0000),
            virt_end: Iova(0x5_0fff),
            phys_start: FREE_RAM,
            flags: 3,
        };
        prop_assert_eq!(guest.send(&mut dev, &map), Status::Ok);
        let iommu = dev.endpoint_iommu(EndpointId(3)).expect("configured");
        let first = iommu
            .translate(GuestAddress(0x5_0010), 4, Permissions::Read)
            .ok()
            .and_then(|mut it| it.next())
            .map(|r| r.base.0);
        prop_assert_eq!(first, Some(FREE_RAM + 0x10));
    }
}

// ---------------------------------------------------------------------------------------
// (d) config space and translation requests
// ---------------------------------------------------------------------------------------

fn config_offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..=48,
        1 => Just(36u64),
        1 => any::<u64>(),
        1 => (u64::MAX - 48)..=u64::MAX,
    ]
}

#[derive(Clone, Debug)]
enum ConfigOp {
    Read(u64, usize),
    Write(u64, Vec<u8>),
    Ack(u64),
    Reset,
    SystemReset,
}

fn config_op() -> impl Strategy<Value = ConfigOp> {
    prop_oneof![
        4 => (config_offset(), 0usize..=48).prop_map(|(o, l)| ConfigOp::Read(o, l)),
        4 => (config_offset(), prop::collection::vec(any::<u8>(), 0..=48))
            .prop_map(|(o, d)| ConfigOp::Write(o, d)),
        4 => (prop::sample::select(vec![0u8, 1, 2, 0xff]))
            .prop_map(|v| ConfigOp::Write(36, vec![v])),
        1 => any::<u64>().prop_map(ConfigOp::Ack),
        1 => Just(ConfigOp::Reset),
        1 => Just(ConfigOp::SystemReset),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Arbitrary config reads and writes (any offset, any length, any data) and feature
    /// acks never panic; reads inside the 40 bytes succeed and agree with `config()`;
    /// `bypass` only ever reads 0 or 1 (DEV-CFG-4); a refused write changes nothing, an
    /// accepted one was a 1-byte write of 0 or 1 to `bypass` with BYPASS_CONFIG
    /// negotiated (DRV-CFG-1, DRV-CFG-2).
    #[test]
    fn prop_config_access_never_panics_and_bypass_reads_0_or_1(
        boot_bypass in any::<bool>(),
        ops in prop::collection::vec(config_op(), 1..=32),
    ) {
        let cfg = IommuConfig { boot_bypass, ..config() };
        let mut dev = VirtioIommu::new(&cfg).expect("valid config");
        let bypass_config = 1u64 << 6;
        for op in ops {
            let mut before = [0u8; 40];
            dev.read_config(0, &mut before).expect("the whole config reads");
            match op {
                ConfigOp::Read(offset, len) => {
                    let mut buf = vec![0xa5u8; len];
                    let r = dev.read_config(offset, &mut buf);
                    let inside = offset.checked_add(len as u64).is_some_and(|e| e <= 40);
                    prop_assert_eq!(r.is_ok(), inside);
                    if inside {
                        let o = offset as usize;
                        prop_assert_eq!(&buf[..], &before[o..o + len]);
                    } else {
                        prop_assert!(buf.iter().all(|&b| b == 0xa5), "failed read wrote");
                    }
                }
                ConfigOp::Write(offset, data) => {
                    let r = dev.write_config(offset, &data);
                    let mut after = [0u8; 40];
                    dev.read_config(0, &mut after).expect("the whole config reads");
                    let allowed = offset == 36
                        && data.len() == 1
                        && data[0] <= 1
                        && dev.acked_features() & bypass_config != 0;
                    prop_assert_eq!(r.is_ok(), allowed, "write {:?} at {}", data, offset);
                    if allowed {
                        prop_assert_eq!(after[36], data[0]);
                        prop_assert_eq!(&after[..36], &before[..36]);
                    } else {
                        prop_assert_eq!(after, before, "a refused write changed config");
                    }
                }
                ConfigOp::Ack(f) => {
                    dev.set_acked_features(f);
                    prop_assert_eq!(dev.acked_features(), f & dev.device_features());
                }
                ConfigOp::Reset => dev.reset(),
                ConfigOp::SystemReset => {
                    dev.system_reset();
                    prop_assert_eq!(dev.config().bypass, u8::from(boot_bypass));
                }
            }
            let b = dev.config().bypass;
            prop_assert!(b <= 1, "bypass reads {}", b);
            let mut one = [0xffu8];
            dev.read_config(36, &mut one).expect("bypass reads");
            prop_assert_eq!(one[0], b);
        }
    }

    /// Translation requests with any address, length (0 included, up to wrapping past
    /// 2^64) and access never panic, whatever the endpoint's state; a successful one
    /// covers exactly the requested length.
    #[test]
    fn prop_arbitrary_translations_never_panic(
        setup in prop::collection::vec(some_request(), 0..=6),
        bypass in any::<bool>(),
        probes in prop::collection::vec(
            (
                prop::sample::select(EPS.to_vec()),
                prop_oneof![
                    any::<u64>(),
                    0u64..0x2_0000,
                    (u64::MAX - 0x2000)..=u64::MAX,
                    0xfedf_f000u64..0xfef0_1000,
                ],
                prop_oneof![0usize..=0x3000, any::<usize>(), Just(usize::MAX)],
                prop::sample::select(vec![
                    Permissions::No,
                    Permissions::Read,
                    Permissions::Write,
                    Permissions::ReadWrite,
                ]),
            ),
            1..=32,
        ),
    ) {
        let (mut dev, mut guest) = device();
        dev.write_config(36, &[u8::from(bypass)]).expect("BYPASS_CONFIG negotiated");
        for req in &setup {
            guest.send(&mut dev, req);
        }
        for (ep, iova, len, access) in probes {
            let iommu = dev.endpoint_iommu(EndpointId(ep)).expect("configured");
            let total: Option<u128> = iommu
                .translate(GuestAddress(iova), len, access)
                .ok()
                .map(|it| it.map(|r| r.length as u128).sum());
            if let Some(total) = total {
                prop_assert_eq!(total, len as u128);
            }
        }
    }
}
