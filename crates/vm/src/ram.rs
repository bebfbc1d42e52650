//! Guest RAM and a page allocator over it, which is also the driver's [`Hal`].
//!
//! Guest-physical addresses double as bus addresses: that is what a guest
//! without an IOMMU (or with the IOMMU in bypass) hands its devices.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use viommu_driver::{DmaRegion, Hal, PAGE_SIZE};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    GuestMemoryRegion, MemoryRegionAddress,
};

/// Errors from guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// The size is zero or not a multiple of the page size.
    #[error("guest RAM size {0:#x} must be a non-zero multiple of 4 KiB")]
    BadSize(usize),
    /// vm-memory could not map the RAM.
    #[error("cannot map guest RAM: {0}")]
    Map(String),
    /// An access fell outside guest RAM.
    #[error("guest memory access failed: {0}")]
    Access(#[from] GuestMemoryError),
}

/// Guest RAM: one anonymous mapping starting at guest-physical address 0,
/// with a first-fit page allocator standing in for the guest kernel's.
///
/// ```
/// use viommu_vm::GuestRam;
/// let ram = GuestRam::new(1 << 20).unwrap();
/// let pages = ram.alloc_pages(2).unwrap();
/// ram.write(pages.gpa, b"hello").unwrap();
/// let mut buf = [0u8; 5];
/// ram.read(pages.gpa, &mut buf).unwrap();
/// assert_eq!(&buf, b"hello");
/// ram.free_pages(pages);
/// ```
pub struct GuestRam {
    mem: GuestMemoryMmap,
    /// The memfd behind the RAM, when it is shared ([`GuestRam::new_shared`]).
    shared: Option<File>,
    host_base: NonNull<u8>,
    size: usize,
    pages: Mutex<PageMap>,
}

// SAFETY: `host_base` points into the mapping owned by `mem`, which lives as
// long as `self`; every byte access goes through vm-memory or through
// regions whose ownership the allocator hands out exclusively.
unsafe impl Send for GuestRam {}
// SAFETY: as above; the allocator state is behind a mutex.
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam").field("size", &self.size).finish_non_exhaustive()
    }
}

/// A run of guest pages handed out by [`GuestRam::alloc_pages`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestPages {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: usize,
}

impl GuestPages {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.pages * PAGE_SIZE
    }

    /// True when the run is empty (never, for runs from the allocator).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }
}

/// First-fit allocator over a bitmap of pages, with a rotating start hint so
/// frees and allocations do not keep rescanning the low pages.
struct PageMap {
    used: Vec<bool>,
    hint: usize,
    free: usize,
}

impl PageMap {
    fn alloc(&mut self, n: usize) -> Option<usize> {
        let total = self.used.len();
        if n == 0 || n > self.free {
            return None;
        }
        // Two passes: from the hint to the end, then from 0.
        for (lo, hi) in [(self.hint, total), (0, total)] {
            let mut run = 0;
            let mut start = lo;
            for i in lo..hi {
                if self.used[i] {
                    run = 0;
                    start = i + 1;
                } else {
                    run += 1;
                    if run == n {
                        self.used[start..start + n].iter_mut().for_each(|u| *u = true);
                        self.free -= n;
                        self.hint = (start + n) % total;
                        return Some(start);
                    }
                }
            }
        }
        None
    }

    fn free(&mut self, first: usize, n: usize) {
        for u in &mut self.used[first..first + n] {
            assert!(*u, "double free of guest page {first}");
            *u = false;
        }
        self.free += n;
    }
}

impl GuestRam {
    /// Maps `size` bytes of guest RAM at guest-physical address 0.
    pub fn new(size: usize) -> Result<Arc<Self>, RamError> {
        Self::build(size, None)
    }

