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
//! - Every thread that takes leases on an instance owns one slot of that instance: two
//!   counters (one per parity) on a cache-line pair of their own, registered once in the
//!   instance's slot table. Only the owner writes them, so taking and dropping a lease are
//!   plain stores (no read-modify-write), and no line is written by two threads.
//! - Taking a lease: read `seq`, store the slot's counter of that parity plus one
//!   (sequentially consistent), read `seq` again; if it moved, undo and retry. Dropping it
//!   stores the counter minus one (release).
//! - A grace period (serialised by a mutex): the change is already made; bump `seq`, so new
//!   leases count on the other parity, then wait until every registered slot's counter of
//!   the old parity reads zero.
//!
//! Why it holds: the lease's store and re-read, and the grace period's bump and scan, are
//! sequentially consistent, so either the lease's re-read sees the bump (and then, by the
//! bump's release, the whole change: it is a lease taken after the change, on the new
//! counter, never waited for) or the scan sees the store (and waits). The scan covers the
//! slots handed out so far (`used`, read after the bump; a slot is counted in it before its
//! thread's first lease). Grace periods are serialised and each drains the parity it
//! retires, so when one starts every live lease carries the current `seq`: one wait per
//! grace period.
//!
//! Slots: each instance has a fixed table of 64; a thread keeps a small map from instance ID
//! to its slot index there, and remembers the last one used, so the hit path is one
//! thread-local compare. When a thread exits, its slots (if no lease is left on them) are
//! freed and the next new thread reuses them: `used` grows with the threads alive at once,
//! not with every thread that ever translated, and a grace period scans only those. Entries
//! for dropped instances leave the map when the thread next registers a slot. A thread
//! beyond the 64th at once, or one taking a lease after its map is gone (from another
//! thread-local destructor), counts on the instance's shared slot, with atomic adds.
//!
//! Written by hand: crossbeam's epochs defer destruction and have no blocking wait for
//! readers; the padded slot (`repr(align(128))`) is one attribute, not worth a dependency on
//! crossbeam-utils.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::sync::atomic::{
    AtomicBool, AtomicU64, AtomicUsize, Ordering, Ordering::Acquire, Ordering::Relaxed,
    Ordering::Release, Ordering::SeqCst,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// Slots per instance: threads taking leases at once beyond this share one slot (atomic
/// adds: contention, never incorrectness).
const SLOTS: usize = 64;

/// Leases counted on one parity of one slot.
#[derive(Debug, Default)]
struct Counter {
    n: AtomicU64,
    /// The shared slot's: counted with atomic adds. Kept here (not in the lease) so that a
    /// lease is one pointer, returned in a register.
    shared: bool,
}

impl Counter {
    fn load(&self, order: Ordering) -> u64 {
        self.n.load(order)
    }
}

/// One slot: a counter per parity, on a cache-line pair of its own (128 bytes, as adjacent
/// line prefetching pairs lines on x86).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Slot {
    count: [Counter; 2],
    /// A thread owns the slot (only that thread writes `count`).
    owned: AtomicBool,
}

impl Slot {
    fn shared() -> Self {
        let c = || Counter { n: AtomicU64::new(0), shared: true };
        Self { count: [c(), c()], owned: AtomicBool::new(false) }
    }

    fn idle(&self) -> bool {
        self.count.iter().all(|c| c.load(Acquire) == 0)
    }
}

/// One entry of a thread's map: an instance's ID, its slots and the index of the thread's.
struct Entry {
    id: u64,
    slots: Arc<[Slot]>,
    index: usize,
}

/// The calling thread's slots, one per instance it took leases on.
struct ThreadSlots(Vec<Entry>);

impl Drop for ThreadSlots {
    fn drop(&mut self) {
        // First forget the fast path's slot, so nothing on this thread writes a slot that
        // another thread may own from the next line on.
        LAST.with(|l| l.set((0, 0)));
        for e in self.0.drain(..) {
            let slot = &e.slots[e.index];
            // A slot still counting a lease (one leaked, or held by a later destructor)
            // stays owned: reusing it would corrupt that count.
            if slot.idle() {
                slot.owned.store(false, Release);
            }
        }
    }
}

