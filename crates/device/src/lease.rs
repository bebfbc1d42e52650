//! Leases on translations and the grace period that waits for them.
//!
//! The promise (the one hardware IOMMUs keep with their invalidation waits): once a change
//! that takes access away has completed, no access made through the old state can still
//! be running. A device model holds a lease for each access (one chunk of a copy, not a
//! whole I/O); the change completes only after every lease that could have seen the old
//! state is dropped.
//!
//! Scheme (epoch-based, in the style of SRCU):
//! - A sequence number `seq` counts grace periods; its parity picks one of two counters.
//! - Counters live in cache-line-padded slots; a thread always uses the slot its
//!   thread-local index picks, so threads on different slots never write the same line.
//! - Taking a lease: read `seq`, increment the slot's counter of that parity, read `seq`
//!   again; if it moved, undo and retry. Dropping it decrements the same counter.
//! - A grace period (serialised by a mutex): the change is already made; bump `seq`, so new
//!   leases take the other counter, then wait until every slot's counter of the old parity
//!   reads zero.
//!
//! Why it holds: the lease's increment and re-read, and the grace period's bump and scan,
//! are sequentially consistent, so either the lease's re-read sees the bump (and then, by
//! the bump's release, the whole change: it is a lease taken after the change, on the new
//! counter, never waited for) or the scan sees the increment (and waits). Grace periods
//! are serialised and each drains the parity it retires, so when one starts, every live
//! lease carries the current `seq`: one wait per grace period, no second phase. The only
//! other increments the scan can meet are those of a lease about to retry, which undoes
//! its increment at once.
//!
//! The padded slot is hand-written (`repr(align(128))`): one attribute is not worth a
//! dependency on crossbeam-utils.

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{
    AtomicU64, AtomicUsize, Ordering::Relaxed, Ordering::Release, Ordering::SeqCst,
};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::sync::lock;

/// One slot: a counter per parity, on a cache line pair of its own (128 bytes, as adjacent
/// line prefetching pairs lines on x86).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot {
    count: [AtomicU64; 2],
}

/// The calling thread's slot index and the number of leases it holds.
struct ThreadState {
    index: Cell<usize>,
    held: Cell<usize>,
}

thread_local! {
    static THREAD: ThreadState = const {
        ThreadState { index: Cell::new(usize::MAX), held: Cell::new(0) }
    };
}

/// This thread's slot index (assigned round robin on first use); counts one more lease.
#[inline]
fn enter() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    THREAD
        .try_with(|t| {
            t.held.set(t.held.get() + 1);
            let i = t.index.get();
            if i != usize::MAX {
                return i;
            }
            let i = NEXT.fetch_add(1, Relaxed);
            t.index.set(i);
            i
        })
        .unwrap_or(0)
}

#[inline]
fn leave() {
    let _ = THREAD.try_with(|t| t.held.set(t.held.get() - 1));
}

fn held_by_this_thread() -> usize {
    THREAD.try_with(|t| t.held.get()).unwrap_or(0)
}

/// The lease table of one IOMMU instance.
#[derive(Debug)]
pub(crate) struct Leases {
    seq: AtomicU64,
    slots: Box<[Slot]>,
    gp: Mutex<()>,
}

/// A held lease; dropping it releases it. Not `Send`: it is counted in the taking thread,
/// which is what lets a grace period catch a thread waiting for itself.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    counter: &'a AtomicU64,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Lease<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the accesses made under the lease happen before the grace period ends.
        self.counter.fetch_sub(1, Release);
        leave();
    }
}

/// What one grace period waited for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Waited {
    /// Leases still held when the wait reached the slow threshold.
    pub(crate) slow: u64,
}

impl Leases {
    /// A table with two slots per available CPU (rounded up to a power of two, 4..=64):
    /// threads beyond that share slots, which costs contention, never correctness.
    pub(crate) fn new() -> Self {
        let cpus = std::thread::available_parallelism().map_or(4, |n| n.get());
        let n = (2 * cpus).next_power_of_two().clamp(4, 64);
        Self {
            seq: AtomicU64::new(0),
            slots: (0..n).map(|_| Slot::default()).collect(),
            gp: Mutex::new(()),
        }
    }

