//! The device side of the split rings: walking chains, handing requests to
//! the [`DeviceModel`], returning used entries, and where the injected faults
//! (holds, reordering, lost or rewritten replies) take effect.

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use viommu_proto::{features as f, Request, RequestType, Status};

use super::irq::Irq;
use super::memory::FakeMemory;
use super::{DeviceModel, FakeConfig, FakeStats, InjectReply, Injection, Reorder};
use crate::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::transport::QueueAddrs;

/// Most device-writable bytes the fake hands the model for one reply:
/// virtio-iommu replies are a 4-byte tail, after `probe_size` bytes of
/// properties for PROBE (at most 64 KiB in `viommu-device`).
pub const REPLY_MAX: usize = 64 * 1024 + 4;

/// Most device-readable bytes taken from one descriptor.
const READ_MAX: u32 = 4096;

#[derive(Clone, Copy, Default)]
pub(super) struct Queue {
    pub(super) size: u16,
    pub(super) addrs: Option<QueueAddrs>,
    last_avail: u16,
    used_idx: u16,
}

impl Queue {
    pub(super) fn new(size: u16, addrs: QueueAddrs) -> Self {
        Self { size, addrs: Some(addrs), last_avail: 0, used_idx: 0 }
    }
}

/// A chain's device-readable bytes and its writable buffers.
pub(super) type Chain = (Vec<u8>, Vec<(u64, u32)>);

/// One descriptor as read from guest memory.
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// What a request came to.
enum Outcome {
    /// The used length to return.
    Used(u32),
    /// Held back ([`InjectReply::Hold`]).
    Held,
}

pub(super) struct Device {
    pub(super) cfg: FakeConfig,
    pub(super) mem: FakeMemory,
    pub(super) model: Box<dyn DeviceModel>,
    pub(super) status: u8,
    pub(super) driver_features: u64,
    pub(super) queues: [Queue; 2],
    /// Injections with the number of matching requests to let through first.
    pub(super) inject: VecDeque<(u32, Injection)>,
    pub(super) stats: FakeStats,
    pub(super) deferred: bool,
    pub(super) stalled: bool,
    pub(super) reorder: Reorder,
    /// Requests held back by [`InjectReply::Hold`]: head and chain.
    pub(super) held: Vec<(u16, Chain)>,
    pub(super) irq: Arc<Irq>,
}

impl Device {
    fn has(&self, bit: u32) -> bool {
        self.driver_features & f::bit(bit) != 0
    }

