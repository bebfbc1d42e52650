//! Per-thread cost meters for the bench: CPU time from the thread's CPU
//! clock (`pthread_getcpuclockid`), and user-space instructions retired
//! from a per-thread `perf_event_open` counter where the kernel offers a
//! hardware PMU (in many VMs it does not: then [`instructions_unavailable`]
//! says why).
//!
//! A meter is made on the thread it measures and can be read from any
//! thread while that thread lives.
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

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::time::Duration;

use perf_event_open_sys as perf;

/// One reading of a [`ThreadMeter`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeterReading {
    /// CPU time the thread has used (`None` once the thread is gone).
    pub cpu: Option<Duration>,
    /// User-space instructions it has retired (`None` without a PMU).
    pub instructions: Option<u64>,
}

impl MeterReading {
    /// What was used between `earlier` and `self`.
    pub fn since(&self, earlier: &MeterReading) -> MeterReading {
        MeterReading {
            cpu: self.cpu.zip(earlier.cpu).map(|(a, b)| a.saturating_sub(b)),
            instructions: self
                .instructions
                .zip(earlier.instructions)
                .map(|(a, b)| a.saturating_sub(b)),
        }
    }
}

/// The CPU clock and instruction counter of one thread.
#[derive(Debug)]
pub struct ThreadMeter {
    clock: Option<libc::clockid_t>,
    instructions: Option<File>,
}

impl ThreadMeter {
    /// A meter for the calling thread.
    pub fn here() -> Self {
        Self { clock: own_clock(), instructions: open_instruction_counter().ok() }
    }

    /// The thread's use so far.
    pub fn read(&self) -> MeterReading {
        MeterReading {
            cpu: self.clock.and_then(read_clock),
            instructions: self.instructions.as_ref().and_then(read_counter),
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
        let a = MeterReading { cpu: Some(Duration::from_micros(5)), instructions: None };
        let b = MeterReading { cpu: Some(Duration::from_micros(12)), instructions: Some(9) };
        assert_eq!(
            b.since(&a),
            MeterReading { cpu: Some(Duration::from_micros(7)), instructions: None }
        );
        assert_eq!(a.since(&b).cpu, Some(Duration::ZERO));
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
