//! A fake virtio-iommu device for tests and benchmarks (feature `test-utils`).
//!
//! [`FakeMemory`] is fake guest-physical memory with a page allocator
//! ([`FakeHal`]). [`FakeIommu`] is the device: its [`FakeTransport`] plays the
//! device inside `notify()` (or, in deferred mode, inside a wait for used
//! buffers, as if a device thread ran late) by reading the driver's split
//! rings from the fake memory, parsing requests with `viommu-proto` and
//! keeping a mapping table. It counts requests and kicks, and can be told to
//! fail the next requests ([`FakeIommu::inject`]) or to hold one back
//! ([`InjectReply::Hold`]).
//!
//! Waits go through a [`UsedWaiter`] (no transport lock held), unless the
//! transport comes from [`FakeIommu::transport_without_waiter`]. Every used
//! buffer raises an interrupt; with [`FakeIommu::set_blocking_waits`] a wait
//! blocks until an interrupt its thread has not seen, as on real hardware.
//!
//! The real device model lives in `viommu-device`; tests that join both
//! belong to the crates that may depend on both (`crates/vm`).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use viommu_proto::{
    features as f, write_resv_mem, Config, FaultEvent, Request, RequestType, ResvMem, Status,
    ATTACH_F_BYPASS, MAP_F_MASK, MAP_F_MMIO,
};
use zerocopy::IntoBytes;

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::transport::{QueueAddrs, Transport, UsedWaiter};

/// Bus address of the first page of fake memory.
pub const FAKE_MEM_BASE: u64 = 0x1_0000_0000;

struct MemInner {
    ptr: NonNull<u8>,
    pages: usize,
    alloc: Mutex<MemAlloc>,
}

#[derive(Default)]
struct MemAlloc {
    next: usize,
    free: BTreeMap<usize, Vec<usize>>,
    live: usize,
}

// SAFETY: the memory is only reached through bounds-checked copies and the
// driver's ring protocol; the allocator state is behind a Mutex.
unsafe impl Send for MemInner {}
// SAFETY: as above.
unsafe impl Sync for MemInner {}

impl Drop for MemInner {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.pages * PAGE_SIZE, PAGE_SIZE)
            .expect("layout was valid at allocation");
        // SAFETY: allocated in FakeMemory::new with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Fake guest memory: `pages` zeroed pages at [`FAKE_MEM_BASE`].
#[derive(Clone)]
pub struct FakeMemory {
    inner: Arc<MemInner>,
}

impl FakeMemory {
    /// Allocates `pages` pages of fake memory.
    pub fn new(pages: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE)
            .expect("fake memory size overflows");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).expect("out of host memory for fake guest memory");
        Self {
            inner: Arc::new(MemInner {
                ptr,
                pages: pages.max(1),
                alloc: Mutex::new(MemAlloc::default()),
            }),
        }
    }

    /// A HAL allocating from this memory.
    pub fn hal(&self) -> FakeHal {
        FakeHal { mem: self.clone() }
    }

    /// Pages currently allocated through the HAL.
    pub fn live_pages(&self) -> usize {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner()).live
    }

    fn offset(&self, bus: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(bus.checked_sub(FAKE_MEM_BASE)?).ok()?;
        (off.checked_add(len)? <= self.inner.pages * PAGE_SIZE).then_some(off)
    }

    /// Reads guest memory at bus address `bus`; false if out of bounds.
    pub fn read(&self, bus: u64, out: &mut [u8]) -> bool {
        let Some(off) = self.offset(bus, out.len()) else { return false };
        // SAFETY: bounds checked above; plain bytes, any value is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.ptr.as_ptr().add(off),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        true
    }

    /// Writes guest memory at bus address `bus`; false if out of bounds.
    pub fn write(&self, bus: u64, data: &[u8]) -> bool {
        let Some(off) = self.offset(bus, data.len()) else { return false };
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.inner.ptr.as_ptr().add(off),
                data.len(),
            )
        };
        true
    }

    fn read_u16(&self, bus: u64) -> Option<u16> {
        let mut b = [0; 2];
        self.read(bus, &mut b).then(|| u16::from_le_bytes(b))
    }

    fn write_u16(&self, bus: u64, v: u16) {
        self.write(bus, &v.to_le_bytes());
    }
}

