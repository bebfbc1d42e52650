//! One test per normative rule of §5.13 (virtio 1.3), each quoting the sentence it checks.
//! Requests go straight to `Iommu::execute`; the virtqueue path is covered in `queue.rs`.

mod common;
use common::*;
use viommu_device::{Access, DeviceConfig, FaultKind, Iommu, Limits, VirtioIommu};
use viommu_proto::features::{bit, BYPASS_CONFIG, MMIO, VERSION_1};
use viommu_proto::*;

fn iommu(cfg: DeviceConfig) -> Iommu {
    Iommu::new(cfg).unwrap()
}

fn exec(i: &Iommu, r: Request) -> Status {
    i.execute(&r, &mut [])
}

/// Builds state: endpoints 1..=4 of `cfg_with_resv`, endpoint 3 attached to domain 1 with
/// one mapping [0x10000, 0x1ffff].
fn setup() -> Iommu {
    let i = iommu(cfg_with_resv());
    assert_eq!(exec(&i, attach(1, 3)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x10000, 0x1ffff, 0x50000, RW)), Status::Ok);
    i
}

// ---- ATTACH -----------------------------------------------------------------------------

/// "If the reserved field of an ATTACH request is not zero, the device MUST reject the
/// request and set status to VIRTIO_IOMMU_S_INVAL."
#[test]
fn attach_reserved_nonzero_is_inval() {
    let i = iommu(cfg(&[1]));
    let Request::Attach(mut b) = attach(1, 1) else { unreachable!() };
    b.reserved = [0, 0, 1, 0];
    assert_eq!(exec(&i, Request::Attach(b)), Status::Inval);
    assert_eq!(i.endpoint_domain(1), None);
}

/// "If the device does not recognize a flags bit, it MUST reject the request and set status
/// to VIRTIO_IOMMU_S_INVAL." F_BYPASS is not recognised unless BYPASS_CONFIG is negotiated.
#[test]
fn attach_unknown_flags_is_inval() {
    let i = iommu(cfg(&[1]));
    assert_eq!(exec(&i, attach_flags(1, 1, 2)), Status::Inval);
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    dev.ack_features(bit(VERSION_1) | features_min() & !bit(BYPASS_CONFIG));
    let i = dev.iommu();
    assert_eq!(i.execute(&attach_flags(1, 1, ATTACH_F_BYPASS), &mut []), Status::Inval);
    assert_eq!(i.domain_count(), 0);
}

/// "If the endpoint identified by endpoint doesn't exist, the device MUST reject the request
/// and set status to VIRTIO_IOMMU_S_NOENT."
#[test]
fn attach_unknown_endpoint_is_noent() {
    let i = iommu(cfg(&[1]));
    assert_eq!(exec(&i, attach(1, 2)), Status::NoEnt);
    assert_eq!(i.domain_count(), 0);
}

/// "If the VIRTIO_IOMMU_F_DOMAIN_RANGE feature is offered, domain_range describes the values
/// supported in a domain field": a domain outside it is out of range.
#[test]
fn attach_domain_outside_domain_range_is_range() {
    let i = iommu(DeviceConfig { domain_range: (1, 10), ..cfg(&[1]) });
    assert_eq!(exec(&i, attach(0, 1)), Status::Range);
    assert_eq!(exec(&i, attach(11, 1)), Status::Range);
    assert_eq!(exec(&i, attach(10, 1)), Status::Ok);
    // Without the feature, any domain value is valid.
    let mut c = cfg(&[1]);
    c.features.domain_range = false;
    let i = iommu(DeviceConfig { domain_range: (1, 10), ..c });
    assert_eq!(exec(&i, attach(u32::MAX, 1)), Status::Ok);
}

/// "If the domain already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent
/// with that domain, the device SHOULD reject the request and set status to
/// VIRTIO_IOMMU_S_INVAL."
#[test]
fn attach_bypass_flag_mismatch_is_inval() {
    let i = iommu(cfg(&[1, 2, 3]));
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, attach_flags(1, 2, ATTACH_F_BYPASS)), Status::Inval);
    assert_eq!(exec(&i, attach_flags(2, 2, ATTACH_F_BYPASS)), Status::Ok);
    assert_eq!(exec(&i, attach(2, 3)), Status::Inval);
    assert_eq!(i.endpoint_domain(2), Some(2));
    assert_eq!(i.endpoint_domain(3), None);
}

