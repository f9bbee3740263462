//! Fuzz target `requests`: arbitrary bytes become a sequence of guest actions on one virtio-iommu
//! (raw requests with arbitrary readable bytes and writable lengths, well-formed
//! requests with fuzzed fields, translations, config accesses, resets), all through the
//! device's real queue path (`fake_driver::FakeGuest`).
//!
//! Besides "no panic", it checks the documented contracts: used lengths (0, 4,
//! `probe_size + 4`, or the whole buffer for a too-small PROBE buffer), a defined status
//! with zeroed `tail.reserved`, `bypass` reading 0 or 1, bounded mappings, and that a
//! successful translation covers exactly the requested length.

use virtio_iommu::fake_driver::FakeGuest;
use virtio_iommu::{
    DomainId, EndpointConfig, EndpointId, IommuConfig, Iova, Limits, Request, RequestType,
    ReservedRegion, ResvKind, Status, VirtioIommu,
};
use vm_memory::{GuestAddress, Iommu, Permissions};

const PROBE_SIZE: u32 = 64;
const TAIL: u32 = 4;
/// FakeGuest's response slot size for this probe_size.
const MAX_WRITABLE: u32 = 4096;
const MAX_OPS: usize = 512;
const EPS: [u32; 3] = [1, 2, 3];
const LIMITS: Limits = Limits {
    max_domains: 2,
    max_mappings_per_domain: 32,
    max_total_mappings: 48,
    max_pending_faults: 16,
};

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.bytes(2)?;
        Some(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Some(u64::from_le_bytes(a))
    }

    /// An address: small, near the MSI doorbell, anywhere, or near the top.
    fn addr(&mut self) -> Option<u64> {
        Some(match self.u8()? % 4 {
            0 => u64::from(self.u16()?) << 8,
            1 => 0xfee0_0000 - 0x1000 + (u64::from(self.u16()?) << 4),
            2 => self.u64()?,
            _ => u64::MAX - u64::from(self.u16()?),
        })
    }
}

/// The used length the crate documents for a request; `None` for "returned unwritten".
fn documented_used_len(readable: &[u8], wlen: u32) -> Option<u32> {
    if wlen < TAIL || readable.len() < 4 {
        return None;
    }
    match RequestType::from_wire(readable[0])? {
        RequestType::Probe if wlen < PROBE_SIZE + TAIL => Some(wlen),
        RequestType::Probe => Some(PROBE_SIZE + TAIL),
        _ => Some(TAIL),
    }
}

fn structured(inp: &mut Input<'_>) -> Option<Request> {
    let kind = inp.u8()?;
    let domain = DomainId(u32::from(inp.u8()? % 5));
    let endpoint = EndpointId(u32::from(inp.u8()? % 5));
    let flags = u32::from(inp.u8()?) % 16;
    let misc = inp.u8()?;
    Some(match kind % 5 {
        0 => Request::Attach {
            domain,
            endpoint,
            flags: flags % 3,
            reserved_nonzero: misc & 0x80 != 0,
        },
        1 => Request::Detach { domain, endpoint },
        2 => {
            let start = inp.addr()?;
            let len = u64::from(inp.u16()?);
            Request::Map {
                domain,
                virt_start: Iova(start),
                virt_end: Iova(start.wrapping_add(len << (misc % 13))),
                phys_start: u64::from(inp.u16()?) << 12,
                flags,
            }
        }
        3 => {
            let start = inp.addr()?;
            let len = u64::from(inp.u16()?);
            Request::Unmap {
                domain,
                virt_start: Iova(start),
                virt_end: Iova(start.wrapping_add(len << (misc % 13))),
                reserved_nonzero: misc & 0x80 != 0,
            }
        }
        _ => Request::Probe { endpoint },
    })
}

