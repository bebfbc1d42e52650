//! DMA memory for a Linux userspace driver: 2 MiB hugetlb pages, locked
//! and populated, with their physical addresses from `/proc/self/pagemap`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use viommu_driver::hal::{DmaRegion, Hal, PAGE_SIZE};

use crate::Error;

/// Size of one hugetlb page.
pub const HUGE_PAGE: usize = 2 << 20;
const PAGES_PER_CHUNK: usize = HUGE_PAGE / PAGE_SIZE;

/// Decodes a pagemap entry into a page frame number: bit 63 = present,
/// bits 0–54 = PFN. A zero PFN means the caller lacks CAP_SYS_ADMIN.
pub fn pagemap_pfn(entry: u64) -> Result<u64, Error> {
    if entry & (1 << 63) == 0 {
        return Err(Error::Dma("page not present in pagemap".into()));
    }
    let pfn = entry & ((1 << 55) - 1);
    if pfn == 0 {
        return Err(Error::Dma("pagemap hides PFNs: run as root".into()));
    }
    Ok(pfn)
}

/// One 2 MiB hugetlb page, split into 4 KiB pages by a bitmap.
#[derive(Debug)]
struct Chunk {
    va: NonNull<u8>,
    pa: u64,
    used: [u64; PAGES_PER_CHUNK / 64],
}

// SAFETY: a chunk owns its mapping; the pointer is only used by whoever
// holds the pool's mutex, on any thread.
unsafe impl Send for Chunk {}

impl Chunk {
    fn new(pagemap: &File) -> Result<Self, Error> {
        // SAFETY: an anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                HUGE_PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE
                    | libc::MAP_ANONYMOUS
                    | libc::MAP_HUGETLB
                    | libc::MAP_POPULATE
                    | libc::MAP_LOCKED,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Dma(format!(
                "mmap of a 2 MiB hugetlb page failed ({}); is vm.nr_hugepages set?",
                std::io::Error::last_os_error()
            )));
        }
        let va = NonNull::new(p.cast::<u8>()).expect("mmap never returns NULL on success");
        let mut entry = [0u8; 8];
        let read = pagemap.read_exact_at(&mut entry, (va.as_ptr() as u64 / PAGE_SIZE as u64) * 8);
        let mut chunk = Self { va, pa: 0, used: [0; PAGES_PER_CHUNK / 64] };
        read.map_err(|e| Error::io("read /proc/self/pagemap".into(), e))?;
        let pa = pagemap_pfn(u64::from_le_bytes(entry))? * PAGE_SIZE as u64;
        if pa % HUGE_PAGE as u64 != 0 {
            return Err(Error::Dma(format!("hugetlb page at {pa:#x} is not 2 MiB aligned")));
        }
        chunk.pa = pa;
        Ok(chunk)
    }

    fn is_used(&self, page: usize) -> bool {
        self.used[page / 64] & (1 << (page % 64)) != 0
    }

    fn set(&mut self, first: usize, n: usize, used: bool) {
        for p in first..first + n {
            if used {
                self.used[p / 64] |= 1 << (p % 64);
            } else {
                self.used[p / 64] &= !(1 << (p % 64));
            }
        }
    }

    /// First fit of `n` free pages; returns the first page's index.
    fn find(&self, n: usize) -> Option<usize> {
        let mut run = 0;
        for p in 0..PAGES_PER_CHUNK {
            run = if self.is_used(p) { 0 } else { run + 1 };
            if run == n {
                return Some(p + 1 - n);
            }
        }
        None
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: va came from mmap of HUGE_PAGE bytes and is no longer used.
        unsafe {
            libc::munmap(self.va.as_ptr().cast(), HUGE_PAGE);
        }
    }
}

#[derive(Debug)]
struct Pool {
    chunks: Vec<Chunk>,
    max_chunks: usize,
    pagemap: File,
}

/// [`Hal`] over hugetlb pages: bus address = guest-physical address.
///
/// Allocations are at most 2 MiB (one hugetlb page) and never span two.
/// Clones share one pool, so the IOMMU driver, the endpoint driver and the
/// buffers can all draw from it.
///
/// ```no_run
/// use viommu_driver::hal::DmaBuffer;
/// let hal = viommu_guest::hugepage::HugePageHal::new(16).unwrap();
/// let r = DmaBuffer::new(&hal, 4).unwrap();
/// assert_eq!(r.paddr() % 4096, 0);
/// drop(r); // back to the pool
/// ```
#[derive(Clone, Debug)]
pub struct HugePageHal {
    pool: Arc<Mutex<Pool>>,
}

