//! The virtio device: features, config space, the two virtqueues, reset, snapshot.

use std::num::Wrapping;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use viommu_proto::features::{self, bit};
use viommu_proto::{Config, FaultEvent, EVENT_QUEUE, REQUEST_QUEUE};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use zerocopy::IntoBytes;

use crate::config::DeviceConfig;
use crate::error::Error;
use crate::iommu::Iommu;
use crate::listener::{Listener, ListenerId};
use crate::request::{check_writable, gather, scatter};
use crate::snapshot::{DeviceState, QueueSnapshot};

/// Largest queue size the device accepts.
pub const QUEUE_MAX_SIZE: u16 = 1024;

/// The virtio-iommu device a VMM embeds: it owns the virtqueues and shares the
/// [`Iommu`] state with the VMM's other device models.
///
/// ```
/// use viommu_device::{DeviceConfig, EndpointConfig, VirtioIommu};
/// use viommu_proto::features::{bit, BYPASS_CONFIG, VERSION_1};
/// let mut dev = VirtioIommu::new(DeviceConfig {
///     endpoints: vec![EndpointConfig::new(1)],
///     ..Default::default()
/// })
/// .unwrap();
/// assert_ne!(dev.device_features() & bit(VERSION_1), 0);
/// dev.ack_features(bit(VERSION_1) | bit(BYPASS_CONFIG));
/// assert!(dev.write_config(36, &[1])); // bypass := 1
/// let mut b = [0u8];
/// dev.read_config(36, &mut b);
/// assert_eq!(b[0], 1);
/// ```
pub struct VirtioIommu {
    iommu: Arc<Iommu>,
    acked: u64,
    queues: [Queue; 2],
    activated: bool,
    /// Reply buffer: probe_size + tail, reused for every request.
    scratch: Vec<u8>,
}

impl std::fmt::Debug for VirtioIommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioIommu")
            .field("acked", &self.acked)
            .field("activated", &self.activated)
            .field("iommu", &self.iommu)
            .finish_non_exhaustive()
    }
}

fn new_queue() -> Queue {
    Queue::new(QUEUE_MAX_SIZE).expect("QUEUE_MAX_SIZE is a valid queue size")
}

impl VirtioIommu {
    /// A device with the given configuration; nothing negotiated yet.
    pub fn new(cfg: DeviceConfig) -> Result<Self, Error> {
        // Iommu::new validates first: the buffer is sized by a probe_size known to be at
        // most MAX_PROBE_SIZE, never by an unchecked u32.
        let iommu = Iommu::new(cfg)?;
        let scratch = vec![0; iommu.config().probe_size as usize + 4];
        iommu.set_negotiated(0);
        Ok(Self {
            iommu: Arc::new(iommu),
            acked: 0,
            queues: [new_queue(), new_queue()],
            activated: false,
            scratch,
        })
    }

    /// The shared IOMMU state, for translate calls from other device models.
    pub fn iommu(&self) -> Arc<Iommu> {
        self.iommu.clone()
    }

    /// Registers a back-end listener (see [`Iommu::add_listener`]).
    pub fn add_listener(&self, l: Arc<dyn Listener>) -> ListenerId {
        self.iommu.add_listener(l)
    }

    /// Feature bits the device offers.
    pub fn device_features(&self) -> u64 {
        self.iommu.offered_features()
    }

