//! The tables of a run: the median of every `ROW` column per policy and
//! workload, with the MB/s spread over the boots (TCG timings are noisy:
//! other work shares the CPUs), then the same-run comparisons of Linux's
//! drivers with ours, in MB/s and in QEMU's CPU time per I/O, each with a
//! verdict that claims an order only outside the noise ([`verdict`]).

use super::policies;

/// Column names of a `ROW` line after policy and workload.
pub const ROW_COLUMNS: [&str; 12] = [
    "MB/s",
    "MAP/io",
    "UNMAP/io",
    "ATT/io",
    "kick/io",
    "MAP/MiB",
    "UNMAP/MiB",
    "kick/MiB",
    "reqs/kick",
    "CPU-us/io",
    "calib-ms",
    "calib-cpu-ms",
];

/// The `ROW` column of QEMU's CPU time per I/O, in µs (absent from rows of
/// boots run without `viommu sample-cpu`). The two after it, the guest's
/// calibration loop before the workload (its time and QEMU's CPU for it),
/// are shown in the median table and judged nowhere: scaling rows by them
/// to the run's median host speed made the spreads wider, not narrower
/// (docs/real-guest.md, "Noise").
pub const CPU_COLUMN: usize = 9;

/// What a verdict compares: MB/s (more is better) or QEMU's CPU time per
/// I/O (less is better).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    /// MB/s, column 0.
    MbS,
    /// CPU µs per I/O, [`CPU_COLUMN`].
    Cpu,
}

impl Metric {
    /// Both, in table order.
    pub const ALL: [Metric; 2] = [Metric::MbS, Metric::Cpu];

    fn column(self) -> usize {
        match self {
            Metric::MbS => 0,
            Metric::Cpu => CPU_COLUMN,
        }
    }

    /// The name the agreement prints.
    pub fn name(self) -> &'static str {
        match self {
            Metric::MbS => "MB/s",
            Metric::Cpu => "CPU/io",
        }
    }
}

/// The medians of one policy and workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Median {
    /// The boot's policy.
    pub policy: String,
    /// The workload.
    pub workload: String,
    /// Each column's median, printed to 4 significant digits as the tables
    /// show it; later figures are computed from these.
    pub values: Vec<String>,
    /// How many boots gave a row.
    pub samples: usize,
    /// Each column's least and greatest value over the boots.
    pub range: Vec<(f64, f64)>,
    /// How many boots gave each column (a row may lack the last ones).
    pub counts: Vec<usize>,
}

impl Median {
    /// Column `i` as a number.
    fn num(&self, i: usize) -> f64 {
        self.values.get(i).map_or(0.0, |v| v.parse().unwrap_or(0.0))
    }

    /// Column `i` as `median (min-max)`, the median alone from one boot,
    /// `-` when no boot gave it.
    fn spread(&self, i: usize) -> String {
        match (self.range.get(i), self.counts.get(i)) {
            (Some(&(lo, hi)), Some(&n)) if n > 1 => {
                format!("{} ({}-{})", self.values[i], fmt_g(lo, 4), fmt_g(hi, 4))
            }
            (Some(_), Some(1)) => self.values[i].clone(),
            _ => "-".into(),
        }
    }

    /// MB/s as `median (min-max)`, or the median alone from one boot.
    fn mb_s(&self) -> String {
        self.spread(0)
    }
}

/// Fewest boots per policy for a verdict: from one boot, its minimum and
/// maximum are the same draw.
pub const VERDICT_MIN_BOOTS: usize = 2;

/// The same-run verdict on MB/s of policy `a` against `b` in one workload:
/// `a > b` only when the least of `a`'s boots is above the greatest of
/// `b`'s (and the other way round), else `within noise`; `-` when either
/// did not run, `n<2` with fewer than [`VERDICT_MIN_BOOTS`] boots.
pub fn verdict(a: Option<&Median>, b: Option<&Median>) -> String {
    judge(a, b, Metric::MbS)
}

