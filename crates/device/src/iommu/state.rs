//! Device reset and the state carried by snapshot and restore.

use std::sync::Arc;

use viommu_proto::{features, Status, MAP_F_MASK, MAP_F_MMIO};

use super::{DomainEntry, Iommu};
use crate::domain::{Domain, Mapping};
use crate::fault::PendingFault;
use crate::snapshot::DomainState;
use crate::sync::{lock, read, write};

impl Iommu {
    /// Device reset (§5.13.5 "When the device is reset, endpoints are not attached to any
    /// domain"): every domain and mapping goes, pending faults too; `bypass` is kept.
    pub(crate) fn reset(&self) {
        let mut ctl = lock(&self.control);
        let told = ctl.listeners.clone();
        for ep in self.endpoints.iter() {
            self.detach_locked(&mut ctl, ep, &told);
        }
        ctl.domains.clear();
        ctl.total_mappings = 0;
        lock(&self.faults).clear();
        told.iter().for_each(|l| l.on_reset());
        drop(ctl);
        self.grace_period();
    }

    pub(crate) fn export(&self) -> (Vec<DomainState>, Vec<PendingFault>) {
        let ctl = lock(&self.control);
        let domains = ctl
            .domains
            .values()
            .map(|e| DomainState {
                id: e.domain.id,
                bypass: e.domain.bypass,
                endpoints: e.endpoints.clone(),
                mappings: read(&e.domain.mappings).iter().collect(),
                page_table: e.domain.table.as_ref().map(|t| t.root),
            })
            .collect();
        (domains, lock(&self.faults).to_vec())
    }

    /// Replaces the state with `domains` and `faults`. Checks the state against this
    /// configuration so a restored device cannot hold what requests could not have created;
    /// on any error the device is left reset.
    pub(crate) fn import(
        &self,
        domains: &[DomainState],
        faults: &[PendingFault],
    ) -> Result<(), String> {
        self.reset();
        let result = self.import_domains(domains);
        self.invalidate();
        if result.is_err() {
            self.reset();
            return result;
        }
        if let Err(e) = self.check_faults(faults) {
            self.reset();
            return Err(e);
        }
        let mut q = lock(&self.faults);
        for f in faults {
            q.push(*f);
        }
        Ok(())
    }

    /// Pending faults a running device could hold: within the queue's bound, one per
    /// (endpoint, reason, flags), of a configured endpoint, with known reason and flags.
    fn check_faults(&self, faults: &[PendingFault]) -> Result<(), String> {
        use viommu_proto::fault::{
            F_ADDRESS, F_READ, F_WRITE, R_DOMAIN, R_MAPPING, R_PTE_FETCH, R_WALK_EABT,
        };
        let tables = self.offered(features::ATTACH_TABLE);
        if faults.len() > self.cfg.limits.max_pending_faults {
            return Err(format!("{} pending faults, more than the limit", faults.len()));
        }
        for (i, f) in faults.iter().enumerate() {
            let known = self.endpoints.get(f.endpoint).is_some()
                && (matches!(f.reason, R_DOMAIN | R_MAPPING)
                    || (tables && matches!(f.reason, R_WALK_EABT | R_PTE_FETCH)))
                && f.flags & !(F_READ | F_WRITE | F_ADDRESS) == 0;
            let twice = faults[..i]
                .iter()
                .any(|p| (p.endpoint, p.reason, p.flags) == (f.endpoint, f.reason, f.flags));
            if !known || twice {
                return Err(format!("bad pending fault {f:?}"));
            }
        }
        Ok(())
    }

    /// True if MAP could have created `m` in a domain of this device (alignment, ranges,
    /// flags), ignoring the other mappings and the reserved regions.
    fn mapping_is_valid(&self, m: &Mapping) -> bool {
        let g = self.granule - 1;
        let aligned = m.start & g == 0 && m.phys & g == 0 && m.end.wrapping_add(1) & g == 0;
        let mmio_ok = m.flags & MAP_F_MMIO == 0 || self.offered(features::MMIO);
        aligned
            && m.end >= m.start
            && m.phys.checked_add(m.end - m.start).is_some()
            && self.in_input_range(m.start, m.end)
            && m.flags & !MAP_F_MASK == 0
            && mmio_ok
    }

