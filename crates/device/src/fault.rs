//! Pending fault events, waiting for event-queue buffers.
//!
//! Coalescing rule: at most one event is pending per (endpoint, reason, access flags). A
//! fault whose key matches a pending event is counted as coalesced and not queued, so a
//! device hammering one bad buffer produces one event until the driver has consumed it;
//! the next fault after delivery is reported again. The queue holds at most
//! `Limits::max_pending_faults` events; a fault that finds it full is counted as dropped.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use viommu_proto::FaultEvent;
use zerocopy::little_endian::{U32, U64};

/// One fault event waiting for a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PendingFault {
    /// `fault::R_*`.
    pub reason: u8,
    /// `fault::F_*`, including F_ADDRESS.
    pub flags: u32,
    /// The endpoint.
    pub endpoint: u32,
    /// The faulting address.
    pub address: u64,
}

impl PendingFault {
    /// The wire form written into the event buffer.
    pub fn event(&self) -> FaultEvent {
        FaultEvent {
            reason: self.reason,
            reserved: [0; 3],
            flags: U32::new(self.flags),
            endpoint: U32::new(self.endpoint),
            reserved1: [0; 4],
            address: U64::new(self.address),
        }
    }

    fn same_kind(&self, other: &Self) -> bool {
        self.endpoint == other.endpoint && self.reason == other.reason && self.flags == other.flags
    }
}

/// What happened to a fault offered to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offer {
    /// Queued for delivery.
    Queued,
    /// Merged into a pending event of the same kind.
    Coalesced,
    /// The queue was full.
    Dropped,
}

/// The bounded queue of pending faults.
#[derive(Clone, Debug, Default)]
pub(crate) struct FaultQueue {
    pending: VecDeque<PendingFault>,
    cap: usize,
}

impl FaultQueue {
    /// An empty queue holding at most `cap` events.
    pub(crate) fn new(cap: usize) -> Self {
        Self { pending: VecDeque::new(), cap }
    }

    /// Offers a fault. The scan is over at most `cap` entries, on the fault path only.
    pub(crate) fn push(&mut self, f: PendingFault) -> Offer {
        if self.pending.iter().any(|p| p.same_kind(&f)) {
            return Offer::Coalesced;
        }
        if self.pending.len() >= self.cap {
            return Offer::Dropped;
        }
        self.pending.push_back(f);
        Offer::Queued
    }

    /// The oldest pending event.
    pub(crate) fn front(&self) -> Option<&PendingFault> {
        self.pending.front()
    }

    /// Removes the oldest pending event (after delivery).
    pub(crate) fn pop(&mut self) -> Option<PendingFault> {
        self.pending.pop_front()
    }

    /// Number of pending events.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }

    /// Drops everything pending.
    pub(crate) fn clear(&mut self) {
        self.pending.clear();
    }

    /// The pending events, oldest first.
    pub(crate) fn to_vec(&self) -> Vec<PendingFault> {
        self.pending.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(endpoint: u32, address: u64) -> PendingFault {
        PendingFault { reason: 2, flags: 0x101, endpoint, address }
    }

    #[test]
    fn same_kind_coalesces_until_delivered() {
        let mut q = FaultQueue::new(4);
        assert_eq!(q.push(f(1, 0x1000)), Offer::Queued);
        assert_eq!(q.push(f(1, 0x2000)), Offer::Coalesced);
        assert_eq!(q.push(f(2, 0x1000)), Offer::Queued);
        assert_eq!(q.pop().map(|p| p.address), Some(0x1000));
        assert_eq!(q.push(f(1, 0x3000)), Offer::Queued);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn full_queue_drops() {
        let mut q = FaultQueue::new(2);
        assert_eq!(q.push(f(1, 0)), Offer::Queued);
        assert_eq!(q.push(f(2, 0)), Offer::Queued);
        assert_eq!(q.push(f(3, 0)), Offer::Dropped);
        assert_eq!(q.len(), 2);
    }
}