/// "If the endpoint identified by endpoint is already attached to another domain, then the
/// device SHOULD first detach it from that domain and attach it to the one identified by
/// domain. In that case the device SHOULD behave as if the driver issued a DETACH request
/// with this endpoint, followed by the ATTACH request."
#[test]
fn attach_implicitly_detaches_from_previous_domain() {
    let i = setup();
    assert_eq!(exec(&i, attach(2, 3)), Status::Ok);
    assert_eq!(i.endpoint_domain(3), Some(2));
    // Domain 1 lost its last endpoint: it ceased to exist with its mapping.
    assert_eq!(i.mappings(1), None);
    assert_eq!(exec(&i, map(1, 0, 0xfff, 0, RW)), Status::NoEnt);
    assert_eq!(i.translate(3, 0x10000, 4, Access::Read).unwrap_err().kind, FaultKind::Unmapped);
}

/// Implicit detach from a domain that keeps other endpoints leaves it and its mappings.
#[test]
fn attach_implicit_detach_keeps_shared_domain() {
    let i = setup();
    assert_eq!(exec(&i, attach(1, 4)), Status::Ok);
    assert_eq!(exec(&i, attach(2, 3)), Status::Ok);
    assert_eq!(i.mappings(1).unwrap().len(), 1);
    assert!(i.translate(4, 0x10000, 4, Access::Read).is_ok());
}

/// "Multiple endpoints can be attached to the same domain." Re-attaching to the same domain
/// changes nothing.
#[test]
fn attach_twice_to_same_domain_is_ok_and_keeps_mappings() {
    let i = setup();
    assert_eq!(exec(&i, attach(1, 3)), Status::Ok);
    assert_eq!(i.mappings(1).unwrap().len(), 1);
}

/// "If properties of the endpoint ... are compatible with properties of other endpoints
/// already attached to the requested domain, then the device SHOULD attach the endpoint.
/// Otherwise the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_UNSUPP."
/// A mapping covering the endpoint's reserved region is incompatible.
#[test]
fn attach_endpoint_whose_reserved_region_is_mapped_is_unsupp() {
    let i = setup();
    assert_eq!(exec(&i, map(1, 0x8000_0000, 0x8000_ffff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 2)), Status::Unsupp);
    assert_eq!(i.endpoint_domain(2), None);
}

/// Limits: "Exceeding one → NOMEM" (domains). For endpoints per domain the spec's MUST
/// wins: "If another endpoint is already attached to the domain identified by domain, then
/// the device MAY attach the endpoint identified by endpoint to the domain. If it cannot do
/// so, the device MUST reject the request and set status to VIRTIO_IOMMU_S_UNSUPP."
#[test]
fn attach_beyond_limits_is_nomem_or_unsupp() {
    let limits = Limits { max_domains: 2, max_endpoints: 2, ..Limits::default() };
    let i = iommu(DeviceConfig { limits, ..cfg(&[1, 2, 3, 4]) });
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, attach(2, 2)), Status::Ok);
    assert_eq!(exec(&i, attach(3, 3)), Status::NoMem);
    // Moving the only endpoint of domain 2 to a new domain frees a slot first.
    assert_eq!(exec(&i, attach(3, 2)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 3)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 4)), Status::Unsupp);
    assert_eq!(i.endpoint_domain(4), None);
}

// ---- DETACH -----------------------------------------------------------------------------

/// "If the endpoint identified by endpoint doesn't exist, then the device MUST reject the
/// request and set status to VIRTIO_IOMMU_S_NOENT."
#[test]
fn detach_unknown_endpoint_is_noent() {
    let i = setup();
    assert_eq!(exec(&i, detach(1, 99)), Status::NoEnt);
}

/// "If the domain identified by domain doesn't exist, or if the endpoint identified by
/// endpoint isn't attached to this domain, then the device MAY set the request status to
/// VIRTIO_IOMMU_S_INVAL."
#[test]
fn detach_from_wrong_domain_is_inval() {
    let i = setup();
    assert_eq!(exec(&i, detach(2, 3)), Status::Inval);
    assert_eq!(exec(&i, detach(1, 4)), Status::Inval);
    assert_eq!(i.endpoint_domain(3), Some(1));
}

