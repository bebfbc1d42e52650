//! The load guard: how busy the machine was with other work before and
//! during the run, from `/proc/loadavg`, `/proc/stat` (all CPUs' busy
//! time) and our own process's CPU time. Readings come through
//! [`LoadSource`] so that tests can inject them.

use std::time::{Duration, Instant};

/// CPUs' worth of other work above which the run counts as busy.
pub const BUSY_OTHERS: f64 = 0.25;

/// One reading of the machine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadReading {
    /// 1-minute load average (runnable + uninterruptible tasks), if known.
    pub loadavg: Option<f64>,
    /// Busy time of all CPUs so far (user + nice + system + irq + softirq
    /// + steal), if known.
    pub system_busy: Option<Duration>,
    /// Our own process's CPU time so far.
    pub own_cpu: Duration,
    /// When it was taken.
    pub at: Instant,
}

/// Where readings come from.
pub trait LoadSource {
    /// Reads the machine now.
    fn read(&self) -> LoadReading;
}

/// The real machine, through `/proc`.
pub struct ProcLoad;

impl LoadSource for ProcLoad {
    fn read(&self) -> LoadReading {
        LoadReading {
            loadavg: std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| parse_loadavg(&s)),
            system_busy: std::fs::read_to_string("/proc/stat").ok().and_then(|s| parse_stat(&s)),
            own_cpu: own_cpu(),
            at: Instant::now(),
        }
    }
}

/// A fixed amount of other load, for tests (`--fake-load LOADAVG:OTHERS`):
/// the load average reads `loadavg`, and the other processes keep `others`
/// CPUs busy on top of what we use ourselves.
pub struct FakeLoad {
    /// Load average to report.
    pub loadavg: f64,
    /// CPUs kept busy by others.
    pub others: f64,
    /// Time zero of the fake system clock.
    pub start: Instant,
}

impl LoadSource for FakeLoad {
    fn read(&self) -> LoadReading {
        let at = Instant::now();
        let own = own_cpu();
        let wall = at - self.start;
        LoadReading {
            loadavg: Some(self.loadavg),
            system_busy: Some(own + wall.mul_f64(self.others)),
            own_cpu: own,
            at,
        }
    }
}

/// Parses `--fake-load LOADAVG:OTHERS`.
pub fn parse_fake(s: &str) -> Result<(f64, f64), String> {
    let (a, b) = s.split_once(':').ok_or("expected LOADAVG:OTHERS")?;
    let num = |x: &str| x.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0);
    Ok((num(a).ok_or("bad LOADAVG")?, num(b).ok_or("bad OTHERS")?))
}

fn parse_loadavg(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
}

/// The `cpu` line of /proc/stat: user nice system idle iowait irq softirq
/// steal ..., in USER_HZ ticks.
fn parse_stat(s: &str) -> Option<Duration> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<u64>();
    Some(Duration::from_nanos(busy.saturating_mul(1_000_000_000 / clock_ticks())))
}

/// USER_HZ, the unit of /proc/stat.
fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

fn own_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec to write.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        Duration::ZERO
    }
}

/// What the guard concluded about one span.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// CPUs' worth of work by other processes over the span.
    pub others: Option<f64>,
    /// CPUs' worth of our own work.
    pub own: f64,
    /// Load average at the end of the span.
    pub loadavg: Option<f64>,
}

impl Span {
    /// From two readings.
    pub fn between(a: &LoadReading, b: &LoadReading) -> Span {
        let wall = (b.at - a.at).as_secs_f64().max(1e-6);
        let own = b.own_cpu.saturating_sub(a.own_cpu).as_secs_f64();
        let others = a
            .system_busy
            .zip(b.system_busy)
            .map(|(x, y)| (y.saturating_sub(x).as_secs_f64() - own).max(0.0) / wall);
        Span { others, own: own / wall, loadavg: b.loadavg }
    }
}

/// The guard's verdict on a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// A short idle sample before the run.
    pub before: Span,
    /// The whole run.
    pub during: Span,
    /// CPUs the machine has.
    pub cpus: usize,
    /// The warning, when the machine was busy.
    pub warning: Option<String>,
}

