//! Exact requests and kicks per I/O for each mode, counted by the device,
//! the transport and the driver, on a fixed number of block and net I/Os.
//!
//! Nothing here depends on timing. The VM runs without its flush-queue
//! timer and with a clock that moves only when a test says so
//! ([`MachineOptions::deterministic`]). Kicks are counted as *batches*
//! (`kicks + kicks_suppressed`): with EVENT_IDX the driver skips a kick when
//! the device's I/O thread has not yet finished with the ring (it looks
//! again before it stops), which depends on that thread's progress; the
//! batches the driver makes available do not. Kicks never exceed them.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::endpoint::block::{BlockDevice, BlockGuest, S_OK};
use viommu_vm::endpoint::net::{NetDevice, NetGuest};
use viommu_vm::endpoint::{DmaEngine, GuestDma};
use viommu_vm::machine::{device_config, Machine, MachineCounts, MachineOptions, ManualClock};
use viommu_vm::GuestRam;

const EP: u32 = 8;
const N: u64 = 10;

/// A VM without the timer thread, on a clock that stands still.
fn machine(ram: Arc<GuestRam>, mode: Mode) -> (Machine, Arc<ManualClock>) {
    let opts = MachineOptions::deterministic();
    let clock = opts.clock.clone().unwrap();
    (Machine::with_options(ram, device_config(EP), EP, mode, opts).unwrap(), clock)
}

/// Block I/Os on one VM, counted. Fields drop in order: the guest's DMA
/// handle before the machine, whose device must still answer its last flush.
struct Block {
    dma: Box<dyn GuestDma + Send>,
    guest: BlockGuest,
    dev: BlockDevice,
    clock: Arc<ManualClock>,
    scratch: Vec<u8>,
    done: u64,
    before: MachineCounts,
    m: Machine,
}

impl Block {
    fn new(mode: Mode, io_size: usize) -> Self {
        let ram = GuestRam::new(32 << 20).unwrap();
        let (m, clock) = machine(ram.clone(), mode);
        let dev = BlockDevice::new(Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP)));
        let guest =
            BlockGuest::new(ram, io_size).unwrap().with_indirect(mode.per_descriptor()).unwrap();
        let dma = m.guest_dma();
        let before = m.counts();
        Self { dma, guest, dev, clock, scratch: Vec::new(), done: 0, before, m }
    }

    /// Runs `n` I/Os with checked data; returns the counts so far.
    fn io(&mut self, n: u64) -> MachineCounts {
        for _ in 0..n {
            let i = self.done;
            let out = self
                .guest
                .io(&mut *self.dma, &self.dev, i % 2 == 1, i * 256, &mut self.scratch)
                .unwrap();
            assert_eq!((out.status, out.data_ok), (S_OK, true), "I/O {i}");
            self.done += 1;
        }
        self.counts()
    }

    fn counts(&self) -> MachineCounts {
        let c = self.m.counts().since(&self.before);
        assert!(c.kicks <= c.batches());
        c
    }

    /// Flushes the deferred UNMAPs, checks that device and driver agree,
    /// and returns the counts.
    fn finish(mut self) -> MachineCounts {
        self.dma.flush().unwrap();
        let end = self.counts();
        let drv = self.m.driver().counters();
        // The driver's kicks are the transport's, and its requests the device's.
        assert_eq!(drv.kicks, self.m.counts().kicks);
        let dev_counts = self.m.counts();
        assert_eq!((drv.map, drv.unmap), (dev_counts.map_requests, dev_counts.unmap_requests));
        assert_eq!(self.dev.data_errors() + self.dev.dma_faults() + self.dev.dma().faults(), 0);
        let d = self.m.domain().unwrap();
        let device_maps = self.m.iommu().mappings(d.id()).map_or(0, |v| v.len());
        assert_eq!(device_maps, d.mappings().len(), "device and driver agree when quiet");
        assert_eq!(end.timeout_flushes, 0, "the clock did not move");
        end
    }
}

/// `N` block I/Os, then the final flush: (MAPs, UNMAPs, batches).
fn block(mode: Mode, io_size: usize) -> (u64, u64, u64) {
    let mut b = Block::new(mode, io_size);
    b.io(N);
    let c = b.finish();
    (c.map_requests, c.unmap_requests, c.batches())
}

#[test]
fn strict_every_sync_pays_a_kick_per_map_and_per_unmap() {
    assert_eq!(block(Mode::Driver(DriverMode::StrictEverySync), 4096), (3 * N, 3 * N, 6 * N));
    // 64 KiB of scattered pages: 16 data MAPs, each synced on its own.
    assert_eq!(block(Mode::Driver(DriverMode::StrictEverySync), 64 << 10), (18 * N, 3 * N, 21 * N));
}

#[test]
fn strict_syncs_once_per_map_call_and_per_unmap() {
    assert_eq!(block(Mode::Driver(DriverMode::Strict), 64 << 10), (18 * N, 3 * N, 6 * N));
}

