//! A virtio-iommu device model (virtio 1.2/1.3 §5.13) for VMMs, on `vm-memory` and
//! `virtio-queue`.
//!
//! - [`VirtioIommu`] is the virtio device: features, config space, request and event
//!   queues, reset, snapshot/restore.
//! - [`Iommu`] is the state it shares (through `Arc`) with the VMM's other device models,
//!   which call [`Iommu::translate`] from any thread and access guest memory under the
//!   lease the translation holds.
//! - [`Listener`] lets VFIO, vhost or IOTLB back-ends follow attach, detach, map, unmap,
//!   bypass changes and reset; [`Iommu::lookup`] fills their caches without faulting.
//!
//! ```
//! use viommu_device::{Access, DeviceConfig, EndpointConfig, VirtioIommu};
//! let dev = VirtioIommu::new(DeviceConfig {
//!     endpoints: vec![EndpointConfig::new(0x10)],
//!     ..Default::default()
//! })
//! .unwrap();
//! let iommu = dev.iommu();
//! // Not attached and bypass is 0: the access faults and an event is queued.
//! assert!(iommu.translate(0x10, 0x1000, 8, Access::Read).is_err());
//! assert_eq!(iommu.pending_faults(), 1);
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod config;
mod counters;
mod device;
mod domain;
mod endpoint;
mod error;
pub mod fault;
mod iommu;
mod lease;
mod listener;
mod pgtable;
pub mod request;
mod snapshot;
mod sync;
mod translate;
#[cfg(feature = "vm-memory-iommu")]
mod vm_memory_iommu;

pub use config::{DeviceConfig, EndpointConfig, Limits, OfferedFeatures, ResvKind, ResvRegion};
pub use counters::CounterSnapshot;
pub use device::{VirtioIommu, QUEUE_MAX_SIZE};
pub use domain::Mapping;
pub use error::{ConfigError, Error};
pub use fault::PendingFault;
pub use iommu::{FaultNotifier, Iommu};
pub use listener::{Listener, ListenerError, ListenerId};
pub use pgtable::TableMemory;
pub use snapshot::{DeviceState, DomainState, QueueSnapshot};
#[doc(hidden)]
pub use translate::Unleased;
pub use translate::{
    Access, AccessError, Fault, FaultKind, Permissions, Segment, Translation, Window,
};
#[cfg(feature = "vm-memory-iommu")]
pub use vm_memory_iommu::{EndpointIommu, IotlbGuard};

/// The Rust snippets of docs/device.md ("Embedding it"), compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/device.md")]
struct DeviceMd;

// The state is shared with other device models' threads; the device moves to its own.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    const fn owned<T: Send>() {}
    shared::<Iommu>();
    owned::<VirtioIommu>();
};
