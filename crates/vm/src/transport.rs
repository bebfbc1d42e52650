//! The in-process virtio transport: the driver's register accesses reach the
//! device model directly, kicks wake the device's own I/O thread through an
//! eventfd (as a VMM's ioeventfd), and interrupts come back through a
//! futex-based broadcast (a condition variable over a per-queue interrupt
//! count), so that every guest thread waiting for the queue sees each one.
//!
//! The driver waits through [`VmTransport`]'s [`UsedWaiter`], which needs no
//! lock of the driver's: any number of guest threads block on the interrupt
//! at once, and a kick never queues behind someone's wait.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use viommu_driver::transport::status;
use viommu_driver::{QueueAddrs, Transport, UsedWaiter};
use vm_memory::GuestMemoryMmap;

use crate::cpu::{waiting, MeterReading, ThreadMeter};
use crate::notify::EventNotifier;
use crate::ram::GuestRam;

/// Most queues a backend may have (bits of the pending-kick mask).
pub const MAX_QUEUES: usize = 8;

/// Longest one completion wait blocks without an interrupt before it
/// returns to the driver, which re-polls, checks its own timeout and calls
/// again. Every completion that needs an interrupt raises one, so this is
/// only a bound (counted in [`LinkCounts::wait_timeouts`]).
const WAIT_LIMIT: Duration = Duration::from_millis(1);

/// How long each side polls before it blocks, so that a quick round trip
/// costs no sleeping-thread wakeups (the adaptive spin-then-block of VMM
/// I/O threads and guest drivers). Zero turns a side's polling off.
///
/// ```
/// use std::time::Duration;
/// use viommu_vm::transport::SpinBudget;
/// let off = SpinBudget { wait: Duration::ZERO, io: Duration::ZERO };
/// assert_ne!(off, SpinBudget::default());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinBudget {
    /// A completion wait polls the interrupt count this long before it
    /// blocks. Only one waiting thread per link polls at a time; the others
    /// block at once, so that spinners do not starve the I/O thread.
    pub wait: Duration,
    /// After a batch, the I/O thread polls for the next kick this long
    /// before it blocks on the eventfd; kicks seen while it polls skip the
    /// eventfd write.
    pub io: Duration,
}

impl Default for SpinBudget {
    /// 20 µs each: about two round trips of a 4 KiB request.
    fn default() -> Self {
        Self { wait: Duration::from_micros(20), io: Duration::from_micros(20) }
    }
}

/// [`SpinBudget`] as the link keeps it, changeable while it runs.
#[derive(Debug, Default)]
struct Spin {
    wait_ns: AtomicU64,
    io_ns: AtomicU64,
    /// Waiting threads polling now.
    spinners: AtomicU32,
    /// The I/O thread is polling `pending`: kicks need not signal it.
    io_polling: AtomicBool,
}

/// Polls `done` for up to `ns` nanoseconds; true once it holds. The time
/// spent polling is added to `spent` (in ns).
fn spin_until(ns: u64, spent: &AtomicU64, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    let limit = Duration::from_nanos(ns);
    let add = |t: Duration| spent.fetch_add(t.as_nanos() as u64, Ordering::Relaxed);
    loop {
        if done() {
            add(start.elapsed());
            return true;
        }
        let t = start.elapsed();
        if t >= limit {
            add(t);
            return false;
        }
        for _ in 0..16 {
            std::hint::spin_loop();
        }
    }
}

