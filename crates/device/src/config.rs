//! What the VMM chooses: offered features, config-space values, endpoints and limits.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use viommu_proto::features::{self, bit};
use viommu_proto::Config;
use zerocopy::little_endian::{U32, U64};

use crate::error::ConfigError;

/// Largest `probe_size` a VMM may choose; keeps the per-request scratch buffer small.
pub const MAX_PROBE_SIZE: u32 = 64 * 1024;

/// Kind of a reserved region reported by PROBE as a RESV_MEM property.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResvKind {
    /// `RESV_MEM_T_RESERVED`: the driver must not map it; accesses fault.
    Reserved,
    /// `RESV_MEM_T_MSI`: the MSI doorbell; accesses bypass translation (identity).
    Msi,
}

/// A reserved IOVA region of one endpoint. `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResvRegion {
    /// Reserved or MSI.
    pub kind: ResvKind,
    /// First address.
    pub start: u64,
    /// Last address, inclusive.
    pub end: u64,
}

impl ResvRegion {
    /// An MSI doorbell region `[start, end]`.
    pub const fn msi(start: u64, end: u64) -> Self {
        Self { kind: ResvKind::Msi, start, end }
    }

    /// A reserved (never mappable) region `[start, end]`.
    pub const fn reserved(start: u64, end: u64) -> Self {
        Self { kind: ResvKind::Reserved, start, end }
    }

    /// True if `[start, end]` intersects this region.
    pub const fn overlaps(&self, start: u64, end: u64) -> bool {
        start <= self.end && self.start <= end
    }
}

/// One endpoint the device manages, with its reserved regions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointConfig {
    /// Endpoint ID, as the guest firmware tables name it.
    pub id: u32,
    /// Reserved regions, reported by PROBE and enforced by MAP and translate.
    pub resv: Vec<ResvRegion>,
}

impl EndpointConfig {
    /// An endpoint without reserved regions.
    pub fn new(id: u32) -> Self {
        Self { id, resv: Vec::new() }
    }

    /// Adds a reserved region.
    pub fn with_resv(mut self, region: ResvRegion) -> Self {
        self.resv.push(region);
        self
    }
}

/// Bounds on guest-driven allocation. Exceeding one makes the request fail with NOMEM,
/// except `max_endpoints`: an ATTACH to a full domain gets UNSUPP, as §5.13.6.3 requires
/// ("If it cannot do so, the device MUST reject the request and set status to
/// VIRTIO_IOMMU_S_UNSUPP").
///
/// A live mapping costs page index entries for up to four granules and, in the sparsest
/// case, a start bitmap of its own; packed mappings cost far less. What the default limits
/// let a guest make the device hold is measured by `examples/memory.rs` (docs/device.md,
/// "Memory a guest can cause").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Domains that may exist at once.
    pub max_domains: usize,
    /// Live mappings in one domain.
    pub max_mappings_per_domain: usize,
    /// Live mappings over all domains.
    pub max_mappings_total: usize,
    /// Endpoints attached to one domain (beyond: UNSUPP, see above).
    pub max_endpoints: usize,
    /// Fault events waiting for an event-queue buffer; further faults are dropped and counted.
    pub max_pending_faults: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 19,
            max_mappings_total: 1 << 19,
            max_endpoints: 256,
            max_pending_faults: 64,
        }
    }
}

