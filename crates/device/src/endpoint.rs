//! The endpoints the VMM configured: a fixed table, so finding one needs no lock; only
//! each endpoint's attachment is behind its own `RwLock`.

use std::sync::{Arc, RwLock};

use crate::config::{EndpointConfig, ResvRegion};
use crate::domain::Domain;

/// One endpoint: fixed reserved regions plus the domain it is attached to.
#[derive(Debug)]
pub struct Endpoint {
    /// Endpoint ID.
    pub id: u32,
    /// Reserved regions, as configured.
    pub resv: Vec<ResvRegion>,
    /// The domain this endpoint translates through, if attached.
    pub attached: RwLock<Option<Arc<Domain>>>,
}

impl Endpoint {
    /// The first reserved region intersecting `[start, end]`.
    #[inline]
    pub fn resv_hit(&self, start: u64, end: u64) -> Option<&ResvRegion> {
        self.resv.iter().find(|r| r.overlaps(start, end))
    }
}

/// All endpoints, sorted by ID.
#[derive(Debug, Default)]
pub struct EndpointTable {
    ids: Vec<u32>,
    slots: Vec<Endpoint>,
}

impl EndpointTable {
    /// Builds the table from the VMM's list (IDs already checked unique).
    pub fn new(cfg: &[EndpointConfig]) -> Self {
        let mut eps: Vec<&EndpointConfig> = cfg.iter().collect();
        eps.sort_by_key(|e| e.id);
        Self {
            ids: eps.iter().map(|e| e.id).collect(),
            slots: eps
                .iter()
                .map(|e| Endpoint { id: e.id, resv: e.resv.clone(), attached: RwLock::new(None) })
                .collect(),
        }
    }

    /// The endpoint with this ID.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&Endpoint> {
        self.ids.binary_search(&id).ok().map(|i| &self.slots[i])
    }

    /// All endpoints, by ID.
    pub fn iter(&self) -> impl Iterator<Item = &Endpoint> {
        self.slots.iter()
    }
}
