//! The virtqueue path, driven from the driver side (rings laid out by `common::rings`):
//! batching and interrupts, malformed chains, the event queue, config space, reset.

mod common;
use common::*;
use viommu_device::{Access, DeviceConfig, Error, VirtioIommu, QUEUE_MAX_SIZE};
use viommu_proto::features::*;
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::FromBytes;

/// "Each notification drains every available chain, and raises at most one interrupt per
/// batch": 128 requests, one kick, one interrupt, 128 used entries with OK.
#[test]
fn one_kick_drains_batch_with_one_interrupt() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    let tails: Vec<u64> = (0..128u64)
        .map(|k| drv.submit(&map(1, k << 12, (k << 12) + 0xfff, k << 12, RW), 0))
        .collect();
    drv.set_used_event(0, 1); // the driver wants to hear about the next completion
    assert!(dev.process_request_queue(&mem).unwrap());
    let used = drv.take_used(0);
    assert_eq!(used.len(), 128);
    assert!(used.iter().all(|u| u.len == 4));
    assert!(tails.iter().all(|&t| drv.read(t, 1)[0] == 0));
    let c = dev.iommu().counters();
    assert_eq!((c.kicks, c.interrupts), (2, 2));
    assert_eq!(c.requests_of(RequestType::Map), 128);
    // The 129 used entries landed in the used ring only: the driver's used_event and its
    // available entries (chain k's head is descriptor 2k) read back as it wrote them.
    assert_eq!(Rings::read_u16(&mem, drv.rq.used_event_addr()), 1, "used_event");
    for k in 0..129u16 {
        let head = Rings::read_u16(&mem, drv.rq.avail_entry_addr(k));
        assert_eq!(head, (2 * k) % QSIZE, "available entry {k}");
    }
    // A kick with nothing available raises nothing.
    assert!(!dev.process_request_queue(&mem).unwrap());
}

/// The harness's rings are laid out as §2.7 requires, for every queue size the device
/// accepts: descriptor table, available ring (used_event included) and used ring
/// (avail_event included) are aligned and disjoint, and the two queues and the buffer area
/// do not overlap. (virtio-queue's mock layout fails this: rust-vmm/vm-virtio#400.)
#[test]
fn harness_rings_are_aligned_and_disjoint() {
    for size in (0..=QUEUE_MAX_SIZE.trailing_zeros()).map(|b| 1u16 << b) {
        let r = Rings::at(0x1_0000, size);
        let [desc, avail, used] = r.regions();
        assert_eq!((r.desc % 16, r.avail % 2, r.used % 4), (0, 0, 0), "size {size}");
        assert!(desc.1 <= avail.0 && avail.1 <= used.0, "size {size}: {:?}", r.regions());
        assert_eq!(r.used_event_addr() + 2, avail.1, "size {size}: used_event ends the ring");
    }
    let mem = new_mem();
    let drv = Driver::new(&mem);
    assert!(drv.rq.end() <= drv.eq.desc && drv.eq.end() <= DATA);
}

/// EVENT_IDX: no interrupt unless the batch crosses `used_event`.
#[test]
fn event_idx_suppresses_interrupts() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    drv.set_used_event(0, 100);
    drv.submit(&attach(1, 1), 0);
    assert!(!dev.process_request_queue(&mem).unwrap());
    drv.set_used_event(0, 1);
    drv.submit(&detach(1, 1), 0);
    assert!(dev.process_request_queue(&mem).unwrap());
    assert_eq!(drv.take_used(0).len(), 2);
    // Without EVENT_IDX every batch that used a buffer interrupts.
    let mut dev2 = VirtioIommu::new(cfg(&[1])).unwrap();
    dev2.ack_features(bit(VERSION_1) | bit(MAP_UNMAP));
    let mem2 = new_mem();
    let mut drv2 = Driver::new(&mem2);
    drv2.setup_queues(&mut dev2);
    drv2.set_used_event(0, 100);
    drv2.submit(&attach(1, 1), 0);
    assert!(dev2.process_request_queue(&mem2).unwrap());
}

/// Sends one good request and checks it is answered: the device keeps serving.
fn still_serving(drv: &mut Driver, dev: &mut VirtioIommu) {
    assert_eq!(drv.request(dev, &probe(1)), Status::Ok);
}

