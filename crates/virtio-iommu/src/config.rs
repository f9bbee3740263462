//! Host-side configuration of a virtio-iommu instance: which endpoints exist, their
//! reserved regions, the values presented in config space, and the limits on what the
//! guest can grow. Validated once, before the device is built.

use crate::ids::{EndpointId, Iova};
use crate::wire::RESV_MEM_SIZE;
use std::collections::BTreeSet;
use std::ops::RangeInclusive;

/// The x86 MSI doorbell window, presented to every endpoint as a RESV_MEM MSI region
/// (virtio v1.3 §5.13.6.8.1; without it Linux's `viommu_get_resv_regions()` in
/// `drivers/iommu/virtio-iommu.c` assumes the Arm SW-MSI window).
pub const X86_MSI_DOORBELL: RangeInclusive<u64> = 0xfee0_0000..=0xfeef_ffff;

/// Largest `probe_size` accepted: a PROBE reply is copied into guest memory per request.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

/// Kind of a reserved region (RESV_MEM subtype).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResvKind {
    /// `RESV_MEM_T_RESERVED`: never mapped; accesses fault.
    Reserved,
    /// `RESV_MEM_T_MSI`: the MSI doorbell; never mapped.
    Msi,
}

/// A reserved IOVA region of one endpoint (inclusive bounds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReservedRegion {
    /// First reserved address.
    pub start: Iova,
    /// Last reserved address (inclusive).
    pub end: Iova,
    /// Subtype presented in PROBE.
    pub kind: ResvKind,
}

impl ReservedRegion {
    /// Whether `[start, end]` (inclusive) overlaps this region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start.0 <= end && start <= self.end.0
    }
}

/// One endpoint the device translates for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointConfig {
    /// The endpoint ID the guest uses in requests.
    pub id: EndpointId,
    /// Reserved regions of this endpoint besides the MSI doorbell.
    pub reserved: Vec<ReservedRegion>,
}

impl EndpointConfig {
    /// An endpoint with no reserved regions besides the MSI doorbell.
    pub fn new(id: u32) -> Self {
        Self {
            id: EndpointId(id),
            reserved: Vec::new(),
        }
    }
}

/// Bounds on everything the guest can grow (each exceeded bound answers `S_NOMEM`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Domains alive at once. Domains only live while an endpoint is attached, so the
    /// endpoint count bounds this too; the limit lets a host go lower.
    pub max_domains: usize,
    /// Mappings in one domain. 2^18 covers 1 GiB in 4 KiB pages.
    pub max_mappings_per_domain: usize,
    /// Mappings over all domains; roughly 80 bytes each in the tables and the IOTLBs.
    pub max_total_mappings: usize,
    /// Fault events waiting for an eventq buffer; more are dropped and counted.
    pub max_pending_faults: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 18,
            max_total_mappings: 1 << 20,
            max_pending_faults: 256,
        }
    }
}

/// Configuration of one virtio-iommu device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IommuConfig {
    /// `page_size_mask`: default every power of two ≥ 4 KiB, so Linux sends one MAP per
    /// contiguous buffer. Bit 0 set means byte granule.
    pub page_size_mask: u64,
    /// `input_range`, the IOVA window. Default 48 bits: vm-memory's `Iotlb` cannot hold a
    /// range ending at 2^64 (vm-memory 0.18 `src/iommu.rs`: `Iotlb::set_mapping` keeps
    /// half-open `u64` ranges).
    pub input_range: RangeInclusive<u64>,
    /// `domain_range`, the valid domain IDs.
    pub domain_range: RangeInclusive<u32>,
    /// `probe_size`: size of the PROBE property buffer. QEMU uses 512.
    pub probe_size: u32,
    /// Boot (and system-reset) value of the `bypass` config byte.
    pub boot_bypass: bool,
    /// MSI doorbell presented to every endpoint as a RESV_MEM MSI region; `None` on
    /// platforms where the guest must map its own doorbell.
    pub msi_doorbell: Option<RangeInclusive<u64>>,
    /// The endpoints, each with a distinct ID.
    pub endpoints: Vec<EndpointConfig>,
    /// Bounds on guest-controlled state.
    pub limits: Limits,
}

