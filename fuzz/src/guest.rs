//! Guest memory and the split rings of both queues, for the descriptor-chain target: the
//! driver's side of the device, written byte by byte so the input can break any of it.

use viommu_device::VirtioIommu;
use viommu_proto::features::{bit, VERSION_1};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::input::Input;

/// Guest memory: two regions with a hole between, so "outside guest memory" is reachable.
pub type Mem = GuestMemoryMmap<()>;
/// Size of the low region (at 0): rings, then request buffers.
pub const LOW: u64 = 64 << 10;
/// Start of the high region (indirect tables, anything).
pub const HIGH_START: u64 = 1 << 20;
/// Size of the high region.
pub const HIGH: u64 = 64 << 10;
/// Each queue's rings take this much at `queue * RING_SPAN`.
const RING_SPAN: u64 = 0x2000;
/// Request buffers: slots of `SLOT` bytes from `DATA`.
const DATA: u64 = 2 * RING_SPAN;
const SLOT: u64 = 0x600;
const SLOTS: u64 = (LOW - DATA) / SLOT;

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// The buffer is a descriptor table.
pub const F_INDIRECT: u16 = 4;

/// A device set up on guest memory, with the driver's ring bookkeeping.
pub struct Guest {
    /// Guest memory.
    pub mem: Mem,
    /// The device.
    pub dev: VirtioIommu,
    /// Size of both queues.
    pub qsize: u16,
    features: u64,
    next_desc: [u16; 2],
    next_slot: u64,
}

/// The two regions, empty.
pub fn memory() -> Mem {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW as usize),
        (GuestAddress(HIGH_START), HIGH as usize),
    ])
    .expect("two disjoint regions")
}

impl Guest {
    /// A device that acked `features` (with VERSION_1), both queues of `qsize` set up and
    /// activated. `None` when the device refuses the queue size. Page-table mode walks
    /// tables in this guest memory, whatever the input wrote there.
    pub fn new(dev: VirtioIommu, qsize: u16, features: u64) -> Option<Self> {
        let mem = memory();
        dev.iommu().set_table_memory(Some(std::sync::Arc::new(mem.clone())));
        let features = (features | bit(VERSION_1)) & dev.device_features();
        let mut g = Self { mem, dev, qsize, features, next_desc: [0; 2], next_slot: 0 };
        g.setup().then_some(g)
    }

    /// Negotiates, sets up both queues and activates the device.
    fn setup(&mut self) -> bool {
        self.dev.ack_features(self.features);
        for q in 0..2 {
            let (d, a, u) = self.ring(q);
            if self.dev.set_queue(q, self.qsize, d, a, u).is_err() {
                return false;
            }
        }
        self.dev.activate().is_ok()
    }

    /// Device reset, then the same setup again on cleared rings.
    pub fn reset(&mut self) -> bool {
        self.dev.reset();
        for q in 0..2 {
            let (base, _, _) = self.ring(q);
            let _ = self.mem.write_slice(&vec![0; RING_SPAN as usize], GuestAddress(base));
        }
        self.next_desc = [0; 2];
        self.setup()
    }

    /// Descriptor table, avail ring and used ring of queue `q`, laid out as §2.7 says:
    /// the used ring 4-byte aligned after the avail ring's `used_event`.
    pub fn ring(&self, q: u16) -> (u64, u64, u64) {
        let desc = u64::from(q) * RING_SPAN;
        let avail = desc + 16 * u64::from(self.qsize);
        let used = (avail + 6 + 2 * u64::from(self.qsize)).next_multiple_of(4);
        (desc, avail, used)
    }

    /// Writes descriptor `idx` (modulo the queue size) of queue `q`'s table.
    pub fn write_desc(&self, q: u16, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let (table, _, _) = self.ring(q);
        let at = table + 16 * u64::from(idx % self.qsize);
        write_desc_at(&self.mem, at, addr, len, flags, next);
    }

    /// Puts `head` in queue `q`'s avail ring and publishes it.
    pub fn make_available(&self, q: u16, head: u16) {
        let (_, avail, _) = self.ring(q);
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap_or(0);
        let slot = avail + 4 + 2 * u64::from(idx % self.qsize);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        let _ = self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2));
    }

    /// Writes the avail ring's `idx` (q) or the request queue's `used_event`.
    pub fn write_ring_field(&self, q: u16, used_event: bool, v: u16) {
        let (_, avail, _) = self.ring(q);
        let at = if used_event { avail + 4 + 2 * u64::from(self.qsize) } else { avail + 2 };
        let _ = self.mem.write_obj(v, GuestAddress(at));
    }

    /// A chain of sequential descriptors (`NEXT` added) of queue `q`, made available.
    pub fn push_chain(&mut self, q: u16, bufs: &[(u64, u32, u16)]) {
        let head = self.next_desc[usize::from(q)];
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let idx = head.wrapping_add(i as u16) % self.qsize;
            let more = if i + 1 < bufs.len() { F_NEXT } else { 0 };
            self.write_desc(q, idx, addr, len, flags | more, (idx + 1) % self.qsize);
        }
        self.next_desc[usize::from(q)] = head.wrapping_add(bufs.len() as u16) % self.qsize;
        self.make_available(q, head % self.qsize);
    }

    /// A fresh request-buffer slot of `SLOT` bytes in the low region.
    pub fn slot(&mut self) -> u64 {
        self.next_slot = (self.next_slot + 1) % SLOTS;
        DATA + self.next_slot * SLOT
    }
}

/// Writes one 16-byte descriptor at guest address `at` (ignored outside guest memory).
pub fn write_desc_at(mem: &Mem, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    let _ = mem.write_slice(&raw, GuestAddress(at));
}

/// A guest address from input (one selector byte, then an offset): inside the low or high
/// region, at the end of the low region, in the hole, or anywhere (8 bytes).
pub fn place(inp: &mut Input) -> u64 {
    match inp.u8() % 5 {
        0 => u64::from(inp.u16()) % LOW,
        1 => HIGH_START + u64::from(inp.u16()) % HIGH,
        2 => LOW - u64::from(inp.u8()),
        3 => HIGH_START + HIGH - u64::from(inp.u8()),
        _ => inp.u64(),
    }
}
