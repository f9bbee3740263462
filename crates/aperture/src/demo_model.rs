//! The `demo --model` scenario: a [`FakeGuest`] plays the requests Linux's virtio-iommu driver
//! sends (Linux drivers/iommu/virtio-iommu.c: `viommu_probe`, `viommu_probe_device`,
//! `viommu_attach_dev`, `viommu_map_pages`, `viommu_unmap_pages`, `viommu_release_device`) against a [`VirtioIommu`] through real
//! split virtqueues, and each endpoint's backend then reaches guest memory through
//! `vm_memory::IommuMemory` over the device's per-endpoint translation, as a device
//! backend written against `vm_memory::GuestMemory` would.
//!
//! Every step records what it expected and what it observed in a [`Report`]; the
//! scenario never stops at the first surprise unless it cannot go on.

use crate::report::{status_name, ConfigInfo, EndpointInfo, FaultInfo, Outcome, Report, Step};
use virtio_iommu::fake_driver::{FakeGuest, FREE_RAM};
use virtio_iommu::request::encode;
use virtio_iommu::wire::{
    Config, ProbePropHead, ProbeResvMem, CONFIG_BYPASS_OFFSET, VIRTIO_F_VERSION_1,
    VIRTIO_IOMMU_FAULT_F_ADDRESS, VIRTIO_IOMMU_FAULT_F_READ, VIRTIO_IOMMU_FAULT_F_WRITE,
    VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_F_BYPASS,
    VIRTIO_IOMMU_F_BYPASS_CONFIG, VIRTIO_IOMMU_F_DOMAIN_RANGE, VIRTIO_IOMMU_F_INPUT_RANGE,
    VIRTIO_IOMMU_F_MAP_UNMAP, VIRTIO_IOMMU_F_MMIO, VIRTIO_IOMMU_F_PROBE, VIRTIO_IOMMU_MAP_F_READ,
    VIRTIO_IOMMU_MAP_F_WRITE, VIRTIO_IOMMU_PROBE_T_NONE, VIRTIO_IOMMU_PROBE_T_RESV_MEM,
    VIRTIO_IOMMU_RESV_MEM_T_MSI, VIRTIO_IOMMU_RESV_MEM_T_RESERVED, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_iommu::{
    DeviceError, DomainId, EndpointConfig, EndpointId, EndpointIommu, IommuConfig, Iova, Request,
    RequestType, Status, VirtioIommu,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
use zerocopy::FromBytes;

/// Guest memory as one endpoint's backend sees it: IOVAs, translated per access.
type BackendMemory = IommuMemory<GuestMemoryMmap<()>, EndpointIommu>;

/// Size of each DMA buffer the guest maps (one 4 KiB page).
const BUF_LEN: u64 = 0x1000;
/// IOVA of the to-device buffer (DMA_TO_DEVICE: mapped READ).
const IOVA_TO_DEVICE: u64 = 0x4000_0000;
/// IOVA of the from-device buffer (DMA_FROM_DEVICE: mapped WRITE only).
const IOVA_FROM_DEVICE: u64 = 0x4000_1000;
/// IOVA of the bidirectional buffer (DMA_BIDIRECTIONAL: mapped READ|WRITE).
const IOVA_BIDI: u64 = 0x4000_2000;
/// Guest-physical page behind the to-device buffer, in the fake guest's free RAM.
const GPA_TO_DEVICE: u64 = FREE_RAM;
/// Guest-physical page behind the from-device buffer.
const GPA_FROM_DEVICE: u64 = FREE_RAM + 0x4000;
/// Guest-physical page behind the bidirectional buffer.
const GPA_BIDI: u64 = FREE_RAM + 0x8000;
/// Guest-physical page holding data the guest never gives any device.
const GPA_PRIVATE: u64 = FREE_RAM + 0x10_0000;
/// Eventq buffers the guest posts (Linux posts one 24-byte buffer per free slot).
const EVENT_BUFFERS: u16 = 8;
/// Size of one eventq buffer: `struct virtio_iommu_fault`.
const EVENT_LEN: u32 = 24;
/// The x86 MSI doorbell every endpoint must report as a RESV_MEM MSI region.
const MSI_DOORBELL: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

const PRIVATE_DATA: &[u8] = b"guest-private: no device was given this page";
const TO_DEVICE_DATA: &[u8] = b"sector 42: data the guest writes to disk";
const FROM_DEVICE_DATA: &[u8] = b"sector 7: data the disk returns";

/// Why the scenario could not go on.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    /// The device refused its configuration or an endpoint lookup.
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    /// The guest could not touch its own RAM.
    #[error("guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Runs the scenario with `endpoints` endpoints (at least 1) and reports every step.
pub fn run(endpoints: u32) -> Report {
    let endpoints = endpoint_list(endpoints);
    let mut demo = match Demo::new(endpoints.clone()) {
        Ok(demo) => demo,
        Err(e) => {
            let mut report = Report {
                endpoints,
                ..Report::default()
            };
            report.steps.push(Step::new(
                "0. build the device",
                "VirtioIommu::new",
                "a device",
                e.to_string(),
                Outcome::Fail,
            ));
            return report;
        }
    };
    if let Err(e) = demo.play() {
        demo.check(
            "demo could not continue",
            "every step to run",
            e.to_string(),
            false,
        );
    }
    demo.report
}

/// Names and IDs of the endpoints: endpoint IDs are PCI requester IDs, as a VIOT table
/// assigns them (slot n, function 0 → `n << 3`).
fn endpoint_list(n: u32) -> Vec<EndpointInfo> {
    (0..n)
        .map(|i| EndpointInfo {
            id: (i + 1) << 3,
            name: match i {
                0 => "virtio-blk".into(),
                1 => "virtio-rng".into(),
                _ => format!("endpoint-{i}"),
            },
            domain: None,
            resv_mem: Vec::new(),
        })
        .collect()
}

struct Demo {
    dev: VirtioIommu,
    guest: FakeGuest,
    report: Report,
    phase: &'static str,
    /// Faults the guest should receive, in order, from the denials so far.
    expected_faults: Vec<FaultInfo>,
    /// Statuses the guest read in its tails, by request type and status.
    seen_statuses: [[u64; 9]; 5],
}

impl Demo {
    /// A device with one endpoint per entry, in its boot state, and a guest for it.
    fn new(endpoints: Vec<EndpointInfo>) -> Result<Self, DemoError> {
        let config = IommuConfig {
            endpoints: endpoints
                .iter()
                .map(|e| EndpointConfig::new(e.id))
                .collect(),
            ..IommuConfig::default()
        };
        let dev = VirtioIommu::new(&config)?;
        let report = Report {
            endpoints,
            ..Report::default()
        };
        Ok(Self {
            dev,
            guest: FakeGuest::new(config.probe_size),
            report,
            phase: "",
            expected_faults: Vec::new(),
            seen_statuses: [[0; 9]; 5],
        })
    }

    /// Records one checked step of the current phase; returns whether it passed.
    fn check(
        &mut self,
        action: impl Into<String>,
        expected: impl Into<String>,
        observed: impl Into<String>,
        ok: bool,
    ) -> bool {
        let outcome = if ok { Outcome::Pass } else { Outcome::Fail };
        let step = Step::new(self.phase, action, expected, observed, outcome);
        self.report.steps.push(step);
        ok
    }

    /// Records a step that cannot run with this configuration.
    fn skip(&mut self, action: impl Into<String>, why: &str) {
        let step = Step::new(self.phase, action, "nothing (skipped)", why, Outcome::Skip);
        self.report.steps.push(step);
    }

    fn add_details(&mut self, details: Vec<String>) {
        if let Some(s) = self.report.steps.last_mut() {
            s.details.extend(details);
        }
    }

    /// Sends one request with Linux's buffer sizes; returns the status the guest read,
    /// or why there was none (a used length Linux would misread: `__viommu_sync_req()` takes the status only when
    /// the used length equals the writable size).
    fn send(&mut self, req: &Request) -> Result<Status, String> {
        let wlen = self.guest.writable_len(req);
        let c = self.guest.submit(&mut self.dev, &encode(req), wlen);
        let status = c.status(wlen).ok_or_else(|| {
            format!(
                "used length {} instead of {wlen}: Linux would misread it",
                c.used_len
            )
        })?;
        self.seen_statuses[req.request_type() as usize][status as usize] += 1;
        Ok(status)
    }

    /// Sends a request and checks its status.
    fn request(&mut self, action: String, req: &Request, want: Status, why: &str) -> bool {
        let (observed, ok) = match self.send(req) {
            Ok(s) => (status_name(s).to_string(), s == want),
            Err(e) => (e, false),
        };
        let observed = if ok && !why.is_empty() {
            format!("{observed} ({why})")
        } else {
            observed
        };
        self.check(action, status_name(want), observed, ok)
    }

    /// A backend access expected to be denied; records the fault it must raise.
    fn expect_denied(
        &mut self,
        action: String,
        result: Result<(), vm_memory::GuestMemoryError>,
        fault: FaultInfo,
        why: &str,
    ) -> bool {
        let ok = result.is_err();
        if ok {
            self.expected_faults.push(fault);
        }
        let observed = match result {
            Ok(()) => "allowed".to_string(),
            Err(_) => format!("denied ({why})"),
        };
        self.check(action, "denied", observed, ok)
    }

    fn play(&mut self) -> Result<(), DemoError> {
        let blk_id = EndpointId(self.report.endpoints[0].id);
        let rng_id = self.report.endpoints.get(1).map(|e| EndpointId(e.id));
        // What each backend gets from the VMM: guest RAM behind its endpoint's IOMMU.
        let blk = IommuMemory::new(
            self.guest.mem.clone(),
            self.dev.endpoint_iommu(blk_id)?,
            true,
            (),
        );
        let rng = match rng_id {
            Some(id) => Some(IommuMemory::new(
                self.guest.mem.clone(),
                self.dev.endpoint_iommu(id)?,
                true,
                (),
            )),
            None => None,
        };

        self.init();
        self.probe_endpoints();
        self.boot_bypass(&blk, blk_id)?;
        self.lock_down(&blk, blk_id);
        self.backends(&blk, blk_id, rng.as_ref(), rng_id)?;
        self.fault_events();
        self.tear_down(&blk, blk_id);
        self.counters();
        Ok(())
    }

    /// Linux `viommu_probe()`: features, then config space.
    fn init(&mut self) {
        self.phase = "1. guest driver init (Linux viommu_probe): features, config space";
        let offered = self.dev.device_features();
        self.guest.negotiate(&mut self.dev);
        let acked = self.dev.acked_features();
        let names: Vec<&str> = [
            (VIRTIO_F_VERSION_1, "VERSION_1"),
            (VIRTIO_RING_F_INDIRECT_DESC, "INDIRECT_DESC"),
            (VIRTIO_IOMMU_F_INPUT_RANGE, "INPUT_RANGE"),
            (VIRTIO_IOMMU_F_DOMAIN_RANGE, "DOMAIN_RANGE"),
            (VIRTIO_IOMMU_F_MAP_UNMAP, "MAP_UNMAP"),
            (VIRTIO_IOMMU_F_BYPASS, "BYPASS(legacy)"),
            (VIRTIO_IOMMU_F_PROBE, "PROBE"),
            (VIRTIO_IOMMU_F_MMIO, "MMIO"),
            (VIRTIO_IOMMU_F_BYPASS_CONFIG, "BYPASS_CONFIG"),
        ]
        .into_iter()
        .filter(|&(bit, _)| acked & (1u64 << bit) != 0)
        .map(|(_, name)| name)
        .collect();
        let needed: u64 = (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_IOMMU_F_MAP_UNMAP)
            | (1 << VIRTIO_IOMMU_F_PROBE)
            | (1 << VIRTIO_IOMMU_F_BYPASS_CONFIG);
        let ok = acked == offered
            && acked & needed == needed
            && acked & (1 << VIRTIO_IOMMU_F_BYPASS) == 0;
        self.check(
            "negotiate features",
            "VERSION_1, MAP_UNMAP, PROBE and BYPASS_CONFIG acked; legacy BYPASS not offered",
            format!("acked {acked:#x} = {}", names.join(" ")),
            ok,
        );

        let mut raw = [0u8; size_of::<Config>()];
        let read = self.dev.read_config(0, &mut raw);
        let cfg = match (read, Config::read_from_bytes(&raw)) {
            (Ok(()), Ok(cfg)) => cfg,
            (read, _) => {
                let why = read
                    .err()
                    .map_or("bad layout".to_string(), |e| e.to_string());
                self.check("read config space", "40 bytes", why, false);
                return;
            }
        };
        let c = ConfigInfo {
            page_size_mask: cfg.page_size_mask.get(),
            input_range: (cfg.input_range_start.get(), cfg.input_range_end.get()),
            domain_range: (cfg.domain_range_start.get(), cfg.domain_range_end.get()),
            probe_size: cfg.probe_size.get(),
            bypass: cfg.bypass,
        };
        self.report.config = c;
        let granule = c.page_size_mask & c.page_size_mask.wrapping_neg();
        self.check(
            "read page_size_mask",
            "non-zero, granule at most the guest's 4 KiB page",
            format!("{:#x} (granule {})", c.page_size_mask, size(granule)),
            c.page_size_mask != 0 && granule <= 0x1000,
        );
        let bits = 64 - c.input_range.1.leading_zeros();
        self.check(
            "read input_range, domain_range",
            "IOVAs 0x40000000-0x40002fff and domains 1..=N inside the ranges",
            format!(
                "IOVA {:#x}-{:#x} ({bits}-bit), domains {}-{}",
                c.input_range.0, c.input_range.1, c.domain_range.0, c.domain_range.1
            ),
            c.input_range.0 <= IOVA_TO_DEVICE
                && IOVA_BIDI + BUF_LEN - 1 <= c.input_range.1
                && c.domain_range.0 <= 1
                && self.report.endpoints.len() as u64 <= u64::from(c.domain_range.1),
        );
        self.check(
            "read probe_size, bypass",
            "probe_size 512 (room for RESV_MEM properties), bypass 1 at boot",
            format!(
                "probe_size {}, bypass {} (unattached endpoints {} the IOMMU)",
                c.probe_size,
                c.bypass,
                if c.bypass == 1 {
                    "bypass"
                } else {
                    "are blocked by"
                }
            ),
            c.probe_size == 512 && c.bypass == 1,
        );
    }

    /// Linux `viommu_probe_device()` / `viommu_probe_endpoint()`: one PROBE per endpoint,
    /// properties decoded as Linux does.
    fn probe_endpoints(&mut self) {
        self.phase = "2. guest probes each endpoint (viommu_probe_device): PROBE, RESV_MEM";
        for i in 0..self.report.endpoints.len() {
            let (id, name) = {
                let e = &self.report.endpoints[i];
                (e.id, e.name.clone())
            };
            let req = Request::Probe {
                endpoint: EndpointId(id),
            };
            let wlen = self.guest.writable_len(&req);
            let c = self.guest.submit(&mut self.dev, &encode(&req), wlen);
            let status = c.status(wlen);
            if let Some(s) = status {
                self.seen_statuses[RequestType::Probe as usize][s as usize] += 1;
            }
            let action = format!("PROBE endpoint {id:#04x} ({name})");
            let expected = format!(
                "S_OK, used length {wlen}, one RESV_MEM MSI {:#x}-{:#x}",
                MSI_DOORBELL.0, MSI_DOORBELL.1
            );
            let Some(status) = status else {
                let why = format!(
                    "used length {} instead of {wlen}: Linux would misread it",
                    c.used_len
                );
                self.check(action, expected, why, false);
                continue;
            };
            let props = &c.written[..c.written.len() - 4];
            match decode_properties(props) {
                Ok(regions) => {
                    let shown: Vec<String> = regions
                        .iter()
                        .map(|(kind, s, e)| format!("RESV_MEM {kind} {s:#x}-{e:#x}"))
                        .collect();
                    let ok = status == Status::Ok
                        && regions == [("MSI", MSI_DOORBELL.0, MSI_DOORBELL.1)];
                    self.report.endpoints[i].resv_mem = regions;
                    self.check(
                        action,
                        expected,
                        format!("{}, {}", status_name(status), shown.join(", ")),
                        ok,
                    );
                }
                Err(e) => {
                    self.check(action, expected, e, false);
                }
            }
        }
    }

    /// The boot state: `bypass = 1`, so an unattached endpoint reaches all guest RAM.
    fn boot_bypass(&mut self, blk: &BackendMemory, blk_id: EndpointId) -> Result<(), DemoError> {
        self.phase = "3. at boot (bypass = 1) a backend reaches any guest page";
        self.guest
            .mem
            .write_slice(PRIVATE_DATA, GuestAddress(GPA_PRIVATE))?;
        let mut buf = vec![0u8; PRIVATE_DATA.len()];
        let got = blk.read_slice(&mut buf, GuestAddress(GPA_PRIVATE));
        let ok = got.is_ok() && buf == PRIVATE_DATA;
        self.check(
            format!(
                "{} backend reads IOVA {GPA_PRIVATE:#x}, unattached",
                self.name(blk_id)
            ),
            "allowed: identity translation",
            match got {
                Ok(()) => format!("allowed (identity), read {}", quote(&buf)),
                Err(e) => format!("denied: {e}"),
            },
            ok,
        );
        Ok(())
    }

    /// Linux `viommu_attach_dev()` and `viommu_map_pages()`, preceded by the `bypass`
    /// write Linux leaves to the host.
    fn lock_down(&mut self, blk: &BackendMemory, blk_id: EndpointId) {
        self.phase =
            "4. lock down: bypass = 0 (Linux leaves it to the host), ATTACH, MAP (viommu_attach_dev, viommu_map_pages)";
        let wrote = self.dev.write_config(CONFIG_BYPASS_OFFSET as u64, &[0]);
        let mut back = [0xffu8];
        let read = self.dev.read_config(CONFIG_BYPASS_OFFSET as u64, &mut back);
        let (observed, ok) = match (wrote, read) {
            (Ok(()), Ok(())) => (format!("reads back {}", back[0]), back[0] == 0),
            (Err(e), _) | (_, Err(e)) => (e.to_string(), false),
        };
        self.check(
            format!("write config bypass = 0 (offset {CONFIG_BYPASS_OFFSET})"),
            "reads back 0",
            observed,
            ok,
        );

        let mut buf = vec![0u8; PRIVATE_DATA.len()];
        let got = blk.read_slice(&mut buf, GuestAddress(GPA_PRIVATE));
        self.expect_denied(
            format!(
                "{} backend reads IOVA {GPA_PRIVATE:#x}, unattached",
                self.name(blk_id)
            ),
            got,
            FaultInfo {
                reason: VIRTIO_IOMMU_FAULT_R_DOMAIN,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: blk_id.0,
                address: GPA_PRIVATE,
            },
            "no domain, no bypass",
        );

        // Domain 0 is what Linux keeps for its identity domain (first_domain++).
        for i in 0..self.report.endpoints.len() {
            let id = self.report.endpoints[i].id;
            let domain = i as u32 + 1;
            let req = Request::Attach {
                domain: DomainId(domain),
                endpoint: EndpointId(id),
                flags: 0,
                reserved_nonzero: false,
            };
            let action = format!(
                "ATTACH endpoint {id:#04x} ({}) to domain {domain}",
                self.report.endpoints[i].name
            );
            if self.request(action, &req, Status::Ok, "") {
                self.report.endpoints[i].domain = Some(domain);
            }
        }

        for (iova, gpa, flags, what) in [
            (
                IOVA_TO_DEVICE,
                GPA_TO_DEVICE,
                VIRTIO_IOMMU_MAP_F_READ,
                "to-device buffer",
            ),
            (
                IOVA_FROM_DEVICE,
                GPA_FROM_DEVICE,
                VIRTIO_IOMMU_MAP_F_WRITE,
                "from-device buffer",
            ),
            (
                IOVA_BIDI,
                GPA_BIDI,
                VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
                "bidirectional buffer",
            ),
        ] {
            let req = map(iova, gpa, flags);
            self.request(
                format!(
                    "MAP domain 1 IOVA {iova:#x}-{:#x} -> GPA {gpa:#x} {} ({what})",
                    iova + BUF_LEN - 1,
                    rights(flags)
                ),
                &req,
                Status::Ok,
                "",
            );
        }
        let req = map(
            MSI_DOORBELL.0,
            GPA_TO_DEVICE,
            VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE,
        );
        self.request(
            format!(
                "MAP domain 1 IOVA {:#x}-{:#x} (inside the MSI doorbell)",
                MSI_DOORBELL.0,
                MSI_DOORBELL.0 + BUF_LEN - 1
            ),
            &req,
            Status::Inval,
            "refused: reserved region",
        );
    }

    /// What the backends can and cannot reach once the guest has mapped its buffers.
    fn backends(
        &mut self,
        blk: &BackendMemory,
        blk_id: EndpointId,
        rng: Option<&BackendMemory>,
        rng_id: Option<EndpointId>,
    ) -> Result<(), DemoError> {
        self.phase = "5. what the backends see (vm_memory::IommuMemory over each endpoint)";
        let mem = self.guest.mem.clone();
        mem.write_slice(TO_DEVICE_DATA, GuestAddress(GPA_TO_DEVICE))?;
        mem.write_slice(b"ping", GuestAddress(GPA_BIDI))?;
        let blk_name = self.name(blk_id);

        // The mapped buffers, each with its rights.
        let mut buf = vec![0u8; TO_DEVICE_DATA.len()];
        let got = blk.read_slice(&mut buf, GuestAddress(IOVA_TO_DEVICE));
        self.check(
            format!("{blk_name} reads IOVA {IOVA_TO_DEVICE:#x} (READ mapping)"),
            format!("allowed, {}", quote(TO_DEVICE_DATA)),
            match got {
                Ok(()) => format!("allowed, read {}", quote(&buf)),
                Err(e) => format!("denied: {e}"),
            },
            buf == TO_DEVICE_DATA,
        );

        let got = blk.write_slice(FROM_DEVICE_DATA, GuestAddress(IOVA_FROM_DEVICE));
        let mut seen = vec![0u8; FROM_DEVICE_DATA.len()];
        mem.read_slice(&mut seen, GuestAddress(GPA_FROM_DEVICE))?;
        self.check(
            format!("{blk_name} writes IOVA {IOVA_FROM_DEVICE:#x} (WRITE mapping)"),
            format!("allowed, the guest reads it at GPA {GPA_FROM_DEVICE:#x}"),
            match got {
                Ok(()) => format!(
                    "allowed, guest reads {} at GPA {GPA_FROM_DEVICE:#x}",
                    quote(&seen)
                ),
                Err(e) => format!("denied: {e}"),
            },
            seen == FROM_DEVICE_DATA,
        );

        let mut ping = [0u8; 4];
        let got = blk
            .read_slice(&mut ping, GuestAddress(IOVA_BIDI))
            .and_then(|()| blk.write_slice(b"pong", GuestAddress(IOVA_BIDI)));
        let mut seen = [0u8; 4];
        mem.read_slice(&mut seen, GuestAddress(GPA_BIDI))?;
        self.check(
            format!("{blk_name} reads then writes IOVA {IOVA_BIDI:#x} (READ|WRITE mapping)"),
            "both allowed: reads \"ping\", the guest then reads \"pong\"",
            match got {
                Ok(()) => format!(
                    "both allowed: read {}, guest then reads {}",
                    quote(&ping),
                    quote(&seen)
                ),
                Err(e) => format!("denied: {e}"),
            },
            &ping == b"ping" && &seen == b"pong",
        );

        // Rights are enforced.
        let got = blk.write_slice(b"overwritten!", GuestAddress(IOVA_TO_DEVICE));
        let mut after = vec![0u8; TO_DEVICE_DATA.len()];
        mem.read_slice(&mut after, GuestAddress(GPA_TO_DEVICE))?;
        let unchanged = after == TO_DEVICE_DATA;
        let passed = self.expect_denied(
            format!("{blk_name} writes IOVA {IOVA_TO_DEVICE:#x} (READ-only mapping)"),
            got,
            FaultInfo {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_WRITE | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: blk_id.0,
                address: IOVA_TO_DEVICE,
            },
            "guest buffer unchanged",
        );
        if passed && !unchanged {
            self.check(
                "guest buffer after the denied write",
                "unchanged",
                format!("changed to {}", quote(&after)),
                false,
            );
        }

        let mut buf = [0u8; 16];
        let got = blk.read_slice(&mut buf, GuestAddress(IOVA_FROM_DEVICE));
        self.expect_denied(
            format!("{blk_name} reads IOVA {IOVA_FROM_DEVICE:#x} (WRITE-only mapping)"),
            got,
            FaultInfo {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: blk_id.0,
                address: IOVA_FROM_DEVICE,
            },
            "write-only stays write-only",
        );

        // Nothing else is reachable.
        let mut buf = vec![0u8; PRIVATE_DATA.len()];
        let got = blk.read_slice(&mut buf, GuestAddress(GPA_PRIVATE));
        self.expect_denied(
            format!("{blk_name} reads IOVA {GPA_PRIVATE:#x} (never mapped; read in step 3)"),
            got,
            FaultInfo {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: blk_id.0,
                address: GPA_PRIVATE,
            },
            "not mapped",
        );

        let action = format!("other endpoint reads IOVA {IOVA_TO_DEVICE:#x} (mapped in domain 1)");
        match (rng, rng_id) {
            (Some(rng), Some(rng_id)) => {
                let mut buf = vec![0u8; TO_DEVICE_DATA.len()];
                let got = rng.read_slice(&mut buf, GuestAddress(IOVA_TO_DEVICE));
                self.expect_denied(
                    format!(
                        "{} reads IOVA {IOVA_TO_DEVICE:#x} ({blk_name}'s buffer in domain 1)",
                        self.name(rng_id)
                    ),
                    got,
                    FaultInfo {
                        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                        flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                        endpoint: rng_id.0,
                        address: IOVA_TO_DEVICE,
                    },
                    "its domain 2 has no such mapping",
                );
            }
            _ => self.skip(action, "skipped: needs --endpoints 2 or more"),
        }
        Ok(())
    }

    /// Linux `viommu_event_handler()` (eventq rules: virtio v1.3 §5.13.6.9): faults wait
    /// in the device until the guest posts eventq buffers.
    fn fault_events(&mut self) {
        self.phase = "6. fault events the guest receives on the eventq";
        let want = self.expected_faults.len();
        let pending = self.dev.pending_faults();
        self.check(
            "faults waiting in the device (no eventq buffer posted yet)",
            want.to_string(),
            pending.to_string(),
            pending == want,
        );
        self.guest.post_event_buffers(EVENT_BUFFERS, EVENT_LEN);
        self.receive_faults(
            format!("guest posts {EVENT_BUFFERS} eventq buffers of {EVENT_LEN} bytes"),
            0,
        );
    }

    /// Takes the events delivered since the last call and checks them against
    /// `expected_faults[from..]`.
    fn receive_faults(&mut self, action: String, from: usize) {
        let events = self.guest.take_events(&mut self.dev);
        let got: Vec<FaultInfo> = events
            .iter()
            .map(|(_, ev)| FaultInfo {
                reason: ev.reason,
                flags: ev.flags.get(),
                endpoint: ev.endpoint.get(),
                address: ev.address.get(),
            })
            .collect();
        let lens_ok = events.iter().all(|&(len, _)| len == EVENT_LEN);
        let want = &self.expected_faults[from..];
        let ok = lens_ok && got == want;
        let details = got.iter().map(FaultInfo::describe).collect();
        let expected = want
            .iter()
            .map(FaultInfo::describe)
            .collect::<Vec<_>>()
            .join("; ");
        self.report.faults.extend(got.iter().copied());
        self.check(
            action,
            format!("{} events, used length {EVENT_LEN}: {expected}", want.len()),
            format!(
                "received {} fault event{}{}",
                got.len(),
                if got.len() == 1 { "" } else { "s" },
                if lens_ok { "" } else { " (used length not 24)" }
            ),
            ok,
        );
        self.add_details(details);
    }

    /// Linux `viommu_unmap_pages()` and `viommu_release_device()`: UNMAP (strict: the old
    /// translation is gone at S_OK), DETACH.
    fn tear_down(&mut self, blk: &BackendMemory, blk_id: EndpointId) {
        self.phase =
            "7. guest tears down: UNMAP (viommu_unmap_pages), DETACH (viommu_release_device)";
        for iova in [IOVA_TO_DEVICE, IOVA_FROM_DEVICE, IOVA_BIDI] {
            let req = Request::Unmap {
                domain: DomainId(1),
                virt_start: Iova(iova),
                virt_end: Iova(iova + BUF_LEN - 1),
                reserved_nonzero: false,
            };
            self.request(
                format!("UNMAP domain 1 IOVA {iova:#x}-{:#x}", iova + BUF_LEN - 1),
                &req,
                Status::Ok,
                "",
            );
        }
        // The read in step 5 filled the endpoint's IOTLB with this translation; the
        // UNMAP must have invalidated it before answering S_OK.
        let mut buf = vec![0u8; TO_DEVICE_DATA.len()];
        let got = blk.read_slice(&mut buf, GuestAddress(IOVA_TO_DEVICE));
        let from = self.expected_faults.len();
        self.expect_denied(
            format!(
                "{} reads IOVA {IOVA_TO_DEVICE:#x} after its UNMAP",
                self.name(blk_id)
            ),
            got,
            FaultInfo {
                reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                flags: VIRTIO_IOMMU_FAULT_F_READ | VIRTIO_IOMMU_FAULT_F_ADDRESS,
                endpoint: blk_id.0,
                address: IOVA_TO_DEVICE,
            },
            "cached translation invalidated before S_OK",
        );
        self.receive_faults("guest receives the new fault event".into(), from);

        for i in 0..self.report.endpoints.len() {
            let id = self.report.endpoints[i].id;
            let domain = i as u32 + 1;
            let req = Request::Detach {
                domain: DomainId(domain),
                endpoint: EndpointId(id),
            };
            self.request(
                format!(
                    "DETACH endpoint {id:#04x} ({}) from domain {domain}",
                    self.report.endpoints[i].name
                ),
                &req,
                Status::Ok,
                "",
            );
        }
        let c = self.dev.counters();
        let unmapped: u128 = c.mapped_bytes.iter().map(|&(_, b)| b).sum();
        self.check(
            "device state after DETACH",
            "0 domains, 0 mappings, 0 bytes reachable",
            format!(
                "{} domains, {} mappings, {unmapped} bytes reachable",
                c.domains, c.mappings
            ),
            c.domains == 0 && c.mappings == 0 && unmapped == 0,
        );
    }

    /// The device's own counters agree with what the guest saw.
    fn counters(&mut self) {
        self.phase = "8. device counters agree with what the guest saw";
        let c = self.dev.counters();
        self.check(
            "requests by type and status",
            "the statuses the guest read in its tails, nothing unparseable",
            if c.requests == self.seen_statuses && c.unparseable == 0 {
                "match".to_string()
            } else {
                format!(
                    "device counted {:?} (unparseable {}), guest saw {:?}",
                    c.requests, c.unparseable, self.seen_statuses
                )
            },
            c.requests == self.seen_statuses && c.unparseable == 0,
        );
        let n = self.expected_faults.len() as u64;
        let received = self.report.faults.len() as u64;
        self.check(
            "faults raised, delivered, dropped",
            format!("{n}, {n}, 0"),
            format!(
                "{}, {}, {} (the guest received {received})",
                c.faults_raised, c.faults_delivered, c.faults_dropped
            ),
            c.faults_raised == n
                && c.faults_delivered == n
                && c.faults_dropped == 0
                && received == n,
        );
        self.report.counters = Some(c);
    }

    fn name(&self, id: EndpointId) -> String {
        self.report
            .endpoints
            .iter()
            .find(|e| e.id == id.0)
            .map_or_else(|| id.to_string(), |e| e.name.clone())
    }
}

/// A MAP request of one buffer in domain 1.
fn map(iova: u64, gpa: u64, flags: u32) -> Request {
    Request::Map {
        domain: DomainId(1),
        virt_start: Iova(iova),
        virt_end: Iova(iova + BUF_LEN - 1),
        phys_start: gpa,
        flags,
    }
}

/// MAP flags as the spec names them.
fn rights(flags: u32) -> &'static str {
    match (
        flags & VIRTIO_IOMMU_MAP_F_READ != 0,
        flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
    ) {
        (true, true) => "READ|WRITE",
        (true, false) => "READ",
        (false, true) => "WRITE",
        (false, false) => "no rights",
    }
}

/// Decodes PROBE properties the way Linux's `viommu_probe_endpoint` does:
/// `type & 0xfff`, stop at type NONE or the end of the buffer, RESV_MEM
/// shorter than 24 bytes is an error, unknown subtypes count as RESERVED.
fn decode_properties(props: &[u8]) -> Result<Vec<(&'static str, u64, u64)>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while let Some(rest) = props.get(off..) {
        let Ok((head, _)) = ProbePropHead::read_from_prefix(rest) else {
            break;
        };
        let kind = head.type_.get() & 0xfff;
        if kind == VIRTIO_IOMMU_PROBE_T_NONE {
            break;
        }
        let len = 4 + usize::from(head.length.get());
        let Some(prop) = props.get(off..off + len) else {
            return Err(format!("property at offset {off} overruns probe_size"));
        };
        if kind == VIRTIO_IOMMU_PROBE_T_RESV_MEM {
            let Ok((resv, _)) = ProbeResvMem::read_from_prefix(prop) else {
                return Err(format!("RESV_MEM at offset {off} is only {len} bytes"));
            };
            let sub = match resv.subtype {
                VIRTIO_IOMMU_RESV_MEM_T_MSI => "MSI",
                VIRTIO_IOMMU_RESV_MEM_T_RESERVED => "RESERVED",
                _ => "RESERVED(unknown subtype)",
            };
            let (start, end) = (resv.start.get(), resv.end.get());
            if end < start {
                return Err(format!(
                    "RESV_MEM {start:#x}-{end:#x} ends before it starts"
                ));
            }
            out.push((sub, start, end));
        }
        off += len;
    }
    Ok(out)
}

