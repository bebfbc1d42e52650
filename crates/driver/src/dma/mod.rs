//! The DMA-mapping layer over one [`Domain`]: what a device driver calls to
//! turn physical buffers into IOVAs.
//!
//! - [`DmaDomain::map_single`] / [`DmaDomain::map_sg`]: one sync each
//!   (`map_sg` merges physically contiguous segments and takes one IOVA range).
//! - [`DmaDomain::begin`] → [`DmaBatch`]: map every buffer of one I/O, then
//!   [`DmaBatch::commit`] pays **one** sync. Buffers that fit in a page already
//!   mapped by the batch (a request header and its status byte) reuse that
//!   page's mapping. [`DmaDomain::unmap`] releases the whole I/O at once.
//! - Policies ([`Policy`]), switchable at run time: Strict syncs every unmap;
//!   Lazy and LazySingle defer UNMAPs to flush queues, free IOVAs only once the
//!   covering UNMAP completed, and (with `coalesce_unmaps`) send one UNMAP for
//!   adjacent freed ranges with no live mapping between them.
//! - No timer in `no_std`: call [`DmaDomain::tick`] periodically; time and
//!   CPU number come from a [`DmaPlatform`].
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! # mod device { include!("../../tests/common/device.rs"); }
//! use viommu_driver::dma::{DmaDirection, DmaDomain, DmaOptions, Policy};
//! use viommu_driver::{DriverOptions, VirtioIommu};
//! // The fake transport around the device crate's model.
//! let fake = device::FakeDevice::default();
//! let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default()).unwrap();
//! let domain = iommu.alloc_paging(1).unwrap();
//! iommu.attach(&domain, 1).unwrap();
//! let resv = iommu.reserved_regions(1).unwrap();
//! let dma = DmaDomain::with_std(domain, &resv, DmaOptions::default()).unwrap();
//! let before = iommu.counters();
//! let mut io = dma.begin();
//! let hdr = io.map(0x4000_0000, 16, DmaDirection::ToDevice).unwrap();
//! let data = io.map(0x5000_0000, 4096, DmaDirection::FromDevice).unwrap();
//! let status = io.map(0x4000_0010, 1, DmaDirection::FromDevice).unwrap();
//! assert_eq!(status, hdr + 0x10); // same page, one mapping
//! let mapping = io.commit().unwrap(); // 2 MAPs, 1 kick, 1 sync
//! let used = iommu.counters().since(&before);
//! assert_eq!((used.map, used.kicks, used.syncs), (2, 1, 1));
//! dma.unmap(mapping).unwrap(); // lazy: queued for a later flush
//! dma.flush().unwrap();
//! assert_eq!(dma.iova_in_use(), 0);
//! # let _ = data; }
//! ```

mod batch;
pub mod flush;
pub mod iova;
mod unmap;

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use smallvec::SmallVec;

pub use batch::DmaBatch;
#[cfg(feature = "virtio-drivers")]
pub(crate) use batch::Pending;
pub use flush::FlushQueueConfig;
pub use iova::{IovaAllocator, IovaOptions};

use crate::iommu::{merge_regions, Domain, DomainKind, Mapping, Prot, ResvRegion};
use crate::sync::{DefaultLocks, Locks, Mutex};
use crate::{Error, Result};
use batch::{shift, PushMap};
use flush::{Allocs, FlushSlot};

/// Direction of a DMA transfer, seen from memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// The device reads the buffer (MAP READ).
    ToDevice,
    /// The device writes the buffer (MAP WRITE).
    FromDevice,
    /// Both.
    Bidirectional,
}

impl DmaDirection {
    fn prot(self) -> Prot {
        match self {
            Self::ToDevice => Prot::READ,
            Self::FromDevice => Prot::WRITE,
            Self::Bidirectional => Prot::READ | Prot::WRITE,
        }
    }
}

/// When UNMAPs reach the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Policy {
    /// Every unmap is synced before it returns.
    Strict = 0,
    /// Per-CPU flush queues ([`FlushQueueConfig::LAZY`] by default).
    Lazy = 1,
    /// One shared flush queue ([`FlushQueueConfig::LAZY_SINGLE`] by default).
    LazySingle = 2,
}

impl Policy {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Strict,
            1 => Self::Lazy,
            _ => Self::LazySingle,
        }
    }
}

