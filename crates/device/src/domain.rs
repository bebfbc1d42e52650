//! A domain's mappings: a B-tree keyed by the first IOVA, so map, unmap and lookup are
//! O(log n) in the live mappings, and an UNMAP that removes k mappings is O(k log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

/// One mapping created by one MAP request. `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Mapping {
    /// First IOVA.
    pub start: u64,
    /// Last IOVA, inclusive.
    pub end: u64,
    /// Guest-physical address of `start`.
    pub phys: u64,
    /// `MAP_F_*` flags.
    pub flags: u32,
}

/// What is stored per key: the key itself is `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    end: u64,
    phys: u64,
    flags: u32,
}

/// Why [`MappingTree::unmap`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WouldSplit;

/// What the page index keeps per granule: 16 bytes, so the index stays cache-friendly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Indexed {
    phys: u64,
    flags: u32,
    /// This granule's position in the mapping.
    offset: u8,
    /// Granules in the mapping, minus one.
    last: u8,
}

/// Mappings spanning at most this many granules are also entered in the page index.
pub const INDEXED_GRANULES: u64 = 4;

/// A multiplicative hasher for page numbers: one multiply, no DoS concern because keys are
/// granule numbers the guest chooses only within the bounds the limits allow.
#[derive(Clone, Copy, Debug, Default)]
pub struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7cc1_b727_220a_95);
    }
}

/// The mappings of one domain.
///
/// The B-tree keyed by first IOVA is the authority: MAP checks overlap with one descent,
/// UNMAP walks only the mappings inside its range. Translation goes first to a hash index
/// of granule number to mapping, which holds every mapping of at most
/// [`INDEXED_GRANULES`] granules (the common DMA case): one or two cache misses instead of
/// a descent through the tree. Larger mappings are found through the tree.
#[derive(Clone, Debug)]
pub struct MappingTree {
    map: BTreeMap<u64, Entry>,
    pages: HashMap<u64, Indexed, BuildHasherDefault<PageHasher>>,
    shift: u32,
    large: usize,
}

impl Default for MappingTree {
    fn default() -> Self {
        Self::new(1)
    }
}

impl MappingTree {
    /// An empty tree for mappings aligned on `granule` (a power of two).
    pub fn new(granule: u64) -> Self {
        Self {
            map: BTreeMap::new(),
            pages: HashMap::default(),
            shift: granule.max(1).trailing_zeros(),
            large: 0,
        }
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no mapping is live.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Granule numbers covered by `m`, if it is small enough to be indexed.
    fn indexed_pages(&self, m: &Mapping) -> Option<std::ops::RangeInclusive<u64>> {
        let (first, last) = (m.start >> self.shift, m.end >> self.shift);
        // Aligned mappings cover whole granules; a MappingTree used directly may not be.
        let aligned = m.start & ((1 << self.shift) - 1) == 0
            && m.end.wrapping_add(1) & ((1 << self.shift) - 1) == 0;
        (aligned && last - first < INDEXED_GRANULES).then_some(first..=last)
    }

    /// The mapping that contains `iova`, if any.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        let page = iova >> self.shift;
        if let Some(ix) = self.pages.get(&page) {
            let first = page - u64::from(ix.offset);
            let end = ((first + u64::from(ix.last) + 1) << self.shift).wrapping_sub(1);
            return Some(Mapping {
                start: first << self.shift,
                end,
                phys: ix.phys,
                flags: ix.flags,
            });
        }
        if self.large == 0 {
            return None;
        }
        self.tree_lookup(iova)
    }

    fn tree_lookup(&self, iova: u64) -> Option<Mapping> {
        let (&start, e) = self.map.range(..=iova).next_back()?;
        (e.end >= iova).then_some(Mapping { start, end: e.end, phys: e.phys, flags: e.flags })
    }

    /// True if any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        let (first, last) = (start >> self.shift, end >> self.shift);
        if self.large == 0 && last - first < INDEXED_GRANULES {
            // Every mapping is indexed and owns its granules whole: a mapping meets the range
            // exactly when it owns one of the range's granules.
            return (first..=last).any(|p| self.pages.contains_key(&p));
        }
        // Only the last mapping starting at or before `end` can reach into the range.
        self.map.range(..=end).next_back().is_some_and(|(_, e)| e.end >= start)
    }

    /// Inserts a mapping; the caller has checked [`Self::overlaps`].
    pub fn insert(&mut self, m: Mapping) {
        self.map.insert(m.start, Entry { end: m.end, phys: m.phys, flags: m.flags });
        match self.indexed_pages(&m) {
            Some(pages) => {
                let (first, last) = (*pages.start(), *pages.end());
                for p in pages {
                    let (offset, last) = ((p - first) as u8, (last - first) as u8);
                    self.pages.insert(p, Indexed { phys: m.phys, flags: m.flags, offset, last });
                }
            }
            None => self.large += 1,
        }
    }

    fn forget(&mut self, m: &Mapping) {
        match self.indexed_pages(m) {
            Some(pages) => {
                for p in pages {
                    self.pages.remove(&p);
                }
            }
            None => self.large -= 1,
        }
    }

    /// Checks that removing `[start, end]` splits no mapping.
    pub fn check_unmap(&self, start: u64, end: u64) -> Result<(), WouldSplit> {
        if self.tree_lookup(start).is_some_and(|m| m.start < start) {
            return Err(WouldSplit);
        }
        if self.tree_lookup(end).is_some_and(|m| m.end > end) {
            return Err(WouldSplit);
        }
        Ok(())
    }

    /// Removes every mapping that lies inside `[start, end]`, calling `removed` for each, in
    /// address order. Fails, removing nothing, if a mapping would be split.
    pub fn unmap(
        &mut self,
        start: u64,
        end: u64,
        mut removed: impl FnMut(Mapping),
    ) -> Result<usize, WouldSplit> {
        // Fast path, the usual driver pattern: the range is exactly one mapping.
        if self.lookup(start).is_some_and(|m| m.start == start && m.end == end) {
            let e = self.map.remove(&start).expect("indexed mapping is in the tree");
            let m = Mapping { start, end, phys: e.phys, flags: e.flags };
            self.forget(&m);
            removed(m);
            return Ok(1);
        }
        self.check_unmap(start, end)?;
        let mut count = 0;
        // Each step is one O(log n) pop; no scan of mappings outside the range.
        while let Some(key) = self.map.range(start..=end).next().map(|(&k, _)| k) {
            let e = self.map.remove(&key).expect("key just found");
            let m = Mapping { start: key, end: e.end, phys: e.phys, flags: e.flags };
            self.forget(&m);
            removed(m);
            count += 1;
        }
        Ok(count)
    }

    /// All mappings in address order.
    pub fn iter(&self) -> impl Iterator<Item = Mapping> + '_ {
        self.map.iter().map(|(&start, e)| Mapping {
            start,
            end: e.end,
            phys: e.phys,
            flags: e.flags,
        })
    }
}

