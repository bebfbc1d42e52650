//! Benchmark cells: one mode × workload × request size × thread count, run
//! on a fresh VM, with exact request and kick counts from the device and the
//! transport.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::cpu::{MeterReading, ThreadMeter};
use crate::endpoint::block::{BlockDevice, BlockGuest, S_OK};
use crate::endpoint::net::{NetDevice, NetGuest};
use crate::endpoint::{DirectDma, DmaEngine, GuestDma, MapError};
use crate::histogram::Histogram;
use crate::machine::{device_config, Machine, MachineError, MachineOptions};
use crate::ram::GuestRam;

pub use viommu_driver::Mode as DriverMode;

/// What the bench runs: no IOMMU, one of our driver's modes, or a model of
/// Linux's own driver. Our driver's modes are [`DriverMode`], named and
/// described there once for the bench, the real-guest suite and the docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// No IOMMU at all: endpoints see guest-physical addresses.
    NoIommu,
    /// Our driver in one of its modes.
    Driver(DriverMode),
    /// What Linux 6.7+ does in lazy mode under virtio-blk: every descriptor
    /// (header, each data page, status, and the indirect descriptor table)
    /// mapped and synced on its own; UNMAPs deferred to per-CPU queues.
    LinuxLazy,
    /// The same per-descriptor mapping with the strict policy.
    LinuxStrict,
}

impl Mode {
    /// The default sweep, in report order: no IOMMU, then every driver mode.
    pub const ALL: [Mode; 7] = [
        Mode::NoIommu,
        Mode::Driver(DriverMode::Identity),
        Mode::Driver(DriverMode::StrictEverySync),
        Mode::Driver(DriverMode::Strict),
        Mode::Driver(DriverMode::Lazy),
        Mode::Driver(DriverMode::LazySingle),
        Mode::Driver(DriverMode::Best),
    ];

    /// Modes outside the default sweep: models of the Linux driver's own
    /// behaviour, to compare with counts from real guests.
    pub const EXTRA: [Mode; 2] = [Mode::LinuxLazy, Mode::LinuxStrict];

