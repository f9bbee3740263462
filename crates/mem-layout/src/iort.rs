//! The ACPI IORT table (Arm "IO Remapping Table", DEN 0049): header and checksum, the
//! node list, each node's ID mappings, and the Reserved Memory Range (RMR) nodes that
//! Arm hosts use where Intel has RMRRs and AMD IVMDs (GPU, NIC and boot framebuffer
//! pass-through behind an SMMU).
//!
//! Layout as in DEN 0049E.d and ACPICA `source/include/actbl2.h`: the 36-byte ACPI
//! header, then `NodeCount` at 36 and `NodeOffset` at 40. Every node starts with
//! `u8 Type; u16 Length; u8 Revision; u32 Identifier; u32 MappingCount;
//! u32 MappingOffset`, and its ID mappings (20 bytes each: input base, number of IDs
//! minus one, output base, output reference, flags) lie at `MappingOffset` inside it.
//! Node types used here: 1 named component (its ACPI device name), 2 PCI root complex
//! (its segment), 3 SMMUv1/v2 and 4 SMMUv3 (the IOMMUs stream IDs belong to), 6 RMR
//! (flags, and its memory range descriptors: base, length, 4 reserved bytes).
//!
//! This module only decodes, but checks every offset it follows — node list, mapping
//! arrays, descriptor arrays and output references — so a table that points outside
//! itself or at a node that is not there is an error naming the byte offset. Which
//! devices an RMR reaches, and Linux's rules for revisions, alignment and overlaps, are
//! [`crate::rdm::RdmDatabase::add_iort`].

use crate::acpi::{u16_at, u32_at, u64_at, AcpiHeader, ACPI_HEADER_LEN};
use std::path::{Path, PathBuf};

/// Header length: ACPI header, node count, node offset, 4 reserved bytes.
pub const IORT_HEADER_LEN: usize = ACPI_HEADER_LEN + 12;
/// The common node header (type, length, revision, identifier, mapping count/offset).
pub const NODE_HEADER_LEN: usize = 16;
/// One ID mapping.
pub const ID_MAPPING_LEN: usize = 20;
/// One RMR memory range descriptor.
pub const RMR_DESC_LEN: usize = 20;

/// Node type 1: named component.
pub const NODE_NAMED_COMPONENT: u8 = 1;
/// Node type 2: PCI root complex.
pub const NODE_ROOT_COMPLEX: u8 = 2;
/// Node type 3: SMMUv1 or SMMUv2.
pub const NODE_SMMU_V2: u8 = 3;
/// Node type 4: SMMUv3.
pub const NODE_SMMU_V3: u8 = 4;
/// Node type 6: reserved memory range.
pub const NODE_RMR: u8 = 6;

/// RMR flag bit 0: the OS may remap the range (Linux: `direct-relaxable`).
pub const RMR_REMAP_PERMITTED: u32 = 1;
/// RMR flag bit 1: accesses are privileged.
pub const RMR_ACCESS_PRIVILEGED: u32 = 2;

