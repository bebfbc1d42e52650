//! The answer after the tables: per workload, which policy is cheapest for a
//! Linux guest and overall, what each costs against no IOMMU, and what it
//! gives up in isolation (from the driver's own flush-queue constants).

use std::fmt::Write as _;

use viommu_driver::dma::Policy;
use viommu_driver::mode::Isolation;
use viommu_vm::bench::{Mode, Workload};

use crate::bench::size_label;
use crate::cells::{groups, Cell};
use crate::host::HostCosts;

/// Modes whose ranking keys differ by at most this fraction tie: on this
/// shared 2-CPU machine medians of 3 moved by up to about that much between
/// runs (docs/cli.md). A spread test (min..max overlap) was tried and
/// dropped: one outlier repetition made it join modes 3x apart.
pub const TIE: f64 = 0.15;

/// What one mode costs in one workload group, averaged over thread counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModeCost {
    /// The mode.
    pub mode: Mode,
    /// CPU ns per I/O (median per cell, mean over thread counts).
    pub cpu_ns: f64,
    /// The spread of `cpu_ns`: mean over thread counts of each cell's
    /// min and max.
    pub cpu_spread: (f64, f64),
    /// Kicks per I/O.
    pub kicks: f64,
    /// Interrupts per I/O.
    pub irqs: f64,
}

impl ModeCost {
    /// The modelled cost in ns per I/O: CPU + kicks × exit + interrupts × irq.
    pub fn modelled_ns(&self, host: HostCosts) -> f64 {
        self.cpu_ns + self.kicks * host.exit_ns as f64 + self.irqs * host.irq_ns as f64
    }

    /// The ranking key: modelled cost with a host model, else CPU per I/O.
    pub fn key(&self, host: Option<HostCosts>) -> f64 {
        host.map_or(self.cpu_ns, |h| self.modelled_ns(h))
    }
}

/// Whether a Linux guest can choose this mode (no IOMMU, or a policy Linux has).
pub fn linux_usable(mode: Mode) -> bool {
    mode.linux().is_some()
}

/// The summary of one workload group.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupSummary {
    /// Workload.
    pub workload: Workload,
    /// Bytes per I/O.
    pub io_size: usize,
    /// The no-IOMMU reference, if it ran.
    pub none: Option<ModeCost>,
    /// IOMMU modes, cheapest first.
    pub ranked: Vec<ModeCost>,
    /// The cheapest IOMMU mode a Linux guest can use.
    pub cheapest_linux: Option<Mode>,
    /// The cheapest Linux-usable mode that isolates (not identity).
    pub cheapest_linux_isolating: Option<Mode>,
    /// The cheapest isolating mode of all (ours included).
    pub cheapest: Option<Mode>,
}

impl GroupSummary {
    /// Ranks `costs` (one per mode) of one group.
    pub fn rank(
        workload: Workload,
        io_size: usize,
        costs: &[ModeCost],
        host: Option<HostCosts>,
    ) -> GroupSummary {
        let none = costs.iter().copied().find(|c| c.mode == Mode::NoIommu);
        let mut ranked: Vec<ModeCost> =
            costs.iter().copied().filter(|c| c.mode != Mode::NoIommu).collect();
        ranked.sort_by(|a, b| a.key(host).total_cmp(&b.key(host)).then(a.mode.cmp(&b.mode)));
        let first = |f: &dyn Fn(Mode) -> bool| ranked.iter().map(|c| c.mode).find(|&m| f(m));
        GroupSummary {
            workload,
            io_size,
            none,
            cheapest_linux: first(&linux_usable),
            cheapest_linux_isolating: first(&|m| linux_usable(m) && !isolates_nothing(m)),
            cheapest: first(&|m| !isolates_nothing(m)),
            ranked,
        }
    }

