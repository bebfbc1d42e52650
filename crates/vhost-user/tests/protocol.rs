//! The back-end's message loop against a scripted front-end: what it offers, the order the
//! spec's "IOMMU support" section requires, and malformed or out-of-order messages closing
//! the connection with a typed error (never a panic).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use viommu_vhost_user::backend::{Backend, BackendError};
use viommu_vhost_user::blk::BlockDevice;
use viommu_vhost_user::conn::{Channel, ConnError};
use viommu_vhost_user::wire::{
    self as wire, features, protocol, req, Header, IotlbMsg, IotlbPerm, WireError, FLAG_NEED_REPLY,
};

fn memfd(len: u64) -> File {
    // SAFETY: a NUL-terminated name, no other pointer.
    let fd = unsafe { libc::memfd_create(c"vhost-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here only.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn start() -> (Channel, JoinHandle<Result<(), BackendError>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let dev = BlockDevice::new(memfd(1 << 20), "disk").unwrap();
    let mut backend = Backend::new(dev, b);
    (Channel::new(a), std::thread::spawn(move || backend.run()))
}

fn get(c: &mut Channel, request: u32) -> u64 {
    c.send(Header::new(request, 0, 0), &[], &[]).unwrap();
    c.reply_u64(request).unwrap()
}

/// Negotiates what an IOMMU needs, with the back-end channel and a 1 MiB memory table at
/// user address 0x7000_0000. Returns the front-end's end of the back-end channel.
fn negotiate(c: &mut Channel) -> Channel {
    negotiate_with_ram(c).0
}

/// [`negotiate`], also returning the memory table's file (guest-physical 0 at offset 0).
fn negotiate_with_ram(c: &mut Channel) -> (Channel, File) {
    let p = protocol::REPLY_ACK | protocol::BACKEND_REQ;
    c.request(req::SET_PROTOCOL_FEATURES, &p.to_ne_bytes(), false).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    c.send(Header::new(req::SET_BACKEND_REQ_FD, FLAG_NEED_REPLY, 0), &[], &[theirs.as_raw_fd()])
        .unwrap();
    assert_eq!(c.reply_u64(req::SET_BACKEND_REQ_FD).unwrap(), 0);
    let f = features::VERSION_1 | features::ACCESS_PLATFORM | features::PROTOCOL_FEATURES;
    assert_eq!(c.request(req::SET_FEATURES, &f.to_ne_bytes(), true).unwrap(), 0);
    let ram = memfd(1 << 20);
    let mut table = vec![0u8; 40];
    table[0] = 1;
    table[16..24].copy_from_slice(&(1u64 << 20).to_ne_bytes());
    table[24..32].copy_from_slice(&0x7000_0000u64.to_ne_bytes());
    c.send(Header::new(req::SET_MEM_TABLE, FLAG_NEED_REPLY, 40), &table, &[ram.as_raw_fd()])
        .unwrap();
    assert_eq!(c.reply_u64(req::SET_MEM_TABLE).unwrap(), 0);
    (Channel::new(ours), ram)
}

fn closed_with(c: &mut Channel, backend: JoinHandle<Result<(), BackendError>>) -> BackendError {
    let err = backend.join().unwrap().expect_err("the back-end must close the connection");
    assert!(matches!(c.recv(), Err(ConnError::Closed)), "the socket is closed");
    err
}

#[test]
fn offers_what_an_iommu_needs() {
    let (mut c, backend) = start();
    let f = get(&mut c, req::GET_FEATURES);
    let need = features::VERSION_1 | features::ACCESS_PLATFORM | features::PROTOCOL_FEATURES;
    assert_eq!(f & need, need);
    let p = get(&mut c, req::GET_PROTOCOL_FEATURES);
    let need = protocol::REPLY_ACK | protocol::BACKEND_REQ | protocol::CONFIG;
    assert_eq!(p & need, need);
    // GET_CONFIG: capacity in sectors at offset 0.
    let mut body = vec![0u8; 12 + 8];
    body[4..8].copy_from_slice(&8u32.to_ne_bytes());
    c.send(Header::new(req::GET_CONFIG, 0, body.len()), &body, &[]).unwrap();
    let m = c.recv().unwrap();
    assert!(m.header.is_reply());
    assert_eq!(u64::from_le_bytes(m.body[12..20].try_into().unwrap()), 2048);
    drop(c);
    backend.join().unwrap().unwrap();
}

#[test]
fn iotlb_before_access_platform_closes_the_connection() {
    let (mut c, backend) = start();
    let m = IotlbMsg::update(0, 0x1000, 0x7000_0000, IotlbPerm::RW);
    c.request(req::IOTLB_MSG, &m.to_bytes(), false).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(err.to_string().contains("IOTLB_MSG before ACCESS_PLATFORM"), "{err}");
}

#[test]
fn access_platform_without_reply_ack_and_backend_req_is_refused() {
    let (mut c, backend) = start();
    let f = features::VERSION_1 | features::ACCESS_PLATFORM | features::PROTOCOL_FEATURES;
    c.request(req::SET_FEATURES, &f.to_ne_bytes(), false).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(err.to_string().contains("REPLY_ACK and BACKEND_REQ"), "{err}");
}

#[test]
fn malformed_messages_close_the_connection() {
    // A header of version 2.
    let (mut c, backend) = start();
    let mut h = Header::new(req::GET_FEATURES, 0, 0);
    h.flags = 2;
    c.send(h, &[], &[]).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(matches!(err, BackendError::Conn(ConnError::Wire(WireError::BadFlags(2)))), "{err}");
    // An IOTLB message of an undefined type, after a good negotiation.
    let (mut c, backend) = start();
    let _back = negotiate(&mut c);
    let mut b = IotlbMsg::update(0, 0x1000, 0x7000_0000, IotlbPerm::RW).to_bytes();
    b[25] = 9;
    c.request(req::IOTLB_MSG, &b, false).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(err.to_string().contains("bad type"), "{err}");
    // A front-end sending MISS (a back-end channel message) on the main socket.
    let (mut c, backend) = start();
    let _back = negotiate(&mut c);
    let miss = IotlbMsg::fault(viommu_vhost_user::wire::IotlbType::Miss, 0, IotlbPerm::RO);
    c.request(req::IOTLB_MSG, &miss.to_bytes(), false).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(err.to_string().contains("front-end sent IOTLB MISS"), "{err}");
    // A second queue on a one-queue device.
    let (mut c, backend) = start();
    c.request(req::SET_VRING_NUM, &[1, 0, 0, 0, 16, 0, 0, 0], false).unwrap();
    let err = closed_with(&mut c, backend);
    assert!(err.to_string().contains("one queue"), "{err}");
}

/// "Addresses and size must be within vhost memory regions ... On success, the back-end is
/// expected to reply with a zero payload, non-zero otherwise." A refused UPDATE is not a
/// protocol error: the connection goes on.
#[test]
fn iotlb_messages_are_acknowledged() {
    let (mut c, backend) = start();
    let _back = negotiate(&mut c);
    let inside = IotlbMsg::update(0x1000, 0x1000, 0x7000_0000, IotlbPerm::RW);
    assert_eq!(c.request(req::IOTLB_MSG, &inside.to_bytes(), true).unwrap(), 0);
    let past_end =
        IotlbMsg::update(0x1000, 0x2000, 0x7000_0000 + (1 << 20) - 0x1000, IotlbPerm::RO);
    assert_eq!(c.request(req::IOTLB_MSG, &past_end.to_bytes(), true).unwrap(), 1);
    let inval = IotlbMsg::invalidate(0, u64::MAX);
    assert_eq!(c.request(req::IOTLB_MSG, &inval.to_bytes(), true).unwrap(), 0);
    assert_ne!(get(&mut c, req::GET_FEATURES), 0);
    drop(c);
    backend.join().unwrap().unwrap();
}

fn eventfd() -> File {
    // SAFETY: no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here only.
    unsafe { File::from_raw_fd(fd) }
}

/// Ring 0 of 16 entries at guest-physical (and IOVA) 0: descriptors, available ring at
/// 0x1000, used ring at 0x2000.
fn set_ring(c: &mut Channel, kick: &File, call: &File) {
    let state = |a: u32, b: u32| [a.to_ne_bytes(), b.to_ne_bytes()].concat();
    assert_eq!(c.request(req::SET_VRING_NUM, &state(0, 16), true).unwrap(), 0);
    assert_eq!(c.request(req::SET_VRING_BASE, &state(0, 0), true).unwrap(), 0);
    let mut addr = vec![0u8; 40];
    for (k, v) in [0u64, 0x2000, 0x1000, 0].into_iter().enumerate() {
        addr[8 + 8 * k..16 + 8 * k].copy_from_slice(&v.to_ne_bytes());
    }
    assert_eq!(c.request(req::SET_VRING_ADDR, &addr, true).unwrap(), 0);
    for (r, f) in [(req::SET_VRING_CALL, call), (req::SET_VRING_KICK, kick)] {
        c.send(Header::new(r, FLAG_NEED_REPLY, 8), &0u64.to_ne_bytes(), &[f.as_raw_fd()]).unwrap();
        assert_eq!(c.reply_u64(r).unwrap(), 0);
    }
    assert_eq!(c.request(req::SET_VRING_ENABLE, &state(0, 1), true).unwrap(), 0);
}

/// Makes available, as entry `n` of the ring, a request of an unknown type whose header
/// and status are in the page at guest-physical (and IOVA) `page`.
fn make_available(ram: &File, n: u16, page: u64) {
    use std::os::unix::fs::FileExt;
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    let head = 2 * (n % 8);
    ram.write_all_at(&0xffu32.to_le_bytes(), page).unwrap();
    ram.write_all_at(&desc(page, 16, 1, head + 1), 16 * u64::from(head)).unwrap();
    ram.write_all_at(&desc(page + 512, 1, 2, 0), 16 * u64::from(head + 1)).unwrap();
    ram.write_all_at(&head.to_le_bytes(), 0x1004 + 2 * u64::from(n % 16)).unwrap();
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    ram.write_all_at(&(n + 1).to_le_bytes(), 0x1002).unwrap();
}

/// Waits for the used index to reach `idx`; panics on a MISS on the back-end channel.
fn wait_used(ram: &File, back: &Channel, idx: u16) {
    use std::os::unix::fs::FileExt;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let mut b = [0u8; 2];
        ram.read_exact_at(&mut b, 0x2002).unwrap();
        if u16::from_le_bytes(b) == idx {
            return;
        }
        let mut p =
            libc::pollfd { fd: back.socket().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut p, 1, 10) };
        assert_eq!(p.revents, 0, "the back-end asked (MISS) for what was on the socket");
        assert!(std::time::Instant::now() < deadline, "no used entry within 20 s");
    }
}

