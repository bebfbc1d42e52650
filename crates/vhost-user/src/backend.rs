//! A vhost-user back-end's message loop for one queue, behind an IOMMU: negotiation, the
//! memory table, the ring, IOTLB UPDATE / INVALIDATE, and MISS / ACCESS_FAIL on the
//! back-end channel.
//!
//! Hand-written: rust-vmm's `vhost` crate (0.18) refuses VHOST_USER_IOTLB_MSG in its
//! back-end dispatcher (`BackendReqHandler`), has no way to send BACKEND_IOTLB_MSG, and keeps
//! its framing (`Endpoint`) private, so neither its dispatcher nor its framing can carry the
//! IOTLB. The loop is one thread, blocks only in `poll`, and never waits for the front-end
//! while the front-end may wait for it (a MISS is sent and the loop goes on serving the
//! socket until the answer arrives).
//!
//! Rules of the spec's "IOMMU support" section kept here:
//! - ACCESS_PLATFORM must be negotiated, and with it REPLY_ACK and BACKEND_REQ (the
//!   back-end "relies on the back-end communication channel ... to send IOTLB miss and
//!   access failure events" and "may rely on the reply-ack feature").
//! - "For update events ... Addresses and size must be within vhost memory regions" and
//!   "On success, the back-end is expected to reply with a zero payload, non-zero otherwise."
//! - A MISS is sent with NEED_REPLY: "completed operation means either front-end sent an
//!   update message containing the IOTLB entry ... or front-end sent nothing if the IOTLB
//!   miss message is invalid". The request is retried after the reply; an address that
//!   still fails is refused (ACCESS_FAIL is sent and the request fails).
//!
//! A MISS is never sent while front-end messages are waiting on the socket: one of them may
//! be the UPDATE for the gap, since a front-end sends it before the guest can make the
//! chain available. Those messages are read, and the ring is tried again.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::FileOffset;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, IommuMemory};

use crate::conn::{Channel, ConnError, Message};
use crate::iotlb::{Fault, VhostIotlb};
use crate::wire::{
    self, features, parse_request, protocol, req, Header, IotlbMsg, IotlbPerm, IotlbType,
    MemRegion, Request, VringAddr, WireError, BACKEND_IOTLB_MSG, FLAG_NEED_REPLY,
};

/// Guest memory as a back-end sees it: the front-end's regions at their user addresses,
/// behind the IOTLB.
pub type IoMem = IommuMemory<GuestMemoryMmap, VhostIotlb>;

/// Front-end messages read in a row before the ring is served.
const MAX_MESSAGES_PER_WAKE: u32 = 256;

/// Whether the front-end's socket is still open after a read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Socket {
    Open,
    Closed,
}

impl Socket {
    fn is_closed(self) -> bool {
        self == Self::Closed
    }
}

/// Largest queue accepted.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most descriptors one chain may have (direct and indirect together).
pub const MAX_CHAIN: usize = 2048;
/// MISS round trips one request may cost beyond one per page of its buffers (the rings,
/// an indirect table) before it is refused.
pub const EXTRA_MISSES_PER_REQUEST: u32 = 16;

/// The MISSes a request may cost: one per 4 KiB page its buffers span, and a few more.
fn miss_budget(chain: &[Desc]) -> u32 {
    let pages: u64 = chain
        .iter()
        .map(|d| {
            let last = d.addr.saturating_add(u64::from(d.len).saturating_sub(1));
            (last >> 12) - (d.addr >> 12) + 1
        })
        .sum();
    u32::try_from(pages).unwrap_or(u32::MAX).saturating_add(EXTRA_MISSES_PER_REQUEST)
}

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// IOVA.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// The device a back-end serves: one queue.
pub trait Device: Send {
    /// The device's own virtio features (the loop adds VERSION_1, ACCESS_PLATFORM and
    /// PROTOCOL_FEATURES).
    fn features(&self) -> u64;
    /// Config space bytes at `offset` (bytes past its end read as 0).
    fn read_config(&self, offset: u32, buf: &mut [u8]);
    /// Serves one request chain; returns the bytes written into it (the used length).
    /// Accesses go through `mem`; one that fails is recorded by the IOTLB, and the loop
    /// retries the request after the front-end answered (so the device must tolerate
    /// running a request again until it completes).
    fn process(&mut self, mem: &IoMem, chain: &[Desc]) -> u32;
    /// The last [`Device::process`] was the request's final run: its used entry follows.
    fn complete(&mut self) {}
}

