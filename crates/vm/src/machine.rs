//! The VM assembled: guest RAM, the device on its I/O thread, the driver
//! over the in-process transport, and one endpoint's domain per mode.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use viommu_device::{DeviceConfig, EndpointConfig, Iommu, ResvRegion, VirtioIommu as Device};
use viommu_driver::dma::{DmaDirection, DmaDomain, DmaOptions, DmaPlatform};
use viommu_driver::{DriverOptions, VirtioIommu as Driver};
use viommu_proto::{RequestType, EVENT_QUEUE};

use crate::bench::Mode;
use crate::cpu::{waiting, MeterReading, ThreadMeter};
use crate::endpoint::{
    reset_out, Dir, DirectDma, GuestDma, IoBuf, IoToken, MapError, Seg, TokenInner,
};
use crate::ram::{GuestHal, GuestRam};
use crate::transport::{DeviceLink, ExitCost, SpinBudget, VmTransport};

/// The guest driver type of the in-process VM.
pub type GuestDriver = Driver<VmTransport<Device>, GuestHal>;

/// The MSI doorbell every endpoint reports through PROBE (x86's).
pub const MSI_REGION: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The device refused its configuration.
    #[error("device: {0}")]
    Device(#[from] viommu_device::Error),
    /// The driver failed to initialise or to set up the endpoint.
    #[error("driver: {0}")]
    Driver(#[from] viommu_driver::Error),
    /// The I/O thread or an eventfd could not be created.
    #[error("I/O thread: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts of the VM, for differences over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCounts {
    /// MAP requests the device processed.
    pub map_requests: u64,
    /// UNMAP requests the device processed.
    pub unmap_requests: u64,
    /// All requests the device processed.
    pub requests: u64,
    /// Request-queue kicks (transport notifications of queue 0).
    pub kicks: u64,
    /// Request-queue interrupts the device raised.
    pub interrupts: u64,
    /// Wall time completion waits polled, in ns.
    pub wait_poll_ns: u64,
    /// Wall time the I/O thread polled for kicks, in ns.
    pub io_poll_ns: u64,
    /// Batches of requests the driver made available without a kick,
    /// because EVENT_IDX said the device was still at work on the ring
    /// (it finds them before it stops). Depends on the I/O thread's
    /// progress; `kicks + kicks_suppressed` does not.
    pub kicks_suppressed: u64,
    /// Syncs the driver performed.
    pub syncs: u64,
    /// Exit delay injected, in ns.
    pub exit_injected_ns: u64,
    /// Flush-queue flushes the DMA layer made because an entry timed out
    /// (each may cost a kick of its own).
    pub timeout_flushes: u64,
    /// Completion waits that reached their time limit without an interrupt
    /// (see [`crate::LinkCounts::wait_timeouts`]).
    pub wait_timeouts: u64,
}

impl MachineCounts {
    /// Batches of requests the driver made available, kicked or not
    /// (`kicks + kicks_suppressed`).
    pub fn batches(&self) -> u64 {
        self.kicks + self.kicks_suppressed
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &MachineCounts) -> MachineCounts {
        MachineCounts {
            map_requests: self.map_requests - earlier.map_requests,
            unmap_requests: self.unmap_requests - earlier.unmap_requests,
            requests: self.requests - earlier.requests,
            kicks: self.kicks - earlier.kicks,
            interrupts: self.interrupts - earlier.interrupts,
            wait_poll_ns: self.wait_poll_ns - earlier.wait_poll_ns,
            io_poll_ns: self.io_poll_ns - earlier.io_poll_ns,
            kicks_suppressed: self.kicks_suppressed - earlier.kicks_suppressed,
            syncs: self.syncs - earlier.syncs,
            exit_injected_ns: self.exit_injected_ns - earlier.exit_injected_ns,
            timeout_flushes: self.timeout_flushes - earlier.timeout_flushes,
            wait_timeouts: self.wait_timeouts - earlier.wait_timeouts,
        }
    }
}

/// The device configuration of the VM: one endpoint with an MSI doorbell.
pub fn device_config(endpoint: u32) -> DeviceConfig {
    DeviceConfig {
        endpoints: vec![
            EndpointConfig::new(endpoint).with_resv(ResvRegion::msi(MSI_REGION.0, MSI_REGION.1))
        ],
        ..DeviceConfig::default()
    }
}

/// The driver's options in the VM: the defaults, with a request queue of
/// 1024 entries (the device's maximum) so that the 257 MAPs of a 1 MiB
/// scattered I/O fit one batch.
pub fn driver_options() -> DriverOptions {
    DriverOptions { request_queue_size: 1024, ..DriverOptions::default() }
}

/// How a [`Machine`]'s guest keeps time.
#[derive(Clone, Debug)]
pub struct MachineOptions {
    /// Runs the guest's flush-queue timer thread, which calls
    /// [`DmaDomain::tick`] every 2 ms. Without it, only the code that drives
    /// the VM ticks.
    pub timer: bool,
    /// The DMA layer's clock: `None` for the monotonic clock, or a clock
    /// that moves only when told.
    pub clock: Option<Arc<ManualClock>>,
    /// How long completion waits and the device's I/O thread poll before
    /// they block (see [`SpinBudget`]).
    pub spin: SpinBudget,
}

impl Default for MachineOptions {
    /// The timer thread and the monotonic clock, as a running guest.
    fn default() -> Self {
        Self { timer: true, clock: None, spin: SpinBudget::default() }
    }
}

impl MachineOptions {
    /// No timer thread and a [`ManualClock`] standing at 0: lazy flush
    /// queues flush only when full, on [`DmaDomain::flush`], or on a
    /// [`DmaDomain::tick`] after the test moved the clock. Counts then do
    /// not depend on how fast the machine runs.
    pub fn deterministic() -> Self {
        Self {
            timer: false,
            clock: Some(Arc::new(ManualClock::default())),
            spin: SpinBudget::default(),
        }
    }
}

/// The running VM. Fields drop in order: driver state first, the device's
/// I/O thread last.
pub struct Machine {
    // Held for its Drop: stops the flush-queue timer first.
    _timer: Option<Timer>,
    dma: Option<Arc<DmaDomain>>,
    domain: Option<viommu_driver::Domain>,
    driver: GuestDriver,
    iommu: Arc<Iommu>,
    endpoint: u32,
    mode: Mode,
    link: DeviceLink<Device>,
    ram: Arc<GuestRam>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("mode", &self.mode).field("link", &self.link).finish()
    }
}

