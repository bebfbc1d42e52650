//! The `viommu` binary end to end: replay of a real Linux trace excerpt and
//! of the native format, and a quick bench writing its JSON and chart.

use std::path::PathBuf;
use std::process::Command;

fn viommu(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_viommu")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn data(name: &str) -> String {
    format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("viommu-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn replays_the_linux_trace_excerpt() {
    let (ok, out, err) = viommu(&["replay", &data("linux-6.12-lazy-dd.excerpt.trace")]);
    assert!(ok, "{err}");
    assert!(out.contains("QEMU trace, 1533 requests, 774 kicks, 1 endpoints [24]"), "{out}");
    assert!(out.contains("raw request path"), "{out}");
    assert!(out.contains("statuses: OK 1533; malformed (used length 0): 0"), "{out}");
    assert!(out.contains("MAP             768"), "{out}");
    assert!(out.contains("UNMAP           764"), "{out}");
    // Four mappings are still live at the end of the excerpt: the domain stays.
    assert!(out.contains("domains alive at the end: 1"), "{out}");
}

#[test]
fn replays_the_linux_trace_excerpt_through_the_virtqueue() {
    let (ok, out, err) =
        viommu(&["replay", "--virtqueue", &data("linux-6.12-lazy-dd.excerpt.trace")]);
    assert!(ok, "{err}");
    assert!(out.contains("1533 requests, 774 kicks"), "{out}");
    assert!(out.contains("virtqueue path"), "{out}");
    assert!(out.contains("statuses: OK 1533; malformed (used length 0): 0"), "{out}");
}

#[test]
fn native_replay_reports_failures_and_exports() {
    let dir = scratch_dir("native");
    let input = dir.join("in.txt");
    std::fs::write(
        &input,
        "attach 1 8\nmap 1 0x1000 0x1fff 0x4000 rw\nmap 1 0x1000 0x1fff 0x4000 r\nkick\n\
         unmap 1 0x1000 0x17ff\nmap 1 0x2001 0x2fff 0x0 r\nraw 07000000\n",
    )
    .unwrap();
    let export = dir.join("out.txt");
    let (ok, out, err) =
        viommu(&["replay", "-v", input.to_str().unwrap(), "--export", export.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("native, 6 requests, 1 kicks"), "{out}");
    assert!(
        out.contains("statuses: OK 2, INVAL 1, RANGE 2; malformed (used length 0): 1"),
        "{out}"
    );
    assert!(out.contains("#2: map 1 0x1000 0x1fff 0x4000 1 -> INVAL"), "{out}");
    assert!(out.contains("#5: map 1 0x2001 0x2fff 0x0 1 -> RANGE"), "{out}");
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(exported.lines().count(), 7);
    assert!(exported.starts_with("attach 1 8\nmap 1 0x1000 0x1fff 0x4000 3\n"));
}

#[test]
fn replay_reads_stdin() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_viommu"))
        .args(["replay", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"attach 3 9\nprobe 9\ndetach 3 9\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("-: native, 3 requests, 0 kicks, 1 endpoints [9]"), "{out}");
    assert!(out.contains("statuses: OK 3;"), "{out}");
    assert!(out.contains("domains alive at the end: 0"), "{out}");
}

#[test]
fn replay_names_the_bad_line() {
    let dir = scratch_dir("bad");
    let input = dir.join("bad.txt");
    std::fs::write(&input, "attach 1 8\nmap 1 oops\n").unwrap();
    let (ok, _, err) = viommu(&["replay", input.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("line 2: bad virt_start \"oops\""), "{err}");
}

fn small_bench(dir: &std::path::Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "bench",
        "--modes",
        "none,identity,strict",
        "--sizes",
        "4k",
        "--threads",
        "1",
        "--workloads",
        "block",
        "--duration",
        "0.02",
        "--repeat",
        "2",
        "--warmup",
        "0",
        "--out",
        dir.to_str().unwrap(),
    ];
    // The count under callgrind has a test of its own.
    args.push("--no-instructions");
    args.extend_from_slice(extra);
    viommu(&args)
}

fn bench_json(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap()
}

#[test]
fn quick_bench_writes_table_json_and_chart() {
    let dir = scratch_dir("bench");
    let (ok, out, err) = small_bench(&dir, &["--fake-load", "0:0"]);
    assert!(ok, "{err}");
    assert!(out.contains("block workload, 4K requests, median of 2"), "{out}");
    assert!(out.contains("CPU us/IO"), "{out}");
    assert!(!out.contains("WARNING"), "an idle (injected) machine gets no warning: {out}");
    assert!(!err.contains('\r'), "no progress bar when stderr is not a terminal");
    let json = bench_json(&dir);
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 3);
    assert_eq!(cells[0]["mode"], "none");
    assert_eq!(cells[0]["ratio_to_none"], 1.0);
    assert_eq!(cells[1]["mode"], "identity");
    assert_eq!(cells[1]["repetitions"].as_array().unwrap().len(), 2);
    let rep = &cells[1]["repetitions"][0];
    assert!(rep["translations"].as_u64().unwrap() > 0);
    assert_eq!(rep["data_errors"], 0);
    assert!(rep["guest_cpu_s"].as_f64().unwrap() > 0.0);
    let strict = &cells[2];
    assert_eq!(strict["requests_per_io"]["median"], 6.0);
    let cpu = &strict["cpu_ns_per_io"];
    let (lo, mid, hi) = (
        cpu["min"].as_f64().unwrap(),
        cpu["median"].as_f64().unwrap(),
        cpu["max"].as_f64().unwrap(),
    );
    assert!(0.0 < lo && lo <= mid && mid <= hi, "{cpu}");
    assert!(strict["device_cpu_ns_per_io"]["median"].as_f64().unwrap() > 0.0);
    let svg = std::fs::read_to_string(dir.join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("identity"));
    assert!(svg.contains("CPU us per I/O") && svg.contains("p99 latency"), "two new panels");
    assert!(svg.contains("exit cost 0"), "the title states the exit cost");
}

#[test]
fn bench_json_carries_run_metadata_and_the_summary() {
    let dir = scratch_dir("meta");
    let (ok, out, err) = small_bench(&dir, &["--fake-load", "0:0", "--host", "kvm"]);
    assert!(ok, "{err}");
    let j = bench_json(&dir);
    for key in ["commit", "timestamp", "cpu_model", "cpus", "duration_s", "warmup_s", "wall_s"] {
        assert!(!j[key].is_null(), "{key} missing");
    }
    assert_eq!(j["repetitions"], 2);
    assert_eq!(j["duration_s"], 0.02);
    assert_eq!(j["warmup_s"], 0.0);
    assert!(j["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(j["options"]["host"], "kvm");
    assert_eq!(j["options"]["threads"], serde_json::json!([1]));
    assert_eq!(j["host_model"], serde_json::json!({"exit_ns": 1500, "irq_ns": 1000}));
    assert!(j["instructions"]["available"].is_boolean());
    assert_eq!(j["load"]["busy"], false);
    assert!(j["load"]["during"]["other_cpus"].as_f64().unwrap() < 0.05);
    let s = &j["summary"][0];
    assert_eq!(s["ranked_by"], "modelled_ns_per_io");
    assert_eq!(s["cheapest_linux_isolating"], "strict");
    // Ranks as lists of modes, and per mode the figures the tie rule compared.
    let ranked: usize =
        s["tiers"].as_array().unwrap().iter().map(|t| t.as_array().unwrap().len()).sum();
    assert_eq!(ranked, 2, "identity and strict: {s}");
    let strict = s["modes"].as_array().unwrap().iter().find(|m| m["mode"] == "strict").unwrap();
    assert_eq!(strict["cells_cpu_ns_per_io"][0].as_array().unwrap().len(), 2);
    let floor = strict["floor_ns_per_io"].as_f64().unwrap();
    assert!(0.0 < floor && floor <= strict["median_ns_per_io"].as_f64().unwrap(), "{strict}");
    let reach = |i: usize| strict["reach_ns"][i].as_f64().unwrap();
    assert!(reach(0) < floor && floor < reach(1), "{strict}");
    assert!(j["bracket_cost_ns"].as_u64().unwrap() > 0);
    assert_eq!(j["cells"][2]["exit_cost_ns"], 1500);
    assert!(out.contains("summary: ranked by modelled cost = CPU + kicks x 1500 ns"), "{out}");
    assert!(out.contains("nothing: an unmap returns once the device dropped the mapping"), "{out}");
    assert!(
        out.contains("Linux: 6.7+ iommu.strict=1"),
        "the legend names the Linux setting: {out}"
    );
    assert!(out.contains("against real guests: scripts/real-guest --measure"), "{out}");
}

#[test]
fn callgrind_counts_instructions_and_they_decide_the_ties() {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("valgrind is not installed: skipped");
        return;
    }
    let dir = scratch_dir("callgrind");
    let (ok, out, err) = viommu(&[
        "bench",
        "--modes",
        "none,identity,strict,best",
        "--sizes",
        "4k",
        "--threads",
        "1",
        "--workloads",
        "block",
        "--duration",
        "0.02",
        "--repeat",
        "1",
        "--warmup",
        "0",
        "--fake-load",
        "0:0",
        "--count-window",
        "16",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("counting instructions of 4 cells under callgrind"), "{err}");
    assert!(out.contains("instructions per I/O: counted by valgrind"), "{out}");
    assert!(out.contains("instructions per I/O they add to no IOMMU"), "{out}");
    let j = bench_json(&dir);
    let cg = &j["instructions"]["callgrind"];
    assert_eq!(cg["counted"], true, "{cg}");
    let per_io = |mode: &str| {
        let c = cg["cells"].as_array().unwrap().iter().find(|c| c["mode"] == mode).unwrap();
        assert_eq!(c["ios"], 16, "{c}");
        (c["guest_instructions"].as_u64().unwrap(), c["device_instructions"].as_u64().unwrap())
    };
    let (none, identity, strict, best) =
        (per_io("none"), per_io("identity"), per_io("strict"), per_io("best"));
    // Only the modes that send requests keep the device's thread busy; the
    // waits are left out, so what the device does is its request work.
    assert_eq!(none.1, 0);
    assert!(identity.1 < 1000, "{identity:?}");
    assert!(strict.1 > best.1 && best.1 > 0, "{strict:?} {best:?}");
    // Strict's six requests and syncs per I/O against best's two and one.
    assert!(strict.0 + strict.1 > best.0 + best.1 && best.0 > identity.0 && identity.0 > none.0);
    let s = &j["summary"][0];
    assert_eq!(s["tie_rule"], "instructions");
    assert_eq!(s["ranking"], "identity < best < strict", "{s}");
}

#[test]
fn injected_load_prints_the_warning_in_table_and_json() {
    let dir = scratch_dir("load");
    let (ok, out, err) = small_bench(&dir, &["--fake-load", "1.5:1.0"]);
    assert!(ok, "{err}");
    assert!(out.contains("WARNING: machine busy"), "{out}");
    assert!(out.contains("[machine busy: MB/s and latency unreliable"), "{out}");
    let j = bench_json(&dir);
    assert_eq!(j["load"]["busy"], true);
    assert!(j["load"]["warning"].as_str().unwrap().contains("CPUs during it"));
    assert!(j["load"]["affected"].as_str().unwrap().contains("MB/s"));
    let others = j["load"]["during"]["other_cpus"].as_f64().unwrap();
    assert!((others - 1.0).abs() < 0.1, "{others}");
}

#[test]
fn help_gives_exit_cost_guidance_and_says_what_quick_shortens() {
    let (ok, out, _) = viommu(&["bench", "--help"]);
    assert!(ok);
    assert!(out.contains("perf kvm stat"), "{out}");
    assert!(out.contains("in-kernel ioeventfd exit"), "{out}");
    assert!(out.contains("0.05 s cells, one repetition, no warm-up"), "{out}");
    for preset in ["kvm", "nested", "confidential"] {
        assert!(out.contains(preset), "{preset}");
    }
}

#[test]
fn bad_arguments_are_refused() {
    let (ok, _, err) = viommu(&["bench", "--modes", "fast"]);
    assert!(!ok);
    assert!(err.contains("unknown mode \"fast\""), "{err}");
    let (ok, _, _) = viommu(&["bench", "--sizes", "0"]);
    assert!(!ok);
}

#[test]
fn trace_report_checks_a_marked_boot() {
    let (console, trace) = (data("lazy-boot.console"), data("lazy-boot.trace"));
    let (ok, out, err) = viommu(&["trace-report", "boot", "--policy", "lazy", &console, &trace]);
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [
            "CHECK PASS trace-lazy-read-4k-qd1",
            "ROW lazy read-4k-qd1 7.8 1.00 1.00 0.000 1.500 256.0 256.0 384.0 1.33",
            "CHECK PASS trace-lazy-write-4k-qd1",
            "ROW lazy write-4k-qd1 3.9 1.00 1.00 0.000 2.000 256.0 256.0 512.0 1.00",
            "TOTAL lazy trace map=5 unmap=4 attach=1 kicks=9 faults=1 blk_reqs=4 sets=5 marks=4",
        ]
    );
}

#[test]
fn trace_report_fails_when_the_guest_counted_otherwise() {
    let dir = scratch_dir("trace-report-fail");
    let console = dir.join("boot.console");
    let text = std::fs::read_to_string(data("lazy-boot.console")).unwrap();
    std::fs::write(&console, text.replace("map=2 unmap=2", "map=3 unmap=2")).unwrap();
    let trace = data("lazy-boot.trace");
    let (ok, out, err) =
        viommu(&["trace-report", "boot", "--policy", "best", console.to_str().unwrap(), &trace]);
    assert!(!ok);
    assert!(err.contains("1 trace checks failed"), "{err}");
    assert!(
        out.contains(
            "CHECK FAIL trace-best-read-4k-qd1 trace map/unmap/attach/kicks/reqs 2/2/0/3/2, \
             guest 3/2/0/3/2\n"
        ),
        "{out}"
    );
    assert!(out.contains("CHECK PASS trace-best-write-4k-qd1\n"), "{out}");
    // The old spelling of a policy is refused, not guessed at.
    let (ok, _, err) =
        viommu(&["trace-report", "boot", "--policy", "bypass", console.to_str().unwrap(), &trace]);
    assert!(!ok);
    assert!(err.contains("unknown policy \"bypass\""), "{err}");
    let (ok, _, err) =
        viommu(&["trace-report", "boot", "--policy", "lazy", "/nonexistent", &trace]);
    assert!(!ok);
    assert!(err.contains("/nonexistent"), "{err}");
}

/// Lines of `text[from..to]` that contain `what`.
fn count_in(lines: &[&str], what: &str) -> usize {
    lines.iter().filter(|l| l.contains(what)).count()
}

#[test]
fn trace_report_attributes_a_real_trace_by_its_marks() {
    // Marks before lines 1000 and 2000 of the Linux excerpt split it in three.
    let text = std::fs::read_to_string(data("linux-6.12-lazy-dd.excerpt.trace")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (a, b) = (&lines[999..1999], &lines[1999..]);
    let mut marked = lines[..999].join("\n");
    for part in [a, b] {
        marked += "\n1795499999.000000:virtio_iommu_set_config\n";
        marked += &part.join("\n");
    }
    let dir = scratch_dir("trace-report-marks");
    let trace = dir.join("marked.trace");
    std::fs::write(&trace, marked + "\n").unwrap();
    // Counted here with plain string matching, apart from the tool.
    let kick = "virtio_queue_notify vdev 0x5623c839fe30 n 0 ";
    let perf = |name: &str, part: &[&str]| {
        format!(
            "VG PERF {name} ios=0 reqs=0 bytes=0 mbps=0 map={} unmap={} attach={} kicks={}\n",
            count_in(part, ":virtio_iommu_map "),
            count_in(part, ":virtio_iommu_unmap "),
            count_in(part, ":virtio_iommu_attach "),
            count_in(part, kick)
        )
    };
    let console = dir.join("boot.console");
    let text = format!("VG MARK a cfgw=1\n{}VG MARK b cfgw=2\n{}", perf("a", a), perf("b", b));
    std::fs::write(&console, &text).unwrap();
    let args = |c: &PathBuf| {
        ["trace-report", "boot", "--policy", "strict", c.to_str().unwrap(), trace.to_str().unwrap()]
            .map(String::from)
    };
    let (ok, out, err) = viommu(&args(&console).each_ref().map(String::as_str));
    assert!(ok, "{err}{out}");
    assert!(out.contains("CHECK PASS trace-strict-a\nCHECK PASS trace-strict-b\n"), "{out}");
    // The whole excerpt, as `replay` counts it (see tests/data/README.md).
    assert!(out.contains("map=768 unmap=764 attach=1 kicks=774 "), "{out}");
    // A mark at a config write the trace does not have: b's lines count
    // as a's, and both checks fail.
    std::fs::write(&console, text.replacen("VG MARK b cfgw=2", "VG MARK b cfgw=3", 1)).unwrap();
    let (ok, out, _) = viommu(&args(&console).each_ref().map(String::as_str));
    assert!(!ok);
    assert!(out.contains("CHECK FAIL trace-strict-a "), "{out}");
    assert!(out.contains("CHECK FAIL trace-strict-b "), "{out}");
}

#[test]
fn trace_report_tables_medians_and_the_same_run_comparison() {
    let dir = scratch_dir("trace-report-table");
    let results = dir.join("results.txt");
    let mut text = String::new();
    for (rep, mbps) in [
        (1, ["20", "14", "50", "30"]),
        (2, ["22", "15", "48", "36"]),
        (3, ["21", "13", "55", "35"]),
    ] {
        text += &format!("ROW linux-none read-4k-qd1 {} 0 0 0 0 0 0 0 0\n", mbps[0]);
        text += &format!(
            "ROW linux-lazy read-4k-qd1 {} 1.00 1.00 0.000 4.014 1024.0 1024.0 4110.3 0.50\n",
            mbps[1]
        );
        text += &format!(
            "ROW identity read-4k-qd1 {} 0.00 0.00 0.000 0.000 0.0 0.0 0.0 0.00\n",
            mbps[2]
        );
        text += &format!(
            "ROW lazy read-4k-qd1 {} 1.00 0.05 0.000 1.00{rep} 256.0 14.1 256.2 1.05\n",
            mbps[3]
        );
        text += &format!("CHECK PASS trace-lazy-read-4k-qd1\nTOTAL lazy trace map={rep}\n");
    }
    std::fs::write(&results, text).unwrap();
    let (ok, out, err) = viommu(&["trace-report", "table", results.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.starts_with("median of 3 boots per policy:\n"), "{out}");
    let words = |l: &str| l.split_whitespace().collect::<Vec<_>>().join(" ");
    let lines: Vec<String> = out.lines().map(words).collect();
    assert!(
        lines.contains(&"lazy read-4k-qd1 35 30 36 1 0.05 0 1.002 256 14.1 256.2 1.05".into()),
        "{out}"
    );
    assert!(
        lines.contains(
            &"read-4k-qd1 21 (20-22) 14 (13-15) 50 (48-55) 35 (30-36) 0.67 0.70 4.014 1.002 2048 \
              270.1 lazy > linux-lazy"
                .into()
        ),
        "{out}"
    );
    let (ok, md, err) = viommu(&["trace-report", "table", "--markdown", results.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        md.contains("| read-4k-qd1 | 21 (20-22) | 14 (13-15) | 50 (48-55) | 35 (30-36) | 0.67 |"),
        "{md}"
    );
    assert!(md.contains("| 270.1 | lazy > linux-lazy |"), "{md}");
}

#[test]
fn trace_report_agree_compares_two_runs_verdicts() {
    let dir = scratch_dir("trace-report-agree");
    let run = |name: &str, lazy: [&str; 2]| {
        let path = dir.join(name);
        let mut text = String::new();
        for (l, ours) in [("30", lazy[0]), ("31", lazy[1])] {
            text += &format!("ROW linux-lazy read-4k-qd1 {l} 1 1 0 4.014 1024 1024 4110 0.5\n");
            text +=
                &format!("ROW lazy+irq read-4k-qd1 {ours} 1 0.05 0 1.002 256 14.1 256.2 1.05\n");
        }
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (first, same, other) =
        (run("a.txt", ["40", "41"]), run("b.txt", ["35", "45"]), run("c.txt", ["20", "31"]));
    let (ok, out, err) = viommu(&["trace-report", "agree", &first, &same]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("lazy+irq vs linux-lazy lazy+irq > linux-lazy lazy+irq > linux-lazy ="),
        "{out}"
    );
    assert!(out.ends_with("1 of 1 verdicts agree\n"), "{out}");
    let (ok, out, err) = viommu(&["trace-report", "agree", &first, &other]);
    assert!(!ok, "{out}");
    assert!(out.contains("within noise DIFFERS"), "{out}");
    assert!(err.contains("1 verdicts differ"), "{err}");
}
