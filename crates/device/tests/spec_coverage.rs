//! Device-normative sentences of §5.13 that `spec_rules.rs`, `queue.rs` and `translate.rs`
//! did not check yet, each driven through the virtqueue path (virtio-queue's mock layout)
//! and quoting its sentence. docs/spec-coverage.md maps every sentence to its test.

mod common;
use common::*;
use viommu_device::{
    Access, DeviceConfig, DeviceState, EndpointConfig, Error, Limits, ResvRegion, VirtioIommu,
};
use viommu_proto::features::{bit, BYPASS_CONFIG, MAP_UNMAP, VERSION_1};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};

/// Sends raw request bytes with a writable part of `wlen` bytes (filled with 0xaa); returns
/// the used length and the writable bytes afterwards.
fn raw(drv: &mut Driver, dev: &mut VirtioIommu, bytes: &[u8], wlen: u32) -> (u32, Vec<u8>) {
    let w = drv.submit_bytes(bytes, wlen);
    dev.process_request_queue(drv.mem).unwrap();
    let used = drv.take_used(0);
    assert_eq!(used.len(), 1);
    (used[0].len, drv.read(w, wlen as usize))
}

fn config_bytes(dev: &VirtioIommu) -> [u8; 40] {
    let mut b = [0u8; 40];
    dev.read_config(0, &mut b);
    b
}

// ---- configuration ----------------------------------------------------------------------

/// "The device MUST set at least one bit in page_size_mask, describing the page
/// granularity. The device MAY set more than one bit in page_size_mask." The lowest set bit
/// is the granule; the others are hints and do not make MAP stricter.
#[test]
fn page_size_mask_has_a_bit_and_the_lowest_is_the_granule() {
    assert!(matches!(
        VirtioIommu::new(DeviceConfig { page_size_mask: 0, ..cfg(&[1]) }),
        Err(Error::Config(_))
    ));
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(DeviceConfig { page_size_mask: 0x4020_1000, ..cfg(&[1]) });
    assert_eq!(u64::from_le_bytes(config_bytes(&dev)[..8].try_into().unwrap()), 0x4020_1000);
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0x3000, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x2800, 0x37ff, 0x3000, RW)), Status::Range);
}

/// "If the device offers the VIRTIO_IOMMU_F_BYPASS_CONFIG feature, it MAY initialize the
/// bypass field to 1. Field bypass SHOULD NOT change on device reset, but SHOULD be
/// restored to its initial value on system reset."
#[test]
fn bypass_kept_on_device_reset_restored_on_system_reset() {
    for initial in [false, true] {
        let mem = new_mem();
        let drv = Driver::new(&mem);
        let mut dev = drv.device(DeviceConfig { bypass: initial, ..cfg(&[1]) });
        assert_eq!(config_bytes(&dev)[36], u8::from(initial));
        assert!(dev.write_config(36, &[u8::from(!initial)]));
        dev.reset();
        assert_eq!(config_bytes(&dev)[36], u8::from(!initial), "device reset keeps it");
        dev.system_reset();
        assert_eq!(config_bytes(&dev)[36], u8::from(initial), "system reset restores it");
        assert_eq!(dev.iommu().translate(1, 0x1000, 4, Access::Read).is_ok(), initial);
    }
}

/// "The device MUST NOT present a value different than 0 or 1 in bypass", whatever the
/// driver writes (one byte or four) or a snapshot holds.
#[test]
fn bypass_reads_only_zero_or_one() {
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    dev.ack_features(bit(VERSION_1) | bit(BYPASS_CONFIG));
    let writes: [&[u8]; 8] =
        [&[2], &[0xff], &[1, 1, 0, 0], &[3, 0, 0, 0], &[1, 0, 0, 1], &[1, 0], &[1], &[0, 0, 0, 0]];
    for w in writes {
        dev.write_config(36, w);
        let mut b = [0u8; 4];
        dev.read_config(36, &mut b);
        assert!(b[0] <= 1 && b[1..] == [0, 0, 0], "after writing {w:?}: {b:?}");
    }
    let mut b = [0u8; 1];
    dev.read_config(36, &mut b);
    assert_eq!(b[0], 0, "the last write was 0");
}

