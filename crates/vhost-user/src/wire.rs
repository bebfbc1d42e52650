//! The vhost-user wire format (QEMU docs/interop/vhost-user.rst, "Message Specification"),
//! the part this crate speaks: a 12-byte header, a bounded payload, and the typed messages
//! of both channels.
//!
//! Parsing is total: any bytes give a message or a [`WireError`], never a panic, and nothing
//! is allocated beyond [`MAX_PAYLOAD`] bytes. "All numbers are in the machine native byte
//! order."

use std::fmt;

/// Bytes of a message header: request, flags, size (32 bits each).
pub const HEADER_LEN: usize = 12;
/// The largest payload accepted. The largest message spoken here is SET_MEM_TABLE with 8
/// regions (264 bytes) or a config access of [`MAX_CONFIG`] bytes.
pub const MAX_PAYLOAD: usize = 512;
/// Most file descriptors in one message ("at most 8 descriptors in each message").
pub const MAX_FDS: usize = 8;
/// Most regions in SET_MEM_TABLE (region0 .. region7).
pub const MAX_REGIONS: usize = 8;
/// Most bytes of one GET_CONFIG / SET_CONFIG ("the virtio device's configuration space").
pub const MAX_CONFIG: usize = 256;

/// "Lower 2 bits are the version (currently 0x01)".
pub const VERSION: u32 = 0x1;
const VERSION_MASK: u32 = 0x3;
/// "Bit 2 is the reply flag - needs to be sent on each reply from the back-end".
pub const FLAG_REPLY: u32 = 1 << 2;
/// "Bit 3 is the need_reply flag".
pub const FLAG_NEED_REPLY: u32 = 1 << 3;
const KNOWN_FLAGS: u32 = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY;

/// Set/Get vring kick/call/err: "Bit 8 is the invalid FD flag" (no fd is passed).
pub const VRING_NOFD: u64 = 1 << 8;
const VRING_INDEX_MASK: u64 = 0xff;

/// Virtio feature bits this crate negotiates.
pub mod features {
    /// `VHOST_USER_F_PROTOCOL_FEATURES`: the back-end speaks protocol features.
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u64 = 1 << 32;
    /// `VIRTIO_F_ACCESS_PLATFORM` (formerly IOMMU_PLATFORM): ring and buffer addresses are
    /// IOVAs, translated through the IOTLB.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
}