impl Machine {
    /// Starts the device, initialises the driver and attaches `endpoint` to
    /// the domain `mode` calls for (identity or paging). `Mode::NoIommu`
    /// builds the VM but attaches nothing.
    ///
    /// ```
    /// use viommu_device::Access;
    /// use viommu_driver::Prot;
    /// use viommu_vm::bench::{DriverMode, Mode};
    /// use viommu_vm::{machine::Machine, GuestRam};
    /// let mode = Mode::Driver(DriverMode::Strict);
    /// let m = Machine::new(GuestRam::new(8 << 20).unwrap(), 8, mode).unwrap();
    /// let d = m.domain().unwrap();
    /// d.map_pages(0x10000, 0x20000, 0x1000, Prot::READ).unwrap();
    /// d.iotlb_sync_map(0x10000, 0x1000).unwrap(); // one MAP, one kick
    /// let iommu = m.iommu();
    /// let t = iommu.translate(8, 0x10010, 4, Access::Read).unwrap();
    /// assert_eq!(t.contiguous().unwrap().addr, 0x20010);
    /// ```
    pub fn new(ram: Arc<GuestRam>, endpoint: u32, mode: Mode) -> Result<Self, MachineError> {
        Self::with_config(ram, device_config(endpoint), endpoint, mode)
    }

    /// As [`Machine::new`], with a chosen device configuration.
    pub fn with_config(
        ram: Arc<GuestRam>,
        cfg: DeviceConfig,
        endpoint: u32,
        mode: Mode,
    ) -> Result<Self, MachineError> {
        Self::with_options(ram, cfg, endpoint, mode, MachineOptions::default())
    }

