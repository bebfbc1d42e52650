//! The answer after the tables: per workload, which policy is cheapest for a
//! Linux guest and overall, what each costs against no IOMMU, and what it
//! gives up in isolation (from the driver's own flush-queue constants).

use std::fmt::Write as _;

use viommu_driver::dma::Policy;
use viommu_driver::mode::Isolation;
use viommu_vm::bench::{Mode, Workload};

use crate::bench::size_label;
use crate::callgrind::Counts;
use crate::cells::{groups, Cell};
use crate::host::HostCosts;

/// How far a mode's floor ([`ModeCost::key`]) moves between default runs on
/// the reference machine (2 CPUs shared with other jobs, load average
/// 2–10), as a fraction each way: up to about 20 % (docs/cli.md). The tie
/// rule widens every floor by this much each way, so that a difference the
/// next run may not repeat makes no rank.
pub const DRIFT: f64 = 0.22;

/// Two modes whose instructions per I/O above no IOMMU (exact, from
/// callgrind) are within this factor of each other share a rank when ranked
/// by CPU per I/O: a difference in work that small is not one CPU time on a
/// shared machine repeats (its floors move by up to a factor (1 + [`DRIFT`])²
/// between runs, the same 1.49), and the instruction counts, unlike the CPU
/// times, are the same in every run (to within 1 %), so the ranks are too.
pub const INSTRUCTION_TIE: f64 = (1.0 + DRIFT) * (1.0 + DRIFT);

/// What decides which modes share a rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TieRule {
    /// Instructions per I/O within [`INSTRUCTION_TIE`] ([`instruction_tiers`]):
    /// the default when every mode was counted and no host model is given.
    Instructions,
    /// Floors within the drift ([`drift_tiers`]): without instruction
    /// counts, or for the modelled cost (exits are not instructions).
    Drift,
}

impl TieRule {
    /// The name in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            TieRule::Instructions => "instructions",
            TieRule::Drift => "drift",
        }
    }
}

/// The thread counts the ranking uses: those the host has CPUs for. With
/// more guest threads than CPUs a preempted lock holder makes the others'
/// CPU time vary several-fold between runs, so those cells stay in the
/// tables only. If no count fits, all are used.
pub fn ranked_threads(threads: &[usize], cpus: usize) -> Vec<usize> {
    let fit: Vec<usize> = threads.iter().copied().filter(|&t| t <= cpus.max(1)).collect();
    if fit.is_empty() {
        threads.to_vec()
    } else {
        fit
    }
}

/// One repetition of one cell: the figures the summary ranks by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RepCost {
    /// CPU ns per I/O doing work.
    pub cpu_ns: f64,
    /// Kicks per I/O.
    pub kicks: f64,
    /// Interrupts per I/O.
    pub irqs: f64,
}

impl RepCost {
    /// The ranking key: with a host model CPU + kicks × exit + interrupts ×
    /// irq, else CPU per I/O.
    pub fn key(&self, host: Option<HostCosts>) -> f64 {
        host.map_or(self.cpu_ns, |h| {
            self.cpu_ns + self.kicks * h.exit_ns as f64 + self.irqs * h.irq_ns as f64
        })
    }
}

/// What one mode costs in one workload group: every repetition of each of
/// its cells (one cell per thread count).
///
/// Noise on a shared machine only ever adds time (preemption, cache and
/// lock contention, a sibling's build), so the least of a cell's
/// repetitions is the one closest to what the work costs; the summary ranks
/// by it (the minimum as the estimator, as argued by Chen and Revels,
/// "Robust benchmarking in noisy environments", 2016).
#[derive(Clone, Debug, PartialEq)]
pub struct ModeCost {
    /// The mode.
    pub mode: Mode,
    /// Per cell, its repetitions (each cell at least one).
    pub cells: Vec<Vec<RepCost>>,
    /// Instructions per I/O at one guest thread (guest, device), counted by
    /// callgrind, if they were.
    pub instructions: Option<(f64, f64)>,
}

impl ModeCost {
    /// From its cells' repetitions; `None` without any (a cell without
    /// repetitions is dropped).
    pub fn new(mode: Mode, cells: Vec<Vec<RepCost>>) -> Option<ModeCost> {
        let cells: Vec<Vec<RepCost>> = cells.into_iter().filter(|c| !c.is_empty()).collect();
        (!cells.is_empty()).then_some(ModeCost { mode, cells, instructions: None })
    }

    /// With instructions per I/O (guest, device).
    pub fn with_instructions(mut self, instructions: Option<(f64, f64)>) -> ModeCost {
        self.instructions = instructions;
        self
    }

