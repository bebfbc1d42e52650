//! Time from the ACPI PM timer (3.579545 MHz, from the FADT), extended past
//! its 24-bit wrap (4.7 s) by reading it often: every wait and every
//! `tick()` reads it. Without a PM timer, the TSC counted as 1 GHz (only
//! the lazy flush timeout and MB/s depend on it).

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use viommu_baremetal::acpi::{PmTimer, PM_TIMER_HZ};
use viommu_driver::dma::DmaPlatform;

use crate::arch::{inl, rdtsc};

/// A monotonic clock; one CPU, so CPU 0.
pub struct Clock {
    timer: Option<PmTimer>,
    last: AtomicU32,
    ticks: AtomicU64,
}

impl Clock {
    /// A clock over `timer`, or over the TSC without one.
    pub fn new(timer: Option<PmTimer>) -> Self {
        let c = Self { timer, last: AtomicU32::new(0), ticks: AtomicU64::new(0) };
        if let Some(t) = timer {
            c.last.store(inl(t.port), Ordering::Relaxed);
        }
        c
    }

    /// Nanoseconds since the clock was made.
    pub fn now_ns(&self) -> u64 {
        let Some(t) = self.timer else { return rdtsc() };
        // One CPU and no interrupts: nobody else updates between the load and the store.
        let raw = inl(t.port);
        let d = t.elapsed(self.last.swap(raw, Ordering::Relaxed), raw);
        let ticks = self.ticks.fetch_add(d as u64, Ordering::Relaxed) + d as u64;
        (ticks as u128 * 1_000_000_000 / PM_TIMER_HZ as u128) as u64
    }
}

impl DmaPlatform for Clock {
    fn now_ns(&self) -> u64 {
        Clock::now_ns(self)
    }
    fn cpu_id(&self) -> usize {
        0
    }
}
