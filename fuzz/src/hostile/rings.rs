//! The device's side of one split virtqueue (virtio 1.2 §2.7) over the DMA pool: what the
//! driver made available, its chains, and the used entries the hostile device writes.

use std::collections::VecDeque;

use viommu_driver::QueueAddrs;

use super::Pool;

/// Descriptor flags (§2.7.5).
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
/// Longest chain (or indirect table) the device follows.
const MAX_CHAIN: usize = 64;

/// One buffer of a chain: bus address, length, device-writable.
pub type Buf = (u64, u32, bool);

/// One queue as the device sees it.
pub struct Ring {
    size: u16,
    addrs: QueueAddrs,
    last_avail: u16,
    used_idx: u16,
    /// Heads taken from the avail ring, not answered yet.
    pub pending: VecDeque<u16>,
}

impl Ring {
    /// A queue the driver set up.
    pub fn new(size: u16, addrs: QueueAddrs) -> Self {
        Self { size: size.max(1), addrs, last_avail: 0, used_idx: 0, pending: VecDeque::new() }
    }

    /// Takes the heads the driver made available since the last call (one ring at most).
    pub fn take_avail(&mut self, pool: &Pool) {
        let idx = pool.u16(self.addrs.avail + 2);
        let n = idx.wrapping_sub(self.last_avail).min(self.size);
        for _ in 0..n {
            let slot = self.addrs.avail + 4 + 2 * u64::from(self.last_avail % self.size);
            self.pending.push_back(pool.u16(slot));
            self.last_avail = self.last_avail.wrapping_add(1);
        }
    }

    fn desc(pool: &Pool, table: u64, i: u16) -> (u64, u32, u16, u16) {
        let mut raw = [0u8; 16];
        pool.read(table.wrapping_add(16 * u64::from(i)), &mut raw);
        let addr = u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes"));
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        (addr, len, flags, u16::from_le_bytes([raw[14], raw[15]]))
    }

    /// The buffers of the chain at `head`, through one level of indirect table.
    pub fn chain(&self, pool: &Pool, head: u16) -> Vec<Buf> {
        let mut bufs = Vec::new();
        let mut i = head % self.size;
        for _ in 0..MAX_CHAIN {
            let (addr, len, flags, next) = Self::desc(pool, self.addrs.desc, i);
            if flags & F_INDIRECT != 0 {
                let n = (len / 16).min(MAX_CHAIN as u32) as u16;
                for j in 0..n {
                    let (a, l, f, _) = Self::desc(pool, addr, j);
                    bufs.push((a, l, f & F_WRITE != 0));
                }
                break;
            }
            bufs.push((addr, len, flags & F_WRITE != 0));
            if flags & F_NEXT == 0 {
                break;
            }
            i = next % self.size;
        }
        bufs
    }

    /// Writes one used entry and publishes it.
    pub fn push_used(&mut self, pool: &Pool, id: u32, len: u32) {
        let at = self.addrs.used + 4 + 8 * u64::from(self.used_idx % self.size);
        let mut raw = [0u8; 8];
        raw[..4].copy_from_slice(&id.to_le_bytes());
        raw[4..].copy_from_slice(&len.to_le_bytes());
        pool.write(at, &raw);
        self.set_used_idx(pool, self.used_idx.wrapping_add(1));
    }

    /// Moves the used index anywhere.
    pub fn set_used_idx(&mut self, pool: &Pool, idx: u16) {
        self.used_idx = idx;
        pool.write(self.addrs.used + 2, &idx.to_le_bytes());
    }

    /// Writes `avail_event` (EVENT_IDX: when the driver should notify next).
    pub fn set_avail_event(&self, pool: &Pool, v: u16) {
        pool.write(self.addrs.used + 4 + 8 * u64::from(self.size), &v.to_le_bytes());
    }
}

/// The readable bytes of a chain, up to `max`.
pub fn gather(pool: &Pool, bufs: &[Buf], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len, _) in bufs.iter().filter(|b| !b.2) {
        let n = (len as usize).min(max - out.len());
        let mut b = vec![0; n];
        if pool.read(addr, &mut b) {
            out.extend_from_slice(&b);
        }
    }
    out
}

/// Total length of the writable buffers.
pub fn writable_len(bufs: &[Buf]) -> u64 {
    bufs.iter().filter(|b| b.2).map(|b| u64::from(b.1)).sum()
}

/// Writes `data` across the writable buffers, in order.
pub fn scatter(pool: &Pool, bufs: &[Buf], mut data: &[u8]) {
    for &(addr, len, _) in bufs.iter().filter(|b| b.2) {
        let n = (len as usize).min(data.len());
        pool.write(addr, &data[..n]);
        data = &data[n..];
    }
}
