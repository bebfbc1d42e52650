//! The embedder's locks (`sync::RawLocks`) and the interrupt rule of the
//! `sync` module docs, on one thread standing for one CPU.
//!
//! An interrupt is modelled as a handler called on the same thread: at once
//! when interrupts are enabled, else when the last interrupt-masking lock is
//! released (as a pending interrupt fires when the flag is restored). The
//! device raises one after every notify. The handler does what the docs
//! allow in interrupt context: `poll_events` (the IOMMU's fault interrupt)
//! and lazy unmaps (a completion handler recycling buffers).

mod common;

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use viommu_driver::dma::{DmaOptions, Policy};
use viommu_driver::fake::FakeTransport;
use viommu_driver::sync::{Locks, RawLocks};
use viommu_driver::transport::{QueueAddrs, Transport};
use viommu_driver::{DmaDirection, DmaDomain, DriverOptions, VirtioIommu};
use viommu_proto::{fault, FaultEvent};

use common::FakeDevice;

const EP: u32 = 2;

thread_local! {
    /// Interrupt-masking locks held (and handlers running) on this "CPU".
    static MASKED: Cell<u32> = const { Cell::new(0) };
    /// An interrupt raised while masked.
    static PENDING: Cell<bool> = const { Cell::new(false) };
    /// The interrupt handler.
    static HANDLER: RefCell<Option<Box<dyn FnMut()>>> = RefCell::new(None);
    /// Driver locks this thread holds, masking or not.
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Runs the handler, masked, as a CPU enters an interrupt.
fn interrupt() {
    let Some(mut h) = HANDLER.with(|h| h.borrow_mut().take()) else { return };
    MASKED.with(|m| m.set(m.get() + 1));
    h();
    MASKED.with(|m| m.set(m.get() - 1));
    HANDLER.with(|slot| *slot.borrow_mut() = Some(h));
}

/// The device raises an interrupt.
fn raise() {
    if MASKED.with(Cell::get) > 0 {
        PENDING.with(|p| p.set(true));
    } else {
        interrupt();
    }
}

/// A spin lock that refuses to spin on itself: taken again by the thread
/// that holds it, it panics instead of hanging (one CPU would hang there).
struct SpinCheck {
    locked: AtomicBool,
    owner: AtomicU64,
}

fn me() -> u64 {
    thread_local!(static ID: u8 = const { 0 });
    ID.with(|id| id as *const u8 as u64)
}

impl SpinCheck {
    fn acquire(&self) {
        if self.locked.load(Ordering::Acquire) && self.owner.load(Ordering::Relaxed) == me() {
            panic!("deadlock: the CPU that holds this lock spins on it");
        }
        while self
            .locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        self.owner.store(me(), Ordering::Relaxed);
        HELD.with(|h| h.set(h.get() + 1));
    }
    fn release(&self) {
        self.owner.store(0, Ordering::Relaxed);
        self.locked.store(false, Ordering::Release);
        HELD.with(|h| h.set(h.get() - 1));
    }
}

/// Does not mask interrupts, like the `no_std` default `SpinLocks`.
struct NoMask(SpinCheck);

/// Masks interrupts while held, like a kernel's `spin_lock_irqsave`.
struct IrqSave(SpinCheck);

/// An unlocked `SpinCheck` (a template for `RawMutex::INIT`, copied, never shared).
#[allow(clippy::declare_interior_mutable_const)]
const INIT: SpinCheck = SpinCheck { locked: AtomicBool::new(false), owner: AtomicU64::new(0) };

// SAFETY: `lock` returns only once it won the flag, `unlock` is called by
// the holder only (lock_api's contract), so one holder at a time.
unsafe impl lock_api::RawMutex for NoMask {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = NoMask(INIT);
    type GuardMarker = lock_api::GuardNoSend;
    fn lock(&self) {
        self.0.acquire();
    }
    fn try_lock(&self) -> bool {
        let won = !self.0.locked.swap(true, Ordering::Acquire);
        if won {
            self.0.owner.store(me(), Ordering::Relaxed);
            HELD.with(|h| h.set(h.get() + 1));
        }
        won
    }
    unsafe fn unlock(&self) {
        self.0.release();
    }
}

// SAFETY: as for `NoMask`; masking only defers the handler.
unsafe impl lock_api::RawMutex for IrqSave {
    #[allow(clippy::declare_interior_mutable_const)]
    const INIT: Self = IrqSave(INIT);
    type GuardMarker = lock_api::GuardNoSend;
    fn lock(&self) {
        MASKED.with(|m| m.set(m.get() + 1));
        self.0.acquire();
    }
    fn try_lock(&self) -> bool {
        MASKED.with(|m| m.set(m.get() + 1));
        let won = !self.0.locked.swap(true, Ordering::Acquire);
        if won {
            self.0.owner.store(me(), Ordering::Relaxed);
            HELD.with(|h| h.set(h.get() + 1));
        } else {
            MASKED.with(|m| m.set(m.get() - 1));
        }
        won
    }
    unsafe fn unlock(&self) {
        self.0.release();
        let left = MASKED.with(|m| {
            m.set(m.get() - 1);
            m.get()
        });
        if left == 0 && PENDING.with(|p| p.replace(false)) {
            interrupt();
        }
    }
}

/// The fake's transport, raising an interrupt after every notify. It gives
/// no `UsedWaiter` and spins in `wait_for_used`, as the rule asks.
struct IrqTransport(FakeTransport);

impl Transport for IrqTransport {
    fn device_features(&mut self) -> u64 {
        self.0.device_features()
    }
    fn set_driver_features(&mut self, features: u64) {
        self.0.set_driver_features(features);
    }
    fn status(&mut self) -> u8 {
        self.0.status()
    }
    fn set_status(&mut self, status: u8) {
        self.0.set_status(status);
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.0.max_queue_size(queue)
    }
    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.0.setup_queue(queue, size, addrs);
    }
    fn notify(&mut self, queue: u16) {
        self.0.notify(queue);
        raise();
    }
    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        self.0.read_config(offset, buf);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write_config(offset, data);
    }
}

