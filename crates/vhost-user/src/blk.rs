//! A vhost-user-blk device over a file (virtio 1.2 §5.2): one queue; IN, OUT, FLUSH and
//! GET_ID. Every buffer is reached through [`IoMem`], so on IOVAs behind the IOTLB.
//!
//! Chains are guest input: the header is the first 16 readable bytes, "the final status
//! byte is written by the device" as the last writable byte, the data is what lies between.
//! Lengths are bounded ([`MAX_REQUEST_BYTES`]); a request the device cannot serve gets
//! IOERR or UNSUPP, and a chain without a status byte gets used length 0.

use std::fs::File;
use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};

use crate::backend::{Desc, Device, IoMem};

/// "VIRTIO_BLK_T_IN".
pub const T_IN: u32 = 0;
/// "VIRTIO_BLK_T_OUT".
pub const T_OUT: u32 = 1;
/// "VIRTIO_BLK_T_FLUSH".
pub const T_FLUSH: u32 = 4;
/// "VIRTIO_BLK_T_GET_ID".
pub const T_GET_ID: u32 = 8;
/// "VIRTIO_BLK_S_OK".
pub const S_OK: u8 = 0;
/// "VIRTIO_BLK_S_IOERR".
pub const S_IOERR: u8 = 1;
/// "VIRTIO_BLK_S_UNSUPP".
pub const S_UNSUPP: u8 = 2;

/// "VIRTIO_BLK_F_SEG_MAX".
pub const F_SEG_MAX: u64 = 1 << 2;
/// "VIRTIO_BLK_F_BLK_SIZE".
pub const F_BLK_SIZE: u64 = 1 << 6;
/// "VIRTIO_BLK_F_FLUSH".
pub const F_FLUSH: u64 = 1 << 9;

/// Sector size of the virtio-blk request ("in units of 512 bytes").
pub const SECTOR: u64 = 512;
/// Most data bytes of one request: the bounce buffer never follows guest lengths further.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// `seg_max` offered: data segments per request.
pub const SEG_MAX: u32 = 254;
/// Bytes of "the GET_ID string" (not NUL-terminated when all 20 are used).
pub const ID_BYTES: usize = 20;
const HEADER: usize = 16;

/// Counts of the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounts {
    /// Requests by status: OK.
    pub ok: u64,
    /// IOERR.
    pub ioerr: u64,
    /// UNSUPP.
    pub unsupp: u64,
    /// Data bytes moved between the file and guest memory.
    pub bytes: u64,
}

/// The block device.
pub struct BlockDevice {
    file: File,
    sectors: u64,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
    counts: BlockCounts,
    /// The outcome of the last run (status, data bytes), counted once the request completes.
    last: Option<(u8, u64)>,
    last_was_get_id: bool,
    on_get_id: Option<Box<dyn FnMut() + Send>>,
}

impl BlockDevice {
    /// A disk of the file's size (rounded down to sectors), with `id` as its GET_ID string.
    pub fn new(file: File, id: &str) -> std::io::Result<Self> {
        let sectors = file.metadata()?.len() / SECTOR;
        let mut b = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            file,
            sectors,
            id: b,
            bounce: Vec::new(),
            counts: BlockCounts::default(),
            last: None,
            last_was_get_id: false,
            on_get_id: None,
        })
    }

    /// Calls `f` when a GET_ID request completes (a guest can mark moments with it:
    /// Linux sends one per read of `/sys/block/vdX/serial`).
    pub fn on_get_id(mut self, f: impl FnMut() + Send + 'static) -> Self {
        self.on_get_id = Some(Box::new(f));
        self
    }

    /// Counts so far.
    pub fn counts(&self) -> BlockCounts {
        self.counts
    }

    fn serve(&mut self, mem: &IoMem, chain: &[Desc]) -> (u8, u32) {
        let mut header = [0u8; HEADER];
        if copy_from_chain(mem, chain, 0, &mut header).is_err() {
            return (S_IOERR, 0);
        }
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or([0; 8]));
        let readable: u64 = chain.iter().filter(|d| !d.write).map(|d| u64::from(d.len)).sum();
        let writable: u64 = chain.iter().filter(|d| d.write).map(|d| u64::from(d.len)).sum();
        // The status byte is the last writable byte; data-in is what comes before it.
        let data_in = writable.saturating_sub(1);
        let data_out = readable.saturating_sub(HEADER as u64);
        match kind {
            T_IN | T_OUT => {
                let len = if kind == T_IN { data_in } else { data_out };
                let Some(offset) = self.range(sector, len) else { return (S_IOERR, 0) };
                let len = len as usize;
                self.bounce.resize(len, 0);
                if kind == T_IN {
                    if self.file.read_exact_at(&mut self.bounce, offset).is_err()
                        || copy_to_chain(mem, chain, 0, &self.bounce).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    (S_OK, len as u32)
                } else {
                    // Everything is read from the guest before the file is written: a
                    // failed access moves no data.
                    if copy_from_chain(mem, chain, HEADER as u64, &mut self.bounce).is_err()
                        || self.file.write_all_at(&self.bounce, offset).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    self.last = Some((S_OK, len as u64));
                    (S_OK, 0)
                }
            }
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                self.last_was_get_id = true;
                let n = (data_in as usize).min(ID_BYTES);
                match copy_to_chain(mem, chain, 0, &self.id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(()) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// The file offset of `len` bytes at `sector`, if they fit the disk and the bound.
    fn range(&self, sector: u64, len: u64) -> Option<u64> {
        if len as usize > MAX_REQUEST_BYTES || len % SECTOR != 0 {
            return None;
        }
        let end = sector.checked_add(len / SECTOR)?;
        (end <= self.sectors).then(|| sector * SECTOR)
    }
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("sectors", &self.sectors)
            .field("counts", &self.counts)
            .finish()
    }
}

