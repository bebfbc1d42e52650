//! virtio-drivers 0.13's own `VirtIOBlk`, behind the IOMMU through
//! viommu-driver's adapters (feature `virtio-drivers`): its `share` and
//! `unshare` map through a `DmaDomain` ([`IommuHal`]), and its transport
//! accepts ACCESS_PLATFORM and syncs the queued MAPs once per notify
//! ([`IommuTransport`]). Here is what a Rust OS built on virtio-drivers
//! writes: the OS's `Hal` ([`OsHal`]), a config-space accessor, and the
//! bring-up.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use core::ptr::NonNull;

use alloc::sync::Arc;
use viommu_baremetal::pattern;
use viommu_baremetal::pci::{Bdf, ConfigSpace};
use viommu_baremetal::virtio_pci::{ConfigMarker, Counting};
use viommu_driver::adapter::{IommuHal, IommuTransport, SharedDma, VdHal, VdTransport};
use viommu_driver::hal::{DmaRegion, Hal};
use viommu_driver::{Mode, Policy};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction, PciRoot};
use virtio_drivers::transport::pci::PciTransport as VdPciTransport;
use virtio_drivers::{BufferDirection, PhysAddr};

use crate::arch::{PhysMmio, PortConfig};
use crate::clock::Clock;
use crate::iommu::{self, Rig};
use crate::memory::{map_mmio, HeapHal};
use crate::println;
use crate::workload::{print_perf, Perf, Workload};
use crate::Results;

