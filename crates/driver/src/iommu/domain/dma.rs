//! The interface the DMA layer ([`crate::dma`]) uses, and all it uses of a
//! [`Domain`] besides the public API:
//! - mapping: [`Domain::map_synced`] (record, queue and sync a list of MAPs);
//! - unmapping in two steps: [`Domain::take_ranges`] (out of the tree, no
//!   request), later [`Domain::queue_unmaps`] (UNMAPs on the ring, one
//!   [`UnmapTicket`] each), then their replies by position with
//!   [`Domain::wait_unmaps`], [`Domain::wait_unmaps_or_abandon`] or
//!   [`Domain::try_take_unmaps`];
//! - stale MAPs (see `state::Stale`), whose ranges are not reused:
//!   [`Domain::has_stale`], [`Domain::is_stale`], [`Domain::drain_stale`];
//! - counting: [`Domain::count_sync_error`], [`Domain::count_flush`].

use core::sync::atomic::Ordering;

use smallvec::SmallVec;

use crate::iommu::domain::state::{PendingOp, Stale, StaleStep};
use crate::iommu::domain::{Domain, DomainInner};
use crate::iommu::encode::Reqs;
use crate::iommu::types::{DomainKind, FlushCause, Mapping};
use crate::iommu::{Replies, Ticket, Tickets, UnmapTicket, UnmapTickets};
use crate::sync::Locks;
use crate::{Error, Result};

impl<L: Locks> Domain<L> {
    /// Records `maps` in the tree, queues their MAPs and syncs once; failed
    /// MAPs leave the tree again. Validation is all-or-nothing. See
    /// [`Self::map_many`] for `breaks`.
    pub(crate) fn map_synced(&self, maps: &[Mapping], breaks: &[usize]) -> Result<()> {
        self.map_many(maps, breaks).and_then(|t| self.finish_maps(&t, maps))
    }

    /// The tickets of `unmaps`, in order.
    fn unmap_tickets(unmaps: &[UnmapTicket]) -> Tickets {
        unmaps.iter().map(|u| u.ticket).collect()
    }

    /// One sync: kicks, then waits for the replies of `unmaps`.
    pub(crate) fn wait_unmaps(&self, unmaps: &[UnmapTicket]) -> Result<Replies> {
        let r = self.inner.port.wait(&Self::unmap_tickets(unmaps));
        self.inner.invalidated(unmaps, r.as_ref().ok());
        r
    }

    /// [`Self::wait_unmaps`]; if it gives up, their replies are dropped on arrival.
    pub(crate) fn wait_unmaps_or_abandon(&self, unmaps: &[UnmapTicket]) -> Result<Replies> {
        let r = self.inner.port.wait_or_abandon(&Self::unmap_tickets(unmaps));
        self.inner.invalidated(unmaps, r.as_ref().ok());
        r
    }

    /// The replies of `unmaps` if all are in, without kicking or waiting.
    pub(crate) fn try_take_unmaps(&self, unmaps: &[UnmapTicket]) -> Option<Replies> {
        let r = self.inner.port.try_take(&Self::unmap_tickets(unmaps));
        if r.is_some() {
            self.inner.invalidated(unmaps, r.as_ref());
        }
        r
    }

    /// Counts a sync that returned a failed request.
    pub(crate) fn count_sync_error(&self) {
        self.inner.port.counters().sync_error();
    }

    /// Counts a DMA-layer flush and why it ran.
    pub(crate) fn count_flush(&self, cause: FlushCause) {
        self.inner.port.counters().flush(cause);
    }

