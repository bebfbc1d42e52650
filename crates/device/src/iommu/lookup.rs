//! The non-faulting lookup, for back-ends that fill a cache of their own (an IOTLB).

use super::Iommu;
use crate::config::ResvKind;
use crate::endpoint::Endpoint;
use crate::sync::read;
use crate::translate::{Permissions, Window};

const RW: Permissions = Permissions { read: true, write: true };

impl Iommu {
    /// What `endpoint` reaches at `iova`: the mapping or identity window containing it and
    /// what it allows, or `None` where a translation would fault. Unlike
    /// [`Self::translate`] it queues no fault event and counts no fault, so a back-end can
    /// probe freely; the guest hears of the fault only when the back-end reports it.
    ///
    /// The same rules as translate apply (reserved regions, MSI, bypass, domains). The answer
    /// can go stale as soon as it is returned: a cache filled from it must be flushed by the
    /// listener calls (see [`crate::Listener`]). Fill under a lock that the listener call
    /// also takes: the device changes its state before calling listeners, so a fill either
    /// sees the new state or lands before the flush.
    pub fn lookup(&self, endpoint: u32, iova: u64) -> Option<(Window, Permissions)> {
        let ep = self.endpoints.get(endpoint)?;
        if let Some(r) = ep.resv_hit(iova, iova) {
            return (r.kind == ResvKind::Msi)
                .then_some((Window::Identity { start: r.start, end: r.end }, RW));
        }
        let attached = read(&ep.attached);
        let bypass = match attached.as_ref() {
            None => self.global_bypass().then_some(true)?,
            Some(domain) => domain.bypass,
        };
        if bypass {
            return Some((identity_window(ep, iova), RW));
        }
        let domain = attached.as_ref()?;
        if let Some(table) = &domain.table {
            return self.table_window(ep, table, iova);
        }
        let m = read(&domain.mappings).lookup(iova)?;
        Some((Window::Mapping(m), Permissions::from_map_flags(m.flags)))
    }
}

/// The widest range around `iova` (not itself reserved) that touches no reserved region.
fn identity_window(ep: &Endpoint, iova: u64) -> Window {
    let below = ep.resv.iter().filter(|r| r.end < iova).map(|r| r.end + 1).max();
    let above = ep.resv.iter().filter(|r| r.start > iova).map(|r| r.start - 1).min();
    Window::Identity { start: below.unwrap_or(0), end: above.unwrap_or(u64::MAX) }
}
