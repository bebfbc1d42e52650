//! The virtio-iommu device driver (virtio 1.2 §5.13).
//!
//! Reads top to bottom: public types; request plumbing (request buffers, the
//! request queue, submit / kick / wait); device initialisation; endpoints and
//! PROBE; domains, attach and detach; the IOMMU operations on a [`Domain`];
//! the fault event queue.
//!
//! # Locks
//! - `endpoints` (one per IOMMU): endpoint → domain table. Held across attach
//!   and detach, which are rare, so that two attaches of one endpoint cannot
//!   interleave.
//! - `Domain::state` (one per domain): the endpoint set **and** the mapping
//!   tree. A MAP is queued under it, so an attach's replay and a concurrent
//!   map can neither miss nor double a mapping; a DETACH is queued and
//!   completed under it, so no MAP slips in behind the last DETACH.
//! - `req` (one per IOMMU): the request virtqueue and its buffers. Held only to
//!   add requests or reap completions, never across a notify or a wait.
//! - `transport`: taken alone, for a notify or a register access. Never held
//!   across a wait when the transport gives a [`UsedWaiter`]: waiting threads
//!   block on it with no lock held, so a kick never queues behind a wait.
//!   (Without one, a waiting thread only *tries* the lock to call
//!   `wait_for_used`, and yields when it is busy.)
//!
//! Order: endpoints → domain state → req; transport is never taken with req
//! held. A sync waits for its own tickets: it kicks, then reaps completions
//! (whoever reaps records every reply by ticket) until its tickets are done,
//! so no thread holds a lock while another thread's sync waits on the device.
//! Only attach/detach wait under a domain lock, because correctness needs it.
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! # mod device { include!("../tests/common/device.rs"); }
//! use viommu_driver::{DriverOptions, Prot, VirtioIommu};
//! // The fake transport around the device crate's model.
//! let fake = device::FakeDevice::default();
//! let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default()).unwrap();
//! let domain = iommu.alloc_paging(1).unwrap();
//! iommu.attach(&domain, 1).unwrap();
//! domain.map_pages(0x10_0000, 0x8000_0000, 0x2000, Prot::READ | Prot::WRITE).unwrap();
//! domain.iotlb_sync_map(0x10_0000, 0x2000).unwrap(); // one kick, one sync
//! assert_eq!(domain.iova_to_phys(0x10_1234), Some(0x8000_1234));
//! assert_eq!(domain.unmap_pages(0x10_0000, 0x2000).unwrap(), 0x2000);
//! domain.iotlb_sync().unwrap();
//! assert_eq!(iommu.counters().map, 1);
//! # }
//! ```

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::{Arc, Weak};
use alloc::vec;
use alloc::vec::Vec;
use core::ops::BitOr;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use core::time::Duration;

use smallvec::SmallVec;
use viommu_proto::{
    features as f, AttachBody, Config, DetachBody, FaultEvent, MapBody, ProbeBody, Property,
    PropertyIter, Request, RequestType, ResvMem, Status, UnmapBody, ATTACH_F_BYPASS, EVENT_QUEUE,
    MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE, REQUEST_QUEUE,
};
use zerocopy::little_endian::{U32, U64};
use zerocopy::FromBytes;

use crate::hal::{DmaRegion, Hal, PAGE_SIZE};
use crate::queue::{Buffer, QueueError, SplitQueue};
use crate::sync::{relax, Mutex, MutexGuard, Waiter};
use crate::transport::{status, Transport, UsedWaiter};
use crate::tree::MapTree;
use crate::{Error, Result};

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// Choices made at initialisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverOptions {
    /// Value written to `bypass` under BYPASS_CONFIG: false blocks
    /// unattached endpoints.
    pub bypass: bool,
    /// Negotiate VIRTIO_F_EVENT_IDX when offered.
    pub event_idx: bool,
    /// Negotiate VIRTIO_F_RING_INDIRECT_DESC when offered: each request then
    /// takes one ring descriptor (its two buffers sit in a table
    /// preallocated per descriptor), so a ring of N entries holds N requests
    /// instead of N/2.
    pub indirect_desc: bool,
    /// Largest request-queue size to use (rounded down to a power of two).
    pub request_queue_size: u16,
    /// Number of event buffers to post (rounded down to a power of two).
    pub event_buffers: u16,
    /// Software MSI window `(start, end)` added to every endpoint's reserved
    /// regions when the device reports no MSI region. `None` adds nothing.
    pub sw_msi: Option<(u64, u64)>,
    /// Guest page size: the granule may not exceed it.
    pub guest_page_size: u64,
    /// Polls of the used ring before a wait gives up with [`Error::Timeout`].
    /// The `no_std` bound (default 100 million); with `std` the default is
    /// `u64::MAX` and [`Self::timeout`] bounds the wait instead.
    pub spin_limit: u64,
    /// With `std`: wall-clock bound of one wait for the device (default 5 s),
    /// after which it gives [`Error::Timeout`]. `None` waits without a time
    /// bound. Ignored without `std` (no clock): only `spin_limit` applies.
    ///
    /// A request that timed out keeps its ring slot and buffers until the
    /// device returns it, since the device may still write them.
    pub timeout: Option<Duration>,
    /// Largest `probe_size` accepted, to bound the PROBE buffer.
    pub max_probe_size: u32,
    /// Most event buffers one [`VirtioIommu::poll_events`] call takes from
    /// the device (default 64; 0 counts as 1), so that a device that keeps
    /// returning events cannot hold the caller. What is left waits for the
    /// next call.
    pub event_budget: u32,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            bypass: false,
            event_idx: true,
            indirect_desc: true,
            request_queue_size: 256,
            event_buffers: 16,
            sw_msi: Some((0x0800_0000, 0x080f_ffff)),
            guest_page_size: PAGE_SIZE as u64,
            spin_limit: if cfg!(feature = "std") { u64::MAX } else { 100_000_000 },
            timeout: Some(Duration::from_secs(5)),
            max_probe_size: 64 * 1024,
            event_budget: 64,
        }
    }
}

/// What the device offered and the driver took, with the config it read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Negotiated feature bits.
    pub features: u64,
    /// Page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    /// Valid IOVAs, inclusive (everything without INPUT_RANGE).
    pub input_range: (u64, u64),
    /// Valid domain IDs, inclusive (all of u32 without DOMAIN_RANGE).
    pub domain_range: (u32, u32),
    /// Size of PROBE properties (0 without PROBE).
    pub probe_size: u32,
    /// Queue sizes in use: request queue, event queue.
    pub queue_sizes: (u16, u16),
}

impl DeviceInfo {
    /// Whether feature bit `bit` was negotiated.
    pub fn has(&self, bit: u32) -> bool {
        self.features & f::bit(bit) != 0
    }

    /// The IOMMU granule (lowest bit of page_size_mask).
    pub fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }
}

/// Access rights of a mapping (MAP flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Prot(pub u32);

impl Prot {
    /// The device may read.
    pub const READ: Prot = Prot(MAP_F_READ);
    /// The device may write.
    pub const WRITE: Prot = Prot(MAP_F_WRITE);
    /// The range is MMIO (needs the MMIO feature).
    pub const MMIO: Prot = Prot(MAP_F_MMIO);
}

impl BitOr for Prot {
    type Output = Prot;
    fn bitor(self, rhs: Prot) -> Prot {
        Prot(self.0 | rhs.0)
    }
}

/// Kind of a reserved region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResvKind {
    /// No access (RESV_MEM RESERVED, and any unknown subtype).
    Reserved,
    /// The hardware MSI doorbell: bypasses translation (RESV_MEM MSI).
    Msi,
    /// The software MSI window the driver added: IOVAs kept free for MSI doorbell mappings.
    SwMsi,
    /// Must be identity-mapped in every paging domain (e.g. from firmware);
    /// given with [`VirtioIommu::add_reserved_region`].
    Direct,
}

/// A reserved IOVA region of an endpoint. `end` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvRegion {
    /// First address.
    pub start: u64,
    /// Last address, inclusive.
    pub end: u64,
    /// What it is.
    pub kind: ResvKind,
}

/// A fault the device reported on the event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// `viommu_proto::fault::R_*`.
    pub reason: u8,
    /// `viommu_proto::fault::F_*`.
    pub flags: u32,
    /// The endpoint that faulted.
    pub endpoint: u32,
    /// The faulting address, when the device gave one.
    pub address: Option<u64>,
}

/// Handler for fault records, see [`VirtioIommu::set_fault_handler`].
pub type FaultHandler = Box<dyn FnMut(FaultRecord) + Send>;

/// One mapping of a domain. `last` is inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First IOVA.
    pub iova: u64,
    /// Last IOVA, inclusive.
    pub last: u64,
    /// Physical address of `iova`.
    pub paddr: u64,
    /// Rights.
    pub prot: Prot,
}

/// What a domain translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DomainKind {
    /// Mappings made with `map_pages`.
    Paging,
    /// Identity: ATTACH with F_BYPASS (`bypass = true`) or 1:1 maps of the
    /// aperture minus the reserved regions.
    Identity {
        /// Whether the device does it (BYPASS_CONFIG).
        bypass: bool,
    },
    /// No mappings: attached endpoints can do no DMA.
    Blocking,
}

/// Why a DMA-layer flush ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushCause {
    /// A flush queue was full.
    Full,
    /// The oldest entry of a flush queue timed out.
    Timeout,
    /// Someone asked (policy switch, explicit flush, IOVA shortage).
    Explicit,
}

/// Number of buckets of the batch-size histogram: bucket `i` counts kicks
/// that carried `2^i ..= 2^(i+1)-1` requests; the last is open-ended.
pub const BATCH_BUCKETS: usize = 10;

#[derive(Default)]
pub(crate) struct Counters {
    requests: [AtomicU64; 5],
    kicks: AtomicU64,
    kicks_suppressed: AtomicU64,
    event_kicks: AtomicU64,
    syncs: AtomicU64,
    sync_errors: AtomicU64,
    timeouts: AtomicU64,
    batch: [AtomicU64; BATCH_BUCKETS],
    flushes: [AtomicU64; 3],
    faults: AtomicU64,
    faults_unhandled: AtomicU64,
    bad_events: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    pub(crate) fn flush(&self, cause: FlushCause) {
        bump(&self.flushes[cause as usize]);
    }

    pub(crate) fn sync_error(&self) {
        bump(&self.sync_errors);
    }

    fn kick(&self, batch: u64) {
        bump(&self.kicks);
        let bucket = (63 - batch.max(1).leading_zeros() as usize).min(BATCH_BUCKETS - 1);
        bump(&self.batch[bucket]);
    }

    fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            attach: g(&self.requests[0]),
            detach: g(&self.requests[1]),
            map: g(&self.requests[2]),
            unmap: g(&self.requests[3]),
            probe: g(&self.requests[4]),
            kicks: g(&self.kicks),
            kicks_suppressed: g(&self.kicks_suppressed),
            event_kicks: g(&self.event_kicks),
            syncs: g(&self.syncs),
            sync_errors: g(&self.sync_errors),
            timeouts: g(&self.timeouts),
            batch_sizes: core::array::from_fn(|i| g(&self.batch[i])),
            flushes_full: g(&self.flushes[0]),
            flushes_timeout: g(&self.flushes[1]),
            flushes_explicit: g(&self.flushes[2]),
            faults: g(&self.faults),
            faults_unhandled: g(&self.faults_unhandled),
            bad_events: g(&self.bad_events),
        }
    }
}

