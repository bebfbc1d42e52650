//! A batch: the buffers of one I/O, mapped with one sync.

use alloc::vec::Vec;

use smallvec::SmallVec;

use super::flush::Allocs;
use super::{merge_segments, DmaDirection, DmaDomain, DmaMapping, DmaSegment};
use crate::iommu::Mapping;
use crate::sync::{DefaultLocks, Locks};
use crate::Result;

impl<L: Locks> DmaDomain<L> {
    /// Starts a batch: map all buffers of one I/O, then one sync at commit.
    pub fn begin(&self) -> DmaBatch<'_, L> {
        DmaBatch { dma: self, pending: Pending::default() }
    }

    /// Reserves an IOVA for one buffer of `p`; see [`DmaBatch::map`].
    pub(crate) fn pending_map(
        &self,
        p: &mut Pending,
        paddr: u64,
        len: usize,
        dir: DmaDirection,
    ) -> Result<u64> {
        if self.passthrough {
            return Ok(paddr);
        }
        let (base, off, size) = self.span(paddr, len)?;
        let page = p.pages.binary_search_by_key(&base, |p| p.0);
        if size == self.granule {
            if let Ok(k) = page {
                let m = &mut p.maps[p.pages[k].1];
                m.prot = m.prot | dir.prot();
                return Ok(m.iova + off);
            }
        }
        let iova = self.alloc(size)?;
        p.allocs.push((iova, size));
        p.breaks.push(p.maps.len());
        if let (true, Err(k)) = (size == self.granule, page) {
            p.pages.insert(k, (base, p.maps.len()));
        }
        p.maps.push(Mapping { iova, last: iova + (size - 1), paddr: base, prot: dir.prot() });
        Ok(iova + off)
    }

    /// Sends the MAPs of `p` and syncs once, leaving `p` empty; returns its
    /// allocations and the outcome. On failure nothing of `p` stays in the
    /// tree and its IOVAs stay reserved: the caller hands them to
    /// [`Self::retire`] once no descriptor names them.
    #[cfg(feature = "virtio-drivers")]
    pub(crate) fn pending_commit_keep(&self, p: &mut Pending) -> (Allocs, Result<()>) {
        let allocs = core::mem::take(&mut p.allocs);
        let maps = core::mem::take(&mut p.maps);
        let breaks = core::mem::take(&mut p.breaks);
        p.pages.clear();
        if maps.is_empty() {
            return (allocs, Ok(()));
        }
        let result = self.domain.map_synced(&maps, &breaks);
        if result.is_err() {
            for r in self.ranges_of(&allocs) {
                let _ = self.domain.take_ranges(core::slice::from_ref(&r));
            }
        }
        (allocs, result)
    }

    /// Allocations whose MAP failed and that nothing uses any more: the
    /// next flush sends an UNMAP over them (a MAP whose reply was lost may
    /// have taken effect) and frees them once it completed.
    #[cfg(feature = "virtio-drivers")]
    pub(crate) fn retire(&self, allocs: &[(u64, u64)]) {
        self.retry.lock().extend_from_slice(allocs);
    }
}

/// The MAPs of one I/O before they are sent: what a [`DmaBatch`] holds,
/// without the borrow of its domain (the virtio-drivers adapter keeps one
/// between `share` and `notify`).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    maps: SmallVec<[Mapping; 3]>,
    allocs: Allocs,
    /// Where in `maps` each allocation's MAPs begin.
    breaks: SmallVec<[usize; 2]>,
    /// Single-page maps `(physical page, index in maps)`, sorted, to map a
    /// shared page once.
    pages: SmallVec<[(u64, usize); 2]>,
}

impl Pending {
    /// True when no buffer waits for its MAP.
    #[cfg(feature = "virtio-drivers")]
    pub(crate) fn is_empty(&self) -> bool {
        self.allocs.is_empty()
    }
}

/// Where [`DmaDomain::sg_layout`] puts its MAPs.
pub(super) trait PushMap {
    fn push_map(&mut self, m: Mapping);
}

impl PushMap for Vec<Mapping> {
    fn push_map(&mut self, m: Mapping) {
        self.push(m);
    }
}

impl<A: smallvec::Array<Item = Mapping>> PushMap for SmallVec<A> {
    fn push_map(&mut self, m: Mapping) {
        self.push(m);
    }
}

/// Moves MAPs and segments laid out from IOVA 0 to `iova`.
pub(super) fn shift(iova: u64, maps: &mut [Mapping], segs: &mut [DmaSegment]) {
    for m in maps {
        m.iova += iova;
        m.last += iova;
    }
    for s in segs {
        s.addr += iova;
    }
}

/// The buffers of one I/O, mapped with one sync at [`Self::commit`].
/// Dropping it without committing frees its IOVAs; nothing was sent.
pub struct DmaBatch<'a, L: Locks = DefaultLocks> {
    dma: &'a DmaDomain<L>,
    pending: Pending,
}

impl<L: Locks> DmaBatch<'_, L> {
    /// Reserves an IOVA for one buffer; the MAP goes out at commit. A buffer
    /// inside a page this batch already maps reuses that mapping (its rights
    /// widen to cover both buffers).
    pub fn map(&mut self, paddr: u64, len: usize, dir: DmaDirection) -> Result<u64> {
        self.dma.pending_map(&mut self.pending, paddr, len, dir)
    }

    /// Adds a scatter-gather list in one IOVA range, contiguous runs merged.
    pub fn map_sg(&mut self, segs: &[(u64, usize)], dir: DmaDirection) -> Result<Vec<DmaSegment>> {
        let dma = self.dma;
        if dma.passthrough {
            return Ok(merge_segments(segs)
                .into_iter()
                .map(|(addr, len)| DmaSegment { addr, len })
                .collect());
        }
        let p = &mut self.pending;
        let from = p.maps.len();
        p.maps.reserve(segs.len());
        let mut segments = Vec::with_capacity(segs.len());
        let laid = dma.sg_layout(segs, dir.prot(), &mut p.maps, &mut segments);
        let iova = match laid.and_then(|total| Ok((dma.alloc(total)?, total))) {
            Ok((iova, total)) => {
                p.allocs.push((iova, total));
                p.breaks.push(from);
                iova
            }
            Err(e) => {
                p.maps.truncate(from);
                return Err(e);
            }
        };
        shift(iova, &mut p.maps[from..], &mut segments);
        Ok(segments)
    }

    /// Sends every MAP of the batch and syncs once. On failure everything
    /// is rolled back and the IOVAs freed.
    pub fn commit(mut self) -> Result<DmaMapping> {
        let allocs = core::mem::take(&mut self.pending.allocs);
        let maps = core::mem::take(&mut self.pending.maps);
        if maps.is_empty() {
            return Ok(DmaMapping { allocs });
        }
        self.dma.map_synced(&maps, &allocs, &self.pending.breaks)?;
        Ok(DmaMapping { allocs })
    }
}

impl<L: Locks> Drop for DmaBatch<'_, L> {
    fn drop(&mut self) {
        self.dma.free_allocs(&self.pending.allocs);
    }
}
