//! The device driver against the fake device: init, probe, domains, attach,
//! map/unmap, failures, faults, ring handling.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use viommu_device::{DeviceConfig, EndpointConfig};
use viommu_driver::fake::{
    DeviceModel, FakeConfig, FakeIommu, FakeMemory, InjectReply, Injection, Reorder,
};
use viommu_driver::queue::{Buffer, SplitQueue};
use viommu_driver::{DomainKind, DriverOptions, Error, Prot, ResvKind, ResvRegion, VirtioIommu};
use viommu_proto::{fault, features as f, FaultEvent, ProbePropHead, RequestType, ResvMem, Status};

const RW: Prot = Prot(3);

#[test]
fn init_requires_version_1_and_map_unmap() {
    for (bit, name) in [(f::VERSION_1, "VERSION_1"), (f::MAP_UNMAP, "MAP_UNMAP")] {
        let ring = FakeConfig { withheld_features: f::bit(bit), ..Default::default() };
        let fake = FakeDevice::new(device_config(), ring);
        let r = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default());
        assert_eq!(r.err(), Some(Error::MissingFeature(name)));
    }
}

#[test]
fn init_takes_offered_features_writes_bypass_and_fills_event_queue() {
    let (fake, iommu) = setup(device_config());
    let info = iommu.info();
    for bit in [f::INPUT_RANGE, f::DOMAIN_RANGE, f::PROBE, f::MMIO, f::BYPASS_CONFIG, f::VERSION_1]
    {
        assert!(info.has(bit), "feature {bit}");
    }
    assert_eq!(info.input_range, (0, (1 << 48) - 1));
    assert_eq!(info.domain_range, (1, 1023));
    assert_eq!(fake.bypass(), 0, "unattached endpoints blocked");
    // 16 event buffers are posted: 16 events fit, the 17th is dropped.
    let ev = FaultEvent { reason: fault::R_DOMAIN, endpoint: 3.into(), ..Default::default() };
    assert!((0..16).all(|_| fake.inject_fault(ev)));
    assert!(!fake.inject_fault(ev));

    let (fake, _iommu) =
        setup_with(device_config(), DriverOptions { bypass: true, ..Default::default() });
    assert_eq!(fake.bypass(), 1);
}

/// A device that reports RESV_MEM subtype 9, which no spec version defines,
/// for the second property of endpoint 1.
struct UnknownSubtype(Model);

impl DeviceModel for UnknownSubtype {
    fn device_features(&self) -> u64 {
        self.0.device_features()
    }
    fn ack_features(&mut self, features: u64) {
        self.0.ack_features(features);
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        self.0.read_config(offset, buf);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.0.write_config(offset, data);
    }
    fn reset(&mut self) {
        self.0.reset();
    }
    fn handle_request(&mut self, readable: &[u8], writable: &mut [u8]) -> u32 {
        let used = self.0.handle_request(readable, writable);
        let probe_of_1 = readable.first() == Some(&(RequestType::Probe as u8))
            && readable.get(4..8) == Some(&1u32.to_le_bytes()[..]);
        // The second property starts after one head and one RESV_MEM body.
        let subtype = size_of::<ProbePropHead>() * 2 + size_of::<ResvMem>();
        if probe_of_1 && used as usize > subtype {
            writable[subtype] = 9;
        }
        used
    }
}

#[test]
fn probe_reports_regions_unknown_subtypes_as_reserved_and_adds_sw_msi() {
    let mut cfg = device_config();
    cfg.endpoints[1] = EndpointConfig::new(1)
        .with_resv(viommu_device::ResvRegion::reserved(0x1000, 0x1fff))
        .with_resv(viommu_device::ResvRegion::reserved(0x5000, 0x5fff));
    cfg.endpoints[2] =
        EndpointConfig::new(2).with_resv(viommu_device::ResvRegion::msi(0xfee0_0000, 0xfeef_ffff));
    let fake = FakeIommu::new(FakeConfig::default(), UnknownSubtype(Model::new(cfg)));
    let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default()).unwrap();
    let r1 = iommu.probe_endpoint(1).unwrap();
    assert_eq!(
        r1,
        vec![
            ResvRegion { start: 0x1000, end: 0x1fff, kind: ResvKind::Reserved },
            ResvRegion { start: 0x5000, end: 0x5fff, kind: ResvKind::Reserved },
            ResvRegion { start: 0x0800_0000, end: 0x080f_ffff, kind: ResvKind::SwMsi },
        ]
    );
    let r2 = iommu.probe_endpoint(2).unwrap();
    assert_eq!(r2, vec![ResvRegion { start: 0xfee0_0000, end: 0xfeef_ffff, kind: ResvKind::Msi }]);
    assert_eq!(iommu.counters().probe, 2);
    // Unknown endpoint: typed NOENT.
    assert_eq!(
        iommu.probe_endpoint(99).unwrap_err(),
        Error::Device { request: RequestType::Probe, status: Status::NoEnt }
    );
}