/// A copy of the driver's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// ATTACH requests sent.
    pub attach: u64,
    /// DETACH requests sent.
    pub detach: u64,
    /// MAP requests sent.
    pub map: u64,
    /// UNMAP requests sent.
    pub unmap: u64,
    /// PROBE requests sent.
    pub probe: u64,
    /// Request-queue notifications.
    pub kicks: u64,
    /// Batches of new requests that needed no notification: with EVENT_IDX,
    /// the device had not yet caught up with the ring, and looks again
    /// before it stops. How often that happens depends on the device's
    /// progress, but `kicks + kicks_suppressed` does not: it counts every
    /// batch the driver made available.
    pub kicks_suppressed: u64,
    /// Event-queue notifications.
    pub event_kicks: u64,
    /// Syncs (waits for request completion).
    pub syncs: u64,
    /// Syncs that returned a failed request.
    pub sync_errors: u64,
    /// Waits for the device that gave up with [`Error::Timeout`].
    pub timeouts: u64,
    /// Requests per kick, see [`BATCH_BUCKETS`].
    pub batch_sizes: [u64; BATCH_BUCKETS],
    /// DMA-layer flushes because a queue was full.
    pub flushes_full: u64,
    /// DMA-layer flushes because an entry timed out.
    pub flushes_timeout: u64,
    /// DMA-layer flushes asked for explicitly.
    pub flushes_explicit: u64,
    /// Fault records received.
    pub faults: u64,
    /// Fault records received with no handler registered.
    pub faults_unhandled: u64,
    /// Event buffers returned too short to hold a fault record.
    pub bad_events: u64,
}

impl CounterSnapshot {
    /// All requests.
    pub fn requests(&self) -> u64 {
        self.attach + self.detach + self.map + self.unmap + self.probe
    }

    /// The counts since `earlier`.
    pub fn since(&self, earlier: &CounterSnapshot) -> CounterSnapshot {
        CounterSnapshot {
            attach: self.attach - earlier.attach,
            detach: self.detach - earlier.detach,
            map: self.map - earlier.map,
            unmap: self.unmap - earlier.unmap,
            probe: self.probe - earlier.probe,
            kicks: self.kicks - earlier.kicks,
            kicks_suppressed: self.kicks_suppressed - earlier.kicks_suppressed,
            event_kicks: self.event_kicks - earlier.event_kicks,
            syncs: self.syncs - earlier.syncs,
            sync_errors: self.sync_errors - earlier.sync_errors,
            timeouts: self.timeouts - earlier.timeouts,
            batch_sizes: core::array::from_fn(|i| self.batch_sizes[i] - earlier.batch_sizes[i]),
            flushes_full: self.flushes_full - earlier.flushes_full,
            flushes_timeout: self.flushes_timeout - earlier.flushes_timeout,
            flushes_explicit: self.flushes_explicit - earlier.flushes_explicit,
            faults: self.faults - earlier.faults,
            faults_unhandled: self.faults_unhandled - earlier.faults_unhandled,
            bad_events: self.bad_events - earlier.bad_events,
        }
    }
}

// ---------------------------------------------------------------------------
// Request plumbing
// ---------------------------------------------------------------------------

/// Request buffers are 64-byte slots: head + body (at most 36 bytes) at 0,
/// the device-writable tail at `TAIL_OFF`.
const SLOT_SIZE: usize = 64;
const TAIL_OFF: usize = 48;
const TAIL_LEN: usize = 4;

fn dma_write(region: &DmaRegion, off: usize, bytes: &[u8]) {
    assert!(off + bytes.len() <= region.pages * PAGE_SIZE);
    // SAFETY: in bounds (checked above) of a region the HAL keeps valid until
    // we free it; the device reads it only after the ring publishes it.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), region.vaddr.as_ptr().add(off), bytes.len())
    }
}

fn dma_read(region: &DmaRegion, off: usize, out: &mut [u8]) {
    assert!(off + out.len() <= region.pages * PAGE_SIZE);
    // SAFETY: in bounds (checked above); the device finished writing before it
    // returned the chain, and pop_used fenced after seeing it.
    unsafe {
        core::ptr::copy_nonoverlapping(region.vaddr.as_ptr().add(off), out.as_mut_ptr(), out.len())
    }
}

/// Requests queued in one go, each encoded straight into its ring slot:
/// MAPs and UNMAPs need no [`Request`] built first.
pub(crate) enum Reqs<'a> {
    /// Any requests.
    Any(&'a [Request]),
    /// MAPs of domain `.0`.
    Maps(u32, &'a [Mapping]),
    /// UNMAPs of domain `.0`, by `(first, last)` IOVA.
    Unmaps(u32, &'a [(u64, u64)]),
}

impl Reqs<'_> {
    fn len(&self) -> usize {
        match self {
            Self::Any(r) => r.len(),
            Self::Maps(_, m) => m.len(),
            Self::Unmaps(_, r) => r.len(),
        }
    }

    fn request_type(&self, i: usize) -> RequestType {
        match self {
            Self::Any(r) => r[i].request_type(),
            Self::Maps(..) => RequestType::Map,
            Self::Unmaps(..) => RequestType::Unmap,
        }
    }

    /// Bytes request `i` takes (head + body).
    fn encoded_len(&self, i: usize) -> usize {
        match self {
            Self::Any(r) => size_of::<viommu_proto::ReqHead>() + r[i].body_bytes().len(),
            Self::Maps(..) => MAP_LEN,
            Self::Unmaps(..) => UNMAP_LEN,
        }
    }

    /// Writes request `i` (head + body) at `p`.
    ///
    /// # Safety
    /// `p` must be valid for writes of [`Self::encoded_len`] bytes.
    unsafe fn encode(&self, i: usize, p: *mut u8) {
        // SAFETY: the caller gives room for the request; all writes are unaligned.
        unsafe {
            let put32 = |off: usize, v: u32| p.add(off).cast::<u32>().write_unaligned(v.to_le());
            let put64 = |off: usize, v: u64| p.add(off).cast::<u64>().write_unaligned(v.to_le());
            match self {
                Self::Any(r) => {
                    let body = r[i].body_bytes();
                    put32(0, r[i].request_type() as u32);
                    core::ptr::copy_nonoverlapping(body.as_ptr(), p.add(4), body.len());
                }
                Self::Maps(domain, maps) => {
                    // Layout of virtio_iommu_req_map: head, domain, virt_start,
                    // virt_end, phys_start, flags.
                    let m = &maps[i];
                    put32(0, RequestType::Map as u32);
                    put32(4, *domain);
                    put64(8, m.iova);
                    put64(16, m.last);
                    put64(24, m.paddr);
                    put32(32, m.prot.0);
                }
                Self::Unmaps(domain, ranges) => {
                    // virtio_iommu_req_unmap: head, domain, virt_start, virt_end, reserved.
                    let (first, last) = ranges[i];
                    put32(0, RequestType::Unmap as u32);
                    put32(4, *domain);
                    put64(8, first);
                    put64(16, last);
                    put32(24, 0);
                }
            }
        }
    }
}

/// Head + body of a MAP and of an UNMAP.
const MAP_LEN: usize = 4 + size_of::<MapBody>();
const UNMAP_LEN: usize = 4 + size_of::<UnmapBody>();

/// `Inflight::slot` of a request with a buffer of its own (PROBE).
const OWN_BUF: u16 = u16::MAX;

struct Inflight {
    seq: u64,
    request: RequestType,
    /// Its request slot, or [`OWN_BUF`].
    slot: u16,
}

/// The buffer of a request too big for a slot (PROBE), while in flight.
struct OwnBuf {
    head: u16,
    region: DmaRegion,
    readable: usize,
    props: usize,
}

/// The device's answer to one request.
pub(crate) struct Reply {
    pub(crate) result: Result<()>,
    pub(crate) props: Vec<u8>,
}

/// The replies of a list of tickets, by position in that list. Plain
/// successes take no room: only failures and PROBE properties are kept.
#[derive(Default)]
pub(crate) struct Replies {
    len: usize,
    /// Replies that are not a plain success, by ascending position.
    others: Vec<(usize, Reply)>,
}

impl Replies {
    /// Replies in order, one per ticket.
    #[cfg(test)]
    pub(crate) fn from_vec(replies: Vec<Reply>) -> Self {
        let len = replies.len();
        Self { len, others: replies.into_iter().enumerate().collect() }
    }

    /// Number of replies.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn other(&self, i: usize) -> Option<&Reply> {
        self.others.binary_search_by_key(&i, |r| r.0).ok().map(|k| &self.others[k].1)
    }

    /// The result of the `i`th ticket's request.
    pub(crate) fn result(&self, i: usize) -> Result<()> {
        match self.other(i) {
            Some(r) => r.result.clone(),
            None => Ok(()),
        }
    }

    /// Whether every request succeeded.
    pub(crate) fn all_ok(&self) -> bool {
        self.others.iter().all(|(_, r)| r.result.is_ok())
    }

    /// The first error among the replies at positions `from..`.
    pub(crate) fn error_from(&self, from: usize) -> Option<Error> {
        self.others.iter().filter(|(i, _)| *i >= from).find_map(|(_, r)| r.result.clone().err())
    }

    /// Takes the PROBE properties of the `i`th reply.
    pub(crate) fn take_props(&mut self, i: usize) -> Vec<u8> {
        match self.others.binary_search_by_key(&i, |r| r.0) {
            Ok(k) => core::mem::take(&mut self.others[k].1.props),
            Err(_) => Vec::new(),
        }
    }
}

/// Tickets as sorted, disjoint half-open ranges. Requests complete mostly
/// in ticket order, so a whole batch of successes is one range.
#[derive(Default)]
struct SeqSet(Vec<(u64, u64)>);

impl SeqSet {
    #[inline]
    fn insert(&mut self, s: u64) {
        match self.0.last_mut() {
            Some(r) if r.1 == s => r.1 += 1,
            _ => self.insert_slow(s),
        }
    }

    #[cold]
    fn insert_slow(&mut self, s: u64) {
        match self.0.last() {
            Some(r) if r.1 < s => return self.0.push((s, s + 1)),
            None => return self.0.push((s, s + 1)),
            _ => {}
        }
        // Out of order: the first range that ends at or after `s`.
        let i = self.0.partition_point(|r| r.1 < s);
        let r = self.0[i];
        if r.1 == s {
            self.0[i].1 += 1;
            if self.0.get(i + 1).is_some_and(|n| n.0 == s + 1) {
                self.0[i].1 = self.0[i + 1].1;
                self.0.remove(i + 1);
            }
        } else if r.0 == s + 1 {
            self.0[i].0 = s;
        } else if r.0 > s {
            self.0.insert(i, (s, s + 1));
        }
    }

    /// The end of the range that holds `s`, if one does.
    fn end_of(&self, s: u64) -> Option<u64> {
        let i = self.0.partition_point(|r| r.1 <= s);
        self.0.get(i).filter(|r| r.0 <= s).map(|r| r.1)
    }

    /// Removes `[start, end)`, which lies inside one range.
    fn remove(&mut self, start: u64, end: u64) {
        let i = self.0.partition_point(|r| r.1 <= start);
        let Some(&(s, e)) = self.0.get(i).filter(|r| r.0 <= start && end <= r.1) else { return };
        match (s == start, e == end) {
            (true, true) => {
                self.0.remove(i);
            }
            (true, false) => self.0[i].0 = end,
            (false, true) => self.0[i].1 = start,
            (false, false) => {
                self.0[i].1 = start;
                self.0.insert(i + 1, (end, e));
            }
        }
    }

    /// Length of the run of consecutive tickets at the start of `seqs`
    /// that lie in one range (0 if `seqs[0]` is not in the set).
    fn run_len(&self, seqs: &[u64]) -> usize {
        let Some(&first) = seqs.first() else { return 0 };
        let Some(end) = self.end_of(first) else { return 0 };
        let max = (end - first) as usize;
        let mut n = 1;
        while n < seqs.len() && n < max && seqs[n] == first + n as u64 {
            n += 1;
        }
        n
    }
}

fn reply_result(request: RequestType, used_len: u32, status_byte: u8) -> Result<()> {
    if (used_len as usize) < TAIL_LEN {
        return Err(Error::NoResponse { request, used_len });
    }
    match Status::from_u8(status_byte) {
        Some(Status::Ok) => Ok(()),
        Some(status) => Err(Error::Device { request, status }),
        None => Err(Error::BadStatus { request, value: status_byte }),
    }
}

