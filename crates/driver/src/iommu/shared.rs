//! The state one IOMMU shares between its handles and domains, and the
//! request path: submit, kick, wait.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::{Arc, Weak};
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;

use viommu_proto::{Request, REQUEST_QUEUE};

use crate::hal::Hal;
use crate::iommu::counters::bump;
use crate::iommu::domain::DomainInner;
use crate::iommu::encode::{detach_req, Reqs};
use crate::iommu::events::EventQueue;
use crate::iommu::ring::ReqQueue;
use crate::iommu::types::{DeviceInfo, DriverOptions, ResvRegion};
use crate::iommu::{Counters, FaultHandler, Port, Replies, Ticket, Tickets};
use crate::sync::{relax, Locks, Mutex, Waiter};
use crate::transport::{status, Transport, UsedWaiter};
use crate::{Error, Result};

pub(in crate::iommu) static NEXT_IOMMU_ID: AtomicU64 = AtomicU64::new(1);

pub(in crate::iommu) struct EndpointState<L: Locks> {
    /// Domain ID and domain, while attached.
    pub(in crate::iommu) domain: Option<(u32, Weak<DomainInner<L>>)>,
    /// Reserved regions once probed.
    pub(in crate::iommu) resv: Option<Vec<ResvRegion>>,
    /// Regions given by the platform.
    pub(in crate::iommu) extra: Vec<ResvRegion>,
    /// PROBE listed page-table format 3 (drafts).
    pub(in crate::iommu) table_format: bool,
}

/// One endpoint's state behind its own lock.
pub(in crate::iommu) type EndpointLock<L> = Arc<Mutex<L, EndpointState<L>>>;

impl<L: Locks> Default for EndpointState<L> {
    fn default() -> Self {
        Self { domain: None, resv: None, extra: Vec::new(), table_format: false }
    }
}

pub(in crate::iommu) struct Shared<T: Transport, H: Hal, L: Locks> {
    pub(in crate::iommu) id: u64,
    pub(in crate::iommu) info: DeviceInfo,
    pub(in crate::iommu) opts: DriverOptions,
    pub(in crate::iommu) transport: Mutex<L, T>,
    /// Waits for completions without the transport lock, if the transport has one.
    pub(in crate::iommu) used_waiter: Option<Box<dyn UsedWaiter>>,
    pub(in crate::iommu) req: Mutex<L, ReqQueue<H>>,
    /// Where page-table domains get their table pages.
    pub(in crate::iommu) hal: Arc<dyn Hal>,
    pub(in crate::iommu) events: Mutex<L, EventQueue<H>>,
    pub(in crate::iommu) fault_handler: Mutex<L, Option<FaultHandler>>,
    pub(in crate::iommu) domain_ids: Mutex<L, BTreeSet<u32>>,
    /// Per-endpoint state, each behind its own lock: the table lock is held
    /// only to find an entry, never across a request.
    pub(in crate::iommu) endpoints: Mutex<L, BTreeMap<u32, EndpointLock<L>>>,
    pub(in crate::iommu) counters: Counters,
}

impl<T: Transport, H: Hal, L: Locks> Shared<T, H, L> {
    /// The lock of one endpoint's state, created on first use.
    pub(in crate::iommu) fn endpoint(&self, endpoint: u32) -> EndpointLock<L> {
        self.endpoints.lock().entry(endpoint).or_default().clone()
    }

    pub(in crate::iommu) fn notify(&self, queue: u16) {
        self.transport.lock().notify(queue);
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
    /// notifies, waits for the device and goes on. Tickets go to `tickets`.
    fn submit_into(&self, reqs: &Reqs<'_>, props: usize, tickets: &mut Tickets) -> Result<()> {
        // Started at the first wait: most calls never wait (reading the clock is not free).
        let mut waiter = None;
        tickets.reserve(reqs.len());
        loop {
            let need = {
                let mut q = self.req.lock();
                q.reap();
                let before = tickets.len();
                let added = q.add_from(reqs, props, tickets);
                // One index write for the whole batch.
                q.vq.publish();
                self.count_requests(reqs, before, tickets.len());
                added?;
                if tickets.len() == reqs.len() {
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
        let c = &self.counters;
        match reqs {
            Reqs::Any(_) => (from..to).for_each(|i| c.requests(reqs.request_type(i), 1)),
            _ => c.requests(reqs.request_type(from), (to - from) as u64),
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
            None => relax::<L>(),
        }
        Ok(())
    }
}

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> Shared<T, H, L> {
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

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> Port for Shared<T, H, L> {
    fn submit(&self, req: &Request, props: usize) -> Result<Ticket> {
        let mut tickets = Tickets::new();
        self.submit_into(&Reqs::Any(core::slice::from_ref(req)), props, &mut tickets)?;
        tickets.pop().ok_or(Error::Timeout)
    }

    fn submit_all(&self, reqs: Reqs<'_>) -> Result<Tickets, (Tickets, Error)> {
        let mut tickets = Tickets::new();
        match self.submit_into(&reqs, 0, &mut tickets) {
            Ok(()) => Ok(tickets),
            Err(e) => Err((tickets, e)),
        }
    }

    fn kick(&self) {
        let need = self.prepare_kick(&mut self.req.lock());
        if need {
            self.notify(REQUEST_QUEUE);
        }
    }

    fn wait(&self, tickets: &[Ticket]) -> Result<Replies> {
        self.sync_until(|q| q.take(tickets))
    }

    fn wait_complete(&self, tickets: &[Ticket]) -> Result<()> {
        self.sync_until(|q| {
            let live = q.outstanding();
            tickets.iter().all(|s| live.binary_search(s).is_err()).then_some(())
        })
    }

    fn outstanding(&self, tickets: &[Ticket]) -> Vec<Ticket> {
        let mut q = self.req.lock();
        q.reap();
        let live = q.outstanding();
        tickets.iter().copied().filter(|s| live.binary_search(s).is_ok()).collect()
    }

    fn abandon(&self, tickets: &[Ticket]) {
        let mut q = self.req.lock();
        for &ticket in tickets {
            if !q.forget(ticket) && ticket.0 < q.next_seq {
                q.abandoned.insert(ticket);
            }
        }
    }

    fn try_take(&self, tickets: &[Ticket]) -> Option<Replies> {
        let mut q = self.req.lock();
        q.reap();
        q.take(tickets)
    }

    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn domain_dropped(&self, id: u32, mut pending: Vec<Ticket>) {
        {
            let all: Vec<(u32, EndpointLock<L>)> =
                self.endpoints.lock().iter().map(|(&ep, st)| (ep, st.clone())).collect();
            // The endpoints of this domain stay locked until their DETACH is
            // done (in ID order, the only place that takes several).
            let mut held = Vec::new();
            for (ep, lock) in &all {
                let mut st = lock.lock();
                if matches!(st.domain, Some((d, _)) if d == id) {
                    st.domain = None;
                    if let Ok(ticket) = self.submit(&detach_req(id, *ep), 0) {
                        pending.push(ticket);
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

impl<T: Transport, H: Hal, L: Locks> Drop for Shared<T, H, L> {
    fn drop(&mut self) {
        // Reset the device before the rings and buffers are freed.
        self.transport.lock().set_status(0);
    }
}
