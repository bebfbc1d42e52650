//! Request semantics (§5.13.6): ATTACH, DETACH, MAP, UNMAP, PROBE, each rule next to the
//! spec sentence it implements.

use std::sync::Arc;

use viommu_proto::features;
use viommu_proto::{
    pgtable, probe, write_resv_mem, write_table_format, AttachBody, DetachBody, MapBody, ProbeBody,
    ResvMem, Status, UnmapBody, ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO,
};
use zerocopy::little_endian::U64;

use super::{Control, DomainEntry, Iommu};
use crate::config::ResvKind;
use crate::domain::{Domain, DomainKind, Mapping};
use crate::endpoint::Endpoint;
use crate::listener::Listeners;
use crate::sync::{lock, read, write};

impl Iommu {
    /// §5.13.6.3 ATTACH.
    pub(super) fn attach(&self, b: &AttachBody) -> Status {
        // "If the reserved field of an ATTACH request is not zero, the device MUST reject
        // the request and set status to VIRTIO_IOMMU_S_INVAL."
        if b.reserved != [0; 4] {
            return Status::Inval;
        }
        // "If the device does not recognize a flags bit, it MUST reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL." F_BYPASS exists only with BYPASS_CONFIG.
        let known = if self.negotiated(features::BYPASS_CONFIG) { ATTACH_F_BYPASS } else { 0 };
        let flags = b.flags.get();
        if flags & !known != 0 {
            return Status::Inval;
        }
        let kind = if flags & ATTACH_F_BYPASS != 0 { DomainKind::Bypass } else { DomainKind::Map };
        let (domain_id, ep_id) = (b.domain.get(), b.endpoint.get());
        // "If the endpoint identified by endpoint doesn't exist, the device MUST reject the
        // request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(ep) = self.endpoints.get(ep_id) else { return Status::NoEnt };
        if !self.domain_in_range(domain_id) {
            return Status::Range;
        }
        self.attach_endpoint(ep, domain_id, kind)
    }

    /// Attaches `ep` to domain `domain_id`, created with `kind` if it does not exist: the
    /// common part of ATTACH and ATTACH_TABLE.
    pub(super) fn attach_endpoint(
        &self,
        ep: &Endpoint,
        domain_id: u32,
        kind: DomainKind,
    ) -> Status {
        let ep_id = ep.id;
        let mut ctl = lock(&self.control);
        let current = read(&ep.attached).as_ref().map(|d| d.id);
        let leaving_destroys = current.is_some_and(|c| {
            c != domain_id && ctl.domains.get(&c).is_some_and(|e| e.endpoints.len() == 1)
        });
        match ctl.domains.get(&domain_id) {
            Some(entry) => {
                // "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is
                // not consistent with that domain, the device SHOULD reject the request and
                // set status to VIRTIO_IOMMU_S_INVAL." Likewise a table domain for ATTACH, a
                // MAP domain or another root for ATTACH_TABLE (docs/spec-coverage.md P13).
                if entry.domain.kind() != kind {
                    return Status::Inval;
                }
                if current == Some(domain_id) {
                    return Status::Ok;
                }
                // "If another endpoint is already attached to the domain identified by
                // domain, then the device MAY attach the endpoint identified by endpoint to
                // the domain. If it cannot do so, the device MUST reject the request and set
                // status to VIRTIO_IOMMU_S_UNSUPP." A full domain is such a case.
                if entry.endpoints.len() >= self.cfg.limits.max_endpoints {
                    return Status::Unsupp;
                }
                // "If properties of the endpoint ... are compatible with properties of other
                // endpoints already attached to the requested domain, then the device SHOULD
                // attach the endpoint. Otherwise ... VIRTIO_IOMMU_S_UNSUPP." A mapping that
                // covers one of its reserved regions is such an incompatibility.
                let tree = read(&entry.domain.mappings);
                if ep.resv.iter().any(|r| tree.overlaps(r.start, r.end)) {
                    return Status::Unsupp;
                }
            }
            None => {
                let after = ctl.domains.len() - usize::from(leaving_destroys);
                if after >= self.cfg.limits.max_domains || self.cfg.limits.max_endpoints == 0 {
                    return Status::NoMem;
                }
            }
        }
        let told = ctl.listeners.clone();
        // "If the endpoint ... is already attached to another domain, then the device SHOULD
        // first detach it from that domain and attach it to the one identified by domain."
        // The switch happens under the endpoint's lock, so a concurrent translation sees the
        // old domain or the new one, never an unattached (possibly bypassing) endpoint.
        let mut slot = write(&ep.attached);
        let old = slot.take();
        if let Some(old) = &old {
            self.leave_domain(&mut ctl, ep, old.id);
        }
        let entry = ctl.domains.entry(domain_id).or_insert_with(|| DomainEntry {
            domain: Arc::new(match kind {
                DomainKind::Table(root) => Domain::with_table(domain_id, root),
                _ => Domain::new(domain_id, kind == DomainKind::Bypass, self.granule),
            }),
            endpoints: Vec::new(),
            resv: Vec::new(),
        });
        entry.endpoints.push(ep_id);
        entry.resv.extend_from_slice(&ep.resv);
        *slot = Some(entry.domain.clone());
        drop(slot);
        self.invalidate();
        if told.is_empty() {
            return Status::Ok;
        }
        for l in told.iter() {
            if let Some(old) = &old {
                l.on_detach(ep_id, old.id);
            }
        }
        let replay = match kind {
            DomainKind::Table(root) => told.attach_table(ep_id, domain_id, root),
            _ => {
                told.iter().for_each(|l| l.on_attach(ep_id, domain_id, kind == DomainKind::Bypass));
                let existing: Vec<Mapping> = read(&entry.domain.mappings).iter().collect();
                existing.iter().try_for_each(|m| told.map(&[ep_id], m))
            }
        };
        if let Err(err) = replay {
            // The back-end cannot follow: leave the endpoint unattached (blocked, or bypassing
            // if bypass is on) rather than translating what the back-end does not have.
            self.detach_locked(&mut ctl, ep, &told);
            return err.status();
        }
        Status::Ok
    }

