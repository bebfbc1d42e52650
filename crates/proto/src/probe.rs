//! PROBE properties (§5.13.6.6): their types, layouts, a parser and writers.

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{read_prefix, ParseError};

/// Ends the property list.
pub const T_NONE: u16 = 0;
/// A reserved memory region ([`ResvMem`]).
pub const T_RESV_MEM: u16 = 1;
/// Draft: a page-table format the endpoint supports ([`TableFormat`]).
pub const T_PAGE_TABLE_FMT: u16 = 6;
/// Mask of the type bits; bits 12–15 are reserved.
pub const T_MASK: u16 = 0x0fff;
/// RESV_MEM subtype: accesses are not allowed.
pub const RESV_MEM_T_RESERVED: u8 = 0;
/// RESV_MEM subtype: the MSI doorbell; bypasses translation.
pub const RESV_MEM_T_MSI: u8 = 1;

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

const _: () = assert!(size_of::<ProbePropHead>() == 4);
const _: () = assert!(size_of::<ResvMem>() == 20);
const _: () = assert!(size_of::<TableFormat>() == 4);

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
        let prop_type = head.prop_type.get() & T_MASK;
        if prop_type == T_NONE {
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
            T_RESV_MEM => read_prefix::<ResvMem>(value).map(Property::ResvMem),
            T_PAGE_TABLE_FMT => read_prefix::<TableFormat>(value).map(Property::PageTableFormat),
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
    write_property(out, T_RESV_MEM, resv.as_bytes())
}

/// Writes one PAGE_TABLE_FMT property (draft) into `out`, returning bytes written.
pub fn write_table_format(out: &mut [u8], format: u16) -> Result<usize, ParseError> {
    let value = TableFormat { format: U16::new(format), reserved: [0; 2] };
    write_property(out, T_PAGE_TABLE_FMT, value.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pgtable;

    #[test]
    fn property_iter_stops_on_overflow_and_terminator() {
        let mut buf = [0u8; 64];
        let n = write_resv_mem(
            &mut buf,
            &ResvMem {
                subtype: RESV_MEM_T_RESERVED,
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
