//! `viommu sample-cpu`: runs a command (a QEMU boot of the real-guest
//! suite) and copies its standard output, adding to each `VG PERF` line the
//! CPU time the command's process used between the last two `VG SAMPLE`
//! lines before it, as `host_cpu_ns=N`, and between the two before those
//! (the guest's calibration loop), as `calib_cpu_ns=N`.
//!
//! Under TCG the QEMU process's CPU time is what a guest's work costs, and
//! unlike the guest's clock (the host's wall clock) it does not grow when
//! other work takes the host's cores. The guest prints `VG SAMPLE` and then
//! sleeps briefly, so that the sample lands while the guest is idle.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::process::{Command, ExitCode, Stdio};

/// The line the guest prints where a sample should be taken.
pub const SAMPLE: &[u8] = b"VG SAMPLE";
/// The lines that get the CPU time between the last two samples.
pub const PERF: &[u8] = b"VG PERF ";
/// The longest piece of output read as one line.
const MAX_LINE: u64 = 64 << 10;

/// Reads the CPU time of process `pid` (all its threads, the ones that
/// ended included), in nanoseconds.
fn process_cpu_ns(pid: u32) -> io::Result<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock ID; the call reads only
    // its arguments.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// The last three samples since the last `VG PERF` line, newest last
/// (`None`: not taken, or could not be read).
#[derive(Debug, Default)]
pub struct Sampler {
    samples: [Option<u64>; 3],
}

impl Sampler {
    /// Takes one output line (with its line ending) and the CPU time read
    /// when it arrived (`None`: not read, the line is no sample); returns
    /// the line to write.
    pub fn line(&mut self, line: &[u8], cpu_ns: impl FnOnce() -> Option<u64>) -> Vec<u8> {
        let text = trim_end(line);
        if text.starts_with(SAMPLE) {
            self.samples.rotate_left(1);
            self.samples[2] = cpu_ns();
            return line.to_vec();
        }
        if !text.starts_with(PERF) {
            return line.to_vec();
        }
        let [a, b, c] = std::mem::take(&mut self.samples);
        let window = |from: Option<u64>, to: Option<u64>| to?.checked_sub(from?);
        let mut out = text.to_vec();
        for (key, w) in [("host_cpu_ns", window(b, c)), ("calib_cpu_ns", window(a, b))] {
            if let Some(w) = w {
                out.extend_from_slice(format!(" {key}={w}").as_bytes());
            }
        }
        out.extend_from_slice(&line[text.len()..]);
        out
    }
}

/// `line` without its `\n` or `\r\n`.
fn trim_end(line: &[u8]) -> &[u8] {
    let mut t = line;
    while let [rest @ .., b'\n' | b'\r'] = t {
        t = rest;
    }
    t
}

/// Runs `cmd`: its standard output, with the samples added, goes to ours;
/// returns its exit status. The command gets SIGKILL if we die first (for
/// `timeout`, which signals us).
pub fn run(cmd: &[String]) -> ExitCode {
    let Some((prog, args)) = cmd.split_first() else {
        eprintln!("sample-cpu: no command");
        return ExitCode::from(2);
    };
    let mut command = Command::new(prog);
    command.args(args).stdout(Stdio::piped());
    // SAFETY: the closure runs in the child between fork and exec and calls
    // only prctl, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sample-cpu: {prog}: {e}");
            return ExitCode::from(127);
        }
    };
    let pid = child.id();
    let mut from = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut to = io::stdout().lock();
    let mut sampler = Sampler::default();
    let mut line = Vec::new();
    let mut warned = false;
    loop {
        line.clear();
        // Bounded: a console that never ends a line is copied in pieces.
        match (&mut from).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("sample-cpu: reading the output: {e}");
                break;
            }
        }
        let out = sampler.line(&line, || match process_cpu_ns(pid) {
            Ok(ns) => Some(ns),
            Err(e) => {
                if !warned {
                    eprintln!("sample-cpu: CPU time of {pid}: {e}");
                    warned = true;
                }
                None
            }
        });
        // Flushed per line: the file is read while the boot runs.
        if to.write_all(&out).and_then(|()| to.flush()).is_err() {
            break;
        }
    }
    match child.wait() {
        Ok(s) => match s.code() {
            Some(c) => ExitCode::from(c as u8),
            None => {
                use std::os::unix::process::ExitStatusExt;
                ExitCode::from(128u8.wrapping_add(s.signal().unwrap_or(0) as u8))
            }
        },
        Err(e) => {
            eprintln!("sample-cpu: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(s: &mut Sampler, line: &str, cpu: u64) -> String {
        String::from_utf8(s.line(line.as_bytes(), || Some(cpu))).unwrap()
    }

    #[test]
    fn a_perf_line_gets_the_cpu_of_the_last_two_windows() {
        let mut s = Sampler::default();
        assert_eq!(feed(&mut s, "VG BOOTED\r\n", 1), "VG BOOTED\r\n");
        assert_eq!(feed(&mut s, "VG SAMPLE\r\n", 100), "VG SAMPLE\r\n");
        // One sample is no window yet.
        assert_eq!(feed(&mut s, "VG PERF a ios=1\r\n", 150), "VG PERF a ios=1\r\n");
        feed(&mut s, "VG SAMPLE\r\n", 1_000);
        feed(&mut s, "VG SAMPLE\n", 1_250);
        feed(&mut s, "VG SAMPLE\n", 4_000);
        let perf = feed(&mut s, "VG PERF b ios=1\r\n", 9_999);
        assert_eq!(perf, "VG PERF b ios=1 host_cpu_ns=2750 calib_cpu_ns=250\r\n");
        // Each window goes to one PERF line only.
        assert_eq!(feed(&mut s, "VG PERF c ios=1\n", 10_000), "VG PERF c ios=1\n");
        // The last three samples count.
        for cpu in [5, 10, 20, 40, 80] {
            feed(&mut s, "VG SAMPLE\n", cpu);
        }
        assert_eq!(feed(&mut s, "VG PERF d\n", 0), "VG PERF d host_cpu_ns=40 calib_cpu_ns=20\n");
    }

    #[test]
    fn a_sample_that_cannot_be_read_leaves_its_windows_out() {
        let mut s = Sampler::default();
        feed(&mut s, "VG SAMPLE\n", 100);
        feed(&mut s, "VG SAMPLE\n", 200);
        let _ = s.line(b"VG SAMPLE\n", || None);
        assert_eq!(feed(&mut s, "VG PERF a\n", 0), "VG PERF a calib_cpu_ns=100\n");
        // A clock that went back gives no window either.
        feed(&mut s, "VG SAMPLE\n", 300);
        feed(&mut s, "VG SAMPLE\n", 200);
        assert_eq!(feed(&mut s, "VG PERF b\n", 0), "VG PERF b\n");
        // Bytes that are not UTF-8 pass through.
        assert_eq!(s.line(b"\xff\xfe x\n", || None), b"\xff\xfe x\n");
    }

    #[test]
    fn our_own_cpu_time_reads_and_grows() {
        let me = std::process::id();
        let a = process_cpu_ns(me).unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = process_cpu_ns(me).unwrap();
        assert!(b > a, "{a} then {b}");
    }
}
