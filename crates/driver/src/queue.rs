//! A split virtqueue (virtio 1.2 §2.7), driver side, reusable by any virtio
//! device driver.
//!
//! - Many [`SplitQueue::add`]s, then one [`SplitQueue::kick_prepare`] and one
//!   notify: the batch costs one exit.
//! - With EVENT_IDX the notify decision uses the wrap-safe [`need_event`].
//! - Completions by polling ([`SplitQueue::pop_used`]) or by callback
//!   ([`SplitQueue::set_callback`] + [`SplitQueue::process_used`]).
//! - A full ring is reported as [`QueueError::Full`]; the owner kicks, reaps
//!   completions and retries (the IOMMU driver does exactly that).
//! - With VIRTIO_F_RING_INDIRECT_DESC, [`SplitQueue::enable_indirect`] makes
//!   every chain of 2 or more buffers take one ring descriptor, pointing to a
//!   table preallocated for that descriptor: no allocation per add.
//!
//! The device is told *bus addresses* of the three ring parts. By default these
//! are the physical addresses from [`Hal::dma_alloc`]; a driver behind an IOMMU
//! maps [`SplitQueue::region`] and hands IOVAs with [`SplitQueue::set_bus_addrs`]
//! (or [`SplitQueue::addrs_at`]) before calling `Transport::setup_queue`.
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! use std::sync::Arc;
//! use viommu_driver::fake::FakeMemory;
//! use viommu_driver::queue::{Buffer, SplitQueue};
//! let mem = FakeMemory::new(64);
//! let mut q = SplitQueue::new(Arc::new(mem.hal()), 0, 8, false).unwrap();
//! let head = q.add(&[Buffer::readable(0x1000, 16), Buffer::writable(0x2000, 4)]).unwrap();
//! assert_eq!(q.num_free(), 6);
//! assert!(q.kick_prepare()); // the device asked for nothing: notify
//! assert!(q.pop_used().is_none()); // nothing completed yet
//! # let _ = head; }
//! ```

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{fence, Ordering};

use crate::hal::{DmaBuffer, Hal, PAGE_SIZE};
use crate::transport::{QueueAddrs, Transport};

/// Descriptor flag: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (VIRTIO_F_RING_INDIRECT_DESC).
pub const DESC_F_INDIRECT: u16 = 4;
/// Avail-ring flag: the driver does not want interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// The largest queue size virtio allows for split rings.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// `vring_need_event`: should the driver notify, given the device's
/// `avail_event`, the new avail index and the index at the previous notify?
/// Wrap-safe: all arithmetic is modulo 2^16.
///
/// ```
/// use viommu_driver::queue::need_event;
/// assert!(need_event(5, 6, 5)); // the device waits for entry 5, we added it
/// assert!(!need_event(9, 6, 5)); // it waits for a later one
/// assert!(need_event(0xffff, 1, 0xfffe)); // across the wrap
/// ```
pub fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One buffer of a descriptor chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Bus address the device uses (physical address or IOVA).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes (true) or reads (false) it.
    pub device_writable: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Self { addr, len, device_writable: false }
    }
    /// A buffer the device writes.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Self { addr, len, device_writable: true }
    }
}

fn desc_flags(b: &Buffer, more: bool) -> u16 {
    let mut flags = if b.device_writable { DESC_F_WRITE } else { 0 };
    if more {
        flags |= DESC_F_NEXT;
    }
    flags
}

/// A completed chain: the token [`SplitQueue::add`] returned and the number of
/// bytes the device says it wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    /// The head descriptor index returned by `add`.
    pub token: u16,
    /// Bytes written by the device into the writable buffers.
    pub len: u32,
}

/// Why an add or a setup failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueError {
    /// Not enough free descriptors: kick, reap completions, retry.
    Full,
    /// A chain needs at least one buffer.
    Empty,
    /// The chain is longer than the queue.
    TooLong,
    /// The size is 0, not a power of two, or above [`MAX_QUEUE_SIZE`].
    BadSize(u16),
    /// `Hal::dma_alloc` failed.
    NoMemory,
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Full => f.write_str("virtqueue full"),
            Self::Empty => f.write_str("empty descriptor chain"),
            Self::TooLong => f.write_str("descriptor chain longer than the queue"),
            Self::BadSize(s) => write!(f, "bad queue size {s}"),
            Self::NoMemory => f.write_str("out of DMA memory for the virtqueue"),
        }
    }
}