/// "After all endpoints have been successfully detached from a domain, it ceases to exist
/// and its ID can be reused by the driver for another domain." Its mappings go with it.
#[test]
fn detach_of_last_endpoint_destroys_domain_and_mappings() {
    let i = setup();
    assert_eq!(exec(&i, attach(1, 4)), Status::Ok);
    assert_eq!(exec(&i, detach(1, 3)), Status::Ok);
    assert_eq!(i.domain_count(), 1);
    assert_eq!(exec(&i, detach(1, 4)), Status::Ok);
    assert_eq!(i.domain_count(), 0);
    assert_eq!(exec(&i, map(1, 0, 0xfff, 0, RW)), Status::NoEnt);
    // The ID is reused, empty, and may even change kind.
    assert_eq!(exec(&i, attach_flags(1, 4, ATTACH_F_BYPASS)), Status::Ok);
    assert_eq!(i.mappings(1), Some(vec![]));
}

/// "The device MUST ensure that after being detached from a domain, the endpoint cannot
/// access any mapping from that domain." "The device MUST ignore reserved."
#[test]
fn detached_endpoint_cannot_access_mappings() {
    let i = setup();
    assert!(i.translate(3, 0x10000, 8, Access::Read).is_ok());
    let Request::Detach(mut b) = detach(1, 3) else { unreachable!() };
    b.reserved = [0xff; 8];
    assert_eq!(exec(&i, Request::Detach(b)), Status::Ok);
    assert_eq!(i.translate(3, 0x10000, 8, Access::Read).unwrap_err().kind, FaultKind::NotAttached);
}

// ---- MAP --------------------------------------------------------------------------------

/// "If virt_start, phys_start or (virt_end + 1) is not aligned on the page granularity, the
/// device SHOULD reject the request and set status to VIRTIO_IOMMU_S_RANGE."
#[test]
fn map_misaligned_is_range() {
    let i = setup();
    for (s, e, p) in [(0x100, 0xfff, 0), (0x0, 0xffe, 0), (0x0, 0xfff, 0x800)] {
        assert_eq!(exec(&i, map(1, s, e, p, RW)), Status::Range, "{s:#x} {e:#x} {p:#x}");
    }
    assert_eq!(i.mappings(1).unwrap().len(), 1);
}

/// "Any mapping request to virtual addresses outside of this range fails." (input_range)
#[test]
fn map_outside_input_range_is_range() {
    let i = iommu(DeviceConfig { input_range: (0x1000, 0xf_ffff), ..cfg(&[1]) });
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0, 0xfff, 0, RW)), Status::Range);
    assert_eq!(exec(&i, map(1, 0xf_f000, 0x10_0fff, 0, RW)), Status::Range);
    assert_eq!(exec(&i, map(1, 0xf_f000, 0xf_ffff, 0, RW)), Status::Ok);
    // An empty or inverted range, or a physical end past 2^64, is out of range too.
    assert_eq!(exec(&i, map(1, 0x2000, 0x1fff, 0, RW)), Status::Range);
    assert_eq!(exec(&i, map(1, 0x2000, 0x3fff, u64::MAX - 0xfff, RW)), Status::Range);
}

/// "If a mapping already exists in the requested range, the device SHOULD reject the
/// request and set status to VIRTIO_IOMMU_S_INVAL."
#[test]
fn map_overlapping_is_inval() {
    let i = setup();
    for (s, e) in [(0x10000, 0x1ffff), (0xf000, 0x10fff), (0x1f000, 0x20fff), (0x0, 0xfffff)] {
        assert_eq!(exec(&i, map(1, s, e, 0, RW)), Status::Inval, "{s:#x}");
    }
    assert_eq!(exec(&i, map(1, 0x20000, 0x20fff, 0, RW)), Status::Ok);
}