/// [`Hal`] over [`FakeMemory`].
#[derive(Clone)]
pub struct FakeHal {
    mem: FakeMemory,
}

// SAFETY: regions come from the fake memory, are zeroed on allocation, stay
// valid while the FakeMemory lives (the HAL holds it) and never overlap.
unsafe impl Hal for FakeHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let inner = &self.mem.inner;
        let mut a = inner.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let first = match a.free.get_mut(&pages).and_then(Vec::pop) {
            Some(p) => p,
            None => {
                if a.next + pages > inner.pages {
                    return None;
                }
                a.next += pages;
                a.next - pages
            }
        };
        a.live += pages;
        // SAFETY: first..first+pages lies inside the allocation (checked above).
        let vaddr = unsafe { inner.ptr.as_ptr().add(first * PAGE_SIZE) };
        // SAFETY: as above; the Hal contract asks for zeroed memory.
        unsafe { vaddr.write_bytes(0, pages * PAGE_SIZE) };
        Some(DmaRegion {
            bus_addr: FAKE_MEM_BASE + (first * PAGE_SIZE) as u64,
            vaddr: NonNull::new(vaddr)?,
            pages,
        })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        let mut a = self.mem.inner.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let first = ((region.bus_addr - FAKE_MEM_BASE) as usize) / PAGE_SIZE;
        a.live -= region.pages;
        a.free.entry(region.pages).or_default().push(first);
    }
}

/// What the fake device offers.
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Offered features.
    pub features: u64,
    /// page_size_mask.
    pub page_size_mask: u64,
    /// input_range, inclusive.
    pub input_range: (u64, u64),
    /// domain_range, inclusive.
    pub domain_range: (u32, u32),
    /// probe_size.
    pub probe_size: u32,
    /// Endpoint IDs that exist.
    pub endpoints: Vec<u32>,
    /// RESV_MEM properties per endpoint.
    pub resv: BTreeMap<u32, Vec<ResvMem>>,
    /// Max queue size of both queues.
    pub queue_max: u16,
    /// Pages of fake memory.
    pub mem_pages: usize,
}

impl Default for FakeConfig {
    fn default() -> Self {
        let features = [
            f::VERSION_1,
            f::MAP_UNMAP,
            f::INPUT_RANGE,
            f::DOMAIN_RANGE,
            f::PROBE,
            f::MMIO,
            f::BYPASS_CONFIG,
            f::RING_EVENT_IDX,
            f::RING_INDIRECT_DESC,
        ]
        .iter()
        .fold(0, |a, &b| a | f::bit(b));
        Self {
            features,
            page_size_mask: !0xfff,
            input_range: (0, (1 << 48) - 1),
            domain_range: (1, 1023),
            probe_size: 512,
            endpoints: (0..16).collect(),
            resv: BTreeMap::new(),
            queue_max: 256,
            mem_pages: 1024,
        }
    }
}

/// How the fake device answers an injected request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectReply {
    /// Writes this status and does nothing else.
    Status(Status),
    /// Returns the chain with used length 0 and writes nothing.
    UsedLenZero,
    /// Executes the request, then answers with this status anyway, as a
    /// device that fails after doing the work might (e.g. IOERR).
    AfterApplying(Status),
    /// Holds the request back: it is neither executed nor returned until
    /// [`FakeIommu::release_held`], as a device stuck on one request while
    /// it goes on serving the others would.
    Hold,
}

/// Makes the next request of a type (or of any type) fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// The request type to fail; `None` matches any.
    pub request: Option<RequestType>,
    /// The answer.
    pub reply: InjectReply,
}

/// Counts kept by the fake device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FakeStats {
    /// Requests by type: ATTACH, DETACH, MAP, UNMAP, PROBE.
    pub requests: [u64; 5],
    /// Notifies of the request queue.
    pub kicks: u64,
    /// Notifies of the event queue.
    pub event_kicks: u64,
    /// Requests that could not be parsed or chains that were malformed.
    pub malformed: u64,
    /// Notifies of the request queue that came while another thread was
    /// blocked waiting for used buffers.
    pub kicks_during_waits: u64,
}

