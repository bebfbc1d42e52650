//! What the driver counts: requests, kicks, syncs, flushes, faults.

use core::sync::atomic::{AtomicU64, Ordering};

use viommu_proto::RequestType;

use crate::iommu::FlushCause;

/// Number of buckets of the batch-size histogram: bucket `i` counts kicks
/// that carried `2^i ..= 2^(i+1)-1` requests; the last is open-ended.
pub const BATCH_BUCKETS: usize = 10;

#[derive(Default)]
pub(crate) struct Counters {
    /// By [`RequestType::index`].
    requests: [AtomicU64; RequestType::COUNT],
    kicks: AtomicU64,
    pub(in crate::iommu) kicks_suppressed: AtomicU64,
    pub(in crate::iommu) event_kicks: AtomicU64,
    pub(in crate::iommu) syncs: AtomicU64,
    sync_errors: AtomicU64,
    pub(in crate::iommu) timeouts: AtomicU64,
    batch: [AtomicU64; BATCH_BUCKETS],
    flushes: [AtomicU64; FlushCause::COUNT],
    pub(in crate::iommu) faults: AtomicU64,
    pub(in crate::iommu) faults_unhandled: AtomicU64,
    pub(in crate::iommu) bad_events: AtomicU64,
}

pub(in crate::iommu) fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn flush(&self, cause: FlushCause) {
        bump(&self.flushes[cause as usize]);
    }

    pub(crate) fn sync_error(&self) {
        bump(&self.sync_errors);
    }

    /// Counts `n` requests of type `t`.
    pub(in crate::iommu) fn requests(&self, t: RequestType, n: u64) {
        self.requests[t.index()].fetch_add(n, Ordering::Relaxed);
    }

    pub(in crate::iommu) fn kick(&self, batch: u64) {
        bump(&self.kicks);
        let bucket = (63 - batch.max(1).leading_zeros() as usize).min(BATCH_BUCKETS - 1);
        bump(&self.batch[bucket]);
    }

    pub(in crate::iommu) fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let request = |t: RequestType| g(&self.requests[t.index()]);
        let flushes = |c: FlushCause| g(&self.flushes[c as usize]);
        CounterSnapshot {
            attach: request(RequestType::Attach),
            detach: request(RequestType::Detach),
            map: request(RequestType::Map),
            unmap: request(RequestType::Unmap),
            probe: request(RequestType::Probe),
            attach_table: request(RequestType::AttachTable),
            invalidate: request(RequestType::Invalidate),
            kicks: g(&self.kicks),
            kicks_suppressed: g(&self.kicks_suppressed),
            event_kicks: g(&self.event_kicks),
            syncs: g(&self.syncs),
            sync_errors: g(&self.sync_errors),
            timeouts: g(&self.timeouts),
            batch_sizes: core::array::from_fn(|i| g(&self.batch[i])),
            flushes_full: flushes(FlushCause::Full),
            flushes_timeout: flushes(FlushCause::Timeout),
            flushes_explicit: flushes(FlushCause::Explicit),
            faults: g(&self.faults),
            faults_unhandled: g(&self.faults_unhandled),
            bad_events: g(&self.bad_events),
        }
    }
}

/// A copy of the driver's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// ATTACH requests sent.
    pub attach: u64,
    /// DETACH requests sent.
    pub detach: u64,
    /// MAP requests sent.
    pub map: u64,
    /// UNMAP requests sent.
    pub unmap: u64,
    /// PROBE requests sent.
    pub probe: u64,
    /// ATTACH_TABLE requests sent (page-table mode, draft).
    pub attach_table: u64,
    /// INVALIDATE requests sent (page-table mode, draft).
    pub invalidate: u64,
    /// Request-queue notifications.
    pub kicks: u64,
    /// Batches of new requests that needed no notification: with EVENT_IDX,
    /// the device had not yet caught up with the ring, and looks again
    /// before it stops. How often that happens depends on the device's
    /// progress, but `kicks + kicks_suppressed` does not: it counts every
    /// batch the driver made available.
    pub kicks_suppressed: u64,
    /// Event-queue notifications.
    pub event_kicks: u64,
    /// Syncs (waits for request completion).
    pub syncs: u64,
    /// Syncs that returned a failed request.
    pub sync_errors: u64,
    /// Waits for the device that gave up with [`Error::Timeout`](crate::Error::Timeout).
    pub timeouts: u64,
    /// Requests per kick, see [`BATCH_BUCKETS`].
    pub batch_sizes: [u64; BATCH_BUCKETS],
    /// DMA-layer flushes because a queue was full.
    pub flushes_full: u64,
    /// DMA-layer flushes because an entry timed out.
    pub flushes_timeout: u64,
    /// DMA-layer flushes asked for explicitly.
    pub flushes_explicit: u64,
    /// Fault records received.
    pub faults: u64,
    /// Fault records received with no handler registered.
    pub faults_unhandled: u64,
    /// Event buffers returned too short to hold a fault record.
    pub bad_events: u64,
}

impl CounterSnapshot {
    /// All requests.
    pub fn requests(&self) -> u64 {
        self.attach
            + self.detach
            + self.map
            + self.unmap
            + self.probe
            + self.attach_table
            + self.invalidate
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            attach: self.attach - earlier.attach,
            detach: self.detach - earlier.detach,
            map: self.map - earlier.map,
            unmap: self.unmap - earlier.unmap,
            probe: self.probe - earlier.probe,
            attach_table: self.attach_table - earlier.attach_table,
            invalidate: self.invalidate - earlier.invalidate,
            kicks: self.kicks - earlier.kicks,
            kicks_suppressed: self.kicks_suppressed - earlier.kicks_suppressed,
            event_kicks: self.event_kicks - earlier.event_kicks,
            syncs: self.syncs - earlier.syncs,
            sync_errors: self.sync_errors - earlier.sync_errors,
            timeouts: self.timeouts - earlier.timeouts,
            batch_sizes: core::array::from_fn(|i| self.batch_sizes[i] - earlier.batch_sizes[i]),
            flushes_full: self.flushes_full - earlier.flushes_full,
            flushes_timeout: self.flushes_timeout - earlier.flushes_timeout,
            flushes_explicit: self.flushes_explicit - earlier.flushes_explicit,
            faults: self.faults - earlier.faults,
            faults_unhandled: self.faults_unhandled - earlier.faults_unhandled,
            bad_events: self.bad_events - earlier.bad_events,
        }
    }
}