/// What the transport needs from a device model, register by register, as a
/// virtio-mmio or virtio-pci transport in a VMM would.
pub trait VirtioBackend: Send + 'static {
    /// Feature bits offered.
    fn device_features(&self) -> u64;
    /// Records the features the driver accepted. False refuses them
    /// (FEATURES_OK then does not stick).
    fn ack_features(&mut self, features: u64) -> bool;
    /// Reads device config bytes.
    fn read_config(&self, offset: usize, buf: &mut [u8]);
    /// Writes device config bytes.
    fn write_config(&mut self, offset: usize, data: &[u8]);
    /// Device reset (status written to 0).
    fn reset(&mut self);
    /// Largest size of `queue`; 0 if it does not exist.
    fn max_queue_size(&self, queue: u16) -> u16;
    /// Configures and enables `queue`.
    fn set_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs);
    /// DRIVER_OK was written. False means the device cannot run.
    fn activate(&mut self, mem: &GuestMemoryMmap) -> bool;
    /// Services `queue` after a kick. `Ok(true)` when the driver must be
    /// interrupted; `Err` for a device error (the transport then sets
    /// DEVICE_NEEDS_RESET).
    fn process_queue(&mut self, queue: u16, mem: &GuestMemoryMmap) -> Result<bool, String>;
}

/// The VM-exit cost model: each kick busy-waits this long in the kicking
/// thread, as a vCPU would sit in an exit to the VMM. The injected time is
/// counted so that reports can show it apart from the measured time.
#[derive(Debug, Default)]
pub struct ExitCost {
    per_kick_ns: AtomicU64,
    injected_ns: AtomicU64,
}

impl ExitCost {
    /// Sets the extra delay per kick.
    pub fn set_per_kick(&self, d: Duration) {
        self.per_kick_ns.store(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The extra delay per kick.
    pub fn per_kick(&self) -> Duration {
        Duration::from_nanos(self.per_kick_ns.load(Ordering::Relaxed))
    }

    /// Total delay injected so far, over all threads.
    pub fn injected(&self) -> Duration {
        Duration::from_nanos(self.injected_ns.load(Ordering::Relaxed))
    }

    fn charge(&self) {
        let ns = self.per_kick_ns.load(Ordering::Relaxed);
        if ns == 0 {
            return;
        }
        let start = Instant::now();
        let d = Duration::from_nanos(ns);
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
        self.injected_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Transport-level counters.
#[derive(Debug, Default)]
pub struct LinkStats {
    kicks: [AtomicU64; MAX_QUEUES],
    interrupts: [AtomicU64; MAX_QUEUES],
    wakeups: AtomicU64,
    wait_timeouts: AtomicU64,
    device_errors: AtomicU64,
    wait_poll_ns: AtomicU64,
    io_poll_ns: AtomicU64,
}

/// A snapshot of [`LinkStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkCounts {
    /// Kicks per queue.
    pub kicks: [u64; MAX_QUEUES],
    /// Interrupts raised per queue.
    pub interrupts: [u64; MAX_QUEUES],
    /// Times the device thread woke up (kicks may fold into one wakeup).
    pub wakeups: u64,
    /// Completion waits that ended at their time limit (1 ms) rather than
    /// by an interrupt. Nothing is done about them: the driver looks at the
    /// ring and waits again.
    pub wait_timeouts: u64,
    /// Queue-processing errors reported by the device.
    pub device_errors: u64,
    /// Wall time completion waits spent polling before a completion came or
    /// they blocked, in ns (see [`SpinBudget`]).
    pub wait_poll_ns: u64,
    /// Wall time the I/O thread spent polling for kicks, in ns.
    pub io_poll_ns: u64,
}

impl LinkStats {
    /// Current values.
    pub fn snapshot(&self) -> LinkCounts {
        let load = |a: &[AtomicU64; MAX_QUEUES]| a.each_ref().map(|c| c.load(Ordering::Relaxed));
        LinkCounts {
            kicks: load(&self.kicks),
            interrupts: load(&self.interrupts),
            wakeups: self.wakeups.load(Ordering::Relaxed),
            wait_timeouts: self.wait_timeouts.load(Ordering::Relaxed),
            device_errors: self.device_errors.load(Ordering::Relaxed),
            wait_poll_ns: self.wait_poll_ns.load(Ordering::Relaxed),
            io_poll_ns: self.io_poll_ns.load(Ordering::Relaxed),
        }
    }
}

impl LinkCounts {
    /// Difference from an earlier snapshot.
    pub fn since(&self, earlier: &LinkCounts) -> LinkCounts {
        let sub = |a: &[u64; MAX_QUEUES], b: &[u64; MAX_QUEUES]| {
            std::array::from_fn(|i| a[i].wrapping_sub(b[i]))
        };
        LinkCounts {
            kicks: sub(&self.kicks, &earlier.kicks),
            interrupts: sub(&self.interrupts, &earlier.interrupts),
            wakeups: self.wakeups - earlier.wakeups,
            wait_timeouts: self.wait_timeouts - earlier.wait_timeouts,
            device_errors: self.device_errors - earlier.device_errors,
            wait_poll_ns: self.wait_poll_ns - earlier.wait_poll_ns,
            io_poll_ns: self.io_poll_ns - earlier.io_poll_ns,
        }
    }
}

struct Shared<B> {
    backend: Mutex<B>,
    status: Mutex<u8>,
    ram: Arc<GuestRam>,
    kick: EventNotifier,
    irq: Interrupts,
    pending: AtomicU32,
    driver_features: AtomicU64,
    stop: AtomicBool,
    /// Unique per link, so that a thread's seen-interrupt counts never carry
    /// over to a later link allocated at the same address.
    id: usize,
    stats: LinkStats,
    exit: ExitCost,
    spin: Spin,
    /// The I/O thread's CPU meter, set as it starts.
    io_meter: OnceLock<ThreadMeter>,
}

/// The device side of the link: owns the I/O thread. Dropping it stops the
/// thread. Clone-free; hand out [`VmTransport`]s with [`DeviceLink::transport`].
pub struct DeviceLink<B: VirtioBackend> {
    shared: Arc<Shared<B>>,
    thread: Option<JoinHandle<()>>,
}

impl<B: VirtioBackend> std::fmt::Debug for DeviceLink<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLink").field("stats", &self.shared.stats.snapshot()).finish()
    }
}

impl<B: VirtioBackend> DeviceLink<B> {
    /// Starts the device's I/O thread over `ram`.
    pub fn start(backend: B, ram: Arc<GuestRam>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            backend: Mutex::new(backend),
            status: Mutex::new(0),
            ram,
            kick: EventNotifier::new()?,
            irq: Interrupts::default(),
            pending: AtomicU32::new(0),
            driver_features: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            id: {
                static NEXT: std::sync::atomic::AtomicUsize =
                    std::sync::atomic::AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            stats: LinkStats::default(),
            exit: ExitCost::default(),
            spin: Spin::default(),
            io_meter: OnceLock::new(),
        });
        shared.set_spin(SpinBudget::default());
        let s = shared.clone();
        let thread =
            std::thread::Builder::new().name("viommu-io".into()).spawn(move || io_thread(&s))?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// A driver-side handle. Several may exist; they share the device.
    pub fn transport(&self) -> VmTransport<B> {
        VmTransport { shared: self.shared.clone() }
    }

