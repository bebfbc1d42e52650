//! The IOMMU state (domains, endpoints, mappings), request semantics and translation.
//!
//! Concurrency: requests are serialised by one `control` mutex, which translate never
//! takes. Translate looks the endpoint up in a fixed table (no lock), then read-locks the
//! endpoint's attachment and the domain's mappings: readers never block each other, and a
//! writer (ATTACH, DETACH, MAP, UNMAP) only blocks the translations of that one endpoint or
//! domain for the length of a tree update.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use viommu_proto::features::{self, bit};
use viommu_proto::{
    probe, write_resv_mem, AttachBody, DetachBody, MapBody, ParseError, ProbeBody, Request,
    RequestType, ResvMem, Status, UnmapBody, ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO,
};
use zerocopy::little_endian::U64;

use crate::config::{DeviceConfig, ResvKind, ResvRegion};
use crate::counters::{CounterSnapshot, Counters};
use crate::domain::{Domain, Mapping};
use crate::endpoint::{Endpoint, EndpointTable};
use crate::error::ConfigError;
use crate::fault::{FaultQueue, Offer, PendingFault};
use crate::listener::Listener;
use crate::sync::{lock, read, write};
use crate::translate::{Access, Fault, FaultKind, Segment, Translation};

/// A function the IOMMU calls when a fault event becomes pending, so the VMM can run
/// [`crate::VirtioIommu::process_event_queue`].
pub type FaultNotifier = Arc<dyn Fn() + Send + Sync>;

/// Bookkeeping that only the request path needs.
#[derive(Debug)]
pub(crate) struct DomainEntry {
    pub(crate) domain: Arc<Domain>,
    /// Attached endpoint IDs.
    pub(crate) endpoints: Vec<u32>,
    /// Union of the attached endpoints' reserved regions: MAP may not touch them.
    resv: Vec<ResvRegion>,
}

#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) domains: BTreeMap<u32, DomainEntry>,
    total_mappings: usize,
}

/// The virtio-iommu state, shared with the VMM's other device models through `Arc`.
///
/// ```
/// use viommu_device::{Access, DeviceConfig, EndpointConfig, Iommu};
/// use viommu_proto::{AttachBody, MapBody, Request, Status};
/// use zerocopy::little_endian::{U32, U64};
///
/// let cfg = DeviceConfig { endpoints: vec![EndpointConfig::new(8)], ..Default::default() };
/// let iommu = Iommu::new(cfg).unwrap();
/// let attach = AttachBody { domain: U32::new(1), endpoint: U32::new(8), ..Default::default() };
/// assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
/// let map = MapBody {
///     domain: U32::new(1),
///     virt_start: U64::new(0x1000),
///     virt_end: U64::new(0x1fff),
///     phys_start: U64::new(0xa000),
///     flags: U32::new(viommu_proto::MAP_F_READ),
/// };
/// assert_eq!(iommu.execute(&Request::Map(map), &mut []), Status::Ok);
/// let t = iommu.translate(8, 0x1010, 16, Access::Read).unwrap();
/// assert_eq!(t.contiguous().unwrap().addr, 0xa010);
/// assert!(iommu.translate(8, 0x1010, 16, Access::Write).is_err());
/// ```
pub struct Iommu {
    cfg: DeviceConfig,
    granule: u64,
    offered: u64,
    negotiated: AtomicU64,
    bypass: AtomicBool,
    endpoints: EndpointTable,
    control: Mutex<Control>,
    faults: Mutex<FaultQueue>,
    counters: Counters,
    listener: RwLock<Option<Arc<dyn Listener>>>,
    /// Lets requests skip the listener lock when none is registered (the common case).
    has_listener: AtomicBool,
    notifier: RwLock<Option<FaultNotifier>>,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field("negotiated", &self.negotiated.load(Relaxed))
            .field("bypass", &self.bypass.load(Relaxed))
            .field("domains", &lock(&self.control).domains.len())
            .finish_non_exhaustive()
    }
}

