//! The driver and the device joined through the in-process VM: real split
//! virtqueues in guest RAM, the device on its own I/O thread. These are also
//! the driver's tests against the real device.
//!
//! Kicks are counted as batches made available (`kicks + kicks_suppressed`):
//! whether EVENT_IDX spares a kick depends on the I/O thread's progress.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use viommu_device::{Access, FaultKind};
use viommu_driver::{FaultRecord, Prot, ResvKind, Transport};
use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::machine::{device_config, Machine, MachineOptions, MSI_REGION};
use viommu_vm::GuestRam;

const EP: u32 = 8;

fn machine(mode: Mode) -> Machine {
    let ram = GuestRam::new(16 << 20).unwrap();
    let opts = MachineOptions::deterministic();
    Machine::with_options(ram, device_config(EP), EP, mode, opts).unwrap()
}

#[test]
fn probe_reports_the_msi_region() {
    let m = machine(Mode::NoIommu);
    let regions = m.driver().probe_endpoint(EP).unwrap();
    assert!(regions.iter().any(|r| r.kind == ResvKind::Msi && (r.start, r.end) == MSI_REGION));
    assert!(m.driver().probe_endpoint(99).is_err(), "unknown endpoint is NOENT");
}

#[test]
fn map_translate_unmap_round_trip() {
    let m = machine(Mode::Driver(DriverMode::Strict));
    let d = m.domain().unwrap();
    let iommu = m.iommu();
    assert_eq!(iommu.endpoint_domain(EP), Some(d.id()));

    let before = m.counts();
    d.map_pages(0x10_0000, 0x20_0000, 0x2000, Prot::READ | Prot::WRITE).unwrap();
    d.iotlb_sync_map(0x10_0000, 0x2000).unwrap();
    let c = m.counts().since(&before);
    assert_eq!((c.map_requests, c.batches()), (1, 1), "one MAP, one kick");
    let maps = iommu.mappings(d.id()).unwrap();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].start, maps[0].end, maps[0].phys), (0x10_0000, 0x10_1fff, 0x20_0000));

    let t = iommu.translate(EP, 0x10_0ff0, 0x20, Access::Write).unwrap();
    assert_eq!(t.contiguous().unwrap().addr, 0x20_0ff0);
    // The lease goes before the UNMAP, which waits for it.
    drop(t);

    assert_eq!(d.unmap_pages(0x10_0000, 0x2000).unwrap(), 0x2000);
    d.iotlb_sync().unwrap();
    let c = m.counts().since(&before);
    assert_eq!((c.unmap_requests, c.batches()), (1, 2));
    assert!(c.kicks <= 2);
    assert!(iommu.mappings(d.id()).unwrap().is_empty());
    let f = iommu.translate(EP, 0x10_0000, 8, Access::Read).unwrap_err();
    assert_eq!(f.kind, FaultKind::Unmapped);
}

#[test]
fn a_failed_translation_reaches_the_driver_as_a_fault_record() {
    let m = machine(Mode::Driver(DriverMode::Strict));
    let seen: Arc<Mutex<Vec<FaultRecord>>> = Arc::default();
    let sink = seen.clone();
    m.driver().set_fault_handler(Some(Box::new(move |r| sink.lock().unwrap().push(r))));
    let d = m.domain().unwrap();
    d.map_pages(0x4000, 0x8000, 0x1000, Prot::READ).unwrap();
    d.iotlb_sync_map(0x4000, 0x1000).unwrap();
    // A write through a read-only mapping.
    let f = m.iommu().translate(EP, 0x4010, 4, Access::Write).unwrap_err();
    assert_eq!(f.kind, FaultKind::Permission);
    // The I/O thread delivers the event asynchronously: poll until it lands
    // (the bound only ends a hang).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        m.driver().poll_events().unwrap();
        std::thread::sleep(Duration::from_millis(1));
    }
    let recs = seen.lock().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0].endpoint, EP);
    assert_eq!(recs[0].address, Some(0x4010));
    assert_eq!(recs[0].reason, viommu_proto::fault::R_MAPPING);
    assert_ne!(recs[0].flags & viommu_proto::fault::F_WRITE, 0);
}

#[test]
fn identity_domain_translates_one_to_one_without_maps() {
    let m = machine(Mode::Driver(DriverMode::Identity));
    let c = m.counts();
    assert_eq!(c.map_requests, 0, "bypass ATTACH needs no MAP");
    let iommu = m.iommu();
    let t = iommu.translate(EP, 0x12_3000, 0x1000, Access::ReadWrite).unwrap();
    assert_eq!(t.contiguous().unwrap().addr, 0x12_3000);
}

#[test]
fn detach_blocks_dma_again() {
    let m = machine(Mode::Driver(DriverMode::Strict));
    let d = m.domain().unwrap();
    d.map_pages(0x4000, 0x8000, 0x1000, Prot::READ).unwrap();
    d.iotlb_sync_map(0x4000, 0x1000).unwrap();
    assert!(m.iommu().translate(EP, 0x4000, 8, Access::Read).is_ok());
    m.driver().detach(EP).unwrap();
    assert_eq!(m.iommu().endpoint_domain(EP), None);
    let f = m.iommu().translate(EP, 0x4000, 8, Access::Read).unwrap_err();
    assert_eq!(f.kind, FaultKind::NotAttached);
    // Re-attach replays the driver's tree in one batch.
    let before = m.counts();
    m.driver().attach(d, EP).unwrap();
    let c = m.counts().since(&before);
    assert_eq!((c.map_requests, c.batches()), (1, 1), "ATTACH + replayed MAP, one kick");
    assert!(m.iommu().translate(EP, 0x4000, 8, Access::Read).is_ok());
}

#[test]
fn exit_cost_is_charged_per_kick_and_reported_apart() {
    let m = machine(Mode::Driver(DriverMode::Strict));
    m.exit_cost().set_per_kick(Duration::from_micros(200));
    let d = m.domain().unwrap();
    let before = m.counts();
    for i in 0..5u64 {
        d.map_pages(0x10_0000 + i * 0x1000, 0x20_0000, 0x1000, Prot::READ).unwrap();
        d.iotlb_sync_map(0x10_0000 + i * 0x1000, 0x1000).unwrap();
    }
    let c = m.counts().since(&before);
    assert_eq!(c.batches(), 5);
    // Each kick made spins 200 us in the kicking thread, counted apart.
    let injected = Duration::from_nanos(c.exit_injected_ns);
    assert!(injected >= Duration::from_micros(200) * c.kicks as u32, "{c:?}: {injected:?}");
    // A kick that certainly happens: the transport's own notify.
    m.link().transport().notify(0);
    let c2 = m.counts().since(&before);
    assert_eq!(c2.kicks, c.kicks + 1);
    let more = Duration::from_nanos(c2.exit_injected_ns - c.exit_injected_ns);
    assert!(more >= Duration::from_micros(200), "{more:?}");
}