impl Default for IommuConfig {
    fn default() -> Self {
        Self {
            page_size_mask: !0xfff,
            input_range: 0..=(1 << 48) - 1,
            domain_range: 0..=u32::MAX,
            probe_size: 512,
            boot_bypass: true,
            msi_doorbell: Some(X86_MSI_DOORBELL),
            endpoints: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// DEV-CFG-1: at least one page size must be set.
    #[error("page_size_mask is 0; at least one page size must be supported")]
    EmptyPageSizeMask,
    /// The input range is empty or not aligned to the granule.
    #[error(
        "input_range {start:#x}..={end:#x} is empty or not aligned to the granule {granule:#x}"
    )]
    BadInputRange {
        /// Configured start.
        start: u64,
        /// Configured end.
        end: u64,
        /// Granule from `page_size_mask`.
        granule: u64,
    },
    /// The domain range is empty.
    #[error("domain_range {start}..={end} is empty")]
    BadDomainRange {
        /// Configured start.
        start: u32,
        /// Configured end.
        end: u32,
    },
    /// Two endpoints share an ID.
    #[error("endpoint ID {0} is configured twice")]
    DuplicateEndpoint(u32),
    /// A reserved region is inverted, overlaps another, or is a second MSI region.
    #[error("endpoint {endpoint}: reserved region {start:#x}..={end:#x} {why}")]
    BadReservedRegion {
        /// Endpoint ID.
        endpoint: u32,
        /// Region start.
        start: u64,
        /// Region end.
        end: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The RESV_MEM properties of an endpoint do not fit in `probe_size`.
    #[error("endpoint {endpoint} needs {needed} bytes of PROBE properties but probe_size is {probe_size}")]
    ProbeTooSmall {
        /// Endpoint ID.
        endpoint: u32,
        /// Bytes its properties need.
        needed: usize,
        /// Configured `probe_size`.
        probe_size: u32,
    },
    /// `probe_size` is above [`MAX_PROBE_SIZE`].
    #[error("probe_size {0} is above the maximum of {MAX_PROBE_SIZE}")]
    ProbeSizeTooLarge(u32),
    /// A limit is zero.
    #[error("limit {0} must be at least 1")]
    ZeroLimit(&'static str),
}

impl IommuConfig {
    /// The mapping granule: the least significant bit of `page_size_mask`.
    pub fn granule(&self) -> u64 {
        self.page_size_mask & self.page_size_mask.wrapping_neg()
    }

    /// Checks the configuration and returns, per endpoint, its reserved regions
    /// (MSI doorbell included) sorted by address.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first offending value.
    pub fn validate(&self) -> Result<Vec<Vec<ReservedRegion>>, ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageSizeMask);
        }
        let g = self.granule();
        let (s, e) = (*self.input_range.start(), *self.input_range.end());
        if s > e || s % g != 0 || (e & (g - 1)) != g - 1 {
            return Err(ConfigError::BadInputRange {
                start: s,
                end: e,
                granule: g,
            });
        }
        if self.domain_range.start() > self.domain_range.end() {
            return Err(ConfigError::BadDomainRange {
                start: *self.domain_range.start(),
                end: *self.domain_range.end(),
            });
        }
        if self.probe_size > MAX_PROBE_SIZE {
            return Err(ConfigError::ProbeSizeTooLarge(self.probe_size));
        }
        let l = &self.limits;
        for (v, name) in [
            (l.max_domains, "max_domains"),
            (l.max_mappings_per_domain, "max_mappings_per_domain"),
            (l.max_total_mappings, "max_total_mappings"),
            (l.max_pending_faults, "max_pending_faults"),
        ] {
            if v == 0 {
                return Err(ConfigError::ZeroLimit(name));
            }
        }
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(self.endpoints.len());
        for ep in &self.endpoints {
            if !seen.insert(ep.id) {
                return Err(ConfigError::DuplicateEndpoint(ep.id.0));
            }
            let mut regions = ep.reserved.clone();
            if let Some(msi) = &self.msi_doorbell {
                regions.push(ReservedRegion {
                    start: Iova(*msi.start()),
                    end: Iova(*msi.end()),
                    kind: ResvKind::Msi,
                });
            }
            regions.sort_by_key(|r| r.start);
            let bad = |r: &ReservedRegion, why| ConfigError::BadReservedRegion {
                endpoint: ep.id.0,
                start: r.start.0,
                end: r.end.0,
                why,
            };
            for r in &regions {
                if r.start > r.end {
                    return Err(bad(r, "ends before it starts"));
                }
            }
            // DEV-RESV-3: regions of one endpoint do not overlap.
            for w in regions.windows(2) {
                if w[1].start <= w[0].end {
                    return Err(bad(&w[1], "overlaps another reserved region"));
                }
            }
            // DEV-RESV-2: at most one MSI region per endpoint.
            if let Some(second) = regions.iter().filter(|r| r.kind == ResvKind::Msi).nth(1) {
                return Err(bad(second, "is a second MSI region"));
            }
            let needed = regions.len() * RESV_MEM_SIZE;
            if needed > self.probe_size as usize {
                return Err(ConfigError::ProbeTooSmall {
                    endpoint: ep.id.0,
                    needed,
                    probe_size: self.probe_size,
                });
            }
            out.push(regions);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ep(reserved: Vec<ReservedRegion>) -> IommuConfig {
        IommuConfig {
            endpoints: vec![EndpointConfig {
                id: EndpointId(1),
                reserved,
            }],
            ..Default::default()
        }
    }

    fn region(start: u64, end: u64, kind: ResvKind) -> ReservedRegion {
        ReservedRegion {
            start: Iova(start),
            end: Iova(end),
            kind,
        }
    }

    #[test]
    fn dev_cfg_1_empty_page_size_mask_is_refused() {
        let c = IommuConfig {
            page_size_mask: 0,
            ..Default::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::EmptyPageSizeMask));
    }

