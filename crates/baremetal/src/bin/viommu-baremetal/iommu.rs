//! Bringing up viommu-driver on QEMU's virtio-iommu-pci: the driver, the
//! blk endpoint's paging domain (attached), and a DMA layer over it. The
//! driver may sit on any transport and HAL (ours, or virtio-drivers' through
//! the adapters); the rest of the guest sees a [`Rig`].

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use viommu_baremetal::virtio_pci::ConfigMarker;
use viommu_driver::dma::{DmaDomain, DmaPlatform};
use viommu_driver::{
    CounterSnapshot, Domain, DriverOptions, FaultRecord, Hal, Mode, ResvKind, ResvRegion,
    Transport, VirtioIommu,
};
use viommu_proto::fault::R_MAPPING;

use crate::arch::PhysMmio;
use crate::clock::Clock;
use crate::println;
use crate::Results;

/// What the guest asks of the driver after bring-up, whatever its
/// transport and HAL types.
pub trait IommuOps {
    /// [`VirtioIommu::counters`].
    fn counters(&self) -> CounterSnapshot;
    /// [`VirtioIommu::reserved_regions`].
    fn reserved_regions(&self, endpoint: u32) -> viommu_driver::Result<Vec<ResvRegion>>;
    /// [`VirtioIommu::poll_events`].
    fn poll_events(&self) -> viommu_driver::Result<usize>;
}

impl<T: Transport + 'static, H: Hal + 'static> IommuOps for VirtioIommu<T, H> {
    fn counters(&self) -> CounterSnapshot {
        VirtioIommu::counters(self)
    }
    fn reserved_regions(&self, endpoint: u32) -> viommu_driver::Result<Vec<ResvRegion>> {
        VirtioIommu::reserved_regions(self, endpoint)
    }
    fn poll_events(&self) -> viommu_driver::Result<usize> {
        VirtioIommu::poll_events(self)
    }
}

/// The driver, the endpoint's domain and what marks the trace.
pub struct Rig {
    /// The driver.
    iommu: Box<dyn IommuOps>,
    /// The blk endpoint's paging domain, attached.
    pub domain: Domain,
    /// The blk endpoint.
    pub endpoint: u32,
    /// The clock, also the DMA layers' platform.
    pub clock: Arc<Clock>,
    marker: ConfigMarker<PhysMmio>,
    faults: Arc<FaultLog>,
}

/// What the fault records our handler got since the last
/// [`Rig::take_faults`] say (no allocation in the handler).
#[derive(Debug, Default)]
pub struct FaultLog {
    count: AtomicU64,
    /// Records of another endpoint than the blk one, or another reason than MAPPING.
    other: AtomicU64,
    lowest: AtomicU64,
    highest: AtomicU64,
}

/// A summary of fault records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Faults {
    /// Records.
    pub count: u64,
    /// Of those, not (blk endpoint, MAPPING) or without an address.
    pub other: u64,
    /// Lowest and highest faulting address.
    pub range: (u64, u64),
}

impl Rig {
    /// Marks the trace: workload `name` starts here.
    pub fn mark(&self, name: &str) {
        let k = self.marker.mark();
        println!("VG MARK {name} cfgw={k}");
    }

    /// The marker, to number the marks of another driver on the device.
    pub fn marker(&self) -> ConfigMarker<PhysMmio> {
        self.marker.clone()
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

    /// Takes the fault events the device has posted, until it posts no
    /// more for a few polls (at most `budget_ns`), and returns what they
    /// said since the last call.
    pub fn take_faults(&self, budget_ns: u64) -> Faults {
        let start = self.clock.now_ns();
        let mut quiet = 0;
        while quiet < 1000 && self.clock.now_ns() - start < budget_ns {
            match self.iommu.poll_events() {
                Ok(0) | Err(_) => quiet += 1,
                Ok(_) => quiet = 0,
            }
        }
        let f = &self.faults;
        let take = |a: &AtomicU64, v| a.swap(v, Ordering::Relaxed);
        Faults {
            count: take(&f.count, 0),
            other: take(&f.other, 0),
            range: (take(&f.lowest, u64::MAX), take(&f.highest, 0)),
        }
    }
}

/// The driver on `transport` and `hal`, the endpoint's domain, attached;
/// its tests are named `<name>-...`. `marker` numbers its marks among the
/// config writes that reach the device (the transport must count its own
/// in the marker's counters).
pub fn bring_up<T: Transport + 'static, H: Hal + 'static>(
    name: &str,
    transport: T,
    hal: H,
    marker: ConfigMarker<PhysMmio>,
    endpoint: u32,
    clock: Arc<Clock>,
    res: &mut Results,
) -> Result<Rig, String> {
    // 256 event buffers, as viommu-guest: a faulting 4 KiB page gives about 256 records.
    let opts = DriverOptions { event_buffers: 256, ..DriverOptions::default() };
    let iommu =
        VirtioIommu::new(transport, hal, opts).map_err(|e| format!("VirtioIommu::new: {e}"))?;
    let faults = Arc::new(FaultLog { lowest: AtomicU64::new(u64::MAX), ..FaultLog::default() });
    let log = faults.clone();
    iommu.set_fault_handler(Some(Box::new(move |f: FaultRecord| {
        log.count.fetch_add(1, Ordering::Relaxed);
        match f.address {
            Some(a) if f.endpoint == endpoint && f.reason == R_MAPPING => {
                log.lowest.fetch_min(a, Ordering::Relaxed);
                log.highest.fetch_max(a, Ordering::Relaxed);
            }
            _ => {
                log.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    })));
    let info = iommu.info();
    println!(
        "VG INFO {name} features={:#x} page_size_mask={:#x} input_range={:x?} domain_range={:?} queues={:?}",
        info.features, info.page_size_mask, info.input_range, info.domain_range, info.queue_sizes
    );
    res.record(&format!("{name}-init"), Ok(()));
    let resv = iommu.probe_endpoint(endpoint).map_err(|e| format!("PROBE: {e}"))?;
    let msi = resv
        .iter()
        .any(|r| r.kind == ResvKind::Msi && r.start == 0xfee0_0000 && r.end == 0xfeef_ffff);
    let regions: Vec<String> = resv.iter().map(|r| format!("{:?}", r)).collect();
    res.record(
        &format!("{name}-probe-msi-region"),
        if msi {
            Ok(())
        } else {
            Err(format!("no MSI region [0xfee00000, 0xfeefffff] in {}", regions.join(", ")))
        },
    );
    let domain = iommu.alloc_paging(endpoint).map_err(|e| format!("alloc_paging: {e}"))?;
    iommu.attach(&domain, endpoint).map_err(|e| format!("attach: {e}"))?;
    res.record(&format!("{name}-attach"), Ok(()));
    Ok(Rig { iommu: Box::new(iommu), domain, endpoint, clock, marker, faults })
}
