//! Guest CPU cost of the DMA layer per MAP, for instruction counting under
//! callgrind (deterministic, unlike time under QEMU TCG). Runs I/Os of
//! scattered 4 KiB pages (plus a virtio-blk header and status byte on one
//! page) against the fake device, and prints the request counts. Arguments:
//! I/Os (1000), pages per I/O (256), mode: `lazy-batch` (default) or
//! `strict-batch` (the batch API), `lazy` or `strict` (one call per buffer),
//! or `lazy-data` / `strict-data`: the data buffer alone, with one call
//! (`map_single` for one page, `map_sg` otherwise), as the real guest's
//! `lazy` and `strict` policies do (their request headers stay mapped). After a
//! 64-I/O warm-up, the measured part is `measured_loop`; the fake device's
//! own work is in `Device::process_requests`.
//!
//! ```text
//! CARGO_PROFILE_BENCH_DEBUG=line-tables-only cargo bench -p viommu-driver --bench map_cost --no-run
//! valgrind --tool=callgrind --toggle-collect='*measured_loop*' \
//!     $CARGO_TARGET_DIR/release/deps/map_cost-<hash> 1000 256 lazy-batch
//! callgrind_annotate --inclusive=yes callgrind.out.<pid> | grep -E 'TOTALS|process_requests \['
//! ```
//! Guest instructions per MAP = (total − `process_requests` inclusive) / MAPs.
//! Run without valgrind, it just prints the counts.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{blk_io, device_config, Clock, FakeDevice, IO_NS};
use viommu_driver::dma::{DmaDirection, DmaDomain, DmaOptions, Policy};
use viommu_driver::fake::FakeConfig;
use viommu_driver::{DriverOptions, VirtioIommu};

fn data_segments(io: u64, pages: u64) -> Vec<(u64, usize)> {
    let base = 0x1_0000_0000 + io % 64 * 0x100_0000;
    (0..pages).map(|p| (base + p * 0x2000, 4096)).collect()
}

#[inline(never)]
fn run_ios(dma: &DmaDomain, clock: &Clock, segs: &[Vec<(u64, usize)>], ios: u64, mode: &str) {
    for io in 0..ios {
        let segs = &segs[(io % 64) as usize];
        if mode.ends_with("-data") {
            data_io(dma, clock, segs);
        } else {
            blk_io(dma, clock, segs, mode.ends_with("-batch"));
        }
    }
}

/// Maps and unmaps the data buffer alone, then lets the flush timer run.
fn data_io(dma: &DmaDomain, clock: &Clock, segs: &[(u64, usize)]) {
    let dir = DmaDirection::FromDevice;
    if let [(p, len)] = segs {
        let iova = dma.map_single(*p, *len, dir).unwrap();
        dma.unmap_single(iova, *len, dir).unwrap();
    } else {
        let m = dma.map_sg(segs, dir).unwrap();
        dma.unmap_sg(m).unwrap();
    }
    clock.0.fetch_add(IO_NS, Ordering::Relaxed);
    dma.tick().unwrap();
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let ios: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let pages: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(256);
    let mode = args.get(2).map(String::as_str).unwrap_or("lazy-batch");
    let policy = if mode.starts_with("strict") { Policy::Strict } else { Policy::Lazy };
    let ring = FakeConfig { mem_pages: 256, queue_max: 256, ..Default::default() };
    let fake = FakeDevice::new(device_config(), ring);
    let opts = DriverOptions { request_queue_size: 256, ..Default::default() };
    let iommu = VirtioIommu::new(fake.transport(), fake.hal(), opts).unwrap();
    let domain = iommu.alloc_paging(1).unwrap();
    iommu.attach(&domain, 1).unwrap();
    let resv = iommu.reserved_regions(1).unwrap();
    let opts = DmaOptions { policy, ..Default::default() };
    let clock = Arc::new(Clock(AtomicU64::new(0)));
    let dma = DmaDomain::new(domain, &resv, opts, clock.clone()).unwrap();
    let segs: Vec<_> = (0..64).map(|io| data_segments(io, pages)).collect();
    // Warm-up: caches, magazines and the tree reach their steady state.
    run_ios(&dma, &clock, &segs, 64, mode);
    let start = iommu.counters();
    measured_loop(&dma, &clock, &segs, ios, mode);
    let c = iommu.counters().since(&start);
    clock.0.fetch_add(1_000_000_000, Ordering::Relaxed);
    dma.tick().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    println!(
        "{mode}: {ios} I/Os x {pages} pages: MAP {} UNMAP {} kicks {} syncs {}",
        c.map, c.unmap, c.kicks, c.syncs
    );
}

/// The measured part (callgrind's `--toggle-collect` target).
#[inline(never)]
fn measured_loop(dma: &DmaDomain, clock: &Clock, segs: &[Vec<(u64, usize)>], ios: u64, mode: &str) {
    run_ios(dma, clock, segs, ios, mode);
}
