//! Exact event counts, readable while the device runs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};
use viommu_proto::{RequestType, Status};

/// Slots of the per-type request counters: index 0 for unknown types, then each type by
/// its code.
const REQUEST_SLOTS: usize = 1 + RequestType::COUNT;

/// Live counters (atomics); read a consistent-enough copy with [`Counters::get`].
#[derive(Debug, Default)]
pub struct Counters {
    requests: [AtomicU64; REQUEST_SLOTS],
    statuses: [AtomicU64; 9],
    malformed: AtomicU64,
    faults_raised: AtomicU64,
    faults_coalesced: AtomicU64,
    faults_dropped: AtomicU64,
    faults_delivered: AtomicU64,
    kicks: AtomicU64,
    interrupts: AtomicU64,
    grace_periods: AtomicU64,
    slow_leases: AtomicU64,
}

/// A copy of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterSnapshot {
    /// Requests by type: 1..=5 ATTACH..PROBE, 6 and 7 the drafts' ATTACH_TABLE and
    /// INVALIDATE (parsed, each gets one status); index 0 counts unknown types, which get
    /// no status (used length 0, also counted in `malformed`). A snapshot saved before
    /// types 6 and 7 existed (6 slots) loads with them at 0.
    #[serde(deserialize_with = "padded")]
    pub requests: [u64; REQUEST_SLOTS],
    /// Statuses written, indexed by status code.
    pub statuses: [u64; 9],
    /// Chains returned with used length 0 (could not be parsed or answered).
    pub malformed: u64,
    /// Failed translations that queued (or tried to queue) a fault event.
    pub faults_raised: u64,
    /// Faults merged into an event already pending (see [`crate::fault`]).
    pub faults_coalesced: u64,
    /// Faults lost because the pending-fault queue was full.
    pub faults_dropped: u64,
    /// Fault events written into event-queue buffers.
    pub faults_delivered: u64,
    /// Calls to process the request queue.
    pub kicks: u64,
    /// Times processing asked the VMM to interrupt the driver.
    pub interrupts: u64,
    /// Waits for older translation leases (one per change that took access away).
    #[serde(default)]
    pub grace_periods: u64,
    /// Leases still held when a wait had lasted `DeviceConfig::slow_lease`; the wait
    /// went on (counted once per wait).
    #[serde(default)]
    pub slow_leases: u64,
}

/// Reads a list of at most `REQUEST_SLOTS` counts, padded with zeros.
fn padded<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u64; REQUEST_SLOTS], D::Error> {
    let v: Vec<u64> = Deserialize::deserialize(d)?;
    let mut out = [0; REQUEST_SLOTS];
    if v.len() > REQUEST_SLOTS {
        return Err(serde::de::Error::invalid_length(v.len(), &"at most 8 request counts"));
    }
    out[..v.len()].copy_from_slice(&v);
    Ok(out)
}

impl CounterSnapshot {
    /// Requests of one type.
    pub fn requests_of(&self, t: RequestType) -> u64 {
        self.requests[t as usize]
    }

    /// Replies with one status.
    pub fn status(&self, s: Status) -> u64 {
        self.statuses[s as usize]
    }
}

impl Counters {
    pub(crate) fn request(&self, t: Option<RequestType>) {
        self.requests[t.map_or(0, |t| t as usize)].fetch_add(1, Relaxed);
    }
    pub(crate) fn status(&self, s: Status) {
        self.statuses[s as usize].fetch_add(1, Relaxed);
    }
    pub(crate) fn malformed(&self) {
        self.malformed.fetch_add(1, Relaxed);
    }
    pub(crate) fn fault_raised(&self) {
        self.faults_raised.fetch_add(1, Relaxed);
    }
    pub(crate) fn fault_coalesced(&self) {
        self.faults_coalesced.fetch_add(1, Relaxed);
    }
    pub(crate) fn fault_dropped(&self) {
        self.faults_dropped.fetch_add(1, Relaxed);
    }
    pub(crate) fn fault_delivered(&self) {
        self.faults_delivered.fetch_add(1, Relaxed);
    }
    pub(crate) fn kick(&self) {
        self.kicks.fetch_add(1, Relaxed);
    }
    pub(crate) fn interrupt(&self) {
        self.interrupts.fetch_add(1, Relaxed);
    }
    pub(crate) fn grace_period(&self, slow: u64) {
        self.grace_periods.fetch_add(1, Relaxed);
        if slow > 0 {
            self.slow_leases.fetch_add(slow, Relaxed);
        }
    }

    /// A copy of every counter.
    pub fn get(&self) -> CounterSnapshot {
        let load = |a: &AtomicU64| a.load(Relaxed);
        CounterSnapshot {
            requests: self.requests.each_ref().map(load),
            statuses: self.statuses.each_ref().map(load),
            malformed: load(&self.malformed),
            faults_raised: load(&self.faults_raised),
            faults_coalesced: load(&self.faults_coalesced),
            faults_dropped: load(&self.faults_dropped),
            faults_delivered: load(&self.faults_delivered),
            kicks: load(&self.kicks),
            interrupts: load(&self.interrupts),
            grace_periods: load(&self.grace_periods),
            slow_leases: load(&self.slow_leases),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_with_six_request_slots_still_loads() {
        let mut json = serde_json::to_value(CounterSnapshot::default()).unwrap();
        json["requests"] = serde_json::json!([1, 2, 3, 4, 5, 6]);
        let c: CounterSnapshot = serde_json::from_value(json).unwrap();
        assert_eq!(c.requests, [1, 2, 3, 4, 5, 6, 0, 0]);
    }
}
