//! Hooks for back-ends (VFIO, vhost) that must follow the guest's IOMMU programming.

use crate::domain::Mapping;

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
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use viommu_device::{Listener, Mapping};
/// #[derive(Default)]
/// struct Log(Mutex<Vec<String>>);
/// impl Listener for Log {
///     fn on_map(&self, endpoint: u32, m: &Mapping) {
///         self.0.lock().unwrap().push(format!("map {endpoint} {:#x}", m.start));
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
    /// `endpoint` can now reach `mapping`.
    fn on_map(&self, endpoint: u32, mapping: &Mapping) {
        let _ = (endpoint, mapping);
    }
    /// `endpoint` can no longer reach `mapping`.
    fn on_unmap(&self, endpoint: u32, mapping: &Mapping) {
        let _ = (endpoint, mapping);
    }
}
