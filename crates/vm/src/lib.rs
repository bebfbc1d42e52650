//! An in-process VM: guest RAM, the viommu driver and device joined by split
//! virtqueues in that RAM, the device on its own I/O thread, and emulated DMA
//! endpoints whose every access is translated by the IOMMU.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

mod backend;
pub mod bench;
pub mod cpu;
pub mod endpoint;
pub mod histogram;
pub mod machine;
pub mod notify;
pub mod ram;
pub mod replay;
pub mod transport;

pub use notify::EventNotifier;
pub use ram::{GuestHal, GuestPages, GuestRam, RamError};
pub use transport::{DeviceLink, ExitCost, LinkCounts, SpinBudget, VirtioBackend, VmTransport};