    /// Locks the device model (for the VMM side: counters, translate setup).
    /// The I/O thread cannot run while the guard is held.
    pub fn backend(&self) -> MutexGuard<'_, B> {
        self.shared.backend.lock().unwrap()
    }

    /// Transport counters.
    pub fn stats(&self) -> LinkCounts {
        self.shared.stats.snapshot()
    }

    /// CPU time and instructions the I/O thread has used so far.
    pub fn io_thread_use(&self) -> MeterReading {
        self.shared.io_meter.get().map(ThreadMeter::read).unwrap_or_default()
    }

    /// The VM-exit cost model applied to every kick.
    pub fn exit_cost(&self) -> &ExitCost {
        &self.shared.exit
    }

    /// Sets how long waits and the I/O thread poll before blocking.
    pub fn set_spin(&self, budget: SpinBudget) {
        self.shared.set_spin(budget);
    }

    /// The current polling budgets.
    pub fn spin(&self) -> SpinBudget {
        let ns = |a: &AtomicU64| Duration::from_nanos(a.load(Ordering::Relaxed));
        SpinBudget { wait: ns(&self.shared.spin.wait_ns), io: ns(&self.shared.spin.io_ns) }
    }

    /// Wakes the I/O thread to service `queue` as if kicked, without counting
    /// a guest kick (e.g. the VMM has fault events to deliver).
    pub fn poke(&self, queue: u16) {
        self.shared.pending.fetch_or(1 << queue, Ordering::AcqRel);
        self.shared.kick.signal();
    }

