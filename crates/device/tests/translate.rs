//! Translation for the VMM's other device models: bypass modes, MSI and reserved regions,
//! permissions, segments, concurrency with request processing. Listeners: tests/listener.rs.

mod common;
use std::sync::Arc;
use std::thread;

use common::*;
use viommu_device::{Access, DeviceConfig, FaultKind, Iommu, Segment, VirtioIommu};
use viommu_proto::features::{bit, BYPASS, MAP_UNMAP, VERSION_1};
use viommu_proto::*;

fn exec(i: &Iommu, r: Request) -> Status {
    i.execute(&r, &mut [])
}

fn seg(addr: u64, len: u64) -> Segment {
    Segment { addr, len, mmio: false }
}

/// "An endpoint is in bypass mode if ... the endpoint is attached to a domain with
/// VIRTIO_IOMMU_ATTACH_F_BYPASS." "All accesses from an endpoint in bypass mode are allowed
/// and translated by the IOMMU using the identity function."
#[test]
fn bypass_domain_is_identity() {
    let i = Iommu::new(cfg(&[1])).unwrap();
    assert_eq!(exec(&i, attach_flags(1, 1, ATTACH_F_BYPASS)), Status::Ok);
    let t = i.translate(1, 0x1234_5678, 0x100, Access::ReadWrite).unwrap();
    assert_eq!(t.segments(), &[seg(0x1234_5678, 0x100)]);
}

/// "config field bypass is 1 and the endpoint is not attached to a domain. This applies
/// even if the driver does not accept the VIRTIO_IOMMU_F_BYPASS_CONFIG feature and the
/// device initializes field bypass to 1." / "The device SHOULD NOT let unattached endpoints
/// that are not in bypass mode access the guest-physical address space."
#[test]
fn global_bypass_config() {
    let dev = VirtioIommu::new(DeviceConfig { bypass: true, ..cfg(&[1]) }).unwrap();
    let i = dev.iommu();
    assert!(i.translate(1, 0x1000, 8, Access::Read).is_ok());
    i.set_bypass(false);
    assert_eq!(i.translate(1, 0x1000, 8, Access::Read).unwrap_err().kind, FaultKind::NotAttached);
}

/// "the VIRTIO_IOMMU_F_BYPASS feature is negotiated and the endpoint is not attached to a
/// domain."
#[test]
fn legacy_bypass_when_negotiated() {
    let mut c = cfg(&[1]);
    c.features.bypass_config = false;
    c.features.legacy_bypass = true;
    let mut dev = VirtioIommu::new(c).unwrap();
    let i = dev.iommu();
    assert!(i.translate(1, 0x1000, 8, Access::Read).is_err());
    dev.ack_features(bit(VERSION_1) | bit(BYPASS) | bit(MAP_UNMAP));
    assert!(i.translate(1, 0x1000, 8, Access::Read).is_ok());
    // Attached endpoints translate through their domain.
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(i.translate(1, 0x1000, 8, Access::Read).unwrap_err().kind, FaultKind::Unmapped);
}

/// MSI region: identity (the doorbell bypasses translation), even for an attached endpoint;
/// crossing its edge faults. Reserved region: always faults.
#[test]
fn msi_and_reserved_regions() {
    let i = Iommu::new(cfg_with_resv()).unwrap();
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(
        i.translate(1, 0xfee0_1000, 4, Access::Write).unwrap().segments(),
        &[seg(0xfee0_1000, 4)]
    );
    let f = i.translate(1, 0xfeef_fffe, 4, Access::Write).unwrap_err();
    assert_eq!((f.kind, f.address), (FaultKind::Reserved, 0xfeef_fffe));
    i.set_bypass(true);
    let f = i.translate(2, 0x7fff_fff0, 0x20, Access::Read).unwrap_err();
    assert_eq!((f.kind, f.address), (FaultKind::Reserved, 0x8000_0000));
}

