//! Where a virtio-pci function keeps its virtio structures (virtio 1.2 §4.1.4):
//! the vendor capabilities that name a BAR, an offset and a length for the
//! common configuration, notifications, ISR status and device configuration.
//!
//! Bus access is the caller's: give [`VirtioCaps::parse`] the bytes of each
//! capability in list order, however they were read (port I/O, ECAM, sysfs).
//!
//! ```
//! use viommu_driver::transport::pci_caps::{cfg_type, VirtioCaps, CAP_ID_VENDOR};
//! let cap = |ty: u8, offset: u32, length: u32| {
//!     let mut b = [0u8; 20];
//!     (b[0], b[2], b[3], b[4]) = (CAP_ID_VENDOR, 20, ty, 4);
//!     b[8..12].copy_from_slice(&offset.to_le_bytes());
//!     b[12..16].copy_from_slice(&length.to_le_bytes());
//!     b[16] = 4; // notify_off_multiplier, in the notify capability
//!     b
//! };
//! let caps = [cap(cfg_type::COMMON, 0, 0x1000), cap(cfg_type::NOTIFY, 0x3000, 0x1000)];
//! let v = VirtioCaps::parse(caps.iter().map(|c| &c[..])).unwrap();
//! assert_eq!((v.notify.offset, v.notify_off_multiplier, v.isr), (0x3000, 4, None));
//! ```

use core::fmt;

/// PCI capability ID of a vendor-specific capability, which virtio uses.
pub const CAP_ID_VENDOR: u8 = 0x09;

/// Virtio vendor capability `cfg_type` values.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access (not used by this crate).
    pub const PCI_CFG: u8 = 5;
}

/// Size of the common configuration structure up to `queue_device` included:
/// a shorter one lacks registers a driver writes.
pub const COMMON_LEN: u32 = 0x38;

/// Where one virtio structure is: BAR, offset and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapRegion {
    /// BAR index (0–5).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// The virtio structures of one function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCaps {
    /// Common configuration, at least [`COMMON_LEN`] bytes.
    pub common: CapRegion,
    /// Notification area.
    pub notify: CapRegion,
    /// Bytes between the notify addresses of consecutive `queue_notify_off` values.
    pub notify_off_multiplier: u32,
    /// ISR status, if the device has one (only interrupt-driven drivers need it).
    pub isr: Option<CapRegion>,
    /// Device-specific configuration, if any.
    pub device: Option<CapRegion>,
}

/// Why a function's capabilities do not describe a usable virtio device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CapError {
    /// No well-formed capability of this `cfg_type`.
    Missing(u8),
    /// The first structure of this `cfg_type` is shorter than a driver needs.
    TooShort {
        /// Its `cfg_type`.
        cfg_type: u8,
        /// Its length.
        length: u32,
        /// The length needed.
        min: u32,
    },
}

impl fmt::Display for CapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Missing(ty) => write!(f, "no virtio capability of type {ty}"),
            Self::TooShort { cfg_type, length, min } => {
                write!(f, "virtio capability type {cfg_type} is {length} bytes, need {min}")
            }
        }
    }
}