/// A size in bytes, in KiB when it is a whole number of them.
fn size(bytes: u64) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

/// Bytes as a quoted string, non-printable bytes escaped.
fn quote(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_passes_with_one_two_and_many_endpoints() {
        for n in [1, 2, 5] {
            let report = run(n);
            let failed: Vec<String> = report
                .failed()
                .iter()
                .map(|s| s.describe_failure())
                .collect();
            assert!(failed.is_empty(), "{n} endpoints: {failed:#?}");
        }
    }

    #[test]
    fn one_endpoint_skips_the_isolation_step() {
        let report = run(1);
        assert_eq!(
            report
                .steps
                .iter()
                .filter(|s| s.outcome == Outcome::Skip)
                .count(),
            1
        );
    }

    #[test]
    fn properties_are_decoded_as_linux_does() {
        let mut props = vec![0u8; 64];
        props[0] = 1; // RESV_MEM, with a reserved high nibble Linux masks off
        props[1] = 0x10;
        props[2] = 20;
        props[4] = VIRTIO_IOMMU_RESV_MEM_T_MSI;
        props[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
        props[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
        assert_eq!(
            decode_properties(&props),
            Ok(vec![("MSI", 0xfee0_0000, 0xfeef_ffff)])
        );
        props[2] = 61; // overruns the buffer
        assert!(decode_properties(&props).is_err());
    }
}