/// Why the loop closed the connection.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The channel failed or carried a malformed message.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// A well-formed message out of order or against what was negotiated.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The memory table could not be mapped.
    #[error("memory table: {0}")]
    Memory(String),
}

impl From<WireError> for BackendError {
    fn from(e: WireError) -> Self {
        Self::Conn(e.into())
    }
}

impl From<io::Error> for BackendError {
    fn from(e: io::Error) -> Self {
        Self::Conn(e.into())
    }
}

fn protocol_error(s: impl Into<String>) -> BackendError {
    BackendError::Protocol(s.into())
}

/// Counts of one back-end, readable while it runs.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Request chains completed (used entries added).
    pub requests: AtomicU64,
    /// IOTLB UPDATE messages received.
    pub updates: AtomicU64,
    /// IOTLB INVALIDATE messages received.
    pub invalidates: AtomicU64,
    /// MISS messages sent.
    pub misses: AtomicU64,
    /// ACCESS_FAIL messages sent (each fails one request).
    pub access_fails: AtomicU64,
    /// UPDATEs refused because they fall outside the memory table.
    pub refused_updates: AtomicU64,
}

/// A snapshot of [`BackendStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// See [`BackendStats::requests`].
    pub requests: u64,
    /// See [`BackendStats::updates`].
    pub updates: u64,
    /// See [`BackendStats::invalidates`].
    pub invalidates: u64,
    /// See [`BackendStats::misses`].
    pub misses: u64,
    /// See [`BackendStats::access_fails`].
    pub access_fails: u64,
    /// See [`BackendStats::refused_updates`].
    pub refused_updates: u64,
}

impl BackendStats {
    /// The counts now.
    pub fn snapshot(&self) -> BackendCounts {
        BackendCounts {
            requests: self.requests.load(Relaxed),
            updates: self.updates.load(Relaxed),
            invalidates: self.invalidates.load(Relaxed),
            misses: self.misses.load(Relaxed),
            access_fails: self.access_fails.load(Relaxed),
            refused_updates: self.refused_updates.load(Relaxed),
        }
    }
}

const PROTOCOL_OFFERED: u64 =
    protocol::MQ | protocol::REPLY_ACK | protocol::BACKEND_REQ | protocol::CONFIG;

/// Places the front-end's regions at their user addresses (with ACCESS_PLATFORM, "the vhost
/// memory region guest address is not used"), each mapped shared from its fd.
pub fn user_memory(regions: &[MemRegion], files: Vec<File>) -> Result<GuestMemoryMmap, String> {
    let mut out = Vec::with_capacity(regions.len());
    for (r, f) in regions.iter().zip(files) {
        let size = usize::try_from(r.size).map_err(|_| format!("region size {:#x}", r.size))?;
        let region = GuestRegionMmap::from_range(
            GuestAddress(r.user_addr),
            size,
            Some(FileOffset::new(f, r.mmap_offset)),
        )
        .map_err(|e| format!("mmap of region at {:#x}: {e}", r.user_addr))?;
        out.push(region);
    }
    GuestMemoryMmap::from_regions(out).map_err(|e| e.to_string())
}

/// The ring and its fds.
#[derive(Debug)]
struct Ring {
    queue: Queue,
    addr: Option<VringAddr>,
    kick: Option<File>,
    call: Option<File>,
    enabled: bool,
    /// Set by the first kick, cleared by GET_VRING_BASE ("stop ring upon receiving
    /// VHOST_USER_GET_VRING_BASE").
    started: bool,
}

