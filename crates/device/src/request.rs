//! Walking one request chain in guest memory: gather the device-readable bytes, find the
//! device-writable buffers, and scatter the reply back.
//!
//! Outcomes for malformed chains (the chain is always returned to the driver, and the device
//! keeps serving the queue):
//! - no descriptor, a readable descriptor after a writable one, a chain cut short (a loop,
//!   a `next` index past the table, more descriptors than the queue size — indirect tables
//!   included —, or an unreadable descriptor), a buffer outside guest memory: used length 0,
//!   nothing executed;
//! - indirect tables (VIRTIO_F_RING_INDIRECT_DESC), walked by virtio-queue: a nested table,
//!   a table whose length is 0 or not a multiple of 16, a loop inside a table, or a table
//!   outside guest memory cut the chain short (used length 0 as above); the WRITE flag of
//!   the descriptor naming a table is ignored, and direct descriptors followed by one
//!   table are served, as the split-ring rules require;
//! - a readable part too short for its request type, or a writable part shorter than the
//!   tail: used length 0, nothing executed (§5.13.6: "it returns the buffers without writing
//!   to them");
//! - a head index past the queue: no used entry can name it; it is counted and skipped.

use smallvec::SmallVec;
use viommu_proto::{AttachTableBody, ProbeBody, ReqHead, RequestType};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// The most readable bytes any request needs: the head and the largest body (ATTACH_TABLE,
/// 76 bytes, then PROBE, 68).
pub const MAX_READABLE: usize =
    size_of::<ReqHead>() + max(size_of::<ProbeBody>(), size_of::<AttachTableBody>());

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

/// Why a chain could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// No descriptor at all.
    Empty,
    /// A device-readable descriptor follows a device-writable one.
    WrongOrder,
    /// The chain ends on a descriptor that still has NEXT set: a loop, a bad index, or too long.
    Truncated,
    /// A buffer is not in guest memory.
    OutOfMemory,
}

/// A gathered request.
#[derive(Debug)]
pub(crate) struct Gathered {
    /// The first readable bytes.
    pub(crate) readable: [u8; MAX_READABLE],
    /// How many of them are valid.
    pub(crate) readable_len: usize,
    /// The device-writable buffers, in order.
    pub(crate) writable: SmallVec<[(GuestAddress, u32); 4]>,
    /// Their total length.
    pub(crate) writable_len: u64,
}

impl Gathered {
    /// Bytes of the writable part the reply may use: the tail, plus properties for PROBE.
    pub(crate) fn reply_len(&self, probe_size: u32) -> usize {
        let need = match RequestType::from_u8(self.readable[0]) {
            Some(RequestType::Probe) => probe_size as usize + 4,
            _ => 4,
        };
        self.writable_len.min(need as u64) as usize
    }
}

/// Walks `chain`, copying at most [`MAX_READABLE`] readable bytes, and refuses a chain of
/// more than `max_descs` descriptors ("A driver MUST NOT create a descriptor chain longer
/// than the Queue Size of the device"). virtio-queue bounds a direct chain by the queue
/// size but an indirect table only by its own length (up to 65535 entries), so without
/// this cap one chain could cost 65535 descriptor reads and as many buffer entries.
pub(crate) fn gather<M: GuestMemoryBackend>(
    chain: DescriptorChain<&M>,
    mem: &M,
    max_descs: u16,
) -> Result<Gathered, ChainError> {
    let mut g = Gathered {
        readable: [0; MAX_READABLE],
        readable_len: 0,
        writable: SmallVec::new(),
        writable_len: 0,
    };
    let mut last_has_next = None;
    for (n, desc) in chain.enumerate() {
        if n >= usize::from(max_descs) {
            return Err(ChainError::Truncated);
        }
        last_has_next = Some(desc.has_next());
        if desc.is_write_only() {
            g.writable.push((desc.addr(), desc.len()));
            g.writable_len += u64::from(desc.len());
        } else {
            if !g.writable.is_empty() {
                return Err(ChainError::WrongOrder);
            }
            let take = (desc.len() as usize).min(MAX_READABLE - g.readable_len);
            let buf = &mut g.readable[g.readable_len..g.readable_len + take];
            mem.read_slice(buf, desc.addr()).map_err(|_| ChainError::OutOfMemory)?;
            g.readable_len += take;
        }
    }
    match last_has_next {
        None => Err(ChainError::Empty),
        Some(true) => Err(ChainError::Truncated),
        Some(false) => Ok(g),
    }
}

/// Checks that the first `len` bytes of the writable buffers are in guest memory.
pub(crate) fn check_writable<M: GuestMemoryBackend>(g: &Gathered, mem: &M, len: usize) -> bool {
    let mut left = len;
    for &(addr, n) in &g.writable {
        if left == 0 {
            break;
        }
        let n = (n as usize).min(left);
        if !mem.check_range(addr, n) {
            return false;
        }
        left -= n;
    }
    left == 0
}

/// Scatters `data` over the writable buffers.
pub(crate) fn scatter<M: GuestMemoryBackend>(g: &Gathered, mem: &M, mut data: &[u8]) -> bool {
    for &(addr, n) in &g.writable {
        if data.is_empty() {
            break;
        }
        let n = (n as usize).min(data.len());
        if mem.write_slice(&data[..n], addr).is_err() {
            return false;
        }
        data = &data[n..];
    }
    data.is_empty()
}