/// The same-run verdict on `metric`, as [`verdict`] gives it for MB/s. For
/// CPU per I/O, `a < b` (a costs less) only when `a`'s greatest is below
/// `b`'s least.
pub fn judge(a: Option<&Median>, b: Option<&Median>, metric: Metric) -> String {
    let (Some(a), Some(b)) = (a, b) else { return "-".into() };
    let i = metric.column();
    let (Some(&(a_lo, a_hi)), Some(&(b_lo, b_hi))) = (a.range.get(i), b.range.get(i)) else {
        return "-".into();
    };
    let n = |m: &Median| m.counts.get(i).copied().unwrap_or(0);
    if n(a) < VERDICT_MIN_BOOTS || n(b) < VERDICT_MIN_BOOTS {
        return format!("n<{VERDICT_MIN_BOOTS}");
    }
    let (op, a_first, b_first) = match metric {
        Metric::MbS => ('>', a_lo > b_hi, b_lo > a_hi),
        Metric::Cpu => ('<', a_hi < b_lo, b_hi < a_lo),
    };
    if a_first {
        format!("{} {op} {}", a.policy, b.policy)
    } else if b_first {
        format!("{} {op} {}", b.policy, a.policy)
    } else {
        "within noise".into()
    }
}

/// The medians of the `ROW` lines of `results`, per policy and workload,
/// in the order they first appear. Other lines are ignored.
pub fn medians(results: &str) -> Vec<Median> {
    let mut keys: Vec<(String, String, Vec<Vec<f64>>)> = Vec::new();
    for line in results.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [tag, policy, workload, values @ ..] = &f[..] else { continue };
        if *tag != "ROW" {
            continue;
        }
        let i = match keys.iter().position(|(p, w, _)| p == policy && w == workload) {
            Some(i) => i,
            None => {
                keys.push((policy.to_string(), workload.to_string(), Vec::new()));
                keys.len() - 1
            }
        };
        // Not a number counts as 0, as for awk.
        keys[i].2.push(values.iter().map(|v| v.parse().unwrap_or(0.0)).collect());
    }
    keys.into_iter()
        .map(|(policy, workload, rows)| {
            let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
            let cols: Vec<Vec<f64>> = (0..columns)
                .map(|c| rows.iter().filter_map(|r| r.get(c).copied()).collect())
                .collect();
            let values = cols.iter().map(|c| fmt_g(median(&mut c.clone()), 4)).collect();
            let range = cols
                .iter()
                .map(|c| {
                    let lo = c.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = c.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    (lo, hi)
                })
                .collect();
            let counts = cols.iter().map(Vec::len).collect();
            Median { policy, workload, values, samples: rows.len(), range, counts }
        })
        .collect()
}

/// The median; of an even count, the mean of the middle two.
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// `x` as C's `%.<precision>g` prints it: that many significant digits,
/// trailing zeros dropped, an exponent outside `[1e-4, 10^precision)`.
pub fn fmt_g(x: f64, precision: usize) -> String {
    let p = precision.max(1);
    if x == 0.0 || !x.is_finite() {
        return format!("{x}");
    }
    let sci = format!("{:.*e}", p - 1, x);
    let (mantissa, exp) = sci.split_once('e').expect("an exponent");
    let exp: i32 = exp.parse().expect("a number");
    if exp < -4 || exp >= p as i32 {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip_zeros(mantissa), exp.abs())
    } else {
        strip_zeros(&format!("{:.*}", (p as i32 - 1 - exp) as usize, x))
    }
}

fn strip_zeros(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s.to_string()
    }
}

/// Lays out rows as columns: the first `left` left-aligned, the others
/// right-aligned, each as wide as its widest cell.
fn aligned(rows: &[Vec<String>], left: usize) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> = (0..cols)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(c, s)| {
                if c < left {
                    format!("{s:<w$}", w = width[c])
                } else {
                    format!("{s:>w$}", w = width[c])
                }
            })
            .collect();
        out.push_str(cells.join(" ").trim_end());
        out.push('\n');
    }
    out
}

/// The median table: one line per policy and workload, the least and
/// greatest MB/s over the boots after the median.
pub fn median_table(medians: &[Median]) -> String {
    let head = ["policy", "workload", ROW_COLUMNS[0], "min", "max"];
    let mut rows =
        vec![head.iter().chain(&ROW_COLUMNS[1..]).map(|s| s.to_string()).collect::<Vec<_>>()];
    for m in medians {
        let (lo, hi) = m.range.first().copied().unwrap_or((0.0, 0.0));
        let mut r = vec![m.policy.clone(), m.workload.clone()];
        r.extend(m.values.first().cloned());
        r.push(fmt_g(lo, 4));
        r.push(fmt_g(hi, 4));
        r.extend(m.values.iter().skip(1).cloned());
        rows.push(r);
    }
    aligned(&rows, 2)
}