    /// Page-table modes (drafts, [`DriverMode::TABLE`]), outside the default
    /// sweep: the VM's device offers F_ATTACH_TABLE for them only.
    pub const TABLE: [Mode; 2] =
        [Mode::Driver(DriverMode::PgtableStrict), Mode::Driver(DriverMode::PgtableLazy)];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::NoIommu => "none",
            Mode::Driver(m) => m.name(),
            Mode::LinuxLazy => "linux-lazy",
            Mode::LinuxStrict => "linux-strict",
        }
    }

    /// Parses a [`Mode::name`].
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().chain(Mode::EXTRA).chain(Mode::TABLE).find(|m| m.name() == s)
    }

    /// Our driver's mode this runs, or for a Linux model the mode whose
    /// DMA-layer policy it uses; `None` without an IOMMU.
    pub fn driver_mode(self) -> Option<DriverMode> {
        match self {
            Mode::NoIommu => None,
            Mode::Driver(m) => Some(m),
            Mode::LinuxLazy => Some(DriverMode::Lazy),
            Mode::LinuxStrict => Some(DriverMode::Strict),
        }
    }

    /// Whether the endpoint maps each descriptor on its own and uses an
    /// indirect descriptor table, as Linux's virtio ring does.
    pub fn per_descriptor(self) -> bool {
        matches!(self, Mode::LinuxLazy | Mode::LinuxStrict)
    }

    /// One line on what the mode does.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::NoIommu => "no IOMMU: the endpoint uses guest-physical addresses",
            Mode::Driver(m) => m.describe(),
            Mode::LinuxLazy => {
                "model of Linux's driver: every descriptor mapped and synced alone, lazy"
            }
            Mode::LinuxStrict => {
                "model of Linux's driver: every descriptor mapped and synced alone, strict"
            }
        }
    }

    /// The Linux setting this mode corresponds to, or `None` when a Linux
    /// guest cannot use it.
    pub fn linux(self) -> Option<&'static str> {
        match self {
            Mode::NoIommu => Some("no IOMMU (linux-none)"),
            Mode::Driver(m) => m.linux(),
            Mode::LinuxLazy => Some("6.7+ default (DMA-FQ), as measured on 6.12"),
            Mode::LinuxStrict => Some("6.7+ iommu.strict=1, as measured on 6.12"),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the emulated endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// virtio-blk-like: header, data segments and status per request.
    Block,
    /// virtio-net-like: small packets out, RX buffers refilled.
    Net,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Block => "block",
            Workload::Net => "net",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One benchmark cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellSpec {
    /// IOMMU mode.
    pub mode: Mode,
    /// Endpoint workload.
    pub workload: Workload,
    /// Bytes per I/O (block: data bytes per request; net: bytes per packet).
    pub io_size: usize,
    /// Guest threads issuing I/O at once.
    pub threads: usize,
    /// How long the timed part runs (each thread does at least one I/O).
    pub duration: Duration,
    /// Extra delay per kick (the VM-exit cost model).
    pub exit_cost: Duration,
}

/// What one cell measured. Counts cover the timed part plus the final
/// flush of lazily deferred UNMAPs (so every MAP has its UNMAP counted);
/// the time covers the timed part only.
#[derive(Clone, Debug, PartialEq)]
pub struct CellResult {
    /// What was run.
    pub spec: CellSpec,
    /// I/Os completed (block requests, or packets).
    pub ios: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall time of the timed part, exit delays included.
    pub elapsed: Duration,
    /// MAP requests the device processed.
    pub map_requests: u64,
    /// UNMAP requests the device processed.
    pub unmap_requests: u64,
    /// Kicks of the IOMMU request queue.
    pub kicks: u64,
    /// Syncs the driver performed (waits for the device).
    pub syncs: u64,
    /// Median I/O latency.
    pub p50: Duration,
    /// 99th percentile I/O latency.
    pub p99: Duration,
    /// Total exit delay injected by the cost model, over all threads.
    pub exit_injected: Duration,
    /// Accesses the endpoint translated through the IOMMU.
    pub translations: u64,
    /// Data mismatches the endpoint or the guest found (must be 0).
    pub data_errors: u64,
    /// Translation faults (must be 0 in a benchmark).
    pub faults: u64,
    /// Completion waits that reached their time limit without an interrupt
    /// (see [`crate::LinkCounts::wait_timeouts`]).
    pub wait_timeouts: u64,
    /// Request-queue interrupts the device raised.
    pub interrupts: u64,
    /// Guest-side use: the guest threads (driver and endpoint, from the
    /// start of the timed part to their final flush) and the flush timer.
    /// Its `waiting` holds the completion waits, the kicks (with the
    /// injected exit delay) and the timer's sleeps.
    pub guest: MeterReading,
    /// Device-side use: the device's I/O thread over the same span. Its
    /// `waiting` holds the waits for kicks and the interrupts raised.
    pub device: MeterReading,
    /// Wall time the guest side polled for completions (part of its waiting).
    pub guest_poll: Duration,
    /// Wall time the I/O thread polled for kicks (part of its waiting).
    pub device_poll: Duration,
}

impl CellResult {
    /// Payload throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s == 0.0 {
            0.0
        } else {
            self.bytes as f64 / s / 1e6
        }
    }

    /// MAP plus UNMAP requests per I/O.
    pub fn requests_per_io(&self) -> f64 {
        per(self.map_requests + self.unmap_requests, self.ios)
    }

    /// Request-queue kicks per I/O.
    pub fn kicks_per_io(&self) -> f64 {
        per(self.kicks, self.ios)
    }

    /// Request-queue interrupts per I/O.
    pub fn interrupts_per_io(&self) -> f64 {
        per(self.interrupts, self.ios)
    }

    /// Guest-side CPU time per I/O doing work (driver and endpoint), in ns:
    /// waits, kicks and the injected exit delay left out
    /// ([`MeterReading::work`]).
    pub fn guest_ns_per_io(&self) -> Option<f64> {
        Some(per(self.guest.work()?.as_nanos() as u64, self.ios))
    }

    /// Device-side (I/O thread) CPU time per I/O doing work, in ns: waiting
    /// for kicks and raising interrupts left out.
    pub fn device_ns_per_io(&self) -> Option<f64> {
        Some(per(self.device.work()?.as_nanos() as u64, self.ios))
    }

    /// Guest plus device CPU time per I/O doing work, in ns: the figure the
    /// summary ranks by.
    pub fn cpu_ns_per_io(&self) -> Option<f64> {
        Some(self.guest_ns_per_io()? + self.device_ns_per_io()?)
    }

    /// CPU time per I/O both sides spent waiting and signalling (spins,
    /// sleeps and wakeups, eventfd writes, the injected exit delay), in ns:
    /// what [`CellResult::cpu_ns_per_io`] leaves out. It moves with
    /// scheduling; the host model prices kicks and interrupts instead.
    pub fn waiting_ns_per_io(&self) -> f64 {
        per((self.guest.waiting + self.device.waiting).as_nanos() as u64, self.ios)
    }

    /// Polling (both sides, wall time) per I/O in ns: what the spin-then-block
    /// waits cost on top of [`CellResult::cpu_ns_per_io`]; it grows with
    /// the other side's scheduling delay.
    pub fn poll_ns_per_io(&self) -> f64 {
        per((self.guest_poll + self.device_poll).as_nanos() as u64, self.ios)
    }

    /// User-space instructions per I/O, guest and device side together
    /// (`None` without a hardware PMU).
    pub fn instructions_per_io(&self) -> Option<f64> {
        let n = self.guest.instructions? + self.device.instructions?;
        Some(per(n, self.ios))
    }
}

