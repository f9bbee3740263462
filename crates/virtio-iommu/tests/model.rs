//! Model-based property tests: random sequences of requests, config writes and resets,
//! sent through the device's real queue path ([`FakeGuest::send`]), are compared after
//! every step with a small reference model written from the spec rules (virtio v1.3
//! §5.13.6 and its subsections; statement IDs in `docs/SPEC-STATEMENTS.md`) and the
//! choices the crate documents (`src/lib.rs`). After every step each endpoint's
//! `vm_memory::Iommu` is also asked to translate a few addresses, for reads and for
//! writes, and must agree with the model.
//!
//! The model is deliberately naive: a `Vec` of `(start, end, phys, flags)` per domain, a
//! map endpoint → domain, and the `bypass` byte. Where the spec leaves the order of
//! checks open, the model follows the validation order `src/state.rs` documents,
//! written out as one ordered list of rules per request (see `Model::attach` etc.).

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, EndpointIommu, IommuConfig, Iova, Limits, Request,
    ReservedRegion, ResvKind, Status, VirtioIommu, DEVICE_FEATURES,
};
use vm_memory::{GuestAddress, Iommu, Permissions};

// ---------------------------------------------------------------------------------------
// The configuration under test
// ---------------------------------------------------------------------------------------

const PAGE: u64 = 0x1000;
/// Configured endpoints; endpoint 2 has an extra RESV_MEM_T_RESERVED region on the grid.
const EPS: [u32; 3] = [1, 2, 3];
/// An endpoint ID the device does not know.
const UNKNOWN_EP: u32 = 9;
/// The x86 MSI doorbell, a RESV_MEM_T_MSI region of every endpoint.
const MSI: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// `input_range`: 32 bits, so MAPs near 4 GiB can fall outside it.
const INPUT: (u64, u64) = (0, 0xffff_ffff);
/// `domain_range`: domain IDs 0 and 4 are outside it.
const DOMAINS: (u32, u32) = (1, 3);
/// Page-granule config (4 KiB and up).
const MASK_4K: u64 = !0xfff;
/// Byte-granule config.
const MASK_BYTE: u64 = !0;

// Feature bits and flags, from the spec (virtio v1.3 §5.13.3, §5.13.6.3, §5.13.6.5), not
// from the crate.
const F_MMIO: u64 = 1 << 5;
const F_BYPASS_CONFIG: u64 = 1 << 6;
const ATTACH_F_BYPASS: u32 = 1;
const MAP_F_READ: u32 = 1;
const MAP_F_WRITE: u32 = 2;
const MAP_F_MMIO: u32 = 4;
const RESV_T_RESERVED: u8 = 0;
const RESV_T_MSI: u8 = 1;

/// The extra reserved region of endpoint 2: a whole page with a page granule, an odd
/// byte range with a byte granule.
fn extra_reserved(page_size_mask: u64) -> (u64, u64) {
    if page_size_mask & 1 != 0 {
        (0xc123, 0xc456)
    } else {
        (0xc000, 0xcfff)
    }
}

#[derive(Clone, Copy, Debug)]
struct Setup {
    page_size_mask: u64,
    boot_bypass: bool,
    /// Features the driver acks at start (a subset of what the device offers).
    features: u64,
    limits: Limits,
}

fn device_config(s: &Setup) -> IommuConfig {
    let (rs, re) = extra_reserved(s.page_size_mask);
    let endpoints = EPS
        .iter()
        .map(|&id| {
            let mut ep = EndpointConfig::new(id);
            if id == 2 {
                ep.reserved.push(ReservedRegion {
                    start: Iova(rs),
                    end: Iova(re),
                    kind: ResvKind::Reserved,
                });
            }
            ep
        })
        .collect();
    IommuConfig {
        page_size_mask: s.page_size_mask,
        input_range: INPUT.0..=INPUT.1,
        domain_range: DOMAINS.0..=DOMAINS.1,
        probe_size: 512,
        boot_bypass: s.boot_bypass,
        msi_doorbell: Some(MSI.0..=MSI.1),
        endpoints,
        limits: s.limits,
    }
}

// ---------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct M {
    start: u64,
    end: u64,
    phys: u64,
    flags: u32,
}

#[derive(Clone, Debug, Default)]
struct Dom {
    bypass: bool,
    maps: Vec<M>,
}

#[derive(Clone, Debug)]
struct Model {
    granule: u64,
    boot_bypass: bool,
    limits: Limits,
    extra: (u64, u64),
    /// The `bypass` config byte.
    bypass: bool,
    /// Negotiated features.
    features: u64,
    /// Endpoint → domain. A domain exists exactly while an endpoint is attached to it.
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, Dom>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

impl Model {
    fn new(s: &Setup) -> Self {
        // The granule is the lowest set bit of page_size_mask (virtio v1.3 §5.13.6).
        let granule = 1u64 << s.page_size_mask.trailing_zeros();
        Self {
            granule,
            boot_bypass: s.boot_bypass,
            limits: s.limits,
            extra: extra_reserved(s.page_size_mask),
            bypass: s.boot_bypass,
            features: s.features,
            attached: BTreeMap::new(),
            domains: BTreeMap::new(),
        }
    }

