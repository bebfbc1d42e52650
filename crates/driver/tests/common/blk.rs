// A virtio-blk device behind the IOMMU, as a virtio-drivers `Transport`,
// for the adapter tests: virtio-drivers' own `VirtIOBlk` and `VirtQueue`
// drive it. It serves the split ring at each notify, and reaches every
// byte (rings, descriptors, buffers) through a `BusDma`, that is through
// the IOMMU's translation. The in-process VM's tests include this file
// too; paths are spelled in full for that reason.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// The device's DMA: bus addresses (IOVAs) in, bytes out; false on a fault.
pub trait BusDma: Send {
    /// Reads `buf.len()` bytes at `addr`.
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
    /// Writes `data` at `addr`.
    fn write(&self, addr: u64, data: &[u8]) -> bool;
}

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM.
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// VIRTIO_F_INDIRECT_DESC.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// Sectors of the disk.
pub const SECTORS: u64 = 256;
/// Bytes of a sector.
pub const SECTOR: usize = 512;
/// The queue size the device allows.
const QUEUE_MAX: u32 = 16;

/// What the device counted, shared with the test (the transport moves into the driver).
#[derive(Debug, Default)]
pub struct BlkCounts {
    /// Notifies of queue 0.
    pub kicks: AtomicU64,
    /// Requests served.
    pub requests: AtomicU64,
    /// Accesses the IOMMU refused.
    pub faults: AtomicU64,
    /// Features the driver accepted.
    pub features: AtomicU64,
    /// The device status, as it stuck.
    pub status: AtomicU64,
}

impl BlkCounts {
    /// `(kicks, requests, faults)`.
    pub fn get(&self) -> (u64, u64, u64) {
        (self.kicks.load(Relaxed), self.requests.load(Relaxed), self.faults.load(Relaxed))
    }
}

/// A chain's device-readable bytes and device-writable `(addr, len)`s.
type Chain = (Vec<u8>, Vec<(u64, u32)>);

#[derive(Default)]
struct Queue {
    size: u32,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
    last_avail: u16,
    used_idx: u16,
}

/// The device.
pub struct BlkDevice<D: BusDma> {
    dma: D,
    offered: u64,
    accepted: u64,
    status: u32,
    queue: Queue,
    disk: Vec<u8>,
    counts: Arc<BlkCounts>,
}

impl<D: BusDma> BlkDevice<D> {
    /// A device with `disk` (SECTORS sectors) offering VERSION_1,
    /// ACCESS_PLATFORM and `extra` features.
    pub fn new(dma: D, disk: Vec<u8>, extra: u64) -> Self {
        assert_eq!(disk.len(), SECTORS as usize * SECTOR);
        Self {
            dma,
            offered: F_VERSION_1 | F_ACCESS_PLATFORM | extra,
            accepted: 0,
            status: 0,
            queue: Queue::default(),
            disk,
            counts: Arc::default(),
        }
    }

    /// The counts, shared.
    pub fn counts(&self) -> Arc<BlkCounts> {
        self.counts.clone()
    }

    fn fault(&self) {
        self.counts.faults.fetch_add(1, Relaxed);
    }

    fn read_u16(&self, addr: u64) -> Option<u16> {
        let mut b = [0u8; 2];
        self.dma.read(addr, &mut b).then(|| u16::from_le_bytes(b))
    }

    /// The chain at `head`: readable bytes and writable `(addr, len)`s, or
    /// `None` when a descriptor cannot be read or the chain is too long.
    fn chain(&self, head: u16) -> Option<Chain> {
        let q = &self.queue;
        let (mut table, mut n, mut i) = (q.desc, q.size, head);
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        for _ in 0..2 * QUEUE_MAX {
            let mut d = [0u8; 16];
            if i as u32 >= n || !self.dma.read(table + 16 * u64::from(i), &mut d) {
                return None;
            }
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(d[14..16].try_into().unwrap());
            if flags & 4 != 0 {
                // INDIRECT: the table replaces the rest of the chain.
                (table, n, i) = (addr, len / 16, 0);
                continue;
            }
            if flags & 2 != 0 {
                writable.push((addr, len));
            } else {
                let at = readable.len();
                readable.resize(at + len as usize, 0);
                if !self.dma.read(addr, &mut readable[at..]) {
                    return None;
                }
            }
            if flags & 1 == 0 {
                return Some((readable, writable));
            }
            i = next;
        }
        None
    }

