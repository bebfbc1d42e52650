//! DMA memory for the driver under test: a zeroed pool with a bump allocator, reached by
//! the hostile device through bounds-checked copies.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use viommu_driver::{DmaRegion, Hal, PAGE_SIZE};

/// Bus address of the pool's first byte.
pub const BUS_BASE: u64 = 0x4000_0000;

/// The pool: `pages` zeroed pages. One per thread, reused by every input: zeroing the
/// pages the last input used costs much less than a fresh allocation.
pub struct Pool {
    ptr: NonNull<u8>,
    pages: usize,
    /// Next free page, and the live regions (first page → pages).
    state: Mutex<(usize, BTreeMap<usize, usize>)>,
    /// Allocations left before one fails (`None`: never).
    fail_after: Mutex<Option<u32>>,
}

// SAFETY: the bytes are reached only through `read`/`write` (bounds-checked copies) and
// by the driver through the regions it was given; the bookkeeping is behind mutexes.
unsafe impl Send for Pool {}
// SAFETY: as above.
unsafe impl Sync for Pool {}

thread_local! {
    static POOL: Arc<Pool> = Pool::new(POOL_PAGES);
}

/// Pages of the pool: rings, request slots and PROBE buffers of the small queues the
/// driver target uses.
pub const POOL_PAGES: usize = 256;

impl Pool {
    /// This thread's pool, all zero and free again; allocation number `fail_after` (if
    /// any) fails.
    pub fn fresh(fail_after: Option<u32>) -> Arc<Self> {
        POOL.with(|p| {
            assert_eq!(Arc::strong_count(p), 1, "the last input's driver still holds the pool");
            p.reset(fail_after);
            p.clone()
        })
    }

    fn reset(&self, fail_after: Option<u32>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the pages below the bump mark lie in the pool, and no region handed out
        // is alive (the caller holds the only reference to the pool).
        unsafe { self.ptr.as_ptr().write_bytes(0, st.0 * PAGE_SIZE) };
        *st = (0, BTreeMap::new());
        *self.fail_after.lock().unwrap_or_else(|e| e.into_inner()) = fail_after;
    }

    fn new(pages: usize) -> Arc<Self> {
        let ptr = NonNull::new(
            // SAFETY: the layout has a non-zero size.
            unsafe { std::alloc::alloc_zeroed(Self::layout(pages)) },
        )
        .expect("host memory for the DMA pool");
        Arc::new(Self {
            ptr,
            pages,
            state: Mutex::new((0, BTreeMap::new())),
            fail_after: Mutex::new(None),
        })
    }

    fn layout(pages: usize) -> Layout {
        Layout::from_size_align(pages.max(1) * PAGE_SIZE, PAGE_SIZE).expect("pool layout")
    }

    fn offset(&self, bus: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(bus.checked_sub(BUS_BASE)?).ok()?;
        (off.checked_add(len)? <= self.pages * PAGE_SIZE).then_some(off)
    }

    /// Copies pool bytes at `bus` into `out`; false (and nothing read) out of bounds.
    pub fn read(&self, bus: u64, out: &mut [u8]) -> bool {
        let Some(off) = self.offset(bus, out.len()) else { return false };
        // SAFETY: off..off+len lies in the pool (checked); any byte value is valid.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        };
        true
    }

    /// Copies `data` into the pool at `bus`; false (and nothing written) out of bounds.
    pub fn write(&self, bus: u64, data: &[u8]) -> bool {
        let Some(off) = self.offset(bus, data.len()) else { return false };
        // SAFETY: off..off+len lies in the pool (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(off), data.len())
        };
        true
    }

    /// Reads a little-endian u16 (0 out of bounds).
    pub fn u16(&self, bus: u64) -> u16 {
        let mut b = [0; 2];
        self.read(bus, &mut b);
        u16::from_le_bytes(b)
    }

    /// Pages the driver holds.
    pub fn live_pages(&self) -> usize {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1.values().sum()
    }

    fn should_fail(&self) -> bool {
        let mut f = self.fail_after.lock().unwrap_or_else(|e| e.into_inner());
        match f.as_mut() {
            Some(0) => {
                *f = None;
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.pages)) }
    }
}

/// The driver's [`Hal`] over a [`Pool`]. Freed pages are never handed out again, and a
/// free of a region that is not live (a double free) fails the run.
pub struct PoolHal(pub Arc<Pool>);

// SAFETY: regions are disjoint pages of the pool, zeroed (never reused after a free),
// valid while the pool lives, and the HAL holds the pool.
unsafe impl Hal for PoolHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let pool = &self.0;
        if pool.should_fail() {
            return None;
        }
        let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
        let first = st.0;
        if pages == 0 || first.checked_add(pages)? > pool.pages {
            return None;
        }
        st.0 += pages;
        st.1.insert(first, pages);
        // SAFETY: first..first+pages lies in the pool (checked above).
        let vaddr = unsafe { pool.ptr.as_ptr().add(first * PAGE_SIZE) };
        Some(DmaRegion {
            bus_addr: BUS_BASE + (first * PAGE_SIZE) as u64,
            vaddr: NonNull::new(vaddr)?,
            pages,
        })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        let first = (region.bus_addr.wrapping_sub(BUS_BASE) as usize) / PAGE_SIZE;
        let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let live = st.1.remove(&first);
        assert_eq!(live, Some(region.pages), "driver freed a region it does not hold: {region:?}");
    }
}