#[test]
fn paging_domain_granule_ids_and_wrong_iommu() {
    let cfg = DeviceConfig { page_size_mask: 1 << 16, ..device_config() };
    let (_f, iommu) = setup(cfg);
    assert_eq!(
        iommu.alloc_paging(1).unwrap_err(),
        Error::GranuleTooLarge { granule: 0x10000, page: 0x1000 }
    );

    let cfg = DeviceConfig { domain_range: (5, 6), ..device_config() };
    let (_f, iommu) = setup(cfg);
    let a = iommu.alloc_paging(1).unwrap();
    let b = iommu.alloc_blocking().unwrap();
    assert_eq!((a.id(), b.id()), (5, 6));
    assert_eq!(iommu.alloc_paging(1).unwrap_err(), Error::NoDomainId);
    drop(a);
    assert_eq!(iommu.alloc_paging(1).unwrap().id(), 5, "ID freed on drop");

    let (_f2, other) = setup(device_config());
    let foreign = other.alloc_paging(1).unwrap();
    assert_eq!(iommu.attach(&foreign, 1).unwrap_err(), Error::WrongIommu);
}

#[test]
fn first_attach_replays_all_mappings_in_one_sync() {
    let (fake, iommu) = setup(device_config());
    let d = iommu.alloc_paging(1).unwrap();
    for i in 0..10u64 {
        d.map_pages(0x10_0000 + i * 0x2000, 0x8000_0000 + i * 0x1000, 0x1000, RW).unwrap();
    }
    d.iotlb_sync_map(0, u64::MAX).unwrap();
    let before = iommu.counters();
    assert_eq!(before.map, 0, "unattached: tree only");
    iommu.attach(&d, 1).unwrap();
    let c = iommu.counters().since(&before);
    assert_eq!((c.attach, c.map, c.kicks, c.syncs), (1, 10, 1, 1));
    assert_eq!(c.batch_sizes[3], 1, "one kick carrying 11 requests");
    assert_eq!(fake.mappings(d.id()), tree(&d));

    // A second endpoint joins: no replay.
    let before = iommu.counters();
    iommu.attach(&d, 2).unwrap();
    assert_eq!(iommu.counters().since(&before).map, 0);

    // After the last detach the device forgets the domain; the driver keeps its tree.
    iommu.detach(1).unwrap();
    iommu.detach(2).unwrap();
    assert_eq!(fake.domain_count(), 0);
    assert_eq!(d.mappings().len(), 10);
    assert_eq!(iommu.detach(2).unwrap_err(), Error::NotAttached(2));
    iommu.attach(&d, 3).unwrap();
    assert_eq!(fake.mappings(d.id()), tree(&d));
}

#[test]
fn attach_moves_endpoint_between_domains() {
    let (fake, iommu) = setup(device_config());
    let a = attached(&iommu, 1);
    let b = iommu.alloc_paging(1).unwrap();
    iommu.attach(&b, 1).unwrap();
    assert_eq!(fake.endpoint_domain(1), Some(b.id()));
    assert!(a.endpoints().is_empty());
    assert_eq!(iommu.attached_domain(1), Some(b.id()));
    // Dropping an attached domain detaches its endpoints.
    drop(b);
    assert_eq!(fake.endpoint_domain(1), None);
    assert_eq!(iommu.attached_domain(1), None);
}

#[test]
fn map_unmap_never_splits_and_syncs_only_when_needed() {
    let (fake, iommu) = setup(device_config());
    let d = attached(&iommu, 1);
    assert_eq!(
        d.map_pages(0x1000, 0x2000, 0x1800, RW).unwrap_err(),
        Error::Unaligned { iova: 0x1000, size: 0x1800 }
    );
    assert!(matches!(d.map_pages(1 << 48, 0, 0x1000, RW), Err(Error::OutOfRange { .. })));
    d.map_pages(0x10000, 0x40000, 0x4000, RW).unwrap();
    assert_eq!(
        d.map_pages(0x12000, 0x0, 0x1000, RW).unwrap_err(),
        Error::Overlap { iova: 0x10000 }
    );
    let before = iommu.counters();
    d.iotlb_sync_map(0x10000, 0x4000).unwrap();
    d.iotlb_sync_map(0x10000, 0x4000).unwrap(); // nothing pending: no sync
    let c = iommu.counters().since(&before);
    assert_eq!((c.kicks, c.syncs), (1, 1));
    assert_eq!(d.iova_to_phys(0x13fff), Some(0x43fff));
    assert_eq!(d.iova_to_phys(0x14000), None);
    assert_eq!(d.unmap_pages(0x10000, 0x1000).unwrap_err(), Error::WouldSplit { iova: 0x10000 });
    assert_eq!(d.unmap_pages(0x20000, 0x1000).unwrap(), 0);
    assert_eq!(d.unmap_pages(0x0, 0x100000).unwrap(), 0x4000);
    d.iotlb_sync().unwrap();
    assert!(fake.mappings(d.id()).is_empty());
    assert_eq!(iommu.counters().unmap, 1);
    // MMIO was negotiated: allowed.
    d.map_pages(0x30000, 0xfe00_0000, 0x1000, Prot::READ | Prot::MMIO).unwrap();
    d.flush_iotlb_all().unwrap();
    assert_eq!(fake.mappings(d.id()), tree(&d));
}

