// `viommu-device` behind the fake's rings: the one device model of the
// driver's tests, benches and examples. The driver never depends on the
// device (a dev-dependency only), so this file cannot live in `src`: the
// integration tests use it as a module, the benches, unit tests and doctests
// `include!` it. Paths are spelled in full for that reason.

/// `viommu_device::VirtioIommu` as the fake's device model.
pub struct Model {
    dev: viommu_device::VirtioIommu,
    iommu: std::sync::Arc<viommu_device::Iommu>,
}

impl Model {
    /// A `viommu_device` model with `cfg`.
    pub fn new(cfg: viommu_device::DeviceConfig) -> Self {
        let dev = viommu_device::VirtioIommu::new(cfg).expect("device config");
        Self { iommu: dev.iommu(), dev }
    }
}

impl viommu_driver::fake::DeviceModel for Model {
    fn device_features(&self) -> u64 {
        self.dev.device_features()
    }
    fn ack_features(&mut self, features: u64) {
        self.dev.ack_features(features);
    }
    fn read_config(&self, offset: usize, buf: &mut [u8]) {
        self.dev.read_config(offset as u64, buf);
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.dev.write_config(offset as u64, data);
    }
    fn reset(&mut self) {
        self.dev.reset();
    }
    fn handle_request(&mut self, readable: &[u8], writable: &mut [u8]) -> u32 {
        self.iommu.handle_request(readable, writable)
    }
}

/// What the driver's tests assume of the device unless they say otherwise:
/// endpoints 0 to 15, domains 1 to 1023, 48-bit input range, 4 KiB pages,
/// 512 bytes of PROBE properties, and bypass 1 until the driver writes it.
pub fn device_config() -> viommu_device::DeviceConfig {
    viommu_device::DeviceConfig {
        domain_range: (1, 1023),
        bypass: true,
        endpoints: (0..16).map(viommu_device::EndpointConfig::new).collect(),
        ..Default::default()
    }
}

/// The fake's memory as the memory the device walks page tables in.
pub struct FakeTables(pub viommu_driver::fake::FakeMemory);

impl viommu_device::TableMemory for FakeTables {
    fn read_pte(&self, gpa: u64) -> Option<u64> {
        self.0.read_u64(gpa)
    }
}

/// The fake's rings around a `viommu_device` model, with the model's state at
/// hand for the checks.
#[derive(Clone)]
pub struct FakeDevice {
    fake: viommu_driver::fake::FakeIommu,
    iommu: std::sync::Arc<viommu_device::Iommu>,
}

impl Default for FakeDevice {
    fn default() -> Self {
        Self::new(device_config(), Default::default())
    }
}

impl std::ops::Deref for FakeDevice {
    type Target = viommu_driver::fake::FakeIommu;
    fn deref(&self) -> &Self::Target {
        &self.fake
    }
}

impl FakeDevice {
    /// A device model with `cfg` behind rings and memory set by `ring`.
    pub fn new(cfg: viommu_device::DeviceConfig, ring: viommu_driver::fake::FakeConfig) -> Self {
        let model = Model::new(cfg);
        let iommu = model.iommu.clone();
        Self { fake: viommu_driver::fake::FakeIommu::new(ring, model), iommu }
    }

    /// A device that offers page-table mode (drafts) and walks the tables in
    /// the fake's memory; otherwise as [`FakeDevice::new`].
    pub fn with_page_tables(
        mut cfg: viommu_device::DeviceConfig,
        ring: viommu_driver::fake::FakeConfig,
    ) -> Self {
        cfg.features.attach_table = true;
        let dev = Self::new(cfg, ring);
        let mem = FakeTables(dev.fake.memory().clone());
        dev.iommu.set_table_memory(Some(std::sync::Arc::new(mem)));
        dev
    }

    /// The device's mappings of `domain`: `(first, last, phys, flags)`.
    pub fn mappings(&self, domain: u32) -> Vec<(u64, u64, u64, u32)> {
        let maps = self.iommu.mappings(domain).unwrap_or_default();
        maps.iter().map(|m| (m.start, m.end, m.phys, m.flags)).collect()
    }

    /// Domains that exist in the device.
    pub fn domain_count(&self) -> usize {
        self.iommu.domain_count()
    }

    /// True if `domain` exists in the device.
    pub fn has_domain(&self, domain: u32) -> bool {
        self.iommu.mappings(domain).is_some()
    }

    /// The domain an endpoint is attached to.
    pub fn endpoint_domain(&self, endpoint: u32) -> Option<u32> {
        self.iommu.endpoint_domain(endpoint)
    }

    /// The device model's shared state, for `translate()`.
    pub fn model(&self) -> std::sync::Arc<viommu_device::Iommu> {
        self.iommu.clone()
    }

    /// The `bypass` config field.
    pub fn bypass(&self) -> u8 {
        u8::from(self.iommu.bypass())
    }
}