/// "If the device doesn't recognize a flags bit, it MUST reject the request and set status
/// to VIRTIO_IOMMU_S_INVAL." / "If the VIRTIO_IOMMU_F_MMIO feature isn't negotiated, the
/// driver MUST NOT use the VIRTIO_IOMMU_MAP_F_MMIO flag."
#[test]
fn map_unknown_flags_or_mmio_without_feature_is_inval() {
    let i = setup();
    assert_eq!(exec(&i, map(1, 0x40000, 0x40fff, 0, 8)), Status::Inval);
    assert_eq!(exec(&i, map(1, 0x40000, 0x40fff, 0, MAP_F_MMIO | MAP_F_WRITE)), Status::Ok);
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    dev.ack_features(bit(VERSION_1) | features_min() & !bit(MMIO));
    let i = dev.iommu();
    assert_eq!(i.execute(&attach(1, 1), &mut []), Status::Ok);
    assert_eq!(i.execute(&map(1, 0, 0xfff, 0, MAP_F_MMIO), &mut []), Status::Inval);
}

/// "If the domain is a bypass domain, the device SHOULD reject the request and set status to
/// VIRTIO_IOMMU_S_INVAL." (MAP and UNMAP)
#[test]
fn map_and_unmap_on_bypass_domain_are_inval() {
    let i = iommu(cfg(&[1]));
    assert_eq!(exec(&i, attach_flags(5, 1, ATTACH_F_BYPASS)), Status::Ok);
    assert_eq!(exec(&i, map(5, 0, 0xfff, 0, RW)), Status::Inval);
    assert_eq!(exec(&i, unmap(5, 0, 0xfff)), Status::Inval);
}

/// "If domain does not exist, the device SHOULD reject the request and set status to
/// VIRTIO_IOMMU_S_NOENT." (MAP and UNMAP)
#[test]
fn map_and_unmap_without_domain_are_noent() {
    let i = setup();
    assert_eq!(exec(&i, map(7, 0, 0xfff, 0, RW)), Status::NoEnt);
    assert_eq!(exec(&i, unmap(7, 0, 0xfff)), Status::NoEnt);
}

/// "The device SHOULD reject a MAP request that overlaps a RESV_MEM region."
#[test]
fn map_over_reserved_or_msi_region_is_inval() {
    let i = iommu(cfg_with_resv());
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, attach(1, 2)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW)), Status::Inval);
    assert_eq!(exec(&i, map(1, 0x7fff_f000, 0x8000_0fff, 0, RW)), Status::Inval);
    assert_eq!(exec(&i, map(1, 0x7fff_f000, 0x7fff_ffff, 0, RW)), Status::Ok);
    // Once endpoint 2 leaves, its reserved region no longer constrains the domain.
    assert_eq!(exec(&i, detach(1, 2)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x8000_0000, 0x8000_0fff, 0, RW)), Status::Ok);
}

/// Limits on mappings, per domain and in total: "Exceeding one → NOMEM".
#[test]
fn map_beyond_limits_is_nomem() {
    let limits = Limits { max_mappings_per_domain: 2, max_mappings_total: 3, ..Limits::default() };
    let i = iommu(DeviceConfig { limits, ..cfg(&[1, 2]) });
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, attach(2, 2)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x0000, 0x0fff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x1000, 0x1fff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0x2000, 0x2fff, 0, RW)), Status::NoMem);
    assert_eq!(exec(&i, map(2, 0x0000, 0x0fff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, map(2, 0x1000, 0x1fff, 0, RW)), Status::NoMem);
    assert_eq!(exec(&i, unmap(1, 0, u64::MAX)), Status::Ok);
    assert_eq!(exec(&i, map(2, 0x1000, 0x1fff, 0, RW)), Status::Ok);
}

/// "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated."
#[test]
fn map_unmap_without_feature_is_unsupp() {
    let mut dev = VirtioIommu::new(cfg(&[1])).unwrap();
    dev.ack_features(bit(VERSION_1));
    let i = dev.iommu();
    assert_eq!(i.execute(&attach(1, 1), &mut []), Status::Ok);
    assert_eq!(i.execute(&map(1, 0, 0xfff, 0, RW), &mut []), Status::Unsupp);
    assert_eq!(i.execute(&unmap(1, 0, 0xfff), &mut []), Status::Unsupp);
}

// ---- UNMAP ------------------------------------------------------------------------------

