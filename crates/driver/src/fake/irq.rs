//! The fake device's interrupt line, and how a driver thread waits on it.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::ring::Device;

/// The interrupt line of the fake device: a count and a condition variable.
#[derive(Default)]
pub(super) struct Irq {
    /// Tells devices apart in the per-thread seen counts.
    pub(super) id: usize,
    count: Mutex<u64>,
    cond: Condvar,
    pub(super) blocking: AtomicBool,
    /// Threads blocked in a wait right now.
    pub(super) blocked: AtomicUsize,
}

thread_local! {
    /// Per thread: the interrupt count it last saw, by device.
    static SEEN: RefCell<HashMap<usize, u64>> = RefCell::new(HashMap::new());
}

/// Longest a blocking wait lasts without an interrupt.
/// Only ends a hang: a test that blocks waits must not depend on how soon
/// other threads get to run.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Irq {
    /// The line of device number `id`.
    pub(super) fn new(id: usize) -> Self {
        Self { id, ..Default::default() }
    }

    pub(super) fn raise(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cond.notify_all();
    }

    /// Blocks until an interrupt this thread has not seen (one that came
    /// before the call counts), or until [`WAIT_LIMIT`].
    fn wait(&self) {
        let seen = SEEN.with(|s| s.borrow().get(&self.id).copied().unwrap_or(0));
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *count == seen {
            // Counted under the lock, so no interrupt can come between the
            // count and the sleep.
            self.blocked.fetch_add(1, Ordering::SeqCst);
            count = match self.cond.wait_timeout_while(count, WAIT_LIMIT, |c| *c == seen) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            self.blocked.fetch_sub(1, Ordering::SeqCst);
        }
        let now = *count;
        drop(count);
        SEEN.with(|s| s.borrow_mut().insert(self.id, now));
    }
}

/// One wait for used buffers: a deferred device runs now; then the thread
/// blocks for an interrupt (blocking waits) or yields.
pub(super) fn wait_for_used(dev: &Mutex<Device>, irq: &Irq) {
    {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if d.deferred && !d.stalled {
            d.process_requests();
        }
    }
    if irq.blocking.load(Ordering::SeqCst) {
        irq.wait();
    } else {
        std::thread::yield_now();
    }
}
