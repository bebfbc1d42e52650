//! The tables of a run: the median of every `ROW` column per policy and
//! workload, with the MB/s spread over the boots (TCG timings are noisy:
//! other work shares the CPUs), then the same-run comparison of Linux's
//! drivers with ours, with a verdict that claims an order only outside the
//! noise ([`verdict`]).

use super::policies;

/// Column names of a `ROW` line after policy and workload.
pub const ROW_COLUMNS: [&str; 9] = [
    "MB/s",
    "MAP/io",
    "UNMAP/io",
    "ATT/io",
    "kick/io",
    "MAP/MiB",
    "UNMAP/MiB",
    "kick/MiB",
    "reqs/kick",
];

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
}

impl Median {
    /// Column `i` as a number.
    fn num(&self, i: usize) -> f64 {
        self.values.get(i).map_or(0.0, |v| v.parse().unwrap_or(0.0))
    }

    /// MB/s as `median (min-max)`, or the median alone from one boot.
    fn mb_s(&self) -> String {
        match self.range.first() {
            Some(&(lo, hi)) if self.samples > 1 => {
                format!("{} ({}-{})", self.values[0], fmt_g(lo, 4), fmt_g(hi, 4))
            }
            _ => self.values.first().cloned().unwrap_or_default(),
        }
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
    let (Some(a), Some(b)) = (a, b) else { return "-".into() };
    if a.samples < VERDICT_MIN_BOOTS || b.samples < VERDICT_MIN_BOOTS {
        return format!("n<{VERDICT_MIN_BOOTS}");
    }
    let (Some(&(a_lo, a_hi)), Some(&(b_lo, b_hi))) = (a.range.first(), b.range.first()) else {
        return "-".into();
    };
    if a_lo > b_hi {
        format!("{} > {}", a.policy, b.policy)
    } else if b_lo > a_hi {
        format!("{} > {}", b.policy, a.policy)
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
            Median { policy, workload, values, samples: rows.len(), range }
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

/// Heading of the comparison's columns after the policies: short, and
/// long for Markdown.
const EXTRA_COLUMNS: [(&str, &str); 8] = [
    ("L/l-none", "L ÷ L-none"),
    ("l/identity", "l ÷ identity"),
    ("kick/rq L", "kicks/req L"),
    ("kick/rq l", "kicks/req l"),
    ("M+U/MiB L", "MAP+UNMAP/MiB L"),
    ("M+U/MiB l", "MAP+UNMAP/MiB l"),
    ("lazy vs L", "MB/s: lazy vs linux-lazy"),
    ("strict vs S", "MB/s: strict vs linux-strict"),
];

/// The policy pairs the verdict columns judge: ours, then Linux's.
pub const VERDICT_PAIRS: [(&str, &str); 2] = [("lazy", "linux-lazy"), ("strict", "linux-strict")];

/// What the comparison's footnote says.
pub const LEGEND: &str = "(L = linux-lazy, l = our lazy; MB/s as median (min-max) over the boots; \
                          L/l-none = linux-lazy / linux-none MB/s, l/identity = lazy / identity MB/s; \
                          vs: A > B only when A's least MB/s is above B's greatest, else within \
                          noise; n<2 = fewer than 2 boots; - = policy not run)";

/// The comparison, per workload: MB/s of every policy that ran (in
/// [`policies`] order), the ratio of each stack's lazy to its own no-IOMMU
/// boot, then kicks per request and MAP+UNMAP per MiB of linux-lazy and our
/// lazy. `-`: not run.
fn comparison(medians: &[Median], long_names: bool) -> Vec<Vec<String>> {
    let find = |p: &str, w: &str| medians.iter().find(|m| m.policy == p && m.workload == w);
    let mut workloads: Vec<&str> = Vec::new();
    for m in medians {
        if !workloads.contains(&m.workload.as_str()) {
            workloads.push(&m.workload);
        }
    }
    let dash = || "-".to_string();
    let ratio = |p: &str, q: &str, w: &str| match (find(p, w), find(q, w)) {
        (Some(a), Some(b)) if b.num(0) > 0.0 => format!("{:.2}", a.num(0) / b.num(0)),
        _ => dash(),
    };
    let ran: Vec<(&str, &str)> =
        policies().filter(|(p, _)| medians.iter().any(|m| m.policy == *p)).collect();
    let policy_heads = ran.iter().map(|(p, short)| if long_names { p } else { short });
    let extra_heads =
        EXTRA_COLUMNS.iter().map(|(short, long)| if long_names { long } else { short });
    let mut rows = vec![std::iter::once(&"workload")
        .chain(policy_heads)
        .chain(extra_heads)
        .map(|s| s.to_string())
        .collect()];
    for w in workloads {
        let mut r = vec![w.to_string()];
        r.extend(ran.iter().map(|(p, _)| find(p, w).map_or_else(dash, Median::mb_s)));
        r.push(ratio("linux-lazy", "linux-none", w));
        r.push(ratio("lazy", "identity", w));
        for p in ["linux-lazy", "lazy"] {
            r.push(find(p, w).map_or_else(dash, |m| m.values.get(4).cloned().unwrap_or_else(dash)));
        }
        for p in ["linux-lazy", "lazy"] {
            r.push(find(p, w).map_or_else(dash, |m| fmt_g(m.num(5) + m.num(6), 6)));
        }
        for (ours, linux) in VERDICT_PAIRS {
            r.push(verdict(find(ours, w), find(linux, w)));
        }
        rows.push(r);
    }
    rows
}

/// The comparison as aligned text, with its legend.
pub fn comparison_text(medians: &[Median]) -> String {
    aligned(&comparison(medians, false), 1) + LEGEND + "\n"
}

/// The comparison as a Markdown table, for the docs.
pub fn comparison_markdown(medians: &[Median]) -> String {
    let rows = comparison(medians, true);
    let mut out = String::new();
    for (i, r) in rows.iter().enumerate() {
        out.push_str(&format!("| {} |\n", r.join(" | ")));
        if i == 0 {
            out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
        }
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
             M+U/MiB L M+U/MiB l lazy vs L strict vs S"
        );
        // One boot each: the medians alone, and no verdict.
        assert_eq!(lines[1], "read-4k-qd1 20 15 50 35 0.75 0.70 4.014 1.001 2048 270.1 n<2 -");
        assert_eq!(lines[2], "write-4k-qd1 - - - 36 - - - 1 - 270 - -");
        assert_eq!(lines[3], LEGEND);
        let md = comparison_markdown(&m);
        assert!(
            md.starts_with("| workload | linux-none | linux-lazy | identity | lazy | L ÷ L-none |"),
            "{md}"
        );
        assert!(md.contains("\n|---|---|"), "{md}");
        let row =
            "| read-4k-qd1 | 20 | 15 | 50 | 35 | 0.75 | 0.70 | 4.014 | 1.001 | 2048 | 270.1 | \
                   n<2 | - |";
        assert!(md.contains(row), "{md}");
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