    /// A function doing [`DeviceLink::poke`] for `queue`, to hand to the
    /// device model (e.g. as its fault notifier). It holds a weak reference,
    /// so it does not keep the link alive.
    pub fn poker(&self, queue: u16) -> impl Fn() + Send + Sync + 'static {
        let weak = Arc::downgrade(&self.shared);
        move || {
            if let Some(s) = weak.upgrade() {
                s.pending.fetch_or(1 << queue, Ordering::AcqRel);
                s.kick.signal();
            }
        }
    }
}

impl<B> Shared<B> {
    fn set_spin(&self, budget: SpinBudget) {
        let ns = |d: Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        self.spin.wait_ns.store(ns(budget.wait), Ordering::Relaxed);
        self.spin.io_ns.store(ns(budget.io), Ordering::Relaxed);
    }
}

impl<B: VirtioBackend> Drop for DeviceLink<B> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.kick.signal();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Interrupt lines: a count per queue, and a condition variable to wake
/// every waiter.
#[derive(Default)]
struct Interrupts {
    counts: Mutex<[u64; MAX_QUEUES]>,
    /// Copies of `counts`, readable without the lock, for polling.
    seq: [AtomicU64; MAX_QUEUES],
    cond: Condvar,
}

thread_local! {
    /// Per guest thread: the interrupt count it last saw, by (link, queue).
    static SEEN: RefCell<HashMap<(usize, usize), u64>> = RefCell::new(HashMap::new());
}

impl Interrupts {
    fn raise(&self, q: usize) {
        let mut counts = self.counts.lock().unwrap();
        counts[q] += 1;
        self.seq[q].store(counts[q], Ordering::Release);
        drop(counts);
        self.cond.notify_all();
    }

    /// Returns once queue `q` has had an interrupt this thread has not seen
    /// yet, or after `timeout`; true if interrupted. Counting per thread means
    /// an interrupt taken by one thread is never lost to another. Polls for
    /// up to `spin_ns` first when no other thread is polling.
    fn wait(
        &self,
        key: usize,
        q: usize,
        timeout: Duration,
        spin: &Spin,
        polled: &AtomicU64,
    ) -> bool {
        let seen = SEEN.with(|s| s.borrow().get(&(key, q)).copied().unwrap_or(0));
        let spin_ns = spin.wait_ns.load(Ordering::Relaxed);
        if spin_ns > 0 && spin.spinners.fetch_add(1, Ordering::Relaxed) == 0 {
            let hit = spin_until(spin_ns, polled, || self.seq[q].load(Ordering::Acquire) != seen);
            spin.spinners.fetch_sub(1, Ordering::Relaxed);
            if hit {
                let now = self.seq[q].load(Ordering::Acquire);
                SEEN.with(|s| s.borrow_mut().insert((key, q), now));
                return true;
            }
        } else if spin_ns > 0 {
            spin.spinners.fetch_sub(1, Ordering::Relaxed);
        }
        let counts = self.counts.lock().unwrap();
        let (counts, _) = self.cond.wait_timeout_while(counts, timeout, |c| c[q] == seen).unwrap();
        let now = counts[q];
        drop(counts);
        SEEN.with(|s| s.borrow_mut().insert((key, q), now));
        now != seen
    }
}