thread_local! {
    static MAP: RefCell<ThreadSlots> = const { RefCell::new(ThreadSlots(Vec::new())) };
    /// The last (instance ID, slot index) used: the hit path's one compare. No destructor,
    /// so it is readable at any time; ID 0 is no instance.
    static LAST: Cell<(u64, usize)> = const { Cell::new((0, 0)) };
}

/// A process-unique ID per lease table, so thread maps never confuse two instances.
fn new_table_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

/// The lease table of one IOMMU instance.
#[derive(Debug)]
pub(crate) struct Leases {
    id: u64,
    seq: AtomicU64,
    /// The slots; `slots[..used]` have been handed to threads (owned now, or free again).
    slots: Arc<[Slot]>,
    used: AtomicUsize,
    /// Serialises slot registration.
    register: Mutex<()>,
    /// For threads beyond `SLOTS`, or whose map is gone: shared, counted with atomic adds.
    shared: Slot,
    gp: Mutex<()>,
}

/// A held lease; dropping it releases it. Not `Send`: it is counted in the taking thread's
/// slot, which only that thread writes.
#[derive(Debug)]
pub(crate) struct Lease<'a> {
    counter: &'a Counter,
    _not_send: PhantomData<*const ()>,
}

impl Drop for Lease<'_> {
    #[inline]
    fn drop(&mut self) {
        // Release: the accesses made under the lease happen before the grace period ends.
        let c = self.counter;
        if c.shared {
            c.n.fetch_sub(1, Release);
        } else {
            c.n.store(c.n.load(Relaxed) - 1, Release);
        }
    }
}

/// What one grace period waited for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Waited {
    /// Leases still held when the wait reached the slow threshold.
    pub(crate) slow: u64,
}

impl Leases {
    pub(crate) fn new() -> Self {
        Self {
            id: new_table_id(),
            seq: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            used: AtomicUsize::new(0),
            register: Mutex::new(()),
            shared: Slot::shared(),
            gp: Mutex::new(()),
        }
    }