#[test]
fn failed_requests_give_typed_errors_and_roll_back() {
    let replies = [
        InjectReply::Status(Status::Range),
        InjectReply::Status(Status::Inval),
        InjectReply::Status(Status::NoMem),
        InjectReply::Status(Status::IoErr),
        InjectReply::UsedLenZero,
    ];
    for reply in replies {
        let (fake, iommu) = setup(device_config());
        let d = attached(&iommu, 1);
        let expect = |request| match reply {
            InjectReply::Status(status) | InjectReply::AfterApplying(status) => {
                Error::Device { request, status }
            }
            InjectReply::UsedLenZero => Error::NoResponse { request, used_len: 0 },
            InjectReply::Hold => unreachable!("not in this list"),
        };
        // MAP fails: the tree entry goes away.
        fake.inject(Injection { request: Some(RequestType::Map), reply });
        d.map_pages(0x10000, 0x40000, 0x1000, RW).unwrap();
        assert_eq!(d.iotlb_sync_map(0x10000, 0x1000).unwrap_err(), expect(RequestType::Map));
        assert!(d.mappings().is_empty());
        // UNMAP fails: the mapping is back in the tree, as in the device.
        d.map_pages(0x10000, 0x40000, 0x1000, RW).unwrap();
        d.iotlb_sync_map(0x10000, 0x1000).unwrap();
        fake.inject(Injection { request: Some(RequestType::Unmap), reply });
        d.unmap_pages(0x10000, 0x1000).unwrap();
        assert_eq!(d.iotlb_sync().unwrap_err(), expect(RequestType::Unmap));
        assert_eq!(fake.mappings(d.id()), tree(&d));
        assert_eq!(d.mappings().len(), 1);
        // ATTACH fails: nothing attached.
        let e = iommu.alloc_paging(2).unwrap();
        fake.inject(Injection { request: Some(RequestType::Attach), reply });
        assert_eq!(iommu.attach(&e, 2).unwrap_err(), expect(RequestType::Attach));
        assert!(e.endpoints().is_empty());
        assert_eq!(iommu.attached_domain(2), None);
        // A replayed MAP fails: the attach is undone.
        e.map_pages(0x10000, 0x40000, 0x1000, RW).unwrap();
        fake.inject(Injection { request: Some(RequestType::Map), reply });
        assert_eq!(iommu.attach(&e, 2).unwrap_err(), expect(RequestType::Map));
        assert_eq!(fake.endpoint_domain(2), None);
        assert_eq!(iommu.counters().sync_errors, 4);
    }
}

#[test]
fn identity_domains_bypass_or_map_one_to_one() {
    let (fake, iommu) = setup(device_config());
    let d = iommu.alloc_identity(1).unwrap();
    assert_eq!(d.kind(), DomainKind::Identity { bypass: true });
    iommu.attach(&d, 1).unwrap();
    assert_eq!(iommu.counters().map, 0);
    assert_eq!(fake.endpoint_domain(1), Some(d.id()));
    assert_eq!(d.map_pages(0, 0, 0x1000, RW).unwrap_err(), Error::NotPaging);

    let mut cfg = device_config();
    cfg.features.bypass_config = false;
    let (fake, iommu) = setup(cfg);
    let d = iommu.alloc_identity(1).unwrap();
    assert_eq!(d.kind(), DomainKind::Identity { bypass: false });
    iommu.attach(&d, 1).unwrap();
    // The aperture minus the software MSI window: two 1:1 mappings.
    let m = fake.mappings(d.id());
    assert_eq!(m, vec![(0, 0x07ff_ffff, 0, 3), (0x0810_0000, (1 << 48) - 1, 0x0810_0000, 3)]);
}

#[test]
fn direct_regions_are_merged_checked_and_mapped_once() {
    let (fake, iommu) = setup(device_config());
    let direct = |start, end| ResvRegion { start, end, kind: ResvKind::Direct };
    iommu.add_reserved_region(1, direct(0x3000, 0x4fff));
    iommu.add_reserved_region(1, direct(0x1000, 0x3fff));
    let d = attached(&iommu, 1);
    assert_eq!(fake.mappings(d.id()), vec![(0x1000, 0x4fff, 0x1000, 3)]);
    iommu.add_reserved_region(2, direct(1 << 50, (1 << 50) + 0xfff));
    assert!(matches!(iommu.alloc_paging(2), Err(Error::OutOfRange { .. })));
}

#[test]
fn faults_reach_the_handler_and_buffers_are_recycled() {
    let (fake, iommu) = setup(device_config());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    iommu.set_fault_handler(Some(Box::new(move |r| s.lock().unwrap().push(r))));
    let ev = |ep: u32| FaultEvent {
        reason: fault::R_MAPPING,
        flags: (fault::F_WRITE | fault::F_ADDRESS).into(),
        endpoint: ep.into(),
        address: 0xdead_0000u64.into(),
        ..Default::default()
    };
    for round in 0..3u32 {
        for i in 0..16 {
            assert!(fake.inject_fault(ev(round * 16 + i)));
        }
        // Through the interrupt entry point every other round.
        let n = if round % 2 == 0 { iommu.poll_events() } else { iommu.handle_interrupt() };
        assert_eq!(n.unwrap(), 16);
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 48);
    assert_eq!(seen[47].endpoint, 47);
    assert_eq!(seen[0].address, Some(0xdead_0000));
    assert_eq!(seen[0].reason, fault::R_MAPPING);
    assert_eq!(iommu.counters().faults, 48);
    assert_eq!(iommu.counters().event_kicks, 3);
}