    /// As [`Machine::with_config`], with a chosen timer and clock.
    ///
    /// ```
    /// use viommu_vm::machine::{device_config, Machine, MachineOptions};
    /// use viommu_vm::{bench::{DriverMode, Mode}, GuestRam};
    /// let opts = MachineOptions::deterministic();
    /// let clock = opts.clock.clone().unwrap();
    /// let ram = GuestRam::new(8 << 20).unwrap();
    /// let mode = Mode::Driver(DriverMode::Lazy);
    /// let m = Machine::with_options(ram, device_config(8), 8, mode, opts).unwrap();
    /// let dma = m.dma().unwrap();
    /// let iova = dma.map_single(0x20000, 512, viommu_driver::DmaDirection::ToDevice).unwrap();
    /// dma.unmap_single(iova, 512, viommu_driver::DmaDirection::ToDevice).unwrap();
    /// dma.tick().unwrap(); // the clock has not moved: the UNMAP waits in its queue
    /// assert_eq!(m.counts().unmap_requests, 0);
    /// clock.advance(10_000_000); // the lazy timeout, 10 ms
    /// dma.tick().unwrap();
    /// assert_eq!((m.counts().unmap_requests, m.counts().timeout_flushes), (1, 1));
    /// ```
    pub fn with_options(
        ram: Arc<GuestRam>,
        mut cfg: DeviceConfig,
        endpoint: u32,
        mode: Mode,
        opts: MachineOptions,
    ) -> Result<Self, MachineError> {
        // Page-table modes (drafts): the device offers F_ATTACH_TABLE and
        // walks the guest's tables in guest RAM.
        let table = mode.driver_mode().is_some_and(|m| m.page_table());
        cfg.features.attach_table |= table;
        let device = Device::new(cfg)?;
        let iommu = device.iommu();
        if table {
            iommu.set_table_memory(Some(Arc::new(ram.memory().clone())));
        }
        let link = DeviceLink::start(device, ram.clone())?;
        link.set_spin(opts.spin);
        iommu.set_fault_notifier(Some(Arc::new(link.poker(EVENT_QUEUE))));
        let driver = Driver::new(link.transport(), GuestHal::new(ram.clone()), driver_options())?;
        let domain = match mode.driver_mode() {
            None => None,
            Some(m) if m.identity() => Some(driver.alloc_identity(endpoint)?),
            Some(_) => Some(driver.alloc_paging(endpoint)?),
        };
        if let Some(d) = &domain {
            if table && !d.uses_page_table() {
                return Err(viommu_driver::Error::MissingFeature("ATTACH_TABLE").into());
            }
            driver.attach(d, endpoint)?;
        }
        let MachineOptions { timer, clock, spin: _ } = opts;
        let dma = match (&domain, dma_options(mode)) {
            (Some(d), Some(dma_opts)) => {
                let resv = driver.reserved_regions(endpoint)?;
                let platform: Arc<dyn DmaPlatform> = match &clock {
                    Some(c) => c.clone(),
                    None => Arc::new(VmPlatform::default()),
                };
                Some(Arc::new(DmaDomain::new(d.clone(), &resv, dma_opts, platform)?))
            }
            _ => None,
        };
        let timer = dma.as_ref().filter(|_| timer).map(|d| Timer::start(d.clone()));
        Ok(Self { _timer: timer, dma, domain, driver, iommu, endpoint, mode, link, ram })
    }

    /// The device's shared state, for `translate()`.
    pub fn iommu(&self) -> Arc<Iommu> {
        self.iommu.clone()
    }

    /// The guest driver.
    pub fn driver(&self) -> &GuestDriver {
        &self.driver
    }

    /// The endpoint's domain (none for `Mode::NoIommu`).
    pub fn domain(&self) -> Option<&viommu_driver::Domain> {
        self.domain.as_ref()
    }

