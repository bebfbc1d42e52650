//! Emulated DMA endpoints and the two sides of their DMA: the guest maps
//! buffers ([`GuestDma`]), the VMM's device model reaches guest memory only
//! through the IOMMU's `translate()`, one leased chunk at a time ([`DmaEngine`]).

pub mod block;
pub mod net;
pub mod pattern;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_device::{Access, Fault, Iommu, Translation};

use crate::ram::GuestRam;

/// One DMA segment: a bus address (IOVA or guest-physical) and a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Bus address.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
}

/// Direction of a DMA mapping, from the device's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The device reads the buffer.
    ToDevice,
    /// The device writes the buffer.
    FromDevice,
}

/// A DMA-mapping failure on the guest side.
#[derive(Debug, thiserror::Error)]
#[error("DMA mapping failed: {0}")]
pub struct MapError(pub String);

/// One buffer of an I/O: its guest-physical pieces and direction.
#[derive(Clone, Copy, Debug)]
pub struct IoBuf<'a> {
    /// Guest-physical segments (one for a simple buffer, many for a scatter list).
    pub segs: &'a [Seg],
    /// Who reads it.
    pub dir: Dir,
}

/// What must be undone to unmap one I/O; opaque to endpoints.
#[derive(Debug)]
pub struct IoToken(pub(crate) TokenInner);

#[derive(Debug)]
pub(crate) enum TokenInner {
    /// Nothing was mapped.
    Direct,
    /// One committed batch.
    Batch(viommu_driver::dma::DmaMapping),
    /// Buffers mapped one call each: singles `(iova, len)` and scatter lists.
    Separate(Vec<(u64, usize)>, Vec<viommu_driver::dma::SgMapping>),
}