/// A MISS sent and not yet answered.
#[derive(Clone, Copy, Debug)]
struct Waiting {
    fault: Fault,
}

/// The back-end of one connection.
#[derive(Debug)]
pub struct Backend<D: Device> {
    dev: D,
    chan: Channel,
    backend_chan: Option<Channel>,
    acked: Option<u64>,
    protocol: u64,
    mem: IoMem,
    regions: Vec<MemRegion>,
    ring: Ring,
    waiting: Option<Waiting>,
    /// The fault last asked for and answered: a retry failing there again is refused.
    answered: Option<Fault>,
    misses_this_request: u32,
    evictions_seen: u64,
    /// An UPDATE came: serve the ring once the socket is read.
    resume: bool,
    /// The request asked anew after an emptying of the IOTLB.
    refilled: bool,
    /// A used entry that could not be written yet (the used ring missed).
    pending_used: Option<(u16, u32)>,
    stats: Arc<BackendStats>,
}

impl<D: Device> Backend<D> {
    /// A back-end for `dev` on a connected front-end socket.
    pub fn new(dev: D, sock: UnixStream) -> Self {
        Self {
            dev,
            chan: Channel::new(sock),
            backend_chan: None,
            acked: None,
            protocol: 0,
            mem: IommuMemory::new(GuestMemoryMmap::default(), VhostIotlb::default(), true, ()),
            regions: Vec::new(),
            ring: Ring {
                queue: Queue::new(MAX_QUEUE_SIZE).expect("constant size is valid"),
                addr: None,
                kick: None,
                call: None,
                enabled: false,
                started: false,
            },
            waiting: None,
            answered: None,
            misses_this_request: 0,
            evictions_seen: 0,
            resume: false,
            refilled: false,
            pending_used: None,
            stats: Arc::default(),
        }
    }

    /// The same back-end with an IOTLB emptied every `capacity` UPDATEs (default
    /// [`crate::iotlb::MAX_ENTRIES`]).
    pub fn with_iotlb_capacity(mut self, capacity: u64) -> Self {
        let mem = self.mem.get_backend().clone();
        self.mem = IommuMemory::new(mem, VhostIotlb::with_capacity(capacity), true, ());
        self
    }

    /// Counts, shared with the running loop.
    pub fn stats(&self) -> Arc<BackendStats> {
        self.stats.clone()
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.dev
    }

    fn offered(&self) -> u64 {
        self.dev.features()
            | features::VERSION_1
            | features::ACCESS_PLATFORM
            | features::PROTOCOL_FEATURES
    }

    /// Serves the connection until the front-end closes it (`Ok`) or breaks the protocol.
    pub fn run(&mut self) -> Result<(), BackendError> {
        loop {
            let kick =
                self.ring.kick.as_ref().filter(|_| self.waiting.is_none()).map(|f| f.as_raw_fd());
            let back = self.backend_chan.as_ref().filter(|_| self.waiting.is_some());
            let back = back.map(|c| c.socket().as_raw_fd());
            let ready = poll(&[Some(self.chan.socket().as_raw_fd()), back, kick])?;
            // Every message already on the socket is read before a kick is served: an
            // UPDATE sent before the guest's kick is then applied before the ring runs.
            // poll looks at the socket before the kick, so with a kick the socket is
            // looked at again: an UPDATE and its kick may both have come in between.
            if (ready[0] || (ready[2] && poll_now(self.chan.socket().as_raw_fd())?))
                && self.read_messages()?.is_closed()
            {
                return Ok(());
            }
            if std::mem::take(&mut self.resume) {
                self.process_queue()?;
            }
            if ready[1] {
                self.miss_answered()?;
            }
            if ready[2] {
                if let Some(k) = &mut self.ring.kick {
                    let mut b = [0u8; 8];
                    // An eventfd read resets the counter; a spurious wake-up reads nothing.
                    let _ = k.read(&mut b);
                }
                self.ring.started = true;
                self.process_queue()?;
            }
        }
    }

