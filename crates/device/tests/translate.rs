//! Translation for the VMM's other device models: bypass modes, MSI and reserved regions,
//! permissions, segments, concurrency with request processing; and listeners.

mod common;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use common::*;
use viommu_device::{
    Access, DeviceConfig, FaultKind, Iommu, Listener, ListenerError, Mapping, Segment, VirtioIommu,
};
use viommu_proto::features::{bit, BYPASS, MAP_UNMAP, VERSION_1};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};

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
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|t| {
            let (i, stop) = (i.clone(), stop.clone());
            thread::spawn(move || {
                let mut hits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let s = i.translate(1 + t % 2, 0x100_0010, 8, Access::Read).unwrap();
                    assert_eq!(s.segments(), &[seg(0x700_0010, 8)]);
                    // The churned page: either absent or exactly right.
                    if let Ok(s) = i.translate(1, 0x5000, 8, Access::Read) {
                        assert_eq!(s.segments(), &[seg(0x9000, 8)]);
                        hits += 1;
                    }
                }
                hits
            })
        })
        .collect();
    for _ in 0..2000 {
        assert_eq!(exec(&i, map(1, 0x5000, 0x5fff, 0x9000, RW)), Status::Ok);
        assert_eq!(exec(&i, unmap(1, 0x5000, 0x5fff)), Status::Ok);
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
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
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (i, stop) = (i.clone(), stop.clone());
        thread::spawn(move || {
            let mut tries = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert!(i.translate(1, 0x9000, 8, Access::Read).is_err(), "bypassed while moving");
                tries += 1;
            }
            tries
        })
    };
    for k in 0..4000u32 {
        assert_eq!(exec(&i, attach(1 + k % 2, 1)), Status::Ok);
    }
    stop.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
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

// ---- listeners --------------------------------------------------------------------------

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Listener for Log {
    fn on_attach(&self, endpoint: u32, domain: u32, bypass: bool) {
        self.0.lock().unwrap().push(format!("attach {endpoint} {domain} {bypass}"));
    }
    fn on_detach(&self, endpoint: u32, domain: u32) {
        self.0.lock().unwrap().push(format!("detach {endpoint} {domain}"));
    }
    fn on_map(&self, endpoint: u32, m: &Mapping) -> Result<(), ListenerError> {
        self.0.lock().unwrap().push(format!("map {endpoint} {:#x}", m.start));
        // A back-end that cannot pin the page at 0xbad000 for endpoint 2.
        if endpoint == 2 && m.start == 0xbad000 {
            return Err(ListenerError::NoMem);
        }
        Ok(())
    }
    fn on_unmap(&self, endpoint: u32, m: &Mapping) {
        self.0.lock().unwrap().push(format!("unmap {endpoint} {:#x}", m.start));
    }
}

impl Log {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// Listeners hear every change per endpoint; joining a domain replays its mappings.
#[test]
fn listener_follows_per_endpoint() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let log = Arc::new(Log::default());
    dev.set_listener(log.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x2000, 0x2fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &unmap(1, 0, 0xffff)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(2, 1)), Status::Ok);
    assert_eq!(
        log.take(),
        [
            "attach 1 1 false",
            "map 1 0x1000",
            "attach 2 1 false",
            "map 2 0x1000",
            "map 1 0x2000",
            "map 2 0x2000",
            "unmap 1 0x1000",
            "unmap 2 0x1000",
            "unmap 1 0x2000",
            "unmap 2 0x2000",
            "detach 1 1",
            "attach 1 2 false",
        ]
    );
    dev.reset();
    assert_eq!(log.take(), ["detach 1 2", "detach 2 1"]);
}

/// A back-end that refuses a mapping fails the MAP (its status), the endpoints already
/// told get `on_unmap`, and the mapping never becomes visible; a refused replay fails the
/// ATTACH and leaves the endpoint detached.
#[test]
fn listener_refusal_fails_the_request() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2, 3]));
    let log = Arc::new(Log::default());
    dev.set_listener(log.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    log.take();
    assert_eq!(drv.request(&mut dev, &map(1, 0xbad000, 0xbadfff, 0, RW)), Status::NoMem);
    assert_eq!(log.take(), ["map 1 0xbad000", "map 2 0xbad000", "unmap 1 0xbad000"]);
    let iommu = dev.iommu();
    assert_eq!(iommu.mappings(1), Some(vec![]));
    assert!(iommu.translate(1, 0xbad000, 4, Access::Read).is_err());
    // Replay on ATTACH: endpoint 2 joins a domain holding the page it refuses.
    assert_eq!(drv.request(&mut dev, &attach(2, 3)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(2, 0xbad000, 0xbadfff, 0, RW)), Status::Ok);
    log.take();
    assert_eq!(drv.request(&mut dev, &attach(2, 2)), Status::NoMem);
    assert_eq!(log.take(), ["detach 2 1", "attach 2 2 false", "map 2 0xbad000", "detach 2 2"]);
    assert_eq!(iommu.endpoint_domain(2), None);
    assert_eq!(iommu.mappings(2).unwrap().len(), 1, "domain 2 keeps endpoint 3 and its mapping");
}

/// "An UNMAP completes only after its listeners have returned": when on_unmap runs, the
/// used ring has not advanced yet, and translate already misses.
#[test]
fn unmap_completes_after_listener_returns() {
    struct Check {
        mem: Mem,
        used_idx_addr: u64,
        seen: Mutex<Vec<u16>>,
        iommu: Mutex<Option<Arc<Iommu>>>,
    }
    impl Listener for Check {
        fn on_unmap(&self, endpoint: u32, m: &Mapping) {
            let idx: u16 = self.mem.read_obj(GuestAddress(self.used_idx_addr)).unwrap();
            self.seen.lock().unwrap().push(idx);
            let i = self.iommu.lock().unwrap().clone().unwrap();
            assert!(i.translate(endpoint, m.start, 1, Access::Read).is_err());
        }
    }
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let check = Arc::new(Check {
        mem: mem.clone(),
        used_idx_addr: drv.rq.used_addr().0 + 2,
        seen: Mutex::new(vec![]),
        iommu: Mutex::new(Some(dev.iommu())),
    });
    dev.set_listener(check.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &unmap(1, 0x1000, 0x1fff)), Status::Ok);
    assert_eq!(*check.seen.lock().unwrap(), vec![2]);
}
