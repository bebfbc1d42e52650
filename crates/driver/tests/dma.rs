//! The DMA layer against the fake device: batching, policies, flush queues,
//! coalescing, failure rollback, and a stress test racing attach/detach
//! against map/unmap.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use viommu_driver::dma::{DmaDirection as Dir, DmaDomain, DmaOptions, FlushQueueConfig, Policy};
use viommu_driver::fake::{InjectReply, Injection, Reorder};
use viommu_driver::{DriverOptions, Error};
use viommu_proto::{RequestType, Status};

fn strict() -> DmaOptions {
    DmaOptions { policy: Policy::Strict, ..Default::default() }
}

/// header (16 B) + one data page + status (1 B) sharing the header's page.
fn blk_io(dma: &DmaDomain, data: u64) -> viommu_driver::dma::DmaMapping {
    let mut b = dma.begin();
    let hdr = b.map(0x4000_0000, 16, Dir::ToDevice).unwrap();
    b.map(data, 4096, Dir::FromDevice).unwrap();
    assert_eq!(b.map(0x4000_0010, 1, Dir::FromDevice).unwrap(), hdr + 0x10);
    b.commit().unwrap()
}

#[test]
fn strict_batch_io_costs_two_kicks_and_one_unmap() {
    let (fake, iommu, dma, _) = dma_setup(strict());
    let before = iommu.counters();
    let m = blk_io(&dma, 0x5000_0000);
    dma.unmap(m).unwrap();
    let c = iommu.counters().since(&before);
    assert_eq!((c.map, c.unmap, c.kicks, c.syncs), (2, 1, 2, 2));
    assert_eq!(dma.iova_in_use(), 0);
    assert!(fake.mappings(dma.domain().id()).is_empty());
    // The shared page got both rights.
    let m = blk_io(&dma, 0x5000_0000);
    let maps = fake.mappings(dma.domain().id());
    assert!(maps.iter().any(|&(_, _, p, fl)| p == 0x4000_0000 && fl == 3));
    dma.unmap(m).unwrap();
}

#[test]
fn lazy_frees_iovas_only_after_the_covering_flush() {
    let (fake, iommu, dma, clock) = dma_setup(DmaOptions::default());
    let iova = dma.map_single(0x4000_0123, 100, Dir::ToDevice).unwrap();
    assert_eq!(iova & 0xfff, 0x123);
    dma.unmap_single(iova, 100, Dir::ToDevice).unwrap();
    assert_eq!(dma.iova_in_use(), 0x1000, "held until flushed");
    assert_eq!(fake.mappings(dma.domain().id()).len(), 1, "stale in the device");
    assert_eq!(dma.domain().iova_to_phys(iova), None);
    dma.tick().unwrap(); // not expired yet
    assert_eq!(dma.iova_in_use(), 0x1000);
    clock.advance(10_000_000);
    dma.tick().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert!(fake.mappings(dma.domain().id()).is_empty());
    let c = iommu.counters();
    assert_eq!((c.flushes_timeout, c.flushes_full, c.flushes_explicit), (1, 0, 0));
    assert_eq!(
        dma.unmap_single(iova, 100, Dir::ToDevice).unwrap_err(),
        Error::NotMapped { iova: iova & !0xfff }
    );
}

#[test]
fn full_queue_flushes_and_rides_on_the_next_kick() {
    let opts = DmaOptions {
        lazy: FlushQueueConfig { entries: 4, timeout_ns: u64::MAX },
        coalesce_unmaps: false,
        ..Default::default()
    };
    let (fake, iommu, dma, _) = dma_setup(opts);
    let iovas: Vec<u64> = (0..4)
        .map(|i| dma.map_single(0x4000_0000 + i * 0x1000, 4096, Dir::ToDevice).unwrap())
        .collect();
    let before = iommu.counters();
    for &i in &iovas {
        dma.unmap_single(i, 4096, Dir::ToDevice).unwrap();
    }
    let c = iommu.counters().since(&before);
    assert_eq!((c.flushes_full, c.unmap, c.kicks), (1, 4, 0), "queued, not kicked");
    assert_eq!(dma.iova_in_use(), 4 * 0x1000);
    // The next map's sync carries the UNMAPs; the next unmap reaps them.
    let x = dma.map_single(0x4100_0000, 4096, Dir::ToDevice).unwrap();
    assert_eq!(iommu.counters().since(&before).kicks, 1);
    assert_eq!(fake.mappings(dma.domain().id()).len(), 1);
    dma.unmap_single(x, 4096, Dir::ToDevice).unwrap();
    assert_eq!(dma.iova_in_use(), 0x1000, "only x waits for a flush");
}