/// "If the feature is not offered, virtual mappings span over the whole 64-bit address
/// space (start = 0, end = 0xffffffff ffffffff)": without INPUT_RANGE the configured range
/// neither shows nor limits MAP.
#[test]
fn without_input_range_mappings_span_64_bits() {
    let mut c = DeviceConfig { input_range: (0x1000, 0xffff), ..cfg(&[1]) };
    c.features.input_range = false;
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(c);
    let b = config_bytes(&dev);
    assert_eq!(u64::from_le_bytes(b[8..16].try_into().unwrap()), 0);
    assert_eq!(u64::from_le_bytes(b[16..24].try_into().unwrap()), u64::MAX);
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, u64::MAX - 0xfff, u64::MAX, 0x1000, RW)), Status::Ok);
    assert!(dev.iommu().translate(1, u64::MAX - 3, 4, Access::Read).is_ok());
}

// ---- requests in general ----------------------------------------------------------------

/// "If a request type is not recognized, the device SHOULD NOT write the buffer and SHOULD
/// set the used length to zero." Through the queue, with a tail-sized and a PROBE-sized
/// writable part: used length 0, the driver's bytes untouched, the device keeps serving.
#[test]
fn unknown_request_type_is_returned_unwritten_through_the_queue() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    for ty in [0u8, 6, 0x80, 0xff] {
        for wlen in [4, 516] {
            let (len, w) = raw(&mut drv, &mut dev, &[ty, 0, 0, 0, 1, 0, 0, 0], wlen);
            assert_eq!(len, 0, "type {ty}, {wlen} writable bytes");
            assert!(w.iter().all(|&b| b == 0xaa), "type {ty}, {wlen} writable bytes");
        }
    }
    assert_eq!(dev.iommu().domain_count(), 0);
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
}

/// "The device MUST ignore field reserved of struct virtio_iommu_req_head and SHOULD set
/// field reserved of struct virtio_iommu_req_tail to zero." "The device SHOULD set status
/// to VIRTIO_IOMMU_S_OK if a request succeeds."
#[test]
fn head_reserved_ignored_and_tail_reserved_zeroed_through_the_queue() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let mut req = encode(&attach(1, 1));
    req[1..4].copy_from_slice(&[0xde, 0xad, 0xff]);
    let (len, tail) = raw(&mut drv, &mut dev, &req, 4);
    assert_eq!((len, tail), (4, vec![0, 0, 0, 0]));
    assert_eq!(dev.iommu().endpoint_domain(1), Some(1));
    // A failing request zeroes the tail's reserved bytes too.
    let (_, tail) = raw(&mut drv, &mut dev, &encode(&attach(1, 9)), 4);
    assert_eq!(tail, vec![Status::NoEnt as u8, 0, 0, 0]);
}

// ---- ATTACH -----------------------------------------------------------------------------

/// "If another endpoint is already attached to the domain identified by domain, then the
/// device MAY attach the endpoint identified by endpoint to the domain. If it cannot do so,
/// the device MUST reject the request and set status to VIRTIO_IOMMU_S_UNSUPP." The
/// device can, up to `Limits::max_endpoints`; beyond, UNSUPP, and an endpoint being moved
/// stays where it was ("If the device cannot do so, it MUST reject the request and set
/// status to VIRTIO_IOMMU_S_UNSUPP").
#[test]
fn attach_to_a_full_domain_is_unsupp() {
    let limits = Limits { max_endpoints: 2, ..Limits::default() };
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(DeviceConfig { limits, ..cfg(&[1, 2, 3]) });
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok, "MAY attach: it does");
    assert_eq!(drv.request(&mut dev, &attach(2, 3)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(2, 0, 0xfff, 0, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 3)), Status::Unsupp);
    let iommu = dev.iommu();
    assert_eq!(iommu.endpoint_domain(3), Some(2));
    assert!(iommu.translate(3, 0, 4, Access::Read).is_ok(), "still in its old domain");
}

