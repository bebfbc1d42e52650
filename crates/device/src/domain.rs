//! A domain's mappings: a B-tree keyed by the first IOVA, so map, unmap and lookup are
//! O(log n) in the live mappings, and an UNMAP that removes k mappings is O(k log n).

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::sync::RwLock;

use serde::{Deserialize, Serialize};

use crate::pgtable::PageTable;

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

/// Builds the page index's hasher: a keyed mix of the granule number, with keys drawn
/// from the standard library's per-process randomness. Granule numbers are guest-chosen;
/// an unkeyed or weak hash would let aligned or crafted IOVAs pile into one probe sequence
/// (aligned buffers alone would with a plain multiply).
#[derive(Clone, Copy, Debug)]
pub struct PageHashKeys {
    k0: u64,
    k1: u64,
}

impl Default for PageHashKeys {
    fn default() -> Self {
        let rs = std::collections::hash_map::RandomState::new();
        Self { k0: rs.hash_one(0x5eed_u64), k1: rs.hash_one(0xfeed_u64) }
    }
}

impl BuildHasher for PageHashKeys {
    type Hasher = PageHasher;
    fn build_hasher(&self) -> PageHasher {
        PageHasher { state: self.k0, k1: self.k1 }
    }
}

/// The hasher: xor with a key, then the SplitMix64 finaliser (a bijective avalanche mix).
#[derive(Clone, Copy, Debug)]
pub struct PageHasher {
    state: u64,
    k1: u64,
}

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        let mut z = self.state ^ self.k1;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.state = (self.state ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}

/// Granules per chunk of the start bitmap: one 64-bit word, so a mapping alone in its chunk
/// costs a 16-byte B-tree entry (a 512-granule chunk cost 72 bytes, and more in its node).
const CHUNK_SHIFT: u32 = 6;

/// A range UNMAP sweeps the whole page index, rather than probing it per granule, once it
/// removes at least one mapping per this many indexed granules.
const SWEEP_FACTOR: usize = 8;

/// The mapping whose granule `page` the page index describes with `ix`.
fn small_mapping(shift: u32, page: u64, ix: &Indexed) -> Mapping {
    let first = page - u64::from(ix.offset);
    let end = (first.wrapping_add(u64::from(ix.last) + 1) << shift).wrapping_sub(1);
    Mapping { start: first << shift, end, phys: ix.phys, flags: ix.flags }
}

/// The bits of chunk `chunk`'s bitmap that stand for granules in `[first, last]` (the
/// chunk holds some of them).
fn chunk_mask(chunk: u64, first: u64, last: u64) -> u64 {
    let base = chunk << CHUNK_SHIFT;
    let (lo, hi) = (first.max(base) - base, last.min(base + 63) - base);
    (u64::MAX >> (63 - hi)) & (u64::MAX << lo)
}

/// The chunk holding granule `g`, and `g`'s bit in it.
fn chunk_bit(g: u64) -> (u64, u64) {
    (g >> CHUNK_SHIFT, 1 << (g & 63))
}