    /// Takes a lease. Everything the caller reads afterwards is at least as new as the
    /// state of every grace period that has not yet waited for this lease.
    #[inline]
    pub(crate) fn acquire(&self) -> Lease<'_> {
        let (last, index) = LAST.with(Cell::get);
        let slot = if last == self.id { &self.slots[index] } else { self.slot_slow() };
        loop {
            let seq = self.seq.load(SeqCst);
            let counter = &slot.count[(seq & 1) as usize];
            if counter.shared {
                counter.n.fetch_add(1, SeqCst);
            } else {
                counter.n.store(counter.n.load(Relaxed) + 1, SeqCst);
            }
            let lease = Lease { counter, _not_send: PhantomData };
            if self.seq.load(SeqCst) == seq {
                return lease;
            }
            // A grace period began in between: it may not wait for us, so take the new side.
            drop(lease);
        }
    }

    /// This thread's slot of this table, registered on first use (reusing a free one), and
    /// made the fast path's; the shared slot if every slot is owned or the thread's map is
    /// gone.
    #[cold]
    fn slot_slow(&self) -> &Slot {
        let index = MAP.try_with(|m| {
            let mut m = m.borrow_mut();
            let index = match m.0.iter().find(|e| e.id == self.id) {
                Some(e) => e.index,
                None => {
                    // Entries whose table is gone (only the map holds its slots) leave first.
                    m.0.retain(|e| Arc::strong_count(&e.slots) > 1);
                    let index = self.register()?;
                    m.0.push(Entry { id: self.id, slots: self.slots.clone(), index });
                    index
                }
            };
            LAST.with(|l| l.set((self.id, index)));
            Some(index)
        });
        match index {
            Ok(Some(i)) => &self.slots[i],
            _ => &self.shared,
        }
    }

    /// A slot for the calling thread: a free one if any, else a new one, else `None`.
    fn register(&self) -> Option<usize> {
        let _serial = lock(&self.register);
        let used = self.used.load(Relaxed);
        let free = self.slots[..used]
            .iter()
            .position(|s| s.owned.compare_exchange(false, true, Acquire, Relaxed).is_ok());
        if free.is_some() {
            return free;
        }
        let slot = self.slots.get(used)?;
        slot.owned.store(true, Relaxed);
        // Before the thread's first lease: a grace period that misses that lease's count
        // reads `used` after it (see the module comment).
        self.used.store(used + 1, SeqCst);
        Some(used)
    }

    /// Waits until every lease taken before this call is dropped; leases taken meanwhile
    /// are not waited for. Call it after the change is visible to translations.
    ///
    /// # Panics
    /// If the calling thread holds a lease (on any instance): it could wait for itself
    /// forever, or for a thread waiting for it.
    pub(crate) fn synchronize(&self, slow_after: Duration) -> Waited {
        assert!(
            !holds_a_lease(),
            "a thread holding a translation lease changed IOMMU state: it would wait for itself"
        );
        let _serial = lock(&self.gp);
        let old = (self.seq.fetch_add(1, SeqCst) & 1) as usize;
        let used = self.used.load(SeqCst);
        let mut waited = Waited::default();
        let mut start = None;
        for slot in self.slots[..used].iter().chain([&self.shared]) {
            let mut round = 0u32;
            while slot.count[old].load(SeqCst) != 0 {
                let t0 = *start.get_or_insert_with(Instant::now);
                backoff(round);
                round = round.saturating_add(1);
                // The clock is read every 16 rounds while spinning, every round once yielding
                // (a yield on a loaded host can last a time slice).
                let check = round % 16 == 0 || round > SPIN_ROUNDS;
                if waited.slow == 0 && check && t0.elapsed() >= slow_after {
                    waited.slow = self.held(used, old).max(1);
                }
            }
        }
        waited
    }

    /// Leases currently counted on one parity (a racy sum, for the slow counter).
    fn held(&self, used: usize, parity: usize) -> u64 {
        let shared = self.shared.count[parity].load(Relaxed);
        self.slots[..used].iter().map(|s| s.count[parity].load(Relaxed)).sum::<u64>() + shared
    }
}