#[test]
fn unmaps_coalesce_unless_a_live_mapping_lies_between() {
    for (coalesce, live_between, expect) in [(true, false, 1), (true, true, 2), (false, false, 3)] {
        let opts = DmaOptions { coalesce_unmaps: coalesce, ..Default::default() };
        let (fake, iommu, dma, _) = dma_setup(opts);
        // Top-down allocation: a, b, c are adjacent pages.
        let a = dma.map_single(0x4000_0000, 4096, Dir::ToDevice).unwrap();
        let b = dma.map_single(0x4000_1000, 4096, Dir::ToDevice).unwrap();
        let c = dma.map_single(0x4000_2000, 4096, Dir::ToDevice).unwrap();
        assert_eq!((a - b, b - c), (0x1000, 0x1000));
        let before = iommu.counters();
        dma.unmap_single(a, 4096, Dir::ToDevice).unwrap();
        if !live_between {
            dma.unmap_single(b, 4096, Dir::ToDevice).unwrap();
        }
        dma.unmap_single(c, 4096, Dir::ToDevice).unwrap();
        dma.flush().unwrap();
        let used = iommu.counters().since(&before);
        assert_eq!(used.unmap, expect, "coalesce={coalesce} live_between={live_between}");
        assert_eq!(fake.mappings(dma.domain().id()), tree(dma.domain()));
    }
}

#[test]
fn lazy_single_shares_one_queue_across_cpus() {
    let opts = DmaOptions { policy: Policy::LazySingle, ..Default::default() };
    let (_fake, iommu, dma, clock) = dma_setup(opts);
    for cpu in 0..3u64 {
        clock.cpu.store(cpu, std::sync::atomic::Ordering::SeqCst);
        let i = dma.map_single(0x4000_0000 + cpu * 0x1000, 64, Dir::ToDevice).unwrap();
        dma.unmap_single(i, 64, Dir::ToDevice).unwrap();
    }
    assert_eq!(dma.pending_unmaps(), 3);
    clock.advance(999_999_999);
    dma.tick().unwrap();
    assert_eq!(dma.pending_unmaps(), 3, "1 s timeout");
    clock.advance(1);
    dma.tick().unwrap();
    assert_eq!(dma.pending_unmaps(), 0);
    let c = iommu.counters();
    assert_eq!((c.flushes_timeout, c.unmap), (1, 1), "one coalesced UNMAP");
}

#[test]
fn policy_switch_flushes_first_and_applies_at_once() {
    let (fake, iommu, dma, _) = dma_setup(DmaOptions::default());
    let i = dma.map_single(0x4000_0000, 4096, Dir::Bidirectional).unwrap();
    dma.unmap_single(i, 4096, Dir::Bidirectional).unwrap();
    assert_eq!(dma.iova_in_use(), 0x1000);
    dma.set_policy(Policy::Strict).unwrap();
    assert_eq!(dma.policy(), Policy::Strict);
    assert_eq!((dma.iova_in_use(), iommu.counters().flushes_explicit), (0, 1));
    let i = dma.map_single(0x4000_0000, 4096, Dir::Bidirectional).unwrap();
    dma.unmap_single(i, 4096, Dir::Bidirectional).unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert!(fake.mappings(dma.domain().id()).is_empty());
}

