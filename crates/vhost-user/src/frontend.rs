//! The front-end side (feature `frontend`): a Rust VMM that embeds viommu-device tells an
//! external vhost-user back-end what one endpoint may reach.
//!
//! [`Frontend`] speaks the set-up messages (features, memory table, the ring) and owns the
//! socket. [`Frontend::iotlb_listener`] gives the viommu-device [`Listener`] that turns the
//! endpoint's changes into IOTLB messages:
//! - MAP → UPDATE (if [`FrontendOptions::update_on_map`]), the guest-physical address
//!   turned into the VMM's virtual address through the memory table;
//! - UNMAP → INVALIDATE of the request's range, DETACH / ATTACH (a move) / a global bypass
//!   change / reset → INVALIDATE of everything, each with NEED_REPLY: the call returns
//!   only after the back-end's ack, and the device completes the UNMAP only after the call
//!   returns ("Listener contract", docs/device.md), so no access through the old entry
//!   follows the UNMAP's completion;
//! - a MISS on the back-end channel → [`Iommu::lookup`] (non-faulting) and an UPDATE of
//!   the window found, or nothing if the address does not translate; then the reply.
//!
//! The MISS answer looks up and sends under the socket's lock, which every INVALIDATE also
//! takes: an answer either sees the state after an UNMAP or is on the socket before the
//! INVALIDATE, so a stale UPDATE never follows an INVALIDATE.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;

use viommu_device::{Iommu, Listener, ListenerError, ListenerId, Mapping, Window};
use viommu_proto::{MAP_F_READ, MAP_F_WRITE};

use crate::conn::{Channel, ConnError};
use crate::wire::{
    self, features, protocol, req, Header, IotlbMsg, IotlbPerm, IotlbType, WireError,
    FLAG_NEED_REPLY,
};

/// One region of guest RAM as the VMM shares it.
#[derive(Debug)]
pub struct SharedRegion {
    /// Guest-physical address.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Where the VMM mapped it (the "user address" of the memory table).
    pub host: u64,
    /// The memfd (or other shareable file) behind it.
    pub file: File,
    /// Offset of the region in the file.
    pub offset: u64,
}

/// Choices of the front-end.
#[derive(Clone, Copy, Debug)]
pub struct FrontendOptions {
    /// Send an UPDATE on every MAP (no MISS for mapped buffers); otherwise the back-end
    /// asks for each entry with a MISS.
    pub update_on_map: bool,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        Self { update_on_map: true }
    }
}

/// IOTLB message counts of the front-end.
#[derive(Debug, Default)]
pub struct FrontendStats {
    /// UPDATE messages sent.
    pub updates: AtomicU64,
    /// INVALIDATE messages sent (each acknowledged before the change completed).
    pub invalidates: AtomicU64,
    /// MISS messages received.
    pub misses: AtomicU64,
    /// MISSes answered with nothing (the address does not translate, or not for that access).
    pub misses_refused: AtomicU64,
    /// ACCESS_FAIL messages received.
    pub access_fails: AtomicU64,
    /// Messages that failed (the connection is then unusable: tear the back-end down).
    pub errors: AtomicU64,
}

/// A snapshot of [`FrontendStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FrontendCounts {
    /// See [`FrontendStats::updates`].
    pub updates: u64,
    /// See [`FrontendStats::invalidates`].
    pub invalidates: u64,
    /// See [`FrontendStats::misses`].
    pub misses: u64,
    /// See [`FrontendStats::misses_refused`].
    pub misses_refused: u64,
    /// See [`FrontendStats::access_fails`].
    pub access_fails: u64,
    /// See [`FrontendStats::errors`].
    pub errors: u64,
}

impl FrontendStats {
    /// The counts now.
    pub fn snapshot(&self) -> FrontendCounts {
        FrontendCounts {
            updates: self.updates.load(Relaxed),
            invalidates: self.invalidates.load(Relaxed),
            misses: self.misses.load(Relaxed),
            misses_refused: self.misses_refused.load(Relaxed),
            access_fails: self.access_fails.load(Relaxed),
            errors: self.errors.load(Relaxed),
        }
    }
}

/// Why the front-end failed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The socket failed or the back-end answered with a malformed message.
    #[error(transparent)]
    Conn(#[from] ConnError),
    /// The back-end lacks what an IOMMU needs, or refused a request.
    #[error("back-end: {0}")]
    Refused(String),
}

impl From<io::Error> for FrontendError {
    fn from(e: io::Error) -> Self {
        Self::Conn(e.into())
    }
}