    /// Reads and handles the messages on the socket, at least one and at most
    /// `MAX_MESSAGES_PER_WAKE`, while more are already there.
    fn read_messages(&mut self) -> Result<Socket, BackendError> {
        for _ in 0..MAX_MESSAGES_PER_WAKE {
            match self.chan.recv() {
                Err(ConnError::Closed) => return Ok(Socket::Closed),
                r => self.handle(r?)?,
            }
            if !poll_now(self.chan.socket().as_raw_fd())? {
                break;
            }
        }
        Ok(Socket::Open)
    }

    fn handle(&mut self, m: Message) -> Result<(), BackendError> {
        let h = m.header;
        let r = parse_request(&h, &m.body, m.files.len())?;
        let mut files = m.files.into_iter();
        let ack = self.protocol & protocol::REPLY_ACK != 0 && h.need_reply();
        let need_access_platform = |acked: Option<u64>, what: &str| match acked {
            Some(f) if f & features::ACCESS_PLATFORM != 0 => Ok(()),
            _ => Err(protocol_error(format!("{what} before ACCESS_PLATFORM was negotiated"))),
        };
        let mut status = 0u64;
        let mut resume = false;
        match r {
            Request::GetFeatures => {
                return Ok(self.chan.reply(h.request, &self.offered().to_ne_bytes())?)
            }
            Request::GetProtocolFeatures => {
                return Ok(self.chan.reply(h.request, &PROTOCOL_OFFERED.to_ne_bytes())?)
            }
            Request::GetQueueNum => return Ok(self.chan.reply(h.request, &1u64.to_ne_bytes())?),
            Request::SetProtocolFeatures(p) => {
                if p & !PROTOCOL_OFFERED != 0 {
                    return Err(protocol_error(format!("protocol features {p:#x} not offered")));
                }
                self.protocol = p;
            }
            Request::SetFeatures(f) => {
                if f & !self.offered() != 0 {
                    return Err(protocol_error(format!("features {f:#x} not offered")));
                }
                if f & features::ACCESS_PLATFORM == 0 {
                    return Err(protocol_error(
                        "this back-end serves only behind an IOMMU (ACCESS_PLATFORM)",
                    ));
                }
                // QEMU refuses the same: "IOMMU support requires reply-ack and backend-req".
                let need = protocol::REPLY_ACK | protocol::BACKEND_REQ;
                if self.protocol & need != need {
                    return Err(protocol_error(
                        "ACCESS_PLATFORM needs REPLY_ACK and BACKEND_REQ negotiated",
                    ));
                }
                self.acked = Some(f);
            }
            Request::SetOwner => {}
            Request::ResetOwner => self.reset_ring(),
            Request::SetBackendReqFd => {
                if self.protocol & protocol::BACKEND_REQ == 0 {
                    return Err(protocol_error("SET_BACKEND_REQ_FD without BACKEND_REQ"));
                }
                let f = files.next().ok_or_else(|| protocol_error("no fd"))?;
                let sock = UnixStream::from(std::os::fd::OwnedFd::from(f));
                self.backend_chan = Some(Channel::new(sock));
            }
            Request::SetMemTable(regions) => {
                let mem = user_memory(&regions, files.collect()).map_err(BackendError::Memory)?;
                self.mem = self.mem.with_replaced_backend(mem);
                self.regions = regions;
            }
            Request::SetVringNum { index, num } => {
                self.vring(index)?;
                let ok = num > 0 && num <= MAX_QUEUE_SIZE.into() && num.is_power_of_two();
                if !ok {
                    return Err(protocol_error(format!("vring size {num}")));
                }
                self.ring.queue.set_size(num as u16);
            }
            Request::SetVringAddr(a) => {
                self.vring(a.index)?;
                need_access_platform(self.acked, "SET_VRING_ADDR")?;
                let q = &mut self.ring.queue;
                let split = |v: u64| (Some(v as u32), Some((v >> 32) as u32));
                let (lo, hi) = split(a.desc);
                q.set_desc_table_address(lo, hi);
                let (lo, hi) = split(a.avail);
                q.set_avail_ring_address(lo, hi);
                let (lo, hi) = split(a.used);
                q.set_used_ring_address(lo, hi);
                q.set_ready(true);
                self.ring.addr = Some(a);
            }
            Request::SetVringBase { index, num } => {
                self.vring(index)?;
                let num =
                    u16::try_from(num).map_err(|_| protocol_error(format!("vring base {num}")))?;
                self.ring.queue.set_next_avail(num);
                self.ring.queue.set_next_used(num);
            }
            Request::GetVringBase { index } => {
                self.vring(index)?;
                self.ring.started = false;
                self.waiting = None;
                // While the ring is stopped the front-end stops following the IOMMU (QEMU
                // unregisters its notifier), so nothing cached may outlive the stop.
                self.mem.iommu().clear();
                let base = u64::from(self.ring.queue.next_avail());
                let mut b = [0u8; 8];
                b[..4].copy_from_slice(&index.to_ne_bytes());
                b[4..].copy_from_slice(&(base as u32).to_ne_bytes());
                return Ok(self.chan.reply(h.request, &b)?);
            }
            Request::SetVringFd { request, index, fd } => {
                self.vring(index.into())?;
                let f = if fd { files.next() } else { None };
                match request {
                    req::SET_VRING_KICK => {
                        self.ring.kick = f;
                        // "If VHOST_USER_F_PROTOCOL_FEATURES has not been negotiated, the
                        // ring starts directly in the enabled state."
                        if self.acked.is_some_and(|a| a & features::PROTOCOL_FEATURES == 0) {
                            self.ring.enabled = true;
                        }
                    }
                    req::SET_VRING_CALL => self.ring.call = f,
                    _ => {} // SET_VRING_ERR: nothing is reported through it.
                }
            }
            Request::SetVringEnable { index, enable } => {
                self.vring(index)?;
                self.ring.enabled = enable;
                if enable {
                    self.process_queue()?;
                }
            }
            Request::Iotlb(msg) => {
                need_access_platform(self.acked, "IOTLB_MSG")?;
                status = self.iotlb(&msg)?;
                resume = msg.kind == IotlbType::Update;
            }
            Request::GetConfig { offset, size } => {
                let mut b = vec![0u8; 12 + size as usize];
                b[..4].copy_from_slice(&offset.to_ne_bytes());
                b[4..8].copy_from_slice(&size.to_ne_bytes());
                self.dev.read_config(offset, &mut b[12..]);
                return Ok(self.chan.reply(h.request, &b)?);
            }
            Request::SetConfig { .. } => status = 1, // no writable config fields
        }
        if ack {
            self.chan.reply(h.request, &status.to_ne_bytes())?;
        }
        // An UPDATE may be what a ring stalled on its own rings waited for: the ring runs
        // once the messages already on the socket are read (a later UPDATE may be for the
        // same request).
        self.resume |= resume;
        Ok(())
    }