    /// Guest + device instructions per I/O, if counted.
    pub fn instructions_per_io(&self) -> Option<f64> {
        self.instructions.map(|(g, d)| g + d)
    }

    /// The mean over the cells of `f` of each cell's sorted keys.
    fn over_cells(&self, host: Option<HostCosts>, f: impl Fn(&[f64]) -> f64) -> f64 {
        let per_cell = self.cells.iter().map(|reps| {
            let mut k: Vec<f64> = reps.iter().map(|r| r.key(host)).collect();
            k.sort_by(f64::total_cmp);
            f(&k)
        });
        per_cell.sum::<f64>() / self.cells.len() as f64
    }

    /// The ranking key, the floor: the mean over the cells of each cell's
    /// least repetition.
    pub fn key(&self, host: Option<HostCosts>) -> f64 {
        self.over_cells(host, |k| k[0])
    }

    /// The mean over the cells of each cell's median repetition (for
    /// comparison with the tables; it moves with the machine's load).
    pub fn median(&self, host: Option<HostCosts>) -> f64 {
        self.over_cells(host, |k| {
            let n = k.len();
            if n % 2 == 1 {
                k[n / 2]
            } else {
                (k[n / 2 - 1] + k[n / 2]) / 2.0
            }
        })
    }

    /// What the tie rule compares: the floor widened by [`DRIFT`] each way.
    pub fn reach(&self, host: Option<HostCosts>) -> (f64, f64) {
        let floor = self.key(host);
        (floor / (1.0 + DRIFT), floor * (1.0 + DRIFT))
    }

    /// The floor of CPU per I/O.
    pub fn cpu_ns(&self) -> f64 {
        self.key(None)
    }

    /// Kicks per I/O: the mean over the cells of each cell's median.
    pub fn kicks(&self) -> f64 {
        self.over_reps(|r| r.kicks)
    }

    /// Interrupts per I/O, as [`ModeCost::kicks`].
    pub fn irqs(&self) -> f64 {
        self.over_reps(|r| r.irqs)
    }

    fn over_reps(&self, f: impl Fn(&RepCost) -> f64) -> f64 {
        let per_cell = self.cells.iter().map(|reps| {
            let mut v: Vec<f64> = reps.iter().map(&f).collect();
            v.sort_by(f64::total_cmp);
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        });
        per_cell.sum::<f64>() / self.cells.len() as f64
    }
}

/// Which rule ranks `costs`: instructions when every mode has them and the
/// key is CPU per I/O, else the drift of the floors.
pub fn tie_rule(costs: &[ModeCost], host: Option<HostCosts>) -> TieRule {
    if host.is_none() && !costs.is_empty() && costs.iter().all(|c| c.instructions.is_some()) {
        TieRule::Instructions
    } else {
        TieRule::Drift
    }
}

/// The modes in ranks, cheapest first, by [`tie_rule`]; inside one rank
/// modes are in the sweep's order, so that two runs with the same ranks
/// print the same line.
///
/// `base` is the instructions per I/O without an IOMMU, if counted: the
/// instruction rule compares what each mode adds to it.
pub fn tiers(costs: &[ModeCost], host: Option<HostCosts>, base: Option<f64>) -> Vec<Vec<Mode>> {
    match tie_rule(costs, host) {
        TieRule::Instructions => instruction_tiers(costs, base),
        TieRule::Drift => drift_tiers(costs, host),
    }
}

/// Ranks from exact counts, ordered by CPU: modes sorted by what they add
/// to the instructions per I/O without an IOMMU (`base`; all of it without
/// a base) share a rank while each is within [`INSTRUCTION_TIE`] of the
/// one before it; the ranks are then put in the order of their CPU per I/O
/// (the mean of their modes' floors). Which modes differ is therefore the
/// same in every run; only the order of two ranks whose CPU per I/O is
/// close could change, and [`order_disagreements`] names any two whose CPU
/// order is not their instruction order.
///
/// What a mode adds, not its total, because the total holds the
/// endpoint's own work (copying and checking the data), the same in every
/// mode, which would make every ratio small at 1 MiB.
pub fn instruction_tiers(costs: &[ModeCost], base: Option<f64>) -> Vec<Vec<Mode>> {
    let mut by_count: Vec<(f64, &ModeCost)> = costs.iter().map(|c| (added(c, base), c)).collect();
    by_count.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.mode.cmp(&b.1.mode)));
    let mut ranks: Vec<Vec<&ModeCost>> = Vec::new();
    let mut last = f64::NEG_INFINITY;
    for (n, c) in by_count {
        match ranks.last_mut() {
            Some(rank) if n < last * INSTRUCTION_TIE => rank.push(c),
            _ => ranks.push(vec![c]),
        }
        last = n;
    }
    let cpu = |rank: &[&ModeCost]| rank.iter().map(|c| c.cpu_ns()).sum::<f64>() / rank.len() as f64;
    // A stable sort: ranks of equal CPU stay in instruction order.
    ranks.sort_by(|a, b| cpu(a).total_cmp(&cpu(b)));
    ranks
        .into_iter()
        .map(|r| {
            let mut modes: Vec<Mode> = r.iter().map(|c| c.mode).collect();
            modes.sort();
            modes
        })
        .collect()
}

