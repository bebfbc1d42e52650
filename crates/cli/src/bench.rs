//! `viommu bench`: the sweep, the table and the JSON report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use viommu_vm::bench::{run_cell, CellSpec, DriverMode, Mode, Workload};
use viommu_vm::cpu::instructions_unavailable;

use crate::cells::{baseline, groups, Cell, Stat};
use crate::host::{self, Host, HostCosts};
use crate::load::{self, FakeLoad, LoadSource, Span, Verdict};
use crate::progress::Progress;
use crate::{callgrind, chart, reality, summary};

/// Bytes per packet of the net workload.
const NET_PACKET: usize = 1500;

/// Options of `viommu bench`.
#[derive(Args, Debug)]
#[command(after_long_help = host::GUIDANCE)]
pub struct BenchArgs {
    /// Modes to run, comma-separated: none, identity, strict-every-sync,
    /// strict, lazy, lazy-single, best; also linux-lazy and linux-strict
    /// (models of the Linux driver's per-descriptor mapping, not run by default),
    /// and pgtable-strict and pgtable-lazy (page-table mode from the drafts: the
    /// device offers it only for these; no Linux or QEMU speaks it).
    #[arg(long, value_delimiter = ',', value_parser = parse_mode,
          default_value = "none,identity,strict-every-sync,strict,lazy,lazy-single,best")]
    modes: Vec<Mode>,
    /// Block request sizes, comma-separated (suffix k or m for KiB, MiB).
    #[arg(long, value_delimiter = ',', value_parser = parse_size, default_value = "4k,64k,1m")]
    sizes: Vec<usize>,
    /// Guest thread counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    /// Workloads, comma-separated: block, net.
    #[arg(long, value_delimiter = ',', value_parser = parse_workload, default_value = "block,net")]
    workloads: Vec<Workload>,
    /// Seconds of timed I/O per cell and repetition.
    #[arg(long, default_value_t = 0.1)]
    duration: f64,
    /// Runs of each cell; tables show the median and the spread (min..max).
    /// From 5 on, the summary's tie rule leaves each mode's lowest and
    /// highest repetition out.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Smoke run of a few seconds: 0.05 s cells, one repetition, no warm-up,
    /// no instruction count (overrides --duration, --repeat and --warmup).
    #[arg(long)]
    quick: bool,
    /// Do not count instructions per I/O under valgrind's callgrind (then
    /// the summary's ranks come from CPU per I/O alone, with the drift rule).
    /// By default, after the timed sweep, every mode of every workload runs
    /// once more with one guest thread under callgrind (this takes 1-2
    /// minutes), if valgrind is installed.
    #[arg(long)]
    no_instructions: bool,
    /// Host model for the summary: assumed exit and interrupt costs (see
    /// below). Its exit cost is also injected per kick, as --exit-cost-ns.
    #[arg(long, value_enum)]
    host: Option<Host>,
    /// Cost of one VM exit (a kick of the request queue), in ns: injected as a
    /// busy delay per kick (MB/s and latency include it, CPU per I/O does
    /// not) and used in the summary's modelled cost. Overrides --host.
    #[arg(long)]
    exit_cost_ns: Option<u64>,
    /// Cost of one completion interrupt, in ns, for the modelled cost (not
    /// injected). Overrides --host.
    #[arg(long)]
    irq_cost_ns: Option<u64>,
    /// Directory for bench.json and bench.svg.
    #[arg(long, default_value = "target/viommu-bench")]
    out: PathBuf,
    /// Never draw the progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Seconds of untimed I/O before the sweep, so that the first cells do
    /// not pay for idle CPUs waking up.
    #[arg(long, default_value_t = 0.3)]
    warmup: f64,
    /// Test hook: replace the machine's load readings with LOADAVG:OTHERS
    /// (other processes keeping OTHERS CPUs busy).
    #[arg(long, hide = true, value_parser = load::parse_fake)]
    fake_load: Option<(f64, f64)>,
    /// Internal: run as the child that callgrind counts, for the cells
    /// WORKLOAD:SIZE:MODE,... (see callgrind.rs).
    #[arg(long, hide = true, value_delimiter = ',', value_parser = parse_count_cell)]
    callgrind_child: Option<Vec<CellSpec>>,
    /// Test hook: count STEPS requests (net: rounds) per cell under
    /// callgrind instead of the defaults, after a warm-up of an eighth.
    #[arg(long, hide = true)]
    count_window: Option<u64>,
}