    /// The ranking as one line, ties (keys within [`TIE`] of each other)
    /// joined by `≈`.
    pub fn ranking(&self, host: Option<HostCosts>) -> String {
        let mut s = String::new();
        let mut prev: Option<&ModeCost> = None;
        for c in &self.ranked {
            if let Some(p) = prev {
                s.push_str(if ties(p, c, host) { " ≈ " } else { " < " });
            }
            s.push_str(c.mode.name());
            prev = Some(c);
        }
        s
    }
}

/// Whether `b`, ranked right after `a`, is not measurably dearer.
fn ties(a: &ModeCost, b: &ModeCost, host: Option<HostCosts>) -> bool {
    let (ka, kb) = (a.key(host), b.key(host));
    (kb - ka).abs() <= TIE * ka.abs().max(kb.abs()).max(1e-9)
}

fn isolates_nothing(mode: Mode) -> bool {
    mode.driver_mode().is_none_or(|m| m.isolation() == Isolation::None)
}

/// What `mode` gives up in isolation, in words, from the driver's constants.
pub fn gives_up(mode: Mode) -> String {
    let Some(m) = mode.driver_mode() else {
        return "no IOMMU: the device reaches all guest memory".into();
    };
    match m.isolation() {
        Isolation::None => "no isolation: the device reaches all guest memory".into(),
        Isolation::Full => "nothing: an unmap returns once the device dropped the mapping".into(),
        Isolation::Deferred(fq) => {
            let queue = match m.policy() {
                Some(Policy::LazySingle) => "in one shared queue",
                _ => "per CPU",
            };
            format!(
                "freed buffers stay reachable for up to {} or {} entries {queue}",
                duration_words(fq.timeout_ns),
                fq.entries
            )
        }
    }
}

fn duration_words(ns: u64) -> String {
    if ns >= 1_000_000_000 && ns % 1_000_000_000 == 0 {
        format!("{} s", ns / 1_000_000_000)
    } else if ns >= 1_000_000 && ns % 1_000_000 == 0 {
        format!("{} ms", ns / 1_000_000)
    } else {
        format!("{} us", ns / 1000)
    }
}