struct ReqQueue<H: Hal> {
    hal: Arc<H>,
    vq: SplitQueue<H>,
    slots: DmaRegion,
    free_slots: Vec<u16>,
    inflight: Vec<Option<Inflight>>,
    /// Buffers of PROBEs in flight.
    own: Vec<OwnBuf>,
    /// Tickets that succeeded with nothing to hand over, until their owner
    /// takes them: one range for a batch, instead of one record each.
    ok: SeqSet,
    /// Other replies (failures, PROBE properties) by ticket, sorted.
    replies: Vec<(u64, Reply)>,
    /// Tickets whose waiter gave up: their replies are dropped on arrival.
    abandoned: BTreeSet<u64>,
    next_seq: u64,
    /// Requests made available but not yet covered by a notify.
    unkicked: u64,
}

impl<H: Hal> ReqQueue<H> {
    fn new(hal: Arc<H>, size: u16, event_idx: bool, indirect: bool) -> Result<Self> {
        let mut vq = SplitQueue::new(hal.clone(), REQUEST_QUEUE, size, event_idx)?;
        // A request is 2 buffers: 2 descriptors, or 1 pointing to its table.
        let nslots = if indirect {
            vq.enable_indirect(2)?;
            size
        } else {
            (size / 2).max(1)
        };
        let pages = (nslots as usize * SLOT_SIZE).div_ceil(PAGE_SIZE);
        let slots = hal.dma_alloc(pages).ok_or(Error::NoMemory)?;
        let mut inflight = Vec::new();
        inflight.resize_with(size as usize, || None);
        Ok(Self {
            hal,
            vq,
            slots,
            free_slots: (0..nslots).rev().collect(),
            inflight,
            own: Vec::new(),
            ok: SeqSet::default(),
            replies: Vec::new(),
            abandoned: BTreeSet::new(),
            next_seq: 0,
            unkicked: 0,
        })
    }

    /// Adds `reqs[seqs.len()..]` in order, without publishing them, until
    /// the ring or the slots are full. Tickets go to `seqs`.
    fn add_from(&mut self, reqs: &Reqs<'_>, props: usize, seqs: &mut Seqs) -> Result<()> {
        // Tickets of one lock hold are consecutive: appended in one go.
        let (first, start) = (self.next_seq, seqs.len());
        let mut i = start;
        let mut result = Ok(());
        while i < reqs.len() {
            let added = if props == 0 && reqs.encoded_len(i) <= TAIL_OFF {
                self.add_slot(reqs, i)
            } else {
                match self.add_own(reqs, i, props) {
                    Ok(added) => added,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            };
            if added.is_none() {
                break;
            }
            i += 1;
        }
        debug_assert_eq!(self.next_seq - first, (i - start) as u64);
        seqs.extend(first..self.next_seq);
        result
    }

    /// Adds request `i` in a slot; `None` when the ring or the slots are full.
    fn add_slot(&mut self, reqs: &Reqs<'_>, i: usize) -> Option<u64> {
        let &slot = self.free_slots.last()?;
        let off = slot as usize * SLOT_SIZE;
        debug_assert!(off + SLOT_SIZE <= self.slots.pages * PAGE_SIZE);
        let len = reqs.encoded_len(i);
        // SAFETY: the slot lies inside the slot region (one per index below
        // `nslots`), is free (the device does not own it) and holds the
        // request (at most TAIL_OFF bytes, checked by the caller) and the tail.
        unsafe {
            let p = self.slots.vaddr.as_ptr().add(off);
            reqs.encode(i, p);
            p.add(TAIL_OFF).cast::<u32>().write_unaligned(0);
        }
        let bus = self.slots.bus_addr + off as u64;
        let bufs = [
            Buffer::readable(bus, len as u32),
            Buffer::writable(bus + TAIL_OFF as u64, TAIL_LEN as u32),
        ];
        let head = self.vq.add_unpublished(&bufs).ok()?;
        self.free_slots.pop();
        Some(self.track(head, reqs.request_type(i), slot))
    }

    /// Adds request `i` (a PROBE, or too big for a slot) with a buffer of
    /// its own; `Ok(None)` when the ring is full.
    fn add_own(&mut self, reqs: &Reqs<'_>, i: usize, props: usize) -> Result<Option<u64>> {
        let len = reqs.encoded_len(i);
        let pages = (len + props + TAIL_LEN).div_ceil(PAGE_SIZE);
        let region = self.hal.dma_alloc(pages).ok_or(Error::NoMemory)?;
        // SAFETY: the region is ours and holds at least `len` bytes.
        unsafe { reqs.encode(i, region.vaddr.as_ptr()) };
        let bufs = [
            Buffer::readable(region.bus_addr, len as u32),
            Buffer::writable(region.bus_addr + len as u64, (props + TAIL_LEN) as u32),
        ];
        match self.vq.add_unpublished(&bufs) {
            Ok(head) => {
                self.own.push(OwnBuf { head, region, readable: len, props });
                Ok(Some(self.track(head, reqs.request_type(i), OWN_BUF)))
            }
            Err(e) => {
                // SAFETY: the device never saw this buffer.
                unsafe { self.hal.dma_dealloc(region) };
                match e {
                    QueueError::Full => Ok(None),
                    e => Err(e.into()),
                }
            }
        }
    }

    fn track(&mut self, head: u16, request: RequestType, slot: u16) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.inflight[head as usize] = Some(Inflight { seq, request, slot });
        seq
    }

    /// Pops every completion and records its reply under its ticket.
    fn reap(&mut self) {
        while let Some(used) = self.vq.pop_used() {
            let Some(inf) = self.inflight[used.token as usize].take() else { continue };
            let mut props = Vec::new();
            let status = if inf.slot != OWN_BUF {
                let off = inf.slot as usize * SLOT_SIZE + TAIL_OFF;
                debug_assert!(off < self.slots.pages * PAGE_SIZE);
                self.free_slots.push(inf.slot);
                // SAFETY: in the slot region (see add_slot); the device
                // finished writing before it returned the chain, and
                // pop_used fenced after seeing it.
                unsafe { self.slots.vaddr.as_ptr().add(off).read_volatile() }
            } else {
                let Some(k) = self.own.iter().position(|o| o.head == used.token) else { continue };
                let own = self.own.swap_remove(k);
                let mut tail = [0u8; TAIL_LEN];
                props.resize(own.props, 0);
                dma_read(&own.region, own.readable, &mut props);
                dma_read(&own.region, own.readable + own.props, &mut tail);
                // SAFETY: the device has returned this buffer.
                unsafe { self.hal.dma_dealloc(own.region) };
                tail[0]
            };
            let result = reply_result(inf.request, used.len, status);
            if !self.abandoned.is_empty() && self.abandoned.remove(&inf.seq) {
                continue;
            }
            if result.is_ok() && props.is_empty() {
                self.ok.insert(inf.seq);
                continue;
            }
            let reply = (inf.seq, Reply { result, props });
            match self.replies.last() {
                Some(&(last, _)) if last > inf.seq => {
                    let at = self.replies.partition_point(|(s, _)| *s < inf.seq);
                    self.replies.insert(at, reply);
                }
                _ => self.replies.push(reply),
            }
        }
    }

    /// Tickets on the ring (not yet returned by the device), sorted. Found
    /// from the descriptors rather than kept in a set: only the rare waits
    /// for completion need it, and a set costs every request an insert and
    /// a remove.
    fn outstanding(&self) -> Vec<u64> {
        let mut live: Vec<u64> = self.inflight.iter().flatten().map(|i| i.seq).collect();
        live.sort_unstable();
        live
    }

    fn find_reply(&self, seq: u64) -> Option<usize> {
        self.replies.binary_search_by_key(&seq, |r| r.0).ok()
    }

    /// Takes the replies of `seqs` if all are in. A run of consecutive
    /// successful tickets is checked and taken in one step.
    fn take(&mut self, seqs: &[u64]) -> Option<Replies> {
        let n = self.ok.run_len(seqs);
        if n > 0 && n == seqs.len() {
            // The usual case: one run of consecutive successes.
            self.ok.remove(seqs[0], seqs[n - 1] + 1);
            return Some(Replies { len: n, others: Vec::new() });
        }
        // Steps: the length of each run of successes found, 0 for a reply
        // kept as a record. Found first, taken only if all are in.
        let mut steps: SmallVec<[usize; 4]> = SmallVec::new();
        let mut i = 0;
        while i < seqs.len() {
            match self.ok.run_len(&seqs[i..]) {
                0 if self.find_reply(seqs[i]).is_some() => i += 1,
                0 => return None,
                n => i += n,
            }
            steps.push(i);
        }
        let mut out = Replies { len: seqs.len(), others: Vec::new() };
        let mut i = 0;
        for end in steps {
            if end - i == 1 && self.ok.end_of(seqs[i]).is_none() {
                if let Some(k) = self.find_reply(seqs[i]) {
                    out.others.push((i, self.replies.remove(k).1));
                }
            } else {
                self.ok.remove(seqs[i], seqs[end - 1] + 1);
            }
            i = end;
        }
        Some(out)
    }

    /// Drops the reply of `seq` if it is in; false if it is not.
    fn forget(&mut self, seq: u64) -> bool {
        if self.ok.end_of(seq).is_some() {
            self.ok.remove(seq, seq + 1);
            return true;
        }
        match self.find_reply(seq) {
            Some(k) => {
                self.replies.remove(k);
                true
            }
            None => false,
        }
    }
}

impl<H: Hal> Drop for ReqQueue<H> {
    fn drop(&mut self) {
        for own in self.own.drain(..) {
            // SAFETY: the device was reset before the queue is dropped.
            unsafe { self.hal.dma_dealloc(own.region) };
        }
        // SAFETY: as above.
        unsafe { self.hal.dma_dealloc(self.slots) };
    }
}

/// What domains need from their IOMMU, without its type parameters.
pub(crate) trait Port: Send + Sync {
    /// Queues a request (PROBE with `props` bytes of properties) and returns
    /// its ticket. Waits for ring space when the ring is full.
    fn submit(&self, req: &Request, props: usize) -> Result<u64>;
    /// Queues several requests in order with few lock holds. On failure,
    /// the tickets of those queued before it come with the error.
    fn submit_all(&self, reqs: Reqs<'_>) -> Result<Seqs, (Seqs, Error)>;
    /// One sync: kicks, then waits until every ticket has a reply.
    fn wait(&self, seqs: &[u64]) -> Result<Replies>;
    /// The replies of `seqs` if all are in, without kicking or waiting.
    fn try_take(&self, seqs: &[u64]) -> Option<Replies>;
    /// Nobody will take the replies of `seqs` (their wait gave up): drop
    /// them when they come. Their ring slots stay in use until then.
    fn abandon(&self, seqs: &[u64]);
    /// One sync: kicks, then waits until the device has returned every
    /// ticket, without taking the replies (their owners do).
    fn wait_complete(&self, seqs: &[u64]) -> Result<()>;
    /// Those of `seqs` the device has not returned yet.
    fn outstanding(&self, seqs: &[u64]) -> Vec<u64>;
    /// [`Self::wait`]; if it gives up, the tickets are abandoned.
    fn wait_or_abandon(&self, seqs: &[u64]) -> Result<Replies> {
        self.wait(seqs).inspect_err(|_| self.abandon(seqs))
    }
    /// Notifies the device if requests are waiting for a notify.
    fn kick(&self);
    fn counters(&self) -> &Counters;
    /// The last handle of domain `id` is gone: detach what is still attached
    /// and free the ID.
    fn domain_dropped(&self, id: u32, pending: Vec<u64>);
}

static NEXT_IOMMU_ID: AtomicU64 = AtomicU64::new(1);

struct EventQueue<H: Hal> {
    vq: SplitQueue<H>,
    bufs: DmaRegion,
    /// Event buffer index by head token.
    buf_of: Vec<u16>,
    hal: Arc<H>,
}

const EVENT_BUF: usize = 64;

impl<H: Hal> EventQueue<H> {
    fn post(&mut self, buf: u16) -> Result<()> {
        let bus = self.bufs.bus_addr + (buf as usize * EVENT_BUF) as u64;
        let head = self.vq.add(&[Buffer::writable(bus, EVENT_BUF as u32)])?;
        self.buf_of[head as usize] = buf;
        Ok(())
    }
}

impl<H: Hal> Drop for EventQueue<H> {
    fn drop(&mut self) {
        // SAFETY: the device was reset before the queue is dropped.
        unsafe { self.hal.dma_dealloc(self.bufs) };
    }
}

#[derive(Default)]
struct EndpointState {
    /// Domain ID and domain, while attached.
    domain: Option<(u32, Weak<DomainInner>)>,
    /// Reserved regions once probed.
    resv: Option<Vec<ResvRegion>>,
    /// Regions given by the platform.
    extra: Vec<ResvRegion>,
}

struct Shared<T: Transport, H: Hal> {
    id: u64,
    info: DeviceInfo,
    opts: DriverOptions,
    transport: Mutex<T>,
    /// Waits for completions without the transport lock, if the transport has one.
    used_waiter: Option<Box<dyn UsedWaiter>>,
    req: Mutex<ReqQueue<H>>,
    events: Mutex<EventQueue<H>>,
    fault_handler: Mutex<Option<FaultHandler>>,
    domain_ids: Mutex<BTreeSet<u32>>,
    /// Per-endpoint state, each behind its own lock: the table lock is held
    /// only to find an entry, never across a request.
    endpoints: Mutex<BTreeMap<u32, Arc<Mutex<EndpointState>>>>,
    counters: Counters,
}

impl<T: Transport, H: Hal> Shared<T, H> {
    /// The lock of one endpoint's state, created on first use.
    fn endpoint(&self, endpoint: u32) -> Arc<Mutex<EndpointState>> {
        self.endpoints.lock().entry(endpoint).or_default().clone()
    }