impl BenchArgs {
    fn seconds(&self) -> f64 {
        if self.quick {
            0.05
        } else {
            self.duration.clamp(0.001, 3600.0)
        }
    }

    fn repetitions(&self) -> usize {
        if self.quick {
            1
        } else {
            self.repeat.clamp(1, 100)
        }
    }

    fn warmup_s(&self) -> f64 {
        if self.quick {
            0.0
        } else {
            self.warmup.clamp(0.0, 10.0)
        }
    }

    /// The host model of the summary, if any cost was given.
    fn host_costs(&self) -> Option<HostCosts> {
        let preset = self.host.map(Host::costs);
        if preset.is_none() && self.exit_cost_ns.is_none() && self.irq_cost_ns.is_none() {
            return None;
        }
        Some(HostCosts {
            exit_ns: self.exit_cost_ns.or(preset.map(|p| p.exit_ns)).unwrap_or(0),
            irq_ns: self.irq_cost_ns.or(preset.map(|p| p.irq_ns)).unwrap_or(0),
        })
    }
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::from_name(s).ok_or_else(|| {
        let all = Mode::ALL.iter().chain(&Mode::EXTRA).chain(&Mode::TABLE);
        let names: Vec<_> = all.map(|m| m.name()).collect();
        format!("unknown mode {s:?}; expected one of {}", names.join(", "))
    })
}

fn parse_count_cell(s: &str) -> Result<CellSpec, String> {
    let mut f = s.splitn(3, ':');
    let (Some(w), Some(size), Some(mode)) = (f.next(), f.next(), f.next()) else {
        return Err(format!("bad cell {s:?}; expected WORKLOAD:SIZE:MODE"));
    };
    let spec =
        callgrind::count_specs(&[(parse_workload(w)?, parse_size(size)?)], &[parse_mode(mode)?]);
    Ok(spec[0])
}

fn parse_workload(s: &str) -> Result<Workload, String> {
    match s {
        "block" => Ok(Workload::Block),
        "net" => Ok(Workload::Net),
        _ => Err(format!("unknown workload {s:?}; expected block or net")),
    }
}

/// Parses `4096`, `4k`, `64K`, `1m`.
pub fn parse_size(s: &str) -> Result<usize, String> {
    let lower = s.to_ascii_lowercase();
    let (digits, mult) = match lower.as_bytes().last() {
        Some(b'k') => (&lower[..lower.len() - 1], 1024),
        Some(b'm') => (&lower[..lower.len() - 1], 1024 * 1024),
        _ => (&lower[..], 1),
    };
    let n: usize = digits.parse().map_err(|_| format!("bad size {s:?}"))?;
    let size = n.checked_mul(mult).ok_or_else(|| format!("size {s:?} too large"))?;
    if size == 0 || size > 16 * 1024 * 1024 {
        return Err(format!("size {s:?} must be between 1 byte and 16 MiB"));
    }
    Ok(size)
}

/// Human size: 4K, 64K, 1M, 1500B.
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{}K", n >> 10)
    } else {
        format!("{n}B")
    }
}

fn specs(args: &BenchArgs) -> Vec<CellSpec> {
    let duration = Duration::from_secs_f64(args.seconds());
    let exit_cost = Duration::from_nanos(args.host_costs().map_or(0, |h| h.exit_ns));
    let mut out = Vec::new();
    for &workload in &args.workloads {
        let sizes = match workload {
            Workload::Block => args.sizes.clone(),
            Workload::Net => vec![NET_PACKET],
        };
        for &io_size in &sizes {
            for &threads in &args.threads {
                for &mode in &args.modes {
                    out.push(CellSpec { mode, workload, io_size, threads, duration, exit_cost });
                }
            }
        }
    }
    out
}

