//! Device configurations and well-formed requests decoded from input bytes, and the
//! checks every answer of the device must pass.

use viommu_device::{
    Access, DeviceConfig, EndpointConfig, Iommu, Limits, OfferedFeatures, ResvKind, ResvRegion,
};
use viommu_proto::{
    AttachBody, AttachTableBody, DetachBody, InvalidateBody, MapBody, ProbeBody, Request, Status,
    UnmapBody, ATTACH_F_BYPASS,
};
use zerocopy::little_endian::{U16, U32, U64};

use crate::input::Input;

/// Endpoint IDs a configuration may name: small, so requests hit them often.
pub const MAX_ENDPOINT: u8 = 8;

/// A configuration: 6 bytes of choices, then the endpoints. Mostly valid (an invalid one
/// must be refused by `Iommu::new`, which is a case worth fuzzing too).
pub fn config(inp: &mut Input) -> DeviceConfig {
    let f = inp.u16();
    let on = |i: u32| f & (1 << i) != 0;
    let granule_shift = [12, 12, 16, 9][usize::from(inp.u8() % 4)];
    let probe_size = 4 * u32::from(inp.u8());
    let bypass = inp.u8() & 1 != 0;
    let limits = (inp.u8(), inp.u8());
    let mut endpoints: Vec<EndpointConfig> = Vec::new();
    for _ in 0..inp.u8() % 5 {
        let id = u32::from(inp.u8() % MAX_ENDPOINT);
        let resv = (0..inp.u8() % 3).map(|i| resv_region(inp, i)).collect();
        if endpoints.iter().all(|e| e.id != id) {
            endpoints.push(EndpointConfig { id, resv });
        }
    }
    DeviceConfig {
        features: OfferedFeatures {
            input_range: on(0),
            domain_range: on(1),
            map_unmap: !on(2),
            probe: on(3),
            mmio: on(4),
            bypass_config: on(5),
            legacy_bypass: on(6) && !on(5),
            access_platform: on(7),
            indirect_desc: on(8),
            attach_table: on(9),
        },
        page_size_mask: !0u64 << granule_shift,
        input_range: (0, (1 << 32) - 1),
        domain_range: (0, 7),
        probe_size,
        bypass,
        limits: Limits {
            max_domains: 1 + usize::from(limits.0 % 8),
            max_mappings_per_domain: 1 + usize::from(limits.1),
            max_mappings_total: 1 + 2 * usize::from(limits.1),
            max_endpoints: 1 + usize::from(limits.0 / 8 % 4),
            max_pending_faults: usize::from(limits.0 / 32),
        },
        endpoints,
        ..DeviceConfig::default()
    }
}

/// The `i`-th reserved region of an endpoint: 3 bytes (MSI or not, first page, pages).
fn resv_region(inp: &mut Input, i: u8) -> ResvRegion {
    let msi = inp.u8() & 1 != 0 && i == 0;
    let start = (u64::from(i) << 28) + (u64::from(inp.u8()) << 12);
    let end = start + (u64::from(inp.u8()) << 12) + 0xfff;
    let kind = if msi { ResvKind::Msi } else { ResvKind::Reserved };
    ResvRegion { kind, start, end }
}

