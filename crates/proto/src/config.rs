//! The device configuration layout (§5.13.4).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

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

const _: () = assert!(size_of::<Config>() == 40);