/// What the listener and the MISS thread share.
#[derive(Debug)]
struct Shared {
    chan: Mutex<Channel>,
    endpoint: u32,
    iommu: Weak<Iommu>,
    /// (gpa, size, host address), for GPA → VMM virtual address.
    regions: Vec<(u64, u64, u64)>,
    options: FrontendOptions,
    stats: FrontendStats,
}

/// A vhost-user front-end for one device behind one endpoint of our IOMMU.
#[derive(Debug)]
pub struct Frontend {
    shared: Arc<Shared>,
    miss_thread: Option<JoinHandle<()>>,
    listener: Option<(Weak<Iommu>, ListenerId)>,
}

impl Frontend {
    /// Negotiates with the back-end on `sock`: features (`device_features` wanted, plus
    /// VERSION_1 and ACCESS_PLATFORM, which must be offered), protocol features
    /// (REPLY_ACK and BACKEND_REQ, which must be offered), the back-end channel (served by
    /// a thread of its own), SET_OWNER, and the memory table.
    pub fn connect(
        sock: UnixStream,
        iommu: &Arc<Iommu>,
        endpoint: u32,
        device_features: u64,
        regions: &[SharedRegion],
        options: FrontendOptions,
    ) -> Result<Self, FrontendError> {
        let mut chan = Channel::new(sock);
        let offered = get_u64(&mut chan, req::GET_FEATURES)?;
        let need = features::PROTOCOL_FEATURES | features::VERSION_1 | features::ACCESS_PLATFORM;
        if offered & need != need {
            return Err(FrontendError::Refused(format!("features {offered:#x} lack {need:#x}")));
        }
        let proto = get_u64(&mut chan, req::GET_PROTOCOL_FEATURES)?;
        let want = protocol::REPLY_ACK | protocol::BACKEND_REQ;
        if proto & want != want {
            return Err(FrontendError::Refused(
                "IOMMU support requires REPLY_ACK and BACKEND_REQ".into(),
            ));
        }
        chan.request(req::SET_PROTOCOL_FEATURES, &want.to_ne_bytes(), false)?;
        let (ours, theirs) = UnixStream::pair()?;
        chan.send(
            Header::new(req::SET_BACKEND_REQ_FD, FLAG_NEED_REPLY, 0),
            &[],
            &[theirs.as_raw_fd()],
        )?;
        ack(chan.reply_u64(req::SET_BACKEND_REQ_FD)?, "SET_BACKEND_REQ_FD")?;
        drop(theirs);
        ack(chan.request(req::SET_OWNER, &[], true)?, "SET_OWNER")?;
        let acked = need | (device_features & offered);
        ack(chan.request(req::SET_FEATURES, &acked.to_ne_bytes(), true)?, "SET_FEATURES")?;
        let mut table = vec![0u8; 8 + 32 * regions.len()];
        table[..4].copy_from_slice(&(regions.len() as u32).to_ne_bytes());
        for (i, r) in regions.iter().enumerate() {
            let at = 8 + 32 * i;
            for (k, v) in [r.gpa, r.size, r.host, r.offset].into_iter().enumerate() {
                table[at + 8 * k..at + 8 * k + 8].copy_from_slice(&v.to_ne_bytes());
            }
        }
        let fds: Vec<RawFd> = regions.iter().map(|r| r.file.as_raw_fd()).collect();
        chan.send(Header::new(req::SET_MEM_TABLE, FLAG_NEED_REPLY, table.len()), &table, &fds)?;
        ack(chan.reply_u64(req::SET_MEM_TABLE)?, "SET_MEM_TABLE")?;

        let shared = Arc::new(Shared {
            chan: Mutex::new(chan),
            endpoint,
            iommu: Arc::downgrade(iommu),
            regions: regions.iter().map(|r| (r.gpa, r.size, r.host)).collect(),
            options,
            stats: FrontendStats::default(),
        });
        let s = shared.clone();
        let miss_thread = std::thread::Builder::new()
            .name("vhost-user-miss".into())
            .spawn(move || serve_backend_channel(&s, Channel::new(ours)))?;
        Ok(Self { shared, miss_thread: Some(miss_thread), listener: None })
    }

