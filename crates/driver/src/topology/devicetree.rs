//! Endpoint IDs from a flattened device tree: the `iommus` property of a
//! platform device and the `iommu-map` / `iommu-map-mask` of a PCI host
//! bridge, pointing at a virtio-iommu node (Linux's bindings
//! `virtio/iommu.yaml`, `iommu/iommu.txt` and `pci/pci-iommu.txt`).
//!
//! [`DeviceTree::parse`] walks the blob once, bounded by its size and a
//! depth limit, and keeps only what these properties need; every reference
//! is checked then, so the look-ups cannot fail half-way.
//!
//! ```
//! use viommu_driver::topology::devicetree::DeviceTree;
//! // tests/data/virtio-iommu.dts, compiled with dtc.
//! let blob = include_bytes!("../../tests/data/virtio-iommu.dtb");
//! let dt = DeviceTree::parse(blob).unwrap();
//! let iommu = dt.iommus()[0];
//! // Requester ID 00:05.0 (0x28) behind the host bridge at /pcie@10000000.
//! assert_eq!(dt.pci_endpoint("/pcie@10000000", 0x28), Some((iommu.phandle, 0x28)));
//! assert_eq!(dt.device_endpoint("/virtio_mmio@a003e00"), Some((iommu.phandle, 0x40)));
//! ```

use alloc::string::String;
use alloc::vec::Vec;

use super::TopologyError;

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Deeper trees are refused: real ones are a handful of levels deep.
pub const MAX_DEPTH: usize = 64;
/// Nodes a tree may hold; large SoCs have a few thousand.
pub const MAX_NODES: usize = 16384;
/// IOMMU nodes, and `iommus` plus `iommu-map` entries, a tree may hold: the
/// checks between them are pairwise, so a lying tree must not make them slow.
pub const MAX_IOMMUS: usize = 64;
/// See [`MAX_IOMMUS`].
pub const MAX_ENTRIES: usize = 4096;

/// An IOMMU node: one that has `#iommu-cells`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DtIommu {
    /// Its phandle, which endpoints name.
    pub phandle: u32,
    /// Index of the node (for [`DeviceTree::path`]).
    pub node: usize,
}

/// One entry of a host bridge's `iommu-map`: requester IDs
/// `rid_base..rid_base + length` are endpoints `id_base..` of `iommu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMapEntry {
    /// Index of the host-bridge node.
    pub node: usize,
    /// First requester ID (after `iommu-map-mask`).
    pub rid_base: u32,
    /// Phandle of the IOMMU.
    pub iommu: u32,
    /// Endpoint ID of `rid_base`.
    pub id_base: u32,
    /// Number of requester IDs.
    pub length: u32,
    /// The host bridge's `iommu-map-mask` (all ones without one).
    pub mask: u32,
}

/// A device with an `iommus` property: endpoint `endpoint` of IOMMU `iommu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceEntry {
    /// Index of the device node.
    pub node: usize,
    /// Phandle of the IOMMU.
    pub iommu: u32,
    /// Its endpoint ID.
    pub endpoint: u32,
}

#[derive(Clone, Debug, Default)]
struct Node {
    parent: Option<usize>,
    name: (usize, usize),
    phandle: Option<u32>,
    iommu_cells: Option<u32>,
    iommus: Option<(usize, usize)>,
    iommu_map: Option<(usize, usize)>,
    iommu_map_mask: Option<u32>,
}

/// A checked device tree, borrowing the blob.
#[derive(Clone, Debug)]
pub struct DeviceTree<'a> {
    blob: &'a [u8],
    nodes: Vec<Node>,
    iommus: Vec<DtIommu>,
    maps: Vec<IommuMapEntry>,
    devices: Vec<DeviceEntry>,
}

/// The header fields the walk needs.
struct Header {
    structs: (usize, usize),
    strings: (usize, usize),
}

