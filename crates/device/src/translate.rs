//! Results of [`crate::Iommu::translate`]: guest-physical segments under a lease, or a fault.

use smallvec::SmallVec;
use viommu_proto::fault;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::lease::Lease;

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

/// A guest-physical range that a piece of the IOVA range maps to. Not `Clone`: it is
/// reachable only through the [`Translation`] that holds its lease.
#[derive(Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
    /// The mapping was made with MAP_F_MMIO.
    pub mmio: bool,
}

/// The guest-physical segments, in IOVA order. The common one- or two-segment case does
/// not allocate.
#[derive(Debug, Default)]
pub(crate) struct Segments(SmallVec<[Segment; 2]>);

impl Segments {
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
        t.0.push(Segment { addr: m.phys + (iova - m.start), len, mmio });
        t
    }

    /// Number of segments.
    pub(crate) fn count(&self) -> usize {
        self.0.len()
    }

    /// Appends a segment, merging it into the previous one when physically contiguous.
    pub(crate) fn push(&mut self, s: Segment) {
        if let Some(last) = self.0.last_mut() {
            if last.mmio == s.mmio && last.addr.checked_add(last.len) == Some(s.addr) {
                last.len += s.len;
                return;
            }
        }
        self.0.push(s);
    }
}

/// For benchmarks only: what [`crate::Iommu::bench_translate_unleased`] returns, the
/// segments of a translation without its lease and without a way to read them.
#[doc(hidden)]
#[derive(Debug)]
pub struct Unleased(pub(crate) Segments);

impl Unleased {
    /// Number of segments.
    pub fn count(&self) -> usize {
        self.0.count()
    }
}

/// Why an access through a [`Translation`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The translation was made for reading and the access writes, or the other way round.
    #[error("the translation does not permit this access")]
    NotPermitted,
    /// The access reaches past the end of the translated range.
    #[error("the access reaches past the translated range")]
    OutOfRange,
    /// Guest memory refused the access (e.g. no RAM at that guest-physical address).
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// A translation and the lease that keeps it valid: the guest-physical segments an IOVA
/// range translates to, in IOVA order.
///
/// While a `Translation` lives, a change that takes the range away (UNMAP, DETACH, an
/// ATTACH that moves the endpoint, `bypass` 1->0, a legacy-bypass change, reset) does not
/// complete: its used entry is not written, its config write or reset does not return.
/// Dropping it releases the lease. Access guest memory with [`Self::read_at`] and
/// [`Self::write_at`], or through the segments while the translation is alive; an address
/// copied out of a segment and used after the drop is outside the promise.
///
/// Leases are meant to be short: hold one for one chunk of a copy (a page, say), not for
/// a whole I/O, since every such change waits for it. A thread holding one must not process
/// requests or change the configuration (it would wait for itself; that panics). It is
/// not `Send`: the thread that translated makes the access.
#[derive(Debug)]
pub struct Translation<'a> {
    segments: Segments,
    access: Access,
    _lease: Lease<'a>,
}

impl<'a> Translation<'a> {
    pub(crate) fn new(segments: Segments, access: Access, lease: Lease<'a>) -> Self {
        Self { segments, access, _lease: lease }
    }

    /// The segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments.0
    }

    /// Iterates over the segments.
    pub fn iter(&self) -> impl Iterator<Item = &Segment> {
        self.segments.0.iter()
    }

    /// The single segment, if the range is physically contiguous.
    pub fn contiguous(&self) -> Option<&Segment> {
        match self.segments.0.as_slice() {
            [s] => Some(s),
            _ => None,
        }
    }

    /// Bytes translated.
    pub fn len(&self) -> u64 {
        self.segments.0.iter().map(|s| s.len).sum()
    }

    /// True for a zero-length translation.
    pub fn is_empty(&self) -> bool {
        self.segments.0.is_empty()
    }

    /// The access the translation was checked for.
    pub fn access(&self) -> Access {
        self.access
    }

    /// Reads `buf.len()` bytes from `offset` into the translated range, under the lease.
    /// Needs a translation made for [`Access::Read`] or [`Access::ReadWrite`].
    pub fn read_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), AccessError> {
        if self.access == Access::Write {
            return Err(AccessError::NotPermitted);
        }
        let mut done = 0;
        for (gpa, n) in self.pieces(offset, buf.len())? {
            mem.read_slice(&mut buf[done..done + n], GuestAddress(gpa))?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the translated range, under the lease. Needs a
    /// translation made for [`Access::Write`] or [`Access::ReadWrite`].
    pub fn write_at<M: GuestMemoryBackend + ?Sized>(
        &self,
        mem: &M,
        offset: u64,
        data: &[u8],
    ) -> Result<(), AccessError> {
        if self.access == Access::Read {
            return Err(AccessError::NotPermitted);
        }
        let mut done = 0;
        for (gpa, n) in self.pieces(offset, data.len())? {
            mem.write_slice(&data[done..done + n], GuestAddress(gpa))?;
            done += n;
        }
        Ok(())
    }

    /// The guest-physical pieces of `[offset, offset + len)` of the range.
    fn pieces(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (u64, usize)> + '_, AccessError> {
        let end = offset.checked_add(len as u64).ok_or(AccessError::OutOfRange)?;
        if end > self.len() {
            return Err(AccessError::OutOfRange);
        }
        let mut at = 0u64;
        Ok(self.segments.0.iter().filter_map(move |s| {
            let (lo, hi) = (at.max(offset), (at + s.len).min(end));
            let piece = (lo < hi).then(|| (s.addr + (lo - at), (hi - lo) as usize));
            at += s.len;
            piece
        }))
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
    /// Page-table mode: a table entry the walk needed lies outside guest RAM (draft reason
    /// WALK_EABT).
    TableOutsideMemory,
    /// Page-table mode: the walk met a malformed entry (reserved bits, a misaligned block,
    /// a leaf at level 0, a table pointer at level 3; draft reason PTE_FETCH).
    BadTableEntry,
}

impl FaultKind {
    /// The fault event reason for this kind.
    pub const fn reason(self) -> u8 {
        match self {
            Self::UnknownEndpoint => fault::R_UNKNOWN,
            Self::NotAttached => fault::R_DOMAIN,
            Self::TableOutsideMemory => fault::R_WALK_EABT,
            Self::BadTableEntry => fault::R_PTE_FETCH,
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
