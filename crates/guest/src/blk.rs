//! A small virtio-blk driver (virtio 1.2 §5.2) for an endpoint behind the
//! virtio-iommu: one request queue, polling, and only bus addresses the
//! caller's DMA layer produced.
//!
//! The driver owns two DMA areas: the virtqueue and a table of request
//! headers and status bytes, one slot per request in flight. At setup it
//! hands both to a `map` callback, which returns their IOVAs (the caller maps
//! them through the IOMMU once, for the device's lifetime). Data buffers are
//! the caller's: it maps them and passes their IOVAs to [`VirtioBlk::submit`].

use std::sync::Arc;

use viommu_driver::hal::{DmaBuffer, DmaRegion, Hal, PAGE_SIZE};
use viommu_driver::queue::{Buffer, QueueLayout, SplitQueue};
use viommu_driver::transport::{status, Transport};
use viommu_proto::features::{bit, ACCESS_PLATFORM, VERSION_1};

use crate::Error;

/// The virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Request type: read from the disk into memory.
pub const T_IN: u32 = 0;
/// Request type: write memory to the disk.
pub const T_OUT: u32 = 1;
/// Status: success.
pub const S_OK: u8 = 0;

/// Bytes of one header+status slot: a 16-byte header, then the status byte.
const SLOT: usize = 32;

/// Direction of a block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Disk to memory: the device writes the data buffers.
    Read,
    /// Memory to disk: the device reads the data buffers.
    Write,
}

/// A completed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag [`VirtioBlk::submit`] returned.
    pub tag: u16,
    /// The status byte the device wrote (`S_OK` on success).
    pub status: u8,
}

/// The virtio-blk driver. `T` is the transport, `H` the DMA memory.
///
/// ```no_run
/// use std::sync::Arc;
/// use viommu_guest::blk::{BlkOp, VirtioBlk};
/// use viommu_guest::{hugepage::HugePageHal, virtio_pci::PciTransport};
/// let hal = Arc::new(HugePageHal::new(8).unwrap());
/// let t = PciTransport::open("00:05.0").unwrap();
/// // Without an IOMMU in the way, IOVA = physical address.
/// let mut blk = VirtioBlk::new(t, hal, 64, |r| Ok(r.bus_addr)).unwrap();
/// let buf = 0x1234_0000; // an IOVA the caller mapped
/// let tag = blk.submit(BlkOp::Read, 0, &[(buf, 4096)]).unwrap();
/// blk.kick();
/// let done = blk.wait(1_000_000).unwrap();
/// assert_eq!(done.tag, tag);
/// ```
pub struct VirtioBlk<T: Transport, H: Hal> {
    transport: T,
    queue: SplitQueue<H>,
    slots: DmaBuffer<Arc<H>>,
    slots_iova: u64,
    free_slots: Vec<u16>,
    /// Slot of each in-flight chain, by queue token.
    slot_of: Vec<Option<u16>>,
    capacity: u64,
    kicks: u64,
    /// The chain being submitted, kept to avoid an allocation per request.
    chain: Vec<Buffer>,
}

impl<T: Transport, H: Hal> VirtioBlk<T, H> {
    /// Initialises the device: features VERSION_1 + ACCESS_PLATFORM, one
    /// queue of `queue_size` entries whose ring, like the header table, is
    /// given to the device at the IOVA `map` returns for it.
    pub fn new(
        mut transport: T,
        hal: Arc<H>,
        queue_size: u16,
        mut map: impl FnMut(&DmaRegion) -> Result<u64, Error>,
    ) -> Result<Self, Error> {
        transport.set_status(0);
        transport.set_status(status::ACKNOWLEDGE);
        transport.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = transport.device_features();
        let wanted = bit(VERSION_1) | bit(ACCESS_PLATFORM);
        if offered & wanted != wanted {
            transport.set_status(status::FAILED);
            return Err(Error::Device(format!(
                "virtio-blk offers {offered:#x}: needs VERSION_1 and ACCESS_PLATFORM (iommu_platform=on)"
            )));
        }
        transport.set_driver_features(wanted);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        transport.set_status(st);
        if transport.status() & status::FEATURES_OK == 0 {
            transport.set_status(status::FAILED);
            return Err(Error::Device("virtio-blk rejected our features".into()));
        }
        let max = transport.max_queue_size(0);
        let size = queue_size.min(max);
        if size == 0 || !size.is_power_of_two() {
            return Err(Error::Device(format!("virtio-blk queue size {size} (max {max})")));
        }
        let mut queue = SplitQueue::new(hal.clone(), 0, size, false).map_err(Error::driver)?;
        queue.set_interrupts(false);
        let ring_iova = map(queue.region().region())?;
        queue.set_bus_addrs(queue.addrs_at(ring_iova));
        let slot_pages = (size as usize * SLOT).div_ceil(PAGE_SIZE);
        let slots = DmaBuffer::new(hal, slot_pages)
            .ok_or_else(|| Error::Dma("no memory for virtio-blk headers".into()))?;
        let slots_iova = map(slots.region())?;
        queue.setup(&mut transport);
        let mut cap = [0u8; 8];
        transport.read_config(0, &mut cap);
        transport.set_status(st | status::DRIVER_OK);
        Ok(Self {
            transport,
            queue,
            slots,
            slots_iova,
            free_slots: (0..size).rev().collect(),
            slot_of: vec![None; size as usize],
            capacity: u64::from_le_bytes(cap) * SECTOR,
            kicks: 0,
            chain: Vec::new(),
        })
    }

