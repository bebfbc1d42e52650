//! IOVA allocator: a free-range tree plus per-CPU magazine caches over
//! power-of-two size classes and a global depot (the "rcache" design).
//!
//! Sizes up to `2^(size_classes-1)` granules are rounded up to a power of two
//! and aligned to their size, so that a cached IOVA fits any request of its
//! class. Larger sizes go to the tree directly. The fast path takes only the
//! calling CPU's cache lock.

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::sync::{DefaultLocks, Locks, Mutex};

/// Tuning of the IOVA caches (Linux: 127-entry magazines, 6 classes, 32 depot magazines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IovaOptions {
    /// IOVAs per magazine.
    pub magazine_size: usize,
    /// Full magazines kept per class in the depot.
    pub depot_size: usize,
    /// Cached size classes: 1, 2, 4, ... `2^(size_classes-1)` granules.
    pub size_classes: usize,
    /// Number of per-CPU caches (CPU ids are taken modulo this).
    pub nr_cpus: usize,
}

impl Default for IovaOptions {
    fn default() -> Self {
        Self { magazine_size: 127, depot_size: 32, size_classes: 6, nr_cpus: 4 }
    }
}

/// Free ranges, inclusive, keyed by start.
#[derive(Default)]
struct FreeTree {
    free: BTreeMap<u64, u64>,
}

impl FreeTree {
    /// Top-down first fit of `size` bytes aligned to `align` (a power of two).
    fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let (start, last, at) = self.free.iter().rev().find_map(|(&s, &e)| {
            let top = e.checked_sub(size - 1)?;
            let at = top & !(align - 1);
            (at >= s).then_some((s, e, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - 1);
        }
        let end = at + (size - 1);
        if end < last {
            self.free.insert(end + 1, last);
        }
        Some(at)
    }

    /// Returns `[start, start+size)`, merging with neighbours. False if it
    /// overlaps free space (a double free), in which case nothing changes.
    fn free(&mut self, start: u64, size: u64) -> bool {
        let mut s = start;
        let mut e = start + (size - 1);
        if let Some((&ps, &pe)) = self.free.range(..=e).next_back() {
            if pe >= s {
                return false;
            }
            if pe.checked_add(1) == Some(s) {
                self.free.remove(&ps);
                s = ps;
            }
        }
        if let Some(next) = e.checked_add(1) {
            if let Some(ne) = self.free.remove(&next) {
                e = ne;
            }
        }
        self.free.insert(s, e);
        true
    }
}

#[derive(Default)]
struct CpuCache {
    loaded: Vec<Vec<u64>>,
    prev: Vec<Vec<u64>>,
}

/// The allocator. All sizes are in bytes, multiples of the granule.
pub struct IovaAllocator<L: Locks = DefaultLocks> {
    shift: u32,
    opts: IovaOptions,
    tree: Mutex<L, FreeTree>,
    cpus: Vec<Mutex<L, CpuCache>>,
    depot: Mutex<L, Vec<Vec<Vec<u64>>>>,
    in_use: AtomicU64,
    double_frees: AtomicU64,
}

impl IovaAllocator {
    /// An allocator over `ranges` (inclusive, granule-aligned inward) with
    /// granule `granule` (a power of two), on the [`DefaultLocks`].
    pub fn new(ranges: &[(u64, u64)], granule: u64, opts: IovaOptions) -> Self {
        Self::with_locks(ranges, granule, opts)
    }
}

impl<L: Locks> IovaAllocator<L> {
    /// As [`IovaAllocator::new`], with the locks of the family `L`.
    pub fn with_locks(ranges: &[(u64, u64)], granule: u64, opts: IovaOptions) -> Self {
        let opts = IovaOptions {
            magazine_size: opts.magazine_size.max(1),
            nr_cpus: opts.nr_cpus.max(1),
            size_classes: opts.size_classes.min(32),
            ..opts
        };
        let mut tree = FreeTree::default();
        let g = granule as u128;
        for &(s, e) in ranges {
            let start = (s as u128).div_ceil(g) * g;
            let end = (e as u128 + 1) / g * g;
            if end > start {
                tree.free(start as u64, (end - start - 1) as u64 + 1);
            }
        }
        let classes = opts.size_classes;
        let cache = || {
            Mutex::new(CpuCache {
                loaded: vec![Vec::new(); classes],
                prev: vec![Vec::new(); classes],
            })
        };
        Self {
            shift: granule.trailing_zeros(),
            opts,
            tree: Mutex::new(tree),
            cpus: (0..opts.nr_cpus).map(|_| cache()).collect(),
            depot: Mutex::new(vec![Vec::new(); classes]),
            in_use: AtomicU64::new(0),
            double_frees: AtomicU64::new(0),
        }
    }

    /// The size actually reserved for a request of `size` bytes, and its class.
    pub fn round(&self, size: u64) -> (u64, Option<usize>) {
        let pages = size.div_ceil(1 << self.shift).max(1);
        let p2 = pages.next_power_of_two();
        let class = p2.trailing_zeros() as usize;
        if class < self.opts.size_classes {
            (p2 << self.shift, Some(class))
        } else {
            (pages << self.shift, None)
        }
    }

    /// Allocates at least `size` bytes for CPU `cpu`.
    pub fn alloc(&self, size: u64, cpu: usize) -> Option<u64> {
        let (sz, class) = self.round(size);
        let iova = match class.and_then(|c| self.cache_alloc(c, cpu)) {
            Some(i) => i,
            None => {
                let align = if class.is_some() { sz } else { 1 << self.shift };
                self.tree.lock().alloc(sz, align)?
            }
        };
        self.in_use.fetch_add(sz, Ordering::Relaxed);
        Some(iova)
    }

