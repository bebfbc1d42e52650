//! Unmapping under the policies: Strict syncs now; Lazy and LazySingle
//! queue, flush (coalesced) and reap. See [`super::flush`] for the states
//! an unmapped allocation goes through.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::flush::{settle, Allocs, FlushQueueConfig, FlushSlot, InflightFlush, Outcome};
use super::{DmaDomain, Policy};
use crate::iommu::FlushCause;
use crate::sync::Locks;
use crate::Result;

impl<L: Locks> DmaDomain<L> {
    /// Takes allocations out of the tree and unmaps them under the policy.
    pub(super) fn release(&self, allocs: &[(u64, u64)]) -> Result<()> {
        let ranges = self.ranges_of(allocs);
        self.domain.take_ranges(&ranges)?;
        match self.policy() {
            Policy::Strict => self.unmap_now(allocs, self.coalesce.load(Ordering::Relaxed)),
            Policy::Lazy => {
                let q = &self.percpu[self.cpu() % self.percpu.len()];
                self.enqueue(q, &self.lazy, allocs)
            }
            Policy::LazySingle => self.enqueue(&self.single, &self.lazy_single, allocs),
        }
    }

    /// Queues UNMAPs for allocations already out of the tree, waits, frees.
    pub(super) fn unmap_now(&self, allocs: &[(u64, u64)], coalesce: bool) -> Result<()> {
        let ranges = self.ranges_of(allocs);
        let tickets = match self.domain.queue_unmaps(&ranges, coalesce, true) {
            Ok(t) => t,
            Err(e) => {
                self.retry.lock().extend_from_slice(allocs);
                return Err(e);
            }
        };
        let replies = if tickets.is_empty() {
            Default::default()
        } else {
            match self.domain.wait_unmaps_or_abandon(&tickets) {
                Ok(r) => r,
                Err(e) => {
                    self.retry.lock().extend_from_slice(allocs);
                    return Err(e);
                }
            }
        };
        self.apply(settle(&tickets, &replies, allocs, |a| self.range_of(a)))
    }