impl core::error::Error for CapError {}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl VirtioCaps {
    /// "The driver SHOULD use the first instance of each virtio structure type it
    /// can support" (§4.1.4): the first well-formed capability of each type. A
    /// capability is skipped if it is not vendor-specific, is shorter than its
    /// layout (16 bytes, 20 for notify, also when fewer bytes are given), names a
    /// BAR above 5 or a type this crate does not know.
    pub fn parse<'a>(caps: impl IntoIterator<Item = &'a [u8]>) -> Result<Self, CapError> {
        let mut found: [Option<(CapRegion, u32)>; 4] = [None; 4];
        for b in caps {
            if b.len() < 16 || b[0] != CAP_ID_VENDOR {
                continue;
            }
            let (cap_len, ty, bar) = (b[2], b[3], b[4]);
            let layout = if ty == cfg_type::NOTIFY { 20 } else { 16 };
            if (cap_len as usize) < layout || b.len() < layout || bar > 5 {
                continue;
            }
            let Some(slot) = found.get_mut((ty as usize).wrapping_sub(1)) else { continue };
            let region = CapRegion { bar, offset: le32(b, 8), length: le32(b, 12) };
            let multiplier = if ty == cfg_type::NOTIFY { le32(b, 16) } else { 0 };
            slot.get_or_insert((region, multiplier));
        }
        let need = |ty: u8, min: u32| {
            let (r, m) = found[ty as usize - 1].ok_or(CapError::Missing(ty))?;
            if r.length < min {
                return Err(CapError::TooShort { cfg_type: ty, length: r.length, min });
            }
            Ok((r, m))
        };
        let (common, _) = need(cfg_type::COMMON, COMMON_LEN)?;
        let (notify, notify_off_multiplier) = need(cfg_type::NOTIFY, 2)?;
        let isr = found[cfg_type::ISR as usize - 1].map(|(r, _)| r);
        let device = found[cfg_type::DEVICE as usize - 1].map(|(r, _)| r);
        Ok(Self { common, notify, notify_off_multiplier, isr, device })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn vcap(ty: u8, bar: u8, offset: u32, length: u32, cap_len: u8) -> [u8; 20] {
        let mut b = [0u8; 20];
        (b[0], b[2], b[3], b[4]) = (CAP_ID_VENDOR, cap_len, ty, bar);
        b[8..12].copy_from_slice(&offset.to_le_bytes());
        b[12..16].copy_from_slice(&length.to_le_bytes());
        if ty == cfg_type::NOTIFY {
            b[16..20].copy_from_slice(&4u32.to_le_bytes());
        }
        b
    }

    fn parse(caps: &[[u8; 20]]) -> Result<VirtioCaps, CapError> {
        VirtioCaps::parse(caps.iter().map(|c| &c[..]))
    }

    #[test]
    fn qemu_layout_and_the_first_of_each_type() {
        // QEMU's layout: everything in BAR 4, listed from the highest offset down.
        let caps = [
            vcap(cfg_type::COMMON, 4, 0, 0x1000, 16),
            vcap(cfg_type::ISR, 4, 0x1000, 0x1000, 16),
            vcap(cfg_type::DEVICE, 4, 0x2000, 0x1000, 16),
            vcap(cfg_type::NOTIFY, 4, 0x3000, 0x1000, 20),
            vcap(cfg_type::PCI_CFG, 0, 0, 0, 20),
            vcap(cfg_type::COMMON, 2, 0, 0x1000, 16),
        ];
        let v = parse(&caps).unwrap();
        assert_eq!(v.common, CapRegion { bar: 4, offset: 0, length: 0x1000 });
        assert_eq!((v.notify.offset, v.notify_off_multiplier), (0x3000, 4));
        assert_eq!(v.isr.unwrap().offset, 0x1000);
        assert_eq!(v.device.unwrap().offset, 0x2000);
    }

    #[test]
    fn malformed_capabilities_are_skipped_and_missing_structures_refused() {
        let mut caps = vec![
            vcap(cfg_type::COMMON, 4, 0, 0x10, 16),
            vcap(cfg_type::NOTIFY, 4, 0x3000, 0x1000, 20),
        ];
        let short =
            CapError::TooShort { cfg_type: cfg_type::COMMON, length: 0x10, min: COMMON_LEN };
        assert_eq!(parse(&caps), Err(short));
        caps[0] = vcap(cfg_type::COMMON, 4, 0, COMMON_LEN, 16);
        let v = parse(&caps).unwrap();
        assert_eq!((v.isr, v.device), (None, None));
        // A notify capability without its multiplier is not one; a later good one is used.
        caps[1] = vcap(cfg_type::NOTIFY, 4, 0x3000, 0x1000, 16);
        assert_eq!(parse(&caps), Err(CapError::Missing(cfg_type::NOTIFY)));
        caps.push(vcap(cfg_type::NOTIFY, 4, 0x5000, 0x1000, 20));
        assert_eq!(parse(&caps).unwrap().notify.offset, 0x5000);
        // BAR 7 does not exist; type 0 and unknown types are ignored.
        caps[2] = vcap(cfg_type::NOTIFY, 7, 0x3000, 0x1000, 20);
        caps.push(vcap(0, 4, 0, 0, 16));
        caps.push(vcap(200, 4, 0, 0, 16));
        assert_eq!(parse(&caps), Err(CapError::Missing(cfg_type::NOTIFY)));
        // Fewer bytes than the layout, whatever cap_len says.
        let cut = [&caps[0][..], &vcap(cfg_type::NOTIFY, 4, 0, 8, 20)[..19]];
        assert_eq!(VirtioCaps::parse(cut), Err(CapError::Missing(cfg_type::NOTIFY)));
    }
}