/// The guest's DMA API, per thread (as per CPU in a kernel). Endpoints map
/// all the buffers of one I/O with one call, so that an implementation may
/// pay one sync for them (the batch API) or one per buffer (as Linux's
/// virtio ring does).
pub trait GuestDma {
    /// Maps the buffers of one I/O. `out[i]` receives buffer i's device
    /// segments (contiguous pieces may merge). On error nothing stays mapped.
    fn map_io(&mut self, bufs: &[IoBuf<'_>], out: &mut Vec<Vec<Seg>>) -> Result<IoToken, MapError>;
    /// Unmaps one I/O.
    fn unmap_io(&mut self, token: IoToken) -> Result<(), MapError>;
    /// Pushes out deferred work (lazy UNMAPs) now.
    fn flush(&mut self) -> Result<(), MapError> {
        Ok(())
    }
}

/// Resizes `out` to `n` empty lists, keeping their allocations.
pub(crate) fn reset_out(out: &mut Vec<Vec<Seg>>, n: usize) {
    out.resize_with(n, Vec::new);
    out.iter_mut().for_each(Vec::clear);
}

/// No translation: bus address = guest-physical address (no IOMMU, or an
/// identity domain).
#[derive(Clone, Copy, Debug, Default)]
pub struct DirectDma;

impl GuestDma for DirectDma {
    fn map_io(&mut self, bufs: &[IoBuf<'_>], out: &mut Vec<Vec<Seg>>) -> Result<IoToken, MapError> {
        reset_out(out, bufs.len());
        for (b, o) in bufs.iter().zip(out.iter_mut()) {
            o.extend_from_slice(b.segs);
        }
        Ok(IoToken(TokenInner::Direct))
    }

    fn unmap_io(&mut self, _token: IoToken) -> Result<(), MapError> {
        Ok(())
    }
}

/// Why a device-side DMA failed.
#[derive(Debug, thiserror::Error)]
pub enum DmaFault {
    /// The IOMMU refused the access.
    #[error("{0}")]
    Iommu(Fault),
    /// The translated address is outside guest RAM.
    #[error("guest-physical {0:#x} outside RAM")]
    OutsideRam(u64),
}

/// Bytes of one leased chunk by default: one page, so a long copy delays an UNMAP by at
/// most one page's copy.
pub const DEFAULT_CHUNK: usize = 4096;

/// The VMM side of an endpoint's DMA: every access is translated (unless
/// there is no IOMMU) and copied to or from guest RAM.
///
/// A translated access goes chunk by chunk (at most [`DEFAULT_CHUNK`] bytes, see
/// [`Self::with_chunk`], split at chunk-aligned IOVAs): each chunk is translated, copied
/// under the translation's lease and released, so an UNMAP waits for one chunk, never for
/// the whole copy, and a chunk after it faults.
#[derive(Debug)]
pub struct DmaEngine {
    ram: Arc<GuestRam>,
    iommu: Option<(Arc<Iommu>, u32)>,
    chunk: usize,
    translations: AtomicU64,
    faults: AtomicU64,
}

impl DmaEngine {
    /// DMA straight to guest-physical addresses (no IOMMU).
    pub fn direct(ram: Arc<GuestRam>) -> Self {
        Self::new(ram, None)
    }

    /// DMA of `endpoint`, translated by `iommu`.
    pub fn translated(ram: Arc<GuestRam>, iommu: Arc<Iommu>, endpoint: u32) -> Self {
        Self::new(ram, Some((iommu, endpoint)))
    }

    fn new(ram: Arc<GuestRam>, iommu: Option<(Arc<Iommu>, u32)>) -> Self {
        let (translations, faults) = (AtomicU64::new(0), AtomicU64::new(0));
        Self { ram, iommu, chunk: DEFAULT_CHUNK, translations, faults }
    }

    /// Leases chunks of at most `bytes` (at least 1).
    pub fn with_chunk(mut self, bytes: usize) -> Self {
        self.chunk = bytes.max(1);
        self
    }

    /// Translations performed (one per chunk).
    pub fn translations(&self) -> u64 {
        self.translations.load(Ordering::Relaxed)
    }

    /// Translations refused.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// The chunks `(offset, len)` of `[addr, addr + len)`, cut at multiples of the chunk size.
    fn chunks(&self, addr: u64, len: usize) -> impl Iterator<Item = (usize, usize)> {
        let chunk = self.chunk;
        let mut off = 0;
        std::iter::from_fn(move || {
            let at = addr.wrapping_add(off as u64);
            let room = chunk - (at % chunk as u64) as usize;
            let n = room.min(len - off);
            (n > 0).then(|| {
                off += n;
                (off - n, n)
            })
        })
    }

    /// Translates one chunk; its lease lasts as long as the result.
    fn translate<'a>(
        &self,
        iommu: &'a Iommu,
        ep: u32,
        addr: u64,
        len: usize,
        access: Access,
    ) -> Result<Translation<'a>, DmaFault> {
        self.translations.fetch_add(1, Ordering::Relaxed);
        iommu.translate(ep, addr, len as u64, access).map_err(|e| {
            self.faults.fetch_add(1, Ordering::Relaxed);
            DmaFault::Iommu(e)
        })
    }

    /// Device reads guest memory at bus address `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let Some((iommu, ep)) = &self.iommu else {
            return self.ram.read(addr, buf).map_err(|_| DmaFault::OutsideRam(addr));
        };
        for (off, n) in self.chunks(addr, buf.len()) {
            let t = self.translate(iommu, *ep, addr + off as u64, n, Access::Read)?;
            let piece = &mut buf[off..off + n];
            t.read_at(self.ram.memory(), 0, piece).map_err(|_| outside(&t))?;
        }
        Ok(())
    }

    /// Device writes guest memory at bus address `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let Some((iommu, ep)) = &self.iommu else {
            return self.ram.write(addr, data).map_err(|_| DmaFault::OutsideRam(addr));
        };
        for (off, n) in self.chunks(addr, data.len()) {
            let t = self.translate(iommu, *ep, addr + off as u64, n, Access::Write)?;
            let piece = &data[off..off + n];
            t.write_at(self.ram.memory(), 0, piece).map_err(|_| outside(&t))?;
        }
        Ok(())
    }
}

/// The fault of a translated chunk that guest RAM does not hold.
fn outside(t: &Translation<'_>) -> DmaFault {
    DmaFault::OutsideRam(t.segments().first().map_or(0, |s| s.addr))
}