    fn notify(&self, queue: u16) {
        self.transport.lock().notify(queue);
    }

    /// Takes one used event buffer and posts it again (not notified):
    /// `Ok(None)` when there is none, `Ok(Some(None))` for a buffer too short
    /// for a fault record (counted in `bad_events`).
    fn take_event(&self) -> Result<Option<Option<FaultRecord>>> {
        let mut ev = self.events.lock();
        let Some(used) = ev.vq.pop_used() else { return Ok(None) };
        let buf = ev.buf_of[used.token as usize];
        let mut bytes = [0u8; EVENT_BUF];
        dma_read(&ev.bufs, buf as usize * EVENT_BUF, &mut bytes);
        let record = match FaultEvent::read_from_prefix(&bytes) {
            Ok((e, _)) if used.len as usize >= size_of::<FaultEvent>() => Some(FaultRecord {
                reason: e.reason,
                flags: e.flags.get(),
                endpoint: e.endpoint.get(),
                address: (e.flags.get() & viommu_proto::fault::F_ADDRESS != 0)
                    .then(|| e.address.get()),
            }),
            _ => {
                bump(&self.counters.bad_events);
                None
            }
        };
        dma_write(&ev.bufs, buf as usize * EVENT_BUF, &[0; EVENT_BUF]);
        ev.post(buf)?;
        Ok(Some(record))
    }

    /// Decides on a notify for what was added since the last one, and counts it.
    fn prepare_kick(&self, q: &mut ReqQueue<H>) -> bool {
        let pending = q.vq.pending() as u64;
        q.unkicked += pending;
        let need = q.vq.kick_prepare();
        if need {
            self.counters.kick(q.unkicked);
            q.unkicked = 0;
        } else if pending > 0 {
            bump(&self.counters.kicks_suppressed);
        }
        need
    }

    /// Adds `reqs` in order, as many per lock hold as fit; on a full ring,
    /// notifies, waits for the device and goes on. Tickets go to `seqs`.
    fn submit_into(&self, reqs: &Reqs<'_>, props: usize, seqs: &mut Seqs) -> Result<()> {
        // Started at the first wait: most calls never wait (reading the clock is not free).
        let mut waiter = None;
        seqs.reserve(reqs.len());
        loop {
            let need = {
                let mut q = self.req.lock();
                q.reap();
                let before = seqs.len();
                let added = q.add_from(reqs, props, seqs);
                // One index write for the whole batch.
                q.vq.publish();
                self.count_requests(reqs, before, seqs.len());
                added?;
                if seqs.len() == reqs.len() {
                    return Ok(());
                }
                // Full ring: make sure the device sees what is there, then retry.
                self.prepare_kick(&mut q)
            };
            if need {
                self.notify(REQUEST_QUEUE);
            }
            self.wait_device(waiter.get_or_insert_with(|| self.waiter()))?;
        }
    }

    /// Counts requests `from..to` of `reqs`: one atomic add per batch of MAPs or UNMAPs.
    fn count_requests(&self, reqs: &Reqs<'_>, from: usize, to: usize) {
        if from == to {
            return;
        }
        let counter = |t: RequestType| &self.counters.requests[t as usize - 1];
        match reqs {
            Reqs::Any(_) => (from..to).for_each(|i| bump(counter(reqs.request_type(i)))),
            _ => {
                counter(reqs.request_type(from)).fetch_add((to - from) as u64, Ordering::Relaxed);
            }
        }
    }

    fn waiter(&self) -> Waiter {
        Waiter::new(self.opts.spin_limit, self.opts.timeout)
    }

    /// Waits a little for the device, without holding the request-queue lock
    /// (nor, with a [`UsedWaiter`], the transport lock).
    fn wait_device(&self, waiter: &mut Waiter) -> Result<()> {
        let Some(spins) = waiter.poll() else {
            bump(&self.counters.timeouts);
            return Err(Error::Timeout);
        };
        if let Some(w) = &self.used_waiter {
            // Each return is an interrupt or a slice of the transport's
            // choosing, so the status is worth a look more often than when spinning.
            if spins % 16 == 0 && self.transport.lock().status() & status::DEVICE_NEEDS_RESET != 0 {
                return Err(Error::DeviceNeedsReset);
            }
            w.wait_for_used(REQUEST_QUEUE);
            return Ok(());
        }
        match self.transport.try_lock() {
            Some(mut t) => {
                if spins % 1024 == 0 && t.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(Error::DeviceNeedsReset);
                }
                t.wait_for_used(REQUEST_QUEUE);
            }
            None => relax(),
        }
        Ok(())
    }
}

impl<T: Transport + 'static, H: Hal + 'static> Shared<T, H> {
    /// One sync: kicks, then reaps until `done` gives an answer.
    fn sync_until<R>(&self, mut done: impl FnMut(&mut ReqQueue<H>) -> Option<R>) -> Result<R> {
        bump(&self.counters.syncs);
        self.kick();
        // Started at the first wait: the answer is often in already.
        let mut waiter = None;
        loop {
            {
                let mut q = self.req.lock();
                q.reap();
                if let Some(r) = done(&mut q) {
                    return Ok(r);
                }
            }
            self.wait_device(waiter.get_or_insert_with(|| self.waiter()))?;
        }
    }
}

impl<T: Transport + 'static, H: Hal + 'static> Port for Shared<T, H> {
    fn submit(&self, req: &Request, props: usize) -> Result<u64> {
        let mut seqs = Seqs::new();
        self.submit_into(&Reqs::Any(core::slice::from_ref(req)), props, &mut seqs)?;
        seqs.pop().ok_or(Error::Timeout)
    }

    fn submit_all(&self, reqs: Reqs<'_>) -> Result<Seqs, (Seqs, Error)> {
        let mut seqs = Seqs::new();
        match self.submit_into(&reqs, 0, &mut seqs) {
            Ok(()) => Ok(seqs),
            Err(e) => Err((seqs, e)),
        }
    }

    fn kick(&self) {
        let need = self.prepare_kick(&mut self.req.lock());
        if need {
            self.notify(REQUEST_QUEUE);
        }
    }

    fn wait(&self, seqs: &[u64]) -> Result<Replies> {
        self.sync_until(|q| q.take(seqs))
    }

    fn wait_complete(&self, seqs: &[u64]) -> Result<()> {
        self.sync_until(|q| {
            let live = q.outstanding();
            seqs.iter().all(|s| live.binary_search(s).is_err()).then_some(())
        })
    }

    fn outstanding(&self, seqs: &[u64]) -> Vec<u64> {
        let mut q = self.req.lock();
        q.reap();
        let live = q.outstanding();
        seqs.iter().copied().filter(|s| live.binary_search(s).is_ok()).collect()
    }

    fn abandon(&self, seqs: &[u64]) {
        let mut q = self.req.lock();
        for &seq in seqs {
            if !q.forget(seq) && seq < q.next_seq {
                q.abandoned.insert(seq);
            }
        }
    }

    fn try_take(&self, seqs: &[u64]) -> Option<Replies> {
        let mut q = self.req.lock();
        q.reap();
        q.take(seqs)
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn domain_dropped(&self, id: u32, mut pending: Vec<u64>) {
        {
            let all: Vec<(u32, Arc<Mutex<EndpointState>>)> =
                self.endpoints.lock().iter().map(|(&ep, st)| (ep, st.clone())).collect();
            // The endpoints of this domain stay locked until their DETACH is
            // done (in ID order, the only place that takes several).
            let mut held = Vec::new();
            for (ep, lock) in &all {
                let mut st = lock.lock();
                if matches!(st.domain, Some((d, _)) if d == id) {
                    st.domain = None;
                    if let Ok(seq) = self.submit(&detach_req(id, *ep), 0) {
                        pending.push(seq);
                    }
                    held.push(st);
                }
            }
            // Best effort: the handle is gone, nobody can take an error.
            if !pending.is_empty() && self.wait_or_abandon(&pending).is_err() {
                self.counters.sync_error();
            }
        }
        self.domain_ids.lock().remove(&id);
    }
}

impl<T: Transport, H: Hal> Drop for Shared<T, H> {
    fn drop(&mut self) {
        // Reset the device before the rings and buffers are freed.
        self.transport.lock().set_status(0);
    }
}

fn attach_req(domain: u32, endpoint: u32, flags: u32) -> Request {
    Request::Attach(AttachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        flags: U32::new(flags),
        reserved: [0; 4],
    })
}

fn detach_req(domain: u32, endpoint: u32) -> Request {
    Request::Detach(DetachBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        reserved: [0; 8],
    })
}

fn map_req(domain: u32, m: &Mapping) -> Request {
    Request::Map(MapBody {
        domain: U32::new(domain),
        virt_start: U64::new(m.iova),
        virt_end: U64::new(m.last),
        phys_start: U64::new(m.paddr),
        flags: U32::new(m.prot.0),
    })
}

fn unmap_req(domain: u32, start: u64, last: u64) -> Request {
    Request::Unmap(UnmapBody {
        domain: U32::new(domain),
        virt_start: U64::new(start),
        virt_end: U64::new(last),
        reserved: [0; 4],
    })
}

/// Whether a request that failed with `e` may still have taken effect: the
/// device reported a transport or internal error, a status the spec does not
/// define, or returned the buffers unwritten. A refusal (RANGE, INVAL, NOENT,
/// NOMEM, UNSUPP, FAULT) means it did nothing.
fn may_have_applied(e: &Error) -> bool {
    matches!(
        e,
        Error::Device { status: Status::IoErr | Status::DevErr, .. }
            | Error::BadStatus { .. }
            | Error::NoResponse { .. }
    )
}

