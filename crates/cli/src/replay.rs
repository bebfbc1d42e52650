//! `viommu replay FILE`: parse a stream, run it through the device, report.

use std::path::Path;

use viommu_proto::Status;
use viommu_vm::replay::{self, Format, SENT_NAMES};

use crate::input;

/// Runs the command.
pub fn run(
    path: &Path,
    export: Option<&Path>,
    verbose: bool,
    virtqueue: bool,
) -> Result<(), String> {
    let text = input::read_to_string(path)?;
    let stream = replay::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(out) = export {
        std::fs::write(out, replay::to_native(&stream.ops))
            .map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let report = if virtqueue {
        replay::run_virtqueue(&stream).map_err(|e| e.to_string())?
    } else {
        replay::run(&stream).map_err(|e| format!("device config: {e}"))?
    };
    let path_name = if virtqueue { "virtqueue path" } else { "raw request path" };
    let format = match stream.format {
        Format::Native => "native",
        Format::QemuTrace => "QEMU trace",
    };
    println!(
        "{}: {format}, {} requests, {} kicks, {} endpoints {:?}, {} lines skipped; {path_name}",
        path.display(),
        report.total(),
        report.kicks,
        stream.endpoints.len(),
        stream.endpoints,
        stream.skipped_lines
    );
    println!("{:<8} {:>10} {:>10}", "request", "count", "ns/req");
    for (i, name) in SENT_NAMES.iter().enumerate() {
        if report.sent[i] == 0 {
            continue;
        }
        if virtqueue {
            // Requests complete in batches: no time per type.
            println!("{name:<8} {:>10} {:>10}", report.sent[i], "-");
        } else {
            let ns = report.elapsed_by_type[i].as_nanos() as f64 / report.sent[i] as f64;
            println!("{name:<8} {:>10} {ns:>10.1}", report.sent[i]);
        }
    }
    println!(
        "{:<8} {:>10} {:>10.1}",
        "all",
        report.total(),
        report.elapsed.as_nanos() as f64 / report.total().max(1) as f64
    );
    if report.kicks > 0 {
        println!("requests per kick: {:.2}", report.total() as f64 / report.kicks as f64);
        if virtqueue {
            let us = report.elapsed.as_secs_f64() * 1e6 / report.kicks as f64;
            println!("wall time per kick (notify, process, interrupt): {us:.1} us");
        }
    }
    let statuses: Vec<String> = (0..9u8)
        .filter(|&s| report.statuses[s as usize] > 0)
        .map(|s| {
            let name = Status::from_u8(s).map_or("?".into(), |st| st.to_string());
            format!("{name} {}", report.statuses[s as usize])
        })
        .collect();
    println!("statuses: {}; malformed (used length 0): {}", statuses.join(", "), report.malformed);
    println!("domains alive at the end: {}", report.domains_left);
    if verbose {
        for (index, op, status) in &report.failures {
            let what = replay::to_native(std::slice::from_ref(op));
            let st = status.map_or("malformed".to_string(), |s| s.to_string());
            println!("  #{index}: {} -> {st}", what.trim_end());
        }
    }
    Ok(())
}
