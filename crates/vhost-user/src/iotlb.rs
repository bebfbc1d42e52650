//! The back-end's IOTLB: vm-memory's [`vm_memory::Iommu`] over the entries the front-end
//! sends, so a back-end's virtio-queue and [`vm_memory::IommuMemory`] work on IOVAs.
//!
//! "Guest addresses are also called I/O virtual addresses (IOVAs). They are translated to
//! user addresses via the IOTLB." The memory behind it is the front-end's regions placed
//! at their *user* addresses (see [`crate::backend::user_memory`]), so an entry maps an IOVA
//! to a front-end virtual address, as UPDATE says.
//!
//! A translation that misses, or whose entry lacks the permission, fails at once and is
//! recorded ([`VhostIotlb::take_fault`]); the back-end's loop turns it into a MISS on the
//! back-end channel and retries the request once the front-end answered. An INVALIDATE
//! takes the write lock, so it waits for accesses that hold the read lock in progress: once
//! the back-end acknowledged an INVALIDATE, no access through the old entry happens.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard};

use vm_memory::iommu::{Error, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iotlb, Permissions};

use crate::wire::{IotlbMsg, IotlbPerm};

/// UPDATEs the IOTLB takes before it is emptied (the front-end refills it on misses), by
/// default: vm-memory's `Iotlb` cannot tell how many entries an INVALIDATE removed, so the
/// bound counts UPDATEs since the IOTLB was last emptied.
pub const MAX_ENTRIES: u64 = 1 << 16;

/// A translation that failed: the first of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The first IOVA that failed.
    pub iova: u64,
    /// The access asked for.
    pub perm: IotlbPerm,
    /// No entry (MISS) or an entry without the permission (ACCESS_FAIL).
    pub miss: bool,
}

/// IOTLB message counts of one back-end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IotlbCounts {
    /// UPDATE messages applied.
    pub updates: u64,
    /// INVALIDATE messages applied.
    pub invalidates: u64,
    /// Translations that failed (each may become a MISS).
    pub faults: u64,
}

/// vm-memory's `Iommu` for a vhost-user back-end.
///
/// ```
/// use viommu_vhost_user::iotlb::VhostIotlb;
/// use viommu_vhost_user::wire::{IotlbMsg, IotlbPerm};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
/// // The front-end's memory at its user address 0x7000_0000.
/// let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0x7000_0000), 0x1000)]).unwrap();
/// let dma = IommuMemory::new(mem, VhostIotlb::default(), true, ());
/// dma.iommu().apply(&IotlbMsg::update(0x4000, 0x1000, 0x7000_0000, IotlbPerm::RW)).unwrap();
/// dma.write_obj(5u32, GuestAddress(0x4010)).unwrap();
/// dma.iommu().apply(&IotlbMsg::invalidate(0x4000, 0x1000)).unwrap();
/// assert!(dma.read_obj::<u32>(GuestAddress(0x4010)).is_err());
/// assert_eq!(dma.iommu().take_fault().map(|f| f.iova), Some(0x4010));
/// ```
#[derive(Debug)]
pub struct VhostIotlb {
    tlb: RwLock<Entries>,
    capacity: u64,
    /// Times the IOTLB was emptied to stay within `capacity`.
    evictions: AtomicU64,
    fault: Mutex<Option<Fault>>,
    updates: AtomicU64,
    invalidates: AtomicU64,
    faults: AtomicU64,
}

#[derive(Debug, Default)]
struct Entries {
    tlb: Iotlb,
    count: u64,
}

impl std::ops::Deref for EntriesGuard<'_> {
    type Target = Iotlb;
    fn deref(&self) -> &Iotlb {
        &self.0.tlb
    }
}

/// What an access holds: the IOTLB's read lock, which INVALIDATE waits for.
#[derive(Debug)]
pub struct EntriesGuard<'a>(RwLockReadGuard<'a, Entries>);

/// Why an IOTLB message could not be applied.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum IotlbError {
    /// MISS and ACCESS_FAIL go from back-end to front-end, never the other way.
    #[error("{0} is not a front-end IOTLB message")]
    WrongDirection(crate::wire::IotlbType),
    /// The range does not fit this host's address size.
    #[error("IOTLB range {iova:#x}+{size:#x} too large")]
    Range {
        /// Start.
        iova: u64,
        /// Size.
        size: u64,
    },
}

impl Default for VhostIotlb {
    fn default() -> Self {
        Self::with_capacity(MAX_ENTRIES)
    }
}

impl VhostIotlb {
    /// An IOTLB emptied every `capacity` UPDATEs (at least 1).
    pub fn with_capacity(capacity: u64) -> Self {
        Self {
            tlb: RwLock::default(),
            capacity: capacity.max(1),
            evictions: AtomicU64::new(0),
            fault: Mutex::new(None),
            updates: AtomicU64::new(0),
            invalidates: AtomicU64::new(0),
            faults: AtomicU64::new(0),
        }
    }

    /// Times the IOTLB was emptied because it reached its capacity: entries asked for
    /// before may be gone.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }

    /// Applies an UPDATE or INVALIDATE (checked by [`IotlbMsg::parse`]).
    pub fn apply(&self, m: &IotlbMsg) -> Result<(), IotlbError> {
        use crate::wire::IotlbType::*;
        let range = IotlbError::Range { iova: m.iova, size: m.size };
        match m.kind {
            Update => {
                let len = usize::try_from(m.size).map_err(|_| range)?;
                let perm = match (m.perm.read, m.perm.write) {
                    (true, true) => Permissions::ReadWrite,
                    (true, false) => Permissions::Read,
                    (false, true) => Permissions::Write,
                    (false, false) => Permissions::No,
                };
                // vm-memory's ranges are half-open: an entry may not reach 2^64.
                if m.iova.checked_add(m.size).is_none() {
                    return Err(IotlbError::Range { iova: m.iova, size: m.size });
                }
                let mut st = self.tlb.write().unwrap_or_else(PoisonError::into_inner);
                if st.count >= self.capacity {
                    st.tlb.invalidate_all();
                    st.count = 0;
                    self.evictions.fetch_add(1, Relaxed);
                }
                st.count += 1;
                // set_mapping never fails for a non-wrapping range.
                let _ = st.tlb.set_mapping(GuestAddress(m.iova), GuestAddress(m.uaddr), len, perm);
                self.updates.fetch_add(1, Relaxed);
            }
            Invalidate => {
                let mut st = self.tlb.write().unwrap_or_else(PoisonError::into_inner);
                // The end is clipped to the space vm-memory can name; anything reaching the
                // top (or whose size does not fit) empties the IOTLB.
                match (m.iova.checked_add(m.size), usize::try_from(m.size)) {
                    (Some(_), Ok(len)) if m.iova != 0 || m.size != u64::MAX => {
                        st.tlb.invalidate_mapping(GuestAddress(m.iova), len)
                    }
                    _ => {
                        st.tlb.invalidate_all();
                        st.count = 0;
                    }
                }
                self.invalidates.fetch_add(1, Relaxed);
            }
            k @ (Miss | AccessFail) => return Err(IotlbError::WrongDirection(k)),
        }
        Ok(())
    }

    /// The first page of `[iova, iova + len)` that has no entry allowing `perm`, as the
    /// fault a translation there would record (nothing is recorded or counted).
    pub fn first_gap(&self, iova: u64, len: u64, perm: IotlbPerm) -> Option<Fault> {
        let access = match (perm.read, perm.write) {
            (true, true) => Permissions::ReadWrite,
            (false, true) => Permissions::Write,
            _ => Permissions::Read,
        };
        let miss = Some(Fault { iova, perm, miss: true });
        let Ok(n) = usize::try_from(len) else { return miss };
        if len == 0 {
            return None;
        }
        if iova.checked_add(len).is_none() {
            return miss;
        }
        let st = self.tlb.read().unwrap_or_else(PoisonError::into_inner);
        let fails = Iotlb::lookup(&st.tlb, GuestAddress(iova), n, access).err()?;
        let m = fails.misses.first().map(|r| r.base.0);
        let f = fails.access_fails.first().map(|r| r.base.0);
        match (m, f) {
            (Some(m), Some(f)) if f < m => Some(Fault { iova: f, perm, miss: false }),
            (Some(m), _) => Some(Fault { iova: m, perm, miss: true }),
            (None, Some(f)) => Some(Fault { iova: f, perm, miss: false }),
            (None, None) => None,
        }
    }

    /// Empties the IOTLB (ring reset, new memory table).
    pub fn clear(&self) {
        let mut st = self.tlb.write().unwrap_or_else(PoisonError::into_inner);
        st.tlb.invalidate_all();
        st.count = 0;
    }

    /// The first translation that failed since the last call, if any.
    pub fn take_fault(&self) -> Option<Fault> {
        self.fault.lock().unwrap_or_else(PoisonError::into_inner).take()
    }

    /// Message counts.
    pub fn counts(&self) -> IotlbCounts {
        IotlbCounts {
            updates: self.updates.load(Relaxed),
            invalidates: self.invalidates.load(Relaxed),
            faults: self.faults.load(Relaxed),
        }
    }

    fn record(&self, iova: u64, perm: Permissions, miss: bool) {
        self.faults.fetch_add(1, Relaxed);
        let perm = IotlbPerm {
            read: matches!(perm, Permissions::Read | Permissions::ReadWrite),
            write: matches!(perm, Permissions::Write | Permissions::ReadWrite),
        };
        let mut f = self.fault.lock().unwrap_or_else(PoisonError::into_inner);
        f.get_or_insert(Fault { iova, perm, miss });
    }
}

impl vm_memory::Iommu for VhostIotlb {
    type IotlbGuard<'a> = EntriesGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<EntriesGuard<'_>>, Error> {
        let range = IovaRange { base: iova, length };
        if iova.0.checked_add(length as u64).is_none() {
            self.record(iova.0, access, true);
            return Err(Error::CannotResolve { iova_range: range, reason: "wraps".into() });
        }
        let guard = EntriesGuard(self.tlb.read().unwrap_or_else(PoisonError::into_inner));
        Iotlb::lookup(guard, iova, length, access).map_err(|fails| {
            // The lowest failing address; a miss there is asked for first.
            let miss = fails.misses.first().map(|r| r.base.0);
            let fail = fails.access_fails.first().map(|r| r.base.0);
            let (at, is_miss) = match (miss, fail) {
                (Some(m), Some(f)) if f < m => (f, false),
                (Some(m), _) => (m, true),
                (None, Some(f)) => (f, false),
                (None, None) => (iova.0, true),
            };
            self.record(at, access, is_miss);
            let reason = if is_miss { "IOTLB miss" } else { "IOTLB access fail" };
            Error::CannotResolve { iova_range: range, reason: reason.into() }
        })
    }
}
