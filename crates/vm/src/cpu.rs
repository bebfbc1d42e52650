//! Per-thread cost meters for the bench: CPU time from the thread's CPU
//! clock (`pthread_getcpuclockid`), and user-space instructions retired
//! from a per-thread `perf_event_open` counter where the kernel offers a
//! hardware PMU (in many VMs it does not: then [`instructions_unavailable`]
//! says why).
//!
//! A meter is made on the thread it measures and can be read from any
//! thread while that thread lives.
//!
//! Waiting is not work: code that waits or signals another thread (a
//! completion wait, a kick's eventfd write, the I/O thread's sleep) runs
//! inside [`waiting`], which adds the CPU time it took to the meter's
//! [`MeterReading::waiting`]. [`MeterReading::work`] is the CPU time without
//! it (and without the clock reads the brackets cost), so that a spin that
//! happened to miss, a sleep and its wakeup, or a spin stretched by a
//! preemption do not count as what a policy costs. On a thread without a
//! meter, [`waiting`] reads no clock.
//!
//! ```
//! let m = viommu_vm::cpu::ThreadMeter::here();
//! let a = m.read();
//! let mut x = 0u64;
//! for i in 0..1_000_000u64 { x = x.wrapping_add(i * i); }
//! std::hint::black_box(x);
//! let b = m.read();
//! assert!(b.cpu.unwrap() > a.cpu.unwrap());
//! ```

use std::cell::RefCell;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use perf_event_open_sys as perf;

/// One reading of a [`ThreadMeter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterReading {
    /// CPU time the thread has used (`None` once the thread is gone).
    pub cpu: Option<Duration>,
    /// User-space instructions it has retired (`None` without a PMU).
    pub instructions: Option<u64>,
    /// Part of `cpu` spent inside [`waiting`] brackets.
    pub waiting: Duration,
    /// How many [`waiting`] brackets ran.
    pub brackets: u64,
}

impl MeterReading {
    /// A reading of nothing used (a thread that does not exist).
    pub const ZERO: MeterReading = MeterReading {
        cpu: Some(Duration::ZERO),
        instructions: Some(0),
        waiting: Duration::ZERO,
        brackets: 0,
    };

    /// What was used between `earlier` and `self`.
    pub fn since(&self, earlier: &MeterReading) -> MeterReading {
        MeterReading {
            cpu: self.cpu.zip(earlier.cpu).map(|(a, b)| a.saturating_sub(b)),
            instructions: self
                .instructions
                .zip(earlier.instructions)
                .map(|(a, b)| a.saturating_sub(b)),
            waiting: self.waiting.saturating_sub(earlier.waiting),
            brackets: self.brackets.saturating_sub(earlier.brackets),
        }
    }

    /// Both threads' use together (`None` figures stay `None`).
    pub fn plus(&self, other: &MeterReading) -> MeterReading {
        MeterReading {
            cpu: self.cpu.zip(other.cpu).map(|(a, b)| a + b),
            instructions: self.instructions.zip(other.instructions).map(|(a, b)| a + b),
            waiting: self.waiting + other.waiting,
            brackets: self.brackets + other.brackets,
        }
    }

    /// CPU time doing work: `cpu` without the time inside [`waiting`]
    /// brackets and without what the brackets' own clock reads cost outside
    /// them ([`bracket_cost`] each).
    pub fn work(&self) -> Option<Duration> {
        let brackets = bracket_cost().saturating_mul(self.brackets.min(u32::MAX as u64) as u32);
        Some(self.cpu?.saturating_sub(self.waiting).saturating_sub(brackets))
    }
}

/// What the calling thread's meter has counted inside [`waiting`].
#[derive(Debug, Default)]
struct Waits {
    ns: AtomicU64,
    brackets: AtomicU64,
}

thread_local! {
    /// The calling thread's [`Waits`], once it has a meter.
    static WAITS: RefCell<Option<(libc::clockid_t, Arc<Waits>)>> = const { RefCell::new(None) };
}

