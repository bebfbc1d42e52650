//! Firmware topology parsers against real tables (QEMU's VIOT, a dtc-built
//! device tree) and against truncated, overlapping and lying ones.

use proptest::prelude::*;
use viommu_driver::topology::devicetree::{DeviceTree, MAX_DEPTH};
use viommu_driver::topology::viot::{Viot, ViotEndpoint, ViotIommu};
use viommu_driver::topology::TopologyError;

/// QEMU 10.0 (`-M pc`, `-device virtio-iommu-pci,addr=04.0`), read from
/// `/sys/firmware/acpi/tables/VIOT` in a Linux 6.12 guest.
const VIOT_PC: &[u8] = include_bytes!("data/viot-qemu-pc.bin");
/// QEMU 10.0 `-M q35` with a `pxb-pcie` expander (bus 0x80) and a root port on it.
const VIOT_Q35_PXB: &[u8] = include_bytes!("data/viot-qemu-q35-pxb.bin");
/// `data/virtio-iommu.dts` compiled by dtc 1.6.
const DTB: &[u8] = include_bytes!("data/virtio-iommu.dtb");
/// QEMU 10.0's own tree: `qemu-system-aarch64 -M virt,dumpdtb=... -device virtio-iommu-pci
/// -device virtio-blk-pci,iommu_platform=on,...`, repacked by `dtc -I dtb -O dtb`.
const QEMU_VIRT_DTB: &[u8] = include_bytes!("data/qemu-aarch64-virt.dtb");

// ------------------------------------------------------------------ VIOT

#[test]
fn qemu_pc_viot_puts_every_function_of_bus_0_behind_the_iommu() {
    let viot = Viot::parse(VIOT_PC).unwrap();
    let iommu = ViotIommu::Pci { segment: 0, bdf: 0x20 };
    assert_eq!(viot.iommus(), [iommu]);
    assert_eq!(
        viot.endpoints(),
        [ViotEndpoint::PciRange {
            endpoint_start: 0,
            segment_start: 0,
            segment_end: 0,
            bdf_start: 0,
            bdf_end: 0xff,
            iommu
        }]
    );
    // The real-guest suite's virtio-blk at 00:05.0.
    assert_eq!(viot.pci_endpoint(0, 0x28), Some((0x28, iommu)));
    assert_eq!(viot.pci_endpoint(0, 0x100), None, "bus 1 is not in the range");
    assert_eq!(viot.pci_endpoint(1, 0x28), None, "segment 1 is not in the range");
    assert_eq!(viot.mmio_endpoint(0xa000_0000), None);
    assert_eq!(viot.unknown_nodes(), 0);
}

#[test]
fn qemu_q35_viot_gives_the_expander_bus_its_own_range() {
    let viot = Viot::parse(VIOT_Q35_PXB).unwrap();
    assert_eq!(viot.endpoints().len(), 2);
    let iommu = ViotIommu::Pci { segment: 0, bdf: 0x20 };
    // 80:00.0 (the root port) and 81:00.0 (the device behind it).
    assert_eq!(viot.pci_endpoint(0, 0x8000), Some((0x8000, iommu)));
    assert_eq!(viot.pci_endpoint(0, 0x8100), Some((0x8100, iommu)));
    assert_eq!(viot.pci_endpoint(0, 0x8200), None);
}

/// A VIOT built from nodes, with the header's length and checksum right.
fn viot(nodes: &[&[u8]]) -> Vec<u8> {
    let mut t = vec![0u8; 48];
    t[..4].copy_from_slice(b"VIOT");
    t[36..38].copy_from_slice(&(nodes.len() as u16).to_le_bytes());
    t[38..40].copy_from_slice(&48u16.to_le_bytes());
    for n in nodes {
        t.extend_from_slice(n);
    }
    fix_header(&mut t);
    t
}

