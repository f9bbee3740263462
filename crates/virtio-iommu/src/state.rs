//! The device's translation state as a pure state machine: endpoints, domains and
//! mappings, and [`Tables::apply`], which validates a decoded [`Request`] completely
//! before it changes anything and answers with the protocol [`Status`].
//!
//! Every change an endpoint's translation goes through is reported to a caller-supplied
//! sink as a [`MappingEvent`], in the same call, so the shell can invalidate IOTLBs and
//! tell subscribers before the request's status reaches the guest. The rules cite the
//! spec statement IDs listed in `docs/SPEC-STATEMENTS.md`.

use crate::config::{IommuConfig, Limits, ReservedRegion, ResvKind};
use crate::ids::{DomainId, EndpointId, Gpa, Iova};
use crate::request::Request;
use crate::wire::{
    ProbePropHead, ProbeResvMem, Status, RESV_MEM_SIZE, VIRTIO_IOMMU_ATTACH_F_BYPASS,
    VIRTIO_IOMMU_FAULT_R_DOMAIN, VIRTIO_IOMMU_FAULT_R_MAPPING, VIRTIO_IOMMU_F_BYPASS_CONFIG,
    VIRTIO_IOMMU_F_DOMAIN_RANGE, VIRTIO_IOMMU_F_INPUT_RANGE, VIRTIO_IOMMU_F_MMIO,
    VIRTIO_IOMMU_MAP_F_MMIO, VIRTIO_IOMMU_MAP_F_READ, VIRTIO_IOMMU_MAP_F_WRITE,
    VIRTIO_IOMMU_PROBE_T_RESV_MEM, VIRTIO_IOMMU_RESV_MEM_T_MSI, VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
};
use std::collections::{BTreeMap, HashMap};
use std::ops::RangeInclusive;
use vm_memory::Permissions;
use zerocopy::byteorder::little_endian::{U16, U64};
use zerocopy::IntoBytes;

/// One mapping of a domain; the key in the domain's map is its first IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Last IOVA (inclusive).
    pub end: u64,
    /// Guest-physical address of the first IOVA.
    pub phys: u64,
    /// `VIRTIO_IOMMU_MAP_F_*` as the driver sent them.
    pub flags: u32,
}

impl Mapping {
    /// Access rights of the mapping (DEV-MAP-6: write-only is kept write-only).
    pub fn permissions(&self) -> Permissions {
        flags_to_permissions(self.flags)
    }
}

/// R/W rights of MAP flags.
pub fn flags_to_permissions(flags: u32) -> Permissions {
    match (
        flags & VIRTIO_IOMMU_MAP_F_READ != 0,
        flags & VIRTIO_IOMMU_MAP_F_WRITE != 0,
    ) {
        (true, true) => Permissions::ReadWrite,
        (true, false) => Permissions::Read,
        (false, true) => Permissions::Write,
        (false, false) => Permissions::No,
    }
}

/// A change in what one endpoint can reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MappingEvent {
    /// `[start, end]` now translates to `phys..` with `perms`.
    Mapped {
        /// First IOVA.
        start: Iova,
        /// Last IOVA (inclusive).
        end: Iova,
        /// Guest-physical address of `start`.
        phys: Gpa,
        /// Access rights.
        perms: Permissions,
    },
    /// `[start, end]` no longer translates.
    Unmapped {
        /// First IOVA.
        start: Iova,
        /// Last IOVA (inclusive).
        end: Iova,
    },
    /// The endpoint entered (`true`) or left (`false`) identity translation: every
    /// address outside its reserved regions reaches the same guest-physical address.
    Identity(bool),
}

/// An endpoint as the sink sees it: its index in the configuration and its ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointRef {
    /// Position in [`IommuConfig::endpoints`].
    pub index: usize,
    /// Endpoint ID.
    pub id: EndpointId,
}

/// Why an access was denied, in fault-event terms (virtio v1.3 §5.13.6.9).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denied {
    /// `VIRTIO_IOMMU_FAULT_R_*`.
    pub reason: u8,
    /// First address that could not be accessed.
    pub address: u64,
}

