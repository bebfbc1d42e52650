//! A virtio-blk-like endpoint: each request is a 16-byte header (type,
//! sector), data segments and a one-byte status, all reached by DMA.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use viommu_driver::PAGE_SIZE;

use super::{pattern, Dir, DmaEngine, DmaFault, GuestDma, IoBuf, MapError, Seg};
use crate::ram::{GuestPages, GuestRam};

/// Bytes of a request header: le32 type, le32 reserved, le64 sector.
pub const HEADER_LEN: usize = 16;
/// Request type: read from the disk (device writes memory).
pub const T_IN: u32 = 0;
/// Request type: write to the disk (device reads memory).
pub const T_OUT: u32 = 1;
/// Status: success.
pub const S_OK: u8 = 0;
/// Status: the device failed the request (DMA fault or bad data).
pub const S_IOERR: u8 = 1;
/// Status: unknown request type.
pub const S_UNSUPP: u8 = 2;
/// Bytes of one indirect descriptor: le64 addr, le32 len, le16 flags, le16 next.
pub const DESC_LEN: usize = 16;
/// Indirect descriptor flag: the device writes the buffer.
const DESC_F_WRITE: u16 = 2;
/// Most descriptors the device accepts in one indirect table.
pub const MAX_INDIRECT: usize = 1024;
/// Most data bytes the device moves for one request; lengths come from the
/// guest, so the bounce buffer must not follow them without a bound.
pub const MAX_REQUEST_BYTES: usize = 64 << 20;

/// Where the status byte sits in the header page (header and status share a
/// page, as small kmalloc objects do).
const STATUS_OFFSET: u64 = 512;

/// One request as the device sees it: bus addresses only.
#[derive(Clone, Copy, Debug)]
pub struct BlockRequest<'a> {
    /// Bus address of the header.
    pub header: u64,
    /// Data segments.
    pub data: &'a [Seg],
    /// Bus address of the status byte.
    pub status: u64,
}

/// The device model. Disk contents are the [`pattern`] of the byte offset,
/// so reads need no storage and writes are checked against it.
#[derive(Debug)]
pub struct BlockDevice {
    dma: Arc<DmaEngine>,
    data_errors: AtomicU64,
    dma_faults: AtomicU64,
}

impl BlockDevice {
    /// A device doing its DMA through `dma`.
    pub fn new(dma: Arc<DmaEngine>) -> Self {
        Self { dma, data_errors: AtomicU64::new(0), dma_faults: AtomicU64::new(0) }
    }

    /// Its DMA engine.
    pub fn dma(&self) -> &DmaEngine {
        &self.dma
    }

    /// Written data that did not match the disk pattern.
    pub fn data_errors(&self) -> u64 {
        self.data_errors.load(Ordering::Relaxed)
    }

    /// Requests failed by a DMA fault.
    pub fn dma_faults(&self) -> u64 {
        self.dma_faults.load(Ordering::Relaxed)
    }