/// The mappings of one domain.
///
/// Small mappings (at most [`INDEXED_GRANULES`] granules, the common DMA case) live in a hash
/// index from granule number to mapping, so translate, MAP's overlap check and an exact
/// UNMAP cost one or two cache misses whatever the number of mappings. Their first granules
/// are also marked in a bitmap per chunk of 64 granules, kept in a B-tree of non-empty
/// chunks: that gives UNMAP of a range, and the address order, without visiting unmapped
/// space. Larger mappings live in a B-tree keyed by first IOVA. Every operation is
/// O(log n). An UNMAP that removes k mappings is O(k log n), or, when k is a large share
/// of the index, one sequential sweep of the index (see [`SWEEP_FACTOR`]).
#[derive(Clone, Debug)]
pub struct MappingTree {
    large: BTreeMap<u64, Entry>,
    pages: HashMap<u64, Indexed, PageHashKeys>,
    starts: BTreeMap<u64, u64>,
    shift: u32,
    small: usize,
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
            large: BTreeMap::new(),
            pages: HashMap::default(),
            starts: BTreeMap::new(),
            shift: granule.max(1).trailing_zeros(),
            small: 0,
        }
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.small + self.large.len()
    }

    /// Granule numbers covered by `m`, if it is small enough to be indexed.
    fn indexed_pages(&self, m: &Mapping) -> Option<std::ops::RangeInclusive<u64>> {
        let (first, last) = (m.start >> self.shift, m.end >> self.shift);
        // Aligned mappings cover whole granules; a MappingTree used directly may not be.
        let mask = (1u64 << self.shift) - 1;
        let aligned = m.start & mask == 0 && m.end.wrapping_add(1) & mask == 0;
        (aligned && last - first < INDEXED_GRANULES).then_some(first..=last)
    }

    /// The small mapping owning granule `page`.
    fn small_at(&self, page: u64) -> Option<Mapping> {
        Some(self.small_mapping(page, self.pages.get(&page)?))
    }

    fn small_mapping(&self, page: u64, ix: &Indexed) -> Mapping {
        small_mapping(self.shift, page, ix)
    }

    /// The mapping that contains `iova`, if any.
    #[inline]
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        if let Some(m) = self.small_at(iova >> self.shift) {
            return Some(m);
        }
        if self.large.is_empty() {
            return None;
        }
        self.large_lookup(iova)
    }

    fn large_lookup(&self, iova: u64) -> Option<Mapping> {
        let (&start, e) = self.large.range(..=iova).next_back()?;
        (e.end >= iova).then_some(Mapping { start, end: e.end, phys: e.phys, flags: e.flags })
    }

    /// Calls `f` with each granule in `[first, last]` where a small mapping starts, in
    /// order, until `f` returns false. Visits only non-empty chunks.
    fn for_each_start(&self, first: u64, last: u64, mut f: impl FnMut(u64) -> bool) {
        for (&chunk, &bits) in self.starts.range(first >> CHUNK_SHIFT..=last >> CHUNK_SHIFT) {
            let mut word = bits & chunk_mask(chunk, first, last);
            while word != 0 {
                if !f((chunk << CHUNK_SHIFT) + u64::from(word.trailing_zeros())) {
                    return;
                }
                word &= word - 1;
            }
        }
    }

    /// True if any mapping intersects `[start, end]`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if end < start {
            return false;
        }
        let (first, last) = (start >> self.shift, end >> self.shift);
        // A small mapping meets the range if it owns the range's first granule or starts
        // in a later one (small mappings own their granules whole).
        if self.pages.contains_key(&first) {
            return true;
        }
        let mut found = false;
        if first < last {
            self.for_each_start(first + 1, last, |_| {
                found = true;
                false
            });
        }
        // Only the last large mapping starting at or before `end` can reach into the range.
        found || self.large.range(..=end).next_back().is_some_and(|(_, e)| e.end >= start)
    }

    /// Inserts a mapping; the caller has checked [`Self::overlaps`].
    pub fn insert(&mut self, m: Mapping) {
        let Some(pages) = self.indexed_pages(&m) else {
            self.large.insert(m.start, Entry { end: m.end, phys: m.phys, flags: m.flags });
            return;
        };
        let (first, last) = (*pages.start(), *pages.end());
        for p in pages {
            let (offset, last) = ((p - first) as u8, (last - first) as u8);
            self.pages.insert(p, Indexed { phys: m.phys, flags: m.flags, offset, last });
        }
        let (chunk, bit) = chunk_bit(first);
        *self.starts.entry(chunk).or_insert(0) |= bit;
        self.small += 1;
    }

    /// Removes a mapping known to be live.
    fn remove(&mut self, m: &Mapping) {
        let Some(pages) = self.indexed_pages(m) else {
            self.large.remove(&m.start);
            return;
        };
        let first = *pages.start();
        for p in pages {
            self.pages.remove(&p);
        }
        let (chunk, bit) = chunk_bit(first);
        if let Some(bits) = self.starts.get_mut(&chunk) {
            *bits &= !bit;
            if *bits == 0 {
                self.starts.remove(&chunk);
            }
        }
        self.small -= 1;
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

    /// Removes every mapping that lies inside `[start, end]`; with `removed`, appends them to
    /// it in address order. Fails, removing nothing, if a mapping would be split.
    pub fn unmap(
        &mut self,
        start: u64,
        end: u64,
        mut removed: Option<&mut Vec<Mapping>>,
    ) -> Result<usize, WouldSplit> {
        if end < start {
            return Ok(0);
        }
        // Fast path, the usual driver pattern: the range is exactly one mapping.
        if let Some(m) = self.lookup(start).filter(|m| m.start == start && m.end == end) {
            self.remove(&m);
            removed.iter_mut().for_each(|r| r.push(m));
            return Ok(1);
        }
        self.check_unmap(start, end)?;
        // With no split, every small mapping starting in the range's granules lies inside
        // it, and so does every granule of the range that the page index holds.
        let (first, last) = (start >> self.shift, end >> self.shift);
        let at = removed.as_ref().map_or(0, |r| r.len());
        let small = self.count_starts(first, last);
        if small > 0 {
            if small * SWEEP_FACTOR >= self.pages.len() {
                self.sweep_pages(first, last, removed.as_deref_mut());
            } else {
                self.remove_pages(first, last, removed.as_deref_mut());
            }
            self.clear_starts(first, last);
            self.small -= small;
        }
        let large: Vec<Mapping> = self
            .large
            .range(start..=end)
            .map(|(&start, e)| Mapping { start, end: e.end, phys: e.phys, flags: e.flags })
            .collect();
        for m in &large {
            self.large.remove(&m.start);
        }
        if let Some(r) = removed {
            let was_sorted = large.is_empty();
            r.extend_from_slice(&large);
            if !was_sorted {
                r[at..].sort_unstable_by_key(|m| m.start);
            }
        }
        Ok(small + large.len())
    }

    /// Number of small mappings starting in granules `[first, last]`.
    fn count_starts(&self, first: u64, last: u64) -> usize {
        let chunks = self.starts.range(first >> CHUNK_SHIFT..=last >> CHUNK_SHIFT);
        chunks.map(|(&c, &bits)| (bits & chunk_mask(c, first, last)).count_ones() as usize).sum()
    }

    /// Unmarks the starts in granules `[first, last]`, dropping chunks left empty.
    fn clear_starts(&mut self, first: u64, last: u64) {
        let mut empty = Vec::new();
        for (&c, bits) in self.starts.range_mut(first >> CHUNK_SHIFT..=last >> CHUNK_SHIFT) {
            *bits &= !chunk_mask(c, first, last);
            if *bits == 0 {
                empty.push(c);
            }
        }
        for c in empty {
            self.starts.remove(&c);
        }
    }

    /// Removes the small mappings starting in `[first, last]` one by one from the page
    /// index: for a few among many, one probe per granule.
    fn remove_pages(&mut self, first: u64, last: u64, mut removed: Option<&mut Vec<Mapping>>) {
        let mut starts = Vec::new();
        self.for_each_start(first, last, |g| {
            starts.push(g);
            true
        });
        for g in starts {
            let Some(ix) = self.pages.remove(&g) else { continue };
            for p in g + 1..=g + u64::from(ix.last) {
                self.pages.remove(&p);
            }
            if let Some(r) = removed.as_deref_mut() {
                r.push(self.small_mapping(g, &ix));
            }
        }
    }

    /// Removes every granule in `[first, last]` from the page index in one pass over the
    /// table: for many mappings, sequential memory instead of one cache miss each.
    fn sweep_pages(&mut self, first: u64, last: u64, mut removed: Option<&mut Vec<Mapping>>) {
        let (shift, at) = (self.shift, removed.as_ref().map_or(0, |r| r.len()));
        self.pages.retain(|&p, ix| {
            if p < first || p > last {
                return true;
            }
            if let Some(r) = removed.as_deref_mut().filter(|_| ix.offset == 0) {
                r.push(small_mapping(shift, p, ix));
            }
            false
        });
        if let Some(r) = removed {
            r[at..].sort_unstable_by_key(|m| m.start);
        }
    }

    /// All mappings in address order (a copy: O(n)).
    pub fn iter(&self) -> impl Iterator<Item = Mapping> {
        let mut all: Vec<Mapping> = Vec::with_capacity(self.len());
        self.for_each_start(0, u64::MAX, |g| {
            all.extend(self.small_at(g));
            true
        });
        all.extend(self.large.iter().map(|(&start, e)| Mapping {
            start,
            end: e.end,
            phys: e.phys,
            flags: e.flags,
        }));
        all.sort_unstable_by_key(|m| m.start);
        all.into_iter()
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
    /// Created with ATTACH_TABLE: translated by walking this table, never by mappings.
    pub(crate) table: Option<PageTable>,
}

impl Domain {
    /// A new, empty domain whose mappings are aligned on `granule`.
    pub fn new(id: u32, bypass: bool, granule: u64) -> Self {
        Self { id, bypass, mappings: RwLock::new(MappingTree::new(granule)), table: None }
    }

    /// A page-table domain whose level-0 table is at `root`.
    pub(crate) fn with_table(id: u32, root: u64) -> Self {
        Self { table: Some(PageTable::new(root)), ..Self::new(id, false, 1 << 12) }
    }

    /// How the domain translates, for the rule that a domain keeps its mode for life.
    pub(crate) fn kind(&self) -> DomainKind {
        match (&self.table, self.bypass) {
            (Some(t), _) => DomainKind::Table(t.root),
            (None, true) => DomainKind::Bypass,
            (None, false) => DomainKind::Map,
        }
    }
}

/// How a domain translates; fixed when it is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DomainKind {
    /// MAP/UNMAP mappings (ATTACH without F_BYPASS).
    Map,
    /// Identity (ATTACH with F_BYPASS).
    Bypass,
    /// The I/O page table at this root (ATTACH_TABLE).
    Table(u64),
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
        assert_eq!(t.unmap(0, 4, None), Ok(0)); // (1)
        let mut t = tree(&[(0, 9)]);
        assert_eq!(t.unmap(0, 9, None), Ok(1)); // (2)
        let mut t = tree(&[(0, 4), (5, 9)]);
        assert_eq!(t.unmap(0, 9, None), Ok(2)); // (3)
        let mut t = tree(&[(0, 9)]);
        assert_eq!(t.unmap(0, 4, None), Err(WouldSplit)); // (4)
        assert_eq!(t.len(), 1);
        let mut t = tree(&[(0, 4), (5, 9)]);
        assert_eq!(t.unmap(0, 4, None), Ok(1)); // (5)
        assert_eq!(t.lookup(5), Some(m(5, 9)));
        let mut t = tree(&[(0, 4)]);
        assert_eq!(t.unmap(0, 9, None), Ok(1)); // (6)
        let mut t = tree(&[(0, 4), (10, 14)]);
        assert_eq!(t.unmap(0, 14, None), Ok(2)); // (7)
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn split_at_end_removes_nothing() {
        let mut t = tree(&[(0, 4), (10, 19)]);
        assert_eq!(t.unmap(0, 14, None), Err(WouldSplit));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn full_range_unmap_does_not_overflow() {
        let mut t = tree(&[(0, 0xfff), (u64::MAX - 0xfff, u64::MAX)]);
        let mut seen = vec![];
        assert_eq!(t.unmap(0, u64::MAX, Some(&mut seen)), Ok(2));
        assert_eq!(seen.iter().map(|m| m.start).collect::<Vec<_>>(), vec![0, u64::MAX - 0xfff]);
    }

    /// Small mappings at the very top of the address space, byte and page granules.
    #[test]
    fn top_of_address_space() {
        for granule in [1u64, 0x1000] {
            let mut t = MappingTree::new(granule);
            let start = u64::MAX - (2 * granule - 1);
            let m = Mapping { start, end: u64::MAX, phys: 0, flags: 1 };
            t.insert(m);
            assert_eq!(t.lookup(u64::MAX), Some(m));
            assert!(t.overlaps(u64::MAX, u64::MAX));
            assert_eq!(t.iter().collect::<Vec<_>>(), vec![m]);
            assert_eq!(t.unmap(start, u64::MAX, None), Ok(1));
            t.insert(m);
            assert_eq!(t.unmap(0, u64::MAX, None), Ok(1));
        }
    }

    /// The page index's hash is keyed per map: two maps disagree on where the same granule
    /// numbers go, so a guest cannot precompute IOVAs that collide in every device.
    #[test]
    fn page_hash_is_keyed_per_map() {
        let (a, b) = (PageHashKeys::default(), PageHashKeys::default());
        let same = (0..64u64).filter(|&g| a.hash_one(g << 9) == b.hash_one(g << 9)).count();
        assert_eq!(same, 0);
        // Aligned granule numbers spread over the low bits that pick a bucket.
        let buckets: std::collections::HashSet<u64> =
            (0..1024u64).map(|g| a.hash_one(g << 20) & 1023).collect();
        assert!(buckets.len() > 500, "{} of 1024 buckets", buckets.len());
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
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 128, ..Default::default() })]

        /// The tree (hash index, start bitmaps, large-mapping tree) behaves like a flat list
        /// of mappings with linear scans: overlap, lookup, unmap (with splits), order.
        #[test]
        fn tree_matches_flat_list(
            ops in proptest::collection::vec((0u8..3, 0u64..80, 1u64..9, 0u64..0x1000), 1..120)
        ) {
            let mut t = MappingTree::new(0x1000);
            let mut flat: Vec<Mapping> = Vec::new();
            for (kind, page, pages, jitter) in ops {
                let (s, e) = (page << 12, ((page + pages) << 12) - 1);
                match kind {
                    0 => {
                        let naive = flat.iter().any(|m| m.start <= e && s <= m.end);
                        proptest::prop_assert_eq!(t.overlaps(s, e), naive);
                        if !naive {
                            let m = Mapping { start: s, end: e, phys: s << 4, flags: 1 };
                            t.insert(m);
                            flat.push(m);
                        }
                    }
                    _ => {
                        // Unaligned ranges too (kind 2).
                        let (s, e) = if kind == 2 { (s + jitter, e - jitter) } else { (s, e) };
                        if e < s {
                            proptest::prop_assert_eq!(t.unmap(s, e, None), Ok(0));
                            continue;
                        }
                        let split = flat.iter().any(|m| m.start <= e && s <= m.end && (m.start < s || m.end > e));
                        let mut got = vec![];
                        let r = t.unmap(s, e, Some(&mut got));
                        if split {
                            proptest::prop_assert_eq!(r, Err(WouldSplit));
                        } else {
                            let mut want: Vec<Mapping> = flat.iter().copied().filter(|m| s <= m.start && m.end <= e).collect();
                            want.sort_by_key(|m| m.start);
                            flat.retain(|m| !(s <= m.start && m.end <= e));
                            proptest::prop_assert_eq!(r, Ok(want.len()));
                            proptest::prop_assert_eq!(got, want);
                        }
                    }
                }
                for probe in 0..90u64 {
                    let iova = (probe << 12) + 0x123;
                    let naive = flat.iter().copied().find(|m| m.start <= iova && iova <= m.end);
                    proptest::prop_assert_eq!(t.lookup(iova), naive);
                }
                let mut sorted = flat.clone();
                sorted.sort_by_key(|m| m.start);
                proptest::prop_assert_eq!(t.iter().collect::<Vec<_>>(), sorted);
                proptest::prop_assert_eq!(t.len(), flat.len());
            }
        }
    }
}