    fn vring(&self, index: u32) -> Result<(), BackendError> {
        if index == 0 {
            Ok(())
        } else {
            Err(protocol_error(format!("vring {index}: this back-end has one queue")))
        }
    }

    fn reset_ring(&mut self) {
        self.ring.started = false;
        self.ring.enabled = false;
        self.ring.queue.reset();
        self.waiting = None;
        self.answered = None;
        self.pending_used = None;
        self.mem.iommu().clear();
    }

    /// Applies an UPDATE or INVALIDATE; returns the REPLY_ACK status.
    fn iotlb(&mut self, m: &IotlbMsg) -> Result<u64, BackendError> {
        match m.kind {
            IotlbType::Update => {
                self.stats.updates.fetch_add(1, Relaxed);
                // "Addresses and size must be within vhost memory regions."
                // Sizes are non-zero (checked by the parsers): no underflow.
                let inside = self.regions.iter().any(|r| {
                    let off = m.uaddr.wrapping_sub(r.user_addr);
                    m.uaddr >= r.user_addr && off < r.size && m.size <= r.size - off
                });
                if !inside {
                    self.stats.refused_updates.fetch_add(1, Relaxed);
                    return Ok(1);
                }
            }
            IotlbType::Invalidate => {
                self.stats.invalidates.fetch_add(1, Relaxed);
            }
            k => return Err(protocol_error(format!("front-end sent IOTLB {k}"))),
        }
        Ok(match self.mem.iommu().apply(m) {
            Ok(()) => 0,
            Err(_) => 1,
        })
    }

