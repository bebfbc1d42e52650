//! Page-table mode on a domain (drafts, issue #15): the entries are written
//! under the domain's lock with the tree, and an unmap queues one INVALIDATE
//! in place of UNMAPs.
//!
//! "INVALIDATE: invalidate the device's caches of a page-table domain"
//! (2023 draft). The driver clears the entries first, then queues the
//! INVALIDATE; once it completed, no access through the old entries reaches
//! memory (the device's promise, notes/pgtable-coord.md), so an IOVA or a
//! table page is reused only after that.

use crate::iommu::domain::state::DomainState;
use crate::iommu::domain::DomainInner;
use crate::iommu::encode::invalidate_req;
use crate::iommu::pgtable::{hull, Span};
use crate::iommu::types::Mapping;
use crate::iommu::{Replies, Ticket, UnmapTicket};
use crate::sync::Locks;
use crate::{Error, Prot, Result};

impl<L: Locks> DomainInner<L> {
    /// Writes the entries of `maps`: all, or none on failure.
    pub(in crate::iommu) fn write_entries(st: &mut DomainState, maps: &[Mapping]) -> Result<()> {
        let Some(t) = st.table.as_mut() else { return Ok(()) };
        for (k, m) in maps.iter().enumerate() {
            let (read, write) = (m.prot.0 & Prot::READ.0 != 0, m.prot.0 & Prot::WRITE.0 != 0);
            if let Err(e) = t.map(m.iova, m.paddr, m.last - m.iova + 1, read, write) {
                for m in &maps[..k] {
                    t.unmap(m.iova, m.last);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Clears the entries of the mappings inside `ranges` (already out of
    /// the tree, so wholly inside them).
    pub(in crate::iommu) fn clear_entries(st: &mut DomainState, ranges: &[Span]) {
        if let Some(t) = st.table.as_mut() {
            for &(s, e) in ranges {
                t.unmap(s, e);
            }
        }
    }

    /// Queues one INVALIDATE over `range` (the whole domain for `None`),
    /// widened to what the table still owes the device: retired tables and
    /// ranges whose INVALIDATE failed. Not kicked. Returns its ticket and
    /// the range it covers.
    pub(in crate::iommu) fn queue_invalidate(
        &self,
        st: &mut DomainState,
        range: Option<Span>,
    ) -> Result<(Ticket, Span)> {
        let t = st.table.as_mut().ok_or(Error::NotPaging)?;
        t.sweep();
        let leaf = !t.has_retired();
        let (req, covered) = match range {
            Some(r) => {
                let r = hull(Some(r), t.pending_span()).unwrap_or(r);
                (invalidate_req(self.id, Some(r), leaf), r)
            }
            None => (invalidate_req(self.id, None, leaf), (0, u64::MAX)),
        };
        match self.port.submit(&req, 0) {
            Ok(ticket) => {
                t.queued(ticket);
                Ok((ticket, covered))
            }
            Err(e) => {
                t.mark_dirty(covered);
                Err(e)
            }
        }
    }

    /// Takes in the outcome of INVALIDATEs (`replies` by position in
    /// `unmaps`; `None`: no answer): the tables they covered are freed, or
    /// wait for the next INVALIDATE if one failed.
    pub(in crate::iommu) fn invalidated(&self, unmaps: &[UnmapTicket], replies: Option<&Replies>) {
        if !self.table {
            return;
        }
        let mut st = self.state.lock();
        let Some(t) = st.table.as_mut() else { return };
        for (i, u) in unmaps.iter().enumerate() {
            let ok = replies.is_some_and(|r| i < r.len() && r.result(i).is_ok());
            t.settled(u.ticket, ok);
            if !ok {
                t.mark_dirty((u.first, u.last));
            }
        }
    }
}