#[test]
fn map_sg_merges_contiguous_segments_and_syncs_once_or_per_map() {
    let segs = [(0x4000_1000, 4096), (0x4000_2000, 4096), (0x4800_0000, 100), (0x4900_0000, 4096)];
    for every in [false, true] {
        let (fake, iommu, dma, _) = dma_setup(strict());
        dma.set_sync_every_map(every);
        let before = iommu.counters();
        let m = dma.map_sg(&segs, Dir::FromDevice).unwrap();
        let c = iommu.counters().since(&before);
        assert_eq!(m.segments.len(), 3);
        assert_eq!(m.segments[0].len, 8192);
        assert_eq!(m.segments[1].addr, m.segments[0].addr + 0x2000);
        assert_eq!(c.map, 3);
        assert_eq!(c.syncs, if every { 3 } else { 1 });
        assert_eq!(c.kicks, c.syncs);
        for s in &m.segments {
            assert!(dma.domain().iova_to_phys(s.addr).is_some());
        }
        dma.unmap_sg(m).unwrap();
        assert!(fake.mappings(dma.domain().id()).is_empty());
        assert_eq!(dma.iova_in_use(), 0);
    }
}

fn replies() -> [InjectReply; 5] {
    [
        InjectReply::Status(Status::Range),
        InjectReply::Status(Status::Inval),
        InjectReply::Status(Status::NoMem),
        InjectReply::Status(Status::IoErr),
        InjectReply::UsedLenZero,
    ]
}

fn expected(reply: InjectReply, request: RequestType) -> Error {
    match reply {
        InjectReply::Status(status) | InjectReply::AfterApplying(status) => {
            Error::Device { request, status }
        }
        InjectReply::UsedLenZero => Error::NoResponse { request, used_len: 0 },
        InjectReply::Hold => unreachable!("a held request gives no error"),
    }
}

#[test]
fn failed_maps_roll_back_without_leaking_iovas_or_tree_entries() {
    for reply in replies() {
        let (fake, _iommu, dma, _) = dma_setup(strict());
        let id = dma.domain().id();
        fake.inject(Injection { request: Some(RequestType::Map), reply });
        let err = dma.map_single(0x4000_0000, 4096, Dir::ToDevice).unwrap_err();
        assert_eq!(err, expected(reply, RequestType::Map));
        assert_eq!(dma.iova_in_use(), 0);
        assert!(dma.domain().mappings().is_empty());
        assert!(fake.mappings(id).is_empty());

        // A batch whose third MAP fails: the two that succeeded are unmapped again.
        let mut b = dma.begin();
        for p in [0x4000_0000, 0x4100_0000, 0x4200_0000] {
            b.map(p, 4096, Dir::ToDevice).unwrap();
        }
        fake.inject_nth(2, Injection { request: Some(RequestType::Map), reply });
        let err = b.commit().unwrap_err();
        assert_eq!(err, expected(reply, RequestType::Map));
        assert_eq!(dma.iova_in_use(), 0);
        assert!(dma.domain().mappings().is_empty());
        assert!(fake.mappings(id).is_empty());
        assert_eq!(fake.stats().maps(), 1 + 3);
    }
}

#[test]
fn dropping_an_uncommitted_batch_sends_nothing() {
    let (_fake, iommu, dma, _) = dma_setup(strict());
    let mut b = dma.begin();
    b.map(0x4000_0000, 4096, Dir::ToDevice).unwrap();
    b.map_sg(&[(0x4100_0000, 8192)], Dir::ToDevice).unwrap();
    assert_eq!(dma.iova_in_use(), 0x3000);
    drop(b);
    assert_eq!(dma.iova_in_use(), 0);
    assert_eq!(iommu.counters().map, 0);
}