/// Runs the sweep, prints the tables and the summary, writes the JSON and
/// the chart.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if let Some(cells) = &args.callgrind_child {
        return callgrind::child(cells, args.count_window);
    }
    if args.threads.iter().any(|&t| t == 0 || t > 64) {
        return Err("thread counts must be 1..=64".into());
    }
    let specs = specs(args);
    let reps = args.repetitions();
    let host = args.host_costs();
    let meta = Meta::collect();
    println!(
        "viommu bench: {} cells x {} repetitions of {:.2} s after {:.1} s of warm-up; {}; {} CPUs ({}); commit {}",
        specs.len(),
        reps,
        args.seconds(),
        args.warmup_s(),
        exit_words(host),
        meta.cpus,
        meta.cpu_model,
        meta.commit
    );
    let source: Box<dyn LoadSource> = match args.fake_load {
        Some((loadavg, others)) => {
            Box::new(FakeLoad { loadavg, others, start: std::time::Instant::now() })
        }
        None => Box::new(load::ProcLoad),
    };
    // A short idle sample: what the machine does without us.
    let r0 = source.read();
    std::thread::sleep(Duration::from_millis(300));
    let r1 = source.read();
    let started = std::time::Instant::now();
    let mut progress = Progress::new(specs.len() * reps, !args.no_progress);
    if args.warmup_s() > 0.0 {
        progress.start("warm-up");
        let warm = CellSpec {
            mode: Mode::Driver(DriverMode::Best),
            workload: Workload::Block,
            io_size: 4096,
            threads: 1,
            duration: Duration::from_secs_f64(args.warmup_s()),
            exit_cost: Duration::ZERO,
        };
        run_cell(&warm).map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut cells: Vec<Cell> =
        specs.iter().map(|&spec| Cell { spec, reps: Vec::with_capacity(reps) }).collect();
    // Repetitions go round the whole sweep, so that a passing burst of
    // other load hits different cells in each.
    for rep in 0..reps {
        for cell in &mut cells {
            let spec = &cell.spec;
            progress.start(&format!(
                "run {}/{reps}: {} {} {} x{}",
                rep + 1,
                spec.workload,
                size_label(spec.io_size),
                spec.mode,
                spec.threads
            ));
            let r = run_cell(spec).map_err(|e| format!("{} {}: {e}", spec.workload, spec.mode))?;
            cell.reps.push(r);
            progress.step();
        }
    }
    progress.finish();
    let r2 = source.read();
    // After the timed sweep and its load reading: callgrind takes a CPU for
    // a minute or two, and its counts do not depend on the load.
    let counts = if args.quick || args.no_instructions {
        Err(if args.quick { "not with --quick" } else { "--no-instructions" }.to_string())
    } else {
        count_instructions(&cells, &args.modes, &args.out, args.count_window)
    };
    let verdict = Verdict::judge(Span::between(&r0, &r1), Span::between(&r1, &r2), meta.cpus);
    let run = RunInfo {
        meta,
        verdict,
        reps,
        seconds: args.seconds(),
        warmup: args.warmup_s(),
        wall: started.elapsed(),
        host,
    };

    if let Some(w) = &run.verdict.warning {
        println!("\nWARNING: {w}");
    }
    print!("{}", table(&cells, run.verdict.warning.is_some()));
    println!("\nmodes:");
    for m in &args.modes {
        let linux = m.linux().unwrap_or("none: our driver only");
        println!("  {:<18} {}; Linux: {linux}", m.name(), m.describe());
    }
    println!("{}", legend_notes(&counts));
    let ranked = summary::ranked_threads(&args.threads, run.meta.cpus);
    let left_out: Vec<usize> =
        args.threads.iter().copied().filter(|t| !ranked.contains(t)).collect();
    let summaries = summary::summarize(&cells, host, &ranked, counts.as_ref().ok());
    print!("{}", summary::render(&summaries, host, &ranked, &left_out));
    print!("{}", reality_text(&cells));
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let json_path = args.out.join("bench.json");
    let svg_path = args.out.join("bench.svg");
    let report = report_json(&cells, &summaries, &run, args, &counts);
    let text = serde_json::to_string_pretty(&report).expect("json");
    std::fs::write(&json_path, text + "\n").map_err(|e| format!("{}: {e}", json_path.display()))?;
    std::fs::write(&svg_path, chart::svg(&cells, host))
        .map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!(
        "\nwrote {} and {} ({:.0} s)",
        json_path.display(),
        svg_path.display(),
        run.wall.as_secs_f64()
    );

    let bad: u64 = cells.iter().flat_map(|c| &c.reps).map(|r| r.data_errors + r.faults).sum();
    if bad > 0 {
        return Err(format!("{bad} data errors or faults: the IOMMU path is broken"));
    }
    Ok(())
}

