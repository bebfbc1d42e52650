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
pub mod pci;
pub mod pvh;
pub mod virtio_pci;
