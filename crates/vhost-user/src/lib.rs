//! vhost-user behind a vIOMMU, on both ends.
//!
//! - Back-end side: [`iotlb::VhostIotlb`] is vm-memory's `Iommu` over the IOTLB entries a
//!   front-end sends (VHOST_USER_IOTLB_MSG UPDATE / INVALIDATE), so a back-end's
//!   virtio-queue and `IommuMemory` work on IOVAs; [`backend::Backend`] is the message loop
//!   (negotiation of ACCESS_PLATFORM, REPLY_ACK and BACKEND_REQ as the spec's "IOMMU
//!   support" section requires, MISS and ACCESS_FAIL on the back-end channel);
//!   [`blk::BlockDevice`] is a vhost-user-blk device over a file on it.
//! - Front-end side (feature `frontend`): [`frontend::Frontend`] for a Rust VMM that embeds
//!   viommu-device: a `Listener` that turns an endpoint's MAP / UNMAP / DETACH / bypass /
//!   reset into UPDATE and acknowledged INVALIDATE messages, and answers MISS through the
//!   device's non-faulting lookup.
//! - [`wire`] is the message format; its parser is total (fuzzed by `fuzz/` target
//!   `vhost_user`).
//!
//! Hand-written where rust-vmm's `vhost` crate cannot carry the IOTLB (see
//! [`backend`]); vm-memory's `Iotlb` and virtio-queue's `Queue` are used as they are.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod blk;
pub mod conn;
#[cfg(feature = "frontend")]
pub mod frontend;
pub mod iotlb;
pub mod wire;
