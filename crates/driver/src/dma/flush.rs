//! Flush queues for lazy unmapping.
//!
//! An unmapped IOVA allocation goes through three states:
//! 1. **queued**: gone from the domain's tree, still mapped in the device, in
//!    a flush queue's `entries`;
//! 2. **in flight**: its (possibly coalesced) UNMAP is on the request ring;
//!    a flush that does not wait rides on the next kick, whoever makes it;
//! 3. **done**: the UNMAP covering it completed, the IOVA goes back to the
//!    allocator. An IOVA never returns earlier; a failed UNMAP sends its
//!    allocations to the retry list instead.

use alloc::vec::Vec;

use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use smallvec::SmallVec;

use crate::sync::{Locks, Mutex, MutexGuard};

use crate::iommu::{Replies, UnmapTicket, UnmapTickets};

/// Size and timeout of one flush queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushQueueConfig {
    /// Entries (IOVA allocations) before the queue flushes itself.
    pub entries: usize,
    /// Age of the oldest entry after which it is flushed, in nanoseconds.
    pub timeout_ns: u64,
}

impl FlushQueueConfig {
    /// Linux's per-CPU flush queues: 256 entries, 10 ms.
    pub const LAZY: Self = Self { entries: 256, timeout_ns: 10_000_000 };
    /// Linux's single flush queue: 32768 entries, 1 s.
    pub const LAZY_SINGLE: Self = Self { entries: 32768, timeout_ns: 1_000_000_000 };
}

/// UNMAPs on the ring for a batch of entries.
pub(crate) struct InflightFlush {
    pub(crate) tickets: UnmapTickets,
    pub(crate) entries: Vec<(u64, u64)>,
    pub(crate) since_ns: u64,
}

/// One flush queue: entries are `(iova, alloc size)`.
#[derive(Default)]
pub(crate) struct FlushQueue {
    pub(crate) entries: Vec<(u64, u64)>,
    pub(crate) oldest_ns: u64,
    pub(crate) inflight: Vec<InflightFlush>,
}

impl FlushQueue {
    pub(crate) fn push(&mut self, now_ns: u64, entries: &[(u64, u64)]) {
        if self.entries.is_empty() {
            self.oldest_ns = now_ns;
        }
        self.entries.extend_from_slice(entries);
    }

    pub(crate) fn expired(&self, now_ns: u64, cfg: &FlushQueueConfig) -> bool {
        !self.entries.is_empty() && now_ns.saturating_sub(self.oldest_ns) >= cfg.timeout_ns
    }
}

/// IOVA allocations `(iova, size)`: those of one I/O (a header and a data
/// list) fit inline, with no heap allocation.
pub(crate) type Allocs = SmallVec<[(u64, u64); 2]>;

/// A flush queue behind its lock, with two hints `tick` reads without the
/// lock: when the oldest entry was queued, and whether flushes are in
/// flight. Every guard writes them back as it is dropped, still holding
/// the lock, so they are exact whenever the lock is free.
pub(crate) struct FlushSlot<L: Locks> {
    queue: Mutex<L, FlushQueue>,
    /// `oldest_ns` of the queue, or `u64::MAX` when it has no entry.
    oldest_ns: AtomicU64,
    inflight: AtomicBool,
    /// Flushes that took this queue's entries and have not finished with
    /// them: an explicit flush waits for these too.
    taken: AtomicUsize,
}

impl<L: Locks> Default for FlushSlot<L> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(FlushQueue::default()),
            oldest_ns: AtomicU64::new(u64::MAX),
            inflight: AtomicBool::new(false),
            taken: AtomicUsize::new(0),
        }
    }
}

