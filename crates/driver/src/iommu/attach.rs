//! Domains, attach and detach.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::AtomicBool;

use viommu_proto::{features as f, pgtable, ATTACH_F_BYPASS};

use crate::hal::Hal;
use crate::iommu::device::VirtioIommu;
use crate::iommu::domain::state::DomainState;
use crate::iommu::domain::{Domain, DomainInner};
use crate::iommu::encode::{attach_req, attach_table_req, detach_req, map_req, Reqs};
use crate::iommu::pgtable::PageTable;
use crate::iommu::replies::{first_error, may_have_applied};
use crate::iommu::shared::Shared;
use crate::iommu::types::{DomainKind, Mapping, Prot, ResvKind};
use crate::iommu::{merge_regions, Port};
use crate::sync::{Locks, Mutex};
use crate::transport::Transport;
use crate::{Error, Result};

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> VirtioIommu<T, H, L> {
    fn alloc_domain_id(&self) -> Result<u32> {
        let (lo, hi) = self.shared.info.domain_range;
        let mut ids = self.shared.domain_ids.lock();
        let mut cand = lo;
        for &used in ids.range(lo..) {
            if used != cand {
                break;
            }
            if cand == hi {
                return Err(Error::NoDomainId);
            }
            cand += 1;
        }
        if cand > hi {
            return Err(Error::NoDomainId);
        }
        ids.insert(cand);
        Ok(cand)
    }

    fn new_domain(&self, kind: DomainKind, table: bool) -> Result<Domain<L>> {
        let info = &self.shared.info;
        let granule = info.granule();
        if granule > self.shared.opts.guest_page_size {
            return Err(Error::GranuleTooLarge { granule, page: self.shared.opts.guest_page_size });
        }
        let mut state = DomainState::default();
        let mut aperture = info.input_range;
        if table {
            state.table = Some(PageTable::new(self.shared.hal.clone())?);
            // Format 3 translates 48-bit IOVAs.
            aperture.1 = aperture.1.min(pgtable::IOVA_MAX);
        }
        let id = self.alloc_domain_id()?;
        let port: Arc<dyn Port> = self.shared.clone();
        Ok(Domain {
            inner: Arc::new(DomainInner {
                id,
                kind,
                granule,
                aperture,
                iommu_id: self.shared.id,
                mmio: info.has(f::MMIO),
                table,
                port,
                state: Mutex::new(state),
                stale_any: AtomicBool::new(false),
            }),
        })
    }

    /// Whether a paging domain for `endpoint` can be in page-table mode:
    /// wanted ([`DriverOptions::page_tables`](crate::DriverOptions::page_tables)), F_ATTACH_TABLE negotiated, a 4 KiB
    /// granule and input range starting in the format's 48 bits, and format
    /// 3 among the endpoint's PROBE properties.
    fn table_mode(&self, endpoint: u32) -> bool {
        let s = &self.shared;
        s.opts.page_tables
            && s.info.has(f::ATTACH_TABLE)
            && s.info.granule() == pgtable::GRANULE
            && s.info.input_range.0 <= pgtable::IOVA_MAX
            && s.endpoint(endpoint).lock().table_format
    }

    /// A paging domain for `endpoint`, finalised now: granule from
    /// page_size_mask, aperture = input_range, a fresh domain ID (freed on
    /// drop), and the endpoint's direct regions mapped 1:1 once.
    ///
    /// Page-table mode (drafts) when the device offers it for the endpoint
    /// (see [`Domain::uses_page_table`]): the driver writes a format-3 page
    /// table the device walks, mapping sends no request, and unmapping sends
    /// INVALIDATE; the aperture ends at 48 bits. MAP mode otherwise.
    pub fn alloc_paging(&self, endpoint: u32) -> Result<Domain<L>> {
        let resv = self.reserved_regions(endpoint)?;
        let domain = self.new_domain(DomainKind::Paging, self.table_mode(endpoint))?;
        let direct = merge_regions(
            resv.iter().filter(|r| r.kind == ResvKind::Direct).map(|r| (r.start, r.end)),
        );
        let (lo, hi) = domain.aperture();
        let g = domain.granule();
        for (start, end) in direct {
            if start < lo || end > hi {
                return Err(Error::OutOfRange { start, end });
            }
            let (s, e) = (start & !(g - 1), end | (g - 1));
            domain.inner.insert(Mapping {
                iova: s,
                last: e,
                paddr: s,
                prot: Prot::READ | Prot::WRITE,
            })?;
        }
        Ok(domain)
    }

    /// An identity domain for `endpoint`: ATTACH with F_BYPASS under
    /// BYPASS_CONFIG, otherwise 1:1 mappings of the aperture minus the
    /// endpoint's reserved regions.
    pub fn alloc_identity(&self, endpoint: u32) -> Result<Domain<L>> {
        if self.shared.info.has(f::BYPASS_CONFIG) {
            return self.new_domain(DomainKind::Identity { bypass: true }, false);
        }
        let resv = self.reserved_regions(endpoint)?;
        let domain = self.new_domain(DomainKind::Identity { bypass: false }, false)?;
        let (lo, hi) = domain.aperture();
        let g = domain.granule() as u128;
        let holes = merge_regions(resv.iter().map(|r| (r.start, r.end)));
        let (lo, hi) = (lo as u128, hi as u128);
        let mut gaps = Vec::new();
        let mut next = lo;
        for (s, e) in holes {
            let (s, e) = (s as u128, e as u128);
            if s > next && next <= hi {
                gaps.push((next, (s - 1).min(hi)));
            }
            next = next.max(e + 1);
        }
        if next <= hi {
            gaps.push((next, hi));
        }
        for (s, e) in gaps {
            let start = s.div_ceil(g) * g;
            let end_excl = (e + 1) / g * g;
            if end_excl > start {
                let (iova, last) = (start as u64, (end_excl - 1) as u64);
                domain.inner.insert(Mapping {
                    iova,
                    last,
                    paddr: iova,
                    prot: Prot::READ | Prot::WRITE,
                })?;
            }
        }
        Ok(domain)
    }

    /// A blocking domain: attached endpoints can do no DMA.
    pub fn alloc_blocking(&self) -> Result<Domain<L>> {
        self.new_domain(DomainKind::Blocking, false)
    }

    /// Attaches `endpoint` to `domain`, detaching it from its current domain
    /// first. The first attach of a domain replays every recorded mapping in
    /// one batch with one sync; if any fails, the endpoint is detached again.
    /// A page-table domain sends one ATTACH_TABLE with its root instead: the
    /// table holds the mappings already.
    pub fn attach(&self, domain: &Domain<L>, endpoint: u32) -> Result<()> {
        let s = &self.shared;
        if domain.inner.iommu_id != s.id {
            return Err(Error::WrongIommu);
        }
        // Declared before the endpoint guard, so dropped after it: the last
        // handle of an old domain may run its Drop, which takes endpoint locks.
        let mut old_domain = None;
        let ep = s.endpoint(endpoint);
        let mut entry = ep.lock();
        if let Some((old_id, old)) = entry.domain.clone() {
            if old_id == domain.inner.id {
                return Ok(());
            }
            old_domain = old.upgrade();
            detach_locked(s, old_id, old_domain.as_deref(), endpoint)?;
            entry.domain = None;
        }
        let d = &domain.inner;
        let mut st = d.state.lock();
        let bypass = matches!(d.kind, DomainKind::Identity { bypass: true });
        let flags = if bypass { ATTACH_F_BYPASS } else { 0 };
        let mut reqs = match st.table.as_ref() {
            Some(t) => vec![attach_table_req(d.id, endpoint, t.root())],
            None => vec![attach_req(d.id, endpoint, flags)],
        };
        if st.endpoints.is_empty() && st.table.is_none() {
            reqs.extend(st.tree.iter().map(|m| map_req(d.id, m)));
        }
        let (seqs, queued) = match s.submit_all(Reqs::Any(&reqs)) {
            Ok(seqs) => (seqs, Ok(())),
            Err((seqs, e)) if !seqs.is_empty() => (seqs, Err(e)),
            Err((_, e)) => return Err(e),
        };
        let replies = match s.wait_or_abandon(&seqs) {
            Ok(r) => r,
            Err(e) => {
                // The device may still attach it: count it as attached, so
                // that unmaps keep reaching the device (detach to undo).
                st.endpoints.insert(endpoint);
                drop(st);
                entry.domain = Some((d.id, Arc::downgrade(d)));
                return Err(e);
            }
        };
        let attach_result = match replies.result(0) {
            Err(e) => {
                s.counters.sync_error();
                Err(e)
            }
            ok => ok,
        };
        if let Err(e) = attach_result {
            if may_have_applied(&e) {
                // It may be attached after all: detach it to be sure.
                if let Ok(seq) = s.submit(&detach_req(d.id, endpoint), 0) {
                    let _ = s.wait_or_abandon(&[seq]);
                }
            }
            return Err(e);
        }
        if let Err(e) = first_error(&s.counters, &replies, 1).and(queued) {
            // Undo the attach: the device forgets the domain and its mappings.
            let seq = s.submit(&detach_req(d.id, endpoint), 0)?;
            let _ = s.wait_or_abandon(&[seq])?;
            return Err(e);
        }
        st.endpoints.insert(endpoint);
        drop(st);
        entry.domain = Some((d.id, Arc::downgrade(d)));
        drop(entry);
        drop(old_domain);
        Ok(())
    }

    /// Detaches `endpoint` from its domain. After the last detach the device
    /// forgets the domain; the driver keeps its mapping tree for a later attach.
    pub fn detach(&self, endpoint: u32) -> Result<()> {
        let s = &self.shared;
        let dom;
        let ep = s.endpoints.lock().get(&endpoint).cloned().ok_or(Error::NotAttached(endpoint))?;
        let mut entry = ep.lock();
        let (id, weak) = entry.domain.clone().ok_or(Error::NotAttached(endpoint))?;
        dom = weak.upgrade();
        detach_locked(s, id, dom.as_deref(), endpoint)?;
        entry.domain = None;
        drop(entry);
        Ok(())
    }

    /// The domain ID `endpoint` is attached to.
    pub fn attached_domain(&self, endpoint: u32) -> Option<u32> {
        let ep = self.shared.endpoints.lock().get(&endpoint).cloned()?;
        let id = ep.lock().domain.as_ref().map(|d| d.0);
        id
    }

    /// The interrupt handler: reaps request completions (so that waiting
    /// syncs find their replies without polling the ring themselves) and
    /// consumes the event queue. Returns the number of fault records.
    pub fn handle_interrupt(&self) -> Result<usize> {
        self.shared.req.lock().reap();
        self.poll_events()
    }
}

/// Sends DETACH and waits, under the domain's lock so no MAP slips behind it.
pub(in crate::iommu) fn detach_locked<T: Transport + 'static, H: Hal + 'static, L: Locks>(
    s: &Shared<T, H, L>,
    id: u32,
    dom: Option<&DomainInner<L>>,
    endpoint: u32,
) -> Result<()> {
    let mut st = dom.map(|d| d.state.lock());
    let seq = s.submit(&detach_req(id, endpoint), 0)?;
    let replies = s.wait_or_abandon(&[seq])?;
    first_error(&s.counters, &replies, 0)?;
    if let Some(st) = st.as_mut() {
        st.endpoints.remove(&endpoint);
        if st.endpoints.is_empty() {
            // The device forgot the domain: its old walks are over.
            if let Some(t) = st.table.as_mut() {
                t.forget_device();
            }
        }
    }
    Ok(())
}
