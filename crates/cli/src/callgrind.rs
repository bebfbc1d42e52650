//! Exact instruction counts per I/O, from valgrind's callgrind, for the
//! summary's tie rule: CPU time moves with the machine's load, the number
//! of instructions a policy executes does not.
//!
//! `viommu bench` runs itself under `valgrind --tool=callgrind` with the
//! hidden option `--callgrind-child`: the child runs every (workload, size,
//! mode) once with one guest thread through
//! [`viommu_vm::bench::count_cell`] (a fixed number of I/Os on a VM whose
//! clock does not move, so the same I/Os run whatever the load) and prints
//! one line per cell. Callgrind zeroes its counts on entering
//! `count_window_start`, dumps them on leaving `count_window_end`, one file
//! per thread, and leaves every instance of `viommu_vm::cpu::waiting` out
//! (`--toggle-collect`): the spins, sleeps, kicks and interrupts that the
//! CPU figure leaves out too. The thread whose dump names
//! `viommu_vm::transport::io_thread` is the device side; the others are the
//! guest side.
//!
//! Written by hand: the callgrind output is read for two header lines
//! (`totals:` and the function names), which needs no parser crate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use viommu_vm::bench::{
    count_cell, CellSpec, Mode, Workload, COUNT_END_SYMBOL, COUNT_START_SYMBOL,
};
use viommu_vm::cpu::WAITING_SYMBOL;

/// The cells one count run covers: every (workload, size) group with every
/// mode, at one guest thread.
pub fn count_specs(groups: &[(Workload, usize)], modes: &[Mode]) -> Vec<CellSpec> {
    let mut out = Vec::new();
    for &(workload, io_size) in groups {
        for &mode in modes {
            out.push(CellSpec {
                mode,
                workload,
                io_size,
                threads: 1,
                duration: Duration::ZERO,
                exit_cost: Duration::ZERO,
            });
        }
    }
    out
}

/// Steps (block requests or net rounds) of warm-up and counted per cell:
/// enough for several lazy flushes at 4 KiB (one per 85 or so requests),
/// few where one request is long; or `steps` and an eighth of it.
pub fn window(spec: &CellSpec, steps: Option<u64>) -> (u64, u64) {
    if let Some(n) = steps {
        return ((n / 8).max(1), n.max(1));
    }
    match spec.workload {
        Workload::Net => (4, 16),
        Workload::Block if spec.io_size <= 16 << 10 => (32, 256),
        Workload::Block if spec.io_size <= 256 << 10 => (16, 128),
        Workload::Block => (4, 16),
    }
}

/// The child's work: every cell in order, one line each on stdout
/// (`cell WORKLOAD SIZE MODE WINDOW_IOS DATA_ERRORS`).
pub fn child(specs: &[CellSpec], steps: Option<u64>) -> Result<(), String> {
    for spec in specs {
        let (warmup, steps) = window(spec, steps);
        let (r, ios) = count_cell(spec, warmup, steps)
            .map_err(|e| format!("{} {}: {e}", spec.workload, spec.mode))?;
        println!(
            "cell {} {} {} {ios} {}",
            spec.workload,
            spec.io_size,
            spec.mode,
            r.data_errors + r.faults
        );
    }
    Ok(())
}

/// Instructions one cell executed in its counted window.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Count {
    /// The cell (one guest thread).
    pub mode: Mode,
    /// Its workload.
    pub workload: Workload,
    /// Its I/O size.
    pub io_size: usize,
    /// I/Os in the window.
    pub ios: u64,
    /// Guest threads' instructions (driver and endpoint).
    pub guest: u64,
    /// The device's I/O thread's instructions.
    pub device: u64,
}

impl Count {
    /// Guest + device instructions per I/O.
    pub fn per_io(&self) -> f64 {
        (self.guest + self.device) as f64 / self.ios.max(1) as f64
    }

    /// Guest instructions per I/O.
    pub fn guest_per_io(&self) -> f64 {
        self.guest as f64 / self.ios.max(1) as f64
    }

    /// Device instructions per I/O.
    pub fn device_per_io(&self) -> f64 {
        self.device as f64 / self.ios.max(1) as f64
    }
}

/// The outcome of a count run.
#[derive(Clone, Debug, PartialEq)]
pub struct Counts {
    /// `valgrind --version`.
    pub tool: String,
    /// The command line run.
    pub command: String,
    /// One per cell, in run order.
    pub cells: Vec<Count>,
    /// Wall time the count took.
    pub wall: Duration,
}

