//! The interface domains use to reach their IOMMU's request queue.

use alloc::vec::Vec;

use smallvec::SmallVec;
use viommu_proto::Request;

use crate::iommu::encode::Reqs;
use crate::iommu::{Counters, Replies};
use crate::{Error, Result};

/// Tickets of one batch of requests: a few fit inline (no heap use per I/O).
pub(crate) type Seqs = SmallVec<[u64; 4]>;

/// A queued request of a domain: `(seq, first IOVA, last IOVA)`.
pub(crate) type Ticket = (u64, u64, u64);

/// The UNMAP tickets of one flush or unmap: a few fit inline.
pub(crate) type Tickets = SmallVec<[Ticket; 2]>;

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