/// True if the calling thread holds a lease on any instance (in its own slots).
fn holds_a_lease() -> bool {
    MAP.try_with(|m| m.borrow().0.iter().any(|e| !e.slots[e.index].idle())).unwrap_or(false)
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
    use std::sync::{Arc, Barrier};

    fn slot_count(l: &Leases) -> usize {
        l.used.load(SeqCst)
    }

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

    #[test]
    #[should_panic(expected = "wait for itself")]
    fn a_thread_holding_a_lease_on_another_instance_cannot_wait_either() {
        let (a, b) = (Leases::new(), Leases::new());
        let _lease = a.acquire();
        b.synchronize(Duration::from_millis(10));
    }

    /// Nested leases, dropped out of order, on one thread's slot: the count stays exact.
    #[test]
    fn nested_leases_dropped_out_of_order_release_the_slot() {
        let l = Leases::new();
        let (x, y) = (l.acquire(), l.acquire());
        drop(x);
        assert!(holds_a_lease());
        drop(y);
        assert!(!holds_a_lease());
        assert_eq!(l.synchronize(Duration::from_millis(10)), Waited::default());
    }

    /// Threads that come and go, one after another, reuse one slot: the list is bounded by
    /// the threads alive at once. A thread that exits without a lease frees its slot.
    #[test]
    fn exited_threads_give_their_slots_back() {
        let l = Leases::new();
        // Joined (not only scoped): a join waits for the thread-local destructors too.
        for _ in 0..50 {
            std::thread::scope(|s| s.spawn(|| drop(l.acquire())).join().unwrap());
        }
        assert_eq!(slot_count(&l), 1);
        // Two alive at once need two; afterwards both are free again.
        let both = Barrier::new(2);
        std::thread::scope(|s| {
            let t: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        let lease = l.acquire();
                        both.wait();
                        drop(lease);
                    })
                })
                .collect();
            t.into_iter().for_each(|t| t.join().unwrap());
        });
        assert_eq!(slot_count(&l), 2);
        assert!(l.slots[..2].iter().all(|s| !s.owned.load(SeqCst) && s.idle()));
        assert_eq!(l.synchronize(Duration::from_millis(10)), Waited::default());
    }

    /// A thread that exits with a lease still counted (leaked) keeps its slot owned, so the
    /// next thread does not reuse it, and a grace period goes on waiting for it.
    #[test]
    fn a_slot_with_a_leaked_lease_is_not_reused() {
        let l = Leases::new();
        std::thread::scope(|s| s.spawn(|| std::mem::forget(l.acquire())).join().unwrap());
        std::thread::scope(|s| s.spawn(|| drop(l.acquire())).join().unwrap());
        assert_eq!(slot_count(&l), 2);
        let slots = &l.slots;
        assert!(slots[0].owned.load(SeqCst) && !slots[0].idle());
        assert!(!slots[1].owned.load(SeqCst));
    }

    /// Beyond the table's slots, threads share one slot, and a grace period still waits for
    /// each of their leases.
    #[test]
    fn threads_beyond_the_table_share_a_slot_and_are_waited_for() {
        let l = Leases::new();
        let n = SLOTS + 3;
        let (held, release) = (Barrier::new(n + 1), Barrier::new(n + 1));
        let dropped = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| {
                    let lease = l.acquire();
                    held.wait();
                    release.wait();
                    std::thread::sleep(Duration::from_millis(20));
                    dropped.fetch_add(1, SeqCst);
                    drop(lease);
                });
            }
            held.wait();
            assert_eq!(slot_count(&l), SLOTS);
            assert_eq!(l.shared.count[0].load(SeqCst), 3);
            release.wait();
            l.synchronize(Duration::from_secs(3600));
            assert_eq!(dropped.load(SeqCst), n, "returned before every lease was dropped");
        });
    }

    /// One thread on many instances, some dropped meanwhile: its map keeps only the live
    /// ones, and a slot freed on one instance is never handed out by another.
    #[test]
    fn a_thread_map_forgets_dropped_instances() {
        std::thread::scope(|s| {
            s.spawn(|| {
                let keep = Leases::new();
                drop(keep.acquire());
                for _ in 0..100 {
                    let l = Leases::new();
                    drop(l.acquire());
                    drop(keep.acquire());
                }
                let n = MAP.with(|m| m.borrow().0.len());
                assert!(n <= 2, "{n} entries kept for 2 live instances");
                assert_eq!(slot_count(&keep), 1);
            });
        });
    }

    /// A lease held on one instance does not hold up a grace period on another, and the
    /// two instances' slots of one thread are distinct. (Were it waited for, it would be
    /// dropped after 60 s and counted slow.)
    #[test]
    fn a_grace_period_on_one_instance_ignores_leases_on_another() {
        let (a, b) = (Leases::new(), Leases::new());
        let held = Barrier::new(2);
        let (a, b, held) = (&a, &b, &held);
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        std::thread::scope(|s| {
            s.spawn(move || {
                let la = a.acquire();
                drop(b.acquire());
                held.wait();
                // b's grace period runs while this lease on a is held.
                let _ = done_rx.recv_timeout(Duration::from_secs(60));
                drop(la);
            });
            held.wait();
            let w = b.synchronize(Duration::from_millis(1));
            let _ = done_tx.send(());
            assert_eq!(w, Waited::default());
        });
        assert_eq!(a.synchronize(Duration::from_millis(10)), Waited::default());
    }
}