/// Time and CPU number for the DMA layer (no timers in `no_std`).
pub trait DmaPlatform: Send + Sync {
    /// A monotonic clock in nanoseconds.
    fn now_ns(&self) -> u64;
    /// The current CPU (or thread) number; taken modulo the number of queues.
    fn cpu_id(&self) -> usize;
}

/// `std` clock and a per-thread number as the CPU id.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct StdPlatform {
    start: std::time::Instant,
}

#[cfg(feature = "std")]
impl Default for StdPlatform {
    fn default() -> Self {
        Self { start: std::time::Instant::now() }
    }
}

#[cfg(feature = "std")]
impl DmaPlatform for StdPlatform {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn cpu_id(&self) -> usize {
        use core::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        std::thread_local!(static ID: usize = NEXT.fetch_add(1, Ordering::Relaxed));
        ID.with(|id| *id)
    }
}

/// Settings of a [`DmaDomain`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaOptions {
    /// Unmap policy (switch later with [`DmaDomain::set_policy`]).
    pub policy: Policy,
    /// Sync after every MAP request (Linux before 6.7) instead of once per call or batch.
    pub sync_every_map: bool,
    /// Merge adjacent freed ranges into one UNMAP.
    pub coalesce_unmaps: bool,
    /// Per-CPU flush queues of [`Policy::Lazy`].
    pub lazy: FlushQueueConfig,
    /// The single flush queue of [`Policy::LazySingle`].
    pub lazy_single: FlushQueueConfig,
    /// IOVA allocator tuning; `iova.nr_cpus` is also the number of lazy queues.
    pub iova: IovaOptions,
    /// Highest IOVA to hand out (the device's DMA mask).
    pub dma_limit: u64,
}

impl Default for DmaOptions {
    fn default() -> Self {
        Self {
            policy: Policy::Lazy,
            sync_every_map: false,
            coalesce_unmaps: true,
            lazy: FlushQueueConfig::LAZY,
            lazy_single: FlushQueueConfig::LAZY_SINGLE,
            iova: IovaOptions::default(),
            dma_limit: u64::MAX,
        }
    }
}

/// A buffer as the device sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaSegment {
    /// Bus address (IOVA).
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// A scatter-gather list mapped by [`DmaDomain::map_sg`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "unmap it with DmaDomain::unmap_sg"]
pub struct SgMapping {
    /// One segment per physically contiguous run.
    pub segments: Vec<DmaSegment>,
    iova: u64,
    size: u64,
}

/// The mappings of one committed [`DmaBatch`]; give it to [`DmaDomain::unmap`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "unmap it with DmaDomain::unmap"]
pub struct DmaMapping {
    allocs: Allocs,
}

impl DmaMapping {
    /// IOVA allocations `(iova, size)` it holds.
    pub fn allocations(&self) -> &[(u64, u64)] {
        &self.allocs
    }
}

/// The DMA layer over one domain.
pub struct DmaDomain<L: Locks = DefaultLocks> {
    domain: Domain<L>,
    passthrough: bool,
    granule: u64,
    iova: IovaAllocator<L>,
    platform: Arc<dyn DmaPlatform>,
    policy: AtomicU8,
    sync_every_map: AtomicBool,
    coalesce: AtomicBool,
    lazy: FlushQueueConfig,
    lazy_single: FlushQueueConfig,
    percpu: Vec<FlushSlot<L>>,
    single: FlushSlot<L>,
    /// Allocations whose UNMAP failed: sent again at the next flush.
    retry: Mutex<L, Vec<(u64, u64)>>,
}

/// Physically contiguous runs of `segs`, as `(paddr, len)`.
fn merge_segments(segs: &[(u64, usize)]) -> Vec<(u64, usize)> {
    let mut runs: Vec<(u64, usize)> = Vec::with_capacity(segs.len());
    for &(p, l) in segs.iter().filter(|s| s.1 > 0) {
        match runs.last_mut() {
            Some(r) if r.0 + r.1 as u64 == p => r.1 += l,
            _ => runs.push((p, l)),
        }
    }
    runs
}