/// Errors of this module: a table that is not a well-formed IORT. Every message names
/// the table and the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum IortError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The ACPI header is refused (length, signature, Length field, checksum).
    #[error(transparent)]
    Header(#[from] crate::acpi::HeaderError),
    /// The node list starts inside the header or past the table.
    #[error("IORT: the node offset at offset 40 is {node_offset:#x}, outside [{IORT_HEADER_LEN:#x}, {len:#x})")]
    NodeOffset {
        /// The NodeOffset field.
        node_offset: u32,
        /// Table length.
        len: usize,
    },
    /// A node header that does not fit, or a Length below the header or past the table.
    #[error("IORT: node {index} at offset {offset:#x} has length {len}, but {remaining} bytes remain (a node is at least {NODE_HEADER_LEN})")]
    NodeLength {
        /// Index in the node list.
        index: u32,
        /// Offset in the table.
        offset: usize,
        /// Its Length field (0 when not even the header fits).
        len: u16,
        /// Bytes left in the table from that offset.
        remaining: usize,
    },
    /// A node shorter than its type's fixed part.
    #[error(
        "IORT: {what} node at offset {offset:#x} has length {len}, below its fixed {min} bytes"
    )]
    NodeTooShort {
        /// The node type, by name.
        what: &'static str,
        /// Offset in the table.
        offset: usize,
        /// Its Length field.
        len: u16,
        /// The fixed part.
        min: usize,
    },
    /// An array (ID mappings, RMR descriptors) that runs past its node.
    #[error("IORT: {what} of the node at offset {node:#x} ({count} from node offset {at:#x}) run past the node's {len} bytes")]
    ArrayPastNode {
        /// "ID mappings" or "RMR descriptors".
        what: &'static str,
        /// The node's offset.
        node: usize,
        /// Entries announced.
        count: u32,
        /// Where they start, relative to the node.
        at: u32,
        /// The node's length.
        len: u16,
    },
    /// An ID mapping whose output reference is not the offset of any node.
    #[error("IORT: ID mapping at offset {offset:#x} refers to offset {reference:#x}, where no node starts")]
    MissingNode {
        /// Offset of the ID mapping in the table.
        offset: usize,
        /// Its output reference.
        reference: u32,
    },
}

/// One ID mapping: input IDs `input_base ..= input_base + id_count` map to output IDs
/// from `output_base` on the node at `output_reference`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    /// Offset of the mapping in the table.
    pub offset: usize,
    /// Lowest input ID (a requester ID for a root complex).
    pub input_base: u32,
    /// The number of IDs in the range **minus one** (DEN 0049E: "Number of IDs").
    pub id_count: u32,
    /// Lowest output ID (a stream ID when the output is an SMMU).
    pub output_base: u32,
    /// Table offset of the output node (checked to be a node).
    pub output_reference: u32,
    /// Flag bit 0: single mapping (the input is ignored; one output ID).
    pub single: bool,
}

impl IdMapping {
    /// The output IDs this mapping produces, inclusive.
    pub fn outputs(&self) -> (u32, u32) {
        let n = if self.single { 0 } else { self.id_count };
        (self.output_base, self.output_base.saturating_add(n))
    }
}

/// One memory range descriptor of an RMR node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RmrDescriptor {
    /// Offset of the descriptor in the table.
    pub offset: usize,
    /// Base address.
    pub base: u64,
    /// Length in bytes.
    pub length: u64,
}

/// What a node is, with the parts this crate reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A named component and its ACPI device object name (e.g. `\_SB_.DPU0`).
    NamedComponent {
        /// The device object name.
        name: String,
    },
    /// A PCI root complex.
    RootComplex {
        /// Its PCI segment.
        segment: u32,
    },
    /// An SMMU (v1/v2 or v3): where stream IDs live.
    Smmu,
    /// A reserved memory range node.
    Rmr {
        /// Flags: [`RMR_REMAP_PERMITTED`], [`RMR_ACCESS_PRIVILEGED`], bits 9:2 memory
        /// access attributes.
        flags: u32,
        /// The memory ranges.
        descriptors: Vec<RmrDescriptor>,
    },
    /// Any other node (ITS group, PMCG…): its type.
    Other(u8),
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Offset in the table (what output references point at).
    pub offset: usize,
    /// Node revision.
    pub revision: u8,
    /// What it is.
    pub kind: NodeKind,
    /// Its ID mappings.
    pub mappings: Vec<IdMapping>,
}

impl Node {
    /// Whether stream IDs are output to this node (an SMMU).
    pub fn is_smmu(&self) -> bool {
        self.kind == NodeKind::Smmu
    }
}