/// Instructions per I/O `c` adds to `base` (at least 1, so that ratios
/// exist); infinite when not counted.
fn added(c: &ModeCost, base: Option<f64>) -> f64 {
    c.instructions_per_io().map_or(f64::INFINITY, |n| (n - base.unwrap_or(0.0)).max(1.0))
}

/// Adjacent ranks of [`instruction_tiers`] whose CPU order is not their
/// instruction order: the cheaper rank by CPU executes more instructions
/// (as (cheaper, dearer) by CPU).
pub fn order_disagreements(costs: &[ModeCost], tiers: &[Vec<Mode>]) -> Vec<(Vec<Mode>, Vec<Mode>)> {
    let count = |rank: &[Mode]| {
        let n: Vec<f64> = costs
            .iter()
            .filter(|c| rank.contains(&c.mode))
            .filter_map(ModeCost::instructions_per_io)
            .collect();
        n.iter().sum::<f64>() / n.len().max(1) as f64
    };
    tiers
        .windows(2)
        .filter(|w| count(&w[0]) > count(&w[1]))
        .map(|w| (w[0].clone(), w[1].clone()))
        .collect()
}

/// The rule without instruction counts: modes whose floors widened by
/// [`DRIFT`] each way ([`ModeCost::reach`]) overlap, directly or through
/// other modes, share a rank: two modes tie when their floors are within a
/// factor (1 + DRIFT)², about 1.49, of each other, or are joined by modes
/// that are. Spreads within one run (1–5 % of the floor) are far smaller
/// than the drift between runs, so they do not enter. Ranks come cheapest
/// first.
pub fn drift_tiers(costs: &[ModeCost], host: Option<HostCosts>) -> Vec<Vec<Mode>> {
    let mut by_low: Vec<(f64, f64, Mode)> = costs
        .iter()
        .map(|c| {
            let (lo, hi) = c.reach(host);
            (lo, hi, c.mode)
        })
        .collect();
    by_low.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)));
    let mut out: Vec<Vec<Mode>> = Vec::new();
    let mut reach = f64::NEG_INFINITY;
    for (lo, hi, mode) in by_low {
        match out.last_mut() {
            Some(tier) if lo <= reach => tier.push(mode),
            _ => out.push(vec![mode]),
        }
        reach = reach.max(hi);
    }
    for tier in &mut out {
        tier.sort();
    }
    out
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
    /// IOMMU modes, cheapest (median key) first.
    pub ranked: Vec<ModeCost>,
    /// The IOMMU modes in ranks ([`tiers`]).
    pub tiers: Vec<Vec<Mode>>,
    /// What decided the ranks.
    pub rule: TieRule,
    /// Under [`TieRule::Instructions`], adjacent ranks whose CPU order is
    /// not their instruction order ([`order_disagreements`]).
    pub disagreements: Vec<(Vec<Mode>, Vec<Mode>)>,
    /// The cheapest IOMMU modes a Linux guest can use: those of the first
    /// rank that has any.
    pub cheapest_linux: Vec<Mode>,
    /// The same among Linux-usable modes that isolate (not identity).
    pub cheapest_linux_isolating: Vec<Mode>,
    /// The same among all isolating modes (ours included).
    pub cheapest: Vec<Mode>,
}

