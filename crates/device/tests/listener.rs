//! The listener contract (docs/device.md, "Listener contract"): every listener in order,
//! one unmap call per request and endpoint, bypass and reset events before the change is
//! reported done, and the non-faulting lookup.

mod common;
use std::sync::{Arc, Mutex};

use common::*;
use viommu_device::{
    Access, DeviceConfig, Iommu, Listener, ListenerError, Mapping, Permissions, VirtioIommu, Window,
};
use viommu_proto::features::{bit, BYPASS, MAP_UNMAP, VERSION_1};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};

/// Logs every call as a line, prefixed with its name when several listeners share a log.
struct Log {
    name: &'static str,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn new() -> Arc<Self> {
        Self::named("", Arc::default())
    }
    fn named(name: &'static str, lines: Arc<Mutex<Vec<String>>>) -> Arc<Self> {
        Arc::new(Self { name, lines })
    }
    fn push(&self, line: String) {
        self.lines.lock().unwrap().push(format!("{}{line}", self.name));
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut self.lines.lock().unwrap())
    }
}

impl Listener for Log {
    fn on_attach(&self, endpoint: u32, domain: u32, bypass: bool) {
        self.push(format!("attach {endpoint} {domain} {bypass}"));
    }
    fn on_detach(&self, endpoint: u32, domain: u32) {
        self.push(format!("detach {endpoint} {domain}"));
    }
    fn on_map(&self, endpoint: u32, m: &Mapping) -> Result<(), ListenerError> {
        self.push(format!("map {endpoint} {:#x}", m.start));
        // A back-end that cannot pin the page at 0xbad000 for endpoint 2 (listener "a" can).
        if endpoint == 2 && m.start == 0xbad000 && self.name != "a: " {
            return Err(ListenerError::NoMem);
        }
        Ok(())
    }
    fn on_unmap(&self, endpoint: u32, start: u64, end: u64, removed: &[Mapping]) {
        let starts: Vec<String> = removed.iter().map(|m| format!("{:#x}", m.start)).collect();
        self.push(format!("unmap {endpoint} [{start:#x}, {end:#x}] {}", starts.join(",")));
    }
    fn on_bypass(&self, on: bool) {
        self.push(format!("bypass {on}"));
    }
    fn on_reset(&self) {
        self.push("reset".into());
    }
}

/// Listeners hear every change per endpoint; joining a domain replays its mappings; one
/// UNMAP is one call per endpoint, with its range and what it removed.
#[test]
fn listener_follows_per_endpoint() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let log = Log::new();
    dev.add_listener(log.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x2000, 0x2fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &unmap(1, 0, 0xffff)), Status::Ok);
    // Nothing removed, nothing told.
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
            "unmap 1 [0x0, 0xffff] 0x1000,0x2000",
            "unmap 2 [0x0, 0xffff] 0x1000,0x2000",
            "detach 1 1",
            "attach 1 2 false",
        ]
    );
    dev.reset();
    assert_eq!(log.take(), ["detach 1 2", "detach 2 1", "reset"]);
}

/// "One unmap call per UNMAP request per endpoint": an UNMAP [0, 2^64-1] over 1000
/// mappings on two endpoints is two calls, each carrying all 1000 in address order.
#[test]
fn one_unmap_call_per_request_and_endpoint() {
    type Call = (u32, u64, u64, Vec<Mapping>);
    #[derive(Default)]
    struct Count(Mutex<Vec<Call>>);
    impl Listener for Count {
        fn on_unmap(&self, endpoint: u32, start: u64, end: u64, removed: &[Mapping]) {
            self.0.lock().unwrap().push((endpoint, start, end, removed.to_vec()));
        }
    }
    let i = Iommu::new(cfg(&[1, 2])).unwrap();
    let count = Arc::new(Count::default());
    i.add_listener(count.clone());
    assert_eq!(i.execute(&attach(1, 1), &mut []), Status::Ok);
    assert_eq!(i.execute(&attach(1, 2), &mut []), Status::Ok);
    // Reverse MAP order: the call still lists them by address.
    for k in (0..1000u64).rev() {
        assert_eq!(
            i.execute(&map(1, k << 13, (k << 13) + 0xfff, k << 12, RW), &mut []),
            Status::Ok
        );
    }
    assert_eq!(i.execute(&unmap(1, 0, u64::MAX), &mut []), Status::Ok);
    let calls = std::mem::take(&mut *count.0.lock().unwrap());
    assert_eq!(calls.len(), 2);
    for (n, (e, start, end, removed)) in calls.into_iter().enumerate() {
        assert_eq!((e, start, end), (n as u32 + 1, 0, u64::MAX));
        let want: Vec<u64> = (0..1000u64).map(|k| k << 13).collect();
        assert_eq!(removed.iter().map(|m| m.start).collect::<Vec<_>>(), want);
        assert!(removed.iter().all(|m| m.end == m.start + 0xfff && m.phys == m.start >> 1));
    }
}