/// (address, length, flags) of one descriptor.
type Buf = (u64, u32, u16);

/// Malformed chains: each gets used length 0, nothing is executed, nothing is written,
/// and the next request is served.
#[test]
fn malformed_chains_get_used_len_zero() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let req = encode(&attach(1, 1));
    let r = drv.alloc(64);
    mem.write_slice(&req, GuestAddress(r)).unwrap();
    let w = drv.alloc(64);
    mem.write_slice(&[0xaa; 64], GuestAddress(w)).unwrap();
    let oob = MEM_SIZE as u64 - 2;
    let cases: Vec<(&str, Vec<Buf>)> = vec![
        ("readable too short", vec![(r, 10, 0), (w, 4, F_WRITE)]),
        ("no writable part", vec![(r, req.len() as u32, 0)]),
        ("writable shorter than tail", vec![(r, req.len() as u32, 0), (w, 3, F_WRITE)]),
        ("readable after writable", vec![(w, 4, F_WRITE), (r, req.len() as u32, 0)]),
        ("readable out of memory", vec![(oob, 20, 0), (w, 4, F_WRITE)]),
        ("writable out of memory", vec![(r, req.len() as u32, 0), (oob, 4, F_WRITE)]),
        ("readable past 2^64", vec![(u64::MAX - 3, 20, 0), (w, 4, F_WRITE)]),
        ("only writable", vec![(w, 4, F_WRITE)]),
    ];
    for (name, descs) in cases {
        let head = drv.push_chain(0, &descs);
        dev.process_request_queue(&mem).unwrap();
        assert_eq!(drv.take_used(0), vec![Used { id: head.into(), len: 0 }], "{name}");
        assert_eq!(dev.iommu().domain_count(), 0, "{name}");
        assert_eq!(drv.read(w, 4), vec![0xaa; 4], "{name}");
    }
    assert_eq!(dev.iommu().counters().malformed, 8);
    still_serving(&mut drv, &mut dev);
}

/// A chain that loops back on itself, one whose `next` points past the table, and one
/// whose head index is past the queue: the device stops walking, answers 0 (or skips the
/// head it cannot name), and keeps serving.
#[test]
fn looping_and_out_of_table_chains() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let r = drv.alloc(64);
    mem.write_slice(&encode(&attach(1, 1)), GuestAddress(r)).unwrap();
    // 200 -> 201 -> 200 -> ...
    drv.push_raw(0, 200, &[desc(r, 20, F_NEXT, 201), desc(r, 20, F_NEXT, 200)], 200);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0), vec![Used { id: 200, len: 0 }]);
    // next index past the table
    drv.push_raw(0, 210, &[desc(r, 20, F_NEXT, 9999)], 210);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0), vec![Used { id: 210, len: 0 }]);
    // head index past the table: no used entry can name it
    drv.make_available(0, QSIZE + 5);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0), vec![]);
    assert_eq!(dev.iommu().counters().malformed, 3);
    assert_eq!(dev.iommu().domain_count(), 0);
    still_serving(&mut drv, &mut dev);
}

/// Indirect descriptors are walked too (the device does not offer them, but tolerates them).
#[test]
fn indirect_chain_is_served() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let r = drv.alloc(64);
    mem.write_slice(&encode(&attach(1, 1)), GuestAddress(r)).unwrap();
    let w = drv.alloc(16);
    let table = drv.alloc(32);
    mem.write_obj(desc(r, 20, F_NEXT, 1), GuestAddress(table)).unwrap();
    mem.write_obj(desc(w, 4, F_WRITE, 0), GuestAddress(table + 16)).unwrap();
    drv.push_chain(0, &[(table, 32, 4 /* INDIRECT */)]);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0)[0].len, 4);
    assert_eq!(drv.read(w, 1)[0], 0);
    assert_eq!(dev.iommu().endpoint_domain(1), Some(1));
}

