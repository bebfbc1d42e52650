//! A small latency histogram: log-linear buckets (16 per power of two), so
//! percentiles are within about 6% of the true value at any scale.

use std::time::Duration;

const SUB: u32 = 16;
const BUCKETS: usize = 64 * SUB as usize;

/// Latency histogram in nanoseconds.
#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: vec![0; BUCKETS], total: 0 }
    }
}

fn bucket(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let exp = 63 - ns.leading_zeros(); // >= 4
    let frac = (ns >> (exp - 4)) as u32 & (SUB - 1);
    ((exp - 3) * SUB + frac) as usize
}

fn bucket_floor(b: usize) -> u64 {
    let b = b as u32;
    if b < SUB {
        return b as u64;
    }
    let exp = b / SUB + 3;
    let frac = (b % SUB) as u64;
    (1u64 << exp) | (frac << (exp - 4))
}

impl Histogram {
    /// Records one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = d.as_nanos().min(u64::MAX as u128) as u64;
        self.counts[bucket(ns).min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (0.0..=1.0), as the lower edge of its bucket; zero when empty.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(bucket_floor(b));
            }
        }
        Duration::from_nanos(bucket_floor(BUCKETS - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in [0u64, 1, 15, 16, 17, 31, 32, 100, 1000, 12345, 1 << 40, u64::MAX] {
            let b = bucket(ns);
            assert!(b >= last);
            last = b;
            let floor = bucket_floor(b);
            assert!(floor <= ns && ns - floor <= ns / 16, "{ns} -> {floor}");
        }
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for i in 1..=100u64 {
            h.record(Duration::from_micros(i));
        }
        let p50 = h.quantile(0.5).as_micros();
        let p99 = h.quantile(0.99).as_micros();
        assert!((47..=50).contains(&p50), "{p50}");
        assert!((93..=99).contains(&p99), "{p99}");
        let mut g = Histogram::default();
        g.merge(&h);
        assert_eq!(g.count(), 100);
        assert_eq!(Histogram::default().quantile(0.5), Duration::ZERO);
    }
}