    /// Sets up ring 0 (size, IOVAs of its parts, next index 0, kick and call eventfds) and
    /// enables it.
    pub fn set_vring(
        &self,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        kick: &File,
        call: &File,
    ) -> Result<(), FrontendError> {
        let mut c = self.chan();
        let state = |a: u32, b: u32| [a.to_ne_bytes(), b.to_ne_bytes()].concat();
        ack(c.request(req::SET_VRING_NUM, &state(0, size.into()), true)?, "SET_VRING_NUM")?;
        ack(c.request(req::SET_VRING_BASE, &state(0, 0), true)?, "SET_VRING_BASE")?;
        let mut addr = vec![0u8; 40];
        for (k, v) in [desc, used, avail, 0].into_iter().enumerate() {
            addr[8 + 8 * k..16 + 8 * k].copy_from_slice(&v.to_ne_bytes());
        }
        ack(c.request(req::SET_VRING_ADDR, &addr, true)?, "SET_VRING_ADDR")?;
        for (r, f) in [(req::SET_VRING_CALL, call), (req::SET_VRING_KICK, kick)] {
            c.send(Header::new(r, FLAG_NEED_REPLY, 8), &0u64.to_ne_bytes(), &[f.as_raw_fd()])?;
            ack(c.reply_u64(r)?, "SET_VRING_KICK/CALL")?;
        }
        ack(c.request(req::SET_VRING_ENABLE, &state(0, 1), true)?, "SET_VRING_ENABLE")?;
        Ok(())
    }

    /// Registers the IOTLB listener on `iommu` (once; later calls return the same id).
    pub fn iotlb_listener(&mut self, iommu: &Arc<Iommu>) -> ListenerId {
        if let Some((_, id)) = self.listener {
            return id;
        }
        let id = iommu.add_listener(Arc::new(IotlbListener(self.shared.clone())));
        self.listener = Some((Arc::downgrade(iommu), id));
        id
    }

    /// IOTLB message counts.
    pub fn counts(&self) -> FrontendCounts {
        self.shared.stats.snapshot()
    }

    /// Stops the ring (GET_VRING_BASE) and returns its next available index.
    pub fn stop(&self) -> Result<u16, FrontendError> {
        let mut c = self.chan();
        c.request(req::GET_VRING_BASE, &[0u8; 8], false)?;
        let m = c.recv()?;
        if !m.header.is_reply() || m.header.request != req::GET_VRING_BASE || m.body.len() != 8 {
            return Err(ConnError::Wire(WireError::WrongReply {
                found: m.header.request,
                expected: req::GET_VRING_BASE,
            })
            .into());
        }
        Ok(u32::from_ne_bytes([m.body[4], m.body[5], m.body[6], m.body[7]]) as u16)
    }

    fn chan(&self) -> std::sync::MutexGuard<'_, Channel> {
        self.shared.chan.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        if let Some((iommu, id)) = self.listener.take() {
            if let Some(i) = iommu.upgrade() {
                i.remove_listener(id);
            }
        }
        // Closing the main socket ends the back-end, which closes its channel end, which
        // ends the MISS thread.
        let _ = self.chan().socket().shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.miss_thread.take() {
            let _ = t.join();
        }
    }
}

fn get_u64(chan: &mut Channel, request: u32) -> Result<u64, FrontendError> {
    chan.send(Header::new(request, 0, 0), &[], &[])?;
    Ok(chan.reply_u64(request)?)
}

fn ack(status: u64, what: &str) -> Result<(), FrontendError> {
    if status == 0 {
        Ok(())
    } else {
        Err(FrontendError::Refused(format!("{what} failed with {status}")))
    }
}