fn fix_header(t: &mut [u8]) {
    let len = t.len() as u32;
    t[4..8].copy_from_slice(&len.to_le_bytes());
    t[9] = 0;
    let sum = t.iter().fold(0u8, |s, b| s.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
}

fn virtio_pci_node(bdf: u16) -> Vec<u8> {
    let mut n = vec![3, 0, 16, 0, 0, 0];
    n.extend_from_slice(&bdf.to_le_bytes());
    n.resize(16, 0);
    n
}

fn pci_range_node(endpoint_start: u32, bdfs: (u16, u16), output: u16) -> Vec<u8> {
    let mut n = vec![1, 0, 24, 0];
    n.extend_from_slice(&endpoint_start.to_le_bytes());
    n.extend_from_slice(&[0, 0, 0, 0]); // segments 0..=0
    n.extend_from_slice(&bdfs.0.to_le_bytes());
    n.extend_from_slice(&bdfs.1.to_le_bytes());
    n.extend_from_slice(&output.to_le_bytes());
    n.resize(24, 0);
    n
}

fn mmio_node(endpoint: u32, base: u64, output: u16) -> Vec<u8> {
    let mut n = vec![2, 0, 24, 0];
    n.extend_from_slice(&endpoint.to_le_bytes());
    n.extend_from_slice(&base.to_le_bytes());
    n.extend_from_slice(&output.to_le_bytes());
    n.resize(24, 0);
    n
}

#[test]
fn a_built_table_with_pci_and_mmio_endpoints_parses() {
    let t = viot(&[
        &virtio_pci_node(0x8),
        &pci_range_node(0x100, (0x10, 0x1f), 48),
        &mmio_node(7, 0xa003e00, 48),
        &[9, 0, 8, 0, 0, 0, 0, 0], // a node type from the future
    ]);
    let viot = Viot::parse(&t).unwrap();
    let iommu = ViotIommu::Pci { segment: 0, bdf: 0x8 };
    assert_eq!(viot.pci_endpoint(0, 0x12), Some((0x102, iommu)));
    assert_eq!(viot.pci_endpoint(0, 0x20), None);
    assert_eq!(viot.mmio_endpoint(0xa003e00), Some((7, iommu)));
    assert_eq!(viot.unknown_nodes(), 1);
}

#[test]
fn every_truncation_of_a_real_table_is_refused() {
    for len in 0..VIOT_Q35_PXB.len() {
        let cut = &VIOT_Q35_PXB[..len];
        assert!(Viot::parse(cut).is_err(), "{len} bytes accepted");
    }
    // The header still says 112 bytes, but the nodes' count is cut: the length check fails first.
    let mut short = VIOT_Q35_PXB.to_vec();
    short.truncate(100);
    assert_eq!(Viot::parse(&short).unwrap_err(), TopologyError::BadLength);
}

#[test]
fn a_bad_checksum_or_signature_is_refused() {
    let mut t = VIOT_PC.to_vec();
    t[50] ^= 1;
    assert_eq!(Viot::parse(&t).unwrap_err(), TopologyError::BadChecksum);
    let mut t = VIOT_PC.to_vec();
    t[0] = b'X';
    assert_eq!(Viot::parse(&t).unwrap_err(), TopologyError::BadSignature);
}

#[test]
fn lying_nodes_are_refused() {
    let iommu = virtio_pci_node(0x8);
    // output_node names the range node itself, not an IOMMU.
    let t = viot(&[&iommu, &pci_range_node(0, (0, 0xff), 64)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // output_node points into the middle of a node.
    let t = viot(&[&iommu, &pci_range_node(0, (0, 0xff), 50)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // Inverted range.
    let t = viot(&[&iommu, &pci_range_node(0, (0x20, 0x10), 48)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // Endpoint IDs past 2^32.
    let t = viot(&[&iommu, &pci_range_node(u32::MAX - 4, (0, 0xff), 48)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // A node shorter than its type says.
    let mut short = pci_range_node(0, (0, 0xff), 48);
    short[2] = 12;
    short.truncate(12);
    let t = viot(&[&iommu, &short]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // A node of length 0 would make the walk stand still.
    let t = viot(&[&iommu, &[1, 0, 0, 0]]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Malformed { .. })));
    // More nodes than the table holds.
    let mut t = viot(&[&iommu]);
    t[36..38].copy_from_slice(&2u16.to_le_bytes());
    fix_header(&mut t);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Truncated { .. })));
}

#[test]
fn overlapping_endpoint_nodes_are_refused() {
    let iommu = virtio_pci_node(0x8);
    // Two ranges claim 00:02.0.
    let t = viot(&[
        &iommu,
        &pci_range_node(0, (0, 0x1f), 48),
        &pci_range_node(0x100, (0x10, 0x2f), 48),
    ]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Overlap(_))));
    // Disjoint devices, but the same endpoint IDs of one IOMMU.
    let t = viot(&[&iommu, &pci_range_node(0, (0, 0xf), 48), &mmio_node(3, 0x1000, 48)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Overlap(_))));
    // One MMIO device twice.
    let t = viot(&[&iommu, &mmio_node(1, 0x1000, 48), &mmio_node(2, 0x1000, 48)]);
    assert!(matches!(Viot::parse(&t), Err(TopologyError::Overlap(_))));
}

// ------------------------------------------------------------- device tree

#[test]
fn dtc_built_tree_maps_requester_ids_and_platform_devices() {
    let dt = DeviceTree::parse(DTB).unwrap();
    assert_eq!(dt.iommus().len(), 1);
    let iommu = dt.iommus()[0];
    assert_eq!(dt.path(iommu.node), "/pcie@10000000/iommu@4,0");
    assert_eq!(dt.iommu_maps().len(), 2);
    assert_eq!(dt.pci_endpoint("/pcie@10000000", 0x28), Some((iommu.phandle, 0x28)));
    assert_eq!(dt.pci_endpoint("/pcie@10000000", 0x1f), Some((iommu.phandle, 0x1f)));
    assert_eq!(dt.pci_endpoint("/pcie@10000000", 0x20), None, "the IOMMU's own RID is not mapped");
    assert_eq!(dt.pci_endpoint("/pcie@10000000", 0x10000), None);
    assert_eq!(dt.pci_endpoint("/nowhere", 0x28), None);
    assert_eq!(dt.device_endpoint("/virtio_mmio@a003e00"), Some((iommu.phandle, 0x40)));
    assert_eq!(dt.device_endpoint("/pcie@10000000"), None);
}

#[test]
fn qemu_virt_tree_maps_every_requester_id_but_the_iommus_own() {
    let dt = DeviceTree::parse(QEMU_VIRT_DTB).unwrap();
    let [iommu] = dt.iommus() else { panic!("{:?}", dt.iommus()) };
    assert_eq!(dt.path(iommu.node), "/pcie@10000000/virtio_iommu@2,0");
    let host = "/pcie@10000000";
    // virtio-blk-pci is the next slot, 00:03.0.
    assert_eq!(dt.pci_endpoint(host, 0x18), Some((iommu.phandle, 0x18)));
    assert_eq!(dt.pci_endpoint(host, 0x10), None, "00:02.0 is the IOMMU");
    assert_eq!(dt.pci_endpoint(host, 0xffff), Some((iommu.phandle, 0xffff)));
}

/// A minimal flattened-tree writer for hostile trees.
#[derive(Default)]
struct Fdt {
    structs: Vec<u8>,
    strings: Vec<u8>,
}

impl Fdt {
    fn token(&mut self, t: u32) -> &mut Self {
        self.structs.extend_from_slice(&t.to_be_bytes());
        self
    }
    fn begin(&mut self, name: &str) -> &mut Self {
        self.begin_raw(name.as_bytes())
    }
    fn begin_raw(&mut self, name: &[u8]) -> &mut Self {
        self.token(1);
        self.structs.extend_from_slice(name);
        self.structs.push(0);
        while self.structs.len() % 4 != 0 {
            self.structs.push(0);
        }
        self
    }
    fn end(&mut self) -> &mut Self {
        self.token(2)
    }
    fn prop(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        let off = self.strings.len() as u32;
        self.strings.extend_from_slice(name.as_bytes());
        self.strings.push(0);
        self.token(3);
        self.structs.extend_from_slice(&((cells.len() * 4) as u32).to_be_bytes());
        self.structs.extend_from_slice(&off.to_be_bytes());
        for c in cells {
            self.structs.extend_from_slice(&c.to_be_bytes());
        }
        self
    }
    fn blob(&mut self) -> Vec<u8> {
        self.token(9);
        let structs = 40 + 16;
        let strings = structs + self.structs.len();
        let total = strings + self.strings.len();
        let mut b = Vec::new();
        for v in [
            0xd00dfeed,
            total,
            structs,
            strings,
            40,
            17,
            16,
            0,
            self.strings.len(),
            self.structs.len(),
        ] {
            b.extend_from_slice(&(v as u32).to_be_bytes());
        }
        b.extend_from_slice(&[0; 16]); // empty memory reservation map
        b.extend_from_slice(&self.structs);
        b.extend_from_slice(&self.strings);
        b
    }
}

/// A root with one IOMMU (phandle 1, `cells` cells) and a host bridge with `map`.
fn tree(cells: u32, map: &[u32]) -> Vec<u8> {
    let mut f = Fdt::default();
    f.begin("").begin("iommu").prop("phandle", &[1]).prop("#iommu-cells", &[cells]).end();
    f.begin("pcie").prop("iommu-map", map).end().end();
    f.blob()
}

#[test]
fn a_built_tree_parses_like_the_dtc_one() {
    let b = tree(1, &[0, 1, 0x1000, 0x100]);
    let dt = DeviceTree::parse(&b).unwrap();
    assert_eq!(dt.pci_endpoint("/pcie", 0x28), Some((1, 0x1028)));
    assert_eq!(dt.pci_endpoint("/pcie", 0x100), None);
}

#[test]
fn lying_trees_are_refused() {
    let malformed = |b: &[u8]| matches!(DeviceTree::parse(b), Err(TopologyError::Malformed { .. }));
    // iommu-map naming a phandle that is no IOMMU.
    assert!(malformed(&tree(1, &[0, 2, 0, 0x100])));
    // An entry cut short.
    assert!(malformed(&tree(1, &[0, 1, 0])));
    // An empty entry, and one whose IDs run past 2^32.
    assert!(malformed(&tree(1, &[0, 1, 0, 0])));
    assert!(malformed(&tree(1, &[0, 1, u32::MAX, 2])));
    // Two entries claim requester ID 0x80.
    assert!(matches!(
        DeviceTree::parse(&tree(1, &[0, 1, 0, 0x100, 0x80, 1, 0x1000, 0x10])),
        Err(TopologyError::Overlap(_))
    ));
    // The virtio-iommu binding has one cell per endpoint.
    assert!(matches!(
        DeviceTree::parse(&tree(2, &[0, 1, 0, 0x100])),
        Err(TopologyError::Unsupported(_))
    ));
    // Unbalanced nodes: END before any node, and a node never ended.
    let mut f = Fdt::default();
    assert!(malformed(&f.end().blob()));
    let mut f = Fdt::default();
    assert!(DeviceTree::parse(&f.begin("").blob()).is_err());
    // A name offset past the strings block.
    let mut b = tree(1, &[0, 1, 0, 0x100]);
    let strings_size = u32::from_be_bytes(b[32..36].try_into().unwrap());
    b[32..36].copy_from_slice(&(strings_size - 4).to_be_bytes());
    assert!(DeviceTree::parse(&b).is_err());
}

/// Found by the topology fuzz target: a host bridge whose name is not UTF-8 was shown as
/// "/?" and looked up as whatever node printed the same.
#[test]
fn a_name_that_is_not_utf8_never_matches_a_path() {
    let mut f = Fdt::default();
    f.begin("").begin("iommu").prop("phandle", &[1]).prop("#iommu-cells", &[1]).end();
    f.begin("?").end();
    f.begin_raw(b"\xff").prop("iommu-map", &[0, 1, 0, 0x10]).end().end();
    let b = f.blob();
    let dt = DeviceTree::parse(&b).unwrap();
    let host = dt.iommu_maps()[0].node;
    assert_eq!(dt.path(host), "/\u{fffd}");
    assert_eq!(dt.node("/\u{fffd}"), None);
    assert_eq!(dt.node("/?"), Some(host - 1));
    assert_eq!(dt.pci_endpoint("/?", 0), None, "another node's name");
    assert_eq!(dt.node("/iommu"), Some(1));
}

#[test]
fn nesting_past_the_depth_limit_is_refused() {
    let mut f = Fdt::default();
    for _ in 0..=MAX_DEPTH {
        f.begin("n");
    }
    for _ in 0..=MAX_DEPTH {
        f.end();
    }
    assert_eq!(DeviceTree::parse(&f.blob()).unwrap_err(), TopologyError::TooLarge);
}

#[test]
fn every_truncation_of_the_dtc_tree_is_refused() {
    for len in 0..DTB.len() {
        assert!(DeviceTree::parse(&DTB[..len]).is_err(), "{len} bytes accepted");
    }
}

proptest! {
    /// Any bytes changed anywhere in the real tables: a result, never a panic.
    #[test]
    fn mutated_tables_never_panic(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        for base in [VIOT_PC, VIOT_Q35_PXB, DTB, QEMU_VIRT_DTB] {
            let mut t = base.to_vec();
            for &(at, byte) in &edits {
                let i = at % t.len();
                t[i] = byte;
            }
            let _ = Viot::parse(&t);
            if base.starts_with(b"VIOT") {
                fix_header(&mut t);
                let _ = Viot::parse(&t);
            }
            let _ = DeviceTree::parse(&t);
        }
    }
}