    /// Records and queues several mappings under one lock. Validation is
    /// all-or-nothing. Returns the tickets to sync with
    /// [`Self::finish_maps`], one per MAP (none when not attached).
    ///
    /// `maps[i]` for each `i` in `breaks` (sorted: where the DMA layer's
    /// allocations begin) starts a new tree run even if it touches the
    /// previous mapping, so that freeing one allocation never splits a run.
    fn map_many(&self, maps: &[Mapping], breaks: &[usize]) -> Result<Tickets> {
        let d = &self.inner;
        if d.kind != DomainKind::Paging {
            return Err(Error::NotPaging);
        }
        for m in maps {
            d.check(m, m.last.wrapping_sub(m.iova).wrapping_add(1))?;
        }
        // Touching maps (a scatter-gather list laid out back to back) form
        // one run: one overlap check and one tree node instead of one per
        // MAP. `runs` holds `(first IOVA, last IOVA, end index)` in input
        // order; sorted copies are checked for overlapping one another.
        let mut runs: SmallVec<[(u64, u64, usize); 4]> = SmallVec::new();
        if let Some(m) = maps.first() {
            let mut cur = (m.iova, m.last, 1);
            let mut k = 0;
            for (i, m) in maps.iter().enumerate().skip(1) {
                while breaks.get(k).is_some_and(|&b| b < i) {
                    k += 1;
                }
                if cur.1.checked_add(1) == Some(m.iova) && breaks.get(k) != Some(&i) {
                    (cur.1, cur.2) = (m.last, i + 1);
                } else {
                    runs.push(cur);
                    cur = (m.iova, m.last, i + 1);
                }
            }
            runs.push(cur);
        }
        let mut merged: SmallVec<[(u64, u64); 4]> = SmallVec::with_capacity(runs.len());
        for r in &runs {
            merged.push((r.0, r.1));
        }
        if merged.len() > 1 {
            merged.sort_unstable();
            let mut out: SmallVec<[(u64, u64); 4]> = SmallVec::with_capacity(merged.len());
            for &(s, e) in &merged {
                match out.last_mut() {
                    Some(prev) if s <= prev.1 => return Err(Error::Overlap { iova: s }),
                    Some(prev) if s == prev.1 + 1 => prev.1 = e,
                    _ => out.push((s, e)),
                }
            }
            merged = out;
        }
        let mut st = d.lock_after(&merged, true)?;
        for &(s, e) in &merged {
            if let Some(iova) = st.overlap(s, e) {
                return Err(Error::Overlap { iova });
            }
        }
        // Page-table mode: the entries, and no request.
        DomainInner::<L>::write_entries(&mut st, maps)?;
        let mut from = 0;
        for &(_, _, end) in &runs {
            st.tree.insert_run(&maps[from..end]);
            from = end;
        }
        if d.table || !DomainInner::<L>::attached(&st, d.kind) {
            return Ok(Tickets::new());
        }
        match d.port.submit_all(Reqs::Maps(d.id, maps)) {
            Ok(tickets) => Ok(tickets),
            Err((tickets, e)) => {
                // All leave the tree (the caller rolls back). Queued ones
                // may still land: stale, like a MAP whose sync timed out,
                // so that their ranges wait for the device's answer (and a
                // cleanup UNMAP). Not pending: no sync of this domain
                // would take their replies, and an old failure settled
                // there would remove a new mapping at the same IOVA.
                for m in maps {
                    st.tree.remove_exact(m.iova, m.last);
                }
                for (ticket, m) in tickets.into_iter().zip(maps) {
                    let step = StaleStep::Map(ticket);
                    st.stale.push(Stale { step, iova: m.iova, last: m.last });
                }
                d.stale_any.store(!st.stale.is_empty(), Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// See [`DomainInner::drain_stale`].
    pub(crate) fn drain_stale(&self) -> Result<()> {
        self.inner.drain_stale()
    }

    /// See [`DomainInner::is_stale`].
    pub(crate) fn is_stale(&self, start: u64, last: u64) -> bool {
        self.inner.is_stale(start, last)
    }

    /// Whether any stale MAP range is left (after taking in the replies
    /// that have come).
    pub(crate) fn has_stale(&self) -> bool {
        if !self.inner.stale_any.load(Ordering::Relaxed) {
            return false;
        }
        let mut st = self.inner.state.lock();
        self.inner.settle_stale(&mut st);
        !st.stale.is_empty()
    }

    /// Syncs the tickets of [`Self::map_many`] (`tickets[i]` for `maps[i]`):
    /// one sync; failed MAPs leave the tree.
    fn finish_maps(&self, tickets: &[Ticket], maps: &[Mapping]) -> Result<()> {
        if tickets.is_empty() {
            return Ok(());
        }
        let replies = self.inner.port.wait(tickets);
        if replies.as_ref().is_ok_and(Replies::all_ok) {
            // The common case: nothing to roll back.
            if self.inner.stale_any.load(Ordering::Relaxed) {
                self.inner.settle_stale(&mut self.inner.state.lock());
            }
            return Ok(());
        }
        let ops = tickets
            .iter()
            .zip(maps)
            .map(|(&ticket, m)| PendingOp::Map { ticket, iova: m.iova, last: m.last })
            .collect();
        self.inner.settle_ops(ops, replies)
    }

    /// Removes whole mappings from the tree without sending UNMAP (the DMA
    /// layer sends it at flush time). All ranges are checked first. In
    /// page-table mode their entries are cleared now (the INVALIDATE goes
    /// at flush time).
    pub(crate) fn take_ranges(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut st = self.inner.state.lock();
        for &(s, e) in ranges {
            st.tree.check_whole(s, e)?;
        }
        // Checked: every mapping in a range lies wholly inside it.
        for &(s, e) in ranges {
            st.tree.remove_inside(s, e);
        }
        DomainInner::<L>::clear_entries(&mut st, ranges);
        Ok(())
    }

    /// Queues UNMAPs for freed ranges (sorted here). With `coalesce`, ranges
    /// with no live mapping between them go out as one UNMAP. Nothing is
    /// queued when the domain is not attached (the device has no mappings).
    /// Returns one [`UnmapTicket`] per UNMAP.
    ///
    /// In page-table mode: one INVALIDATE over the hull of the ranges
    /// (whatever `coalesce` says: an INVALIDATE removes no mapping, so live
    /// ones in the gaps only lose their cached translation), kicked now so
    /// that a lazy flush does not wait for somebody else's kick.
    pub(crate) fn queue_unmaps(
        &self,
        ranges: &[(u64, u64)],
        coalesce: bool,
        span_gaps: bool,
    ) -> Result<UnmapTickets> {
        let d = &self.inner;
        let mut sorted: SmallVec<[(u64, u64); 4]> = SmallVec::from_slice(ranges);
        sorted.sort_unstable();
        let mut st = d.lock_after(&sorted, false)?;
        if !DomainInner::<L>::attached(&st, d.kind) {
            if let Some(t) = st.table.as_mut() {
                t.forget_device();
            }
            return Ok(UnmapTickets::new());
        }
        if d.table {
            let Some(&(first, _)) = sorted.first() else { return Ok(UnmapTickets::new()) };
            let last = sorted.iter().map(|r| r.1).max().unwrap_or(first);
            let (ticket, (first, last)) = d.queue_invalidate(&mut st, Some((first, last)))?;
            drop(st);
            d.port.kick();
            return Ok(UnmapTickets::from_slice(&[UnmapTicket { ticket, first, last }]));
        }
        // (first, last, spans a gap)
        let mut merged: SmallVec<[(u64, u64, bool); 4]> = SmallVec::with_capacity(sorted.len());
        for (s, e) in sorted {
            if let Some(prev) = merged.last_mut() {
                let touching = s <= prev.1.saturating_add(1);
                let gap_free =
                    touching || (span_gaps && st.tree.first_in(prev.1 + 1, s - 1).is_none());
                if coalesce && gap_free {
                    prev.1 = prev.1.max(e);
                    prev.2 |= !touching;
                    continue;
                }
            }
            merged.push((s, e, false));
        }
        let reqs: SmallVec<[(u64, u64); 4]> = merged.iter().map(|&(s, e, _)| (s, e)).collect();
        let (tickets, err) = match d.port.submit_all(Reqs::Unmaps(d.id, &reqs)) {
            Ok(tickets) => (tickets, None),
            Err((tickets, e)) => (tickets, Some(e)),
        };
        let unmaps: UnmapTickets = tickets
            .iter()
            .zip(&merged)
            .map(|(&ticket, &(first, last, _))| UnmapTicket { ticket, first, last })
            .collect();
        match err {
            None => {
                let gaps = unmaps.iter().zip(&merged).filter(|(_, m)| m.2).map(|(u, _)| *u);
                st.unmapping.extend(gaps);
                Ok(unmaps)
            }
            Some(err) => {
                // The caller retries the whole list later and takes no
                // reply: new MAPs of these ranges wait for the queued ones
                // (as for a gap), whose replies are dropped on arrival.
                // Not pending: a sync of the domain would report their
                // failures as its own.
                st.unmapping.extend(unmaps.iter().copied());
                d.port.abandon(&tickets);
                Err(err)
            }
        }
    }

    /// Number of runs in the mapping tree.
    #[cfg(test)]
    pub(crate) fn tree_runs(&self) -> usize {
        self.inner.state.lock().tree.runs()
    }
}
