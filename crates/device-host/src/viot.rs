//! The ACPI VIOT ("Virtual I/O Translation") table that tells the guest which PCI
//! function is the virtio-iommu and which requester IDs it translates for. QEMU reads
//! it from a file (`-acpitable file=viot.aml`) and adds it to the guest's ACPI tables
//! unchanged; do not also give QEMU a `virtio-iommu-pci`, which makes QEMU add a VIOT of
//! its own.
//!
//! Layout (little-endian; the one QEMU's `build_viot()` emits and Linux's
//! `drivers/acpi/viot.c` parses):
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 36 | SDT header: `"VIOT"`, length, revision 0, checksum, OEM ID `"APERTR"`, OEM table ID `"APERTURE"`, OEM revision 1, creator ID `"APTR"`, creator revision 1 |
//! | 36 | 2 | node count (1 + number of ranges) |
//! | 38 | 2 | offset of the first node (48) |
//! | 40 | 8 | reserved |
//! | 48 | 16 | virtio-pci IOMMU node: type 3, reserved, length 16, segment, BDF, 8 reserved |
//! | 64 + 24·i | 24 | PCI range node: type 1, reserved, length 24, `endpoint_start` (u32), segment start, segment end, BDF start, BDF end, output node (48, the IOMMU node), 6 reserved |
//!
//! For a PCI function at `segment`/requester ID `rid` inside a range, Linux computes
//! the virtio-iommu endpoint ID as
//!
//! ```text
//! ((segment - segment_start) << 16) + (rid - bdf_start) + endpoint_start
//! ```
//!
//! A range only spans one segment here (`segment_start == segment_end`), so with
//! `endpoint_start = bdf_start` (see [`EndpointRange::identity`]) **the endpoint ID is
//! the function's BDF** (`bus << 8 | dev << 3 | func`) — the IDs Aperture's virtio-iommu
//! is configured with. [`EndpointRange::endpoint_id`] computes the same formula.
//!
//! Linux takes the first range that matches a requester ID, and walks every DMA alias
//! of a function (a device behind a PCIe-to-PCI bridge also uses the bridge's ID), so
//! ranges must not overlap and must cover the aliases too.

use dma_types::Bdf;

/// Length of the ACPI system description table header.
pub const SDT_HEADER_LEN: usize = 36;
/// Offset of the first node (the virtio-pci IOMMU node).
pub const IOMMU_NODE_OFFSET: u16 = 48;
/// VIOT node type: PCI range.
pub const NODE_PCI_RANGE: u8 = 1;
/// VIOT node type: virtio-pci IOMMU.
pub const NODE_VIRTIO_IOMMU_PCI: u8 = 3;
/// Length of a virtio-pci IOMMU node.
pub const IOMMU_NODE_LEN: u16 = 16;
/// Length of a PCI range node.
pub const PCI_RANGE_NODE_LEN: u16 = 24;
/// OEM ID written into the header.
pub const OEM_ID: [u8; 6] = *b"APERTR";
/// OEM table ID written into the header.
pub const OEM_TABLE_ID: [u8; 8] = *b"APERTURE";
/// Creator ID written into the header.
pub const CREATOR_ID: [u8; 4] = *b"APTR";
/// Most PCI range nodes a table can hold: `node_count` is a u16 and the last node's
/// offset must be representable too.
pub const MAX_RANGES: usize =
    (u16::MAX as usize - IOMMU_NODE_OFFSET as usize - IOMMU_NODE_LEN as usize)
        / PCI_RANGE_NODE_LEN as usize;

/// A contiguous range of PCI requester IDs (`first..=last`, one segment) translated by
/// the IOMMU; the function at `first` gets endpoint ID `endpoint_start`, the next
/// requester ID `endpoint_start + 1`, and so on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointRange {
    /// First function of the range.
    pub first: Bdf,
    /// Last function of the range (inclusive).
    pub last: Bdf,
    /// Endpoint ID of `first`.
    pub endpoint_start: u32,
}

impl EndpointRange {
    /// The range `first..=last` with `endpoint_start = first.requester_id()`, so that every
    /// function's endpoint ID is its BDF.
    pub const fn identity(first: Bdf, last: Bdf) -> Self {
        Self {
            first,
            last,
            endpoint_start: first.requester_id() as u32,
        }
    }