#[test]
fn failed_unmaps_keep_iovas_until_a_retry_succeeds() {
    for reply in replies() {
        // Strict: the error comes back from the unmap.
        let (fake, iommu, dma, _) = dma_setup(strict());
        let id = dma.domain().id();
        let i = dma.map_single(0x4000_0000, 4096, Dir::ToDevice).unwrap();
        fake.inject(Injection { request: Some(RequestType::Unmap), reply });
        assert_eq!(
            dma.unmap_single(i, 4096, Dir::ToDevice).unwrap_err(),
            expected(reply, RequestType::Unmap)
        );
        assert_eq!(dma.iova_in_use(), 0x1000, "not reused while the device may map it");
        assert_eq!(iommu.counters().sync_errors, 1);
        dma.flush().unwrap();
        assert_eq!(dma.iova_in_use(), 0);
        assert!(fake.mappings(id).is_empty());

        // Lazy: the error comes back from the flush.
        dma.set_policy(Policy::Lazy).unwrap();
        let i = dma.map_single(0x4000_0000, 4096, Dir::ToDevice).unwrap();
        dma.unmap_single(i, 4096, Dir::ToDevice).unwrap();
        fake.inject(Injection { request: Some(RequestType::Unmap), reply });
        assert_eq!(dma.flush().unwrap_err(), expected(reply, RequestType::Unmap));
        assert_eq!(dma.iova_in_use(), 0x1000);
        dma.flush().unwrap();
        assert_eq!(dma.iova_in_use(), 0);
        assert!(fake.mappings(id).is_empty());
        assert_eq!(dma.pending_unmaps(), 0);
    }
}

#[test]
fn identity_domain_passes_addresses_through() {
    let (_fake, iommu) = setup(device_config());
    let d = iommu.alloc_identity(1).unwrap();
    iommu.attach(&d, 1).unwrap();
    let dma = DmaDomain::with_std(d, &[], DmaOptions::default()).unwrap();
    let before = iommu.counters();
    assert_eq!(dma.map_single(0x1234_5678, 10, Dir::ToDevice).unwrap(), 0x1234_5678);
    let mut b = dma.begin();
    assert_eq!(b.map(0x9000, 1, Dir::FromDevice).unwrap(), 0x9000);
    dma.unmap(b.commit().unwrap()).unwrap();
    assert_eq!(iommu.counters().since(&before).requests(), 0);
    assert_eq!(
        DmaDomain::with_std(iommu.alloc_blocking().unwrap(), &[], DmaOptions::default()).err(),
        Some(Error::NotPaging)
    );
}

#[test]
fn iovas_avoid_reserved_regions_and_recover_from_exhaustion() {
    let (_fake, iommu, _, _) = dma_setup(strict());
    let d = iommu.alloc_paging(2).unwrap();
    iommu.attach(&d, 2).unwrap();
    // A 16-page window, of which the reserved region takes 8.
    let opts = DmaOptions { dma_limit: 0x10fff, ..DmaOptions::default() };
    let resv = [viommu_driver::ResvRegion {
        start: 0x9000,
        end: 0x10fff,
        kind: viommu_driver::ResvKind::Reserved,
    }];
    let dma = DmaDomain::with_std(d, &resv, opts).unwrap();
    let mut held = Vec::new();
    while let Ok(i) = dma.map_single(0x4000_0000, 4096, Dir::ToDevice) {
        assert!((0x1000..0x9000).contains(&i), "{i:#x}");
        held.push(i);
    }
    assert_eq!(held.len(), 8, "pages 1..=8: page 0 is never handed out");
    // Lazy unmaps hold IOVAs; running dry forces a flush and succeeds.
    for i in held.drain(..) {
        dma.unmap_single(i, 4096, Dir::ToDevice).unwrap();
    }
    assert!(dma.pending_unmaps() > 0);
    assert!(dma.map_single(0x4000_0000, 4096, Dir::ToDevice).is_ok());
}