impl FakeStats {
    /// MAP requests.
    pub fn maps(&self) -> u64 {
        self.requests[2]
    }
    /// UNMAP requests.
    pub fn unmaps(&self) -> u64 {
        self.requests[3]
    }
}

#[derive(Clone, Copy, Default)]
struct Queue {
    size: u16,
    addrs: Option<QueueAddrs>,
    last_avail: u16,
    used_idx: u16,
}

#[derive(Default)]
struct Dom {
    bypass: bool,
    endpoints: BTreeSet<u32>,
    /// first IOVA → (last IOVA, phys, flags)
    maps: BTreeMap<u64, (u64, u64, u32)>,
}

/// A chain's device-readable bytes and its writable buffers.
type Chain = (Vec<u8>, Vec<(u64, u32)>);

/// One descriptor as read from guest memory.
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

struct Device {
    cfg: FakeConfig,
    mem: FakeMemory,
    status: u8,
    driver_features: u64,
    bypass: u8,
    queues: [Queue; 2],
    domains: BTreeMap<u32, Dom>,
    ep_domain: BTreeMap<u32, u32>,
    /// Injections with the number of matching requests to let through first.
    inject: VecDeque<(u32, Injection)>,
    stats: FakeStats,
    deferred: bool,
    stalled: bool,
    reorder: Reorder,
    /// Requests held back by [`InjectReply::Hold`]: head and chain.
    held: Vec<(u16, Chain)>,
    irq: Arc<Irq>,
}

/// What a request came to.
enum Outcome {
    /// Status, properties, and whether to return used length 0.
    Reply(Status, Vec<u8>, bool),
    Held,
}

/// The interrupt line of the fake device: a count and a condition variable.
#[derive(Default)]
struct Irq {
    /// Tells devices apart in the per-thread seen counts.
    id: usize,
    count: Mutex<u64>,
    cond: Condvar,
    blocking: AtomicBool,
    /// Threads blocked in a wait right now.
    blocked: AtomicUsize,
}

thread_local! {
    /// Per thread: the interrupt count it last saw, by device.
    static SEEN: RefCell<HashMap<usize, u64>> = RefCell::new(HashMap::new());
}

/// Longest a blocking wait lasts without an interrupt.
/// Only ends a hang: a test that blocks waits must not depend on how soon
/// other threads get to run.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

impl Irq {
    fn raise(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cond.notify_all();
    }

    /// Blocks until an interrupt this thread has not seen (one that came
    /// before the call counts), or until [`WAIT_LIMIT`].
    fn wait(&self) {
        let seen = SEEN.with(|s| s.borrow().get(&self.id).copied().unwrap_or(0));
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        if *count == seen {
            // Counted under the lock, so no interrupt can come between the
            // count and the sleep.
            self.blocked.fetch_add(1, Ordering::SeqCst);
            count = match self.cond.wait_timeout_while(count, WAIT_LIMIT, |c| *c == seen) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            self.blocked.fetch_sub(1, Ordering::SeqCst);
        }
        let now = *count;
        drop(count);
        SEEN.with(|s| s.borrow_mut().insert(self.id, now));
    }
}

/// One wait for used buffers: a deferred device runs now; then the thread
/// blocks for an interrupt (blocking waits) or yields.
fn wait_for_used(dev: &Mutex<Device>, irq: &Irq) {
    {
        let mut d = dev.lock().unwrap_or_else(|e| e.into_inner());
        if d.deferred && !d.stalled {
            d.process_requests();
        }
    }
    if irq.blocking.load(Ordering::SeqCst) {
        irq.wait();
    } else {
        std::thread::yield_now();
    }
}

/// In which order the fake device executes and returns the requests it finds
/// available at one notify (or one wait, when deferred). The spec promises
/// neither order; real devices mostly use ring order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reorder {
    /// Executes and returns them in ring order.
    #[default]
    InOrder,
    /// Executes them in ring order, returns the used entries in reverse.
    ReverseCompletion,
    /// Executes and returns them in reverse ring order.
    ReverseExecution,
}