    fn known_ep(ep: u32) -> bool {
        EPS.contains(&ep)
    }

    /// RESV_MEM regions of an endpoint, sorted by start: `(start, end, subtype)`.
    fn reserved(&self, ep: u32) -> Vec<(u64, u64, u8)> {
        let mut r = vec![(MSI.0, MSI.1, RESV_T_MSI)];
        if ep == 2 {
            r.push((self.extra.0, self.extra.1, RESV_T_RESERVED));
        }
        r.sort();
        r
    }

    fn members(&self, domain: u32) -> Vec<u32> {
        self.attached
            .iter()
            .filter(|(_, &d)| d == domain)
            .map(|(&e, _)| e)
            .collect()
    }

    fn total_mappings(&self) -> usize {
        self.domains.values().map(|d| d.maps.len()).sum()
    }

    /// Takes `ep` out of its domain; the domain dies with its last endpoint.
    fn leave(&mut self, ep: u32) {
        if let Some(d) = self.attached.remove(&ep) {
            if self.members(d).is_empty() {
                self.domains.remove(&d);
            }
        }
    }

    fn attach(&mut self, domain: u32, ep: u32, flags: u32, reserved_nonzero: bool) -> Status {
        // DEV-ATT-1.
        if reserved_nonzero {
            return Status::Inval;
        }
        // DEV-ATT-2; ATTACH_F_BYPASS only exists with BYPASS_CONFIG negotiated.
        let known = if self.features & F_BYPASS_CONFIG != 0 {
            ATTACH_F_BYPASS
        } else {
            0
        };
        if flags & !known != 0 {
            return Status::Inval;
        }
        // DEV-ATT-3.
        if !Self::known_ep(ep) {
            return Status::NoEnt;
        }
        // DRV-OPS-4, enforced by the device.
        if domain < DOMAINS.0 || domain > DOMAINS.1 {
            return Status::Range;
        }
        let want_bypass = flags & ATTACH_F_BYPASS != 0;
        match self.domains.get(&domain) {
            Some(d) => {
                // DEV-ATT-5.
                if d.bypass != want_bypass {
                    return Status::Inval;
                }
                if self.attached.get(&ep) == Some(&domain) {
                    return Status::Ok;
                }
                // DEV-ATT-7 with DEV-RESV-4: a mapping over one of the endpoint's
                // reserved regions makes the endpoint incompatible with the domain.
                let clash = self.reserved(ep).iter().any(|&(rs, re, _)| {
                    d.maps.iter().any(|m| overlaps((rs, re), (m.start, m.end)))
                });
                if clash {
                    return Status::Unsupp;
                }
            }
            None => {
                // Domains alive after the move: those of the other endpoints, plus this.
                let others: BTreeSet<u32> = self
                    .attached
                    .iter()
                    .filter(|(&e, _)| e != ep)
                    .map(|(_, &d)| d)
                    .collect();
                if others.len() + 1 > self.limits.max_domains {
                    return Status::NoMem;
                }
            }
        }
        // DEV-ATT-6: detach from the old domain, then attach.
        self.leave(ep);
        self.domains.entry(domain).or_insert_with(|| Dom {
            bypass: want_bypass,
            maps: Vec::new(),
        });
        self.attached.insert(ep, domain);
        Status::Ok
    }

    fn detach(&mut self, domain: u32, ep: u32) -> Status {
        // DEV-DET-2.
        if !Self::known_ep(ep) {
            return Status::NoEnt;
        }
        // DEV-DET-3.
        if self.attached.get(&ep) != Some(&domain) {
            return Status::Inval;
        }
        self.leave(ep);
        Status::Ok
    }

    fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
        // DEV-MAP-3; MMIO is only a flag with F_MMIO negotiated (DRV-MAP-6).
        let mut known = MAP_F_READ | MAP_F_WRITE;
        if self.features & F_MMIO != 0 {
            known |= MAP_F_MMIO;
        }
        if flags & !known != 0 {
            return Status::Inval;
        }
        // DEV-MAP-4.
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        // DEV-MAP-5.
        if d.bypass {
            return Status::Inval;
        }
        // DRV-MAP-3 (enforced only for inverted ranges).
        if end < start {
            return Status::Inval;
        }
        // DRV-OPS-3, enforced.
        if start < INPUT.0 || end > INPUT.1 {
            return Status::Range;
        }
        // DEV-MAP-1, computed in u128 so that end + 1 = 2^64 is fine.
        let g = u128::from(self.granule);
        if u128::from(start) % g != 0 || u128::from(phys) % g != 0 || (u128::from(end) + 1) % g != 0
        {
            return Status::Range;
        }
        // The physical range must not run past 2^64.
        if u128::from(phys) + u128::from(end - start) > u128::from(u64::MAX) {
            return Status::Range;
        }
        // DEV-RESV-4 (status chosen: S_INVAL), for every endpoint of the domain.
        let members = self.members(domain);
        if members.iter().any(|&e| {
            self.reserved(e)
                .iter()
                .any(|&(rs, re, _)| overlaps((rs, re), (start, end)))
        }) {
            return Status::Inval;
        }
        // DEV-MAP-2.
        if d.maps
            .iter()
            .any(|m| overlaps((m.start, m.end), (start, end)))
        {
            return Status::Inval;
        }
        // Limits.
        if d.maps.len() >= self.limits.max_mappings_per_domain
            || self.total_mappings() >= self.limits.max_total_mappings
        {
            return Status::NoMem;
        }
        let m = M {
            start,
            end,
            phys,
            flags,
        };
        self.domains
            .get_mut(&domain)
            .expect("checked above")
            .maps
            .push(m);
        Status::Ok
    }