impl core::error::Error for QueueError {}

/// Byte offsets of the three parts inside the queue's DMA region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueLayout {
    /// Descriptor table offset (always 0).
    pub desc: usize,
    /// Avail ring offset.
    pub avail: usize,
    /// Used ring offset (4-byte aligned).
    pub used: usize,
    /// Total bytes.
    pub size: usize,
}

impl QueueLayout {
    /// The layout for `size` entries.
    pub const fn new(size: u16) -> Self {
        let n = size as usize;
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Self { desc: 0, avail, used, size: used + 6 + 8 * n }
    }
}

/// Callback for completions, see [`SplitQueue::set_callback`].
pub type UsedCallback = Box<dyn FnMut(Used) + Send>;

/// A split virtqueue in DMA memory from `H`. Its memory is freed on drop:
/// the owner resets the device before dropping its queues.
pub struct SplitQueue<H: Hal> {
    hal: Arc<H>,
    region: DmaBuffer<Arc<H>>,
    layout: QueueLayout,
    index: u16,
    size: u16,
    bus: QueueAddrs,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    /// Shadow of each descriptor's `next`, so that freeing never trusts ring memory.
    next: Vec<u16>,
    /// Chain length per head; 0 when the head is not in flight.
    chain_len: Vec<u16>,
    avail_idx: u16,
    /// The avail index the device has been shown.
    published_idx: u16,
    kicked_idx: u16,
    /// Chains added since the last `kick_prepare`, saturating: past 2^16 the
    /// avail index has wrapped onto `kicked_idx` and `need_event` cannot tell.
    unkicked: u32,
    last_used: u16,
    /// The used index as last read: entries up to it are popped without
    /// reading it again.
    used_seen: u16,
    /// The last `used_event` written (EVENT_IDX), once one was.
    used_event: Option<u16>,
    bad_used: u64,
    callback: Option<UsedCallback>,
    indirect: Option<Indirect<H>>,
}

/// One indirect table per ring descriptor, in one DMA region.
struct Indirect<H: Hal> {
    region: DmaBuffer<Arc<H>>,
    /// Bus address of the region (its physical address unless replaced).
    bus: u64,
    /// Descriptors per table.
    max: u16,
}

