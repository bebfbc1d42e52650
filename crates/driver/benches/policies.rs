//! Requests, kicks and syncs per I/O under each DMA policy, against the fake
//! device. Each I/O looks like a virtio-blk request: a 16-byte header, data
//! (4 KiB, 64 KiB or 1 MiB of scattered pages) and a 1-byte status that
//! shares the header's page. Queue depth 1; the clock is simulated (25 µs per
//! I/O) so the figures are reproducible; a 1 s idle tail flushes what is left.
//!
//! Run: `cargo bench -p viommu-driver --bench policies`

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{blk_io, device_config, Clock, FakeDevice};
use viommu_driver::dma::{DmaDomain, DmaOptions, Policy};
use viommu_driver::fake::FakeConfig;
use viommu_driver::{CounterSnapshot, DriverOptions, VirtioIommu};

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    identity: bool,
    policy: Policy,
    sync_every_map: bool,
    batch: bool,
    coalesce: bool,
    contiguous: bool,
    /// Request-queue size (QEMU's virtio-iommu uses 256).
    queue: u16,
    /// Negotiate INDIRECT_DESC (QEMU offers it): one descriptor per request.
    indirect: bool,
}

const fn mode(name: &'static str, policy: Policy, sync_every_map: bool, batch: bool) -> Mode {
    Mode {
        name,
        identity: false,
        policy,
        sync_every_map,
        batch,
        coalesce: batch,
        contiguous: false,
        queue: 256,
        indirect: true,
    }
}

const MODES: [Mode; 12] = [
    Mode { identity: true, ..mode("identity (bypass)", Policy::Strict, false, false) },
    mode("strict, sync every map (Linux < 6.7)", Policy::Strict, true, false),
    mode("strict + sync_map (Linux 6.12 strict)", Policy::Strict, false, false),
    mode("lazy (Linux 6.12 default)", Policy::Lazy, false, false),
    mode("lazy-single", Policy::LazySingle, false, false),
    mode("strict + batch + coalesce", Policy::Strict, false, true),
    mode("best: lazy + batch + coalesce", Policy::Lazy, false, true),
    Mode {
        contiguous: true,
        ..mode("best, physically contiguous data", Policy::Lazy, false, true)
    },
    Mode {
        queue: 1024,
        ..mode("strict + batch + coalesce, 1024-entry queue", Policy::Strict, false, true)
    },
    Mode { queue: 1024, ..mode("best, 1024-entry queue", Policy::Lazy, false, true) },
    Mode {
        indirect: false,
        ..mode("strict + batch + coalesce, no INDIRECT_DESC", Policy::Strict, false, true)
    },
    Mode { indirect: false, ..mode("best, no INDIRECT_DESC", Policy::Lazy, false, true) },
];

fn data_segments(io: u64, pages: u64, contiguous: bool) -> Vec<(u64, usize)> {
    let base = 0x1_0000_0000 + io % 64 * 0x100_0000;
    let stride = if contiguous { 0x1000 } else { 0x2000 };
    (0..pages).map(|p| (base + p * stride, 4096)).collect()
}

fn run(m: Mode, pages: u64, ios: u64) -> (CounterSnapshot, u64) {
    let ring = FakeConfig { mem_pages: 256, queue_max: m.queue, ..Default::default() };
    let fake = FakeDevice::new(device_config(), ring);
    let opts = DriverOptions {
        request_queue_size: m.queue,
        indirect_desc: m.indirect,
        ..Default::default()
    };
    let iommu = VirtioIommu::new(fake.transport(), fake.hal(), opts).unwrap();
    let domain = if m.identity { iommu.alloc_identity(1) } else { iommu.alloc_paging(1) }.unwrap();
    iommu.attach(&domain, 1).unwrap();
    let resv = iommu.reserved_regions(1).unwrap();
    let opts = DmaOptions {
        policy: m.policy,
        sync_every_map: m.sync_every_map,
        coalesce_unmaps: m.coalesce,
        ..Default::default()
    };
    let clock = Arc::new(Clock(AtomicU64::new(0)));
    let dma = DmaDomain::new(domain, &resv, opts, clock.clone()).unwrap();
    let start = iommu.counters();
    let kicks0 = fake.stats().kicks;
    for io in 0..ios {
        let segs = data_segments(io, pages, m.contiguous);
        blk_io(&dma, &clock, &segs, m.batch);
    }
    // Idle tail: the timer flushes what the queues still hold.
    clock.0.fetch_add(1_000_000_000, Ordering::Relaxed);
    dma.tick().unwrap();
    assert_eq!(dma.iova_in_use(), 0, "{}: all IOVAs back", m.name);
    let c = iommu.counters().since(&start);
    assert_eq!(fake.stats().kicks - kicks0, c.kicks, "driver and device agree on kicks");
    (c, ios)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 20 };
    println!("| mode | I/O | MAP/I/O | UNMAP/I/O | kicks/I/O | syncs/I/O | requests/kick |");
    println!("|---|---|---|---|---|---|---|");
    for m in MODES {
        for (label, pages, ios) in [("4k", 1, 4000), ("64k", 16, 1000), ("1M", 256, 200)] {
            let (c, n) = run(m, pages, ios / scale);
            let per = |v: u64| v as f64 / n as f64;
            let rpk = if c.kicks == 0 {
                "-".into()
            } else {
                format!("{:.1}", c.requests() as f64 / c.kicks as f64)
            };
            println!(
                "| {} | {label} | {:.2} | {:.2} | {:.2} | {:.2} | {rpk} |",
                m.name,
                per(c.map),
                per(c.unmap),
                per(c.kicks),
                per(c.syncs)
            );
        }
    }
}
