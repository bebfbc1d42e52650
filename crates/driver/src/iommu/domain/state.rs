//! What a domain keeps under its lock: endpoints, mapping tree, requests
//! not yet synced, stale MAPs.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::iommu::pgtable::{PageTable, Span};
use crate::iommu::tree::MapTree;
use crate::iommu::types::Mapping;
use crate::iommu::{Ticket, UnmapTicket};

pub(in crate::iommu) enum PendingOp {
    Map {
        ticket: Ticket,
        iova: u64,
        last: u64,
    },
    /// `range` is the UNMAP's `(first, last)`; `removed` what left the tree.
    Unmap {
        ticket: Ticket,
        range: (u64, u64),
        removed: Vec<Mapping>,
    },
    /// Page-table mode: an INVALIDATE of `range`, whose entries are cleared already.
    Invalidate {
        ticket: Ticket,
        range: Span,
    },
}

impl PendingOp {
    pub(in crate::iommu) fn ticket(&self) -> Ticket {
        match self {
            Self::Map { ticket, .. }
            | Self::Unmap { ticket, .. }
            | Self::Invalidate { ticket, .. } => *ticket,
        }
    }
}

/// Where a stale MAP stands.
#[derive(Clone, Copy)]
pub(in crate::iommu) enum StaleStep {
    /// Its reply is not in yet.
    Map(Ticket),
    /// It succeeded late: a cleanup UNMAP is to be queued (`None`) or on the ring.
    Unmap(Option<Ticket>),
}

/// A MAP whose sync timed out, or that failed in a way that may have left a
/// mapping (see [`may_have_applied`]). It left the tree, but the device may
/// have it, so its range stays blocked (no new MAP, no IOVA reuse) until its
/// reply is in and, if needed, a cleanup UNMAP has completed.
pub(in crate::iommu) struct Stale {
    pub(in crate::iommu) step: StaleStep,
    pub(in crate::iommu) iova: u64,
    pub(in crate::iommu) last: u64,
}

#[derive(Default)]
pub(in crate::iommu) struct DomainState {
    pub(in crate::iommu) endpoints: BTreeSet<u32>,
    /// The mapping tree: non-overlapping mappings, one node per run of
    /// touching ones.
    pub(in crate::iommu) tree: MapTree,
    /// Requests queued by `map_pages`/`unmap_pages` and not yet synced.
    pub(in crate::iommu) pending: Vec<PendingOp>,
    /// Timed-out MAPs, see [`Stale`].
    pub(in crate::iommu) stale: Vec<Stale>,
    /// DMA-layer UNMAPs on the ring whose range spans a gap between freed
    /// ranges: IOVAs in the gap may be mapped again before they complete.
    pub(in crate::iommu) unmapping: Vec<UnmapTicket>,
    /// Page-table mode: the I/O page table the device walks (`None`: MAP mode).
    pub(in crate::iommu) table: Option<PageTable>,
}

impl DomainState {
    /// First IOVA of a mapping or stale range that overlaps `[start, last]`.
    pub(in crate::iommu) fn overlap(&self, start: u64, last: u64) -> Option<u64> {
        if let Some(m) = self.tree.first_in(start, last) {
            return Some(m.iova);
        }
        self.stale.iter().find(|s| s.iova <= last && start <= s.last).map(|s| s.iova)
    }

    /// A MAP did not happen: its tree entry goes.
    pub(in crate::iommu) fn undo_map(&mut self, iova: u64, last: u64) {
        self.tree.remove_exact(iova, last);
    }

    /// An INVALIDATE failed or was given up on: the next one covers its
    /// range again, and its retired tables wait for that one.
    pub(in crate::iommu) fn invalidate_failed(&mut self, ticket: Ticket, range: Span) {
        if let Some(t) = self.table.as_mut() {
            t.settled(ticket, false);
            t.mark_dirty(range);
        }
    }

    /// An UNMAP did not happen (or may not have): its mappings come back.
    pub(in crate::iommu) fn undo_unmap(&mut self, removed: Vec<Mapping>) {
        for m in removed {
            if self.tree.first_in(m.iova, m.last).is_none() {
                self.tree.insert(m);
            }
        }
    }
}