#[test]
fn full_ring_is_kicked_reaped_and_retried() {
    // Without INDIRECT_DESC two requests fit in 4 descriptors, with it four.
    for (indirect_desc, kicks) in [(false, 10), (true, 5)] {
        let opts = DriverOptions { request_queue_size: 4, indirect_desc, ..Default::default() };
        let (fake, iommu) = setup_with(device_config(), opts);
        assert_eq!(iommu.info().has(f::RING_INDIRECT_DESC), indirect_desc);
        let d = attached(&iommu, 1);
        let before = iommu.counters();
        for i in 0..20u64 {
            d.map_pages(i * 0x1000 + 0x10000, 0, 0x1000, RW).unwrap();
        }
        d.iotlb_sync_map(0, u64::MAX).unwrap();
        let c = iommu.counters().since(&before);
        // kicks - 1 on a full ring, 1 by the sync.
        assert_eq!((c.map, c.kicks, c.syncs), (20, kicks, 1));
        assert_eq!(fake.mappings(d.id()).len(), 20);
        assert_eq!(fake.stats().malformed, 0);
    }
}

#[test]
fn fake_device_walks_indirect_tables_and_rejects_bad_ones() {
    use viommu_driver::queue::DESC_F_INDIRECT;
    use viommu_driver::Transport;
    let fake = FakeDevice::default();
    let mut t = fake.transport();
    let features = t.device_features();
    t.set_driver_features(features);
    let mem = fake.memory().clone();
    let mut q = SplitQueue::new(Arc::new(fake.hal()), 0, 8, false).unwrap();
    q.enable_indirect(2).unwrap();
    q.setup(&mut t);
    let table = q.indirect_region().unwrap().paddr();
    let desc = q.addrs().desc;
    // A MAP into a domain that does not exist: NOENT, 4 bytes written.
    let req = viommu_proto::Request::Map(viommu_proto::MapBody {
        domain: 9.into(),
        virt_start: 0.into(),
        virt_end: 0xfff.into(),
        phys_start: 0.into(),
        flags: 1.into(),
    });
    let mut bytes = [0u8; 64];
    let len = req.encode(&mut bytes).unwrap();
    let dma = viommu_driver::hal::DmaBuffer::new(fake.hal(), 1).unwrap();
    let buf = dma.paddr();
    mem.write(buf, &bytes[..len]);
    let add = |q: &mut SplitQueue<_>| {
        q.add(&[Buffer::readable(buf, len as u32), Buffer::writable(buf + 0x100, 4)]).unwrap()
    };
    let good = add(&mut q);
    assert_eq!(q.num_free(), 7, "one ring descriptor per request");
    let short = add(&mut q); // table length not a multiple of 16
    mem.write(desc + 16 * short as u64 + 8, &24u32.to_le_bytes());
    let nested = add(&mut q); // an indirect descriptor inside the table
    let entry = table + 16 * 2 * nested as u64;
    mem.write(entry + 12, &(DESC_F_INDIRECT | 1).to_le_bytes());
    let chained = add(&mut q); // INDIRECT together with NEXT
    mem.write(desc + 16 * chained as u64 + 12, &(DESC_F_INDIRECT | 1).to_le_bytes());
    q.kick(&mut t);
    let got: Vec<_> = std::iter::from_fn(|| q.pop_used()).map(|u| (u.token, u.len)).collect();
    assert_eq!(got, vec![(good, 4), (short, 0), (nested, 0), (chained, 0)]);
    let mut status = [0u8; 1];
    mem.read(buf + 0x100, &mut status);
    assert_eq!(status[0], Status::NoEnt as u8);
    assert_eq!(fake.stats().malformed, 3);
    assert_eq!(q.num_free(), 8);
}

#[test]
fn deferred_device_completes_while_driver_waits() {
    // Through the transport's waiter, and through `wait_for_used` for a
    // transport without one.
    for with_waiter in [true, false] {
        let fake = FakeDevice::default();
        let t = if with_waiter { fake.transport() } else { fake.transport_without_waiter() };
        let iommu = VirtioIommu::new(t, fake.hal(), DriverOptions::default()).unwrap();
        let d = attached(&iommu, 1);
        fake.set_deferred(true);
        d.map_pages(0x10000, 0, 0x1000, RW).unwrap();
        d.iotlb_sync_map(0x10000, 0x1000).unwrap();
        assert_eq!(fake.mappings(d.id()).len(), 1);
        assert_eq!(d.unmap_pages(0x10000, 0x1000), Ok(0x1000));
        d.iotlb_sync().unwrap();
        assert_eq!(fake.mappings(d.id()), vec![]);
    }
}