    fn ready(&self) -> bool {
        self.ring.started && self.ring.enabled && self.ring.addr.is_some() && self.waiting.is_none()
    }

    /// Serves the available chains until the ring is empty or a translation misses.
    fn process_queue(&mut self) -> Result<(), BackendError> {
        if !self.ready() {
            return Ok(());
        }
        let mut used = false;
        if let Some((head, len)) = self.pending_used {
            if !self.add_used(head, len)? {
                return Ok(());
            }
            used = true;
        }
        let mut chain = Vec::new();
        // Bounded: each pass completes a request or stops for a MISS.
        for _ in 0..=MAX_QUEUE_SIZE {
            let Some(c) = self.ring.queue.pop_descriptor_chain(&self.mem) else {
                // Empty, or the available ring missed.
                if let Some(f) = self.mem.iommu().take_fault() {
                    if self.answered != Some(f) {
                        self.send_miss(f)?;
                    }
                }
                break;
            };
            let head = c.head_index();
            chain.clear();
            for d in c {
                if chain.len() == MAX_CHAIN {
                    break;
                }
                chain.push(Desc { addr: d.addr().0, len: d.len(), write: d.is_write_only() });
            }
            // A miss in the descriptor table cut the chain short: no request runs on it.
            let mut fault = self.mem.iommu().take_fault();
            // Before the request runs, its buffers are looked up (no access made): each
            // page missing is asked for, one MISS at a time, and the request runs once,
            // when all are there (or one was refused).
            if fault.is_none() {
                fault = self.first_gap(&chain).filter(|f| self.answered != Some(*f));
            }
            let len = if fault.is_none() { self.dev.process(&self.mem, &chain) } else { 0 };
            if let Some(f) = fault.or_else(|| self.mem.iommu().take_fault()) {
                if !self.refuse(f, miss_budget(&chain))? {
                    self.ring.queue.go_to_previous_position();
                    break;
                }
            }
            self.dev.complete();
            self.answered = None;
            self.misses_this_request = 0;
            self.refilled = false;
            if !self.add_used(head, len)? {
                break;
            }
            used = true;
        }
        self.signal(used)
    }

    /// Adds a used entry; `false` when the used ring missed (it is retried later).
    fn add_used(&mut self, head: u16, len: u32) -> Result<bool, BackendError> {
        if self.ring.queue.add_used(&self.mem, head, len).is_ok() {
            self.pending_used = None;
            self.stats.requests.fetch_add(1, Relaxed);
            return Ok(true);
        }
        self.pending_used = Some((head, len));
        if let Some(f) = self.mem.iommu().take_fault() {
            if self.answered != Some(f) {
                self.send_miss(f)?;
            }
        }
        Ok(false)
    }

    /// The first page of the chain's buffers the IOTLB cannot translate for the
    /// descriptor's access, if any.
    fn first_gap(&self, chain: &[Desc]) -> Option<Fault> {
        chain.iter().find_map(|d| {
            let perm = if d.write { IotlbPerm::WO } else { IotlbPerm::RO };
            self.mem.iommu().first_gap(d.addr, u64::from(d.len), perm)
        })
    }