    /// CPU time and instructions the flush-queue timer thread has used
    /// (zero when there is no timer).
    pub fn timer_use(&self) -> MeterReading {
        match &self._timer {
            Some(t) => t.meter.get().map(ThreadMeter::read).unwrap_or_default(),
            None => MeterReading::ZERO,
        }
    }

    /// The transport link (counters, exit cost).
    pub fn link(&self) -> &DeviceLink<Device> {
        &self.link
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The VM-exit cost model.
    pub fn exit_cost(&self) -> &ExitCost {
        self.link.exit_cost()
    }

    /// The guest DMA API for one guest thread, as the mode calls for.
    pub fn guest_dma(&self) -> Box<dyn GuestDma + Send> {
        match &self.dma {
            None => Box::new(DirectDma),
            Some(dma) => {
                let batch = self.mode.driver_mode().is_some_and(|m| m.batch());
                Box::new(DriverDma { dma: dma.clone(), batch })
            }
        }
    }

    /// The DMA layer (paging and identity modes).
    pub fn dma(&self) -> Option<&Arc<DmaDomain>> {
        self.dma.as_ref()
    }

    /// Current counts.
    pub fn counts(&self) -> MachineCounts {
        let dev = self.iommu.counters();
        let req = |t| dev.requests_of(t);
        let drv = self.driver.counters();
        let link = self.link.stats();
        MachineCounts {
            map_requests: req(RequestType::Map),
            unmap_requests: req(RequestType::Unmap),
            requests: dev.requests.iter().sum(),
            kicks: link.kicks[0],
            interrupts: link.interrupts[0],
            wait_poll_ns: link.wait_poll_ns,
            io_poll_ns: link.io_poll_ns,
            kicks_suppressed: drv.kicks_suppressed,
            syncs: drv.syncs,
            exit_injected_ns: self.link.exit_cost().injected().as_nanos() as u64,
            timeout_flushes: drv.flushes_timeout,
            wait_timeouts: link.wait_timeouts,
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }
}

/// The DMA layer's options for each mode; `None` where no DMA layer is used.
pub fn dma_options(mode: Mode) -> Option<DmaOptions> {
    mode.driver_mode().map(|m| m.dma_options())
}

thread_local! {
    static GUEST_CPU: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Declares the calling thread to be guest CPU `cpu` (selects its per-CPU
/// IOVA cache and flush queue).
pub fn set_guest_cpu(cpu: usize) {
    GUEST_CPU.with(|c| c.set(cpu));
}

/// A clock for the DMA layer that moves only by [`ManualClock::advance`],
/// with the CPU number set by [`set_guest_cpu`].
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ns: AtomicU64,
}

impl ManualClock {
    /// Moves the clock on by `ns` nanoseconds.
    pub fn advance(&self, ns: u64) {
        self.now_ns.fetch_add(ns, Ordering::SeqCst);
    }
}

impl DmaPlatform for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::SeqCst)
    }

    fn cpu_id(&self) -> usize {
        GUEST_CPU.with(|c| c.get())
    }
}

/// Clock and CPU number for the DMA layer: the monotonic clock and the
/// number set by [`set_guest_cpu`].
#[derive(Debug)]
struct VmPlatform {
    start: std::time::Instant,
}

impl Default for VmPlatform {
    fn default() -> Self {
        Self { start: std::time::Instant::now() }
    }
}

impl DmaPlatform for VmPlatform {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn cpu_id(&self) -> usize {
        GUEST_CPU.with(|c| c.get())
    }
}