/// An RMR's memory access attributes (flags bits 9:2): 0x00–0x03 are device memory
/// (Linux adds `IOMMU_MMIO`), 0x05 normal write-back (`IOMMU_CACHE`).
pub fn rmr_access_attributes(flags: u32) -> u8 {
    // Masked to 8 bits first, so the cast keeps every bit.
    ((flags >> 2) & 0xff) as u8
}

/// A decoded IORT table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iort {
    /// The ACPI header (revision 5 is DEN 0049E.d, the first with today's RMR node).
    pub header: AcpiHeader,
    /// Every node, in table order.
    pub nodes: Vec<Node>,
}

impl Iort {
    /// The node at a table offset.
    pub fn node_at(&self, offset: u32) -> Option<&Node> {
        self.nodes
            .iter()
            .find(|n| u32::try_from(n.offset).ok() == Some(offset))
    }
}

/// Where `count` entries of `size` bytes from node-relative `at` lie in the table, if
/// they fit inside the node `[node, node + len)`.
fn array_in_node(node: usize, len: usize, at: u32, count: u32, size: usize) -> Option<usize> {
    let at = usize::try_from(at).ok()?;
    let bytes = usize::try_from(count).ok()?.checked_mul(size)?;
    let end = at.checked_add(bytes)?;
    (end <= len).then_some(node + at)
}

/// Decodes an IORT table from its bytes, checking signature, length, checksum, every
/// node's bounds and every ID mapping's output reference.
///
/// # Errors
/// Any [`IortError`] but `Io`.
pub fn parse(table: &[u8]) -> Result<Iort, IortError> {
    let header = crate::acpi::check(table, "IORT", IORT_HEADER_LEN)?;
    let count = u32_at(table, 36);
    let node_offset = u32_at(table, 40);
    let first = usize::try_from(node_offset)
        .ok()
        .filter(|o| (IORT_HEADER_LEN..=table.len()).contains(o))
        .ok_or(IortError::NodeOffset {
            node_offset,
            len: table.len(),
        })?;
    let mut nodes = Vec::new();
    let mut at = first;
    // Each node is at least 16 bytes, so a count larger than the table allows is caught
    // by the length check below before it can make this loop long.
    for index in 0..count {
        let remaining = table.len() - at;
        if remaining < NODE_HEADER_LEN {
            return Err(IortError::NodeLength {
                index,
                offset: at,
                len: 0,
                remaining,
            });
        }
        let kind = table[at];
        let len = u16_at(table, at + 1);
        let l = usize::from(len);
        if l < NODE_HEADER_LEN || l > remaining {
            return Err(IortError::NodeLength {
                index,
                offset: at,
                len,
                remaining,
            });
        }
        let map_count = u32_at(table, at + 8);
        let map_offset = u32_at(table, at + 12);
        let mut mappings = Vec::new();
        if map_count > 0 {
            let start = array_in_node(at, l, map_offset, map_count, ID_MAPPING_LEN).ok_or(
                IortError::ArrayPastNode {
                    what: "ID mappings",
                    node: at,
                    count: map_count,
                    at: map_offset,
                    len,
                },
            )?;
            for i in 0..map_count as usize {
                let m = start + i * ID_MAPPING_LEN;
                mappings.push(IdMapping {
                    offset: m,
                    input_base: u32_at(table, m),
                    id_count: u32_at(table, m + 4),
                    output_base: u32_at(table, m + 8),
                    output_reference: u32_at(table, m + 12),
                    single: u32_at(table, m + 16) & 1 != 0,
                });
            }
        }
        let too_short = |what, min| IortError::NodeTooShort {
            what,
            offset: at,
            len,
            min,
        };
        let kind = match kind {
            NODE_NAMED_COMPONENT => {
                // Node flags 4, memory properties 8, address size limit 1, then the name.
                let name_at = NODE_HEADER_LEN + 13;
                if l <= name_at {
                    return Err(too_short("named component", name_at + 1));
                }
                let raw = &table[at + name_at..at + l];
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                NodeKind::NamedComponent {
                    name: String::from_utf8_lossy(&raw[..end]).into_owned(),
                }
            }
            NODE_ROOT_COMPLEX => {
                // Memory properties 8, ATS attribute 4, PCI segment 4.
                let min = NODE_HEADER_LEN + 16;
                if l < min {
                    return Err(too_short("root complex", min));
                }
                NodeKind::RootComplex {
                    segment: u32_at(table, at + NODE_HEADER_LEN + 12),
                }
            }
            NODE_SMMU_V2 | NODE_SMMU_V3 => NodeKind::Smmu,
            NODE_RMR => {
                // Flags 4, number of descriptors 4, descriptor offset 4.
                let min = NODE_HEADER_LEN + 12;
                if l < min {
                    return Err(too_short("RMR", min));
                }
                let flags = u32_at(table, at + 16);
                let n = u32_at(table, at + 20);
                let off = u32_at(table, at + 24);
                let mut descriptors = Vec::new();
                if n > 0 {
                    let start = array_in_node(at, l, off, n, RMR_DESC_LEN).ok_or(
                        IortError::ArrayPastNode {
                            what: "RMR descriptors",
                            node: at,
                            count: n,
                            at: off,
                            len,
                        },
                    )?;
                    for i in 0..n as usize {
                        let d = start + i * RMR_DESC_LEN;
                        descriptors.push(RmrDescriptor {
                            offset: d,
                            base: u64_at(table, d),
                            length: u64_at(table, d + 8),
                        });
                    }
                }
                NodeKind::Rmr { flags, descriptors }
            }
            other => NodeKind::Other(other),
        };
        nodes.push(Node {
            offset: at,
            revision: table[at + 3],
            kind,
            mappings,
        });
        at += l;
    }
    // Every output reference must be the start of a node.
    let starts: std::collections::BTreeSet<u32> = nodes
        .iter()
        .filter_map(|n| u32::try_from(n.offset).ok())
        .collect();
    for node in &nodes {
        for m in &node.mappings {
            if !starts.contains(&m.output_reference) {
                return Err(IortError::MissingNode {
                    offset: m.offset,
                    reference: m.output_reference,
                });
            }
        }
    }
    Ok(Iort { header, nodes })
}