    #[test]
    fn dev_resv_3_overlapping_regions_are_refused() {
        let c = with_ep(vec![region(0xfee8_0000, 0xfef0_0fff, ResvKind::Reserved)]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadReservedRegion { why, .. }) if why.contains("overlaps")
        ));
    }

    #[test]
    fn dev_resv_2_second_msi_region_is_refused() {
        let c = with_ep(vec![region(0x1000, 0x1fff, ResvKind::Msi)]);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadReservedRegion { why, .. }) if why.contains("second MSI")
        ));
    }

    #[test]
    fn regions_are_sorted_with_the_doorbell() {
        let c = with_ep(vec![region(
            0x1_0000_0000,
            0x1_0000_ffff,
            ResvKind::Reserved,
        )]);
        let r = c.validate().expect("valid");
        assert_eq!(r[0][0].kind, ResvKind::Msi);
        assert_eq!(r[0][1].start, Iova(0x1_0000_0000));
    }

    #[test]
    fn probe_size_must_hold_every_property() {
        let mut c = with_ep(vec![region(0x1000, 0x1fff, ResvKind::Reserved)]);
        c.probe_size = 24;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::ProbeTooSmall { needed: 48, .. })
        ));
    }

    #[test]
    fn duplicate_endpoint_and_misaligned_input_range_are_refused() {
        let mut c = IommuConfig {
            endpoints: vec![EndpointConfig::new(3), EndpointConfig::new(3)],
            ..IommuConfig::default()
        };
        assert_eq!(c.validate(), Err(ConfigError::DuplicateEndpoint(3)));
        c.endpoints.pop();
        c.input_range = 0..=0x1_0000;
        assert!(matches!(
            c.validate(),
            Err(ConfigError::BadInputRange { .. })
        ));
    }
}
