//! `viommu sample-cpu` end to end: the command's output copied, CPU windows
//! added to its `VG PERF` lines, its exit status passed on.

use std::process::Command;

fn sample_cpu(script: &str) -> (String, Option<i32>) {
    let out = Command::new(env!("CARGO_BIN_EXE_viommu"))
        .args(["sample-cpu", "--", "sh", "-c", script])
        .output()
        .expect("run viommu");
    (String::from_utf8(out.stdout).expect("utf-8"), out.status.code())
}

#[test]
fn perf_lines_get_the_commands_cpu_and_the_exit_status_passes_on() {
    // Three samples: the middle window burns CPU in the shell's child.
    let (out, code) = sample_cpu(
        "echo 'VG SAMPLE'; echo 'VG SAMPLE'; i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; \
         echo 'VG SAMPLE'; echo 'VG PERF w ios=1'; echo done; exit 3",
    );
    assert_eq!(code, Some(3), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..3], ["VG SAMPLE"; 3]);
    let perf = lines[3];
    let field = |k: &str| -> u64 {
        perf.split_whitespace()
            .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {perf:?}"))
    };
    assert!(perf.starts_with("VG PERF w ios=1 "), "{perf}");
    // The loop ran in the shell, which the clock counts: well above 1 ms.
    assert!(field("host_cpu_ns") > 1_000_000, "{perf}");
    assert!(field("host_cpu_ns") > field("calib_cpu_ns"), "{perf}");
    assert_eq!(lines[4], "done");
}

#[test]
fn a_long_line_is_copied_whole() {
    let (out, code) = sample_cpu("head -c 200000 /dev/zero | tr '\\0' a; echo; echo end");
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!((lines[0].len(), lines[1]), (200_000, "end"));
}