impl Device for BlockDevice {
    fn features(&self) -> u64 {
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | crate::wire::features::RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u32, buf: &mut [u8]) {
        // capacity (le64), size_max (le32), seg_max (le32), geometry (4 bytes),
        // blk_size (le32), then fields of features not offered (zero).
        let mut cfg = [0u8; 60];
        cfg[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        cfg[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn complete(&mut self) {
        if std::mem::take(&mut self.last_was_get_id) {
            if let Some(f) = &mut self.on_get_id {
                f();
            }
        }
        match self.last.take() {
            Some((S_OK, bytes)) => {
                self.counts.ok += 1;
                self.counts.bytes += bytes;
            }
            Some((S_IOERR, _)) => self.counts.ioerr += 1,
            Some(_) => self.counts.unsupp += 1,
            None => {}
        }
    }

    fn process(&mut self, mem: &IoMem, chain: &[Desc]) -> u32 {
        self.last_was_get_id = false;
        // "The final status byte is written by the device": the last writable byte.
        let Some(last) = chain.iter().rposition(|d| d.write && d.len > 0) else {
            return 0;
        };
        self.last = None;
        let (status, written) = self.serve(mem, chain);
        let moved = self.last.map_or(u64::from(written), |(_, n)| n);
        self.last = Some((status, if status == S_OK { moved } else { 0 }));
        let d = chain[last];
        let at = d.addr.checked_add(u64::from(d.len) - 1);
        match at.map(|a| mem.write_obj(status, GuestAddress(a))) {
            Some(Ok(())) => written + 1,
            _ => 0,
        }
    }
}

/// Copies `buf.len()` bytes from the chain's readable bytes starting at `skip`.
fn copy_from_chain(mem: &IoMem, chain: &[Desc], skip: u64, buf: &mut [u8]) -> Result<(), ()> {
    walk(chain, false, skip, buf.len(), |addr, at, n| {
        mem.read_slice(&mut buf[at..at + n], GuestAddress(addr)).map_err(|_| ())
    })
}

/// Copies `data` into the chain's writable bytes starting at `skip`.
fn copy_to_chain(mem: &IoMem, chain: &[Desc], skip: u64, data: &[u8]) -> Result<(), ()> {
    walk(chain, true, skip, data.len(), |addr, at, n| {
        mem.write_slice(&data[at..at + n], GuestAddress(addr)).map_err(|_| ())
    })
}

/// Calls `f(iova, buffer offset, bytes)` for the pieces of `len` bytes of the chain's
/// readable (or writable) descriptors after `skip` bytes. Fails if the chain is shorter
/// or an address wraps.
fn walk(
    chain: &[Desc],
    write: bool,
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(u64, usize, usize) -> Result<(), ()>,
) -> Result<(), ()> {
    let mut done = 0usize;
    for d in chain.iter().filter(|d| d.write == write) {
        if done == len {
            break;
        }
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let n = ((dlen - skip) as usize).min(len - done);
        let addr = d.addr.checked_add(skip).ok_or(())?;
        addr.checked_add(n as u64).ok_or(())?;
        f(addr, done, n)?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(())
    }
}
