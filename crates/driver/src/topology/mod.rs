//! Firmware topology: which endpoint ID a virtio-iommu gives each device.
//!
//! The driver needs an endpoint ID for every ATTACH. On x86 (and Arm
//! servers) firmware describes it in the ACPI VIOT table ([`viot`]); on Arm
//! and RISC-V boards in the device tree's `iommu-map` and `iommus`
//! ([`devicetree`]). For a PCI function both give the same rule in the
//! common case: the endpoint ID is the requester ID, `bus << 8 | dev << 3 | fn`,
//! offset by the range's first endpoint ID.
//!
//! Both parsers are total: a truncated, overlapping or lying table gives a
//! [`TopologyError`], never a panic, and their work is bounded by the size
//! of the input. They are written here rather than taken from a crate: no
//! crate parses VIOT, and the two device-tree properties need a short walk
//! with the same guarantees (the `fdt` crate's fallible API exists only in
//! a pre-release).

pub mod devicetree;
pub mod viot;

use core::fmt;

/// Why a firmware table was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopologyError {
    /// The input ends inside a structure that starts at `at`.
    Truncated {
        /// Byte offset.
        at: usize,
    },
    /// Not a VIOT table / not a flattened device tree.
    BadSignature,
    /// The length the table gives is shorter than its header or longer than the input.
    BadLength,
    /// The ACPI checksum does not sum to zero.
    BadChecksum,
    /// A field that cannot be right.
    Malformed {
        /// Byte offset of the structure.
        at: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// Two entries claim the same device or endpoint ID.
    Overlap(&'static str),
    /// More nodes, entries or depth than the limits of this module allow.
    TooLarge,
    /// Valid, but not something a virtio-iommu uses.
    Unsupported(&'static str),
}

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { at } => write!(f, "table truncated at byte {at}"),
            Self::BadSignature => f.write_str("not the expected table"),
            Self::BadLength => f.write_str("table length out of bounds"),
            Self::BadChecksum => f.write_str("bad ACPI checksum"),
            Self::Malformed { at, what } => write!(f, "malformed {what} at byte {at}"),
            Self::Overlap(what) => write!(f, "overlap: {what}"),
            Self::TooLarge => f.write_str("table exceeds the parser's limits"),
            Self::Unsupported(what) => write!(f, "unsupported: {what}"),
        }
    }
}

impl core::error::Error for TopologyError {}