fn be32(blob: &[u8], at: usize) -> Result<u32, TopologyError> {
    let b = blob.get(at..at.checked_add(4).ok_or(TopologyError::Truncated { at })?);
    let b = b.ok_or(TopologyError::Truncated { at })?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn header(blob: &[u8]) -> Result<Header, TopologyError> {
    if be32(blob, 0)? != FDT_MAGIC {
        return Err(TopologyError::BadSignature);
    }
    let total = be32(blob, 4)? as usize;
    if total > blob.len() || total < 40 {
        return Err(TopologyError::BadLength);
    }
    // Version 17 added size_dt_struct; 16 and older are not accepted.
    if be32(blob, 20)? < 17 || be32(blob, 24)? > 17 {
        return Err(TopologyError::Unsupported("device tree version"));
    }
    let block = |off: usize, size: usize| -> Result<(usize, usize), TopologyError> {
        let start = be32(blob, off)? as usize;
        let len = be32(blob, size)? as usize;
        match start.checked_add(len) {
            Some(end) if end <= total => Ok((start, end)),
            _ => Err(TopologyError::Malformed { at: off, what: "block outside the blob" }),
        }
    };
    Ok(Header { structs: block(8, 36)?, strings: block(12, 32)? })
}

impl<'a> DeviceTree<'a> {
    /// Parses and checks a flattened device tree (version 17).
    ///
    /// Refused: a bad magic or size, a block or token outside the blob, a
    /// node or property name not terminated, nesting past [`MAX_DEPTH`],
    /// unbalanced nodes, an `iommus` or `iommu-map` whose phandle names no
    /// IOMMU node or whose IOMMU has `#iommu-cells` other than 1 (the
    /// virtio-iommu binding), a length that does not divide into entries,
    /// an empty or overflowing `iommu-map` entry, and two entries of one
    /// host bridge that claim the same requester ID.
    pub fn parse(blob: &'a [u8]) -> Result<Self, TopologyError> {
        let header = header(blob)?;
        let mut dt = Self {
            blob,
            nodes: Vec::new(),
            iommus: Vec::new(),
            maps: Vec::new(),
            devices: Vec::new(),
        };
        dt.walk(&header)?;
        dt.resolve()?;
        Ok(dt)
    }

    /// Reads the structure block into `self.nodes`.
    fn walk(&mut self, h: &Header) -> Result<(), TopologyError> {
        let (mut at, end) = h.structs;
        let mut stack: Vec<usize> = Vec::new();
        loop {
            if at >= end {
                return Err(TopologyError::Truncated { at });
            }
            let token = be32(self.blob, at)?;
            at += 4;
            match token {
                FDT_BEGIN_NODE => {
                    if stack.len() >= MAX_DEPTH {
                        return Err(TopologyError::TooLarge);
                    }
                    let name = c_string(self.blob, at, end)?;
                    at = align4(name.1 + 1);
                    let parent = stack.last().copied();
                    if parent.is_none() && !self.nodes.is_empty() {
                        return Err(TopologyError::Malformed { at, what: "second root node" });
                    }
                    if self.nodes.len() >= MAX_NODES {
                        return Err(TopologyError::TooLarge);
                    }
                    stack.push(self.nodes.len());
                    self.nodes.push(Node { parent, name, ..Node::default() });
                }
                FDT_END_NODE => {
                    stack
                        .pop()
                        .ok_or(TopologyError::Malformed { at, what: "unbalanced END_NODE" })?;
                }
                FDT_PROP => {
                    let len = be32(self.blob, at)? as usize;
                    let name_off = be32(self.blob, at + 4)? as usize;
                    let value = at + 8;
                    let value_end = value.checked_add(len).filter(|&e| e <= end);
                    let value_end = value_end.ok_or(TopologyError::Truncated { at })?;
                    let node = *stack
                        .last()
                        .ok_or(TopologyError::Malformed { at, what: "property outside a node" })?;
                    let (s0, s1) = h.strings;
                    let name_at = s0.checked_add(name_off).filter(|&a| a < s1);
                    let name_at =
                        name_at.ok_or(TopologyError::Malformed { at, what: "name offset" })?;
                    let name = c_string(self.blob, name_at, s1)?;
                    let blob = self.blob;
                    self.property(node, &blob[name.0..name.1], (value, value_end))?;
                    at = align4(value_end);
                }
                FDT_NOP => {}
                FDT_END if stack.is_empty() && !self.nodes.is_empty() => return Ok(()),
                _ => return Err(TopologyError::Malformed { at: at - 4, what: "token" }),
            }
        }
    }

    /// Keeps the properties endpoint look-ups need.
    fn property(
        &mut self,
        node: usize,
        name: &[u8],
        value: (usize, usize),
    ) -> Result<(), TopologyError> {
        let cell = || -> Result<u32, TopologyError> {
            if value.1 - value.0 != 4 {
                return Err(TopologyError::Malformed { at: value.0, what: "one-cell property" });
            }
            be32(self.blob, value.0)
        };
        let n = &mut self.nodes[node];
        match name {
            b"phandle" | b"linux,phandle" => n.phandle = Some(cell()?),
            b"#iommu-cells" => n.iommu_cells = Some(cell()?),
            b"iommu-map-mask" => n.iommu_map_mask = Some(cell()?),
            b"iommus" => n.iommus = Some(value),
            b"iommu-map" => n.iommu_map = Some(value),
            _ => {}
        }
        Ok(())
    }

    /// Turns the kept properties into IOMMUs, map entries and devices.
    fn resolve(&mut self) -> Result<(), TopologyError> {
        for (i, n) in self.nodes.iter().enumerate() {
            if let (Some(phandle), Some(_)) = (n.phandle, n.iommu_cells) {
                if self.iommus.len() >= MAX_IOMMUS {
                    return Err(TopologyError::TooLarge);
                }
                self.iommus.push(DtIommu { phandle, node: i });
            }
        }
        for i in 0..self.nodes.len() {
            let n = self.nodes[i].clone();
            if let Some((start, end)) = n.iommus {
                let cells = self.cells(start, end, 2)?;
                for pair in cells.chunks_exact(2) {
                    let iommu = self.check_iommu(pair[0], start)?;
                    self.devices.push(DeviceEntry { node: i, iommu, endpoint: pair[1] });
                }
            }
            if let Some((start, end)) = n.iommu_map {
                let mask = n.iommu_map_mask.unwrap_or(u32::MAX);
                let cells = self.cells(start, end, 4)?;
                for e in cells.chunks_exact(4) {
                    let iommu = self.check_iommu(e[1], start)?;
                    let entry = IommuMapEntry {
                        node: i,
                        rid_base: e[0],
                        iommu,
                        id_base: e[2],
                        length: e[3],
                        mask,
                    };
                    check_map_entry(&entry, &self.maps, start)?;
                    self.maps.push(entry);
                }
            }
        }
        Ok(())
    }

    /// The big-endian cells of `[start, end)`, which must be whole groups of `group`.
    fn cells(&self, start: usize, end: usize, group: usize) -> Result<Vec<u32>, TopologyError> {
        if (end - start) % (4 * group) != 0 {
            return Err(TopologyError::Malformed { at: start, what: "property length" });
        }
        if self.maps.len() + self.devices.len() + (end - start) / (4 * group) > MAX_ENTRIES {
            return Err(TopologyError::TooLarge);
        }
        (start..end).step_by(4).map(|at| be32(self.blob, at)).collect()
    }

    /// `phandle` names an IOMMU node with one cell per endpoint.
    fn check_iommu(&self, phandle: u32, at: usize) -> Result<u32, TopologyError> {
        let node = self.iommus.iter().find(|i| i.phandle == phandle);
        let node = node.ok_or(TopologyError::Malformed { at, what: "phandle of no IOMMU" })?;
        if self.nodes[node.node].iommu_cells != Some(1) {
            return Err(TopologyError::Unsupported("#iommu-cells other than 1"));
        }
        Ok(phandle)
    }

    /// The IOMMU nodes.
    pub fn iommus(&self) -> &[DtIommu] {
        &self.iommus
    }

    /// Every `iommu-map` entry, in tree order.
    pub fn iommu_maps(&self) -> &[IommuMapEntry] {
        &self.maps
    }

    /// Every (device, endpoint) pair of an `iommus` property, in tree order.
    pub fn devices(&self) -> &[DeviceEntry] {
        &self.devices
    }

    /// The full path of node `index` (`/` for the root), with any bytes of a
    /// name that are not UTF-8 shown as U+FFFD.
    pub fn path(&self, index: usize) -> String {
        String::from_utf8_lossy(&self.raw_path(index)).into_owned()
    }

    /// The path of node `index` as the blob spells it.
    fn raw_path(&self, index: usize) -> Vec<u8> {
        let mut parts = Vec::new();
        let mut at = Some(index);
        // A parent always comes before its child, so this walk ends.
        while let Some(i) = at.filter(|&i| i < self.nodes.len()) {
            let (s, e) = self.nodes[i].name;
            parts.push(&self.blob[s..e]);
            at = self.nodes[i].parent;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev().filter(|p| !p.is_empty()) {
            path.push(b'/');
            path.extend_from_slice(part);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        path
    }

    /// The first node whose path is exactly `path`; a name that is not UTF-8
    /// never matches.
    pub fn node(&self, path: &str) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| self.raw_path(i) == path.as_bytes())
    }

    /// The IOMMU phandle and endpoint ID of requester ID `rid` below the host
    /// bridge at `host` (a full path), through its `iommu-map`.
    pub fn pci_endpoint(&self, host: &str, rid: u32) -> Option<(u32, u32)> {
        let node = self.node(host)?;
        self.maps.iter().filter(|m| m.node == node).find_map(|m| {
            let offset = (rid & m.mask).checked_sub(m.rid_base)?;
            (offset < m.length).then(|| (m.iommu, m.id_base + offset))
        })
    }

    /// The IOMMU phandle and endpoint ID of the device at `path`, through its
    /// `iommus` (the first one if it names several).
    pub fn device_endpoint(&self, path: &str) -> Option<(u32, u32)> {
        let node = self.node(path)?;
        self.devices.iter().find(|d| d.node == node).map(|d| (d.iommu, d.endpoint))
    }
}

fn align4(at: usize) -> usize {
    at.saturating_add(3) & !3
}

/// The bytes of the NUL-terminated string at `at`, before `end`, without the NUL.
fn c_string(blob: &[u8], at: usize, end: usize) -> Result<(usize, usize), TopologyError> {
    let window = blob.get(at..end).ok_or(TopologyError::Truncated { at })?;
    let len = window.iter().position(|&b| b == 0);
    let len = len.ok_or(TopologyError::Malformed { at, what: "unterminated string" })?;
    Ok((at, at + len))
}

/// An entry is not empty, its IDs fit in 32 bits, and it claims no requester
/// ID that an earlier entry of the same host bridge claims.
fn check_map_entry(
    e: &IommuMapEntry,
    earlier: &[IommuMapEntry],
    at: usize,
) -> Result<(), TopologyError> {
    let fits = |base: u32| u64::from(base) + u64::from(e.length) <= 1 << 32;
    if e.length == 0 || !fits(e.rid_base) || !fits(e.id_base) {
        return Err(TopologyError::Malformed { at, what: "iommu-map entry" });
    }
    let end = u64::from(e.rid_base) + u64::from(e.length);
    let overlaps = earlier.iter().filter(|o| o.node == e.node).any(|o| {
        let o_end = u64::from(o.rid_base) + u64::from(o.length);
        u64::from(e.rid_base) < o_end && u64::from(o.rid_base) < end
    });
    if overlaps {
        return Err(TopologyError::Overlap("two iommu-map entries claim one requester ID"));
    }
    Ok(())
}
