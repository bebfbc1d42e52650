//! Concurrency tests whose outcome does not depend on the scheduler: every thread starts at
//! one barrier, and the work is bounded by progress seen on both sides, never by time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::thread;

/// Runs `step` (the writer, on this thread) against `readers` threads running `read`.
///
/// The writer takes at least `min_steps` steps, and goes on until every reader has seen the
/// step count change `min_overlaps` times between two of its reads: so each reader provably
/// ran while the writer worked, on a busy machine too. Readers stop once the writer is done.
/// A reader that panics ends the run (its panic is the test's failure). Returns the number
/// of reads of each reader.
pub fn overlapped(
    readers: usize,
    min_steps: u64,
    min_overlaps: u64,
    mut step: impl FnMut(u64),
    read: impl Fn(usize) + Sync,
) -> Vec<u64> {
    let steps = AtomicU64::new(0);
    let done = AtomicBool::new(false);
    let overlaps: Vec<AtomicU64> = (0..readers).map(|_| AtomicU64::new(0)).collect();
    let start = Barrier::new(readers + 1);
    thread::scope(|s| {
        let handles: Vec<_> = (0..readers)
            .map(|t| {
                let (steps, done, seen, start, read) = (&steps, &done, &overlaps[t], &start, &read);
                s.spawn(move || {
                    start.wait();
                    let (mut reads, mut last) = (0u64, u64::MAX);
                    while !done.load(Ordering::Acquire) {
                        let now = steps.load(Ordering::Acquire);
                        if now != last {
                            last = now;
                            seen.fetch_add(1, Ordering::Release);
                        }
                        read(t);
                        reads += 1;
                        if now == steps.load(Ordering::Acquire) {
                            // The writer made no step meanwhile: let it have the CPU.
                            thread::yield_now();
                        }
                    }
                    reads
                })
            })
            .collect();
        start.wait();
        let mut k = 0;
        let enough = |k| {
            k >= min_steps && overlaps.iter().all(|o| o.load(Ordering::Acquire) >= min_overlaps)
        };
        while !enough(k) && !handles.iter().any(|h| h.is_finished()) {
            step(k);
            k += 1;
            steps.store(k, Ordering::Release);
        }
        done.store(true, Ordering::Release);
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}