impl<L: Locks> FlushSlot<L> {
    pub(crate) fn lock(&self) -> SlotGuard<'_, L> {
        SlotGuard { slot: self, queue: self.queue.lock() }
    }

    /// Takes the queued entries for a flush; until the returned guard is
    /// dropped, [`Self::taken`] counts that flush.
    pub(crate) fn take_entries(&self) -> (Vec<(u64, u64)>, TakenGuard<'_, L>) {
        let mut q = self.lock();
        // Counted before the lock is released, so no flush ever sees the
        // queue empty without also seeing the count.
        self.taken.fetch_add(1, Ordering::AcqRel);
        (core::mem::take(&mut q.entries), TakenGuard(self))
    }

    /// Takes the flushes in flight to reap them; while any were taken, the
    /// returned guard counts this reap in [`Self::taken`].
    pub(crate) fn take_inflight(&self) -> (Vec<InflightFlush>, Option<TakenGuard<'_, L>>) {
        let mut q = self.lock();
        let inflight = core::mem::take(&mut q.inflight);
        if inflight.is_empty() {
            return (inflight, None);
        }
        self.taken.fetch_add(1, Ordering::AcqRel);
        (inflight, Some(TakenGuard(self)))
    }

    /// Whether some flush still holds entries it took from this queue.
    pub(crate) fn taken(&self) -> bool {
        self.taken.load(Ordering::Acquire) != 0
    }

    /// Whether `tick` has anything to do here: a flush in flight, or an
    /// entry older than the timeout.
    pub(crate) fn due(&self, now_ns: u64, cfg: &FlushQueueConfig) -> bool {
        let oldest = self.oldest_ns.load(Ordering::Relaxed);
        self.inflight.load(Ordering::Relaxed)
            || (oldest != u64::MAX && now_ns.saturating_sub(oldest) >= cfg.timeout_ns)
    }
}

/// A flush's hold on the entries it took (see [`FlushSlot::take_entries`]).
pub(crate) struct TakenGuard<'a, L: Locks>(&'a FlushSlot<L>);

impl<L: Locks> Drop for TakenGuard<'_, L> {
    fn drop(&mut self) {
        self.0.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The locked queue of a [`FlushSlot`].
pub(crate) struct SlotGuard<'a, L: Locks> {
    slot: &'a FlushSlot<L>,
    queue: MutexGuard<'a, L, FlushQueue>,
}

impl<L: Locks> Deref for SlotGuard<'_, L> {
    type Target = FlushQueue;
    fn deref(&self) -> &FlushQueue {
        &self.queue
    }
}

impl<L: Locks> DerefMut for SlotGuard<'_, L> {
    fn deref_mut(&mut self) -> &mut FlushQueue {
        &mut self.queue
    }
}

impl<L: Locks> Drop for SlotGuard<'_, L> {
    fn drop(&mut self) {
        let q = &*self.queue;
        let oldest = if q.entries.is_empty() { u64::MAX } else { q.oldest_ns };
        self.slot.oldest_ns.store(oldest, Ordering::Relaxed);
        self.slot.inflight.store(!q.inflight.is_empty(), Ordering::Relaxed);
    }
}

/// What to do with the entries of a completed flush.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Allocations whose UNMAP completed (or that needed none): free them.
    pub(crate) free: Allocs,
    /// Allocations whose UNMAP failed: try again at the next flush.
    pub(crate) retry: Allocs,
    /// The first failure.
    pub(crate) error: Option<crate::Error>,
}