    /// Decides on a fault in a request: `false` when a MISS went out (retry later),
    /// `true` when the request is refused (ACCESS_FAIL sent; it completes as it is).
    fn refuse(&mut self, f: Fault, budget: u32) -> Result<bool, BackendError> {
        // An IOTLB emptied to stay bounded dropped entries asked for already: ask anew,
        // once per request (a request larger than the IOTLB would never run: its budget
        // ends it).
        let ev = self.mem.iommu().evictions();
        if ev != self.evictions_seen {
            self.evictions_seen = ev;
            if !self.refilled {
                self.refilled = true;
                self.answered = None;
                self.misses_this_request = 0;
            }
        }
        if self.answered != Some(f) && self.misses_this_request < budget {
            if self.send_miss(f)? {
                self.misses_this_request += 1;
            }
            return Ok(false);
        }
        self.stats.access_fails.fetch_add(1, Relaxed);
        let msg = IotlbMsg::fault(IotlbType::AccessFail, f.iova, f.perm);
        if let Some(c) = &mut self.backend_chan {
            c.send(Header::new(BACKEND_IOTLB_MSG, 0, wire::IOTLB_LEN), &msg.to_bytes(), &[])?;
        }
        Ok(true)
    }

    /// Sends a MISS for `f` (`true`), unless messages are already on the socket (`false`):
    /// the front-end sends a buffer's UPDATE before the guest makes the chain available,
    /// so when the chain was read, its UPDATE was there. They are read first, and the ring
    /// retried.
    fn send_miss(&mut self, f: Fault) -> Result<bool, BackendError> {
        if poll_now(self.chan.socket().as_raw_fd())? {
            self.resume = true;
            return Ok(false);
        }
        let c = self
            .backend_chan
            .as_mut()
            .ok_or_else(|| protocol_error("IOTLB miss but no back-end channel"))?;
        let msg = IotlbMsg::fault(IotlbType::Miss, f.iova, f.perm);
        c.send(
            Header::new(BACKEND_IOTLB_MSG, FLAG_NEED_REPLY, wire::IOTLB_LEN),
            &msg.to_bytes(),
            &[],
        )?;
        self.stats.misses.fetch_add(1, Relaxed);
        self.waiting = Some(Waiting { fault: f });
        Ok(true)
    }

    /// The front-end answered the MISS. Its UPDATE, if any, went out on the main socket
    /// before the answer: read what is there first, then retry.
    fn miss_answered(&mut self) -> Result<(), BackendError> {
        let Some(c) = &mut self.backend_chan else { return Ok(()) };
        let m = c.recv()?;
        if !m.files.is_empty() {
            return Err(WireError::Fds {
                request: BACKEND_IOTLB_MSG,
                found: m.files.len(),
                expected: 0,
            }
            .into());
        }
        let _status = wire::parse_u64_reply(BACKEND_IOTLB_MSG, &m.header, &m.body)?;
        let mut n = 0;
        while n < MAX_MESSAGES_PER_WAKE && poll_now(self.chan.socket().as_raw_fd())? {
            match self.chan.recv() {
                // The close is seen again by the main loop.
                Err(ConnError::Closed) => break,
                r => self.handle(r?)?,
            }
            n += 1;
        }
        self.answered = self.waiting.take().map(|w| w.fault);
        self.resume = false;
        self.process_queue()
    }

    fn signal(&mut self, used: bool) -> Result<(), BackendError> {
        if let (true, Some(call)) = (used, &mut self.ring.call) {
            call.write_all(&1u64.to_ne_bytes())?;
        }
        Ok(())
    }
}

/// Waits until one of `fds` is readable (or hung up); `None` entries are skipped.
fn poll(fds: &[Option<RawFd>; 3]) -> io::Result<[bool; 3]> {
    let mut p: [libc::pollfd; 3] = std::array::from_fn(|i| libc::pollfd {
        fd: fds[i].unwrap_or(-1),
        events: libc::POLLIN,
        revents: 0,
    });
    loop {
        // SAFETY: `p` is a valid array of 3 pollfds for the duration of the call; negative
        // fds are ignored by poll(2).
        let n = unsafe { libc::poll(p.as_mut_ptr(), 3, -1) };
        if n >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let hit = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
    Ok(std::array::from_fn(|i| p[i].fd >= 0 && p[i].revents & hit != 0))
}

fn poll_now(fd: RawFd) -> io::Result<bool> {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(p.revents & (libc::POLLIN | libc::POLLHUP) != 0)
}
