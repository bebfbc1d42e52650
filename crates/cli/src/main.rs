//! The `viommu` command: `bench` runs the in-process VM under every IOMMU
//! policy and reports what each costs; `replay` feeds a recorded request
//! stream through the device; `trace-report` checks and tabulates the
//! real-guest suite's QEMU traces. See docs/cli.md and docs/real-guest.md.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

mod bench;
mod callgrind;
mod cells;
mod chart;
mod host;
mod input;
mod load;
mod progress;
mod reality;
mod replay;
mod sample_cpu;
mod summary;
mod trace_report;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// virtio-iommu in one process: benchmark and replay.
#[derive(Parser, Debug)]
#[command(name = "viommu", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the in-process VM under each IOMMU mode and prints CPU time,
    /// requests, kicks and interrupts per I/O, MB/s and latency, then which
    /// policy is cheapest and what each gives up; writes JSON and an SVG chart.
    Bench(bench::BenchArgs),
    /// Feeds a recorded request stream (native format or QEMU trace lines)
    /// through the device's request path and reports statuses and timing.
    Replay {
        /// The stream: a native-format file, QEMU trace lines, `.zst` of
        /// either (needs the `zstd` program), or `-` for stdin.
        file: PathBuf,
        /// Write the parsed stream in the native format to this file.
        #[arg(long)]
        export: Option<PathBuf>,
        /// Print each request whose status is not OK (at most 20).
        #[arg(long, short)]
        verbose: bool,
        /// Go through the full virtqueue path (device on its I/O thread,
        /// one chain per request, one notify per recorded kick) instead of
        /// the raw request path.
        #[arg(long)]
        virtqueue: bool,
    },
    /// Reports of the real-guest suite from QEMU traces: per boot, trace
    /// counts per workload checked against the guest's counters; per run,
    /// the median and same-run tables.
    #[command(subcommand)]
    TraceReport(trace_report::TraceReport),
    /// Runs a command (a real-guest boot) and copies its output, adding to
    /// each `VG PERF` line the command's CPU time between the last two
    /// `VG SAMPLE` lines before it (`host_cpu_ns=`); exits as it did.
    SampleCpu {
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

fn main() -> ExitCode {
    // SAFETY: restores the default SIGPIPE action before any thread starts,
    // so that `viommu bench | head` ends quietly instead of panicking in
    // println!; no handler is installed.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(args) => bench::run(&args),
        Command::Replay { file, export, verbose, virtqueue } => {
            replay::run(&file, export.as_deref(), verbose, virtqueue)
        }
        Command::TraceReport(cmd) => trace_report::run(&cmd),
        Command::SampleCpu { command } => return sample_cpu::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("viommu: {e}");
            ExitCode::FAILURE
        }
    }
}