/// The first error of replies `from..`; counts a sync error when there is one.
fn first_error(counters: &Counters, replies: &Replies, from: usize) -> Result<()> {
    match replies.error_from(from) {
        Some(e) => {
            counters.sync_error();
            Err(e)
        }
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Device initialisation
// ---------------------------------------------------------------------------

/// The virtio-iommu driver. Share it with `Arc<VirtioIommu<..>>`: every
/// method takes `&self`.
pub struct VirtioIommu<T: Transport, H: Hal> {
    shared: Arc<Shared<T, H>>,
}

fn pow2_floor(v: u16) -> u16 {
    if v == 0 {
        0
    } else {
        1 << (15 - v.leading_zeros())
    }
}

/// Reads of the config before [`read_config`] gives up on a device whose
/// config generation never holds still ([`Error::ConfigUnstable`]).
pub const CONFIG_READ_ATTEMPTS: u32 = 64;

/// Reads the whole config. "Drivers MUST NOT assume reads from fields
/// greater than 32 bits wide are atomic, nor are reads from multiple fields:
/// drivers SHOULD read device configuration space fields like so: [...]
/// `} while (after != before);`" (virtio 1.2 §2.5.1). Repeated at most
/// [`CONFIG_READ_ATTEMPTS`] times and within the wait bounds of `opts`
/// (`spin_limit`, `timeout`): a hostile device may change the generation on
/// every read.
fn read_config<T: Transport>(t: &mut T, opts: &DriverOptions) -> Result<Config> {
    let mut waiter = Waiter::new(opts.spin_limit, opts.timeout);
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let gen = t.config_generation();
        let mut cfg = Config::default();
        t.read_config(0, zerocopy::IntoBytes::as_mut_bytes(&mut cfg));
        if t.config_generation() == gen {
            return Ok(cfg);
        }
        if waiter.poll().is_none() {
            return Err(Error::Timeout);
        }
    }
    Err(Error::ConfigUnstable)
}

impl<T: Transport + 'static, H: Hal + 'static> VirtioIommu<T, H> {
    /// Resets the device, negotiates features (VERSION_1 and MAP_UNMAP are
    /// required), reads the config, writes `bypass`, sets up both queues and
    /// fills the event queue.
    pub fn new(mut transport: T, hal: H, opts: DriverOptions) -> Result<Self> {
        match Self::init(&mut transport, &opts) {
            Ok(info) => Self::with_queues(transport, Arc::new(hal), opts, info),
            Err(e) => {
                transport.set_status(status::FAILED);
                Err(e)
            }
        }
    }

    fn init(t: &mut T, opts: &DriverOptions) -> Result<DeviceInfo> {
        t.set_status(0);
        let mut waiter = Waiter::new(opts.spin_limit, opts.timeout);
        while t.status() != 0 {
            if waiter.poll().is_none() {
                return Err(Error::Timeout);
            }
            relax();
        }
        t.set_status(status::ACKNOWLEDGE);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = t.device_features();
        for (bit, name) in [(f::VERSION_1, "VERSION_1"), (f::MAP_UNMAP, "MAP_UNMAP")] {
            if offered & f::bit(bit) == 0 {
                return Err(Error::MissingFeature(name));
            }
        }
        let mut wanted = [
            f::VERSION_1,
            f::MAP_UNMAP,
            f::INPUT_RANGE,
            f::DOMAIN_RANGE,
            f::PROBE,
            f::MMIO,
            f::BYPASS_CONFIG,
            f::ACCESS_PLATFORM,
        ]
        .iter()
        .fold(0, |acc, &b| acc | f::bit(b));
        if opts.event_idx {
            wanted |= f::bit(f::RING_EVENT_IDX);
        }
        if opts.indirect_desc {
            wanted |= f::bit(f::RING_INDIRECT_DESC);
        }
        let features = offered & wanted;
        t.set_driver_features(features);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        t.set_status(st);
        if t.status() & status::FEATURES_OK == 0 {
            return Err(Error::FeaturesRejected);
        }
        let cfg = read_config(t, opts)?;
        let has = |b| features & f::bit(b) != 0;
        let page_size_mask = cfg.page_size_mask.get();
        if page_size_mask == 0 {
            return Err(Error::BadConfig("page_size_mask is 0"));
        }
        let input_range = if has(f::INPUT_RANGE) {
            (cfg.input_start.get(), cfg.input_end.get())
        } else {
            (0, u64::MAX)
        };
        let domain_range = if has(f::DOMAIN_RANGE) {
            (cfg.domain_start.get(), cfg.domain_end.get())
        } else {
            (0, u32::MAX)
        };
        if input_range.0 > input_range.1 {
            return Err(Error::BadConfig("empty input_range"));
        }
        if domain_range.0 > domain_range.1 {
            return Err(Error::BadConfig("empty domain_range"));
        }
        let probe_size = if has(f::PROBE) { cfg.probe_size.get() } else { 0 };
        if probe_size > opts.max_probe_size {
            return Err(Error::BadConfig("probe_size too large"));
        }
        if has(f::BYPASS_CONFIG) {
            t.write_config(Config::BYPASS_OFFSET, &[opts.bypass as u8]);
        }
        let rq = pow2_floor(t.max_queue_size(REQUEST_QUEUE).min(opts.request_queue_size));
        if rq < 2 {
            return Err(Error::NoQueue(REQUEST_QUEUE));
        }
        let eq = pow2_floor(t.max_queue_size(EVENT_QUEUE).min(opts.event_buffers));
        if eq == 0 {
            return Err(Error::NoQueue(EVENT_QUEUE));
        }
        Ok(DeviceInfo {
            features,
            page_size_mask,
            input_range,
            domain_range,
            probe_size,
            queue_sizes: (rq, eq),
        })
    }

    fn with_queues(mut t: T, hal: Arc<H>, opts: DriverOptions, info: DeviceInfo) -> Result<Self> {
        let event_idx = info.has(f::RING_EVENT_IDX);
        let built = (|| {
            let indirect = info.has(f::RING_INDIRECT_DESC);
            let req = ReqQueue::new(hal.clone(), info.queue_sizes.0, event_idx, indirect)?;
            let n = info.queue_sizes.1;
            let vq = SplitQueue::new(hal.clone(), EVENT_QUEUE, n, event_idx)?;
            let bufs = hal
                .dma_alloc((n as usize * EVENT_BUF).div_ceil(PAGE_SIZE))
                .ok_or(Error::NoMemory)?;
            let mut ev = EventQueue { vq, bufs, buf_of: vec![0; n as usize], hal: hal.clone() };
            for b in 0..n {
                ev.post(b)?;
            }
            Ok::<_, Error>((req, ev))
        })();
        let (req, mut ev) = match built {
            Ok(v) => v,
            Err(e) => {
                t.set_status(status::FAILED);
                return Err(e);
            }
        };
        req.vq.setup(&mut t);
        ev.vq.setup(&mut t);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        t.set_status(st | status::DRIVER_OK);
        ev.vq.kick(&mut t);
        let used_waiter = t.used_waiter();
        let shared = Shared {
            id: NEXT_IOMMU_ID.fetch_add(1, Ordering::Relaxed),
            info,
            opts,
            transport: Mutex::new(t),
            used_waiter,
            req: Mutex::new(req),
            events: Mutex::new(ev),
            fault_handler: Mutex::new(None),
            domain_ids: Mutex::new(BTreeSet::new()),
            endpoints: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Features and config in use.
    pub fn info(&self) -> DeviceInfo {
        self.shared.info
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    /// Runs `f` on the transport (e.g. to read its own statistics).
    pub fn with_transport<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.shared.transport.lock())
    }

    // -----------------------------------------------------------------------
    // Endpoints
    // -----------------------------------------------------------------------

    /// Adds a platform-provided region (e.g. a firmware [`ResvKind::Direct`]
    /// region) to an endpoint's reserved regions.
    pub fn add_reserved_region(&self, endpoint: u32, region: ResvRegion) {
        let ep = self.shared.endpoint(endpoint);
        let mut st = ep.lock();
        st.extra.push(region);
        if let Some(r) = st.resv.as_mut() {
            r.push(region);
        }
    }

    /// PROBEs an endpoint (when PROBE is negotiated and probe_size > 0) and
    /// returns its reserved regions, plus the software MSI window when the
    /// device gave no MSI region, plus platform regions.
    pub fn probe_endpoint(&self, endpoint: u32) -> Result<Vec<ResvRegion>> {
        let s = &self.shared;
        let mut regions = Vec::new();
        if s.info.has(f::PROBE) && s.info.probe_size > 0 {
            let req = Request::Probe(ProbeBody { endpoint: U32::new(endpoint), reserved: [0; 64] });
            let seq = s.submit(&req, s.info.probe_size as usize)?;
            let mut reply = s.wait_or_abandon(&[seq])?;
            first_error(&s.counters, &reply, 0)?;
            let props = reply.take_props(0);
            for prop in PropertyIter::new(&props) {
                match prop.map_err(Error::Probe)? {
                    Property::ResvMem(r) => regions.push(resv_region(&r)?),
                    // Unknown property types carry nothing we must honour.
                    Property::Unknown { .. } => {}
                }
            }
        }
        if let Some((start, end)) = s.opts.sw_msi {
            if !regions.iter().any(|r| r.kind == ResvKind::Msi) {
                regions.push(ResvRegion { start, end, kind: ResvKind::SwMsi });
            }
        }
        let ep = s.endpoint(endpoint);
        let mut st = ep.lock();
        regions.extend_from_slice(&st.extra);
        st.resv = Some(regions.clone());
        Ok(regions)
    }

    /// The endpoint's reserved regions, probing it the first time.
    pub fn reserved_regions(&self, endpoint: u32) -> Result<Vec<ResvRegion>> {
        let cached = self.shared.endpoint(endpoint).lock().resv.clone();
        match cached {
            Some(r) => Ok(r),
            None => self.probe_endpoint(endpoint),
        }
    }

    // -----------------------------------------------------------------------
    // Domains, attach and detach
    // -----------------------------------------------------------------------

    fn alloc_domain_id(&self) -> Result<u32> {
        let (lo, hi) = self.shared.info.domain_range;
        let mut ids = self.shared.domain_ids.lock();
        let mut cand = lo;
        for &used in ids.range(lo..) {
            if used != cand {
                break;
            }
            if cand == hi {
                return Err(Error::NoDomainId);
            }
            cand += 1;
        }
        if cand > hi {
            return Err(Error::NoDomainId);
        }
        ids.insert(cand);
        Ok(cand)
    }

    fn new_domain(&self, kind: DomainKind) -> Result<Domain> {
        let info = &self.shared.info;
        let granule = info.granule();
        if granule > self.shared.opts.guest_page_size {
            return Err(Error::GranuleTooLarge { granule, page: self.shared.opts.guest_page_size });
        }
        let id = self.alloc_domain_id()?;
        let port: Arc<dyn Port> = self.shared.clone();
        Ok(Domain {
            inner: Arc::new(DomainInner {
                id,
                kind,
                granule,
                aperture: info.input_range,
                iommu_id: self.shared.id,
                mmio: info.has(f::MMIO),
                port,
                state: Mutex::new(DomainState::default()),
                stale_any: AtomicBool::new(false),
            }),
        })
    }

    /// A paging domain for `endpoint`, finalised now: granule from
    /// page_size_mask, aperture = input_range, a fresh domain ID (freed on
    /// drop), and the endpoint's direct regions mapped 1:1 once.
    pub fn alloc_paging(&self, endpoint: u32) -> Result<Domain> {
        let resv = self.reserved_regions(endpoint)?;
        let domain = self.new_domain(DomainKind::Paging)?;
        let direct = merge_regions(
            resv.iter().filter(|r| r.kind == ResvKind::Direct).map(|r| (r.start, r.end)),
        );
        let (lo, hi) = domain.aperture();
        let g = domain.granule();
        for (start, end) in direct {
            if start < lo || end > hi {
                return Err(Error::OutOfRange { start, end });
            }
            let (s, e) = (start & !(g - 1), end | (g - 1));
            domain.inner.insert(Mapping {
                iova: s,
                last: e,
                paddr: s,
                prot: Prot::READ | Prot::WRITE,
            })?;
        }
        Ok(domain)
    }

    /// An identity domain for `endpoint`: ATTACH with F_BYPASS under
    /// BYPASS_CONFIG, otherwise 1:1 mappings of the aperture minus the
    /// endpoint's reserved regions.
    pub fn alloc_identity(&self, endpoint: u32) -> Result<Domain> {
        if self.shared.info.has(f::BYPASS_CONFIG) {
            return self.new_domain(DomainKind::Identity { bypass: true });
        }
        let resv = self.reserved_regions(endpoint)?;
        let domain = self.new_domain(DomainKind::Identity { bypass: false })?;
        let (lo, hi) = domain.aperture();
        let g = domain.granule() as u128;
        let holes = merge_regions(resv.iter().map(|r| (r.start, r.end)));
        let (lo, hi) = (lo as u128, hi as u128);
        let mut gaps = Vec::new();
        let mut next = lo;
        for (s, e) in holes {
            let (s, e) = (s as u128, e as u128);
            if s > next && next <= hi {
                gaps.push((next, (s - 1).min(hi)));
            }
            next = next.max(e + 1);
        }
        if next <= hi {
            gaps.push((next, hi));
        }
        for (s, e) in gaps {
            let start = s.div_ceil(g) * g;
            let end_excl = (e + 1) / g * g;
            if end_excl > start {
                let (iova, last) = (start as u64, (end_excl - 1) as u64);
                domain.inner.insert(Mapping {
                    iova,
                    last,
                    paddr: iova,
                    prot: Prot::READ | Prot::WRITE,
                })?;
            }
        }
        Ok(domain)
    }

    /// A blocking domain: attached endpoints can do no DMA.
    pub fn alloc_blocking(&self) -> Result<Domain> {
        self.new_domain(DomainKind::Blocking)
    }

    /// Attaches `endpoint` to `domain`, detaching it from its current domain
    /// first. The first attach of a domain replays every recorded mapping in
    /// one batch with one sync; if any fails, the endpoint is detached again.
    pub fn attach(&self, domain: &Domain, endpoint: u32) -> Result<()> {
        let s = &self.shared;
        if domain.inner.iommu_id != s.id {
            return Err(Error::WrongIommu);
        }
        // Declared before the endpoint guard, so dropped after it: the last
        // handle of an old domain may run its Drop, which takes endpoint locks.
        let mut old_domain = None;
        let ep = s.endpoint(endpoint);
        let mut entry = ep.lock();
        if let Some((old_id, old)) = entry.domain.clone() {
            if old_id == domain.inner.id {
                return Ok(());
            }
            old_domain = old.upgrade();
            detach_locked(s, old_id, old_domain.as_deref(), endpoint)?;
            entry.domain = None;
        }
        let d = &domain.inner;
        let mut st = d.state.lock();
        let bypass = matches!(d.kind, DomainKind::Identity { bypass: true });
        let flags = if bypass { ATTACH_F_BYPASS } else { 0 };
        let mut reqs = vec![attach_req(d.id, endpoint, flags)];
        if st.endpoints.is_empty() {
            reqs.extend(st.tree.iter().map(|m| map_req(d.id, m)));
        }
        let (seqs, queued) = match s.submit_all(Reqs::Any(&reqs)) {
            Ok(seqs) => (seqs, Ok(())),
            Err((seqs, e)) if !seqs.is_empty() => (seqs, Err(e)),
            Err((_, e)) => return Err(e),
        };
        let replies = match s.wait_or_abandon(&seqs) {
            Ok(r) => r,
            Err(e) => {
                // The device may still attach it: count it as attached, so
                // that unmaps keep reaching the device (detach to undo).
                st.endpoints.insert(endpoint);
                drop(st);
                entry.domain = Some((d.id, Arc::downgrade(d)));
                return Err(e);
            }
        };
        let attach_result = match replies.result(0) {
            Err(e) => {
                s.counters.sync_error();
                Err(e)
            }
            ok => ok,
        };
        if let Err(e) = attach_result {
            if may_have_applied(&e) {
                // It may be attached after all: detach it to be sure.
                if let Ok(seq) = s.submit(&detach_req(d.id, endpoint), 0) {
                    let _ = s.wait_or_abandon(&[seq]);
                }
            }
            return Err(e);
        }
        if let Err(e) = first_error(&s.counters, &replies, 1).and(queued) {
            // Undo the attach: the device forgets the domain and its mappings.
            let seq = s.submit(&detach_req(d.id, endpoint), 0)?;
            let _ = s.wait_or_abandon(&[seq])?;
            return Err(e);
        }
        st.endpoints.insert(endpoint);
        drop(st);
        entry.domain = Some((d.id, Arc::downgrade(d)));
        drop(entry);
        drop(old_domain);
        Ok(())
    }

    /// Detaches `endpoint` from its domain. After the last detach the device
    /// forgets the domain; the driver keeps its mapping tree for a later attach.
    pub fn detach(&self, endpoint: u32) -> Result<()> {
        let s = &self.shared;
        let dom;
        let ep = s.endpoints.lock().get(&endpoint).cloned().ok_or(Error::NotAttached(endpoint))?;
        let mut entry = ep.lock();
        let (id, weak) = entry.domain.clone().ok_or(Error::NotAttached(endpoint))?;
        dom = weak.upgrade();
        detach_locked(s, id, dom.as_deref(), endpoint)?;
        entry.domain = None;
        drop(entry);
        Ok(())
    }

    /// The domain ID `endpoint` is attached to.
    pub fn attached_domain(&self, endpoint: u32) -> Option<u32> {
        let ep = self.shared.endpoints.lock().get(&endpoint).cloned()?;
        let id = ep.lock().domain.as_ref().map(|d| d.0);
        id
    }

    /// The interrupt handler: reaps request completions (so that waiting
    /// syncs find their replies without polling the ring themselves) and
    /// consumes the event queue. Returns the number of fault records.
    pub fn handle_interrupt(&self) -> Result<usize> {
        self.shared.req.lock().reap();
        self.poll_events()
    }

    // -----------------------------------------------------------------------
    // Faults
    // -----------------------------------------------------------------------

    /// Registers the handler that receives fault records from [`Self::poll_events`].
    pub fn set_fault_handler(&self, handler: Option<FaultHandler>) {
        *self.shared.fault_handler.lock() = handler;
    }

    /// Consumes the event queue: takes at most
    /// [`DriverOptions::event_budget`] event buffers, hands each fault record
    /// to the handler as it is taken (with the event queue unlocked),
    /// recycles the buffers and notifies the device once. Returns the number
    /// of fault records (also counted, handled or not); a call that used up
    /// its budget may have left events for the next one.
    pub fn poll_events(&self) -> Result<usize> {
        let s = &self.shared;
        let budget = s.opts.event_budget.max(1);
        let mut handler = s.fault_handler.lock();
        let mut records = 0;
        let mut taken = 0;
        let mut result = Ok(());
        while taken < budget {
            let record = match s.take_event() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            taken += 1;
            let Some(r) = record else { continue };
            records += 1;
            bump(&s.counters.faults);
            match handler.as_mut() {
                Some(h) => h(r),
                None => bump(&s.counters.faults_unhandled),
            }
        }
        drop(handler);
        let need = s.events.lock().vq.kick_prepare();
        if need {
            bump(&s.counters.event_kicks);
            s.notify(EVENT_QUEUE);
        }
        result.map(|()| records)
    }
}

impl<T: Transport, H: Hal> Clone for VirtioIommu<T, H> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}

/// Sends DETACH and waits, under the domain's lock so no MAP slips behind it.
fn detach_locked<T: Transport + 'static, H: Hal + 'static>(
    s: &Shared<T, H>,
    id: u32,
    dom: Option<&DomainInner>,
    endpoint: u32,
) -> Result<()> {
    let mut st = dom.map(|d| d.state.lock());
    let seq = s.submit(&detach_req(id, endpoint), 0)?;
    let replies = s.wait_or_abandon(&[seq])?;
    first_error(&s.counters, &replies, 0)?;
    if let Some(st) = st.as_mut() {
        st.endpoints.remove(&endpoint);
    }
    Ok(())
}

fn resv_region(r: &ResvMem) -> Result<ResvRegion> {
    let (start, end) = (r.start.get(), r.end.get());
    if start > end {
        return Err(Error::BadConfig("reserved region ends before it starts"));
    }
    let kind = match r.subtype {
        viommu_proto::probe::RESV_MEM_T_MSI => ResvKind::Msi,
        // RESERVED, and unknown subtypes to be safe.
        _ => ResvKind::Reserved,
    };
    Ok(ResvRegion { start, end, kind })
}

/// Sorts inclusive ranges and merges those that overlap or touch.
pub(crate) fn merge_regions(it: impl Iterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<_> = it.collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Domains and the IOMMU operations
// ---------------------------------------------------------------------------

enum PendingOp {
    Map {
        seq: u64,
        iova: u64,
        last: u64,
    },
    /// `range` is the UNMAP's `(first, last)`; `removed` what left the tree.
    Unmap {
        seq: u64,
        range: (u64, u64),
        removed: Vec<Mapping>,
    },
}

impl PendingOp {
    fn seq(&self) -> u64 {
        match self {
            Self::Map { seq, .. } | Self::Unmap { seq, .. } => *seq,
        }
    }
}

/// Where a stale MAP stands.
#[derive(Clone, Copy)]
enum StaleStep {
    /// Its reply is not in yet.
    Map(u64),
    /// It succeeded late: a cleanup UNMAP is to be queued (`None`) or on the ring.
    Unmap(Option<u64>),
}

/// A MAP whose sync timed out, or that failed in a way that may have left a
/// mapping (see [`may_have_applied`]). It left the tree, but the device may
/// have it, so its range stays blocked (no new MAP, no IOVA reuse) until its
/// reply is in and, if needed, a cleanup UNMAP has completed.
struct Stale {
    step: StaleStep,
    iova: u64,
    last: u64,
}

#[derive(Default)]
struct DomainState {
    endpoints: BTreeSet<u32>,
    /// The mapping tree: non-overlapping mappings, one node per run of
    /// touching ones.
    tree: MapTree,
    /// Requests queued by `map_pages`/`unmap_pages` and not yet synced.
    pending: Vec<PendingOp>,
    /// Timed-out MAPs, see [`Stale`].
    stale: Vec<Stale>,
    /// DMA-layer UNMAPs on the ring whose range spans a gap between freed
    /// ranges: IOVAs in the gap may be mapped again before they complete.
    unmapping: Vec<Ticket>,
}

impl DomainState {
    /// First IOVA of a mapping or stale range that overlaps `[start, last]`.
    fn overlap(&self, start: u64, last: u64) -> Option<u64> {
        if let Some(m) = self.tree.first_in(start, last) {
            return Some(m.iova);
        }
        self.stale.iter().find(|s| s.iova <= last && start <= s.last).map(|s| s.iova)
    }

    /// A MAP did not happen: its tree entry goes.
    fn undo_map(&mut self, iova: u64, last: u64) {
        self.tree.remove_exact(iova, last);
    }

    /// An UNMAP did not happen (or may not have): its mappings come back.
    fn undo_unmap(&mut self, removed: Vec<Mapping>) {
        for m in removed {
            if self.tree.first_in(m.iova, m.last).is_none() {
                self.tree.insert(m);
            }
        }
    }
}

pub(crate) struct DomainInner {
    id: u32,
    kind: DomainKind,
    granule: u64,
    aperture: (u64, u64),
    iommu_id: u64,
    mmio: bool,
    port: Arc<dyn Port>,
    state: Mutex<DomainState>,
    /// Whether `state.stale` is non-empty, written under the state lock:
    /// the common path (no stale MAP) skips taking the lock to look.
    stale_any: AtomicBool,
}

impl DomainInner {
    fn check(&self, m: &Mapping, size: u64) -> Result<()> {
        let g = self.granule - 1;
        if size == 0 || m.iova & g != 0 || m.paddr & g != 0 || (m.last & g) != g {
            return Err(Error::Unaligned { iova: m.iova, size });
        }
        if m.iova < self.aperture.0 || m.last > self.aperture.1 {
            return Err(Error::OutOfRange { start: m.iova, end: m.last });
        }
        if m.prot.0 & !(MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO) != 0 {
            return Err(Error::InvalidArgument("unknown prot bits"));
        }
        if m.prot.0 & MAP_F_MMIO != 0 && !self.mmio {
            return Err(Error::Unsupported("MMIO"));
        }
        Ok(())
    }

    /// Records a mapping in the tree without sending anything.
    fn insert(&self, m: Mapping) -> Result<()> {
        let mut st = self.state.lock();
        if let Some(iova) = st.overlap(m.iova, m.last) {
            return Err(Error::Overlap { iova });
        }
        st.tree.insert(m);
        Ok(())
    }

    fn attached(st: &DomainState, kind: DomainKind) -> bool {
        !st.endpoints.is_empty() && !matches!(kind, DomainKind::Identity { bypass: true })
    }

    /// Locks the state once no request on the ring conflicts with new
    /// requests on `ranges`. The device may execute requests in any order,
    /// so a MAP must not overtake an UNMAP of its range (`new_maps`), nor an
    /// UNMAP a MAP (`!new_maps`): such a request is waited for first. New
    /// MAPs also wait for the cleanup UNMAPs of stale ranges they overlap.
    fn lock_after(
        &self,
        ranges: &[(u64, u64)],
        new_maps: bool,
    ) -> Result<MutexGuard<'_, DomainState>> {
        loop {
            let mut st = self.state.lock();
            if new_maps {
                self.settle_stale(&mut st);
            }
            let hit = |s: u64, e: u64| ranges.iter().any(|&(a, b)| s <= b && a <= e);
            if new_maps && !st.unmapping.is_empty() {
                let seqs: Vec<u64> = st.unmapping.iter().map(|t| t.0).collect();
                let live = self.port.outstanding(&seqs);
                st.unmapping.retain(|t| live.contains(&t.0));
            }
            let mut wait: Vec<u64> = st
                .pending
                .iter()
                .filter_map(|op| match *op {
                    PendingOp::Unmap { seq, range: (s, e), .. } if new_maps && hit(s, e) => {
                        Some(seq)
                    }
                    PendingOp::Map { seq, iova, last } if !new_maps && hit(iova, last) => Some(seq),
                    _ => None,
                })
                .collect();
            if new_maps {
                wait.extend(st.unmapping.iter().filter(|t| hit(t.1, t.2)).map(|t| t.0));
                wait.extend(st.stale.iter().filter(|s| hit(s.iova, s.last)).filter_map(|s| {
                    match s.step {
                        StaleStep::Unmap(Some(seq)) => Some(seq),
                        _ => None,
                    }
                }));
            }
            if !wait.is_empty() {
                wait = self.port.outstanding(&wait);
            }
            if wait.is_empty() {
                return Ok(st);
            }
            drop(st);
            self.port.wait_complete(&wait)?;
        }
    }

    /// Moves stale MAPs on with the replies that are in: a failed MAP is
    /// done; a successful one needs a cleanup UNMAP (queued here, not
    /// kicked) while the domain is attached. Only this takes their replies.
    fn settle_stale(&self, st: &mut DomainState) {
        if st.stale.is_empty() {
            return;
        }
        let attached = Self::attached(st, self.kind);
        let reply = |seq: u64| self.port.try_take(&[seq]).map(|r| r.result(0));
        let mut keep = Vec::new();
        for mut s in core::mem::take(&mut st.stale) {
            if let StaleStep::Map(seq) | StaleStep::Unmap(Some(seq)) = s.step {
                match reply(seq) {
                    None => {
                        keep.push(s);
                        continue;
                    }
                    Some(Ok(())) if matches!(s.step, StaleStep::Map(_)) => {
                        s.step = StaleStep::Unmap(None)
                    }
                    Some(Ok(())) => continue,
                    Some(Err(_)) if matches!(s.step, StaleStep::Map(_)) => continue,
                    Some(Err(_)) => {
                        // The cleanup failed: count it and send it again.
                        self.port.counters().sync_error();
                        s.step = StaleStep::Unmap(None);
                    }
                }
            }
            if !attached {
                // The device forgot the domain with its last endpoint.
                continue;
            }
            if let Ok(seq) = self.port.submit(&unmap_req(self.id, s.iova, s.last), 0) {
                s.step = StaleStep::Unmap(Some(seq));
            }
            keep.push(s);
        }
        st.stale = keep;
        self.stale_any.store(!st.stale.is_empty(), Ordering::Relaxed);
    }

    /// Sends the cleanup UNMAPs of stale MAPs and waits for them once.
    fn drain_stale(&self) -> Result<()> {
        let seqs: Vec<u64> = {
            let mut st = self.state.lock();
            self.settle_stale(&mut st);
            st.stale
                .iter()
                .filter_map(|s| match s.step {
                    StaleStep::Unmap(Some(seq)) => Some(seq),
                    _ => None,
                })
                .collect()
        };
        if seqs.is_empty() {
            return Ok(());
        }
        self.port.wait_complete(&seqs)?;
        self.settle_stale(&mut self.state.lock());
        Ok(())
    }

    /// Whether `[start, last]` touches a stale MAP's range (after taking
    /// in the replies that have come).
    pub(crate) fn is_stale(&self, start: u64, last: u64) -> bool {
        let mut st = self.state.lock();
        self.settle_stale(&mut st);
        st.stale.iter().any(|s| s.iova <= last && start <= s.last)
    }

    /// Waits for ops and rolls back failures in the tree; first error wins.
    fn finish(&self, ops: Vec<PendingOp>) -> Result<()> {
        if ops.is_empty() {
            return Ok(());
        }
        let seqs: Vec<u64> = ops.iter().map(PendingOp::seq).collect();
        let replies = self.port.wait(&seqs);
        self.settle_ops(ops, replies)
    }

    /// Rolls back the failures among `ops` (by their replies) in the tree;
    /// first error wins.
    fn settle_ops(&self, ops: Vec<PendingOp>, replies: Result<Replies>) -> Result<()> {
        let mut st = self.state.lock();
        let replies = match replies {
            Ok(r) => r,
            Err(e) => {
                // No answer (timeout, reset): roll back as for a failure,
                // but a MAP's range stays blocked until the device answers.
                for op in ops {
                    match op {
                        PendingOp::Map { seq, iova, last } => {
                            st.undo_map(iova, last);
                            st.stale.push(Stale { step: StaleStep::Map(seq), iova, last });
                            self.stale_any.store(true, Ordering::Relaxed);
                        }
                        PendingOp::Unmap { seq, removed, .. } => {
                            self.port.abandon(&[seq]);
                            st.undo_unmap(removed);
                        }
                    }
                }
                self.port.counters().sync_error();
                return Err(e);
            }
        };
        let mut first = None;
        let ops = if replies.all_ok() { Vec::new() } else { ops };
        for (i, op) in ops.into_iter().enumerate() {
            let Err(e) = replies.result(i) else { continue };
            match op {
                PendingOp::Map { iova, last, .. } => {
                    st.undo_map(iova, last);
                    if may_have_applied(&e) {
                        // Unmap it to be sure; the range waits for that.
                        st.stale.push(Stale { step: StaleStep::Unmap(None), iova, last });
                        self.stale_any.store(true, Ordering::Relaxed);
                    }
                }
                PendingOp::Unmap { removed, .. } => st.undo_unmap(removed),
            }
            first.get_or_insert(e);
        }
        self.settle_stale(&mut st);
        match first {
            Some(e) => {
                self.port.counters().sync_error();
                Err(e)
            }
            None => Ok(()),
        }
    }
}

impl Drop for DomainInner {
    fn drop(&mut self) {
        let mut st = self.state.lock();
        let stale: Vec<u64> = st
            .stale
            .iter()
            .filter_map(|s| match s.step {
                StaleStep::Map(seq) | StaleStep::Unmap(Some(seq)) => Some(seq),
                StaleStep::Unmap(None) => None,
            })
            .collect();
        self.port.abandon(&stale);
        let pending = st.pending.drain(..).map(|p| p.seq()).collect();
        self.port.domain_dropped(self.id, pending);
    }
}

/// A domain: an address space that endpoints attach to. Cheap to clone
/// (shared handle); the domain ID is freed when the last handle goes.
#[derive(Clone)]
pub struct Domain {
    inner: Arc<DomainInner>,
}

/// Tickets of one batch of requests: a few fit inline (no heap use per I/O).
pub(crate) type Seqs = SmallVec<[u64; 4]>;

/// A queued request of a domain: `(seq, first IOVA, last IOVA)`.
pub(crate) type Ticket = (u64, u64, u64);

/// The UNMAP tickets of one flush or unmap: a few fit inline.
pub(crate) type Tickets = SmallVec<[Ticket; 2]>;

impl Domain {
    /// The domain ID.
    pub fn id(&self) -> u32 {
        self.inner.id
    }

    /// What the domain translates.
    pub fn kind(&self) -> DomainKind {
        self.inner.kind
    }

    /// The smallest mapping size.
    pub fn granule(&self) -> u64 {
        self.inner.granule
    }

    /// Valid IOVAs `(first, last)`, inclusive.
    pub fn aperture(&self) -> (u64, u64) {
        self.inner.aperture
    }

    /// Attached endpoints.
    pub fn endpoints(&self) -> Vec<u32> {
        self.inner.state.lock().endpoints.iter().copied().collect()
    }

    /// A copy of the mapping tree, in IOVA order.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.inner.state.lock().tree.iter().copied().collect()
    }

    /// Records `[iova, iova+size)` → `paddr` and, when the domain is attached,
    /// queues a MAP (no sync: see [`Self::iotlb_sync_map`]). If queueing
    /// fails the tree entry is removed again.
    pub fn map_pages(&self, iova: u64, paddr: u64, size: u64, prot: Prot) -> Result<()> {
        let d = &self.inner;
        if d.kind != DomainKind::Paging {
            return Err(Error::NotPaging);
        }
        let last = iova.checked_add(size.wrapping_sub(1)).ok_or(Error::Unaligned { iova, size })?;
        let m = Mapping { iova, last, paddr, prot };
        d.check(&m, size)?;
        let mut st = d.lock_after(&[(iova, last)], true)?;
        if let Some(iova) = st.overlap(iova, last) {
            return Err(Error::Overlap { iova });
        }
        st.tree.insert(m);
        if DomainInner::attached(&st, d.kind) {
            match d.port.submit(&map_req(d.id, &m), 0) {
                Ok(seq) => st.pending.push(PendingOp::Map { seq, iova, last }),
                Err(e) => {
                    st.tree.remove_exact(iova, last);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Removes the mappings inside `[iova, iova+size)` and, when attached,
    /// queues one UNMAP. Never splits a mapping ([`Error::WouldSplit`]).
    /// Returns the bytes unmapped. Sync with [`Self::iotlb_sync`].
    pub fn unmap_pages(&self, iova: u64, size: u64) -> Result<u64> {
        let d = &self.inner;
        if size == 0 {
            return Ok(0);
        }
        let last = iova.saturating_add(size - 1);
        let mut st = d.lock_after(&[(iova, last)], false)?;
        let removed = st.tree.remove_range(iova, last)?;
        let bytes = removed.iter().map(|m| m.last - m.iova + 1).sum();
        if removed.is_empty() || !DomainInner::attached(&st, d.kind) {
            return Ok(bytes);
        }
        match d.port.submit(&unmap_req(d.id, iova, last), 0) {
            Ok(seq) => st.pending.push(PendingOp::Unmap { seq, range: (iova, last), removed }),
            Err(e) => {
                for m in removed {
                    st.tree.insert(m);
                }
                return Err(e);
            }
        }
        Ok(bytes)
    }

    /// Syncs the MAPs queued for `[iova, iova+size)`, only if the domain is
    /// attached and such requests are pending. A failed MAP is removed from
    /// the tree and its status returned as a typed error.
    pub fn iotlb_sync_map(&self, iova: u64, size: u64) -> Result<()> {
        let last = iova.saturating_add(size.saturating_sub(1));
        let ops = {
            let mut st = self.inner.state.lock();
            if st.endpoints.is_empty() || st.pending.is_empty() {
                return Ok(());
            }
            let (mine, rest): (Vec<_>, Vec<_>) = st.pending.drain(..).partition(|op| {
                matches!(op, PendingOp::Map { iova: s, last: e, .. } if *s <= last && *e >= iova)
            });
            st.pending = rest;
            mine
        };
        self.inner.finish(ops)
    }

    /// Syncs every request queued for this domain (UNMAPs and MAPs). A
    /// failed UNMAP puts its mappings back in the tree. Also cleans up after
    /// timed-out MAPs the device has answered since (see [`Self::stale_ranges`]).
    pub fn iotlb_sync(&self) -> Result<()> {
        let ops = core::mem::take(&mut self.inner.state.lock().pending);
        self.inner.finish(ops)?;
        self.inner.drain_stale()
    }

    /// Ranges `(first, last)` of MAPs whose sync timed out and that the device
    /// has not answered yet (or whose cleanup UNMAP is not done): no new
    /// mapping may overlap them ([`Error::Overlap`]) until then.
    pub fn stale_ranges(&self) -> Vec<(u64, u64)> {
        self.inner.state.lock().stale.iter().map(|s| (s.iova, s.last)).collect()
    }

    /// Flushes everything: the same as [`Self::iotlb_sync`], since a
    /// virtio-iommu has no IOTLB of its own to invalidate beyond UNMAP.
    pub fn flush_iotlb_all(&self) -> Result<()> {
        self.iotlb_sync()
    }

    /// The physical address `iova` translates to, from the tree.
    pub fn iova_to_phys(&self, iova: u64) -> Option<u64> {
        let st = self.inner.state.lock();
        let m = st.tree.get(iova)?;
        Some(m.paddr + (iova - m.iova))
    }

    // --- crate-internal operations for the DMA layer ----------------------

    pub(crate) fn port(&self) -> &dyn Port {
        &*self.inner.port
    }

    pub(crate) fn counters(&self) -> &Counters {
        self.inner.port.counters()
    }

    /// Records and queues several mappings under one lock. Validation is
    /// all-or-nothing. Returns tickets `(seq, iova, last)` to sync with
    /// [`Self::finish_maps`], one per MAP (none when not attached).
    ///
    /// `maps[i]` for each `i` in `breaks` (sorted: where the DMA layer's
    /// allocations begin) starts a new tree run even if it touches the
    /// previous mapping, so that freeing one allocation never splits a run.
    pub(crate) fn map_many(&self, maps: &[Mapping], breaks: &[usize]) -> Result<Seqs> {
        let d = &self.inner;
        if d.kind != DomainKind::Paging {
            return Err(Error::NotPaging);
        }
        for m in maps {
            d.check(m, m.last.wrapping_sub(m.iova).wrapping_add(1))?;
        }
        // Touching maps (a scatter-gather list laid out back to back) form
        // one run: one overlap check and one tree node instead of one per
        // MAP. `runs` holds `(first IOVA, last IOVA, end index)` in input
        // order; sorted copies are checked for overlapping one another.
        let mut runs: SmallVec<[(u64, u64, usize); 4]> = SmallVec::new();
        if let Some(m) = maps.first() {
            let mut cur = (m.iova, m.last, 1);
            let mut k = 0;
            for (i, m) in maps.iter().enumerate().skip(1) {
                while breaks.get(k).is_some_and(|&b| b < i) {
                    k += 1;
                }
                if cur.1.checked_add(1) == Some(m.iova) && breaks.get(k) != Some(&i) {
                    (cur.1, cur.2) = (m.last, i + 1);
                } else {
                    runs.push(cur);
                    cur = (m.iova, m.last, i + 1);
                }
            }
            runs.push(cur);
        }
        let mut merged: SmallVec<[(u64, u64); 4]> = SmallVec::with_capacity(runs.len());
        for r in &runs {
            merged.push((r.0, r.1));
        }
        if merged.len() > 1 {
            merged.sort_unstable();
            let mut out: SmallVec<[(u64, u64); 4]> = SmallVec::with_capacity(merged.len());
            for &(s, e) in &merged {
                match out.last_mut() {
                    Some(prev) if s <= prev.1 => return Err(Error::Overlap { iova: s }),
                    Some(prev) if s == prev.1 + 1 => prev.1 = e,
                    _ => out.push((s, e)),
                }
            }
            merged = out;
        }
        let mut st = d.lock_after(&merged, true)?;
        for &(s, e) in &merged {
            if let Some(iova) = st.overlap(s, e) {
                return Err(Error::Overlap { iova });
            }
        }
        let mut from = 0;
        for &(_, _, end) in &runs {
            st.tree.insert_run(&maps[from..end]);
            from = end;
        }
        if !DomainInner::attached(&st, d.kind) {
            return Ok(Seqs::new());
        }
        match d.port.submit_all(Reqs::Maps(d.id, maps)) {
            Ok(seqs) => Ok(seqs),
            Err((seqs, e)) => {
                // All leave the tree (the caller rolls back). Queued ones
                // may still land: stale, like a MAP whose sync timed out,
                // so that their ranges wait for the device's answer (and a
                // cleanup UNMAP). Not pending: no sync of this domain
                // would take their replies, and an old failure settled
                // there would remove a new mapping at the same IOVA.
                for m in maps {
                    st.tree.remove_exact(m.iova, m.last);
                }
                for (seq, m) in seqs.into_iter().zip(maps) {
                    let step = StaleStep::Map(seq);
                    st.stale.push(Stale { step, iova: m.iova, last: m.last });
                }
                d.stale_any.store(!st.stale.is_empty(), Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// See [`DomainInner::drain_stale`].
    pub(crate) fn drain_stale(&self) -> Result<()> {
        self.inner.drain_stale()
    }

    /// See [`DomainInner::is_stale`].
    pub(crate) fn is_stale(&self, start: u64, last: u64) -> bool {
        self.inner.is_stale(start, last)
    }

    /// Whether any stale MAP range is left (after taking in the replies
    /// that have come).
    pub(crate) fn has_stale(&self) -> bool {
        if !self.inner.stale_any.load(Ordering::Relaxed) {
            return false;
        }
        let mut st = self.inner.state.lock();
        self.inner.settle_stale(&mut st);
        !st.stale.is_empty()
    }

    /// Syncs the tickets of [`Self::map_many`] (`seqs[i]` for `maps[i]`):
    /// one sync; failed MAPs leave the tree.
    pub(crate) fn finish_maps(&self, seqs: &[u64], maps: &[Mapping]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let replies = self.inner.port.wait(seqs);
        if replies.as_ref().is_ok_and(Replies::all_ok) {
            // The common case: nothing to roll back.
            if self.inner.stale_any.load(Ordering::Relaxed) {
                self.inner.settle_stale(&mut self.inner.state.lock());
            }
            return Ok(());
        }
        let ops = seqs
            .iter()
            .zip(maps)
            .map(|(&seq, m)| PendingOp::Map { seq, iova: m.iova, last: m.last })
            .collect();
        self.inner.settle_ops(ops, replies)
    }

    /// Removes whole mappings from the tree without sending UNMAP (the DMA
    /// layer sends it at flush time). All ranges are checked first.
    pub(crate) fn take_ranges(&self, ranges: &[(u64, u64)]) -> Result<()> {
        let mut st = self.inner.state.lock();
        for &(s, e) in ranges {
            st.tree.check_whole(s, e)?;
        }
        // Checked: every mapping in a range lies wholly inside it.
        for &(s, e) in ranges {
            st.tree.remove_inside(s, e);
        }
        Ok(())
    }

    /// Queues UNMAPs for freed ranges (sorted here). With `coalesce`, ranges
    /// with no live mapping between them go out as one UNMAP. Nothing is
    /// queued when the domain is not attached (the device has no mappings).
    /// Returns `(seq, first, last)` per UNMAP.
    pub(crate) fn queue_unmaps(
        &self,
        ranges: &[(u64, u64)],
        coalesce: bool,
        span_gaps: bool,
    ) -> Result<Tickets> {
        let d = &self.inner;
        let mut sorted: SmallVec<[(u64, u64); 4]> = SmallVec::from_slice(ranges);
        sorted.sort_unstable();
        let mut st = d.lock_after(&sorted, false)?;
        if !DomainInner::attached(&st, d.kind) {
            return Ok(Tickets::new());
        }
        // (first, last, spans a gap)
        let mut merged: SmallVec<[(u64, u64, bool); 4]> = SmallVec::with_capacity(sorted.len());
        for (s, e) in sorted {
            if let Some(prev) = merged.last_mut() {
                let touching = s <= prev.1.saturating_add(1);
                let gap_free =
                    touching || (span_gaps && st.tree.first_in(prev.1 + 1, s - 1).is_none());
                if coalesce && gap_free {
                    prev.1 = prev.1.max(e);
                    prev.2 |= !touching;
                    continue;
                }
            }
            merged.push((s, e, false));
        }
        let reqs: SmallVec<[(u64, u64); 4]> = merged.iter().map(|&(s, e, _)| (s, e)).collect();
        let (seqs, err) = match d.port.submit_all(Reqs::Unmaps(d.id, &reqs)) {
            Ok(seqs) => (seqs, None),
            Err((seqs, e)) => (seqs, Some(e)),
        };
        let tickets: Tickets =
            seqs.iter().zip(&merged).map(|(&seq, &(s, e, _))| (seq, s, e)).collect();
        match err {
            None => {
                let gaps = tickets.iter().zip(&merged).filter(|(_, m)| m.2).map(|(t, _)| *t);
                st.unmapping.extend(gaps);
                Ok(tickets)
            }
            Some(err) => {
                // The caller retries the whole list later and takes no
                // reply: new MAPs of these ranges wait for the queued ones
                // (as for a gap), whose replies are dropped on arrival.
                // Not pending: a sync of the domain would report their
                // failures as its own.
                st.unmapping.extend(tickets.iter().copied());
                let seqs: Seqs = tickets.iter().map(|t| t.0).collect();
                d.port.abandon(&seqs);
                Err(err)
            }
        }
    }

    /// Number of runs in the mapping tree.
    #[cfg(test)]
    pub(crate) fn tree_runs(&self) -> usize {
        self.inner.state.lock().tree.runs()
    }

    /// Whether this domain is attached to at least one endpoint.
    pub fn is_attached(&self) -> bool {
        !self.inner.state.lock().endpoints.is_empty()
    }
}

impl core::fmt::Debug for Domain {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Domain")
            .field("id", &self.inner.id)
            .field("kind", &self.inner.kind)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// MAPs and UNMAPs written straight into a slot give the same bytes as
    /// `Request::encode`.
    #[test]
    fn direct_encoding_matches_request_encode() {
        let m = Mapping {
            iova: 0x1234_5000,
            last: 0x1234_6fff,
            paddr: 0xdead_b000,
            prot: Prot::READ | Prot::WRITE,
        };
        let range = (0x7000_0000, 0x7fff_ffff);
        let check = |fast: Reqs<'_>, req: Request| {
            let mut want = [0u8; 64];
            let n = req.encode(&mut want).expect("fits");
            let mut got = [0xaau8; 64];
            assert_eq!(fast.encoded_len(0), n);
            // SAFETY: 64 bytes are room for any request with a body of at most 36.
            unsafe { fast.encode(0, got.as_mut_ptr()) };
            assert_eq!(got[..n], want[..n]);
            let any = [req];
            let mut again = [0xaau8; 64];
            // SAFETY: as above.
            unsafe { Reqs::Any(&any).encode(0, again.as_mut_ptr()) };
            assert_eq!(again[..n], want[..n]);
        };
        check(Reqs::Maps(7, core::slice::from_ref(&m)), map_req(7, &m));
        check(Reqs::Unmaps(9, core::slice::from_ref(&range)), unmap_req(9, range.0, range.1));
    }

    fn ranges(s: &SeqSet) -> Vec<(u64, u64)> {
        s.0.clone()
    }

    /// The set of completed tickets against a plain model, with tickets
    /// arriving out of order and taken in runs.
    #[test]
    fn seq_set_matches_a_model() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..200 {
            let mut set = SeqSet::default();
            let mut model = BTreeSet::new();
            for _ in 0..60 {
                let s = next() % 40;
                if next() % 3 == 0 {
                    // Take a run starting at s, as long as it is in the set.
                    let seqs: Vec<u64> = (s..s + next() % 6 + 1).collect();
                    let n = set.run_len(&seqs);
                    let want = seqs.iter().take_while(|x| model.contains(*x)).count();
                    assert_eq!(n, want, "{seqs:?} in {:?}", ranges(&set));
                    if n > 0 {
                        set.remove(s, s + n as u64);
                        for x in &seqs[..n] {
                            model.remove(x);
                        }
                    }
                } else if !model.contains(&s) {
                    set.insert(s);
                    model.insert(s);
                }
                // Disjoint, sorted, non-touching, and holding exactly the model.
                let r = ranges(&set);
                assert!(r.windows(2).all(|w| w[0].1 < w[1].0), "{r:?}");
                assert!(r.iter().all(|x| x.0 < x.1));
                let flat: Vec<u64> = r.iter().flat_map(|&(a, b)| a..b).collect();
                assert_eq!(flat, model.iter().copied().collect::<Vec<_>>());
                for x in 0..45 {
                    assert_eq!(set.end_of(x).is_some(), model.contains(&x));
                }
            }
        }
    }
}