/// Request and reply split over many small descriptors are gathered and scattered.
#[test]
fn request_split_over_descriptors() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg_with_resv());
    let req = encode(&probe(1));
    let r = drv.alloc(128);
    mem.write_slice(&req, GuestAddress(r)).unwrap();
    let w = drv.alloc(1024);
    let mut descs: Vec<(u64, u32, u16)> = (0..req.len() as u64)
        .step_by(7)
        .map(|o| (r + o, 7.min(req.len() as u32 - o as u32), 0))
        .collect();
    descs.push((w, 100, F_WRITE));
    descs.push((w + 100, 416, F_WRITE));
    drv.push_chain(0, &descs);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0)[0].len, 516);
    let out = drv.read(w, 516);
    assert_eq!(&out[0..4], &[1, 0, 20, 0]);
    assert_eq!(out[512], 0);
}

/// The bad avail index (more than a queue ahead) is a broken driver: an error, no hang.
#[test]
fn bad_avail_index_is_an_error_not_a_hang() {
    let mem = new_mem();
    let drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    Rings::write_u16(&mem, drv.rq.avail_idx_addr(), QSIZE + 1);
    assert!(matches!(dev.process_request_queue(&mem), Err(Error::BadAvailIndex(0))));
}

/// A PROBE through the queue: properties then tail, used length probe_size + 4.
#[test]
fn probe_through_queue() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg_with_resv());
    let w = drv.submit(&probe(2), 512);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0), vec![Used { id: 0, len: 516 }]);
    let props = drv.read(w, 516);
    let Some(Ok(Property::ResvMem(r))) = PropertyIter::new(&props[..512]).next() else { panic!() };
    assert_eq!((r.subtype, r.start.get()), (probe::RESV_MEM_T_RESERVED, 0x8000_0000));
    assert_eq!(props[512], 0);
}

/// A PROBE answered NOENT through the queue: the used length covers probe_size bytes of
/// properties, and they are zeroes ("it SHOULD fill the remaining bytes of properties with
/// zeroes"), not the property the previous reply left in the device's reply buffer.
#[test]
fn probe_noent_through_queue_writes_zeroes_not_the_previous_reply() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg_with_resv());
    assert_eq!(drv.request(&mut dev, &probe(1)), Status::Ok);
    let w = drv.submit(&probe(9), 512);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(drv.take_used(0), vec![Used { id: 2, len: 516 }]);
    let reply = drv.read(w, 516);
    assert!(reply[..512].iter().all(|&b| b == 0), "{:x?}", &reply[..32]);
    assert_eq!(reply[512..], [Status::NoEnt as u8, 0, 0, 0]);
}

// ---- event queue ------------------------------------------------------------------------

/// A failed translation queues a fault event (reason, READ/WRITE/ADDRESS flags, endpoint,
/// address) that lands in the driver's next event buffer.
#[test]
fn fault_is_delivered_to_event_buffer() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let iommu = dev.iommu();
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert!(iommu.translate(1, 0x1234, 4, Access::Write).is_err());
    assert!(iommu.translate(2, 0x5000, 4, Access::Read).is_err());
    // No buffer yet: the events wait.
    assert!(!dev.process_event_queue(&mem).unwrap());
    assert_eq!(iommu.pending_faults(), 2);
    let b1 = drv.add_event_buffer(24);
    let b2 = drv.add_event_buffer(64);
    drv.set_used_event(1, 0);
    assert!(dev.process_event_queue(&mem).unwrap());
    assert_eq!(drv.take_used(1), vec![Used { id: 0, len: 24 }, Used { id: 1, len: 24 }]);
    let e1 = FaultEvent::read_from_bytes(&drv.read(b1, 24)).unwrap();
    assert_eq!(e1.reason, fault::R_MAPPING);
    assert_eq!(e1.flags.get(), fault::F_WRITE | fault::F_ADDRESS);
    assert_eq!((e1.endpoint.get(), e1.address.get()), (1, 0x1234));
    let e2 = FaultEvent::read_from_bytes(&drv.read(b2, 24)).unwrap();
    assert_eq!((e2.reason, e2.flags.get()), (fault::R_DOMAIN, fault::F_READ | fault::F_ADDRESS));
    assert_eq!(iommu.counters().faults_delivered, 2);
}