/// Threads map and unmap through one DMA domain while another attaches and
/// detaches its endpoints (sometimes all of them). Once quiet, the driver's
/// tree equals the device's mappings.
fn stress(policy: Policy, deferred: bool) {
    // Any interleaving must work; the driver's timeout only ends a hang
    // (5 s could pass on a loaded machine while a waiter is not scheduled).
    let opts = DriverOptions { timeout: Some(Duration::from_secs(60)), ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let opts = DmaOptions {
        policy,
        lazy: FlushQueueConfig { entries: 16, timeout_ns: 1_000_000 },
        ..Default::default()
    };
    let dma = Arc::new(DmaDomain::with_std(d.clone(), &resv, opts).unwrap());
    fake.set_deferred(deferred);
    let iommu = Arc::new(iommu);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut live_total = 0u64;
    std::thread::scope(|s| {
        let churn = {
            let (iommu, d, stop) = (iommu.clone(), d.clone(), stop.clone());
            s.spawn(move || {
                let mut n = 0u32;
                while n < 20 || !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    iommu.attach(&d, 2).unwrap();
                    iommu.detach(2).unwrap();
                    if n % 3 == 0 {
                        // Fully detached for a moment: maps go to the tree only,
                        // the next attach replays them.
                        iommu.detach(1).unwrap();
                        std::thread::yield_now();
                        iommu.attach(&d, 1).unwrap();
                    }
                    n += 1;
                }
                n
            })
        };
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let dma = dma.clone();
                s.spawn(move || {
                    let mut keep = None;
                    for i in 0..150u64 {
                        let base = 0x1_0000_0000 * (t + 1) + i * 0x10_000;
                        let mut b = dma.begin();
                        b.map(base, 16, Dir::ToDevice).unwrap();
                        b.map_sg(&[(base + 0x1000, 4096), (base + 0x3000, 8192)], Dir::FromDevice)
                            .unwrap();
                        b.map(base + 0x20, 1, Dir::FromDevice).unwrap();
                        let m = b.commit().unwrap();
                        if i == 149 {
                            keep = Some(m);
                        } else {
                            dma.unmap(m).unwrap();
                        }
                        if i % 10 == 0 {
                            dma.tick().unwrap();
                        }
                    }
                    keep
                })
            })
            .collect();
        let kept: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(churn.join().unwrap() >= 20);
        live_total = kept.iter().flatten().map(|m| m.allocations().len() as u64).sum();
        std::mem::forget(kept);
    });
    fake.set_deferred(false);
    dma.flush().unwrap();
    assert_eq!(live_total, 8);
    assert_eq!(fake.endpoint_domain(1), Some(d.id()));
    let device = fake.mappings(d.id());
    assert_eq!(device, tree(&d));
    assert_eq!(device.len(), 4 * 3, "per thread: header/status page + two data runs");
    assert_eq!(dma.pending_unmaps(), 0);
    assert_eq!(iommu.counters().sync_errors, 0);
}

#[test]
fn stress_lazy_attach_detach_vs_map_unmap() {
    stress(Policy::Lazy, false);
}

#[test]
fn stress_strict_with_a_late_device() {
    stress(Policy::Strict, true);
}

