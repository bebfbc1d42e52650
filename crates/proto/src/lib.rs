//! The virtio-iommu wire format (virtio 1.2/1.3, §5.13 "IOMMU Device").
//!
//! Types and parsing only: no policy. Every multi-byte field is little-endian
//! and every struct is `#[repr(C)]` with alignment 1, so it can be read from
//! or written to any byte offset in guest memory.
//!
//! ```
//! use viommu_proto::{Request, RequestType, Status};
//! let mut bytes = [0u8; 36];
//! bytes[0] = RequestType::Map as u8;
//! bytes[4] = 7; // domain
//! bytes[20..28].copy_from_slice(&0xfffu64.to_le_bytes()); // virt_end
//! bytes[32] = 1; // READ
//! let req = Request::parse(&bytes).unwrap();
//! assert!(matches!(req, Request::Map(m) if m.domain.get() == 7));
//! assert_eq!(Status::from_u8(5), Some(Status::Range));
//! ```
#![no_std]
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use core::fmt;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The virtio device ID of the IOMMU device.
pub const DEVICE_ID: u32 = 23;
/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 1;

/// Feature bits (§5.13.3), as bit numbers.
pub mod features {
    /// `input_range` is valid.
    pub const INPUT_RANGE: u32 = 0;
    /// `domain_range` is valid.
    pub const DOMAIN_RANGE: u32 = 1;
    /// MAP and UNMAP requests are available.
    pub const MAP_UNMAP: u32 = 2;
    /// Legacy: unattached endpoints bypass the IOMMU. Never offered with BYPASS_CONFIG.
    pub const BYPASS: u32 = 3;
    /// PROBE requests are available.
    pub const PROBE: u32 = 4;
    /// The MAP_FLAG_MMIO flag is available.
    pub const MMIO: u32 = 5;
    /// The `bypass` config field is valid and writable.
    pub const BYPASS_CONFIG: u32 = 6;
    /// Draft (2023 page-table proposal): several request queues. Not offered by this device.
    pub const MQ: u32 = 7;
    /// Draft (2023 page-table proposal): ATTACH_TABLE and INVALIDATE requests are
    /// available; the driver may hand the device I/O page tables to walk.
    pub const ATTACH_TABLE: u32 = 8;
    /// Generic: indirect descriptors.
    pub const RING_INDIRECT_DESC: u32 = 28;
    /// Generic: used/avail event index suppression.
    pub const RING_EVENT_IDX: u32 = 29;
    /// Generic: the device complies with virtio 1.x.
    pub const VERSION_1: u32 = 32;
    /// Generic: the device's DMA goes through a platform IOMMU.
    pub const ACCESS_PLATFORM: u32 = 33;

    /// The mask for one feature bit.
    pub const fn bit(feature: u32) -> u64 {
        1u64 << feature
    }
}

/// Device configuration layout (§5.13.4), 40 bytes.
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
pub struct Config {
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: U64,
    /// First valid IOVA (with INPUT_RANGE).
    pub input_start: U64,
    /// Last valid IOVA, inclusive (with INPUT_RANGE).
    pub input_end: U64,
    /// First valid domain ID (with DOMAIN_RANGE).
    pub domain_start: U32,
    /// Last valid domain ID, inclusive (with DOMAIN_RANGE).
    pub domain_end: U32,
    /// Size of the PROBE properties buffer (with PROBE).
    pub probe_size: U32,
    /// 1: unattached endpoints bypass the IOMMU (with BYPASS_CONFIG).
    pub bypass: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

impl Config {
    /// Byte offset of `bypass`, the only field a driver may write.
    pub const BYPASS_OFFSET: usize = 36;
}

/// Request types (§5.13.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RequestType {
    /// Attach an endpoint to a domain.
    Attach = 1,
    /// Detach an endpoint from a domain.
    Detach = 2,
    /// Map a range of IOVA.
    Map = 3,
    /// Unmap a range of IOVA.
    Unmap = 4,
    /// Probe an endpoint's properties.
    Probe = 5,
    /// Draft: attach an endpoint to a domain whose mappings are an I/O page table
    /// in guest memory (needs F_ATTACH_TABLE).
    AttachTable = 6,
    /// Draft: invalidate the device's caches of a page-table domain (needs F_ATTACH_TABLE).
    Invalidate = 7,
}

