//! The virtio-iommu device driver (virtio 1.2 §5.13).
//!
//! # Reading map
//! In the order a request travels:
//! - `types`: the public types (options, device info, mappings, regions,
//!   faults); `counters`: what the driver counts.
//! - Request plumbing: `encode` (requests as bytes, straight into their
//!   ring slot), `ring` (the request queue: slots, tickets, reaping),
//!   `replies` (answers by ticket, what a failure means), `port` (the
//!   interface a domain uses to reach its IOMMU), `shared` (the IOMMU's
//!   shared state: submit, kick, wait).
//! - [`VirtioIommu`]: `device` (initialisation), `endpoints` (PROBE,
//!   reserved regions), `attach` (domains, attach and detach), `events`
//!   (the fault event queue).
//! - [`Domain`]: `domain` (the handle and the IOMMU operations),
//!   `domain::state` (what it keeps under its lock), `domain::settle`
//!   (ordering against the ring, rollback, stale MAPs), `domain::dma` (the
//!   interface of the DMA layer), `domain::table` (page-table mode: entries
//!   and INVALIDATE); `tree` (the mapping tree); `pgtable` (the format-3
//!   I/O page table of a page-table domain, in DMA memory).
//!
//! # Locks
//! All of them come from the [`Locks`](crate::sync::Locks) family the
//! embedder chose (see [`crate::sync`] for which calls an interrupt handler
//! may make).
//! - `endpoints` (one per IOMMU): endpoint ID → that endpoint's lock. Held
//!   only to find an entry, never across a request.
//! - endpoint (one per endpoint): its domain and reserved regions. Held
//!   across its own attach and detach, so that two attaches of one endpoint
//!   cannot interleave; endpoints never wait on each other. Only the drop of
//!   a domain's last handle holds several (its endpoints, in ID order).
//! - `Domain::state` (one per domain): the endpoint set **and** the mapping
//!   tree. A MAP is queued under it, so an attach's replay and a concurrent
//!   map can neither miss nor double a mapping; a DETACH is queued and
//!   completed under it, so no MAP slips in behind the last DETACH.
//! - `req` (one per IOMMU): the request virtqueue and its buffers. Held only to
//!   add requests or reap completions, never across a notify or a wait.
//! - `fault_handler` (one per IOMMU): held for one `poll_events` call, while
//!   the handler runs; `events` (the event queue) only while one buffer is
//!   taken and posted again, never while the handler runs.
//! - `transport`: taken alone, for a notify or a register access. Never held
//!   across a wait when the transport gives a [`UsedWaiter`](crate::transport::UsedWaiter): waiting threads
//!   block on it with no lock held, so a kick never queues behind a wait.
//!   (Without one, a waiting thread only *tries* the lock to call
//!   `wait_for_used`, and yields when it is busy.)
//!
//! Order: endpoint → domain state → req; fault_handler → events; transport
//! is never taken with req or events held. A sync waits for its own
//! tickets: it kicks, then reaps completions (whoever reaps records every
//! reply by ticket) until its tickets are done, so no thread holds a lock
//! while another thread's sync waits on the device. Only attach/detach wait
//! under an endpoint's and a domain's lock, because correctness needs it.
//!
//! ```
//! # #[cfg(feature = "test-utils")] {
//! # mod device { include!("../../tests/common/device.rs"); }
//! use viommu_driver::{DriverOptions, Prot, VirtioIommu};
//! // The fake transport around the device crate's model.
//! let fake = device::FakeDevice::default();
//! let iommu = VirtioIommu::new(fake.transport(), fake.hal(), DriverOptions::default()).unwrap();
//! let domain = iommu.alloc_paging(1).unwrap();
//! iommu.attach(&domain, 1).unwrap();
//! domain.map_pages(0x10_0000, 0x8000_0000, 0x2000, Prot::READ | Prot::WRITE).unwrap();
//! domain.iotlb_sync_map(0x10_0000, 0x2000).unwrap(); // one kick, one sync
//! assert_eq!(domain.iova_to_phys(0x10_1234), Some(0x8000_1234));
//! assert_eq!(domain.unmap_pages(0x10_0000, 0x2000).unwrap(), 0x2000);
//! domain.iotlb_sync().unwrap();
//! assert_eq!(iommu.counters().map, 1);
//! # }
//! ```

mod attach;
mod counters;
mod device;
mod domain;
mod encode;
mod endpoints;
mod events;
mod pgtable;
mod port;
mod replies;
mod ring;
mod shared;
mod tree;
mod types;

pub use counters::{CounterSnapshot, BATCH_BUCKETS};
pub use device::{VirtioIommu, CONFIG_READ_ATTEMPTS};
pub use domain::Domain;
pub use types::{
    DeviceInfo, DomainKind, DriverOptions, FaultHandler, FaultRecord, FlushCause, Mapping, Prot,
    ResvKind, ResvRegion,
};

pub(crate) use counters::Counters;
pub(crate) use endpoints::merge_regions;
pub(crate) use port::{Port, Ticket, Tickets, UnmapTicket, UnmapTickets};
pub(crate) use replies::{Replies, Reply};
