//! virtio-iommu guest driver and DMA-mapping layer.
//!
//! **In a Rust OS on rcore's virtio-drivers** (feature `virtio-drivers`,
//! `no_std`): drive the virtio-iommu through the OS's own virtio-drivers
//! transport and HAL ([`adapter::VdTransport`], [`adapter::VdHal`]), then
//! put virtio-drivers' device drivers (`VirtIOBlk`, `VirtIONet`, ...)
//! behind it with [`adapter::IommuHal`] and [`adapter::IommuTransport`]:
//! every address the device sees is an IOVA, and each notify costs one
//! sync for all the buffers shared since the last one. The
//! [`adapter`] module shows the whole bring-up; docs/driver.md, "Using it
//! in a Rust OS", covers locks, topology and the timer.
//!
//! ```
//! # #[cfg(feature = "virtio-drivers")] {
//! # struct OsHal; // the OS's virtio-drivers Hal
//! # unsafe impl virtio_drivers::Hal for OsHal {
//! #     fn dma_alloc(_: usize, _: virtio_drivers::BufferDirection) -> (u64, core::ptr::NonNull<u8>) { unimplemented!() }
//! #     unsafe fn dma_dealloc(_: u64, _: core::ptr::NonNull<u8>, _: usize) -> i32 { 0 }
//! #     unsafe fn mmio_phys_to_virt(_: u64, _: usize) -> core::ptr::NonNull<u8> { unimplemented!() }
//! #     unsafe fn share(_: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) -> u64 { 0 }
//! #     unsafe fn unshare(_: u64, _: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) {}
//! # }
//! use virtio_drivers::device::blk::VirtIOBlk;
//! use virtio_drivers::transport::pci::PciTransport;
//! use viommu_driver::adapter::{IommuHal, IommuTransport};
//! use viommu_driver::adapter::{VdHal, VdTransport};
//!
//! /// The virtio-iommu, on the OS's own virtio-drivers transport and HAL.
//! type Iommu = viommu_driver::VirtioIommu<VdTransport<PciTransport>, VdHal<OsHal>>;
//!
//! viommu_driver::static_dma! {
//!     /// The disk's DMA layer, found by type (virtio-drivers' `Hal` has no `self`).
//!     Disk
//! }
//! /// virtio-drivers' block driver, every address it hands out an IOVA.
//! type Blk = VirtIOBlk<IommuHal<OsHal, Disk>, IommuTransport<PciTransport>>;
//! # }
//! ```
//!
//! - [`queue`]: a split virtqueue any virtio driver can use (batched adds, one
//!   notify, wrap-safe EVENT_IDX, polling or callback completion).
//! - [`iommu`]: the virtio-iommu device driver [`VirtioIommu`]: requests,
//!   endpoints, [`Domain`]s and their mappings, faults, counters.
//! - [`dma`]: the DMA-mapping layer [`DmaDomain`] over one domain: IOVA
//!   allocation, `map_single`/`map_sg`, a batch API with one sync per I/O,
//!   and Strict / Lazy / LazySingle unmap policies with UNMAP coalescing.
//!
//! `no_std` + `alloc`; the default `std` feature adds a default clock and
//! `std::sync::Mutex`. The driver's locks are the embedder's choice
//! ([`sync`]: `std` mutexes, spin locks, or the kernel's own
//! interrupt-masking lock through `lock_api::RawMutex`). `test-utils` adds `fake`, an in-process fake transport
//! (rings and fault injection) around a device model the user plugs in.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

extern crate alloc;

#[cfg(feature = "virtio-drivers")]
pub mod adapter;
pub mod dma;
#[cfg(feature = "test-utils")]
pub mod fake;
pub mod hal;
pub mod iommu;
pub mod mode;
pub mod queue;
pub mod sync;
pub mod topology;
pub mod transport;

// The unit tests' device model: the integration tests' adapter over
// `viommu-device` (a dev-dependency), which names this crate `viommu_driver`.
#[cfg(test)]
extern crate self as viommu_driver;
#[cfg(all(test, feature = "test-utils"))]
#[allow(dead_code)]
#[path = "../tests/common/device.rs"]
mod test_device;

pub use dma::{DmaDirection, DmaDomain, DmaOptions, Policy};
pub use hal::{DmaBuffer, DmaRegion, Hal, PAGE_SIZE};
pub use iommu::{
    CounterSnapshot, DeviceInfo, Domain, DomainKind, DriverOptions, FaultRecord, Mapping, Prot,
    ResvKind, ResvRegion, VirtioIommu,
};
pub use mode::Mode;
pub use transport::{QueueAddrs, Transport, UsedWaiter};

use core::fmt;
use viommu_proto::{ParseError, RequestType, Status};

