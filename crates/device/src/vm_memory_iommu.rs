//! vm-memory's [`vm_memory::Iommu`] for one endpoint (feature `vm-memory-iommu`), so that
//! [`vm_memory::IommuMemory`], and virtio-queue over it, works on the endpoint's IOVAs.
//!
//! vm-memory's trait must answer with an iterator over a guard that derefs to vm-memory's
//! own [`Iotlb`], so the adapter keeps a mirror `Iotlb` per endpoint:
//! - Hit: a lease is taken, the mirror is read-locked (`try_read`, never blocking) and looked
//!   up; the guard holds both until vm-memory drops the iterator.
//! - Miss (or a permission failure, or a busy mirror): [`Iommu::translate`] answers. It
//!   queues the fault event if the access faults, once per failed access. On success the
//!   access runs on a private `Iotlb` built from the translation's segments, under the
//!   translation's own lease, and the windows around the range ([`Iommu::lookup`], no
//!   fault) are copied into the mirror.
//! - A listener empties the mirror on UNMAP (the request's range), DETACH, ATTACH, a
//!   global bypass change and reset. It takes the mirror's write lock, so it waits for
//!   accesses that hit the old contents; the device then waits for the leases (the grace
//!   period) before the change completes. A fill checks a generation number bumped by every
//!   flush, so a fill that looked up the old state never lands after the flush.
//!
//! The strict promise therefore holds for accesses made through `IommuMemory`'s `Bytes`
//! methods and slice iterators: vm-memory keeps the guard alive (inside its slice iterator)
//! for the whole copy. A `VolatileSlice` kept after its iterator is dropped (e.g. from
//! `GuestMemory::get_slice`'s single-slice helpers) is outside it, as is a guest-physical
//! address copied out of a [`crate::Translation`].
//!
//! Gaps, stated: the mirror cannot hold a window reaching the last byte of the IOVA space
//! (vm-memory's ranges are half-open `u64`s), so the top byte is mirrored as a miss; a range
//! ending exactly at 2^64 is refused. `Permissions::No` (a presence check) translates as a
//! read. The mirror is bounded ([`MIRROR_ENTRIES`]): past it, it is emptied and refilled.
//!
//! Hand-written because no crate provides a vIOMMU-backed `Iommu`; vm-memory's `Iotlb` is
//! used as it is.

use std::ops::Deref;
use std::sync::{Arc, RwLock, RwLockReadGuard};

use smallvec::SmallVec;
use vm_memory::iommu::{Error, IotlbIterator, IovaRange};
use vm_memory::{GuestAddress, Iotlb};

use crate::lease::Lease;
use crate::sync::write;
use crate::translate::{Access, Translation, Window};
use crate::{Iommu, Listener, ListenerId, Mapping};

/// Windows the mirror holds before it is emptied and refilled.
pub const MIRROR_ENTRIES: usize = 4096;

/// Windows copied into the mirror on one miss (a longer range still works, unmirrored).
const FILL_WINDOWS: usize = 16;

/// vm-memory's `Iommu` for one endpoint of a [`crate::VirtioIommu`]. Dropping it
/// unregisters its listener.
///
/// ```
/// use std::sync::Arc;
/// use viommu_device::{DeviceConfig, EndpointConfig, EndpointIommu, VirtioIommu};
/// use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
/// let dev = VirtioIommu::new(DeviceConfig {
///     endpoints: vec![EndpointConfig::new(0x10)],
///     bypass: true,
///     ..Default::default()
/// })
/// .unwrap();
/// let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
/// let mem = IommuMemory::new(ram, EndpointIommu::new(dev.iommu(), 0x10), true, ());
/// // In bypass mode IOVAs are guest-physical addresses.
/// mem.write_obj(7u64, GuestAddress(0x1000)).unwrap();
/// assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 7);
/// ```
pub struct EndpointIommu {
    iommu: Arc<Iommu>,
    mirror: Arc<Mirror>,
    listener: ListenerId,
}