impl RequestType {
    /// Every request type, in the order of their values.
    pub const ALL: [Self; 7] = [
        Self::Attach,
        Self::Detach,
        Self::Map,
        Self::Unmap,
        Self::Probe,
        Self::AttachTable,
        Self::Invalidate,
    ];

    /// Number of request types: the size of a table with one entry per type.
    pub const COUNT: usize = Self::ALL.len();

    /// Position in [`Self::ALL`], to index a table with one entry per type.
    pub const fn index(self) -> usize {
        self as usize - 1
    }

    /// Decodes a request type byte.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Attach,
            2 => Self::Detach,
            3 => Self::Map,
            4 => Self::Unmap,
            5 => Self::Probe,
            6 => Self::AttachTable,
            7 => Self::Invalidate,
            _ => return None,
        })
    }

    /// Size of the body that follows the head (without the tail, without PROBE properties).
    pub const fn body_len(self) -> usize {
        match self {
            Self::Attach => size_of::<AttachBody>(),
            Self::Detach => size_of::<DetachBody>(),
            Self::Map => size_of::<MapBody>(),
            Self::Unmap => size_of::<UnmapBody>(),
            Self::Probe => size_of::<ProbeBody>(),
            Self::AttachTable => size_of::<AttachTableBody>(),
            Self::Invalidate => size_of::<InvalidateBody>(),
        }
    }
}

/// Request status codes (§5.13.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Virtqueue or DMA error.
    IoErr = 1,
    /// Unsupported request.
    Unsupp = 2,
    /// Internal device error.
    DevErr = 3,
    /// Invalid parameters.
    Inval = 4,
    /// Out-of-range parameters.
    Range = 5,
    /// Entry not found.
    NoEnt = 6,
    /// Bad address.
    Fault = 7,
    /// Insufficient resources.
    NoMem = 8,
}

impl Status {
    /// Decodes a status byte.
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::IoErr,
            2 => Self::Unsupp,
            3 => Self::DevErr,
            4 => Self::Inval,
            5 => Self::Range,
            6 => Self::NoEnt,
            7 => Self::Fault,
            8 => Self::NoMem,
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ok => "OK",
            Self::IoErr => "IOERR",
            Self::Unsupp => "UNSUPP",
            Self::DevErr => "DEVERR",
            Self::Inval => "INVAL",
            Self::Range => "RANGE",
            Self::NoEnt => "NOENT",
            Self::Fault => "FAULT",
            Self::NoMem => "NOMEM",
        })
    }
}