/// The OS's virtio-drivers `Hal`: heap pages, identity paging, so a
/// buffer's physical address is its address.
pub struct OsHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned, contiguous heap pages
// (HeapHal's promise), `dma_dealloc` returns exactly them, and with identity
// paging physical = virtual for memory and MMIO alike.
unsafe impl virtio_drivers::Hal for OsHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match HeapHal.dma_alloc(pages) {
            Some(r) => (r.bus_addr, r.vaddr),
            None => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        // SAFETY: virtio-drivers gives back what `dma_alloc` returned (its
        // promise), so this is a region HeapHal made.
        unsafe { HeapHal.dma_dealloc(DmaRegion { bus_addr: paddr, vaddr, pages }) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        assert!(map_mmio(paddr, size as u64), "cannot map MMIO at {paddr:#x}");
        NonNull::new(paddr as *mut u8).expect("a BAR at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr().cast::<u8>() as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}

/// Config space through ports 0xcf8/0xcfc, as virtio-drivers wants it.
struct PortCam;

impl ConfigurationAccess for PortCam {
    fn read_word(&self, f: DeviceFunction, offset: u8) -> u32 {
        PortConfig.read32(Bdf { bus: f.bus, dev: f.device, func: f.function }, offset)
    }
    fn write_word(&mut self, f: DeviceFunction, offset: u8, data: u32) {
        PortConfig.write32(Bdf { bus: f.bus, dev: f.device, func: f.function }, offset, data)
    }
    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

viommu_driver::static_dma! {
    /// The blk device's DMA layer, found by type: virtio-drivers' `Hal` has no `self`.
    BlkDma
}

type Blk = VirtIOBlk<IommuHal<OsHal, BlkDma>, IommuTransport<VdPciTransport>>;

/// Runs `workloads` through `VirtIOBlk` on the function at `bdf`, first
/// under strict, then under lazy (one `SharedDma`, switched at run time).
/// Once per boot: the DMA slot is installed once.
pub fn run(rig: &Rig, bdf: Bdf, workloads: &[Workload], res: &mut Results) -> Result<(), String> {
    let dma = BlkDma::slot()
        .install(SharedDma::new(rig.dma(Mode::Strict)?))
        .map_err(|_| String::from("the blk DMA slot is taken"))?;
    let f = DeviceFunction { bus: bdf.bus, device: bdf.dev, function: bdf.func };
    let pci = VdPciTransport::new::<OsHal, _>(&mut PciRoot::new(PortCam), f)
        .map_err(|e| format!("virtio-drivers PciTransport: {e:?}"))?;
    let mut blk =
        Blk::new(IommuTransport::new(pci, dma)).map_err(|e| format!("VirtIOBlk::new: {e:?}"))?;
    println!(
        "VG INFO virtio-drivers VirtIOBlk capacity={} MiB",
        (blk.capacity() * SECTOR_SIZE as u64) >> 20
    );
    res.record("vd-blk-init", Ok(()));
    for (policy, mode) in [(Policy::Strict, Mode::Strict), (Policy::Lazy, Mode::Lazy)] {
        dma.dma().set_policy(policy).map_err(|e| format!("set_policy: {e}"))?;
        for w in workloads {
            let w = Workload { name: format!("vd-{}-{}", mode.name(), w.name), ..w.clone() };
            let r = run_one(rig, dma, &mut blk, &w).map(|p| print_perf(&w, &p));
            let r = r.and_then(|()| {
                if !w.write {
                    return Ok(());
                }
                let v = w.verify();
                run_one(rig, dma, &mut blk, &v).map(|p| print_perf(&v, &p))
            });
            res.record(&w.name, r);
        }
    }
    // The device's teardown (VirtIOBlk's drop, its rings' unshares) is no workload's.
    rig.mark("vd-teardown");
    let c = dma.counts();
    println!(
        "VG INFO virtio-drivers shares={} unshares={} allocs={} syncs={} failures={}",
        c.shares, c.unshares, c.allocs, c.syncs, c.failures
    );
    res.record(
        "vd-no-share-failures",
        if c.failures == 0 {
            Ok(())
        } else {
            Err(format!("{} shares or syncs failed", c.failures))
        },
    );
    Ok(())
}

/// viommu-driver itself on virtio-drivers' plumbing, as a Rust OS that has
/// virtio-drivers' PCI transport and `Hal` would run it: `VdTransport` over
/// virtio-drivers' `PciTransport` of the IOMMU, `VdHal<OsHal>` for its
/// rings. It resets the device, so whatever driver ran it before is done.
/// Its config writes are counted for `marker` ([`Counting`]).
pub fn bring_up_on_vd(
    iommu_bdf: Bdf,
    marker: ConfigMarker<PhysMmio>,
    endpoint: u32,
    clock: Arc<Clock>,
    res: &mut Results,
) -> Result<Rig, String> {
    let f = DeviceFunction { bus: iommu_bdf.bus, device: iommu_bdf.dev, function: iommu_bdf.func };
    let pci = VdPciTransport::new::<OsHal, _>(&mut PciRoot::new(PortCam), f)
        .map_err(|e| format!("virtio-drivers PciTransport: {e:?}"))?;
    let t = VdTransport::new(pci).map_err(|e| format!("VdTransport: {e}"))?;
    let t = Counting::new(t, marker.counters());
    iommu::bring_up("vd-iommu", t, VdHal::<OsHal>::new(), marker, endpoint, clock, res)
}

/// One workload at queue depth 1 (`read_blocks` and `write_blocks` wait).
fn run_one(rig: &Rig, dma: &SharedDma, blk: &mut Blk, w: &Workload) -> Result<Perf, String> {
    let clock = &rig.clock;
    let mut buf = vec![0u8; w.size];
    let mut untimed = 0;
    rig.mark(&w.name);
    let before = rig.counters();
    let t0 = clock.now_ns();
    for i in 0..w.count {
        let block = (w.offset(i) / SECTOR_SIZE as u64) as usize;
        if w.write {
            let t = clock.now_ns();
            pattern::fill(&mut buf, w.offset(i), w.tag);
            untimed += clock.now_ns() - t;
            blk.write_blocks(block, &buf).map_err(|e| format!("write_blocks({block}): {e:?}"))?;
        } else {
            blk.read_blocks(block, &mut buf).map_err(|e| format!("read_blocks({block}): {e:?}"))?;
            let t = clock.now_ns();
            w.check(i, &buf)?;
            untimed += clock.now_ns() - t;
        }
        dma.dma().tick().map_err(|e| format!("tick: {e}"))?;
    }
    dma.dma().flush().map_err(|e| format!("flush: {e}"))?;
    let secs = clock.now_ns().saturating_sub(t0 + untimed) as f64 / 1e9;
    Ok(Perf { secs, counts: rig.counters().since(&before), blk_kicks: None })
}