impl GroupSummary {
    /// Ranks `costs` (one per mode) of one group.
    pub fn rank(
        workload: Workload,
        io_size: usize,
        costs: &[ModeCost],
        host: Option<HostCosts>,
    ) -> GroupSummary {
        let none = costs.iter().find(|c| c.mode == Mode::NoIommu).cloned();
        let mut ranked: Vec<ModeCost> =
            costs.iter().filter(|c| c.mode != Mode::NoIommu).cloned().collect();
        ranked.sort_by(|a, b| a.key(host).total_cmp(&b.key(host)).then(a.mode.cmp(&b.mode)));
        let base = none.as_ref().and_then(ModeCost::instructions_per_io);
        let tiers = tiers(&ranked, host, base);
        let rule = tie_rule(&ranked, host);
        let disagreements = match rule {
            TieRule::Instructions => order_disagreements(&ranked, &tiers),
            TieRule::Drift => Vec::new(),
        };
        let first = |f: &dyn Fn(Mode) -> bool| -> Vec<Mode> {
            tiers
                .iter()
                .map(|t| t.iter().copied().filter(|&m| f(m)).collect::<Vec<_>>())
                .find(|t| !t.is_empty())
                .unwrap_or_default()
        };
        GroupSummary {
            workload,
            io_size,
            none,
            cheapest_linux: first(&linux_usable),
            cheapest_linux_isolating: first(&|m| linux_usable(m) && !isolates_nothing(m)),
            cheapest: first(&|m| !isolates_nothing(m)),
            tiers,
            rule,
            disagreements,
            ranked,
        }
    }

    /// The ranking as one line: ranks cheapest first, joined by `<`, the
    /// modes of one rank joined by `≈`.
    pub fn ranking(&self) -> String {
        join_tiers(&self.tiers)
    }
}

/// Ranks as text: `a < b ≈ c < d`.
pub fn join_tiers(tiers: &[Vec<Mode>]) -> String {
    let names: Vec<String> = tiers.iter().map(|t| join_modes(t)).collect();
    names.join(" < ")
}

