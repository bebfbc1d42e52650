//! The interface domains use to reach their IOMMU's request queue.

use alloc::vec::Vec;

use smallvec::SmallVec;
use viommu_proto::Request;

use crate::iommu::encode::Reqs;
use crate::iommu::{Counters, Replies};
use crate::{Error, Result};

/// A request on the ring, named by the order it was queued in: its reply
/// is recorded under it until its owner takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Ticket(pub(in crate::iommu) u64);

/// The tickets of one batch of requests: a few fit inline (no heap use per I/O).
pub(crate) type Tickets = SmallVec<[Ticket; 4]>;

/// An UNMAP on the ring and the IOVA range `[first, last]` it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UnmapTicket {
    /// The UNMAP request.
    pub(crate) ticket: Ticket,
    /// First IOVA.
    pub(crate) first: u64,
    /// Last IOVA, inclusive.
    pub(crate) last: u64,
}

/// The UNMAPs of one flush or unmap: a few fit inline.
pub(crate) type UnmapTickets = SmallVec<[UnmapTicket; 2]>;

#[cfg(test)]
impl UnmapTicket {
    /// An UNMAP of `[first, last]` with ticket number `n`, for the DMA layer's unit tests.
    pub(crate) fn for_test(n: u64, first: u64, last: u64) -> Self {
        Self { ticket: Ticket(n), first, last }
    }
}

/// What domains need from their IOMMU, without its type parameters.
pub(crate) trait Port: Send + Sync {
    /// Queues a request (PROBE with `props` bytes of properties) and returns
    /// its ticket. Waits for ring space when the ring is full.
    fn submit(&self, req: &Request, props: usize) -> Result<Ticket>;
    /// Queues several requests in order with few lock holds. On failure,
    /// the tickets of those queued before it come with the error.
    fn submit_all(&self, reqs: Reqs<'_>) -> Result<Tickets, (Tickets, Error)>;
    /// One sync: kicks, then waits until every ticket has a reply.
    fn wait(&self, tickets: &[Ticket]) -> Result<Replies>;
    /// The replies of `tickets` if all are in, without kicking or waiting.
    fn try_take(&self, tickets: &[Ticket]) -> Option<Replies>;
    /// Nobody will take the replies of `tickets` (their wait gave up): drop
    /// them when they come. Their ring slots stay in use until then.
    fn abandon(&self, tickets: &[Ticket]);
    /// One sync: kicks, then waits until the device has returned every
    /// ticket, without taking the replies (their owners do).
    fn wait_complete(&self, tickets: &[Ticket]) -> Result<()>;
    /// Those of `tickets` the device has not returned yet.
    fn outstanding(&self, tickets: &[Ticket]) -> Vec<Ticket>;
    /// [`Self::wait`]; if it gives up, the tickets are abandoned.
    fn wait_or_abandon(&self, tickets: &[Ticket]) -> Result<Replies> {
        self.wait(tickets).inspect_err(|_| self.abandon(tickets))
    }
    /// Notifies the device if requests are waiting for a notify.
    fn kick(&self);
    fn counters(&self) -> &Counters;
    /// The last handle of domain `id` is gone: detach what is still attached
    /// and free the ID.
    fn domain_dropped(&self, id: u32, pending: Vec<Ticket>);
}
