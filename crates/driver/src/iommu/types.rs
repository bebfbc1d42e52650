//! The driver's public types: options, device info, mappings, regions, faults.

use alloc::boxed::Box;
use core::ops::BitOr;
use core::time::Duration;

use viommu_proto::{features as f, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};

use crate::hal::PAGE_SIZE;

/// Choices made at initialisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverOptions {
    /// Value written to `bypass` under BYPASS_CONFIG: false blocks
    /// unattached endpoints.
    pub bypass: bool,
    /// Negotiate VIRTIO_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_F_RING_INDIRECT_DESC when offered: each request then
    /// takes one ring descriptor (its two buffers sit in a table
    /// preallocated per descriptor), so a ring of N entries holds N requests
    /// instead of N/2.
    pub indirect_desc: bool,
    /// Largest request-queue size to use (rounded down to a power of two).
    pub request_queue_size: u16,
    /// Number of event buffers to post (rounded down to a power of two).
    pub event_buffers: u16,
    /// Software MSI window `(start, end)` added to every endpoint's reserved
    /// regions when the device reports no MSI region. `None` adds nothing.
    pub sw_msi: Option<(u64, u64)>,
    /// Guest page size: the granule may not exceed it.
    pub guest_page_size: u64,
    /// Polls of the used ring before a wait gives up with [`Error::Timeout`](crate::Error::Timeout).
    /// The `no_std` bound (default 100 million); with `std` the default is
    /// `u64::MAX` and [`Self::timeout`] bounds the wait instead.
    pub spin_limit: u64,
    /// With `std`: wall-clock bound of one wait for the device (default 5 s),
    /// after which it gives [`Error::Timeout`](crate::Error::Timeout). `None` waits without a time
    /// bound. Ignored without `std` (no clock): only `spin_limit` applies.
    ///
    /// A request that timed out keeps its ring slot and buffers until the
    /// device returns it, since the device may still write them.
    pub timeout: Option<Duration>,
    /// Largest `probe_size` accepted, to bound the PROBE buffer.
    pub max_probe_size: u32,
    /// Most event buffers one [`VirtioIommu::poll_events`](crate::VirtioIommu::poll_events) call takes from
    /// the device (default 64; 0 counts as 1), so that a device that keeps
    /// returning events cannot hold the caller. What is left waits for the
    /// next call.
    pub event_budget: u32,
    /// Negotiate F_ATTACH_TABLE (drafts) when offered, so that
    /// [`VirtioIommu::alloc_paging`](crate::VirtioIommu::alloc_paging) makes page-table domains for the
    /// endpoints whose PROBE lists format 3 (default true; false keeps MAP mode).
    pub page_tables: bool,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            bypass: false,
            event_idx: true,
            indirect_desc: true,
            request_queue_size: 256,
            event_buffers: 16,
            sw_msi: Some((0x0800_0000, 0x080f_ffff)),
            guest_page_size: PAGE_SIZE as u64,
            spin_limit: if cfg!(feature = "std") { u64::MAX } else { 100_000_000 },
            timeout: Some(Duration::from_secs(5)),
            max_probe_size: 64 * 1024,
            event_budget: 64,
            page_tables: true,
        }
    }
}

/// What the device offered and the driver took, with the config it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Negotiated feature bits.
    pub features: u64,
    /// Page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// Valid IOVAs, inclusive (everything without INPUT_RANGE).
    pub input_range: (u64, u64),
    /// Valid domain IDs, inclusive (all of u32 without DOMAIN_RANGE).
    pub domain_range: (u32, u32),
    /// Size of PROBE properties (0 without PROBE).
    pub probe_size: u32,
    /// Queue sizes in use: request queue, event queue.
    pub queue_sizes: (u16, u16),
}

impl DeviceInfo {
    /// Whether feature bit `bit` was negotiated.
    pub fn has(&self, bit: u32) -> bool {
        self.features & f::bit(bit) != 0
    }

    /// The IOMMU granule (lowest bit of page_size_mask).
    pub fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }
}

/// Access rights of a mapping (MAP flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prot(pub u32);

impl Prot {
    /// The device may read.
    pub const READ: Prot = Prot(MAP_F_READ);
    /// The device may write.
    pub const WRITE: Prot = Prot(MAP_F_WRITE);
    /// The range is MMIO (needs the MMIO feature).
    pub const MMIO: Prot = Prot(MAP_F_MMIO);
}

impl BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

/// Kind of a reserved region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResvKind {
    /// No access (RESV_MEM RESERVED, and any unknown subtype).
    Reserved,
    /// The hardware MSI doorbell: bypasses translation (RESV_MEM MSI).
    Msi,
    /// The software MSI window the driver added: IOVAs kept free for MSI doorbell mappings.
    SwMsi,
    /// Must be identity-mapped in every paging domain (e.g. from firmware);
    /// given with [`VirtioIommu::add_reserved_region`](crate::VirtioIommu::add_reserved_region).
    Direct,
}

/// A reserved IOVA region of an endpoint. `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvRegion {
    /// First address.
    pub start: u64,
    /// Last address, inclusive.
    pub end: u64,
    /// What it is.
    pub kind: ResvKind,
}

/// A fault the device reported on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// `viommu_proto::fault::R_*`.
    pub reason: u8,
    /// `viommu_proto::fault::F_*`.
    pub flags: u32,
    /// The endpoint that faulted.
    pub endpoint: u32,
    /// The faulting address, when the device gave one.
    pub address: Option<u64>,
}

/// Handler for fault records, see [`VirtioIommu::set_fault_handler`](crate::VirtioIommu::set_fault_handler).
pub type FaultHandler = Box<dyn FnMut(FaultRecord) + Send>;

/// One mapping of a domain. `last` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
    /// Physical address of `iova`.
    pub paddr: u64,
    /// Rights.
    pub prot: Prot,
}

/// What a domain translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    /// Mappings made with `map_pages`.
    Paging,
    /// Identity: ATTACH with F_BYPASS (`bypass = true`) or 1:1 maps of the
    /// aperture minus the reserved regions.
    Identity {
        /// Whether the device does it (BYPASS_CONFIG).
        bypass: bool,
    },
    /// No mappings: attached endpoints can do no DMA.
    Blocking,
}

/// Why a DMA-layer flush ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushCause {
    /// A flush queue was full.
    Full,
    /// The oldest entry of a flush queue timed out.
    Timeout,
    /// Someone asked (policy switch, explicit flush, IOVA shortage).
    Explicit,
}

impl FlushCause {
    /// Every cause, in the order of their values.
    pub const ALL: [Self; 3] = [Self::Full, Self::Timeout, Self::Explicit];

    /// Number of causes: the size of a table with one entry per cause.
    pub const COUNT: usize = Self::ALL.len();
}
