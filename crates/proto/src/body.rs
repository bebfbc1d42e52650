//! The bodies of requests, after the head (§5.13.6.2–5), and the drafts' ATTACH_TABLE
//! and INVALIDATE.

use crate::pgtable;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// ATTACH flag: the domain is a bypass (identity) domain.
pub const ATTACH_F_BYPASS: u32 = 1;

/// ATTACH body (after the head).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct AttachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// `ATTACH_F_*` flags.
    pub flags: U32,
    /// Reserved: must be zero.
    pub reserved: [u8; 4],
}

/// DETACH body (after the head).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct DetachBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved.
    pub reserved: [u8; 8],
}

/// MAP flag: device may read.
pub const MAP_F_READ: u32 = 1;
/// MAP flag: device may write.
pub const MAP_F_WRITE: u32 = 2;
/// MAP flag: the range is MMIO (needs F_MMIO).
pub const MAP_F_MMIO: u32 = 4;
/// All MAP flags this version knows.
pub const MAP_F_MASK: u32 = MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO;

/// MAP body (after the head). `virt_end` is inclusive.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct MapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA, inclusive.
    pub virt_end: U64,
    /// Guest-physical address of `virt_start`.
    pub phys_start: U64,
    /// `MAP_F_*` flags.
    pub flags: U32,
}

/// UNMAP body (after the head). `virt_end` is inclusive.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct UnmapBody {
    /// Domain ID.
    pub domain: U32,
    /// First IOVA.
    pub virt_start: U64,
    /// Last IOVA, inclusive.
    pub virt_end: U64,
    /// Reserved.
    pub reserved: [u8; 4],
}

/// PROBE body (after the head); `probe_size` bytes of device-writable
/// properties follow, before the tail.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ProbeBody {
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved.
    pub reserved: [u8; 64],
}

impl Default for ProbeBody {
    fn default() -> Self {
        Self { endpoint: U32::ZERO, reserved: [0; 64] }
    }
}

/// ATTACH_TABLE body (after the head), for page-table format 3
/// ([`pgtable::FORMAT_VIRT`]): the 2023 draft's `virtio_iommu_req_attach_pgt_virt`.
///
/// The draft's generic `virtio_iommu_req_attach_table` pads `format` with 66 reserved
/// bytes (80 in all), while both of its format-specific layouts are 76 bytes with the
/// 64-bit pointer 8-byte aligned in the request; this crate takes 76 (docs/spec-coverage.md).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct AttachTableBody {
    /// Domain ID.
    pub domain: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Flags: none are defined for format 3; must be zero.
    pub flags: U32,
    /// Page-table format (`pgtable::FORMAT_*`).
    pub format: U16,
    /// Reserved: must be zero.
    pub reserved: [u8; 6],
    /// Guest-physical address of the level-0 table (4 KiB aligned).
    pub pgd: U64,
    /// Reserved: must be zero.
    pub reserved2: [u8; 48],
}

impl Default for AttachTableBody {
    fn default() -> Self {
        Self {
            domain: U32::ZERO,
            endpoint: U32::ZERO,
            flags: U32::ZERO,
            format: U16::new(pgtable::FORMAT_VIRT),
            reserved: [0; 6],
            pgd: U64::ZERO,
            reserved2: [0; 48],
        }
    }
}

/// INVALIDATE values (draft): granularity, caches and flags.
pub mod inval {
    /// Granularity: every entry of the domain.
    pub const G_DOMAIN: u16 = 1 << 0;
    /// Granularity: every entry of one PASID (not supported by this device).
    pub const G_PASID: u16 = 1 << 1;
    /// Granularity: the entries of `nr_pages` pages of `1 << granule` bytes from `virt_start`.
    pub const G_VA: u16 = 1 << 2;
    /// Cache: the IOTLB (the device's translation cache).
    pub const T_IOTLB: u16 = 1 << 0;
    /// Cache: the endpoints' ATS caches.
    pub const T_DEV_IOTLB: u16 = 1 << 1;
    /// Cache: cached PASID-table entries.
    pub const T_PASID: u16 = 1 << 2;
    /// All cache bits this version knows.
    pub const T_MASK: u16 = T_IOTLB | T_DEV_IOTLB | T_PASID;
    /// Flag: `pasid` is valid.
    pub const F_PASID: u16 = 1 << 0;
    /// Flag: `archid` is valid.
    pub const F_ARCHID: u16 = 1 << 1;
    /// Flag: only leaf entries changed (a hint; a device may invalidate more).
    pub const F_LEAF: u16 = 1 << 2;
    /// All flags this version knows.
    pub const F_MASK: u16 = F_PASID | F_ARCHID | F_LEAF;
}

/// INVALIDATE body (after the head): the draft's `virtio_iommu_req_invalidate`.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct InvalidateBody {
    /// One `inval::G_*`.
    pub inv_gran: U16,
    /// `inval::T_*` caches to invalidate.
    pub inv_type: U16,
    /// `inval::F_*`.
    pub flags: U16,
    /// Reserved.
    pub reserved1: [u8; 2],
    /// Domain ID.
    pub domain: U32,
    /// PASID (with `inval::F_PASID`).
    pub pasid: U32,
    /// Reserved.
    pub reserved2: [u8; 4],
    /// Architecture-specific ID (with `inval::F_ARCHID`).
    pub archid: U64,
    /// First IOVA (with `inval::G_VA`).
    pub virt_start: U64,
    /// Number of pages (with `inval::G_VA`).
    pub nr_pages: U64,
    /// log2 of the page size (with `inval::G_VA`): 12 for 4 KiB.
    pub granule: u8,
    /// Reserved.
    pub reserved3: [u8; 11],
}

