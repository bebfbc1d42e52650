//! Request types, status codes, the head and tail every request carries, and the
//! parsed [`Request`].

use core::fmt;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{read_prefix, ParseError};
use crate::{
    AttachBody, AttachTableBody, DetachBody, InvalidateBody, MapBody, ProbeBody, UnmapBody,
};

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

const _: () = assert!(size_of::<ReqHead>() == 4);
const _: () = assert!(size_of::<ReqTail>() == 4);

/// Size of the head plus the tail of any request.
pub const HEAD_TAIL_LEN: usize = size_of::<ReqHead>() + size_of::<ReqTail>();

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::UnmapBody;
    use zerocopy::little_endian::{U32, U64};

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
}
