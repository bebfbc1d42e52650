//! Bringing up our drivers for a boot: the virtio-iommu (unless the mode
//! is identity), the blk endpoint's domain, the mapper and virtio-blk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use viommu_driver::hal::PAGE_SIZE;
use viommu_driver::{Domain, DriverOptions, FaultRecord, Mode, ResvKind, VirtioIommu};
use viommu_guest::blk::VirtioBlk;
use viommu_guest::hugepage::HugePageHal;
use viommu_guest::mapper::{DmaMapper, IdentityMapper, Mapper};
use viommu_guest::virtio_pci::{ConfigMarker, PciTransport};
use viommu_guest::{kernel_boot, uio};
use viommu_proto::Config;

use crate::outcome::{Outcome, Results};
use crate::{Blk, BLK_BDF, BLK_ENDPOINT, BLK_QUEUE_SIZE, HUGE_PAGES, IOMMU_BDF};

/// Our virtio-iommu driver on QEMU's device.
pub type Iommu = VirtioIommu<PciTransport, HugePageHal>;

/// Fault records the driver handed to our handler.
type FaultLog = Arc<Mutex<Vec<FaultRecord>>>;

/// Everything a test needs.
pub struct Rig {
    pub hal: HugePageHal,
    marker: ConfigMarker,
    pub iommu: Option<Iommu>,
    /// The blk endpoint's paging domain.
    pub domain: Option<Domain>,
    faults: FaultLog,
    /// Interrupt counts of the transports (none when polling).
    interrupts: Vec<Arc<AtomicU64>>,
}

impl Rig {
    /// Marks the trace: the workload `name` starts here.
    pub fn mark(&self, name: &str) {
        let k = self.marker.mark();
        println!("VG MARK {name} cfgw={k}");
    }

    /// Takes the event queue's fault records into the log.
    pub fn poll_events(&self) {
        if let Some(i) = &self.iommu {
            if let Err(e) = i.poll_events() {
                println!("VG INFO poll_events: {e}");
            }
        }
    }

    /// Interrupts taken so far, over both devices.
    pub fn interrupts(&self) -> u64 {
        self.interrupts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// The fault records logged so far, emptying the log.
    pub fn take_faults(&self) -> Vec<FaultRecord> {
        std::mem::take(&mut *self.faults.lock().expect("fault log"))
    }
}

/// Where `scripts/real-guest` puts the kernel modules.
const MODULE_DIR: &str = "/lib/modules";

/// Takes both functions from the kernel and loads `vg_intx` for them
/// (see [`viommu_guest::uio`]): the blk endpoint's transport, with its
/// interrupt, and the IOMMU's, whose interrupt [`setup`] turns on when our
/// driver runs it.
fn take_interrupts(interrupts: &mut Vec<Arc<AtomicU64>>) -> Outcome<(PciTransport, PciTransport)> {
    let iommu = PciTransport::open(IOMMU_BDF)?;
    let mut blk = PciTransport::open(BLK_BDF)?;
    kernel_boot::load_module(&format!("{MODULE_DIR}/uio.ko"))?;
    let params = uio::module_params(&[IOMMU_BDF, BLK_BDF]);
    kernel_boot::load_module_with(&format!("{MODULE_DIR}/{}.ko", uio::MODULE), &params)?;
    blk.enable_interrupts()?;
    interrupts.push(blk.counters().interrupts);
    Ok((iommu, blk))
}

/// The drivers of a boot of ours, under `mode`; completions by interrupt when `irq`.
pub fn setup(mode: Mode, irq: bool, res: &mut Results) -> Outcome<(Rig, Blk, Box<dyn Mapper>)> {
    let hal = HugePageHal::new(HUGE_PAGES)?;
    let faults: FaultLog = Arc::default();
    let mut interrupts = Vec::new();
    let (t, mut blk_t) = if irq {
        let (t, bt) = take_interrupts(&mut interrupts)?;
        (t, Some(bt))
    } else {
        (PciTransport::open(IOMMU_BDF)?, None)
    };
    let marker = t.marker(Config::BYPASS_OFFSET).ok_or("virtio-iommu has no device config")?;
    if mode.identity() {
        // No IOMMU driver: boot-bypass lets the endpoint reach memory 1:1.
        drop(t);
        let bt = match blk_t.take() {
            Some(bt) => bt,
            None => PciTransport::open(BLK_BDF)?,
        };
        let mut blk =
            VirtioBlk::new(bt, Arc::new(hal.clone()), BLK_QUEUE_SIZE, |r| Ok(r.bus_addr))?;
        blk.set_interrupts(irq);
        let rig = Rig { hal, marker, iommu: None, domain: None, faults, interrupts };
        return Ok((rig, blk, Box::new(IdentityMapper)));
    }
    let mut t = t;
    if irq {
        t.enable_interrupts()?;
        interrupts.push(t.counters().interrupts);
    }
    let opts = DriverOptions { event_buffers: 256, ..DriverOptions::default() };
    let iommu = VirtioIommu::new(t, hal.clone(), opts)?;
    let log = faults.clone();
    iommu.set_fault_handler(Some(Box::new(move |f| log.lock().expect("fault log").push(f))));
    let info = iommu.info();
    println!(
        "VG INFO iommu features={:#x} page_size_mask={:#x} input_range={:x?} queues={:?}",
        info.features, info.page_size_mask, info.input_range, info.queue_sizes
    );
    res.record("probe-msi-region", probe_msi_region(&iommu));
    let domain = iommu.alloc_paging(BLK_ENDPOINT)?;
    iommu.attach(&domain, BLK_ENDPOINT)?;
    let mut m = DmaMapper::new(&iommu, domain.clone(), BLK_ENDPOINT, mode)?;
    let bt = match blk_t.take() {
        Some(bt) => bt,
        None => PciTransport::open(BLK_BDF)?,
    };
    let mut blk = VirtioBlk::new(bt, Arc::new(hal.clone()), BLK_QUEUE_SIZE, |r| {
        Ok(m.map_coherent(r.bus_addr, r.pages * PAGE_SIZE)?)
    })?;
    blk.set_interrupts(irq);
    if irq {
        println!("VG INFO completion by interrupt (INTx through vg_intx)");
    }
    let rig = Rig { hal, marker, iommu: Some(iommu), domain: Some(domain), faults, interrupts };
    Ok((rig, blk, Box::new(m)))
}

/// PROBE of the endpoint reports QEMU's MSI doorbell region.
fn probe_msi_region(iommu: &Iommu) -> Outcome {
    let resv = iommu.probe_endpoint(BLK_ENDPOINT)?;
    let msi = resv
        .iter()
        .any(|r| r.kind == ResvKind::Msi && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff);
    if msi {
        Ok(())
    } else {
        Err(format!("no MSI region [0xfee00000, 0xfeefffff] in {resv:?}").into())
    }
}
