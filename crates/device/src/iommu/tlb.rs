//! A small per-thread translation cache (an IOTLB) in front of translate's locks.
//!
//! Each thread keeps 64 direct-mapped entries: (IOMMU instance, epoch, endpoint) and the
//! mapping that served a translation. An entry is used only while the instance's epoch is
//! unchanged. Every change that can take a translation away (UNMAP, ATTACH, DETACH, a
//! change of global bypass, reset, restore) bumps the epoch after updating the state and
//! before the request completes, so no thread uses a stale entry once the change is
//! visible. MAP only adds translations and leaves the epoch alone. A hit touches no shared
//! cache line for writing, so translating threads do not slow each other down.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::domain::Mapping;

const SLOTS: usize = 64;

#[derive(Clone, Copy, Debug)]
struct Entry {
    iommu: u64,
    epoch: u64,
    endpoint: u32,
    mapping: Mapping,
}

/// An empty slot: epoch 0 is never current for instance 0, which does not exist.
const EMPTY: Entry = Entry {
    iommu: 0,
    epoch: 0,
    endpoint: 0,
    mapping: Mapping { start: 1, end: 0, phys: 0, flags: 0 },
};

thread_local! {
    static TLB: [Cell<Entry>; SLOTS] = const { [const { Cell::new(EMPTY) }; SLOTS] };
}

/// A process-unique ID for each IOMMU instance, so instances never share entries.
pub(super) fn new_instance_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Relaxed)
}

fn slot(iommu: u64, endpoint: u32, iova: u64) -> usize {
    let key = (iova >> 12) ^ (u64::from(endpoint) << 40) ^ iommu.rotate_left(52);
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize
}

/// The cached mapping covering `[iova, last]` for `endpoint`, if still valid at `epoch`.
#[inline]
pub(super) fn lookup(
    iommu: u64,
    epoch: u64,
    endpoint: u32,
    iova: u64,
    last: u64,
) -> Option<Mapping> {
    TLB.try_with(|t| {
        let e = t[slot(iommu, endpoint, iova)].get();
        let hit = e.iommu == iommu
            && e.epoch == epoch
            && e.endpoint == endpoint
            && e.mapping.start <= iova
            && last <= e.mapping.end;
        hit.then_some(e.mapping)
    })
    .ok()
    .flatten()
}

/// Remembers that `mapping` served `endpoint` at `iova` while the epoch was `epoch`.
#[inline]
pub(super) fn insert(iommu: u64, epoch: u64, endpoint: u32, iova: u64, mapping: Mapping) {
    let _ = TLB.try_with(|t| {
        t[slot(iommu, endpoint, iova)].set(Entry { iommu, epoch, endpoint, mapping })
    });
}