/// "If no buffer is available, the device can either wait for one to be consumed, or drop
/// the event": pending events are bounded; beyond, faults are counted as dropped. A flood
/// of faults of one kind from one endpoint is coalesced into one pending event.
#[test]
fn fault_flood_is_coalesced_and_bounded() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut c = cfg(&(0..100).collect::<Vec<_>>());
    c.limits.max_pending_faults = 4;
    let mut dev = drv.device(c);
    let iommu = dev.iommu();
    for a in 0..1000u64 {
        let _ = iommu.translate(7, a * 64, 64, Access::Read);
    }
    assert_eq!(iommu.pending_faults(), 1);
    for ep in 0..10 {
        let _ = iommu.translate(ep, 0, 64, Access::Write);
    }
    assert_eq!(iommu.pending_faults(), 4);
    let c = iommu.counters();
    assert_eq!((c.faults_raised, c.faults_coalesced, c.faults_dropped), (1010, 999, 7));
    // A too-small buffer is returned with used length 0 and the event stays.
    drv.add_event_buffer(16);
    drv.add_event_buffer(24);
    dev.process_event_queue(&mem).unwrap();
    assert_eq!(drv.take_used(1), vec![Used { id: 0, len: 0 }, Used { id: 1, len: 24 }]);
    assert_eq!(iommu.pending_faults(), 3);
}

// ---- config, features, reset ------------------------------------------------------------

#[test]
fn features_offered_as_configured() {
    let dev = VirtioIommu::new(cfg(&[1])).unwrap();
    let f = dev.device_features();
    for b in [
        VERSION_1,
        RING_EVENT_IDX,
        INPUT_RANGE,
        DOMAIN_RANGE,
        MAP_UNMAP,
        PROBE,
        MMIO,
        BYPASS_CONFIG,
        RING_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit(b), 0, "bit {b}");
    }
    assert_eq!(f & (bit(BYPASS) | bit(ACCESS_PLATFORM)), 0);
    let mut c = cfg(&[1]);
    c.features = viommu_device::OfferedFeatures {
        input_range: false,
        domain_range: false,
        probe: false,
        mmio: false,
        bypass_config: false,
        legacy_bypass: true,
        access_platform: true,
        map_unmap: true,
        indirect_desc: false,
        attach_table: false,
    };
    let f = VirtioIommu::new(c.clone()).unwrap().device_features();
    assert_eq!(
        f,
        bit(VERSION_1) | bit(RING_EVENT_IDX) | bit(MAP_UNMAP) | bit(BYPASS) | bit(ACCESS_PLATFORM)
    );
    // "Devices SHOULD NOT offer both VIRTIO_IOMMU_F_BYPASS and VIRTIO_IOMMU_F_BYPASS_CONFIG."
    c.features.bypass_config = true;
    assert!(matches!(VirtioIommu::new(c), Err(Error::Config(_))));
}

#[test]
fn config_space_reads_what_the_vmm_chose() {
    let c = DeviceConfig {
        page_size_mask: 0x20_1000,
        input_range: (0x1000, 0xffff_ffff),
        domain_range: (1, 77),
        probe_size: 256,
        bypass: true,
        ..cfg(&[1])
    };
    let dev = VirtioIommu::new(c).unwrap();
    let mut b = [0u8; 40];
    dev.read_config(0, &mut b);
    let cs = Config::read_from_bytes(&b).unwrap();
    assert_eq!(cs.page_size_mask.get(), 0x20_1000);
    assert_eq!((cs.input_start.get(), cs.input_end.get()), (0x1000, 0xffff_ffff));
    assert_eq!((cs.domain_start.get(), cs.domain_end.get()), (1, 77));
    assert_eq!((cs.probe_size.get(), cs.bypass), (256, 1));
    // Partial and out-of-range reads.
    let mut one = [0xffu8; 4];
    dev.read_config(38, &mut one);
    assert_eq!(one, [0, 0, 0, 0]);
    dev.read_config(u64::MAX, &mut one);
    assert_eq!(one, [0; 4]);
}