    /// Takes a lease. Everything the caller reads afterwards is at least as new as the
    /// state of every grace period that has not yet waited for this lease.
    #[inline]
    pub(crate) fn acquire(&self) -> Lease<'_> {
        let slot = &self.slots[enter() & (self.slots.len() - 1)];
        loop {
            let seq = self.seq.load(SeqCst);
            let counter = &slot.count[(seq & 1) as usize];
            counter.fetch_add(1, SeqCst);
            if self.seq.load(SeqCst) == seq {
                return Lease { counter, _not_send: PhantomData };
            }
            // A grace period began in between: it may not wait for us, so take the new side.
            counter.fetch_sub(1, Release);
        }
    }

    /// Waits until every lease taken before this call is dropped; leases taken meanwhile
    /// are not waited for. Call it after the change is visible to translations.
    ///
    /// # Panics
    /// If the calling thread holds a lease: it would wait for itself forever.
    pub(crate) fn synchronize(&self, slow_after: Duration) -> Waited {
        assert_eq!(
            held_by_this_thread(),
            0,
            "a thread holding a translation lease changed IOMMU state: it would wait for itself"
        );
        let _serial = lock(&self.gp);
        let old = (self.seq.fetch_add(1, SeqCst) & 1) as usize;
        let mut waited = Waited::default();
        let mut start = None;
        for slot in self.slots.iter() {
            let mut round = 0u32;
            while slot.count[old].load(SeqCst) != 0 {
                let t0 = *start.get_or_insert_with(Instant::now);
                backoff(round);
                round = round.saturating_add(1);
                // The clock is read every 16 rounds while spinning, every round once yielding
                // (a yield on a loaded host can last a time slice).
                let check = round % 16 == 0 || round > SPIN_ROUNDS;
                if waited.slow == 0 && check && t0.elapsed() >= slow_after {
                    waited.slow = self.held(old).max(1);
                }
            }
        }
        waited
    }

    /// Leases currently counted on one parity (a racy sum, for the slow counter).
    fn held(&self, parity: usize) -> u64 {
        self.slots.iter().map(|s| s.count[parity].load(Relaxed)).sum()
    }
}

const SPIN_ROUNDS: u32 = 64;
const YIELD_ROUNDS: u32 = 192;

/// Spin briefly, then yield, then sleep: a lease is one chunk, but the holder may be
/// descheduled on a loaded host.
fn backoff(round: u32) {
    if round < SPIN_ROUNDS {
        std::hint::spin_loop();
    } else if round < SPIN_ROUNDS + YIELD_ROUNDS {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn a_grace_period_with_no_lease_returns() {
        let l = Leases::new();
        assert_eq!(l.synchronize(Duration::from_millis(10)), Waited::default());
        drop(l.acquire());
        assert_eq!(l.synchronize(Duration::from_millis(10)), Waited::default());
    }

    #[test]
    fn a_grace_period_waits_for_an_older_lease_and_counts_it_slow() {
        let l = Arc::new(Leases::new());
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let holder = {
            let (l, dropped) = (l.clone(), dropped.clone());
            std::thread::spawn(move || {
                let lease = l.acquire();
                tx.send(()).unwrap();
                // Held past the threshold counted from the start of the grace period.
                while l.seq.load(SeqCst) == 0 {
                    std::thread::yield_now();
                }
                std::thread::sleep(Duration::from_millis(100));
                dropped.store(true, SeqCst);
                drop(lease);
            })
        };
        rx.recv().unwrap();
        let w = l.synchronize(Duration::from_millis(1));
        assert!(dropped.load(SeqCst), "returned before the lease was dropped");
        assert_eq!(w.slow, 1);
        holder.join().unwrap();
    }

    #[test]
    #[should_panic(expected = "wait for itself")]
    fn a_thread_holding_a_lease_cannot_wait_for_it() {
        let l = Leases::new();
        let _lease = l.acquire();
        l.synchronize(Duration::from_millis(10));
    }
}