#[derive(Debug)]
struct Endpoint {
    id: EndpointId,
    domain: Option<DomainId>,
    /// Sorted, non-overlapping (checked by `IommuConfig::validate`).
    reserved: Vec<ReservedRegion>,
    /// The PROBE properties, precomputed.
    probe: Vec<u8>,
}

#[derive(Debug, Default)]
struct Domain {
    bypass: bool,
    endpoints: Vec<usize>,
    mappings: BTreeMap<u64, Mapping>,
    /// Sum of mapping sizes; u128 because one mapping may span 2^64 bytes.
    mapped_bytes: u128,
}

/// The complete translation state of one virtio-iommu.
#[derive(Debug)]
pub struct Tables {
    granule: u64,
    input_range: RangeInclusive<u64>,
    domain_range: RangeInclusive<u32>,
    probe_size: usize,
    limits: Limits,
    boot_bypass: bool,
    bypass: bool,
    features: u64,
    endpoints: Vec<Endpoint>,
    index: HashMap<EndpointId, usize>,
    domains: HashMap<DomainId, Domain>,
    total_mappings: usize,
    /// Per endpoint, the most it could reach at one moment so far.
    peaks: Vec<Exposure>,
}

/// The most guest memory an endpoint could reach at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// It was in identity translation (bypass) at some point: all of guest memory
    /// outside its reserved regions.
    pub identity: bool,
    /// The largest total size of its domain's mappings while attached (IOVA bytes: two
    /// IOVAs mapping one page count twice, so this is an upper bound).
    pub mapped_bytes: u128,
}

