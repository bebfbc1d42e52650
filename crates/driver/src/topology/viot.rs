//! The ACPI VIOT table ("Virtual I/O Translation Table", ACPI 6.4 §5.2.31):
//! which virtio-iommu translates which PCI or MMIO device, under which
//! endpoint ID.
//!
//! [`Viot::parse`] checks the whole table once (header, checksum, every node,
//! every reference between nodes) and keeps the nodes, so the look-ups after
//! it cannot fail half-way.
//!
//! ```
//! use viommu_driver::topology::viot::{Viot, ViotIommu};
//! // QEMU 10's table for `-device virtio-iommu-pci,addr=04.0` on the pc machine.
//! let bytes = include_bytes!("../../tests/data/viot-qemu-pc.bin");
//! let viot = Viot::parse(bytes).unwrap();
//! // 00:05.0 is behind the virtio-iommu at 00:04.0, as endpoint 0x28.
//! let (endpoint, iommu) = viot.pci_endpoint(0, 0x28).unwrap();
//! assert_eq!(endpoint, 0x28);
//! assert_eq!(iommu, ViotIommu::Pci { segment: 0, bdf: 0x20 });
//! ```

use alloc::vec::Vec;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::TopologyError;

/// ACPI table header (ACPI §5.2.6), 36 bytes.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct AcpiHeader {
    signature: [u8; 4],
    length: U32,
    revision: u8,
    checksum: u8,
    oem_id: [u8; 6],
    oem_table_id: [u8; 8],
    oem_revision: U32,
    creator_id: U32,
    creator_revision: U32,
}

/// The VIOT fields after the ACPI header.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct ViotHeader {
    acpi: AcpiHeader,
    node_count: U16,
    node_offset: U16,
    reserved: [u8; 8],
}

/// The header every node starts with.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct NodeHeader {
    kind: u8,
    reserved: u8,
    length: U16,
}

/// Node type 1: a range of PCI devices, endpoint IDs from `endpoint_start`.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct PciRangeNode {
    header: NodeHeader,
    endpoint_start: U32,
    segment_start: U16,
    segment_end: U16,
    bdf_start: U16,
    bdf_end: U16,
    output_node: U16,
    reserved: [u8; 6],
}

/// Node type 2: one MMIO device.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct MmioNode {
    header: NodeHeader,
    endpoint: U32,
    base_address: U64,
    output_node: U16,
    reserved: [u8; 6],
}

/// Node type 3: a virtio-iommu on virtio-pci.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct VirtioPciNode {
    header: NodeHeader,
    segment: U16,
    bdf: U16,
    reserved: [u8; 8],
}

/// Node type 4: a virtio-iommu on virtio-mmio.
#[derive(FromBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct VirtioMmioNode {
    header: NodeHeader,
    reserved: [u8; 4],
    base_address: U64,
}

const _: () = {
    assert!(core::mem::size_of::<ViotHeader>() == 48);
    assert!(core::mem::size_of::<PciRangeNode>() == 24);
    assert!(core::mem::size_of::<MmioNode>() == 24);
    assert!(core::mem::size_of::<VirtioPciNode>() == 16);
    assert!(core::mem::size_of::<VirtioMmioNode>() == 16);
};

/// Nodes a table may hold: far more than any machine describes, and few
/// enough that the pairwise overlap check stays cheap on a lying table.
pub const MAX_NODES: usize = 1024;

const NODE_PCI_RANGE: u8 = 1;
const NODE_MMIO: u8 = 2;
const NODE_VIRTIO_PCI: u8 = 3;
const NODE_VIRTIO_MMIO: u8 = 4;

/// A virtio-iommu named by the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViotIommu {
    /// A virtio-pci function.
    Pci {
        /// PCI segment.
        segment: u16,
        /// Bus, device and function: `bus << 8 | dev << 3 | fn`.
        bdf: u16,
    },
    /// A virtio-mmio device at this base address.
    Mmio {
        /// Base of its MMIO region.
        base: u64,
    },
}

/// A set of devices the table puts behind an IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViotEndpoint {
    /// PCI functions `bdf_start..=bdf_end` on segments `segment_start..=segment_end`.
    /// Function `bdf` on segment `s` is endpoint
    /// `endpoint_start + ((s - segment_start) << 16) + (bdf - bdf_start)`.
    PciRange {
        /// Endpoint ID of the first function.
        endpoint_start: u32,
        /// First segment.
        segment_start: u16,
        /// Last segment.
        segment_end: u16,
        /// First BDF, in every segment of the range.
        bdf_start: u16,
        /// Last BDF.
        bdf_end: u16,
        /// Its IOMMU.
        iommu: ViotIommu,
    },
    /// One MMIO device.
    Mmio {
        /// Its endpoint ID.
        endpoint: u32,
        /// Base of its MMIO region.
        base: u64,
        /// Its IOMMU.
        iommu: ViotIommu,
    },
}