    fn apply(&self, mut out: Outcome) -> Result<()> {
        // A range a timed-out MAP may still create is not reused before its
        // cleanup. Usually there is none: one look, not one per entry.
        if self.domain.has_stale() {
            let (stale, free): (Allocs, Allocs) = out.free.into_iter().partition(|a| {
                let (s, l) = self.range_of(a);
                self.domain.is_stale(s, l)
            });
            out.retry.extend(stale);
            self.free_allocs(&free);
        } else {
            self.free_allocs(&out.free);
        }
        if !out.retry.is_empty() {
            self.retry.lock().extend(out.retry);
        }
        match out.error {
            Some(e) => {
                self.domain.count_sync_error();
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn enqueue(
        &self,
        q: &FlushSlot<L>,
        cfg: &FlushQueueConfig,
        allocs: &[(u64, u64)],
    ) -> Result<()> {
        let now = self.platform.now_ns();
        let (cause, inflight) = {
            let mut g = q.lock();
            g.push(now, allocs);
            let cause = if g.entries.len() >= cfg.entries {
                Some(FlushCause::Full)
            } else if g.expired(now, cfg) {
                Some(FlushCause::Timeout)
            } else {
                None
            };
            (cause, !g.inflight.is_empty())
        };
        if inflight {
            // A previous flush's failure is not this unmap's: it is counted and retried.
            let _ = self.reap(q);
        }
        match cause {
            Some(cause) => self.flush_queue(q, cause, false, true),
            None => Ok(()),
        }
    }

    /// Sends the queue's UNMAPs (and the retry list's, `with_retry`). With `wait`, syncs
    /// now; otherwise they ride on the next kick and complete in `reap`.
    fn flush_queue(
        &self,
        q: &FlushSlot<L>,
        cause: FlushCause,
        wait: bool,
        with_retry: bool,
    ) -> Result<()> {
        // Held until this flush is done with the entries (freed, failed
        // back to the retry list, or left in flight), so that an explicit
        // flush on another CPU waits for them.
        let (mut entries, _taken) = q.take_entries();
        if with_retry {
            entries.append(&mut self.retry.lock());
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.domain.count_flush(cause);
        let ranges: Vec<(u64, u64)> = entries.iter().map(|a| self.range_of(a)).collect();
        let coalesce = self.coalesce.load(Ordering::Relaxed);
        let tickets = match self.domain.queue_unmaps(&ranges, coalesce, wait) {
            Ok(t) => t,
            Err(e) => {
                self.retry.lock().extend(entries);
                return Err(e);
            }
        };
        if tickets.is_empty() {
            self.free_allocs(&entries);
            return Ok(());
        }
        if wait {
            let replies = match self.domain.wait_unmaps(&tickets) {
                Ok(r) => r,
                Err(e) => {
                    let since_ns = self.platform.now_ns();
                    q.lock().inflight.push(InflightFlush { tickets, entries, since_ns });
                    return Err(e);
                }
            };
            return self.apply(settle(&tickets, &replies, &entries, |a| self.range_of(a)));
        }
        let since_ns = self.platform.now_ns();
        q.lock().inflight.push(InflightFlush { tickets, entries, since_ns });
        Ok(())
    }

    /// Completes in-flight flushes whose UNMAPs are done; with `wait_older_than`,
    /// syncs those older than that many nanoseconds.
    fn reap_inner(&self, q: &FlushSlot<L>, wait_older_than: Option<u64>) -> Result<()> {
        // Held until what is kept is back in the queue (see `flush`).
        let (inflight, _taken) = q.take_inflight();
        if inflight.is_empty() {
            return Ok(());
        }
        let now = self.platform.now_ns();
        let mut first = Ok(());
        let mut keep = Vec::new();
        for f in inflight {
            let must_wait =
                wait_older_than.is_some_and(|age| now.saturating_sub(f.since_ns) >= age);
            let replies = match self.domain.try_take_unmaps(&f.tickets) {
                Some(r) => r,
                None if must_wait => match self.domain.wait_unmaps(&f.tickets) {
                    Ok(r) => r,
                    Err(e) => {
                        keep.push(f);
                        first = first.and(Err(e));
                        continue;
                    }
                },
                None => {
                    keep.push(f);
                    continue;
                }
            };
            let r = self.apply(settle(&f.tickets, &replies, &f.entries, |a| self.range_of(a)));
            first = first.and(r);
        }
        if !keep.is_empty() {
            q.lock().inflight.extend(keep);
        }
        first
    }

    fn reap(&self, q: &FlushSlot<L>) -> Result<()> {
        self.reap_inner(q, None)
    }

    fn queues(&self) -> impl Iterator<Item = (&FlushSlot<L>, &FlushQueueConfig)> {
        self.percpu.iter().map(|q| (q, &self.lazy)).chain([(&self.single, &self.lazy_single)])
    }

    /// The timer's job: flushes queues whose oldest entry has timed out and
    /// syncs flushes in flight for longer than the timeout, retrying failed
    /// UNMAPs. Call it periodically (e.g. every few ms). Returns the first error.
    pub fn tick(&self) -> Result<()> {
        let now = self.platform.now_ns();
        let mut first = Ok(());
        for (q, cfg) in self.queues() {
            // Nothing due (the usual case): not even the lock.
            if !q.due(now, cfg) {
                continue;
            }
            let (inflight, expired) = {
                let g = q.lock();
                (!g.inflight.is_empty(), g.expired(now, cfg))
            };
            if inflight {
                first = first.and(self.reap_inner(q, Some(cfg.timeout_ns)));
            }
            if expired {
                first = first.and(self.flush_queue(q, FlushCause::Timeout, true, false));
            }
        }
        if !self.retry.lock().is_empty() {
            first = first.and(self.domain.drain_stale());
            first = first.and(self.flush_queue(&self.single, FlushCause::Timeout, true, true));
        }
        first
    }

    /// Flushes every queue now and waits for every UNMAP in flight; retries
    /// failed ones. Afterwards all unmapped IOVAs are back in the allocator
    /// (unless the device keeps failing UNMAPs).
    pub fn flush(&self) -> Result<()> {
        // Retries first: what fails during this flush waits for the next one.
        let mut first = Ok(());
        if !self.retry.lock().is_empty() {
            first = self.domain.drain_stale();
            first = first.and(self.flush_queue(&self.single, FlushCause::Explicit, true, true));
        }
        for (q, _) in self.queues() {
            let has = !q.lock().entries.is_empty();
            if has {
                first = first.and(self.flush_queue(q, FlushCause::Explicit, true, false));
            }
            // A flush or reap another CPU started (a `tick`, a full queue)
            // has taken its entries already: wait until it has sent and
            // settled them, or left them in flight for the reap below. It is
            // bounded by that CPU's own wait bound.
            while q.taken() {
                core::hint::spin_loop();
            }
            first = first.and(self.reap_inner(q, Some(0)));
        }
        first
    }
}