/// An UPDATE already on the socket when the back-end finds a gap in a chain is applied
/// first: no MISS goes out for it. Here the gap is found when the back-end has read as
/// many messages as it reads at one wake-up, and the UPDATE is the next one.
#[test]
fn a_gap_is_looked_up_again_after_the_messages_on_the_socket() {
    let (mut c, backend) = start();
    let (back, ram) = negotiate_with_ram(&mut c);
    let (kick, call) = (eventfd(), eventfd());
    set_ring(&mut c, &kick, &call);
    let update = |iova: u64| IotlbMsg::update(iova, 0x1000, 0x7000_0000 + iova, IotlbPerm::RW);
    for iova in [0, 0x1000, 0x2000, 0x10000] {
        assert_eq!(c.request(req::IOTLB_MSG, &update(iova).to_bytes(), true).unwrap(), 0);
    }
    // A first request starts the ring.
    make_available(&ram, 0, 0x10000);
    std::io::Write::write_all(&mut &kick, &1u64.to_ne_bytes()).unwrap();
    wait_used(&ram, &back, 1);
    // A reply means the back-end is back in its loop, with nothing left to serve.
    assert_ne!(get(&mut c, req::GET_FEATURES), 0);

    // The second request's page is the 257th UPDATE, in one write with 256 others.
    make_available(&ram, 1, 0x20000);
    let mut burst = Vec::new();
    for iova in std::iter::repeat_n(0x40000, 256).chain([0x20000]) {
        burst.extend(Header::new(req::IOTLB_MSG, 0, wire::IOTLB_LEN).to_bytes());
        burst.extend(update(iova).to_bytes());
    }
    std::io::Write::write_all(&mut c.socket(), &burst).unwrap();
    wait_used(&ram, &back, 2);
    drop(c);
    backend.join().unwrap().unwrap();
}