impl EndpointIommu {
    /// The adapter for `endpoint`. Call it before the guest programs the endpoint, or at any
    /// time: the mirror starts empty and fills on misses.
    pub fn new(iommu: Arc<Iommu>, endpoint: u32) -> Self {
        let mirror = Arc::new(Mirror { endpoint, state: RwLock::default() });
        let listener = iommu.add_listener(mirror.clone());
        Self { iommu, mirror, listener }
    }

    /// The endpoint it translates for.
    pub fn endpoint(&self) -> u32 {
        self.mirror.endpoint
    }

    /// Answers from the device's state, fills the mirror, and runs the access on a
    /// private IOTLB under the translation's lease.
    fn miss(
        &self,
        iova: GuestAddress,
        length: usize,
        perm: vm_memory::Permissions,
        gen: Option<u64>,
    ) -> Result<IotlbIterator<IotlbGuard<'_>>, Error> {
        let t = self
            .iommu
            .translate(self.mirror.endpoint, iova.0, length as u64, access(perm))
            .map_err(|f| unresolved(iova, length, f.to_string()))?;
        if iova.0.checked_add(length as u64).is_none() {
            return Err(unresolved(iova, length, "reaches the top of the IOVA space".into()));
        }
        if let Some(gen) = gen {
            self.fill(iova.0, length as u64, gen);
        }
        let mut tlb = Iotlb::new();
        let mut at = iova.0;
        for s in t.segments() {
            let len =
                usize::try_from(s.len).map_err(|_| unresolved(iova, length, "size".into()))?;
            tlb.set_mapping(GuestAddress(at), GuestAddress(s.addr), len, perm)?;
            at += s.len;
        }
        Iotlb::lookup(IotlbGuard(Held::Private { tlb, _translation: t }), iova, length, perm)
            .map_err(|_| unresolved(iova, length, "private IOTLB miss".into()))
    }

    /// Copies the windows covering `[iova, iova + len)` into the mirror, unless a flush
    /// came after generation `gen` was read or the mirror is busy. The caller holds a lease.
    fn fill(&self, iova: u64, len: u64, gen: u64) {
        let Some(last) = (iova + len).checked_sub(1).filter(|_| len > 0) else { return };
        let mut windows = SmallVec::<[(u64, u64, u64, vm_memory::Permissions); 2]>::new();
        let mut at = iova;
        while windows.len() < FILL_WINDOWS {
            let Some((w, p)) = self.iommu.lookup(self.mirror.endpoint, at) else { break };
            let (start, end, phys) = match w {
                Window::Mapping(m) => (m.start, m.end, m.phys),
                Window::Identity { start, end } => (start, end, start),
            };
            // vm-memory's ranges are half-open: the last byte of the space stays unmirrored.
            let end = end.min(u64::MAX - 1);
            if end >= start {
                windows.push((start, end, phys, vm_permissions(p)));
            }
            if end >= last {
                break;
            }
            at = end + 1;
        }
        let Ok(mut st) = self.mirror.state.try_write() else { return };
        if st.gen != gen {
            return;
        }
        if st.entries + windows.len() > MIRROR_ENTRIES {
            st.tlb.invalidate_all();
            st.entries = 0;
        }
        for (start, end, phys, p) in windows {
            let Ok(n) = usize::try_from(end - start + 1) else { continue };
            if st.tlb.set_mapping(GuestAddress(start), GuestAddress(phys), n, p).is_ok() {
                st.entries += 1;
            }
        }
    }
}

impl vm_memory::Iommu for EndpointIommu {
    type IotlbGuard<'a> = IotlbGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        perm: vm_memory::Permissions,
    ) -> Result<IotlbIterator<IotlbGuard<'_>>, Error> {
        // The lease first: a change that completes after this waits for the access.
        let lease = self.iommu.lease();
        let in_range = iova.0.checked_add(length as u64).is_some();
        if let (true, Ok(st)) = (in_range, self.mirror.state.try_read()) {
            let gen = st.gen;
            let guard = IotlbGuard(Held::Mirror { st, _lease: lease });
            return match Iotlb::lookup(guard, iova, length, perm) {
                Ok(it) => Ok(it),
                Err(_) => self.miss(iova, length, perm, Some(gen)),
            };
        }
        drop(lease);
        // Busy (this thread iterates the mirror already, or a flush runs): no fill.
        self.miss(iova, length, perm, None)
    }
}

