//! Benchmark cells: one mode × workload × request size × thread count, run
//! on a fresh VM, with exact request and kick counts from the device and the
//! transport.

use std::fmt;
use std::time::Duration;

/// How the guest uses the IOMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// No IOMMU at all: endpoints see guest-physical addresses.
    NoIommu,
    /// The endpoint is attached to an identity (bypass) domain: no MAP or
    /// UNMAP, but every access still goes through `translate()`.
    Identity,
    /// Strict, with a sync after every MAP and every UNMAP: the Linux
    /// driver before 6.7.
    StrictEverySync,
    /// Strict: one sync per map call (`iotlb_sync_map`), one per unmap.
    Strict,
    /// Lazy: per-CPU flush queues (256 entries, 10 ms), as Linux 6.7+ by default.
    Lazy,
    /// Lazy with one shared flush queue (32768 entries, 1 s).
    LazySingle,
    /// Lazy, the batch API (one sync per I/O) and UNMAP coalescing.
    Best,
}

impl Mode {
    /// Every mode, in report order.
    pub const ALL: [Mode; 7] = [
        Mode::NoIommu,
        Mode::Identity,
        Mode::StrictEverySync,
        Mode::Strict,
        Mode::Lazy,
        Mode::LazySingle,
        Mode::Best,
    ];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::NoIommu => "none",
            Mode::Identity => "identity",
            Mode::StrictEverySync => "strict-every-sync",
            Mode::Strict => "strict",
            Mode::Lazy => "lazy",
            Mode::LazySingle => "lazy-single",
            Mode::Best => "best",
        }
    }

    /// Parses a [`Mode::name`].
    pub fn from_name(s: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == s)
    }

    /// One line on what the mode does.
    pub fn describe(self) -> &'static str {
        match self {
            Mode::NoIommu => "no IOMMU: the endpoint uses guest-physical addresses",
            Mode::Identity => "identity/bypass domain: no MAP/UNMAP, translate() still checked",
            Mode::StrictEverySync => "strict, a sync after every MAP and UNMAP (Linux < 6.7)",
            Mode::Strict => "strict, one sync per map call and per unmap (Linux >= 6.7 strict)",
            Mode::Lazy => "lazy, per-CPU flush queues 256/10 ms (Linux >= 6.7 default)",
            Mode::LazySingle => "lazy, one flush queue 32768/1 s",
            Mode::Best => "lazy + batch API (1 sync per I/O) + UNMAP coalescing",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the emulated endpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Workload {
    /// virtio-blk-like: header, data segments and status per request.
    Block,
    /// virtio-net-like: small packets out, RX buffers refilled.
    Net,
}

impl Workload {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Block => "block",
            Workload::Net => "net",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One benchmark cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CellSpec {
    /// IOMMU mode.
    pub mode: Mode,
    /// Endpoint workload.
    pub workload: Workload,
    /// Bytes per I/O (block: data bytes per request; net: bytes per packet).
    pub io_size: usize,
    /// Guest threads issuing I/O at once.
    pub threads: usize,
    /// How long the timed part runs.
    pub duration: Duration,
    /// Extra delay per kick (the VM-exit cost model).
    pub exit_cost: Duration,
}

/// What one cell measured. Counts cover the timed part plus the final
/// flush of lazily deferred UNMAPs (so every MAP has its UNMAP counted);
/// the time covers the timed part only.
#[derive(Clone, Debug, PartialEq)]
pub struct CellResult {
    /// What was run.
    pub spec: CellSpec,
    /// I/Os completed (block requests, or packets).
    pub ios: u64,
    /// Payload bytes moved.
    pub bytes: u64,
    /// Wall time of the timed part, exit delays included.
    pub elapsed: Duration,
    /// MAP requests the device processed.
    pub map_requests: u64,
    /// UNMAP requests the device processed.
    pub unmap_requests: u64,
    /// Kicks of the IOMMU request queue.
    pub kicks: u64,
    /// Syncs the driver performed (waits for the device).
    pub syncs: u64,
    /// Median I/O latency.
    pub p50: Duration,
    /// 99th percentile I/O latency.
    pub p99: Duration,
    /// Total exit delay injected by the cost model, over all threads.
    pub exit_injected: Duration,
    /// Accesses the endpoint translated through the IOMMU.
    pub translations: u64,
    /// Data mismatches the endpoint or the guest found (must be 0).
    pub data_errors: u64,
    /// Translation faults (must be 0 in a benchmark).
    pub faults: u64,
}

impl CellResult {
    /// Payload throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s == 0.0 {
            0.0
        } else {
            self.bytes as f64 / s / 1e6
        }
    }

    /// MAP plus UNMAP requests per I/O.
    pub fn requests_per_io(&self) -> f64 {
        per(self.map_requests + self.unmap_requests, self.ios)
    }

    /// Request-queue kicks per I/O.
    pub fn kicks_per_io(&self) -> f64 {
        per(self.kicks, self.ios)
    }
}

fn per(n: u64, ios: u64) -> f64 {
    if ios == 0 {
        0.0
    } else {
        n as f64 / ios as f64
    }
}