impl InvalidateBody {
    /// A domain-wide IOTLB invalidation.
    pub fn domain(domain: u32) -> Self {
        Self {
            inv_gran: U16::new(inval::G_DOMAIN),
            inv_type: U16::new(inval::T_IOTLB),
            domain: U32::new(domain),
            ..Default::default()
        }
    }

    /// An IOTLB invalidation of `nr_pages` pages of `1 << granule` bytes from `virt_start`.
    pub fn range(domain: u32, virt_start: u64, nr_pages: u64, granule: u8) -> Self {
        Self {
            inv_gran: U16::new(inval::G_VA),
            inv_type: U16::new(inval::T_IOTLB),
            domain: U32::new(domain),
            virt_start: U64::new(virt_start),
            nr_pages: U64::new(nr_pages),
            granule,
            ..Default::default()
        }
    }

    /// The inclusive IOVA range a `G_VA` invalidation covers, saturated at the top of
    /// the address space (invalidating more than asked is always safe). `None` when
    /// `nr_pages` is 0 or the granule is 64 or more.
    pub fn va_range(&self) -> Option<(u64, u64)> {
        let pages = self.nr_pages.get();
        if pages == 0 || self.granule >= 64 {
            return None;
        }
        let start = self.virt_start.get();
        let len = pages.checked_shl(self.granule as u32).filter(|l| l >> self.granule == pages);
        let end = match len {
            Some(len) => start.saturating_add(len - 1),
            None => u64::MAX,
        };
        Some((start, end))
    }
}

const _: () = assert!(size_of::<AttachBody>() == 16);
const _: () = assert!(size_of::<DetachBody>() == 16);
const _: () = assert!(size_of::<MapBody>() == 32);
const _: () = assert!(size_of::<UnmapBody>() == 24);
const _: () = assert!(size_of::<ProbeBody>() == 68);
// Draft sizes: ATTACH_TABLE (format 3) 84 bytes with head and tail, INVALIDATE 64.
const _: () = assert!(size_of::<AttachTableBody>() == 76);
const _: () = assert!(size_of::<InvalidateBody>() == 56);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Config, FaultEvent, ParseError, Request, RequestType, HEAD_TAIL_LEN};

    #[test]
    fn field_offsets_match_spec() {
        let c = Config { bypass: 1, ..Default::default() };
        assert_eq!(c.as_bytes()[Config::BYPASS_OFFSET], 1);
        let m = MapBody { flags: U32::new(0xaabbccdd), ..Default::default() };
        assert_eq!(&m.as_bytes()[28..32], &0xaabbccddu32.to_le_bytes());
        let f = FaultEvent { address: U64::new(0x1122), ..Default::default() };
        assert_eq!(&f.as_bytes()[16..24], &0x1122u64.to_le_bytes());
    }

    #[test]
    fn draft_bodies_parse_with_their_offsets() {
        // ATTACH_TABLE: 84 bytes; pgd at request offset 24, 8-byte aligned.
        let mut b = [0u8; 84];
        b[0] = 6;
        b[4] = 9; // domain
        b[8] = 2; // endpoint
        b[16..18].copy_from_slice(&3u16.to_le_bytes());
        b[24..32].copy_from_slice(&0x1234_5000u64.to_le_bytes());
        let Ok(Request::AttachTable(a)) = Request::parse(&b[..80]) else { panic!() };
        assert_eq!(
            (a.domain.get(), a.endpoint.get(), a.format.get(), a.pgd.get()),
            (9, 2, 3, 0x1234_5000)
        );
        assert_eq!(
            Request::parse(&b[..79]),
            Err(ParseError::Truncated { needed: 76, available: 75 })
        );
        // INVALIDATE: 64 bytes; granule at request offset 48.
        let inv = InvalidateBody::range(5, 0x10_0000, 3, 21);
        let mut out = [0u8; 64];
        let n = Request::Invalidate(inv).encode(&mut out).unwrap();
        assert_eq!(n, 60);
        assert_eq!(out[0], 7);
        assert_eq!(out[48], 21);
        assert_eq!(&out[12..16], &5u32.to_le_bytes());
        assert_eq!(&out[32..40], &0x10_0000u64.to_le_bytes());
        assert_eq!(Request::parse(&out[..n]), Ok(Request::Invalidate(inv)));
        assert_eq!(RequestType::Invalidate.body_len() + HEAD_TAIL_LEN, 64);
        assert_eq!(RequestType::AttachTable.body_len() + HEAD_TAIL_LEN, 84);
        assert_eq!(RequestType::ALL.map(|t| t.index()), [0, 1, 2, 3, 4, 5, 6]);
        assert_eq!(RequestType::from_u8(8), None);
    }

    #[test]
    fn invalidate_range_saturates_and_rejects_empty() {
        assert_eq!(InvalidateBody::range(1, 0x1000, 2, 12).va_range(), Some((0x1000, 0x2fff)));
        assert_eq!(InvalidateBody::range(1, 0x1000, 0, 12).va_range(), None);
        assert_eq!(InvalidateBody::range(1, 0x1000, 1, 64).va_range(), None);
        assert_eq!(
            InvalidateBody::range(1, 0x1000, u64::MAX, 12).va_range(),
            Some((0x1000, u64::MAX))
        );
        assert_eq!(
            InvalidateBody::range(1, u64::MAX - 0xfff, 2, 12).va_range(),
            Some((u64::MAX - 0xfff, u64::MAX))
        );
        assert_eq!(InvalidateBody::range(1, 0, 1, 63).va_range(), Some((0, (1 << 63) - 1)));
    }
}