impl<L: Locks> DmaDomain<L> {
    /// The DMA layer over `domain`. IOVAs come from its aperture minus
    /// `reserved`, minus IOVA page 0, minus mappings already in the domain,
    /// up to `opts.dma_limit`. An identity domain gives IOVA = physical
    /// address and sends nothing; a blocking domain is refused.
    pub fn new(
        domain: Domain<L>,
        reserved: &[ResvRegion],
        opts: DmaOptions,
        platform: Arc<dyn DmaPlatform>,
    ) -> Result<Self> {
        let passthrough = match domain.kind() {
            DomainKind::Paging => false,
            DomainKind::Identity { .. } => true,
            DomainKind::Blocking => return Err(Error::NotPaging),
        };
        let granule = domain.granule();
        let (lo, hi) = domain.aperture();
        let hi = hi.min(opts.dma_limit);
        let holes = merge_regions(
            reserved
                .iter()
                .map(|r| (r.start, r.end))
                .chain([(0, granule - 1)])
                .chain(domain.mappings().iter().map(|m| (m.iova, m.last))),
        );
        let mut usable = Vec::new();
        let mut next = lo as u128;
        for (s, e) in holes {
            if (s as u128) > next && next <= hi as u128 {
                usable.push((next as u64, (s - 1).min(hi)));
            }
            next = next.max(e as u128 + 1);
        }
        if next <= hi as u128 {
            usable.push((next as u64, hi));
        }
        let nq = opts.iova.nr_cpus.max(1);
        Ok(Self {
            passthrough,
            granule,
            iova: IovaAllocator::with_locks(&usable, granule, opts.iova),
            platform,
            policy: AtomicU8::new(opts.policy as u8),
            sync_every_map: AtomicBool::new(opts.sync_every_map),
            coalesce: AtomicBool::new(opts.coalesce_unmaps),
            lazy: opts.lazy,
            lazy_single: opts.lazy_single,
            percpu: (0..nq).map(|_| FlushSlot::default()).collect(),
            single: FlushSlot::default(),
            retry: Mutex::new(Vec::new()),
            domain,
        })
    }

    /// [`Self::new`] with the `std` clock and thread numbers.
    #[cfg(feature = "std")]
    pub fn with_std(domain: Domain<L>, reserved: &[ResvRegion], opts: DmaOptions) -> Result<Self> {
        Self::new(domain, reserved, opts, Arc::new(StdPlatform::default()))
    }

    /// The domain underneath.
    pub fn domain(&self) -> &Domain<L> {
        &self.domain
    }

    /// The current policy.
    pub fn policy(&self) -> Policy {
        Policy::from_u8(self.policy.load(Ordering::Relaxed))
    }

    /// Switches policy, after flushing everything queued under the old one.
    pub fn set_policy(&self, policy: Policy) -> Result<()> {
        self.flush()?;
        self.policy.store(policy as u8, Ordering::Relaxed);
        Ok(())
    }

    /// Sync after every MAP request (pre-6.7 Linux) or once per call/batch.
    pub fn set_sync_every_map(&self, on: bool) {
        self.sync_every_map.store(on, Ordering::Relaxed);
    }

    /// Turns UNMAP coalescing on or off.
    pub fn set_coalesce_unmaps(&self, on: bool) {
        self.coalesce.store(on, Ordering::Relaxed);
    }

    /// IOVA bytes allocated and not yet returned (mapped, or waiting for a flush).
    pub fn iova_in_use(&self) -> u64 {
        self.iova.in_use()
    }

    /// IOVA allocations waiting in flush queues, in flight, or to retry.
    pub fn pending_unmaps(&self) -> usize {
        let q = |q: &FlushSlot<L>| {
            let q = q.lock();
            q.entries.len() + q.inflight.iter().map(|f| f.entries.len()).sum::<usize>()
        };
        self.percpu.iter().map(q).sum::<usize>() + q(&self.single) + self.retry.lock().len()
    }

    fn cpu(&self) -> usize {
        self.platform.cpu_id()
    }

    fn alloc(&self, size: u64) -> Result<u64> {
        if let Some(i) = self.iova.alloc(size, self.cpu()) {
            return Ok(i);
        }
        // Dry: complete every pending flush, return cached IOVAs, try again.
        self.flush()?;
        self.iova.flush_caches();
        self.iova.alloc(size, self.cpu()).ok_or(Error::NoIova { size })
    }

    fn range_of(&self, &(iova, size): &(u64, u64)) -> (u64, u64) {
        (iova, iova + (self.iova.round(size).0 - 1))
    }

    /// The IOVA ranges of allocations (a push loop: cheaper than collecting
    /// a few items into a `SmallVec`).
    fn ranges_of(&self, allocs: &[(u64, u64)]) -> SmallVec<[(u64, u64); 4]> {
        let mut out = SmallVec::new();
        for a in allocs {
            out.push(self.range_of(a));
        }
        out
    }

