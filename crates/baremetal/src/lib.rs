//! The bare-metal guest's logic that needs no hardware: the PVH start info,
//! ACPI tables, PCI config space and the virtio-pci transport. It is
//! `no_std` + `alloc` and unit-tested on the host; the kernel binary
//! (`src/bin/viommu-baremetal`, feature `kernel`) supplies port I/O, MMIO,
//! paging and the heap. See docs/real-guest.md, "Bare metal".
#![cfg_attr(not(test), no_std)]
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod acpi;
pub mod blk;
/// The disk pattern of the real-guest suite: the same file as
/// `viommu-guest`'s (crates/guest/src/pattern.rs), so that both guests
/// check one definition against the one disk image.
#[path = "../../guest/src/pattern.rs"]
pub mod pattern;
pub mod pci;
pub mod pvh;
pub mod virtio_pci;
