//! Device reset and the state carried by snapshot and restore.

use std::sync::Arc;

use super::{DomainEntry, Iommu};
use crate::domain::Domain;
use crate::fault::PendingFault;
use crate::snapshot::DomainState;
use crate::sync::{lock, read, write};

impl Iommu {
    /// Device reset (§5.13.5 "When the device is reset, endpoints are not attached to any
    /// domain"): every domain and mapping goes, pending faults too; `bypass` is kept.
    pub(crate) fn reset(&self) {
        let mut ctl = lock(&self.control);
        let listener = self.listener();
        for ep in self.endpoints.iter() {
            self.detach_locked(&mut ctl, ep, listener.as_deref());
        }
        ctl.domains.clear();
        ctl.total_mappings = 0;
        lock(&self.faults).clear();
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
        let mut q = lock(&self.faults);
        for f in faults {
            q.push(*f);
        }
        Ok(())
    }

    fn import_domains(&self, domains: &[DomainState]) -> Result<(), String> {
        let mut ctl = lock(&self.control);
        let listener = self.listener();
        for d in domains {
            if d.endpoints.is_empty() || ctl.domains.contains_key(&d.id) {
                return Err(format!("domain {}: no endpoint or listed twice", d.id));
            }
            let domain = Arc::new(Domain::new(d.id, d.bypass, self.granule));
            let entry = DomainEntry { domain, endpoints: Vec::new(), resv: Vec::new() };
            {
                let mut tree = write(&entry.domain.mappings);
                for m in &d.mappings {
                    let bad = m.end < m.start || m.phys.checked_add(m.end - m.start).is_none();
                    if bad || tree.overlaps(m.start, m.end) || d.bypass {
                        return Err(format!("domain {}: bad mapping {m:?}", d.id));
                    }
                    tree.insert(*m);
                }
            }
            ctl.total_mappings += d.mappings.len();
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
                if let Some(l) = &listener {
                    l.on_attach(e, d.id, d.bypass);
                    for m in &d.mappings {
                        l.on_map(e, m).map_err(|err| format!("endpoint {e}: {err}"))?;
                    }
                }
            }
        }
        Ok(())
    }
}
