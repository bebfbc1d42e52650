//! The request queue: requests in 128-byte slots (or a buffer of their own),
//! tickets, reaping completions.

use alloc::collections::BTreeSet;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use smallvec::SmallVec;
use viommu_proto::{ReqHead, ReqTail, RequestType, Status, REQUEST_QUEUE};

use crate::hal::{DmaBuffer, Hal, PAGE_SIZE};
use crate::iommu::encode::Reqs;
use crate::iommu::replies::TicketSet;
use crate::iommu::{Replies, Reply, Ticket, Tickets};
use crate::queue::{Buffer, QueueError, SplitQueue};
use crate::{Error, Result};

/// The most bytes of head + body of a request that goes in a slot: every
/// type but PROBE (whose properties follow its body), the drafts'
/// ATTACH_TABLE (80) and INVALIDATE (60) included.
const fn largest_slot_request() -> usize {
    let mut max = 0;
    let mut i = 0;
    while i < RequestType::COUNT {
        let t = RequestType::ALL[i];
        let len = size_of::<ReqHead>() + t.body_len();
        if !matches!(t, RequestType::Probe) && len > max {
            max = len;
        }
        i += 1;
    }
    max
}

/// Request buffers are 128-byte slots: head + body at 0, the
/// device-writable tail at [`TAIL_OFF`]. A power of two, so no slot
/// straddles a page.
const SLOT_SIZE: usize = 128;
/// Where the tail starts in a slot, and so the most bytes of head + body a
/// slot holds: the largest request but PROBE, 8-byte aligned. A PROBE gets
/// a buffer of its own.
const TAIL_OFF: usize = largest_slot_request().next_multiple_of(8);
/// The tail (status + reserved bytes) of every request.
const TAIL_LEN: usize = size_of::<ReqTail>();

const _: () = {
    assert!(TAIL_OFF + TAIL_LEN <= SLOT_SIZE);
    assert!(PAGE_SIZE % SLOT_SIZE == 0);
    // ATTACH_TABLE (84 bytes with head and tail) is the largest.
    assert!(TAIL_OFF == 80);
};

/// `Inflight::slot` of a request with a buffer of its own (PROBE).
const OWN_BUF: u16 = u16::MAX;

struct Inflight {
    ticket: Ticket,
    request: RequestType,
    /// Its request slot, or [`OWN_BUF`].
    slot: u16,
}

/// The buffer of a request too big for a slot (PROBE), while in flight.
struct OwnBuf<H: Hal> {
    head: u16,
    region: DmaBuffer<Arc<H>>,
    readable: usize,
    props: usize,
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

pub(in crate::iommu) struct ReqQueue<H: Hal> {
    hal: Arc<H>,
    pub(in crate::iommu) vq: SplitQueue<H>,
    slots: DmaBuffer<Arc<H>>,
    free_slots: Vec<u16>,
    inflight: Vec<Option<Inflight>>,
    /// Buffers of PROBEs in flight.
    own: Vec<OwnBuf<H>>,
    /// Tickets that succeeded with nothing to hand over, until their owner
    /// takes them: one range for a batch, instead of one record each.
    ok: TicketSet,
    /// Other replies (failures, PROBE properties) by ticket, sorted.
    replies: Vec<(Ticket, Reply)>,
    /// Tickets whose waiter gave up: their replies are dropped on arrival.
    pub(in crate::iommu) abandoned: BTreeSet<Ticket>,
    pub(in crate::iommu) next_seq: u64,
    /// Requests made available but not yet covered by a notify.
    pub(in crate::iommu) unkicked: u64,
}

impl<H: Hal> ReqQueue<H> {
    pub(in crate::iommu) fn new(
        hal: Arc<H>,
        size: u16,
        event_idx: bool,
        indirect: bool,
    ) -> Result<Self> {
        let mut vq = SplitQueue::new(hal.clone(), REQUEST_QUEUE, size, event_idx)?;
        // A request is 2 buffers: 2 descriptors, or 1 pointing to its table.
        let nslots = if indirect {
            vq.enable_indirect(2)?;
            size
        } else {
            (size / 2).max(1)
        };
        let pages = (nslots as usize * SLOT_SIZE).div_ceil(PAGE_SIZE);
        let slots = DmaBuffer::new(hal.clone(), pages).ok_or(Error::NoMemory)?;
        let mut inflight = Vec::new();
        inflight.resize_with(size as usize, || None);
        Ok(Self {
            hal,
            vq,
            slots,
            free_slots: (0..nslots).rev().collect(),
            inflight,
            own: Vec::new(),
            ok: TicketSet::default(),
            replies: Vec::new(),
            abandoned: BTreeSet::new(),
            next_seq: 0,
            unkicked: 0,
        })
    }

    /// Adds `reqs[tickets.len()..]` in order, without publishing them, until
    /// the ring or the slots are full. Tickets go to `tickets`.
    pub(in crate::iommu) fn add_from(
        &mut self,
        reqs: &Reqs<'_>,
        props: usize,
        tickets: &mut Tickets,
    ) -> Result<()> {
        // Tickets of one lock hold are consecutive: appended in one go.
        let (first, start) = (self.next_seq, tickets.len());
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
        tickets.extend((first..self.next_seq).map(Ticket));
        result
    }