/// Any number of listeners, each told everything, in registration order; a removed one
/// hears nothing more; a refusal by the second is undone for the first too.
#[test]
fn every_listener_is_told_in_registration_order() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let lines = Arc::new(Mutex::new(vec![]));
    let (a, b) = (Log::named("a: ", lines.clone()), Log::named("b: ", lines.clone()));
    let iommu = dev.iommu();
    let ida = iommu.add_listener(a.clone());
    iommu.add_listener(b.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0xbad000, 0xbadfff, 0, RW)), Status::NoMem);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(
        a.take(),
        [
            "a: attach 1 1 false",
            "b: attach 1 1 false",
            "a: attach 2 1 false",
            "b: attach 2 1 false",
            "a: map 1 0xbad000",
            "b: map 1 0xbad000",
            "a: map 2 0xbad000",
            "b: map 2 0xbad000",
            "a: unmap 1 [0xbad000, 0xbadfff] 0xbad000",
            "b: unmap 1 [0xbad000, 0xbadfff] 0xbad000",
            "a: unmap 2 [0xbad000, 0xbadfff] 0xbad000",
            "a: map 1 0x1000",
            "b: map 1 0x1000",
            "a: map 2 0x1000",
            "b: map 2 0x1000",
        ]
    );
    assert!(iommu.remove_listener(ida));
    assert!(!iommu.remove_listener(ida));
    assert_eq!(drv.request(&mut dev, &detach(1, 1)), Status::Ok);
    assert_eq!(a.take(), ["b: detach 1 1"]);
}

/// A back-end that refuses a mapping fails the MAP (its status), the endpoints already
/// told get `on_unmap`, and the mapping never becomes visible; a refused replay fails the
/// ATTACH and leaves the endpoint detached.
#[test]
fn listener_refusal_fails_the_request() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2, 3]));
    let log = Log::new();
    dev.add_listener(log.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    log.take();
    assert_eq!(drv.request(&mut dev, &map(1, 0xbad000, 0xbadfff, 0, RW)), Status::NoMem);
    assert_eq!(
        log.take(),
        ["map 1 0xbad000", "map 2 0xbad000", "unmap 1 [0xbad000, 0xbadfff] 0xbad000"]
    );
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

/// Records, at each call, the request queue's used index and what `lookup` answers then.
struct Witness {
    mem: Mem,
    used_idx_addr: u64,
    iommu: Arc<Iommu>,
    /// (event, used index, lookup of endpoint `probe.0` at `probe.1` found something)
    seen: Mutex<Vec<(String, u16, bool)>>,
    probe: (u32, u64),
}

impl Witness {
    fn new(drv: &Driver, dev: &VirtioIommu, probe: (u32, u64)) -> Arc<Self> {
        Arc::new(Self {
            mem: drv.mem.clone(),
            used_idx_addr: drv.rq.used_idx_addr(),
            iommu: dev.iommu(),
            seen: Mutex::new(vec![]),
            probe,
        })
    }
    fn record(&self, event: &str) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.used_idx_addr)).unwrap();
        let found = self.iommu.lookup(self.probe.0, self.probe.1).is_some();
        self.seen.lock().unwrap().push((event.into(), idx, found));
    }
    fn take(&self) -> Vec<(String, u16, bool)> {
        std::mem::take(&mut self.seen.lock().unwrap())
    }
}

impl Listener for Witness {
    fn on_unmap(&self, endpoint: u32, start: u64, _: u64, _: &[Mapping]) {
        self.record("unmap");
        // Translating from a listener is allowed, and misses already.
        assert!(self.iommu.translate(endpoint, start, 1, Access::Read).is_err());
    }
    fn on_detach(&self, _: u32, _: u32) {
        self.record("detach");
    }
    fn on_bypass(&self, on: bool) {
        self.record(&format!("bypass {on}"));
    }
    fn on_reset(&self) {
        self.record("reset");
    }
}

/// "An UNMAP completes only after its listeners have returned": when on_unmap runs, the
/// used ring has not advanced yet, and lookup and translate already miss. Same for DETACH.
#[test]
fn unmap_and_detach_are_told_before_the_used_entry() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let w = Witness::new(&drv, &dev, (1, 0x1000));
    dev.add_listener(w.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &unmap(1, 0x1000, 0x1fff)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &detach(1, 1)), Status::Ok);
    assert_eq!(w.take(), [("unmap".into(), 2, false), ("detach".into(), 4, false)]);
}

