//! DMA memory for rings and request buffers: host-visible pointers plus the
//! bus addresses the device uses.
//!
//! A [`Hal`] trades in [`DmaRegion`]s, raw descriptions of memory; everyone
//! else holds a [`DmaBuffer`], which owns its region, frees it on drop and
//! reaches its bytes only through bounds-checked accessors. This is the shape
//! of virtio-drivers' `Dma<H>`; the accessors here are written for this crate
//! (volatile ring words, copies in and out, slices under a stated contract).

use alloc::sync::Arc;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;

/// Size of one DMA page.
pub const PAGE_SIZE: usize = 4096;

/// A physically contiguous DMA allocation, as a [`Hal`] hands it out and
/// takes it back. Not `Copy`: whoever holds it owns the memory.
#[derive(Debug, PartialEq, Eq)]
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
/// `pages * PAGE_SIZE` bytes at `vaddr`, page-aligned, physically contiguous
/// at `bus_addr`, not handed out twice, and valid until passed to
/// `dma_dealloc`.
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

// SAFETY: forwards to the shared HAL, which keeps its promises.
unsafe impl<H: Hal + ?Sized> Hal for Arc<H> {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        (**self).dma_alloc(pages)
    }
    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).dma_dealloc(region) }
    }
}

// SAFETY: forwards to the borrowed HAL, which keeps its promises.
unsafe impl<H: Hal + ?Sized> Hal for &H {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        (**self).dma_alloc(pages)
    }
    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        // SAFETY: the caller's promise, passed on.
        unsafe { (**self).dma_dealloc(region) }
    }
}

/// An owned DMA buffer: allocated from a HAL handle `H` (an `Arc`, a
/// reference, or the HAL itself), freed on drop.
///
/// Every accessor checks its range against the buffer and panics outside
/// it, as slice indexing does: offsets are the driver's own arithmetic, never
/// the device's. Writes take `&mut self`, so the CPU side never races itself;
/// the device side is the ring protocol's business: the driver reads what
/// the device wrote only after the device returned the chain.
///
/// Dropping the buffer frees it while the device may still use it, unless
/// the owner made sure it does not (no request in flight, or a device reset
/// first): owners that give buffers to a device reset it before dropping them.
///
/// ```
/// # #[cfg(feature = "test-utils")] {
/// use viommu_driver::fake::FakeMemory;
/// use viommu_driver::hal::DmaBuffer;
/// let mem = FakeMemory::new(4);
/// let mut buf = DmaBuffer::new(mem.hal(), 1).unwrap();
/// buf.write(8, &[1, 2, 3]);
/// let mut out = [0u8; 4];
/// buf.read(7, &mut out);
/// assert_eq!(out, [0, 1, 2, 3]);
/// assert_eq!(mem.live_pages(), 1);
/// drop(buf);
/// assert_eq!(mem.live_pages(), 0); // freed on drop
/// # }
/// ```
pub struct DmaBuffer<H: Hal> {
    hal: H,
    region: ManuallyDrop<DmaRegion>,
}

impl<H: Hal> DmaBuffer<H> {
    /// Allocates `pages` zeroed pages from `hal`; `None` when out of memory.
    pub fn new(hal: H, pages: usize) -> Option<Self> {
        let region = hal.dma_alloc(pages)?;
        Some(Self { hal, region: ManuallyDrop::new(region) })
    }

    /// The bus address of the first byte.
    pub fn paddr(&self) -> u64 {
        self.region.bus_addr
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.region.pages
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.region.pages * PAGE_SIZE
    }

    /// True for a buffer of no pages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw region (for a HAL-level view, e.g. to map it behind an IOMMU).
    pub fn region(&self) -> &DmaRegion {
        &self.region
    }