impl ViotEndpoint {
    /// The endpoint ID of PCI function `bdf` on `segment`, if this range holds it.
    fn pci_id(&self, segment: u16, bdf: u16) -> Option<u32> {
        match *self {
            Self::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                ..
            } if (segment_start..=segment_end).contains(&segment)
                && (bdf_start..=bdf_end).contains(&bdf) =>
            {
                Some(endpoint_start + range_offset((segment_start, bdf_start), (segment, bdf)))
            }
            _ => None,
        }
    }

    fn iommu(&self) -> ViotIommu {
        match *self {
            Self::PciRange { iommu, .. } | Self::Mmio { iommu, .. } => iommu,
        }
    }

    /// The endpoint IDs this node hands out, as `[first, last]`.
    fn id_span(&self) -> (u32, u32) {
        match *self {
            Self::PciRange {
                endpoint_start,
                segment_start,
                segment_end,
                bdf_start,
                bdf_end,
                ..
            } => {
                let last = range_offset((segment_start, bdf_start), (segment_end, bdf_end));
                (endpoint_start, endpoint_start + last)
            }
            Self::Mmio { endpoint, .. } => (endpoint, endpoint),
        }
    }
}

/// How far function `at` (segment, BDF) is from the first one of its range, in endpoint IDs.
fn range_offset(first: (u16, u16), at: (u16, u16)) -> u32 {
    (u32::from(at.0 - first.0) << 16) | u32::from(at.1 - first.1)
}

/// A checked VIOT table.
#[derive(Clone, Debug, Default)]
pub struct Viot {
    iommus: Vec<ViotIommu>,
    endpoints: Vec<ViotEndpoint>,
    unknown_nodes: usize,
}

impl Viot {
    /// Parses and checks a whole table, as read from
    /// `/sys/firmware/acpi/tables/VIOT` or found through the RSDT/XSDT.
    ///
    /// Refused: a signature other than `VIOT`, a length past `bytes` or
    /// shorter than the header, a bad checksum, a node outside the table or
    /// shorter than its type, an endpoint node whose `output_node` is not an
    /// IOMMU node, an inverted or overflowing range, and two endpoint nodes
    /// that claim the same device or the same endpoint ID of one IOMMU.
    /// Nodes of types this parser does not know are skipped and counted.
    pub fn parse(bytes: &[u8]) -> Result<Self, TopologyError> {
        let (header, _) =
            ViotHeader::ref_from_prefix(bytes).map_err(|_| TopologyError::Truncated { at: 0 })?;
        if &header.acpi.signature != b"VIOT" {
            return Err(TopologyError::BadSignature);
        }
        let length = header.acpi.length.get() as usize;
        if length < core::mem::size_of::<ViotHeader>() || length > bytes.len() {
            return Err(TopologyError::BadLength);
        }
        let table = &bytes[..length];
        if table.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)) != 0 {
            return Err(TopologyError::BadChecksum);
        }
        let nodes = Self::nodes(table, header.node_offset.get().into(), header.node_count.get())?;
        Self::from_nodes(table, &nodes)
    }

    /// The offset and type of each of the `count` nodes starting at `offset`.
    fn nodes(table: &[u8], offset: usize, count: u16) -> Result<Vec<(usize, u8)>, TopologyError> {
        if offset < core::mem::size_of::<ViotHeader>() {
            return Err(TopologyError::Malformed {
                at: offset,
                what: "node_offset inside the header",
            });
        }
        if usize::from(count) > MAX_NODES {
            return Err(TopologyError::TooLarge);
        }
        let mut nodes = Vec::new();
        let mut at = offset;
        for _ in 0..count {
            let rest = table.get(at..).ok_or(TopologyError::Truncated { at })?;
            let (node, _) =
                NodeHeader::ref_from_prefix(rest).map_err(|_| TopologyError::Truncated { at })?;
            let len = usize::from(node.length.get());
            if len < core::mem::size_of::<NodeHeader>() || len > rest.len() {
                return Err(TopologyError::Malformed { at, what: "node length" });
            }
            nodes.push((at, node.kind));
            at += len;
        }
        Ok(nodes)
    }

    fn from_nodes(table: &[u8], nodes: &[(usize, u8)]) -> Result<Self, TopologyError> {
        // Nodes come in offset order: a reference is found by binary search.
        let iommu_at = |at: usize| -> Result<ViotIommu, TopologyError> {
            match nodes.binary_search_by_key(&at, |&(o, _)| o).ok().map(|i| nodes[i]) {
                Some((at, NODE_VIRTIO_PCI)) => {
                    let n: &VirtioPciNode = node(table, at)?;
                    Ok(ViotIommu::Pci { segment: n.segment.get(), bdf: n.bdf.get() })
                }
                Some((at, NODE_VIRTIO_MMIO)) => {
                    let n: &VirtioMmioNode = node(table, at)?;
                    Ok(ViotIommu::Mmio { base: n.base_address.get() })
                }
                _ => Err(TopologyError::Malformed { at, what: "output_node is not an IOMMU node" }),
            }
        };
        let mut viot = Self::default();
        for &(at, kind) in nodes {
            match kind {
                NODE_PCI_RANGE => {
                    let n: &PciRangeNode = node(table, at)?;
                    let range = ViotEndpoint::PciRange {
                        endpoint_start: n.endpoint_start.get(),
                        segment_start: n.segment_start.get(),
                        segment_end: n.segment_end.get(),
                        bdf_start: n.bdf_start.get(),
                        bdf_end: n.bdf_end.get(),
                        iommu: iommu_at(n.output_node.get().into())?,
                    };
                    check_range(&range, at)?;
                    viot.endpoints.push(range);
                }
                NODE_MMIO => {
                    let n: &MmioNode = node(table, at)?;
                    viot.endpoints.push(ViotEndpoint::Mmio {
                        endpoint: n.endpoint.get(),
                        base: n.base_address.get(),
                        iommu: iommu_at(n.output_node.get().into())?,
                    });
                }
                NODE_VIRTIO_PCI | NODE_VIRTIO_MMIO => viot.iommus.push(iommu_at(at)?),
                _ => viot.unknown_nodes += 1,
            }
        }
        viot.check_overlaps()?;
        Ok(viot)
    }

    /// No device is claimed twice, and no endpoint ID of an IOMMU is given twice.
    fn check_overlaps(&self) -> Result<(), TopologyError> {
        for (i, a) in self.endpoints.iter().enumerate() {
            for b in &self.endpoints[i + 1..] {
                if claims_same_device(a, b) {
                    return Err(TopologyError::Overlap("two nodes claim one device"));
                }
                let (a0, a1) = a.id_span();
                let (b0, b1) = b.id_span();
                if a.iommu() == b.iommu() && a0 <= b1 && b0 <= a1 {
                    return Err(TopologyError::Overlap("one endpoint ID given twice"));
                }
            }
        }
        Ok(())
    }

    /// The virtio-iommus the table names.
    pub fn iommus(&self) -> &[ViotIommu] {
        &self.iommus
    }

    /// The endpoint nodes, in table order.
    pub fn endpoints(&self) -> &[ViotEndpoint] {
        &self.endpoints
    }

    /// Nodes of a type this parser does not know (skipped).
    pub fn unknown_nodes(&self) -> usize {
        self.unknown_nodes
    }

    /// The endpoint ID and IOMMU of PCI function `bdf` on `segment`, or
    /// `None` if no IOMMU translates it.
    pub fn pci_endpoint(&self, segment: u16, bdf: u16) -> Option<(u32, ViotIommu)> {
        self.endpoints.iter().find_map(|e| Some((e.pci_id(segment, bdf)?, e.iommu())))
    }

    /// The endpoint ID and IOMMU of the MMIO device at `base`.
    pub fn mmio_endpoint(&self, base: u64) -> Option<(u32, ViotIommu)> {
        self.endpoints.iter().find_map(|e| match *e {
            ViotEndpoint::Mmio { endpoint, base: b, iommu } if b == base => Some((endpoint, iommu)),
            _ => None,
        })
    }
}