fn per(n: u64, ios: u64) -> f64 {
    if ios == 0 {
        0.0
    } else {
        n as f64 / ios as f64
    }
}

/// Why a cell could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Building the VM failed.
    #[error("VM setup: {0}")]
    Machine(#[from] MachineError),
    /// A guest mapping failed during the run.
    #[error("{0}")]
    Map(#[from] MapError),
    /// Guest RAM could not be mapped.
    #[error("{0}")]
    Ram(#[from] crate::RamError),
    /// The spec is unusable.
    #[error("bad cell: {0}")]
    Spec(String),
}

/// Packets per net round (one NAPI-like batch).
pub const NET_BATCH: usize = 32;

/// Endpoint ID of the emulated device in benchmarks.
pub const BENCH_ENDPOINT: u32 = 8;

fn ram_size(spec: &CellSpec) -> usize {
    // Scattered data pages use twice their size while allocating; rings,
    // request buffers and the driver's own pages fit in the 32 MiB extra.
    let per_thread = match spec.workload {
        Workload::Block => 2 * spec.io_size + (64 << 10),
        Workload::Net => 2 * NET_BATCH * 4096,
    };
    (spec.threads * per_thread + (32 << 20)).next_multiple_of(4096)
}

/// What one guest thread counted.
#[derive(Default)]
struct ThreadTally {
    ios: u64,
    bytes: u64,
    errors: u64,
    lat: Histogram,
    end: Option<Instant>,
    used: MeterReading,
}

/// Runs one cell on a fresh VM and returns what it measured.
///
/// ```
/// use std::time::Duration;
/// use viommu_vm::bench::{run_cell, CellSpec, DriverMode, Mode, Workload};
/// let r = run_cell(&CellSpec {
///     mode: Mode::Driver(DriverMode::Best),
///     workload: Workload::Block,
///     io_size: 16 << 10,
///     threads: 1,
///     duration: Duration::from_millis(20),
///     exit_cost: Duration::ZERO,
/// })
/// .unwrap();
/// assert!(r.ios > 0 && r.data_errors == 0);
/// // Header+status page and 4 data pages: 5 MAPs per I/O.
/// assert_eq!(r.map_requests, 5 * r.ios);
/// // One sync per I/O, plus the flush timer's and the final flush; each
/// // kicks at most once. (Kicks per I/O depend on timing: see
/// // tests/counts.rs for exact counts on a controlled clock.)
/// assert!(r.kicks <= r.syncs);
/// println!("{:.2} kicks per I/O", r.kicks_per_io());
/// ```
pub fn run_cell(spec: &CellSpec) -> Result<CellResult, BenchError> {
    run(spec, Span::Timed, MachineOptions::default())
}

/// Runs one cell of one guest thread for a fixed number of steps (block
/// requests, or net rounds of [`NET_BATCH`] packets) so that an instruction
/// counter outside the process can count them: `warmup` steps, a flush of
/// the deferred UNMAPs, then [`count_window_start`], `window` steps, a
/// flush, and [`count_window_end`]. The VM is
/// [`MachineOptions::deterministic`] (no flush timer, a clock that does not
/// move), so that what runs between the marks does not depend on how fast
/// the machine runs, e.g. under valgrind. Returns the result of the whole
/// run (warm-up included) and the I/Os inside the window.
///
/// ```
/// use std::time::Duration;
/// use viommu_vm::bench::{count_cell, CellSpec, DriverMode, Mode, Workload};
/// let spec = CellSpec {
///     mode: Mode::Driver(DriverMode::Lazy),
///     workload: Workload::Block,
///     io_size: 4096,
///     threads: 1,
///     duration: Duration::ZERO,
///     exit_cost: Duration::ZERO,
/// };
/// let (r, window) = count_cell(&spec, 4, 16).unwrap();
/// assert_eq!((r.ios, window), (20, 16));
/// // Nothing flushed by time: every UNMAP went out in a flush of a count.
/// assert_eq!(r.map_requests, r.unmap_requests);
/// ```
pub fn count_cell(
    spec: &CellSpec,
    warmup: u64,
    window: u64,
) -> Result<(CellResult, u64), BenchError> {
    if spec.threads != 1 {
        return Err(BenchError::Spec("a counted cell has one guest thread".into()));
    }
    let r = run(spec, Span::Counted { warmup, window }, MachineOptions::deterministic());
    // The VM and its I/O thread are gone; without a VM nobody read the marks.
    WINDOW.store(0, Ordering::Release);
    let r = r?;
    let per_step = match spec.workload {
        Workload::Block => 1,
        Workload::Net => NET_BATCH as u64,
    };
    Ok((r, window * per_step))
}

/// Where the counted window of [`count_cell`] starts, on the thread that
/// calls it: an instruction counter zeroes the thread's counts on entering
/// it ([`COUNT_START_SYMBOL`]). The guest thread calls it, and the device's
/// I/O thread the next time it wakes ([`device_count_marks`]), as callgrind
/// zeroes and dumps the calling thread only.
#[inline(never)]
pub fn count_window_start() {
    std::hint::black_box(COUNT_MARKS.fetch_add(1, Ordering::Relaxed));
}

/// Where the counted window of [`count_cell`] ends, on the calling thread:
/// an instruction counter dumps the thread's counts on leaving it
/// ([`COUNT_END_SYMBOL`]).
#[inline(never)]
pub fn count_window_end() {
    // Another body than the start's, so that the two are never merged.
    std::hint::black_box(COUNT_MARKS.fetch_add(1 << 32, Ordering::Relaxed));
}

/// The guest's window marks for the device side: set when the guest opened
/// its window, when the device saw it open, and when the guest closed it.
static WINDOW: AtomicU8 = AtomicU8::new(0);
const WINDOW_OPEN: u8 = 1;
const WINDOW_SEEN: u8 = 2;
const WINDOW_CLOSED: u8 = 4;

/// Called by the device's I/O thread each time it wakes, before it looks
/// at its queues: follows the guest's marks of a [`count_cell`] window, so
/// that the device's counts cover the requests of the window's I/Os (the
/// device is idle at both marks: the guest has just flushed and synced).
/// One load when no window is open.
pub fn device_count_marks() {
    let w = WINDOW.load(Ordering::Acquire);
    if w == 0 {
        return;
    }
    if w & WINDOW_SEEN == 0 {
        count_window_start();
        WINDOW.fetch_or(WINDOW_SEEN, Ordering::AcqRel);
    }
    if w & WINDOW_CLOSED != 0 {
        count_window_end();
        WINDOW.store(0, Ordering::Release);
    }
}

/// The demangled name of [`count_window_start`], as callgrind matches it.
pub const COUNT_START_SYMBOL: &str = "viommu_vm::bench::count_window_start";

/// The demangled name of [`count_window_end`].
pub const COUNT_END_SYMBOL: &str = "viommu_vm::bench::count_window_end";

static COUNT_MARKS: AtomicU64 = AtomicU64::new(0);

/// How long the timed part of a cell runs.
#[derive(Clone, Copy, Debug)]
enum Span {
    /// Until the spec's duration passed; each thread does at least one step.
    Timed,
    /// [`count_cell`]'s warm-up and window, in steps.
    Counted { warmup: u64, window: u64 },
}

/// Runs `step` (one block request or net round, given its index) as `span`
/// says.
fn drive(
    span: Span,
    duration: Duration,
    dma: &mut dyn GuestDma,
    mut step: impl FnMut(&mut dyn GuestDma, u64) -> Result<(), BenchError>,
) -> Result<(), BenchError> {
    match span {
        Span::Timed => {
            let deadline = Instant::now() + duration;
            let mut i = 0u64;
            // At least one step per thread, however late it got to run.
            while i == 0 || Instant::now() < deadline {
                step(dma, i)?;
                i += 1;
            }
        }
        Span::Counted { warmup, window } => {
            for i in 0..warmup {
                step(dma, i)?;
            }
            dma.flush()?;
            WINDOW.store(WINDOW_OPEN, Ordering::Release);
            count_window_start();
            for i in warmup..warmup + window {
                step(dma, i)?;
            }
            dma.flush()?;
            count_window_end();
            WINDOW.fetch_or(WINDOW_CLOSED, Ordering::AcqRel);
        }
    }
    Ok(())
}

fn run(spec: &CellSpec, span: Span, opts: MachineOptions) -> Result<CellResult, BenchError> {
    if spec.threads == 0 || spec.io_size == 0 {
        return Err(BenchError::Spec("threads and io_size must be positive".into()));
    }
    if spec.workload == Workload::Block && spec.io_size % 512 != 0 {
        return Err(BenchError::Spec("block requests are whole 512-byte sectors".into()));
    }
    if spec.workload == Workload::Net && spec.io_size > crate::endpoint::net::BUF_LEN {
        return Err(BenchError::Spec("net packets are at most 2048 bytes".into()));
    }
    let ram = GuestRam::new(ram_size(spec))?;
    let machine = match spec.mode {
        Mode::NoIommu => None,
        mode => Some(Machine::with_options(
            ram.clone(),
            device_config(BENCH_ENDPOINT),
            BENCH_ENDPOINT,
            mode,
            opts,
        )?),
    };
    if let Some(m) = &machine {
        m.exit_cost().set_per_kick(spec.exit_cost);
    }
    let engine = Arc::new(match &machine {
        None => DmaEngine::direct(ram.clone()),
        Some(m) => DmaEngine::translated(ram.clone(), m.iommu(), BENCH_ENDPOINT),
    });
    let mut dmas: Vec<Box<dyn GuestDma + Send>> = Vec::with_capacity(spec.threads);
    for _ in 0..spec.threads {
        dmas.push(match &machine {
            Some(m) => m.guest_dma(),
            None => Box::new(DirectDma),
        });
    }
    let before = machine.as_ref().map(|m| m.counts());
    let barrier = Barrier::new(spec.threads + 1);
    let net_errors = Arc::new(AtomicU64::new(0));
    let block_dev = BlockDevice::new(engine.clone());
    let mut tallies = Vec::with_capacity(spec.threads);
    let (start, side_start) = std::thread::scope(|scope| -> Result<_, BenchError> {
        let mut handles = Vec::new();
        for (t, mut dma) in dmas.into_iter().enumerate() {
            let (ram, barrier, block_dev) = (ram.clone(), &barrier, &block_dev);
            let (engine, net_errors) = (engine.clone(), net_errors.clone());
            let spec = *spec;
            handles.push(scope.spawn(move || -> Result<ThreadTally, BenchError> {
                crate::machine::set_guest_cpu(t);
                let meter = ThreadMeter::here();
                let mut tally = ThreadTally::default();
                let start_use;
                match spec.workload {
                    Workload::Block => {
                        // Every thread reaches the barrier, even one whose setup failed.
                        let setup = BlockGuest::new(ram, spec.io_size)
                            .and_then(|g| g.with_indirect(spec.mode.per_descriptor()));
                        barrier.wait();
                        start_use = meter.read();
                        let mut guest = setup?;
                        let mut scratch = Vec::with_capacity(spec.io_size);
                        // Each thread has its own 1 GiB of the emulated disk.
                        let sectors = (spec.io_size / 512) as u64;
                        let base = (t as u64) << 21;
                        drive(span, spec.duration, &mut *dma, |dma, i| {
                            let t0 = Instant::now();
                            let sector = base + (i * sectors) % (1 << 21);
                            let out = guest.io(dma, block_dev, i % 2 == 1, sector, &mut scratch)?;
                            tally.lat.record(t0.elapsed());
                            if out.status != S_OK || !out.data_ok {
                                tally.errors += 1;
                            }
                            tally.ios += 1;
                            tally.bytes += spec.io_size as u64;
                            Ok(())
                        })?;
                        tally.end = Some(Instant::now());
                    }
                    Workload::Net => {
                        let mut dev = NetDevice::new(engine, net_errors);
                        let setup = NetGuest::new(ram, NET_BATCH, spec.io_size)
                            .and_then(|mut g| g.fill_rx(&mut *dma, &mut dev).map(|()| g));
                        barrier.wait();
                        start_use = meter.read();
                        let mut guest = setup?;
                        drive(span, spec.duration, &mut *dma, |dma, _| {
                            let t0 = Instant::now();
                            guest.round(dma, &mut dev)?;
                            tally.lat.record(t0.elapsed());
                            tally.ios += NET_BATCH as u64;
                            tally.bytes += (NET_BATCH * spec.io_size) as u64;
                            Ok(())
                        })?;
                        tally.end = Some(Instant::now());
                        guest.drain(&mut *dma, &mut dev)?;
                        tally.errors += guest.rx_errors;
                    }
                }
                // Deferred UNMAPs go out now, so that every MAP's UNMAP is counted.
                dma.flush()?;
                tally.used = meter.read().since(&start_use);
                Ok(tally)
            }));
        }
        barrier.wait();
        let start = Instant::now();
        let side_start = side_use(machine.as_ref());
        for h in handles {
            tallies.push(h.join().expect("guest thread panicked")?);
        }
        Ok((start, side_start))
    })?;
    let side_used = {
        let (timer, device) = side_use(machine.as_ref());
        (timer.since(&side_start.0), device.since(&side_start.1))
    };
    let guest = tallies.iter().map(|t| t.used).fold(side_used.0, |a, b| a.plus(&b));
    let end = tallies.iter().filter_map(|t| t.end).max().unwrap_or(start);
    let mut lat = Histogram::default();
    tallies.iter().for_each(|t| lat.merge(&t.lat));
    let counts = match (&machine, before) {
        (Some(m), Some(b)) => m.counts().since(&b),
        _ => Default::default(),
    };
    Ok(CellResult {
        spec: *spec,
        ios: tallies.iter().map(|t| t.ios).sum(),
        bytes: tallies.iter().map(|t| t.bytes).sum(),
        elapsed: end - start,
        map_requests: counts.map_requests,
        unmap_requests: counts.unmap_requests,
        kicks: counts.kicks,
        syncs: counts.syncs,
        p50: lat.quantile(0.5),
        p99: lat.quantile(0.99),
        exit_injected: Duration::from_nanos(counts.exit_injected_ns),
        translations: engine.translations(),
        data_errors: tallies.iter().map(|t| t.errors).sum::<u64>()
            + block_dev.data_errors()
            + net_errors.load(Ordering::Relaxed),
        faults: engine.faults(),
        wait_timeouts: counts.wait_timeouts,
        interrupts: counts.interrupts,
        guest,
        device: side_used.1,
        guest_poll: Duration::from_nanos(counts.wait_poll_ns),
        device_poll: Duration::from_nanos(counts.io_poll_ns),
    })
}

/// The flush timer's and the I/O thread's use so far (zero without a VM).
fn side_use(machine: Option<&Machine>) -> (MeterReading, MeterReading) {
    match machine {
        Some(m) => (m.timer_use(), m.link().io_thread_use()),
        None => (MeterReading::ZERO, MeterReading::ZERO),
    }
}
