//! Property test against a small reference model: random request sequences, where every
//! status and the final state (attachments, mappings, translations) must equal the model's.
//! The model is written independently: flat vectors and linear scans.

mod common;
use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use viommu_device::{Access, DeviceConfig, EndpointConfig, Iommu, Limits, ResvRegion};
use viommu_proto::*;
use zerocopy::little_endian::U32;

const PAGE: u64 = 0x1000;

fn config() -> DeviceConfig {
    DeviceConfig {
        input_range: (0, 40 * PAGE - 1),
        domain_range: (0, 5),
        limits: Limits {
            max_domains: 3,
            max_mappings_per_domain: 5,
            max_mappings_total: 7,
            max_endpoints: 2,
            max_pending_faults: 8,
        },
        endpoints: vec![
            EndpointConfig::new(0),
            EndpointConfig::new(1),
            EndpointConfig::new(2),
            EndpointConfig::new(3).with_resv(ResvRegion::reserved(20 * PAGE, 22 * PAGE - 1)),
            EndpointConfig::new(4).with_resv(ResvRegion::msi(24 * PAGE, 25 * PAGE - 1)),
        ],
        ..Default::default()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Attach { d: u32, e: u32, flags: u32, reserved: bool },
    Detach { d: u32, e: u32 },
    Map { d: u32, s: u64, e: u64, p: u64, flags: u32 },
    Unmap { d: u32, s: u64, e: u64 },
    Probe { e: u32 },
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => (0u64..42).prop_map(|p| p * PAGE),
        1 => 0u64..42 * PAGE,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let dom = 0u32..7;
    let ep = 0u32..7;
    prop_oneof![
        3 => (dom.clone(), ep.clone(), prop_oneof![6 => Just(0u32), 2 => Just(1), 1 => Just(2)], prop::bool::weighted(0.05))
            .prop_map(|(d, e, flags, reserved)| Op::Attach { d, e, flags, reserved }),
        1 => (dom.clone(), ep.clone()).prop_map(|(d, e)| Op::Detach { d, e }),
        6 => (dom.clone(), addr(), 1u64..5, addr(), prop_oneof![8 => 1u32..4, 1 => 0u32..16])
            .prop_map(|(d, s, n, p, flags)| {
                let e = if s % PAGE == 0 { s + n * PAGE - 1 } else { s + n * PAGE };
                Op::Map { d, s, e, p, flags }
            }),
        3 => (dom, addr(), 0u64..12, prop::bool::weighted(0.1))
            .prop_map(|(d, s, n, all)| if all { Op::Unmap { d, s: 0, e: u64::MAX } } else { Op::Unmap { d, s, e: s + n * PAGE + PAGE - 1 } }),
        1 => ep.prop_map(|e| Op::Probe { e }),
    ]
}

impl Op {
    fn request(&self) -> Request {
        match *self {
            Op::Attach { d, e, flags, reserved } => {
                let Request::Attach(mut b) = attach_flags(d, e, flags) else { unreachable!() };
                if reserved {
                    b.reserved[3] = 1;
                }
                Request::Attach(b)
            }
            Op::Detach { d, e } => detach(d, e),
            Op::Map { d, s, e, p, flags } => map(d, s, e, p, flags),
            Op::Unmap { d, s, e } => unmap(d, s, e),
            Op::Probe { e } => {
                Request::Probe(ProbeBody { endpoint: U32::new(e), reserved: [0; 64] })
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct ModelDomain {
    bypass: bool,
    eps: Vec<u32>,
    maps: Vec<(u64, u64, u64, u32)>,
}

/// The reference model.
#[derive(Debug)]
struct Model {
    cfg: DeviceConfig,
    attached: BTreeMap<u32, u32>,
    domains: BTreeMap<u32, ModelDomain>,
}

impl Model {
    fn resv(&self, e: u32) -> Vec<ResvRegion> {
        self.cfg.endpoints.iter().find(|x| x.id == e).map(|x| x.resv.clone()).unwrap_or_default()
    }

    fn known(&self, e: u32) -> bool {
        self.cfg.endpoints.iter().any(|x| x.id == e)
    }

    fn total(&self) -> usize {
        self.domains.values().map(|d| d.maps.len()).sum()
    }

    fn remove_ep(&mut self, e: u32) {
        if let Some(d) = self.attached.remove(&e) {
            let dom = self.domains.get_mut(&d).unwrap();
            dom.eps.retain(|&x| x != e);
            if dom.eps.is_empty() {
                self.domains.remove(&d);
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Status {
        let l = self.cfg.limits;
        match *op {
            Op::Attach { d, e, flags, reserved } => {
                if reserved || flags > 1 {
                    return Status::Inval;
                }
                if !self.known(e) {
                    return Status::NoEnt;
                }
                if d > 5 {
                    return Status::Range;
                }
                let cur = self.attached.get(&e).copied();
                if let Some(dom) = self.domains.get(&d) {
                    if dom.bypass != (flags == 1) {
                        return Status::Inval;
                    }
                    if cur == Some(d) {
                        return Status::Ok;
                    }
                    if dom.eps.len() >= l.max_endpoints {
                        return Status::Unsupp;
                    }
                    let resv = self.resv(e);
                    if dom.maps.iter().any(|m| resv.iter().any(|r| m.0 <= r.end && r.start <= m.1))
                    {
                        return Status::Unsupp;
                    }
                } else {
                    let frees = cur.is_some_and(|c| self.domains[&c].eps.len() == 1);
                    if self.domains.len() - usize::from(frees) >= l.max_domains {
                        return Status::NoMem;
                    }
                }
                self.remove_ep(e);
                let dom = self
                    .domains
                    .entry(d)
                    .or_insert_with(|| ModelDomain { bypass: flags == 1, ..Default::default() });
                dom.eps.push(e);
                self.attached.insert(e, d);
                Status::Ok
            }
            Op::Detach { d, e } => {
                if !self.known(e) {
                    return Status::NoEnt;
                }
                if self.attached.get(&e) != Some(&d) {
                    return Status::Inval;
                }
                self.remove_ep(e);
                Status::Ok
            }
            Op::Map { d, s, e, p, flags } => {
                if flags > 7 {
                    return Status::Inval;
                }
                let total = self.total();
                let resv: Vec<ResvRegion> = match self.domains.get(&d) {
                    None => return Status::NoEnt,
                    Some(dom) => dom.eps.iter().flat_map(|&x| self.resv(x)).collect(),
                };
                let dom = self.domains.get_mut(&d).unwrap();
                if dom.bypass {
                    return Status::Inval;
                }
                if s % PAGE != 0 || p % PAGE != 0 || (e + 1) % PAGE != 0 || e < s || e >= 40 * PAGE
                {
                    return Status::Range;
                }
                if resv.iter().any(|r| s <= r.end && r.start <= e) {
                    return Status::Inval;
                }
                if dom.maps.iter().any(|m| s <= m.1 && m.0 <= e) {
                    return Status::Inval;
                }
                if dom.maps.len() >= l.max_mappings_per_domain || total >= l.max_mappings_total {
                    return Status::NoMem;
                }
                dom.maps.push((s, e, p, flags));
                Status::Ok
            }
            Op::Unmap { d, s, e } => {
                let Some(dom) = self.domains.get_mut(&d) else { return Status::NoEnt };
                if dom.bypass {
                    return Status::Inval;
                }
                let splits = dom.maps.iter().any(|m| m.0 <= e && s <= m.1 && (m.0 < s || m.1 > e));
                if splits {
                    return Status::Range;
                }
                dom.maps.retain(|m| !(s <= m.0 && m.1 <= e));
                Status::Ok
            }
            Op::Probe { e } => {
                if self.known(e) {
                    Status::Ok
                } else {
                    Status::NoEnt
                }
            }
        }
    }

    /// Expected result of translating one byte at `iova` for reading.
    fn translate(&self, e: u32, iova: u64) -> Option<u64> {
        let resv = self.resv(e);
        if let Some(r) = resv.iter().find(|r| r.start <= iova && iova <= r.end) {
            return (r.kind == viommu_device::ResvKind::Msi).then_some(iova);
        }
        let d = self.attached.get(&e)?;
        let dom = &self.domains[d];
        if dom.bypass {
            return Some(iova);
        }
        let m = dom.maps.iter().find(|m| m.0 <= iova && iova <= m.1)?;
        (m.3 & MAP_F_READ != 0).then_some(m.2 + (iova - m.0))
    }
}

fn check_state(iommu: &Iommu, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(iommu.domain_count(), model.domains.len());
    for (&d, dom) in &model.domains {
        let mut want = dom.maps.clone();
        want.sort();
        let got: Vec<_> =
            iommu.mappings(d).unwrap().iter().map(|m| (m.start, m.end, m.phys, m.flags)).collect();
        prop_assert_eq!(got, want, "domain {}", d);
    }
    for e in 0..5 {
        prop_assert_eq!(iommu.endpoint_domain(e), model.attached.get(&e).copied());
        for page in 0..42 {
            let iova = page * PAGE + 8;
            let got = iommu.translate(e, iova, 1, Access::Read).ok().map(|t| t.segments()[0].addr);
            prop_assert_eq!(got, model.translate(e, iova), "ep {} iova {:#x}", e, iova);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn device_matches_reference_model(ops in prop::collection::vec(op(), 1..120)) {
        let cfg = config();
        let iommu = Iommu::new(cfg.clone()).unwrap();
        let mut model = Model { cfg, attached: BTreeMap::new(), domains: BTreeMap::new() };
        let mut props = vec![0u8; 512];
        for (n, op) in ops.iter().enumerate() {
            let got = iommu.execute(&op.request(), &mut props);
            let want = model.apply(op);
            prop_assert_eq!(got, want, "op {} {:?}", n, op);
            // Translate between requests too, so a stale cached translation would show.
            for e in [1u32, 3] {
                for page in [(n as u64 * 7) % 40, 2, 3] {
                    let iova = page * PAGE + 8;
                    let got = iommu.translate(e, iova, 1, Access::Read).ok().map(|t| t.segments()[0].addr);
                    prop_assert_eq!(got, model.translate(e, iova), "after op {} ep {} iova {:#x}", n, e, iova);
                }
            }
        }
        check_state(&iommu, &model)?;
    }
}

// ---- bulk ranges ----------------------------------------------------------------------

/// Pages of the bulk model's address space.
const BULK_PAGES: u64 = 2048;

#[derive(Clone, Debug)]
enum BulkOp {
    /// MAP `pages` pages at page `at` (more than 4 pages is a large mapping).
    Map { at: u64, pages: u64 },
    /// UNMAP pages `[at, at + pages)`, `jitter` bytes in from both ends.
    Unmap { at: u64, pages: u64, jitter: u64 },
}

fn bulk_op() -> impl Strategy<Value = BulkOp> {
    prop_oneof![
        12 => (0..BULK_PAGES, prop_oneof![6 => 1u64..3, 2 => 3u64..5, 1 => 5u64..9])
            .prop_map(|(at, pages)| BulkOp::Map { at, pages }),
        // Narrow (a few mappings among many), wide (most of them), and everything.
        1 => (0..BULK_PAGES, 1u64..16, prop_oneof![9 => Just(0u64), 1 => 1u64..PAGE])
            .prop_map(|(at, pages, jitter)| BulkOp::Unmap { at, pages, jitter }),
        1 => (0..BULK_PAGES / 4, BULK_PAGES / 2..BULK_PAGES + 1)
            .prop_map(|(at, pages)| BulkOp::Unmap { at, pages, jitter: 0 }),
        1 => Just(BulkOp::Unmap { at: 0, pages: u64::MAX / PAGE, jitter: 0 }),
    ]
}

/// Records what each UNMAP told the listener.
#[derive(Default)]
struct Removed(std::sync::Mutex<Vec<(u64, u64, u64)>>);

impl viommu_device::Listener for Removed {
    fn on_unmap(&self, _: u32, _: u64, _: u64, removed: &[viommu_device::Mapping]) {
        self.0.lock().unwrap().extend(removed.iter().map(|m| (m.start, m.end, m.phys)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Range UNMAPs over hundreds of small and large mappings (both of the page index's
    /// removal strategies) against a flat list: statuses, what the listener is told (in
    /// address order), translations, and the final mappings.
    #[test]
    fn bulk_unmap_matches_flat_list(ops in prop::collection::vec(bulk_op(), 1..400)) {
        let cfg = DeviceConfig { endpoints: vec![EndpointConfig::new(1)], ..Default::default() };
        let iommu = Iommu::new(cfg).unwrap();
        let told = std::sync::Arc::new(Removed::default());
        iommu.add_listener(told.clone());
        prop_assert_eq!(iommu.execute(&attach(1, 1), &mut []), Status::Ok);
        let mut flat: Vec<(u64, u64, u64)> = Vec::new();
        for (n, op) in ops.iter().enumerate() {
            match *op {
                BulkOp::Map { at, pages } => {
                    let (s, e) = (at * PAGE, (at + pages) * PAGE - 1);
                    let want = if flat.iter().any(|m| s <= m.1 && m.0 <= e) { Status::Inval } else { Status::Ok };
                    let phys = (n as u64) << 24;
                    prop_assert_eq!(iommu.execute(&map(1, s, e, phys, RW), &mut []), want);
                    if want == Status::Ok {
                        flat.push((s, e, phys));
                    }
                }
                BulkOp::Unmap { at, pages, jitter } => {
                    let s = at * PAGE + jitter;
                    let e = at.saturating_add(pages).saturating_mul(PAGE).saturating_sub(1 + jitter);
                    // An empty range is refused like a split one (RANGE), removing nothing.
                    let split = e < s || flat.iter().any(|m| m.0 <= e && s <= m.1 && (m.0 < s || m.1 > e));
                    let got = iommu.execute(&unmap(1, s, e), &mut []);
                    let heard = std::mem::take(&mut *told.0.lock().unwrap());
                    if split {
                        prop_assert_eq!(got, Status::Range);
                        prop_assert!(heard.is_empty());
                        continue;
                    }
                    prop_assert_eq!(got, Status::Ok);
                    let mut want: Vec<_> = flat.iter().copied().filter(|m| s <= m.0 && m.1 <= e).collect();
                    want.sort();
                    prop_assert_eq!(heard, want, "op {} {:?}", n, op);
                    flat.retain(|m| !(s <= m.0 && m.1 <= e));
                }
            }
            for k in 0..8u64 {
                let iova = ((n as u64 * 131 + k * 257) % BULK_PAGES) * PAGE + 8;
                let got = iommu.translate(1, iova, 1, Access::Read).ok().map(|t| t.segments()[0].addr);
                let want = flat.iter().find(|m| m.0 <= iova && iova <= m.1).map(|m| m.2 + (iova - m.0));
                prop_assert_eq!(got, want, "after op {} iova {:#x}", n, iova);
            }
        }
        flat.sort();
        let got: Vec<_> = iommu.mappings(1).unwrap().iter().map(|m| (m.start, m.end, m.phys)).collect();
        prop_assert_eq!(got, flat);
    }
}
