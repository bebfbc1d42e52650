//! One boot's report: the trace counts of each workload, checked against
//! the guest's own counters, and one `ROW` of per-request and per-MiB
//! figures per workload for the table.
//!
//! Output lines (the script counts `CHECK PASS`/`CHECK FAIL`, and keeps the
//! rest in its results file for [`super::table`]):
//! - `CHECK PASS trace-<policy>-<workload>` or `CHECK FAIL ... <why>`;
//! - `ROW <policy> <workload> MB/s MAP/io UNMAP/io ATT/io kick/io MAP/MiB
//!   UNMAP/MiB kick/MiB reqs/kick [CPU-us/io [calib-ms calib-cpu-ms]]`, the
//!   last ones when the boot ran under `viommu sample-cpu` (its PERF line has
//!   `host_cpu_ns`, and `calib_secs` and `calib_cpu_ns` of the calibration);
//! - `TOTAL <policy> trace map=.. unmap=.. attach=.. kicks=.. faults=..
//!   blk_reqs=.. sets=.. marks=..`.

use super::count::{Counts, Segments};
use super::serial::{Console, Perf};
use super::Boot;

/// The lines of a boot's report and how many checks failed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// `CHECK`, `ROW` and `TOTAL` lines, in order.
    pub lines: Vec<String>,
    /// How many `CHECK FAIL` lines there are.
    pub failed: usize,
}

impl Report {
    fn pass(&mut self, name: &str) {
        self.lines.push(format!("CHECK PASS {name}"));
    }

    fn fail(&mut self, name: &str, why: &str) {
        self.failed += 1;
        self.lines.push(format!("CHECK FAIL {name} {why}"));
    }
}

/// What one workload cost, from the trace.
struct Traced {
    map: u64,
    unmap: u64,
    attach: u64,
    kicks: u64,
}

/// Builds the report of boot `policy`, of kind `boot`.
pub fn report(policy: &str, boot: Boot, console: &Console, trace: &Segments) -> Report {
    let mut r = Report::default();
    if boot == Boot::LinuxMarked {
        // Linux's driver never writes the config: every set_config must be
        // a mark, or counts would land in the wrong workload.
        let (sets, marks) = (trace.set_configs, console.marks.len());
        let name = format!("trace-{policy}-marks");
        if sets == marks as u64 {
            r.pass(&name);
        } else {
            r.fail(&name, &format!("{sets} set_config lines, {marks} marks"));
        }
    }
    for perf in &console.perf {
        workload(&mut r, policy, boot, console, trace, perf);
    }
    let t = trace.total();
    r.lines.push(format!(
        "TOTAL {policy} trace map={} unmap={} attach={} kicks={} faults={} blk_reqs={} sets={} \
         marks={}",
        t.map,
        t.unmap,
        t.attach,
        (0..trace.counts.len()).map(|s| trace.kicks(s)).sum::<u64>(),
        t.faults,
        t.blk_reqs,
        trace.set_configs,
        console.marks.len()
    ));
    r
}

/// The check and the row of one workload.
fn workload(
    r: &mut Report,
    policy: &str,
    boot: Boot,
    console: &Console,
    trace: &Segments,
    perf: &Perf,
) {
    let w = &perf.name;
    let name = format!("trace-{policy}-{w}");
    let (Some(ios), Some(bytes), Some(mbps)) =
        (perf.count("reqs"), perf.count("bytes"), perf.get("mbps"))
    else {
        return r.fail(&name, "(PERF line without reqs, bytes or mbps)");
    };
    let mib = bytes as f64 / (1u64 << 20) as f64;
    if boot == Boot::LinuxUnmarked {
        // No IOMMU device to mark with: MB/s only.
        if ios > 0 && bytes > 0 {
            r.lines.push(format!("ROW {policy} {w} {mbps} 0 0 0 0 0 0 0 0{}", cpu_cell(perf)));
        }
        return;
    }
    let Some(s) = console.segment_of(w) else { return r.fail(&name, "(no mark)") };
    let c: &Counts = &trace.counts[s];
    let t = Traced { map: c.map, unmap: c.unmap, attach: c.attach, kicks: trace.kicks(s) };
    let reqs = if boot == Boot::Ours {
        // A failed check still gives a row: its figures are the trace's.
        cross_check(r, &name, perf, &t, c.blk_reqs, ios);
        ios
    } else {
        // Linux splits and merges I/Os: its requests come from the trace.
        if c.blk_reqs == 0 {
            return r.fail(&name, "(no virtio-blk request traced)");
        }
        c.blk_reqs
    };
    if reqs == 0 || bytes == 0 {
        return;
    }
    r.lines.push(row(policy, w, mbps, &t, reqs, mib) + &cpu_cell(perf));
}

