//! A batch: the buffers of one I/O, mapped with one sync.

use alloc::vec::Vec;

use smallvec::SmallVec;

use super::flush::Allocs;
use super::{merge_segments, DmaDirection, DmaDomain, DmaMapping, DmaSegment};
use crate::iommu::Mapping;
use crate::Result;

impl DmaDomain {
    /// Starts a batch: map all buffers of one I/O, then one sync at commit.
    pub fn begin(&self) -> DmaBatch<'_> {
        DmaBatch {
            dma: self,
            maps: SmallVec::new(),
            allocs: SmallVec::new(),
            breaks: SmallVec::new(),
            pages: SmallVec::new(),
        }
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
pub struct DmaBatch<'a> {
    dma: &'a DmaDomain,
    maps: SmallVec<[Mapping; 3]>,
    allocs: Allocs,
    /// Where in `maps` each allocation's MAPs begin.
    breaks: SmallVec<[usize; 2]>,
    /// Single-page maps `(physical page, index in maps)`, sorted, to map a
    /// shared page once.
    pages: SmallVec<[(u64, usize); 2]>,
}

impl DmaBatch<'_> {
    /// Reserves an IOVA for one buffer; the MAP goes out at commit. A buffer
    /// inside a page this batch already maps reuses that mapping (its rights
    /// widen to cover both buffers).
    pub fn map(&mut self, paddr: u64, len: usize, dir: DmaDirection) -> Result<u64> {
        let dma = self.dma;
        if dma.passthrough {
            return Ok(paddr);
        }
        let (base, off, size) = dma.span(paddr, len)?;
        let page = self.pages.binary_search_by_key(&base, |p| p.0);
        if size == dma.granule {
            if let Ok(k) = page {
                let m = &mut self.maps[self.pages[k].1];
                m.prot = m.prot | dir.prot();
                return Ok(m.iova + off);
            }
        }
        let iova = dma.alloc(size)?;
        self.allocs.push((iova, size));
        self.breaks.push(self.maps.len());
        if let (true, Err(k)) = (size == dma.granule, page) {
            self.pages.insert(k, (base, self.maps.len()));
        }
        self.maps.push(Mapping { iova, last: iova + (size - 1), paddr: base, prot: dir.prot() });
        Ok(iova + off)
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
        let from = self.maps.len();
        self.maps.reserve(segs.len());
        let mut segments = Vec::with_capacity(segs.len());
        let laid = dma.sg_layout(segs, dir.prot(), &mut self.maps, &mut segments);
        let iova = match laid.and_then(|total| Ok((dma.alloc(total)?, total))) {
            Ok((iova, total)) => {
                self.allocs.push((iova, total));
                self.breaks.push(from);
                iova
            }
            Err(e) => {
                self.maps.truncate(from);
                return Err(e);
            }
        };
        shift(iova, &mut self.maps[from..], &mut segments);
        Ok(segments)
    }

    /// Sends every MAP of the batch and syncs once. On failure everything
    /// is rolled back and the IOVAs freed.
    pub fn commit(mut self) -> Result<DmaMapping> {
        let allocs = core::mem::take(&mut self.allocs);
        let maps = core::mem::take(&mut self.maps);
        if maps.is_empty() {
            return Ok(DmaMapping { allocs });
        }
        self.dma.map_synced(&maps, &allocs, &self.breaks)?;
        Ok(DmaMapping { allocs })
    }
}

impl Drop for DmaBatch<'_> {
    fn drop(&mut self) {
        self.dma.free_allocs(&self.allocs);
    }
}
