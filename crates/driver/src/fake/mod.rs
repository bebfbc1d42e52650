//! A fake virtio-iommu transport for tests and benchmarks (feature `test-utils`):
//! the rings and the faults, around a device model that gives requests their meaning.
//!
//! [`FakeMemory`] is fake guest-physical memory with a page allocator
//! ([`FakeHal`]). [`FakeIommu`] plays the device side of the split rings inside
//! `notify()` (or, in deferred mode, inside a wait for used buffers, as if a
//! device thread ran late): it walks the driver's chains in the fake memory
//! and hands each request to a [`DeviceModel`], which decides what the request
//! does and answers. The fake itself only counts requests and kicks, and
//! injects what a device may do wrong: failed or lost replies
//! ([`FakeIommu::inject`]), a request held back ([`InjectReply::Hold`]),
//! stalls, reordered completions, missing features.
//!
//! The model is `viommu-device` in this crate's own tests, benches and
//! examples, through a dev-dependency (`tests/common/device.rs` holds the
//! adapter): every rule of a request lives once, in the device crate, and the
//! driver still never depends on the device.
//!
//! Waits go through a [`UsedWaiter`] (no transport lock held), unless the
//! transport comes from [`FakeIommu::transport_without_waiter`]. Every used
//! buffer raises an interrupt; with [`FakeIommu::set_blocking_waits`] a wait
//! blocks until an interrupt its thread has not seen, as on real hardware.

mod irq;
mod memory;
mod ring;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use viommu_proto::{FaultEvent, RequestType, Status};
use zerocopy::IntoBytes;

use crate::transport::{QueueAddrs, Transport, UsedWaiter};
use irq::Irq;
pub use memory::{FakeHal, FakeMemory, FAKE_MEM_BASE};
pub use ring::REPLY_MAX;
use ring::{Device, Queue};

/// What gives requests their meaning behind the fake's rings: offered
/// features, config space, reset, and the answer to each request.
pub trait DeviceModel: Send {
    /// Feature bits the device offers.
    fn device_features(&self) -> u64;
    /// Takes the feature bits the driver accepted.
    fn ack_features(&mut self, features: u64);
    /// Reads config space at `offset`.
    fn read_config(&self, offset: usize, buf: &mut [u8]);
    /// Writes config space at `offset`; the model decides what it takes.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Device reset (the driver wrote status 0).
    fn reset(&mut self);
    /// Serves one request. `readable` holds the chain's device-readable bytes,
    /// `writable` stands for its device-writable buffers (at most
    /// [`REPLY_MAX`] bytes of them). Returns the used length: the bytes of
    /// `writable`, from its start, that the fake copies to the buffers.
    fn handle_request(&mut self, readable: &[u8], writable: &mut [u8]) -> u32;
}

/// The fake's own settings: rings, memory and withheld features. What the
/// device offers otherwise comes from its [`DeviceModel`].
#[derive(Clone, Debug)]
pub struct FakeConfig {
    /// Max queue size of both queues.
    pub queue_max: u16,
    /// Pages of fake memory.
    pub mem_pages: usize,
    /// Feature bits removed from the model's offer, as a device without them.
    pub withheld_features: u64,
}

impl Default for FakeConfig {
    fn default() -> Self {
        Self { queue_max: 256, mem_pages: 1024, withheld_features: 0 }
    }
}

/// How the fake device answers an injected request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectReply {
    /// Writes this status; the model never sees the request.
    Status(Status),
    /// Returns the chain with used length 0 and writes nothing (a lost reply).
    UsedLenZero,
    /// Has the model serve the request, then answers with this status
    /// anyway, as a device that fails after doing the work might (e.g. IOERR).
    AfterApplying(Status),
    /// Holds the request back: it is neither served nor returned until
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
    /// Requests by type, at `type - 1`: ATTACH, DETACH, MAP, UNMAP, PROBE,
    /// and the drafts' ATTACH_TABLE and INVALIDATE.
    pub requests: [u64; RequestType::COUNT],
    /// Notifies of the request queue.
    pub kicks: u64,
    /// Notifies of the event queue.
    pub event_kicks: u64,
    /// Chains the fake could not walk, and requests the model returned with
    /// used length 0 (it could not parse them).
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
    /// ATTACH_TABLE requests (draft).
    pub fn attach_tables(&self) -> u64 {
        self.requests[RequestType::AttachTable as usize - 1]
    }
    /// INVALIDATE requests (draft).
    pub fn invalidates(&self) -> u64 {
        self.requests[RequestType::Invalidate as usize - 1]
    }
}

/// In which order the fake device serves and returns the requests it finds
/// available at one notify (or one wait, when deferred). The spec promises
/// neither order; real devices mostly use ring order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reorder {
    /// Serves and returns them in ring order.
    #[default]
    InOrder,
    /// Serves them in ring order, returns the used entries in reverse.
    ReverseCompletion,
    /// Serves and returns them in reverse ring order.
    ReverseExecution,
}

/// A fake virtio-iommu device: rings and fault injection around a [`DeviceModel`].
#[derive(Clone)]
pub struct FakeIommu {
    dev: Arc<Mutex<Device>>,
    mem: FakeMemory,
}

impl FakeIommu {
    /// A device whose requests `model` serves, with its own fake memory.
    pub fn new(cfg: FakeConfig, model: impl DeviceModel + 'static) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        let mem = FakeMemory::new(cfg.mem_pages);
        let irq = Arc::new(Irq::new(NEXT_ID.fetch_add(1, Ordering::Relaxed) as usize));
        let dev = Device {
            cfg,
            mem: mem.clone(),
            model: Box::new(model),
            status: 0,
            driver_features: 0,
            queues: [Queue::default(); 2],
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

    /// Has the model serve the held requests and returns them, in the order
    /// they came.
    pub fn release_held(&self) {
        let mut d = self.lock();
        for (head, chain) in std::mem::take(&mut d.held) {
            let used = d.serve(&chain, None);
            d.push_used(0, head, used);
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
        irq::wait_for_used(&self.dev, &self.irq);
    }
}

impl FakeTransport {
    fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Transport for FakeTransport {
    fn device_features(&mut self) -> u64 {
        let d = self.lock();
        d.model.device_features() & !d.cfg.withheld_features
    }

    fn set_driver_features(&mut self, features: u64) {
        let mut d = self.lock();
        d.driver_features = features;
        d.model.ack_features(features);
    }

    fn status(&mut self) -> u8 {
        self.lock().status
    }

    fn set_status(&mut self, status: u8) {
        let mut d = self.lock();
        if status == 0 {
            d.queues = [Queue::default(); 2];
            d.driver_features = 0;
            d.model.reset();
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
            *q = Queue::new(size, addrs);
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
        self.lock().model.read_config(offset, buf);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.lock().model.write_config(offset, data);
    }

    fn wait_for_used(&mut self, _queue: u16) {
        irq::wait_for_used(&self.dev, &self.irq);
    }

    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        self.waiter.then(|| {
            Box::new(FakeWaiter { dev: self.dev.clone(), irq: self.irq.clone() })
                as Box<dyn UsedWaiter>
        })
    }
}