    fn unmap(&mut self, domain: u32, start: u64, end: u64, reserved_nonzero: bool) -> Status {
        // DEV-UNM-1 (choice: S_INVAL, nothing removed).
        if reserved_nonzero {
            return Status::Inval;
        }
        // DEV-UNM-2.
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        // DEV-UNM-3.
        if d.bypass {
            return Status::Inval;
        }
        if end < start {
            return Status::Inval;
        }
        let inside = |m: &M| start <= m.start && m.end <= end;
        // DEV-UNM-4: all or nothing.
        if d.maps
            .iter()
            .any(|m| overlaps((m.start, m.end), (start, end)) && !inside(m))
        {
            return Status::Range;
        }
        // DEV-UNM-5.
        d.maps.retain(|m| !inside(m));
        Status::Ok
    }

    /// PROBE: status, and the RESV_MEM properties (DEV-PRB-4..8).
    fn probe(&self, ep: u32, probe_size: usize) -> (Status, Vec<u8>) {
        if !Self::known_ep(ep) {
            return (Status::NoEnt, Vec::new());
        }
        let mut out = Vec::new();
        for (s, e, subtype) in self.reserved(ep) {
            out.extend_from_slice(&1u16.to_le_bytes()); // PROBE_T_RESV_MEM
            out.extend_from_slice(&20u16.to_le_bytes()); // length without the header
            out.extend_from_slice(&[subtype, 0, 0, 0]);
            out.extend_from_slice(&s.to_le_bytes());
            out.extend_from_slice(&e.to_le_bytes());
        }
        out.resize(probe_size, 0);
        (Status::Ok, out)
    }

    /// A driver write of `bypass` (DRV-CFG-1, DRV-CFG-2): accepted only with
    /// BYPASS_CONFIG negotiated and a value of 0 or 1.
    fn write_bypass(&mut self, v: u8) -> bool {
        if self.features & F_BYPASS_CONFIG == 0 || v > 1 {
            return false;
        }
        self.bypass = v == 1;
        true
    }

    /// Device reset (no endpoint attached afterwards; DEV-CFG-3: `bypass` kept), then
    /// the driver acks `features` again.
    fn device_reset(&mut self, features: u64) {
        self.attached.clear();
        self.domains.clear();
        self.features = features;
    }

    /// System reset: a device reset, and `bypass` back to its initial value (DEV-CFG-3).
    fn system_reset(&mut self, features: u64) {
        self.device_reset(features);
        self.bypass = self.boot_bypass;
    }

    /// What an access of `len` bytes at `iova` by `ep` reaches: the guest-physical
    /// pieces, merged where contiguous, or `None` if it faults.
    ///
    /// Bypass mode (virtio v1.3 §5.13.6): an unattached endpoint is in bypass iff
    /// `bypass` is 1 (BYPASS_CONFIG is always offered; it need not be negotiated); an
    /// attached one iff its domain is a bypass domain. Reserved regions are not memory:
    /// they fault even in bypass (crate docs). Otherwise only mapped bytes with the right
    /// permission translate (DEV-OPS-4, DEV-MAP-6).
    fn translate(&self, ep: u32, iova: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        let last = iova.checked_add(len - 1)?;
        let domain = self.attached.get(&ep).map(|d| &self.domains[d]);
        let identity = domain.map_or(self.bypass, |d| d.bypass);
        if identity {
            if self
                .reserved(ep)
                .iter()
                .any(|&(s, e, _)| overlaps((s, e), (iova, last)))
            {
                return None;
            }
            return Some(vec![(iova, len)]);
        }
        let d = domain?;
        let need = if write { MAP_F_WRITE } else { MAP_F_READ };
        let mut pieces = Vec::new();
        let mut cur = iova;
        loop {
            let m = d.maps.iter().find(|m| m.start <= cur && cur <= m.end)?;
            if m.flags & need == 0 {
                return None;
            }
            let upto = m.end.min(last);
            pieces.push((m.phys + (cur - m.start), upto - cur + 1));
            if upto == last {
                break;
            }
            cur = upto + 1;
        }
        Some(merge(pieces))
    }

    fn mapped_bytes(&self, ep: u32) -> u128 {
        self.attached.get(&ep).map_or(0, |d| {
            self.domains[d]
                .maps
                .iter()
                .map(|m| u128::from(m.end - m.start) + 1)
                .sum()
        })
    }
}

/// Merges guest-physically contiguous pieces, so that two ways of cutting the same
/// translation compare equal.
fn merge(pieces: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (base, len) in pieces {
        if let Some(prev) = out.last_mut() {
            if prev.0.checked_add(prev.1) == Some(base) {
                prev.1 += len;
                continue;
            }
        }
        out.push((base, len));
    }
    out
}