/// Everything the driver and the DMA layer can fail with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Error {
    /// The device failed a request with a status.
    Device {
        /// The request that failed.
        request: RequestType,
        /// The status the device wrote.
        status: Status,
    },
    /// The device wrote a status byte the spec does not define.
    BadStatus {
        /// The request that failed.
        request: RequestType,
        /// The raw byte.
        value: u8,
    },
    /// The device returned the request with a used length too short for the
    /// status (0 means it could not parse the request).
    NoResponse {
        /// The request.
        request: RequestType,
        /// The used length it reported.
        used_len: u32,
    },
    /// A required feature is not offered.
    MissingFeature(&'static str),
    /// The device did not accept our features (FEATURES_OK did not stick).
    FeaturesRejected,
    /// The device set DEVICE_NEEDS_RESET.
    DeviceNeedsReset,
    /// A queue the driver needs does not exist.
    NoQueue(u16),
    /// A virtqueue setup or add failed.
    Queue(queue::QueueError),
    /// DMA memory for rings or requests is exhausted.
    NoMemory,
    /// The device did not complete requests within the spin limit.
    Timeout,
    /// The device's config generation changed on every read of the config
    /// (see [`iommu::CONFIG_READ_ATTEMPTS`]).
    ConfigUnstable,
    /// The config is unusable (e.g. empty ranges, zero page_size_mask).
    BadConfig(&'static str),
    /// The IOMMU granule is larger than the guest page.
    GranuleTooLarge {
        /// Granule from page_size_mask.
        granule: u64,
        /// Guest page size.
        page: u64,
    },
    /// An address or size is not aligned to the granule, or the size is 0.
    Unaligned {
        /// The address.
        iova: u64,
        /// The size.
        size: u64,
    },
    /// A range lies outside the domain's aperture (input_range).
    OutOfRange {
        /// First address.
        start: u64,
        /// Last address, inclusive.
        end: u64,
    },
    /// A new mapping overlaps an existing one.
    Overlap {
        /// The IOVA that collides.
        iova: u64,
    },
    /// An unmap would split a mapping.
    WouldSplit {
        /// Start of the mapping that straddles the range.
        iova: u64,
    },
    /// No mapping (or no DMA allocation) at this address.
    NotMapped {
        /// The address.
        iova: u64,
    },
    /// The operation needs a paging domain.
    NotPaging,
    /// The domain belongs to another IOMMU instance.
    WrongIommu,
    /// The endpoint is not attached.
    NotAttached(u32),
    /// Every domain ID of domain_range is in use.
    NoDomainId,
    /// The IOVA space is exhausted.
    NoIova {
        /// Bytes requested.
        size: u64,
    },
    /// A PROBE reply could not be parsed.
    Probe(ParseError),
    /// A feature the operation needs was not negotiated (e.g. MMIO mappings).
    Unsupported(&'static str),
    /// An argument is invalid.
    InvalidArgument(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device { request, status } => write!(f, "{request:?} request failed: {status}"),
            Self::BadStatus { request, value } => {
                write!(f, "{request:?} request: unknown status {value}")
            }
            Self::NoResponse { request, used_len } => {
                write!(f, "{request:?} request returned with used length {used_len}")
            }
            Self::MissingFeature(name) => {
                write!(f, "device does not offer required feature {name}")
            }
            Self::FeaturesRejected => f.write_str("device rejected the negotiated features"),
            Self::DeviceNeedsReset => f.write_str("device needs reset"),
            Self::NoQueue(q) => write!(f, "device has no queue {q}"),
            Self::Queue(e) => write!(f, "virtqueue: {e}"),
            Self::NoMemory => f.write_str("out of DMA memory"),
            Self::Timeout => f.write_str("device did not answer in time"),
            Self::ConfigUnstable => f.write_str("device config generation never held still"),
            Self::BadConfig(what) => write!(f, "bad device config: {what}"),
            Self::GranuleTooLarge { granule, page } => {
                write!(f, "IOMMU granule {granule:#x} larger than guest page {page:#x}")
            }
            Self::Unaligned { iova, size } => {
                write!(f, "range {iova:#x}+{size:#x} not aligned to the granule")
            }
            Self::OutOfRange { start, end } => {
                write!(f, "range {start:#x}..={end:#x} outside the aperture")
            }
            Self::Overlap { iova } => write!(f, "mapping overlaps an existing one at {iova:#x}"),
            Self::WouldSplit { iova } => write!(f, "unmap would split the mapping at {iova:#x}"),
            Self::NotMapped { iova } => write!(f, "nothing mapped at {iova:#x}"),
            Self::NotPaging => f.write_str("operation needs a paging domain"),
            Self::WrongIommu => f.write_str("domain belongs to another IOMMU"),
            Self::NotAttached(ep) => write!(f, "endpoint {ep} is not attached"),
            Self::NoDomainId => f.write_str("no free domain ID"),
            Self::NoIova { size } => write!(f, "no free IOVA range of {size:#x} bytes"),
            Self::Probe(e) => write!(f, "bad PROBE reply: {e}"),
            Self::Unsupported(what) => write!(f, "not negotiated: {what}"),
            Self::InvalidArgument(what) => write!(f, "invalid argument: {what}"),
        }
    }
}

impl core::error::Error for Error {}

impl From<queue::QueueError> for Error {
    fn from(e: queue::QueueError) -> Self {
        match e {
            queue::QueueError::NoMemory => Self::NoMemory,
            e => Self::Queue(e),
        }
    }
}

/// Result with [`Error`].
pub type Result<T, E = Error> = core::result::Result<T, E>;
