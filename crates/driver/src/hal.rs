//! DMA memory for rings and request buffers: host-visible pointers plus the
//! bus addresses the device uses.

use core::ptr::NonNull;

/// Size of one DMA page.
pub const PAGE_SIZE: usize = 4096;

/// A physically contiguous DMA allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRegion {
    /// Address the device uses.
    pub bus_addr: u64,
    /// Where the driver reads and writes it.
    pub vaddr: NonNull<u8>,
    /// Number of pages.
    pub pages: usize,
}

// SAFETY: a DmaRegion is a plain description of memory owned by the HAL; who
// may touch the bytes is decided by the ring protocol, not by this handle.
unsafe impl Send for DmaRegion {}
// SAFETY: as above; the handle itself is immutable.
unsafe impl Sync for DmaRegion {}

/// Allocation of DMA memory. Implemented by whoever owns guest-physical memory.
///
/// # Safety
/// `dma_alloc` must return zeroed memory that is valid for reads and writes of
/// `pages * PAGE_SIZE` bytes at `vaddr`, physically contiguous at `bus_addr`,
/// and stays valid until passed to `dma_dealloc`.
pub unsafe trait Hal: Send + Sync {
    /// Allocates `pages` zeroed, contiguous pages. `None` when out of memory.
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion>;
    /// Frees a region returned by `dma_alloc`.
    ///
    /// # Safety
    /// `region` came from `dma_alloc` on this HAL and is no longer used by
    /// the driver or the device.
    unsafe fn dma_dealloc(&self, region: DmaRegion);
}
