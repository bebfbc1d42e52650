//! Shared set-up for the driver's integration tests.
#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_device::DeviceConfig;
use viommu_driver::dma::{DmaDomain, DmaOptions, DmaPlatform};
use viommu_driver::fake::{FakeHal, FakeTransport};
use viommu_driver::{Domain, DriverOptions, Mapping, VirtioIommu};

mod device;
pub use device::*;

pub type Iommu = VirtioIommu<FakeTransport, FakeHal>;

pub fn setup(cfg: DeviceConfig) -> (FakeDevice, Iommu) {
    setup_with(cfg, DriverOptions::default())
}

pub fn setup_with(cfg: DeviceConfig, opts: DriverOptions) -> (FakeDevice, Iommu) {
    let fake = FakeDevice::new(cfg, Default::default());
    let iommu = VirtioIommu::new(fake.transport(), fake.hal(), opts).expect("driver init");
    (fake, iommu)
}

/// A driver whose request ring holds two requests (one descriptor each,
/// with INDIRECT_DESC) and whose waits give up after 20 ms.
pub fn setup_small_ring() -> (FakeDevice, Iommu) {
    let opts = DriverOptions {
        request_queue_size: 2,
        timeout: Some(std::time::Duration::from_millis(20)),
        ..Default::default()
    };
    setup_with(device_config(), opts)
}

/// A paging domain attached to `ep`.
pub fn attached(iommu: &Iommu, ep: u32) -> Domain {
    let d = iommu.alloc_paging(ep).unwrap();
    iommu.attach(&d, ep).unwrap();
    d
}

/// A clock the test moves by hand; CPU id from a settable value.
#[derive(Default)]
pub struct ManualClock {
    pub now: AtomicU64,
    pub cpu: AtomicU64,
}

impl ManualClock {
    pub fn advance(&self, ns: u64) {
        self.now.fetch_add(ns, Ordering::SeqCst);
    }
}

impl DmaPlatform for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
    fn cpu_id(&self) -> usize {
        self.cpu.load(Ordering::SeqCst) as usize
    }
}

/// A DMA domain over a fresh attached paging domain of endpoint 1.
pub fn dma_setup(opts: DmaOptions) -> (FakeDevice, Iommu, DmaDomain, Arc<ManualClock>) {
    let (fake, iommu) = setup(device_config());
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let clock = Arc::new(ManualClock::default());
    let dma = DmaDomain::new(d, &resv, opts, clock.clone()).unwrap();
    (fake, iommu, dma, clock)
}

/// The driver's tree in the device's format.
pub fn tree(d: &Domain) -> Vec<(u64, u64, u64, u32)> {
    d.mappings().iter().map(|m: &Mapping| (m.iova, m.last, m.paddr, m.prot.0)).collect()
}