/// The target's body: panics if a checked contract breaks.
pub fn run(data: &[u8]) {
    let mut inp = Input(data);
    let Some(setup) = inp.u8() else {
        return;
    };
    let endpoints = EPS
        .iter()
        .map(|&id| {
            let mut ep = EndpointConfig::new(id);
            if id == 2 {
                ep.reserved.push(ReservedRegion {
                    start: Iova(0xc000),
                    end: Iova(0xcfff),
                    kind: ResvKind::Reserved,
                });
            }
            ep
        })
        .collect();
    let cfg = IommuConfig {
        page_size_mask: if setup & 1 != 0 { !0 } else { !0xfff },
        boot_bypass: setup & 2 != 0,
        probe_size: PROBE_SIZE,
        domain_range: 0..=3,
        endpoints,
        limits: LIMITS,
        ..IommuConfig::default()
    };
    let mut dev = VirtioIommu::new(&cfg).expect("valid config");
    let mut guest = FakeGuest::new(PROBE_SIZE);
    let ack = |dev: &mut VirtioIommu, sel: u8| {
        let mut f = dev.device_features();
        if sel & 4 != 0 {
            f &= !(1 << 6); // BYPASS_CONFIG
        }
        if sel & 8 != 0 {
            f &= !(1 << 5); // MMIO
        }
        dev.set_acked_features(f);
    };
    ack(&mut dev, setup);
    let iommus: Vec<_> = EPS
        .iter()
        .map(|&id| dev.endpoint_iommu(EndpointId(id)).expect("configured"))
        .collect();

    for _ in 0..MAX_OPS {
        let Some(tag) = inp.u8() else {
            break;
        };
        match tag % 7 {
            0 => {
                let Some(rlen) = inp.u8() else { break };
                let Some(readable) = inp.bytes(usize::from(rlen)) else {
                    break;
                };
                let readable = readable.to_vec();
                let Some(w) = inp.u16() else { break };
                let wlen = u32::from(w) % (MAX_WRITABLE + 1);
                let c = guest.submit(&mut dev, &readable, wlen);
                match documented_used_len(&readable, wlen) {
                    None => {
                        assert_eq!(c.used_len, 0);
                        assert!(c.written.iter().all(|&b| b == 0));
                    }
                    Some(used) => {
                        assert_eq!(c.used_len, used);
                        let u = used as usize;
                        let tail = &c.written[u - 4..u];
                        assert!(usize::from(tail[0]) < Status::ALL.len());
                        assert_eq!(&tail[1..], &[0, 0, 0]);
                        assert!(c.written[u..].iter().all(|&b| b == 0));
                    }
                }
            }
            1 => {
                let Some(req) = structured(&mut inp) else {
                    break;
                };
                // `send` panics unless the used length is exactly what Linux expects.
                let s = guest.send(&mut dev, &req);
                if let Request::Probe { endpoint } = req {
                    assert_eq!(s == Status::Ok, EPS.contains(&endpoint.0));
                }
            }
            2 | 3 => {
                let Some(ep) = inp.u8() else { break };
                let Some(iova) = inp.addr() else { break };
                let Some(len) = inp.u16() else { break };
                let Some(a) = inp.u8() else { break };
                let access = match a % 4 {
                    0 => Permissions::No,
                    1 => Permissions::Read,
                    2 => Permissions::Write,
                    _ => Permissions::ReadWrite,
                };
                let len = usize::from(len) << (a >> 4);
                let iommu = &iommus[usize::from(ep) % iommus.len()];
                let total: Option<u128> = iommu
                    .translate(GuestAddress(iova), len, access)
                    .ok()
                    .map(|it| it.map(|r| r.length as u128).sum());
                if let Some(total) = total {
                    assert_eq!(total, len as u128);
                }
            }
            4 => {
                let Some(off) = inp.u8() else { break };
                let Some(v) = inp.u8() else { break };
                let n = usize::from(v >> 6);
                let data = vec![v & 3; n];
                let _ = dev.write_config(u64::from(off % 48), &data);
            }
            5 => {
                let Some(off) = inp.u8() else { break };
                let Some(n) = inp.u8() else { break };
                let mut buf = vec![0u8; usize::from(n % 48)];
                let _ = dev.read_config(u64::from(off % 48), &mut buf);
            }
            _ => {
                let Some(sel) = inp.u8() else { break };
                match sel % 3 {
                    0 => dev.reset(),
                    1 => dev.system_reset(),
                    _ => {}
                }
                ack(&mut dev, sel);
            }
        }
        assert!(dev.config().bypass <= 1);
        let c = dev.counters();
        assert!(c.mappings <= LIMITS.max_total_mappings);
        assert!(c.domains <= LIMITS.max_domains);
    }
}