    /// Serves one request; returns the bytes written to the driver.
    fn serve(&mut self, readable: &[u8], writable: &[(u64, u32)]) -> u32 {
        let Some((&(status_addr, _), data)) = writable.split_last() else { return 0 };
        let kind = readable.get(0..4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let sector = readable.get(8..16).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let (Some(kind), Some(sector)) = (kind, sector) else { return 0 };
        let at = sector as usize * SECTOR;
        let mut status = 0u8;
        let mut written = 0;
        match kind {
            // IN: disk to memory.
            0 => {
                for &(addr, len) in data {
                    let end = at + written as usize + len as usize;
                    let ok = self
                        .disk
                        .get(at + written as usize..end)
                        .is_some_and(|src| self.dma.write(addr, src));
                    if !ok {
                        status = 1;
                        break;
                    }
                    written += len;
                }
            }
            // OUT: memory to disk.
            1 => {
                let body = &readable[16..];
                match self.disk.get_mut(at..at + body.len()) {
                    Some(dst) => dst.copy_from_slice(body),
                    None => status = 1,
                }
            }
            _ => status = 2,
        }
        if !self.dma.write(status_addr, &[status]) {
            self.fault();
        }
        written + 1
    }

    /// Serves every available chain (at most a queue's worth).
    fn process(&mut self) {
        if !self.queue.ready || self.status & DeviceStatus::DRIVER_OK.bits() == 0 {
            return;
        }
        for _ in 0..self.queue.size {
            let (avail, size) = (self.queue.avail, self.queue.size as u16);
            let Some(idx) = self.read_u16(avail + 2) else { return self.fault() };
            if idx == self.queue.last_avail {
                return;
            }
            let slot = u64::from(self.queue.last_avail % size);
            let Some(head) = self.read_u16(avail + 4 + 2 * slot) else { return self.fault() };
            self.queue.last_avail = self.queue.last_avail.wrapping_add(1);
            let len = match self.chain(head) {
                Some((r, w)) => {
                    self.counts.requests.fetch_add(1, Relaxed);
                    self.serve(&r, &w)
                }
                None => {
                    self.fault();
                    0
                }
            };
            let used = self.queue.used;
            let slot = u64::from(self.queue.used_idx % size);
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            self.queue.used_idx = self.queue.used_idx.wrapping_add(1);
            let idx = self.queue.used_idx.to_le_bytes();
            if !self.dma.write(used + 4 + 8 * slot, &elem) || !self.dma.write(used + 2, &idx) {
                return self.fault();
            }
        }
    }
}

impl<D: BusDma> Transport for BlkDevice<D> {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }
    fn read_device_features(&mut self) -> u64 {
        self.offered
    }
    fn write_driver_features(&mut self, driver_features: u64) {
        self.accepted = driver_features;
        self.counts.features.store(driver_features, Relaxed);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        if queue == 0 {
            QUEUE_MAX
        } else {
            0
        }
    }
    fn notify(&mut self, queue: u16) {
        if queue == 0 {
            self.counts.kicks.fetch_add(1, Relaxed);
            self.process();
        }
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.status)
    }
    /// As QEMU: FEATURES_OK does not stick when an offered ACCESS_PLATFORM
    /// was not accepted.
    fn set_status(&mut self, status: DeviceStatus) {
        let mut s = status.bits();
        if s == 0 {
            self.queue = Queue::default();
        }
        let refused =
            self.offered & F_ACCESS_PLATFORM != 0 && self.accepted & F_ACCESS_PLATFORM == 0;
        if refused {
            s &= !(DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK).bits();
        }
        self.status = s;
        self.counts.status.store(s.into(), Relaxed);
    }
    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        false
    }
    fn queue_set(&mut self, queue: u16, size: u32, desc: u64, avail: u64, used: u64) {
        if queue == 0 {
            self.queue = Queue { size, desc, avail, used, ready: true, ..Default::default() };
        }
    }
    fn queue_unset(&mut self, queue: u16) {
        if queue == 0 {
            self.queue = Queue::default();
        }
    }
    fn queue_used(&mut self, queue: u16) -> bool {
        queue == 0 && self.queue.ready
    }
    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        0
    }
    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        // capacity (le64) and nothing else.
        let cfg = SECTORS.to_le_bytes();
        let bytes = cfg.get(offset..offset + size_of::<T>());
        bytes
            .and_then(|b| T::read_from_bytes(b).ok())
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)
    }
    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::ConfigSpaceTooSmall)
    }
}