    fn free_allocs(&self, allocs: &[(u64, u64)]) {
        let cpu = self.cpu();
        for &(i, s) in allocs {
            self.iova.free(i, s, cpu);
        }
    }

    /// Page-aligned physical base, offset and mapped size of a buffer.
    fn span(&self, paddr: u64, len: usize) -> Result<(u64, u64, u64)> {
        if len == 0 {
            return Err(Error::InvalidArgument("zero-length DMA buffer"));
        }
        let off = paddr & (self.granule - 1);
        let size = (off + len as u64).div_ceil(self.granule) * self.granule;
        Ok((paddr - off, off, size))
    }

    /// Maps and syncs: one sync, or one per MAP with `sync_every_map`.
    /// On failure nothing stays mapped and the IOVAs are released.
    /// `breaks`: where in `maps` each allocation's MAPs begin (none needed
    /// for a single allocation).
    fn map_synced(&self, maps: &[Mapping], allocs: &[(u64, u64)], breaks: &[usize]) -> Result<()> {
        let result = if self.sync_every_map.load(Ordering::Relaxed) {
            maps.iter().try_for_each(|m| self.domain.map_synced(core::slice::from_ref(m), &[]))
        } else {
            self.domain.map_synced(maps, breaks)
        };
        if let Err(e) = &result {
            self.rollback(allocs, e);
        }
        result
    }

    /// Undoes a failed map: unmaps what got mapped, synced, and frees the
    /// IOVAs. Allocations whose UNMAP fails stay reserved (retry list). After
    /// a timeout the device is not waited for again: the IOVAs go straight to
    /// the retry list, and a later flush frees them once the device answered.
    fn rollback(&self, allocs: &[(u64, u64)], err: &Error) {
        let ranges: Vec<(u64, u64)> = allocs.iter().map(|a| self.range_of(a)).collect();
        for r in &ranges {
            let _ = self.domain.take_ranges(core::slice::from_ref(r));
        }
        if matches!(err, Error::Timeout | Error::DeviceNeedsReset) {
            self.retry.lock().extend_from_slice(allocs);
            return;
        }
        match self.unmap_now(allocs, false) {
            Ok(()) => {}
            Err(_) => self.domain.count_sync_error(),
        }
    }

    /// Maps one buffer and syncs. Returns its IOVA.
    pub fn map_single(&self, paddr: u64, len: usize, dir: DmaDirection) -> Result<u64> {
        if self.passthrough {
            return Ok(paddr);
        }
        let (base, off, size) = self.span(paddr, len)?;
        let iova = self.alloc(size)?;
        let m = Mapping { iova, last: iova + (size - 1), paddr: base, prot: dir.prot() };
        self.map_synced(&[m], &[(iova, size)], &[])?;
        Ok(iova + off)
    }

    /// Unmaps a buffer mapped by `map_single` with the same `len`.
    pub fn unmap_single(&self, iova: u64, len: usize, _dir: DmaDirection) -> Result<()> {
        if self.passthrough {
            return Ok(());
        }
        let (base, _, size) = self.span(iova, len)?;
        self.release(&[(base, size)])
    }

    /// Lays `segs` out back to back from IOVA 0, one MAP per physically
    /// contiguous run: appends the MAPs to `maps` and the device's segments
    /// to `out`, and returns the total size. [`shift`] then moves both to
    /// the IOVA allocated for that size. One pass, no intermediate list.
    fn sg_layout(
        &self,
        segs: &[(u64, usize)],
        prot: Prot,
        maps: &mut impl PushMap,
        out: &mut Vec<DmaSegment>,
    ) -> Result<u64> {
        let mask = self.granule - 1;
        let mut at = 0u64;
        let mut i = 0;
        while i < segs.len() {
            let (p, mut len) = segs[i];
            i += 1;
            if len == 0 {
                continue;
            }
            // Merge the segments that continue this one physically.
            let mut end = p.wrapping_add(len as u64);
            while let Some(&(q, l)) = segs.get(i).filter(|s| s.1 == 0 || s.0 == end) {
                if l > 0 {
                    len += l;
                    end = q.wrapping_add(l as u64);
                }
                i += 1;
            }
            let off = p & mask;
            let size = (off + len as u64 + mask) & !mask;
            maps.push_map(Mapping { iova: at, last: at + (size - 1), paddr: p - off, prot });
            out.push(DmaSegment { addr: at + off, len });
            at += size;
        }
        if at == 0 {
            return Err(Error::InvalidArgument("empty scatter-gather list"));
        }
        Ok(at)
    }