/// Head of every request: device-readable.
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
pub struct ReqHead {
    /// A [`RequestType`] value.
    pub req_type: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

/// Tail of every request: device-writable.
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
pub struct ReqTail {
    /// A [`Status`] value.
    pub status: u8,
    /// Reserved.
    pub reserved: [u8; 3],
}

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

/// Probe property types (bits 0–11 of the property header's `type`).
pub mod probe {
    /// Ends the property list.
    pub const T_NONE: u16 = 0;
    /// A reserved memory region ([`super::ResvMem`]).
    pub const T_RESV_MEM: u16 = 1;
    /// Draft: a page-table format the endpoint supports ([`super::TableFormat`]).
    pub const T_PAGE_TABLE_FMT: u16 = 6;
    /// Mask of the type bits; bits 12–15 are reserved.
    pub const T_MASK: u16 = 0x0fff;
    /// RESV_MEM subtype: accesses are not allowed.
    pub const RESV_MEM_T_RESERVED: u8 = 0;
    /// RESV_MEM subtype: the MSI doorbell; bypasses translation.
    pub const RESV_MEM_T_MSI: u8 = 1;
}

/// Header of one probe property.
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
pub struct ProbePropHead {
    /// Property type in bits 0–11.
    pub prop_type: U16,
    /// Length of the value that follows, in bytes.
    pub length: U16,
}

/// Value of a RESV_MEM property. `end` is inclusive.
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
pub struct ResvMem {
    /// `probe::RESV_MEM_T_*`.
    pub subtype: u8,
    /// Reserved.
    pub reserved: [u8; 3],
    /// First address.
    pub start: U64,
    /// Last address, inclusive.
    pub end: U64,
}

/// Value of a PAGE_TABLE_FMT property (draft): one format the endpoint's domain
/// may be given with ATTACH_TABLE. A device lists one property per format.
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
pub struct TableFormat {
    /// `pgtable::FORMAT_*`.
    pub format: U16,
    /// Reserved.
    pub reserved: [u8; 2],
}

/// Fault reasons.
pub mod fault {
    /// Unknown or unspecified.
    pub const R_UNKNOWN: u8 = 0;
    /// The endpoint is not attached to a domain.
    pub const R_DOMAIN: u8 = 1;
    /// No valid mapping, or the access is not permitted by the mapping.
    pub const R_MAPPING: u8 = 2;
    /// Draft: a page-table walk read an address outside guest memory.
    pub const R_WALK_EABT: u8 = 3;
    /// Draft: a page-table walk fetched a malformed entry (reserved bits set, a leaf
    /// where the format has no block size, a table pointer at the last level).
    pub const R_PTE_FETCH: u8 = 4;
    /// The access was a read.
    pub const F_READ: u32 = 1;
    /// The access was a write.
    pub const F_WRITE: u32 = 2;
    /// The access was an instruction fetch.
    pub const F_EXEC: u32 = 4;
    /// `address` is valid.
    pub const F_ADDRESS: u32 = 0x100;
}

/// A fault event written by the device into an event-queue buffer.
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
pub struct FaultEvent {
    /// `fault::R_*`.
    pub reason: u8,
    /// Reserved.
    pub reserved: [u8; 3],
    /// `fault::F_*`.
    pub flags: U32,
    /// Endpoint ID.
    pub endpoint: U32,
    /// Reserved.
    pub reserved1: [u8; 4],
    /// Faulting address (valid with `fault::F_ADDRESS`).
    pub address: U64,
}

// Sizes fixed by the spec, checked at compile time.
const _: () = assert!(size_of::<Config>() == 40);
const _: () = assert!(size_of::<ReqHead>() == 4);
const _: () = assert!(size_of::<ReqTail>() == 4);
const _: () = assert!(size_of::<AttachBody>() == 16);
const _: () = assert!(size_of::<DetachBody>() == 16);
const _: () = assert!(size_of::<MapBody>() == 32);
const _: () = assert!(size_of::<UnmapBody>() == 24);
const _: () = assert!(size_of::<ProbeBody>() == 68);
const _: () = assert!(size_of::<ProbePropHead>() == 4);
const _: () = assert!(size_of::<ResvMem>() == 20);
const _: () = assert!(size_of::<FaultEvent>() == 24);
// Draft sizes: ATTACH_TABLE (format 3) 84 bytes with head and tail, INVALIDATE 64.
const _: () = assert!(size_of::<AttachTableBody>() == 76);
const _: () = assert!(size_of::<InvalidateBody>() == 56);
const _: () = assert!(size_of::<TableFormat>() == 4);
const _: () = assert!(size_of::<pgtable::Pte>() == 8);

/// Size of the head plus the tail of any request.
pub const HEAD_TAIL_LEN: usize = size_of::<ReqHead>() + size_of::<ReqTail>();

/// Why bytes could not be parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Fewer bytes than the structure needs.
    Truncated {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// The request type byte is not one this version knows.
    UnknownRequestType(u8),
    /// A probe property runs past the end of the buffer.
    PropertyOverflow {
        /// Offset of the property header.
        offset: usize,
    },
    /// A RESV_MEM or PAGE_TABLE_FMT property's length is too small for its value.
    BadPropertyLength {
        /// Offset of the property header.
        offset: usize,
        /// The length it declared.
        length: u16,
    },
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed, available } => {
                write!(f, "truncated: need {needed} bytes, have {available}")
            }
            Self::UnknownRequestType(t) => write!(f, "unknown request type {t}"),
            Self::PropertyOverflow { offset } => {
                write!(f, "probe property at offset {offset} overruns the buffer")
            }
            Self::BadPropertyLength { offset, length } => {
                write!(f, "probe property at offset {offset} has bad length {length}")
            }
        }
    }
}