/// Runs `f`, which waits for or signals another thread, and counts the CPU
/// time it took as waiting on the calling thread's meter (if it has one).
///
/// ```
/// use viommu_vm::cpu::{waiting, ThreadMeter};
/// let m = ThreadMeter::here();
/// let a = m.read();
/// waiting(|| std::thread::sleep(std::time::Duration::from_millis(1)));
/// let b = m.read().since(&a);
/// assert_eq!(b.brackets, 1);
/// assert!(b.waiting <= b.cpu.unwrap());
/// ```
///
/// Never inlined, so that it stays a function of its own that callgrind can
/// leave out of its instruction counts by name (`--toggle-collect=`
/// [`WAITING_SYMBOL`], the instruction count of `viommu bench`).
#[inline(never)]
pub fn waiting<R>(f: impl FnOnce() -> R) -> R {
    let Some((clock, waits)) = WAITS.with(|w| w.borrow().clone()) else {
        return f();
    };
    let t0 = read_clock(clock);
    let r = f();
    if let (Some(t0), Some(t1)) = (t0, read_clock(clock)) {
        waits.ns.fetch_add(t1.saturating_sub(t0).as_nanos() as u64, Ordering::Relaxed);
    }
    waits.brackets.fetch_add(1, Ordering::Relaxed);
    r
}

/// The demangled name of every instance of [`waiting`], as a callgrind
/// function pattern.
pub const WAITING_SYMBOL: &str = "viommu_vm::cpu::waiting*";

/// CPU time one empty [`waiting`] bracket leaves outside its own count
/// (its clock reads), measured once on the first call: the least over a
/// few rounds of many brackets.
pub fn bracket_cost() -> Duration {
    static COST: OnceLock<Duration> = OnceLock::new();
    *COST.get_or_init(|| {
        std::thread::spawn(|| {
            let m = ThreadMeter::here();
            (0..5)
                .filter_map(|_| {
                    let a = m.read();
                    for _ in 0..200 {
                        waiting(|| ());
                    }
                    let d = m.read().since(&a);
                    Some(d.cpu?.saturating_sub(d.waiting) / 200)
                })
                .min()
                .unwrap_or_default()
        })
        .join()
        .unwrap_or_default()
    })
}

/// The CPU clock and instruction counter of one thread.
#[derive(Debug)]
pub struct ThreadMeter {
    clock: Option<libc::clockid_t>,
    instructions: Option<File>,
    waits: Arc<Waits>,
}

impl ThreadMeter {
    /// A meter for the calling thread; from now on its [`waiting`] brackets
    /// count on this meter.
    pub fn here() -> Self {
        let clock = own_clock();
        let waits = Arc::new(Waits::default());
        if let Some(c) = clock {
            WAITS.with(|w| *w.borrow_mut() = Some((c, waits.clone())));
        }
        Self { clock, instructions: open_instruction_counter().ok(), waits }
    }

    /// The thread's use so far.
    pub fn read(&self) -> MeterReading {
        MeterReading {
            cpu: self.clock.and_then(read_clock),
            instructions: self.instructions.as_ref().and_then(read_counter),
            waiting: Duration::from_nanos(self.waits.ns.load(Ordering::Relaxed)),
            brackets: self.waits.brackets.load(Ordering::Relaxed),
        }
    }
}

/// Why instructions cannot be counted here, or `None` when they can.
pub fn instructions_unavailable() -> Option<&'static str> {
    static WHY: OnceLock<Option<String>> = OnceLock::new();
    WHY.get_or_init(|| {
        open_instruction_counter().err().map(|e| {
            let hint = match e.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::EOPNOTSUPP) => ": no hardware PMU (usual in a VM)",
                Some(libc::EACCES) | Some(libc::EPERM) => ": not permitted (perf_event_paranoid)",
                _ => "",
            };
            format!("perf_event_open(instructions) failed: {e}{hint}")
        })
    })
    .as_deref()
}