/// "The device MUST NOT allow writes to a range mapped without the VIRTIO_IOMMU_MAP_F_WRITE
/// flag." Reads need READ too (write-only mappings are honoured).
#[test]
fn permissions_are_enforced() {
    let i = Iommu::new(cfg(&[1])).unwrap();
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x0000, 0x0fff, 0x10000, MAP_F_READ)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x1000, 0x1fff, 0x20000, MAP_F_WRITE)), Status::Ok);
    assert!(i.translate(1, 0x10, 4, Access::Read).is_ok());
    assert_eq!(i.translate(1, 0x10, 4, Access::Write).unwrap_err().kind, FaultKind::Permission);
    assert!(i.translate(1, 0x1010, 4, Access::Write).is_ok());
    assert_eq!(i.translate(1, 0x1010, 4, Access::Read).unwrap_err().kind, FaultKind::Permission);
    assert_eq!(i.translate(1, 0xff0, 0x20, Access::ReadWrite).unwrap_err().address, 0xff0);
}

/// A range over several mappings gives one segment per physically contiguous run, and
/// faults at the first hole.
#[test]
fn multi_segment_translation() {
    let i = Iommu::new(cfg(&[1])).unwrap();
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x0000, 0x0fff, 0x10000, RW)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x1000, 0x1fff, 0x11000, RW)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x2000, 0x2fff, 0x50000, RW | MAP_F_MMIO)), Status::Ok);
    let t = i.translate(1, 0x800, 0x2000, Access::Read).unwrap();
    assert_eq!(
        t.segments(),
        &[seg(0x10800, 0x1800), Segment { addr: 0x50000, len: 0x800, mmio: true }]
    );
    let f = i.translate(1, 0x2800, 0x1000, Access::Read).unwrap_err();
    assert_eq!((f.kind, f.address), (FaultKind::Unmapped, 0x3000));
    // Zero length, overflow, unknown endpoint.
    assert!(i.translate(1, 0x9999_0000, 0, Access::Read).unwrap().segments().is_empty());
    assert_eq!(i.translate(1, u64::MAX, 2, Access::Read).unwrap_err().kind, FaultKind::Overflow);
    let before = i.counters().faults_raised;
    assert_eq!(i.translate(42, 0, 1, Access::Read).unwrap_err().kind, FaultKind::UnknownEndpoint);
    assert_eq!(i.counters().faults_raised, before, "no event for an unknown endpoint");
}

/// "It is safe to call from many threads while requests are being processed." Readers see
/// either the old or the new state of a mapping, never a torn one: a mapping is valid while
/// it exists and its translation is always exact.
#[test]
fn translate_concurrently_with_map_unmap() {
    let i = Arc::new(Iommu::new(cfg(&[1, 2])).unwrap());
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 2)), Status::Ok);
    // A stable mapping that must always translate.
    assert_eq!(exec(&i, map(1, 0x100_0000, 0x100_ffff, 0x700_0000, RW)), Status::Ok);
    let churn = |_| {
        assert_eq!(exec(&i, map(1, 0x5000, 0x5fff, 0x9000, RW)), Status::Ok);
        assert_eq!(exec(&i, unmap(1, 0x5000, 0x5fff)), Status::Ok);
    };
    let read = |t: usize| {
        let s = i.translate(1 + t as u32 % 2, 0x100_0010, 8, Access::Read).unwrap();
        assert_eq!(s.segments(), &[seg(0x700_0010, 8)]);
        // The churned page: either absent or exactly right.
        if let Ok(s) = i.translate(1, 0x5000, 8, Access::Read) {
            assert_eq!(s.segments(), &[seg(0x9000, 8)]);
        }
    };
    concurrent::overlapped(3, 2000, 16, churn, read);
}