impl Tables {
    /// Builds the boot state from a configuration whose reserved regions were validated
    /// (see [`IommuConfig::validate`]).
    pub fn new(config: &IommuConfig, reserved: Vec<Vec<ReservedRegion>>) -> Self {
        let endpoints: Vec<Endpoint> = config
            .endpoints
            .iter()
            .zip(reserved)
            .map(|(ep, reserved)| Endpoint {
                id: ep.id,
                domain: None,
                probe: probe_properties(&reserved),
                reserved,
            })
            .collect();
        let index = endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.id, i))
            .collect();
        let peaks = vec![
            Exposure {
                identity: config.boot_bypass,
                mapped_bytes: 0,
            };
            endpoints.len()
        ];
        Self {
            granule: config.granule(),
            input_range: config.input_range.clone(),
            domain_range: config.domain_range.clone(),
            probe_size: config.probe_size as usize,
            limits: config.limits,
            boot_bypass: config.boot_bypass,
            bypass: config.boot_bypass,
            features: 0,
            endpoints,
            index,
            domains: HashMap::new(),
            total_mappings: 0,
            peaks,
        }
    }

    /// The most the endpoint at `index` could reach at one moment since boot.
    pub fn peak_exposure(&self, index: usize) -> Exposure {
        self.peaks[index]
    }

    /// Folds the endpoint's current reach into its peak.
    fn note_exposure(&mut self, index: usize) {
        let identity = self.is_identity(index);
        let bytes = self.mapped_bytes(index);
        let p = &mut self.peaks[index];
        p.identity |= identity;
        p.mapped_bytes = p.mapped_bytes.max(bytes);
    }

    /// Sets the negotiated feature bits (they decide which flags are known).
    pub fn set_features(&mut self, features: u64) {
        self.features = features;
    }

    fn negotiated(&self, bit: u32) -> bool {
        self.features & (1 << bit) != 0
    }

    /// Current value of the `bypass` config byte.
    pub fn bypass(&self) -> bool {
        self.bypass
    }

    /// Size of the PROBE property buffer.
    pub fn probe_size(&self) -> usize {
        self.probe_size
    }

    /// Number of configured endpoints.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }

    /// Index of an endpoint ID, if it is configured.
    pub fn endpoint_index(&self, id: EndpointId) -> Option<usize> {
        self.index.get(&id).copied()
    }

    /// ID of the endpoint at `index`. Panics if `index` is out of range: indices only
    /// come from this table.
    pub fn endpoint_id(&self, index: usize) -> EndpointId {
        self.endpoints[index].id
    }

    /// Domain the endpoint at `index` is attached to.
    pub fn endpoint_domain(&self, index: usize) -> Option<DomainId> {
        self.endpoints[index].domain
    }

    /// Live domains.
    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    /// Live mappings over all domains.
    pub fn mapping_count(&self) -> usize {
        self.total_mappings
    }

    /// Bytes the endpoint at `index` can reach through mappings (0 in bypass).
    pub fn mapped_bytes(&self, index: usize) -> u128 {
        self.endpoints[index]
            .domain
            .and_then(|d| self.domains.get(&d))
            .map_or(0, |d| d.mapped_bytes)
    }

    /// The mappings of a domain, in IOVA order, as `(start, mapping)`.
    pub fn mappings(&self, domain: DomainId) -> impl Iterator<Item = (Iova, Mapping)> + '_ {
        self.domains
            .get(&domain)
            .into_iter()
            .flat_map(|d| d.mappings.iter().map(|(s, m)| (Iova(*s), *m)))
    }

    /// Whether the endpoint at `index` is translated as identity (bypass mode, virtio
    /// v1.3 §5.13.6, with BYPASS_CONFIG offered, which this device always does).
    pub fn is_identity(&self, index: usize) -> bool {
        match self.endpoints[index].domain {
            Some(d) => self.domains.get(&d).is_some_and(|d| d.bypass),
            None => self.bypass,
        }
    }

    /// Applies one request. `probe_out` receives the PROBE properties (exactly
    /// `probe_size` bytes are written, zero-filled; untouched for other requests and on
    /// failure). Nothing changes unless the status is `S_OK`.
    pub fn apply<F>(&mut self, req: &Request, probe_out: &mut [u8], sink: &mut F) -> Status
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        match *req {
            Request::Attach {
                domain,
                endpoint,
                flags,
                reserved_nonzero,
            } => self.attach(domain, endpoint, flags, reserved_nonzero, sink),
            Request::Detach { domain, endpoint } => self.detach(domain, endpoint, sink),
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => self.map(domain, virt_start.0, virt_end.0, phys_start, flags, sink),
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
                reserved_nonzero,
            } => self.unmap(domain, virt_start.0, virt_end.0, reserved_nonzero, sink),
            Request::Probe { endpoint } => self.probe(endpoint, probe_out),
        }
    }

    fn attach<F>(
        &mut self,
        domain: DomainId,
        endpoint: EndpointId,
        flags: u32,
        reserved_nonzero: bool,
        sink: &mut F,
    ) -> Status
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        // DEV-ATT-1: non-zero reserved MUST be rejected with S_INVAL.
        if reserved_nonzero {
            return Status::Inval;
        }
        // DEV-ATT-2: unknown flags MUST be rejected. ATTACH_F_BYPASS is only defined
        // with BYPASS_CONFIG negotiated.
        let known = if self.negotiated(VIRTIO_IOMMU_F_BYPASS_CONFIG) {
            VIRTIO_IOMMU_ATTACH_F_BYPASS
        } else {
            0
        };
        if flags & !known != 0 {
            return Status::Inval;
        }
        let bypass = flags & VIRTIO_IOMMU_ATTACH_F_BYPASS != 0;
        // DEV-ATT-3: unknown endpoint MUST be rejected with S_NOENT.
        let Some(ep) = self.endpoint_index(endpoint) else {
            return Status::NoEnt;
        };
        // DRV-OPS-4, enforced: with DOMAIN_RANGE negotiated, a domain outside
        // domain_range cannot exist (without it, any 32-bit ID is valid: virtio v1.3
        // §5.13.6).
        if self.negotiated(VIRTIO_IOMMU_F_DOMAIN_RANGE) && !self.domain_range.contains(&domain.0) {
            return Status::Range;
        }
        let old = self.endpoints[ep].domain;
        match self.domains.get(&domain) {
            Some(d) => {
                // DEV-ATT-5: bypass-ness must agree with the existing domain.
                if d.bypass != bypass {
                    return Status::Inval;
                }
                if old == Some(domain) {
                    return Status::Ok;
                }
                // DEV-ATT-7: the endpoint's reserved regions must be compatible with the
                // domain: no existing mapping may cover one of them (DEV-RESV-4).
                let reserved = &self.endpoints[ep].reserved;
                if reserved
                    .iter()
                    .any(|r| overlapping_mapping(&d.mappings, r.start.0, r.end.0).is_some())
                {
                    return Status::Unsupp;
                }
            }
            None => {
                // Bound the number of domains; moving the sole endpoint out of its
                // domain frees one.
                let frees_one = old
                    .and_then(|o| self.domains.get(&o))
                    .is_some_and(|d| d.endpoints.len() == 1);
                if self.domains.len() - usize::from(frees_one) >= self.limits.max_domains {
                    return Status::NoMem;
                }
            }
        }
        // Validated: commit. DEV-ATT-6: an endpoint attached elsewhere is detached first.
        let was_identity = self.is_identity(ep);
        if was_identity && !bypass {
            sink(self.ep_ref(ep), MappingEvent::Identity(false));
        }
        if let Some(o) = old {
            self.leave_domain(ep, o, sink);
        }
        let ep_ref = self.ep_ref(ep);
        self.endpoints[ep].domain = Some(domain);
        let d = self.domains.entry(domain).or_insert_with(|| Domain {
            bypass,
            ..Domain::default()
        });
        d.endpoints.push(ep);
        if !bypass {
            for (&start, m) in &d.mappings {
                sink(ep_ref, mapped_event(start, m));
            }
        }
        if !was_identity && bypass {
            sink(ep_ref, MappingEvent::Identity(true));
        }
        self.note_exposure(ep);
        Status::Ok
    }

    fn detach<F>(&mut self, domain: DomainId, endpoint: EndpointId, sink: &mut F) -> Status
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        // DEV-DET-1: reserved is ignored (the decoder does not even keep it).
        // DEV-DET-2: unknown endpoint MUST be rejected with S_NOENT.
        let Some(ep) = self.endpoint_index(endpoint) else {
            return Status::NoEnt;
        };
        // DEV-DET-3: domain missing or endpoint not attached to it → S_INVAL.
        if self.endpoints[ep].domain != Some(domain) {
            return Status::Inval;
        }
        self.detach_index(ep, domain, sink);
        Status::Ok
    }

    /// Detaches a validated endpoint from its domain (DEV-DET-4).
    fn detach_index<F>(&mut self, ep: usize, domain: DomainId, sink: &mut F)
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        let was_identity = self.is_identity(ep);
        let now_identity = self.bypass;
        if was_identity && !now_identity {
            sink(self.ep_ref(ep), MappingEvent::Identity(false));
        }
        self.leave_domain(ep, domain, sink);
        self.endpoints[ep].domain = None;
        if !was_identity && now_identity {
            sink(self.ep_ref(ep), MappingEvent::Identity(true));
        }
        self.note_exposure(ep);
    }

    /// Removes `ep` from `domain`, reporting every mapping it loses; the domain ceases
    /// to exist with its last endpoint (spec, DETACH informative text).
    fn leave_domain<F>(&mut self, ep: usize, domain: DomainId, sink: &mut F)
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        let ep_ref = self.ep_ref(ep);
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.endpoints.retain(|&e| e != ep);
        if !d.bypass {
            for (&start, m) in &d.mappings {
                sink(ep_ref, unmapped_event(start, m));
            }
        }
        if d.endpoints.is_empty() {
            let n = d.mappings.len();
            self.domains.remove(&domain);
            self.total_mappings -= n;
        }
    }

    fn map<F>(
        &mut self,
        domain: DomainId,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: u32,
        sink: &mut F,
    ) -> Status
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        // DEV-MAP-3: unknown flags MUST be rejected; MMIO is unknown without F_MMIO
        // (DRV-MAP-6).
        let mut known = VIRTIO_IOMMU_MAP_F_READ | VIRTIO_IOMMU_MAP_F_WRITE;
        if self.negotiated(VIRTIO_IOMMU_F_MMIO) {
            known |= VIRTIO_IOMMU_MAP_F_MMIO;
        }
        if flags & !known != 0 {
            return Status::Inval;
        }
        let granule = self.granule;
        let total = self.total_mappings;
        let limits = self.limits;
        // DEV-MAP-4: missing domain → S_NOENT.
        let Some(d) = self.domains.get(&domain) else {
            return Status::NoEnt;
        };
        // DEV-MAP-5: bypass domain → S_INVAL.
        if d.bypass {
            return Status::Inval;
        }
        // DRV-MAP-3, enforced: an inverted range is malformed.
        if virt_end < virt_start {
            return Status::Inval;
        }
        // DRV-OPS-3, enforced: with INPUT_RANGE negotiated the range must lie inside
        // input_range (without it the window is the whole 64-bit space: virtio v1.3
        // §5.13.6).
        if self.negotiated(VIRTIO_IOMMU_F_INPUT_RANGE)
            && (virt_start < *self.input_range.start() || virt_end > *self.input_range.end())
        {
            return Status::Range;
        }
        // DEV-MAP-1: virt_start, phys_start and virt_end + 1 aligned to the granule
        // (virt_end + 1 may be 2^64, so test the low bits of virt_end instead).
        let low = granule - 1;
        if virt_start & low != 0 || phys_start & low != 0 || virt_end & low != low {
            return Status::Range;
        }
        // The physical range must not wrap past 2^64.
        if phys_start.checked_add(virt_end - virt_start).is_none() {
            return Status::Range;
        }
        // DEV-RESV-4: no mapping over a reserved region of any endpoint in the domain.
        if d.endpoints.iter().any(|&e| {
            self.endpoints[e]
                .reserved
                .iter()
                .any(|r| r.overlaps(virt_start, virt_end))
        }) {
            return Status::Inval;
        }
        // DEV-MAP-2: overlap with an existing mapping → S_INVAL.
        if overlapping_mapping(&d.mappings, virt_start, virt_end).is_some() {
            return Status::Inval;
        }
        // Bounded growth: S_NOMEM past the limits.
        if d.mappings.len() >= limits.max_mappings_per_domain || total >= limits.max_total_mappings
        {
            return Status::NoMem;
        }
        let m = Mapping {
            end: virt_end,
            phys: phys_start,
            flags,
        };
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        d.mappings.insert(virt_start, m);
        d.mapped_bytes += u128::from(virt_end - virt_start) + 1;
        self.total_mappings += 1;
        let ev = mapped_event(virt_start, &m);
        for &e in &d.endpoints {
            sink(
                EndpointRef {
                    index: e,
                    id: self.endpoints[e].id,
                },
                ev,
            );
            let p = &mut self.peaks[e];
            p.mapped_bytes = p.mapped_bytes.max(d.mapped_bytes);
        }
        Status::Ok
    }

    fn unmap<F>(
        &mut self,
        domain: DomainId,
        virt_start: u64,
        virt_end: u64,
        reserved_nonzero: bool,
        sink: &mut F,
    ) -> Status
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        // DEV-UNM-1: non-zero reserved MAY be answered S_INVAL; we do, and unmap nothing.
        if reserved_nonzero {
            return Status::Inval;
        }
        // DEV-UNM-2: missing domain → S_NOENT.
        let Some(d) = self.domains.get_mut(&domain) else {
            return Status::NoEnt;
        };
        // DEV-UNM-3: bypass domain → S_INVAL.
        if d.bypass {
            return Status::Inval;
        }
        if virt_end < virt_start {
            return Status::Inval;
        }
        // DEV-UNM-4: a mapping that would be split → S_RANGE, nothing removed. Only the
        // mapping containing virt_start and the one containing virt_end can be split.
        if let Some((_, m)) = d.mappings.range(..virt_start).next_back() {
            if m.end >= virt_start {
                return Status::Range;
            }
        }
        if let Some((_, m)) = d.mappings.range(..=virt_end).next_back() {
            if m.end > virt_end {
                return Status::Range;
            }
        }
        // DEV-UNM-5: remove every mapping inside the range; unmapped parts are fine.
        let endpoints = &self.endpoints;
        while let Some((&start, _)) = d.mappings.range(virt_start..=virt_end).next() {
            let Some(m) = d.mappings.remove(&start) else {
                break;
            };
            d.mapped_bytes -= u128::from(m.end - start) + 1;
            self.total_mappings -= 1;
            let ev = unmapped_event(start, &m);
            for &e in &d.endpoints {
                sink(
                    EndpointRef {
                        index: e,
                        id: endpoints[e].id,
                    },
                    ev,
                );
            }
        }
        Status::Ok
    }

    fn probe(&self, endpoint: EndpointId, out: &mut [u8]) -> Status {
        // DEV-PRB-1: reserved is ignored. DEV-PRB-2: unknown endpoint → S_NOENT.
        let Some(ep) = self.endpoint_index(endpoint) else {
            return Status::NoEnt;
        };
        // DEV-PRB-7: a properties buffer smaller than probe_size → S_INVAL, no write.
        let Some(out) = out.get_mut(..self.probe_size) else {
            return Status::Inval;
        };
        let props = &self.endpoints[ep].probe;
        // props.len() <= probe_size, checked by IommuConfig::validate (ProbeTooSmall).
        let (head, tail) = out.split_at_mut(props.len());
        head.copy_from_slice(props);
        // DEV-PRB-8: zero-fill the rest, which also ends the list with PROBE_T_NONE.
        tail.fill(0);
        Status::Ok
    }

    /// Writes the `bypass` config byte (validated by the caller to be 0 or 1), reporting
    /// the change to every unattached endpoint.
    pub fn set_bypass<F>(&mut self, bypass: bool, sink: &mut F)
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        if bypass == self.bypass {
            return;
        }
        self.bypass = bypass;
        for (i, e) in self.endpoints.iter().enumerate() {
            if e.domain.is_none() {
                sink(
                    EndpointRef { index: i, id: e.id },
                    MappingEvent::Identity(bypass),
                );
                self.peaks[i].identity |= bypass;
            }
        }
    }

    /// Device reset: every endpoint is detached and every domain destroyed (spec,
    /// device initialization); `bypass` keeps its value (DEV-CFG-3); features are
    /// renegotiated.
    pub fn reset<F>(&mut self, sink: &mut F)
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        for ep in 0..self.endpoints.len() {
            if let Some(d) = self.endpoints[ep].domain {
                self.detach_index(ep, d, sink);
            }
        }
        debug_assert!(self.domains.is_empty() && self.total_mappings == 0);
        self.features = 0;
    }

    /// System reset: a device reset, and `bypass` returns to its boot value (DEV-CFG-3).
    pub fn system_reset<F>(&mut self, sink: &mut F)
    where
        F: FnMut(EndpointRef, MappingEvent),
    {
        self.reset(sink);
        self.set_bypass(self.boot_bypass, sink);
    }

    /// Resolves the IOVA range `[start, end)` of the endpoint at `index` for `access`,
    /// calling `fill(iova, target, len, perms)` for the translation entries that cover
    /// it (whole mappings, or whole gaps between reserved regions in identity mode), so
    /// an IOTLB can cache them.
    ///
    /// `end` is exclusive and at most `u64::MAX`: the last byte of the 64-bit space is
    /// not addressable through vm-memory (see the crate docs).
    ///
    /// # Errors
    /// [`Denied`] with the fault reason and the first address that cannot be accessed.
    pub fn resolve<F>(
        &self,
        index: usize,
        start: u64,
        end: u64,
        access: Permissions,
        mut fill: F,
    ) -> Result<(), Denied>
    where
        F: FnMut(u64, u64, u64, Permissions),
    {
        let ep = &self.endpoints[index];
        let domain = match ep.domain {
            Some(d) => self.domains.get(&d),
            None => None,
        };
        let identity = match domain {
            Some(d) => d.bypass,
            None => self.bypass,
        };
        let mut cur = start;
        if identity {
            while cur < end {
                // Accesses to reserved regions are not memory accesses; they fault.
                let i = ep.reserved.partition_point(|r| r.end.0 < cur);
                let next = ep.reserved.get(i);
                if next.is_some_and(|r| r.start.0 <= cur) {
                    return Err(Denied {
                        reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                        address: cur,
                    });
                }
                let gap_lo = i
                    .checked_sub(1)
                    .map_or(0, |p| ep.reserved[p].end.0.saturating_add(1));
                // Exclusive end of the gap, capped at u64::MAX (see above).
                let gap_hi = next.map_or(u64::MAX, |r| r.start.0);
                fill(gap_lo, gap_lo, gap_hi - gap_lo, Permissions::ReadWrite);
                cur = gap_hi;
                if gap_hi == u64::MAX {
                    break;
                }
            }
            return Ok(());
        }
        let Some(d) = domain else {
            // DEV-OPS-4: unattached, non-bypass endpoints reach nothing.
            return Err(Denied {
                reason: VIRTIO_IOMMU_FAULT_R_DOMAIN,
                address: start,
            });
        };
        while cur < end {
            let Some((&ms, m)) = d.mappings.range(..=cur).next_back() else {
                return Err(Denied {
                    reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                    address: cur,
                });
            };
            // DEV-MAP-6: rights are enforced, write-only included.
            if m.end < cur || !m.permissions().allow(access) {
                return Err(Denied {
                    reason: VIRTIO_IOMMU_FAULT_R_MAPPING,
                    address: cur,
                });
            }
            let hi = m.end.min(u64::MAX - 1) + 1;
            fill(ms, m.phys, hi - ms, m.permissions());
            cur = hi;
            if m.end >= u64::MAX - 1 {
                break;
            }
        }
        Ok(())
    }

    fn ep_ref(&self, index: usize) -> EndpointRef {
        EndpointRef {
            index,
            id: self.endpoints[index].id,
        }
    }
}

