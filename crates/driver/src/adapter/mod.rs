//! Adapters to rcore's [virtio-drivers](https://crates.io/crates/virtio-drivers)
//! 0.13 (feature `virtio-drivers`, `no_std`), for Rust OSes built on it.
//!
//! Two directions:
//! - **This driver on the OS's virtio-drivers plumbing**: [`VdTransport`]
//!   makes any virtio-drivers `Transport` (`PciTransport`, `MmioTransport`,
//!   `SomeTransport`) a [`Transport`](crate::Transport) for the
//!   virtio-iommu device, and [`VdHal`] makes the OS's virtio-drivers `Hal`
//!   a [`Hal`](crate::Hal) for its rings.
//! - **virtio-drivers' device drivers behind the IOMMU**: [`IommuHal`] is a
//!   virtio-drivers `Hal` whose `dma_alloc`, `share` and `unshare` map
//!   through a [`DmaDomain`](crate::DmaDomain) (held in a [`SharedDma`],
//!   found through a [`StaticDma`] type, because that `Hal` has no `self`),
//!   and [`IommuTransport`] wraps the device's transport: it accepts
//!   VIRTIO_F_ACCESS_PLATFORM, and each notify first syncs the MAPs the
//!   shares queued (one sync per notify instead of one per buffer).
//!
//! Bring-up, in order: the IOMMU over `VdTransport` + `VdHal`; a paging
//! domain attached to the device's endpoint ID (from
//! [`topology`](crate::topology)); a `DmaDomain` over it, moved into a
//! [`DmaSlot`]; then the device driver with `IommuHal<OsHal, D>` and
//! `IommuTransport`. With a lazy policy, call [`DmaDomain::tick`](crate::DmaDomain::tick)
//! from a timer.
//!
//! ```no_run
//! # fn iommu_pci() -> virtio_drivers::transport::pci::PciTransport { unimplemented!() }
//! # fn blk_pci() -> virtio_drivers::transport::pci::PciTransport { unimplemented!() }
//! # struct OsHal;
//! # unsafe impl virtio_drivers::Hal for OsHal {
//! #     fn dma_alloc(_: usize, _: virtio_drivers::BufferDirection) -> (u64, core::ptr::NonNull<u8>) { unimplemented!() }
//! #     unsafe fn dma_dealloc(_: u64, _: core::ptr::NonNull<u8>, _: usize) -> i32 { 0 }
//! #     unsafe fn mmio_phys_to_virt(_: u64, _: usize) -> core::ptr::NonNull<u8> { unimplemented!() }
//! #     unsafe fn share(_: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) -> u64 { 0 }
//! #     unsafe fn unshare(_: u64, _: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) {}
//! # }
//! # struct Clock;
//! # impl viommu_driver::dma::DmaPlatform for Clock {
//! #     fn now_ns(&self) -> u64 { 0 }
//! #     fn cpu_id(&self) -> usize { 0 }
//! # }
//! use std::sync::Arc;
//! use virtio_drivers::device::blk::VirtIOBlk;
//! use viommu_driver::adapter::{
//!     IommuHal, IommuTransport, SharedDma, VdHal, VdTransport,
//! };
//! use viommu_driver::{DmaDomain, DmaOptions, DriverOptions, VirtioIommu};
//!
//! viommu_driver::static_dma!(Blk); // names the blk driver's DMA layer
//!
//! let endpoint = 0x08; // the blk function's endpoint ID, from the VIOT or device tree
//! let iommu = VirtioIommu::new(
//!     VdTransport::new(iommu_pci()).unwrap(),
//!     VdHal::<OsHal>::new(),
//!     DriverOptions::default(),
//! )
//! .unwrap();
//! let domain = iommu.alloc_paging(endpoint).unwrap();
//! iommu.attach(&domain, endpoint).unwrap();
//! let resv = iommu.reserved_regions(endpoint).unwrap();
//! let dma = DmaDomain::new(domain, &resv, DmaOptions::default(), Arc::new(Clock)).unwrap();
//! let dma = Blk::slot().install(SharedDma::new(dma)).ok().unwrap();
//!
//! let mut blk =
//!     VirtIOBlk::<IommuHal<OsHal, Blk>, _>::new(IommuTransport::new(blk_pci(), dma)).unwrap();
//! let mut sector = [0u8; 512];
//! blk.read_blocks(0, &mut sector).unwrap();
//! ```

mod hal;
mod shared;
mod transport;

pub use hal::{IommuHal, VdHal};
pub use shared::{DmaSlot, ShareCounts, SharedDma, StaticDma};
pub use transport::{IommuTransport, VdTransport, ACCESS_PLATFORM};