    /// Whether `f` lies in this range.
    pub fn contains(&self, f: Bdf) -> bool {
        f.segment == self.first.segment
            && (self.first.requester_id()..=self.last.requester_id()).contains(&f.requester_id())
    }

    /// The endpoint ID Linux assigns `f`
    /// (`((segment − segment_start) << 16) + (rid − bdf_start) + endpoint_start`), or
    /// `None` if `f` is outside the range or the ID does not fit in 32 bits.
    pub fn endpoint_id(&self, f: Bdf) -> Option<u32> {
        if !self.contains(f) {
            return None;
        }
        self.endpoint_start
            .checked_add(u32::from(f.requester_id() - self.first.requester_id()))
    }
}

/// Why a VIOT could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ViotError {
    /// A device number above 31 or a function number above 7.
    #[error("invalid PCI address {0:#} (device must be 0-31, function 0-7)")]
    InvalidBdf(Bdf),
    /// No endpoint range: the IOMMU would translate for nobody.
    #[error("no endpoint range given")]
    NoEndpoints,
    /// More ranges than a VIOT can describe.
    #[error("{0} endpoint ranges, at most {MAX_RANGES} fit in a VIOT")]
    TooManyRanges(usize),
    /// A range whose first function comes after its last.
    #[error("endpoint range {first:#}..={last:#} is reversed (first > last)")]
    Reversed {
        /// First function.
        first: Bdf,
        /// Last function.
        last: Bdf,
    },
    /// A range whose ends are in different PCI segments.
    #[error("endpoint range {first:#}..={last:#} spans segments {:#x} and {:#x}", first.segment, last.segment)]
    SegmentMismatch {
        /// First function.
        first: Bdf,
        /// Last function.
        last: Bdf,
    },
    /// A range that contains the IOMMU itself (a device cannot translate its own DMA).
    #[error("endpoint range {first:#}..={last:#} contains the IOMMU {iommu:#}")]
    IommuInRange {
        /// The IOMMU's address.
        iommu: Bdf,
        /// First function of the range.
        first: Bdf,
        /// Last function of the range.
        last: Bdf,
    },
    /// Two ranges share a function (Linux would use only the first for it).
    #[error("endpoint ranges {a_first:#}..={a_last:#} and {b_first:#}..={b_last:#} overlap")]
    Overlap {
        /// First function of the earlier range.
        a_first: Bdf,
        /// Last function of the earlier range.
        a_last: Bdf,
        /// First function of the later range.
        b_first: Bdf,
        /// Last function of the later range.
        b_last: Bdf,
    },
    /// `endpoint_start` plus the range's length passes `u32::MAX`.
    #[error(
        "endpoint range {first:#}..={last:#} from endpoint ID {endpoint_start:#x} overflows 32 bits"
    )]
    EndpointIdOverflow {
        /// First function.
        first: Bdf,
        /// Last function.
        last: Bdf,
        /// The range's `endpoint_start`.
        endpoint_start: u32,
    },
}

fn validate(iommu: Bdf, endpoints: &[EndpointRange]) -> Result<(), ViotError> {
    if !iommu.is_valid() {
        return Err(ViotError::InvalidBdf(iommu));
    }
    if endpoints.is_empty() {
        return Err(ViotError::NoEndpoints);
    }
    if endpoints.len() > MAX_RANGES {
        return Err(ViotError::TooManyRanges(endpoints.len()));
    }
    for (i, r) in endpoints.iter().enumerate() {
        let (first, last) = (r.first, r.last);
        for f in [first, last] {
            if !f.is_valid() {
                return Err(ViotError::InvalidBdf(f));
            }
        }
        if first.segment != last.segment {
            return Err(ViotError::SegmentMismatch { first, last });
        }
        if first.requester_id() > last.requester_id() {
            return Err(ViotError::Reversed { first, last });
        }
        if r.contains(iommu) {
            return Err(ViotError::IommuInRange { iommu, first, last });
        }
        if r.endpoint_start
            .checked_add(u32::from(last.requester_id() - first.requester_id()))
            .is_none()
        {
            return Err(ViotError::EndpointIdOverflow {
                first,
                last,
                endpoint_start: r.endpoint_start,
            });
        }
        if let Some(a) = endpoints[..i].iter().find(|a| {
            a.first.segment == first.segment
                && a.first.requester_id() <= last.requester_id()
                && first.requester_id() <= a.last.requester_id()
        }) {
            return Err(ViotError::Overlap {
                a_first: a.first,
                a_last: a.last,
                b_first: first,
                b_last: last,
            });
        }
    }
    Ok(())
}

