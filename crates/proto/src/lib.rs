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

mod body;
mod config;
mod error;
pub mod fault;
pub mod features;
pub mod pgtable;
pub mod probe;
mod request;

pub use body::*;
pub use config::Config;
pub use error::ParseError;
pub use fault::FaultEvent;
pub use probe::{
    write_resv_mem, write_table_format, ProbePropHead, Property, PropertyIter, ResvMem, TableFormat,
};
pub use request::{ReqHead, ReqTail, Request, RequestType, Status, HEAD_TAIL_LEN};

/// The virtio device ID of the IOMMU device.
pub const DEVICE_ID: u32 = 23;
/// Index of the request queue.
pub const REQUEST_QUEUE: u16 = 0;
/// Index of the event queue.
pub const EVENT_QUEUE: u16 = 1;