// ---------------------------------------------------------------------------------------
// Operations and their generators
// ---------------------------------------------------------------------------------------

/// A domain as a generated operation names it: an ID, or "the domain endpoint N is
/// attached to now" (resolved against the model when the step runs, falling back to
/// any live domain, then to the first valid ID), so that sequences act on live domains
/// often.
#[derive(Clone, Copy, Debug)]
enum DomSel {
    Id(u32),
    OfEndpoint(u32),
}

impl DomSel {
    fn resolve(self, model: &Model) -> u32 {
        match self {
            DomSel::Id(d) => d,
            DomSel::OfEndpoint(ep) => model
                .attached
                .get(&ep)
                .or_else(|| model.attached.values().next())
                .copied()
                .unwrap_or(DOMAINS.0),
        }
    }
}

/// An operation; `D` is [`DomSel`] as generated, `u32` once resolved.
#[derive(Clone, Debug)]
enum Op<D = u32> {
    Attach {
        domain: D,
        ep: u32,
        flags: u32,
        reserved_nonzero: bool,
    },
    Detach {
        domain: D,
        ep: u32,
    },
    Map {
        domain: D,
        start: u64,
        end: u64,
        phys: u64,
        flags: u32,
    },
    Unmap {
        domain: D,
        start: u64,
        end: u64,
        reserved_nonzero: bool,
    },
    Probe {
        ep: u32,
    },
    WriteBypass(u8),
    DeviceReset {
        features: u64,
    },
    SystemReset {
        features: u64,
    },
}

impl Op<DomSel> {
    fn resolve(&self, model: &Model) -> Op {
        match *self {
            Op::Attach {
                domain,
                ep,
                flags,
                reserved_nonzero,
            } => Op::Attach {
                domain: domain.resolve(model),
                ep,
                flags,
                reserved_nonzero,
            },
            Op::Detach { domain, ep } => Op::Detach {
                domain: domain.resolve(model),
                ep,
            },
            Op::Map {
                domain,
                start,
                end,
                phys,
                flags,
            } => Op::Map {
                domain: domain.resolve(model),
                start,
                end,
                phys,
                flags,
            },
            Op::Unmap {
                domain,
                start,
                end,
                reserved_nonzero,
            } => Op::Unmap {
                domain: domain.resolve(model),
                start,
                end,
                reserved_nonzero,
            },
            Op::Probe { ep } => Op::Probe { ep },
            Op::WriteBypass(v) => Op::WriteBypass(v),
            Op::DeviceReset { features } => Op::DeviceReset { features },
            Op::SystemReset { features } => Op::SystemReset { features },
        }
    }
}

/// One step: an operation, then translation probes `(iova, len)` for every endpoint.
#[derive(Clone, Debug)]
struct Step {
    op: Op<DomSel>,
    probes: Vec<(u64, u64)>,
}

fn ep_id() -> impl Strategy<Value = u32> {
    prop_oneof![9 => prop::sample::select(EPS.to_vec()), 1 => Just(UNKNOWN_EP)]
}

fn domain_id() -> impl Strategy<Value = u32> {
    prop_oneof![8 => DOMAINS.0..=DOMAINS.1, 1 => Just(0u32), 1 => Just(4u32)]
}

/// Mostly a live domain for MAP/UNMAP/DETACH (`live` of 10), otherwise any ID.
fn dom_sel(live: u32) -> impl Strategy<Value = DomSel> {
    prop_oneof![
        live => prop::sample::select(EPS.to_vec()).prop_map(DomSel::OfEndpoint),
        10 - live => domain_id().prop_map(DomSel::Id),
    ]
}

fn features() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![
        DEVICE_FEATURES,
        DEVICE_FEATURES,
        DEVICE_FEATURES & !F_BYPASS_CONFIG,
        DEVICE_FEATURES & !F_MMIO,
        DEVICE_FEATURES & !(F_MMIO | F_BYPASS_CONFIG),
    ])
}

/// An IOVA range `(start, end)`, inclusive: mostly on a grid of 16 pages (with a few
/// misaligned, inverted and one-byte variants), sometimes around the MSI doorbell,
/// sometimes across the end of `input_range`.
fn iova_range() -> impl Strategy<Value = (u64, u64)> {
    let grid = (
        0u64..16,
        0u64..4,
        prop_oneof![8 => Just(0u64), 1 => Just(1u64), 1 => Just(0x800u64)],
        prop_oneof![8 => Just(0i64), 1 => Just(-1i64), 1 => Just(1i64), 1 => Just(0x800i64)],
    )
        .prop_map(|(page, pages, start_off, end_adj)| {
            let start = page * PAGE + start_off;
            // pages == 0 gives an inverted range (or, with end_adj 1, a one-byte one);
            // page == 0 && pages == 0 wraps to end = u64::MAX.
            let end = ((page + pages) * PAGE)
                .wrapping_sub(1)
                .wrapping_add_signed(end_adj);
            (start, end)
        });
    let msi = (0u64..3, 1u64..3).prop_map(|(k, pages)| {
        let start = MSI.0 - PAGE + k * 0x8_0000;
        (start, start + pages * PAGE - 1)
    });
    let top = (1u64..4).prop_map(|pages| {
        let start = INPUT.1 + 1 - 2 * PAGE;
        (start, start + pages * PAGE - 1)
    });
    // Ranges over endpoint 2's extra reserved region (pages 11..=13).
    let resv = (11u64..=12, 1u64..3).prop_map(|(page, pages)| {
        let start = page * PAGE;
        (start, start + pages * PAGE - 1)
    });
    prop_oneof![10 => grid, 1 => msi, 1 => top, 1 => resv]
}