#[test]
fn a_sync_kicks_and_completes_while_another_thread_waits_on_a_held_request() {
    // Issue 3 item 11: no thread waits on a lock held across another
    // thread's wait. Thread A's MAP is held by the device and A blocks until
    // an interrupt; thread B's sync must still kick (while A is blocked) and
    // complete. Waiting under the transport lock, B's kick would queue
    // behind A's wait.
    let opts = DriverOptions { timeout: Some(Duration::from_secs(120)), ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let a = attached(&iommu, 1);
    let b = attached(&iommu, 2);
    fake.set_blocking_waits(true);
    fake.inject(Injection { request: Some(RequestType::Map), reply: InjectReply::Hold });
    let a_id = a.id();
    let thread_a = std::thread::spawn(move || {
        a.map_pages(0x10000, 0x8000, 0x1000, RW)?;
        a.iotlb_sync_map(0x10000, 0x1000)?;
        Ok::<_, Error>(a)
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while fake.blocked_waiters() == 0 {
        assert!(std::time::Instant::now() < deadline, "thread A never blocked in its wait");
        std::thread::yield_now();
    }
    assert_eq!(fake.held(), 1);
    let before = fake.stats();
    b.map_pages(0x20000, 0x9000, 0x1000, RW).unwrap();
    b.iotlb_sync_map(0x20000, 0x1000).unwrap();
    let after = fake.stats();
    assert_eq!(after.kicks - before.kicks, 1, "B kicked once");
    assert_eq!(after.kicks_during_waits - before.kicks_during_waits, 1, "while A was blocked");
    assert_eq!(fake.mappings(b.id()), tree(&b));
    // A is still waiting: its MAP has not come back.
    assert!(!thread_a.is_finished());
    assert_eq!((fake.held(), fake.mappings(a_id)), (1, vec![]));
    fake.release_held();
    let a = thread_a.join().unwrap().unwrap();
    assert_eq!(fake.mappings(a.id()), tree(&a));
    assert_eq!(tree(&a).len(), 1);
    assert_eq!(iommu.counters().timeouts, 0);
}

#[test]
fn event_idx_suppresses_notifies_the_device_does_not_need() {
    let mem = FakeMemory::new(16);
    let mut q = SplitQueue::new(Arc::new(mem.hal()), 0, 8, true).unwrap();
    q.add(&[Buffer::readable(0x1000, 4)]).unwrap();
    assert!(q.kick_prepare(), "avail_event 0 is in [0, 1)");
    q.add(&[Buffer::readable(0x1000, 4)]).unwrap();
    assert!(!q.kick_prepare(), "device has not consumed entry 0 yet");
    // The device moves avail_event to 2: the next add needs a notify.
    let used = q.addrs().used;
    mem.write(used + 4 + 8 * 8, &2u16.to_le_bytes());
    q.add(&[Buffer::readable(0x1000, 4)]).unwrap();
    assert!(q.kick_prepare());
}

#[test]
fn queue_recycles_descriptors_out_of_order_and_skips_bogus_used_ids() {
    let mem = FakeMemory::new(16);
    let mut q = SplitQueue::new(Arc::new(mem.hal()), 0, 4, false).unwrap();
    let a = q.add(&[Buffer::readable(0x1000, 4), Buffer::writable(0x2000, 4)]).unwrap();
    let b = q.add(&[Buffer::writable(0x3000, 8)]).unwrap();
    assert_eq!(
        q.add(&[Buffer::readable(0, 1), Buffer::readable(0, 1)]),
        Err(viommu_driver::queue::QueueError::Full)
    );
    let used = q.addrs().used;
    let entry = |id: u32, len: u32| [id.to_le_bytes(), len.to_le_bytes()].concat();
    mem.write(used + 4, &entry(b as u32, 8));
    mem.write(used + 12, &entry(77, 0)); // not a head: skipped
    mem.write(used + 20, &entry(a as u32, 4));
    mem.write(used + 2, &3u16.to_le_bytes());
    let got: Vec<_> = std::iter::from_fn(|| q.pop_used()).map(|u| (u.token, u.len)).collect();
    assert_eq!(got, vec![(b, 8), (a, 4)]);
    assert_eq!(q.bad_used(), 1);
    assert_eq!(q.num_free(), 4);
    // Callback completion.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    q.set_callback(Some(Box::new(move |u| s.lock().unwrap().push(u.token))));
    let c = q.add(&[Buffer::readable(0x1000, 4)]).unwrap();
    mem.write(used + 4 + 8 * 3, &entry(c as u32, 0));
    mem.write(used + 2, &4u16.to_le_bytes());
    assert_eq!(q.process_used(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![c]);
    // The caller may hand the device other bus addresses (e.g. IOVAs).
    let iova = q.addrs_at(0xdead_0000);
    q.set_bus_addrs(iova);
    assert_eq!(q.addrs().desc, 0xdead_0000);
}

#[test]
fn a_silent_device_gives_timeout_or_needs_reset() {
    assert_eq!(DriverOptions::default().timeout, Some(Duration::from_secs(5)));
    let opts = DriverOptions { spin_limit: 5000, ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let d = attached(&iommu, 1);
    fake.set_stalled(true);
    d.map_pages(0x10000, 0, 0x1000, RW).unwrap();
    assert_eq!(d.iotlb_sync_map(0x10000, 0x1000).unwrap_err(), Error::Timeout);
    // Rolled back, but the range stays blocked while the device may still map it.
    assert!(d.mappings().is_empty());
    assert_eq!(d.stale_ranges(), vec![(0x10000, 0x10fff)]);
    // The device wakes up and applies the MAP; the next sync unmaps it again.
    fake.set_stalled(false);
    assert_eq!(fake.mappings(d.id()).len(), 1);
    d.iotlb_sync().unwrap();
    assert!(d.stale_ranges().is_empty());
    assert_eq!(fake.mappings(d.id()), tree(&d));
    fake.set_stalled(true);
    fake.set_needs_reset();
    d.map_pages(0x20000, 0, 0x1000, RW).unwrap();
    assert_eq!(d.iotlb_sync_map(0x20000, 0x1000).unwrap_err(), Error::DeviceNeedsReset);
}

#[test]
fn timed_out_requests_keep_their_ring_slots_until_the_device_answers() {
    let (fake, iommu) = setup_small_ring();
    let d = attached(&iommu, 1);
    fake.set_stalled(true);
    let before = iommu.counters();
    d.map_pages(0x10000, 0, 0x1000, RW).unwrap();
    assert_eq!(d.iotlb_sync_map(0x10000, 0x1000), Err(Error::Timeout));
    assert_eq!(d.map_pages(0x10000, 0x8000, 0x1000, RW), Err(Error::Overlap { iova: 0x10000 }));
    d.map_pages(0x20000, 0, 0x1000, RW).unwrap();
    assert_eq!(d.iotlb_sync_map(0x20000, 0x1000), Err(Error::Timeout));
    // Both slots still belong to the unanswered MAPs: a third finds none.
    assert_eq!(d.map_pages(0x30000, 0, 0x1000, RW), Err(Error::Timeout));
    assert!(d.mappings().is_empty());
    assert_eq!(d.stale_ranges(), vec![(0x10000, 0x10fff), (0x20000, 0x20fff)]);
    let c = iommu.counters().since(&before);
    assert_eq!((c.map, c.timeouts, c.sync_errors), (2, 3, 2));
    // The stalled device never moved avail_event past the first MAP: the
    // second needed no notify (the device looks again before it stops).
    assert_eq!((c.kicks, c.kicks_suppressed), (1, 1));
    // The device wakes up: the first MAP lands, the second fails.
    let ioerr =
        Injection { request: Some(RequestType::Map), reply: InjectReply::Status(Status::IoErr) };
    fake.inject_nth(1, ioerr);
    fake.set_stalled(false);
    assert_eq!(fake.mappings(d.id()).len(), 1);
    d.iotlb_sync().unwrap();
    // One cleanup UNMAP, for the MAP that succeeded late.
    assert_eq!(iommu.counters().since(&before).unmap, 1);
    assert!(d.stale_ranges().is_empty());
    assert!(fake.mappings(d.id()).is_empty());
    d.map_pages(0x10000, 0x8000, 0x1000, RW).unwrap();
    d.iotlb_sync_map(0x10000, 0x1000).unwrap();
    assert_eq!(fake.mappings(d.id()), tree(&d));
}

#[test]
fn a_timed_out_unmap_puts_its_mappings_back() {
    let opts = DriverOptions { timeout: Some(Duration::from_millis(20)), ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let d = attached(&iommu, 1);
    d.map_pages(0x10000, 0, 0x2000, RW).unwrap();
    d.iotlb_sync_map(0x10000, 0x2000).unwrap();
    fake.set_stalled(true);
    assert_eq!(d.unmap_pages(0x10000, 0x2000), Ok(0x2000));
    assert_eq!(d.iotlb_sync(), Err(Error::Timeout));
    // The device may not have unmapped it: the tree says mapped.
    assert_eq!(d.mappings().len(), 1);
    fake.set_stalled(false);
    assert!(fake.mappings(d.id()).is_empty());
    assert_eq!(d.unmap_pages(0x10000, 0x2000), Ok(0x2000));
    d.iotlb_sync().unwrap();
    assert_eq!(fake.mappings(d.id()), tree(&d));
    assert_eq!(iommu.counters().sync_errors, 1);
}

#[test]
fn out_of_order_completions_are_matched_by_token() {
    let (fake, iommu) = setup(device_config());
    let d = attached(&iommu, 1);
    for (i, iova) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
        d.map_pages(iova, 0x100_0000 * (i as u64 + 1), 0x1000, RW).unwrap();
    }
    d.iotlb_sync_map(0, u64::MAX).unwrap();
    fake.set_reorder(Reorder::ReverseCompletion);
    // In ring order: UNMAP A (ok), MAP D (ok), UNMAP B (fails), MAP E (fails).
    let unmap_range =
        Injection { request: Some(RequestType::Unmap), reply: InjectReply::Status(Status::Range) };
    let map_inval =
        Injection { request: Some(RequestType::Map), reply: InjectReply::Status(Status::Inval) };
    fake.inject_nth(1, unmap_range);
    fake.inject_nth(1, map_inval);
    d.unmap_pages(0x10000, 0x1000).unwrap();
    d.map_pages(0x40000, 0x400_0000, 0x1000, RW).unwrap();
    d.unmap_pages(0x20000, 0x1000).unwrap();
    d.map_pages(0x50000, 0x500_0000, 0x1000, RW).unwrap();
    let before = iommu.counters();
    // The used ring returns E, B, D, A: each reply must reach its own request.
    let err = Error::Device { request: RequestType::Unmap, status: Status::Range };
    assert_eq!(d.iotlb_sync(), Err(err));
    assert_eq!(iommu.counters().since(&before).kicks, 1);
    let ivas: Vec<u64> = d.mappings().iter().map(|m| m.iova).collect();
    assert_eq!(ivas, vec![0x20000, 0x30000, 0x40000]);
    assert_eq!(fake.mappings(d.id()), tree(&d));
    assert_eq!(fake.pending_injections(), 0);
}

#[test]
fn a_map_and_an_unmap_of_one_range_never_share_a_kick() {
    // The spec does not order execution: a device may run them backwards.
    let (fake, iommu) = setup(device_config());
    let d = attached(&iommu, 1);
    fake.set_reorder(Reorder::ReverseExecution);
    let before = iommu.counters();
    d.map_pages(0x10000, 0x100_0000, 0x1000, RW).unwrap();
    // The MAP is still queued: the UNMAP waits for it (one sync) first.
    assert_eq!(d.unmap_pages(0x10000, 0x1000), Ok(0x1000));
    d.map_pages(0x10000, 0x200_0000, 0x2000, RW).unwrap(); // waits for the UNMAP
    d.map_pages(0x30000, 0x300_0000, 0x1000, RW).unwrap(); // no conflict: queued
    d.iotlb_sync().unwrap();
    let c = iommu.counters().since(&before);
    assert_eq!((c.map, c.unmap, c.syncs, c.kicks), (3, 1, 3, 3));
    assert_eq!(fake.mappings(d.id()), tree(&d));
    assert_eq!(d.mappings().len(), 2);
}

#[test]
fn a_map_that_may_have_been_applied_is_unmapped_before_its_range_is_reused() {
    use InjectReply::{AfterApplying, Status as S, UsedLenZero};
    // A refusal did nothing; IOERR, DEVERR and used length 0 may have mapped.
    let cases = [
        (S(Status::Range), 0),
        (S(Status::Inval), 0),
        (S(Status::NoMem), 0),
        (S(Status::IoErr), 1),
        (UsedLenZero, 1),
        (AfterApplying(Status::IoErr), 1),
        (AfterApplying(Status::DevErr), 1),
    ];
    for (reply, cleanups) in cases {
        let (fake, iommu) = setup(device_config());
        let d = attached(&iommu, 1);
        let before = iommu.counters();
        fake.inject(Injection { request: Some(RequestType::Map), reply });
        d.map_pages(0x10000, 0x40000, 0x1000, RW).unwrap();
        assert!(d.iotlb_sync_map(0x10000, 0x1000).is_err());
        assert!(d.mappings().is_empty());
        let blocked = if cleanups == 1 { vec![(0x10000, 0x10fff)] } else { vec![] };
        assert_eq!(d.stale_ranges(), blocked, "{reply:?}");
        // Mapping the range again waits for the cleanup UNMAP first.
        d.map_pages(0x10000, 0x80000, 0x1000, RW).unwrap();
        d.iotlb_sync_map(0x10000, 0x1000).unwrap();
        assert!(d.stale_ranges().is_empty());
        assert_eq!(fake.mappings(d.id()), tree(&d), "{reply:?}");
        let c = iommu.counters().since(&before);
        assert_eq!((c.map, c.unmap, c.syncs), (2, cleanups, 2 + cleanups), "{reply:?}");
    }
}

#[test]
fn an_attach_waiting_for_the_device_blocks_no_other_endpoint() {
    // A generous bound: only a hang reaches it.
    let opts = DriverOptions { timeout: Some(Duration::from_secs(60)), ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let d = iommu.alloc_paging(1).unwrap();
    let kicks = fake.stats().kicks;
    fake.set_stalled(true);
    let i2 = iommu.clone();
    let attach = std::thread::spawn(move || i2.attach(&d, 1));
    while fake.stats().kicks == kicks {
        std::thread::yield_now();
    }
    // The ATTACH is on the ring, unanswered; endpoint 2 is still reachable.
    assert_eq!(iommu.attached_domain(2), None);
    let region = ResvRegion { start: 0x1000, end: 0x1fff, kind: ResvKind::Direct };
    iommu.add_reserved_region(2, region);
    fake.set_stalled(false);
    attach.join().unwrap().unwrap();
    assert_eq!(iommu.attached_domain(1), fake.endpoint_domain(1));
}

/// More than 2^16 requests through an 8-entry ring: the avail and used
/// indexes wrap (with EVENT_IDX, with and without indirect descriptors,
/// completions in order and reversed), and every request still gets its
/// own reply: the one failure injected past the wrap reaches its caller.
#[test]
fn requests_keep_their_replies_across_the_ring_index_wrap() {
    for (indirect_desc, reorder) in [(false, Reorder::InOrder), (true, Reorder::ReverseCompletion)]
    {
        let opts = DriverOptions { request_queue_size: 8, indirect_desc, ..Default::default() };
        let (fake, iommu) = setup_with(device_config(), opts);
        fake.set_reorder(reorder);
        let d = attached(&iommu, 1);
        let before = iommu.counters();
        for i in 0..33_000u64 {
            let iova = 0x10_0000 + (i % 4) * 0x2000;
            d.map_pages(iova, 0x8000_0000 + i * 0x1000, 0x1000, RW).unwrap();
            d.map_pages(iova + 0x1000, 0x9000_0000, 0x1000, RW).unwrap();
            d.iotlb_sync_map(0, u64::MAX).unwrap();
            assert_eq!(d.iova_to_phys(iova), Some(0x8000_0000 + i * 0x1000));
            assert_eq!(d.unmap_pages(iova, 0x2000).unwrap(), 0x2000);
            d.iotlb_sync().unwrap();
        }
        // Past the wrap: the second of two MAPs fails, and only it.
        let reply = InjectReply::Status(Status::Inval);
        fake.inject_nth(1, Injection { request: Some(RequestType::Map), reply });
        d.map_pages(0x20_0000, 0x8000_0000, 0x1000, RW).unwrap();
        d.map_pages(0x20_1000, 0x8000_1000, 0x1000, RW).unwrap();
        assert!(matches!(d.iotlb_sync_map(0, u64::MAX), Err(Error::Device { .. })));
        assert_eq!(tree(&d), fake.mappings(d.id()));
        assert_eq!(tree(&d).len(), 1);
        let c = iommu.counters().since(&before);
        assert_eq!((c.map, c.unmap), (66_002, 33_000));
        assert_eq!(fake.stats().malformed, 0);
    }
}

/// A transport whose config generation moves on every read of it.
struct RestlessGeneration {
    inner: viommu_driver::fake::FakeTransport,
    generation: u32,
}

impl viommu_driver::Transport for RestlessGeneration {
    fn device_features(&mut self) -> u64 {
        self.inner.device_features()
    }
    fn set_driver_features(&mut self, features: u64) {
        self.inner.set_driver_features(features)
    }
    fn status(&mut self) -> u8 {
        self.inner.status()
    }
    fn set_status(&mut self, status: u8) {
        self.inner.set_status(status)
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.inner.max_queue_size(queue)
    }
    fn setup_queue(&mut self, queue: u16, size: u16, addrs: viommu_driver::QueueAddrs) {
        self.inner.setup_queue(queue, size, addrs)
    }
    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }
    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        self.inner.read_config(offset, buf)
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.inner.write_config(offset, data)
    }
    fn config_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1);
        self.generation
    }
}

/// A device whose config generation changes on every read makes init fail
/// with a typed error, within the read bound and well before the timeout.
#[test]
fn a_config_generation_that_never_settles_fails_init() {
    let fake = FakeDevice::default();
    let t = RestlessGeneration { inner: fake.transport(), generation: 0 };
    let hal = fake.hal();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = VirtioIommu::new(t, hal, DriverOptions::default()).map(|_| ());
        let _ = tx.send(r);
    });
    // The bound only ends a hang: init returns in microseconds.
    let r = rx.recv_timeout(Duration::from_secs(60)).expect("VirtioIommu::new never returned");
    assert_eq!(r, Err(Error::ConfigUnstable));
}

