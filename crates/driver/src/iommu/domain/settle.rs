//! Ordering a domain's requests against those on the ring, and settling
//! their replies (rollback, stale MAPs).

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use crate::iommu::domain::state::{DomainState, PendingOp, Stale, StaleStep};
use crate::iommu::domain::DomainInner;
use crate::iommu::encode::unmap_req;
use crate::iommu::replies::may_have_applied;
use crate::iommu::{Replies, Ticket};
use crate::sync::{Locks, MutexGuard};
use crate::Result;

impl<L: Locks> DomainInner<L> {
    /// Locks the state once no request on the ring conflicts with new
    /// requests on `ranges`. The device may execute requests in any order,
    /// so a MAP must not overtake an UNMAP of its range (`new_maps`), nor an
    /// UNMAP a MAP (`!new_maps`): such a request is waited for first. New
    /// MAPs also wait for the cleanup UNMAPs of stale ranges they overlap.
    pub(in crate::iommu) fn lock_after(
        &self,
        ranges: &[(u64, u64)],
        new_maps: bool,
    ) -> Result<MutexGuard<'_, L, DomainState>> {
        loop {
            let mut st = self.state.lock();
            if new_maps {
                self.settle_stale(&mut st);
            }
            let hit = |s: u64, e: u64| ranges.iter().any(|&(a, b)| s <= b && a <= e);
            if new_maps && !st.unmapping.is_empty() {
                let tickets: Vec<Ticket> = st.unmapping.iter().map(|t| t.ticket).collect();
                let live = self.port.outstanding(&tickets);
                st.unmapping.retain(|t| live.contains(&t.ticket));
            }
            let mut wait: Vec<Ticket> = st
                .pending
                .iter()
                .filter_map(|op| match *op {
                    PendingOp::Unmap { ticket, range: (s, e), .. }
                    | PendingOp::Invalidate { ticket, range: (s, e) }
                        if new_maps && hit(s, e) =>
                    {
                        Some(ticket)
                    }
                    PendingOp::Map { ticket, iova, last } if !new_maps && hit(iova, last) => {
                        Some(ticket)
                    }
                    _ => None,
                })
                .collect();
            if new_maps {
                wait.extend(st.unmapping.iter().filter(|t| hit(t.first, t.last)).map(|t| t.ticket));
                wait.extend(st.stale.iter().filter(|s| hit(s.iova, s.last)).filter_map(|s| {
                    match s.step {
                        StaleStep::Unmap(Some(ticket)) => Some(ticket),
                        _ => None,
                    }
                }));
            }
            if !wait.is_empty() {
                wait = self.port.outstanding(&wait);
            }
            if wait.is_empty() {
                return Ok(st);
            }
            drop(st);
            self.port.wait_complete(&wait)?;
        }
    }

    /// Moves stale MAPs on with the replies that are in: a failed MAP is
    /// done; a successful one needs a cleanup UNMAP (queued here, not
    /// kicked) while the domain is attached. Only this takes their replies.
    pub(in crate::iommu) fn settle_stale(&self, st: &mut DomainState) {
        if st.stale.is_empty() {
            return;
        }
        let attached = Self::attached(st, self.kind);
        let reply = |ticket: Ticket| self.port.try_take(&[ticket]).map(|r| r.result(0));
        let mut keep = Vec::new();
        for mut s in core::mem::take(&mut st.stale) {
            if let StaleStep::Map(ticket) | StaleStep::Unmap(Some(ticket)) = s.step {
                match reply(ticket) {
                    None => {
                        keep.push(s);
                        continue;
                    }
                    Some(Ok(())) if matches!(s.step, StaleStep::Map(_)) => {
                        s.step = StaleStep::Unmap(None)
                    }
                    Some(Ok(())) => continue,
                    Some(Err(_)) if matches!(s.step, StaleStep::Map(_)) => continue,
                    Some(Err(_)) => {
                        // The cleanup failed: count it and send it again.
                        self.port.counters().sync_error();
                        s.step = StaleStep::Unmap(None);
                    }
                }
            }
            if !attached {
                // The device forgot the domain with its last endpoint.
                continue;
            }
            if let Ok(ticket) = self.port.submit(&unmap_req(self.id, s.iova, s.last), 0) {
                s.step = StaleStep::Unmap(Some(ticket));
            }
            keep.push(s);
        }
        st.stale = keep;
        self.stale_any.store(!st.stale.is_empty(), Ordering::Relaxed);
    }

    /// Sends the cleanup UNMAPs of stale MAPs and waits for them once.
    pub(in crate::iommu) fn drain_stale(&self) -> Result<()> {
        let tickets: Vec<Ticket> = {
            let mut st = self.state.lock();
            self.settle_stale(&mut st);
            st.stale
                .iter()
                .filter_map(|s| match s.step {
                    StaleStep::Unmap(Some(ticket)) => Some(ticket),
                    _ => None,
                })
                .collect()
        };
        if tickets.is_empty() {
            return Ok(());
        }
        self.port.wait_complete(&tickets)?;
        self.settle_stale(&mut self.state.lock());
        Ok(())
    }

    /// Whether `[start, last]` touches a stale MAP's range (after taking
    /// in the replies that have come).
    pub(crate) fn is_stale(&self, start: u64, last: u64) -> bool {
        let mut st = self.state.lock();
        self.settle_stale(&mut st);
        st.stale.iter().any(|s| s.iova <= last && start <= s.last)
    }

    /// Waits for ops and rolls back failures in the tree; first error wins.
    pub(in crate::iommu) fn finish(&self, ops: Vec<PendingOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let tickets: Vec<Ticket> = ops.iter().map(PendingOp::ticket).collect();
        let replies = self.port.wait(&tickets);
        self.settle_ops(ops, replies)
    }

    /// Rolls back the failures among `ops` (by their replies) in the tree;
    /// first error wins.
    pub(in crate::iommu) fn settle_ops(
        &self,
        ops: Vec<PendingOp>,
        replies: Result<Replies>,
    ) -> Result<()> {
        let mut st = self.state.lock();
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                // No answer (timeout, reset): roll back as for a failure,
                // but a MAP's range stays blocked until the device answers.
                for op in ops {
                    match op {
                        PendingOp::Map { ticket, iova, last } => {
                            st.undo_map(iova, last);
                            st.stale.push(Stale { step: StaleStep::Map(ticket), iova, last });
                            self.stale_any.store(true, Ordering::Relaxed);
                        }
                        PendingOp::Unmap { ticket, removed, .. } => {
                            self.port.abandon(&[ticket]);
                            st.undo_unmap(removed);
                        }
                        PendingOp::Invalidate { ticket, range } => {
                            self.port.abandon(&[ticket]);
                            st.invalidate_failed(ticket, range);
                        }
                    }
                }
                self.port.counters().sync_error();
                return Err(e);
            }
        };
        let mut first = None;
        let ops = if replies.all_ok() && !self.table { Vec::new() } else { ops };
        for (i, op) in ops.into_iter().enumerate() {
            let result = replies.result(i);
            if let (PendingOp::Invalidate { ticket, .. }, Ok(())) = (&op, &result) {
                // Its retired tables can go.
                if let Some(t) = st.table.as_mut() {
                    t.settled(*ticket, true);
                }
            }
            let Err(e) = result else { continue };
            match op {
                PendingOp::Map { iova, last, .. } => {
                    st.undo_map(iova, last);
                    if may_have_applied(&e) {
                        // Unmap it to be sure; the range waits for that.
                        st.stale.push(Stale { step: StaleStep::Unmap(None), iova, last });
                        self.stale_any.store(true, Ordering::Relaxed);
                    }
                }
                PendingOp::Unmap { removed, .. } => st.undo_unmap(removed),
                // The entries are gone; the next INVALIDATE covers the range again.
                PendingOp::Invalidate { ticket, range } => st.invalidate_failed(ticket, range),
            }
            first.get_or_insert(e);
        }
        self.settle_stale(&mut st);
        match first {
            Some(e) => {
                self.port.counters().sync_error();
                Err(e)
            }
            None => Ok(()),
        }
    }
}