/// Which optional features the device offers. VERSION_1 and EVENT_IDX are always offered.
///
/// Build it with `..Default::default()` so that later additions keep compiling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedFeatures {
    /// VIRTIO_IOMMU_F_INPUT_RANGE.
    pub input_range: bool,
    /// VIRTIO_IOMMU_F_DOMAIN_RANGE.
    pub domain_range: bool,
    /// VIRTIO_IOMMU_F_MAP_UNMAP.
    pub map_unmap: bool,
    /// VIRTIO_IOMMU_F_PROBE.
    pub probe: bool,
    /// VIRTIO_IOMMU_F_MMIO.
    pub mmio: bool,
    /// VIRTIO_IOMMU_F_BYPASS_CONFIG.
    pub bypass_config: bool,
    /// Legacy VIRTIO_IOMMU_F_BYPASS; never together with `bypass_config`.
    pub legacy_bypass: bool,
    /// VIRTIO_F_ACCESS_PLATFORM.
    pub access_platform: bool,
    /// VIRTIO_F_RING_INDIRECT_DESC (offered by default). The chain walker handles
    /// indirect tables boundedly: one table per chain, at most queue-size descriptors in
    /// all, nested or malformed tables refused (see [`crate::request`]).
    pub indirect_desc: bool,
    /// Experimental, off by default: the draft VIRTIO_IOMMU_F_ATTACH_TABLE (page-table
    /// mode, docs/device.md "Page-table mode"). The device then accepts ATTACH_TABLE and
    /// INVALIDATE, reports a PAGE_TABLE_FMT property in PROBE, and walks the guest's I/O
    /// page tables in the memory given by [`crate::Iommu::set_table_memory`]. No released
    /// virtio spec, Linux or QEMU speaks this mode.
    #[serde(default)]
    pub attach_table: bool,
}

impl Default for OfferedFeatures {
    fn default() -> Self {
        Self {
            input_range: true,
            domain_range: true,
            map_unmap: true,
            probe: true,
            mmio: true,
            bypass_config: true,
            legacy_bypass: false,
            access_platform: false,
            indirect_desc: true,
            attach_table: false,
        }
    }
}

impl OfferedFeatures {
    /// The feature word the device offers.
    pub fn bits(&self) -> u64 {
        let flag = |on: bool, f: u32| if on { bit(f) } else { 0 };
        bit(features::VERSION_1)
            | bit(features::RING_EVENT_IDX)
            | flag(self.input_range, features::INPUT_RANGE)
            | flag(self.domain_range, features::DOMAIN_RANGE)
            | flag(self.map_unmap, features::MAP_UNMAP)
            | flag(self.probe, features::PROBE)
            | flag(self.mmio, features::MMIO)
            | flag(self.bypass_config, features::BYPASS_CONFIG)
            | flag(self.legacy_bypass, features::BYPASS)
            | flag(self.access_platform, features::ACCESS_PLATFORM)
            | flag(self.indirect_desc, features::RING_INDIRECT_DESC)
            | flag(self.attach_table, features::ATTACH_TABLE)
    }
}

/// Everything the VMM chooses about one virtio-iommu device.
///
/// ```
/// use viommu_device::{DeviceConfig, EndpointConfig, ResvRegion};
/// let cfg = DeviceConfig {
///     endpoints: vec![EndpointConfig::new(8).with_resv(ResvRegion::msi(0xfee0_0000, 0xfeef_ffff))],
///     ..DeviceConfig::default()
/// };
/// assert!(cfg.validate().is_ok());
/// assert_eq!(cfg.granule(), 4096);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    /// Offered features.
    pub features: OfferedFeatures,
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// IOVA range the device translates (inclusive), enforced with INPUT_RANGE.
    pub input_range: (u64, u64),
    /// Valid domain IDs (inclusive), enforced with DOMAIN_RANGE.
    pub domain_range: (u32, u32),
    /// Bytes of PROBE properties.
    pub probe_size: u32,
    /// Initial value of config `bypass` (with BYPASS_CONFIG). Kept across device reset.
    pub bypass: bool,
    /// Limits on guest-driven allocation.
    pub limits: Limits,
    /// The endpoints this device manages; any other endpoint ID is NOENT.
    pub endpoints: Vec<EndpointConfig>,
    /// A change waiting for translation leases longer than this counts the leases still
    /// held as `slow_leases`, and keeps waiting (default 10 ms).
    #[serde(default = "default_slow_lease")]
    pub slow_lease: Duration,
}

fn default_slow_lease() -> Duration {
    Duration::from_millis(10)
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            features: OfferedFeatures::default(),
            page_size_mask: !0xfff,
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, 0xffff),
            probe_size: 512,
            bypass: false,
            limits: Limits::default(),
            endpoints: Vec::new(),
            slow_lease: default_slow_lease(),
        }
    }
}