    /// As [`GuestRam::new`], backed by a memfd mapped shared, so that another process (a
    /// vhost-user back-end) can map the same RAM from [`GuestRam::shared_file`].
    pub fn new_shared(size: usize) -> Result<Arc<Self>, RamError> {
        // SAFETY: the name is a NUL-terminated string; the call takes no other pointer.
        let fd = unsafe { libc::memfd_create(c"viommu-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(RamError::Map(std::io::Error::last_os_error().to_string()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64).map_err(|e| RamError::Map(e.to_string()))?;
        Self::build(size, Some(file))
    }

    fn build(size: usize, shared: Option<File>) -> Result<Arc<Self>, RamError> {
        if size == 0 || size % PAGE_SIZE != 0 {
            return Err(RamError::BadSize(size));
        }
        let map = |e: &dyn std::fmt::Display| RamError::Map(e.to_string());
        let offset = match &shared {
            Some(f) => Some(FileOffset::new(f.try_clone().map_err(|e| map(&e))?, 0)),
            None => None,
        };
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), size, offset)])
            .map_err(|e| map(&e))?;
        let region = mem.find_region(GuestAddress(0)).ok_or(RamError::BadSize(size))?;
        let host = region.get_host_address(MemoryRegionAddress(0))?;
        let host_base = NonNull::new(host).ok_or(RamError::BadSize(size))?;
        let npages = size / PAGE_SIZE;
        // Page 0 stays reserved, so that bus address 0 never names a buffer.
        let mut used = vec![false; npages];
        used[0] = true;
        let pages = Mutex::new(PageMap { used, hint: 1, free: npages - 1 });
        Ok(Arc::new(Self { mem, shared, host_base, size, pages }))
    }

    /// The memfd behind the RAM, if it was made by [`GuestRam::new_shared`].
    pub fn shared_file(&self) -> Option<&File> {
        self.shared.as_ref()
    }

    /// Where this process mapped guest-physical address 0 (a vhost-user memory table's
    /// "user address").
    pub fn host_address(&self) -> u64 {
        self.host_base.as_ptr() as u64
    }

    /// The vm-memory view, for the device model.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Pages not yet allocated.
    pub fn free_page_count(&self) -> usize {
        self.pages.lock().unwrap().free
    }

    /// Allocates `n` contiguous zeroed pages.
    pub fn alloc_pages(&self, n: usize) -> Option<GuestPages> {
        let first = self.pages.lock().unwrap().alloc(n)?;
        let run = GuestPages { gpa: (first * PAGE_SIZE) as u64, pages: n };
        // SAFETY: the run lies inside the mapping (the bitmap covers exactly
        // `size` bytes) and was just handed out exclusively to us.
        unsafe { self.host_ptr(run.gpa).as_ptr().write_bytes(0, run.len()) };
        Some(run)
    }

    /// Returns pages to the allocator.
    ///
    /// # Panics
    /// If a page of the run is not allocated (a double free).
    pub fn free_pages(&self, run: GuestPages) {
        let first = (run.gpa as usize) / PAGE_SIZE;
        self.pages.lock().unwrap().free(first, run.pages);
    }

    /// Host pointer of guest-physical `gpa`. The caller keeps within RAM.
    fn host_ptr(&self, gpa: u64) -> NonNull<u8> {
        assert!((gpa as usize) < self.size, "gpa {gpa:#x} outside guest RAM");
        // SAFETY: in bounds of the single mapping, checked just above.
        unsafe { self.host_base.add(gpa as usize) }
    }

    /// Copies `data` into guest RAM at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        Ok(self.mem.write_slice(data, GuestAddress(gpa))?)
    }

    /// Copies guest RAM at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        Ok(self.mem.read_slice(buf, GuestAddress(gpa))?)
    }
}

/// The driver's DMA allocator over [`GuestRam`]: bus address = guest-physical
/// address, `vaddr` = where the host mapped it.
#[derive(Clone, Debug)]
pub struct GuestHal {
    ram: Arc<GuestRam>,
}

impl GuestHal {
    /// A HAL allocating from `ram`.
    pub fn new(ram: Arc<GuestRam>) -> Self {
        Self { ram }
    }

    /// The RAM it allocates from.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }
}

// SAFETY: regions come from `alloc_pages`, which zeroes them, keeps them
// contiguous in both guest-physical and host space (one mapping), and never
// hands them out again until `dma_dealloc`; the mapping lives as long as the
// `Arc<GuestRam>` this HAL holds.
unsafe impl Hal for GuestHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let run = self.ram.alloc_pages(pages)?;
        Some(DmaRegion { bus_addr: run.gpa, vaddr: self.ram.host_ptr(run.gpa), pages })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        self.ram.free_pages(GuestPages { gpa: region.bus_addr, pages: region.pages });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use viommu_driver::hal::DmaBuffer;

    #[test]
    fn allocations_are_disjoint_zeroed_and_reusable() {
        let ram = GuestRam::new(16 * PAGE_SIZE).unwrap();
        assert_eq!(ram.free_page_count(), 15);
        let a = ram.alloc_pages(4).unwrap();
        let b = ram.alloc_pages(4).unwrap();
        assert_ne!(a.gpa, 0);
        assert!(a.gpa + a.len() as u64 <= b.gpa || b.gpa + b.len() as u64 <= a.gpa);
        ram.write(a.gpa, &[0xaa; 16]).unwrap();
        ram.free_pages(a);
        assert!(ram.alloc_pages(12).is_none(), "only 11 pages free, not contiguous 12");
        let c = ram.alloc_pages(4).unwrap();
        let mut buf = [1u8; 16];
        ram.read(c.gpa, &mut buf).unwrap();
        assert_eq!(buf, [0; 16], "reused pages come back zeroed");
    }

    #[test]
    fn hal_regions_alias_guest_ram() {
        let ram = GuestRam::new(8 * PAGE_SIZE).unwrap();
        let hal = GuestHal::new(ram.clone());
        let mut buf = DmaBuffer::new(&hal, 2).unwrap();
        buf.write(PAGE_SIZE, &[0x5a]);
        let mut b = [0u8; 1];
        ram.read(buf.paddr() + PAGE_SIZE as u64, &mut b).unwrap();
        assert_eq!(b[0], 0x5a);
        drop(buf);
        assert_eq!(ram.free_page_count(), 7);
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(GuestRam::new(0), Err(RamError::BadSize(0))));
        assert!(matches!(GuestRam::new(100), Err(RamError::BadSize(100))));
    }
}
