//! Repeated cells: every repetition of one cell spec, and the median and
//! spread (min..max) of each figure over them.

use viommu_vm::bench::{CellResult, CellSpec, Mode, Workload};

/// Median and spread of one figure over the repetitions.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stat {
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Stat {
    /// Of the given values; `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stat> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 };
        Some(Stat { median, min: v[0], max: v[n - 1] })
    }
}

/// Every repetition of one cell.
#[derive(Clone, Debug)]
pub struct Cell {
    /// What was run.
    pub spec: CellSpec,
    /// One result per repetition, in run order.
    pub reps: Vec<CellResult>,
}

impl Cell {
    /// Median and spread of `f` over the repetitions that have it.
    pub fn stat(&self, f: impl Fn(&CellResult) -> Option<f64>) -> Option<Stat> {
        Stat::of(self.reps.iter().filter_map(f))
    }

    /// CPU time per I/O in ns (guest + device), the ranking figure.
    pub fn cpu_ns(&self) -> Option<Stat> {
        self.stat(CellResult::cpu_ns_per_io)
    }

    /// Guest-side CPU ns per I/O.
    pub fn guest_ns(&self) -> Option<Stat> {
        self.stat(CellResult::guest_ns_per_io)
    }

    /// Device-side CPU ns per I/O.
    pub fn device_ns(&self) -> Option<Stat> {
        self.stat(CellResult::device_ns_per_io)
    }

    /// CPU ns per I/O spent waiting and signalling (both sides), left out
    /// of [`Cell::cpu_ns`].
    pub fn waiting_ns(&self) -> Option<Stat> {
        self.stat(|r| Some(r.waiting_ns_per_io()))
    }

    /// Polling ns per I/O (both sides, wall time).
    pub fn poll_ns(&self) -> Option<Stat> {
        self.stat(|r| Some(r.poll_ns_per_io()))
    }

    /// Instructions per I/O, where counted.
    pub fn instructions(&self) -> Option<Stat> {
        self.stat(CellResult::instructions_per_io)
    }

    /// MB/s (load-sensitive).
    pub fn mb_s(&self) -> Option<Stat> {
        self.stat(|r| Some(r.mb_per_s()))
    }

    /// Kicks per I/O.
    pub fn kicks(&self) -> Option<Stat> {
        self.stat(|r| Some(r.kicks_per_io()))
    }

    /// Interrupts per I/O.
    pub fn irqs(&self) -> Option<Stat> {
        self.stat(|r| Some(r.interrupts_per_io()))
    }

    /// MAP + UNMAP requests per I/O.
    pub fn requests(&self) -> Option<Stat> {
        self.stat(|r| Some(r.requests_per_io()))
    }

    /// Median latency in µs.
    pub fn p50_us(&self) -> Option<Stat> {
        self.stat(|r| Some(r.p50.as_secs_f64() * 1e6))
    }

    /// 99th percentile latency in µs.
    pub fn p99_us(&self) -> Option<Stat> {
        self.stat(|r| Some(r.p99.as_secs_f64() * 1e6))
    }

    /// The workload group (workload, size) of the cell.
    pub fn group(&self) -> (Workload, usize) {
        (self.spec.workload, self.spec.io_size)
    }
}

/// The no-IOMMU cell matching `c` (same workload, size, threads).
pub fn baseline<'a>(all: &'a [Cell], c: &Cell) -> Option<&'a Cell> {
    all.iter().find(|b| {
        b.spec.mode == Mode::NoIommu && b.group() == c.group() && b.spec.threads == c.spec.threads
    })
}

/// The workload groups in run order.
pub fn groups(cells: &[Cell]) -> Vec<(Workload, usize)> {
    let mut out = Vec::new();
    for c in cells {
        if !out.contains(&c.group()) {
            out.push(c.group());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        assert_eq!(Stat::of([3.0, 1.0, 2.0]), Some(Stat { median: 2.0, min: 1.0, max: 3.0 }));
        assert_eq!(Stat::of([4.0, 1.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of([]), None);
        assert_eq!(Stat::of([f64::NAN, 5.0]).unwrap().median, 5.0);
    }
}
