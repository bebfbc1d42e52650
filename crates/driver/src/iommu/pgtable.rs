//! Page-table mode (drafts, issue #15): a domain's I/O page table in DMA
//! memory, in the "Virt I/O page table" format 3 (`viommu_proto::pgtable`),
//! which the device walks instead of receiving MAPs.
//!
//! - Mapping writes entries and sends nothing. Each chunk takes the largest
//!   leaf its IOVA, address and remaining size allow (1 GiB, 2 MiB, 4 KiB).
//! - Unmapping clears leaves. A table whose last entry goes is noted, and
//!   unlinked when the next INVALIDATE is queued if it is still empty then
//!   (so that a lazy domain whose I/Os come and go in one table keeps it);
//!   unlinked, it is *retired*: the device may still hold a walk through it, so its page is
//!   freed only once an INVALIDATE queued after the unlink has completed
//!   (the domain hands the retired pages to that INVALIDATE's ticket). Freed
//!   tables are all zeroes: up to [`SPARE_TABLES`] are kept for the next
//!   tables the domain needs, so that an I/O whose unmap empties its tables
//!   does not pay the `Hal` (allocation and zeroing) for them again on the
//!   next map; the rest go back to the `Hal`.
//! - Write order, so that a walk running meanwhile sees the old entry or the
//!   new one: a table page is zeroed (the `Hal` gives zeroed pages) before the
//!   Release fence that precedes the entry linking it, and every entry is one
//!   aligned 8-byte volatile store.
//!
//! Beside each table the driver keeps its children and its count of valid
//! entries, so it never reads back what the device might have changed (the
//! device never writes the table: the draft has no accessed or dirty bits).
//! Written by hand: no crate writes this draft format.

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{fence, Ordering};

use viommu_proto::pgtable::{self as pt, Pte, ENTRIES, LAST_LEVEL};

use crate::hal::{DmaBuffer, Hal};
use crate::iommu::Ticket;
use crate::{Error, Result};

/// One table page.
pub(in crate::iommu) type Page = DmaBuffer<Arc<dyn Hal>>;

/// Freed tables a domain keeps for reuse, of each kind (with next-level
/// pointers, and last-level).
pub(in crate::iommu) const SPARE_TABLES: usize = 32;

/// An inclusive IOVA range.
pub(in crate::iommu) type Span = (u64, u64);

struct Table {
    page: Page,
    /// The next-level table behind each entry (empty at the last level).
    next: Vec<Option<Box<Table>>>,
    /// Valid entries (tables and leaves).
    live: u16,
}

impl Table {
    fn new(hal: &Arc<dyn Hal>, level: usize) -> Result<Self> {
        let page = DmaBuffer::new(hal.clone(), 1).ok_or(Error::NoMemory)?;
        let mut next = Vec::new();
        if level < LAST_LEVEL {
            next.resize_with(ENTRIES, || None);
        }
        Ok(Self { page, next, live: 0 })
    }

    fn entry(&self, i: usize) -> u64 {
        self.page.read_u64(8 * i)
    }

    fn set(&mut self, i: usize, raw: u64) {
        self.page.write_u64(8 * i, raw);
    }
}

/// An unlinked table and the IOVAs it translated.
type Retired = (Box<Table>, Span);

/// The page table of one domain, with the table pages waiting to be freed.
pub(in crate::iommu) struct PageTable {
    hal: Arc<dyn Hal>,
    root: Table,
    /// Unlinked tables no queued INVALIDATE covers yet, with the IOVAs each
    /// translated.
    retired: Vec<Retired>,
    /// Unlinked tables waiting for an INVALIDATE to complete.
    parked: Vec<(Ticket, Vec<Retired>)>,
    /// Freed tables (all zeroes, no children) kept for reuse: above the
    /// last level, and at it.
    // Boxed: they move in and out of their parents' slots as they are.
    #[allow(clippy::vec_box)]
    spare: [Vec<Box<Table>>; 2],
    /// Tables that became empty, by `(level, first IOVA)`: unlinked at the
    /// next [`Self::sweep`] if still empty.
    emptied: Vec<(usize, u64)>,
    /// Ranges whose INVALIDATE failed or could not be queued: the next one covers them.
    dirty: Option<Span>,
    /// Table pages in use, the root included.
    tables: usize,
}

/// The hull of two optional ranges.
pub(in crate::iommu) fn hull(a: Option<Span>, b: Option<Span>) -> Option<Span> {
    match (a, b) {
        (Some(a), Some(b)) => Some((a.0.min(b.0), a.1.max(b.1))),
        (a, None) => a,
        (None, b) => b,
    }
}