impl core::error::Error for ParseError {}

fn read_prefix<T: FromBytes + KnownLayout + Immutable + Unaligned + Copy>(
    bytes: &[u8],
) -> Result<T, ParseError> {
    T::read_from_prefix(bytes)
        .map(|(v, _)| v)
        .map_err(|_| ParseError::Truncated { needed: size_of::<T>(), available: bytes.len() })
}

/// A parsed request: the device-readable head and body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// ATTACH.
    Attach(AttachBody),
    /// DETACH.
    Detach(DetachBody),
    /// MAP.
    Map(MapBody),
    /// UNMAP.
    Unmap(UnmapBody),
    /// PROBE.
    Probe(ProbeBody),
    /// ATTACH_TABLE (draft).
    AttachTable(AttachTableBody),
    /// INVALIDATE (draft).
    Invalidate(InvalidateBody),
}

impl Request {
    /// Parses a head followed by its body. Extra trailing bytes are ignored.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let head: ReqHead = read_prefix(bytes)?;
        let ty = RequestType::from_u8(head.req_type)
            .ok_or(ParseError::UnknownRequestType(head.req_type))?;
        Self::parse_body(ty, &bytes[size_of::<ReqHead>()..])
    }

    /// Parses the body of a request whose type is already known.
    pub fn parse_body(ty: RequestType, body: &[u8]) -> Result<Self, ParseError> {
        Ok(match ty {
            RequestType::Attach => Self::Attach(read_prefix(body)?),
            RequestType::Detach => Self::Detach(read_prefix(body)?),
            RequestType::Map => Self::Map(read_prefix(body)?),
            RequestType::Unmap => Self::Unmap(read_prefix(body)?),
            RequestType::Probe => Self::Probe(read_prefix(body)?),
            RequestType::AttachTable => Self::AttachTable(read_prefix(body)?),
            RequestType::Invalidate => Self::Invalidate(read_prefix(body)?),
        })
    }

    /// The request's type.
    pub fn request_type(&self) -> RequestType {
        match self {
            Self::Attach(_) => RequestType::Attach,
            Self::Detach(_) => RequestType::Detach,
            Self::Map(_) => RequestType::Map,
            Self::Unmap(_) => RequestType::Unmap,
            Self::Probe(_) => RequestType::Probe,
            Self::AttachTable(_) => RequestType::AttachTable,
            Self::Invalidate(_) => RequestType::Invalidate,
        }
    }

    /// The body's bytes, without head.
    pub fn body_bytes(&self) -> &[u8] {
        match self {
            Self::Attach(b) => b.as_bytes(),
            Self::Detach(b) => b.as_bytes(),
            Self::Map(b) => b.as_bytes(),
            Self::Unmap(b) => b.as_bytes(),
            Self::Probe(b) => b.as_bytes(),
            Self::AttachTable(b) => b.as_bytes(),
            Self::Invalidate(b) => b.as_bytes(),
        }
    }

    /// Writes head and body into `out`, returning the number of bytes written.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, ParseError> {
        let body = self.body_bytes();
        let len = size_of::<ReqHead>() + body.len();
        if out.len() < len {
            return Err(ParseError::Truncated { needed: len, available: out.len() });
        }
        out[..4].copy_from_slice(&[self.request_type() as u8, 0, 0, 0]);
        out[4..len].copy_from_slice(body);
        Ok(len)
    }
}