    /// Records the driver's features; bits the device did not offer are ignored.
    pub fn ack_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
        self.iommu.set_negotiated(self.acked);
    }

    /// Features acknowledged so far.
    pub fn acked_features(&self) -> u64 {
        self.acked
    }

    fn config_space(&self) -> Config {
        self.iommu.config().config_space(self.iommu.bypass())
    }

    /// Reads config space; bytes past its end read as zero.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_space();
        let bytes = cfg.as_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok());
            *b = at.and_then(|o| bytes.get(o)).copied().unwrap_or(0);
        }
    }

    /// Writes config space. Only `bypass` is writable, only once BYPASS_CONFIG is
    /// negotiated, and only with 0 or 1 (the spec: "The driver MUST NOT write a value
    /// different than 0 or 1"). Anything else is ignored and returns false.
    pub fn write_config(&mut self, offset: u64, data: &[u8]) -> bool {
        let ok = self.acked & bit(features::BYPASS_CONFIG) != 0
            && offset == Config::BYPASS_OFFSET as u64
            && matches!(data, [0 | 1] | [0 | 1, 0, 0, 0]);
        if ok {
            self.iommu.set_bypass(data[0] == 1);
        }
        ok
    }

    /// Device reset: drops every domain, mapping and pending fault, forgets features and
    /// queues. `bypass` keeps its value ("Field bypass SHOULD NOT change on device reset").
    pub fn reset(&mut self) {
        self.iommu.reset();
        self.acked = 0;
        self.iommu.set_negotiated(0);
        self.queues = [new_queue(), new_queue()];
        self.activated = false;
    }

    /// System reset (e.g. the VM's power cycle): a device reset that also returns `bypass`
    /// to the value the VMM configured ("Field bypass SHOULD NOT change on device reset,
    /// but SHOULD be restored to its initial value on system reset").
    pub fn system_reset(&mut self) {
        self.reset();
        self.iommu.set_bypass(self.iommu.config().bypass);
    }

    /// Sets up one queue (0: requestq, 1: eventq) and marks it ready.
    pub fn set_queue(
        &mut self,
        index: u16,
        size: u16,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), Error> {
        let q = self.queue_mut(index)?;
        q.try_set_size(size)?;
        q.try_set_desc_table_address(GuestAddress(desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(used_ring))?;
        q.set_ready(true);
        Ok(())
    }

    /// Direct access to a queue, for transports that program it field by field.
    pub fn queue_mut(&mut self, index: u16) -> Result<&mut Queue, Error> {
        self.queues.get_mut(usize::from(index)).ok_or(Error::NoSuchQueue(index))
    }

    /// Called at DRIVER_OK: applies EVENT_IDX to both queues.
    pub fn activate(&mut self) -> Result<(), Error> {
        let event_idx = self.acked & bit(features::RING_EVENT_IDX) != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                return Err(Error::QueueNotReady(i as u16));
            }
            q.set_event_idx(event_idx);
        }
        self.activated = true;
        Ok(())
    }

    /// True once [`Self::activate`] succeeded (and until reset).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Handles a notification of the request queue: processes every available chain, and
    /// returns whether the driver must be interrupted — at most once for the whole batch,
    /// and, with EVENT_IDX, only if the driver asked for it.
    ///
    /// An `Err` means the queue itself is unusable (rings outside guest memory, available
    /// index more than a queue ahead): the VMM should set DEVICE_NEEDS_RESET. A malformed
    /// chain is not an error: see [`crate::request`] for what it gets.
    pub fn process_request_queue<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<bool, Error> {
        let Self { iommu, queues, scratch, .. } = self;
        let q = &mut queues[usize::from(REQUEST_QUEUE)];
        if !q.ready() {
            return Err(Error::QueueNotReady(REQUEST_QUEUE));
        }
        iommu.counters_ref().kick();
        let mut used = false;
        loop {
            q.disable_notification(mem)?;
            let pending = pending_chains(q, mem, REQUEST_QUEUE)?;
            for _ in 0..pending {
                let Some(chain) = q.pop_descriptor_chain(mem) else {
                    return Err(Error::BadAvailIndex(REQUEST_QUEUE));
                };
                let head = chain.head_index();
                if head >= q.size() {
                    // No used entry can name it; the driver broke its own ring.
                    iommu.counters_ref().malformed();
                    continue;
                }
                let len = handle_chain(iommu, scratch, chain, mem, q.size());
                q.add_used(mem, head, len)?;
                used = true;
            }
            // Re-enabling may reveal chains added meanwhile; only then go round again.
            if !q.enable_notification(mem)? {
                break;
            }
        }
        let notify = used && q.needs_notification(mem)?;
        if notify {
            iommu.counters_ref().interrupt();
        }
        Ok(notify)
    }

    /// Delivers pending fault events into the driver's event buffers, one event per buffer.
    /// Returns whether the driver must be interrupted. A buffer that is readable or shorter
    /// than a fault event is returned with used length 0 and the event stays pending.
    pub fn process_event_queue<M: GuestMemoryBackend>(&mut self, mem: &M) -> Result<bool, Error> {
        let q = &mut self.queues[usize::from(EVENT_QUEUE)];
        if !q.ready() || self.iommu.pending_faults() == 0 {
            return Ok(false);
        }
        let mut used = false;
        let mut budget = pending_chains(q, mem, EVENT_QUEUE)?;
        while budget > 0 {
            let Some(fault) = self.iommu.front_fault() else { break };
            let Some(chain) = q.pop_descriptor_chain(mem) else { break };
            budget -= 1;
            let head = chain.head_index();
            let ev = fault.event();
            let len = match gather(chain, mem, q.size()) {
                Ok(g)
                    if g.readable_len == 0
                        && check_writable(&g, mem, size_of::<FaultEvent>())
                        && scatter(&g, mem, ev.as_bytes()) =>
                {
                    self.iommu.pop_fault();
                    size_of::<FaultEvent>() as u32
                }
                _ => {
                    self.iommu.counters_ref().malformed();
                    0
                }
            };
            if head < q.size() {
                q.add_used(mem, head, len)?;
                used = true;
            }
        }
        Ok(used && q.needs_notification(mem)?)
    }

    /// The full device state, for live migration.
    pub fn snapshot(&self) -> DeviceState {
        let (domains, faults) = self.iommu.export();
        DeviceState {
            acked_features: self.acked,
            bypass: self.iommu.bypass(),
            activated: self.activated,
            queues: [QueueSnapshot::of(&self.queues[0]), QueueSnapshot::of(&self.queues[1])],
            domains,
            faults,
        }
    }

    /// Replaces the state with a snapshot taken from a device with the same configuration.
    /// A snapshot that does not fit this device is refused, and the device is left as
    /// [`Self::reset`] leaves it: no features, queues not ready, not activated, no domain.
    pub fn restore(&mut self, s: DeviceState) -> Result<(), Error> {
        let result = self.try_restore(s);
        if result.is_err() {
            // Never half restored: a device serving its old queues with the domains gone.
            self.reset();
        }
        result
    }

    fn try_restore(&mut self, s: DeviceState) -> Result<(), Error> {
        if s.acked_features & !self.device_features() != 0 {
            return Err(Error::Snapshot("features not offered by this device".into()));
        }
        // Queues as `set_queue` could have made them: this device's maximum size.
        if s.queues.iter().any(|q| q.max_size != QUEUE_MAX_SIZE || q.size > QUEUE_MAX_SIZE) {
            return Err(Error::Snapshot("queue size beyond this device's maximum".into()));
        }
        let q0 = s.queues[0].to_queue()?;
        let q1 = s.queues[1].to_queue()?;
        self.iommu.import(&s.domains, &s.faults).map_err(Error::Snapshot)?;
        self.acked = s.acked_features;
        self.iommu.set_negotiated(self.acked);
        self.iommu.set_bypass(s.bypass);
        self.queues = [q0, q1];
        self.activated = s.activated;
        Ok(())
    }
}

