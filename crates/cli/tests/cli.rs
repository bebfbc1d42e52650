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
    assert!(out.contains("statuses: OK 2, UNSUPP 1, INVAL 1, RANGE 2"), "{out}");
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

#[test]
fn quick_bench_writes_table_json_and_chart() {
    let dir = scratch_dir("bench");
    let (ok, out, err) = viommu(&[
        "bench",
        "--modes",
        "none,identity",
        "--sizes",
        "4k",
        "--threads",
        "1",
        "--workloads",
        "block",
        "--duration",
        "0.02",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("block workload, 4K requests"), "{out}");
    assert!(!err.contains('\r'), "no progress bar when stderr is not a terminal");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json")).unwrap()).unwrap();
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 2);
    assert_eq!(cells[0]["mode"], "none");
    assert_eq!(cells[0]["ratio_to_none"], 1.0);
    assert_eq!(cells[1]["mode"], "identity");
    assert!(cells[1]["translations"].as_u64().unwrap() > 0);
    assert_eq!(cells[1]["data_errors"], 0);
    let svg = std::fs::read_to_string(dir.join("bench.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("identity"));
}

#[test]
fn bad_arguments_are_refused() {
    let (ok, _, err) = viommu(&["bench", "--modes", "fast"]);
    assert!(!ok);
    assert!(err.contains("unknown mode \"fast\""), "{err}");
    let (ok, _, _) = viommu(&["bench", "--sizes", "0"]);
    assert!(!ok);
}