    /// Adds request `i` in a slot; `None` when the ring or the slots are full.
    fn add_slot(&mut self, reqs: &Reqs<'_>, i: usize) -> Option<Ticket> {
        let &slot = self.free_slots.last()?;
        let off = slot as usize * SLOT_SIZE;
        let len = reqs.encoded_len(i);
        // The slot is free: the device does not own it. The request takes at
        // most TAIL_OFF bytes (checked by the caller).
        let mut req = [0u8; TAIL_OFF];
        reqs.encode(i, &mut req);
        self.slots.write(off, &req[..len]);
        self.slots.write(off + TAIL_OFF, &[0; TAIL_LEN]);
        let bus = self.slots.paddr() + off as u64;
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
    fn add_own(&mut self, reqs: &Reqs<'_>, i: usize, props: usize) -> Result<Option<Ticket>> {
        let len = reqs.encoded_len(i);
        let pages = (len + props + TAIL_LEN).div_ceil(PAGE_SIZE);
        let mut region = DmaBuffer::new(self.hal.clone(), pages).ok_or(Error::NoMemory)?;
        let mut req = vec![0u8; len];
        reqs.encode(i, &mut req);
        region.write(0, &req);
        let bus = region.paddr();
        let bufs = [
            Buffer::readable(bus, len as u32),
            Buffer::writable(bus + len as u64, (props + TAIL_LEN) as u32),
        ];
        match self.vq.add_unpublished(&bufs) {
            Ok(head) => {
                self.own.push(OwnBuf { head, region, readable: len, props });
                Ok(Some(self.track(head, reqs.request_type(i), OWN_BUF)))
            }
            // The device never saw the buffer, which goes with `region`.
            Err(QueueError::Full) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn track(&mut self, head: u16, request: RequestType, slot: u16) -> Ticket {
        let ticket = Ticket(self.next_seq);
        self.next_seq += 1;
        self.inflight[head as usize] = Some(Inflight { ticket, request, slot });
        ticket
    }

    /// Pops every completion and records its reply under its ticket.
    pub(in crate::iommu) fn reap(&mut self) {
        while let Some(used) = self.vq.pop_used() {
            let Some(inf) = self.inflight[used.token as usize].take() else { continue };
            let mut props = Vec::new();
            let status = if inf.slot != OWN_BUF {
                // The device finished writing before it returned the chain,
                // and pop_used fenced after seeing it.
                let mut status = [0u8];
                self.slots.read(inf.slot as usize * SLOT_SIZE + TAIL_OFF, &mut status);
                self.free_slots.push(inf.slot);
                status[0]
            } else {
                let Some(k) = self.own.iter().position(|o| o.head == used.token) else { continue };
                let own = self.own.swap_remove(k);
                let mut tail = [0u8; TAIL_LEN];
                props.resize(own.props, 0);
                // The device has returned the buffer, freed at the end of this arm.
                own.region.read(own.readable, &mut props);
                own.region.read(own.readable + own.props, &mut tail);
                tail[0]
            };
            let result = reply_result(inf.request, used.len, status);
            if !self.abandoned.is_empty() && self.abandoned.remove(&inf.ticket) {
                continue;
            }
            if result.is_ok() && props.is_empty() {
                self.ok.insert(inf.ticket);
                continue;
            }
            let reply = (inf.ticket, Reply { result, props });
            match self.replies.last() {
                Some(&(last, _)) if last > inf.ticket => {
                    let at = self.replies.partition_point(|(t, _)| *t < inf.ticket);
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
    pub(in crate::iommu) fn outstanding(&self) -> Vec<Ticket> {
        let mut live: Vec<Ticket> = self.inflight.iter().flatten().map(|i| i.ticket).collect();
        live.sort_unstable();
        live
    }

    fn find_reply(&self, ticket: Ticket) -> Option<usize> {
        self.replies.binary_search_by_key(&ticket, |r| r.0).ok()
    }

    /// Takes the replies of `tickets` if all are in. A run of consecutive
    /// successful tickets is checked and taken in one step.
    pub(in crate::iommu) fn take(&mut self, tickets: &[Ticket]) -> Option<Replies> {
        let n = self.ok.run_len(tickets);
        if n > 0 && n == tickets.len() {
            // The usual case: one run of consecutive successes.
            self.ok.remove_run(tickets[0], n);
            return Some(Replies { len: n, others: Vec::new() });
        }
        // Steps: the length of each run of successes found, 0 for a reply
        // kept as a record. Found first, taken only if all are in.
        let mut steps: SmallVec<[usize; 4]> = SmallVec::new();
        let mut i = 0;
        while i < tickets.len() {
            match self.ok.run_len(&tickets[i..]) {
                0 if self.find_reply(tickets[i]).is_some() => i += 1,
                0 => return None,
                n => i += n,
            }
            steps.push(i);
        }
        let mut out = Replies { len: tickets.len(), others: Vec::new() };
        let mut i = 0;
        for end in steps {
            if end - i == 1 && !self.ok.contains(tickets[i]) {
                if let Some(k) = self.find_reply(tickets[i]) {
                    out.others.push((i, self.replies.remove(k).1));
                }
            } else {
                self.ok.remove_run(tickets[i], end - i);
            }
            i = end;
        }
        Some(out)
    }

    /// Drops the reply of `ticket` if it is in; false if it is not.
    pub(in crate::iommu) fn forget(&mut self, ticket: Ticket) -> bool {
        if self.ok.contains(ticket) {
            self.ok.remove_run(ticket, 1);
            return true;
        }
        match self.find_reply(ticket) {
            Some(k) => {
                self.replies.remove(k);
                true
            }
            None => false,
        }
    }
}