impl<H: Hal> SplitQueue<H> {
    /// Allocates a queue of `size` entries (a power of two) for queue number
    /// `index`. `event_idx` says whether VIRTIO_F_EVENT_IDX was negotiated.
    /// The bus addresses start as the region's physical addresses.
    pub fn new(hal: Arc<H>, index: u16, size: u16, event_idx: bool) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(QueueError::BadSize(size));
        }
        let layout = QueueLayout::new(size);
        let pages = layout.size.div_ceil(PAGE_SIZE);
        let region = DmaBuffer::new(hal.clone(), pages).ok_or(QueueError::NoMemory)?;
        let bus = region.paddr();
        let next = (1..=size).map(|i| i % size).collect();
        let mut q = Self {
            hal,
            region,
            layout,
            index,
            size,
            bus: QueueAddrs { desc: 0, avail: 0, used: 0 },
            event_idx,
            free_head: 0,
            num_free: size,
            next,
            chain_len: vec![0; size as usize],
            avail_idx: 0,
            published_idx: 0,
            kicked_idx: 0,
            unkicked: 0,
            last_used: 0,
            used_seen: 0,
            used_event: None,
            bad_used: 0,
            callback: None,
            indirect: None,
        };
        q.bus = q.addrs_at(bus);
        Ok(q)
    }

    /// The queue number given to `new`.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The DMA region holding all three parts (to map it behind an IOMMU).
    pub fn region(&self) -> &DmaBuffer<Arc<H>> {
        &self.region
    }

    /// Offsets of the parts inside [`Self::region`].
    pub fn layout(&self) -> QueueLayout {
        self.layout
    }

    /// The ring addresses if the region were at bus address `base`.
    pub fn addrs_at(&self, base: u64) -> QueueAddrs {
        QueueAddrs {
            desc: base + self.layout.desc as u64,
            avail: base + self.layout.avail as u64,
            used: base + self.layout.used as u64,
        }
    }

    /// The bus addresses to give `Transport::setup_queue`.
    pub fn addrs(&self) -> QueueAddrs {
        self.bus
    }

    /// Replaces the bus addresses the device will use, e.g. with IOVAs that map
    /// [`Self::region`]. Call before `setup_queue`.
    pub fn set_bus_addrs(&mut self, addrs: QueueAddrs) {
        self.bus = addrs;
    }

    /// Preallocates one indirect table of `max_chain` descriptors per ring
    /// descriptor (call only if VIRTIO_F_RING_INDIRECT_DESC was negotiated).
    /// From then on, a chain of 2..=`max_chain` buffers takes one ring
    /// descriptor; longer chains are still added directly.
    pub fn enable_indirect(&mut self, max_chain: u16) -> Result<(), QueueError> {
        if max_chain < 2 || max_chain > self.size {
            return Err(QueueError::BadSize(max_chain));
        }
        if self.indirect.is_some() {
            return Ok(());
        }
        let bytes = self.size as usize * max_chain as usize * 16;
        let pages = bytes.div_ceil(PAGE_SIZE);
        let region = DmaBuffer::new(self.hal.clone(), pages).ok_or(QueueError::NoMemory)?;
        self.indirect = Some(Indirect { bus: region.paddr(), region, max: max_chain });
        Ok(())
    }

    /// The DMA region of the indirect tables, if enabled (to map it behind an IOMMU).
    pub fn indirect_region(&self) -> Option<&DmaBuffer<Arc<H>>> {
        self.indirect.as_ref().map(|i| &i.region)
    }

    /// Replaces the bus address the device uses for [`Self::indirect_region`].
    pub fn set_indirect_bus_addr(&mut self, base: u64) {
        if let Some(i) = self.indirect.as_mut() {
            i.bus = base;
        }
    }

    /// Tells the transport about this queue: size and bus addresses.
    pub fn setup<T: Transport + ?Sized>(&self, transport: &mut T) {
        transport.setup_queue(self.index, self.size, self.bus);
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Used entries the device returned with an unknown head (a device bug);
    /// they were skipped.
    pub fn bad_used(&self) -> u64 {
        self.bad_used
    }

    /// Asks the device not to interrupt (polling), or to interrupt again.
    pub fn set_interrupts(&mut self, enabled: bool) {
        let flags = if enabled { 0 } else { AVAIL_F_NO_INTERRUPT };
        self.write_u16(self.layout.avail, flags);
    }

    /// Adds one chain and makes it available, without notifying.
    /// Returns the token (head index) [`Self::pop_used`] will report.
    pub fn add(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        let head = self.add_unpublished(bufs)?;
        self.publish();
        Ok(head)
    }

    /// Adds one chain to the avail ring without publishing the ring index:
    /// the device sees it after the next [`Self::publish`] (or
    /// [`Self::kick_prepare`], which publishes first). Adding a batch this
    /// way writes the index, and fences, once per batch.
    #[inline(always)]
    pub fn add_unpublished(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        let n = bufs.len();
        if n == 0 {
            return Err(QueueError::Empty);
        }
        if n > self.size as usize {
            return Err(QueueError::TooLong);
        }
        if let Some(max) = self.indirect.as_ref().map(|i| i.max as usize) {
            if (2..=max).contains(&n) {
                return self.add_indirect(bufs);
            }
        }
        if n > self.num_free as usize {
            return Err(QueueError::Full);
        }
        let head = self.free_head;
        let mut idx = head;
        for (i, b) in bufs.iter().enumerate() {
            let last = i + 1 == n;
            let next = self.next[idx as usize];
            let flags = desc_flags(b, !last);
            let at = self.desc_at(idx);
            write_desc(&mut self.region, at, b.addr, b.len, flags, if last { 0 } else { next });
            if !last {
                idx = next;
            } else {
                self.free_head = next;
            }
        }
        self.num_free -= n as u16;
        self.chain_len[head as usize] = n as u16;
        self.push_avail(head);
        Ok(head)
    }

    /// Writes the chain into the table of the next free descriptor and adds
    /// that one descriptor.
    #[inline(always)]
    fn add_indirect(&mut self, bufs: &[Buffer]) -> Result<u16, QueueError> {
        let Some(ind) = self.indirect.as_mut() else { return Err(QueueError::TooLong) };
        if self.num_free == 0 {
            return Err(QueueError::Full);
        }
        let head = self.free_head;
        let table = head as usize * ind.max as usize * 16;
        let bus = ind.bus + table as u64;
        for (i, b) in bufs.iter().enumerate() {
            let more = i + 1 < bufs.len();
            let next = if more { i as u16 + 1 } else { 0 };
            write_desc(&mut ind.region, table + 16 * i, b.addr, b.len, desc_flags(b, more), next);
        }
        let at = self.desc_at(head);
        write_desc(&mut self.region, at, bus, 16 * bufs.len() as u32, DESC_F_INDIRECT, 0);
        self.free_head = self.next[head as usize];
        self.num_free -= 1;
        self.chain_len[head as usize] = 1;
        self.push_avail(head);
        Ok(head)
    }

    /// Offset of descriptor `idx` in the region.
    fn desc_at(&self, idx: u16) -> usize {
        self.layout.desc + 16 * idx as usize
    }

    /// Puts `head` in the avail ring, not yet published.
    fn push_avail(&mut self, head: u16) {
        // The size is a power of two (checked in `new`): a mask, not a division.
        let slot = self.avail_idx & (self.size - 1);
        self.write_u16(self.layout.avail + 4 + 2 * slot as usize, head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.unkicked = self.unkicked.saturating_add(1);
    }

    /// Publishes the chains added so far: writes the avail index.
    pub fn publish(&mut self) {
        if self.published_idx == self.avail_idx {
            return;
        }
        // The ring entries must be visible before the index that publishes them.
        fence(Ordering::Release);
        self.write_u16(self.layout.avail + 2, self.avail_idx);
        self.published_idx = self.avail_idx;
    }

    /// Chains added since the last `kick_prepare` (at most `u16::MAX`).
    pub fn pending(&self) -> u16 {
        self.unkicked.min(u16::MAX as u32) as u16
    }

    /// Decides whether the chains added since the last call need a notify,
    /// and marks them as notified. Call once after a batch of adds; notify
    /// (outside any lock, if you like) when it returns true.
    pub fn kick_prepare(&mut self) -> bool {
        self.publish();
        // Our avail index must be visible before we read the device's state.
        fence(Ordering::SeqCst);
        let old = self.kicked_idx;
        let new = self.avail_idx;
        let added = core::mem::take(&mut self.unkicked);
        self.kicked_idx = new;
        if added == 0 {
            return false;
        }
        if added > u16::MAX as u32 {
            // The index went all the way round (a device that polls while
            // busy took them without a notify): the window is ambiguous, so
            // notify, as Linux does before 2^16 adds go unkicked.
            return true;
        }
        if self.event_idx {
            let avail_event = self.read_u16(self.layout.used + 4 + 8 * self.size as usize);
            need_event(avail_event, new, old)
        } else {
            self.read_u16(self.layout.used) & USED_F_NO_NOTIFY == 0
        }
    }

    /// `kick_prepare` and notify in one call. Returns whether it notified.
    pub fn kick<T: Transport + ?Sized>(&mut self, transport: &mut T) -> bool {
        let need = self.kick_prepare();
        if need {
            transport.notify(self.index);
        }
        need
    }

    /// Whether the device has returned a chain we have not popped.
    ///
    /// It does not arm the interrupt: with EVENT_IDX, a thread that means to
    /// block for an interrupt must first see [`Self::pop_used`] return `None`
    /// (that writes `used_event`), not only `can_pop` return false.
    pub fn can_pop(&self) -> bool {
        fence(Ordering::Acquire);
        self.read_u16(self.layout.used + 2) != self.last_used
    }

    /// Pops one completed chain, freeing its descriptors.
    ///
    /// With EVENT_IDX, `used_event` is written when the ring is found empty
    /// (not once per entry), followed by a fence and a last look at the used
    /// index: an entry the device adds after that look sees the new
    /// `used_event` and raises an interrupt, so a thread that blocks after
    /// `None` misses nothing.
    pub fn pop_used(&mut self) -> Option<Used> {
        loop {
            if self.used_seen == self.last_used && !self.refresh_used() {
                return None;
            }
            let slot = (self.last_used & (self.size - 1)) as usize;
            let id = self.read_u32(self.layout.used + 4 + 8 * slot);
            let len = self.read_u32(self.layout.used + 8 + 8 * slot);
            self.last_used = self.last_used.wrapping_add(1);
            let Some(token) = u16::try_from(id).ok().filter(|&t| t < self.size) else {
                self.bad_used += 1;
                continue;
            };
            let n = self.chain_len[token as usize];
            if n == 0 {
                self.bad_used += 1;
                continue;
            }
            self.free_chain(token, n);
            return Some(Used { token, len });
        }
    }

    /// Reads the used index; false when nothing new is there (after
    /// updating `used_event`, see [`Self::pop_used`]).
    fn refresh_used(&mut self) -> bool {
        self.used_seen = self.read_u16(self.layout.used + 2);
        if self.used_seen == self.last_used
            && self.event_idx
            && self.used_event != Some(self.last_used)
        {
            // used_event: interrupt us when the device passes this index.
            self.write_u16(self.layout.avail + 4 + 2 * self.size as usize, self.last_used);
            self.used_event = Some(self.last_used);
            // Before the last look at the used index: otherwise an entry the
            // device adds meanwhile may see the old used_event and raise no
            // interrupt, and a thread blocked waiting misses it.
            fence(Ordering::SeqCst);
            self.used_seen = self.read_u16(self.layout.used + 2);
        }
        if self.used_seen == self.last_used {
            return false;
        }
        // Read the entries only after seeing the index that published them.
        fence(Ordering::Acquire);
        true
    }

    #[inline]
    fn free_chain(&mut self, head: u16, n: u16) {
        self.chain_len[head as usize] = 0;
        let mut last = head;
        for _ in 1..n {
            last = self.next[last as usize];
        }
        self.next[last as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
    }

    /// Sets the completion callback used by [`Self::process_used`].
    pub fn set_callback(&mut self, callback: Option<UsedCallback>) {
        self.callback = callback;
    }

    /// Pops every completed chain and hands it to the callback (e.g. from an
    /// interrupt handler). Returns how many were popped; without a callback
    /// nothing is popped.
    pub fn process_used(&mut self) -> usize {
        let Some(mut cb) = self.callback.take() else { return 0 };
        let mut n = 0;
        while let Some(u) = self.pop_used() {
            cb(u);
            n += 1;
        }
        self.callback = Some(cb);
        n
    }

    fn write_u16(&mut self, off: usize, v: u16) {
        self.region.write_u16(off, v);
    }

    fn read_u16(&self, off: usize) -> u16 {
        self.region.read_u16(off)
    }

    fn read_u32(&self, off: usize) -> u32 {
        self.region.read_u32(off)
    }
}

/// Writes one descriptor at offset `at` of a ring or indirect table. The
/// device reads it only once published, and not after it returned the
/// chain, which is ours until reused.
#[inline(always)]
fn write_desc<H: Hal>(
    mem: &mut DmaBuffer<H>,
    at: usize,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    mem.write_u64(at, addr);
    mem.write_u64(at + 8, len as u64 | (flags as u64) << 32 | (next as u64) << 48);
}

impl<H: Hal> fmt::Debug for SplitQueue<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitQueue")
            .field("index", &self.index)
            .field("size", &self.size)
            .field("num_free", &self.num_free)
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_is_wrap_safe() {
        // Exhaustive over a window around the wrap: notify iff event in [old, new).
        for old in [0u16, 100, 0xfff0, 0xffff] {
            for added in 0u16..40 {
                let new = old.wrapping_add(added);
                for d in 0u16..50 {
                    let event = old.wrapping_add(d).wrapping_sub(5);
                    let in_window = event.wrapping_sub(old) < added;
                    assert_eq!(need_event(event, new, old), in_window, "{event} {new} {old}");
                }
            }
        }
    }
}

#[cfg(all(test, feature = "test-utils"))]
mod ring_tests {
    use super::*;
    use crate::fake::FakeMemory;

    /// Plays the device: returns `head` in the used ring and bumps its index.
    fn complete(q: &mut SplitQueue<crate::fake::FakeHal>, head: u16) {
        let used = q.layout().used;
        let idx = q.read_u16(used + 2);
        let slot = (idx % q.size()) as usize;
        q.region.write_u32(used + 4 + 8 * slot, head as u32);
        q.region.write_u32(used + 8 + 8 * slot, 4);
        q.write_u16(used + 2, idx.wrapping_add(1));
    }

    /// Batched adds are invisible until published; `used_event` is written
    /// when the ring is found empty, to the index of the next entry, and
    /// not while entries remain to pop.
    #[test]
    fn publish_once_and_used_event_when_empty() {
        let mem = FakeMemory::new(64);
        let mut q = SplitQueue::new(Arc::new(mem.hal()), 0, 8, true).expect("queue");
        let avail_idx = |q: &SplitQueue<_>| q.read_u16(q.layout().avail + 2);
        let used_event = |q: &SplitQueue<_>| q.read_u16(q.layout().avail + 4 + 2 * 8);
        let a = q.add_unpublished(&[Buffer::readable(0x1000, 16)]).expect("add");
        let b = q.add_unpublished(&[Buffer::readable(0x2000, 16)]).expect("add");
        assert_eq!((avail_idx(&q), q.pending()), (0, 2), "not published yet");
        q.publish();
        assert_eq!(avail_idx(&q), 2);
        assert!(q.kick_prepare());
        complete(&mut q, a);
        complete(&mut q, b);
        assert_eq!(q.pop_used().map(|u| u.token), Some(a));
        assert_eq!(used_event(&q), 0, "entries remain: not written yet");
        assert_eq!(q.pop_used().map(|u| u.token), Some(b));
        assert_eq!(q.pop_used(), None);
        assert_eq!(used_event(&q), 2, "empty: interrupt at the next entry");
        // An entry that arrives after that is seen by the next pop.
        let c = q.add(&[Buffer::readable(0x3000, 16)]).expect("add");
        complete(&mut q, c);
        assert_eq!(q.pop_used().map(|u| u.token), Some(c));
        assert_eq!(q.pop_used(), None);
        assert_eq!(used_event(&q), 3);
        assert_eq!(q.num_free(), 8);
    }

    /// A device that keeps working without notifications (it polls while
    /// busy) consumes 2^16 - 1 chains, then waits for the next one: the
    /// driver, which called `kick_prepare` only before all that, must
    /// notify for the one it adds now, although the avail index came back
    /// to the value it had at that last call.
    #[test]
    fn notify_after_a_full_index_wrap_without_kicks() {
        let mem = FakeMemory::new(64);
        let mut q = SplitQueue::new(Arc::new(mem.hal()), 0, 8, true).expect("queue");
        let avail_event_off = q.layout().used + 4 + 8 * 8;
        assert!(!q.kick_prepare(), "nothing added");
        for i in 0..u16::MAX {
            let head = q.add(&[Buffer::readable(0x1000, 16)]).expect("add");
            // The device takes it at once and waits for the next entry.
            complete(&mut q, head);
            q.write_u16(avail_event_off, i.wrapping_add(1));
            assert!(q.pop_used().is_some());
        }
        // The device now waits for entry 0xffff, not yet published.
        assert_eq!(q.read_u16(avail_event_off), u16::MAX);
        q.add(&[Buffer::readable(0x1000, 16)]).expect("add");
        assert!(q.kick_prepare(), "the device waits for this entry: notify");
    }
}