fn phys_addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        10 => (0u64..64).prop_map(|p| 0x80_0000 + p * PAGE),
        1 => (0u64..64).prop_map(|p| 0x80_0000 + p * PAGE + 0x10),
        1 => Just(u64::MAX - PAGE + 1),
    ]
}

fn map_flags() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => Just(3u32),
        2 => Just(1u32),
        2 => Just(2u32),
        1 => Just(0u32),
        1 => Just(MAP_F_MMIO),
        1 => Just(MAP_F_MMIO | 3),
        1 => Just(8u32),
    ]
}

fn attach_flags() -> impl Strategy<Value = u32> {
    prop_oneof![7 => Just(0u32), 2 => Just(ATTACH_F_BYPASS), 1 => Just(2u32)]
}

fn reserved_nonzero() -> impl Strategy<Value = bool> {
    prop::bool::weighted(0.08)
}

fn op() -> impl Strategy<Value = Op<DomSel>> {
    // Weights: resets are rare so that state builds up between them.
    prop_oneof![
        32 => (dom_sel(3), ep_id(), attach_flags(), reserved_nonzero()).prop_map(
            |(domain, ep, flags, reserved_nonzero)| Op::Attach {
                domain,
                ep,
                flags,
                reserved_nonzero
            }
        ),
        // Endpoint 2 joining another endpoint's domain, which may map over its
        // reserved region (DEV-ATT-7).
        4 => prop::sample::select(vec![1u32, 3]).prop_map(|other| Op::Attach {
            domain: DomSel::OfEndpoint(other),
            ep: 2,
            flags: 0,
            reserved_nonzero: false
        }),
        10 => (dom_sel(6), ep_id()).prop_map(|(domain, ep)| Op::Detach { domain, ep }),
        56 => (dom_sel(8), iova_range(), phys_addr(), map_flags()).prop_map(
            |(domain, (start, end), phys, flags)| Op::Map {
                domain,
                start,
                end,
                phys,
                flags
            }
        ),
        24 => (dom_sel(8), iova_range(), reserved_nonzero()).prop_map(
            |(domain, (start, end), reserved_nonzero)| Op::Unmap {
                domain,
                start,
                end,
                reserved_nonzero
            }
        ),
        4 => ep_id().prop_map(|ep| Op::Probe { ep }),
        8 => prop::sample::select(vec![0u8, 1, 0, 1, 2]).prop_map(Op::WriteBypass),
        2 => features().prop_map(|features| Op::DeviceReset { features }),
        2 => features().prop_map(|features| Op::SystemReset { features }),
    ]
}

/// A translation probe: on the grid (mapped or not), in or across the MSI doorbell, or
/// across the end of `input_range`.
fn probe_addr() -> impl Strategy<Value = (u64, u64)> {
    prop_oneof![
        8 => (
            0u64..17,
            prop::sample::select(vec![0u64, 0, 1, 0x7ff, 0xffc]),
            prop::sample::select(vec![1u64, 4, 4, 0x1000, 0x2001]),
        )
            .prop_map(|(page, off, len)| (page * PAGE + off, len)),
        1 => prop::sample::select(vec![
            (MSI.0, 4u64),
            (MSI.0 + 0x8_0000, 8),
            (MSI.1 - 3, 4),
            (MSI.0 - 4, 8),
            (MSI.1 - 1, 4),
        ]),
        1 => Just((INPUT.1 - 1, 4u64)),
    ]
}

/// A well-formed ATTACH of a known endpoint to a valid domain, so that most sequences
/// start with live domains.
fn warm_up_step() -> impl Strategy<Value = Step> {
    (
        DOMAINS.0..=DOMAINS.1,
        prop::sample::select(EPS.to_vec()),
        prop::collection::vec(probe_addr(), 3),
    )
        .prop_map(|(domain, ep, probes)| Step {
            op: Op::Attach {
                domain: DomSel::Id(domain),
                ep,
                flags: 0,
                reserved_nonzero: false,
            },
            probes,
        })
}

fn step() -> impl Strategy<Value = Step> {
    (op(), prop::collection::vec(probe_addr(), 3)).prop_map(|(op, probes)| Step { op, probes })
}

// ---------------------------------------------------------------------------------------
// Running a sequence against the device and the model
// ---------------------------------------------------------------------------------------

/// Outcomes seen over a whole run, to prove the generators reach every rule.
struct Seen {
    /// `[op kind][status]`: 0 ATTACH, 1 DETACH, 2 MAP, 3 UNMAP.
    status: [[AtomicU64; 9]; 4],
    translated: AtomicU64,
    faulted: AtomicU64,
}

