//! One vhost-user channel over a unix stream socket: messages with their fds (SCM_RIGHTS),
//! framed as [`crate::wire`] says. The fds of a message arrive with its header.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::wire::{Header, WireError, HEADER_LEN, MAX_FDS, MAX_PAYLOAD};

/// Why a channel stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// The peer closed the socket between messages.
    #[error("peer closed the connection")]
    Closed,
    /// A socket error, or the peer closed inside a message.
    #[error("socket: {0}")]
    Io(#[from] io::Error),
    /// The bytes are not a message (see [`WireError`]).
    #[error("protocol: {0}")]
    Wire(#[from] WireError),
}

/// A received message: header, payload (at most [`MAX_PAYLOAD`] bytes) and fds.
#[derive(Debug)]
pub struct Message {
    /// The checked header.
    pub header: Header,
    /// The payload.
    pub body: Vec<u8>,
    /// Fds that came with the header.
    pub files: Vec<File>,
}

/// A vhost-user channel (the front-end socket, or the back-end channel).
#[derive(Debug)]
pub struct Channel {
    sock: UnixStream,
}

impl Channel {
    /// Wraps a connected socket.
    pub fn new(sock: UnixStream) -> Self {
        Self { sock }
    }

    /// The socket (for polling).
    pub fn socket(&self) -> &UnixStream {
        &self.sock
    }

    /// Receives one message. Blocks until its header arrives.
    pub fn recv(&mut self) -> Result<Message, ConnError> {
        let mut hdr = [0u8; HEADER_LEN];
        let mut fds = [-1 as RawFd; MAX_FDS];
        let mut iov = [libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: HEADER_LEN }];
        // SAFETY: the iovec points at `hdr`, which outlives the call and may hold any bytes.
        let (n, nfds) = unsafe { self.sock.recv_with_fds(&mut iov, &mut fds) }
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let nfds = nfds.min(MAX_FDS);
        // SAFETY: the first `nfds` entries are fds the kernel just installed for us; each is
        // owned here exactly once.
        let files: Vec<File> =
            fds[..nfds].iter().map(|&fd| unsafe { File::from_raw_fd(fd) }).collect();
        if n == 0 {
            return Err(ConnError::Closed);
        }
        // A short read: the rest of the header follows on the stream.
        self.sock.read_exact(&mut hdr[n..])?;
        let header = Header::parse(&hdr)?;
        let size = header.size as usize;
        debug_assert!(size <= MAX_PAYLOAD);
        let mut body = vec![0u8; size];
        self.sock.read_exact(&mut body)?;
        Ok(Message { header, body, files })
    }

    /// Sends one message with `fds`.
    pub fn send(&mut self, header: Header, body: &[u8], fds: &[RawFd]) -> Result<(), ConnError> {
        let hdr = header.to_bytes();
        let mut buf = [0u8; HEADER_LEN + MAX_PAYLOAD];
        let len = HEADER_LEN + body.len();
        if body.len() > MAX_PAYLOAD {
            return Err(WireError::TooLarge(body.len() as u32).into());
        }
        buf[..HEADER_LEN].copy_from_slice(&hdr);
        buf[HEADER_LEN..len].copy_from_slice(body);
        let sent = if fds.is_empty() {
            self.sock.write(&buf[..len])?
        } else {
            self.sock
                .send_with_fds(&[&buf[..len]], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))?
        };
        self.sock.write_all(&buf[sent..len])?;
        Ok(())
    }

    /// Sends a request and, if `need_reply`, waits for the REPLY_ACK status of it.
    /// Returns the status (0: success).
    pub fn request(
        &mut self,
        request: u32,
        body: &[u8],
        need_reply: bool,
    ) -> Result<u64, ConnError> {
        let flags = if need_reply { crate::wire::FLAG_NEED_REPLY } else { 0 };
        self.send(Header::new(request, flags, body.len()), body, &[])?;
        if !need_reply {
            return Ok(0);
        }
        self.reply_u64(request)
    }

    /// Waits for a u64 reply to `request`.
    pub fn reply_u64(&mut self, request: u32) -> Result<u64, ConnError> {
        let m = self.recv()?;
        if !m.files.is_empty() {
            return Err(WireError::Fds { request, found: m.files.len(), expected: 0 }.into());
        }
        Ok(crate::wire::parse_u64_reply(request, &m.header, &m.body)?)
    }

    /// Sends a reply to `request` with `body`.
    pub fn reply(&mut self, request: u32, body: &[u8]) -> Result<(), ConnError> {
        self.send(Header::new(request, crate::wire::FLAG_REPLY, body.len()), body, &[])
    }
}
