//! Serializable device state for live migration.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

use crate::domain::Mapping;
use crate::error::Error;
use crate::fault::PendingFault;

/// One domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainState {
    /// Domain ID.
    pub id: u32,
    /// Bypass domain.
    pub bypass: bool,
    /// Attached endpoints, in attach order.
    pub endpoints: Vec<u32>,
    /// Mappings, in address order.
    pub mappings: Vec<Mapping>,
    /// Page-table mode: the guest-physical address of the domain's level-0 table (format
    /// 3), for a domain made by ATTACH_TABLE. The translation cache is not carried: the
    /// restored device walks the table afresh.
    #[serde(default)]
    pub page_table: Option<u64>,
}

/// One virtqueue's registers and positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// Ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// EVENT_IDX in force.
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub(crate) fn of(q: &Queue) -> Self {
        let s = q.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    pub(crate) fn to_queue(self) -> Result<Queue, Error> {
        Ok(Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })?)
    }
}

/// Everything a restored device needs to behave exactly like the original: negotiated
/// features, `bypass`, queue positions, domains with their endpoints and mappings, and
/// pending fault events. The [`crate::DeviceConfig`] is not included: restore onto a device
/// built with the same configuration (endpoints are checked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Acknowledged features.
    pub acked_features: u64,
    /// Config `bypass`.
    pub bypass: bool,
    /// The driver set DRIVER_OK.
    pub activated: bool,
    /// requestq and eventq.
    pub queues: [QueueSnapshot; 2],
    /// Domains, by ID.
    pub domains: Vec<DomainState>,
    /// Pending fault events, oldest first.
    pub faults: Vec<PendingFault>,
}