/// After a batch, polls for the next kick for up to the I/O spin budget;
/// true if one came (it is then in `pending`, and needs no wakeup).
fn poll_kicks<B>(s: &Shared<B>) -> bool {
    let ns = s.spin.io_ns.load(Ordering::Relaxed);
    if ns == 0 {
        return false;
    }
    // Kickers skip the eventfd while this is set; SeqCst on both sides
    // makes the final look at `pending` see any kick that skipped it.
    s.spin.io_polling.store(true, Ordering::SeqCst);
    let polled = &s.stats.io_poll_ns;
    spin_until(ns, polled, || {
        s.pending.load(Ordering::Relaxed) != 0 || s.stop.load(Ordering::Relaxed)
    });
    s.spin.io_polling.store(false, Ordering::SeqCst);
    s.pending.load(Ordering::SeqCst) != 0
}

fn io_thread<B: VirtioBackend>(s: &Shared<B>) {
    let _ = s.io_meter.set(ThreadMeter::here());
    let mut polled = false;
    loop {
        if !polled {
            waiting(|| s.kick.wait(None));
        }
        crate::bench::device_count_marks();
        if s.stop.load(Ordering::Acquire) {
            return;
        }
        if !polled {
            s.stats.wakeups.fetch_add(1, Ordering::Relaxed);
        }
        let pending = s.pending.swap(0, Ordering::AcqRel);
        if pending == 0 {
            polled = false;
            continue;
        }
        let mut dev = s.backend.lock().unwrap();
        for q in 0..MAX_QUEUES as u16 {
            if pending & (1 << q) == 0 {
                continue;
            }
            // A panicking device model must not leave the guest waiting
            // forever: it becomes DEVICE_NEEDS_RESET, as a device error does.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                dev.process_queue(q, s.ram.memory())
            }))
            .unwrap_or_else(|_| Err("device model panicked".into()));
            match r {
                Ok(true) => {
                    s.stats.interrupts[q as usize].fetch_add(1, Ordering::Relaxed);
                    waiting(|| s.irq.raise(q as usize));
                }
                Ok(false) => {}
                Err(_) => {
                    s.stats.device_errors.fetch_add(1, Ordering::Relaxed);
                    *s.status.lock().unwrap() |= status::DEVICE_NEEDS_RESET;
                    // Wake any waiter so it sees the status.
                    s.irq.raise(q as usize);
                }
            }
        }
        drop(dev);
        polled = waiting(|| poll_kicks(s));
    }
}

/// The driver's view of the device: implements the driver's [`Transport`].
pub struct VmTransport<B: VirtioBackend> {
    shared: Arc<Shared<B>>,
}

impl<B: VirtioBackend> std::fmt::Debug for VmTransport<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmTransport").finish_non_exhaustive()
    }
}

impl<B: VirtioBackend> VmTransport<B> {
    fn dev(&self) -> MutexGuard<'_, B> {
        self.shared.backend.lock().unwrap()
    }
}

impl<B: VirtioBackend> Transport for VmTransport<B> {
    fn device_features(&mut self) -> u64 {
        self.dev().device_features()
    }

    fn set_driver_features(&mut self, features: u64) {
        // Acceptance is decided when FEATURES_OK is written.
        self.shared.driver_features.store(features, Ordering::Relaxed);
    }

    fn status(&mut self) -> u8 {
        *self.shared.status.lock().unwrap()
    }

    fn set_status(&mut self, new: u8) {
        let mut st = self.shared.status.lock().unwrap();
        let mut dev = self.dev();
        if new == 0 {
            dev.reset();
            *st = 0;
            return;
        }
        let mut value = new;
        if new & status::FEATURES_OK != 0 && *st & status::FEATURES_OK == 0 {
            let features = self.shared.driver_features.load(Ordering::Relaxed);
            if !dev.ack_features(features) {
                value &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0
            && *st & status::DRIVER_OK == 0
            && !dev.activate(self.shared.ram.memory())
        {
            value |= status::DEVICE_NEEDS_RESET;
        }
        *st = value | (*st & status::DEVICE_NEEDS_RESET);
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.dev().max_queue_size(queue)
    }

    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.dev().set_queue(queue, size, addrs);
    }

    fn notify(&mut self, queue: u16) {
        let q = queue as usize % MAX_QUEUES;
        // The exit and the wakeup of the I/O thread are the host's cost (the
        // bench models them per kick), not the guest's work.
        waiting(|| {
            self.shared.exit.charge();
            self.shared.stats.kicks[q].fetch_add(1, Ordering::Relaxed);
            self.shared.pending.fetch_or(1 << q, Ordering::SeqCst);
            // A polling I/O thread sees the bit without the eventfd write.
            if !self.shared.spin.io_polling.load(Ordering::SeqCst) {
                self.shared.kick.signal();
            }
        });
    }

    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        self.dev().read_config(offset, buf);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.dev().write_config(offset, data);
    }