/// The spec's seven UNMAP examples, and "If a mapping affected by the range is not covered
/// in its entirety by the range (the UNMAP request would split the mapping), then the device
/// SHOULD set the request status to VIRTIO_IOMMU_S_RANGE, and SHOULD NOT remove any mapping."
#[test]
fn unmap_worked_examples() {
    // (mappings, unmap range, status, mappings left)
    type Example = (&'static [(u64, u64)], (u64, u64), Status, usize);
    let cases: [Example; 7] = [
        (&[], (0, 4), Status::Ok, 0),
        (&[(0, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (5, 9)], (0, 9), Status::Ok, 0),
        (&[(0, 9)], (0, 4), Status::Range, 1),
        (&[(0, 4), (5, 9)], (0, 4), Status::Ok, 1),
        (&[(0, 4)], (0, 9), Status::Ok, 0),
        (&[(0, 4), (10, 14)], (0, 14), Status::Ok, 0),
    ];
    for (n, (maps, (s, e), status, left)) in cases.into_iter().enumerate() {
        // Byte granule, as in the spec's examples.
        let i = iommu(DeviceConfig { page_size_mask: 1, ..cfg(&[1]) });
        assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
        for &(ms, me) in maps {
            assert_eq!(exec(&i, map(1, ms, me, ms, RW)), Status::Ok);
        }
        assert_eq!(exec(&i, unmap(1, s, e)), status, "example ({})", n + 1);
        assert_eq!(i.mappings(1).unwrap().len(), left, "example ({})", n + 1);
    }
}

/// "If part of the range or the full range is not covered by an existing mapping, then the
/// device SHOULD remove all mappings affected by the range": [0, 2^64-1] works, with
/// mappings at both ends of the address space and no overflow.
#[test]
fn unmap_whole_address_space() {
    let i = iommu(DeviceConfig { input_range: (0, u64::MAX), ..cfg(&[1]) });
    assert_eq!(exec(&i, attach(1, 1)), Status::Ok);
    assert_eq!(exec(&i, map(1, 0, 0xfff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, map(1, u64::MAX - 0xfff, u64::MAX, 0x1000, RW)), Status::Ok);
    assert!(i.translate(1, u64::MAX, 1, Access::Read).is_ok());
    assert_eq!(exec(&i, unmap(1, 0, u64::MAX)), Status::Ok);
    assert_eq!(i.mappings(1), Some(vec![]));
}

/// A split at the end of the range also removes nothing.
#[test]
fn unmap_split_at_end_removes_nothing() {
    let i = setup();
    assert_eq!(exec(&i, map(1, 0x20000, 0x2ffff, 0, RW)), Status::Ok);
    assert_eq!(exec(&i, unmap(1, 0x10000, 0x20fff)), Status::Range);
    assert_eq!(i.mappings(1).unwrap().len(), 2);
}

// ---- PROBE ------------------------------------------------------------------------------

/// "The device MUST write the size of a property without the struct
/// virtio_iommu_probe_property header, in bytes, into length." / "If the device doesn't fill
/// all probe_size bytes with properties, it SHOULD fill the remaining bytes of properties
/// with zeroes."
#[test]
fn probe_reports_resv_mem_terminated_and_zero_padded() {
    let mut c = cfg_with_resv();
    c.endpoints[0].resv.push(viommu_device::ResvRegion::reserved(0, 0xfff));
    let i = iommu(c);
    let mut props = vec![0xaau8; 512];
    assert_eq!(i.execute(&probe(1), &mut props), Status::Ok);
    let found: Vec<_> = PropertyIter::new(&props).collect();
    assert_eq!(found.len(), 2);
    let Ok(Property::ResvMem(msi)) = found[0] else { panic!("{found:?}") };
    assert_eq!((msi.subtype, msi.start.get(), msi.end.get()), (1, 0xfee0_0000, 0xfeef_ffff));
    let Ok(Property::ResvMem(r)) = found[1] else { panic!() };
    assert_eq!((r.subtype, r.start.get(), r.end.get()), (0, 0, 0xfff));
    assert_eq!(&props[0..4], &[1, 0, 20, 0]);
    assert!(props[48..].iter().all(|&b| b == 0));
    // No reserved regions: all zeroes.
    let mut props = vec![0xaau8; 512];
    assert_eq!(i.execute(&probe(3), &mut props), Status::Ok);
    assert!(props.iter().all(|&b| b == 0));
}

/// "If the endpoint identified by endpoint doesn't exist, then the device SHOULD reject the
/// request and set status to VIRTIO_IOMMU_S_NOENT."
#[test]
fn probe_unknown_endpoint_is_noent() {
    let i = iommu(cfg_with_resv());
    assert_eq!(i.execute(&probe(9), &mut vec![0; 512]), Status::NoEnt);
}

/// "If the device doesn't fill all probe_size bytes with properties, it SHOULD fill the
/// remaining bytes of properties with zeroes": a NOENT answer has no property, so all
/// probe_size bytes the used length covers are zeroes, not what the buffer held before.
#[test]
fn probe_noent_fills_the_properties_with_zeroes() {
    let i = iommu(cfg_with_resv());
    let mut props = vec![0xaau8; 512];
    assert_eq!(i.execute(&probe(9), &mut props), Status::NoEnt);
    assert!(props.iter().all(|&b| b == 0), "execute");
    let mut w = vec![0xaau8; 516];
    assert_eq!(i.handle_request(&encode(&probe(9)), &mut w), 516);
    assert!(w[..512].iter().all(|&b| b == 0), "handle_request");
    assert_eq!(w[512..], [Status::NoEnt as u8, 0, 0, 0]);
}

/// "If the properties list is smaller than probe_size, the device SHOULD NOT write any
/// property. It SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
#[test]
fn probe_with_short_buffer_is_inval_and_writes_nothing() {
    let i = iommu(cfg_with_resv());
    let mut props = vec![0xaau8; 100];
    assert_eq!(i.execute(&probe(1), &mut props), Status::Inval);
    assert!(props.iter().all(|&b| b == 0xaa));
    // Through the raw-bytes entry point, the tail is the last four writable bytes.
    let mut w = vec![0xaau8; 104];
    assert_eq!(i.handle_request(&encode(&probe(1)), &mut w), 104);
    assert_eq!(w[100], Status::Inval as u8);
}

/// "If the device does not offer the VIRTIO_IOMMU_F_PROBE feature, and if the driver sends a
/// VIRTIO_IOMMU_T_PROBE request, then the device SHOULD NOT write the buffer and SHOULD set
/// the used length to zero."
#[test]
fn probe_without_feature_is_not_answered() {
    let mut c = cfg_with_resv();
    c.features.probe = false;
    let i = iommu(c);
    let mut w = vec![0xaau8; 516];
    assert_eq!(i.handle_request(&encode(&probe(1)), &mut w), 0);
    assert!(w.iter().all(|&b| b == 0xaa));
}

// ---- general ----------------------------------------------------------------------------

/// "If a request type is not recognized, the device SHOULD NOT write the buffer and SHOULD
/// set the used length to zero." Counted as an unknown type and as malformed; no status.
#[test]
fn unknown_request_type_is_returned_unwritten() {
    let i = iommu(cfg(&[1]));
    for wlen in [4, 516] {
        let mut w = vec![0xaau8; wlen];
        assert_eq!(i.handle_request(&[9, 0, 0, 0, 1, 2, 3, 4], &mut w), 0, "{wlen}");
        assert!(w.iter().all(|&b| b == 0xaa), "{wlen}");
    }
    let c = i.counters();
    assert_eq!((c.requests[0], c.malformed, c.statuses.iter().sum::<u64>()), (2, 2, 0));
}

/// "When the device fails to parse a request, for instance if a request is too small for
/// its type and the device cannot find the tail, then it is unable to set status. In that
/// case, it returns the buffers without writing to them."
#[test]
fn request_too_short_is_returned_unwritten() {
    let i = iommu(cfg(&[1]));
    let full = encode(&map(1, 0, 0xfff, 0, RW));
    let mut tail = [0xaau8; 4];
    assert_eq!(i.handle_request(&full[..full.len() - 1], &mut tail), 0);
    assert_eq!(i.handle_request(&full, &mut tail[..3]), 0);
    assert_eq!(tail, [0xaa; 4]);
    assert_eq!(i.counters().malformed, 2);
}

/// "The device MUST ignore field reserved of struct virtio_iommu_req_head and SHOULD set
/// field reserved of struct virtio_iommu_req_tail to zero."
#[test]
fn head_reserved_ignored_tail_reserved_zeroed() {
    let i = iommu(cfg(&[1]));
    let mut req = encode(&attach(1, 1));
    req[1..4].copy_from_slice(&[1, 2, 3]);
    let mut tail = [0xaau8; 4];
    assert_eq!(i.handle_request(&req, &mut tail), 4);
    assert_eq!(tail, [0, 0, 0, 0]);
}
