//! Prints the memory a guest can make the device hold at the default limits: the most
//! mappings it may create (`Limits::max_mappings_total`), laid out in patterns that cost the
//! device the most, each measured in a fresh process: heap bytes held (counted by an
//! instrumented allocator), and the growth of resident and peak resident memory.
//!
//! ```text
//! cargo run --release -p viommu-device --example memory
//! ```

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::process::Command;

use viommu_device::{DeviceConfig, EndpointConfig, Iommu, Limits};
use viommu_proto::{AttachBody, MapBody, Request, Status, MAP_F_READ};
use zerocopy::little_endian::{U32, U64};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const PAGE: u64 = 0x1000;

/// (name, domains, mappings per domain (0: the most the limits allow), granules per
/// mapping, granules from one mapping's start to the next)
const PATTERNS: [(&str, u32, u64, u64, u64); 6] = [
    ("1 domain; 1 granule, contiguous", 1, 0, 1, 1),
    ("1 domain; 1 granule, 1 per 512 granules", 1, 0, 1, 512),
    ("1 domain; 4 granules, contiguous", 1, 0, 4, 4),
    ("1 domain; 4 granules, 1 per 512 granules", 1, 0, 4, 512),
    ("1 domain; 5 granules (not indexed), contiguous", 1, 0, 5, 5),
    // 449 x 4 granules just overflow a 2048-bucket table: each domain's table is 44 % full.
    ("1024 domains of 449; 4 granules, 1 per 512", 1024, 449, 4, 512),
];

/// VmRSS and VmHWM of this process, in bytes.
fn resident() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or("");
        let kb: u64 = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        kb * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Fills domains with mappings in pattern `p`, at the default limits.
fn measure(p: usize) {
    let (name, domains, per_domain, size, stride) = PATTERNS[p];
    let limits = Limits::default();
    let per_domain = match per_domain {
        0 => limits.max_mappings_total.min(limits.max_mappings_per_domain) as u64,
        n => n,
    };
    let cfg = DeviceConfig {
        endpoints: (0..domains).map(EndpointConfig::new).collect(),
        ..DeviceConfig::default()
    };
    let iommu = Iommu::new(cfg).unwrap();
    let (rss0, hwm0) = resident();
    let reg = Region::new(GLOBAL);
    for d in 0..domains {
        let attach =
            AttachBody { domain: U32::new(d), endpoint: U32::new(d), ..Default::default() };
        assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
        for i in 0..per_domain {
            let start = i * stride * PAGE;
            let map = MapBody {
                domain: U32::new(d),
                virt_start: U64::new(start),
                virt_end: U64::new(start + size * PAGE - 1),
                phys_start: U64::new(start),
                flags: U32::new(MAP_F_READ),
            };
            assert_eq!(iommu.execute(&Request::Map(map), &mut []), Status::Ok);
        }
    }
    let n = per_domain * u64::from(domains);
    let s = reg.change();
    let held = s.bytes_allocated as i64 - s.bytes_deallocated as i64 + s.bytes_reallocated as i64;
    let heap = held.max(0) as u64;
    let (rss, hwm) = resident();
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "| {name} | {}k | {:.0} B | {:.0} MiB | {:.0} MiB | {:.0} MiB |",
        n >> 10,
        heap as f64 / n as f64,
        mib(heap),
        mib(rss.saturating_sub(rss0)),
        mib(hwm.max(hwm0).saturating_sub(rss0)),
    );
    drop(iommu);
}

fn main() {
    if let Some(p) = std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        measure(p);
        return;
    }
    println!("| pattern (4 KiB granule) | mappings | heap per mapping | heap | resident growth | peak resident growth |");
    println!("|---|---:|---:|---:|---:|---:|");
    let exe = std::env::current_exe().unwrap();
    for p in 0..PATTERNS.len() {
        let out = Command::new(&exe).arg(p.to_string()).output().unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("pattern {p} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}