/// Builds a complete VIOT table (header, checksum and all) naming `iommu` as a
/// virtio-pci IOMMU that translates for every function in `endpoints`.
///
/// # Errors
/// [`ViotError`] naming the offending address or range: a device above 31 or function
/// above 7, no ranges or too many, a range reversed, spanning two segments, containing
/// the IOMMU, overlapping an earlier range, or whose endpoint IDs pass `u32::MAX`.
pub fn build_viot(iommu: Bdf, endpoints: &[EndpointRange]) -> Result<Vec<u8>, ViotError> {
    validate(iommu, endpoints)?;
    let len = usize::from(IOMMU_NODE_OFFSET)
        + usize::from(IOMMU_NODE_LEN)
        + endpoints.len() * usize::from(PCI_RANGE_NODE_LEN);
    let mut t = Vec::with_capacity(len);

    // SDT header; the length and checksum are patched below.
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&0u32.to_le_bytes()); // length
    t.push(0); // revision
    t.push(0); // checksum
    t.extend_from_slice(&OEM_ID);
    t.extend_from_slice(&OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(&CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    debug_assert_eq!(t.len(), SDT_HEADER_LEN);

    // VIOT fields. Validation bounds the count by MAX_RANGES, which fits a u16.
    let node_count = u16::try_from(endpoints.len() + 1)
        .map_err(|_| ViotError::TooManyRanges(endpoints.len()))?;
    t.extend_from_slice(&node_count.to_le_bytes());
    t.extend_from_slice(&IOMMU_NODE_OFFSET.to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    // Node 0: the virtio-pci IOMMU.
    debug_assert_eq!(t.len(), usize::from(IOMMU_NODE_OFFSET));
    t.push(NODE_VIRTIO_IOMMU_PCI);
    t.push(0);
    t.extend_from_slice(&IOMMU_NODE_LEN.to_le_bytes());
    t.extend_from_slice(&iommu.segment.to_le_bytes());
    t.extend_from_slice(&iommu.requester_id().to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    // One PCI range node per endpoint range, all pointing at node 0.
    for r in endpoints {
        t.push(NODE_PCI_RANGE);
        t.push(0);
        t.extend_from_slice(&PCI_RANGE_NODE_LEN.to_le_bytes());
        t.extend_from_slice(&r.endpoint_start.to_le_bytes());
        t.extend_from_slice(&r.first.segment.to_le_bytes());
        t.extend_from_slice(&r.last.segment.to_le_bytes());
        t.extend_from_slice(&r.first.requester_id().to_le_bytes());
        t.extend_from_slice(&r.last.requester_id().to_le_bytes());
        t.extend_from_slice(&IOMMU_NODE_OFFSET.to_le_bytes());
        t.extend_from_slice(&[0; 6]);
    }
    debug_assert_eq!(t.len(), len);

    // At most 48 + 16 + 24 * MAX_RANGES < 2^16 bytes, so the length fits a u32.
    let total = u32::try_from(t.len()).map_err(|_| ViotError::TooManyRanges(endpoints.len()))?;
    t[4..8].copy_from_slice(&total.to_le_bytes());
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    Ok(t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

    use super::*;

    fn f(bus: u8, device: u8, function: u8) -> Bdf {
        Bdf {
            segment: 0,
            bus,
            device,
            function,
        }
    }

    fn u16_at(t: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([t[o], t[o + 1]])
    }

    fn u32_at(t: &[u8], o: usize) -> u32 {
        u32::from_le_bytes([t[o], t[o + 1], t[o + 2], t[o + 3]])
    }

    fn sum(t: &[u8]) -> u8 {
        t.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// A PCI range node as Linux reads it: endpoint_start, segment_start, segment_end,
    /// bdf_start, bdf_end.
    type ParsedRange = (u32, u16, u16, u16, u16);

    /// What `drivers/acpi/viot.c` does with a table: walk `node_count` nodes from
    /// `node_offset` (bounds-checked), resolve each PCI range's `output_node` to a
    /// virtio-pci IOMMU node, and return (iommu segment, iommu bdf, range fields).
    fn linux_parse(t: &[u8]) -> Vec<((u16, u16), ParsedRange)> {
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(u32_at(t, 4) as usize, t.len());
        let count = u16_at(t, 36);
        let mut off = usize::from(u16_at(t, 38));
        let mut out = Vec::new();
        for _ in 0..count {
            assert!(off + 4 <= t.len());
            let len = usize::from(u16_at(t, off + 2));
            assert!(len >= 4 && off + len <= t.len());
            if t[off] == NODE_PCI_RANGE {
                assert_eq!(len, 24);
                let out_node = usize::from(u16_at(t, off + 16));
                assert!(out_node + 16 <= t.len());
                assert_eq!(
                    t[out_node], NODE_VIRTIO_IOMMU_PCI,
                    "output_node must be a virtio-pci IOMMU node"
                );
                let iommu = (u16_at(t, out_node + 4), u16_at(t, out_node + 6));
                out.push((
                    iommu,
                    (
                        u32_at(t, off + 4),
                        u16_at(t, off + 8),
                        u16_at(t, off + 10),
                        u16_at(t, off + 12),
                        u16_at(t, off + 14),
                    ),
                ));
            }
            off += len;
        }
        out
    }

    /// Linux's `epid` formula for a function matched against a parsed range.
    fn linux_epid(range: ParsedRange, dev: Bdf) -> Option<u32> {
        let (start, seg_start, seg_end, bdf_start, bdf_end) = range;
        let rid = dev.requester_id();
        if dev.segment < seg_start || dev.segment > seg_end || rid < bdf_start || rid > bdf_end {
            return None;
        }
        Some((u32::from(dev.segment - seg_start) << 16) + u32::from(rid - bdf_start) + start)
    }

    #[test]
    fn bdf_packs_bus_device_function() {
        assert_eq!(f(0, 0, 0).requester_id(), 0);
        assert_eq!(f(0, 5, 0).requester_id(), 0x28);
        assert_eq!(f(0, 6, 0).requester_id(), 0x30);
        assert_eq!(f(0x12, 0x1f, 7).requester_id(), 0x12ff);
        assert_eq!(f(0xff, 0x1f, 7).requester_id(), 0xffff);
        assert_eq!(format!("{:#}", f(1, 2, 3)), "0000:01:02.3");
    }

    #[test]
    fn one_endpoint_table_field_by_field() {
        let iommu = f(0, 5, 0);
        let ep = f(0, 6, 0);
        let t = build_viot(iommu, &[EndpointRange::identity(ep, ep)]).unwrap();
        assert_eq!(t.len(), 88);
        // SDT header
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(u32_at(&t, 4), 88);
        assert_eq!(t[8], 0, "revision");
        assert_eq!(&t[10..16], b"APERTR");
        assert_eq!(&t[16..24], b"APERTURE");
        assert_eq!(u32_at(&t, 24), 1, "OEM revision");
        assert_eq!(&t[28..32], b"APTR");
        assert_eq!(u32_at(&t, 32), 1, "creator revision");
        // VIOT fields
        assert_eq!(u16_at(&t, 36), 2, "node count");
        assert_eq!(u16_at(&t, 38), 48, "node offset");
        assert_eq!(&t[40..48], &[0; 8]);
        // virtio-pci IOMMU node
        assert_eq!(t[48], 3, "type");
        assert_eq!(t[49], 0);
        assert_eq!(u16_at(&t, 50), 16, "length");
        assert_eq!(u16_at(&t, 52), 0, "segment");
        assert_eq!(u16_at(&t, 54), 0x28, "bdf");
        assert_eq!(&t[56..64], &[0; 8]);
        // PCI range node
        assert_eq!(t[64], 1, "type");
        assert_eq!(t[65], 0);
        assert_eq!(u16_at(&t, 66), 24, "length");
        assert_eq!(u32_at(&t, 68), 0x30, "endpoint_start");
        assert_eq!(u16_at(&t, 72), 0, "segment_start");
        assert_eq!(u16_at(&t, 74), 0, "segment_end");
        assert_eq!(u16_at(&t, 76), 0x30, "bdf_start");
        assert_eq!(u16_at(&t, 78), 0x30, "bdf_end");
        assert_eq!(u16_at(&t, 80), 48, "output_node");
        assert_eq!(&t[82..88], &[0; 6]);
        // checksum
        assert_eq!(sum(&t), 0);

        // The same bytes written out in full (checksum at offset 9).
        #[rustfmt::skip]
        let mut want: Vec<u8> = vec![
            b'V', b'I', b'O', b'T', 88, 0, 0, 0, 0, 0,
            b'A', b'P', b'E', b'R', b'T', b'R',
            b'A', b'P', b'E', b'R', b'T', b'U', b'R', b'E',
            1, 0, 0, 0, b'A', b'P', b'T', b'R', 1, 0, 0, 0,
            2, 0, 48, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            3, 0, 16, 0, 0, 0, 0x28, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            1, 0, 24, 0, 0x30, 0, 0, 0, 0, 0, 0, 0, 0x30, 0, 0x30, 0, 48, 0, 0, 0, 0, 0, 0, 0,
        ];
        want[9] = 0u8.wrapping_sub(sum(&want));
        assert_eq!(t, want);
    }

    #[test]
    fn checksum_sums_to_zero() {
        for n in 1..=8u8 {
            let ranges: Vec<_> = (0..n)
                .map(|i| EndpointRange::identity(f(1, i, 0), f(1, i, 7)))
                .collect();
            let t = build_viot(f(0, 1, 0), &ranges).unwrap();
            assert_eq!(sum(&t), 0, "{n} ranges");
            assert_eq!(t.len(), 64 + 24 * usize::from(n));
        }
    }

    #[test]
    fn multiple_ranges_in_order() {
        let ranges = [
            EndpointRange::identity(f(0, 3, 0), f(0, 4, 7)),
            EndpointRange {
                first: f(2, 0, 0),
                last: f(3, 0x1f, 7),
                endpoint_start: 0x1000,
            },
            EndpointRange::identity(
                Bdf {
                    segment: 1,
                    bus: 0,
                    device: 0,
                    function: 0,
                },
                Bdf {
                    segment: 1,
                    bus: 0xff,
                    device: 0x1f,
                    function: 7,
                },
            ),
        ];
        let t = build_viot(f(0, 2, 0), &ranges).unwrap();
        assert_eq!(t.len(), 64 + 3 * 24);
        assert_eq!(u16_at(&t, 36), 4);
        let parsed = linux_parse(&t);
        assert_eq!(parsed.len(), 3);
        for ((iommu, range), r) in parsed.iter().zip(&ranges) {
            assert_eq!(*iommu, (0, 0x10));
            assert_eq!(
                *range,
                (
                    r.endpoint_start,
                    r.first.segment,
                    r.last.segment,
                    r.first.requester_id(),
                    r.last.requester_id()
                )
            );
        }
        assert_eq!(parsed[0].1, (0x18, 0, 0, 0x18, 0x27));
        assert_eq!(parsed[1].1, (0x1000, 0, 0, 0x200, 0x3ff));
        assert_eq!(parsed[2].1, (0, 1, 1, 0, 0xffff));
        assert_eq!(sum(&t), 0);
    }

    #[test]
    fn identity_ranges_give_endpoint_id_equal_to_bdf() {
        let ranges = [
            EndpointRange::identity(f(0, 6, 0), f(0, 9, 7)),
            EndpointRange::identity(f(1, 0, 0), f(1, 0x1f, 7)),
        ];
        let t = build_viot(f(0, 5, 0), &ranges).unwrap();
        let parsed = linux_parse(&t);
        for (bus, dev, func) in [
            (0, 6, 0),
            (0, 7, 3),
            (0, 9, 7),
            (1, 0, 0),
            (1, 0x11, 2),
            (1, 0x1f, 7),
        ] {
            let d = f(bus, dev, func);
            let ids: Vec<u32> = parsed
                .iter()
                .filter_map(|(_, r)| linux_epid(*r, d))
                .collect();
            assert_eq!(ids, vec![u32::from(d.requester_id())], "{d}");
            let ours: Vec<u32> = ranges.iter().filter_map(|r| r.endpoint_id(d)).collect();
            assert_eq!(ours, ids, "{d}");
        }
        for d in [f(0, 5, 0), f(0, 10, 0), f(2, 0, 0)] {
            assert!(
                parsed.iter().all(|(_, r)| linux_epid(*r, d).is_none()),
                "{d}"
            );
            assert!(ranges.iter().all(|r| r.endpoint_id(d).is_none()), "{d}");
        }
        // A non-identity range offsets the ID.
        let r = EndpointRange {
            first: f(0, 6, 0),
            last: f(0, 6, 7),
            endpoint_start: 100,
        };
        assert_eq!(r.endpoint_id(f(0, 6, 3)), Some(103));
    }

    #[test]
    fn error_invalid_bdf() {
        let ok = f(0, 6, 0);
        assert_eq!(
            build_viot(f(0, 32, 0), &[EndpointRange::identity(ok, ok)]),
            Err(ViotError::InvalidBdf(f(0, 32, 0)))
        );
        assert_eq!(
            build_viot(f(0, 5, 0), &[EndpointRange::identity(ok, f(0, 6, 8))]),
            Err(ViotError::InvalidBdf(f(0, 6, 8)))
        );
        assert_eq!(
            build_viot(
                f(0, 5, 0),
                &[EndpointRange::identity(f(0, 0x20, 0), f(0, 0x20, 0))]
            ),
            Err(ViotError::InvalidBdf(f(0, 0x20, 0)))
        );
    }

    #[test]
    fn error_no_endpoints_and_too_many() {
        assert_eq!(build_viot(f(0, 5, 0), &[]), Err(ViotError::NoEndpoints));
        let one = EndpointRange::identity(f(1, 0, 0), f(1, 0, 0));
        let many = vec![one; MAX_RANGES + 1];
        assert_eq!(
            build_viot(f(0, 5, 0), &many),
            Err(ViotError::TooManyRanges(MAX_RANGES + 1))
        );
    }

    #[test]
    fn max_ranges_fit() {
        // MAX_RANGES distinct single-function ranges on buses 1.. (none contains 00:05.0).
        let ranges: Vec<_> = (0..MAX_RANGES)
            .map(|i| {
                let rid = u16::try_from(0x100 + i).unwrap();
                let d = Bdf {
                    segment: 0,
                    bus: (rid >> 8) as u8,
                    device: ((rid >> 3) & 0x1f) as u8,
                    function: (rid & 7) as u8,
                };
                EndpointRange::identity(d, d)
            })
            .collect();
        let t = build_viot(f(0, 5, 0), &ranges).unwrap();
        assert!(t.len() <= usize::from(u16::MAX));
        assert_eq!(usize::from(u16_at(&t, 36)), MAX_RANGES + 1);
        assert_eq!(sum(&t), 0);
        assert_eq!(linux_parse(&t).len(), MAX_RANGES);
    }

    #[test]
    fn error_reversed() {
        let (a, b) = (f(0, 7, 0), f(0, 6, 0));
        assert_eq!(
            build_viot(f(0, 5, 0), &[EndpointRange::identity(a, b)]),
            Err(ViotError::Reversed { first: a, last: b })
        );
        let (a, b) = (f(0, 6, 2), f(0, 6, 1));
        assert_eq!(
            build_viot(f(0, 5, 0), &[EndpointRange::identity(a, b)]),
            Err(ViotError::Reversed { first: a, last: b })
        );
    }

    #[test]
    fn error_segment_mismatch() {
        let a = f(0, 6, 0);
        let b = Bdf { segment: 1, ..a };
        let e = build_viot(f(0, 5, 0), &[EndpointRange::identity(a, b)]);
        assert_eq!(e, Err(ViotError::SegmentMismatch { first: a, last: b }));
        assert_eq!(
            e.unwrap_err().to_string(),
            "endpoint range 0000:00:06.0..=0001:00:06.0 spans segments 0x0 and 0x1"
        );
    }

    #[test]
    fn error_iommu_in_range() {
        let iommu = f(0, 5, 0);
        for (a, b) in [
            (f(0, 0, 0), f(0, 0x1f, 7)),
            (iommu, iommu),
            (f(0, 5, 0), f(0, 6, 0)),
            (f(0, 4, 7), f(0, 5, 0)),
        ] {
            assert_eq!(
                build_viot(iommu, &[EndpointRange::identity(a, b)]),
                Err(ViotError::IommuInRange {
                    iommu,
                    first: a,
                    last: b
                })
            );
        }
        // Later range, still caught.
        let ok = EndpointRange::identity(f(0, 6, 0), f(0, 6, 0));
        let bad = EndpointRange::identity(f(0, 4, 0), f(0, 5, 1));
        assert_eq!(
            build_viot(iommu, &[ok, bad]),
            Err(ViotError::IommuInRange {
                iommu,
                first: bad.first,
                last: bad.last
            })
        );
        // The same BDF in another segment is a different function.
        let other = Bdf {
            segment: 1,
            ..iommu
        };
        assert!(build_viot(iommu, &[EndpointRange::identity(other, other)]).is_ok());
        // Right next to the IOMMU is fine.
        assert!(build_viot(
            iommu,
            &[
                EndpointRange::identity(f(0, 0, 0), f(0, 4, 7)),
                EndpointRange::identity(f(0, 5, 1), f(0, 0x1f, 7))
            ]
        )
        .is_ok());
    }

    #[test]
    fn error_overlap() {
        let a = EndpointRange::identity(f(0, 6, 0), f(0, 8, 0));
        let b = EndpointRange::identity(f(0, 8, 0), f(0, 9, 0));
        assert_eq!(
            build_viot(f(0, 5, 0), &[a, b]),
            Err(ViotError::Overlap {
                a_first: a.first,
                a_last: a.last,
                b_first: b.first,
                b_last: b.last
            })
        );
        let inner = EndpointRange::identity(f(0, 7, 0), f(0, 7, 0));
        assert!(matches!(
            build_viot(f(0, 5, 0), &[a, inner]),
            Err(ViotError::Overlap { .. })
        ));
        assert!(matches!(
            build_viot(f(0, 5, 0), &[inner, a]),
            Err(ViotError::Overlap { .. })
        ));
        // Same BDFs in different segments do not overlap.
        let c = EndpointRange::identity(
            Bdf {
                segment: 2,
                ..a.first
            },
            Bdf {
                segment: 2,
                ..a.last
            },
        );
        assert!(build_viot(f(0, 5, 0), &[a, c]).is_ok());
    }

    #[test]
    fn error_endpoint_id_overflow() {
        let (a, b) = (f(0, 6, 0), f(0, 6, 7));
        let r = EndpointRange {
            first: a,
            last: b,
            endpoint_start: u32::MAX - 6,
        };
        assert_eq!(
            build_viot(f(0, 5, 0), &[r]),
            Err(ViotError::EndpointIdOverflow {
                first: a,
                last: b,
                endpoint_start: u32::MAX - 6
            })
        );
        let r = EndpointRange {
            endpoint_start: u32::MAX - 7,
            ..r
        };
        assert!(build_viot(f(0, 5, 0), &[r]).is_ok());
        assert_eq!(r.endpoint_id(b), Some(u32::MAX));
    }

    #[test]
    fn errors_name_the_offending_value() {
        let iommu = f(0, 5, 0);
        let e = build_viot(iommu, &[EndpointRange::identity(iommu, iommu)]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "endpoint range 0000:00:05.0..=0000:00:05.0 contains the IOMMU 0000:00:05.0"
        );
        let e = build_viot(f(0, 40, 0), &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid PCI address 0000:00:28.0 (device must be 0-31, function 0-7)"
        );
    }
}