impl PageTable {
    /// An empty table: one zeroed root page.
    pub(in crate::iommu) fn new(hal: Arc<dyn Hal>) -> Result<Self> {
        let root = Table::new(&hal, 0)?;
        Ok(Self {
            hal,
            root,
            retired: Vec::new(),
            parked: Vec::new(),
            spare: [Vec::new(), Vec::new()],
            emptied: Vec::new(),
            dirty: None,
            tables: 1,
        })
    }

    /// The address ATTACH_TABLE gives the device (`pgd`).
    pub(in crate::iommu) fn root(&self) -> u64 {
        self.root.page.paddr()
    }

    /// Table pages in use (the root included), retired and parked ones not.
    pub(in crate::iommu) fn tables(&self) -> usize {
        self.tables
    }

    /// Table pages unlinked and not yet freed.
    pub(in crate::iommu) fn unfreed(&self) -> usize {
        self.retired.len() + self.parked.iter().map(|p| p.1.len()).sum::<usize>()
    }

    /// Maps `[iova, iova+size)` to `paddr` (both 4 KiB aligned, checked by
    /// the caller) with the largest leaves that fit. On failure nothing of it
    /// stays mapped.
    pub(in crate::iommu) fn map(
        &mut self,
        iova: u64,
        paddr: u64,
        size: u64,
        read: bool,
        write: bool,
    ) -> Result<()> {
        let last = iova.checked_add(size.wrapping_sub(1)).ok_or(Error::Unaligned { iova, size })?;
        if size == 0
            || last > pt::IOVA_MAX
            || paddr.checked_add(size - 1).is_none_or(|e| e >> pt::OA_BITS != 0)
        {
            return Err(Error::OutOfRange { start: iova, end: last });
        }
        let mut done = 0;
        while done < size {
            let (va, pa, left) = (iova + done, paddr + done, size - done);
            let level = (1..=LAST_LEVEL)
                .find(|&l| {
                    let bs = pt::level_size(l);
                    va % bs == 0 && pa % bs == 0 && left >= bs
                })
                .unwrap_or(LAST_LEVEL);
            if let Err(e) = self.set_leaf(va, level, Pte::leaf(pa, read, write).get()) {
                if done > 0 {
                    self.unmap(iova, iova + done - 1);
                }
                return Err(e);
            }
            done += pt::level_size(level);
        }
        // The entries are in memory before the caller hands the IOVA to a device.
        fence(Ordering::Release);
        Ok(())
    }

    /// Writes the leaf `raw` for `va` at `level`, creating tables on the way.
    fn set_leaf(&mut self, va: u64, level: usize, raw: u64) -> Result<()> {
        let hal = &self.hal;
        let spare = &mut self.spare;
        let mut t = &mut self.root;
        for l in 0..level {
            let i = pt::index(va, l);
            if t.next[i].is_none() {
                if t.entry(i) & pt::PTE_VALID != 0 {
                    // A leaf covers va already.
                    return Err(Error::Overlap { iova: va & !(pt::level_size(l) - 1) });
                }
                let kind = usize::from(l + 1 == LAST_LEVEL);
                let child = match spare[kind].pop() {
                    Some(c) => c,
                    None => Box::new(Table::new(hal, l + 1)?),
                };
                self.tables += 1;
                // The child's zeroes are visible before the entry that links it.
                fence(Ordering::Release);
                t.set(i, Pte::table(child.page.paddr()).get());
                t.live += 1;
                t.next[i] = Some(child);
            }
            t = t.next[i].as_deref_mut().expect("linked above");
        }
        let i = pt::index(va, level);
        let occupied =
            t.entry(i) & pt::PTE_VALID != 0 || t.next.get(i).is_some_and(Option::is_some);
        if occupied {
            return Err(Error::Overlap { iova: va });
        }
        t.set(i, raw);
        t.live += 1;
        Ok(())
    }

    /// Clears every leaf lying wholly inside `[first, last]`; the tables it
    /// leaves empty are noted for [`Self::sweep`].
    pub(in crate::iommu) fn unmap(&mut self, first: u64, last: u64) {
        if first > pt::IOVA_MAX || first > last {
            return;
        }
        let range = (first, last.min(pt::IOVA_MAX));
        clear(&mut self.root, 0, 0, range, &mut self.emptied);
    }

