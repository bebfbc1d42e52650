//! HALs: the OS's virtio-drivers `Hal` under this driver ([`VdHal`]), and a
//! virtio-drivers `Hal` that maps through the IOMMU ([`IommuHal`]).

use core::marker::PhantomData;
use core::ptr::NonNull;

use virtio_drivers::{BufferDirection, Hal as VdHalTrait, PhysAddr, PAGE_SIZE as VD_PAGE_SIZE};

use super::StaticDma;
use crate::dma::DmaDirection;
use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::sync::{DefaultLocks, Locks};

const _: () = assert!(VD_PAGE_SIZE == PAGE_SIZE, "both crates use 4 KiB pages");

/// The OS's virtio-drivers `Hal` as this driver's [`Hal`]: the memory of
/// the virtio-iommu device's own rings and requests (physical addresses;
/// the IOMMU does not translate its own accesses).
///
/// ```
/// # struct OsHal;
/// # unsafe impl virtio_drivers::Hal for OsHal {
/// #     fn dma_alloc(_: usize, _: virtio_drivers::BufferDirection) -> (u64, core::ptr::NonNull<u8>) { (0, core::ptr::NonNull::dangling()) }
/// #     unsafe fn dma_dealloc(_: u64, _: core::ptr::NonNull<u8>, _: usize) -> i32 { 0 }
/// #     unsafe fn mmio_phys_to_virt(_: u64, _: usize) -> core::ptr::NonNull<u8> { unimplemented!() }
/// #     unsafe fn share(_: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) -> u64 { 0 }
/// #     unsafe fn unshare(_: u64, _: core::ptr::NonNull<[u8]>, _: virtio_drivers::BufferDirection) {}
/// # }
/// use viommu_driver::adapter::VdHal;
/// use viommu_driver::Hal;
/// let hal = VdHal::<OsHal>::new();
/// assert!(hal.dma_alloc(1).is_none()); // this OsHal has no memory
/// ```
pub struct VdHal<H>(PhantomData<fn() -> H>);

impl<H> VdHal<H> {
    /// The adapter (it holds nothing: `H` is called through its type).
    pub const fn new() -> Self {
        Self(PhantomData)
    }
}

impl<H> Default for VdHal<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> core::fmt::Debug for VdHal<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("VdHal")
    }
}

// SAFETY: virtio-drivers' `Hal::dma_alloc` promises zeroed, page-aligned,
// physically contiguous pages that alias nothing until `dma_dealloc`, which
// is this trait's contract; a paddr of 0 is its "out of memory".
unsafe impl<H: VdHalTrait> Hal for VdHal<H> {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let (bus_addr, vaddr) = H::dma_alloc(pages, BufferDirection::Both);
        (bus_addr != 0).then_some(DmaRegion { bus_addr, vaddr, pages })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        // SAFETY: `region` came from `H::dma_alloc` with these very values
        // (our caller's promise) and is not used any more.
        let _ = unsafe { H::dma_dealloc(region.bus_addr, region.vaddr, region.pages) };
    }
}

fn direction(dir: BufferDirection) -> DmaDirection {
    match dir {
        BufferDirection::DriverToDevice => DmaDirection::ToDevice,
        BufferDirection::DeviceToDriver => DmaDirection::FromDevice,
        BufferDirection::Both => DmaDirection::Bidirectional,
    }
}

/// A virtio-drivers `Hal` for a device behind the IOMMU: memory and
/// translation come from the OS's `Hal` `O`, and every address the device
/// sees is an IOVA of the domain `D` names.
///
/// - `dma_alloc` (rings, `Dma` buffers): `O`'s pages, mapped with one sync.
/// - `share`: `O::share` gives the physical address (or a bounce buffer);
///   its MAP is queued, and the device's [`IommuTransport`](super::IommuTransport)
///   syncs all queued MAPs at its next notify: **one sync per notify**.
/// - `unshare` and `dma_dealloc`: unmapped under the domain's policy, then
///   handed back to `O`.
///
/// virtio-drivers' `share` cannot fail. A buffer that gets no IOVA (the
/// IOVA space is full) is given IOVA 0, which the DMA layer never maps, so
/// the device's access faults and it fails the request; a `dma_alloc` that
/// cannot be mapped returns virtio-drivers' "out of memory" (address 0).
/// An allocation whose unmap fails is not given back to `O` (it leaks
/// rather than be reused while the device may still reach it).
///
/// See [`IommuTransport`](super::IommuTransport) for a complete example.
pub struct IommuHal<O, D, L = DefaultLocks>(PhantomData<Types<O, D, L>>);

/// What `IommuHal` holds: types only, no value (so it is `Send` and `Sync`).
type Types<O, D, L> = fn() -> (O, D, L);

// SAFETY: memory comes from `O::dma_alloc`, which keeps virtio-drivers'
// promises (valid, aligned, zeroed, unaliased); this HAL only changes the
// address the device is given, and returns to `O` exactly what `O` gave.
unsafe impl<O: VdHalTrait, D: StaticDma<L>, L: Locks> VdHalTrait for IommuHal<O, D, L> {
    fn dma_alloc(pages: usize, direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let (paddr, vaddr) = O::dma_alloc(pages, direction);
        if paddr == 0 {
            return (0, vaddr);
        }
        match D::get().map_alloc(paddr, pages * PAGE_SIZE) {
            Some(iova) => (iova, vaddr),
            None => {
                // SAFETY: just allocated by `O` with these values, never used.
                let _ = unsafe { O::dma_dealloc(paddr, vaddr, pages) };
                (0, vaddr)
            }
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        match D::get().unmap_alloc(paddr) {
            // SAFETY: `phys` is what `O::dma_alloc` returned with `vaddr`
            // and `pages` (our caller's promise), and the device has lost
            // access to it (the unmap succeeded).
            Some((phys, Ok(()))) => unsafe { O::dma_dealloc(phys, vaddr, pages) },
            // Still reachable by the device, or not ours: kept.
            _ => 0,
        }
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: our caller's promise, passed on.
        unsafe { O::mmio_phys_to_virt(paddr, size) }
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: our caller's promise (valid, not accessed meanwhile), passed on.
        let phys = unsafe { O::share(buffer, direction) };
        match D::get().share(phys, buffer.len(), self::direction(direction)) {
            Some(iova) => iova,
            None => {
                // SAFETY: `phys` came from `O::share` of this very buffer.
                unsafe { O::unshare(phys, buffer, direction) };
                0
            }
        }
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        if let Some((phys, _)) = D::get().unshare(paddr) {
            // SAFETY: `phys` is what `O::share` returned for this buffer
            // (the entry recorded it); our caller's promise covers the rest.
            // The device lost access first (or the unmap is queued, under a
            // lazy policy, as Linux's lazy mode does).
            unsafe { O::unshare(phys, buffer, direction) };
        }
    }
}