    /// Asks the device for an interrupt per completion (`on`), or for none
    /// (the default: completions are polled).
    pub fn set_interrupts(&mut self, on: bool) {
        self.queue.set_interrupts(on);
    }

    /// The ring's DMA region (descriptor table, avail and used rings), as
    /// the driver sees it.
    pub fn ring(&self) -> &DmaBuffer<Arc<H>> {
        self.queue.region()
    }

    /// Offsets of the ring's parts inside [`Self::ring`].
    pub fn ring_layout(&self) -> QueueLayout {
        self.queue.layout()
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Requests that can still be submitted before a completion is needed.
    pub fn free_slots(&self) -> usize {
        self.free_slots.len()
    }

    /// Entries of the ring.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Free descriptors in the ring (a request takes its data buffers + 2).
    pub fn free_descriptors(&self) -> u16 {
        self.queue.num_free()
    }

    /// Notifications sent to the block device.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// The transport, e.g. to reset the device.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Queues one request (not yet notified): `op` at byte offset `offset`
    /// of the disk, data in `data` given as (IOVA, length) pairs. Returns a
    /// tag that [`Self::poll`] reports on completion.
    pub fn submit(&mut self, op: BlkOp, offset: u64, data: &[(u64, u32)]) -> Result<u16, Error> {
        if offset % SECTOR != 0 {
            return Err(Error::Device(format!("offset {offset:#x} is not sector aligned")));
        }
        let slot =
            self.free_slots.pop().ok_or_else(|| Error::Device("all request slots busy".into()))?;
        let hdr = slot as usize * SLOT;
        let ty = match op {
            BlkOp::Read => T_IN,
            BlkOp::Write => T_OUT,
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&(offset / SECTOR).to_le_bytes());
        // The slot is ours until completion. The 0xff status tells "never written".
        self.slots.write(hdr, &h);
        self.slots.write(hdr + 16, &[0xff]);
        let iova = self.slots_iova + slot as u64 * SLOT as u64;
        let bufs = &mut self.chain;
        bufs.clear();
        bufs.push(Buffer::readable(iova, 16));
        bufs.extend(data.iter().map(|&(a, l)| Buffer {
            addr: a,
            len: l,
            device_writable: op == BlkOp::Read,
        }));
        bufs.push(Buffer::writable(iova + 16, 1));
        match self.queue.add(&self.chain) {
            Ok(token) => {
                self.slot_of[token as usize] = Some(slot);
                Ok(token)
            }
            Err(e) => {
                self.free_slots.push(slot);
                Err(Error::driver(e))
            }
        }
    }

    /// Notifies the device of the requests submitted since the last kick.
    pub fn kick(&mut self) {
        if self.queue.kick(&mut self.transport) {
            self.kicks += 1;
        }
    }

    /// Whether a completion is waiting to be polled.
    pub fn has_used(&self) -> bool {
        self.queue.can_pop()
    }

    /// One completed request, if any.
    pub fn poll(&mut self) -> Option<Completion> {
        loop {
            let used = self.queue.pop_used()?;
            let Some(slot) = self.slot_of.get_mut(used.token as usize).and_then(Option::take)
            else {
                continue; // a token we never handed out: the queue counted it
            };
            // The device is done with the slot (it returned the chain).
            let mut status = [0u8];
            self.slots.read(slot as usize * SLOT + 16, &mut status);
            let status = status[0];
            self.free_slots.push(slot);
            return Some(Completion { tag: used.token, status });
        }
    }

    /// Polls until one request completes, at most `spins` times.
    pub fn wait(&mut self, spins: u64) -> Result<Completion, Error> {
        for _ in 0..spins {
            if let Some(c) = self.poll() {
                return Ok(c);
            }
            self.transport.wait_for_used(0);
        }
        Err(Error::Timeout(format!("virtio-blk request after {spins} polls")))
    }
}

impl<T: Transport, H: Hal> Drop for VirtioBlk<T, H> {
    fn drop(&mut self) {
        // The device is reset, so it no longer touches the headers, which
        // are freed after this.
        self.transport.set_status(0);
    }
}
