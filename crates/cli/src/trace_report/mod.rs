//! `viommu trace-report`: the real-guest suite's reports from QEMU traces
//! (see docs/real-guest.md).
//!
//! - `boot`: one boot's console log and QEMU trace. Trace lines are
//!   attributed to workloads by the guest's marks ([`count`]), their counts
//!   are checked against the guest's own counters, and each workload gives
//!   a `ROW` of per-request and per-MiB figures ([`check`]);
//! - `table`: the `ROW` lines of a whole run, as medians per policy and
//!   workload and as the same-run comparison table ([`table`]);
//! - `agree`: two runs' verdicts, cell by cell ([`table::agreement`]).
//!
//! Trace lines are read with `viommu_vm::replay::trace`, the parser `replay`
//! uses.

mod check;
mod count;
mod serial;
mod table;

use std::path::{Path, PathBuf};

use clap::Subcommand;
use viommu_driver::Mode;

use crate::input;

/// Linux's boots, with their short column headings: its own drivers
/// without an IOMMU, lazy and strict.
const LINUX: [(&str, &str); 3] =
    [("linux-none", "l-none"), ("linux-lazy", "l-lazy"), ("linux-strict", "l-strict")];

/// The suffix of a boot of ours that waits for completions by interrupt
/// (`vg.irq=1`) instead of polling, e.g. `lazy+irq`.
pub const IRQ_SUFFIX: &str = "+irq";

/// Our modes in their interrupt-driven boots, in [`Mode::ALL`] order.
const OURS_IRQ: [(&str, &str); 6] = [
    ("identity+irq", "identity+i"),
    ("strict-every-sync+irq", "s-e-s+i"),
    ("strict+irq", "strict+i"),
    ("lazy+irq", "lazy+i"),
    ("lazy-single+irq", "lazy-s+i"),
    ("best+irq", "best+i"),
];

/// Every policy a boot can have, in table order, with its short column
/// heading: Linux's, then our modes ([`Mode::ALL`]), polling and then
/// interrupt-driven.
pub fn policies() -> impl Iterator<Item = (&'static str, &'static str)> {
    LINUX.into_iter().chain(Mode::ALL.map(|m| (m.name(), m.name()))).chain(OURS_IRQ)
}

/// What a boot's trace can be checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boot {
    /// Our driver (or none, in `identity`): the guest prints its counters.
    Ours,
    /// Linux's drivers with the IOMMU: marks, but no counters.
    LinuxMarked,
    /// Linux without an IOMMU device: nothing to mark with, MB/s only.
    LinuxUnmarked,
}

impl Boot {
    /// The kind of boot `policy` is, for a policy of [`policies`].
    pub fn of(policy: &str) -> Result<Self, String> {
        match policy {
            "linux-none" => Ok(Self::LinuxUnmarked),
            "linux-lazy" | "linux-strict" => Ok(Self::LinuxMarked),
            p if Mode::from_name(p.strip_suffix(IRQ_SUFFIX).unwrap_or(p)).is_some() => {
                Ok(Self::Ours)
            }
            p => {
                let known: Vec<&str> = policies().map(|(p, _)| p).collect();
                Err(format!("unknown policy {p:?} (known: {})", known.join(", ")))
            }
        }
    }
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum TraceReport {
    /// One boot: checks the trace against the guest's counters, per
    /// workload; prints CHECK, ROW and TOTAL lines. Fails if a check does.
    Boot {
        /// The boot's policy (e.g. lazy, linux-lazy).
        #[arg(long)]
        policy: String,
        /// The guest's console output (VG MARK and VG PERF lines).
        console: PathBuf,
        /// QEMU's trace (`-D` file), or its `.zst`.
        trace: PathBuf,
    },
    /// A whole run: medians of the ROW lines, and the same-run comparison.
    Table {
        /// Files holding the boots' ROW lines (other lines are ignored).
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// Print only the comparison, as a Markdown table.
        #[arg(long)]
        markdown: bool,
    },
    /// Two runs of the same code: their comparison verdicts cell by cell,
    /// and how many agree. Fails if any cell differs.
    Agree {
        /// The first run's ROW lines (its results file).
        first: PathBuf,
        /// The second run's.
        second: PathBuf,
    },
}

/// Runs a subcommand.
pub fn run(cmd: &TraceReport) -> Result<(), String> {
    match cmd {
        TraceReport::Boot { policy, console, trace } => boot(policy, console, trace),
        TraceReport::Table { results, markdown } => run_table(results, *markdown),
        TraceReport::Agree { first, second } => agree(first, second),
    }
}

fn agree(first: &Path, second: &Path) -> Result<(), String> {
    let a = table::medians(&input::read_to_string(first)?);
    let b = table::medians(&input::read_to_string(second)?);
    let agreement = table::agreement(&a, &b);
    print!("{}", table::agreement_text(&agreement));
    if agreement.cells == 0 {
        return Err("no verdict cell judged in both runs".into());
    }
    match agreement.cells - agreement.agree {
        0 => Ok(()),
        n => Err(format!("{n} verdicts differ")),
    }
}

fn boot(policy: &str, console_path: &Path, trace_path: &Path) -> Result<(), String> {
    let kind = Boot::of(policy)?;
    let mut console = serial::Console::default();
    input::for_each_line(console_path, |l| console.add_line(l))?;
    let mut counter = count::Counter::new(&console.marks);
    input::for_each_line(trace_path, |l| counter.add_line(l))?;
    let report = check::report(policy, kind, &console, &counter.finish());
    for l in &report.lines {
        println!("{l}");
    }
    match report.failed {
        0 => Ok(()),
        n => Err(format!("{n} trace checks failed")),
    }
}

fn run_table(paths: &[PathBuf], markdown: bool) -> Result<(), String> {
    let mut results = String::new();
    for p in paths {
        results += &input::read_to_string(p)?;
    }
    let medians = table::medians(&results);
    if markdown {
        print!("{}", table::comparison_markdown(&medians));
        return Ok(());
    }
    let most = medians.iter().map(|m| m.samples).max().unwrap_or(0);
    if most > 1 {
        println!("median of {most} boots per policy:");
        // A boot that did not finish gives no rows: say whose medians
        // stand on fewer.
        let mut fewer: Vec<String> = Vec::new();
        for m in medians.iter().filter(|m| m.samples < most) {
            let s = format!("{} ({})", m.policy, m.samples);
            if !fewer.contains(&s) {
                fewer.push(s);
            }
        }
        if !fewer.is_empty() {
            println!("fewer boots for: {}", fewer.join(", "));
        }
    }
    print!("{}", table::median_table(&medians));
    println!();
    println!(
        "same run, Linux's drivers against ours (MB/s; kicks/req and MAP+UNMAP/MiB from QEMU's \
         trace; req = one virtio-blk request):"
    );
    print!("{}", table::comparison_text(&medians));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_boots_are_our_modes_with_the_suffix() {
        for ((p, _), m) in OURS_IRQ.iter().zip(Mode::ALL) {
            assert_eq!(p.strip_suffix(IRQ_SUFFIX), Some(m.name()));
        }
        assert_eq!(OURS_IRQ.len(), Mode::ALL.len());
        assert_eq!(Boot::of("lazy+irq"), Ok(Boot::Ours));
        assert!(Boot::of("linux-lazy+irq").is_err(), "Linux always takes interrupts");
        assert!(Boot::of("lazy+poll").is_err());
    }
}
