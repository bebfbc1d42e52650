//! Device initialisation: reset, features, config, queues.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::sync::Arc;
use alloc::vec;
use core::sync::atomic::Ordering;

use viommu_proto::{features as f, Config, EVENT_QUEUE, REQUEST_QUEUE};

use crate::hal::{DmaBuffer, Hal, PAGE_SIZE};
use crate::iommu::counters::CounterSnapshot;
use crate::iommu::events::{EventQueue, EVENT_BUF};
use crate::iommu::ring::ReqQueue;
use crate::iommu::shared::{Shared, NEXT_IOMMU_ID};
use crate::iommu::types::{DeviceInfo, DriverOptions};
use crate::iommu::Counters;
use crate::queue::SplitQueue;
use crate::sync::{relax, DefaultLocks, Locks, Mutex, Waiter};
use crate::transport::{status, Transport};
use crate::{Error, Result};

/// The virtio-iommu driver. Share it with `Arc<VirtioIommu<..>>`: every
/// method takes `&self`.
pub struct VirtioIommu<T: Transport, H: Hal, L: Locks = DefaultLocks> {
    pub(in crate::iommu) shared: Arc<Shared<T, H, L>>,
}

fn pow2_floor(v: u16) -> u16 {
    if v == 0 {
        0
    } else {
        1 << (15 - v.leading_zeros())
    }
}

/// Reads of the config before `read_config` gives up on a device whose
/// config generation never holds still ([`Error::ConfigUnstable`]).
pub const CONFIG_READ_ATTEMPTS: u32 = 64;

/// Reads the whole config. "Drivers MUST NOT assume reads from fields
/// greater than 32 bits wide are atomic, nor are reads from multiple fields:
/// drivers SHOULD read device configuration space fields like so: [...]
/// `} while (after != before);`" (virtio 1.2 §2.5.1). Repeated at most
/// [`CONFIG_READ_ATTEMPTS`] times and within the wait bounds of `opts`
/// (`spin_limit`, `timeout`): a hostile device may change the generation on
/// every read.
fn read_config<T: Transport>(t: &mut T, opts: &DriverOptions) -> Result<Config> {
    let mut waiter = Waiter::new(opts.spin_limit, opts.timeout);
    for _ in 0..CONFIG_READ_ATTEMPTS {
        let gen = t.config_generation();
        let mut cfg = Config::default();
        t.read_config(0, zerocopy::IntoBytes::as_mut_bytes(&mut cfg));
        if t.config_generation() == gen {
            return Ok(cfg);
        }
        if waiter.poll().is_none() {
            return Err(Error::Timeout);
        }
    }
    Err(Error::ConfigUnstable)
}

impl<T: Transport + 'static, H: Hal + 'static> VirtioIommu<T, H> {
    /// Resets the device, negotiates features (VERSION_1 and MAP_UNMAP are
    /// required), reads the config, writes `bypass`, sets up both queues and
    /// fills the event queue. The driver's locks are the [`DefaultLocks`];
    /// [`Self::with_locks`] takes others.
    pub fn new(transport: T, hal: H, opts: DriverOptions) -> Result<Self> {
        Self::with_locks(transport, hal, opts)
    }
}

impl<T: Transport + 'static, H: Hal + 'static, L: Locks> VirtioIommu<T, H, L> {
    /// As [`VirtioIommu::new`], with the locks of the family `L` (see
    /// [`crate::sync`]), e.g. the kernel's interrupt-masking lock:
    /// `VirtioIommu::<_, _, RawLocks<IrqLock>>::with_locks(t, hal, opts)`.
    pub fn with_locks(mut transport: T, hal: H, opts: DriverOptions) -> Result<Self> {
        match Self::init(&mut transport, &opts) {
            Ok(info) => Self::with_queues(transport, Arc::new(hal), opts, info),
            Err(e) => {
                transport.set_status(status::FAILED);
                Err(e)
            }
        }
    }