/// Counts instructions per I/O of every mode and group under callgrind,
/// saying on stderr that it does (it takes a minute or two).
fn count_instructions(
    cells: &[Cell],
    modes: &[Mode],
    out: &std::path::Path,
    window: Option<u64>,
) -> Result<callgrind::Counts, String> {
    let specs = callgrind::count_specs(&groups(cells), modes);
    eprintln!("viommu bench: counting instructions of {} cells under callgrind...", specs.len());
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    callgrind::count(&exe, &specs, out, window)
}

fn exit_words(host: Option<HostCosts>) -> String {
    match host {
        Some(h) => format!("exit cost {} ns per kick, interrupt cost {} ns", h.exit_ns, h.irq_ns),
        None => "exit cost 0 (no host model)".into(),
    }
}

fn legend_notes(counts: &Result<callgrind::Counts, String>) -> String {
    let perf = match instructions_unavailable() {
        None => "instr/IO in the tables = user-space instructions per I/O (guest + device \
                 threads) from hardware counters."
            .to_string(),
        Some(why) => format!("hardware instruction counters: none ({why})."),
    };
    let grind = match counts {
        Ok(c) => callgrind::describe(c),
        Err(why) => format!("instructions per I/O under callgrind: not counted ({why})."),
    };
    let instr = format!("{perf}\n{grind}");
    format!(
        "CPU us/IO = CPU time per I/O doing work: the guest threads (driver + endpoint + flush \
         timer: guest) plus the device's I/O thread (device), from per-thread CPU clocks, without \
         the CPU spent waiting and signalling (wait = completion waits and kicks with their spin, \
         sleep and wakeup, eventfd writes, the injected exit delay, the I/O thread's wait for \
         kicks and its interrupts; each such bracket's clock reads, {} ns, are taken off too); \
         spread = min..max over the repetitions. req/IO = MAP+UNMAP requests per I/O (net: per \
         packet), kicks/IO and irq/IO = request-queue notifications and interrupts per I/O; \
         counts include the final flush of deferred UNMAPs. MB/s* and p50/p99 are wall-clock \
         figures and move with other load on the machine.\n{instr}",
        viommu_vm::cpu::bracket_cost().as_nanos()
    )
}

/// Run-wide facts for the JSON and the chart.
struct RunInfo {
    meta: Meta,
    verdict: Verdict,
    reps: usize,
    seconds: f64,
    warmup: f64,
    wall: Duration,
    host: Option<HostCosts>,
}

/// What machine and code the run is.
struct Meta {
    commit: String,
    timestamp: String,
    cpu_model: String,
    cpus: usize,
}