    /// Pointer to `len` bytes at `offset`, `align`-aligned; panics when the
    /// range leaves the buffer or is misaligned.
    #[inline(always)]
    fn at(&self, offset: usize, len: usize, align: usize) -> *mut u8 {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|e| e <= self.len()) && offset % align == 0,
            "DMA access of {len} bytes at {offset:#x} outside a {:#x}-byte buffer",
            self.len()
        );
        // SAFETY: offset + len lies inside the region (checked above).
        unsafe { self.region.vaddr.as_ptr().add(offset) }
    }

    /// Copies bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) {
        let src = self.at(offset, out.len(), 1);
        // SAFETY: in bounds (`at`); plain bytes, any value is valid; `out` is
        // ours, so the two ranges cannot overlap.
        unsafe { core::ptr::copy_nonoverlapping(src, out.as_mut_ptr(), out.len()) }
    }

    /// Copies `data` to `offset`.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let dst = self.at(offset, data.len(), 1);
        // SAFETY: in bounds (`at`); `&mut self` keeps CPU-side writers apart.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&mut self, offset: usize, len: usize, byte: u8) {
        let dst = self.at(offset, len, 1);
        // SAFETY: in bounds (`at`); `&mut self` keeps CPU-side writers apart.
        unsafe { dst.write_bytes(byte, len) }
    }

    /// Reads a little-endian `u16` the device may write concurrently
    /// (a volatile read), at a 2-aligned `offset`.
    #[inline(always)]
    pub fn read_u16(&self, offset: usize) -> u16 {
        let p = self.at(offset, 2, 2).cast::<u16>();
        // SAFETY: in bounds and aligned (`at`; the region is page-aligned).
        u16::from_le(unsafe { p.read_volatile() })
    }

    /// Reads a little-endian `u32` (volatile), at a 4-aligned `offset`.
    #[inline(always)]
    pub fn read_u32(&self, offset: usize) -> u32 {
        let p = self.at(offset, 4, 4).cast::<u32>();
        // SAFETY: in bounds and aligned (`at`; the region is page-aligned).
        u32::from_le(unsafe { p.read_volatile() })
    }

    /// Reads a little-endian `u64` (volatile), at an 8-aligned `offset`.
    #[inline(always)]
    pub fn read_u64(&self, offset: usize) -> u64 {
        let p = self.at(offset, 8, 8).cast::<u64>();
        // SAFETY: in bounds and aligned (`at`; the region is page-aligned).
        u64::from_le(unsafe { p.read_volatile() })
    }

    /// Writes a little-endian `u16` the device may read concurrently
    /// (a volatile write), at a 2-aligned `offset`.
    #[inline(always)]
    pub fn write_u16(&mut self, offset: usize, v: u16) {
        let p = self.at(offset, 2, 2).cast::<u16>();
        // SAFETY: in bounds and aligned (`at`); `&mut self` keeps CPU-side
        // writers apart.
        unsafe { p.write_volatile(v.to_le()) }
    }

    /// Writes a little-endian `u32` (volatile), at a 4-aligned `offset`.
    #[inline(always)]
    pub fn write_u32(&mut self, offset: usize, v: u32) {
        let p = self.at(offset, 4, 4).cast::<u32>();
        // SAFETY: as in `write_u16`.
        unsafe { p.write_volatile(v.to_le()) }
    }

    /// Writes a little-endian `u64` (volatile), at an 8-aligned `offset`.
    #[inline(always)]
    pub fn write_u64(&mut self, offset: usize, v: u64) {
        let p = self.at(offset, 8, 8).cast::<u64>();
        // SAFETY: as in `write_u16`.
        unsafe { p.write_volatile(v.to_le()) }
    }

    /// `len` bytes at `offset`, borrowed without a copy.
    ///
    /// # Safety
    /// The device does not write the range while the slice lives (no request
    /// in flight may write it).
    pub unsafe fn as_slice(&self, offset: usize, len: usize) -> &[u8] {
        let p = self.at(offset, len, 1);
        // SAFETY: in bounds (`at`); CPU writers need `&mut self`, which the
        // borrow excludes, and the caller excludes the device.
        unsafe { core::slice::from_raw_parts(p, len) }
    }

    /// `len` bytes at `offset`, borrowed mutably without a copy.
    ///
    /// # Safety
    /// The device does not touch the range while the slice lives (no request
    /// in flight may read or write it).
    pub unsafe fn as_mut_slice(&mut self, offset: usize, len: usize) -> &mut [u8] {
        let p = self.at(offset, len, 1);
        // SAFETY: in bounds (`at`); `&mut self` makes the borrow unique on
        // the CPU side, and the caller excludes the device.
        unsafe { core::slice::from_raw_parts_mut(p, len) }
    }
}

impl<H: Hal> Drop for DmaBuffer<H> {
    fn drop(&mut self) {
        // SAFETY: the region is taken once, here, and never used again.
        let region = unsafe { ManuallyDrop::take(&mut self.region) };
        // SAFETY: it came from `dma_alloc` on this HAL; that neither the
        // driver nor the device uses it any more is the owner's promise (see
        // the type's documentation).
        unsafe { self.hal.dma_dealloc(region) }
    }
}

impl<H: Hal> core::fmt::Debug for DmaBuffer<H> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("DmaBuffer")
            .field("paddr", &self.paddr())
            .field("pages", &self.pages())
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::fake::FakeMemory;

    /// Copies and ring words land where they say, in little-endian order;
    /// dropping the buffer gives its pages back.
    #[test]
    fn accessors_reach_the_bytes_and_drop_frees() {
        let mem = FakeMemory::new(4);
        let mut b = DmaBuffer::new(mem.hal(), 2).expect("2 pages");
        assert_eq!((b.len(), b.pages(), mem.live_pages()), (2 * PAGE_SIZE, 2, 2));
        b.write_u16(PAGE_SIZE, 0x1234);
        b.write_u64(8, 0x0102_0304_0506_0708);
        let mut out = [0u8; 2];
        mem.read(b.paddr() + PAGE_SIZE as u64, &mut out);
        assert_eq!(out, [0x34, 0x12]);
        assert_eq!(b.read_u32(8), 0x0506_0708);
        b.fill(8, 4, 0);
        assert_eq!(b.read_u32(8), 0);
        drop(b);
        assert_eq!(mem.live_pages(), 0);
    }

    /// An access that ends past the buffer, or whose end overflows, panics
    /// instead of touching the memory after it.
    #[test]
    fn out_of_bounds_accesses_panic() {
        let mem = FakeMemory::new(2);
        let b = DmaBuffer::new(mem.hal(), 1).expect("1 page");
        let past = std::panic::catch_unwind(|| b.read(PAGE_SIZE - 2, &mut [0u8; 4]));
        assert!(past.is_err());
        let overflow = std::panic::catch_unwind(|| b.read(usize::MAX, &mut [0u8; 2]));
        assert!(overflow.is_err());
        let misaligned = std::panic::catch_unwind(|| b.read_u16(1));
        assert!(misaligned.is_err());
        assert_eq!(b.read_u16(PAGE_SIZE - 2), 0, "the last word is inside");
    }
}