/// A ratio column: the MB/s of a stack's lazy boot over its own no-IOMMU
/// boot, with its short and long heading. Shown when both ran.
const RATIOS: [(&str, &str, &str, &str); 3] = [
    ("linux-lazy", "linux-none", "L/l-none", "L ÷ L-none"),
    ("lazy", "identity", "l/identity", "l ÷ identity"),
    ("lazy+irq", "identity+irq", "l+i/id+i", "lazy+irq ÷ identity+irq"),
];

/// The count columns: kicks per request, then MAP+UNMAP per MiB, of
/// linux-lazy and of our lazy (the polling boot, else the `+irq` one: the
/// counts are the driver's, not the waiting's).
const COUNT_HEADS: [(&str, &str); 4] = [
    ("kick/rq L", "kicks/req L"),
    ("kick/rq l", "kicks/req l"),
    ("M+U/MiB L", "MAP+UNMAP/MiB L"),
    ("M+U/MiB l", "MAP+UNMAP/MiB l"),
];

/// The policy pairs the verdict columns judge, ours then Linux's, with the
/// column's short and long heading; a column is shown when both ran. The
/// `+irq` pairs wait for completions the way Linux's driver does.
pub const VERDICT_PAIRS: [(&str, &str, &str, &str); 4] = [
    ("lazy", "linux-lazy", "lazy vs L", "MB/s: lazy vs linux-lazy"),
    ("strict", "linux-strict", "strict vs S", "MB/s: strict vs linux-strict"),
    ("lazy+irq", "linux-lazy", "lazy+i vs L", "MB/s: lazy+irq vs linux-lazy"),
    ("strict+irq", "linux-strict", "strict+i vs S", "MB/s: strict+irq vs linux-strict"),
];

/// What the comparison's footnote says.
pub const LEGEND: &str = "(L = linux-lazy, S = linux-strict, l = our lazy (else lazy+irq), \
                          +i = +irq; MB/s as median (min-max) over the boots; ratios of MB/s \
                          to each stack's own no-IOMMU boot; vs: A > B only when A's least MB/s \
                          is above B's greatest, else within noise; n<2 = fewer than 2 boots; \
                          - = not run)";

/// The medians of `policy` in `workload`, if it ran there.
fn lookup<'a>(medians: &'a [Median], policy: &str, workload: &str) -> Option<&'a Median> {
    medians.iter().find(|m| m.policy == policy && m.workload == workload)
}

/// Whether `policy` has any row in `medians`.
fn ran(medians: &[Median], policy: &str) -> bool {
    medians.iter().any(|m| m.policy == policy)
}

/// Workloads in the order they first appear.
fn workloads(medians: &[Median]) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for m in medians {
        if !out.contains(&m.workload.as_str()) {
            out.push(&m.workload);
        }
    }
    out
}

/// The verdict pairs of [`VERDICT_PAIRS`] whose two policies both ran.
fn judged_pairs(
    medians: &[Median],
) -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    VERDICT_PAIRS.into_iter().filter(|(a, b, _, _)| ran(medians, a) && ran(medians, b)).collect()
}

/// One verdict cell: workload, metric, our policy, Linux's, and the verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Cell {
    /// The workload.
    pub workload: String,
    /// What the verdict compares.
    pub metric: Metric,
    /// Our policy of the pair.
    pub ours: &'static str,
    /// Linux's policy of the pair.
    pub linux: &'static str,
    /// What [`judge`] says.
    pub verdict: String,
}

/// Every verdict cell of a run: each workload against each pair of
/// [`VERDICT_PAIRS`] that both ran, in MB/s and, where both boots
/// measured it, in CPU per I/O.
pub fn verdict_cells(medians: &[Median]) -> Vec<Cell> {
    let find = |p: &str, w: &str| lookup(medians, p, w);
    let pairs = judged_pairs(medians);
    let mut cells = Vec::new();
    for metric in Metric::ALL {
        for w in workloads(medians) {
            for (ours, linux, _, _) in &pairs {
                let verdict = judge(find(ours, w), find(linux, w), metric);
                if metric == Metric::Cpu && verdict == "-" {
                    continue;
                }
                cells.push(Cell { workload: w.to_string(), metric, ours, linux, verdict });
            }
        }
    }
    cells
}