impl Iommu {
    /// Builds the state. Standalone (without [`crate::VirtioIommu`]) every offered feature
    /// counts as negotiated, which is what [`Self::handle_request`] replays want.
    pub fn new(cfg: DeviceConfig) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let offered = cfg.features.bits();
        Ok(Self {
            granule: cfg.granule(),
            offered,
            negotiated: AtomicU64::new(offered),
            bypass: AtomicBool::new(cfg.bypass),
            endpoints: EndpointTable::new(&cfg.endpoints),
            control: Mutex::new(Control::default()),
            faults: Mutex::new(FaultQueue::new(cfg.limits.max_pending_faults)),
            counters: Counters::default(),
            listener: RwLock::new(None),
            has_listener: AtomicBool::new(false),
            notifier: RwLock::new(None),
            cfg,
        })
    }

    /// The configuration this state was built from.
    pub fn config(&self) -> &DeviceConfig {
        &self.cfg
    }

    /// Offered feature bits.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Feature bits in force (negotiated by the driver, or all offered when standalone).
    pub fn negotiated_features(&self) -> u64 {
        self.negotiated.load(Relaxed)
    }

    pub(crate) fn set_negotiated(&self, features: u64) {
        self.negotiated.store(features & self.offered, Relaxed);
    }

    fn negotiated(&self, feature: u32) -> bool {
        self.negotiated.load(Relaxed) & bit(feature) != 0
    }

    fn offered(&self, feature: u32) -> bool {
        self.offered & bit(feature) != 0
    }

    /// The config `bypass` field.
    pub fn bypass(&self) -> bool {
        self.bypass.load(Relaxed)
    }

    /// Sets the config `bypass` field (the device wrapper enforces who may).
    pub fn set_bypass(&self, on: bool) {
        self.bypass.store(on, Relaxed);
    }

    /// True if unattached endpoints are in bypass mode (§5.13.6 "An endpoint is in bypass
    /// mode if..."): BYPASS_CONFIG offered and `bypass` is 1, or legacy BYPASS negotiated.
    pub fn global_bypass(&self) -> bool {
        (self.offered(features::BYPASS_CONFIG) && self.bypass())
            || self.negotiated(features::BYPASS)
    }

    /// Registers the back-end listener (replacing any previous one).
    pub fn set_listener(&self, l: Option<Arc<dyn Listener>>) {
        let mut slot = write(&self.listener);
        self.has_listener.store(l.is_some(), Relaxed);
        *slot = l;
    }

    /// Registers the function called when a fault event becomes pending.
    pub fn set_fault_notifier(&self, n: Option<FaultNotifier>) {
        *write(&self.notifier) = n;
    }

    /// A copy of the counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.get()
    }

    pub(crate) fn counters_ref(&self) -> &Counters {
        &self.counters
    }

    /// Number of domains that exist.
    pub fn domain_count(&self) -> usize {
        lock(&self.control).domains.len()
    }

    /// Mappings of one domain, in address order (a copy; O(n)).
    pub fn mappings(&self, domain: u32) -> Option<Vec<Mapping>> {
        let ctl = lock(&self.control);
        let entry = ctl.domains.get(&domain)?;
        let v = read(&entry.domain.mappings).iter().collect();
        Some(v)
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        read(&self.endpoints.get(endpoint)?.attached).as_ref().map(|d| d.id)
    }

    fn listener(&self) -> Option<Arc<dyn Listener>> {
        if !self.has_listener.load(Relaxed) {
            return None;
        }
        read(&self.listener).clone()
    }

    // ---- requests -------------------------------------------------------------------

    /// Processes one request given as raw bytes, without virtqueues (used by replay tools).
    ///
    /// `readable` is the device-readable part (head and body; extra bytes are ignored).
    /// `writable` is the device-writable part: for PROBE `probe_size` bytes of properties
    /// then the tail, otherwise just the tail. Returns the used length, as the device would
    /// report it: 0 when the request could not be parsed (readable part too short, writable
    /// part shorter than a tail, or PROBE without the PROBE feature), in which case nothing
    /// was written or executed. An unknown request type is answered UNSUPP.
    ///
    /// ```
    /// use viommu_device::{DeviceConfig, EndpointConfig, Iommu};
    /// let iommu = Iommu::new(DeviceConfig { endpoints: vec![EndpointConfig::new(3)], ..Default::default() }).unwrap();
    /// let mut req = [0u8; 20];
    /// req[0] = 1; // ATTACH
    /// req[4] = 7; // domain 7
    /// req[8] = 3; // endpoint 3
    /// let mut tail = [0xffu8; 4];
    /// assert_eq!(iommu.handle_request(&req, &mut tail), 4);
    /// assert_eq!(tail, [0, 0, 0, 0]); // OK
    /// ```
    pub fn handle_request(&self, readable: &[u8], writable: &mut [u8]) -> u32 {
        let req = match Request::parse(readable) {
            Ok(req) => req,
            Err(ParseError::UnknownRequestType(_)) => {
                return match writable.get_mut(..4) {
                    Some(tail) => {
                        self.counters.request(None);
                        self.counters.status(Status::Unsupp);
                        tail.copy_from_slice(&[Status::Unsupp as u8, 0, 0, 0]);
                        4
                    }
                    None => self.malformed(),
                };
            }
            Err(_) => return self.malformed(),
        };
        let props_len = match req {
            // §5.13.6.8: without the PROBE feature the buffer is returned unwritten.
            Request::Probe(_) if !self.offered(features::PROBE) => return self.malformed(),
            Request::Probe(_) => self.cfg.probe_size as usize,
            _ => 0,
        };
        if writable.len() < 4 {
            return self.malformed();
        }
        if writable.len() < props_len + 4 {
            // §5.13.6.8: a properties buffer smaller than probe_size gets INVAL and no
            // property; the tail is the last four writable bytes.
            self.counters.request(Some(RequestType::Probe));
            self.counters.status(Status::Inval);
            writable.fill(0);
            let n = writable.len();
            writable[n - 4] = Status::Inval as u8;
            return n as u32;
        }
        let (props, rest) = writable.split_at_mut(props_len);
        let status = self.execute(&req, props);
        rest[..4].copy_from_slice(&[status as u8, 0, 0, 0]);
        (props_len + 4) as u32
    }

    fn malformed(&self) -> u32 {
        self.counters.malformed();
        0
    }

    /// Executes one parsed request and returns its status. For PROBE, `props` receives the
    /// properties (it must be `probe_size` bytes, or the answer is INVAL).
    pub fn execute(&self, req: &Request, props: &mut [u8]) -> Status {
        self.counters.request(Some(req.request_type()));
        let status = match req {
            Request::Attach(b) => self.attach(b),
            Request::Detach(b) => self.detach(b),
            Request::Map(b) => self.map(b),
            Request::Unmap(b) => self.unmap(b),
            Request::Probe(b) => self.probe(b, props),
        };
        self.counters.status(status);
        status
    }

    /// §5.13.6.3 ATTACH.
    fn attach(&self, b: &AttachBody) -> Status {
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
        let bypass = flags & ATTACH_F_BYPASS != 0;
        let (domain_id, ep_id) = (b.domain.get(), b.endpoint.get());
        // "If the endpoint identified by endpoint doesn't exist, the device MUST reject the
        // request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(ep) = self.endpoints.get(ep_id) else { return Status::NoEnt };
        if !self.domain_in_range(domain_id) {
            return Status::Range;
        }
        let mut ctl = lock(&self.control);
        let current = read(&ep.attached).as_ref().map(|d| d.id);
        let leaving_destroys = current.is_some_and(|c| {
            c != domain_id && ctl.domains.get(&c).is_some_and(|e| e.endpoints.len() == 1)
        });
        match ctl.domains.get(&domain_id) {
            Some(entry) => {
                // "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is
                // not consistent with that domain, the device SHOULD reject the request and
                // set status to VIRTIO_IOMMU_S_INVAL."
                if entry.domain.bypass != bypass {
                    return Status::Inval;
                }
                if current == Some(domain_id) {
                    return Status::Ok;
                }
                if entry.endpoints.len() >= self.cfg.limits.max_endpoints {
                    return Status::NoMem;
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
        let listener = self.listener();
        // "If the endpoint ... is already attached to another domain, then the device SHOULD
        // first detach it from that domain and attach it to the one identified by domain."
        self.detach_locked(&mut ctl, ep, listener.as_deref());
        let entry = ctl.domains.entry(domain_id).or_insert_with(|| DomainEntry {
            domain: Arc::new(Domain::new(domain_id, bypass, self.granule)),
            endpoints: Vec::new(),
            resv: Vec::new(),
        });
        entry.endpoints.push(ep_id);
        entry.resv.extend_from_slice(&ep.resv);
        *write(&ep.attached) = Some(entry.domain.clone());
        if let Some(l) = listener {
            l.on_attach(ep_id, domain_id, bypass);
            for m in read(&entry.domain.mappings).iter() {
                l.on_map(ep_id, &m);
            }
        }
        Status::Ok
    }

    /// Detaches `ep` from whatever domain it is in; destroys the domain if it was the last
    /// endpoint ("After all endpoints have been successfully detached from a domain, it
    /// ceases to exist").
    fn detach_locked(&self, ctl: &mut Control, ep: &Endpoint, listener: Option<&dyn Listener>) {
        let Some(dom) = write(&ep.attached).take() else { return };
        if let Some(entry) = ctl.domains.get_mut(&dom.id) {
            entry.endpoints.retain(|&e| e != ep.id);
            if entry.endpoints.is_empty() {
                let n = read(&entry.domain.mappings).len();
                ctl.total_mappings -= n;
                ctl.domains.remove(&dom.id);
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
        if let Some(l) = listener {
            l.on_detach(ep.id, dom.id);
        }
    }

    /// §5.13.6.4 DETACH.
    fn detach(&self, b: &DetachBody) -> Status {
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
        let listener = self.listener();
        self.detach_locked(&mut ctl, ep, listener.as_deref());
        Status::Ok
    }

    /// §5.13.6.5 MAP.
    fn map(&self, b: &MapBody) -> Status {
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
        // status to VIRTIO_IOMMU_S_INVAL."
        if entry.domain.bypass {
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
            let mut tree = write(&entry.domain.mappings);
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
            tree.insert(mapping);
        }
        if let Some(l) = self.listener() {
            for &e in &entry.endpoints {
                l.on_map(e, &mapping);
            }
        }
        ctl.total_mappings += 1;
        Status::Ok
    }

    /// §5.13.6.6 UNMAP.
    fn unmap(&self, b: &UnmapBody) -> Status {
        if !self.negotiated(features::MAP_UNMAP) {
            return Status::Unsupp;
        }
        let (start, end) = (b.virt_start.get(), b.virt_end.get());
        let mut ctl = lock(&self.control);
        // "If domain does not exist, the device SHOULD set the request status to
        // VIRTIO_IOMMU_S_NOENT." Reserved is ignored (the spec allows either).
        let Some(entry) = ctl.domains.get(&b.domain.get()) else { return Status::NoEnt };
        // "If the domain is a bypass domain, the device SHOULD reject the request and set
        // status to VIRTIO_IOMMU_S_INVAL."
        if entry.domain.bypass {
            return Status::Inval;
        }
        if end < start {
            return Status::Range;
        }
        let listener = self.listener();
        let mut removed = Vec::new();
        let result = write(&entry.domain.mappings).unmap(start, end, |m| {
            if listener.is_some() {
                removed.push(m);
            }
        });
        // "If a mapping affected by the range is not covered in its entirety by the range
        // (the UNMAP request would split the mapping), then the device SHOULD set the request
        // status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
        let Ok(count) = result else { return Status::Range };
        // The used entry is written after this returns: listeners have finished.
        if let Some(l) = listener {
            for m in &removed {
                for &e in &entry.endpoints {
                    l.on_unmap(e, m);
                }
            }
        }
        ctl.total_mappings -= count;
        Status::Ok
    }

    /// §5.13.6.8 PROBE.
    fn probe(&self, b: &ProbeBody, props: &mut [u8]) -> Status {
        if !self.offered(features::PROBE) {
            return Status::Unsupp;
        }
        // "If the endpoint identified by endpoint doesn't exist, then the device SHOULD
        // reject the request and set status to VIRTIO_IOMMU_S_NOENT."
        let Some(ep) = self.endpoints.get(b.endpoint.get()) else { return Status::NoEnt };
        // "If the properties list is smaller than probe_size, the device SHOULD NOT write any
        // property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
        if props.len() < self.cfg.probe_size as usize {
            return Status::Inval;
        }
        // "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill
        // the remaining bytes of properties with zeroes": a zero header also ends the list.
        props.fill(0);
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
        Status::Ok
    }

    fn domain_in_range(&self, id: u32) -> bool {
        let (lo, hi) = self.cfg.domain_range;
        !self.offered(features::DOMAIN_RANGE) || (lo <= id && id <= hi)
    }

    fn in_input_range(&self, start: u64, end: u64) -> bool {
        let (lo, hi) = self.cfg.input_range;
        !self.offered(features::INPUT_RANGE) || (lo <= start && end <= hi)
    }

    // ---- translation ----------------------------------------------------------------

    /// Translates `[iova, iova + len)` for a DMA `access` by `endpoint` into guest-physical
    /// segments.
    ///
    /// Rules, in order: an unknown endpoint fails without an event. A range touching a
    /// RESERVED region faults; one inside the MSI region is identity-mapped (the doorbell
    /// bypasses translation), one crossing its edge faults. An unattached endpoint is
    /// identity-mapped in global bypass mode, else faults (reason DOMAIN). An endpoint in a
    /// bypass domain is identity-mapped. Otherwise every byte must be covered by mappings
    /// carrying the access's flags (else reason MAPPING). Each fault except the unknown
    /// endpoint queues a fault event (see [`crate::fault`] for coalescing).
    ///
    /// Safe to call from any number of threads while requests are processed: it takes
    /// two read locks and never the request lock. A zero-length access translates to nothing.
    pub fn translate(
        &self,
        endpoint: u32,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let Some(ep) = self.endpoints.get(endpoint) else {
            return Err(Fault {
                kind: FaultKind::UnknownEndpoint,
                endpoint,
                address: iova,
                access,
            });
        };
        if len == 0 {
            return Ok(Translation::default());
        }
        let fault = |kind, address| Err(self.raise(Fault { kind, endpoint, address, access }));
        let Some(last) = iova.checked_add(len - 1) else {
            return fault(FaultKind::Overflow, iova);
        };
        if let Some(r) = ep.resv_hit(iova, last) {
            let inside = r.start <= iova && last <= r.end;
            if r.kind == ResvKind::Msi && inside {
                return Ok(Translation::identity(iova, len));
            }
            return fault(FaultKind::Reserved, iova.max(r.start));
        }
        let attached = read(&ep.attached);
        let Some(domain) = attached.as_ref() else {
            if self.global_bypass() {
                return Ok(Translation::identity(iova, len));
            }
            return fault(FaultKind::NotAttached, iova);
        };
        if domain.bypass {
            return Ok(Translation::identity(iova, len));
        }
        let need = access.required_map_flags();
        let tree = read(&domain.mappings);
        let mut out = Translation::default();
        let mut cur = iova;
        // Each round consumes one mapping, so the loop is bounded by the mappings in range.
        loop {
            let Some(m) = tree.lookup(cur) else { return fault(FaultKind::Unmapped, cur) };
            if m.flags & need != need {
                return fault(FaultKind::Permission, cur);
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
    fn raise(&self, f: Fault) -> Fault {
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
                if let Some(n) = read(&self.notifier).clone() {
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

    // ---- reset and state transfer ---------------------------------------------------

    /// Device reset (§5.13.5 "When the device is reset, endpoints are not attached to any
    /// domain"): every domain and mapping goes, pending faults too; `bypass` is kept.
    pub(crate) fn reset(&self) {
        let mut ctl = lock(&self.control);
        let listener = self.listener();
        for ep in self.endpoints.iter() {
            self.detach_locked(&mut ctl, ep, listener.as_deref());
        }
        debug_assert!(ctl.domains.is_empty());
        ctl.domains.clear();
        ctl.total_mappings = 0;
        lock(&self.faults).clear();
    }

    pub(crate) fn export(&self) -> (Vec<crate::snapshot::DomainState>, Vec<PendingFault>) {
        let ctl = lock(&self.control);
        let domains = ctl
            .domains
            .values()
            .map(|e| crate::snapshot::DomainState {
                id: e.domain.id,
                bypass: e.domain.bypass,
                endpoints: e.endpoints.clone(),
                mappings: read(&e.domain.mappings).iter().collect(),
            })
            .collect();
        (domains, lock(&self.faults).to_vec())
    }

    /// Replaces the state with `domains` and `faults` (after a reset). Checks the state
    /// against this configuration so a restored device cannot hold what requests could not
    /// have created.
    pub(crate) fn import(
        &self,
        domains: &[crate::snapshot::DomainState],
        faults: &[PendingFault],
    ) -> Result<(), String> {
        self.reset();
        let mut ctl = lock(&self.control);
        let listener = self.listener();
        for d in domains {
            if d.endpoints.is_empty() || ctl.domains.contains_key(&d.id) {
                return Err(format!("domain {}: no endpoint or listed twice", d.id));
            }
            let domain = Arc::new(Domain::new(d.id, d.bypass, self.granule));
            let mut entry = DomainEntry { domain, endpoints: Vec::new(), resv: Vec::new() };
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
            for &e in &d.endpoints {
                let ep = self.endpoints.get(e).ok_or_else(|| format!("unknown endpoint {e}"))?;
                let mut slot = write(&ep.attached);
                if slot.is_some() {
                    return Err(format!("endpoint {e} in two domains"));
                }
                *slot = Some(entry.domain.clone());
                entry.endpoints.push(e);
                entry.resv.extend_from_slice(&ep.resv);
            }
            ctl.total_mappings += d.mappings.len();
            if let Some(l) = &listener {
                for &e in &entry.endpoints {
                    l.on_attach(e, d.id, d.bypass);
                    for m in &d.mappings {
                        l.on_map(e, m);
                    }
                }
            }
            ctl.domains.insert(d.id, entry);
        }
        let mut q = lock(&self.faults);
        for f in faults {
            q.push(*f);
        }
        Ok(())
    }
}
