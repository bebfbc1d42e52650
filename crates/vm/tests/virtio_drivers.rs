//! virtio-drivers' own `VirtIOBlk` on the in-process VM, through the
//! driver's adapters: the IOMMU is the VM's (real split virtqueues in guest
//! RAM, the device on its I/O thread), the blk device reaches guest RAM
//! only through the IOMMU's `translate()` (the VM's `DmaEngine`), and the
//! OS's virtio-drivers HAL bounces each shared buffer through guest RAM,
//! as an OS whose buffers the device cannot reach directly does. Every
//! byte is checked against the suite's disk pattern; MAPs, UNMAPs and
//! syncs per I/O are exact.

#[path = "../../driver/tests/common/blk.rs"]
#[allow(dead_code)]
mod blk;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Arc;

use viommu_driver::adapter::{DmaSlot, IommuHal, IommuTransport, SharedDma, StaticDma};
use viommu_driver::{Hal, PAGE_SIZE};
use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::endpoint::{pattern, DmaEngine};
use viommu_vm::machine::{device_config, Machine, MachineCounts, MachineOptions};
use viommu_vm::{GuestHal, GuestPages, GuestRam};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::{BufferDirection, Hal as VdHalTrait, PhysAddr};

use blk::{BlkCounts, BlkDevice, BusDma, SECTOR, SECTORS};

const EP: u32 = 8;

thread_local! {
    /// The guest RAM of this thread's VM (the HAL has no `self`).
    static RAM: RefCell<Option<Arc<GuestRam>>> = const { RefCell::new(None) };
    /// Bounce buffers by guest-physical address: pages.
    static BOUNCE: RefCell<HashMap<u64, usize>> = RefCell::new(HashMap::new());
}

fn ram() -> Arc<GuestRam> {
    RAM.with(|r| r.borrow().clone()).expect("RAM set")
}

/// The OS's virtio-drivers HAL: guest RAM pages, and a bounce buffer in
/// guest RAM for every shared buffer.
struct BounceHal;

// SAFETY: `dma_alloc` returns zeroed guest-RAM pages of its own (GuestHal's
// allocator), freed only by `dma_dealloc`; `share` copies into pages of its
// own and `unshare` copies back into the caller's still-valid buffer.
unsafe impl VdHalTrait for BounceHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match GuestHal::new(ram()).dma_alloc(pages) {
            Some(r) => (r.bus_addr, r.vaddr),
            None => (0, NonNull::dangling()),
        }
    }
    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        ram().free_pages(GuestPages { gpa: paddr, pages });
        0
    }
    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("no MMIO here")
    }
    unsafe fn share(buffer: NonNull<[u8]>, dir: BufferDirection) -> PhysAddr {
        let pages = buffer.len().div_ceil(PAGE_SIZE);
        let run = ram().alloc_pages(pages).expect("bounce pages");
        if dir != BufferDirection::DeviceToDriver {
            // SAFETY: the caller keeps the buffer valid and unaliased.
            let src = unsafe { buffer.as_ref() };
            ram().write(run.gpa, src).unwrap();
        }
        BOUNCE.with(|b| b.borrow_mut().insert(run.gpa, pages));
        run.gpa
    }
    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, dir: BufferDirection) {
        if dir != BufferDirection::DriverToDevice {
            // SAFETY: as in `share`; nobody else touches it meanwhile.
            let dst = unsafe { buffer.as_mut() };
            ram().read(paddr, dst).unwrap();
        }
        let pages = BOUNCE.with(|b| b.borrow_mut().remove(&paddr)).expect("shared");
        ram().free_pages(GuestPages { gpa: paddr, pages });
    }
}

/// The blk device's DMA: the VM's DmaEngine (translated, leased).
struct Engine(Arc<DmaEngine>);

impl BusDma for Engine {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.0.read(addr, buf).is_ok()
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.0.write(addr, data).is_ok()
    }
}

type Blk<D> = VirtIOBlk<IommuHal<BounceHal, D>, IommuTransport<BlkDevice<Engine>>>;