/// The guest kernel's flush-queue timer: ticks the DMA layer every 2 ms.
struct Timer {
    stop: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    meter: Arc<OnceLock<ThreadMeter>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Timer {
    fn start(dma: Arc<DmaDomain>) -> Self {
        let stop = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let s = stop.clone();
        let meter = Arc::new(OnceLock::new());
        let m = meter.clone();
        let (ready, started) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let _ = m.set(ThreadMeter::here());
            let _ = ready.send(());
            let (lock, cond) = &*s;
            let mut stopped = lock.lock().unwrap();
            while !*stopped {
                let two_ms = std::time::Duration::from_millis(2);
                let (g, _) = waiting(|| cond.wait_timeout(stopped, two_ms)).unwrap();
                stopped = g;
                if !*stopped {
                    // Errors are counted by the driver; the next tick retries.
                    let _ = dma.tick();
                }
            }
        });
        // The meter exists before the first reading of it.
        let _ = started.recv();
        Self { stop, meter, thread: Some(thread) }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        *self.stop.0.lock().unwrap() = true;
        self.stop.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn dir(d: Dir) -> DmaDirection {
    match d {
        Dir::ToDevice => DmaDirection::ToDevice,
        Dir::FromDevice => DmaDirection::FromDevice,
    }
}

fn map_err(e: viommu_driver::Error) -> MapError {
    MapError(e.to_string())
}

/// [`GuestDma`] over the driver's DMA layer. With `batch`, every buffer of
/// an I/O goes into one batch (one sync); without, each buffer is its own
/// `map_single` or `map_sg` call (one sync each, as Linux's virtio ring).
struct DriverDma {
    dma: Arc<DmaDomain>,
    batch: bool,
}

impl GuestDma for DriverDma {
    fn map_io(&mut self, bufs: &[IoBuf<'_>], out: &mut Vec<Vec<Seg>>) -> Result<IoToken, MapError> {
        reset_out(out, bufs.len());
        let pairs = |segs: &[Seg]| segs.iter().map(|s| (s.addr, s.len)).collect::<Vec<_>>();
        if self.batch {
            let mut b = self.dma.begin();
            for (buf, o) in bufs.iter().zip(out.iter_mut()) {
                match buf.segs {
                    [one] => o.push(Seg {
                        addr: b.map(one.addr, one.len, dir(buf.dir)).map_err(map_err)?,
                        len: one.len,
                    }),
                    many => o.extend(
                        b.map_sg(&pairs(many), dir(buf.dir))
                            .map_err(map_err)?
                            .into_iter()
                            .map(|s| Seg { addr: s.addr, len: s.len }),
                    ),
                }
            }
            return Ok(IoToken(TokenInner::Batch(b.commit().map_err(map_err)?)));
        }
        let mut singles = Vec::new();
        let mut sgs = Vec::new();
        let mut result = Ok(());
        for (buf, o) in bufs.iter().zip(out.iter_mut()) {
            let r = match buf.segs {
                [one] => self.dma.map_single(one.addr, one.len, dir(buf.dir)).map(|iova| {
                    singles.push((iova, one.len));
                    o.push(Seg { addr: iova, len: one.len });
                }),
                many => self.dma.map_sg(&pairs(many), dir(buf.dir)).map(|m| {
                    o.extend(m.segments.iter().map(|s| Seg { addr: s.addr, len: s.len }));
                    sgs.push(m);
                }),
            };
            if let Err(e) = r {
                result = Err(map_err(e));
                break;
            }
        }
        let token = IoToken(TokenInner::Separate(singles, sgs));
        match result {
            Ok(()) => Ok(token),
            Err(e) => {
                // Undo the buffers mapped before the failure.
                let _ = self.unmap_io(token);
                Err(e)
            }
        }
    }

    fn unmap_io(&mut self, token: IoToken) -> Result<(), MapError> {
        match token.0 {
            TokenInner::Direct => Ok(()),
            TokenInner::Batch(m) => self.dma.unmap(m).map_err(map_err),
            TokenInner::Separate(singles, sgs) => {
                let mut first = Ok(());
                for (iova, len) in singles {
                    // The direction is not used to unmap.
                    first = first.and(self.dma.unmap_single(iova, len, DmaDirection::ToDevice));
                }
                for m in sgs {
                    first = first.and(self.dma.unmap_sg(m));
                }
                first.map_err(map_err)
            }
        }
    }

    fn flush(&mut self) -> Result<(), MapError> {
        self.dma.flush().map_err(map_err)
    }
}
