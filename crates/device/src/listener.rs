//! Hooks for back-ends (VFIO, vhost, an IOTLB outside the device) that must follow the
//! guest's IOMMU programming. The full contract is in docs/device.md, "Listener contract".

use std::sync::Arc;

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

/// Told about every change to what an endpoint can reach.
///
/// Any number of listeners can be registered ([`crate::Iommu::add_listener`]); each event
/// goes to every listener, in registration order. Calls are made from the thread that
/// changes the state (request processing, config writes, reset, restore), one at a time,
/// and before that change is reported done: before the request's used entry is written, or
/// before the config write, reset or restore returns.
///
/// - Access taken away (UNMAP, DETACH, an ATTACH that moves the endpoint, bypass turned off,
///   reset): the device stops granting it first, then tells listeners. A lookup made after
///   the call has begun sees the new state, so a cache flushed in the call stays clean.
/// - Access granted (MAP): listeners are told first; the mapping becomes visible to
///   translate only once every listener accepted it.
/// - [`on_attach`](Self::on_attach) is followed by one [`on_map`](Self::on_map) per mapping
///   the domain already holds. [`on_detach`](Self::on_detach) means: drop every mapping of
///   this endpoint; no `on_unmap` precedes it.
/// - A listener must not call back into the request path (requests, config writes, reset,
///   restore, [`crate::Iommu::add_listener`], [`crate::Iommu::mappings`]): those wait for
///   the call to return. [`crate::Iommu::translate`] and [`crate::Iommu::lookup`] are fine.
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
    /// `endpoint` now translates through `domain`; `bypass`: it is a bypass (identity)
    /// domain, which it stays for its whole life.
    fn on_attach(&self, endpoint: u32, domain: u32, bypass: bool) {
        let _ = (endpoint, domain, bypass);
    }
    /// `endpoint` left `domain`; all its mappings are gone.
    fn on_detach(&self, endpoint: u32, domain: u32) {
        let _ = (endpoint, domain);
    }
    /// `endpoint` can now reach `mapping`, unless this returns an error. A refused MAP
    /// fails with the error's status, and the endpoints and listeners already told get
    /// `on_unmap`; a refused replay after `on_attach` fails the ATTACH (`on_detach`).
    fn on_map(&self, endpoint: u32, mapping: &Mapping) -> Result<(), ListenerError> {
        let _ = (endpoint, mapping);
        Ok(())
    }
    /// One call per UNMAP request and attached endpoint: the request's range
    /// `[start, end]` and every mapping it removed, in address order. An UNMAP that
    /// removes nothing, or fails, makes no call.
    fn on_unmap(&self, endpoint: u32, start: u64, end: u64, removed: &[Mapping]) {
        let _ = (endpoint, start, end, removed);
    }
    /// Global bypass (what unattached endpoints get: identity if `on`, nothing otherwise)
    /// changed, through the config `bypass` field or legacy BYPASS being negotiated.
    fn on_bypass(&self, on: bool) {
        let _ = on;
    }
    /// The device was reset (or is being restored): every domain and mapping is gone.
    /// `on_detach` for each attached endpoint precedes it.
    fn on_reset(&self) {}
    /// Page-table mode (experimental): `endpoint` now translates through `domain`, whose
    /// I/O page table (format 3) has its level-0 table at guest-physical `root`. No
    /// `on_map` follows: a back-end walks the table itself or fills its cache with
    /// [`crate::Iommu::lookup`]. A refusal fails the ATTACH_TABLE with the error's status,
    /// leaving the endpoint detached (`on_detach`).
    ///
    /// The default treats it as [`on_attach`](Self::on_attach) of a (non-bypass) domain.
    fn on_attach_table(&self, endpoint: u32, domain: u32, root: u64) -> Result<(), ListenerError> {
        let _ = root;
        self.on_attach(endpoint, domain, false);
        Ok(())
    }
    /// Page-table mode: an INVALIDATE of `domain` covering `[start, end]` (`0..=u64::MAX`
    /// for a domain-wide one); one call per attached endpoint, after the device emptied
    /// its own cache and before the INVALIDATE completes. What `endpoint` reached in that
    /// range may have changed: drop it from any cache.
    ///
    /// The default forwards to [`on_unmap`](Self::on_unmap) with nothing in `removed`, so
    /// a back-end that flushes its cache there follows page-table domains unchanged.
    fn on_invalidate(&self, endpoint: u32, domain: u32, start: u64, end: u64) {
        let _ = domain;
        self.on_unmap(endpoint, start, end, &[]);
    }
}

/// Names a registered listener, for [`crate::Iommu::remove_listener`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenerId(u64);

type Registered = (ListenerId, Arc<dyn Listener>);

/// The registered listeners, in registration order. Copied on change, so a request takes
/// its own reference and no lock is held while listeners run.
#[derive(Clone, Default)]
pub(crate) struct Listeners {
    list: Option<Arc<[Registered]>>,
    next: u64,
}

impl Listeners {
    pub(crate) fn add(&mut self, l: Arc<dyn Listener>) -> ListenerId {
        let id = ListenerId(self.next);
        self.next += 1;
        let mut v: Vec<_> = self.list.iter().flat_map(|a| a.iter().cloned()).collect();
        v.push((id, l));
        self.list = Some(v.into());
        id
    }

    pub(crate) fn remove(&mut self, id: ListenerId) -> bool {
        let Some(list) = &self.list else { return false };
        let v: Vec<_> = list.iter().filter(|(i, _)| *i != id).cloned().collect();
        let found = v.len() < list.len();
        self.list = (!v.is_empty()).then(|| v.into());
        found
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_none()
    }

    /// Every listener, in registration order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &dyn Listener> + Clone {
        self.list.iter().flat_map(|a| a.iter()).map(|(_, l)| &**l)
    }

    /// Tells every (endpoint, listener) pair about `m`, endpoint by endpoint. On a refusal,
    /// the pairs already told get `on_unmap` and the refusal is returned.
    pub(crate) fn map(&self, endpoints: &[u32], m: &Mapping) -> Result<(), ListenerError> {
        let pairs = endpoints.iter().flat_map(|&e| self.iter().map(move |l| (e, l)));
        for (n, (e, l)) in pairs.clone().enumerate() {
            if let Err(err) = l.on_map(e, m) {
                for (e, l) in pairs.take(n) {
                    l.on_unmap(e, m.start, m.end, std::slice::from_ref(m));
                }
                return Err(err);
            }
        }
        Ok(())
    }

    /// Tells every (endpoint, listener) pair that `domain` uses the table at `root`.
    pub(crate) fn attach_table(
        &self,
        endpoint: u32,
        domain: u32,
        root: u64,
    ) -> Result<(), ListenerError> {
        self.iter().try_for_each(|l| l.on_attach_table(endpoint, domain, root))
    }

    /// One `on_invalidate` per endpoint and listener.
    pub(crate) fn invalidate(&self, endpoints: &[u32], domain: u32, start: u64, end: u64) {
        for &e in endpoints {
            for l in self.iter() {
                l.on_invalidate(e, domain, start, end);
            }
        }
    }

    /// One `on_unmap` per endpoint and listener, unless nothing was removed.
    pub(crate) fn unmap(&self, endpoints: &[u32], start: u64, end: u64, removed: &[Mapping]) {
        if removed.is_empty() {
            return;
        }
        for &e in endpoints {
            for l in self.iter() {
                l.on_unmap(e, start, end, removed);
            }
        }
    }
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners").field("count", &self.iter().count()).finish()
    }
}