    /// Removes `ep` from domain `id`'s bookkeeping; the domain ceases to exist with its
    /// last endpoint ("After all endpoints have been successfully detached from a domain,
    /// it ceases to exist").
    fn leave_domain(&self, ctl: &mut Control, ep: &Endpoint, id: u32) {
        let Some(entry) = ctl.domains.get_mut(&id) else { return };
        entry.endpoints.retain(|&e| e != ep.id);
        if entry.endpoints.is_empty() {
            let n = read(&entry.domain.mappings).len();
            ctl.total_mappings -= n;
            ctl.domains.remove(&id);
        } else {
            let eps = &self.endpoints;
            entry.resv = entry
                .endpoints
                .iter()
                .filter_map(|&e| eps.get(e))
                .flat_map(|e| e.resv.iter().copied())
                .collect();
        }
    }

    /// Detaches `ep` from whatever domain it is in.
    pub(super) fn detach_locked(&self, ctl: &mut Control, ep: &Endpoint, told: &Listeners) {
        let Some(dom) = write(&ep.attached).take() else { return };
        self.invalidate();
        self.leave_domain(ctl, ep, dom.id);
        told.iter().for_each(|l| l.on_detach(ep.id, dom.id));
    }

    /// §5.13.6.4 DETACH.
    pub(super) fn detach(&self, b: &DetachBody) -> Status {
        // "If the endpoint identified by endpoint doesn't exist, then the device MUST reject
        // the request and set status to VIRTIO_IOMMU_S_NOENT." Reserved is ignored ("MUST
        // ignore reserved").
        let Some(ep) = self.endpoints.get(b.endpoint.get()) else { return Status::NoEnt };
        let mut ctl = lock(&self.control);
        // "If the domain ... doesn't exist, or if the endpoint ... isn't attached to this
        // domain, then the device MAY set the request status to VIRTIO_IOMMU_S_INVAL."
        if read(&ep.attached).as_ref().map(|d| d.id) != Some(b.domain.get()) {
            return Status::Inval;
        }
        let told = ctl.listeners.clone();
        self.detach_locked(&mut ctl, ep, &told);
        Status::Ok
    }

    /// §5.13.6.5 MAP.
    pub(super) fn map(&self, b: &MapBody) -> Status {
        if !self.negotiated(features::MAP_UNMAP) {
            return Status::Unsupp;
        }
        let flags = b.flags.get();
        // "If the device doesn't recognize a flags bit, it MUST reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL." MMIO is only known with F_MMIO negotiated.
        if flags & !MAP_F_MASK != 0 || (flags & MAP_F_MMIO != 0 && !self.negotiated(features::MMIO))
        {
            return Status::Inval;
        }
        let (start, end, phys) = (b.virt_start.get(), b.virt_end.get(), b.phys_start.get());
        let mut ctl = lock(&self.control);
        // "If domain does not exist, the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_NOENT."
        let Some(entry) = ctl.domains.get(&b.domain.get()) else { return Status::NoEnt };
        // "If the domain is a bypass domain, the device SHOULD reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL." A table domain has no mappings either (P13).
        if entry.domain.kind() != DomainKind::Map {
            return Status::Inval;
        }
        // "If virt_start, phys_start or (virt_end + 1) is not aligned on the page
        // granularity, the device SHOULD reject the request and set status to
        // VIRTIO_IOMMU_S_RANGE." Also: an empty range, a range outside input_range ("Any
        // mapping request to virtual addresses outside of this range fails"), and a
        // physical end past 2^64 are out of range.
        let g = self.granule - 1;
        if start & g != 0 || phys & g != 0 || end.wrapping_add(1) & g != 0 || end < start {
            return Status::Range;
        }
        if !self.in_input_range(start, end) || phys.checked_add(end - start).is_none() {
            return Status::Range;
        }
        // "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
        if entry.resv.iter().any(|r| r.overlaps(start, end)) {
            return Status::Inval;
        }
        let mapping = Mapping { start, end, phys, flags };
        {
            // Requests are serialised by `control`: what is checked here still holds when
            // the mapping is inserted below, after the listeners.
            let tree = read(&entry.domain.mappings);
            // "If a mapping already exists in the requested range, the device SHOULD reject
            // the request and set status to VIRTIO_IOMMU_S_INVAL."
            if tree.overlaps(start, end) {
                return Status::Inval;
            }
            let limits = &self.cfg.limits;
            if tree.len() >= limits.max_mappings_per_domain
                || ctl.total_mappings >= limits.max_mappings_total
            {
                return Status::NoMem;
            }
        }
        // Back-ends first: the mapping becomes visible only once they all have it.
        if let Err(err) = ctl.listeners.map(&entry.endpoints, &mapping) {
            return err.status();
        }
        write(&entry.domain.mappings).insert(mapping);
        ctl.total_mappings += 1;
        Status::Ok
    }