/// Bypass changes are told, once per change of global bypass, before the config write
/// returns, and after the device stopped granting what the change takes away.
#[test]
fn config_bypass_changes_are_told() {
    let mem = new_mem();
    let drv = Driver::new(&mem);
    let mut dev = drv.device(DeviceConfig { bypass: true, ..cfg(&[1]) });
    let w = Witness::new(&drv, &dev, (1, 0x1000));
    dev.add_listener(w.clone());
    let at = Config::BYPASS_OFFSET as u64;
    assert!(dev.write_config(at, &[0]));
    assert_eq!(w.take(), [("bypass false".into(), 0, false)]);
    assert!(dev.write_config(at, &[0]));
    assert_eq!(w.take(), [], "no change, no call");
    assert!(dev.write_config(at, &[1]));
    assert_eq!(w.take(), [("bypass true".into(), 0, true)]);
    // Device reset keeps `bypass`; system reset returns it to the configured value (1).
    dev.reset();
    assert_eq!(w.take(), [("reset".into(), 0, true)]);
    dev.iommu().set_bypass(false);
    assert_eq!(w.take(), [("bypass false".into(), 0, false)]);
    dev.system_reset();
    assert_eq!(w.take(), [("reset".into(), 0, false), ("bypass true".into(), 0, true)]);
}

/// Legacy BYPASS: negotiating it turns global bypass on, reset (features forgotten) off.
#[test]
fn legacy_bypass_changes_are_told() {
    let mut c = cfg(&[1]);
    c.features.bypass_config = false;
    c.features.legacy_bypass = true;
    let mut dev = VirtioIommu::new(c).unwrap();
    let log = Log::new();
    dev.add_listener(log.clone());
    dev.ack_features(bit(VERSION_1) | bit(BYPASS) | bit(MAP_UNMAP));
    assert_eq!(log.take(), ["bypass true"]);
    dev.reset();
    assert_eq!(log.take(), ["reset", "bypass false"]);
}

/// Reset and restore: every attached endpoint is detached, then `on_reset`, with the
/// state already gone; restore then replays the restored state.
#[test]
fn reset_and_restore_are_told() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let w = Witness::new(&drv, &dev, (1, 0x1000));
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    let state = dev.snapshot();
    dev.add_listener(w.clone());
    dev.reset();
    assert_eq!(w.take(), [("detach".into(), 2, false), ("reset".into(), 2, false)]);
    let log = Log::new();
    dev.add_listener(log.clone());
    dev.restore(state).unwrap();
    assert_eq!(log.take(), ["reset", "attach 1 1 false", "map 1 0x1000"]);
    assert!(dev.iommu().lookup(1, 0x1000).is_some());
}

/// lookup answers what translate would, without a fault event: mappings with their
/// permissions, identity windows bounded by reserved regions, the MSI window.
#[test]
fn lookup_raises_no_fault() {
    let i = Iommu::new(cfg_with_resv()).unwrap();
    let none = |ep, iova| {
        assert_eq!(i.lookup(ep, iova), None);
        assert_eq!((i.pending_faults(), i.counters().faults_raised), (0, 0));
    };
    none(3, 0x1000); // unattached, no bypass
    none(42, 0x1000); // unknown endpoint
    assert_eq!(i.execute(&attach(1, 3), &mut []), Status::Ok);
    assert_eq!(i.execute(&map(1, 0x1000, 0x2fff, 0x8000, MAP_F_READ), &mut []), Status::Ok);
    let m = Mapping { start: 0x1000, end: 0x2fff, phys: 0x8000, flags: MAP_F_READ };
    let ro = Permissions { read: true, write: false };
    assert_eq!(i.lookup(3, 0x2abc), Some((Window::Mapping(m), ro)));
    assert_eq!(Window::Mapping(m).translate(0x2abc), Some(0x9abc));
    assert!(!ro.allows(Access::Write));
    none(3, 0x3000); // unmapped
    let rw = Permissions { read: true, write: true };
    let id = |start, end| Some((Window::Identity { start, end }, rw));
    // MSI: identity over the region, attached or not.
    assert_eq!(i.execute(&attach(2, 1), &mut []), Status::Ok);
    assert_eq!(i.lookup(1, 0xfee0_0010), id(0xfee0_0000, 0xfeef_ffff));
    // Global bypass: identity up to the reserved region; the region itself: nothing.
    i.set_bypass(true);
    assert_eq!(i.lookup(2, 0x1000), id(0, 0x7fff_ffff));
    assert_eq!(i.lookup(2, 0x9000_0000), id(0x9000_0000, u64::MAX));
    none(2, 0x8000_1000);
    // A bypass domain.
    assert_eq!(i.execute(&attach_flags(3, 4, ATTACH_F_BYPASS), &mut []), Status::Ok);
    assert_eq!(i.lookup(4, 0x1234), id(0, u64::MAX));
}