impl Counts {
    /// The count of one cell.
    pub fn find(&self, mode: Mode, group: (Workload, usize)) -> Option<&Count> {
        self.cells.iter().find(|c| c.mode == mode && (c.workload, c.io_size) == group)
    }
}

/// Runs `exe bench --callgrind-child ...` under callgrind for `specs` and
/// reads the counts; `Err` says why it could not (no valgrind, a failure).
pub fn count(
    exe: &Path,
    specs: &[CellSpec],
    dir: &Path,
    steps: Option<u64>,
) -> Result<Counts, String> {
    let version = Command::new("valgrind")
        .arg("--version")
        .output()
        .map_err(|e| format!("valgrind not found ({e}); install it (apt-get install valgrind)"))?;
    let tool = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let dir = dir.join("callgrind");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cells: Vec<String> =
        specs.iter().map(|s| format!("{}:{}:{}", s.workload, s.io_size, s.mode)).collect();
    let out_file = dir.join("cg.out");
    let valgrind_args = vec![
        "--tool=callgrind".to_string(),
        format!("--callgrind-out-file={}", out_file.display()),
        "--separate-threads=yes".into(),
        format!("--toggle-collect={WAITING_SYMBOL}"),
        // After --toggle-collect, which turns collection at start off.
        "--collect-atstart=yes".into(),
        format!("--zero-before={COUNT_START_SYMBOL}"),
        format!("--dump-after={COUNT_END_SYMBOL}"),
        "--dump-line=no".into(),
        "--compress-strings=no".into(),
        "--compress-pos=no".into(),
    ];
    let mut child_args = vec!["bench".to_string(), "--callgrind-child".into(), cells.join(",")];
    if let Some(n) = steps {
        child_args.extend(["--count-window".to_string(), n.to_string()]);
    }
    let command =
        format!("valgrind {} {} {}", valgrind_args.join(" "), exe.display(), child_args.join(" "));
    let started = std::time::Instant::now();
    let output = Command::new("valgrind")
        .args(&valgrind_args)
        .arg(exe)
        .args(&child_args)
        .output()
        .map_err(|e| format!("running valgrind: {e}"))?;
    let wall = started.elapsed();
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "{command} failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with("cell ")).collect();
    if lines.len() != specs.len() {
        return Err(format!("the child reported {} cells of {}", lines.len(), specs.len()));
    }
    let cells = pair(specs, &lines, read_dumps(&out_file)?)?;
    Ok(Counts { tool, command, cells, wall })
}

/// Joins the child's lines (one per spec, in order) with the dumps in part
/// order: each cell's guest thread dumped once and, with a VM, its I/O
/// thread once, in either order.
pub fn pair(
    specs: &[CellSpec],
    lines: &[&str],
    dumps: Vec<(u64, bool)>,
) -> Result<Vec<Count>, String> {
    let mut dumps = dumps.into_iter();
    let mut counts = Vec::new();
    for (line, spec) in lines.iter().zip(specs) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let ios: u64 = f.get(4).and_then(|s| s.parse().ok()).ok_or("bad child line")?;
        if f.get(5) != Some(&"0") {
            return Err(format!("{line}: data errors or faults under callgrind"));
        }
        let threads = if spec.mode == Mode::NoIommu { 1 } else { 2 };
        let (mut guest, mut device) = (None, None);
        for _ in 0..threads {
            let (ir, io_thread) = dumps.next().ok_or("fewer callgrind dumps than cells")?;
            let side = if io_thread { &mut device } else { &mut guest };
            if side.replace(ir).is_some() {
                return Err(format!("{line}: two dumps of one side"));
            }
        }
        counts.push(Count {
            mode: spec.mode,
            workload: spec.workload,
            io_size: spec.io_size,
            ios,
            guest: guest.ok_or_else(|| format!("{line}: no guest dump"))?,
            device: device.unwrap_or(0),
        });
    }
    if dumps.next().is_some() {
        return Err("more callgrind dumps than cells".into());
    }
    Ok(counts)
}

/// Every window dump (`cg.out.PART-TID`, one thread each) in part order:
/// its instructions and whether it is the I/O thread's.
fn read_dumps(out_file: &Path) -> Result<Vec<(u64, bool)>, String> {
    let dir = out_file.parent().unwrap_or(Path::new("."));
    let prefix = format!("{}.", out_file.file_name().and_then(|n| n.to_str()).unwrap_or(""));
    let mut parts: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?;
            let part = name.strip_prefix(&prefix)?.split('-').next()?.parse().ok()?;
            Some((part, p))
        })
        .collect();
    parts.sort();
    parts
        .into_iter()
        .map(|(_, f)| {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            parse_dump(&text).ok_or_else(|| format!("{}: no totals", f.display()))
        })
        .collect()
}

