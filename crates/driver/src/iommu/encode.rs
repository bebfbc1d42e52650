//! Requests as bytes: the builders of each request type, and MAPs and
//! UNMAPs encoded straight into their ring slot.

use viommu_proto::{AttachBody, DetachBody, MapBody, Request, RequestType, UnmapBody};
use zerocopy::little_endian::{U32, U64};

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
}