/// The comparison, per workload: MB/s of every policy that ran (in
/// [`policies`] order), the [`RATIOS`] whose policies ran, kicks per
/// request and MAP+UNMAP per MiB of linux-lazy and our lazy, and the
/// verdicts. `-`: not run.
fn comparison(medians: &[Median], long_names: bool) -> Vec<Vec<String>> {
    let find = |p: &str, w: &str| lookup(medians, p, w);
    let dash = || "-".to_string();
    let pick = |short: &'static str, long: &'static str| if long_names { long } else { short };
    let ran_policies: Vec<(&str, &str)> = policies().filter(|(p, _)| ran(medians, p)).collect();
    let ratios: Vec<_> =
        RATIOS.iter().filter(|(a, b, _, _)| ran(medians, a) && ran(medians, b)).collect();
    let our_lazy = if ran(medians, "lazy") { "lazy" } else { "lazy+irq" };
    let pairs = judged_pairs(medians);
    let mut head = vec!["workload".to_string()];
    head.extend(
        ran_policies.iter().map(|(p, short)| if long_names { p } else { short }.to_string()),
    );
    head.extend(ratios.iter().map(|(_, _, s, l)| pick(s, l).to_string()));
    head.extend(COUNT_HEADS.iter().map(|(s, l)| pick(s, l).to_string()));
    head.extend(pairs.iter().map(|(_, _, s, l)| pick(s, l).to_string()));
    let mut rows = vec![head];
    for w in workloads(medians) {
        let mut r = vec![w.to_string()];
        r.extend(ran_policies.iter().map(|(p, _)| find(p, w).map_or_else(dash, Median::mb_s)));
        for (a, b, _, _) in &ratios {
            r.push(match (find(a, w), find(b, w)) {
                (Some(a), Some(b)) if b.num(0) > 0.0 => format!("{:.2}", a.num(0) / b.num(0)),
                _ => dash(),
            });
        }
        for p in ["linux-lazy", our_lazy] {
            r.push(find(p, w).map_or_else(dash, |m| m.values.get(4).cloned().unwrap_or_else(dash)));
        }
        for p in ["linux-lazy", our_lazy] {
            r.push(find(p, w).map_or_else(dash, |m| fmt_g(m.num(5) + m.num(6), 6)));
        }
        for (ours, linux, _, _) in &pairs {
            r.push(verdict(find(ours, w), find(linux, w)));
        }
        rows.push(r);
    }
    rows
}

/// Two runs' verdicts side by side, cell by cell (only cells both runs
/// judged), and how many agree.
pub struct Agreement {
    /// Per cell: workload, pair, the first run's verdict, the second's.
    pub rows: Vec<Vec<String>>,
    /// Cells whose verdicts are the same.
    pub agree: usize,
    /// Cells judged in both runs.
    pub cells: usize,
    /// Cells only one run judged.
    pub unmatched: usize,
}

/// Compares the verdict cells of two runs.
pub fn agreement(first: &[Median], second: &[Median]) -> Agreement {
    let (a, b) = (verdict_cells(first), verdict_cells(second));
    let key = |c: &Cell| (c.workload.clone(), c.metric, c.ours, c.linux);
    let mut rows =
        vec![["workload", "metric", "pair", "first", "second", ""].map(String::from).to_vec()];
    let (mut agree, mut cells) = (0, 0);
    for c in &a {
        let Some(d) = b.iter().find(|d| key(d) == key(c)) else { continue };
        cells += 1;
        let same = c.verdict == d.verdict;
        agree += usize::from(same);
        rows.push(vec![
            c.workload.clone(),
            c.metric.name().to_string(),
            format!("{} vs {}", c.ours, c.linux),
            c.verdict.clone(),
            d.verdict.clone(),
            if same { "=" } else { "DIFFERS" }.to_string(),
        ]);
    }
    Agreement { rows, agree, cells, unmatched: a.len() + b.len() - 2 * cells }
}