#[test]
fn a_timed_out_dma_map_keeps_its_iova_until_the_device_answers() {
    let opts = DriverOptions { timeout: Some(Duration::from_millis(20)), ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let dma =
        DmaDomain::new(d, &resv, DmaOptions::default(), Arc::new(ManualClock::default())).unwrap();
    fake.set_stalled(true);
    assert_eq!(dma.map_single(0x4000_0000, 4096, Dir::ToDevice), Err(Error::Timeout));
    // Rolled back in the tree; the IOVA is held, not reused.
    assert!(dma.domain().mappings().is_empty());
    assert_eq!((dma.iova_in_use(), dma.pending_unmaps()), (0x1000, 1));
    let other = dma.map_single(0x5000_0000, 4096, Dir::ToDevice);
    assert_eq!(other, Err(Error::Timeout));
    fake.set_stalled(false);
    // Both MAPs landed late; flush cleans up and frees both IOVAs.
    assert_eq!(fake.mappings(dma.domain().id()).len(), 2);
    dma.flush().unwrap();
    assert_eq!((dma.iova_in_use(), dma.pending_unmaps()), (0, 0));
    assert!(fake.mappings(dma.domain().id()).is_empty());
    assert!(dma.domain().stale_ranges().is_empty());
}

#[test]
fn io_stays_correct_whatever_order_the_device_executes_and_completes_in() {
    let lazy = |entries| DmaOptions {
        lazy: FlushQueueConfig { entries, timeout_ns: 1_000_000 },
        ..Default::default()
    };
    for reorder in [Reorder::InOrder, Reorder::ReverseCompletion, Reorder::ReverseExecution] {
        for opts in [strict(), lazy(4), lazy(256)] {
            let (fake, _iommu, dma, clock) = dma_setup(opts);
            fake.set_reorder(reorder);
            let mut live = std::collections::VecDeque::new();
            for io in 0..200u64 {
                // Scattered data, 1 to 4 pages, two I/Os in flight.
                let pages = io % 4 + 1;
                let segs: Vec<(u64, usize)> =
                    (0..pages).map(|p| (0x8000_0000 + (io * 8 + p * 2) * 0x1000, 4096)).collect();
                let mut b = dma.begin();
                b.map(0x4000_0000, 16, Dir::ToDevice).unwrap();
                b.map_sg(&segs, Dir::FromDevice).unwrap();
                live.push_back(b.commit().unwrap());
                // Every live mapping of the tree is in the device.
                let dev = fake.mappings(dma.domain().id());
                for m in tree(dma.domain()) {
                    assert!(dev.contains(&m), "{reorder:?} io {io}: {m:x?} missing");
                }
                if live.len() > 2 {
                    dma.unmap(live.pop_front().unwrap()).unwrap();
                }
                clock.advance(250_000);
                dma.tick().unwrap();
            }
            for m in live {
                dma.unmap(m).unwrap();
            }
            dma.flush().unwrap();
            assert_eq!(dma.iova_in_use(), 0, "{reorder:?}");
            assert!(fake.mappings(dma.domain().id()).is_empty(), "{reorder:?}");
            assert_eq!(fake.pending_injections(), 0);
        }
    }
}

#[test]
fn a_dma_map_that_failed_after_applying_leaves_no_mapping_and_no_iova() {
    let (fake, iommu, dma, _) = dma_setup(DmaOptions::default());
    let late_ioerr = Injection {
        request: Some(RequestType::Map),
        reply: InjectReply::AfterApplying(Status::IoErr),
    };
    fake.inject(late_ioerr);
    let err = Error::Device { request: RequestType::Map, status: Status::IoErr };
    assert_eq!(dma.map_single(0x4000_0000, 4096, Dir::ToDevice), Err(err));
    // The rollback UNMAP and the cleanup UNMAP went out together; both done.
    assert_eq!((dma.iova_in_use(), dma.pending_unmaps()), (0, 0));
    assert!(fake.mappings(dma.domain().id()).is_empty());
    assert!(dma.domain().stale_ranges().is_empty());
    assert_eq!(iommu.counters().unmap, 2);
}

/// A scatter-gather MAP batch that finds the ring full of requests of a
/// silent device gives up with `Timeout` after queueing part of it. The
/// queued MAPs may still land: their ranges stay blocked (stale) until the
/// device answers, and nothing of them is left for a later sync of the
/// domain, where an old failure would take the tree entry of a new mapping
/// at the same IOVA.
#[test]
fn a_map_batch_cut_short_by_a_timeout_leaves_nothing_pending() {
    let (fake, iommu) = setup_small_ring();
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let clock = Arc::new(ManualClock::default());
    let dma = DmaDomain::new(d.clone(), &resv, strict(), clock).unwrap();
    // Four pages far apart: four MAPs, two of which fit on the ring.
    let segs: Vec<(u64, usize)> = (0..4u64).map(|i| (0x4000_0000 + i * 0x10_0000, 4096)).collect();
    fake.set_stalled(true);
    assert_eq!(dma.map_sg(&segs, Dir::ToDevice).unwrap_err(), Error::Timeout);
    assert!(d.mappings().is_empty());
    let stale = d.stale_ranges();
    assert_eq!(stale.len(), 2, "the two queued MAPs may land: {stale:?}");
    // The device wakes up: the first queued MAP lands, the second fails.
    wake_failing_the_second(&fake, RequestType::Map);
    dma.flush().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert!(d.stale_ranges().is_empty());
    assert!(fake.mappings(d.id()).is_empty());
    // The same layout again, most likely at the same IOVA: a sync of the
    // domain finds nothing old to settle and leaves it whole.
    let m = dma.map_sg(&segs, Dir::ToDevice).unwrap();
    assert_eq!(d.mappings().len(), 4);
    d.iotlb_sync().unwrap();
    assert_eq!(d.mappings().len(), 4);
    assert_eq!(fake.mappings(d.id()), tree(&d));
    dma.unmap_sg(m).unwrap();
    assert_eq!(dma.iova_in_use(), 0);
}

/// The same for UNMAPs: a strict unmap cut short while queueing leaves its
/// queued UNMAPs to be waited for by MAPs of their ranges, not pending for
/// a later sync of the domain, which would report their old failure.
#[test]
fn an_unmap_batch_cut_short_by_a_timeout_leaves_nothing_pending() {
    let (fake, iommu) = setup_small_ring();
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let dma = DmaDomain::new(d.clone(), &resv, strict(), Arc::new(ManualClock::default())).unwrap();
    dma.set_coalesce_unmaps(false);
    let mut b = dma.begin();
    for i in 0..4u64 {
        b.map(0x4000_0000 + i * 0x10_0000, 4096, Dir::ToDevice).unwrap();
    }
    let m = b.commit().unwrap();
    fake.set_stalled(true);
    assert_eq!(dma.unmap(m).unwrap_err(), Error::Timeout);
    // The second queued UNMAP fails when the device wakes up.
    wake_failing_the_second(&fake, RequestType::Unmap);
    dma.flush().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert!(fake.mappings(d.id()).is_empty());
    d.iotlb_sync().unwrap();
}

/// Wakes a stalled device, which fails the second request of type `t` it
/// finds (IOERR).
fn wake_failing_the_second(fake: &viommu_driver::fake::FakeIommu, t: RequestType) {
    let reply = InjectReply::Status(Status::IoErr);
    fake.inject_nth(1, Injection { request: Some(t), reply });
    fake.set_stalled(false);
}

/// An explicit flush waits for UNMAPs that a flush on another CPU took from
/// the queue and is still waiting for: when it returns, every IOVA unmapped
/// before it was called is unmapped in the device and back in the allocator.
#[test]
fn flush_waits_for_entries_another_cpu_has_taken() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let (fake, _iommu, dma, _clock) = dma_setup(DmaOptions::default());
    let iova = dma.map_single(0x4000_0000, 4096, Dir::ToDevice).unwrap();
    dma.unmap_single(iova, 4096, Dir::ToDevice).unwrap();
    assert_eq!(dma.iova_in_use(), 0x1000);
    fake.set_stalled(true);
    let second_done = AtomicBool::new(false);
    let returned_early = std::thread::scope(|s| {
        let first = s.spawn(|| dma.flush());
        // The first flush has taken the entry once none shows as pending.
        while dma.pending_unmaps() != 0 {
            std::thread::yield_now();
        }
        let second = s.spawn(|| {
            let r = dma.flush();
            second_done.store(true, SeqCst);
            r
        });
        std::thread::sleep(Duration::from_millis(100));
        let early = second_done.load(SeqCst);
        fake.set_stalled(false);
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
        early
    });
    assert!(!returned_early, "a flush returned while an UNMAP taken before it was outstanding");
    assert_eq!(dma.iova_in_use(), 0);
    assert!(fake.mappings(dma.domain().id()).is_empty());
}