/// "A device that does not reject the request MUST attach the endpoint": every OK ATTACH
/// leaves the endpoint translating through that domain (new domain, existing domain, move).
#[test]
fn attach_not_rejected_attaches() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1, 2]));
    let iommu = dev.iommu();
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0xa000, RW)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &attach(1, 2)), Status::Ok);
    assert_eq!(iommu.translate(2, 0x1004, 4, Access::Read).unwrap().segments()[0].addr, 0xa004);
    assert_eq!(drv.request(&mut dev, &attach(2, 1)), Status::Ok);
    assert_eq!(iommu.endpoint_domain(1), Some(2));
    assert!(iommu.translate(1, 0x1004, 4, Access::Read).is_err(), "new, empty domain");
}

// ---- UNMAP ------------------------------------------------------------------------------

/// "If the reserved field of an UNMAP request is not zero, the device MAY set the request
/// status to VIRTIO_IOMMU_S_INVAL, in which case the device MAY perform the UNMAP
/// operation." The device takes neither option: it ignores the field, unmaps, answers OK.
#[test]
fn unmap_reserved_is_ignored() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    let mut req = encode(&unmap(1, 0x1000, 0x1fff));
    let n = req.len();
    req[n - 4..].copy_from_slice(&[1, 2, 3, 4]);
    assert_eq!(raw(&mut drv, &mut dev, &req, 4), (4, vec![0, 0, 0, 0]));
    assert_eq!(dev.iommu().mappings(1), Some(vec![]));
}

// ---- PROBE ------------------------------------------------------------------------------

/// "The device MUST ignore field reserved of a PROBE request."
#[test]
fn probe_reserved_is_ignored() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg_with_resv());
    let clean = raw(&mut drv, &mut dev, &encode(&probe(1)), 516);
    let mut req = encode(&probe(1));
    req[8..].fill(0xff);
    let dirty = raw(&mut drv, &mut dev, &req, 516);
    assert_eq!(clean.0, 516);
    assert_eq!(clean, dirty);
    assert_eq!(dirty.1[512], Status::Ok as u8);
}

/// "The device SHOULD set field reserved of a property to zero." (the header's bits 12-15)
/// / "The device SHOULD set reserved to zero." (RESV_MEM) / "The device MUST write the size
/// of a property without the struct virtio_iommu_probe_property header" / "When two
/// properties follow each other, the device MUST put the second property exactly
/// (length + 4) bytes after the beginning of the first one." Checked on the bytes the
/// driver receives, over a buffer pre-filled with 0xaa.
#[test]
fn probe_properties_have_zero_reserved_fields_on_the_wire() {
    let mut c = cfg_with_resv();
    c.endpoints[0].resv.push(ResvRegion::reserved(0x1000, 0x1fff));
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(c);
    let (len, out) = raw(&mut drv, &mut dev, &encode(&probe(1)), 516);
    assert_eq!(len, 516);
    for (k, (subtype, start, end)) in
        [(1u8, 0xfee0_0000u64, 0xfeef_ffffu64), (0, 0x1000, 0x1fff)].into_iter().enumerate()
    {
        let p = &out[24 * k..24 * (k + 1)];
        let head = u16::from_le_bytes([p[0], p[1]]);
        assert_eq!((head & 0xfff, head >> 12), (probe::T_RESV_MEM, 0), "property {k}");
        assert_eq!(u16::from_le_bytes([p[2], p[3]]), 20, "length without header");
        assert_eq!(p[4], subtype);
        assert_eq!(&p[5..8], &[0, 0, 0], "RESV_MEM reserved");
        assert_eq!(u64::from_le_bytes(p[8..16].try_into().unwrap()), start);
        assert_eq!(u64::from_le_bytes(p[16..24].try_into().unwrap()), end);
    }
    assert!(out[48..512].iter().all(|&b| b == 0), "zero padding, type 0 ends the list");
    assert_eq!(&out[512..], &[0, 0, 0, 0]);
}