fn own_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: pthread_self() is the calling, live thread and `clock` is a
    // valid place for the result.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

fn read_clock(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write; an invalid clock (the
    // thread has exited) makes the call fail, which we report as None.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

/// A counter of the calling thread's user-space instructions, counting from now.
fn open_instruction_counter() -> std::io::Result<File> {
    let mut attr = perf::bindings::perf_event_attr {
        size: std::mem::size_of::<perf::bindings::perf_event_attr>() as u32,
        type_: perf::bindings::PERF_TYPE_HARDWARE,
        config: perf::bindings::PERF_COUNT_HW_INSTRUCTIONS as u64,
        ..Default::default()
    };
    // User space only: what perf_event_paranoid 2 (a common default) allows.
    attr.set_exclude_kernel(1);
    attr.set_exclude_hv(1);
    let flags = perf::bindings::PERF_FLAG_FD_CLOEXEC as libc::c_ulong;
    // SAFETY: `attr` is a zero-initialised perf_event_attr with its size
    // set; pid 0 / cpu -1 is "this thread, any CPU"; no group fd.
    let fd = unsafe { perf::perf_event_open(&mut attr, 0, -1, -1, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by perf_event_open and nothing else owns it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

fn read_counter(mut f: &File) -> Option<u64> {
    let mut buf = [0u8; 8];
    f.read_exact(&mut buf).ok()?;
    Some(u64::from_ne_bytes(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_subtracts_and_keeps_missing_figures_missing() {
        let us = Duration::from_micros;
        let a = MeterReading { cpu: Some(us(5)), instructions: None, ..MeterReading::ZERO };
        let b =
            MeterReading { cpu: Some(us(12)), instructions: Some(9), waiting: us(3), brackets: 2 };
        assert_eq!(
            b.since(&a),
            MeterReading { cpu: Some(us(7)), instructions: None, waiting: us(3), brackets: 2 }
        );
        assert_eq!(a.since(&b).cpu, Some(Duration::ZERO));
        assert_eq!(a.plus(&b).cpu, Some(us(17)));
    }

    #[test]
    fn work_leaves_out_what_ran_inside_waiting_brackets() {
        let m = ThreadMeter::here();
        let spin = |n: u64| {
            let mut x = 0u64;
            for i in 0..n {
                x = x.wrapping_add(i ^ (x >> 3));
            }
            std::hint::black_box(x);
        };
        let a = m.read();
        spin(2_000_000);
        let work_only = m.read().since(&a);
        let b = m.read();
        spin(2_000_000);
        waiting(|| spin(20_000_000));
        let with_wait = m.read().since(&b);
        assert_eq!(with_wait.brackets, 1);
        // Ten times the work ran as waiting: it is in cpu, not in work.
        assert!(with_wait.waiting > work_only.cpu.unwrap() * 5, "{with_wait:?} {work_only:?}");
        assert!(with_wait.work().unwrap() < work_only.cpu.unwrap() * 3, "{with_wait:?}");
    }

    #[test]
    fn a_thread_without_a_meter_counts_no_waiting() {
        let n = std::thread::spawn(|| waiting(|| 7) + WAITS.with(|w| w.borrow().is_some() as i32))
            .join()
            .unwrap();
        assert_eq!(n, 7);
    }

    #[test]
    fn counter_availability_matches_the_probe() {
        let m = ThreadMeter::here();
        assert_eq!(m.read().instructions.is_some(), instructions_unavailable().is_none());
    }

    #[test]
    fn another_thread_reads_a_live_threads_clock() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let m = ThreadMeter::here();
            let mut x = 0u64;
            for i in 0..2_000_000u64 {
                x = x.wrapping_add(i ^ (x >> 3));
            }
            std::hint::black_box(x);
            tx.send(m).unwrap();
            done_rx.recv().unwrap();
        });
        let m = rx.recv().unwrap();
        assert!(m.read().cpu.unwrap() > Duration::ZERO);
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