/// A VM in `mode` (no timer, a clock that stands still) and `VirtIOBlk`
/// behind its IOMMU, the DMA layer being the VM's own.
fn vm<D: StaticDma>(
    mode: DriverMode,
    slot: &DmaSlot,
) -> (Machine, &'static SharedDma, Arc<BlkCounts>, Blk<D>) {
    let ram = GuestRam::new(16 << 20).unwrap();
    RAM.with(|r| *r.borrow_mut() = Some(ram.clone()));
    let m = Machine::with_options(
        ram.clone(),
        device_config(EP),
        EP,
        Mode::Driver(mode),
        MachineOptions::deterministic(),
    )
    .unwrap();
    let dma = slot.install(SharedDma::new(m.dma().unwrap().clone())).unwrap();
    let mut disk = vec![0u8; SECTORS as usize * SECTOR];
    pattern::fill(&mut disk, 0);
    let engine = Engine(Arc::new(DmaEngine::translated(ram, m.iommu(), EP)));
    let dev = BlkDevice::new(engine, disk, 0);
    let counts = dev.counts();
    let blk = VirtIOBlk::new(IommuTransport::new(dev, dma)).unwrap();
    (m, dma, counts, blk)
}

/// Reads and writes of 1 to 8 sectors: per I/O, strict pays 3 MAPs
/// (header, data, status: each its own bounce page) in one sync, then
/// 3 UNMAPs in 3 syncs; lazy pays the MAPs' one sync and defers the
/// UNMAPs. Data checked against the disk pattern; writes read back.
#[test]
fn virtio_blk_on_the_vm_strict() {
    viommu_driver::static_dma!(StrictVm);
    run::<StrictVm>(DriverMode::Strict, StrictVm::slot(), (3, 3, 4, 4));
}

/// As above, lazy: one sync per I/O, the UNMAPs wait for the flush.
#[test]
fn virtio_blk_on_the_vm_lazy() {
    viommu_driver::static_dma!(LazyVm);
    run::<LazyVm>(DriverMode::Lazy, LazyVm::slot(), (3, 0, 1, 1));
}

/// 16 reads and a write with read-back; `per_io` is the IOMMU's (MAPs,
/// UNMAPs, syncs, request batches made available); the blk device gets
/// one kick per I/O.
fn run<D: StaticDma>(mode: DriverMode, slot: &DmaSlot, per_io: (u64, u64, u64, u64)) {
    let (m, dma, blk_kicks, mut blk) = vm::<D>(mode, slot);
    let cost = |before: MachineCounts, kicks: u64| {
        let c = m.counts().since(&before);
        assert_eq!(blk_kicks.get().0 - kicks, 1, "one kick of the blk device");
        (c.map_requests, c.unmap_requests, c.syncs, c.batches())
    };
    let mut buf = vec![0u8; 8 * SECTOR];
    for i in 0..16usize {
        let (sector, len) = (i * 9 % 200, SECTOR * (1 + i % 8));
        let (before, kicks) = (m.counts(), blk_kicks.get().0);
        blk.read_blocks(sector, &mut buf[..len]).unwrap();
        assert_eq!(cost(before, kicks), per_io, "read {i}");
        assert!(pattern::check(&buf[..len], (sector * SECTOR) as u64), "read {i}");
    }
    let data: Vec<u8> = (0..2 * SECTOR).map(|i| i as u8 ^ 0xa5).collect();
    let (before, kicks) = (m.counts(), blk_kicks.get().0);
    blk.write_blocks(250, &data).unwrap();
    assert_eq!(cost(before, kicks), per_io, "write");
    blk.read_blocks(249, &mut buf[..4 * SECTOR]).unwrap();
    assert!(pattern::check(&buf[..SECTOR], 249 * SECTOR as u64));
    assert_eq!(&buf[SECTOR..3 * SECTOR], &data[..]);
    assert!(pattern::check(&buf[3 * SECTOR..4 * SECTOR], 252 * SECTOR as u64));
    dma.dma().flush().unwrap();
    let c = dma.counts();
    assert_eq!((c.shares, c.unshares, c.failures), (3 * 18, 3 * 18, 0));
    let d = m.domain().unwrap();
    let device_maps = m.iommu().mappings(d.id()).map_or(0, |v| v.len());
    assert_eq!(device_maps as u64, c.allocs, "only the rings stay mapped");
    drop(blk);
}