/// "The device SHOULD NOT present more than one VIRTIO_IOMMU_RESV_MEM_T_MSI property per
/// endpoint." / "The device SHOULD NOT present multiple RESV_MEM properties that overlap
/// each other for the same endpoint." The VMM cannot configure either.
#[test]
fn resv_mem_at_most_one_msi_and_no_overlap() {
    let with = |resv: &[ResvRegion]| DeviceConfig {
        endpoints: vec![EndpointConfig { id: 1, resv: resv.to_vec() }],
        ..DeviceConfig::default()
    };
    let two_msi = [ResvRegion::msi(0x1000, 0x1fff), ResvRegion::msi(0x3000, 0x3fff)];
    assert!(VirtioIommu::new(with(&two_msi)).is_err());
    let overlap = [ResvRegion::reserved(0x1000, 0x2fff), ResvRegion::msi(0x2000, 0x3fff)];
    assert!(VirtioIommu::new(with(&overlap)).is_err());
    let empty = [ResvRegion::reserved(0x2000, 0x1fff)];
    assert!(VirtioIommu::new(with(&empty)).is_err());
    let fine = [ResvRegion::reserved(0x1000, 0x1fff), ResvRegion::msi(0x2000, 0x3fff)];
    assert!(VirtioIommu::new(with(&fine)).is_ok());
}

// ---- fault reporting --------------------------------------------------------------------

/// "The device SHOULD set reserved and reserved1 to zero." / "The device SHOULD set
/// undefined flags to zero." / "The device SHOULD write a valid endpoint ID in endpoint":
/// an access by an endpoint the device does not manage queues no event.
#[test]
fn fault_event_fields_on_the_wire() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let iommu = dev.iommu();
    assert!(iommu.translate(77, 0x1000, 4, Access::Write).is_err());
    assert_eq!(iommu.pending_faults(), 0, "unknown endpoint: no event");
    assert!(iommu.translate(1, 0x1234_5678_9000, 4, Access::ReadWrite).is_err());
    let b = drv.add_event_buffer(32);
    mem.write_slice(&[0xaa; 32], GuestAddress(b)).unwrap();
    dev.process_event_queue(&mem).unwrap();
    assert_eq!(drv.take_used(1), vec![Used { id: 0, len: 24 }]);
    let ev = drv.read(b, 32);
    assert_eq!(ev[0], fault::R_DOMAIN);
    assert_eq!(&ev[1..4], &[0, 0, 0], "reserved");
    let flags = u32::from_le_bytes(ev[4..8].try_into().unwrap());
    assert_eq!(flags, fault::F_READ | fault::F_WRITE | fault::F_ADDRESS, "no undefined flag");
    assert_eq!(u32::from_le_bytes(ev[8..12].try_into().unwrap()), 1);
    assert_eq!(&ev[12..16], &[0, 0, 0, 0], "reserved1");
    assert_eq!(u64::from_le_bytes(ev[16..24].try_into().unwrap()), 0x1234_5678_9000);
    assert_eq!(&ev[24..], &[0xaa; 8], "nothing written past the event");
}

/// "If a buffer is too small to contain the fault report, the device SHOULD NOT use
/// multiple buffers to describe it." Two 12-byte buffers are each returned with used
/// length 0 and the event waits; one buffer made of two 12-byte descriptors holds it.
#[test]
fn fault_event_never_split_over_buffers() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let iommu = dev.iommu();
    assert!(iommu.translate(1, 0x1000, 4, Access::Read).is_err());
    drv.add_event_buffer(12);
    drv.add_event_buffer(12);
    dev.process_event_queue(&mem).unwrap();
    assert_eq!(drv.take_used(1), vec![Used { id: 0, len: 0 }, Used { id: 1, len: 0 }]);
    assert_eq!(iommu.pending_faults(), 1);
    let b = drv.alloc(24);
    let head = drv.push_chain(1, &[(b, 12, F_WRITE), (b + 12, 12, F_WRITE)]);
    dev.process_event_queue(&mem).unwrap();
    assert_eq!(drv.take_used(1), vec![Used { id: head.into(), len: 24 }]);
    assert_eq!(iommu.pending_faults(), 0);
}