/// A fake virtio-iommu device.
#[derive(Clone)]
pub struct FakeIommu {
    dev: Arc<Mutex<Device>>,
    mem: FakeMemory,
}

impl FakeIommu {
    /// A device with `cfg`, with its own fake memory.
    pub fn new(cfg: FakeConfig) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let mem = FakeMemory::new(cfg.mem_pages);
        let irq = Arc::new(Irq {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize,
            ..Default::default()
        });
        let dev = Device {
            cfg,
            mem: mem.clone(),
            status: 0,
            driver_features: 0,
            bypass: 1,
            queues: [Queue::default(); 2],
            domains: BTreeMap::new(),
            ep_domain: BTreeMap::new(),
            inject: VecDeque::new(),
            stats: FakeStats::default(),
            deferred: false,
            stalled: false,
            reorder: Reorder::InOrder,
            held: Vec::new(),
            irq,
        };
        Self { dev: Arc::new(Mutex::new(dev)), mem }
    }

    fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A transport to this device. The driver waits through its
    /// [`UsedWaiter`], holding no lock.
    pub fn transport(&self) -> FakeTransport {
        FakeTransport { dev: self.dev.clone(), irq: self.lock().irq.clone(), waiter: true }
    }

    /// A transport without a [`UsedWaiter`]: the driver calls
    /// [`Transport::wait_for_used`] under its transport lock (the path of
    /// transports that offer nothing better).
    pub fn transport_without_waiter(&self) -> FakeTransport {
        FakeTransport { waiter: false, ..self.transport() }
    }

    /// Blocking waits: a wait for used buffers blocks until an interrupt
    /// its thread has not seen yet (at most 60 s), as a guest waiting for an
    /// interrupt would. Off by default: a wait just yields.
    pub fn set_blocking_waits(&self, blocking: bool) {
        self.lock().irq.blocking.store(blocking, Ordering::SeqCst);
    }

    /// Threads blocked in a wait right now (blocking waits).
    pub fn blocked_waiters(&self) -> usize {
        self.lock().irq.blocked.load(Ordering::SeqCst)
    }

    /// Requests held back by [`InjectReply::Hold`] right now.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Executes and returns the held requests, in the order they came.
    pub fn release_held(&self) {
        let mut d = self.lock();
        for (head, (readable, writable)) in std::mem::take(&mut d.held) {
            let used_len = match Request::parse(&readable) {
                Ok(req) => {
                    let (status, props) = d.execute(req, reply_room(&writable));
                    d.write_reply(&writable, status, props)
                }
                Err(_) => 0,
            };
            d.push_used(0, head, used_len);
        }
    }

    /// A HAL over this device's memory.
    pub fn hal(&self) -> FakeHal {
        self.mem.hal()
    }

    /// The fake guest memory.
    pub fn memory(&self) -> &FakeMemory {
        &self.mem
    }

    /// Counts so far.
    pub fn stats(&self) -> FakeStats {
        self.lock().stats
    }

    /// The device's mappings of `domain`: `(first, last, phys, flags)`.
    pub fn mappings(&self, domain: u32) -> Vec<(u64, u64, u64, u32)> {
        self.lock()
            .domains
            .get(&domain)
            .map(|d| d.maps.iter().map(|(&s, &(e, p, fl))| (s, e, p, fl)).collect())
            .unwrap_or_default()
    }

    /// Domains that exist in the device.
    pub fn domains(&self) -> Vec<u32> {
        self.lock().domains.keys().copied().collect()
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.lock().ep_domain.get(&endpoint).copied()
    }

    /// The `bypass` config byte.
    pub fn bypass(&self) -> u8 {
        self.lock().bypass
    }

    /// Fails the next matching request.
    pub fn inject(&self, injection: Injection) {
        self.inject_nth(0, injection);
    }

    /// Injections not yet used up.
    pub fn pending_injections(&self) -> usize {
        self.lock().inject.len()
    }

    /// Lets `skip` matching requests through, then fails the next one.
    pub fn inject_nth(&self, skip: u32, injection: Injection) {
        self.lock().inject.push_back((skip, injection));
    }

    /// Deferred mode: notifies only count; requests are processed when the
    /// driver waits (`wait_for_used`), as a slow device thread would.
    pub fn set_deferred(&self, deferred: bool) {
        self.lock().deferred = deferred;
    }

    /// Stalled mode: the device processes nothing at all. Leaving it, the
    /// device catches up with what it was notified of.
    pub fn set_stalled(&self, stalled: bool) {
        let mut d = self.lock();
        d.stalled = stalled;
        if !stalled && !d.deferred {
            d.process_requests();
        }
    }

    /// Sets the order of execution and completion, see [`Reorder`].
    pub fn set_reorder(&self, reorder: Reorder) {
        self.lock().reorder = reorder;
    }

    /// Sets DEVICE_NEEDS_RESET in the status, as a device with an internal error does.
    pub fn set_needs_reset(&self) {
        self.lock().status |= crate::transport::status::DEVICE_NEEDS_RESET;
    }

    /// Writes a fault event into the next event buffer. False when the
    /// driver posted none (the device drops the event).
    pub fn inject_fault(&self, event: FaultEvent) -> bool {
        self.lock().push_event(event.as_bytes())
    }
}