impl Shared {
    fn chan(&self) -> std::sync::MutexGuard<'_, Channel> {
        self.chan.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VMM-virtual pieces of guest-physical `[gpa, gpa + len)`: (offset in the range,
    /// host address, bytes). Holes between regions are skipped.
    fn host_pieces(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
        let last = gpa.saturating_add(len.saturating_sub(1));
        self.regions.iter().filter_map(move |&(rg, rs, host)| {
            let rlast = rg + (rs - 1);
            let (s, e) = (gpa.max(rg), last.min(rlast));
            (s <= e).then(|| (s - gpa, host + (s - rg), e - s + 1))
        })
    }

    /// Sends the UPDATEs of `[iova, iova + len)` → guest-physical `gpa`.
    fn update(
        &self,
        c: &mut Channel,
        iova: u64,
        gpa: u64,
        len: u64,
        perm: IotlbPerm,
        need_reply: bool,
    ) -> Result<(), ConnError> {
        for (off, host, n) in self.host_pieces(gpa, len) {
            let m = IotlbMsg::update(iova + off, n, host, perm);
            let status = c.request(req::IOTLB_MSG, &m.to_bytes(), need_reply)?;
            self.stats.updates.fetch_add(1, Relaxed);
            if status != 0 {
                return Err(ConnError::Io(io::Error::other(format!("UPDATE refused ({status})"))));
            }
        }
        Ok(())
    }

    /// INVALIDATE `[start, end]` with NEED_REPLY, waiting for the ack.
    fn invalidate(&self, start: u64, end: u64) {
        let size = if start == 0 && end == u64::MAX { u64::MAX } else { end - start + 1 };
        let m = IotlbMsg::invalidate(start, size);
        let r = self.chan().request(req::IOTLB_MSG, &m.to_bytes(), true);
        self.stats.invalidates.fetch_add(1, Relaxed);
        if !matches!(r, Ok(0)) {
            self.stats.errors.fetch_add(1, Relaxed);
        }
    }

    /// Answers one MISS: the window around it, if the endpoint reaches it with `perm`.
    fn answer_miss(&self, m: &IotlbMsg) -> u64 {
        let Some(iommu) = self.iommu.upgrade() else { return 1 };
        let mut c = self.chan();
        let Some((w, p)) = iommu.lookup(self.endpoint, m.iova) else { return 1 };
        if (m.perm.read && !p.read) || (m.perm.write && !p.write) {
            return 1;
        }
        let (start, end, phys) = match w {
            Window::Mapping(mp) => (mp.start, mp.end, mp.phys),
            Window::Identity { start, end } => (start, end, start),
        };
        // Only the piece inside the memory region holding the address is sendable.
        let Some(gpa) = w.translate(m.iova) else { return 1 };
        let Some(&(rg, rs, _)) =
            self.regions.iter().find(|&&(rg, rs, _)| gpa >= rg && gpa - rg < rs)
        else {
            return 1;
        };
        let lo = start.max(m.iova - (gpa - rg));
        let hi = end.min(m.iova + (rg + (rs - 1) - gpa));
        let perm = IotlbPerm { read: p.read, write: p.write };
        match self.update(&mut c, lo, phys + (lo - start), hi - lo + 1, perm, true) {
            Ok(()) => 0,
            Err(_) => {
                self.stats.errors.fetch_add(1, Relaxed);
                1
            }
        }
    }
}

/// Serves MISS and ACCESS_FAIL from the back-end until the channel closes.
fn serve_backend_channel(s: &Shared, mut chan: Channel) {
    loop {
        let m = match chan.recv() {
            Ok(m) => m,
            Err(ConnError::Closed) => return,
            Err(_) => {
                s.stats.errors.fetch_add(1, Relaxed);
                return;
            }
        };
        let msg = match wire::parse_backend_request(&m.header, &m.body, m.files.len()) {
            Ok(msg) => msg,
            Err(_) => {
                s.stats.errors.fetch_add(1, Relaxed);
                return;
            }
        };
        let status = match msg.kind {
            IotlbType::Miss => {
                s.stats.misses.fetch_add(1, Relaxed);
                let st = s.answer_miss(&msg);
                if st != 0 {
                    s.stats.misses_refused.fetch_add(1, Relaxed);
                }
                st
            }
            _ => {
                s.stats.access_fails.fetch_add(1, Relaxed);
                0
            }
        };
        if m.header.need_reply()
            && chan.reply(wire::BACKEND_IOTLB_MSG, &status.to_ne_bytes()).is_err()
        {
            return;
        }
    }
}

/// The viommu-device listener of one endpoint.
#[derive(Debug)]
struct IotlbListener(Arc<Shared>);

impl Listener for IotlbListener {
    fn on_attach(&self, endpoint: u32, _domain: u32, _bypass: bool) {
        // A move: what the old domain granted is gone.
        if endpoint == self.0.endpoint {
            self.0.invalidate(0, u64::MAX);
        }
    }
    fn on_detach(&self, endpoint: u32, _domain: u32) {
        if endpoint == self.0.endpoint {
            self.0.invalidate(0, u64::MAX);
        }
    }
    fn on_map(&self, endpoint: u32, m: &Mapping) -> Result<(), ListenerError> {
        if endpoint != self.0.endpoint || !self.0.options.update_on_map {
            return Ok(());
        }
        let perm = IotlbPerm { read: m.flags & MAP_F_READ != 0, write: m.flags & MAP_F_WRITE != 0 };
        let len = (m.end - m.start).saturating_add(1);
        let mut c = self.0.chan();
        self.0.update(&mut c, m.start, m.phys, len, perm, false).map_err(|_| {
            self.0.stats.errors.fetch_add(1, Relaxed);
            ListenerError::DevErr
        })
    }
    fn on_unmap(&self, endpoint: u32, start: u64, end: u64, _removed: &[Mapping]) {
        if endpoint == self.0.endpoint {
            self.0.invalidate(start, end);
        }
    }
    fn on_bypass(&self, _on: bool) {
        self.0.invalidate(0, u64::MAX);
    }
    fn on_reset(&self) {
        self.0.invalidate(0, u64::MAX);
    }
}
