//! One split virtqueue in guest memory, laid out as virtio 1.x §2.7 requires:
//!
//! | part            | alignment | size          |
//! |-----------------|-----------|---------------|
//! | descriptor table | 16       | 16 × size     |
//! | available ring  | 2         | 6 + 2 × size  | (flags, idx, ring[size], used_event)
//! | used ring       | 4         | 6 + 8 × size  | (flags, idx, ring[size] of (id, len), avail_event)
//!
//! Hand-written instead of virtio-queue's `MockSplitQueue`: its layout starts the used ring
//! `size` bytes after the available ring's entries instead of `2 × size + 2` bytes
//! (rust-vmm/vm-virtio#400), so used entries overwrite `used_event` and the upper available
//! entries.

use vm_memory::{Bytes, GuestAddress};

use super::Mem;

/// Where one queue's three parts sit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rings {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl Rings {
    /// The three parts back to back from `base` (which must be 16-byte aligned).
    pub fn at(base: u64, size: u16) -> Self {
        assert_eq!(base % 16, 0, "descriptor table alignment");
        let n = u64::from(size);
        let desc = base;
        let avail = (desc + 16 * n).next_multiple_of(2);
        let used = (avail + 6 + 2 * n).next_multiple_of(4);
        Self { size, desc, avail, used }
    }

    /// The guest-physical byte ranges `[start, end)` of the descriptor table, the available
    /// ring and the used ring.
    pub fn regions(&self) -> [(u64, u64); 3] {
        let n = u64::from(self.size);
        [
            (self.desc, self.desc + 16 * n),
            (self.avail, self.avail + 6 + 2 * n),
            (self.used, self.used + 6 + 8 * n),
        ]
    }

    /// One past the last byte of the used ring.
    pub fn end(&self) -> u64 {
        self.regions()[2].1
    }

    pub fn avail_idx_addr(&self) -> u64 {
        self.avail + 2
    }

    pub fn avail_entry_addr(&self, slot: u16) -> u64 {
        self.avail + 4 + 2 * u64::from(slot % self.size)
    }

    pub fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    pub fn used_idx_addr(&self) -> u64 {
        self.used + 2
    }

    pub fn used_entry_addr(&self, slot: u16) -> u64 {
        self.used + 4 + 8 * u64::from(slot % self.size)
    }

    pub fn desc_addr(&self, index: u16) -> u64 {
        self.desc + 16 * u64::from(index)
    }

    pub fn read_u16(mem: &Mem, addr: u64) -> u16 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    pub fn write_u16(mem: &Mem, addr: u64, v: u16) {
        mem.write_obj(v, GuestAddress(addr)).unwrap()
    }
}