/// The agreement as aligned text, with its count.
pub fn agreement_text(a: &Agreement) -> String {
    let mut out = aligned(&a.rows, 5);
    out += &format!("{} of {} verdicts agree", a.agree, a.cells);
    if a.unmatched > 0 {
        out += &format!(" ({} cells judged in one run only)", a.unmatched);
    }
    out.push('\n');
    out
}

/// What the CPU comparison's footnote says.
pub const CPU_LEGEND: &str = "(QEMU's CPU time, all its threads, per I/O in µs, from a sample \
                              before and after each workload: median (min-max) over the boots; \
                              it includes the guest's pattern fill and check, the same work in \
                              every boot; vs: A < B only when A's greatest is below B's least, \
                              else within noise)";

/// The CPU comparison, per workload: QEMU's CPU per I/O of every policy
/// whose boots measured it, and the CPU verdicts of [`VERDICT_PAIRS`].
/// Empty when no boot measured it.
fn cpu_comparison(medians: &[Median], long_names: bool) -> Vec<Vec<String>> {
    let find = |p: &str, w: &str| lookup(medians, p, w);
    let measured = |p: &str| {
        medians.iter().any(|m| m.policy == p && m.counts.get(CPU_COLUMN).is_some_and(|&n| n > 0))
    };
    let ran_policies: Vec<(&str, &str)> = policies().filter(|(p, _)| measured(p)).collect();
    if ran_policies.is_empty() {
        return Vec::new();
    }
    let pairs: Vec<_> =
        VERDICT_PAIRS.into_iter().filter(|(a, b, _, _)| measured(a) && measured(b)).collect();
    let mut head = vec!["workload".to_string()];
    head.extend(
        ran_policies.iter().map(|(p, short)| if long_names { p } else { short }.to_string()),
    );
    head.extend(pairs.iter().map(|(a, b, short, _)| {
        if long_names {
            format!("CPU/io: {a} vs {b}")
        } else {
            short.to_string()
        }
    }));
    let mut rows = vec![head];
    for w in workloads(medians) {
        let mut r = vec![w.to_string()];
        r.extend(
            ran_policies
                .iter()
                .map(|(p, _)| find(p, w).map_or_else(|| "-".into(), |m| m.spread(CPU_COLUMN))),
        );
        for (ours, linux, _, _) in &pairs {
            r.push(judge(find(ours, w), find(linux, w), Metric::Cpu));
        }
        rows.push(r);
    }
    rows
}

/// The comparisons as aligned text, each with its legend: MB/s, then (when
/// measured) CPU per I/O.
pub fn comparison_text(medians: &[Median]) -> String {
    let mut out = aligned(&comparison(medians, false), 1) + LEGEND + "\n";
    let cpu = cpu_comparison(medians, false);
    if !cpu.is_empty() {
        out += "\nsame run, QEMU's CPU time per I/O (µs):\n";
        out += &aligned(&cpu, 1);
        out += CPU_LEGEND;
        out.push('\n');
    }
    out
}

/// Rows as a Markdown table.
fn markdown(rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
        if i == 0 {
            out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
        }
    }
    out
}

