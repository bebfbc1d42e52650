//! The VM assembled: guest RAM, the device on its I/O thread, the driver
//! over the in-process transport, and one endpoint's domain per mode.

use std::sync::Arc;

use viommu_device::{DeviceConfig, EndpointConfig, Iommu, ResvRegion, VirtioIommu as Device};
use viommu_driver::{DriverOptions, VirtioIommu as Driver};
use viommu_proto::{RequestType, EVENT_QUEUE};

use crate::bench::Mode;
use crate::endpoint::{DirectDma, GuestDma, MapError};
use crate::ram::{GuestHal, GuestRam};
use crate::transport::{DeviceLink, ExitCost, VmTransport};

/// The guest driver type of the in-process VM.
pub type GuestDriver = Driver<VmTransport<Device>, GuestHal>;

/// The MSI doorbell every endpoint reports through PROBE (x86's).
pub const MSI_REGION: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);

/// Why the VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The device refused its configuration.
    #[error("device: {0}")]
    Device(#[from] viommu_device::Error),
    /// The driver failed to initialise or to set up the endpoint.
    #[error("driver: {0}")]
    Driver(#[from] viommu_driver::Error),
    /// The I/O thread or an eventfd could not be created.
    #[error("I/O thread: {0}")]
    Io(#[from] std::io::Error),
}

/// Counts of the VM, for differences over a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineCounts {
    /// MAP requests the device processed.
    pub map_requests: u64,
    /// UNMAP requests the device processed.
    pub unmap_requests: u64,
    /// All requests the device processed.
    pub requests: u64,
    /// Request-queue kicks (transport notifications of queue 0).
    pub kicks: u64,
    /// Syncs the driver performed.
    pub syncs: u64,
    /// Exit delay injected, in ns.
    pub exit_injected_ns: u64,
}

impl MachineCounts {
    /// The counts since `earlier`.
    pub fn since(&self, earlier: &MachineCounts) -> MachineCounts {
        MachineCounts {
            map_requests: self.map_requests - earlier.map_requests,
            unmap_requests: self.unmap_requests - earlier.unmap_requests,
            requests: self.requests - earlier.requests,
            kicks: self.kicks - earlier.kicks,
            syncs: self.syncs - earlier.syncs,
            exit_injected_ns: self.exit_injected_ns - earlier.exit_injected_ns,
        }
    }
}

/// The device configuration of the VM: one endpoint with an MSI doorbell.
pub fn device_config(endpoint: u32) -> DeviceConfig {
    DeviceConfig {
        endpoints: vec![
            EndpointConfig::new(endpoint).with_resv(ResvRegion::msi(MSI_REGION.0, MSI_REGION.1))
        ],
        ..DeviceConfig::default()
    }
}

/// The running VM. Fields drop in order: driver state first, the device's
/// I/O thread last.
pub struct Machine {
    domain: Option<viommu_driver::Domain>,
    driver: GuestDriver,
    iommu: Arc<Iommu>,
    endpoint: u32,
    mode: Mode,
    link: DeviceLink<Device>,
    ram: Arc<GuestRam>,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine").field("mode", &self.mode).field("link", &self.link).finish()
    }
}

impl Machine {
    /// Starts the device, initialises the driver and attaches `endpoint` to
    /// the domain `mode` calls for (identity or paging). `Mode::NoIommu`
    /// builds the VM but attaches nothing.
    pub fn new(ram: Arc<GuestRam>, endpoint: u32, mode: Mode) -> Result<Self, MachineError> {
        Self::with_config(ram, device_config(endpoint), endpoint, mode)
    }

    /// As [`Machine::new`], with a chosen device configuration.
    pub fn with_config(
        ram: Arc<GuestRam>,
        cfg: DeviceConfig,
        endpoint: u32,
        mode: Mode,
    ) -> Result<Self, MachineError> {
        let device = Device::new(cfg)?;
        let iommu = device.iommu();
        let link = DeviceLink::start(device, ram.clone())?;
        iommu.set_fault_notifier(Some(Arc::new(link.poker(EVENT_QUEUE))));
        let driver =
            Driver::new(link.transport(), GuestHal::new(ram.clone()), DriverOptions::default())?;
        let domain = match mode {
            Mode::NoIommu => None,
            Mode::Identity => Some(driver.alloc_identity(endpoint)?),
            _ => Some(driver.alloc_paging(endpoint)?),
        };
        if let Some(d) = &domain {
            driver.attach(d, endpoint)?;
        }
        Ok(Self { domain, driver, iommu, endpoint, mode, link, ram })
    }

    /// The device's shared state, for `translate()`.
    pub fn iommu(&self) -> Arc<Iommu> {
        self.iommu.clone()
    }

    /// The guest driver.
    pub fn driver(&self) -> &GuestDriver {
        &self.driver
    }

    /// The endpoint's domain (none for `Mode::NoIommu`).
    pub fn domain(&self) -> Option<&viommu_driver::Domain> {
        self.domain.as_ref()
    }

    /// The transport link (counters, exit cost).
    pub fn link(&self) -> &DeviceLink<Device> {
        &self.link
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The VM-exit cost model.
    pub fn exit_cost(&self) -> &ExitCost {
        self.link.exit_cost()
    }

    /// The guest DMA API for guest thread `cpu`, as the mode calls for.
    pub fn guest_dma(&self, cpu: usize) -> Result<Box<dyn GuestDma + Send>, MapError> {
        let _ = cpu;
        match self.mode {
            Mode::NoIommu | Mode::Identity => Ok(Box::new(DirectDma)),
            m => Err(MapError(format!("mode {m} needs the DMA layer"))),
        }
    }

    /// Current counts.
    pub fn counts(&self) -> MachineCounts {
        let dev = self.iommu.counters();
        let req = |t| dev.requests_of(t);
        MachineCounts {
            map_requests: req(RequestType::Map),
            unmap_requests: req(RequestType::Unmap),
            requests: dev.requests.iter().sum(),
            kicks: self.link.stats().kicks[0],
            syncs: self.driver.counters().syncs,
            exit_injected_ns: self.link.exit_cost().injected().as_nanos() as u64,
        }
    }

    /// The endpoint ID.
    pub fn endpoint(&self) -> u32 {
        self.endpoint
    }
}