    /// Walks one chain: device-readable bytes and writable buffers. An
    /// indirect descriptor (with INDIRECT_DESC negotiated) must end the chain;
    /// its table is walked instead, bounded by its length, and may not nest.
    /// Its WRITE flag is ignored, as the spec asks.
    fn read_chain(&self, q: &Queue, head: u16) -> Option<Chain> {
        let addrs = q.addrs?;
        let mut chain = (Vec::new(), Vec::new());
        let mut idx = head;
        for _ in 0..q.size {
            let d = self.read_desc(addrs.desc, q.size, idx)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                let len = d.len as usize;
                let bad = !self.has(f::RING_INDIRECT_DESC)
                    || d.flags & DESC_F_NEXT != 0
                    || len == 0
                    || len % 16 != 0
                    || len / 16 > q.size as usize;
                if bad {
                    return None;
                }
                return self.walk(d.addr, (len / 16) as u16, chain);
            }
            self.take_buf(&d, &mut chain)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Some(chain);
            }
            idx = d.next;
        }
        None
    }

    /// Walks an indirect table of `n` descriptors from entry 0.
    fn walk(&self, table: u64, n: u16, mut chain: Chain) -> Option<Chain> {
        let mut idx = 0;
        for _ in 0..n {
            let d = self.read_desc(table, n, idx)?;
            if d.flags & DESC_F_INDIRECT != 0 {
                return None; // nested indirect
            }
            self.take_buf(&d, &mut chain)?;
            if d.flags & DESC_F_NEXT == 0 {
                return Some(chain);
            }
            idx = d.next;
        }
        None
    }

    fn read_desc(&self, table: u64, n: u16, idx: u16) -> Option<Desc> {
        let mut b = [0u8; 16];
        if idx >= n || !self.mem.read(table + 16 * idx as u64, &mut b) {
            return None;
        }
        Some(Desc {
            addr: u64::from_le_bytes(b[0..8].try_into().ok()?),
            len: u32::from_le_bytes(b[8..12].try_into().ok()?),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        })
    }

    fn take_buf(&self, d: &Desc, (readable, writable): &mut Chain) -> Option<()> {
        if d.flags & DESC_F_WRITE != 0 {
            writable.push((d.addr, d.len));
        } else {
            let mut b = vec![0u8; d.len.min(READ_MAX) as usize];
            if !self.mem.read(d.addr, &mut b) {
                return None;
            }
            readable.extend_from_slice(&b);
        }
        Some(())
    }

    pub(super) fn push_used(&mut self, queue: usize, id: u16, len: u32) {
        let q = &mut self.queues[queue];
        let Some(addrs) = q.addrs else { return };
        let slot = (q.used_idx % q.size) as u64;
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&(id as u32).to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        self.mem.write(addrs.used + 4 + 8 * slot, &e);
        q.used_idx = q.used_idx.wrapping_add(1);
        fence(Ordering::Release);
        self.mem.write_u16(addrs.used + 2, q.used_idx);
        self.irq.raise();
    }

    /// Writes `data` over a chain's writable buffers, in order.
    fn scatter(&self, writable: &[(u64, u32)], data: &[u8]) {
        let mut at = 0usize;
        for (addr, len) in writable {
            let end = (at + *len as usize).min(data.len());
            self.mem.write(*addr, &data[at..end]);
            at = end;
        }
    }

    /// Has the model serve one request and writes its reply; `late` replaces
    /// the status it answered ([`InjectReply::AfterApplying`]).
    pub(super) fn serve(&mut self, (readable, writable): &Chain, late: Option<Status>) -> u32 {
        let total: u64 = writable.iter().map(|w| u64::from(w.1)).sum();
        let mut reply = vec![0u8; total.min(REPLY_MAX as u64) as usize];
        let used = self.model.handle_request(readable, &mut reply).min(reply.len() as u32);
        if used == 0 {
            self.stats.malformed += 1;
        }
        if let (Some(s), Some(tail)) = (late, (used as usize).checked_sub(4)) {
            reply[tail] = s as u8;
        }
        self.scatter(writable, &reply[..used as usize]);
        used
    }

    /// Fills a chain's writable buffers with zeros and ends them with
    /// `status`, as an injected failure answers; returns the used length.
    fn write_status(&self, writable: &[(u64, u32)], status: Status) -> u32 {
        let total: u64 = writable.iter().map(|w| u64::from(w.1)).sum();
        let mut out = vec![0u8; (total as usize).saturating_sub(4).min(REPLY_MAX)];
        out.extend_from_slice(&[status as u8, 0, 0, 0]);
        self.scatter(writable, &out);
        total as u32
    }

    pub(super) fn process_requests(&mut self) {
        // Like a real device: after publishing avail_event, look again, or a
        // request added meanwhile (whose driver saw no need to notify) is lost.
        while self.process_available() {}
    }

    /// Processes every available request; true if more arrived meanwhile.
    fn process_available(&mut self) -> bool {
        let q = self.queues[0];
        let Some(addrs) = q.addrs else { return false };
        let Some(avail) = self.mem.read_u16(addrs.avail + 2) else { return false };
        fence(Ordering::Acquire);
        let mut last = q.last_avail;
        let mut heads = Vec::new();
        while last != avail {
            let Some(head) = self.mem.read_u16(addrs.avail + 4 + 2 * (last % q.size) as u64) else {
                break;
            };
            last = last.wrapping_add(1);
            heads.push(head);
        }
        self.queues[0].last_avail = last;
        if self.reorder == Reorder::ReverseExecution {
            heads.reverse();
        }
        let mut used = Vec::with_capacity(heads.len());
        for head in heads {
            let Some(chain) = self.read_chain(&q, head) else {
                self.stats.malformed += 1;
                used.push((head, 0));
                continue;
            };
            match self.handle(&chain) {
                Outcome::Held => self.held.push((head, chain)),
                Outcome::Used(len) => used.push((head, len)),
            }
        }
        if self.reorder == Reorder::ReverseCompletion {
            used.reverse();
        }
        for (head, len) in used {
            self.push_used(0, head, len);
        }
        if !self.has(f::RING_EVENT_IDX) {
            return false;
        }
        self.mem.write_u16(addrs.used + 4 + 8 * q.size as u64, last);
        fence(Ordering::SeqCst);
        self.mem.read_u16(addrs.avail + 2).is_some_and(|a| a != last)
    }

    /// Counts one request and applies the injection that matches it, if any;
    /// otherwise the model serves it.
    fn handle(&mut self, chain: &Chain) -> Outcome {
        let Ok(req) = Request::parse(&chain.0) else {
            return Outcome::Used(self.serve(chain, None));
        };
        let ty = req.request_type();
        self.stats.requests[ty as usize - 1] += 1;
        match self.take_injection(ty) {
            None => Outcome::Used(self.serve(chain, None)),
            Some(InjectReply::Status(s)) => Outcome::Used(self.write_status(&chain.1, s)),
            Some(InjectReply::UsedLenZero) => Outcome::Used(0),
            Some(InjectReply::AfterApplying(s)) => Outcome::Used(self.serve(chain, Some(s))),
            Some(InjectReply::Hold) => Outcome::Held,
        }
    }

    /// The reply injected for this request, once its skip count has run out.
    fn take_injection(&mut self, ty: RequestType) -> Option<InjectReply> {
        let pos = self.inject.iter().position(|(_, i)| i.request.is_none_or(|t| t == ty))?;
        if self.inject[pos].0 > 0 {
            self.inject[pos].0 -= 1;
            return None;
        }
        self.inject.remove(pos).map(|(_, i)| i.reply)
    }

    pub(super) fn push_event(&mut self, event: &[u8]) -> bool {
        let q = self.queues[1];
        let Some(addrs) = q.addrs else { return false };
        let Some(avail) = self.mem.read_u16(addrs.avail + 2) else { return false };
        if q.last_avail == avail {
            return false;
        }
        let Some(head) = self.mem.read_u16(addrs.avail + 4 + 2 * (q.last_avail % q.size) as u64)
        else {
            return false;
        };
        let last = q.last_avail.wrapping_add(1);
        self.queues[1].last_avail = last;
        if self.has(f::RING_EVENT_IDX) {
            // Ask to be notified once the driver posts past what we consumed.
            self.mem.write_u16(addrs.used + 4 + 8 * q.size as u64, last);
        }
        let Some((_, writable)) = self.read_chain(&q, head) else { return false };
        let Some(&(addr, len)) = writable.first() else { return false };
        let n = event.len().min(len as usize);
        self.mem.write(addr, &event[..n]);
        self.push_used(1, head, n as u32);
        true
    }
}