    /// Unlinks the noted tables that are still empty, deepest first (a
    /// parent they leave empty goes too), and retires them (see the module;
    /// [`Self::pending_span`] then covers what they translated). Called
    /// before an INVALIDATE is queued.
    pub(in crate::iommu) fn sweep(&mut self) {
        let mut todo = core::mem::take(&mut self.emptied);
        for level in (1..=LAST_LEVEL).rev() {
            let mut parents = Vec::new();
            for &(_, va) in todo.iter().filter(|e| e.0 == level) {
                // The parent, if the path to it still exists.
                let Some(t) = descend(&mut self.root, va, level - 1) else { continue };
                let i = pt::index(va, level - 1);
                if t.next.get(i).and_then(Option::as_ref).is_none_or(|c| c.live != 0) {
                    continue;
                }
                t.set(i, 0);
                t.live -= 1;
                let child = t.next[i].take().expect("checked");
                let first = va & !(pt::level_size(level - 1) - 1);
                self.retired.push((child, (first, first + (pt::level_size(level - 1) - 1))));
                self.tables -= 1;
                if t.live == 0 && level > 1 {
                    parents.push((level - 1, va));
                }
            }
            todo.retain(|e| e.0 != level);
            todo.extend(parents);
        }
    }

    /// What the next INVALIDATE must cover beyond what was unmapped: the
    /// retired tables and the dirty range.
    pub(in crate::iommu) fn pending_span(&self) -> Option<Span> {
        self.retired.iter().map(|r| r.1).fold(self.dirty, |h, s| hull(h, Some(s)))
    }

    /// Whether tables were unlinked since the last INVALIDATE was queued
    /// (the next one is then not leaf-only).
    pub(in crate::iommu) fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// The INVALIDATE `ticket` was queued: it covers the retired tables and
    /// the dirty range.
    pub(in crate::iommu) fn queued(&mut self, ticket: Ticket) {
        self.dirty = None;
        if !self.retired.is_empty() {
            self.parked.push((ticket, core::mem::take(&mut self.retired)));
        }
    }

    /// An INVALIDATE could not be queued (or failed): `span` is to be
    /// covered by the next one.
    pub(in crate::iommu) fn mark_dirty(&mut self, span: Span) {
        self.dirty = hull(self.dirty, Some(span));
    }

    /// The INVALIDATE `ticket` completed (`ok`) or failed or was given up
    /// on: its tables are freed, or wait for the next INVALIDATE.
    pub(in crate::iommu) fn settled(&mut self, ticket: Ticket, ok: bool) {
        let Some(k) = self.parked.iter().position(|p| p.0 == ticket) else { return };
        let (_, tables) = self.parked.swap_remove(k);
        if !ok {
            for p in &tables {
                self.dirty = hull(self.dirty, Some(p.1));
            }
            self.retired.extend(tables);
            return;
        }
        // The device finished every walk that could have reached them
        // before the INVALIDATE completed: reuse or free them.
        self.recycle(tables.into_iter().map(|t| t.0));
    }

    /// Keeps freed tables for reuse, up to [`SPARE_TABLES`] of each kind;
    /// the others go back to the `Hal`.
    fn recycle(&mut self, tables: impl Iterator<Item = Box<Table>>) {
        for t in tables {
            let spare = &mut self.spare[usize::from(t.next.is_empty())];
            if spare.len() < SPARE_TABLES {
                spare.push(t);
            }
        }
    }

    /// The device holds no table of this domain (it is detached): nothing
    /// waits for an INVALIDATE any more.
    pub(in crate::iommu) fn forget_device(&mut self) {
        self.sweep();
        let retired = core::mem::take(&mut self.retired).into_iter().map(|t| t.0);
        let parked = core::mem::take(&mut self.parked).into_iter().flat_map(|p| p.1).map(|t| t.0);
        let all: Vec<Box<Table>> = retired.chain(parked).collect();
        self.recycle(all.into_iter());
        self.dirty = None;
    }

    /// Walks the table for `iova` with the format's own walk, reading the
    /// table pages (for tests: what the device would see).
    #[cfg(test)]
    pub(in crate::iommu) fn walk(&self, iova: u64) -> Result<pt::Translation, pt::WalkError> {
        pt::walk(self.root(), iova, |gpa| self.read_gpa(gpa))
    }

    #[cfg(test)]
    fn read_gpa(&self, gpa: u64) -> Option<u64> {
        fn find(t: &Table, gpa: u64) -> Option<u64> {
            let base = t.page.paddr();
            if (base..base + 4096).contains(&gpa) {
                return Some(t.entry(((gpa - base) / 8) as usize));
            }
            t.next.iter().flatten().find_map(|c| find(c, gpa))
        }
        find(&self.root, gpa)
    }
}

