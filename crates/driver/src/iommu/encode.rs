//! Requests as bytes: the builders of each request type, and MAPs and
//! UNMAPs encoded straight into their ring slot.

use viommu_proto::{
    inval, pgtable, AttachBody, AttachTableBody, DetachBody, InvalidateBody, MapBody, Request,
    RequestType, UnmapBody,
};
use zerocopy::little_endian::{U16, U32, U64};

use crate::iommu::types::Mapping;

/// Requests queued in one go, each encoded straight into its ring slot:
/// MAPs and UNMAPs need no [`Request`] built first.
pub(crate) enum Reqs<'a> {
    /// Any requests.
    Any(&'a [Request]),
    /// MAPs of domain `.0`.
    Maps(u32, &'a [Mapping]),
    /// UNMAPs of domain `.0`, by `(first, last)` IOVA.
    Unmaps(u32, &'a [(u64, u64)]),
}

impl Reqs<'_> {
    pub(in crate::iommu) fn len(&self) -> usize {
        match self {
            Self::Any(r) => r.len(),
            Self::Maps(_, m) => m.len(),
            Self::Unmaps(_, r) => r.len(),
        }
    }

    pub(in crate::iommu) fn request_type(&self, i: usize) -> RequestType {
        match self {
            Self::Any(r) => r[i].request_type(),
            Self::Maps(..) => RequestType::Map,
            Self::Unmaps(..) => RequestType::Unmap,
        }
    }

    /// Bytes request `i` takes (head + body).
    pub(in crate::iommu) fn encoded_len(&self, i: usize) -> usize {
        match self {
            Self::Any(r) => size_of::<viommu_proto::ReqHead>() + r[i].body_bytes().len(),
            Self::Maps(..) => MAP_LEN,
            Self::Unmaps(..) => UNMAP_LEN,
        }
    }

    /// Writes request `i` (head + body) at the start of `out`, which
    /// holds at least [`Self::encoded_len`] bytes.
    pub(in crate::iommu) fn encode(&self, i: usize, out: &mut [u8]) {
        let mut put = |off: usize, b: &[u8]| out[off..off + b.len()].copy_from_slice(b);
        match self {
            Self::Any(r) => {
                put(0, &(r[i].request_type() as u32).to_le_bytes());
                put(4, r[i].body_bytes());
            }
            Self::Maps(domain, maps) => {
                // Layout of virtio_iommu_req_map: head, domain, virt_start,
                // virt_end, phys_start, flags.
                let m = &maps[i];
                put(0, &(RequestType::Map as u32).to_le_bytes());
                put(4, &domain.to_le_bytes());
                put(8, &m.iova.to_le_bytes());
                put(16, &m.last.to_le_bytes());
                put(24, &m.paddr.to_le_bytes());
                put(32, &m.prot.0.to_le_bytes());
            }
            Self::Unmaps(domain, ranges) => {
                // virtio_iommu_req_unmap: head, domain, virt_start, virt_end, reserved.
                let (first, last) = ranges[i];
                put(0, &(RequestType::Unmap as u32).to_le_bytes());
                put(4, &domain.to_le_bytes());
                put(8, &first.to_le_bytes());
                put(16, &last.to_le_bytes());
                put(24, &[0; 4]);
            }
        }
    }
}

/// Head + body of a MAP and of an UNMAP.
const MAP_LEN: usize = 4 + size_of::<MapBody>();
const UNMAP_LEN: usize = 4 + size_of::<UnmapBody>();

pub(in crate::iommu) fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        flags: U32::new(flags),
        reserved: [0; 4],
    })
}

pub(in crate::iommu) fn detach_req(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        reserved: [0; 8],
    })
}

pub(in crate::iommu) fn map_req(domain: u32, m: &Mapping) -> Request {
    Request::Map(MapBody {
        domain: U32::new(domain),
        virt_start: U64::new(m.iova),
        virt_end: U64::new(m.last),
        phys_start: U64::new(m.paddr),
        flags: U32::new(m.prot.0),
    })
}

