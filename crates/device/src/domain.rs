//! A domain's mappings: a B-tree keyed by the first IOVA, so map, unmap and lookup are
//! O(log n) in the live mappings, and an UNMAP that removes k mappings is O(k log n).

use std::collections::BTreeMap;
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

/// The mappings of one domain.
#[derive(Clone, Debug, Default)]
pub struct MappingTree {
    map: BTreeMap<u64, Entry>,
}

impl MappingTree {
    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True if no mapping is live.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The mapping that contains `iova`, if any.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        let (&start, e) = self.map.range(..=iova).next_back()?;
        (e.end >= iova).then_some(Mapping { start, end: e.end, phys: e.phys, flags: e.flags })
    }

    /// True if any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        // Only the last mapping starting at or before `end` can reach into the range.
        self.map.range(..=end).next_back().is_some_and(|(_, e)| e.end >= start)
    }

    /// Inserts a mapping; the caller has checked [`Self::overlaps`].
    pub fn insert(&mut self, m: Mapping) {
        self.map.insert(m.start, Entry { end: m.end, phys: m.phys, flags: m.flags });
    }

    /// Checks that removing `[start, end]` splits no mapping.
    pub fn check_unmap(&self, start: u64, end: u64) -> Result<(), WouldSplit> {
        if self.lookup(start).is_some_and(|m| m.start < start) {
            return Err(WouldSplit);
        }
        if self.lookup(end).is_some_and(|m| m.end > end) {
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
        self.check_unmap(start, end)?;
        let mut count = 0;
        // Each step is one O(log n) pop; no scan of mappings outside the range.
        while let Some(entry) = self.map.range(start..=end).next().map(|(&k, _)| k) {
            let e = self.map.remove(&entry).expect("key just found");
            removed(Mapping { start: entry, end: e.end, phys: e.phys, flags: e.flags });
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

    /// Mappings that start inside `[start, end]`, in address order.
    pub fn range(&self, start: u64, end: u64) -> impl Iterator<Item = Mapping> + '_ {
        self.map.range(start..=end).map(|(&start, e)| Mapping {
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
    /// A new, empty domain.
    pub fn new(id: u32, bypass: bool) -> Self {
        Self { id, bypass, mappings: RwLock::new(MappingTree::default()) }
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
}
