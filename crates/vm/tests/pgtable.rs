//! Page-table mode (drafts, issue #15) end to end in the in-process VM: our
//! driver writes format-3 tables in guest RAM, the device walks them on its
//! I/O thread, block and net endpoints move checked data through them.
//! Counts are exact: no timer thread, a clock that stands still.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_device::Access;
use viommu_proto::RequestType;
use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::endpoint::block::{BlockDevice, BlockGuest, S_OK};
use viommu_vm::endpoint::net::{NetDevice, NetGuest};
use viommu_vm::endpoint::{DmaEngine, GuestDma};
use viommu_vm::machine::{device_config, Machine, MachineCounts, MachineOptions};
use viommu_vm::GuestRam;

const EP: u32 = 8;
const STRICT: Mode = Mode::Driver(DriverMode::PgtableStrict);
const LAZY: Mode = Mode::Driver(DriverMode::PgtableLazy);

struct Run {
    /// Counts since the machine came up, and the device's INVALIDATEs.
    counts: MachineCounts,
    invalidates: u64,
    ios: u64,
}

/// `n` block I/Os of `io_size` bytes with checked data, then the final flush.
fn block(mode: Mode, io_size: usize, n: u64) -> Run {
    let ram = GuestRam::new(32 << 20).unwrap();
    let m = Machine::with_options(
        ram.clone(),
        device_config(EP),
        EP,
        mode,
        MachineOptions::deterministic(),
    )
    .unwrap();
    let d = m.domain().unwrap();
    assert!(d.uses_page_table(), "{mode}");
    let dev = BlockDevice::new(Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP)));
    let mut guest = BlockGuest::new(ram, io_size).unwrap();
    let mut dma: Box<dyn GuestDma + Send> = m.guest_dma();
    let before = m.counts();
    let inv = || m.iommu().counters().requests_of(RequestType::Invalidate);
    let inv_before = inv();
    let mut scratch = Vec::new();
    for i in 0..n {
        let out = guest.io(&mut *dma, &dev, i % 2 == 1, i * 256, &mut scratch).unwrap();
        assert_eq!((out.status, out.data_ok), (S_OK, true), "{mode} I/O {i}");
    }
    dma.flush().unwrap();
    assert_eq!(dev.data_errors() + dev.dma_faults() + dev.dma().faults(), 0, "{mode}");
    let counts = m.counts().since(&before);
    assert!(counts.kicks <= counts.batches());
    // Quiet: nothing the guest unmapped is left in the table.
    assert!(d.mappings().is_empty(), "{mode}: {:?}", d.mappings());
    let (_, unfreed) = d.page_table_pages().unwrap();
    assert_eq!(unfreed, 0, "{mode}: every emptied table freed after its INVALIDATE");
    let invalidates = inv() - inv_before;
    drop(dma);
    Run { counts, invalidates, ios: n }
}

/// Strict: no MAP or UNMAP at all, one INVALIDATE and one kick per I/O,
/// whatever the size (4 KiB, 64 KiB and 1 MiB of scattered pages).
#[test]
fn pgtable_strict_is_one_invalidate_and_one_kick_per_io() {
    for size in [4 << 10, 64 << 10, 1 << 20] {
        let r = block(STRICT, size, 12);
        let c = r.counts;
        assert_eq!((c.map_requests, c.unmap_requests), (0, 0), "{size}");
        assert_eq!((r.invalidates, c.requests, c.batches()), (r.ios, r.ios, r.ios), "{size}");
    }
}

/// Lazy: the INVALIDATEs wait for a full flush queue (256 allocations, two
/// per I/O: header+status page, data); each flush is one INVALIDATE and one
/// kick, so 300 I/Os cost 2 flushes plus the final one (0.01 per I/O), and
/// 130 I/Os of 1 MiB one flush plus the final one.
#[test]
fn pgtable_lazy_is_one_invalidate_per_flush() {
    for (size, n, flushes) in [(4 << 10, 300, 3), (1 << 20, 130, 2)] {
        let r = block(LAZY, size, n);
        let c = r.counts;
        assert_eq!((c.map_requests, c.unmap_requests), (0, 0), "{size}");
        assert_eq!((r.invalidates, c.batches()), (flushes, flushes), "{size}");
    }
}

/// Strict means strict in table mode too: once an unmap returned, the
/// device finds nothing at the IOVA, even if it had translated it before.
#[test]
fn pgtable_strict_unmap_ends_access() {
    let ram = GuestRam::new(8 << 20).unwrap();
    let opts = MachineOptions::deterministic();
    let m = Machine::with_options(ram, device_config(EP), EP, STRICT, opts).unwrap();
    let dma = m.dma().unwrap();
    let iova = dma.map_single(0x20_0000, 0x3000, viommu_driver::DmaDirection::FromDevice).unwrap();
    let iommu = m.iommu();
    let t = iommu.translate(EP, iova + 0x1008, 8, Access::Write).unwrap();
    assert_eq!(t.contiguous().unwrap().addr, 0x20_1008);
    drop(t);
    assert!(iommu.translate(EP, iova, 8, Access::Read).is_err(), "write-only");
    dma.unmap_single(iova, 0x3000, viommu_driver::DmaDirection::FromDevice).unwrap();
    assert!(iommu.translate(EP, iova + 0x1008, 8, Access::Write).is_err());
    assert_eq!(m.counts().map_requests, 0);
}

/// The net endpoint in both table modes: every packet checked, no MAP.
#[test]
fn pgtable_net_moves_checked_packets() {
    for mode in [STRICT, LAZY] {
        let ram = GuestRam::new(16 << 20).unwrap();
        let opts = MachineOptions::deterministic();
        let m = Machine::with_options(ram.clone(), device_config(EP), EP, mode, opts).unwrap();
        let errors = Arc::new(AtomicU64::new(0));
        let engine = Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP));
        let mut dev = NetDevice::new(engine, errors.clone());
        let mut guest = NetGuest::new(ram, 32, 1500).unwrap();
        let mut dma = m.guest_dma();
        guest.fill_rx(&mut *dma, &mut dev).unwrap();
        for _ in 0..8 {
            assert_eq!(guest.round(&mut *dma, &mut dev).unwrap(), 32, "{mode}");
        }
        guest.drain(&mut *dma, &mut dev).unwrap();
        dma.flush().unwrap();
        assert_eq!(guest.rx_errors + dev.dropped(), 0, "{mode}");
        assert_eq!(errors.load(Ordering::Relaxed), 0, "{mode}");
        assert_eq!(m.counts().map_requests, 0, "{mode}");
    }
}