/// The table of `level` on the path to `va`, if linked.
fn descend(root: &mut Table, va: u64, level: usize) -> Option<&mut Table> {
    let mut t = root;
    for l in 0..level {
        t = t.next.get_mut(pt::index(va, l))?.as_deref_mut()?;
    }
    Some(t)
}

/// Clears the leaves of table `t` (of `level`, translating from `base`)
/// wholly inside `range`, recursing into its tables; a child left empty is
/// noted in `emptied`.
fn clear(t: &mut Table, level: usize, base: u64, range: Span, emptied: &mut Vec<(usize, u64)>) {
    let size = pt::level_size(level);
    let span_last = base + (ENTRIES as u64 * size - 1);
    let lo = if range.0 > base { pt::index(range.0, level) } else { 0 };
    let hi = if range.1 < span_last { pt::index(range.1, level) } else { ENTRIES - 1 };
    for i in lo..=hi {
        let va = base + i as u64 * size;
        let entry_last = va + (size - 1);
        if let Some(child) = t.next.get_mut(i).and_then(Option::as_deref_mut) {
            let live = child.live;
            clear(child, level + 1, va, range, emptied);
            if child.live == 0 && live > 0 && emptied.last() != Some(&(level + 1, va)) {
                emptied.push((level + 1, va));
            }
        } else if t.entry(i) & pt::PTE_VALID != 0 && range.0 <= va && entry_last <= range.1 {
            t.set(i, 0);
            t.live -= 1;
        }
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::fake::FakeMemory;

    fn table(mem: &FakeMemory) -> PageTable {
        PageTable::new(Arc::new(mem.hal())).expect("root")
    }

    /// Leaves are the largest blocks alignment and size allow; unmapping
    /// retires the tables it empties, which wait for an INVALIDATE to
    /// complete (a failed one keeps them for the next).
    #[test]
    fn blocks_and_retired_tables() {
        let mem = FakeMemory::new(64);
        let mut t = table(&mem);
        // 1 GiB + 2 MiB + 4 KiB from a 1 GiB-aligned IOVA and address.
        t.map(1 << 30, 3 << 30, (1 << 30) + 0x20_1000, true, false).unwrap();
        let sizes: Vec<u64> = [1 << 30, (2 << 30), (2 << 30) + 0x20_0000]
            .iter()
            .map(|&va| t.walk(va).unwrap().size)
            .collect();
        assert_eq!(sizes, [1 << 30, 0x20_0000, 0x1000]);
        assert_eq!(
            t.walk((2 << 30) + 0x20_0abc).unwrap().output((2 << 30) + 0x20_0abc),
            (4 << 30) + 0x20_0abc
        );
        assert_eq!(t.tables(), 4, "root, level 1, level 2, level 3");
        assert!(matches!(t.map(2 << 30, 0, 0x1000, true, true), Err(Error::Overlap { .. })));
        // A leaf inside a range, not wholly: kept.
        t.unmap(1 << 30, (2 << 30) - 0x1000);
        assert!(t.walk(1 << 30).is_ok());
        t.unmap(0, u64::MAX);
        assert!(matches!(t.walk(2 << 30), Err(pt::WalkError::NotMapped { level: 2 })));
        assert_eq!(t.tables(), 4, "empty, still linked until the sweep");
        t.sweep();
        assert!(matches!(t.walk(2 << 30), Err(pt::WalkError::NotMapped { level: 0 })));
        assert_eq!((t.tables(), t.unfreed()), (1, 3));
        assert_eq!(t.pending_span(), Some((0, (1 << 39) - 1)), "the level-1 table's span");
        t.queued(Ticket(7));
        assert_eq!((t.pending_span(), t.unfreed()), (None, 3));
        t.settled(Ticket(7), false);
        assert_eq!(t.unfreed(), 3, "back to retired");
        t.queued(Ticket(8));
        let live = mem.live_pages();
        t.settled(Ticket(8), true);
        assert_eq!((t.unfreed(), mem.live_pages()), (0, live), "kept as spares");
        // The next tables come from the spares: no page from the Hal.
        t.map(1 << 40, 0, 0x1000, true, true).unwrap();
        assert_eq!((t.tables(), mem.live_pages()), (4, live));
        assert_eq!(t.walk(1 << 40).unwrap().oa, 0);
    }
}