    /// Serves one request. `scratch` is the device's bounce buffer. Returns
    /// the status written, or the fault if even the header or the status
    /// could not be reached (then nothing is written).
    pub fn process(&self, req: &BlockRequest<'_>, scratch: &mut Vec<u8>) -> Result<u8, DmaFault> {
        let r = self.serve(req, scratch);
        if r.is_err() {
            self.dma_faults.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    /// Serves a request given as an indirect descriptor table of `n`
    /// descriptors at bus address `table`: header, data segments, status.
    /// A table the device cannot use (too short, too long, wrong directions)
    /// gets no answer, as a device would return the chain unwritten.
    pub fn process_indirect(
        &self,
        table: u64,
        n: usize,
        scratch: &mut Vec<u8>,
    ) -> Result<Option<u8>, DmaFault> {
        if !(2..=MAX_INDIRECT).contains(&n) {
            return Ok(None);
        }
        let mut raw = vec![0u8; n * DESC_LEN];
        if let Err(e) = self.dma.read(table, &mut raw) {
            self.dma_faults.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let descs: Vec<(Seg, bool)> = raw
            .chunks_exact(DESC_LEN)
            .map(|d| {
                let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
                let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")) as usize;
                let flags = u16::from_le_bytes(d[12..14].try_into().expect("2 bytes"));
                (Seg { addr, len }, flags & DESC_F_WRITE != 0)
            })
            .collect();
        let (hdr, rest) = descs.split_first().expect("n >= 2");
        let (status, data) = rest.split_last().expect("n >= 2");
        if hdr.1 || !status.1 || hdr.0.len < HEADER_LEN || status.0.len < 1 {
            return Ok(None);
        }
        let data: Vec<Seg> = data.iter().map(|d| d.0).collect();
        let req = BlockRequest { header: hdr.0.addr, data: &data, status: status.0.addr };
        self.process(&req, scratch).map(Some)
    }

    fn serve(&self, req: &BlockRequest<'_>, scratch: &mut Vec<u8>) -> Result<u8, DmaFault> {
        let mut hdr = [0u8; HEADER_LEN];
        self.dma.read(req.header, &mut hdr)?;
        let ty = u32::from_le_bytes(hdr[0..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(hdr[8..16].try_into().expect("8 bytes"));
        let total = req.data.iter().try_fold(0usize, |acc, s| acc.checked_add(s.len));
        let Some(total) = total.filter(|&t| t <= MAX_REQUEST_BYTES) else {
            self.dma.write(req.status, &[S_IOERR])?;
            return Ok(S_IOERR);
        };
        scratch.resize(total, 0);
        let disk = sector * 512;
        let status = match ty {
            T_IN => {
                pattern::fill(scratch, disk);
                self.copy_segments(req.data, |seg, buf| self.dma.write(seg.addr, buf), scratch)
            }
            T_OUT => {
                let moved =
                    self.copy_segments(req.data, |seg, buf| self.dma.read(seg.addr, buf), scratch);
                if moved == S_OK && !pattern::check(scratch, disk) {
                    self.data_errors.fetch_add(1, Ordering::Relaxed);
                    S_IOERR
                } else {
                    moved
                }
            }
            _ => S_UNSUPP,
        };
        self.dma.write(req.status, &[status])?;
        Ok(status)
    }

    fn copy_segments(
        &self,
        segs: &[Seg],
        mut op: impl FnMut(&Seg, &mut [u8]) -> Result<(), DmaFault>,
        scratch: &mut [u8],
    ) -> u8 {
        let mut off = 0;
        for seg in segs {
            if op(seg, &mut scratch[off..off + seg.len]).is_err() {
                self.dma_faults.fetch_add(1, Ordering::Relaxed);
                return S_IOERR;
            }
            off += seg.len;
        }
        S_OK
    }
}

/// What the guest saw of one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockOutcome {
    /// The status byte the device wrote (or [`S_IOERR`] if it never answered).
    pub status: u8,
    /// For a read: the data matched the disk pattern.
    pub data_ok: bool,
}

/// The guest side of one queue: its header/status page and its data buffer,
/// whose pages are scattered in guest RAM (one DMA segment per page, as for
/// an O_DIRECT user buffer).
#[derive(Debug)]
pub struct BlockGuest {
    ram: Arc<GuestRam>,
    hdr_page: GuestPages,
    data_pages: Vec<GuestPages>,
    data: Vec<Seg>,
    mapped: Vec<Vec<Seg>>,
    buf: Vec<u8>,
    /// With an indirect table: its pages, and per-descriptor mapping.
    table: Option<GuestPages>,
    mapped_table: Vec<Vec<Seg>>,
}

impl BlockGuest {
    /// Allocates buffers for requests of `io_size` bytes (a multiple of 512).
    pub fn new(ram: Arc<GuestRam>, io_size: usize) -> Result<Self, MapError> {
        let oom = || MapError("guest RAM exhausted".into());
        let hdr_page = ram.alloc_pages(1).ok_or_else(oom)?;
        let npages = io_size.div_ceil(PAGE_SIZE);
        let mut data_pages = Vec::with_capacity(npages);
        let mut spacers = Vec::with_capacity(npages);
        for _ in 0..npages {
            data_pages.push(ram.alloc_pages(1).ok_or_else(oom)?);
            // A spacer keeps the next data page from being adjacent.
            spacers.push(ram.alloc_pages(1).ok_or_else(oom)?);
        }
        spacers.into_iter().for_each(|p| ram.free_pages(p));
        let data = data_pages
            .iter()
            .enumerate()
            .map(|(i, p)| Seg { addr: p.gpa, len: PAGE_SIZE.min(io_size - i * PAGE_SIZE) })
            .collect();
        Ok(Self {
            ram,
            hdr_page,
            data_pages,
            data,
            mapped: Vec::new(),
            buf: vec![0; io_size],
            table: None,
            mapped_table: Vec::new(),
        })
    }

    /// With `on`, requests go as Linux's virtio ring sends them: every
    /// descriptor (header, each data segment, status) mapped on its own, and
    /// an indirect descriptor table, filled with their bus addresses and
    /// mapped last, is all the device is given.
    pub fn with_indirect(mut self, on: bool) -> Result<Self, MapError> {
        if on && self.table.is_none() {
            let bytes = (self.data.len() + 2) * DESC_LEN;
            let pages = bytes.div_ceil(PAGE_SIZE);
            let run = self.ram.alloc_pages(pages).ok_or(MapError("guest RAM exhausted".into()))?;
            self.table = Some(run);
        }
        Ok(self)
    }

    /// Guest-physical data segments.
    pub fn data_segments(&self) -> &[Seg] {
        &self.data
    }

    /// One request: prepare, map header + data + status, let the device
    /// serve it, unmap, and check the status and (for reads) the data.
    pub fn io(
        &mut self,
        dma: &mut dyn GuestDma,
        dev: &BlockDevice,
        write: bool,
        sector: u64,
        dev_scratch: &mut Vec<u8>,
    ) -> Result<BlockOutcome, MapError> {
        let ram_err = |e: crate::RamError| MapError(e.to_string());
        let disk = sector * 512;
        if write {
            pattern::fill(&mut self.buf, disk);
            let mut off = 0;
            for s in &self.data {
                self.ram.write(s.addr, &self.buf[off..off + s.len]).map_err(ram_err)?;
                off += s.len;
            }
        }
        let mut hdr = [0u8; HEADER_LEN];
        hdr[0..4].copy_from_slice(&(if write { T_OUT } else { T_IN }).to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        let hdr_gpa = self.hdr_page.gpa;
        let status_gpa = hdr_gpa + STATUS_OFFSET;
        self.ram.write(hdr_gpa, &hdr).map_err(ram_err)?;
        self.ram.write(status_gpa, &[0xff]).map_err(ram_err)?;

        let data_dir = if write { Dir::ToDevice } else { Dir::FromDevice };
        let hdr_seg = [Seg { addr: hdr_gpa, len: HEADER_LEN }];
        let status_seg = [Seg { addr: status_gpa, len: 1 }];
        let status = match self.table {
            None => {
                let bufs = [
                    IoBuf { segs: &hdr_seg, dir: Dir::ToDevice },
                    IoBuf { segs: &self.data, dir: data_dir },
                    IoBuf { segs: &status_seg, dir: Dir::FromDevice },
                ];
                let token = dma.map_io(&bufs, &mut self.mapped)?;
                let req = BlockRequest {
                    header: self.mapped[0][0].addr,
                    data: &self.mapped[1],
                    status: self.mapped[2][0].addr,
                };
                let status = dev.process(&req, dev_scratch).unwrap_or(S_IOERR);
                dma.unmap_io(token)?;
                status
            }
            Some(table) => {
                let mut bufs = Vec::with_capacity(self.data.len() + 2);
                bufs.push(IoBuf { segs: &hdr_seg, dir: Dir::ToDevice });
                bufs.extend(
                    self.data
                        .iter()
                        .map(|s| IoBuf { segs: std::slice::from_ref(s), dir: data_dir }),
                );
                bufs.push(IoBuf { segs: &status_seg, dir: Dir::FromDevice });
                let token = dma.map_io(&bufs, &mut self.mapped)?;
                let n = bufs.len();
                let mut raw = vec![0u8; n * DESC_LEN];
                for (i, (d, b)) in raw.chunks_exact_mut(DESC_LEN).zip(&bufs).enumerate() {
                    let seg = self.mapped[i][0];
                    let flags = if b.dir == Dir::FromDevice { DESC_F_WRITE } else { 0 };
                    d[0..8].copy_from_slice(&seg.addr.to_le_bytes());
                    d[8..12].copy_from_slice(&(seg.len as u32).to_le_bytes());
                    d[12..14].copy_from_slice(&flags.to_le_bytes());
                }
                self.ram.write(table.gpa, &raw).map_err(ram_err)?;
                let table_seg = [Seg { addr: table.gpa, len: raw.len() }];
                let table_buf = [IoBuf { segs: &table_seg, dir: Dir::ToDevice }];
                let table_token = dma.map_io(&table_buf, &mut self.mapped_table)?;
                let status = dev
                    .process_indirect(self.mapped_table[0][0].addr, n, dev_scratch)
                    .ok()
                    .flatten()
                    .unwrap_or(S_IOERR);
                dma.unmap_io(token)?;
                dma.unmap_io(table_token)?;
                status
            }
        };

        let mut st = [0u8];
        self.ram.read(status_gpa, &mut st).map_err(ram_err)?;
        let mut data_ok = true;
        if !write && st[0] == S_OK {
            let mut off = 0;
            for seg in &self.data {
                self.ram.read(seg.addr, &mut self.buf[off..off + seg.len]).map_err(ram_err)?;
                off += seg.len;
            }
            data_ok = pattern::check(&self.buf, disk);
        }
        Ok(BlockOutcome { status: if status == st[0] { st[0] } else { S_IOERR }, data_ok })
    }
}

impl Drop for BlockGuest {
    fn drop(&mut self) {
        self.ram.free_pages(self.hdr_page);
        if let Some(t) = self.table.take() {
            self.ram.free_pages(t);
        }
        for p in self.data_pages.drain(..) {
            self.ram.free_pages(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::DirectDma;

    #[test]
    fn direct_reads_and_writes_move_checked_data() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let dev = BlockDevice::new(Arc::new(DmaEngine::direct(ram.clone())));
        let mut guest = BlockGuest::new(ram.clone(), 64 * 1024).unwrap();
        let segs = guest.data_segments();
        assert_eq!(segs.len(), 16);
        assert!(segs.windows(2).all(|w| w[0].addr + 4096 != w[1].addr), "pages are scattered");
        let mut scratch = Vec::new();
        for (i, write) in [false, true, false, true].into_iter().enumerate() {
            let out = guest.io(&mut DirectDma, &dev, write, 128 * i as u64, &mut scratch).unwrap();
            assert_eq!(out, BlockOutcome { status: S_OK, data_ok: true });
        }
        assert_eq!(dev.data_errors(), 0);
    }

    #[test]
    fn indirect_tables_carry_the_request() {
        let ram = GuestRam::new(4 << 20).unwrap();
        let dev = BlockDevice::new(Arc::new(DmaEngine::direct(ram.clone())));
        let mut guest =
            BlockGuest::new(ram.clone(), 16 << 10).unwrap().with_indirect(true).unwrap();
        let mut scratch = Vec::new();
        for write in [false, true] {
            let out = guest.io(&mut DirectDma, &dev, write, 64, &mut scratch).unwrap();
            assert_eq!(out, BlockOutcome { status: S_OK, data_ok: true });
        }
        // A table the device cannot use gets no answer.
        assert!(matches!(dev.process_indirect(4096, 1, &mut scratch), Ok(None)));
        assert!(matches!(dev.process_indirect(4096, MAX_INDIRECT + 1, &mut scratch), Ok(None)));
        // Lengths the guest made up are bounded before anything is allocated.
        let hdr = [0u8; HEADER_LEN];
        ram.write(8192, &hdr).unwrap();
        let huge =
            [Seg { addr: 0x10000, len: usize::MAX / 2 }, Seg { addr: 0, len: usize::MAX / 2 }];
        let req = BlockRequest { header: 8192, data: &huge, status: 8192 + 512 };
        assert_eq!(dev.process(&req, &mut scratch).unwrap(), S_IOERR);
        assert!(scratch.capacity() < MAX_REQUEST_BYTES);
        assert_eq!(dev.data_errors(), 0);
    }
}
