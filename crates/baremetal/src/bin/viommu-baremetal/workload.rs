//! The workloads both block paths run, and what they print: `VG MARK`
//! before, `VG PERF` after (the driver's counters over the workload, which
//! `viommu trace-report` checks against QEMU's trace).

use alloc::format;
use alloc::string::String;

use viommu_baremetal::pattern;
use viommu_driver::CounterSnapshot;

use crate::println;

/// Reads come from the first half of the disk (the host's pattern), writes
/// go to the second (as crates/guest's workloads do).
pub const READ_BASE: u64 = 0;
/// Where writes go.
pub const WRITE_BASE: u64 = 64 << 20;

/// One workload: `count` requests of `size` bytes from disk offset `base`, at queue depth 1.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Name in the MARK, PERF and PASS lines.
    pub name: String,
    /// Writes (else reads).
    pub write: bool,
    /// Bytes per request.
    pub size: usize,
    /// Requests.
    pub count: u64,
    /// First disk byte.
    pub base: u64,
    /// The pattern tag of the data.
    pub tag: u64,
    /// Every 4 KiB page of the buffer physically apart from the one before
    /// (the hand-built path only: `map_sg`).
    pub scattered: bool,
    /// Requests per round: mapped in one batch, one kick (the hand-built
    /// path only; virtio-drivers' blocking calls are queue depth 1).
    pub qd: usize,
}

impl Workload {
    /// Reads of the host's pattern.
    pub fn read(name: &str, size: usize, count: u64) -> Self {
        Self {
            name: name.into(),
            write: false,
            size,
            count,
            base: READ_BASE,
            tag: pattern::DISK_TAG,
            scattered: false,
            qd: 1,
        }
    }

    /// Writes of a pattern with `tag`.
    pub fn write(name: &str, size: usize, count: u64, tag: u64) -> Self {
        Self {
            name: name.into(),
            write: true,
            size,
            count,
            base: WRITE_BASE,
            tag,
            scattered: false,
            qd: 1,
        }
    }

    /// The same with scattered buffers.
    pub fn scattered(self) -> Self {
        Self { scattered: true, ..self }
    }

    /// The same in rounds of `qd` requests.
    pub fn qd(self, qd: usize) -> Self {
        Self { qd, ..self }
    }

    /// Reads back what `self` (a write) wrote.
    pub fn verify(&self) -> Self {
        Self { name: format!("verify-{}", self.name), write: false, ..self.clone() }
    }

    /// Bytes moved.
    pub fn bytes(&self) -> u64 {
        self.count * self.size as u64
    }

    /// Disk offset of request `i`.
    pub fn offset(&self, i: u64) -> u64 {
        self.base + i * self.size as u64
    }

    /// Checks the data of request `i`.
    pub fn check(&self, i: u64, data: &[u8]) -> Result<(), String> {
        pattern::check(data, self.offset(i), self.tag)
            .map_err(|bad| format!("wrong data at disk offset {bad:#x}"))
    }
}

/// What one workload cost.
pub struct Perf {
    /// Seconds in the I/O loop, filling and checking data left out.
    pub secs: f64,
    /// The IOMMU driver's counters over the workload.
    pub counts: CounterSnapshot,
    /// Notifications of the block device, where the path counts them.
    pub blk_kicks: Option<u64>,
}

/// Prints the workload's `VG PERF` line.
pub fn print_perf(w: &Workload, p: &Perf) {
    let c = &p.counts;
    let mbps = if p.secs > 0.0 { w.bytes() as f64 / p.secs / 1e6 } else { 0.0 };
    println!(
        "VG PERF {} ios={} reqs={} bytes={} secs={:.3} mbps={:.1} map={} unmap={} attach={} kicks={} syncs={}{}",
        w.name,
        w.count,
        w.count,
        w.bytes(),
        p.secs,
        mbps,
        c.map,
        c.unmap,
        c.attach,
        c.kicks,
        c.syncs,
        p.blk_kicks.map(|k| format!(" blk_kicks={k}")).unwrap_or_default()
    );
    let per = |n: u64| n as f64 / w.count as f64;
    println!(
        "VG INFO {} per I/O: map={:.2} unmap={:.2} kicks={:.3} syncs={:.3}",
        w.name,
        per(c.map),
        per(c.unmap),
        per(c.kicks),
        per(c.syncs)
    );
}

/// A boot's write tag: different in every boot, so data an earlier boot
/// left on the disk never passes a check.
pub fn boot_tag() -> u64 {
    0x4241_5245_0000_0000 ^ crate::arch::rdtsc()
}