#[test]
fn lazy_defers_unmaps_until_a_timeout_and_they_ride_on_the_next_kick() {
    for mode in [Mode::Driver(DriverMode::Lazy), Mode::Driver(DriverMode::LazySingle)] {
        let mut b = Block::new(mode, 4096);
        // One batch per map call; the UNMAPs wait in the flush queue.
        let c = b.io(N);
        assert_eq!((c.map_requests, c.unmap_requests, c.batches()), (3 * N, 0, 3 * N), "{mode}");
        // Past the queue's timeout (10 ms per CPU, 1 s single), the next
        // unmap flushes the queue without a kick of its own...
        b.clock.advance(1_000_000_000);
        let c = b.io(1);
        assert_eq!(c.timeout_flushes, 1, "{mode}");
        assert_eq!((c.map_requests, c.unmap_requests), (3 * (N + 1), 0), "{mode}");
        // ...and its 3N + 1 UNMAPs ride on the next I/O's first kick.
        let c = b.io(1);
        let expect = (3 * (N + 2), 3 * N + 1, 3 * (N + 2));
        assert_eq!((c.map_requests, c.unmap_requests, c.batches()), expect, "{mode}");
        // The final flush: the 5 UNMAPs left, in one batch.
        let end = b.finish_after_timeout();
        assert_eq!((end.unmap_requests, end.batches()), (3 * (N + 2), 3 * (N + 2) + 1), "{mode}");
    }
}

impl Block {
    /// [`Block::finish`] for a run that moved the clock.
    fn finish_after_timeout(mut self) -> MachineCounts {
        self.before.timeout_flushes += 1;
        self.finish()
    }
}

#[test]
fn best_pays_one_kick_per_io_and_coalesces_unmaps() {
    let mut b = Block::new(Mode::Driver(DriverMode::Best), 4096);
    let mid = b.io(N);
    // Header and status share a page: one MAP for both, one for the data;
    // one batch (one kick at most) per I/O, UNMAPs deferred.
    assert_eq!((mid.map_requests, mid.unmap_requests, mid.batches()), (2 * N, 0, N));
    let end = b.finish();
    // The final flush coalesces adjacent freed ranges: fewer UNMAPs than MAPs.
    assert!((1..2 * N).contains(&end.unmap_requests), "{end:?}");
    assert_eq!(end.batches(), N + 1);
    let (maps, _, batches) = block(Mode::Driver(DriverMode::Best), 1 << 20);
    // 1 header/status page + 256 data pages, in one batch per I/O.
    assert_eq!((maps, batches), (257 * N, N + 1));
}

#[test]
fn linux_modes_reproduce_the_linux_guest_counts() {
    // ../shared/linux-baseline.md, Linux 6.12 under QEMU, per virtio-blk
    // request: MAPs = data segments + 3 (header, status, indirect table),
    // one kick per MAP; strict adds one kick per UNMAP.
    assert_eq!(block(Mode::LinuxLazy, 4096), (4 * N, 4 * N, 4 * N + 1));
    assert_eq!(block(Mode::LinuxStrict, 64 << 10), (19 * N, 19 * N, 38 * N));
}

#[test]
fn identity_sends_nothing_per_io() {
    assert_eq!(block(Mode::Driver(DriverMode::Identity), 64 << 10), (0, 0, 0));
}

#[test]
fn net_best_maps_two_buffers_per_page_and_kicks_twice_per_round() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let (m, _clock) = machine(ram.clone(), Mode::Driver(DriverMode::Best));
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
    // 32 TX buffers in 16 pages, then 32 RX buffers in 16 pages: one batch
    // each (full flush queues add UNMAPs to those batches, not batches).
    assert_eq!((c.map_requests, c.batches(), c.timeout_flushes), (32 * N, 2 * N, 0));
    assert!(c.kicks <= c.batches());
    guest.drain(&mut *dma, &mut dev).unwrap();
    dma.flush().unwrap();
    assert_eq!(guest.rx_errors + dev.dropped(), 0);
    assert_eq!(errors.load(std::sync::atomic::Ordering::Relaxed), 0);
}

#[test]
fn four_guest_threads_share_the_domain_and_move_checked_data() {
    for mode in [
        Mode::Driver(DriverMode::Strict),
        Mode::Driver(DriverMode::Lazy),
        Mode::Driver(DriverMode::Best),
    ] {
        let ram = GuestRam::new(64 << 20).unwrap();
        let (m, _clock) = machine(ram.clone(), mode);
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
        let per_io = if mode == Mode::Driver(DriverMode::Best) { 5 } else { 6 };
        assert_eq!(c.map_requests, per_io * 4 * N, "{mode}: {c:?}");
        // Which thread's kick carries whose requests depends on the
        // interleaving; every batch is still made available by a sync.
        assert!(c.kicks <= c.batches() && c.batches() <= c.syncs, "{mode}: {c:?}");
        let d = m.domain().unwrap();
        assert!(d.mappings().is_empty(), "{mode}: everything unmapped");
        assert_eq!(m.iommu().mappings(d.id()).map_or(0, |v| v.len()), 0, "{mode}");
    }
}