/// Sorts entries by the outcome of the UNMAP that covers them. `range_of`
/// gives an entry's inclusive IOVA range. Entries no ticket covers (the
/// domain was detached: the device holds no mapping) are freed.
pub(crate) fn settle(
    tickets: &[UnmapTicket],
    replies: &Replies,
    entries: &[(u64, u64)],
    range_of: impl Fn(&(u64, u64)) -> (u64, u64),
) -> Outcome {
    let mut out = Outcome::default();
    // Tickets of one flush are sorted and disjoint: a binary search per
    // entry instead of a scan (a flush holds up to hundreds of each).
    let sorted = tickets.windows(2).all(|w| w[0].last < w[1].first);
    for &e in entries {
        let (s, l) = range_of(&e);
        let covering = if sorted {
            let i = tickets.partition_point(|t| t.last < l);
            tickets.get(i).filter(|t| t.first <= s && l <= t.last).map(|_| i)
        } else {
            tickets.iter().position(|t| t.first <= s && l <= t.last)
        };
        match covering.filter(|&i| i < replies.len()).map(|i| replies.result(i)) {
            Some(Err(err)) => {
                out.error.get_or_insert(err);
                out.retry.push(e);
            }
            _ => out.free.push(e),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::Reply;
    use crate::Error;
    use viommu_proto::{RequestType, Status};

    fn reply(result: Result<(), Error>) -> Reply {
        Reply { result, props: Vec::new() }
    }

    #[test]
    fn settle_frees_covered_ok_and_retries_failed() {
        let tickets =
            [UnmapTicket::for_test(1, 0x1000, 0x4fff), UnmapTicket::for_test(2, 0x8000, 0x8fff)];
        let err = Error::Device { request: RequestType::Unmap, status: Status::Range };
        let replies = Replies::from_vec(vec![reply(Ok(())), reply(Err(err.clone()))]);
        let entries = vec![(0x1000, 0x1000), (0x3000, 0x2000), (0x8000, 0x1000), (0x9000, 0x1000)];
        let out = settle(&tickets, &replies, &entries, |&(i, s)| (i, i + s - 1));
        assert_eq!(out.free[..], [(0x1000, 0x1000), (0x3000, 0x2000), (0x9000, 0x1000)]);
        assert_eq!(out.retry[..], [(0x8000, 0x1000)]);
        assert_eq!(out.error, Some(err));
    }

    /// Sorted tickets (binary search) and the same tickets out of order
    /// (scan) settle every entry the same way.
    #[test]
    fn settle_finds_the_covering_ticket_in_any_order() {
        let err = Error::Device { request: RequestType::Unmap, status: Status::Range };
        let tickets: Vec<UnmapTicket> = (0..40)
            .map(|i| UnmapTicket::for_test(i, i * 0x10_000, i * 0x10_000 + 0x7fff))
            .collect();
        let results: Vec<_> =
            (0..40).map(|i| if i % 3 == 0 { Err(err.clone()) } else { Ok(()) }).collect();
        let replies = |order: &[usize]| {
            Replies::from_vec(order.iter().map(|&i| reply(results[i].clone())).collect())
        };
        let entries: Vec<(u64, u64)> = (0..40 * 16).map(|k| (k * 0x1000, 0x1000)).collect();
        let range = |&(i, s): &(u64, u64)| (i, i + s - 1);
        let order: Vec<usize> = (0..40).collect();
        let sorted = settle(&tickets, &replies(&order), &entries, range);
        let shuffled: Vec<usize> = (0..40).map(|i| (i * 7) % 40).collect();
        let t2: Vec<UnmapTicket> = shuffled.iter().map(|&i| tickets[i]).collect();
        let other = settle(&t2, &replies(&shuffled), &entries, range);
        assert_eq!(sorted, other);
        // Entries in a ticket's range are settled by it; those between tickets are freed.
        assert_eq!(sorted.retry.len(), 14 * 8);
        assert_eq!(sorted.free.len(), 40 * 16 - 14 * 8);
    }

    /// The hints `tick` reads follow the queue through every guard.
    #[test]
    fn slot_hints_follow_the_queue() {
        let cfg = FlushQueueConfig { entries: 4, timeout_ns: 100 };
        let slot = FlushSlot::<crate::sync::DefaultLocks>::default();
        assert!(!slot.due(u64::MAX - 1, &cfg));
        slot.lock().push(10, &[(0x1000, 0x1000)]);
        assert!(!slot.due(109, &cfg));
        assert!(slot.due(110, &cfg));
        let entries = core::mem::take(&mut slot.lock().entries);
        assert!(!slot.due(1000, &cfg), "no entry left");
        slot.lock().inflight.push(InflightFlush {
            tickets: UnmapTickets::new(),
            entries,
            since_ns: 0,
        });
        assert!(slot.due(0, &cfg), "a flush in flight is always worth a look");
        slot.lock().inflight.clear();
        assert!(!slot.due(1000, &cfg));
    }

    #[test]
    fn expiry_counts_from_the_oldest_entry() {
        let cfg = FlushQueueConfig { entries: 4, timeout_ns: 100 };
        let mut q = FlushQueue::default();
        assert!(!q.expired(1000, &cfg));
        q.push(10, &[(0x1000, 0x1000)]);
        q.push(90, &[(0x2000, 0x1000)]);
        assert!(!q.expired(109, &cfg));
        assert!(q.expired(110, &cfg));
    }
}
