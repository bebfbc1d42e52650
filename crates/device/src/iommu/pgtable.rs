//! Page-table mode (experimental; drafts, docs/spec-coverage.md P1–P20): ATTACH_TABLE and
//! INVALIDATE, and translation by walking the guest's table.
//!
//! A table domain's translations come from the guest's format-3 table, read from the
//! memory the VMM gave ([`Iommu::set_table_memory`]). A leaf a walk finds goes into the
//! domain's cache and, for an access inside one leaf, into the per-thread TLB like a
//! mapping. INVALIDATE empties both (the cache by range, the TLB by the epoch) and, like
//! UNMAP, completes only after the leases taken before it are dropped.

use std::sync::Arc;

use viommu_proto::pgtable::{self, Translation as Leaf, WalkError, FORMAT_VIRT};
use viommu_proto::{features, inval, AttachTableBody, InvalidateBody, Status};
use viommu_proto::{MAP_F_READ, MAP_F_WRITE};

use super::{tlb, Iommu};
use crate::domain::{DomainKind, Mapping};
use crate::endpoint::Endpoint;
use crate::pgtable::{root_is_valid, PageTable, TableMemory};
use crate::sync::{lock, read, write};
use crate::translate::{FaultKind, Permissions, Segment, Segments, Window};

impl Iommu {
    /// Gives the device the guest memory it walks I/O page tables in (page-table mode).
    /// Set it before the guest runs; until then ATTACH_TABLE answers DEVERR. Any vm-memory
    /// `GuestMemoryBackend` will do (`Arc::new(mem.clone())` of a `GuestMemoryMmap`).
    pub fn set_table_memory(&self, mem: Option<Arc<dyn TableMemory>>) {
        *write(&self.table_memory) = mem;
        self.invalidate();
    }

    /// Draft ATTACH_TABLE, format 3.
    pub(super) fn attach_table(&self, b: &AttachTableBody) -> Status {
        // P1: the request exists only with F_ATTACH_TABLE negotiated.
        if !self.negotiated(features::ATTACH_TABLE) {
            return Status::Unsupp;
        }
        // P14: "flags" has no bit defined for format 3 and the reserved fields must be zero,
        // as ATTACH's rule has it ("If the reserved field ... is not zero, the device MUST
        // reject the request and set status to VIRTIO_IOMMU_S_INVAL").
        if b.flags.get() != 0 || b.reserved != [0; 6] || b.reserved2 != [0; 48] {
            return Status::Inval;
        }
        // P15: a format the device did not report in PROBE is unsupported.
        if b.format.get() != FORMAT_VIRT {
            return Status::Unsupp;
        }
        let (domain_id, root) = (b.domain.get(), b.pgd.get());
        let Some(ep) = self.endpoints.get(b.endpoint.get()) else { return Status::NoEnt };
        if !self.domain_in_range(domain_id) {
            return Status::Range;
        }
        if let Err(status) = self.check_root(root) {
            return status;
        }
        self.attach_endpoint(ep, domain_id, DomainKind::Table(root))
    }

    /// P16: a root is a 4 KiB aligned table inside guest RAM (RANGE otherwise); DEVERR
    /// when the device has no table memory to check it in.
    pub(super) fn check_root(&self, root: u64) -> Result<(), Status> {
        if !root_is_valid(root) {
            return Err(Status::Range);
        }
        let mem = read(&self.table_memory);
        let mem = mem.as_ref().ok_or(Status::DevErr)?;
        let last = root + pgtable::GRANULE - 8;
        if mem.read_pte(root).is_none() || mem.read_pte(last).is_none() {
            return Err(Status::Range);
        }
        Ok(())
    }

    /// Draft INVALIDATE.
    pub(super) fn invalidate_table(&self, b: &InvalidateBody) -> Status {
        if !self.negotiated(features::ATTACH_TABLE) {
            return Status::Unsupp;
        }
        let range = match invalidate_range(b) {
            Ok(r) => r,
            Err(status) => return status,
        };
        let ctl = lock(&self.control);
        let Some(entry) = ctl.domains.get(&b.domain.get()) else { return Status::NoEnt };
        // P18: only a table domain has a cache to invalidate.
        let Some(table) = &entry.domain.table else { return Status::Inval };
        table.cache.invalidate(range);
        // Every thread's TLB entries are stale now; execute() then waits for older leases.
        self.invalidate();
        let (start, end) = range.unwrap_or((0, u64::MAX));
        ctl.listeners.invalidate(&entry.endpoints, entry.domain.id, start, end);
        Status::Ok
    }

