//! Results of [`crate::Iommu::translate`]: guest-physical segments or a fault.

use smallvec::SmallVec;
use viommu_proto::fault;

/// The kind of DMA access being translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Access {
    /// The endpoint reads memory: the mapping needs MAP_F_READ.
    Read,
    /// The endpoint writes memory: the mapping needs MAP_F_WRITE.
    Write,
    /// Both: the mapping needs READ and WRITE.
    ReadWrite,
}

impl Access {
    /// MAP flags the mapping must carry.
    pub const fn required_map_flags(self) -> u32 {
        match self {
            Self::Read => viommu_proto::MAP_F_READ,
            Self::Write => viommu_proto::MAP_F_WRITE,
            Self::ReadWrite => viommu_proto::MAP_F_READ | viommu_proto::MAP_F_WRITE,
        }
    }

    /// Fault event flags describing this access.
    pub const fn fault_flags(self) -> u32 {
        match self {
            Self::Read => fault::F_READ,
            Self::Write => fault::F_WRITE,
            Self::ReadWrite => fault::F_READ | fault::F_WRITE,
        }
    }
}

/// A guest-physical range that a piece of the IOVA range maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The mapping was made with MAP_F_MMIO.
    pub mmio: bool,
}

/// The guest-physical segments an IOVA range translates to, in IOVA order. The common
/// one- or two-segment case does not allocate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Translation {
    segments: SmallVec<[Segment; 2]>,
}

impl Translation {
    /// The identity translation of `[addr, addr + len)`.
    pub(crate) fn identity(addr: u64, len: u64) -> Self {
        let mut t = Self::default();
        t.push(Segment { addr, len, mmio: false });
        t
    }

    /// The one segment `[iova, iova + len)` translates to inside mapping `m`.
    pub(crate) fn single(m: crate::domain::Mapping, iova: u64, len: u64) -> Self {
        let mut t = Self::default();
        let mmio = m.flags & viommu_proto::MAP_F_MMIO != 0;
        t.segments.push(Segment { addr: m.phys + (iova - m.start), len, mmio });
        t
    }

    /// Appends a segment, merging it into the previous one when physically contiguous.
    pub(crate) fn push(&mut self, s: Segment) {
        if let Some(last) = self.segments.last_mut() {
            if last.mmio == s.mmio && last.addr.checked_add(last.len) == Some(s.addr) {
                last.len += s.len;
                return;
            }
        }
        self.segments.push(s);
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Iterates over the segments.
    pub fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.segments.iter()
    }

    /// The single segment, if the range is physically contiguous.
    pub fn contiguous(&self) -> Option<Segment> {
        match self.segments.as_slice() {
            [s] => Some(*s),
            _ => None,
        }
    }
}

/// Why a translation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum FaultKind {
    /// The endpoint ID is not one the VMM configured (no event: it would carry no valid endpoint).
    UnknownEndpoint,
    /// The endpoint is not attached and not in bypass mode (event reason DOMAIN).
    NotAttached,
    /// No mapping covers the address (event reason MAPPING).
    Unmapped,
    /// A mapping covers it without the needed READ/WRITE flag (event reason MAPPING).
    Permission,
    /// The range touches a reserved region, or crosses the edge of the MSI region (reason MAPPING).
    Reserved,
    /// `iova + len` overflows the 64-bit IOVA space (reason MAPPING).
    Overflow,
}

impl FaultKind {
    /// The fault event reason for this kind.
    pub const fn reason(self) -> u8 {
        match self {
            Self::UnknownEndpoint => fault::R_UNKNOWN,
            Self::NotAttached => fault::R_DOMAIN,
            _ => fault::R_MAPPING,
        }
    }
}

/// A failed translation: what, who, where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Fault {
    /// Why.
    pub kind: FaultKind,
    /// The endpoint that attempted the access.
    pub endpoint: u32,
    /// The first faulting IOVA.
    pub address: u64,
    /// The access attempted.
    pub access: Access,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "endpoint {}: {:?} fault on {:?} at {:#x}",
            self.endpoint, self.kind, self.access, self.address
        )
    }
}

impl std::error::Error for Fault {}

/// What an endpoint reaches around an address, as [`crate::Iommu::lookup`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// A mapping the guest made.
    Mapping(crate::domain::Mapping),
    /// `[start, end]` (inclusive) translates to itself: bypass mode, a bypass domain, or the
    /// MSI region. The window stops at the endpoint's reserved regions.
    Identity {
        /// First address of the window.
        start: u64,
        /// Last address of the window, inclusive.
        end: u64,
    },
}

impl Window {
    /// The guest-physical address `iova` translates to, if it lies in the window.
    pub fn translate(&self, iova: u64) -> Option<u64> {
        match *self {
            Self::Mapping(m) => {
                (m.start <= iova && iova <= m.end).then(|| m.phys + (iova - m.start))
            }
            Self::Identity { start, end } => (start <= iova && iova <= end).then_some(iova),
        }
    }
}

/// The accesses a [`Window`] allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Reads (the device reads memory) are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
}

impl Permissions {
    /// From MAP flags.
    pub const fn from_map_flags(flags: u32) -> Self {
        Self {
            read: flags & viommu_proto::MAP_F_READ != 0,
            write: flags & viommu_proto::MAP_F_WRITE != 0,
        }
    }

    /// True if `access` is allowed.
    pub const fn allows(self, access: Access) -> bool {
        match access {
            Access::Read => self.read,
            Access::Write => self.write,
            Access::ReadWrite => self.read && self.write,
        }
    }
}
