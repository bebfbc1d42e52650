//! A domain and the IOMMU operations on it.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::AtomicBool;

use viommu_proto::{MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};

use crate::iommu::domain::state::{DomainState, PendingOp, StaleStep};
use crate::iommu::encode::{map_req, unmap_req};
use crate::iommu::types::{DomainKind, Mapping, Prot};
use crate::iommu::{Port, Ticket};
use crate::sync::{DefaultLocks, Locks, Mutex};
use crate::{Error, Result};

mod dma;
mod settle;
pub(in crate::iommu) mod state;
mod table;

pub(crate) struct DomainInner<L: Locks> {
    pub(in crate::iommu) id: u32,
    pub(in crate::iommu) kind: DomainKind,
    pub(in crate::iommu) granule: u64,
    pub(in crate::iommu) aperture: (u64, u64),
    pub(in crate::iommu) iommu_id: u64,
    pub(in crate::iommu) mmio: bool,
    /// Page-table mode: `state.table` is set and never goes (no MAP is sent).
    pub(in crate::iommu) table: bool,
    pub(in crate::iommu) port: Arc<dyn Port>,
    pub(in crate::iommu) state: Mutex<L, DomainState>,
    /// Whether `state.stale` is non-empty, written under the state lock:
    /// the common path (no stale MAP) skips taking the lock to look.
    pub(in crate::iommu) stale_any: AtomicBool,
}

impl<L: Locks> DomainInner<L> {
    fn check(&self, m: &Mapping, size: u64) -> Result<()> {
        let g = self.granule - 1;
        if size == 0 || m.iova & g != 0 || m.paddr & g != 0 || (m.last & g) != g {
            return Err(Error::Unaligned { iova: m.iova, size });
        }
        if m.iova < self.aperture.0 || m.last > self.aperture.1 {
            return Err(Error::OutOfRange { start: m.iova, end: m.last });
        }
        if m.prot.0 & !(MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO) != 0 {
            return Err(Error::InvalidArgument("unknown prot bits"));
        }
        if m.prot.0 & MAP_F_MMIO != 0 && !self.mmio {
            return Err(Error::Unsupported("MMIO"));
        }
        if m.prot.0 & MAP_F_MMIO != 0 && self.table {
            // Format 3 has no memory attributes.
            return Err(Error::Unsupported("MMIO in page-table mode"));
        }
        Ok(())
    }

    /// Records a mapping in the tree without sending anything.
    pub(in crate::iommu) fn insert(&self, m: Mapping) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(iova) = st.overlap(m.iova, m.last) {
            return Err(Error::Overlap { iova });
        }
        Self::write_entries(&mut st, core::slice::from_ref(&m))?;
        st.tree.insert(m);
        Ok(())
    }

    fn attached(st: &DomainState, kind: DomainKind) -> bool {
        !st.endpoints.is_empty() && !matches!(kind, DomainKind::Identity { bypass: true })
    }
}

impl<L: Locks> Drop for DomainInner<L> {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        let stale: Vec<Ticket> = st
            .stale
            .iter()
            .filter_map(|s| match s.step {
                StaleStep::Map(ticket) | StaleStep::Unmap(Some(ticket)) => Some(ticket),
                StaleStep::Unmap(None) => None,
            })
            .collect();
        self.port.abandon(&stale);
        let pending = st.pending.drain(..).map(|p| p.ticket()).collect();
        self.port.domain_dropped(self.id, pending);
    }
}

/// A domain: an address space that endpoints attach to. Cheap to clone
/// (shared handle); the domain ID is freed when the last handle goes.
pub struct Domain<L: Locks = DefaultLocks> {
    pub(in crate::iommu) inner: Arc<DomainInner<L>>,
}

impl<L: Locks> Clone for Domain<L> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<L: Locks> Domain<L> {
    /// The domain ID.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// What the domain translates.
    pub fn kind(&self) -> DomainKind {
        self.inner.kind
    }

    /// The smallest mapping size.
    pub fn granule(&self) -> u64 {
        self.inner.granule
    }

    /// Valid IOVAs `(first, last)`, inclusive.
    pub fn aperture(&self) -> (u64, u64) {
        self.inner.aperture
    }

    /// Attached endpoints.
    pub fn endpoints(&self) -> Vec<u32> {
        self.inner.state.lock().endpoints.iter().copied().collect()
    }