/// Protocol feature bits ("Protocol features").
pub mod protocol {
    /// `VHOST_USER_PROTOCOL_F_MQ`.
    pub const MQ: u64 = 1 << 0;
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK`.
    pub const REPLY_ACK: u64 = 1 << 3;
    /// `VHOST_USER_PROTOCOL_F_BACKEND_REQ` (formerly SLAVE_REQ).
    pub const BACKEND_REQ: u64 = 1 << 5;
    /// `VHOST_USER_PROTOCOL_F_CONFIG`.
    pub const CONFIG: u64 = 1 << 9;
}

/// Front-end request codes ("Front-end message types").
pub mod req {
    #![allow(missing_docs)]
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const IOTLB_MSG: u32 = 22;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
}

/// Back-end request codes ("Back-end message types"): `VHOST_USER_BACKEND_IOTLB_MSG`.
pub const BACKEND_IOTLB_MSG: u32 = 1;

/// Why bytes are not a message this crate accepts. Each closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The version bits are not 1, or unknown flag bits are set.
    #[error("bad header flags {0:#x}")]
    BadFlags(u32),
    /// A request carried the reply flag, or a reply lacked it.
    #[error("reply flag {found} where {expected} was expected")]
    ReplyFlag {
        /// Whether the flag was set.
        found: bool,
        /// Whether it should have been.
        expected: bool,
    },
    /// The payload is larger than [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is too large")]
    TooLarge(u32),
    /// A request code this back-end does not implement.
    #[error("unsupported request {0}")]
    Unsupported(u32),
    /// The payload size does not fit the request.
    #[error("request {request}: payload of {size} bytes, expected {expected}")]
    BadSize {
        /// The request code.
        request: u32,
        /// The size found.
        size: usize,
        /// What the request needs.
        expected: &'static str,
    },
    /// The number of file descriptors does not fit the request.
    #[error("request {request}: {found} file descriptors, expected {expected}")]
    Fds {
        /// The request code.
        request: u32,
        /// How many came.
        found: usize,
        /// How many the request needs.
        expected: usize,
    },
    /// A field has a value the spec does not define (or that overflows).
    #[error("request {request}: bad {field} {value:#x}")]
    BadField {
        /// The request code.
        request: u32,
        /// Which field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A reply answers another request than the one sent.
    #[error("reply to request {found}, expected {expected}")]
    WrongReply {
        /// The code in the reply.
        found: u32,
        /// The code of the request sent.
        expected: u32,
    },
}

/// A message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The request code.
    pub request: u32,
    /// Version, REPLY and NEED_REPLY.
    pub flags: u32,
    /// Payload bytes that follow.
    pub size: u32,
}

impl Header {
    /// A request header (version 1) with `flags` added.
    pub fn new(request: u32, flags: u32, size: usize) -> Self {
        Self { request, flags: VERSION | flags, size: size as u32 }
    }

    /// Parses and checks the version, flags and size bound.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<Self, WireError> {
        let word = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let h = Self { request: word(0), flags: word(4), size: word(8) };
        if h.flags & VERSION_MASK != VERSION || h.flags & !KNOWN_FLAGS != 0 {
            return Err(WireError::BadFlags(h.flags));
        }
        if h.size as usize > MAX_PAYLOAD {
            return Err(WireError::TooLarge(h.size));
        }
        Ok(h)
    }

    /// The wire bytes.
    pub fn to_bytes(self) -> [u8; HEADER_LEN] {
        let mut b = [0; HEADER_LEN];
        b[0..4].copy_from_slice(&self.request.to_ne_bytes());
        b[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        b[8..12].copy_from_slice(&self.size.to_ne_bytes());
        b
    }

    /// NEED_REPLY is set.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// REPLY is set.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }
}

/// One memory region of SET_MEM_TABLE: "guest address, size, user address, mmap offset".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    /// Guest-physical address (unused once ACCESS_PLATFORM is negotiated).
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// The front-end's virtual address of the region: what IOTLB entries point to.
    pub user_addr: u64,
    /// Where the region starts in the passed file.
    pub mmap_offset: u64,
}

/// "A vring address description". With ACCESS_PLATFORM the addresses are IOVAs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VringAddr {
    /// The vring index.
    pub index: u32,
    /// Vring flags (logging only).
    pub flags: u32,
    /// Descriptor table.
    pub desc: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub avail: u64,
    /// Log address (unused here).
    pub log: u64,
}

/// The IOTLB message type ("type: an 8-bit IOTLB message type").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbType {
    /// 1: IOTLB miss (back-end to front-end).
    Miss,
    /// 2: IOTLB update (front-end to back-end).
    Update,
    /// 3: IOTLB invalidate (front-end to back-end).
    Invalidate,
    /// 4: IOTLB access fail (back-end to front-end).
    AccessFail,
}

impl IotlbType {
    fn code(self) -> u8 {
        match self {
            Self::Miss => 1,
            Self::Update => 2,
            Self::Invalidate => 3,
            Self::AccessFail => 4,
        }
    }
}

/// "permissions flags: an 8-bit value: 0 no access, 1 read, 2 write, 3 read/write".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbPerm {
    /// Bit 0.
    pub read: bool,
    /// Bit 1.
    pub write: bool,
}

impl IotlbPerm {
    /// Read and write.
    pub const RW: Self = Self { read: true, write: true };
    /// Read only.
    pub const RO: Self = Self { read: true, write: false };
    /// Write only.
    pub const WO: Self = Self { read: false, write: true };

    fn code(self) -> u8 {
        self.read as u8 | (self.write as u8) << 1
    }
}

/// "An IOTLB message": `struct vhost_iotlb_msg` (iova, size, uaddr, perm, type, padded to
/// 32 bytes as the C struct is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbMsg {
    /// The I/O virtual address.
    pub iova: u64,
    /// Bytes (0 for MISS and ACCESS_FAIL).
    pub size: u64,
    /// The front-end's virtual address (UPDATE only).
    pub uaddr: u64,
    /// Permissions.
    pub perm: IotlbPerm,
    /// Which message.
    pub kind: IotlbType,
}

/// Bytes of the IOTLB payload (`sizeof(struct vhost_iotlb_msg)`).
pub const IOTLB_LEN: usize = 32;

impl IotlbMsg {
    /// An UPDATE of `[iova, iova + size)` to `uaddr`.
    pub fn update(iova: u64, size: u64, uaddr: u64, perm: IotlbPerm) -> Self {
        Self { iova, size, uaddr, perm, kind: IotlbType::Update }
    }

    /// An INVALIDATE of `[iova, iova + size)`; `size` `u64::MAX` from 0 is everything.
    pub fn invalidate(iova: u64, size: u64) -> Self {
        let perm = IotlbPerm { read: false, write: false };
        Self { iova, size, uaddr: 0, perm, kind: IotlbType::Invalidate }
    }

    /// A MISS or ACCESS_FAIL at `iova` for `perm`.
    pub fn fault(kind: IotlbType, iova: u64, perm: IotlbPerm) -> Self {
        Self { iova, size: 0, uaddr: 0, perm, kind }
    }

    /// The payload bytes.
    pub fn to_bytes(self) -> [u8; IOTLB_LEN] {
        let mut b = [0; IOTLB_LEN];
        b[0..8].copy_from_slice(&self.iova.to_ne_bytes());
        b[8..16].copy_from_slice(&self.size.to_ne_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_ne_bytes());
        b[24] = self.perm.code();
        b[25] = self.kind.code();
        b
    }

    /// Parses and checks the payload of an IOTLB message with request code `request`:
    /// defined type and permissions; an UPDATE or INVALIDATE covers at least one byte and
    /// an UPDATE's ranges do not wrap.
    pub fn parse(request: u32, b: &[u8]) -> Result<Self, WireError> {
        let b = exact(request, b, IOTLB_LEN, "32 (struct vhost_iotlb_msg)")?;
        let (iova, size, uaddr) = (u64_at(b, 0), u64_at(b, 8), u64_at(b, 16));
        let bad = |field, value| WireError::BadField { request, field, value };
        let perm = match b[24] {
            p @ 0..=3 => IotlbPerm { read: p & 1 != 0, write: p & 2 != 0 },
            p => return Err(bad("permissions", p.into())),
        };
        let kind = match b[25] {
            1 => IotlbType::Miss,
            2 => IotlbType::Update,
            3 => IotlbType::Invalidate,
            4 => IotlbType::AccessFail,
            t => return Err(bad("type", t.into())),
        };
        if matches!(kind, IotlbType::Update | IotlbType::Invalidate) && size == 0 {
            return Err(bad("size", 0));
        }
        if kind == IotlbType::Update {
            // "Addresses and size must be within vhost memory regions": at least no wrap.
            if iova.checked_add(size - 1).is_none() {
                return Err(bad("iova", iova));
            }
            if uaddr.checked_add(size - 1).is_none() {
                return Err(bad("user address", uaddr));
            }
        }
        Ok(Self { iova, size, uaddr, perm, kind })
    }
}

/// A front-end request, parsed. Fds travel beside it (see [`parse_request`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// VHOST_USER_GET_FEATURES.
    GetFeatures,
    /// VHOST_USER_SET_FEATURES.
    SetFeatures(u64),
    /// VHOST_USER_SET_OWNER.
    SetOwner,
    /// VHOST_USER_RESET_OWNER.
    ResetOwner,
    /// VHOST_USER_SET_MEM_TABLE: one fd per region, in order.
    SetMemTable(Vec<MemRegion>),
    /// VHOST_USER_SET_VRING_NUM.
    SetVringNum {
        /// Vring index.
        index: u32,
        /// Queue size.
        num: u32,
    },
    /// VHOST_USER_SET_VRING_ADDR.
    SetVringAddr(VringAddr),
    /// VHOST_USER_SET_VRING_BASE.
    SetVringBase {
        /// Vring index.
        index: u32,
        /// Next available index.
        num: u32,
    },
    /// VHOST_USER_GET_VRING_BASE (stops the ring).
    GetVringBase {
        /// Vring index.
        index: u32,
    },
    /// VHOST_USER_SET_VRING_KICK / CALL / ERR: `fd` tells whether one is passed.
    SetVringFd {
        /// Which of the three.
        request: u32,
        /// Vring index.
        index: u8,
        /// An fd came with it (the invalid-FD flag is clear).
        fd: bool,
    },
    /// VHOST_USER_GET_PROTOCOL_FEATURES.
    GetProtocolFeatures,
    /// VHOST_USER_SET_PROTOCOL_FEATURES.
    SetProtocolFeatures(u64),
    /// VHOST_USER_GET_QUEUE_NUM.
    GetQueueNum,
    /// VHOST_USER_SET_VRING_ENABLE.
    SetVringEnable {
        /// Vring index.
        index: u32,
        /// 1 enables, 0 disables.
        enable: bool,
    },
    /// VHOST_USER_SET_BACKEND_REQ_FD: the back-end channel's socket comes as the fd.
    SetBackendReqFd,
    /// VHOST_USER_IOTLB_MSG.
    Iotlb(IotlbMsg),
    /// VHOST_USER_GET_CONFIG.
    GetConfig {
        /// Offset in config space.
        offset: u32,
        /// Bytes.
        size: u32,
    },
    /// VHOST_USER_SET_CONFIG.
    SetConfig {
        /// Offset in config space.
        offset: u32,
        /// The bytes to write.
        data: Vec<u8>,
    },
}

/// Parses one front-end request: its header (already checked by [`Header::parse`]), payload
/// and the number of fds that came with it. Total over all inputs.
pub fn parse_request(h: &Header, body: &[u8], fds: usize) -> Result<Request, WireError> {
    let r = h.request;
    if h.is_reply() {
        return Err(WireError::ReplyFlag { found: true, expected: false });
    }
    if body.len() != h.size as usize {
        return Err(WireError::BadSize { request: r, size: body.len(), expected: "header size" });
    }
    let want_fds = |n: usize| {
        if fds == n {
            Ok(())
        } else {
            Err(WireError::Fds { request: r, found: fds, expected: n })
        }
    };
    let u64_body = || exact(r, body, 8, "8 (u64)").map(|b| u64_at(b, 0));
    let state = || exact(r, body, 8, "8 (vring state)").map(|b| (u32_at(b, 0), u32_at(b, 4)));
    let bad = |field, value| WireError::BadField { request: r, field, value };
    let msg = match r {
        req::SET_MEM_TABLE => {
            // "num regions, padding, region0 ... region7"; each region is 32 bytes. QEMU
            // sends only the regions it uses.
            let n = if body.len() >= 8 { u32_at(body, 0) as usize } else { usize::MAX };
            if n > MAX_REGIONS {
                return Err(bad("num regions", n as u64));
            }
            if body.len() != 8 + 32 * n && body.len() != 8 + 32 * MAX_REGIONS {
                return Err(WireError::BadSize {
                    request: r,
                    size: body.len(),
                    expected: "8 + 32 * regions",
                });
            }
            want_fds(n)?;
            let regions = (0..n)
                .map(|i| {
                    let at = 8 + 32 * i;
                    MemRegion {
                        guest_addr: u64_at(body, at),
                        size: u64_at(body, at + 8),
                        user_addr: u64_at(body, at + 16),
                        mmap_offset: u64_at(body, at + 24),
                    }
                })
                .collect::<Vec<_>>();
            for m in &regions {
                let wraps = |a: u64| m.size == 0 || a.checked_add(m.size - 1).is_none();
                if wraps(m.user_addr) || wraps(m.guest_addr) || wraps(m.mmap_offset) {
                    return Err(bad("region size", m.size));
                }
            }
            return Ok(Request::SetMemTable(regions));
        }
        req::SET_VRING_KICK | req::SET_VRING_CALL | req::SET_VRING_ERR => {
            let v = u64_body()?;
            if v & !(VRING_INDEX_MASK | VRING_NOFD) != 0 {
                return Err(bad("vring index", v));
            }
            let fd = v & VRING_NOFD == 0;
            want_fds(fd as usize)?;
            return Ok(Request::SetVringFd { request: r, index: (v & VRING_INDEX_MASK) as u8, fd });
        }
        req::SET_BACKEND_REQ_FD => {
            want_fds(1)?;
            // QEMU sends no payload; a u64 is tolerated.
            if !(body.is_empty() || body.len() == 8) {
                return Err(WireError::BadSize {
                    request: r,
                    size: body.len(),
                    expected: "0 or 8",
                });
            }
            return Ok(Request::SetBackendReqFd);
        }
        _ => {
            want_fds(0)?;
            match r {
                req::GET_FEATURES => no_body(r, body, Request::GetFeatures)?,
                req::SET_FEATURES => Request::SetFeatures(u64_body()?),
                req::SET_OWNER => no_body(r, body, Request::SetOwner)?,
                req::RESET_OWNER => no_body(r, body, Request::ResetOwner)?,
                req::SET_VRING_NUM => {
                    let (index, num) = state()?;
                    Request::SetVringNum { index, num }
                }
                req::SET_VRING_BASE => {
                    let (index, num) = state()?;
                    Request::SetVringBase { index, num }
                }
                req::GET_VRING_BASE => Request::GetVringBase { index: state()?.0 },
                req::SET_VRING_ADDR => {
                    let b = exact(r, body, 40, "40 (vring address)")?;
                    Request::SetVringAddr(VringAddr {
                        index: u32_at(b, 0),
                        flags: u32_at(b, 4),
                        desc: u64_at(b, 8),
                        used: u64_at(b, 16),
                        avail: u64_at(b, 24),
                        log: u64_at(b, 32),
                    })
                }
                req::GET_PROTOCOL_FEATURES => no_body(r, body, Request::GetProtocolFeatures)?,
                req::SET_PROTOCOL_FEATURES => Request::SetProtocolFeatures(u64_body()?),
                req::GET_QUEUE_NUM => no_body(r, body, Request::GetQueueNum)?,
                req::SET_VRING_ENABLE => {
                    let (index, num) = state()?;
                    if num > 1 {
                        return Err(bad("enable", num.into()));
                    }
                    Request::SetVringEnable { index, enable: num == 1 }
                }
                req::IOTLB_MSG => Request::Iotlb(IotlbMsg::parse(r, body)?),
                req::GET_CONFIG | req::SET_CONFIG => {
                    // "offset, size, flags, payload": the payload is `size` bytes.
                    if body.len() < 12 {
                        return Err(WireError::BadSize {
                            request: r,
                            size: body.len(),
                            expected: "12 + size",
                        });
                    }
                    let (offset, size) = (u32_at(body, 0), u32_at(body, 4));
                    if size as usize > MAX_CONFIG || body.len() != 12 + size as usize {
                        return Err(bad("config size", size.into()));
                    }
                    if r == req::GET_CONFIG {
                        Request::GetConfig { offset, size }
                    } else {
                        Request::SetConfig { offset, data: body[12..].to_vec() }
                    }
                }
                other => return Err(WireError::Unsupported(other)),
            }
        }
    };
    Ok(msg)
}

/// Parses one back-end channel request, as the front-end receives it: only
/// BACKEND_IOTLB_MSG with MISS or ACCESS_FAIL is spoken here.
pub fn parse_backend_request(h: &Header, body: &[u8], fds: usize) -> Result<IotlbMsg, WireError> {
    if h.is_reply() {
        return Err(WireError::ReplyFlag { found: true, expected: false });
    }
    if h.request != BACKEND_IOTLB_MSG {
        return Err(WireError::Unsupported(h.request));
    }
    if fds != 0 {
        return Err(WireError::Fds { request: h.request, found: fds, expected: 0 });
    }
    let m = IotlbMsg::parse(h.request, body)?;
    match m.kind {
        IotlbType::Miss | IotlbType::AccessFail => Ok(m),
        IotlbType::Update | IotlbType::Invalidate => Err(WireError::BadField {
            request: h.request,
            field: "type on the back-end channel",
            value: m.kind.code().into(),
        }),
    }
}

/// Parses a u64 reply (REPLY_ACK's status, or GET_FEATURES and the like) to `request`.
pub fn parse_u64_reply(request: u32, h: &Header, body: &[u8]) -> Result<u64, WireError> {
    if !h.is_reply() {
        return Err(WireError::ReplyFlag { found: false, expected: true });
    }
    if h.request != request {
        return Err(WireError::WrongReply { found: h.request, expected: request });
    }
    exact(request, body, 8, "8 (u64)").map(|b| u64_at(b, 0))
}

fn no_body(request: u32, body: &[u8], r: Request) -> Result<Request, WireError> {
    // QEMU sends GET_* with no payload; some front-ends send a zero u64.
    match body.len() {
        0 | 8 => Ok(r),
        size => Err(WireError::BadSize { request, size, expected: "0 or 8" }),
    }
}

fn exact<'a>(
    request: u32,
    b: &'a [u8],
    n: usize,
    expected: &'static str,
) -> Result<&'a [u8], WireError> {
    if b.len() == n {
        Ok(b)
    } else {
        Err(WireError::BadSize { request, size: b.len(), expected })
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_ne_bytes(w)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

impl fmt::Display for IotlbType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Miss => "MISS",
            Self::Update => "UPDATE",
            Self::Invalidate => "INVALIDATE",
            Self::AccessFail => "ACCESS_FAIL",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, flags: u32, size: usize) -> Header {
        Header::parse(&Header::new(request, flags, size).to_bytes()).unwrap()
    }

    #[test]
    fn iotlb_round_trips() {
        let m = IotlbMsg::update(0x1000, 0x2000, 0x7f00_0000_1000, IotlbPerm::RO);
        assert_eq!(IotlbMsg::parse(req::IOTLB_MSG, &m.to_bytes()), Ok(m));
        let b = m.to_bytes();
        let h = header(req::IOTLB_MSG, FLAG_NEED_REPLY, b.len());
        assert_eq!(parse_request(&h, &b, 0), Ok(Request::Iotlb(m)));
        assert!(h.need_reply());
    }

    #[test]
    fn malformed_messages_are_errors() {
        let mut b = Header::new(req::GET_FEATURES, 0, 0).to_bytes();
        b[4] = 2; // version 2
        assert_eq!(Header::parse(&b), Err(WireError::BadFlags(2)));
        let b = Header::new(req::SET_MEM_TABLE, 0, 4096).to_bytes();
        assert_eq!(Header::parse(&b), Err(WireError::TooLarge(4096)));
        // An UPDATE that wraps, an unknown type, a zero-size INVALIDATE.
        let mut m = IotlbMsg::update(u64::MAX, 2, 0, IotlbPerm::RW).to_bytes();
        assert!(matches!(IotlbMsg::parse(22, &m), Err(WireError::BadField { field: "iova", .. })));
        m[25] = 9;
        assert!(matches!(IotlbMsg::parse(22, &m), Err(WireError::BadField { field: "type", .. })));
        let z = IotlbMsg::invalidate(0, 0).to_bytes();
        assert!(matches!(IotlbMsg::parse(22, &z), Err(WireError::BadField { field: "size", .. })));
        // Fds where none belong, none where one belongs, an unknown request.
        let h = header(req::SET_FEATURES, 0, 8);
        assert!(matches!(parse_request(&h, &[0; 8], 1), Err(WireError::Fds { .. })));
        let h = header(req::SET_VRING_KICK, 0, 8);
        assert!(matches!(parse_request(&h, &[0; 8], 0), Err(WireError::Fds { .. })));
        let h = header(99, 0, 0);
        assert_eq!(parse_request(&h, &[], 0), Err(WireError::Unsupported(99)));
        // A reply where a request is expected.
        let h = header(req::GET_FEATURES, FLAG_REPLY, 0);
        assert!(matches!(parse_request(&h, &[], 0), Err(WireError::ReplyFlag { .. })));
    }

    #[test]
    fn mem_table_counts_regions_and_fds() {
        let mut b = vec![0u8; 8 + 32];
        b[0] = 1;
        b[8 + 8] = 0x10; // size 0x10
        let h = header(req::SET_MEM_TABLE, 0, b.len());
        assert!(matches!(parse_request(&h, &b, 1), Ok(Request::SetMemTable(r)) if r.len() == 1));
        assert!(matches!(parse_request(&h, &b, 2), Err(WireError::Fds { .. })));
        b[0] = 9;
        assert!(matches!(parse_request(&h, &b, 1), Err(WireError::BadField { .. })));
    }

    #[test]
    fn backend_channel_takes_only_miss_and_access_fail() {
        let miss = IotlbMsg::fault(IotlbType::Miss, 0x1000, IotlbPerm::RO);
        let h = header(BACKEND_IOTLB_MSG, FLAG_NEED_REPLY, IOTLB_LEN);
        assert_eq!(parse_backend_request(&h, &miss.to_bytes(), 0), Ok(miss));
        let up = IotlbMsg::update(0, 1, 0, IotlbPerm::RO).to_bytes();
        assert!(parse_backend_request(&h, &up, 0).is_err());
    }
}