/// The CPU columns of a ROW: QEMU's CPU time per I/O in µs, from the
/// `host_cpu_ns` that `viommu sample-cpu` added (per I/O the guest ran,
/// not per virtio-blk request), then the calibration's guest time and QEMU
/// CPU in ms; empty without them.
fn cpu_cell(perf: &Perf) -> String {
    let (Some(ns), Some(ios)) = (perf.count("host_cpu_ns"), perf.count("ios")) else {
        return String::new();
    };
    if ios == 0 {
        return String::new();
    }
    let mut out = format!(" {:.1}", ns as f64 / ios as f64 / 1e3);
    let calib_secs = perf.get("calib_secs").and_then(|v| v.parse::<f64>().ok());
    if let (Some(secs), Some(cpu)) = (calib_secs, perf.count("calib_cpu_ns")) {
        if secs > 0.0 && cpu > 0 {
            out += &format!(" {:.3} {:.3}", secs * 1e3, cpu as f64 / 1e6);
        }
    }
    out
}

/// Our boots: the trace must show exactly the requests and kicks the
/// driver counted, and one virtio-blk request per I/O.
fn cross_check(r: &mut Report, name: &str, perf: &Perf, t: &Traced, blk_reqs: u64, ios: u64) {
    let guest = ["map", "unmap", "attach", "kicks"].map(|k| perf.count(k));
    let traced = [t.map, t.unmap, t.attach, t.kicks];
    if guest.iter().zip(traced).all(|(g, t)| *g == Some(t)) && blk_reqs == ios {
        return r.pass(name);
    }
    let g: Vec<String> = guest.iter().map(|g| g.map_or("?".into(), |v| v.to_string())).collect();
    r.fail(
        name,
        &format!(
            "trace map/unmap/attach/kicks/reqs {}/{}/{}/{}/{blk_reqs}, guest {}/{ios}",
            t.map,
            t.unmap,
            t.attach,
            t.kicks,
            g.join("/")
        ),
    );
}

/// `ROW` line of one workload.
fn row(policy: &str, w: &str, mbps: &str, t: &Traced, reqs: u64, mib: f64) -> String {
    let per_req = |n: u64| n as f64 / reqs as f64;
    let per_mib = |n: u64| n as f64 / mib;
    let reqs_per_kick =
        if t.kicks > 0 { (t.map + t.unmap + t.attach) as f64 / t.kicks as f64 } else { 0.0 };
    format!(
        "ROW {policy} {w} {mbps} {:.2} {:.2} {:.3} {:.3} {:.1} {:.1} {:.1} {reqs_per_kick:.2}",
        per_req(t.map),
        per_req(t.unmap),
        per_req(t.attach),
        per_req(t.kicks),
        per_mib(t.map),
        per_mib(t.unmap),
        per_mib(t.kicks),
    )
}

#[cfg(test)]
mod tests {
    use super::super::count::Counter;
    use super::*;

    /// A boot: console lines, then trace lines.
    fn boot(console: &str, trace: &str, policy: &str) -> Report {
        let mut c = Console::default();
        console.lines().for_each(|l| c.add_line(l));
        let mut counter = Counter::new(&c.marks);
        trace.lines().for_each(|l| counter.add_line(l));
        report(policy, Boot::of(policy).unwrap(), &c, &counter.finish())
    }

    // As QEMU 10 logs it for scripts/real-guest: no timestamps.
    const TRACE: &str = "\
virtio_iommu_set_config
virtio_queue_notify vdev 0xa n 0 vq 0x1
virtio_iommu_map domain=1 virt_start=0 virt_end=0xfff phys_start=0 flags=2
virtio_queue_notify vdev 0xb n 0 vq 0x2
virtio_blk_req_complete vdev 0xb req 0x1 status 0
virtio_queue_notify vdev 0xa n 0 vq 0x1
virtio_iommu_unmap domain=1 virt_start=0 virt_end=0xfff
virtio_iommu_set_config
";
    const PERF: &str = "VG PERF read-4k-qd1 ios=1 reqs=1 bytes=4096 mbps=3.9";

    #[test]
    fn our_counters_equal_to_the_trace_pass() {
        let console = format!(
            "VG MARK read-4k-qd1 cfgw=1\n{PERF} map=1 unmap=1 attach=0 kicks=2\nVG MARK end cfgw=2\n"
        );
        let r = boot(&console, TRACE, "lazy");
        assert_eq!(r.failed, 0, "{:?}", r.lines);
        assert_eq!(
            r.lines,
            [
                "CHECK PASS trace-lazy-read-4k-qd1",
                "ROW lazy read-4k-qd1 3.9 1.00 1.00 0.000 2.000 256.0 256.0 512.0 1.00",
                "TOTAL lazy trace map=1 unmap=1 attach=0 kicks=2 faults=0 blk_reqs=1 sets=2 marks=2",
            ]
        );
    }

