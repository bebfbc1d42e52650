//! The DMA state a virtio-drivers `Hal` reaches without a `self`:
//! [`SharedDma`] (a [`DmaDomain`] plus what its shares left to sync and to
//! unmap), found through a type ([`StaticDma`]), e.g. in a [`DmaSlot`].

use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::sync::Arc;
use core::ptr::null_mut;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};

use crate::dma::{DmaDirection, DmaDomain, Pending};
use crate::iommu::DomainKind;
use crate::sync::{DefaultLocks, Locks, Mutex};
use crate::Result;

/// Names the [`SharedDma`] of one device driver. virtio-drivers calls its
/// `Hal` with no `self` (`H::share(..)`), so an
/// [`IommuHal<OsHal, D>`](super::IommuHal) finds its domain through `D`.
///
/// ```
/// use viommu_driver::adapter::{DmaSlot, SharedDma, StaticDma};
/// static NET_DMA: DmaSlot = DmaSlot::new();
/// /// The domain of the virtio-net device.
/// struct Net;
/// impl StaticDma for Net {
///     fn get() -> &'static SharedDma {
///         NET_DMA.get().expect("NET_DMA installed before the driver starts")
///     }
/// }
/// ```
pub trait StaticDma<L: Locks = DefaultLocks>: 'static {
    /// The shared DMA state. Called on every share and unshare.
    fn get() -> &'static SharedDma<L>;
}

/// A set-once home for a [`SharedDma`], usable in a `static` (no_std has
/// no `OnceLock`; an OS with its own once-cell may use that instead).
#[derive(Debug)]
pub struct DmaSlot<L: Locks = DefaultLocks>(AtomicPtr<SharedDma<L>>);

impl<L: Locks> DmaSlot<L> {
    /// An empty slot.
    pub const fn new() -> Self {
        Self(AtomicPtr::new(null_mut()))
    }

    /// Moves `dma` into the slot for the rest of the program and returns
    /// it; gives `dma` back (boxed) if the slot is taken already.
    pub fn install(&self, dma: SharedDma<L>) -> Result<&'static SharedDma<L>, Box<SharedDma<L>>> {
        let p = Box::into_raw(Box::new(dma));
        match self.0.compare_exchange(null_mut(), p, Ordering::AcqRel, Ordering::Acquire) {
            // SAFETY: `p` came from `Box::into_raw` just now and is never freed.
            Ok(_) => Ok(unsafe { &*p }),
            // SAFETY: the slot did not take `p`: it is still ours alone.
            Err(_) => Err(unsafe { Box::from_raw(p) }),
        }
    }

    /// The installed state, if any.
    pub fn get(&self) -> Option<&'static SharedDma<L>> {
        let p = self.0.load(Ordering::Acquire);
        // SAFETY: a non-null pointer was installed from a leaked Box and
        // is never freed or replaced, so it is valid for 'static.
        (!p.is_null()).then(|| unsafe { &*p })
    }
}

impl<L: Locks> Default for DmaSlot<L> {
    fn default() -> Self {
        Self::new()
    }
}

/// Declares a unit type that names its own static [`DmaSlot`] and implements
/// [`StaticDma`] through it: one line per device driver instead of a static,
/// a type and an impl.
///
/// ```
/// viommu_driver::static_dma! {
///     /// The domain of the virtio-net device.
///     pub Net
/// }
/// assert!(Net::slot().get().is_none(), "installed by Net::slot().install(..)");
/// ```
#[macro_export]
macro_rules! static_dma {
    ($(#[$meta:meta])* $vis:vis $name:ident) => {
        $(#[$meta])*
        $vis struct $name;

        impl $name {
            /// Where this type's [`SharedDma`]($crate::adapter::SharedDma) is installed.
            $vis fn slot() -> &'static $crate::adapter::DmaSlot {
                static SLOT: $crate::adapter::DmaSlot = $crate::adapter::DmaSlot::new();
                &SLOT
            }
        }

        impl $crate::adapter::StaticDma for $name {
            fn get() -> &'static $crate::adapter::SharedDma {
                Self::slot().get().expect(concat!(
                    stringify!($name),
                    "'s DmaSlot is installed before its driver starts"
                ))
            }
        }
    };
}

