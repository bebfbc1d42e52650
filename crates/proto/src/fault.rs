//! Fault reasons and flags, and the fault event the device writes into the event
//! queue (§5.13.6.9).

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

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

const _: () = assert!(size_of::<FaultEvent>() == 24);