/// The fake device's transport side.
pub struct FakeTransport {
    dev: Arc<Mutex<Device>>,
    irq: Arc<Irq>,
    waiter: bool,
}

/// The [`UsedWaiter`] of a [`FakeTransport`].
struct FakeWaiter {
    dev: Arc<Mutex<Device>>,
    irq: Arc<Irq>,
}

impl UsedWaiter for FakeWaiter {
    fn wait_for_used(&self, _queue: u16) {
        wait_for_used(&self.dev, &self.irq);
    }
}

impl FakeTransport {
    fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for FakeTransport {
    fn device_features(&mut self) -> u64 {
        self.lock().cfg.features
    }

    fn set_driver_features(&mut self, features: u64) {
        self.lock().driver_features = features;
    }

    fn status(&mut self) -> u8 {
        self.lock().status
    }

    fn set_status(&mut self, status: u8) {
        let mut d = self.lock();
        if status == 0 {
            // Reset; `bypass` survives it (spec).
            d.queues = [Queue::default(); 2];
            d.domains.clear();
            d.ep_domain.clear();
            d.driver_features = 0;
        }
        d.status = status;
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        if queue < 2 {
            self.lock().cfg.queue_max
        } else {
            0
        }
    }

    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        if let Some(q) = self.lock().queues.get_mut(queue as usize) {
            *q = Queue { size, addrs: Some(addrs), last_avail: 0, used_idx: 0 };
        }
    }

    fn notify(&mut self, queue: u16) {
        let mut d = self.lock();
        match queue {
            0 => {
                d.stats.kicks += 1;
                if d.irq.blocked.load(Ordering::SeqCst) > 0 {
                    d.stats.kicks_during_waits += 1;
                }
                if !d.deferred && !d.stalled {
                    d.process_requests();
                }
            }
            _ => d.stats.event_kicks += 1,
        }
    }

    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        let d = self.lock();
        let c = &d.cfg;
        let cfg = Config {
            page_size_mask: c.page_size_mask.into(),
            input_start: c.input_range.0.into(),
            input_end: c.input_range.1.into(),
            domain_start: c.domain_range.0.into(),
            domain_end: c.domain_range.1.into(),
            probe_size: c.probe_size.into(),
            bypass: d.bypass,
            reserved: [0; 3],
        };
        let bytes = cfg.as_bytes();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let mut d = self.lock();
        if offset == Config::BYPASS_OFFSET && data.len() == 1 && data[0] <= 1 {
            d.bypass = data[0];
        }
    }

    fn wait_for_used(&mut self, _queue: u16) {
        wait_for_used(&self.dev, &self.irq);
    }

    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        self.waiter.then(|| {
            Box::new(FakeWaiter { dev: self.dev.clone(), irq: self.irq.clone() })
                as Box<dyn UsedWaiter>
        })
    }
}