    /// A copy of the mapping tree, in IOVA order.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.inner.state.lock().tree.iter().copied().collect()
    }

    /// Records `[iova, iova+size)` → `paddr` and, when the domain is attached,
    /// queues a MAP (no sync: see [`Self::iotlb_sync_map`]). If queueing
    /// fails the tree entry is removed again. In page-table mode it writes
    /// the entries instead and sends nothing.
    pub fn map_pages(&self, iova: u64, paddr: u64, size: u64, prot: Prot) -> Result<()> {
        let d = &self.inner;
        if d.kind != DomainKind::Paging {
            return Err(Error::NotPaging);
        }
        let last = iova.checked_add(size.wrapping_sub(1)).ok_or(Error::Unaligned { iova, size })?;
        let m = Mapping { iova, last, paddr, prot };
        d.check(&m, size)?;
        let mut st = d.lock_after(&[(iova, last)], true)?;
        if let Some(iova) = st.overlap(iova, last) {
            return Err(Error::Overlap { iova });
        }
        if d.table {
            DomainInner::<L>::write_entries(&mut st, core::slice::from_ref(&m))?;
            st.tree.insert(m);
            return Ok(());
        }
        st.tree.insert(m);
        if DomainInner::<L>::attached(&st, d.kind) {
            match d.port.submit(&map_req(d.id, &m), 0) {
                Ok(ticket) => st.pending.push(PendingOp::Map { ticket, iova, last }),
                Err(e) => {
                    st.tree.remove_exact(iova, last);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the mappings inside `[iova, iova+size)` and, when attached,
    /// queues one UNMAP. Never splits a mapping ([`Error::WouldSplit`]).
    /// Returns the bytes unmapped. Sync with [`Self::iotlb_sync`]. In
    /// page-table mode it clears their entries and queues one INVALIDATE.
    pub fn unmap_pages(&self, iova: u64, size: u64) -> Result<u64> {
        let d = &self.inner;
        if size == 0 {
            return Ok(0);
        }
        let last = iova.saturating_add(size - 1);
        let mut st = d.lock_after(&[(iova, last)], false)?;
        let removed = st.tree.remove_range(iova, last)?;
        let bytes = removed.iter().map(|m| m.last - m.iova + 1).sum();
        if d.table && !removed.is_empty() {
            let spans: Vec<(u64, u64)> = removed.iter().map(|m| (m.iova, m.last)).collect();
            DomainInner::<L>::clear_entries(&mut st, &spans);
            if !DomainInner::<L>::attached(&st, d.kind) {
                if let Some(t) = st.table.as_mut() {
                    t.forget_device();
                }
                return Ok(bytes);
            }
            let range = spans.iter().fold((u64::MAX, 0), |h, s| (h.0.min(s.0), h.1.max(s.1)));
            // The entries are gone whatever happens: a failed INVALIDATE
            // leaves its range to the next one (marked dirty).
            let (ticket, range) = d.queue_invalidate(&mut st, Some(range))?;
            st.pending.push(PendingOp::Invalidate { ticket, range });
            return Ok(bytes);
        }
        if removed.is_empty() || !DomainInner::<L>::attached(&st, d.kind) {
            return Ok(bytes);
        }
        match d.port.submit(&unmap_req(d.id, iova, last), 0) {
            Ok(ticket) => {
                st.pending.push(PendingOp::Unmap { ticket, range: (iova, last), removed })
            }
            Err(e) => {
                for m in removed {
                    st.tree.insert(m);
                }
                return Err(e);
            }
        }
        Ok(bytes)
    }

    /// Syncs the MAPs queued for `[iova, iova+size)`, only if the domain is
    /// attached and such requests are pending. A failed MAP is removed from
    /// the tree and its status returned as a typed error.
    pub fn iotlb_sync_map(&self, iova: u64, size: u64) -> Result<()> {
        let last = iova.saturating_add(size.saturating_sub(1));
        let ops = {
            let mut st = self.inner.state.lock();
            if st.endpoints.is_empty() || st.pending.is_empty() {
                return Ok(());
            }
            let (mine, rest): (Vec<_>, Vec<_>) = st.pending.drain(..).partition(|op| {
                matches!(op, PendingOp::Map { iova: s, last: e, .. } if *s <= last && *e >= iova)
            });
            st.pending = rest;
            mine
        };
        self.inner.finish(ops)
    }

    /// Syncs every request queued for this domain (UNMAPs and MAPs). A
    /// failed UNMAP puts its mappings back in the tree. Also cleans up after
    /// timed-out MAPs the device has answered since (see [`Self::stale_ranges`]).
    pub fn iotlb_sync(&self) -> Result<()> {
        let ops = core::mem::take(&mut self.inner.state.lock().pending);
        self.inner.finish(ops)?;
        self.inner.drain_stale()
    }

    /// Ranges `(first, last)` of MAPs whose sync timed out and that the device
    /// has not answered yet (or whose cleanup UNMAP is not done): no new
    /// mapping may overlap them ([`Error::Overlap`]) until then.
    pub fn stale_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.state.lock().stale.iter().map(|s| (s.iova, s.last)).collect()
    }

    /// Flushes everything: in MAP mode the same as [`Self::iotlb_sync`],
    /// since the device has no IOTLB to invalidate beyond UNMAP; in
    /// page-table mode also one domain-wide INVALIDATE, synced.
    pub fn flush_iotlb_all(&self) -> Result<()> {
        if self.inner.table {
            let mut st = self.inner.state.lock();
            if DomainInner::<L>::attached(&st, self.inner.kind) {
                let (ticket, range) = self.inner.queue_invalidate(&mut st, None)?;
                st.pending.push(PendingOp::Invalidate { ticket, range });
            }
        }
        self.iotlb_sync()
    }

    /// Whether the domain is in page-table mode (the device walks its
    /// table; see [`VirtioIommu::alloc_paging`](crate::VirtioIommu::alloc_paging)).
    pub fn uses_page_table(&self) -> bool {
        self.inner.table
    }

    /// Page-table mode: the guest-physical address of the level-0 table.
    pub fn page_table_root(&self) -> Option<u64> {
        self.inner.state.lock().table.as_ref().map(|t| t.root())
    }

    /// Page-table mode: table pages in use (the root included), and table
    /// pages unlinked but not yet freed (waiting for an INVALIDATE).
    pub fn page_table_pages(&self) -> Option<(usize, usize)> {
        self.inner.state.lock().table.as_ref().map(|t| (t.tables(), t.unfreed()))
    }

    /// The physical address `iova` translates to, from the tree.
    pub fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let st = self.inner.state.lock();
        let m = st.tree.get(iova)?;
        Some(m.paddr + (iova - m.iova))
    }

    /// Whether this domain is attached to at least one endpoint.
    pub fn is_attached(&self) -> bool {
        !self.inner.state.lock().endpoints.is_empty()
    }
}

impl<L: Locks> core::fmt::Debug for Domain<L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.inner.id)
            .field("kind", &self.inner.kind)
            .finish()
    }
}
