//! Page-table mode (experimental, the 2023 draft's ATTACH_TABLE): the guest memory the
//! device walks I/O page tables in, and the per-domain translation cache.
//!
//! The walk itself is `viommu_proto::pgtable::walk` (format 3, bounded to four reads).
//! Here: [`TableMemory`] reads each entry with one 8-byte load, so an entry the guest
//! rewrites during a walk is seen whole, old or new; [`TableCache`] remembers the leaves
//! walks found, until INVALIDATE (or the domain's end) empties it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::RwLock;

use viommu_proto::pgtable::{self, Translation as Leaf};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::domain::PageHashKeys;
use crate::sync::{read, write};

/// Guest memory as the page-table walker reads it.
///
/// Implemented for every vm-memory [`GuestMemoryBackend`] (such as `GuestMemoryMmap`): an
/// atomic 8-byte load, `None` outside guest RAM or for an unaligned address. A VMM with
/// another memory model implements it itself; the walk needs nothing else.
pub trait TableMemory: Send + Sync {
    /// The little-endian `u64` at guest-physical `gpa`, read with one 8-byte load, or
    /// `None` if `gpa` is not 8-byte aligned RAM.
    fn read_pte(&self, gpa: u64) -> Option<u64>;
}

impl<M: GuestMemoryBackend + Send + Sync> TableMemory for M {
    #[inline]
    fn read_pte(&self, gpa: u64) -> Option<u64> {
        if gpa % 8 != 0 {
            return None;
        }
        // One atomic load: the guest may rewrite the entry at any time.
        let raw: u64 = self.load(GuestAddress(gpa), Ordering::Acquire).ok()?;
        Some(u64::from_le(raw))
    }
}

/// Why a root given by ATTACH_TABLE or a snapshot is refused.
pub(crate) fn root_is_valid(root: u64) -> bool {
    root & !pgtable::oa_mask(pgtable::LAST_LEVEL) == 0
}

/// Leaves a domain's cache holds before it starts over: a bound on guest-driven memory
/// (a 40-byte entry, 1024 hash buckets: about 42 KiB per table domain at most).
pub(crate) const CACHE_CAPACITY: usize = 512;

/// The table of one domain: its root and the cache of the leaves walks found in it.
#[derive(Debug)]
pub(crate) struct PageTable {
    /// Guest-physical address of the level-0 table.
    pub(crate) root: u64,
    pub(crate) cache: TableCache,
}

impl PageTable {
    pub(crate) fn new(root: u64) -> Self {
        Self { root, cache: TableCache::default() }
    }
}

/// Leaves found by walks, keyed by 4 KiB page, tagged with a generation.
///
/// INVALIDATE bumps the generation and removes the entries it covers, under the write
/// lock. A walk reads the generation with its cache miss and fills only if it is
/// unchanged: a walk that began before an INVALIDATE (and may have read the old table)
/// never leaves its leaf behind after the INVALIDATE.
#[derive(Debug, Default)]
pub(crate) struct TableCache {
    state: RwLock<CacheState>,
}

#[derive(Debug, Default)]
struct CacheState {
    generation: u64,
    leaves: HashMap<u64, Leaf, PageHashKeys>,
}

impl TableCache {
    /// The cached leaf for `iova`'s page, or the generation to fill with after a walk.
    #[inline]
    pub(crate) fn get(&self, iova: u64) -> Result<Leaf, u64> {
        let st = read(&self.state);
        st.leaves.get(&(iova >> 12)).copied().ok_or(st.generation)
    }

    /// Remembers `leaf` for `iova`'s page if no invalidation happened since `generation`.
    pub(crate) fn fill(&self, generation: u64, iova: u64, leaf: Leaf) {
        let mut st = write(&self.state);
        if st.generation != generation {
            return;
        }
        if st.leaves.len() >= CACHE_CAPACITY {
            st.leaves.clear();
        }
        st.leaves.insert(iova >> 12, leaf);
    }

    /// Forgets every leaf that intersects `[start, end]`, or every leaf with `None`.
    pub(crate) fn invalidate(&self, range: Option<(u64, u64)>) {
        let mut st = write(&self.state);
        st.generation = st.generation.wrapping_add(1);
        match range {
            None => st.leaves.clear(),
            Some((start, end)) => st.leaves.retain(|_, l| {
                let last = l.iova + (l.size - 1);
                last < start || end < l.iova
            }),
        }
    }

    /// Number of cached leaves.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        read(&self.state).leaves.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(iova: u64, size: u64) -> Leaf {
        Leaf { iova, oa: 0x10_0000, size, read: true, write: false }
    }

    #[test]
    fn a_fill_older_than_an_invalidation_is_dropped() {
        let c = TableCache::default();
        let Err(g) = c.get(0x1000) else { panic!("empty cache hit") };
        c.invalidate(Some((0x1000, 0x1fff)));
        c.fill(g, 0x1000, leaf(0x1000, 0x1000));
        assert_eq!(c.get(0x1000), Err(g + 1));
        c.fill(g + 1, 0x1000, leaf(0x1000, 0x1000));
        assert_eq!(c.get(0x1000), Ok(leaf(0x1000, 0x1000)));
    }

    #[test]
    fn a_range_invalidation_removes_every_leaf_it_touches() {
        let c = TableCache::default();
        // Two pages of one 2 MiB block, and a page elsewhere.
        c.fill(0, 0x20_0000, leaf(0x20_0000, 0x20_0000));
        c.fill(0, 0x3f_f000, leaf(0x20_0000, 0x20_0000));
        c.fill(0, 0x50_0000, leaf(0x50_0000, 0x1000));
        c.invalidate(Some((0x3f_f000, 0x3f_ffff)));
        assert_eq!(c.len(), 1);
        assert!(c.get(0x50_0000).is_ok());
        c.invalidate(None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn the_cache_is_bounded() {
        let c = TableCache::default();
        for p in 0..(CACHE_CAPACITY as u64 + 10) {
            c.fill(0, p << 12, leaf(p << 12, 0x1000));
        }
        assert!(c.len() <= CACHE_CAPACITY);
    }

    #[test]
    fn guest_memory_reads_one_le_entry_and_refuses_outside_ram() {
        use vm_memory::GuestMemoryMmap;
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_slice(&0x1234_5678_9abc_def0u64.to_le_bytes(), GuestAddress(0x1008)).unwrap();
        assert_eq!(mem.read_pte(0x1008), Some(0x1234_5678_9abc_def0));
        assert_eq!(mem.read_pte(0x1004), None);
        assert_eq!(mem.read_pte(0x2000), None);
        assert_eq!(mem.read_pte(u64::MAX - 7), None);
    }
}