/// Modes of one rank as text: `b ≈ c`, or `-` for none.
pub fn join_modes(modes: &[Mode]) -> String {
    if modes.is_empty() {
        return "-".into();
    }
    let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
    names.join(" ≈ ")
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

/// Each mode's cost per group, from the cells (repetitions without CPU
/// figures are skipped), with its instruction counts if there are any.
pub fn mode_costs(
    cells: &[Cell],
    group: (Workload, usize),
    counts: Option<&Counts>,
) -> Vec<ModeCost> {
    let mut modes: Vec<Mode> = Vec::new();
    for c in cells.iter().filter(|c| c.group() == group) {
        if !modes.contains(&c.spec.mode) {
            modes.push(c.spec.mode);
        }
    }
    modes
        .into_iter()
        .filter_map(|mode| {
            let mine = cells.iter().filter(|c| c.group() == group && c.spec.mode == mode);
            let reps = mine.map(|c| {
                c.reps
                    .iter()
                    .filter_map(|r| {
                        Some(RepCost {
                            cpu_ns: r.cpu_ns_per_io()?,
                            kicks: r.kicks_per_io(),
                            irqs: r.interrupts_per_io(),
                        })
                    })
                    .collect()
            });
            let instructions = counts
                .and_then(|k| k.find(mode, group))
                .map(|c| (c.guest_per_io(), c.device_per_io()));
            ModeCost::new(mode, reps.collect()).map(|c| c.with_instructions(instructions))
        })
        .collect()
}

/// Every group's summary, from the cells with the given thread counts.
pub fn summarize(
    cells: &[Cell],
    host: Option<HostCosts>,
    threads: &[usize],
    counts: Option<&Counts>,
) -> Vec<GroupSummary> {
    let used: Vec<Cell> =
        cells.iter().filter(|c| threads.contains(&c.spec.threads)).cloned().collect();
    groups(&used)
        .into_iter()
        .map(|(w, size)| GroupSummary::rank(w, size, &mode_costs(&used, (w, size), counts), host))
        .collect()
}

/// The summary as text.
///
/// `threads` are the counts ranked, `left_out` those that ran but are not.
pub fn render(
    summaries: &[GroupSummary],
    host: Option<HostCosts>,
    threads: &[usize],
    left_out: &[usize],
) -> String {
    let mut out = String::new();
    let by = match host {
        Some(h) => {
            format!("modelled cost = CPU + kicks x {} ns + interrupts x {} ns", h.exit_ns, h.irq_ns)
        }
        None => "CPU per I/O (pass --host or --exit-cost-ns to add exits)".into(),
    };
    let list = |t: &[usize]| t.iter().map(|t| t.to_string()).collect::<Vec<_>>().join("/");
    let skipped = if left_out.is_empty() {
        String::new()
    } else {
        format!(" ({} left out: more guest threads than host CPUs)", list(left_out))
    };
    let by_instructions = summaries.iter().all(|s| s.rule == TieRule::Instructions);
    let tie = if by_instructions && !summaries.is_empty() {
        format!(
            "modes share a rank (≈) when the instructions per I/O they add to no IOMMU (added: \
             callgrind, one guest thread, the same whatever the load) are within a factor {:.2} \
             of each other, directly or through other modes, and ranks are in the order of their \
             CPU per I/O",
            INSTRUCTION_TIE
        )
    } else {
        format!(
            "modes share a rank (≈) when their floors are within a factor {:.2} of each other (a \
             drift of {:.0}% each way between runs), directly or through other modes",
            (1.0 + DRIFT) * (1.0 + DRIFT),
            DRIFT * 100.0,
        )
    };
    let _ = writeln!(
        out,
        "\nsummary: ranked by {by}; per mode its floor, the mean over {} thread{}{skipped} of each \
         cell's least repetition (median: the same of each cell's median); {tie}",
        list(threads),
        if threads == [1] { "" } else { "s" },
    );
    for s in summaries {
        let unit = if s.workload == Workload::Net { "packets" } else { "requests" };
        let _ = writeln!(out, "\n{} {} {unit}: {}", s.workload, size_label(s.io_size), s.ranking());
        let _ = writeln!(
            out,
            "  cheapest for a Linux guest: {}; with isolation: {}; with isolation, our driver's modes too: {}",
            join_modes(&s.cheapest_linux),
            join_modes(&s.cheapest_linux_isolating),
            join_modes(&s.cheapest)
        );
        for (cheaper, dearer) in &s.disagreements {
            let _ = writeln!(
                out,
                "  note: {} costs less CPU than {} but executes more instructions",
                join_modes(cheaper),
                join_modes(dearer)
            );
        }
        let show_instr = s.none.iter().chain(&s.ranked).any(|c| c.instructions.is_some());
        let _ = write!(out, "  {:<18} {:>9} {:>9} {:>7}", "mode", "CPU us/IO", "median", "x none");
        if show_instr {
            let _ = write!(out, " {:>9} {:>8}", "instr/IO", "added");
        }
        let _ = write!(out, " {:>9} {:>7}", "kicks/IO", "irq/IO");
        if host.is_some() {
            let _ = write!(out, " {:>10} {:>7}", "model us", "x none");
        }
        let _ = writeln!(out, "  gives up");
        let none_key = |h| s.none.as_ref().map(|n| n.key(h));
        for c in s.none.iter().chain(&s.ranked) {
            let x = |v: f64, base: Option<f64>| {
                base.filter(|b| *b > 0.0).map_or("-".to_string(), |b| format!("{:.2}", v / b))
            };
            let _ = write!(
                out,
                "  {:<18} {:>9.2} {:>9} {:>7}",
                c.mode.name(),
                c.cpu_ns() / 1000.0,
                format!("{:.2}", c.median(None) / 1000.0),
                x(c.cpu_ns(), none_key(None)),
            );
            if show_instr {
                let n = c.instructions_per_io();
                let base = s.none.as_ref().and_then(ModeCost::instructions_per_io);
                let added = n.zip(base).map_or("-".into(), |(n, b)| format!("{:.0}", n - b));
                let _ = write!(
                    out,
                    " {:>9} {:>8}",
                    n.map_or("-".into(), |n| format!("{:.0}", n)),
                    added
                );
            }
            let _ = write!(out, " {:>9.2} {:>7.2}", c.kicks(), c.irqs());
            if host.is_some() {
                let m = c.key(host);
                let _ = write!(out, " {:>10.2} {:>7}", m / 1000.0, x(m, none_key(host)));
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

    fn rep(cpu_ns: f64, kicks: f64, irqs: f64) -> RepCost {
        RepCost { cpu_ns, kicks, irqs }
    }

    /// One cell, its repetitions at 1.00, 1.01 and 1.02 times `cpu_ns`.
    fn cost(mode: Mode, cpu_ns: f64, kicks: f64, irqs: f64) -> ModeCost {
        let r = |f: f64| rep(cpu_ns * f, kicks, irqs);
        ModeCost::new(mode, vec![vec![r(1.01), r(1.0), r(1.02)]]).unwrap()
    }

    /// One cell whose repetitions measured `cpus`.
    fn reps(mode: Mode, cpus: &[f64]) -> ModeCost {
        ModeCost::new(mode, vec![cpus.iter().map(|&c| rep(c, 3.0, 3.0)).collect()]).unwrap()
    }

    fn d(m: DriverMode) -> Mode {
        Mode::Driver(m)
    }

    fn sample() -> Vec<ModeCost> {
        vec![
            cost(Mode::NoIommu, 1000.0, 0.0, 0.0),
            cost(d(DriverMode::Identity), 1100.0, 0.0, 0.0),
            cost(d(DriverMode::Strict), 9500.0, 6.0, 6.0),
            cost(d(DriverMode::Lazy), 6000.0, 3.0, 3.0),
            cost(d(DriverMode::LazySingle), 6050.0, 3.0, 3.0),
            cost(d(DriverMode::Best), 2000.0, 1.0, 1.0),
        ]
    }

    fn ranking(costs: &[ModeCost], host: Option<HostCosts>) -> String {
        GroupSummary::rank(Workload::Block, 4096, costs, host).ranking()
    }

    /// The factor between two floors from which they stop tying.
    fn apart() -> f64 {
        (1.0 + DRIFT) * (1.0 + DRIFT)
    }

    #[test]
    fn ranks_by_cpu_and_names_the_linux_and_overall_choices() {
        let s = GroupSummary::rank(Workload::Block, 4096, &sample(), None);
        assert_eq!(s.none.as_ref().unwrap().cpu_ns(), 1000.0);
        assert_eq!(s.ranking(), "identity < best < lazy ≈ lazy-single < strict");
        assert_eq!(s.cheapest_linux, [d(DriverMode::Identity)]);
        // Overall, among modes that isolate: our batch API.
        assert_eq!(s.cheapest, [d(DriverMode::Best)]);
        // best and lazy-single are ours only: lazy is Linux's cheapest that isolates.
        assert_eq!(s.cheapest_linux_isolating, [d(DriverMode::Lazy)]);
    }

    #[test]
    fn floors_within_the_drift_tie() {
        let lazy = reps(d(DriverMode::Lazy), &[100.0; 3]);
        let strict = |x: f64| reps(d(DriverMode::Strict), &[x; 3]);
        assert!((1.45..1.55).contains(&apart()), "{}", apart());
        assert_eq!(ranking(&[lazy.clone(), strict(100.0 * apart())], None), "strict ≈ lazy");
        assert_eq!(ranking(&[lazy, strict(100.0 * apart() + 0.01)], None), "lazy < strict");
    }

    #[test]
    fn the_floor_ranks_and_disturbed_repetitions_do_not_count() {
        // Three of lazy's five repetitions were disturbed: its median is
        // above strict's, its floor is not, and the floor repeated.
        let lazy = reps(d(DriverMode::Lazy), &[400.0, 100.0, 400.0, 102.0, 400.0]);
        let strict = reps(d(DriverMode::Strict), &[150.0, 151.0, 152.0]);
        assert_eq!((lazy.key(None), lazy.median(None)), (100.0, 400.0));
        assert_eq!(ranking(&[strict.clone(), lazy], None), "lazy < strict");
        // Within the drift of each other they tie, however the medians lie.
        let lazy = reps(d(DriverMode::Lazy), &[120.0, 121.0, 122.0]);
        assert_eq!(ranking(&[strict, lazy], None), "strict ≈ lazy");
        let one = reps(d(DriverMode::Best), &[42.0]);
        assert_eq!((one.key(None), one.median(None)), (42.0, 42.0));
    }

    #[test]
    fn the_floor_is_the_mean_over_the_thread_counts() {
        let r = |c: f64| rep(c, 2.0, 1.0);
        let cells = vec![vec![r(110.0), r(100.0)], vec![r(300.0), r(310.0), r(330.0)]];
        let m = ModeCost::new(d(DriverMode::Lazy), cells).unwrap();
        assert_eq!(m.key(None), 200.0);
        // Medians 105 and 310.
        assert_eq!(m.median(None), 207.5);
        assert_eq!((m.kicks(), m.irqs()), (2.0, 1.0));
        assert!(ModeCost::new(d(DriverMode::Lazy), vec![vec![]]).is_none());
    }

    #[test]
    fn ranks_chain_through_overlaps_and_list_their_modes_in_sweep_order() {
        let run = |best: f64, lazy: f64, strict: f64| {
            let three = |m, x: f64| reps(d(m), &[x + 10.0, x, x + 5.0]);
            vec![
                three(DriverMode::Best, best),
                three(DriverMode::Lazy, lazy),
                three(DriverMode::Strict, strict),
                three(DriverMode::StrictEverySync, 500.0),
            ]
        };
        // best reaches lazy and lazy reaches strict, but best does not reach
        // strict (100 x 1.49 < 155): still one rank.
        let a = ranking(&run(100.0, 125.0, 155.0), None);
        assert_eq!(a, "strict ≈ lazy ≈ best < strict-every-sync");
        let apart = ranking(&run(100.0, 160.0, 260.0), None);
        assert_eq!(apart, "best < lazy < strict < strict-every-sync");
        // Another run with the floors in another order prints the same line.
        assert_eq!(ranking(&run(125.0, 155.0, 100.0), None), a);
        let s = GroupSummary::rank(Workload::Block, 4096, &run(100.0, 125.0, 155.0), None);
        assert_eq!(s.tiers.len(), 2);
        // The cheapest picks are the whole first rank that has one.
        assert_eq!(s.cheapest_linux_isolating, [d(DriverMode::Strict), d(DriverMode::Lazy)]);
        assert_eq!(s.cheapest, [d(DriverMode::Strict), d(DriverMode::Lazy), d(DriverMode::Best)]);
    }

    /// A mode with one cell whose repetitions measured `cpus`, and
    /// `instructions` per I/O (all on the guest side).
    fn counted(mode: Mode, cpus: &[f64], instructions: f64) -> ModeCost {
        reps(mode, cpus).with_instructions(Some((instructions, 0.0)))
    }

    #[test]
    fn instruction_counts_decide_ties_and_cpu_the_order() {
        // What the modes add to no IOMMU's 10000 instructions: 1000, 14000,
        // 34000 and 40000. identity and best are 14x apart, best and lazy
        // 2.4x: apart; lazy and strict 1.18x: tied.
        let run = |identity: f64, best: f64, lazy: f64, strict: f64| {
            vec![
                counted(Mode::NoIommu, &[700.0], 10_000.0),
                counted(d(DriverMode::Identity), &[identity], 11_000.0),
                counted(d(DriverMode::Best), &[best], 24_000.0),
                counted(d(DriverMode::Lazy), &[lazy], 44_000.0),
                counted(d(DriverMode::Strict), &[strict], 50_000.0),
            ]
        };
        let quiet =
            GroupSummary::rank(Workload::Block, 4096, &run(800.0, 3100.0, 6300.0, 9500.0), None);
        assert_eq!(quiet.rule, TieRule::Instructions);
        assert_eq!(quiet.ranking(), "identity < best < strict ≈ lazy");
        assert!(quiet.disagreements.is_empty());
        // A busy run: identity's, best's and strict's floors doubled,
        // lazy's not. The floors alone now tie best with lazy and part lazy
        // from strict; the counts did not change, so neither do the ranks.
        let busy = run(1600.0, 6200.0, 6300.0, 19_000.0);
        let drift: Vec<ModeCost> = busy.iter().map(|c| c.clone().with_instructions(None)).collect();
        assert_eq!(ranking(&drift, None), "identity < lazy ≈ best < strict");
        assert_eq!(
            GroupSummary::rank(Workload::Block, 4096, &busy, None).ranking(),
            quiet.ranking()
        );
        // Without the no-IOMMU cell the totals are compared: 11000 and
        // 24000 still part, 24000 and 44000 are 1.83x: still apart.
        let no_base: Vec<ModeCost> = busy.into_iter().skip(1).collect();
        assert_eq!(ranking(&no_base, None), quiet.ranking());
    }

    #[test]
    fn ranks_are_ordered_by_cpu_and_a_contrary_count_is_named() {
        // best executes fewer instructions than strict, but this run
        // measured it dearer in CPU: the order follows CPU, and says so.
        let v = [
            counted(d(DriverMode::Strict), &[5000.0], 50_000.0),
            counted(d(DriverMode::Best), &[6000.0], 20_000.0),
        ];
        let s = GroupSummary::rank(Workload::Block, 4096, &v, None);
        assert_eq!(s.ranking(), "strict < best");
        assert_eq!(s.disagreements, [(vec![d(DriverMode::Strict)], vec![d(DriverMode::Best)])]);
        let text = render(&[s], None, &[1], &[]);
        assert!(text.contains("note: strict costs less CPU than best but executes more"), "{text}");
    }

    #[test]
    fn ties_chain_through_counts_at_the_factor() {
        let f = INSTRUCTION_TIE;
        let v = |strict: f64| {
            [
                counted(d(DriverMode::Lazy), &[100.0], 1000.0),
                counted(d(DriverMode::Strict), &[200.0], strict),
                counted(d(DriverMode::StrictEverySync), &[300.0], strict * f * 0.99),
            ]
        };
        // Each within the factor of the one before: one rank, though the
        // ends are 2.2x apart.
        assert_eq!(ranking(&v(1000.0 * f * 0.99), None), "strict-every-sync ≈ strict ≈ lazy");
        assert_eq!(ranking(&v(1000.0 * f), None), "lazy < strict-every-sync ≈ strict");
    }

    #[test]
    fn a_host_model_or_a_missing_count_falls_back_to_the_drift_rule() {
        let host = HostCosts { exit_ns: 1000, irq_ns: 0 };
        let v = [
            counted(d(DriverMode::Lazy), &[100.0], 1000.0),
            counted(d(DriverMode::Strict), &[400.0], 1010.0),
        ];
        assert_eq!(tie_rule(&v, None), TieRule::Instructions);
        assert_eq!(tie_rule(&v, Some(host)), TieRule::Drift);
        let mut w = v.to_vec();
        w.push(reps(d(DriverMode::Best), &[50.0]));
        let s = GroupSummary::rank(Workload::Block, 4096, &w, None);
        assert_eq!((s.rule, s.ranking().as_str()), (TieRule::Drift, "best < lazy < strict"));
        let text = render(&[s], None, &[1], &[]);
        assert!(text.contains("their floors are within a factor 1.49"), "{text}");
    }

    #[test]
    fn only_thread_counts_the_host_has_cpus_for_are_ranked() {
        assert_eq!(ranked_threads(&[1, 2, 4], 2), [1, 2]);
        assert_eq!(ranked_threads(&[1, 2, 4], 8), [1, 2, 4]);
        assert_eq!(ranked_threads(&[4, 8], 2), [4, 8], "none fits: all");
        assert_eq!(ranked_threads(&[1], 0), [1]);
    }

    #[test]
    fn ties_do_not_depend_on_input_order() {
        let mut v = sample();
        let a = ranking(&v, None);
        v.reverse();
        assert_eq!(ranking(&v, None), a);
        v.swap(1, 3);
        assert_eq!(ranking(&v, None), a);
    }

    #[test]
    fn linux_models_are_linux_usable_and_best_is_not() {
        assert!(linux_usable(Mode::LinuxLazy) && linux_usable(Mode::NoIommu));
        assert!(!linux_usable(d(DriverMode::Best)) && !linux_usable(d(DriverMode::LazySingle)));
        let mut v = sample();
        v.push(cost(Mode::LinuxLazy, 3500.0, 4.0, 4.0));
        let s = GroupSummary::rank(Workload::Block, 4096, &v, None);
        assert_eq!(s.cheapest_linux_isolating, [Mode::LinuxLazy]);
    }

    #[test]
    fn modelled_cost_adds_exits_and_interrupts_and_can_reorder() {
        let host = HostCosts { exit_ns: 1000, irq_ns: 500 };
        let c = rep(6000.0, 3.0, 2.0);
        assert_eq!(c.key(Some(host)), 6000.0 + 3000.0 + 1000.0);
        // Cheaper CPU but many more exits loses once exits cost something.
        let v = [
            cost(d(DriverMode::Strict), 2000.0, 10.0, 10.0),
            cost(d(DriverMode::Lazy), 4000.0, 1.0, 1.0),
        ];
        let cpu = GroupSummary::rank(Workload::Block, 4096, &v, None);
        assert_eq!(cpu.cheapest, [d(DriverMode::Strict)]);
        let modelled = GroupSummary::rank(Workload::Block, 4096, &v, Some(host));
        assert_eq!(modelled.cheapest, [d(DriverMode::Lazy)]);
        assert_eq!(modelled.ranking(), "lazy < strict");
        // The spread is of the modelled cost, per repetition.
        let l = &modelled.ranked[0];
        assert_eq!(l.key(Some(host)), 4000.0 + 1500.0);
        assert_eq!(l.median(Some(host)), 4040.0 + 1500.0);
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
        let text = render(&s, Some(host), &[1, 2], &[4]);
        assert!(text.contains("kicks x 1500 ns + interrupts x 1000 ns"), "{text}");
        assert!(text.contains("the mean over 1/2 threads (4 left out: more guest"), "{text}");
        assert!(text.contains("within a factor 1.49 of each other"), "{text}");
        let strict = text.lines().find(|l| l.trim_start().starts_with("strict ")).unwrap();
        // 9.5 us of CPU is 9.50x none; modelled 9.5 + 9 + 6 = 24.5 us.
        assert!(strict.contains("9.50") && strict.contains("24.50"), "{strict}");
    }
}