/// The figures a busy machine distorts, for the warning.
pub const AFFECTED: &str = "MB/s and latency (p50/p99) are unreliable; CPU per I/O leaves waits \
     out but can still move with cache and core sharing (ties come from instruction counts, which \
     load does not move; without them, from the drift); request counts are exact, kicks per I/O \
     of lazy modes can shift";

impl Verdict {
    /// Judges a run from the readings before it and during it.
    pub fn judge(before: Span, during: Span, cpus: usize) -> Verdict {
        let mut busy = Vec::new();
        if let Some(o) = before.others.filter(|&o| o > BUSY_OTHERS) {
            busy.push(format!("other processes used {o:.2} CPUs before the run"));
        }
        if let Some(o) = during.others.filter(|&o| o > BUSY_OTHERS) {
            busy.push(format!("{o:.2} CPUs during it"));
        }
        // Before we start, the load average counts other work only.
        if let Some(l) = before.loadavg.filter(|&l| l > BUSY_OTHERS + 0.5) {
            busy.push(format!("1-minute load average {l:.2} before the run"));
        }
        let warning = (!busy.is_empty())
            .then(|| format!("machine busy ({} CPUs): {}. {AFFECTED}.", cpus, busy.join(", ")));
        Verdict { before, during, cpus, warning }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: Instant, busy_s: f64, own_s: f64, load: f64) -> LoadReading {
        LoadReading {
            loadavg: Some(load),
            system_busy: Some(Duration::from_secs_f64(busy_s)),
            own_cpu: Duration::from_secs_f64(own_s),
            at,
        }
    }

    #[test]
    fn others_are_system_busy_time_minus_our_own() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(10);
        // 10 s: the system was busy 25 CPU-seconds, 15 of them ours.
        let s = Span::between(&reading(t0, 100.0, 1.0, 0.0), &reading(t1, 125.0, 16.0, 2.0));
        assert!((s.others.unwrap() - 1.0).abs() < 1e-9);
        assert!((s.own - 1.5).abs() < 1e-9);
    }

    #[test]
    fn idle_machine_gets_no_warning_and_busy_one_does() {
        let idle = Span { others: Some(0.05), own: 0.0, loadavg: Some(0.1) };
        assert_eq!(Verdict::judge(idle, idle, 2).warning, None);
        let busy = Span { others: Some(1.0), own: 1.5, loadavg: Some(2.5) };
        let w = Verdict::judge(idle, busy, 2).warning.unwrap();
        assert!(w.contains("1.00 CPUs during it") && w.contains("MB/s"), "{w}");
        let w = Verdict::judge(busy, idle, 2).warning.unwrap();
        assert!(w.contains("before the run") && w.contains("load average 2.50"), "{w}");
    }

    #[test]
    fn fake_load_reads_as_the_injected_others() {
        let t0 = Instant::now() - Duration::from_secs(2);
        let fake = FakeLoad { loadavg: 3.0, others: 1.0, start: t0 };
        let a = fake.read();
        std::thread::sleep(Duration::from_millis(30));
        let s = Span::between(&a, &fake.read());
        assert!((s.others.unwrap() - 1.0).abs() < 0.05, "{s:?}");
        assert_eq!(parse_fake("3:1"), Ok((3.0, 1.0)));
        assert!(parse_fake("x").is_err() && parse_fake("1:-1").is_err());
    }

    #[test]
    fn proc_formats_parse() {
        assert_eq!(parse_loadavg("0.52 0.40 0.33 2/345 6789\n"), Some(0.52));
        let stat = "cpu  100 0 50 1000 7 3 2 0 0 0\ncpu0 50 0 25 500 3 1 1 0 0 0\n";
        let hz = clock_ticks() as f64;
        let got = parse_stat(stat).unwrap().as_secs_f64();
        assert!((got - 155.0 / hz).abs() < 1e-6, "{got}");
    }
}