/// A domain as translate sees it: its kind and its mappings.
#[derive(Debug)]
pub struct Domain {
    /// Domain ID.
    pub id: u32,
    /// Created with ATTACH F_BYPASS: identity-mapped, no mappings.
    pub bypass: bool,
    /// The mappings; readers (translate) never block each other.
    pub mappings: RwLock<MappingTree>,
}

impl Domain {
    /// A new, empty domain whose mappings are aligned on `granule`.
    pub fn new(id: u32, bypass: bool, granule: u64) -> Self {
        Self { id, bypass, mappings: RwLock::new(MappingTree::new(granule)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, end: u64) -> Mapping {
        Mapping { start, end, phys: start.wrapping_add(0x10_0000), flags: 3 }
    }

    fn tree(ms: &[(u64, u64)]) -> MappingTree {
        let mut t = MappingTree::default();
        for &(s, e) in ms {
            assert!(!t.overlaps(s, e));
            t.insert(m(s, e));
        }
        t
    }

    // The spec's worked UNMAP examples (§5.13.6.6), numbered as there.
    #[test]
    fn unmap_spec_examples() {
        let mut t = tree(&[]);
        assert_eq!(t.unmap(0, 4, |_| {}), Ok(0)); // (1)
        let mut t = tree(&[(0, 9)]);
        assert_eq!(t.unmap(0, 9, |_| {}), Ok(1)); // (2)
        let mut t = tree(&[(0, 4), (5, 9)]);
        assert_eq!(t.unmap(0, 9, |_| {}), Ok(2)); // (3)
        let mut t = tree(&[(0, 9)]);
        assert_eq!(t.unmap(0, 4, |_| {}), Err(WouldSplit)); // (4)
        assert_eq!(t.len(), 1);
        let mut t = tree(&[(0, 4), (5, 9)]);
        assert_eq!(t.unmap(0, 4, |_| {}), Ok(1)); // (5)
        assert_eq!(t.lookup(5), Some(m(5, 9)));
        let mut t = tree(&[(0, 4)]);
        assert_eq!(t.unmap(0, 9, |_| {}), Ok(1)); // (6)
        let mut t = tree(&[(0, 4), (10, 14)]);
        assert_eq!(t.unmap(0, 14, |_| {}), Ok(2)); // (7)
        assert!(t.is_empty());
    }

    #[test]
    fn split_at_end_removes_nothing() {
        let mut t = tree(&[(0, 4), (10, 19)]);
        assert_eq!(t.unmap(0, 14, |_| {}), Err(WouldSplit));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn full_range_unmap_does_not_overflow() {
        let mut t = tree(&[(0, 0xfff), (u64::MAX - 0xfff, u64::MAX)]);
        let mut seen = vec![];
        assert_eq!(t.unmap(0, u64::MAX, |m| seen.push(m.start)), Ok(2));
        assert_eq!(seen, vec![0, u64::MAX - 0xfff]);
    }

    #[test]
    fn overlap_and_lookup_edges() {
        let t = tree(&[(0x1000, 0x1fff)]);
        assert!(t.overlaps(0x1fff, 0x2fff));
        assert!(t.overlaps(0, 0x1000));
        assert!(!t.overlaps(0x2000, 0x2fff));
        assert!(!t.overlaps(0, 0xfff));
        assert_eq!(t.lookup(0xfff), None);
        assert_eq!(t.lookup(0x1fff).map(|m| m.start), Some(0x1000));
        assert_eq!(t.lookup(0x2000), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// The page index always agrees with the tree, for indexed and large mappings.
        #[test]
        fn index_agrees_with_tree(ops in proptest::collection::vec((proptest::bool::ANY, 0u64..64, 1u64..8), 1..100)) {
            let mut t = MappingTree::new(0x1000);
            for (is_map, page, pages) in ops {
                let (s, e) = (page << 12, ((page + pages) << 12) - 1);
                if is_map {
                    if !t.overlaps(s, e) {
                        t.insert(Mapping { start: s, end: e, phys: s << 4, flags: 1 });
                    }
                } else {
                    let _ = t.unmap(s, e, |_| {});
                }
                for probe in 0..72u64 {
                    let iova = (probe << 12) + 0x123;
                    proptest::prop_assert_eq!(t.lookup(iova), t.tree_lookup(iova));
                }
            }
            let small = t.iter().filter(|m| (m.end - m.start) >> 12 < INDEXED_GRANULES).count();
            proptest::prop_assert_eq!(t.large, t.len() - small);
        }
    }
}
