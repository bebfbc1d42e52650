//! Why bytes could not be parsed.

use core::fmt;
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

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

/// Reads a `T` from the start of `bytes`, or says how many bytes it needed.
pub(crate) fn read_prefix<T: FromBytes + KnownLayout + Immutable + Unaligned + Copy>(
    bytes: &[u8],
) -> Result<T, ParseError> {
    T::read_from_prefix(bytes)
        .map(|(v, _)| v)
        .map_err(|_| ParseError::Truncated { needed: size_of::<T>(), available: bytes.len() })
}