impl Drop for EndpointIommu {
    fn drop(&mut self) {
        self.iommu.remove_listener(self.listener);
    }
}

impl std::fmt::Debug for EndpointIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointIommu").field("endpoint", &self.mirror.endpoint).finish()
    }
}

/// What an access through `IommuMemory` holds: the IOTLB it was translated in and the lease
/// that the device's grace period waits for. vm-memory drops it when the access ends.
#[derive(Debug)]
pub struct IotlbGuard<'a>(Held<'a>);

#[derive(Debug)]
enum Held<'a> {
    /// A mirror hit: its read lock (flushes wait for it) and a lease.
    Mirror { st: RwLockReadGuard<'a, MirrorState>, _lease: Lease<'a> },
    /// A miss: the translation (which holds the lease) as a private IOTLB.
    Private { tlb: Iotlb, _translation: Translation<'a> },
}

impl Deref for IotlbGuard<'_> {
    type Target = Iotlb;
    fn deref(&self) -> &Iotlb {
        match &self.0 {
            Held::Mirror { st, .. } => &st.tlb,
            Held::Private { tlb, .. } => tlb,
        }
    }
}

/// The mirror IOTLB of one endpoint, and the listener that flushes it.
#[derive(Debug)]
struct Mirror {
    endpoint: u32,
    state: RwLock<MirrorState>,
}

#[derive(Debug, Default)]
struct MirrorState {
    tlb: Iotlb,
    /// Bumped by every flush: a fill that read an older value may hold old state.
    gen: u64,
    /// Windows inserted since the mirror was last emptied.
    entries: usize,
}

impl Mirror {
    /// Empties `[start, end]` (or everything) before the change is reported done.
    fn flush(&self, range: Option<(u64, u64)>) {
        let mut st = write(&self.state);
        st.gen = st.gen.wrapping_add(1);
        let len = range.and_then(|(s, e)| usize::try_from(e.checked_sub(s)?.checked_add(1)?).ok());
        match (range, len) {
            (Some((start, _)), Some(n)) if start.checked_add(n as u64).is_some() => {
                st.tlb.invalidate_mapping(GuestAddress(start), n)
            }
            _ => {
                st.tlb.invalidate_all();
                st.entries = 0;
            }
        }
    }
}

impl Listener for Mirror {
    fn on_attach(&self, endpoint: u32, _domain: u32, _bypass: bool) {
        if endpoint == self.endpoint {
            self.flush(None);
        }
    }
    fn on_detach(&self, endpoint: u32, _domain: u32) {
        if endpoint == self.endpoint {
            self.flush(None);
        }
    }
    fn on_unmap(&self, endpoint: u32, start: u64, end: u64, _removed: &[Mapping]) {
        if endpoint == self.endpoint {
            self.flush(Some((start, end)));
        }
    }
    fn on_bypass(&self, _on: bool) {
        self.flush(None);
    }
    fn on_reset(&self) {
        self.flush(None);
    }
}

fn access(p: vm_memory::Permissions) -> Access {
    match p {
        vm_memory::Permissions::Write => Access::Write,
        vm_memory::Permissions::ReadWrite => Access::ReadWrite,
        vm_memory::Permissions::Read | vm_memory::Permissions::No => Access::Read,
    }
}

fn vm_permissions(p: crate::Permissions) -> vm_memory::Permissions {
    match (p.read, p.write) {
        (true, true) => vm_memory::Permissions::ReadWrite,
        (true, false) => vm_memory::Permissions::Read,
        (false, true) => vm_memory::Permissions::Write,
        (false, false) => vm_memory::Permissions::No,
    }
}

fn unresolved(iova: GuestAddress, length: usize, reason: String) -> Error {
    Error::CannotResolve { iova_range: IovaRange { base: iova, length }, reason }
}
