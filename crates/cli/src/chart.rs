//! The SVG chart, written by hand (a plotting crate would bring a font and
//! raster stack for a few bars): for each workload and size, CPU time per
//! I/O, MB/s, p99 latency and kicks per I/O by mode, one bar per thread
//! count, each bar the median of the repetitions.

use std::fmt::Write as _;

use viommu_vm::bench::{Mode, Workload};

use crate::bench::size_label;
use crate::cells::Cell;
use crate::host::HostCosts;

const PANEL_W: f64 = 330.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 58.0;
const TOP: f64 = 46.0;
const BOTTOM: f64 = 96.0;
const COLORS: [&str; 6] = ["#4477aa", "#ee6677", "#228833", "#ccbb44", "#66ccee", "#aa3377"];

/// Which quantity a row of panels shows.
#[derive(Clone, Copy)]
enum Metric {
    Cpu,
    Throughput,
    P99,
    Kicks,
}

impl Metric {
    const ALL: [Metric; 4] = [Metric::Cpu, Metric::Throughput, Metric::P99, Metric::Kicks];

    fn value(self, c: &Cell) -> f64 {
        let s = match self {
            Metric::Cpu => c.cpu_ns().map(|s| crate::cells::Stat { median: s.median / 1e3, ..s }),
            Metric::Throughput => c.mb_s(),
            Metric::P99 => c.p99_us(),
            Metric::Kicks => c.kicks(),
        };
        s.map_or(0.0, |s| s.median)
    }

    fn title(self) -> &'static str {
        match self {
            Metric::Cpu => "CPU us per I/O (log)",
            Metric::Throughput => "MB/s, load-sensitive (log)",
            Metric::P99 => "p99 latency us (log)",
            Metric::Kicks => "kicks per I/O (log)",
        }
    }

    /// Maps a value to 0..=1 of the panel height, given the panel maximum:
    /// log10(1 + v), so that zero stays at the axis and decades are even.
    fn scale(self, v: f64, max: f64) -> f64 {
        (1.0 + v).log10() / (1.0 + max).log10()
    }

    /// Ticks at 1, 2, 5 times each power of ten up to `max`, and 0.
    fn ticks(self, max: f64) -> Vec<f64> {
        let mut t = vec![0.0];
        let mut decade = 1.0;
        while decade <= max {
            for m in [1.0, 2.0, 5.0] {
                if m * decade <= max {
                    t.push(m * decade);
                }
            }
            decade *= 10.0;
        }
        t
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Renders the chart; the title states the host model.
pub fn svg(results: &[Cell], host: Option<HostCosts>) -> String {
    let mut groups: Vec<(Workload, usize)> = Vec::new();
    let mut modes: Vec<Mode> = Vec::new();
    let mut threads: Vec<usize> = Vec::new();
    for r in results {
        let g = (r.spec.workload, r.spec.io_size);
        if !groups.contains(&g) {
            groups.push(g);
        }
        if !modes.contains(&r.spec.mode) {
            modes.push(r.spec.mode);
        }
        if !threads.contains(&r.spec.threads) {
            threads.push(r.spec.threads);
        }
    }
    let metrics = Metric::ALL;
    let width = LEFT + groups.len().max(1) as f64 * (PANEL_W + LEFT);
    let height = TOP + metrics.len() as f64 * (PANEL_H + BOTTOM) + 20.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="15" font-weight="bold">viommu bench: cost per I/O by mode (median of {}; {})</text>"#,
        results.first().map_or(0, |c| c.reps.len()),
        match host {
            Some(h) => format!("exit cost {} ns, interrupt cost {} ns", h.exit_ns, h.irq_ns),
            None => "exit cost 0".into(),
        }
    );
    // Legend: thread counts.
    for (i, t) in threads.iter().enumerate() {
        let x = LEFT + i as f64 * 90.0;
        let _ = writeln!(
            s,
            r#"<rect x="{x}" y="28" width="10" height="10" fill="{}"/><text x="{}" y="37">{t} thread{}</text>"#,
            COLORS[i % COLORS.len()],
            x + 14.0,
            if *t == 1 { "" } else { "s" }
        );
    }
    for (row, &metric) in metrics.iter().enumerate() {
        for (col, &(workload, size)) in groups.iter().enumerate() {
            let x0 = LEFT + col as f64 * (PANEL_W + LEFT);
            let y0 = TOP + 14.0 + row as f64 * (PANEL_H + BOTTOM);
            panel(&mut s, results, metric, (workload, size), &modes, &threads, x0, y0);
        }
    }
    s.push_str("</svg>\n");
    s
}

#[allow(clippy::too_many_arguments)]
fn panel(
    s: &mut String,
    results: &[Cell],
    metric: Metric,
    (workload, size): (Workload, usize),
    modes: &[Mode],
    threads: &[usize],
    x0: f64,
    y0: f64,
) {
    let cells: Vec<&Cell> =
        results.iter().filter(|r| r.spec.workload == workload && r.spec.io_size == size).collect();
    // Some headroom above the tallest bar.
    let max = cells.iter().map(|r| metric.value(r)).fold(0.0, f64::max).max(1.0) * 1.3;
    let unit = if workload == Workload::Net { "packets" } else { "requests" };
    let _ = writeln!(
        s,
        r#"<text x="{x0}" y="{}" font-weight="bold">{} — {workload}, {} {unit}</text>"#,
        y0 - 4.0,
        metric.title(),
        size_label(size)
    );
    let base = y0 + PANEL_H;
    for t in metric.ticks(max) {
        let y = base - metric.scale(t, max) * PANEL_H;
        let _ = writeln!(
            s,
            r##"<line x1="{x0}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 + PANEL_W,
            x0 - 4.0,
            y + 4.0,
            fmt_tick(t)
        );
    }
    let slot = PANEL_W / modes.len().max(1) as f64;
    let bar = (slot - 6.0) / threads.len().max(1) as f64;
    for (mi, mode) in modes.iter().enumerate() {
        let sx = x0 + mi as f64 * slot + 3.0;
        for (ti, t) in threads.iter().enumerate() {
            let Some(r) = cells.iter().find(|r| r.spec.mode == *mode && r.spec.threads == *t)
            else {
                continue;
            };
            let v = metric.value(r);
            let h = metric.scale(v, max) * PANEL_H;
            let _ = writeln!(
                s,
                r#"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"><title>{mode} x{t}: {v:.2}</title></rect>"#,
                sx + ti as f64 * bar,
                base - h,
                bar.max(1.0),
                COLORS[ti % COLORS.len()]
            );
        }
        let lx = sx + slot / 2.0 - 3.0;
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{:.1}" text-anchor="end" transform="rotate(-40 {lx:.1} {:.1})">{}</text>"#,
            base + 12.0,
            base + 12.0,
            esc(mode.name())
        );
    }
    let _ = writeln!(
        s,
        r#"<line x1="{x0}" y1="{base}" x2="{:.1}" y2="{base}" stroke="black"/><line x1="{x0}" y1="{y0}" x2="{x0}" y2="{base}" stroke="black"/>"#,
        x0 + PANEL_W
    );
}

fn fmt_tick(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_ticks_and_scale() {
        assert_eq!(Metric::Kicks.ticks(30.0), vec![0.0, 1.0, 2.0, 5.0, 10.0, 20.0]);
        assert_eq!(Metric::Throughput.ticks(0.5), vec![0.0]);
        assert_eq!(Metric::Kicks.scale(0.0, 99.0), 0.0);
        assert!((Metric::Kicks.scale(9.0, 99.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn empty_chart_is_valid_svg() {
        let s = svg(&[], None);
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
    }
}