/// "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated":
/// through the queue, MAP and UNMAP without it are UNSUPP and change nothing.
#[test]
fn map_without_map_unmap_negotiated_is_unsupp_through_the_queue() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    dev.ack_features(bit(VERSION_1));
    drv.setup_queues(&mut dev);
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::Unsupp);
    assert_eq!(drv.request(&mut dev, &unmap(1, 0, 0xfff)), Status::Unsupp);
    assert_eq!(dev.iommu().mappings(1), Some(vec![]));
    dev.ack_features(bit(VERSION_1) | bit(MAP_UNMAP));
    assert_eq!(drv.request(&mut dev, &map(1, 0, 0xfff, 0, RW)), Status::Ok);
}

/// One change to a snapshot.
type Edit = Box<dyn Fn(&mut DeviceState)>;

/// Restoring is not a way around the rules: a snapshot whose state no request sequence
/// could build (limits, ranges, alignment, flags, reserved regions, faults, queue sizes) is
/// refused, and the device is left reset rather than half restored.
#[test]
fn restore_refuses_states_requests_cannot_build() {
    let c = DeviceConfig {
        input_range: (0, 0xff_ffff),
        domain_range: (0, 9),
        limits: Limits {
            max_domains: 2,
            max_endpoints: 1,
            max_mappings_per_domain: 2,
            max_mappings_total: 3,
            max_pending_faults: 2,
        },
        ..cfg_with_resv()
    };
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(c.clone());
    assert_eq!(drv.request(&mut dev, &attach(1, 3)), Status::Ok);
    assert_eq!(drv.request(&mut dev, &map(1, 0x1000, 0x1fff, 0x1000, RW)), Status::Ok);
    assert!(dev.iommu().translate(4, 0, 1, Access::Read).is_err());
    let good = dev.snapshot();
    let m = |start: u64, end: u64, phys: u64, flags: u32| viommu_device::Mapping {
        start,
        end,
        phys,
        flags,
    };
    let edits: Vec<(&str, Edit)> = vec![
        ("misaligned start", Box::new(move |s| s.domains[0].mappings[0] = m(0x1800, 0x1fff, 0, 1))),
        ("misaligned phys", Box::new(move |s| s.domains[0].mappings[0].phys = 0x10)),
        ("misaligned end", Box::new(move |s| s.domains[0].mappings[0].end = 0x1ffe)),
        (
            "outside input_range",
            Box::new(move |s| s.domains[0].mappings[0] = m(1 << 24, (1 << 24) + 0xfff, 0, 1)),
        ),
        ("unknown flag", Box::new(move |s| s.domains[0].mappings[0].flags = 8)),
        ("domain outside domain_range", Box::new(|s| s.domains[0].id = 10)),
        ("too many endpoints", Box::new(|s| s.domains[0].endpoints.push(4))),
        (
            "too many mappings",
            Box::new(move |s| {
                s.domains[0].mappings.push(m(0x2000, 0x2fff, 0, 1));
                s.domains[0].mappings.push(m(0x3000, 0x3fff, 0, 1));
            }),
        ),
        (
            "too many domains",
            Box::new(|s| {
                for (id, ep) in [(2, 1), (3, 2)] {
                    let mut d = s.domains[0].clone();
                    (d.id, d.endpoints, d.mappings) = (id, vec![ep], vec![]);
                    s.domains.push(d);
                }
            }),
        ),
        (
            "mapping over a reserved region",
            Box::new(move |s| {
                s.domains[0].endpoints = vec![2];
                s.domains[0].mappings[0] = m(0x8000_0000, 0x8000_0fff, 0, 1);
            }),
        ),
        ("fault of an unknown endpoint", Box::new(|s| s.faults[0].endpoint = 99)),
        ("fault with a bad reason", Box::new(|s| s.faults[0].reason = 9)),
        ("duplicate faults", Box::new(|s| s.faults.push(s.faults[0]))),
        (
            "too many faults",
            Box::new(|s| {
                for e in [1, 2] {
                    s.faults.push(viommu_device::PendingFault { endpoint: e, ..s.faults[0] });
                }
            }),
        ),
        (
            "queue larger than the device's",
            Box::new(|s| (s.queues[0].max_size, s.queues[0].size) = (4096, 4096)),
        ),
        ("a feature this device does not offer", Box::new(|s| s.acked_features |= 1 << 63)),
        ("a queue size that is not a power of two", Box::new(|s| s.queues[1].size = 100)),
    ];
    let reset = VirtioIommu::new(c.clone()).unwrap().snapshot();
    for (what, edit) in edits {
        let mut bad = good.clone();
        edit(&mut bad);
        // Refused by a device in service (features, ready queues that have moved, a
        // domain): afterwards it is exactly a reset device, and its queues serve nothing.
        let mem = new_mem();
        let mut drv = Driver::new(&mem);
        let mut running = drv.device(c.clone());
        assert_eq!(drv.request(&mut running, &attach(2, 4)), Status::Ok);
        assert!(running.restore(bad).is_err(), "{what}");
        assert_eq!(running.snapshot(), reset, "{what}: left reset");
        assert!(running.process_request_queue(&mem).is_err(), "{what}: queue not ready");
    }
    let mut fresh = VirtioIommu::new(c).unwrap();
    fresh.restore(good.clone()).unwrap();
    assert_eq!(fresh.snapshot(), good);
}

