//! Fake guest-physical memory and the page allocator over it ([`Hal`]).

use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};

/// Bus address of the first page of fake memory.
pub const FAKE_MEM_BASE: u64 = 0x1_0000_0000;

struct MemInner {
    ptr: NonNull<u8>,
    pages: usize,
    alloc: Mutex<MemAlloc>,
}

#[derive(Default)]
struct MemAlloc {
    next: usize,
    free: BTreeMap<usize, Vec<usize>>,
    live: usize,
}

// SAFETY: the memory is only reached through bounds-checked copies and the
// driver's ring protocol; the allocator state is behind a Mutex.
unsafe impl Send for MemInner {}
// SAFETY: as above.
unsafe impl Sync for MemInner {}

impl Drop for MemInner {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.pages * PAGE_SIZE, PAGE_SIZE)
            .expect("layout was valid at allocation");
        // SAFETY: allocated in FakeMemory::new with this very layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Fake guest memory: `pages` zeroed pages at [`FAKE_MEM_BASE`].
#[derive(Clone)]
pub struct FakeMemory {
    inner: Arc<MemInner>,
}

impl FakeMemory {
    /// Allocates `pages` pages of fake memory.
    pub fn new(pages: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE)
            .expect("fake memory size overflows");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).expect("out of host memory for fake guest memory");
        Self {
            inner: Arc::new(MemInner {
                ptr,
                pages: pages.max(1),
                alloc: Mutex::new(MemAlloc::default()),
            }),
        }
    }

    /// A HAL allocating from this memory.
    pub fn hal(&self) -> FakeHal {
        FakeHal { mem: self.clone() }
    }

    /// Pages currently allocated through the HAL.
    pub fn live_pages(&self) -> usize {
        self.inner.alloc.lock().unwrap_or_else(|e| e.into_inner()).live
    }

    fn offset(&self, bus: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(bus.checked_sub(FAKE_MEM_BASE)?).ok()?;
        (off.checked_add(len)? <= self.inner.pages * PAGE_SIZE).then_some(off)
    }

    /// Reads guest memory at bus address `bus`; false if out of bounds.
    pub fn read(&self, bus: u64, out: &mut [u8]) -> bool {
        let Some(off) = self.offset(bus, out.len()) else { return false };
        // SAFETY: bounds checked above; plain bytes, any value is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.inner.ptr.as_ptr().add(off),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        true
    }

    /// Reads the little-endian `u64` at the 8-aligned bus address `bus` with
    /// one load, as a device walking a page table does; `None` if out of
    /// bounds or misaligned.
    pub fn read_u64(&self, bus: u64) -> Option<u64> {
        let off = self.offset(bus, 8).filter(|o| o % 8 == 0)?;
        // SAFETY: bounds checked above; 8-aligned since the memory is
        // page-aligned; the driver may write the word meanwhile, so volatile.
        let v = unsafe { self.inner.ptr.as_ptr().add(off).cast::<u64>().read_volatile() };
        Some(u64::from_le(v))
    }

    /// Writes guest memory at bus address `bus`; false if out of bounds.
    pub fn write(&self, bus: u64, data: &[u8]) -> bool {
        let Some(off) = self.offset(bus, data.len()) else { return false };
        // SAFETY: bounds checked above.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.inner.ptr.as_ptr().add(off),
                data.len(),
            )
        };
        true
    }

    pub(super) fn read_u16(&self, bus: u64) -> Option<u16> {
        let mut b = [0; 2];
        self.read(bus, &mut b).then(|| u16::from_le_bytes(b))
    }

    pub(super) fn write_u16(&self, bus: u64, v: u16) {
        self.write(bus, &v.to_le_bytes());
    }
}

/// [`Hal`] over [`FakeMemory`].
#[derive(Clone)]
pub struct FakeHal {
    mem: FakeMemory,
}

// SAFETY: regions come from the fake memory, are zeroed on allocation, stay
// valid while the FakeMemory lives (the HAL holds it) and never overlap.
unsafe impl Hal for FakeHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let inner = &self.mem.inner;
        let mut a = inner.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let first = match a.free.get_mut(&pages).and_then(Vec::pop) {
            Some(p) => p,
            None => {
                if a.next + pages > inner.pages {
                    return None;
                }
                a.next += pages;
                a.next - pages
            }
        };
        a.live += pages;
        // SAFETY: first..first+pages lies inside the allocation (checked above).
        let vaddr = unsafe { inner.ptr.as_ptr().add(first * PAGE_SIZE) };
        // SAFETY: as above; the Hal contract asks for zeroed memory.
        unsafe { vaddr.write_bytes(0, pages * PAGE_SIZE) };
        Some(DmaRegion {
            bus_addr: FAKE_MEM_BASE + (first * PAGE_SIZE) as u64,
            vaddr: NonNull::new(vaddr)?,
            pages,
        })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        let mut a = self.mem.inner.alloc.lock().unwrap_or_else(|e| e.into_inner());
        let first = ((region.bus_addr - FAKE_MEM_BASE) as usize) / PAGE_SIZE;
        a.live -= region.pages;
        a.free.entry(region.pages).or_default().push(first);
    }
}