/// The node of type `N` at `at`, whose whole length was checked.
fn node<N: FromBytes + KnownLayout + Immutable>(
    table: &[u8],
    at: usize,
) -> Result<&N, TopologyError> {
    let rest = table.get(at..).ok_or(TopologyError::Truncated { at })?;
    let (header, _) =
        NodeHeader::ref_from_prefix(rest).map_err(|_| TopologyError::Truncated { at })?;
    let len = usize::from(header.length.get());
    if len < core::mem::size_of::<N>() {
        return Err(TopologyError::Malformed { at, what: "node shorter than its type" });
    }
    N::ref_from_prefix(rest).map(|(n, _)| n).map_err(|_| TopologyError::Truncated { at })
}

/// A PCI range is not inverted and its last endpoint ID fits in 32 bits.
fn check_range(range: &ViotEndpoint, at: usize) -> Result<(), TopologyError> {
    let ViotEndpoint::PciRange {
        endpoint_start,
        segment_start,
        segment_end,
        bdf_start,
        bdf_end,
        ..
    } = *range
    else {
        return Ok(());
    };
    if segment_start > segment_end || bdf_start > bdf_end {
        return Err(TopologyError::Malformed { at, what: "inverted PCI range" });
    }
    let span = (u64::from(segment_end - segment_start) << 16) | u64::from(bdf_end - bdf_start);
    if u64::from(endpoint_start) + span > u64::from(u32::MAX) {
        return Err(TopologyError::Malformed { at, what: "endpoint IDs past 2^32" });
    }
    Ok(())
}

fn claims_same_device(a: &ViotEndpoint, b: &ViotEndpoint) -> bool {
    match (*a, *b) {
        (
            ViotEndpoint::PciRange {
                segment_start: s0,
                segment_end: s1,
                bdf_start: b0,
                bdf_end: b1,
                ..
            },
            ViotEndpoint::PciRange {
                segment_start: t0,
                segment_end: t1,
                bdf_start: c0,
                bdf_end: c1,
                ..
            },
        ) => s0 <= t1 && t0 <= s1 && b0 <= c1 && c0 <= b1,
        (ViotEndpoint::Mmio { base: x, .. }, ViotEndpoint::Mmio { base: y, .. }) => x == y,
        _ => false,
    }
}