impl HugePageHal {
    /// A pool that grows on demand up to `max_huge_pages` 2 MiB pages.
    pub fn new(max_huge_pages: usize) -> Result<Self, Error> {
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| Error::io("open /proc/self/pagemap".into(), e))?;
        let mut pool = Pool { chunks: Vec::new(), max_chunks: max_huge_pages, pagemap };
        // Fail early, with a clear message, if hugetlb or pagemap do not work.
        let first = Chunk::new(&pool.pagemap)?;
        pool.chunks.push(first);
        Ok(Self { pool: Arc::new(Mutex::new(pool)) })
    }

    /// Bytes currently handed out.
    pub fn allocated_bytes(&self) -> usize {
        let pool = self.pool.lock().expect("pool lock");
        pool.chunks
            .iter()
            .map(|c| c.used.iter().map(|w| w.count_ones() as usize).sum::<usize>())
            .sum::<usize>()
            * PAGE_SIZE
    }
}

// SAFETY: regions are carved from locked, populated hugetlb pages that stay
// mapped while the HAL lives; each is zeroed on allocation and physically
// contiguous because it lies inside one 2 MiB page.
unsafe impl Hal for HugePageHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        if pages == 0 || pages > PAGES_PER_CHUNK {
            return None;
        }
        let mut pool = self.pool.lock().ok()?;
        let found = pool.chunks.iter().enumerate().find_map(|(i, c)| c.find(pages).map(|p| (i, p)));
        let (ci, first) = match found {
            Some(f) => f,
            None if pool.chunks.len() < pool.max_chunks => {
                let chunk = Chunk::new(&pool.pagemap).ok()?;
                pool.chunks.push(chunk);
                (pool.chunks.len() - 1, 0)
            }
            None => return None,
        };
        let chunk = &mut pool.chunks[ci];
        chunk.set(first, pages, true);
        // SAFETY: first + pages <= PAGES_PER_CHUNK, so the range is inside the chunk.
        let va = unsafe { chunk.va.as_ptr().add(first * PAGE_SIZE) };
        // SAFETY: the range was free, so no one else reads or writes it.
        unsafe { va.write_bytes(0, pages * PAGE_SIZE) };
        Some(DmaRegion {
            bus_addr: chunk.pa + (first * PAGE_SIZE) as u64,
            vaddr: NonNull::new(va)?,
            pages,
        })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        let Ok(mut pool) = self.pool.lock() else { return };
        let Some(chunk) = pool
            .chunks
            .iter_mut()
            .find(|c| region.bus_addr >= c.pa && region.bus_addr < c.pa + HUGE_PAGE as u64)
        else {
            return;
        };
        let first = ((region.bus_addr - chunk.pa) as usize) / PAGE_SIZE;
        let n = region.pages.min(PAGES_PER_CHUNK - first);
        chunk.set(first, n, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagemap_entries_decode() {
        assert_eq!(pagemap_pfn((1 << 63) | 0x1234).unwrap(), 0x1234);
        // Soft-dirty and exclusive bits above bit 54 are not part of the PFN.
        assert_eq!(pagemap_pfn((1 << 63) | (1 << 55) | (1 << 56) | 7).unwrap(), 7);
        assert!(pagemap_pfn(0x1234).is_err(), "not present");
        assert!(pagemap_pfn(1 << 63).is_err(), "PFN hidden without root");
    }

    #[test]
    fn chunk_bitmap_first_fit() {
        let mut c = Chunk { va: NonNull::dangling(), pa: 0, used: [0; PAGES_PER_CHUNK / 64] };
        c.set(0, 3, true);
        assert_eq!(c.find(2), Some(3));
        c.set(5, 1, true);
        assert_eq!(c.find(3), Some(6));
        assert_eq!(c.find(PAGES_PER_CHUNK), None);
        c.set(0, 6, false);
        assert_eq!(c.find(PAGES_PER_CHUNK), Some(0));
        // Not a real mapping: skip the munmap in Drop.
        std::mem::forget(c);
    }
}
