//! Every benchmark mode moves checked data, with exact request counts.
//! Cells run for a wall-clock time, so how many I/Os they do, and how many
//! kicks the flush timer and EVENT_IDX add or save, depend on the machine's
//! load: the assertions hold for any number of I/Os and any interleaving.

use std::time::Duration;

use viommu_vm::bench::{run_cell, CellResult, CellSpec, DriverMode, Mode, Workload};

fn cell(mode: Mode, workload: Workload, io_size: usize, threads: usize) -> CellResult {
    let spec = CellSpec {
        mode,
        workload,
        io_size,
        threads,
        duration: Duration::from_millis(30),
        exit_cost: Duration::ZERO,
    };
    let r = run_cell(&spec).unwrap_or_else(|e| panic!("{mode} {workload}: {e}"));
    assert!(r.ios > 0, "{mode}: no I/O done");
    assert_eq!((r.data_errors, r.faults), (0, 0), "{mode} {workload}: {r:?}");
    r
}

#[test]
fn no_iommu_and_identity_send_no_map_requests() {
    for mode in [Mode::NoIommu, Mode::Driver(DriverMode::Identity)] {
        for w in [Workload::Block, Workload::Net] {
            let size = if w == Workload::Block { 64 << 10 } else { 1500 };
            let r = cell(mode, w, size, 2);
            assert_eq!((r.map_requests, r.unmap_requests, r.kicks), (0, 0, 0), "{mode}");
        }
    }
    let none = cell(Mode::NoIommu, Workload::Block, 4096, 1);
    assert_eq!(none.translations, 0);
    let id = cell(Mode::Driver(DriverMode::Identity), Workload::Block, 4096, 1);
    assert!(id.translations >= 3 * id.ios, "header, data and status are translated");
}

#[test]
fn every_mode_runs_both_workloads_with_checked_data() {
    for mode in Mode::ALL.into_iter().chain(Mode::EXTRA) {
        let b = cell(mode, Workload::Block, 4096, 2);
        let n = cell(mode, Workload::Net, 1500, 1);
        if !matches!(mode, Mode::NoIommu | Mode::Driver(DriverMode::Identity)) {
            // Every MAP gets its UNMAP by the end (the final flush included),
            // unless coalescing merged UNMAPs.
            assert!(b.map_requests > 0 && n.map_requests > 0, "{mode}");
            // Every kick belongs to a sync (a 4 KiB I/O never fills the ring).
            assert!(b.kicks <= b.syncs && n.kicks <= n.syncs, "{mode}: {b:?} {n:?}");
            if mode == Mode::Driver(DriverMode::Best) {
                assert!(b.unmap_requests < b.map_requests, "{mode}: coalesced");
                // One batch per I/O: header+status page and data page.
                assert_eq!(b.map_requests, 2 * b.ios, "{mode}");
            } else {
                assert_eq!(b.unmap_requests, b.map_requests, "{mode}");
            }
            assert!(b.translations >= 3 * b.ios, "{mode}");
        }
    }
}

#[test]
fn cells_report_cpu_per_side_and_every_interrupt() {
    let strict = cell(Mode::Driver(DriverMode::Strict), Workload::Block, 4096, 1);
    // Guest threads and the I/O thread both ran; their CPU clocks say so.
    assert!(strict.guest.cpu.unwrap() > Duration::ZERO, "{strict:?}");
    assert!(strict.device.cpu.unwrap() > Duration::ZERO, "{strict:?}");
    assert!(strict.cpu_ns_per_io().unwrap() > 0.0);
    // Polling is part of each side's CPU time and is reported apart.
    assert!(strict.guest_poll <= strict.guest.cpu.unwrap() + strict.elapsed);
    // Waiting and signalling run in brackets on both sides: part of each
    // side's CPU time, left out of its work.
    assert!(strict.guest.brackets >= strict.kicks && strict.device.brackets > 0, "{strict:?}");
    let slack = Duration::from_millis(1);
    for side in [&strict.guest, &strict.device] {
        assert!(side.waiting > Duration::ZERO, "{strict:?}");
        assert!(side.waiting <= side.cpu.unwrap() + slack, "{strict:?}");
        assert!(side.work().unwrap() < side.cpu.unwrap(), "{strict:?}");
    }
    // Every sync waits for one completion: at most one interrupt per kick.
    assert!(strict.interrupts > 0 && strict.interrupts <= strict.kicks, "{strict:?}");
    // Without an IOMMU there is no device side at all.
    let none = cell(Mode::NoIommu, Workload::Block, 4096, 1);
    assert_eq!(none.device.cpu, Some(Duration::ZERO));
    assert_eq!((none.interrupts, none.device_poll), (0, Duration::ZERO));
    assert_eq!((none.guest.brackets, none.waiting_ns_per_io()), (0, 0.0));
    assert!(none.guest.cpu.unwrap() > Duration::ZERO);
    // Instructions are counted on both sides or on neither.
    assert_eq!(strict.guest.instructions.is_some(), strict.device.instructions.is_some());
}