    fn wait_for_used(&mut self, queue: u16) {
        wait_for_interrupt(&self.shared, queue);
    }

    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        Some(Box::new(VmWaiter { shared: self.shared.clone() }))
    }
}

/// Blocks until `queue` has an interrupt this thread has not seen (one that
/// came before the call counts), or for at most [`WAIT_LIMIT`].
fn wait_for_interrupt<B>(shared: &Shared<B>, queue: u16) {
    let q = queue as usize % MAX_QUEUES;
    let wait =
        || shared.irq.wait(shared.id, q, WAIT_LIMIT, &shared.spin, &shared.stats.wait_poll_ns);
    if !waiting(wait) {
        shared.stats.wait_timeouts.fetch_add(1, Ordering::Relaxed);
    }
}

/// The driver's [`UsedWaiter`]: waits for the interrupt with no lock held.
struct VmWaiter<B> {
    shared: Arc<Shared<B>>,
}

impl<B: VirtioBackend> UsedWaiter for VmWaiter<B> {
    fn wait_for_used(&self, queue: u16) {
        wait_for_interrupt(&self.shared, queue);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A backend that records what it is asked and answers as told.
    struct Fake {
        processed: Arc<AtomicUsize>,
        answer: fn(u16) -> Result<bool, String>,
        resets: Arc<AtomicUsize>,
    }

    impl VirtioBackend for Fake {
        fn device_features(&self) -> u64 {
            0b101
        }
        fn ack_features(&mut self, features: u64) -> bool {
            features & !0b101 == 0
        }
        fn read_config(&self, offset: usize, buf: &mut [u8]) {
            buf.fill(offset as u8);
        }
        fn write_config(&mut self, _offset: usize, _data: &[u8]) {}
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        fn max_queue_size(&self, queue: u16) -> u16 {
            if queue < 2 {
                64
            } else {
                0
            }
        }
        fn set_queue(&mut self, _queue: u16, _size: u16, _addrs: QueueAddrs) {}
        fn activate(&mut self, _mem: &GuestMemoryMmap) -> bool {
            true
        }
        fn process_queue(&mut self, queue: u16, _mem: &GuestMemoryMmap) -> Result<bool, String> {
            self.processed.fetch_add(1, Ordering::Relaxed);
            (self.answer)(queue)
        }
    }

    fn link(
        answer: fn(u16) -> Result<bool, String>,
    ) -> (DeviceLink<Fake>, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let processed = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let fake = Fake { processed: processed.clone(), answer, resets: resets.clone() };
        (DeviceLink::start(fake, GuestRam::new(1 << 20).unwrap()).unwrap(), processed, resets)
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < Duration::from_secs(60), "timed out (only a hang gets here)");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_kick_reaches_the_io_thread_and_the_interrupt_comes_back() {
        let (link, processed, _) = link(|_| Ok(true));
        let mut t = link.transport();
        t.notify(0);
        wait_until(|| link.stats().interrupts[0] == 1);
        assert_eq!(processed.load(Ordering::Relaxed), 1);
        // The interrupt is not lost although it came before the wait.
        t.wait_for_used(0);
        assert_eq!(link.stats().wait_timeouts, 0, "returned on the interrupt, not a timeout");
        assert_eq!(link.stats().kicks[0], 1);
    }

    #[test]
    fn status_handshake_features_and_reset() {
        let (link, _, resets) = link(|_| Ok(false));
        let mut t = link.transport();
        t.set_driver_features(0b111); // bit 1 was not offered
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(t.status() & status::FEATURES_OK, 0, "refused features do not stick");
        t.set_driver_features(0b100);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_ne!(t.status() & status::FEATURES_OK, 0);
        t.set_status(0);
        assert_eq!((t.status(), resets.load(Ordering::Relaxed)), (0, 1));
        assert_eq!(t.max_queue_size(1), 64);
        let mut b = [0u8; 2];
        t.read_config(7, &mut b);
        assert_eq!(b, [7, 7]);
    }

    #[test]
    fn device_errors_and_panics_set_needs_reset_and_wake_waiters() {
        for answer in [(|_| Err("bad ring".to_string())) as fn(u16) -> Result<bool, String>, |_| {
            panic!("device bug")
        }] {
            let (link, _, _) = link(answer);
            let mut t = link.transport();
            t.notify(0);
            wait_until(|| link.stats().device_errors == 1);
            assert_ne!(t.status() & status::DEVICE_NEEDS_RESET, 0);
            // The I/O thread survived: it still serves kicks.
            t.notify(1);
            wait_until(|| link.stats().device_errors == 2);
        }
    }

    #[test]
    fn a_wait_without_interrupt_returns_at_its_limit_and_wakes_nobody() {
        let (link, processed, _) = link(|_| Ok(false));
        let mut t = link.transport();
        let waiter = t.used_waiter().expect("the VM transport has a waiter");
        let start = Instant::now();
        t.wait_for_used(0);
        waiter.wait_for_used(0);
        // Condvar timeouts never end early.
        assert!(start.elapsed() >= 2 * WAIT_LIMIT);
        let s = link.stats();
        assert_eq!((s.wait_timeouts, s.kicks[0], s.wakeups), (2, 0, 0));
        assert_eq!(processed.load(Ordering::Relaxed), 0, "the device was not made to look");
    }

    #[test]
    fn an_interrupt_ends_the_wait_of_every_thread_that_has_not_seen_it() {
        let (link, _, _) = link(|_| Ok(true));
        let mut t = link.transport();
        let waiter: Arc<dyn UsedWaiter> = t.used_waiter().unwrap().into();
        t.notify(0);
        wait_until(|| link.stats().interrupts[0] == 1);
        // One interrupt, three waiting threads (and no lock between them):
        // each returns on it, none at the time limit.
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let w = waiter.clone();
                std::thread::spawn(move || w.wait_for_used(0))
            })
            .collect();
        for th in threads {
            th.join().unwrap();
        }
        assert_eq!(link.stats().wait_timeouts, 0);
    }

    #[test]
    fn a_polling_io_thread_takes_kicks_without_a_wakeup_and_a_spinning_wait_sees_them() {
        let (link, processed, _) = link(|_| Ok(true));
        // Budgets far longer than the test, so the outcome does not depend
        // on timing; dropping the link still ends the I/O thread's poll.
        let long = Duration::from_secs(30);
        link.set_spin(SpinBudget { wait: long, io: long });
        assert_eq!(link.spin(), SpinBudget { wait: long, io: long });
        let mut t = link.transport();
        let waiter = t.used_waiter().unwrap();
        t.notify(0);
        waiter.wait_for_used(0);
        // The I/O thread now polls: these kicks need no eventfd wakeup.
        for n in 2..=4 {
            t.notify(0);
            waiter.wait_for_used(0);
            assert_eq!(link.stats().interrupts[0], n);
        }
        let s = link.stats();
        assert_eq!((s.kicks[0], s.wakeups, s.wait_timeouts), (4, 1, 0));
        assert_eq!(processed.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn exit_cost_spins_and_counts() {
        let (link, _, _) = link(|_| Ok(false));
        link.exit_cost().set_per_kick(Duration::from_micros(300));
        let mut t = link.transport();
        let start = Instant::now();
        t.notify(0);
        t.notify(0);
        assert!(start.elapsed() >= Duration::from_micros(600));
        assert!(link.exit_cost().injected() >= Duration::from_micros(600));
    }
}
