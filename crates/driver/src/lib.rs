//! virtio-iommu guest driver and DMA-mapping layer.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]

extern crate alloc;

pub mod hal;
pub mod transport;

pub use hal::{DmaRegion, Hal, PAGE_SIZE};
pub use transport::{QueueAddrs, Transport};