    #[test]
    fn a_counter_that_differs_from_the_trace_fails_and_says_which() {
        let console =
            format!("VG MARK read-4k-qd1 cfgw=1\n{PERF} map=1 unmap=0 attach=0 kicks=2\n");
        let r = boot(&console, TRACE, "strict");
        assert_eq!(r.failed, 1);
        assert_eq!(
            r.lines[0],
            "CHECK FAIL trace-strict-read-4k-qd1 trace map/unmap/attach/kicks/reqs 1/1/0/2/1, \
             guest 1/0/0/2/1"
        );
        assert!(r.lines[1].starts_with("ROW strict read-4k-qd1 3.9 "), "the trace's figures stay");
        // A missing counter, or one virtio-blk request too many, fails too.
        let console = format!("VG MARK read-4k-qd1 cfgw=1\n{PERF} map=1 unmap=1 attach=0\n");
        assert!(boot(&console, TRACE, "lazy").lines[0].ends_with("guest 1/1/0/?/1"));
        let console = format!(
            "VG MARK read-4k-qd1 cfgw=1\n{}\n",
            PERF.replace("reqs=1", "reqs=2") + " map=1 unmap=1 attach=0 kicks=2"
        );
        assert_eq!(boot(&console, TRACE, "lazy").failed, 1);
    }

    #[test]
    fn a_workload_without_its_mark_fails() {
        let r = boot(&format!("{PERF} map=1 unmap=1 attach=0 kicks=2\n"), TRACE, "lazy");
        assert_eq!(r.lines[0], "CHECK FAIL trace-lazy-read-4k-qd1 (no mark)");
        let r = boot("VG PERF read-4k-qd1 ios=1 bytes=4096\n", TRACE, "lazy");
        assert_eq!(r.failed, 1, "{:?}", r.lines);
    }

    #[test]
    fn linux_boots_check_their_marks_and_count_requests_from_the_trace() {
        let trace = TRACE.strip_suffix("virtio_iommu_set_config\n").unwrap().to_string();
        let console = format!("VG MARK read-4k-qd1 cfgw=1\n{PERF}\n");
        let r = boot(&console, &trace, "linux-lazy");
        assert_eq!(r.lines[0], "CHECK PASS trace-linux-lazy-marks");
        assert_eq!(
            r.lines[1],
            "ROW linux-lazy read-4k-qd1 3.9 1.00 1.00 0.000 2.000 256.0 256.0 512.0 1.00"
        );
        assert_eq!(r.failed, 0);
        // Two set_config lines, one mark: a write that is not ours.
        let r = boot(&console, TRACE, "linux-strict");
        assert_eq!(r.lines[0], "CHECK FAIL trace-linux-strict-marks 2 set_config lines, 1 marks");
        // No virtio-blk request in the workload's segment.
        let r = boot(&console, &trace.replace("virtio_blk_req_complete", "x"), "linux-lazy");
        assert_eq!(
            r.lines[1],
            "CHECK FAIL trace-linux-lazy-read-4k-qd1 (no virtio-blk request traced)"
        );
    }

    #[test]
    fn a_sampled_boot_gets_cpu_per_io() {
        let console = format!(
            "VG MARK read-4k-qd1 cfgw=1\n{PERF} map=1 unmap=1 attach=0 kicks=2 host_cpu_ns=12345\n"
        );
        let r = boot(&console, TRACE, "lazy");
        assert_eq!(
            r.lines[1],
            "ROW lazy read-4k-qd1 3.9 1.00 1.00 0.000 2.000 256.0 256.0 512.0 1.00 12.3"
        );
        let console =
            console.replace("host_cpu_ns", "calib_secs=0.0512 calib_cpu_ns=49000000 host_cpu_ns");
        let r = boot(&console, TRACE, "lazy");
        assert!(r.lines[1].ends_with(" 1.00 12.3 51.200 49.000"), "{:?}", r.lines);
        let r = boot(&format!("{PERF} host_cpu_ns=4000\n"), "", "linux-none");
        assert_eq!(r.lines[0], "ROW linux-none read-4k-qd1 3.9 0 0 0 0 0 0 0 0 4.0");
    }

    #[test]
    fn linux_without_iommu_gives_mb_per_s_only() {
        let r = boot(&format!("{PERF}\n"), "", "linux-none");
        assert_eq!(r.failed, 0);
        assert_eq!(r.lines[0], "ROW linux-none read-4k-qd1 3.9 0 0 0 0 0 0 0 0");
        assert!(r.lines[1].starts_with("TOTAL linux-none "));
    }
}