/// A thread's dump: its total instructions (`totals:` or `summary:`) and
/// whether it is the device's I/O thread.
pub fn parse_dump(text: &str) -> Option<(u64, bool)> {
    let total = text
        .lines()
        .find_map(|l| l.strip_prefix("totals:").or_else(|| l.strip_prefix("summary:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let io_thread = text.lines().any(|l| {
        (l.starts_with("fn=") || l.starts_with("cfn="))
            && l.contains("viommu_vm::transport::io_thread")
    });
    Some((total, io_thread))
}

/// The counts as text, for the legend.
pub fn describe(counts: &Counts) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "instructions per I/O: counted by {} (callgrind), one guest thread, {} cells in {:.0} s; \
         exact and independent of load",
        counts.tool,
        counts.cells.len(),
        counts.wall.as_secs_f64()
    );
    out
}

/// The counts, or why there are none, for the JSON.
pub fn json(counts: &Result<Counts, String>) -> serde_json::Value {
    match counts {
        Err(why) => serde_json::json!({"counted": false, "reason": why}),
        Ok(c) => serde_json::json!({
            "counted": true,
            "tool": c.tool,
            "command": c.command,
            "wall_s": c.wall.as_secs_f64(),
            "threads": 1,
            "cells": c.cells.iter().map(|k| serde_json::json!({
                "workload": k.workload.name(),
                "io_size": k.io_size,
                "mode": k.mode.name(),
                "ios": k.ios,
                "guest_instructions": k.guest,
                "device_instructions": k.device,
                "instructions_per_io": k.per_io(),
            })).collect::<Vec<_>>(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_vm::bench::DriverMode;

    #[test]
    fn a_dump_gives_its_total_and_whether_it_is_the_io_thread() {
        let guest = "version: 1\ncmd: viommu\npart: 3\nthread: 3\nevents: Ir\n\
                     fn=viommu_vm::bench::run\n0 12\nsummary: 7769559\ntotals: 7769559\n";
        assert_eq!(parse_dump(guest), Some((7769559, false)));
        let device = "thread: 2\nfn=viommu_vm::transport::io_thread\n0 3\ntotals: 5527522\n";
        assert_eq!(parse_dump(device), Some((5527522, true)));
        assert_eq!(parse_dump("thread: 2\n"), None);
    }

    #[test]
    fn dumps_pair_with_cells_in_either_order_and_must_all_be_used() {
        let specs = count_specs(
            &[(Workload::Block, 4096)],
            &[Mode::NoIommu, Mode::Driver(DriverMode::Strict), Mode::Driver(DriverMode::Lazy)],
        );
        let lines = [
            "cell block 4096 none 256 0",
            "cell block 4096 strict 256 0",
            "cell block 4096 lazy 256 0",
        ];
        // none: the guest only; strict: guest then device; lazy: device first.
        let dumps = vec![
            (2_560_000, false),
            (7_680_000, false),
            (5_120_000, true),
            (4_096_000, true),
            (6_656_000, false),
        ];
        let c = pair(&specs, &lines, dumps.clone()).unwrap();
        assert_eq!((c[0].guest, c[0].device, c[0].per_io()), (2_560_000, 0, 10_000.0));
        assert_eq!((c[1].guest_per_io(), c[1].device_per_io()), (30_000.0, 20_000.0));
        assert_eq!((c[2].guest, c[2].device), (6_656_000, 4_096_000));
        let short = pair(&specs, &lines, dumps[..4].to_vec());
        assert!(short.unwrap_err().contains("fewer"));
        let mut extra = dumps.clone();
        extra.push((1, false));
        assert!(pair(&specs, &lines, extra).unwrap_err().contains("more"));
        let mut two_guests = dumps;
        two_guests[2].1 = false;
        assert!(pair(&specs, &lines, two_guests).unwrap_err().contains("two dumps"));
        let bad = ["cell block 4096 none 256 0", "cell block 4096 strict 256 3", "x"];
        assert!(pair(&specs, &bad, vec![(1, false); 5]).unwrap_err().contains("data errors"));
    }
}