/// What the handler did.
#[derive(Default)]
struct Done {
    runs: u64,
    faults: u64,
    unmapped: u64,
    /// Runs that found a driver lock held on this CPU.
    under_lock: u64,
}

/// `rounds` of: a fault event is pending, a buffer is mapped (its sync
/// notifies, which interrupts), and the buffer completes (it is queued for
/// the handler to unmap). Returns what the handler did.
fn run<L: Locks>(rounds: u64) -> (Done, viommu_driver::CounterSnapshot) {
    let fake = FakeDevice::default();
    let transport = IrqTransport(fake.transport_without_waiter());
    // Without EVENT_IDX every event buffer given back is kicked.
    let opts = DriverOptions { event_idx: false, ..Default::default() };
    let iommu = VirtioIommu::<_, _, L>::with_locks(transport, fake.hal(), opts).unwrap();
    let domain = iommu.alloc_paging(EP).unwrap();
    iommu.attach(&domain, EP).unwrap();
    let opts = DmaOptions { policy: Policy::Lazy, ..Default::default() };
    let clock = Arc::new(common::ManualClock::default());
    let dma = Arc::new(DmaDomain::new(domain, &[], opts, clock).unwrap());
    let faults = Arc::new(AtomicU64::new(0));
    let f = faults.clone();
    iommu.set_fault_handler(Some(Box::new(move |_| {
        f.fetch_add(1, Ordering::Relaxed);
    })));
    let done = Arc::new(Mutex::new(Done::default()));
    let completed: Arc<Mutex<Vec<u64>>> = Arc::default();
    let (i, d, c, n) = (iommu.clone(), dma.clone(), completed.clone(), done.clone());
    let handler = move || {
        let held = HELD.with(Cell::get) > 0;
        i.poll_events().unwrap();
        let recycle: Vec<u64> = std::mem::take(&mut *c.lock().unwrap());
        for &iova in &recycle {
            d.unmap_single(iova, 4096, DmaDirection::ToDevice).unwrap();
        }
        let mut n = n.lock().unwrap();
        n.runs += 1;
        n.unmapped += recycle.len() as u64;
        n.under_lock += u64::from(held);
        n.faults = faults.load(Ordering::Relaxed);
    };
    HANDLER.with(|h| *h.borrow_mut() = Some(Box::new(handler)));
    let before = iommu.counters();
    let ev = FaultEvent { reason: fault::R_MAPPING, endpoint: EP.into(), ..Default::default() };
    for r in 0..rounds {
        assert!(fake.inject_fault(ev));
        let iova = dma.map_single(0x4000_0000 + r * 0x1000, 4096, DmaDirection::ToDevice).unwrap();
        completed.lock().unwrap().push(iova);
    }
    HANDLER.with(|h| h.borrow_mut().take());
    dma.flush().unwrap();
    let used = iommu.counters().since(&before);
    let done = std::mem::take(&mut *done.lock().unwrap());
    (done, used)
}

/// With interrupt-masking locks every interrupt is handled once the CPU
/// holds no driver lock: each round's fault is handled and each completed
/// buffer unmapped from "interrupt context", lazily, and the flush at the
/// end sends the UNMAPs.
#[test]
fn interrupt_safe_locks_defer_the_handler_until_no_lock_is_held() {
    let (done, used) = run::<RawLocks<IrqSave>>(8);
    assert_eq!(done.under_lock, 0, "never ran under a driver lock");
    assert_eq!(done.faults, 8, "every fault event handled in the handler");
    assert_eq!(done.unmapped, 7, "each buffer but the last recycled by the next round's interrupt");
    assert!(done.runs >= 8, "{} runs", done.runs);
    assert_eq!(used.map, 8);
    assert!(used.unmap >= 1, "the flush sent the deferred UNMAPs");
    assert_eq!(used.faults, 8);
}

/// The same with locks that do not mask interrupts (the `no_std` default's
/// kind): the first interrupt comes during the notify, with the transport
/// lock held, and the handler's event-queue kick spins on that lock.
#[test]
fn spin_locks_that_do_not_mask_deadlock_in_the_handler() {
    let r = std::panic::catch_unwind(|| run::<RawLocks<NoMask>>(1));
    let msg = r.err().and_then(|e| e.downcast_ref::<&str>().map(|s| s.to_string()));
    assert_eq!(msg.as_deref(), Some("deadlock: the CPU that holds this lock spins on it"));
}