/// The mapping of `mappings` that overlaps `[start, end]`, if any: only the last
/// mapping starting at or before `end` can (mappings never overlap each other).
fn overlapping_mapping(mappings: &BTreeMap<u64, Mapping>, start: u64, end: u64) -> Option<u64> {
    mappings
        .range(..=end)
        .next_back()
        .filter(|(_, m)| m.end >= start)
        .map(|(s, _)| *s)
}

fn mapped_event(start: u64, m: &Mapping) -> MappingEvent {
    MappingEvent::Mapped {
        start: Iova(start),
        end: Iova(m.end),
        phys: Gpa(m.phys),
        perms: m.permissions(),
    }
}

fn unmapped_event(start: u64, m: &Mapping) -> MappingEvent {
    MappingEvent::Unmapped {
        start: Iova(start),
        end: Iova(m.end),
    }
}

/// The RESV_MEM properties of an endpoint (DEV-PRB-4..6, DEV-RESV-1).
fn probe_properties(reserved: &[ReservedRegion]) -> Vec<u8> {
    let mut out = Vec::with_capacity(reserved.len() * RESV_MEM_SIZE);
    for r in reserved {
        let prop = ProbeResvMem {
            head: ProbePropHead {
                type_: U16::new(VIRTIO_IOMMU_PROBE_T_RESV_MEM),
                // DEV-PRB-5: length excludes the 4-byte header.
                length: U16::new((RESV_MEM_SIZE - 4) as u16),
            },
            subtype: match r.kind {
                ResvKind::Reserved => VIRTIO_IOMMU_RESV_MEM_T_RESERVED,
                ResvKind::Msi => VIRTIO_IOMMU_RESV_MEM_T_MSI,
            },
            reserved: [0; 3],
            start: U64::new(r.start.0),
            end: U64::new(r.end.0),
        };
        out.extend_from_slice(prop.as_bytes());
    }
    out
}