    /// Maps a scatter-gather list of `(paddr, len)` with one sync, into one
    /// IOVA range; physically contiguous segments become one segment.
    pub fn map_sg(&self, segs: &[(u64, usize)], dir: DmaDirection) -> Result<SgMapping> {
        if self.passthrough {
            let segments = merge_segments(segs)
                .into_iter()
                .map(|(addr, len)| DmaSegment { addr, len })
                .collect();
            return Ok(SgMapping { segments, iova: 0, size: 0 });
        }
        let mut maps = Vec::with_capacity(segs.len());
        let mut segments = Vec::with_capacity(segs.len());
        let total = self.sg_layout(segs, dir.prot(), &mut maps, &mut segments)?;
        let iova = self.alloc(total)?;
        shift(iova, &mut maps, &mut segments);
        self.map_synced(&maps, &[(iova, total)], &[])?;
        Ok(SgMapping { segments, iova, size: total })
    }

    /// Unmaps what `map_sg` mapped.
    pub fn unmap_sg(&self, m: SgMapping) -> Result<()> {
        if self.passthrough {
            return Ok(());
        }
        self.release(&[(m.iova, m.size)])
    }

    /// Unmaps everything a committed batch mapped, as one operation: under
    /// Strict one sync (with coalescing, often one UNMAP), under the lazy
    /// policies one flush-queue insertion.
    pub fn unmap(&self, m: DmaMapping) -> Result<()> {
        if self.passthrough {
            return Ok(());
        }
        self.release(&m.allocs)
    }
}