pub(in crate::iommu) fn unmap_req(domain: u32, start: u64, last: u64) -> Request {
    Request::Unmap(UnmapBody {
        domain: U32::new(domain),
        virt_start: U64::new(start),
        virt_end: U64::new(last),
        reserved: [0; 4],
    })
}

/// ATTACH_TABLE of a format-3 table rooted at `pgd` (draft; the 76-byte body of P2).
pub(in crate::iommu) fn attach_table_req(domain: u32, endpoint: u32, pgd: u64) -> Request {
    Request::AttachTable(AttachTableBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        format: U16::new(pgtable::FORMAT_VIRT),
        pgd: U64::new(pgd),
        ..Default::default()
    })
}

/// INVALIDATE of the IOTLB of `domain`: the 4 KiB pages covering the
/// inclusive `range`, or the whole domain (`None`). "F_LEAF: only leaf
/// entries changed" (draft) when `leaf`: no table was unlinked.
pub(in crate::iommu) fn invalidate_req(
    domain: u32,
    range: Option<(u64, u64)>,
    leaf: bool,
) -> Request {
    let mut body = match range {
        None => InvalidateBody::domain(domain),
        Some((first, last)) => {
            let shift = pgtable::GRANULE.trailing_zeros();
            let pages = (last >> shift) - (first >> shift) + 1;
            InvalidateBody::range(domain, first >> shift << shift, pages, shift as u8)
        }
    };
    if leaf {
        body.flags = U16::new(inval::F_LEAF);
    }
    Request::Invalidate(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::types::Prot;

    /// MAPs and UNMAPs written straight into a slot give the same bytes as
    /// `Request::encode`.
    #[test]
    fn direct_encoding_matches_request_encode() {
        let m = Mapping {
            iova: 0x1234_5000,
            last: 0x1234_6fff,
            paddr: 0xdead_b000,
            prot: Prot::READ | Prot::WRITE,
        };
        let range = (0x7000_0000, 0x7fff_ffff);
        let check = |fast: Reqs<'_>, req: Request| {
            let mut want = [0u8; 64];
            let n = req.encode(&mut want).expect("fits");
            let mut got = [0xaau8; 64];
            assert_eq!(fast.encoded_len(0), n);
            fast.encode(0, &mut got);
            assert_eq!(got[..n], want[..n]);
            let any = [req];
            let mut again = [0xaau8; 64];
            Reqs::Any(&any).encode(0, &mut again);
            assert_eq!(again[..n], want[..n]);
        };
        check(Reqs::Maps(7, core::slice::from_ref(&m)), map_req(7, &m));
        check(Reqs::Unmaps(9, core::slice::from_ref(&range)), unmap_req(9, range.0, range.1));
    }

    /// An INVALIDATE covers whole pages from the first to the last IOVA,
    /// up to the top of the address space, and says the device what it can rely on.
    #[test]
    fn invalidate_covers_the_pages_of_its_range() {
        let Request::Invalidate(b) = invalidate_req(3, Some((0x1234, 0x5678)), true) else {
            panic!()
        };
        assert_eq!(b.va_range(), Some((0x1000, 0x5fff)));
        assert_eq!((b.inv_gran.get(), b.inv_type.get()), (inval::G_VA, inval::T_IOTLB));
        assert_eq!(b.flags.get(), inval::F_LEAF);
        let Request::Invalidate(b) = invalidate_req(3, Some((0, u64::MAX)), false) else {
            panic!()
        };
        assert_eq!((b.va_range(), b.flags.get()), (Some((0, u64::MAX)), 0));
        let Request::Invalidate(b) = invalidate_req(3, None, false) else { panic!() };
        assert_eq!((b.inv_gran.get(), b.domain.get()), (inval::G_DOMAIN, 3));
        let Request::AttachTable(a) = attach_table_req(3, 4, 0x8000) else { panic!() };
        assert_eq!((a.pgd.get(), a.format.get(), a.flags.get()), (0x8000, 3, 0));
    }
}
