//! Exact requests and kicks per I/O for each mode, counted by the device and
//! the transport, on a fixed number of block and net I/Os.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use viommu_vm::bench::Mode;
use viommu_vm::endpoint::block::{BlockDevice, BlockGuest, S_OK};
use viommu_vm::endpoint::net::{NetDevice, NetGuest};
use viommu_vm::endpoint::DmaEngine;
use viommu_vm::machine::{Machine, MachineCounts};
use viommu_vm::GuestRam;

const EP: u32 = 8;
const N: u64 = 10;

/// Runs `N` block I/Os; returns the counts before and after the final flush.
fn block(mode: Mode, io_size: usize) -> (MachineCounts, MachineCounts) {
    let ram = GuestRam::new(32 << 20).unwrap();
    let m = Machine::new(ram.clone(), EP, mode).unwrap();
    let dev = BlockDevice::new(Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP)));
    let mut guest =
        BlockGuest::new(ram, io_size).unwrap().with_indirect(mode.per_descriptor()).unwrap();
    let mut dma = m.guest_dma();
    let mut scratch = Vec::new();
    let before = m.counts();
    let drv_before = m.driver().counters();
    for i in 0..N {
        let out = guest.io(&mut *dma, &dev, i % 2 == 1, i * 256, &mut scratch).unwrap();
        assert_eq!((out.status, out.data_ok), (S_OK, true), "{mode} I/O {i}");
    }
    let mid = m.counts().since(&before);
    dma.flush().unwrap();
    let end = m.counts().since(&before);
    let drv = m.driver().counters().since(&drv_before);
    // The driver's own counts agree with the device's and the transport's.
    assert_eq!((drv.map, drv.unmap, drv.kicks), (end.map_requests, end.unmap_requests, end.kicks));
    assert_eq!(dev.data_errors() + dev.dma_faults() + dev.dma().faults(), 0);
    let d = m.domain().unwrap();
    let device_maps = m.iommu().mappings(d.id()).map_or(0, |v| v.len());
    assert_eq!(device_maps, d.mappings().len(), "{mode}: device and driver agree when quiet");
    (mid, end)
}

#[test]
fn strict_every_sync_pays_a_kick_per_map_and_per_unmap() {
    let (_, c) = block(Mode::StrictEverySync, 4096);
    assert_eq!((c.map_requests, c.unmap_requests, c.kicks), (3 * N, 3 * N, 6 * N));
    // 64 KiB of scattered pages: 16 data MAPs, each synced on its own.
    let (_, c) = block(Mode::StrictEverySync, 64 << 10);
    assert_eq!((c.map_requests, c.unmap_requests, c.kicks), (18 * N, 3 * N, 21 * N));
}

#[test]
fn strict_syncs_once_per_map_call_and_per_unmap() {
    let (_, c) = block(Mode::Strict, 64 << 10);
    assert_eq!((c.map_requests, c.unmap_requests, c.kicks), (18 * N, 3 * N, 6 * N));
}

#[test]
fn lazy_defers_unmaps_onto_later_kicks() {
    for mode in [Mode::Lazy, Mode::LazySingle] {
        let (mid, end) = block(mode, 4096);
        assert_eq!(mid.map_requests, 3 * N, "{mode}");
        assert!(mid.kicks >= 3 * N, "{mode}: one kick per map call");
        assert_eq!(end.unmap_requests, 3 * N, "{mode}: no coalescing, one UNMAP per map");
        assert!(end.kicks < 6 * N, "{mode}: UNMAPs ride on other kicks ({})", end.kicks);
    }
}

#[test]
fn best_pays_one_kick_per_io_and_coalesces_unmaps() {
    let (mid, end) = block(Mode::Best, 4096);
    // Header and status share a page: one MAP for both, one for the data.
    assert_eq!(mid.map_requests, 2 * N);
    // One kick per I/O, plus one per flush the flush-queue timer made (a
    // slow debug run may pass the 10 ms timeout).
    assert!((N..=N + mid.timeout_flushes).contains(&mid.kicks), "{mid:?}");
    assert!(end.unmap_requests < end.map_requests, "{end:?}");
    assert!(end.unmap_requests >= 1);
    let (mid, _) = block(Mode::Best, 1 << 20);
    assert_eq!(mid.map_requests, 257 * N, "1 header/status page + 256 data pages");
    assert!((N..=N + mid.timeout_flushes).contains(&mid.kicks), "{mid:?}");
}