/// "When the VIRTIO_IOMMU_F_BYPASS_CONFIG feature is negotiated, the driver MAY write to
/// bypass. The driver MUST NOT write to any other device configuration field." / "The driver
/// MUST NOT write a value different than 0 or 1 to bypass." / "Field bypass SHOULD NOT
/// change on device reset."
#[test]
fn only_bypass_is_writable_and_sticky_across_reset() {
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    assert!(!dev.write_config(36, &[1]), "not negotiated yet");
    dev.ack_features(bit(VERSION_1) | bit(BYPASS_CONFIG));
    assert!(!dev.write_config(0, &[0xff]));
    assert!(!dev.write_config(36, &[2]));
    assert!(!dev.write_config(37, &[1]));
    assert!(dev.write_config(36, &[1]));
    let mut b = [0u8; 40];
    dev.read_config(0, &mut b);
    assert_eq!(b[0], 0, "page_size_mask low byte untouched (0x...000)");
    assert_eq!(b[36], 1);
    let iommu = dev.iommu();
    assert!(iommu.translate(1, 0x1000, 4, Access::Write).is_ok(), "global bypass");
    dev.reset();
    dev.read_config(36, &mut b[..1]);
    assert_eq!(b[0], 1);
    assert!(iommu.translate(1, 0x1000, 4, Access::Write).is_ok());
}

/// "When the device is reset, endpoints are not attached to any domain." Mappings go too.
#[test]
fn reset_clears_domains_and_mappings() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0, 0xfff, 0x1000, RW)), Status::Ok);
    let iommu = dev.iommu();
    assert!(iommu.translate(1, 0, 4, Access::Read).is_ok());
    dev.reset();
    assert_eq!(iommu.domain_count(), 0);
    assert_eq!(iommu.endpoint_domain(1), None);
    assert!(iommu.translate(1, 0, 4, Access::Read).is_err());
    assert_eq!(dev.acked_features(), 0);
    // The driver re-initialises and the device serves again.
    let f = dev.device_features();
    dev.ack_features(f);
    let mem2 = new_mem();
    let mut drv2 = Driver::new(&mem2);
    drv2.setup_queues(&mut dev);
    assert_eq!(drv2.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(iommu.mappings(1), Some(vec![]));
}

/// The fault notifier fires once per queued event (not for coalesced or dropped faults), so
/// the VMM knows when to run the event queue; with EVENT_IDX, event delivery interrupts
/// only when the driver asked.
#[test]
fn fault_notifier_and_event_interrupts() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let iommu = dev.iommu();
    let rings = Arc::new(AtomicUsize::new(0));
    let r = rings.clone();
    iommu.set_fault_notifier(Some(Arc::new(move || {
        r.fetch_add(1, Ordering::Relaxed);
    })));
    for _ in 0..5 {
        let _ = iommu.translate(1, 0, 8, Access::Read);
    }
    let _ = iommu.translate(2, 0, 8, Access::Read);
    assert_eq!(rings.load(Ordering::Relaxed), 2);
    drv.add_event_buffer(24);
    drv.set_used_event(1, 5);
    assert!(!dev.process_event_queue(&mem).unwrap(), "used_event not reached");
    drv.add_event_buffer(24);
    drv.set_used_event(1, 1);
    assert!(dev.process_event_queue(&mem).unwrap());
    assert_eq!(drv.take_used(1).len(), 2);
    assert_eq!(iommu.pending_faults(), 0);
}

/// virtio-queue refuses a queue whose available ring sits at guest-physical address 0
/// (it takes 0 for "not set up"). A driver may legally put it there; the device then fails
/// loudly (`Err`, so the VMM sets DEVICE_NEEDS_RESET) rather than ignoring the requests.
/// docs/device.md lists this quirk.
#[test]
fn avail_ring_at_address_zero_fails_loudly() {
    let mem = new_mem();
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    let f = dev.device_features();
    dev.ack_features(f);
    let (avail, desc_table, used, req, tail) = (0u64, 0x1000u64, 0x2000u64, 0x3000u64, 0x3100u64);
    dev.set_queue(0, 16, desc_table, avail, used).unwrap();
    dev.set_queue(1, 16, 0x4000, 0x5000, 0x6000).unwrap();
    dev.activate().unwrap();
    mem.write_slice(&encode(&attach(1, 1)), GuestAddress(req)).unwrap();
    mem.write_obj(desc(req, 20, F_NEXT, 1), GuestAddress(desc_table)).unwrap();
    mem.write_obj(desc(tail, 4, F_WRITE, 0), GuestAddress(desc_table + 16)).unwrap();
    mem.write_obj(0u16, GuestAddress(avail + 4)).unwrap();
    mem.write_obj(1u16, GuestAddress(avail + 2)).unwrap();
    assert!(dev.process_request_queue(&mem).is_err());
    assert_eq!(dev.iommu().endpoint_domain(1), None);
}