    fn init(t: &mut T, opts: &DriverOptions) -> Result<DeviceInfo> {
        t.set_status(0);
        let mut waiter = Waiter::new(opts.spin_limit, opts.timeout);
        while t.status() != 0 {
            if waiter.poll().is_none() {
                return Err(Error::Timeout);
            }
            relax::<L>();
        }
        t.set_status(status::ACKNOWLEDGE);
        t.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = t.device_features();
        for (bit, name) in [(f::VERSION_1, "VERSION_1"), (f::MAP_UNMAP, "MAP_UNMAP")] {
            if offered & f::bit(bit) == 0 {
                return Err(Error::MissingFeature(name));
            }
        }
        let mut wanted = [
            f::VERSION_1,
            f::MAP_UNMAP,
            f::INPUT_RANGE,
            f::DOMAIN_RANGE,
            f::PROBE,
            f::MMIO,
            f::BYPASS_CONFIG,
            f::ACCESS_PLATFORM,
        ]
        .iter()
        .fold(0, |acc, &b| acc | f::bit(b));
        if opts.event_idx {
            wanted |= f::bit(f::RING_EVENT_IDX);
        }
        if opts.indirect_desc {
            wanted |= f::bit(f::RING_INDIRECT_DESC);
        }
        if opts.page_tables {
            wanted |= f::bit(f::ATTACH_TABLE);
        }
        let features = offered & wanted;
        t.set_driver_features(features);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        t.set_status(st);
        if t.status() & status::FEATURES_OK == 0 {
            return Err(Error::FeaturesRejected);
        }
        let cfg = read_config(t, opts)?;
        let has = |b| features & f::bit(b) != 0;
        let page_size_mask = cfg.page_size_mask.get();
        if page_size_mask == 0 {
            return Err(Error::BadConfig("page_size_mask is 0"));
        }
        let input_range = if has(f::INPUT_RANGE) {
            (cfg.input_start.get(), cfg.input_end.get())
        } else {
            (0, u64::MAX)
        };
        let domain_range = if has(f::DOMAIN_RANGE) {
            (cfg.domain_start.get(), cfg.domain_end.get())
        } else {
            (0, u32::MAX)
        };
        if input_range.0 > input_range.1 {
            return Err(Error::BadConfig("empty input_range"));
        }
        if domain_range.0 > domain_range.1 {
            return Err(Error::BadConfig("empty domain_range"));
        }
        let probe_size = if has(f::PROBE) { cfg.probe_size.get() } else { 0 };
        if probe_size > opts.max_probe_size {
            return Err(Error::BadConfig("probe_size too large"));
        }
        if has(f::BYPASS_CONFIG) {
            t.write_config(Config::BYPASS_OFFSET, &[opts.bypass as u8]);
        }
        let rq = pow2_floor(t.max_queue_size(REQUEST_QUEUE).min(opts.request_queue_size));
        if rq < 2 {
            return Err(Error::NoQueue(REQUEST_QUEUE));
        }
        let eq = pow2_floor(t.max_queue_size(EVENT_QUEUE).min(opts.event_buffers));
        if eq == 0 {
            return Err(Error::NoQueue(EVENT_QUEUE));
        }
        Ok(DeviceInfo {
            features,
            page_size_mask,
            input_range,
            domain_range,
            probe_size,
            queue_sizes: (rq, eq),
        })
    }

    fn with_queues(mut t: T, hal: Arc<H>, opts: DriverOptions, info: DeviceInfo) -> Result<Self> {
        let event_idx = info.has(f::RING_EVENT_IDX);
        let built = (|| {
            let indirect = info.has(f::RING_INDIRECT_DESC);
            let req = ReqQueue::new(hal.clone(), info.queue_sizes.0, event_idx, indirect)?;
            let n = info.queue_sizes.1;
            let vq = SplitQueue::new(hal.clone(), EVENT_QUEUE, n, event_idx)?;
            let pages = (n as usize * EVENT_BUF).div_ceil(PAGE_SIZE);
            let bufs = DmaBuffer::new(hal.clone(), pages).ok_or(Error::NoMemory)?;
            let mut ev = EventQueue { vq, bufs, buf_of: vec![0; n as usize] };
            for b in 0..n {
                ev.post(b)?;
            }
            Ok::<_, Error>((req, ev))
        })();
        let (req, mut ev) = match built {
            Ok(v) => v,
            Err(e) => {
                t.set_status(status::FAILED);
                return Err(e);
            }
        };
        req.vq.setup(&mut t);
        ev.vq.setup(&mut t);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        t.set_status(st | status::DRIVER_OK);
        ev.vq.kick(&mut t);
        let used_waiter = t.used_waiter();
        let shared = Shared {
            id: NEXT_IOMMU_ID.fetch_add(1, Ordering::Relaxed),
            info,
            opts,
            transport: Mutex::new(t),
            used_waiter,
            req: Mutex::new(req),
            hal,
            events: Mutex::new(ev),
            fault_handler: Mutex::new(None),
            domain_ids: Mutex::new(BTreeSet::new()),
            endpoints: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        };
        Ok(Self { shared: Arc::new(shared) })
    }

    /// Features and config in use.
    pub fn info(&self) -> DeviceInfo {
        self.shared.info
    }

    /// A snapshot of the counters.
    pub fn counters(&self) -> CounterSnapshot {
        self.shared.counters.snapshot()
    }

    /// Runs `f` on the transport (e.g. to read its own statistics).
    pub fn with_transport<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        f(&mut self.shared.transport.lock())
    }
}

impl<T: Transport, H: Hal, L: Locks> Clone for VirtioIommu<T, H, L> {
    fn clone(&self) -> Self {
        Self { shared: self.shared.clone() }
    }
}