#[test]
fn linux_modes_reproduce_the_linux_guest_counts() {
    // ../shared/linux-baseline.md, Linux 6.12 under QEMU, per virtio-blk
    // request: MAPs = data segments + 3 (header, status, indirect table),
    // one kick per MAP; strict adds one kick per UNMAP.
    let (mid, end) = block(Mode::LinuxLazy, 4096);
    assert_eq!((mid.map_requests, end.unmap_requests), (4 * N, 4 * N));
    assert!((4 * N..=4 * N + mid.timeout_flushes).contains(&mid.kicks), "{mid:?}");
    let (_, c) = block(Mode::LinuxStrict, 64 << 10);
    assert_eq!((c.map_requests, c.unmap_requests, c.kicks), (19 * N, 19 * N, 38 * N));
}

#[test]
fn identity_sends_nothing_per_io() {
    let (_, c) = block(Mode::Identity, 64 << 10);
    assert_eq!((c.requests, c.kicks), (0, 0));
}

#[test]
fn net_best_maps_two_buffers_per_page_and_kicks_twice_per_round() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let m = Machine::new(ram.clone(), EP, Mode::Best).unwrap();
    let errors = Arc::new(AtomicU64::new(0));
    let engine = Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP));
    let mut dev = NetDevice::new(engine, errors.clone());
    let mut guest = NetGuest::new(ram, 32, 1500).unwrap();
    let mut dma = m.guest_dma();
    guest.fill_rx(&mut *dma, &mut dev).unwrap();
    let before = m.counts();
    for _ in 0..N {
        assert_eq!(guest.round(&mut *dma, &mut dev).unwrap(), 32);
    }
    let c = m.counts().since(&before);
    // 32 TX buffers in 16 pages, then 32 RX buffers in 16 pages.
    assert_eq!(c.map_requests, 32 * N);
    assert!((2 * N..=2 * N + c.timeout_flushes).contains(&c.kicks), "{c:?}");
    guest.drain(&mut *dma, &mut dev).unwrap();
    dma.flush().unwrap();
    assert_eq!(guest.rx_errors + dev.dropped(), 0);
    assert_eq!(errors.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn four_guest_threads_share_the_domain_and_move_checked_data() {
    for mode in [Mode::Strict, Mode::Lazy, Mode::Best] {
        let ram = GuestRam::new(64 << 20).unwrap();
        let m = Machine::new(ram.clone(), EP, mode).unwrap();
        let dev = BlockDevice::new(Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP)));
        let before = m.counts();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (m, dev, ram) = (&m, &dev, ram.clone());
                s.spawn(move || {
                    viommu_vm::machine::set_guest_cpu(t as usize);
                    let mut guest = BlockGuest::new(ram, 16 << 10).unwrap();
                    let mut dma = m.guest_dma();
                    let mut scratch = Vec::new();
                    for i in 0..N {
                        let sector = (t << 20) + i * 32;
                        let out =
                            guest.io(&mut *dma, dev, i % 2 == 0, sector, &mut scratch).unwrap();
                        assert_eq!((out.status, out.data_ok), (S_OK, true), "{mode} thread {t}");
                    }
                    dma.flush().unwrap();
                });
            }
        });
        let c = m.counts().since(&before);
        assert_eq!(dev.data_errors() + dev.dma().faults(), 0, "{mode}");
        let per_io = if mode == Mode::Best { 5 } else { 6 };
        assert_eq!(c.map_requests, per_io * 4 * N, "{mode}: {c:?}");
        let d = m.domain().unwrap();
        assert!(d.mappings().is_empty(), "{mode}: everything unmapped");
        assert_eq!(m.iommu().mappings(d.id()).map_or(0, |v| v.len()), 0, "{mode}");
    }
}
