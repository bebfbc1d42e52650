//! `viommu bench`: the sweep, the table and the JSON report.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use viommu_vm::bench::{run_cell, CellResult, CellSpec, Mode, Workload};

use crate::chart;
use crate::progress::Progress;

/// Bytes per packet of the net workload.
const NET_PACKET: usize = 1500;

/// Options of `viommu bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Modes to run, comma-separated: none, identity, strict-every-sync,
    /// strict, lazy, lazy-single, best; also linux-lazy and linux-strict
    /// (models of the Linux driver's per-descriptor mapping, not run by default).
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
    /// Seconds of timed I/O per cell.
    #[arg(long, default_value_t = 0.2)]
    duration: f64,
    /// Short cells (0.05 s) for a smoke run; overrides --duration.
    #[arg(long)]
    quick: bool,
    /// Extra delay per kick (any virtqueue notify), in nanoseconds, to model a VM exit.
    #[arg(long, default_value_t = 0)]
    exit_cost_ns: u64,
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
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::from_name(s).ok_or_else(|| {
        let names: Vec<_> = Mode::ALL.iter().chain(&Mode::EXTRA).map(|m| m.name()).collect();
        format!("unknown mode {s:?}; expected one of {}", names.join(", "))
    })
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
    let secs = if args.quick { 0.05 } else { args.duration.clamp(0.001, 3600.0) };
    let duration = Duration::from_secs_f64(secs);
    let exit_cost = Duration::from_nanos(args.exit_cost_ns);
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

/// Runs the sweep, prints the table, writes the JSON and the chart.
pub fn run(args: &BenchArgs) -> Result<(), String> {
    if args.threads.iter().any(|&t| t == 0 || t > 64) {
        return Err("thread counts must be 1..=64".into());
    }
    let specs = specs(args);
    if let Some(first) = specs.first() {
        println!(
            "viommu bench: {} cells of {:.2} s after {:.1} s of warm-up, exit cost {} ns per kick, {} CPUs",
            specs.len(),
            first.duration.as_secs_f64(),
            if args.quick { 0.0 } else { args.warmup.clamp(0.0, 10.0) },
            first.exit_cost.as_nanos(),
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
    }
    let mut progress = Progress::new(specs.len(), !args.no_progress);
    if args.warmup > 0.0 && !args.quick {
        progress.start("warm-up");
        let warm = CellSpec {
            mode: Mode::Best,
            workload: Workload::Block,
            io_size: 4096,
            threads: 1,
            duration: Duration::from_secs_f64(args.warmup.min(10.0)),
            exit_cost: Duration::ZERO,
        };
        run_cell(&warm).map_err(|e| format!("warm-up: {e}"))?;
    }
    let mut results = Vec::with_capacity(specs.len());
    for spec in &specs {
        progress.start(&format!(
            "{} {} {} x{}",
            spec.workload,
            size_label(spec.io_size),
            spec.mode,
            spec.threads
        ));
        let t0 = std::time::Instant::now();
        let r = run_cell(spec).map_err(|e| format!("{} {}: {e}", spec.workload, spec.mode))?;
        results.push((r, t0.elapsed()));
        progress.step();
    }
    progress.finish();
    let (results, walls): (Vec<CellResult>, Vec<Duration>) = results.into_iter().unzip();

    print!("{}", table(&results));
    println!("\nmodes:");
    for m in &args.modes {
        println!("  {:<18} {}", m.name(), m.describe());
    }
    println!(
        "req/IO = MAP+UNMAP requests per I/O (net: per packet), kicks/IO = request-queue \
         notifications per I/O; counts include the final flush of deferred UNMAPs."
    );
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let json_path = args.out.join("bench.json");
    let svg_path = args.out.join("bench.svg");
    let text = serde_json::to_string_pretty(&report_json(&results, &walls)).expect("json");
    std::fs::write(&json_path, text + "\n").map_err(|e| format!("{}: {e}", json_path.display()))?;
    std::fs::write(&svg_path, chart::svg(&results))
        .map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!("wrote {} and {}", json_path.display(), svg_path.display());

    let bad: u64 = results.iter().map(|r| r.data_errors + r.faults).sum();
    if bad > 0 {
        return Err(format!("{bad} data errors or faults: the IOMMU path is broken"));
    }
    Ok(())
}

/// The no-IOMMU cell matching `r` (same workload, size, threads).
fn baseline<'a>(all: &'a [CellResult], r: &CellResult) -> Option<&'a CellResult> {
    all.iter().find(|b| {
        b.spec.mode == Mode::NoIommu
            && b.spec.workload == r.spec.workload
            && b.spec.io_size == r.spec.io_size
            && b.spec.threads == r.spec.threads
    })
}