    /// §5.13.6.6 UNMAP.
    pub(super) fn unmap(&self, b: &UnmapBody) -> Status {
        if !self.negotiated(features::MAP_UNMAP) {
            return Status::Unsupp;
        }
        let (start, end) = (b.virt_start.get(), b.virt_end.get());
        let mut ctl = lock(&self.control);
        // "If domain does not exist, the device SHOULD set the request status to
        // VIRTIO_IOMMU_S_NOENT." Reserved is ignored (the spec allows either).
        let Some(entry) = ctl.domains.get(&b.domain.get()) else { return Status::NoEnt };
        // "If the domain is a bypass domain, the device SHOULD reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL." A table domain has no mappings either (P13).
        if entry.domain.kind() != DomainKind::Map {
            return Status::Inval;
        }
        if end < start {
            return Status::Range;
        }
        let told = &ctl.listeners;
        let mut removed = Vec::new();
        let want = (!told.is_empty()).then_some(&mut removed);
        let result = write(&entry.domain.mappings).unmap(start, end, want);
        // "If a mapping affected by the range is not covered in its entirety by the range
        // (the UNMAP request would split the mapping), then the device SHOULD set the request
        // status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
        let Ok(count) = result else { return Status::Range };
        if count > 0 {
            self.invalidate();
        }
        // The used entry is written after this returns: listeners have finished.
        told.unmap(&entry.endpoints, start, end, &removed);
        ctl.total_mappings -= count;
        Status::Ok
    }

    /// §5.13.6.8 PROBE.
    pub(super) fn probe(&self, b: &ProbeBody, props: &mut [u8]) -> Status {
        if !self.offered(features::PROBE) {
            return Status::Unsupp;
        }
        // "If the properties list is smaller than probe_size, the device SHOULD NOT write any
        // property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        if props.len() < self.cfg.probe_size as usize {
            return Status::Inval;
        }
        // "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill
        // the remaining bytes of properties with zeroes": a zero header also ends the list.
        // Before the NOENT check: the used length covers these bytes whatever the status,
        // and the reply buffer is reused between requests.
        props.fill(0);
        // "If the endpoint identified by endpoint doesn't exist, then the device SHOULD
        // reject the request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(ep) = self.endpoints.get(b.endpoint.get()) else { return Status::NoEnt };
        let mut off = 0;
        for r in &ep.resv {
            let resv = ResvMem {
                subtype: match r.kind {
                    ResvKind::Reserved => probe::RESV_MEM_T_RESERVED,
                    ResvKind::Msi => probe::RESV_MEM_T_MSI,
                },
                reserved: [0; 3],
                start: U64::new(r.start),
                end: U64::new(r.end),
            };
            // Config validation guarantees the properties fit in probe_size.
            match write_resv_mem(&mut props[off..], &resv) {
                Ok(n) => off += n,
                Err(_) => return Status::DevErr,
            }
        }
        // P5: one PAGE_TABLE_FMT property per format the endpoint's domains may use.
        if self.reports_table_format()
            && write_table_format(&mut props[off..], pgtable::FORMAT_VIRT).is_err()
        {
            return Status::DevErr;
        }
        Status::Ok
    }

    pub(super) fn domain_in_range(&self, id: u32) -> bool {
        let (lo, hi) = self.cfg.domain_range;
        !self.offered(features::DOMAIN_RANGE) || (lo <= id && id <= hi)
    }

    pub(super) fn in_input_range(&self, start: u64, end: u64) -> bool {
        let (lo, hi) = self.cfg.input_range;
        !self.offered(features::INPUT_RANGE) || (lo <= start && end <= hi)
    }
}
