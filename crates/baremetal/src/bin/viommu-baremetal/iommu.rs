//! Bringing up viommu-driver on QEMU's virtio-iommu-pci: the driver, the
//! blk endpoint's paging domain (attached), and a DMA layer over it.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use viommu_baremetal::virtio_pci::{ConfigMarker, PciTransport};
use viommu_driver::dma::{DmaDomain, DmaPlatform};
use viommu_driver::{
    CounterSnapshot, Domain, DriverOptions, FaultRecord, Mode, ResvKind, VirtioIommu,
};
use viommu_proto::Config;

use crate::arch::PhysMmio;
use crate::clock::Clock;
use crate::memory::HeapHal;
use crate::println;
use crate::Results;

/// Our virtio-iommu driver on QEMU's device.
pub type Iommu = VirtioIommu<PciTransport<PhysMmio>, HeapHal>;

/// The driver, the endpoint's domain and what marks the trace.
pub struct Rig {
    /// The driver.
    pub iommu: Iommu,
    /// The blk endpoint's paging domain, attached.
    pub domain: Domain,
    /// The blk endpoint.
    pub endpoint: u32,
    /// The clock, also the DMA layers' platform.
    pub clock: Arc<Clock>,
    marker: ConfigMarker<PhysMmio>,
    /// Fault records our handler got.
    faults: Arc<AtomicU64>,
}

impl Rig {
    /// Marks the trace: workload `name` starts here.
    pub fn mark(&self, name: &str) {
        let k = self.marker.mark();
        println!("VG MARK {name} cfgw={k}");
    }

    /// The driver's counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.iommu.counters()
    }

    /// A DMA layer over the domain, under `mode` (a mode that maps).
    pub fn dma(&self, mode: Mode) -> Result<DmaDomain, String> {
        let resv = self.iommu.reserved_regions(self.endpoint).map_err(|e| format!("{e}"))?;
        let platform: Arc<dyn DmaPlatform> = self.clock.clone();
        DmaDomain::new(self.domain.clone(), &resv, mode.dma_options(), platform)
            .map_err(|e| format!("DMA layer: {e}"))
    }

    /// Fault events taken so far.
    pub fn faults(&self) -> u64 {
        let _ = self.iommu.poll_events();
        self.faults.load(Ordering::Relaxed)
    }
}

/// The driver on `transport`, the endpoint's domain, attached.
pub fn bring_up(
    transport: PciTransport<PhysMmio>,
    endpoint: u32,
    clock: Arc<Clock>,
    res: &mut Results,
) -> Result<Rig, String> {
    let marker = transport
        .marker(Config::BYPASS_OFFSET as u64)
        .ok_or("the virtio-iommu has no device config")?;
    let iommu = VirtioIommu::new(transport, HeapHal, DriverOptions::default())
        .map_err(|e| format!("VirtioIommu::new: {e}"))?;
    let faults: Arc<AtomicU64> = Arc::default();
    let log = faults.clone();
    iommu.set_fault_handler(Some(Box::new(move |f: FaultRecord| {
        println!("VG INFO fault {f:?}");
        log.fetch_add(1, Ordering::Relaxed);
    })));
    let info = iommu.info();
    println!(
        "VG INFO iommu features={:#x} page_size_mask={:#x} input_range={:x?} domain_range={:?} queues={:?}",
        info.features, info.page_size_mask, info.input_range, info.domain_range, info.queue_sizes
    );
    res.record("iommu-init", Ok(()));
    let resv = iommu.probe_endpoint(endpoint).map_err(|e| format!("PROBE: {e}"))?;
    let msi = resv
        .iter()
        .any(|r| r.kind == ResvKind::Msi && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff);
    let regions: Vec<String> = resv.iter().map(|r| format!("{:?}", r)).collect();
    res.record(
        "iommu-probe-msi-region",
        if msi {
            Ok(())
        } else {
            Err(format!("no MSI region [0xfee00000, 0xfeefffff] in {}", regions.join(", ")))
        },
    );
    let domain = iommu.alloc_paging(endpoint).map_err(|e| format!("alloc_paging: {e}"))?;
    iommu.attach(&domain, endpoint).map_err(|e| format!("attach: {e}"))?;
    res.record("iommu-attach", Ok(()));
    Ok(Rig { iommu, domain, endpoint, clock, marker, faults })
}