/// Reads and decodes an IORT table from a file, e.g. `/sys/firmware/acpi/tables/IORT`
/// (root only) or an `acpidump -b` output.
///
/// # Errors
/// [`IortError::Io`] if the file cannot be read, else as [`parse`].
pub fn read(path: &Path) -> Result<Iort, IortError> {
    let bytes = std::fs::read(path).map_err(|source| IortError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes)
}

/// Test helper shared with the other modules: builds IORT tables by hand.
#[cfg(test)]
pub(crate) mod build {
    /// One ID mapping.
    pub fn mapping(input: u32, count: u32, output: u32, reference: u32, single: bool) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [input, count, output, reference, u32::from(single)] {
            m.extend(v.to_le_bytes());
        }
        m
    }

    /// A node: header, body, then the mappings right after the body.
    pub fn node(kind: u8, revision: u8, body: &[u8], mappings: &[Vec<u8>]) -> Vec<u8> {
        let maps: Vec<u8> = mappings.concat();
        let len = 16 + body.len() + maps.len();
        let mut n = vec![kind];
        n.extend((len as u16).to_le_bytes());
        n.push(revision);
        n.extend(0u32.to_le_bytes());
        n.extend((mappings.len() as u32).to_le_bytes());
        let off = if mappings.is_empty() {
            0
        } else {
            16 + body.len()
        };
        n.extend((off as u32).to_le_bytes());
        n.extend(body);
        n.extend(maps);
        n
    }

    /// An SMMUv3 node body (68 bytes of fields this crate does not read).
    pub fn smmu_v3() -> Vec<u8> {
        node(4, 4, &[0u8; 52], &[])
    }

    /// A root complex of `segment` whose RIDs map 1:1 to stream IDs of the node at
    /// `smmu`.
    pub fn root_complex(segment: u32, smmu: u32) -> Vec<u8> {
        let mut body = vec![0u8; 12];
        body.extend(segment.to_le_bytes());
        body.extend([0u8; 8]);
        node(2, 4, &body, &[mapping(0, 0xffff, 0, smmu, false)])
    }

    /// A named component with stream ID `sid` on the node at `smmu`.
    pub fn named(name: &str, sid: u32, smmu: u32) -> Vec<u8> {
        let mut body = vec![0u8; 13];
        body.extend(name.as_bytes());
        body.push(0);
        while !body.len().is_multiple_of(4) {
            body.push(0);
        }
        node(1, 4, &body, &[mapping(0, 0, sid, smmu, true)])
    }

    /// An RMR node with the given flags, descriptors (base, length) and mappings; the
    /// descriptors follow the mappings.
    pub fn rmr(flags: u32, descs: &[(u64, u64)], mappings: &[Vec<u8>]) -> Vec<u8> {
        let maps: Vec<u8> = mappings.concat();
        let desc_off = 28 + maps.len();
        let len = desc_off + 20 * descs.len();
        let mut n = vec![6];
        n.extend((len as u16).to_le_bytes());
        n.push(3);
        n.extend(0u32.to_le_bytes());
        n.extend((mappings.len() as u32).to_le_bytes());
        n.extend(28u32.to_le_bytes());
        n.extend(flags.to_le_bytes());
        n.extend((descs.len() as u32).to_le_bytes());
        n.extend((desc_off as u32).to_le_bytes());
        n.extend(maps);
        for (base, length) in descs {
            n.extend(base.to_le_bytes());
            n.extend(length.to_le_bytes());
            n.extend(0u32.to_le_bytes());
        }
        n
    }

    /// A whole table of the given revision with a correct length and checksum; nodes
    /// start at 48.
    pub fn table(revision: u8, nodes: &[Vec<u8>]) -> Vec<u8> {
        let mut t = b"IORT".to_vec();
        t.extend([0u8; 4]);
        t.extend([revision, 0]);
        t.extend(*b"APERTR");
        t.extend(*b"HANDMADE");
        t.extend([0u8; 12]);
        t.extend((nodes.len() as u32).to_le_bytes());
        t.extend(48u32.to_le_bytes());
        t.extend(0u32.to_le_bytes());
        for n in nodes {
            t.extend(n);
        }
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[9] = 0u8.wrapping_sub(sum);
        t
    }

    /// Offsets: SMMU at 48 (68 bytes), root complex at 116.
    pub const SMMU_AT: u32 = 48;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acpi::HeaderError;

    fn sample() -> Vec<u8> {
        build::table(
            5,
            &[
                build::smmu_v3(),
                build::root_complex(0, build::SMMU_AT),
                build::named("\\_SB_.GPU0", 0x1_0000, build::SMMU_AT),
                build::rmr(
                    RMR_REMAP_PERMITTED | (5 << 2),
                    &[(0x8000_0000, 0x10_0000)],
                    &[build::mapping(0, 0, 0x0300, build::SMMU_AT, false)],
                ),
            ],
        )
    }

    #[test]
    fn iort_hand_built_table_round_trips_nodes_mappings_and_rmr() {
        let d = parse(&sample()).expect("well-formed");
        assert_eq!(d.header.revision, 5);
        assert_eq!(d.nodes.len(), 4);
        assert!(d.nodes[0].is_smmu());
        assert_eq!(d.nodes[1].kind, NodeKind::RootComplex { segment: 0 });
        assert_eq!(
            d.nodes[2].kind,
            NodeKind::NamedComponent {
                name: "\\_SB_.GPU0".into()
            }
        );
        assert_eq!(d.nodes[2].mappings[0].outputs(), (0x1_0000, 0x1_0000));
        match &d.nodes[3].kind {
            NodeKind::Rmr { flags, descriptors } => {
                assert_eq!(rmr_access_attributes(*flags), 5);
                assert_eq!(descriptors[0].base, 0x8000_0000);
                assert_eq!(descriptors[0].length, 0x10_0000);
            }
            other => panic!("not an RMR: {other:?}"),
        }
        assert!(d.node_at(build::SMMU_AT).is_some_and(Node::is_smmu));
    }

    #[test]
    fn iort_bad_checksum_is_an_error_naming_the_table_and_offset() {
        let mut t = sample();
        t[9] = t[9].wrapping_add(3);
        let e = parse(&t).expect_err("checksum");
        assert!(matches!(
            e,
            IortError::Header(HeaderError::Checksum { sum: 3, .. })
        ));
        assert!(
            e.to_string().starts_with("IORT: checksum (offset 9)"),
            "{e}"
        );
    }

    #[test]
    fn iort_truncated_node_is_an_error_with_its_offset() {
        // The node count says 5 but only 4 nodes are there: the fifth header is missing.
        let mut t = sample();
        t[36] = 5;
        let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        t[9] = t[9].wrapping_sub(sum);
        let e = parse(&t).expect_err("truncated");
        assert!(
            matches!(
                e,
                IortError::NodeLength {
                    index: 4,
                    len: 0,
                    remaining: 0,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("node 4 at offset 0x"), "{e}");
    }

    #[test]
    fn iort_node_length_past_the_table_is_an_error_with_its_offset() {
        let mut rmr = build::rmr(0, &[(0x8000_0000, 0x1000)], &[]);
        rmr[1] = 0xff; // 255 bytes, far fewer remain
        let e = parse(&build::table(5, &[rmr])).expect_err("past the end");
        assert!(
            matches!(
                e,
                IortError::NodeLength {
                    offset: 48,
                    len: 255,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("offset 0x30"), "{e}");
    }

    #[test]
    fn iort_descriptor_array_past_its_node_is_an_error() {
        let mut rmr = build::rmr(0, &[(0x8000_0000, 0x1000)], &[]);
        rmr[20] = 2; // two descriptors announced, one there
        let e = parse(&build::table(5, &[rmr])).expect_err("past the node");
        assert!(
            matches!(
                e,
                IortError::ArrayPastNode {
                    what: "RMR descriptors",
                    node: 48,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn iort_id_mapping_to_a_missing_node_is_an_error_with_its_offset() {
        let t = build::table(
            5,
            &[build::rmr(
                0,
                &[(0x8000_0000, 0x1000)],
                &[build::mapping(0, 0, 7, 0x999, false)],
            )],
        );
        let e = parse(&t).expect_err("no node at 0x999");
        assert!(
            matches!(
                e,
                IortError::MissingNode {
                    offset: 76,
                    reference: 0x999
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("offset 0x4c"), "{e}");
    }

    #[test]
    fn iort_header_errors() {
        let good = sample();
        assert!(matches!(
            parse(&good[..40]),
            Err(IortError::Header(HeaderError::TooShort { len: 40, .. }))
        ));
        let mut sig = good.clone();
        sig[0] = b'X';
        assert!(matches!(
            parse(&sig),
            Err(IortError::Header(HeaderError::Signature { .. }))
        ));
        let mut short = good.clone();
        short.pop();
        assert!(matches!(
            parse(&short),
            Err(IortError::Header(HeaderError::Length { .. }))
        ));
        let mut off = good.clone();
        off[40] = 8; // node list inside the header
        let sum = off.iter().fold(0u8, |s, b| s.wrapping_add(*b));
        off[9] = off[9].wrapping_sub(sum);
        assert!(matches!(
            parse(&off),
            Err(IortError::NodeOffset { node_offset: 8, .. })
        ));
    }
}