/// The comparisons as Markdown tables, for the docs: MB/s, then (when
/// measured) CPU per I/O after a blank line.
pub fn comparison_markdown(medians: &[Median]) -> String {
    let mut out = markdown(&comparison(medians, true));
    let cpu = cpu_comparison(medians, true);
    if !cpu.is_empty() {
        out.push('\n');
        out += &markdown(&cpu);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fmt_g_prints_as_c_does() {
        let cases = [
            (48.2, "48.2"),
            (35.0, "35"),
            (4.0145, "4.014"),
            (1.0, "1"),
            (1234.5, "1234"),
            (9999.5, "1e+04"),
            (10510.0, "1.051e+04"),
            (0.00012345, "0.0001234"),
            (0.000012345, "1.234e-05"),
            (-2.5, "-2.5"),
            (0.0, "0"),
        ];
        for (x, want) in cases {
            assert_eq!(fmt_g(x, 4), want, "{x}");
        }
        assert_eq!(fmt_g(256.2 + 261.8, 6), "518");
        assert_eq!(fmt_g(1.1 + 0.15, 6), "1.25");
    }

    #[test]
    fn medians_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0]), 2.5);
        assert_eq!(median(&mut [7.0]), 7.0);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn medians_are_per_policy_and_workload_in_first_seen_order() {
        let results = "\
ROW lazy read-4k-qd1 30 1 1 0.001 1 256 256 256 2
CHECK PASS trace-lazy-read-4k-qd1
ROW lazy read-4k-qd32 100 1 1 0 1 256 256 256 2
ROW identity read-4k-qd1 50 0 0 0 0 0 0 0 0
ROW lazy read-4k-qd1 40 1 1 0.003 1 256 256 256 2
ROW lazy read-4k-qd1 35.5 1 1 0.002 1 256 256 256 2
TOTAL lazy trace map=1
ROW bad
";
        let m = medians(results);
        let keys: Vec<(&str, &str, usize)> =
            m.iter().map(|m| (m.policy.as_str(), m.workload.as_str(), m.samples)).collect();
        assert_eq!(
            keys,
            [
                ("lazy", "read-4k-qd1", 3),
                ("lazy", "read-4k-qd32", 1),
                ("identity", "read-4k-qd1", 1)
            ]
        );
        assert_eq!(m[0].values[0], "35.5");
        assert_eq!(m[0].values[3], "0.002");
        assert_eq!(m[0].values.len(), 9);
        assert_eq!(m[0].range[0], (30.0, 40.0));
        assert_eq!(m[0].range[3], (0.001, 0.003));
        assert_eq!(m[1].range[0], (100.0, 100.0));
    }

    /// Rows of boots of `policy` in `workload` with these MB/s.
    fn boots(policy: &str, workload: &str, mb_s: &[f64]) -> String {
        mb_s.iter()
            .map(|v| format!("ROW {policy} {workload} {v} 1 1 0 1 256 256 256 1\n"))
            .collect()
    }

    fn verdict_of(a: &[f64], b: &[f64]) -> String {
        let rows = boots("lazy", "w", a) + &boots("linux-lazy", "w", b);
        let m = medians(&rows);
        verdict(m.iter().find(|m| m.policy == "lazy"), m.iter().find(|m| m.policy == "linux-lazy"))
    }

    #[test]
    fn a_verdict_claims_an_order_only_when_the_ranges_do_not_meet() {
        assert_eq!(
            verdict_of(&[40.0, 42.0, 41.0, 45.0, 43.0], &[30.0, 35.0, 38.0]),
            "lazy > linux-lazy"
        );
        assert_eq!(verdict_of(&[20.0, 22.0], &[30.0, 35.0]), "linux-lazy > lazy");
        // One slow boot of lazy is enough to make it noise.
        assert_eq!(verdict_of(&[40.0, 42.0, 37.0], &[30.0, 35.0, 38.0]), "within noise");
        // Touching is not above.
        assert_eq!(verdict_of(&[38.0, 42.0], &[30.0, 38.0]), "within noise");
        // The medians alone (42 against 30) would have said lazy > linux-lazy.
        assert_eq!(verdict_of(&[42.0, 42.0, 10.0], &[30.0, 29.0, 31.0]), "within noise");
        assert_eq!(verdict_of(&[40.0], &[30.0, 31.0]), "n<2", "one boot is no range");
        let m = medians(&boots("lazy", "w", &[1.0, 2.0]));
        assert_eq!(verdict(m.first(), None), "-");
    }

    #[test]
    fn the_comparison_shows_mb_s_ranges_and_verdicts() {
        let rows = boots("linux-lazy", "read-4k-qd1", &[30.0, 35.0, 38.0, 33.0, 31.0])
            + &boots("lazy", "read-4k-qd1", &[40.0, 42.0, 41.0, 45.0, 43.0])
            + &boots("linux-strict", "read-4k-qd1", &[20.0, 26.0, 21.0, 22.0, 23.0])
            + &boots("strict", "read-4k-qd1", &[25.0, 24.0, 28.0, 27.0, 30.0]);
        let text = comparison_text(&medians(&rows));
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("lazy vs L") && lines[0].ends_with("strict vs S"), "{text}");
        assert!(lines[1].contains("33 (30-38)") && lines[1].contains("42 (40-45)"), "{text}");
        assert!(
            lines[1].contains("lazy > linux-lazy") && lines[1].ends_with("within noise"),
            "{text}"
        );
        assert!(text.contains("A > B only when A's least MB/s is above B's greatest"), "{text}");
    }

    fn row(policy: &str, workload: &str, values: [&str; 9]) -> Median {
        Median {
            policy: policy.into(),
            workload: workload.into(),
            values: values.map(String::from).to_vec(),
            samples: 1,
            range: values.iter().map(|v| v.parse().unwrap()).map(|v| (v, v)).collect(),
            counts: vec![1; 9],
        }
    }

    #[test]
    fn the_comparison_has_every_policy_ratios_and_counts() {
        let m = [
            row("linux-none", "read-4k-qd1", ["20", "0", "0", "0", "0", "0", "0", "0", "0"]),
            row(
                "linux-lazy",
                "read-4k-qd1",
                ["15", "1", "1", "0", "4.014", "1024", "1024", "1028", "0.5"],
            ),
            row("identity", "read-4k-qd1", ["50", "0", "0", "0", "0", "0", "0", "0", "0"]),
            row(
                "lazy",
                "read-4k-qd1",
                ["35", "1", "0.05", "0", "1.001", "256", "14.1", "256.2", "1.05"],
            ),
            row("lazy", "write-4k-qd1", ["36", "1", "0.05", "0", "1", "256", "14", "256", "1.05"]),
        ];
        let text = comparison_text(&m);
        // Cells, one space apart.
        let lines: Vec<String> =
            text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        // Columns for the policies that ran only, in table order.
        assert_eq!(
            lines[0],
            "workload l-none l-lazy identity lazy L/l-none l/identity kick/rq L kick/rq l \
             M+U/MiB L M+U/MiB l lazy vs L"
        );
        // One boot each: the medians alone, and no verdict; no strict pair,
        // since neither strict ran.
        assert_eq!(lines[1], "read-4k-qd1 20 15 50 35 0.75 0.70 4.014 1.001 2048 270.1 n<2");
        assert_eq!(lines[2], "write-4k-qd1 - - - 36 - - - 1 - 270 -");
        assert_eq!(lines[3], LEGEND);
        let md = comparison_markdown(&m);
        assert!(
            md.starts_with("| workload | linux-none | linux-lazy | identity | lazy | L ÷ L-none |"),
            "{md}"
        );
        assert!(md.contains("\n|---|---|"), "{md}");
        let row =
            "| read-4k-qd1 | 20 | 15 | 50 | 35 | 0.75 | 0.70 | 4.014 | 1.001 | 2048 | 270.1 | \
                   n<2 |";
        assert!(md.contains(row), "{md}");
    }

    #[test]
    fn interrupt_boots_get_their_own_ratio_and_verdicts() {
        let rows = boots("linux-lazy", "w", &[30.0, 35.0, 38.0])
            + &boots("linux-strict", "w", &[20.0, 26.0, 21.0])
            + &boots("identity+irq", "w", &[80.0, 80.0, 80.0])
            + &boots("lazy+irq", "w", &[40.0, 42.0, 41.0])
            + &boots("strict+irq", "w", &[10.0, 12.0, 11.0]);
        let text = comparison_text(&medians(&rows));
        let lines: Vec<String> =
            text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(
            lines[0],
            "workload l-lazy l-strict identity+i strict+i lazy+i l+i/id+i kick/rq L kick/rq l \
             M+U/MiB L M+U/MiB l lazy+i vs L strict+i vs S",
            "{text}"
        );
        assert!(
            lines[1].ends_with("0.51 1 1 512 512 lazy+irq > linux-lazy linux-strict > strict+irq"),
            "{text}"
        );
    }

    #[test]
    fn two_runs_agree_cell_by_cell() {
        let first = boots("linux-lazy", "w", &[30.0, 35.0])
            + &boots("lazy", "w", &[40.0, 42.0])
            + &boots("linux-lazy", "v", &[30.0, 35.0])
            + &boots("lazy", "v", &[34.0, 42.0]);
        // The same order in w; in v an order where the first saw noise;
        // u only in the second run.
        let second = boots("linux-lazy", "w", &[31.0, 33.0])
            + &boots("lazy", "w", &[45.0, 50.0])
            + &boots("linux-lazy", "v", &[30.0, 31.0])
            + &boots("lazy", "v", &[34.0, 42.0])
            + &boots("linux-lazy", "u", &[30.0, 31.0])
            + &boots("lazy", "u", &[34.0, 42.0]);
        let a = agreement(&medians(&first), &medians(&second));
        assert_eq!((a.agree, a.cells, a.unmatched), (1, 2, 1));
        let text = agreement_text(&a);
        let lines: Vec<String> =
            text.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect();
        assert_eq!(lines[1], "w MB/s lazy vs linux-lazy lazy > linux-lazy lazy > linux-lazy =");
        assert_eq!(lines[2], "v MB/s lazy vs linux-lazy within noise lazy > linux-lazy DIFFERS");
        assert_eq!(lines[3], "1 of 2 verdicts agree (1 cells judged in one run only)");
    }

    /// Rows of boots with these MB/s and CPU µs per I/O.
    fn sampled(policy: &str, workload: &str, boots: &[(f64, f64)]) -> String {
        boots
            .iter()
            .map(|(mb_s, cpu)| {
                format!("ROW {policy} {workload} {mb_s} 1 1 0 1 256 256 256 1 {cpu}\n")
            })
            .collect()
    }

    #[test]
    fn cpu_verdicts_claim_less_cpu_only_outside_the_noise() {
        let rows = sampled("lazy+irq", "w", &[(40.0, 10.0), (41.0, 11.0), (39.0, 12.0)])
            + &sampled("linux-lazy", "w", &[(38.0, 20.0), (45.0, 13.0), (30.0, 25.0)])
            + &sampled("strict+irq", "w", &[(20.0, 30.0), (21.0, 31.0)])
            + &sampled("linux-strict", "w", &[(20.0, 29.0), (21.0, 31.0)]);
        let m = medians(&rows);
        let find = |p: &str| m.iter().find(|m| m.policy == p);
        assert_eq!(
            judge(find("lazy+irq"), find("linux-lazy"), Metric::Cpu),
            "lazy+irq < linux-lazy"
        );
        assert_eq!(
            judge(find("linux-lazy"), find("lazy+irq"), Metric::Cpu),
            "lazy+irq < linux-lazy"
        );
        assert_eq!(judge(find("lazy+irq"), find("linux-lazy"), Metric::MbS), "within noise");
        assert_eq!(judge(find("strict+irq"), find("linux-strict"), Metric::Cpu), "within noise");
        // Rows without the column: no CPU verdict, and no CPU cells.
        let plain =
            medians(&(boots("lazy", "w", &[1.0, 2.0]) + &boots("linux-lazy", "w", &[3.0, 4.0])));
        assert_eq!(judge(plain.first(), plain.get(1), Metric::Cpu), "-");
        assert!(verdict_cells(&plain).iter().all(|c| c.metric == Metric::MbS));
        assert!(!comparison_text(&plain).contains("CPU"));
        let cells = verdict_cells(&m);
        assert_eq!(cells.iter().filter(|c| c.metric == Metric::Cpu).count(), 2);
        let text = comparison_text(&m);
        let cpu: Vec<String> = text
            .lines()
            .skip_while(|l| !l.starts_with("same run, QEMU"))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        assert_eq!(
            cpu[1], "workload l-lazy l-strict strict+i lazy+i lazy+i vs L strict+i vs S",
            "{text}"
        );
        assert_eq!(
            cpu[2],
            "w 20 (13-25) 30 (29-31) 30.5 (30-31) 11 (10-12) lazy+irq < linux-lazy within noise",
            "{text}"
        );
        assert!(comparison_markdown(&m).contains("| workload | linux-lazy | linux-strict | strict+irq | lazy+irq | CPU/io: lazy+irq vs linux-lazy |"));
    }

    #[test]
    fn the_median_table_has_a_line_per_key() {
        let m = [row("lazy", "read-4k-qd1", ["35", "1", "1", "0", "1", "256", "256", "256", "2"])];
        let t = median_table(&m);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("policy workload    MB/s min max MAP/io"), "{t}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["lazy", "read-4k-qd1", "35", "35", "35", "1", "1", "0", "1", "256", "256", "256", "2"]
        );
    }
}