/// Each mode's cost per group, from the cells: medians, averaged over the
/// thread counts the mode ran with (cells without CPU figures are skipped).
pub fn mode_costs(cells: &[Cell], group: (Workload, usize)) -> Vec<ModeCost> {
    let mut modes: Vec<Mode> = Vec::new();
    for c in cells.iter().filter(|c| c.group() == group) {
        if !modes.contains(&c.spec.mode) {
            modes.push(c.spec.mode);
        }
    }
    modes
        .into_iter()
        .filter_map(|mode| {
            let mine: Vec<&Cell> =
                cells.iter().filter(|c| c.group() == group && c.spec.mode == mode).collect();
            let mean = |f: &dyn Fn(&Cell) -> Option<f64>| -> Option<f64> {
                let v: Vec<f64> = mine.iter().map(|c| f(c)).collect::<Option<_>>()?;
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            Some(ModeCost {
                mode,
                cpu_ns: mean(&|c| c.cpu_ns().map(|s| s.median))?,
                cpu_spread: (
                    mean(&|c| c.cpu_ns().map(|s| s.min))?,
                    mean(&|c| c.cpu_ns().map(|s| s.max))?,
                ),
                kicks: mean(&|c| c.kicks().map(|s| s.median))?,
                irqs: mean(&|c| c.irqs().map(|s| s.median))?,
            })
        })
        .collect()
}

/// Every group's summary.
pub fn summarize(cells: &[Cell], host: Option<HostCosts>) -> Vec<GroupSummary> {
    groups(cells)
        .into_iter()
        .map(|(w, size)| GroupSummary::rank(w, size, &mode_costs(cells, (w, size)), host))
        .collect()
}

/// The summary as text.
pub fn render(summaries: &[GroupSummary], host: Option<HostCosts>, threads: &[usize]) -> String {
    let mut out = String::new();
    let by = match host {
        Some(h) => {
            format!("modelled cost = CPU + kicks x {} ns + interrupts x {} ns", h.exit_ns, h.irq_ns)
        }
        None => "CPU per I/O (pass --host or --exit-cost-ns to add exits)".into(),
    };
    let names: Vec<String> = threads.iter().map(|t| t.to_string()).collect();
    let _ = writeln!(
        out,
        "\nsummary: ranked by {by}; medians, mean over {} thread{}; ties (≈) within {:.0}%",
        names.join("/"),
        if threads == [1] { "" } else { "s" },
        TIE * 100.0
    );
    for s in summaries {
        let unit = if s.workload == Workload::Net { "packets" } else { "requests" };
        let _ =
            writeln!(out, "\n{} {} {unit}: {}", s.workload, size_label(s.io_size), s.ranking(host));
        let pick = |m: Option<Mode>| m.map_or("-".to_string(), |m| m.name().to_string());
        let _ = writeln!(
            out,
            "  cheapest for a Linux guest: {}; with isolation: {}; with isolation, our driver's modes too: {}",
            pick(s.cheapest_linux),
            pick(s.cheapest_linux_isolating),
            pick(s.cheapest)
        );
        let _ = write!(
            out,
            "  {:<18} {:>9} {:>7} {:>9} {:>7}",
            "mode", "CPU us/IO", "x none", "kicks/IO", "irq/IO"
        );
        if host.is_some() {
            let _ = write!(out, " {:>10} {:>7}", "model us", "x none");
        }
        let _ = writeln!(out, "  gives up");
        for c in s.none.iter().chain(&s.ranked) {
            let x = |v: f64, base: Option<f64>| {
                base.filter(|b| *b > 0.0).map_or("-".to_string(), |b| format!("{:.2}", v / b))
            };
            let _ = write!(
                out,
                "  {:<18} {:>9.2} {:>7} {:>9.2} {:>7.2}",
                c.mode.name(),
                c.cpu_ns / 1000.0,
                x(c.cpu_ns, s.none.map(|n| n.cpu_ns)),
                c.kicks,
                c.irqs
            );
            if let Some(h) = host {
                let m = c.modelled_ns(h);
                let _ = write!(
                    out,
                    " {:>10.2} {:>7}",
                    m / 1000.0,
                    x(m, s.none.map(|n| n.modelled_ns(h)))
                );
            }
            let _ = writeln!(out, "  {}", gives_up(c.mode));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_vm::bench::DriverMode;

    fn cost(mode: Mode, cpu_ns: f64, kicks: f64, irqs: f64) -> ModeCost {
        ModeCost { mode, cpu_ns, cpu_spread: (cpu_ns * 0.99, cpu_ns * 1.01), kicks, irqs }
    }

    fn d(m: DriverMode) -> Mode {
        Mode::Driver(m)
    }

    fn sample() -> Vec<ModeCost> {
        vec![
            cost(Mode::NoIommu, 1000.0, 0.0, 0.0),
            cost(d(DriverMode::Identity), 1100.0, 0.0, 0.0),
            cost(d(DriverMode::Strict), 9000.0, 6.0, 6.0),
            cost(d(DriverMode::Lazy), 6000.0, 3.0, 3.0),
            cost(d(DriverMode::LazySingle), 6200.0, 3.0, 3.0),
            cost(d(DriverMode::Best), 3000.0, 1.0, 1.0),
        ]
    }

    #[test]
    fn ranks_by_cpu_and_names_the_linux_and_overall_choices() {
        let s = GroupSummary::rank(Workload::Block, 4096, &sample(), None);
        assert_eq!(s.none.unwrap().cpu_ns, 1000.0);
        assert_eq!(s.ranking(None), "identity < best < lazy ≈ lazy-single < strict");
        assert_eq!(s.cheapest_linux, Some(d(DriverMode::Identity)));
        // Overall, among modes that isolate: our batch API.
        assert_eq!(s.cheapest, Some(d(DriverMode::Best)));
        // best and lazy-single are ours only: lazy is Linux's cheapest that isolates.
        assert_eq!(s.cheapest_linux_isolating, Some(d(DriverMode::Lazy)));
    }

    #[test]
    fn close_keys_tie_and_an_outlier_spread_does_not_join_distant_modes() {
        let a = cost(d(DriverMode::Lazy), 100.0, 3.0, 3.0);
        let b = cost(d(DriverMode::LazySingle), 114.0, 3.0, 3.0);
        let s = GroupSummary::rank(Workload::Block, 4096, &[a, b], None);
        assert_eq!(s.ranking(None), "lazy ≈ lazy-single");
        let b =
            ModeCost { cpu_spread: (110.0, 900.0), ..cost(d(DriverMode::Strict), 130.0, 6.0, 6.0) };
        let s = GroupSummary::rank(Workload::Block, 4096, &[a, b], None);
        assert_eq!(s.ranking(None), "lazy < strict");
    }

    #[test]
    fn linux_models_are_linux_usable_and_best_is_not() {
        assert!(linux_usable(Mode::LinuxLazy) && linux_usable(Mode::NoIommu));
        assert!(!linux_usable(d(DriverMode::Best)) && !linux_usable(d(DriverMode::LazySingle)));
        let mut v = sample();
        v.push(cost(Mode::LinuxLazy, 5000.0, 4.0, 4.0));
        let s = GroupSummary::rank(Workload::Block, 4096, &v, None);
        assert_eq!(s.cheapest_linux_isolating, Some(Mode::LinuxLazy));
    }

    #[test]
    fn modelled_cost_adds_exits_and_interrupts_and_can_reorder() {
        let host = HostCosts { exit_ns: 1000, irq_ns: 500 };
        let c = cost(d(DriverMode::Lazy), 6000.0, 3.0, 2.0);
        assert_eq!(c.modelled_ns(host), 6000.0 + 3000.0 + 1000.0);
        // Cheaper CPU but many more exits loses once exits cost something.
        let v = [
            cost(d(DriverMode::Strict), 2000.0, 10.0, 10.0),
            cost(d(DriverMode::Lazy), 4000.0, 1.0, 1.0),
        ];
        let cpu = GroupSummary::rank(Workload::Block, 4096, &v, None);
        assert_eq!(cpu.cheapest, Some(d(DriverMode::Strict)));
        let modelled = GroupSummary::rank(Workload::Block, 4096, &v, Some(host));
        assert_eq!(modelled.cheapest, Some(d(DriverMode::Lazy)));
        assert_eq!(modelled.ranking(Some(host)), "lazy < strict");
    }

    #[test]
    fn windows_come_from_the_flush_queue_constants() {
        use viommu_driver::dma::FlushQueueConfig;
        let lazy = gives_up(d(DriverMode::Lazy));
        let fq = FlushQueueConfig::LAZY;
        assert!(lazy.contains(&format!("{} ms", fq.timeout_ns / 1_000_000)), "{lazy}");
        assert!(lazy.contains(&format!("{} entries per CPU", fq.entries)), "{lazy}");
        let single = gives_up(d(DriverMode::LazySingle));
        assert!(single.contains("1 s or 32768 entries in one shared queue"), "{single}");
        assert!(gives_up(d(DriverMode::Identity)).starts_with("no isolation"));
        assert!(gives_up(d(DriverMode::Strict)).starts_with("nothing"));
        assert_eq!(gives_up(Mode::LinuxLazy), lazy);
    }

    #[test]
    fn render_shows_ratios_and_model_columns() {
        let host = HostCosts { exit_ns: 1500, irq_ns: 1000 };
        let s = [GroupSummary::rank(Workload::Block, 4096, &sample(), Some(host))];
        let text = render(&s, Some(host), &[1, 2, 4]);
        assert!(text.contains("kicks x 1500 ns + interrupts x 1000 ns"), "{text}");
        assert!(text.contains("mean over 1/2/4 threads"), "{text}");
        let strict = text.lines().find(|l| l.trim_start().starts_with("strict ")).unwrap();
        // 9 us of CPU is 9.00x none; modelled 9 + 9 + 6 = 24 us.
        assert!(strict.contains("9.00") && strict.contains("24.00"), "{strict}");
    }
}