/// A well-formed request on a small ID and address space, so inputs reach deep states:
/// 6 bytes (kind, domain, endpoint, page, pages, flags). Kinds 5 and 6 are the drafts'
/// ATTACH_TABLE (root: page `page` of the low region, or of the high one with flag bit 0)
/// and INVALIDATE (domain-wide with flag bit 0, else `pages` + 1 pages from `page`; bits
/// 1–3 pick malformed granularities, types or granules).
pub fn good_request(inp: &mut Input) -> Request {
    let (kind, d, e, page, pages, flags) =
        (inp.u8(), inp.u8(), inp.u8(), inp.u8(), inp.u8(), inp.u8());
    let domain = U32::new(u32::from(d % 4));
    let endpoint = U32::new(u32::from(e % (MAX_ENDPOINT + 1)));
    let start = u64::from(page) << 12;
    // pages 255 reaches the end of the address space (a whole-space UNMAP).
    let end = if pages == 255 { u64::MAX } else { start + (u64::from(pages % 32) << 12) + 0xfff };
    match kind % 7 {
        0 => Request::Attach(AttachBody {
            domain,
            endpoint,
            flags: U32::new(if flags & 0x80 != 0 { ATTACH_F_BYPASS } else { 0 }),
            reserved: [0; 4],
        }),
        1 => Request::Detach(DetachBody { domain, endpoint, reserved: [0; 8] }),
        2 => Request::Map(MapBody {
            domain,
            virt_start: U64::new(start),
            virt_end: U64::new(end),
            phys_start: U64::new(u64::from(flags) << 12),
            flags: U32::new(u32::from(flags % 8)),
        }),
        3 => Request::Unmap(UnmapBody {
            domain,
            virt_start: U64::new(start),
            virt_end: U64::new(end),
            reserved: [0; 4],
        }),
        4 => Request::Probe(ProbeBody { endpoint, ..ProbeBody::default() }),
        5 => {
            let base = if flags & 1 != 0 { crate::guest::HIGH_START } else { 0 };
            let pgd = U64::new(base + (u64::from(page) << 12) + u64::from(flags & 0x10));
            Request::AttachTable(AttachTableBody { domain, endpoint, pgd, ..Default::default() })
        }
        _ => {
            let mut b = if flags & 1 != 0 {
                InvalidateBody::domain(domain.get())
            } else {
                InvalidateBody::range(domain.get(), start, u64::from(pages) + 1, 12)
            };
            match flags >> 1 & 7 {
                1 => b.inv_gran = U16::new(u16::from(pages)),
                2 => b.inv_type = U16::new(u16::from(pages)),
                3 => b.granule = pages,
                _ => {}
            }
            Request::Invalidate(b)
        }
    }
}

/// The readable bytes of a request.
pub fn encode(req: &Request) -> Vec<u8> {
    let mut b = vec![0; 4 + req.body_bytes().len()];
    let n = req.encode(&mut b).expect("buffer sized for the request");
    b.truncate(n);
    b
}

/// Byte the checks fill writable buffers with, to see what the device wrote.
pub const FILL: u8 = 0xa5;

/// Checks one answer of `handle_request`: the used length fits the buffer, nothing past
/// it was written, and a non-zero used length ends with a status the spec defines.
pub fn check_answer(writable: &[u8], used: u32) {
    let used = used as usize;
    assert!(used <= writable.len(), "used length {used} beyond the {} bytes", writable.len());
    assert!(writable[used..].iter().all(|&b| b == FILL), "wrote past the used length {used}");
    if used > 0 {
        let status = writable[used - 4];
        assert!(Status::from_u8(status).is_some(), "undefined status {status}");
        assert_eq!(writable[used - 3..used], [0, 0, 0], "tail reserved bytes");
    }
}

/// Every parsed request the device counted got exactly one status.
pub fn check_counters(iommu: &Iommu) {
    let c = iommu.counters();
    let statuses: u64 = c.statuses.iter().sum();
    // requests[0] counts unknown types: returned unwritten, without a status.
    let requests: u64 = c.requests[1..].iter().sum();
    assert_eq!(statuses, requests, "every parsed request gets exactly one status");
}

/// A translation from input (endpoint, address, length, access: 12 bytes); a success
/// covers the access exactly.
pub fn translate(iommu: &Iommu, inp: &mut Input) {
    let ep = u32::from(inp.u8() % (MAX_ENDPOINT + 1));
    let raw = inp.u32();
    // Odd values reach down from the top of the address space.
    let iova = if raw & 1 == 1 { u64::MAX - u64::from(raw >> 1) } else { u64::from(raw) };
    let len = u64::from(inp.u16());
    let access = [Access::Read, Access::Write, Access::ReadWrite][usize::from(inp.u8() % 3)];
    if let Ok(t) = iommu.translate(ep, iova, len, access) {
        let total: u64 = t.iter().map(|s| s.len).sum();
        assert_eq!(total, len, "segments cover the access exactly");
    }
}