/// One probe property.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Property<'a> {
    /// A reserved memory region.
    ResvMem(ResvMem),
    /// A page-table format (draft).
    PageTableFormat(TableFormat),
    /// A property of a type this version does not know: the raw type and value.
    Unknown {
        /// Type (bits 0–11).
        prop_type: u16,
        /// The value bytes.
        value: &'a [u8],
    },
}

/// Iterates over the properties in a PROBE buffer, up to the NONE terminator
/// or the end of the buffer. Yields an error at most once and then stops.
///
/// ```
/// use viommu_proto::{probe, Property, PropertyIter};
/// let mut buf = [0u8; 32];
/// buf[0] = probe::T_RESV_MEM as u8;
/// buf[2] = 20; // length
/// buf[4] = probe::RESV_MEM_T_MSI;
/// buf[8..16].copy_from_slice(&0xfee0_0000u64.to_le_bytes());
/// buf[16..24].copy_from_slice(&0xfeef_ffffu64.to_le_bytes());
/// let props: Vec<_> = PropertyIter::new(&buf).collect();
/// assert!(matches!(props[0], Ok(Property::ResvMem(r)) if r.start.get() == 0xfee0_0000));
/// assert_eq!(props.len(), 1);
/// ```
#[derive(Clone, Debug)]
pub struct PropertyIter<'a> {
    buf: &'a [u8],
    offset: usize,
    done: bool,
}

impl<'a> PropertyIter<'a> {
    /// Iterates over `buf`, the properties area of a PROBE request.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, offset: 0, done: false }
    }
}

impl<'a> Iterator for PropertyIter<'a> {
    type Item = Result<Property<'a>, ParseError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let rest = self.buf.get(self.offset..).unwrap_or(&[]);
        let Ok(head) = read_prefix::<ProbePropHead>(rest) else {
            // Fewer than 4 bytes left: the list ends with the buffer.
            self.done = true;
            return None;
        };
        let prop_type = head.prop_type.get() & probe::T_MASK;
        if prop_type == probe::T_NONE {
            self.done = true;
            return None;
        }
        let offset = self.offset;
        let length = head.length.get();
        let value_start = offset + size_of::<ProbePropHead>();
        let Some(value) = self.buf.get(value_start..value_start + length as usize) else {
            self.done = true;
            return Some(Err(ParseError::PropertyOverflow { offset }));
        };
        self.offset = value_start + length as usize;
        let parsed = match prop_type {
            probe::T_RESV_MEM => read_prefix::<ResvMem>(value).map(Property::ResvMem),
            probe::T_PAGE_TABLE_FMT => {
                read_prefix::<TableFormat>(value).map(Property::PageTableFormat)
            }
            _ => return Some(Ok(Property::Unknown { prop_type, value })),
        };
        if parsed.is_err() {
            self.done = true;
        }
        Some(parsed.map_err(|_| ParseError::BadPropertyLength { offset, length }))
    }
}

/// Writes one property (header and value) into `out`, returning bytes written.
fn write_property(out: &mut [u8], prop_type: u16, value: &[u8]) -> Result<usize, ParseError> {
    let len = size_of::<ProbePropHead>() + value.len();
    if out.len() < len {
        return Err(ParseError::Truncated { needed: len, available: out.len() });
    }
    let head =
        ProbePropHead { prop_type: U16::new(prop_type), length: U16::new(value.len() as u16) };
    out[..4].copy_from_slice(head.as_bytes());
    out[4..len].copy_from_slice(value);
    Ok(len)
}

/// Writes one RESV_MEM property into `out`, returning bytes written.
pub fn write_resv_mem(out: &mut [u8], resv: &ResvMem) -> Result<usize, ParseError> {
    write_property(out, probe::T_RESV_MEM, resv.as_bytes())
}