fn ratio(all: &[CellResult], r: &CellResult) -> Option<f64> {
    let b = baseline(all, r)?.mb_per_s();
    (b > 0.0).then(|| r.mb_per_s() / b)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The text table, one block per workload and size.
pub fn table(results: &[CellResult]) -> String {
    let mut out = String::new();
    let show_exit = results.iter().any(|r| !r.spec.exit_cost.is_zero());
    let mut last_group = None;
    for r in results {
        let group = (r.spec.workload, r.spec.io_size);
        if last_group != Some(group) {
            last_group = Some(group);
            let unit = if r.spec.workload == Workload::Net { "packets" } else { "requests" };
            let _ = writeln!(
                out,
                "\n{} workload, {} {unit}",
                r.spec.workload,
                size_label(r.spec.io_size)
            );
            let _ = write!(
                out,
                "{:<18} {:>3} {:>9} {:>6} {:>7} {:>8} {:>9} {:>9}",
                "mode", "thr", "MB/s", "x none", "req/IO", "kicks/IO", "p50 us", "p99 us"
            );
            if show_exit {
                let _ = write!(out, " {:>9}", "exit ms");
            }
            out.push('\n');
        }
        let ratio = ratio(results, r).map_or("-".to_string(), |x| format!("{x:.2}"));
        let _ = write!(
            out,
            "{:<18} {:>3} {:>9.1} {:>6} {:>7.2} {:>8.2} {:>9.1} {:>9.1}",
            r.spec.mode.name(),
            r.spec.threads,
            r.mb_per_s(),
            ratio,
            r.requests_per_io(),
            r.kicks_per_io(),
            us(r.p50),
            us(r.p99)
        );
        if show_exit {
            let _ = write!(out, " {:>9.1}", r.exit_injected.as_secs_f64() * 1e3);
        }
        out.push('\n');
    }
    out
}

fn report_json(results: &[CellResult], walls: &[Duration]) -> serde_json::Value {
    let cells: Vec<_> = results
        .iter()
        .zip(walls)
        .map(|(r, wall)| {
            json!({
                "workload": r.spec.workload.name(),
                "mode": r.spec.mode.name(),
                "io_size": r.spec.io_size,
                "threads": r.spec.threads,
                "ios": r.ios,
                "bytes": r.bytes,
                "elapsed_s": r.elapsed.as_secs_f64(),
                "mb_per_s": r.mb_per_s(),
                "ratio_to_none": ratio(results, r),
                "map_requests": r.map_requests,
                "unmap_requests": r.unmap_requests,
                "requests_per_io": r.requests_per_io(),
                "kicks": r.kicks,
                "kicks_per_io": r.kicks_per_io(),
                "syncs": r.syncs,
                "p50_us": us(r.p50),
                "p99_us": us(r.p99),
                "exit_cost_ns": r.spec.exit_cost.as_nanos() as u64,
                "exit_injected_s": r.exit_injected.as_secs_f64(),
                "translations": r.translations,
                "data_errors": r.data_errors,
                "faults": r.faults,
                "wait_timeouts": r.wait_timeouts,
                "cell_wall_s": wall.as_secs_f64(),
            })
        })
        .collect();
    json!({
        "tool": "viommu bench",
        "version": env!("CARGO_PKG_VERSION"),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "modes": Mode::ALL
            .iter()
            .chain(&Mode::EXTRA)
            .map(|m| json!({"name": m.name(), "meaning": m.describe()}))
            .collect::<Vec<_>>(),
        "cells": cells,
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
