//! Hooks for back-ends (VFIO, vhost) that must follow the guest's IOMMU programming.

use viommu_proto::Status;

use crate::domain::Mapping;

/// Why a back-end could not follow a mapping; the request fails with the matching status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenerError {
    /// Out of resources (e.g. memory the back-end may pin): NOMEM.
    #[error("back-end out of resources")]
    NoMem,
    /// Any other back-end failure: DEVERR.
    #[error("back-end failure")]
    DevErr,
}

impl ListenerError {
    /// The status the failed request gets.
    pub fn status(self) -> Status {
        match self {
            Self::NoMem => Status::NoMem,
            Self::DevErr => Status::DevErr,
        }
    }
}

/// Told about every change to what an endpoint can reach, per endpoint.
///
/// Calls are made from the thread processing requests, in order, while requests are
/// serialised. A request completes (its used entry is written) only after its calls return,
/// so an UNMAP is not acknowledged before the back-end has dropped the mapping.
///
/// Contract:
/// - [`on_attach`](Self::on_attach) is followed by one [`on_map`](Self::on_map) per mapping the
///   domain already holds, so the back-end can mirror it.
/// - [`on_detach`](Self::on_detach) means: drop every mapping of this endpoint. No per-mapping
///   `on_unmap` precedes it. Device reset detaches every attached endpoint this way.
/// - [`on_map`](Self::on_map) may refuse. A refused MAP fails (NOMEM or DEVERR) and the
///   endpoints already told get `on_unmap`; the mapping is never visible to translate. A
///   refused replay after `on_attach` fails the ATTACH and detaches the endpoint (`on_detach`).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use viommu_device::{Listener, ListenerError, Mapping};
/// #[derive(Default)]
/// struct Log(Mutex<Vec<String>>);
/// impl Listener for Log {
///     fn on_map(&self, endpoint: u32, m: &Mapping) -> Result<(), ListenerError> {
///         self.0.lock().unwrap().push(format!("map {endpoint} {:#x}", m.start));
///         Ok(())
///     }
/// }
/// let log: Arc<dyn Listener> = Arc::new(Log::default());
/// # let _ = log;
/// ```
pub trait Listener: Send + Sync {
    /// `endpoint` now translates through `domain` (identity if `bypass`).
    fn on_attach(&self, endpoint: u32, domain: u32, bypass: bool) {
        let _ = (endpoint, domain, bypass);
    }
    /// `endpoint` left `domain`; all its mappings are gone.
    fn on_detach(&self, endpoint: u32, domain: u32) {
        let _ = (endpoint, domain);
    }
    /// `endpoint` can now reach `mapping`, unless this returns an error.
    fn on_map(&self, endpoint: u32, mapping: &Mapping) -> Result<(), ListenerError> {
        let _ = (endpoint, mapping);
        Ok(())
    }
    /// `endpoint` can no longer reach `mapping`.
    fn on_unmap(&self, endpoint: u32, mapping: &Mapping) {
        let _ = (endpoint, mapping);
    }
}