impl DeviceConfig {
    /// The mapping granule: the lowest set bit of `page_size_mask` (1 if the mask is 0).
    pub fn granule(&self) -> u64 {
        1u64 << self.page_size_mask.trailing_zeros().min(63)
    }

    /// Bytes of RESV_MEM properties PROBE writes for `ep`.
    pub fn probe_len(ep: &EndpointConfig) -> usize {
        ep.resv.len() * RESV_PROP_LEN
    }

    /// Bytes of properties PROBE writes for `ep` with this configuration: the RESV_MEM
    /// properties, then with `attach_table` one PAGE_TABLE_FMT property.
    pub fn probe_props_len(&self, ep: &EndpointConfig) -> usize {
        Self::probe_len(ep) + if self.features.attach_table { TABLE_FMT_PROP_LEN } else { 0 }
    }

    /// Checks that the choices are coherent; [`crate::VirtioIommu::new`] refuses a config that is not.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::EmptyPageSizeMask);
        }
        if self.features.bypass_config && self.features.legacy_bypass {
            return Err(ConfigError::BothBypassFeatures);
        }
        if self.input_range.0 > self.input_range.1 {
            return Err(ConfigError::EmptyInputRange);
        }
        if self.domain_range.0 > self.domain_range.1 {
            return Err(ConfigError::EmptyDomainRange);
        }
        if self.probe_size > MAX_PROBE_SIZE {
            return Err(ConfigError::ProbeSizeTooLarge(self.probe_size));
        }
        let mut ids: Vec<u32> = self.endpoints.iter().map(|e| e.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateEndpoint(w[0]));
        }
        for ep in &self.endpoints {
            validate_resv(ep)?;
            if self.features.probe && self.probe_props_len(ep) > self.probe_size as usize {
                return Err(ConfigError::ProbeSizeTooSmall { endpoint: ep.id });
            }
        }
        Ok(())
    }

    /// The config space as the driver reads it, with `bypass` as given. Fields whose feature
    /// is not offered show the value the spec implies (whole range, no probe).
    pub fn config_space(&self, bypass: bool) -> Config {
        let f = &self.features;
        let (input_start, input_end) = if f.input_range { self.input_range } else { (0, u64::MAX) };
        let (domain_start, domain_end) =
            if f.domain_range { self.domain_range } else { (0, u32::MAX) };
        Config {
            page_size_mask: U64::new(self.page_size_mask),
            input_start: U64::new(input_start),
            input_end: U64::new(input_end),
            domain_start: U32::new(domain_start),
            domain_end: U32::new(domain_end),
            probe_size: U32::new(if f.probe { self.probe_size } else { 0 }),
            bypass: u8::from(f.bypass_config && bypass),
            reserved: [0; 3],
        }
    }
}

/// Size of one RESV_MEM property, header included.
pub const RESV_PROP_LEN: usize =
    size_of::<viommu_proto::ProbePropHead>() + size_of::<viommu_proto::ResvMem>();

/// Size of one PAGE_TABLE_FMT property (draft), header included.
pub const TABLE_FMT_PROP_LEN: usize =
    size_of::<viommu_proto::ProbePropHead>() + size_of::<viommu_proto::TableFormat>();

fn validate_resv(ep: &EndpointConfig) -> Result<(), ConfigError> {
    let mut msi = 0;
    for (i, r) in ep.resv.iter().enumerate() {
        if r.start > r.end {
            return Err(ConfigError::BadResvRegion { endpoint: ep.id });
        }
        msi += usize::from(r.kind == ResvKind::Msi);
        // The spec: no two RESV_MEM properties of one endpoint overlap.
        if ep.resv[..i].iter().any(|o| o.overlaps(r.start, r.end)) {
            return Err(ConfigError::BadResvRegion { endpoint: ep.id });
        }
    }
    // The spec: at most one MSI region per endpoint.
    if msi > 1 {
        return Err(ConfigError::BadResvRegion { endpoint: ep.id });
    }
    Ok(())
}