/// Chains the driver has made available and the device has not taken yet.
fn pending_chains<M: GuestMemoryBackend>(q: &Queue, mem: &M, index: u16) -> Result<u16, Error> {
    let avail = q.avail_idx(mem, Ordering::Acquire)?;
    let pending = (avail - Wrapping(q.next_avail())).0;
    if pending > q.size() {
        return Err(Error::BadAvailIndex(index));
    }
    Ok(pending)
}

/// Runs one request chain; returns the used length.
fn handle_chain<M: GuestMemoryBackend>(
    iommu: &Iommu,
    scratch: &mut [u8],
    chain: DescriptorChain<&M>,
    mem: &M,
    max_descs: u16,
) -> u32 {
    let Ok(g) = gather(chain, mem, max_descs) else {
        iommu.counters_ref().malformed();
        return 0;
    };
    let reply_len = g.reply_len(iommu.config().probe_size);
    if !check_writable(&g, mem, reply_len) {
        iommu.counters_ref().malformed();
        return 0;
    }
    let reply = &mut scratch[..reply_len];
    let used = iommu.handle_request(&g.readable[..g.readable_len], reply);
    if !scatter(&g, mem, &reply[..used as usize]) {
        iommu.counters_ref().malformed();
        return 0;
    }
    used
}