/// Writes one PAGE_TABLE_FMT property (draft) into `out`, returning bytes written.
pub fn write_table_format(out: &mut [u8], format: u16) -> Result<usize, ParseError> {
    let value = TableFormat { format: U16::new(format), reserved: [0; 2] };
    write_property(out, probe::T_PAGE_TABLE_FMT, value.as_bytes())
}

pub mod pgtable;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_never_panics_on_short_input() {
        for ty in 0u8..=8 {
            for len in 0..80 {
                let mut b = [0u8; 80];
                b[0] = ty;
                let _ = Request::parse(&b[..len]);
            }
        }
    }

    #[test]
    fn truncated_map_is_typed_error() {
        let b = [3u8, 0, 0, 0, 1, 2, 3];
        assert_eq!(Request::parse(&b), Err(ParseError::Truncated { needed: 32, available: 3 }));
        assert_eq!(Request::parse(&[9, 0, 0, 0]), Err(ParseError::UnknownRequestType(9)));
    }

    #[test]
    fn encode_parse_roundtrip() {
        let req = Request::Unmap(UnmapBody {
            domain: U32::new(3),
            virt_start: U64::new(0x1000),
            virt_end: U64::new(u64::MAX),
            reserved: [0; 4],
        });
        let mut buf = [0u8; 64];
        let n = req.encode(&mut buf).unwrap();
        assert_eq!(n, 4 + 24);
        assert_eq!(Request::parse(&buf[..n]), Ok(req));
    }

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
    fn property_iter_stops_on_overflow_and_terminator() {
        let mut buf = [0u8; 64];
        let n = write_resv_mem(
            &mut buf,
            &ResvMem {
                subtype: probe::RESV_MEM_T_RESERVED,
                start: U64::new(1),
                end: U64::new(2),
                ..Default::default()
            },
        )
        .unwrap();
        // An unknown property with a length that runs off the end.
        buf[n] = 0x42;
        buf[n + 2] = 0xff;
        let v: [_; 2] = {
            let mut it = PropertyIter::new(&buf);
            [it.next(), it.next()]
        };
        assert!(matches!(v[0], Some(Ok(Property::ResvMem(_)))));
        assert_eq!(v[1], Some(Err(ParseError::PropertyOverflow { offset: 24 })));
        assert_eq!(PropertyIter::new(&buf).nth(2), None);
        // Reserved type bits are ignored; a zero header ends the list.
        let zero = [0u8; 16];
        assert_eq!(PropertyIter::new(&zero).count(), 0);
    }

    #[test]
    fn short_resv_mem_is_error() {
        let mut buf = [0u8; 16];
        buf[0] = 1;
        buf[2] = 4;
        assert_eq!(
            PropertyIter::new(&buf).next(),
            Some(Err(ParseError::BadPropertyLength { offset: 0, length: 4 }))
        );
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

    #[test]
    fn table_format_property_roundtrips() {
        let mut buf = [0u8; 16];
        let n = write_table_format(&mut buf, pgtable::FORMAT_VIRT).unwrap();
        assert_eq!(n, 8);
        let mut it = PropertyIter::new(&buf);
        assert_eq!(
            it.next(),
            Some(Ok(Property::PageTableFormat(TableFormat {
                format: U16::new(3),
                reserved: [0; 2]
            })))
        );
        assert_eq!(it.next(), None);
        // Too short a value is an error, as for RESV_MEM.
        let short = [6u8, 0, 2, 0, 3, 0, 0, 0];
        assert_eq!(
            PropertyIter::new(&short).next(),
            Some(Err(ParseError::BadPropertyLength { offset: 0, length: 2 }))
        );
        assert_eq!(
            write_table_format(&mut buf[..7], 3),
            Err(ParseError::Truncated { needed: 8, available: 7 })
        );
    }
}
