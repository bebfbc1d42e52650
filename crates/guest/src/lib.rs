//! Running the viommu driver in a real Linux guest, from userspace.
//!
//! - [`pci`]: PCI functions through sysfs (config space, enable, BARs);
//! - [`virtio_pci`]: the virtio-pci modern transport, [`virtio_pci::PciTransport`],
//!   which implements the driver's `Transport`;
//! - [`hugepage`]: DMA memory from hugetlb pages, [`hugepage::HugePageHal`],
//!   which implements the driver's `Hal`;
//! - [`blk`]: a small virtio-blk endpoint driver whose every ring and buffer
//!   address is an IOVA from the viommu DMA layer;
//! - [`mapper`]: how the test workloads map their buffers (per policy);
//! - [`kernel_boot`], [`kernel_io`]: the same workloads through the Linux
//!   kernel's own virtio-blk and virtio-iommu drivers, for comparison;
//! - [`pattern`]: the known disk contents the tests check against.
//!
//! - [`uio`]: the INTx interrupt of a function, through a uio device of our
//!   kernel module `vg_intx` (`kmod/`).
//!
//! Completion is by polling, or by interrupt after
//! [`virtio_pci::PciTransport::enable_interrupts`]. The guest test
//! program is `src/bin/viommu-guest.rs`; `scripts/real-guest` boots it.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

pub mod blk;
pub mod hugepage;
pub mod kernel_boot;
pub mod kernel_io;
pub mod mapper;
pub mod pattern;
pub mod pci;
pub mod uio;
pub mod virtio_pci;

/// Errors of the guest-side plumbing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A system call on a sysfs or procfs file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The device is not what we expect, or broke a rule.
    #[error("device: {0}")]
    Device(String),
    /// DMA memory could not be had.
    #[error("DMA memory: {0}")]
    Dma(String),
    /// The viommu driver reported an error.
    #[error("viommu driver: {0}")]
    Driver(#[from] viommu_driver::Error),
    /// The device did not complete in time.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: String, source: std::io::Error) -> Self {
        Self::Io { what, source }
    }

    /// Wraps a driver error, or one the driver's error converts from.
    pub fn driver(e: impl Into<viommu_driver::Error>) -> Self {
        Self::Driver(e.into())
    }
}