    /// Frees an allocation made with the same `size`.
    pub fn free(&self, iova: u64, size: u64, cpu: usize) {
        let (sz, class) = self.round(size);
        match class {
            Some(c) => self.cache_free(c, iova, cpu),
            None if !self.tree_free(iova, sz) => return,
            None => {}
        }
        self.in_use.fetch_sub(sz, Ordering::Relaxed);
    }

    fn tree_free(&self, iova: u64, size: u64) -> bool {
        let ok = self.tree.lock().free(iova, size);
        if !ok {
            self.double_frees.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    fn cache_alloc(&self, class: usize, cpu: usize) -> Option<u64> {
        let mut c = self.cpus[cpu % self.cpus.len()].lock();
        let c = &mut *c;
        if let Some(i) = c.loaded[class].pop() {
            return Some(i);
        }
        if !c.prev[class].is_empty() {
            core::mem::swap(&mut c.loaded[class], &mut c.prev[class]);
            return c.loaded[class].pop();
        }
        let full = self.depot.lock()[class].pop()?;
        c.loaded[class] = full;
        c.loaded[class].pop()
    }

    fn cache_free(&self, class: usize, iova: u64, cpu: usize) {
        let mag = self.opts.magazine_size;
        let mut c = self.cpus[cpu % self.cpus.len()].lock();
        let c = &mut *c;
        if c.loaded[class].len() >= mag {
            if c.prev[class].is_empty() {
                core::mem::swap(&mut c.loaded[class], &mut c.prev[class]);
            } else {
                let full = core::mem::replace(&mut c.loaded[class], Vec::with_capacity(mag));
                let mut depot = self.depot.lock();
                if depot[class].len() < self.opts.depot_size {
                    depot[class].push(full);
                } else {
                    drop(depot);
                    let size = 1u64 << (class as u32 + self.shift);
                    for i in full {
                        self.tree_free(i, size);
                    }
                }
            }
        }
        c.loaded[class].push(iova);
    }

    /// Returns every cached IOVA to the tree (when the tree runs dry).
    pub fn flush_caches(&self) {
        let mut drained: Vec<(usize, Vec<u64>)> = Vec::new();
        for cpu in &self.cpus {
            let mut c = cpu.lock();
            for class in 0..self.opts.size_classes {
                drained.push((class, core::mem::take(&mut c.loaded[class])));
                drained.push((class, core::mem::take(&mut c.prev[class])));
            }
        }
        for (class, mags) in self.depot.lock().iter_mut().enumerate() {
            drained.extend(mags.drain(..).map(|m| (class, m)));
        }
        for (class, mag) in drained {
            let size = 1u64 << (class as u32 + self.shift);
            for i in mag {
                self.tree_free(i, size);
            }
        }
    }

    /// Bytes handed out and not freed.
    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Frees that overlapped free space (caller bugs); they were ignored.
    pub fn double_frees(&self) -> u64 {
        self.double_frees.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 4096;

    #[test]
    fn tree_allocates_top_down_aligned_and_merges_on_free() {
        let a = IovaAllocator::new(&[(0x1000, 0xf_ffff)], G, IovaOptions::default());
        let x = a.alloc(3 * G, 0).unwrap(); // rounds to 4 pages, 16 KiB aligned
        assert_eq!(x, 0xf_c000);
        assert_eq!(a.in_use(), 4 * G);
        let big = a.alloc(100 * G, 0).unwrap(); // above the classes: granule aligned
        assert_eq!(big % G, 0);
        a.free(big, 100 * G, 0);
        a.free(x, 3 * G, 0);
        assert_eq!(a.in_use(), 0);
        a.flush_caches();
        // Everything merged back: the whole range is one free run again.
        assert_eq!(a.tree.lock().free.len(), 1);
        assert_eq!(a.double_frees(), 0);
    }

    #[test]
    fn magazines_recycle_per_cpu_and_spill_to_depot() {
        let opts = IovaOptions { magazine_size: 2, depot_size: 1, size_classes: 2, nr_cpus: 2 };
        let a = IovaAllocator::new(&[(0, 0xff_ffff)], G, opts);
        let v: Vec<u64> = (0..7).map(|_| a.alloc(G, 0).unwrap()).collect();
        for &i in &v {
            a.free(i, G, 0);
        }
        // loaded (2) + prev (2) + depot (1 magazine of 2) = 6 cached, 1 spilled to the tree.
        let again: Vec<u64> = (0..6).map(|_| a.alloc(G, 0).unwrap()).collect();
        assert!(again.iter().all(|i| v.contains(i)));
        // CPU 1 can reach the depot but not CPU 0's magazines: it gets a tree IOVA.
        let other = a.alloc(G, 1).unwrap();
        assert_eq!(a.in_use(), 7 * G);
        let _ = other;
        assert_eq!(a.double_frees(), 0);
    }

    #[test]
    fn exhaustion_and_double_free_are_reported() {
        let opts = IovaOptions { size_classes: 0, ..Default::default() };
        let a = IovaAllocator::new(&[(0x1000, 0x2fff)], G, opts);
        let x = a.alloc(G, 0).unwrap();
        let y = a.alloc(G, 0).unwrap();
        assert_ne!(x, y);
        assert_eq!(a.alloc(G, 0), None);
        a.free(x, G, 0);
        a.free(x, G, 0);
        assert_eq!(a.double_frees(), 1);
        assert_eq!(a.in_use(), G);
    }
}