impl Seen {
    fn new() -> Self {
        Self {
            status: Default::default(),
            translated: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        }
    }

    fn note(&self, kind: usize, s: Status) {
        self.status[kind][s as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn count(&self, kind: usize, s: Status) -> u64 {
        self.status[kind][s as usize].load(Ordering::Relaxed)
    }
}

fn request(op: &Op) -> Option<(usize, Request)> {
    Some(match *op {
        Op::Attach {
            domain,
            ep,
            flags,
            reserved_nonzero,
        } => (
            0,
            Request::Attach {
                domain: DomainId(domain),
                endpoint: EndpointId(ep),
                flags,
                reserved_nonzero,
            },
        ),
        Op::Detach { domain, ep } => (
            1,
            Request::Detach {
                domain: DomainId(domain),
                endpoint: EndpointId(ep),
            },
        ),
        Op::Map {
            domain,
            start,
            end,
            phys,
            flags,
        } => (
            2,
            Request::Map {
                domain: DomainId(domain),
                virt_start: Iova(start),
                virt_end: Iova(end),
                phys_start: phys,
                flags,
            },
        ),
        Op::Unmap {
            domain,
            start,
            end,
            reserved_nonzero,
        } => (
            3,
            Request::Unmap {
                domain: DomainId(domain),
                virt_start: Iova(start),
                virt_end: Iova(end),
                reserved_nonzero,
            },
        ),
        _ => return None,
    })
}

fn device_translate(
    iommu: &EndpointIommu,
    iova: u64,
    len: u64,
    write: bool,
) -> Option<Vec<(u64, u64)>> {
    let access = if write {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let it = iommu
        .translate(GuestAddress(iova), len as usize, access)
        .ok()?;
    Some(merge(it.map(|r| (r.base.0, r.length as u64))))
}

fn run_sequence(setup: &Setup, steps: &[Step], seen: &Seen) -> Result<(), TestCaseError> {
    let cfg = device_config(setup);
    let mut dev = VirtioIommu::new(&cfg).expect("valid config");
    let mut guest = FakeGuest::new(cfg.probe_size);
    dev.set_acked_features(setup.features);
    prop_assert_eq!(dev.acked_features(), setup.features);
    let mut model = Model::new(setup);
    // Handles taken once: they must stay valid across resets.
    let iommus: Vec<(u32, EndpointIommu)> = EPS
        .iter()
        .map(|&id| {
            let h = dev.endpoint_iommu(EndpointId(id)).expect("configured");
            (id, h)
        })
        .collect();

    for (i, step) in steps.iter().enumerate() {
        let op = step.op.resolve(&model);
        match op {
            Op::Probe { ep } => {
                let (want, want_props) = model.probe(ep, cfg.probe_size as usize);
                let (got, props) = guest.probe(&mut dev, ep);
                prop_assert_eq!(got, want, "step {}: {:?}", i, op);
                if want == Status::Ok {
                    prop_assert_eq!(props, want_props, "step {}: PROBE properties", i);
                }
            }
            Op::WriteBypass(v) => {
                let want = model.write_bypass(v);
                let got = dev.write_config(36, &[v]).is_ok();
                prop_assert_eq!(got, want, "step {}: bypass write {}", i, v);
            }
            Op::DeviceReset { features } => {
                dev.reset();
                prop_assert_eq!(dev.acked_features(), 0);
                dev.set_acked_features(features);
                model.device_reset(features);
            }
            Op::SystemReset { features } => {
                dev.system_reset();
                dev.set_acked_features(features);
                model.system_reset(features);
            }
            _ => {
                let (kind, req) = request(&op).expect("a request");
                let want = match op {
                    Op::Attach {
                        domain,
                        ep,
                        flags,
                        reserved_nonzero,
                    } => model.attach(domain, ep, flags, reserved_nonzero),
                    Op::Detach { domain, ep } => model.detach(domain, ep),
                    Op::Map {
                        domain,
                        start,
                        end,
                        phys,
                        flags,
                    } => model.map(domain, start, end, phys, flags),
                    Op::Unmap {
                        domain,
                        start,
                        end,
                        reserved_nonzero,
                    } => model.unmap(domain, start, end, reserved_nonzero),
                    _ => unreachable!("requests only"),
                };
                let got = guest.send(&mut dev, &req);
                seen.note(kind, got);
                prop_assert_eq!(got, want, "step {}: {:?}\nmodel: {:?}", i, op, model);
            }
        }
        check_state(&dev, &model, &iommus, step, i, seen)?;
    }
    Ok(())
}

/// Compares everything observable after a step: the `bypass` byte, attachments,
/// counters and translations.
fn check_state(
    dev: &VirtioIommu,
    model: &Model,
    iommus: &[(u32, EndpointIommu)],
    step: &Step,
    i: usize,
    seen: &Seen,
) -> Result<(), TestCaseError> {
    let cfg = dev.config();
    prop_assert_eq!(
        cfg.bypass,
        u8::from(model.bypass),
        "step {}: bypass byte",
        i
    );
    let counters = dev.counters();
    prop_assert_eq!(counters.domains, model.domains.len(), "step {}: domains", i);
    prop_assert_eq!(
        counters.mappings,
        model.total_mappings(),
        "step {}: mappings",
        i
    );
    // Bounded growth, whatever the guest sends.
    let limits = model.limits;
    prop_assert!(
        counters.mappings <= limits.max_total_mappings,
        "{:?}",
        counters
    );
    prop_assert!(counters.domains <= limits.max_domains, "{:?}", counters);
    for d in model.domains.values() {
        prop_assert!(d.maps.len() <= limits.max_mappings_per_domain);
    }
    for (id, iommu) in iommus {
        let id = *id;
        prop_assert_eq!(
            dev.endpoint_domain(EndpointId(id)).map(|d| d.0),
            model.attached.get(&id).copied(),
            "step {}: domain of endpoint {}",
            i,
            id
        );
        let bytes = counters
            .mapped_bytes
            .iter()
            .find(|(e, _)| e.0 == id)
            .map(|(_, b)| *b);
        prop_assert_eq!(bytes, Some(model.mapped_bytes(id)), "step {}: bytes", i);

        // Random probes, plus the first and last byte of one of the endpoint's
        // mappings (a different one at every step).
        let mut probes = step.probes.clone();
        if let Some(d) = model.attached.get(&id).map(|d| &model.domains[d]) {
            if !d.maps.is_empty() {
                let m = d.maps[i % d.maps.len()];
                probes.push((m.start, 1));
                probes.push((m.end, 1));
            }
        }
        for (iova, len) in probes {
            for write in [false, true] {
                let want = model.translate(id, iova, len, write);
                let got = device_translate(iommu, iova, len, write);
                if got.is_some() {
                    seen.translated.fetch_add(1, Ordering::Relaxed);
                } else {
                    seen.faulted.fetch_add(1, Ordering::Relaxed);
                }
                prop_assert_eq!(
                    got,
                    want,
                    "step {}: endpoint {} {} {:#x}+{:#x}\nmodel: {:?}",
                    i,
                    id,
                    if write { "write" } else { "read" },
                    iova,
                    len,
                    model
                );
            }
        }
    }
    Ok(())
}

/// A runner with `cases` cases, unless `PROPTEST_CASES` asks for another number (for
/// long hunts: `PROPTEST_CASES=20000 cargo test --release --test model`).
fn runner(cases: u32) -> TestRunner {
    let mut config = ProptestConfig {
        source_file: Some(file!()),
        ..ProptestConfig::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    TestRunner::new(config)
}

fn setup_strategy(page_size_mask: u64) -> impl Strategy<Value = Setup> {
    (any::<bool>(), features()).prop_map(move |(boot_bypass, features)| Setup {
        page_size_mask,
        boot_bypass,
        features,
        limits: Limits::default(),
    })
}

fn check_against_model(page_size_mask: u64) {
    let seen = Seen::new();
    let mut r = runner(256);
    let cases = r.config().cases;
    let strategy = (
        setup_strategy(page_size_mask),
        prop::collection::vec(warm_up_step(), 0..=3),
        prop::collection::vec(step(), 0..=60),
    );
    if let Err(e) = r.run(&strategy, |(setup, warm_up, steps)| {
        let all: Vec<Step> = warm_up.into_iter().chain(steps).collect();
        run_sequence(&setup, &all, &seen)
    }) {
        panic!("{e}");
    }
    if std::env::var_os("MODEL_STATS").is_some() {
        for k in 0..4 {
            let row: Vec<u64> = (0..9)
                .map(|j| seen.status[k][j].load(Ordering::Relaxed))
                .collect();
            eprintln!("{k}: {row:?}");
        }
    }
    if cases >= 64 {
        // The generators must reach every rule the model encodes.
        for (kind, name, statuses) in [
            (
                0,
                "ATTACH",
                &[
                    Status::Ok,
                    Status::Inval,
                    Status::NoEnt,
                    Status::Range,
                    Status::Unsupp,
                ][..],
            ),
            (1, "DETACH", &[Status::Ok, Status::Inval, Status::NoEnt][..]),
            (
                2,
                "MAP",
                &[Status::Ok, Status::Inval, Status::NoEnt, Status::Range][..],
            ),
            (
                3,
                "UNMAP",
                &[Status::Ok, Status::Inval, Status::NoEnt, Status::Range][..],
            ),
        ] {
            for &s in statuses {
                assert!(seen.count(kind, s) > 0, "{name} never answered {s:?}");
            }
        }
        assert!(seen.translated.load(Ordering::Relaxed) > 0);
        assert!(seen.faulted.load(Ordering::Relaxed) > 0);
    }
}

/// With a 4 KiB granule: every status, attachment, counter and translation matches the
/// reference model (DEV-ATT-*, DEV-DET-*, DEV-MAP-*, DEV-UNM-*, DEV-RESV-4, DEV-CFG-3,
/// the bypass rules of virtio v1.3 §5.13.6), misaligned MAPs included (DEV-MAP-1 →
/// S_RANGE).
#[test]
fn prop_device_matches_reference_model() {
    check_against_model(MASK_4K);
}

/// The same with a byte granule (`page_size_mask = !0`): any alignment is accepted,
/// one-byte mappings included, and the spec's byte-granular UNMAP rules apply.
#[test]
fn prop_device_matches_reference_model_with_byte_granule() {
    check_against_model(MASK_BYTE);
}

/// The spec's UNMAP examples (virtio v1.3 §5.13.6.6), each from an empty address space,
/// with a byte granule, checked on the model itself so that the model is known to read
/// the spec the same way the examples do.
#[test]
fn model_follows_spec_unmap_examples() {
    let setup = Setup {
        page_size_mask: MASK_BYTE,
        boot_bypass: false,
        features: DEVICE_FEATURES,
        limits: Limits::default(),
    };
    type Example = (&'static [(u64, u64)], (u64, u64), Status, usize);
    let examples: [Example; 7] = [
        (&[], (0, 4), Status::Ok, 0),
        (&[(0, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 9)], (0, 4), Status::Range, 1),
        (&[(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
        (&[(0, 4)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
    ];
    for (maps, (s, e), want, left) in examples {
        for model_first in [true, false] {
            let cfg = device_config(&setup);
            let mut dev = VirtioIommu::new(&cfg).expect("valid config");
            let mut guest = FakeGuest::new(cfg.probe_size);
            dev.set_acked_features(DEVICE_FEATURES);
            let mut model = Model::new(&setup);
            let att = Request::Attach {
                domain: DomainId(1),
                endpoint: EndpointId(1),
                flags: 0,
                reserved_nonzero: false,
            };
            assert_eq!(model.attach(1, 1, 0, false), Status::Ok);
            assert_eq!(guest.send(&mut dev, &att), Status::Ok);
            for &(ms, me) in maps {
                assert_eq!(model.map(1, ms, me, 0x10_0000 + ms, 3), Status::Ok);
                let map = Request::Map {
                    domain: DomainId(1),
                    virt_start: Iova(ms),
                    virt_end: Iova(me),
                    phys_start: 0x10_0000 + ms,
                    flags: 3,
                };
                assert_eq!(guest.send(&mut dev, &map), Status::Ok);
            }
            let unmap = Request::Unmap {
                domain: DomainId(1),
                virt_start: Iova(s),
                virt_end: Iova(e),
                reserved_nonzero: false,
            };
            if model_first {
                assert_eq!(model.unmap(1, s, e, false), want, "model: unmap({s},{e})");
                assert_eq!(model.domains[&1].maps.len(), left);
            } else {
                assert_eq!(guest.send(&mut dev, &unmap), want, "device: unmap({s},{e})");
                assert_eq!(dev.counters().mappings, left);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small limits: S_NOMEM and bounded state under floods
// ---------------------------------------------------------------------------------------

const SMALL: Limits = Limits {
    max_domains: 2,
    max_mappings_per_domain: 4,
    max_total_mappings: 6,
    max_pending_faults: 8,
};

/// Mostly page-aligned MAPs on distinct pages and ATTACHes to in-range domains: a
/// flood that runs into every limit.
fn flood_op() -> impl Strategy<Value = Op<DomSel>> {
    prop_oneof![
        4 => (DOMAINS.0..=DOMAINS.1, prop::sample::select(EPS.to_vec())).prop_map(
            |(domain, ep)| Op::Attach {
                domain: DomSel::Id(domain),
                ep,
                flags: 0,
                reserved_nonzero: false
            }
        ),
        12 => (dom_sel(8), 0u64..16, 1u64..3).prop_map(|(domain, page, pages)| {
            Op::Map {
                domain,
                start: page * PAGE,
                end: (page + pages) * PAGE - 1,
                phys: 0x80_0000 + page * PAGE,
                flags: 3,
            }
        }),
        2 => (dom_sel(8), 0u64..16, 1u64..8).prop_map(|(domain, page, pages)| {
            Op::Unmap {
                domain,
                start: page * PAGE,
                end: (page + pages) * PAGE - 1,
                reserved_nonzero: false,
            }
        }),
        1 => (dom_sel(8), prop::sample::select(EPS.to_vec()))
            .prop_map(|(domain, ep)| Op::Detach { domain, ep }),
    ]
}

/// With `max_domains = 2`, `max_mappings_per_domain = 4` and `max_total_mappings = 6`,
/// MAP and ATTACH floods are answered `S_NOMEM` exactly when the model says a limit is
/// reached, and the device never holds more than the limits (Counters).
#[test]
fn prop_limits_answer_nomem_and_bound_memory() {
    let seen = Seen::new();
    let mut r = runner(128);
    let cases = r.config().cases;
    let strategy = (
        any::<bool>(),
        prop::collection::vec(
            (flood_op(), prop::collection::vec(probe_addr(), 1))
                .prop_map(|(op, probes)| Step { op, probes }),
            0..=60,
        ),
    );
    let result = r.run(&strategy, |(boot_bypass, steps)| {
        let setup = Setup {
            page_size_mask: MASK_4K,
            boot_bypass,
            features: DEVICE_FEATURES,
            limits: SMALL,
        };
        run_sequence(&setup, &steps, &seen)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    if cases >= 64 {
        assert!(seen.count(2, Status::NoMem) > 0, "MAP never hit a limit");
        assert!(
            seen.count(0, Status::NoMem) > 0,
            "ATTACH never hit max_domains"
        );
    }
}