/// Counts of one [`SharedDma`], since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareCounts {
    /// `share` calls (buffers handed to the device).
    pub shares: u64,
    /// `unshare` calls.
    pub unshares: u64,
    /// `dma_alloc` calls that mapped memory (rings, `Dma` buffers).
    pub allocs: u64,
    /// Syncs that sent queued MAPs (at most one per notify).
    pub syncs: u64,
    /// Shares or allocations that got no IOVA, and syncs that failed.
    pub failures: u64,
}

/// Where one allocation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Its MAP waits in `pending` for the next sync.
    Queued,
    /// Mapped and synced.
    Mapped,
    /// Its MAP failed: nothing maps it in the tree; the IOVA stays reserved
    /// until its last unshare retires it.
    Failed,
}

/// One IOVA allocation and the buffers in it.
#[derive(Debug)]
struct Entry {
    size: u64,
    /// Physical address of its first byte.
    paddr: u64,
    /// Buffers sharing it (a header and a status byte in one page share one).
    refs: u32,
    state: State,
}

#[derive(Debug, Default)]
struct ShareState {
    pending: Pending,
    /// By first IOVA.
    live: BTreeMap<u64, Entry>,
}

/// A [`DmaDomain`] as virtio-drivers' `share`/`unshare` use it: shares
/// queue their MAPs (buffers in one page the queue already maps share its
/// MAP), [`Self::sync`] sends them with one sync (an
/// [`IommuTransport`](super::IommuTransport) calls it in every notify),
/// unshares unmap under the domain's policy (Strict: one sync per
/// allocation; Lazy: into the flush queues, so call
/// [`DmaDomain::tick`] from a timer).
///
/// # Notification suppression
/// A device that has notifications suppressed (it is still working through
/// the queue) may take a descriptor before the notify whose sync maps its
/// buffers. Its access then faults (the IOVA is fresh: never mapped, or its
/// UNMAP completed before it was reused), the device fails the request, and
/// no memory is reached. A driver that keeps several requests in flight on
/// such a device calls [`Self::sync`] itself after each add, or turns on
/// [`Self::set_sync_on_share`] (one sync per buffer, as without the queue).
///
/// # Locks
/// One lock, held for a share, an unshare, and across a sync's wait for
/// the IOMMU (so nothing is shared while a sync is in flight). Unshares
/// (virtio-drivers' `pop_used`) may run in an interrupt handler only if the
/// driver's locks mask interrupts (see the crate's lock docs).
pub struct SharedDma<L: Locks = DefaultLocks> {
    dma: Arc<DmaDomain<L>>,
    state: Mutex<L, ShareState>,
    shares: AtomicU64,
    unshares: AtomicU64,
    allocs: AtomicU64,
    syncs: AtomicU64,
    failures: AtomicU64,
    sync_on_share: AtomicBool,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl<L: Locks> SharedDma<L> {
    /// Shares through `dma` (a `DmaDomain`, or an `Arc` of one the OS
    /// also uses). An identity domain maps nothing: IOVA = physical address.
    pub fn new(dma: impl Into<Arc<DmaDomain<L>>>) -> Self {
        Self {
            dma: dma.into(),
            state: Mutex::new(ShareState::default()),
            shares: AtomicU64::new(0),
            unshares: AtomicU64::new(0),
            allocs: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            sync_on_share: AtomicBool::new(false),
        }
    }

    /// The DMA domain (its policy, `tick`, `flush`, counters).
    pub fn dma(&self) -> &DmaDomain<L> {
        &self.dma
    }

    /// The counts so far.
    pub fn counts(&self) -> ShareCounts {
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ShareCounts {
            shares: c(&self.shares),
            unshares: c(&self.unshares),
            allocs: c(&self.allocs),
            syncs: c(&self.syncs),
            failures: c(&self.failures),
        }
    }

    fn passthrough(&self) -> bool {
        self.dma.domain().kind() != DomainKind::Paging
    }

    /// Syncs every share at once (one sync per buffer, and no page shared
    /// between buffers) instead of at the next notify: for drivers that add
    /// requests the device may take without a notify.
    pub fn set_sync_on_share(&self, on: bool) {
        self.sync_on_share.store(on, Ordering::Relaxed);
    }

    /// IOVA allocations whose MAP waits for a sync (buffers in one page
    /// share one).
    pub fn queued(&self) -> usize {
        self.state.lock().live.values().filter(|e| e.state == State::Queued).count()
    }

    /// Sends every queued MAP with one sync (nothing when none is queued).
    /// On failure the buffers stay unmapped until their unshare, and the
    /// device faults on them.
    pub fn sync(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.sync_locked(&mut st)
    }

    fn sync_locked(&self, st: &mut ShareState) -> Result<()> {
        if st.pending.is_empty() {
            return Ok(());
        }
        bump(&self.syncs);
        let (allocs, result) = self.dma.pending_commit_keep(&mut st.pending);
        let state = if result.is_ok() { State::Mapped } else { State::Failed };
        if result.is_err() {
            bump(&self.failures);
        }
        for (iova, _) in allocs {
            if let Some(e) = st.live.get_mut(&iova) {
                e.state = state;
            }
        }
        result
    }

    /// Queues the MAP of `len` bytes at physical `paddr`; returns the IOVA,
    /// or `None` when no IOVA is left.
    pub(super) fn share(&self, paddr: u64, len: usize, dir: DmaDirection) -> Option<u64> {
        bump(&self.shares);
        if self.passthrough() {
            return Some(paddr);
        }
        let mut st = self.state.lock();
        let st = &mut *st;
        let Ok(iova) = self.dma.pending_map(&mut st.pending, paddr, len, dir) else {
            bump(&self.failures);
            return None;
        };
        let g = self.dma.domain().granule();
        let base = iova & !(g - 1);
        match st.live.get_mut(&base) {
            // The page another buffer of this batch maps.
            Some(e) => e.refs += 1,
            None => {
                let off = paddr & (g - 1);
                let size = (off + len as u64).div_ceil(g) * g;
                let e = Entry { size, paddr: paddr - off, refs: 1, state: State::Queued };
                st.live.insert(base, e);
            }
        }
        if self.sync_on_share.load(Ordering::Relaxed) {
            // A failure leaves the buffer unmapped; the device faults on it.
            let _ = self.sync_locked(st);
        }
        Some(iova)
    }

    /// Maps a `dma_alloc` region now, with its own sync (rings are set up
    /// before any notify).
    pub(super) fn map_alloc(&self, paddr: u64, len: usize) -> Option<u64> {
        bump(&self.allocs);
        if self.passthrough() {
            return Some(paddr);
        }
        match self.dma.map_single(paddr, len, DmaDirection::Bidirectional) {
            Ok(iova) => {
                let e = Entry { size: len as u64, paddr, refs: 1, state: State::Mapped };
                self.state.lock().live.insert(iova, e);
                Some(iova)
            }
            Err(_) => {
                bump(&self.failures);
                None
            }
        }
    }

    /// Drops one buffer's hold on the allocation containing `iova`; the last
    /// one unmaps it. Returns the buffer's physical address, or `None` for
    /// an IOVA no share gave out. `Err` when its unmap failed: the
    /// allocation then stays reserved (a later flush retries).
    pub(super) fn unshare(&self, iova: u64) -> Option<(u64, Result<()>)> {
        bump(&self.unshares);
        self.release(iova)
    }

    /// Unmaps a `dma_alloc` region; as [`Self::unshare`].
    pub(super) fn unmap_alloc(&self, iova: u64) -> Option<(u64, Result<()>)> {
        self.release(iova)
    }

    fn release(&self, iova: u64) -> Option<(u64, Result<()>)> {
        if self.passthrough() {
            return Some((iova, Ok(())));
        }
        let (phys, last) = {
            let mut st = self.state.lock();
            let (&base, e) = st.live.range(..=iova).next_back()?;
            if iova - base >= e.size {
                return None;
            }
            if e.state == State::Queued {
                // Unshared before any notify synced it: sync first, so the
                // allocation is in a known state.
                let _ = self.sync_locked(&mut st);
            }
            let e = st.live.get_mut(&base)?;
            let phys = e.paddr + (iova - base);
            e.refs -= 1;
            let last = (e.refs == 0).then_some((base, e.size, e.state));
            if last.is_some() {
                st.live.remove(&base);
            }
            (phys, last)
        };
        let result = match last {
            None => Ok(()),
            Some((base, size, State::Failed)) => {
                self.dma.retire(&[(base, size)]);
                Ok(())
            }
            Some((base, size, _)) => {
                self.dma.unmap_single(base, size as usize, DmaDirection::Bidirectional)
            }
        };
        Some((phys, result))
    }
}

impl<L: Locks> core::fmt::Debug for SharedDma<L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SharedDma").field("counts", &self.counts()).finish_non_exhaustive()
    }
}