impl Meta {
    fn collect() -> Meta {
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let commit = match git(&["rev-parse", "--short", "HEAD"]) {
            Some(c) => {
                let dirty = git(&["status", "--porcelain", "--untracked-files=no"])
                    .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{c}+dirty")
                } else {
                    c
                }
            }
            None => "unknown".into(),
        };
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        Meta {
            commit,
            timestamp: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

fn fmt_stat(s: Option<Stat>, scale: f64, prec: usize) -> String {
    s.map_or("-".into(), |s| format!("{:.prec$}", s.median * scale))
}

fn fmt_spread(s: Option<Stat>, scale: f64) -> String {
    s.map_or("-".into(), |s| format!("{:.2}..{:.2}", s.min * scale, s.max * scale))
}

/// The text tables, one per workload and size.
pub fn table(cells: &[Cell], busy: bool) -> String {
    let mut out = String::new();
    let show_exit = cells.iter().any(|c| !c.spec.exit_cost.is_zero());
    let show_instr = cells.iter().any(|c| c.instructions().is_some());
    let reps = cells.first().map_or(0, |c| c.reps.len());
    let mut last_group = None;
    for c in cells {
        if last_group != Some(c.group()) {
            last_group = Some(c.group());
            let unit = if c.spec.workload == Workload::Net { "packets" } else { "requests" };
            let _ = writeln!(
                out,
                "\n{} workload, {} {unit}, median of {reps}{}",
                c.spec.workload,
                size_label(c.spec.io_size),
                if busy {
                    "  [machine busy: MB/s and latency unreliable, see WARNING]"
                } else {
                    ""
                }
            );
            let _ = write!(
                out,
                "{:<18} {:>3} {:>9} {:>13} {:>7} {:>7} {:>7}",
                "mode", "thr", "CPU us/IO", "spread", "guest", "device", "wait"
            );
            if show_instr {
                let _ = write!(out, " {:>9}", "instr/IO");
            }
            let _ = write!(
                out,
                " {:>7} {:>8} {:>7} {:>9} {:>6} {:>8} {:>8}",
                "req/IO", "kicks/IO", "irq/IO", "MB/s*", "x none", "p50 us", "p99 us"
            );
            if show_exit {
                let _ = write!(out, " {:>8}", "exit ms");
            }
            out.push('\n');
        }
        let us = 1e-3;
        let ratio = ratio(cells, c).map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = write!(
            out,
            "{:<18} {:>3} {:>9} {:>13} {:>7} {:>7} {:>7}",
            c.spec.mode.name(),
            c.spec.threads,
            fmt_stat(c.cpu_ns(), us, 2),
            fmt_spread(c.cpu_ns(), us),
            fmt_stat(c.guest_ns(), us, 2),
            fmt_stat(c.device_ns(), us, 2),
            fmt_stat(c.waiting_ns(), us, 2),
        );
        if show_instr {
            let _ = write!(out, " {:>9}", fmt_stat(c.instructions(), 1.0, 0));
        }
        let _ = write!(
            out,
            " {:>7} {:>8} {:>7} {:>9} {:>6} {:>8} {:>8}",
            fmt_stat(c.requests(), 1.0, 2),
            fmt_stat(c.kicks(), 1.0, 2),
            fmt_stat(c.irqs(), 1.0, 2),
            fmt_stat(c.mb_s(), 1.0, 1),
            ratio,
            fmt_stat(c.p50_us(), 1.0, 1),
            fmt_stat(c.p99_us(), 1.0, 1),
        );
        if show_exit {
            let ms = c.stat(|r| Some(r.exit_injected.as_secs_f64() * 1e3));
            let _ = write!(out, " {:>8}", fmt_stat(ms, 1.0, 1));
        }
        out.push('\n');
    }
    out
}

/// MB/s against the no-IOMMU cell of the same group and threads.
fn ratio(cells: &[Cell], c: &Cell) -> Option<f64> {
    let b = baseline(cells, c)?.mb_s()?.median;
    (b > 0.0).then(|| c.mb_s().map_or(0.0, |s| s.median) / b)
}

/// Counts measured in real guests for the groups that have them, next to
/// this run's counts of the Linux-equivalent modes.
fn reality_text(cells: &[Cell]) -> String {
    let mut out = String::new();
    for (w, size) in groups(cells) {
        let Some(m) = reality::for_group(w, size) else { continue };
        if out.is_empty() {
            let _ = writeln!(out, "\nagainst real guests: {}", reality::SOURCE);
        }
        let here = |mode: Mode| {
            let kicks: Vec<f64> = cells
                .iter()
                .filter(|c| c.group() == (w, size) && c.spec.mode == mode && c.spec.threads == 1)
                .filter_map(|c| c.kicks().map(|s| s.median))
                .collect();
            kicks.first().map(|k| format!("{} {k:.2}", mode.name()))
        };
        let ours: Vec<String> = [Mode::LinuxLazy, Mode::Driver(DriverMode::Lazy)]
            .into_iter()
            .filter_map(here)
            .collect();
        let _ = writeln!(
            out,
            "  {} {} ~ {}: kicks/request Linux lazy {} / our lazy {}; MAP+UNMAP per MiB {} / {}; \
             this run, 1 thread, kicks/IO: {}",
            w,
            size_label(size),
            m.workload,
            m.kicks_per_req.0,
            m.kicks_per_req.1,
            m.requests_per_mib.0,
            m.requests_per_mib.1,
            if ours.is_empty() { "-".to_string() } else { ours.join(", ") }
        );
    }
    if !out.is_empty() {
        out.push_str(
            "  (the in-process VM kicks once per map call; the real guest batches a request's \
             buffers: see docs/cli.md. Reproduce with scripts/real-guest --measure.)\n",
        );
    }
    out
}

fn stat_json(s: Option<Stat>) -> serde_json::Value {
    s.map_or(serde_json::Value::Null, |s| json!({"median": s.median, "min": s.min, "max": s.max}))
}

fn span_json(s: &Span) -> serde_json::Value {
    json!({"other_cpus": s.others, "own_cpus": s.own, "loadavg_1min": s.loadavg})
}

fn report_json(
    cells: &[Cell],
    summaries: &[summary::GroupSummary],
    run: &RunInfo,
    args: &BenchArgs,
    counts: &Result<callgrind::Counts, String>,
) -> serde_json::Value {
    let cells_json: Vec<_> = cells
        .iter()
        .map(|c| {
            let reps: Vec<_> = c
                .reps
                .iter()
                .map(|r| {
                    json!({
                        "ios": r.ios,
                        "bytes": r.bytes,
                        "elapsed_s": r.elapsed.as_secs_f64(),
                        "mb_per_s": r.mb_per_s(),
                        "map_requests": r.map_requests,
                        "unmap_requests": r.unmap_requests,
                        "kicks": r.kicks,
                        "interrupts": r.interrupts,
                        "syncs": r.syncs,
                        "guest_poll_s": r.guest_poll.as_secs_f64(),
                        "device_poll_s": r.device_poll.as_secs_f64(),
                        "guest_cpu_s": r.guest.cpu.map(|d| d.as_secs_f64()),
                        "device_cpu_s": r.device.cpu.map(|d| d.as_secs_f64()),
                        "guest_waiting_cpu_s": r.guest.waiting.as_secs_f64(),
                        "device_waiting_cpu_s": r.device.waiting.as_secs_f64(),
                        "waiting_brackets": r.guest.brackets + r.device.brackets,
                        "guest_instructions": r.guest.instructions,
                        "device_instructions": r.device.instructions,
                        "p50_us": r.p50.as_secs_f64() * 1e6,
                        "p99_us": r.p99.as_secs_f64() * 1e6,
                        "exit_injected_s": r.exit_injected.as_secs_f64(),
                        "translations": r.translations,
                        "data_errors": r.data_errors,
                        "faults": r.faults,
                        "wait_timeouts": r.wait_timeouts,
                    })
                })
                .collect();
            json!({
                "workload": c.spec.workload.name(),
                "mode": c.spec.mode.name(),
                "io_size": c.spec.io_size,
                "threads": c.spec.threads,
                "cpu_ns_per_io": stat_json(c.cpu_ns()),
                "guest_cpu_ns_per_io": stat_json(c.guest_ns()),
                "device_cpu_ns_per_io": stat_json(c.device_ns()),
                "waiting_ns_per_io": stat_json(c.waiting_ns()),
                "poll_ns_per_io": stat_json(c.poll_ns()),
                "instructions_per_io": stat_json(c.instructions()),
                "mb_per_s": stat_json(c.mb_s()),
                "ratio_to_none": ratio(cells, c),
                "requests_per_io": stat_json(c.requests()),
                "kicks_per_io": stat_json(c.kicks()),
                "interrupts_per_io": stat_json(c.irqs()),
                "p50_us": stat_json(c.p50_us()),
                "p99_us": stat_json(c.p99_us()),
                "exit_cost_ns": c.spec.exit_cost.as_nanos() as u64,
                "repetitions": reps,
            })
        })
        .collect();
    let summaries_json: Vec<_> = summaries
        .iter()
        .map(|s| {
            json!({
                "workload": s.workload.name(),
                "io_size": s.io_size,
                "ranked_by": if run.host.is_some() { "modelled_ns_per_io" } else { "cpu_ns_per_io" },
                "ranking": s.ranking(),
                "tie_rule": s.rule.name(),
                "order_disagreements": s.disagreements.iter().map(|(a, b)| [summary::join_modes(a), summary::join_modes(b)]).collect::<Vec<_>>(),
                "tiers": s.tiers.iter().map(|t| t.iter().map(|m| m.name()).collect::<Vec<_>>()).collect::<Vec<_>>(),
                "cheapest_linux": summary::join_modes(&s.cheapest_linux),
                "cheapest_linux_isolating": summary::join_modes(&s.cheapest_linux_isolating),
                "cheapest": summary::join_modes(&s.cheapest),
                "modes": s.none.iter().chain(&s.ranked).map(|c| json!({
                    "mode": c.mode.name(),
                    "cpu_ns_per_io": c.cpu_ns(),
                    "floor_ns_per_io": c.key(run.host),
                    "median_ns_per_io": c.median(run.host),
                    "reach_ns": [c.reach(run.host).0, c.reach(run.host).1],
                    "cells_cpu_ns_per_io": c.cells.iter().map(|reps| reps.iter().map(|r| r.cpu_ns).collect::<Vec<_>>()).collect::<Vec<_>>(),
                    "instructions_per_io": c.instructions_per_io(),
                    "guest_instructions_per_io": c.instructions.map(|i| i.0),
                    "device_instructions_per_io": c.instructions.map(|i| i.1),
                    "kicks_per_io": c.kicks(),
                    "interrupts_per_io": c.irqs(),
                    "modelled_ns_per_io": run.host.map(|_| c.key(run.host)),
                    "gives_up": summary::gives_up(c.mode),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "tool": "viommu bench",
        "version": env!("CARGO_PKG_VERSION"),
        "commit": run.meta.commit,
        "timestamp": run.meta.timestamp,
        "cpu_model": run.meta.cpu_model,
        "cpus": run.meta.cpus,
        "duration_s": run.seconds,
        "warmup_s": run.warmup,
        "repetitions": run.reps,
        "wall_s": run.wall.as_secs_f64(),
        "bracket_cost_ns": viommu_vm::cpu::bracket_cost().as_nanos() as u64,
        "instructions": {
            "available": instructions_unavailable().is_none(),
            "reason": instructions_unavailable(),
            "callgrind": callgrind::json(counts),
        },
        "load": {
            "before": span_json(&run.verdict.before),
            "during": span_json(&run.verdict.during),
            "busy": run.verdict.warning.is_some(),
            "warning": run.verdict.warning,
            "affected": run.verdict.warning.as_ref().map(|_| load::AFFECTED),
        },
        "host_model": run.host.map(|h| json!({"exit_ns": h.exit_ns, "irq_ns": h.irq_ns})),
        "options": {
            "modes": args.modes.iter().map(|m| m.name()).collect::<Vec<_>>(),
            "sizes": args.sizes,
            "threads": args.threads,
            "workloads": args.workloads.iter().map(|w| w.name()).collect::<Vec<_>>(),
            "duration": args.duration,
            "repeat": args.repeat,
            "quick": args.quick,
            "no_instructions": args.no_instructions,
            "host": args.host.map(Host::name),
            "exit_cost_ns": args.exit_cost_ns,
            "irq_cost_ns": args.irq_cost_ns,
            "warmup": args.warmup,
            "fake_load": args.fake_load.map(|(l, o)| json!({"loadavg": l, "others": o})),
        },
        "modes": Mode::ALL
            .iter()
            .chain(&Mode::EXTRA)
            .chain(&Mode::TABLE)
            .map(|m| json!({"name": m.name(), "meaning": m.describe(), "linux": m.linux()}))
            .collect::<Vec<_>>(),
        "real_guest": {
            "source": reality::SOURCE,
            "groups": groups(cells).into_iter().filter_map(|(w, size)| reality::for_group(w, size).map(|m| json!({
                "workload": w.name(),
                "io_size": size,
                "real_guest_workload": m.workload,
                "kicks_per_request": {"linux_lazy": m.kicks_per_req.0, "our_lazy": m.kicks_per_req.1},
                "map_unmap_per_mib": {"linux_lazy": m.requests_per_mib.0, "our_lazy": m.requests_per_mib.1},
            }))).collect::<Vec<_>>(),
        },
        "summary_threads": summary::ranked_threads(&args.threads, run.meta.cpus),
        "summary_drift": summary::DRIFT,
        "summary_instruction_tie": summary::INSTRUCTION_TIE,
        "summary": summaries_json,
        "cells": cells_json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1500"), Ok(1500));
        assert!(parse_size("0").is_err());
        assert!(parse_size("32m").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(size_label(4096), "4K");
        assert_eq!(size_label(1 << 20), "1M");
        assert_eq!(size_label(1500), "1500B");
    }
}