/// Bytes of properties a chain's writable buffers leave room for.
fn reply_room(writable: &[(u64, u32)]) -> usize {
    let total: u64 = writable.iter().map(|w| w.1 as u64).sum();
    total.saturating_sub(4) as usize
}

impl Device {
    fn has(&self, bit: u32) -> bool {
        self.driver_features & f::bit(bit) != 0
    }

    /// Walks one chain: device-readable bytes and writable buffers. An
    /// indirect descriptor (with INDIRECT_DESC negotiated) must end the chain;
    /// its table is walked instead, bounded by its length, and may not nest.
    /// Its WRITE flag is ignored, as the spec asks.
    fn read_chain(&self, q: &Queue, head: u16) -> Option<Chain> {
        let addrs = q.addrs?;
        let mut chain = (Vec::new(), Vec::new());
        let mut idx = head;
        for _ in 0..q.size {
            let d = self.read_desc(addrs.desc, q.size, idx)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                let len = d.len as usize;
                let bad = !self.has(f::RING_INDIRECT_DESC)
                    || d.flags & DESC_F_NEXT != 0
                    || len == 0
                    || len % 16 != 0
                    || len / 16 > q.size as usize;
                if bad {
                    return None;
                }
                return self.walk(d.addr, (len / 16) as u16, chain);
            }
            self.take_buf(&d, &mut chain)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Some(chain);
            }
            idx = d.next;
        }
        None
    }

    /// Walks an indirect table of `n` descriptors from entry 0.
    fn walk(&self, table: u64, n: u16, mut chain: Chain) -> Option<Chain> {
        let mut idx = 0;
        for _ in 0..n {
            let d = self.read_desc(table, n, idx)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                return None; // nested indirect
            }
            self.take_buf(&d, &mut chain)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Some(chain);
            }
            idx = d.next;
        }
        None
    }

    fn read_desc(&self, table: u64, n: u16, idx: u16) -> Option<Desc> {
        let mut b = [0u8; 16];
        if idx >= n || !self.mem.read(table + 16 * idx as u64, &mut b) {
            return None;
        }
        Some(Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
            len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        })
    }

    fn take_buf(&self, d: &Desc, (readable, writable): &mut Chain) -> Option<()> {
        if d.flags & DESC_F_WRITE != 0 {
            writable.push((d.addr, d.len));
        } else {
            let mut b = vec![0u8; d.len.min(4096) as usize];
            if !self.mem.read(d.addr, &mut b) {
                return None;
            }
            readable.extend_from_slice(&b);
        }
        Some(())
    }

    fn push_used(&mut self, queue: usize, id: u16, len: u32) {
        let q = &mut self.queues[queue];
        let Some(addrs) = q.addrs else { return };
        let slot = (q.used_idx % q.size) as u64;
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&(id as u32).to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        self.mem.write(addrs.used + 4 + 8 * slot, &e);
        q.used_idx = q.used_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        self.mem.write_u16(addrs.used + 2, q.used_idx);
        self.irq.raise();
    }

    /// Writes the properties and status into a chain's writable buffers and
    /// returns the used length.
    fn write_reply(&self, writable: &[(u64, u32)], status: Status, props: Vec<u8>) -> u32 {
        let room = reply_room(writable);
        let total: u64 = writable.iter().map(|w| w.1 as u64).sum();
        let mut out = props;
        out.resize(room, 0);
        out.extend_from_slice(&[status as u8, 0, 0, 0]);
        let mut at = 0usize;
        for (addr, len) in writable {
            let end = (at + *len as usize).min(out.len());
            self.mem.write(*addr, &out[at..end]);
            at = end;
        }
        total as u32
    }

    fn process_requests(&mut self) {
        // Like a real device: after publishing avail_event, look again, or a
        // request added meanwhile (whose driver saw no need to notify) is lost.
        while self.process_available() {}
    }

    /// Processes every available request; true if more arrived meanwhile.
    fn process_available(&mut self) -> bool {
        let q = self.queues[0];
        let Some(addrs) = q.addrs else { return false };
        let Some(avail) = self.mem.read_u16(addrs.avail + 2) else { return false };
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let mut last = q.last_avail;
        let mut heads = Vec::new();
        while last != avail {
            let Some(head) = self.mem.read_u16(addrs.avail + 4 + 2 * (last % q.size) as u64) else {
                break;
            };
            last = last.wrapping_add(1);
            heads.push(head);
        }
        self.queues[0].last_avail = last;
        if self.reorder == Reorder::ReverseExecution {
            heads.reverse();
        }
        let mut used = Vec::with_capacity(heads.len());
        for head in heads {
            let Some((readable, writable)) = self.read_chain(&q, head) else {
                self.stats.malformed += 1;
                used.push((head, 0));
                continue;
            };
            let used_len = match self.handle(&readable, reply_room(&writable)) {
                Outcome::Held => {
                    self.held.push((head, (readable, writable)));
                    continue;
                }
                Outcome::Reply(_, _, true) => 0,
                Outcome::Reply(status, props, false) => self.write_reply(&writable, status, props),
            };
            used.push((head, used_len));
        }
        if self.reorder == Reorder::ReverseCompletion {
            used.reverse();
        }
        for (head, len) in used {
            self.push_used(0, head, len);
        }
        if !self.has(f::RING_EVENT_IDX) {
            return false;
        }
        self.mem.write_u16(addrs.used + 4 + 8 * q.size as u64, last);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem.read_u16(addrs.avail + 2).is_some_and(|a| a != last)
    }

    /// Executes one request: status, probe properties, and "used length 0".
    fn handle(&mut self, bytes: &[u8], props_len: usize) -> Outcome {
        let req = match Request::parse(bytes) {
            Ok(r) => r,
            Err(_) => {
                self.stats.malformed += 1;
                return Outcome::Reply(Status::Inval, Vec::new(), true);
            }
        };
        let ty = req.request_type();
        self.stats.requests[ty as usize - 1] += 1;
        let mut late = None;
        if let Some(pos) = self.inject.iter().position(|(_, i)| i.request.is_none_or(|t| t == ty)) {
            if self.inject[pos].0 > 0 {
                self.inject[pos].0 -= 1;
            } else {
                match self.inject.remove(pos).map(|(_, i)| i.reply) {
                    Some(InjectReply::Status(s)) => return Outcome::Reply(s, Vec::new(), false),
                    Some(InjectReply::AfterApplying(s)) => late = Some(s),
                    Some(InjectReply::Hold) => return Outcome::Held,
                    _ => return Outcome::Reply(Status::IoErr, Vec::new(), true),
                }
            }
        }
        let (status, props) = self.execute(req, props_len);
        Outcome::Reply(late.unwrap_or(status), props, false)
    }

    /// Executes one parsed request: its status and PROBE properties.
    fn execute(&mut self, req: Request, props_len: usize) -> (Status, Vec<u8>) {
        let mut props = Vec::new();
        let status = match req {
            Request::Attach(a) => {
                self.attach(a.domain.get(), a.endpoint.get(), a.flags.get(), a.reserved)
            }
            Request::Detach(d) => self.detach(d.domain.get(), d.endpoint.get()),
            Request::Map(m) => self.map(
                m.domain.get(),
                m.virt_start.get(),
                m.virt_end.get(),
                m.phys_start.get(),
                m.flags.get(),
            ),
            Request::Unmap(u) => self.unmap(u.domain.get(), u.virt_start.get(), u.virt_end.get()),
            Request::Probe(p) => {
                let ep = p.endpoint.get();
                if !self.cfg.endpoints.contains(&ep) {
                    Status::NoEnt
                } else {
                    props = vec![0u8; props_len];
                    let mut at = 0;
                    for r in self.cfg.resv.get(&ep).into_iter().flatten() {
                        match write_resv_mem(&mut props[at..], r) {
                            Ok(n) => at += n,
                            Err(_) => break,
                        }
                    }
                    Status::Ok
                }
            }
        };
        (status, props)
    }

    fn drop_ep(&mut self, ep: u32) {
        if let Some(old) = self.ep_domain.remove(&ep) {
            if let Some(d) = self.domains.get_mut(&old) {
                d.endpoints.remove(&ep);
                if d.endpoints.is_empty() {
                    self.domains.remove(&old);
                }
            }
        }
    }

    fn attach(&mut self, domain: u32, ep: u32, flags: u32, reserved: [u8; 4]) -> Status {
        if reserved != [0; 4] || flags & !ATTACH_F_BYPASS != 0 {
            return Status::Inval;
        }
        if !self.cfg.endpoints.contains(&ep) {
            return Status::NoEnt;
        }
        let bypass = flags & ATTACH_F_BYPASS != 0;
        if bypass && !self.has(f::BYPASS_CONFIG) {
            return Status::Inval;
        }
        if self.domains.get(&domain).is_some_and(|d| d.bypass != bypass) {
            return Status::Inval;
        }
        if self.ep_domain.get(&ep) != Some(&domain) {
            self.drop_ep(ep);
        }
        let d = self.domains.entry(domain).or_insert_with(|| Dom { bypass, ..Default::default() });
        d.endpoints.insert(ep);
        self.ep_domain.insert(ep, domain);
        Status::Ok
    }

    fn detach(&mut self, domain: u32, ep: u32) -> Status {
        if !self.cfg.endpoints.contains(&ep) {
            return Status::NoEnt;
        }
        if self.ep_domain.get(&ep) != Some(&domain) {
            return Status::Inval;
        }
        self.drop_ep(ep);
        Status::Ok
    }

    fn map(&mut self, domain: u32, start: u64, end: u64, phys: u64, flags: u32) -> Status {
        let g = 1u64 << self.cfg.page_size_mask.trailing_zeros();
        let (lo, hi) = self.cfg.input_range;
        let mmio = self.has(f::MMIO);
        let Some(d) = self.domains.get_mut(&domain) else { return Status::NoEnt };
        if d.bypass || flags & !MAP_F_MASK != 0 || (flags & MAP_F_MMIO != 0 && !mmio) {
            return Status::Inval;
        }
        if start & (g - 1) != 0 || phys & (g - 1) != 0 || end & (g - 1) != g - 1 || end < start {
            return Status::Range;
        }
        if start < lo || end > hi {
            return Status::Range;
        }
        let overlaps = d.maps.range(..=end).next_back().is_some_and(|(_, &(e, _, _))| e >= start);
        if overlaps {
            return Status::Inval;
        }
        d.maps.insert(start, (end, phys, flags));
        Status::Ok
    }

    fn unmap(&mut self, domain: u32, start: u64, end: u64) -> Status {
        let Some(d) = self.domains.get_mut(&domain) else { return Status::NoEnt };
        if end < start {
            return Status::Inval;
        }
        let before = d.maps.range(..start).next_back().filter(|(_, &(e, _, _))| e >= start);
        if before.is_some() {
            return Status::Range;
        }
        let inside: Vec<(u64, u64)> =
            d.maps.range(start..=end).map(|(&s, &(e, _, _))| (s, e)).collect();
        if inside.iter().any(|&(_, e)| e > end) {
            return Status::Range;
        }
        for (s, _) in inside {
            d.maps.remove(&s);
        }
        Status::Ok
    }

    fn push_event(&mut self, event: &[u8]) -> bool {
        let q = self.queues[1];
        let Some(addrs) = q.addrs else { return false };
        let Some(avail) = self.mem.read_u16(addrs.avail + 2) else { return false };
        if q.last_avail == avail {
            return false;
        }
        let Some(head) = self.mem.read_u16(addrs.avail + 4 + 2 * (q.last_avail % q.size) as u64)
        else {
            return false;
        };
        let last = q.last_avail.wrapping_add(1);
        self.queues[1].last_avail = last;
        if self.has(f::RING_EVENT_IDX) {
            // Ask to be notified once the driver posts past what we consumed.
            self.mem.write_u16(addrs.used + 4 + 8 * q.size as u64, last);
        }
        let Some((_, writable)) = self.read_chain(&q, head) else { return false };
        let Some(&(addr, len)) = writable.first() else { return false };
        let n = event.len().min(len as usize);
        self.mem.write(addr, &event[..n]);
        self.push_used(1, head, n as u32);
        true
    }
}
