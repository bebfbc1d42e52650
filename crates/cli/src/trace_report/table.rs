//! The tables of a run: the median of every `ROW` column per policy and
//! workload (TCG timings are noisy: other work shares the CPUs), then the
//! same-run comparison of Linux's drivers with ours.

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
}

impl Median {
    /// Column `i` as a number.
    fn num(&self, i: usize) -> f64 {
        self.values.get(i).map_or(0.0, |v| v.parse().unwrap_or(0.0))
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
            let values = (0..columns)
                .map(|c| {
                    let mut col: Vec<f64> = rows.iter().filter_map(|r| r.get(c).copied()).collect();
                    fmt_g(median(&mut col), 4)
                })
                .collect();
            Median { policy, workload, values, samples: rows.len() }
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

/// The median table: one line per policy and workload.
pub fn median_table(medians: &[Median]) -> String {
    let mut rows =
        vec![["policy", "workload"].iter().chain(&ROW_COLUMNS).map(|s| s.to_string()).collect()];
    for m in medians {
        rows.push(
            [m.policy.clone(), m.workload.clone()]
                .into_iter()
                .chain(m.values.iter().cloned())
                .collect(),
        );
    }
    aligned(&rows, 2)
}

/// Heading of the comparison's columns after the policies: short, and
/// long for Markdown.
const EXTRA_COLUMNS: [(&str, &str); 6] = [
    ("L/l-none", "L ÷ L-none"),
    ("l/identity", "l ÷ identity"),
    ("kick/rq L", "kicks/req L"),
    ("kick/rq l", "kicks/req l"),
    ("M+U/MiB L", "MAP+UNMAP/MiB L"),
    ("M+U/MiB l", "MAP+UNMAP/MiB l"),
];

/// What the comparison's footnote says.
pub const LEGEND: &str = "(L = linux-lazy, l = our lazy; L/l-none = linux-lazy / linux-none MB/s, \
                          l/identity = lazy / identity MB/s; - = policy not run)";

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
        r.extend(ran.iter().map(|(p, _)| find(p, w).map_or_else(dash, |m| m.values[0].clone())));
        r.push(ratio("linux-lazy", "linux-none", w));
        r.push(ratio("lazy", "identity", w));
        for p in ["linux-lazy", "lazy"] {
            r.push(find(p, w).map_or_else(dash, |m| m.values.get(4).cloned().unwrap_or_else(dash)));
        }
        for p in ["linux-lazy", "lazy"] {
            r.push(find(p, w).map_or_else(dash, |m| fmt_g(m.num(5) + m.num(6), 6)));
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
    }

    fn row(policy: &str, workload: &str, values: [&str; 9]) -> Median {
        Median {
            policy: policy.into(),
            workload: workload.into(),
            values: values.map(String::from).to_vec(),
            samples: 1,
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
             M+U/MiB L M+U/MiB l"
        );
        assert_eq!(lines[1], "read-4k-qd1 20 15 50 35 0.75 0.70 4.014 1.001 2048 270.1");
        assert_eq!(lines[2], "write-4k-qd1 - - - 36 - - - 1 - 270");
        assert_eq!(lines[3], LEGEND);
        let md = comparison_markdown(&m);
        assert!(
            md.starts_with("| workload | linux-none | linux-lazy | identity | lazy | L ÷ L-none |"),
            "{md}"
        );
        assert!(md.contains("\n|---|---|"), "{md}");
        let row =
            "| read-4k-qd1 | 20 | 15 | 50 | 35 | 0.75 | 0.70 | 4.014 | 1.001 | 2048 | 270.1 |";
        assert!(md.contains(row), "{md}");
    }

    #[test]
    fn the_median_table_has_a_line_per_key() {
        let m = [row("lazy", "read-4k-qd1", ["35", "1", "1", "0", "1", "256", "256", "256", "2"])];
        let t = median_table(&m);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("policy workload    MB/s MAP/io"), "{t}");
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["lazy", "read-4k-qd1", "35", "1", "1", "0", "1", "256", "256", "256", "2"]
        );
    }
}
