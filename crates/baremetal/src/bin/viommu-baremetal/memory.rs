//! Memory: the heap (the global allocator), DMA pages for viommu-driver's
//! `Hal`, reads of firmware tables, and page tables beyond the first 4 GiB.
//!
//! The heap is `linked_list_allocator`'s `LockedHeap` over a static array
//! in .bss: a small, no_std allocator of the rust-osdev project that takes
//! any alignment (DMA pages want 4 KiB), needs no OS and builds on stable.
//! Physical address = virtual address everywhere (identity paging), so a
//! heap allocation is also a DMA region at its own address.

use core::alloc::Layout;
use core::ptr::NonNull;

use linked_list_allocator::LockedHeap;
use viommu_baremetal::acpi::PhysMem;
use viommu_driver::hal::{DmaRegion, Hal, PAGE_SIZE};

/// Bytes of the heap.
pub const HEAP_BYTES: usize = 48 << 20;

#[repr(C, align(4096))]
struct HeapArea([u8; HEAP_BYTES]);

static mut HEAP_AREA: HeapArea = HeapArea([0; HEAP_BYTES]);

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the heap its memory; call once, first.
pub fn init() {
    // SAFETY: called once at boot before any allocation; the area is a
    // static used for nothing else.
    unsafe { HEAP.lock().init(core::ptr::addr_of_mut!(HEAP_AREA).cast(), HEAP_BYTES) }
}

/// Bytes of the heap in use.
pub fn heap_used() -> usize {
    HEAP.lock().used()
}

/// DMA memory from the heap: page-aligned, zeroed, contiguous (identity
/// paging), bus address = physical address (the IOMMU's DMA layer maps it).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned heap memory of the size
// asked for, owned by the region until `dma_dealloc`; identity paging makes
// it physically contiguous at `bus_addr` = `vaddr`.
unsafe impl Hal for HeapHal {
    fn dma_alloc(&self, pages: usize) -> Option<DmaRegion> {
        let layout = Layout::from_size_align(pages.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()?;
        if layout.size() == 0 {
            return None;
        }
        // SAFETY: the layout has a non-zero size.
        let p = NonNull::new(unsafe { alloc::alloc::alloc_zeroed(layout) })?;
        Some(DmaRegion { bus_addr: p.as_ptr() as u64, vaddr: p, pages })
    }

    unsafe fn dma_dealloc(&self, region: DmaRegion) {
        let layout = Layout::from_size_align(region.pages * PAGE_SIZE, PAGE_SIZE)
            .expect("the layout dma_alloc made");
        // SAFETY: the region came from `dma_alloc` with this layout (the
        // caller's promise), and nobody uses it any more.
        unsafe { alloc::alloc::dealloc(region.vaddr.as_ptr(), layout) }
    }
}

/// Where the firmware's tables may be: the identity map's first 4 GiB
/// minus page 0.
pub struct FirmwareMemory;

impl PhysMem for FirmwareMemory {
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
        let Some(end) = paddr.checked_add(buf.len() as u64) else { return false };
        if paddr < PAGE_SIZE as u64 || end > 1 << 32 {
            return false;
        }
        // SAFETY: the range lies in the identity-mapped first 4 GiB (the
        // boot stub's page tables), outside page 0; the bytes are firmware
        // tables or RAM, read as plain bytes into our own buffer.
        unsafe { core::ptr::copy_nonoverlapping(paddr as *const u8, buf.as_mut_ptr(), buf.len()) }
        true
    }
}

extern "C" {
    static mut BOOT_PDPT: [u64; 512];
}

/// Page directories for 1 GiB windows above 4 GiB.
const EXTRA_PDS: usize = 8;

#[repr(C, align(4096))]
struct PageDirs([[u64; 512]; EXTRA_PDS]);

static mut EXTRA: PageDirs = PageDirs([[0; 512]; EXTRA_PDS]);
static mut EXTRA_USED: usize = 0;

/// Identity-maps `[paddr, paddr + len)` with 2 MiB pages, uncached (device
/// memory); below 4 GiB the boot stub mapped everything already. False if
/// the range is beyond 512 GiB or the spare page directories ran out.
pub fn map_mmio(paddr: u64, len: u64) -> bool {
    const GIB: u64 = 1 << 30;
    let Some(end) = paddr.checked_add(len.max(1)) else { return false };
    if end > 512 * GIB {
        return false;
    }
    for gib in paddr / GIB..end.div_ceil(GIB) {
        if gib < 4 {
            continue;
        }
        // SAFETY: one CPU, no interrupts: nothing else touches the page
        // tables while this runs; the PDPT is the boot stub's, in .bss.
        unsafe {
            let pdpt = &mut *core::ptr::addr_of_mut!(BOOT_PDPT);
            if pdpt[gib as usize] & 1 != 0 {
                continue;
            }
            let used = &mut *core::ptr::addr_of_mut!(EXTRA_USED);
            if *used == EXTRA_PDS {
                return false;
            }
            let pd = &mut (*core::ptr::addr_of_mut!(EXTRA)).0[*used];
            *used += 1;
            for (i, e) in pd.iter_mut().enumerate() {
                // Present, writable, write-through, cache disabled, 2 MiB.
                *e = (gib * GIB + i as u64 * (2 << 20)) | 0x9b;
            }
            pdpt[gib as usize] = pd.as_ptr() as u64 | 3;
            // Reloading CR3 drops stale (absent) translations.
            core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
        }
    }
    true
}
