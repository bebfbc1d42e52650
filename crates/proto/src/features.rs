//! Feature bits (§5.13.3), as bit numbers.

/// `input_range` is valid.
pub const INPUT_RANGE: u32 = 0;
/// `domain_range` is valid.
pub const DOMAIN_RANGE: u32 = 1;
/// MAP and UNMAP requests are available.
pub const MAP_UNMAP: u32 = 2;
/// Legacy: unattached endpoints bypass the IOMMU. Never offered with BYPASS_CONFIG.
pub const BYPASS: u32 = 3;
/// PROBE requests are available.
pub const PROBE: u32 = 4;
/// The MAP_FLAG_MMIO flag is available.
pub const MMIO: u32 = 5;
/// The `bypass` config field is valid and writable.
pub const BYPASS_CONFIG: u32 = 6;
/// Draft (2023 page-table proposal): several request queues. Not offered by this device.
pub const MQ: u32 = 7;
/// Draft (2023 page-table proposal): ATTACH_TABLE and INVALIDATE requests are
/// available; the driver may hand the device I/O page tables to walk.
pub const ATTACH_TABLE: u32 = 8;
/// Generic: indirect descriptors.
pub const RING_INDIRECT_DESC: u32 = 28;
/// Generic: used/avail event index suppression.
pub const RING_EVENT_IDX: u32 = 29;
/// Generic: the device complies with virtio 1.x.
pub const VERSION_1: u32 = 32;
/// Generic: the device's DMA goes through a platform IOMMU.
pub const ACCESS_PLATFORM: u32 = 33;

/// The mask for one feature bit.
pub const fn bit(feature: u32) -> u64 {
    1u64 << feature
}