/// Cached translations: after UNMAP, DETACH, ATTACH elsewhere or a bypass change has
/// completed, no thread may still translate through what was removed, including a thread
/// that translated the same address just before.
#[test]
fn no_stale_translation_after_changes() {
    use std::sync::mpsc;
    let i = Arc::new(Iommu::new(cfg(&[1, 2])).unwrap());
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x5000, 0x5fff, 0x9000, RW)), Status::Ok);
    let (to_reader, rx) = mpsc::channel::<Option<u64>>();
    let (tx, from_reader) = mpsc::channel::<Option<u64>>();
    let reader = {
        let i = i.clone();
        thread::spawn(move || {
            // Each message: "translate now", answered with what the reader sees.
            while let Ok(Some(iova)) = rx.recv() {
                let r = i.translate(1, iova, 8, Access::Read).ok().map(|t| t.segments()[0].addr);
                tx.send(r).unwrap();
            }
        })
    };
    let ask = |iova| {
        to_reader.send(Some(iova)).unwrap();
        from_reader.recv().unwrap()
    };
    assert_eq!(ask(0x5010), Some(0x9010));
    assert_eq!(ask(0x5010), Some(0x9010)); // now cached in the reader
    assert_eq!(exec(&i, unmap(1, 0x5000, 0x5fff)), Status::Ok);
    assert_eq!(ask(0x5010), None);
    assert_eq!(exec(&i, map(1, 0x5000, 0x5fff, 0x7000, RW)), Status::Ok);
    assert_eq!(ask(0x5010), Some(0x7010));
    assert_eq!(exec(&i, detach(1, 1)), Status::Ok);
    assert_eq!(ask(0x5010), None);
    i.set_bypass(true);
    assert_eq!(ask(0x5010), Some(0x5010));
    assert_eq!(ask(0x5010), Some(0x5010)); // cached identity
    assert_eq!(exec(&i, attach(2, 1)), Status::Ok);
    assert_eq!(ask(0x5010), None, "attached to an empty domain");
    assert_eq!(exec(&i, detach(2, 1)), Status::Ok);
    assert_eq!(ask(0x5010), Some(0x5010));
    i.set_bypass(false);
    assert_eq!(ask(0x5010), None);
    // The same checks in this thread.
    assert_eq!(exec(&i, attach(3, 1)), Status::Ok);
    assert_eq!(exec(&i, map(3, 0x5000, 0x5fff, 0x3000, RW)), Status::Ok);
    assert_eq!(i.translate(1, 0x5000, 4, Access::Read).unwrap().segments()[0].addr, 0x3000);
    assert_eq!(exec(&i, unmap(3, 0, u64::MAX)), Status::Ok);
    assert!(i.translate(1, 0x5000, 4, Access::Read).is_err());
    to_reader.send(None).unwrap();
    reader.join().unwrap();
}

/// "behave as if the driver issued a DETACH request ... followed by the ATTACH request", but
/// without a window: an endpoint moving between domains while global bypass is on is never
/// seen unattached (which would be identity-mapped) by a concurrent translation.
#[test]
fn moving_endpoint_never_bypasses() {
    let i = Arc::new(Iommu::new(DeviceConfig { bypass: true, ..cfg(&[1, 2]) }).unwrap());
    assert_eq!(exec(&i, attach(1, 2)), Status::Ok);
    assert_eq!(exec(&i, attach(2, 2)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    let step = |k: u64| assert_eq!(exec(&i, attach(1 + k as u32 % 2, 1)), Status::Ok);
    let read = |_| assert!(i.translate(1, 0x9000, 8, Access::Read).is_err(), "bypassed");
    // The reader saw the endpoint between at least 16 different pairs of moves.
    concurrent::overlapped(1, 4000, 16, step, read);
}

/// Two IOMMU instances never share cached translations.
#[test]
fn instances_do_not_share_cached_translations() {
    let a = Iommu::new(cfg(&[1])).unwrap();
    let b = Iommu::new(cfg(&[1])).unwrap();
    for (i, phys) in [(&a, 0x1000), (&b, 0x2000)] {
        assert_eq!(exec(i, attach(1, 1)), Status::Ok);
        assert_eq!(exec(i, map(1, 0, 0xfff, phys, RW)), Status::Ok);
    }
    assert_eq!(a.translate(1, 0x10, 4, Access::Read).unwrap().segments()[0].addr, 0x1010);
    assert_eq!(b.translate(1, 0x10, 4, Access::Read).unwrap().segments()[0].addr, 0x2010);
    assert_eq!(a.translate(1, 0x10, 4, Access::Read).unwrap().segments()[0].addr, 0x1010);
}
