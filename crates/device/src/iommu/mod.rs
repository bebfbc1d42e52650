//! The IOMMU state (domains, endpoints, mappings): its requests are in `requests`, its
//! translation in `translation`, reset and state transfer in `state`.
//!
//! Concurrency: requests are serialised by one `control` mutex, which translate never
//! takes. Translate looks the endpoint up in a fixed table (no lock), then read-locks the
//! endpoint's attachment and the domain's mappings: readers never block each other, and a
//! writer (ATTACH, DETACH, MAP, UNMAP) only blocks the translations of that one endpoint or
//! domain for the length of a tree update.

mod lookup;
mod pgtable;
mod requests;
mod state;
mod tlb;
mod translation;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, RwLock};

use viommu_proto::features::{self, bit};
use viommu_proto::{ParseError, Request, RequestType, Status};

use crate::config::{DeviceConfig, ResvRegion};
use crate::counters::{CounterSnapshot, Counters};
use crate::domain::{Domain, Mapping};
use crate::endpoint::EndpointTable;
use crate::error::ConfigError;
use crate::fault::FaultQueue;
use crate::lease::Leases;
use crate::listener::{Listener, ListenerId, Listeners};
use crate::pgtable::TableMemory;
use crate::sync::{lock, read, write};

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
    /// Kept here so that registration is ordered with requests and their calls.
    pub(crate) listeners: Listeners,
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
    /// Process-unique instance ID, for the per-thread translation caches.
    id: u64,
    /// Bumped after every change that can take a translation away (see `tlb`).
    epoch: AtomicU64,
    cfg: DeviceConfig,
    granule: u64,
    offered: u64,
    negotiated: AtomicU64,
    bypass: AtomicBool,
    endpoints: EndpointTable,
    control: Mutex<Control>,
    faults: Mutex<FaultQueue>,
    counters: Counters,
    notifier: RwLock<Option<FaultNotifier>>,
    /// Leases on translations; changes that take access away wait for them (see `lease`).
    leases: Leases,
    /// Guest memory for page-table walks (page-table mode; see `pgtable`).
    table_memory: RwLock<Option<Arc<dyn TableMemory>>>,
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
            id: tlb::new_instance_id(),
            epoch: AtomicU64::new(0),
            granule: cfg.granule(),
            offered,
            negotiated: AtomicU64::new(offered),
            bypass: AtomicBool::new(cfg.bypass),
            endpoints: EndpointTable::new(&cfg.endpoints),
            control: Mutex::new(Control::default()),
            faults: Mutex::new(FaultQueue::new(cfg.limits.max_pending_faults)),
            counters: Counters::default(),
            notifier: RwLock::new(None),
            leases: Leases::new(),
            table_memory: RwLock::new(None),
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
        // Legacy BYPASS may come or go.
        self.change_global_bypass(|| self.negotiated.store(features & self.offered, Relaxed));
    }

    /// Empties every thread's translation cache for this instance; call after the change.
    pub(crate) fn invalidate(&self) {
        self.epoch.fetch_add(1, Release);
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
    ///
    /// Turning global bypass off returns only once every lease taken before is dropped.
    pub fn set_bypass(&self, on: bool) {
        self.change_global_bypass(|| self.bypass.store(on, Relaxed));
    }

    /// Applies `change`, then tells listeners if global bypass flipped: after the change,
    /// so that a cache they flush cannot be refilled from the old state. Under the request
    /// lock, so the call is ordered with requests' calls. Turning it off then waits for
    /// older leases, outside the lock.
    fn change_global_bypass(&self, change: impl FnOnce()) {
        let ctl = lock(&self.control);
        let before = self.global_bypass();
        change();
        self.invalidate();
        let after = self.global_bypass();
        if before != after {
            ctl.listeners.iter().for_each(|l| l.on_bypass(after));
        }
        drop(ctl);
        if before && !after {
            self.grace_period();
        }
    }

    /// Takes a lease (see `lease`): for adapters that access memory under a translation of
    /// their own, such as the vm-memory mirror.
    #[cfg(feature = "vm-memory-iommu")]
    #[inline]
    pub(crate) fn lease(&self) -> crate::lease::Lease<'_> {
        self.leases.acquire()
    }

    /// Waits until every lease taken before this call is dropped (see `lease`); call it
    /// after a change that took access away, before the change is reported complete.
    pub(crate) fn grace_period(&self) {
        let waited = self.leases.synchronize(self.cfg.slow_lease);
        self.counters.grace_period(waited.slow);
    }

    /// True if unattached endpoints are in bypass mode (§5.13.6 "An endpoint is in bypass
    /// mode if..."): BYPASS_CONFIG offered and `bypass` is 1, or legacy BYPASS negotiated.
    pub fn global_bypass(&self) -> bool {
        (self.offered(features::BYPASS_CONFIG) && self.bypass())
            || self.negotiated(features::BYPASS)
    }

    /// Registers a back-end listener after those already registered; it hears every
    /// change from the next request on (not the state already built: register before the
    /// guest runs, or read [`Self::mappings`] first). Waits for a request in progress.
    pub fn add_listener(&self, l: Arc<dyn Listener>) -> ListenerId {
        lock(&self.control).listeners.add(l)
    }

    /// Unregisters a listener; once this returns it is called no more. False if `id` was
    /// not registered.
    pub fn remove_listener(&self, id: ListenerId) -> bool {
        lock(&self.control).listeners.remove(id)
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

    // ---- requests -------------------------------------------------------------------

    /// Processes one request given as raw bytes, without virtqueues (used by replay tools).
    ///
    /// `readable` is the device-readable part (head and body; extra bytes are ignored).
    /// `writable` is the device-writable part: for PROBE `probe_size` bytes of properties
    /// then the tail, otherwise just the tail. Returns the used length, as the device would
    /// report it: 0 when the request could not be parsed (readable part too short, writable
    /// part shorter than a tail, an unknown request type, or PROBE without the PROBE feature),
    /// in which case nothing was written or executed.
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
            // §5.13.6.2: "If a request type is not recognized, the device SHOULD NOT write the
            // buffer and SHOULD set the used length to zero." Not knowing the type, the
            // device does not know where its tail is either (see docs/spec-coverage.md #11).
            Err(ParseError::UnknownRequestType(_)) => {
                self.counters.request(None);
                return self.malformed();
            }
            Err(_) => return self.malformed(),
        };
        let props_len = match req {
            // §5.13.6.8: without the PROBE feature the buffer is returned unwritten.
            Request::Probe(_) if !self.offered(features::PROBE) => return self.malformed(),
            Request::Probe(_) => self.cfg.probe_size as usize,
            // Without F_ATTACH_TABLE offered the draft's request types are unknown ones.
            Request::AttachTable(_) | Request::Invalidate(_)
                if !self.offered(features::ATTACH_TABLE) =>
            {
                self.counters.request(None);
                return self.malformed();
            }
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
    ///
    /// A request that took access away (UNMAP that removed a mapping, DETACH, ATTACH that
    /// moved or newly confined an endpoint) returns only once every lease taken before it
    /// is dropped, so its used entry is written after them.
    pub fn execute(&self, req: &Request, props: &mut [u8]) -> Status {
        self.counters.request(Some(req.request_type()));
        let epoch = self.epoch.load(Relaxed);
        let status = match req {
            Request::Attach(b) => self.attach(b),
            Request::Detach(b) => self.detach(b),
            Request::Map(b) => self.map(b),
            Request::Unmap(b) => self.unmap(b),
            Request::Probe(b) => self.probe(b, props),
            Request::AttachTable(b) => self.attach_table(b),
            Request::Invalidate(b) => self.invalidate_table(b),
        };
        // Every change that can take a translation away bumps the epoch.
        if self.epoch.load(Relaxed) != epoch {
            self.grace_period();
        }
        self.counters.status(status);
        status
    }
}