impl<L: Locks> Drop for DmaDomain<L> {
    fn drop(&mut self) {
        // Leave the device with no stale mappings of ours.
        let _ = self.flush();
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod tests {
    use super::*;
    use crate::test_device::FakeDevice;
    use crate::{DriverOptions, VirtioIommu};

    fn page(iova: u64) -> Mapping {
        Mapping { iova, last: iova + 0xfff, paddr: 0x8000_0000 + iova, prot: Prot::READ }
    }

    fn attached(
    ) -> (FakeDevice, VirtioIommu<crate::fake::FakeTransport, crate::fake::FakeHal>, Domain) {
        let fake = FakeDevice::default();
        let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default())
            .expect("driver");
        let d = iommu.alloc_paging(1).expect("domain");
        iommu.attach(&d, 1).expect("attach");
        (fake, iommu, d)
    }

    fn iovas(d: &Domain) -> Vec<u64> {
        d.mappings().iter().map(|m| m.iova).collect()
    }

    /// The fast paths of the MAP path (one overlap check per run of touching
    /// MAPs, bulk tree insert and removal) keep the tree exact.
    #[test]
    fn runs_and_bulk_tree_paths_keep_the_tree_exact() {
        let (fake, _iommu, d) = attached();
        // A scatter-gather list (64 touching pages) plus a lone page, out of order.
        let mut maps: Vec<Mapping> = (0..64).map(|i| page(0x10_0000 + i * 0x1000)).collect();
        maps.insert(0, page(0x40_0000));
        d.map_synced(&maps, &[]).expect("map");
        assert_eq!(fake.stats().maps(), 65);
        // Overlapping the run, or each other: refused, nothing recorded or sent.
        let inside = [page(0x20_0000), page(0x10_8000)];
        assert!(matches!(d.map_synced(&inside, &[]), Err(Error::Overlap { iova: 0x10_8000 })));
        let twice = [page(0x30_0000), page(0x30_0000)];
        assert!(matches!(d.map_synced(&twice, &[]), Err(Error::Overlap { iova: 0x30_0000 })));
        assert_eq!((d.mappings().len(), fake.stats().maps()), (65, 65));
        // A small range among many: per-key removal; a range that is most
        // of the tree: cut out whole. Splitting is refused either way.
        assert!(matches!(
            d.take_ranges(&[(0x10_0000, 0x10_0fff + 0x800)]),
            Err(Error::WouldSplit { iova: 0x10_1000 })
        ));
        d.take_ranges(&[(0x10_0000, 0x10_1fff)]).expect("take 2");
        let mut want: Vec<u64> = (2..64).map(|i| 0x10_0000 + i * 0x1000).collect();
        want.push(0x40_0000);
        assert_eq!(iovas(&d), want);
        d.take_ranges(&[(0x10_2000, 0x13_ffff)]).expect("take 62");
        assert_eq!(iovas(&d), [0x40_0000]);
    }

    /// Touching MAPs form one tree run, except where the caller says an
    /// allocation begins.
    #[test]
    fn runs_break_where_allocations_begin() {
        let (_fake, _iommu, d) = attached();
        let maps: Vec<Mapping> = (0..4).map(|i| page(0x10_0000 + i * 0x1000)).collect();
        d.map_synced(&maps, &[]).expect("map");
        assert_eq!(d.tree_runs(), 1);
        let more: Vec<Mapping> = (0..4).map(|i| page(0x20_0000 + i * 0x1000)).collect();
        d.map_synced(&more, &[0, 2, 3]).expect("map");
        assert_eq!(d.tree_runs(), 4, "one run, then three: 0..2, 2, 3");
        d.take_ranges(&[(0x20_0000, 0x20_1fff)]).expect("first allocation");
        assert_eq!(d.tree_runs(), 3);
        assert_eq!(iovas(&d).len(), 6);
    }

    /// Buffers that fall in a page the batch already maps, in any order,
    /// reuse its mapping (with both rights); other pages get their own.
    #[test]
    fn a_batch_maps_each_shared_page_once() {
        let (fake, _iommu, d) = attached();
        let dma = DmaDomain::with_std(d, &[], DmaOptions::default()).expect("dma");
        let before = fake.stats().maps();
        let mut b = dma.begin();
        let pages = [0x9000_0000u64, 0x7000_0000, 0x8000_0000];
        let mut first = Vec::new();
        for p in pages {
            first.push(b.map(p, 16, DmaDirection::ToDevice).expect("map"));
        }
        for (i, p) in pages.iter().enumerate().rev() {
            let again = b.map(p + 0x100, 1, DmaDirection::FromDevice).expect("map");
            assert_eq!(again, first[i] + 0x100);
        }
        let two = b.map(0x7000_0000, 0x1001, DmaDirection::ToDevice).expect("two pages");
        assert!(!first.contains(&two));
        let m = b.commit().expect("commit");
        assert_eq!(fake.stats().maps() - before, 4);
        assert_eq!(m.allocations().len(), 4);
        for iova in first {
            let mapping = dma.domain().mappings().into_iter().find(|m| m.iova == iova);
            assert_eq!(mapping.map(|m| m.prot), Some(Prot::READ | Prot::WRITE));
        }
        dma.unmap(m).expect("unmap");
    }

    /// `sg_layout` gives one MAP per physically contiguous run (zero-length
    /// segments ignored, as `merge_segments` does), back to back from 0,
    /// with the segment's offset in its first page.
    #[test]
    fn sg_layout_matches_merged_runs() {
        let (_fake, _iommu, d) = attached();
        let dma = DmaDomain::with_std(d, &[], DmaOptions::default()).expect("dma");
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut r = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..500 {
            let mut segs = Vec::new();
            let mut p = 0x10_0000 + r(0x1000);
            for _ in 0..r(8) + 1 {
                let len = [0, 1, 16, 0x800, 0x1000, 0x1234][r(6) as usize];
                // Often right after the previous segment, sometimes elsewhere.
                if r(3) == 0 {
                    p = 0x10_0000 * (r(16) + 2) + r(0x1000);
                }
                segs.push((p, len));
                p += len as u64;
            }
            let (mut maps, mut out) = (Vec::new(), Vec::new());
            let got = dma.sg_layout(&segs, Prot::READ, &mut maps, &mut out);
            let runs = merge_segments(&segs);
            if runs.is_empty() {
                assert!(got.is_err());
                continue;
            }
            let mut at = 0;
            let mut want_maps = Vec::new();
            let mut want_segs = Vec::new();
            for (p, len) in runs {
                let (base, off, size) = dma.span(p, len).expect("span");
                want_maps.push(Mapping {
                    iova: at,
                    last: at + size - 1,
                    paddr: base,
                    prot: Prot::READ,
                });
                want_segs.push(DmaSegment { addr: at + off, len });
                at += size;
            }
            assert_eq!(got.expect("layout"), at, "{segs:x?}");
            assert_eq!((maps, out), (want_maps, want_segs), "{segs:x?}");
        }
    }
}