    /// A root ATTACH_TABLE could have accepted: page-table mode offered, the root aligned,
    /// and inside guest RAM when the table memory is known (P16).
    fn check_table_root(&self, root: u64) -> Result<(), String> {
        if !self.offered(features::ATTACH_TABLE) {
            return Err("a page-table domain, but page-table mode is not offered".into());
        }
        match self.check_root(root) {
            // Without table memory yet, the root is checked by every walk instead.
            Ok(()) | Err(Status::DevErr) => Ok(()),
            Err(_) => Err(format!("page-table root {root:#x}: not aligned, or not in guest RAM")),
        }
    }

    fn import_domains(&self, domains: &[DomainState]) -> Result<(), String> {
        let mut ctl = lock(&self.control);
        let told = ctl.listeners.clone();
        let limits = &self.cfg.limits;
        // A state no request sequence could have built is refused, so that a restored
        // device keeps every invariant the request path keeps (limits, ranges, alignment).
        if domains.len() > limits.max_domains {
            return Err(format!("{} domains, more than the limit", domains.len()));
        }
        for d in domains {
            if d.endpoints.is_empty() || ctl.domains.contains_key(&d.id) {
                return Err(format!("domain {}: no endpoint or listed twice", d.id));
            }
            if !self.domain_in_range(d.id) || d.endpoints.len() > limits.max_endpoints {
                return Err(format!("domain {}: outside domain_range or too many endpoints", d.id));
            }
            let total = ctl.total_mappings + d.mappings.len();
            if d.mappings.len() > limits.max_mappings_per_domain
                || total > limits.max_mappings_total
            {
                return Err(format!("domain {}: more mappings than the limits", d.id));
            }
            let domain = match d.page_table {
                None => Domain::new(d.id, d.bypass, self.granule),
                Some(root) => {
                    self.check_table_root(root)?;
                    if d.bypass || !d.mappings.is_empty() {
                        return Err(format!("domain {}: a table domain with mappings", d.id));
                    }
                    Domain::with_table(d.id, root)
                }
            };
            let domain = Arc::new(domain);
            let entry = DomainEntry { domain, endpoints: Vec::new(), resv: Vec::new() };
            {
                let mut tree = write(&entry.domain.mappings);
                for m in &d.mappings {
                    if !self.mapping_is_valid(m) || tree.overlaps(m.start, m.end) || d.bypass {
                        return Err(format!("domain {}: bad mapping {m:?}", d.id));
                    }
                    tree.insert(*m);
                }
                // MAP refuses reserved regions of attached endpoints, ATTACH refuses an
                // endpoint whose reserved regions are mapped.
                for &e in &d.endpoints {
                    let resv = self.endpoints.get(e).map_or(&[][..], |ep| &ep.resv[..]);
                    if resv.iter().any(|r| tree.overlaps(r.start, r.end)) {
                        return Err(format!(
                            "domain {}: a mapping covers endpoint {e}'s reserved region",
                            d.id
                        ));
                    }
                }
            }
            ctl.total_mappings = total;
            // Registered before its endpoints point at it, so a failure below is undone by reset.
            let entry = ctl.domains.entry(d.id).or_insert(entry);
            for &e in &d.endpoints {
                let ep = self.endpoints.get(e).ok_or_else(|| format!("unknown endpoint {e}"))?;
                let mut slot = write(&ep.attached);
                if slot.is_some() {
                    return Err(format!("endpoint {e} in two domains"));
                }
                *slot = Some(entry.domain.clone());
                entry.endpoints.push(e);
                entry.resv.extend_from_slice(&ep.resv);
                if let Some(root) = d.page_table {
                    told.attach_table(e, d.id, root)
                        .map_err(|err| format!("endpoint {e}: {err}"))?;
                    continue;
                }
                told.iter().for_each(|l| l.on_attach(e, d.id, d.bypass));
                for m in &d.mappings {
                    told.map(&[e], m).map_err(|err| format!("endpoint {e}: {err}"))?;
                }
            }
        }
        Ok(())
    }
}