    /// The segments of `[iova, last]` in a table domain (see `translation`).
    pub(super) fn table_segments(
        &self,
        ep: &Endpoint,
        table: &PageTable,
        (iova, last, len): (u64, u64, u64),
        need: u32,
        epoch: u64,
    ) -> Result<Segments, (FaultKind, u64)> {
        let mut out = Segments::default();
        let mut cur = iova;
        // Each round consumes one leaf, so the loop is bounded by the pages in the range.
        loop {
            // "Any mapping request to virtual addresses outside of this range fails": a
            // table cannot map them either.
            if !self.in_input_range(cur, cur) {
                return Err((FaultKind::Unmapped, cur));
            }
            let leaf = self.leaf(table, cur)?;
            // Clipped to input_range, so a TLB entry never answers outside it.
            let m = self.clip_to_input(leaf_mapping(&leaf));
            if m.flags & need != need {
                return Err((FaultKind::Permission, cur));
            }
            if cur == iova && last <= m.end {
                tlb::insert(self.id, epoch, ep.id, iova, m);
                return Ok(Segments::single(m, iova, len));
            }
            let seg_end = m.end.min(last);
            out.push(Segment {
                addr: m.phys + (cur - m.start),
                len: seg_end - cur + 1,
                mmio: false,
            });
            if seg_end == last {
                return Ok(out);
            }
            cur = seg_end + 1;
        }
    }

    /// The leaf containing `iova`: from the domain's cache, or by a walk that fills it.
    fn leaf(&self, table: &PageTable, iova: u64) -> Result<Leaf, (FaultKind, u64)> {
        let generation = match table.cache.get(iova) {
            Ok(leaf) => return Ok(leaf),
            Err(g) => g,
        };
        let leaf = self.walk(table.root, iova).map_err(|e| (walk_fault(e), iova))?;
        table.cache.fill(generation, iova, leaf);
        Ok(leaf)
    }

    /// One bounded walk of the table at `root` (P11).
    fn walk(&self, root: u64, iova: u64) -> Result<Leaf, WalkError> {
        let mem = read(&self.table_memory);
        let Some(mem) = mem.as_ref() else {
            return Err(WalkError::TableOutsideMemory { level: 0, gpa: root });
        };
        pgtable::walk(root, iova, |gpa| mem.read_pte(gpa))
    }

    /// What `ep` reaches at `iova` in a table domain, for [`Iommu::lookup`]: the leaf,
    /// narrowed so that it touches no reserved region and stays inside `input_range`.
    pub(super) fn table_window(
        &self,
        ep: &Endpoint,
        table: &PageTable,
        iova: u64,
    ) -> Option<(Window, Permissions)> {
        if !self.in_input_range(iova, iova) {
            return None;
        }
        let leaf = self.walk(table.root, iova).ok()?;
        let m = self.clip_to_input(leaf_mapping(&leaf));
        let below = ep.resv.iter().filter(|r| r.end < iova).map(|r| r.end + 1).max();
        let above = ep.resv.iter().filter(|r| r.start > iova).map(|r| r.start - 1).min();
        let w = clip(m, below.unwrap_or(0), above.unwrap_or(u64::MAX));
        Some((Window::Mapping(w), Permissions::from_map_flags(m.flags)))
    }

    /// `m` narrowed to `input_range`, if enforced.
    fn clip_to_input(&self, m: Mapping) -> Mapping {
        if !self.offered(features::INPUT_RANGE) {
            return m;
        }
        let (lo, hi) = self.cfg.input_range;
        clip(m, lo, hi)
    }

    /// True if PROBE reports the page-table format (P5).
    pub(super) fn reports_table_format(&self) -> bool {
        self.offered(features::ATTACH_TABLE)
    }
}

/// The leaf as a mapping (for the TLB and for lookups).
fn leaf_mapping(leaf: &Leaf) -> Mapping {
    let flags = (u32::from(leaf.read) * MAP_F_READ) | (u32::from(leaf.write) * MAP_F_WRITE);
    Mapping { start: leaf.iova, end: leaf.iova + (leaf.size - 1), phys: leaf.oa, flags }
}

/// `m` narrowed to `[lo, hi]`, which must intersect it.
fn clip(m: Mapping, lo: u64, hi: u64) -> Mapping {
    let start = m.start.max(lo);
    Mapping { start, end: m.end.min(hi), phys: m.phys + (start - m.start), flags: m.flags }
}

/// The fault a failed walk raises (P12).
fn walk_fault(e: WalkError) -> FaultKind {
    match e {
        WalkError::OutOfRange | WalkError::NotMapped { .. } => FaultKind::Unmapped,
        WalkError::TableOutsideMemory { .. } => FaultKind::TableOutsideMemory,
        WalkError::Malformed { .. } => FaultKind::BadTableEntry,
    }
}

/// The range an INVALIDATE covers (`None`: the whole domain), or its refusal (P17).
fn invalidate_range(b: &InvalidateBody) -> Result<Option<(u64, u64)>, Status> {
    let (gran, types, flags) = (b.inv_gran.get(), b.inv_type.get(), b.flags.get());
    if types == 0 || types & !inval::T_MASK != 0 || flags & !inval::F_MASK != 0 {
        return Err(Status::Inval);
    }
    // No PASID support: a PASID-scoped invalidation is unsupported, not ignored.
    if gran == inval::G_PASID || flags & inval::F_PASID != 0 {
        return Err(Status::Unsupp);
    }
    match gran {
        inval::G_DOMAIN => Ok(None),
        inval::G_VA if b.granule >= 12 => b.va_range().map(Some).ok_or(Status::Inval),
        _ => Err(Status::Inval),
    }
}