/// The MUST rules on reserved fields and flags, through the queue: the bytes the guest
/// wrote reach the rule (the wire parser does not refuse them first, which would answer
/// with used length 0 instead of the status the spec requires).
/// "If the reserved field of an ATTACH request is not zero, the device MUST reject the
/// request and set status to VIRTIO_IOMMU_S_INVAL." / "If the device does not recognize a
/// flags bit, it MUST reject the request and set status to VIRTIO_IOMMU_S_INVAL." (ATTACH
/// and MAP) / "The device MUST ignore reserved." (DETACH)
#[test]
fn reserved_fields_and_flags_reach_their_rules_through_the_queue() {
    let mem = new_mem();
    let mut drv = Driver::new(&mem);
    let mut dev = drv.device(cfg(&[1]));
    let mut a = encode(&attach(1, 1));
    a[16] = 1; // reserved[0]
    assert_eq!(raw(&mut drv, &mut dev, &a, 4), (4, vec![Status::Inval as u8, 0, 0, 0]));
    let a = encode(&attach_flags(1, 1, 1 << 7));
    assert_eq!(raw(&mut drv, &mut dev, &a, 4), (4, vec![Status::Inval as u8, 0, 0, 0]));
    assert_eq!(dev.iommu().endpoint_domain(1), None);
    assert_eq!(drv.request(&mut dev, &attach(1, 1)), Status::Ok);
    let m = encode(&map(1, 0, 0xfff, 0, RW | 1 << 31));
    assert_eq!(raw(&mut drv, &mut dev, &m, 4), (4, vec![Status::Inval as u8, 0, 0, 0]));
    assert_eq!(dev.iommu().mappings(1), Some(vec![]));
    let mut d = encode(&detach(1, 1));
    d[12..20].fill(0xff);
    assert_eq!(raw(&mut drv, &mut dev, &d, 4), (4, vec![0, 0, 0, 0]));
    assert_eq!(dev.iommu().endpoint_domain(1), None);
}