/// One `poll_events` takes at most `event_budget` event buffers; the rest
/// wait for the next call. The handler runs as records are taken: events
/// the device returns meanwhile (here, one per handled fault) are taken by
/// the same call, up to the budget.
#[test]
fn poll_events_takes_at_most_its_budget_and_hands_records_over_as_taken() {
    let opts = DriverOptions { event_budget: 5, ..Default::default() };
    let (fake, iommu) = setup_with(device_config(), opts);
    let ev =
        |ep: u32| FaultEvent { reason: fault::R_DOMAIN, endpoint: ep.into(), ..Default::default() };
    assert!((0..12).all(|i| fake.inject_fault(ev(i))));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    iommu.set_fault_handler(Some(Box::new(move |r| s.lock().unwrap().push(r.endpoint))));
    assert_eq!(iommu.poll_events().unwrap(), 5);
    assert_eq!(iommu.poll_events().unwrap(), 5);
    assert_eq!(iommu.poll_events().unwrap(), 2);
    assert_eq!(iommu.poll_events().unwrap(), 0);
    assert_eq!(*seen.lock().unwrap(), (0..12).collect::<Vec<u32>>());
    assert_eq!(iommu.counters().faults, 12);

    // A device that answers every handled fault with a new one: the handler
    // sees each before the next is taken, and the call stops at its budget.
    let (f2, s2) = (fake.clone(), seen.clone());
    s2.lock().unwrap().clear();
    iommu.set_fault_handler(Some(Box::new(move |r| {
        s2.lock().unwrap().push(r.endpoint);
        assert!(f2.inject_fault(ev(r.endpoint + 100)));
    })));
    assert!(fake.inject_fault(ev(0)));
    assert_eq!(iommu.poll_events().unwrap(), 5);
    assert_eq!(*seen.lock().unwrap(), [0, 100, 200, 300, 400]);
}
