//! Translation for the VMM's other device models, and the fault events it raises.

use std::sync::atomic::Ordering::Acquire;

use viommu_proto::{MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};

use super::{tlb, Iommu};
use crate::config::ResvKind;
use crate::domain::Mapping;
use crate::endpoint::Endpoint;
use crate::fault::{Offer, PendingFault};
use crate::sync::{lock, read};
use crate::translate::{Access, Fault, FaultKind, Segment, Segments, Translation, Unleased};

impl Iommu {
    /// Translates `[iova, iova + len)` for a DMA `access` by `endpoint` into guest-physical
    /// segments, under a lease (see [`Translation`]): until the result is dropped, no change
    /// that takes the range away completes.
    ///
    /// Rules, in order: an unknown endpoint fails without an event. A range touching a
    /// RESERVED region faults; one inside the MSI region is identity-mapped (the doorbell
    /// bypasses translation), one crossing its edge faults. An unattached endpoint is
    /// identity-mapped in global bypass mode, else faults (reason DOMAIN). An endpoint in a
    /// bypass domain is identity-mapped. Otherwise every byte must be covered by mappings
    /// carrying the access's flags (else reason MAPPING). Each fault except the unknown
    /// endpoint queues a fault event (see [`crate::fault`] for coalescing); the fault
    /// notifier is called after every lock and this call's lease are released.
    ///
    /// Safe to call from any number of threads while requests are processed. A per-thread
    /// cache (see `tlb`) answers repeated translations without locks; otherwise it takes two
    /// read locks and never the request lock. A zero-length access translates to nothing.
    #[inline(always)]
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation<'_>, Fault> {
        // Small and inline (the failures are cold calls): the translation is built in the
        // caller's frame, and the lease is taken and dropped there.
        let Some(ep) = self.endpoints.get(endpoint) else {
            return Err(unknown_endpoint(endpoint, iova, access));
        };
        // Taken before the state is read: a change that completes after this waits for it.
        let lease = self.leases.acquire();
        match self.lookup_segments(ep, iova, len, access) {
            Ok(segments) => Ok(Translation::new(segments, access, lease)),
            Err((kind, address)) => {
                drop(lease);
                Err(self.raise_cold(Fault { kind, endpoint, address, access }))
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn raise_cold(&self, f: Fault) -> Fault {
        self.raise(f)
    }

    /// For benchmarks only: [`Self::translate`]'s work minus the lease. It builds the same
    /// segments (dropped with the result) by the same path, but raises no fault and yields
    /// no address, so nothing can be accessed through it.
    #[doc(hidden)]
    #[inline]
    pub fn bench_translate_unleased(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Option<Unleased> {
        let ep = self.endpoints.get(endpoint)?;
        self.lookup_segments(ep, iova, len, access).ok().map(Unleased)
    }

    /// The segments of `[iova, iova + len)`, or why and where it faults. Every lock it takes
    /// is released when it returns.
    fn lookup_segments(
        &self,
        ep: &Endpoint,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Segments, (FaultKind, u64)> {
        if len == 0 {
            return Ok(Segments::default());
        }
        let Some(last) = iova.checked_add(len - 1) else {
            return Err((FaultKind::Overflow, iova));
        };
        if let Some(r) = ep.resv_hit(iova, last) {
            let inside = r.start <= iova && last <= r.end;
            if r.kind == ResvKind::Msi && inside {
                return Ok(Segments::identity(iova, len));
            }
            return Err((FaultKind::Reserved, iova.max(r.start)));
        }
        // Read the epoch before the state: an entry is then never newer than its tag says.
        let epoch = self.epoch.load(Acquire);
        let need = access.required_map_flags();
        if let Some(m) = tlb::lookup(self.id, epoch, ep.id, iova, last) {
            if m.flags & need == need {
                return Ok(Segments::single(m, iova, len));
            }
        }
        let attached = read(&ep.attached);
        let bypass = match attached.as_ref() {
            None if self.global_bypass() => true,
            None => return Err((FaultKind::NotAttached, iova)),
            Some(domain) => domain.bypass,
        };
        if bypass {
            let identity =
                Mapping { start: 0, end: u64::MAX, phys: 0, flags: MAP_F_READ | MAP_F_WRITE };
            tlb::insert(self.id, epoch, ep.id, iova, identity);
            return Ok(Segments::identity(iova, len));
        }
        let domain = attached.as_ref().expect("bypass handled the unattached case");
        if let Some(table) = &domain.table {
            return self.table_segments(ep, table, (iova, last, len), need, epoch);
        }
        let tree = read(&domain.mappings);
        let mut out = Segments::default();
        let mut cur = iova;
        // Each round consumes one mapping, so the loop is bounded by the mappings in range.
        loop {
            let Some(m) = tree.lookup(cur) else { return Err((FaultKind::Unmapped, cur)) };
            if m.flags & need != need {
                return Err((FaultKind::Permission, cur));
            }
            if cur == iova && last <= m.end {
                // One mapping serves the whole access: the common case, worth caching.
                tlb::insert(self.id, epoch, ep.id, iova, m);
                return Ok(Segments::single(m, iova, len));
            }
            let seg_end = m.end.min(last);
            out.push(Segment {
                addr: m.phys + (cur - m.start),
                len: seg_end - cur + 1,
                mmio: m.flags & MAP_F_MMIO != 0,
            });
            if seg_end == last {
                return Ok(out);
            }
            cur = seg_end + 1;
        }
    }

    /// Queues the fault event for `f` and returns `f`.
    pub(super) fn raise(&self, f: Fault) -> Fault {
        self.counters.fault_raised();
        let ev = PendingFault {
            reason: f.kind.reason(),
            flags: f.access.fault_flags() | viommu_proto::fault::F_ADDRESS,
            endpoint: f.endpoint,
            address: f.address,
        };
        let outcome = lock(&self.faults).push(ev);
        match outcome {
            Offer::Queued => {
                // Cloned out first: the notifier runs with no lock held, so it may take the
                // VMM's device lock or replace itself.
                let notifier = read(&self.notifier).clone();
                if let Some(n) = notifier {
                    n();
                }
            }
            Offer::Coalesced => self.counters.fault_coalesced(),
            Offer::Dropped => self.counters.fault_dropped(),
        }
        f
    }

    /// Number of fault events waiting for an event-queue buffer.
    pub fn pending_faults(&self) -> usize {
        lock(&self.faults).len()
    }

    pub(crate) fn front_fault(&self) -> Option<PendingFault> {
        lock(&self.faults).front().copied()
    }

    pub(crate) fn pop_fault(&self) {
        lock(&self.faults).pop();
        self.counters.fault_delivered();
    }
}

#[cold]
fn unknown_endpoint(endpoint: u32, address: u64, access: Access) -> Fault {
    Fault { kind: FaultKind::UnknownEndpoint, endpoint, address, access }
}
