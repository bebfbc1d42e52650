//! Endpoints: PROBE and reserved regions.

use alloc::vec::Vec;

use viommu_proto::{features as f, ProbeBody, Property, PropertyIter, Request, ResvMem};
use zerocopy::little_endian::U32;

use crate::hal::Hal;
use crate::iommu::device::VirtioIommu;
use crate::iommu::port::Port;
use crate::iommu::replies::first_error;
use crate::iommu::types::{ResvKind, ResvRegion};
use crate::sync::Locks;
use crate::transport::Transport;
use crate::{Error, Result};

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> VirtioIommu<T, H, L> {
    /// Adds a platform-provided region (e.g. a firmware [`ResvKind::Direct`]
    /// region) to an endpoint's reserved regions.
    pub fn add_reserved_region(&self, endpoint: u32, region: ResvRegion) {
        let ep = self.shared.endpoint(endpoint);
        let mut st = ep.lock();
        st.extra.push(region);
        if let Some(r) = st.resv.as_mut() {
            r.push(region);
        }
    }

    /// PROBEs an endpoint (when PROBE is negotiated and probe_size > 0) and
    /// returns its reserved regions, plus the software MSI window when the
    /// device gave no MSI region, plus platform regions.
    pub fn probe_endpoint(&self, endpoint: u32) -> Result<Vec<ResvRegion>> {
        let s = &self.shared;
        let mut regions = Vec::new();
        let mut table_format = false;
        if s.info.has(f::PROBE) && s.info.probe_size > 0 {
            let req = Request::Probe(ProbeBody { endpoint: U32::new(endpoint), reserved: [0; 64] });
            let seq = s.submit(&req, s.info.probe_size as usize)?;
            let mut reply = s.wait_or_abandon(&[seq])?;
            first_error(&s.counters, &reply, 0)?;
            let props = reply.take_props(0);
            for prop in PropertyIter::new(&props) {
                match prop.map_err(Error::Probe)? {
                    Property::ResvMem(r) => regions.push(resv_region(&r)?),
                    // "The device lists the page-table formats it supports" (draft).
                    Property::PageTableFormat(t) => {
                        table_format |= t.format.get() == viommu_proto::pgtable::FORMAT_VIRT
                    }
                    // Unknown property types carry nothing we must honour.
                    Property::Unknown { .. } => {}
                }
            }
        }
        if let Some((start, end)) = s.opts.sw_msi {
            if !regions.iter().any(|r| r.kind == ResvKind::Msi) {
                regions.push(ResvRegion { start, end, kind: ResvKind::SwMsi });
            }
        }
        let ep = s.endpoint(endpoint);
        let mut st = ep.lock();
        regions.extend_from_slice(&st.extra);
        st.resv = Some(regions.clone());
        st.table_format = table_format;
        Ok(regions)
    }

    /// The endpoint's reserved regions, probing it the first time.
    pub fn reserved_regions(&self, endpoint: u32) -> Result<Vec<ResvRegion>> {
        let cached = self.shared.endpoint(endpoint).lock().resv.clone();
        match cached {
            Some(r) => Ok(r),
            None => self.probe_endpoint(endpoint),
        }
    }
}

fn resv_region(r: &ResvMem) -> Result<ResvRegion> {
    let (start, end) = (r.start.get(), r.end.get());
    if start > end {
        return Err(Error::BadConfig("reserved region ends before it starts"));
    }
    let kind = match r.subtype {
        viommu_proto::probe::RESV_MEM_T_MSI => ResvKind::Msi,
        // RESERVED, and unknown subtypes to be safe.
        _ => ResvKind::Reserved,
    };
    Ok(ResvRegion { start, end, kind })
}

/// Sorts inclusive ranges and merges those that overlap or touch.
pub(crate) fn merge_regions(it: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<_> = it.collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}
