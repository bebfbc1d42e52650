//! A hand-built virtio-blk request path (virtio 1.2 §5.2.6) on
//! viommu-driver's own [`SplitQueue`]: one request queue, polled, and
//! nothing but bus addresses the caller gives. It exists to put one whole
//! I/O (header, data, status) through one [`DmaBatch`](viommu_driver::dma::DmaBatch),
//! so that the IOMMU is kicked once per I/O (see the kernel binary's
//! `batch` workload); virtio-drivers' `VirtIOBlk` maps each buffer on its
//! own and cannot.
//!
//! A request is the chain "16-byte header the device reads, data, 1 status
//! byte the device writes" (§5.2.6: `struct virtio_blk_req`). The caller
//! owns and maps all three; [`Request::header`] gives the header bytes.

use alloc::sync::Arc;

use viommu_driver::hal::{DmaRegion, Hal};
use viommu_driver::queue::{Buffer, QueueError, SplitQueue, Used};
use viommu_driver::transport::{status, Transport};
use viommu_proto::features::{bit, ACCESS_PLATFORM, VERSION_1};

/// Sector size of the protocol: "the sector number ... in 512-byte units".
pub const SECTOR: u64 = 512;
/// `VIRTIO_BLK_T_IN`: read from the disk.
pub const T_IN: u32 = 0;
/// `VIRTIO_BLK_T_OUT`: write to the disk.
pub const T_OUT: u32 = 1;
/// `VIRTIO_BLK_S_OK`.
pub const S_OK: u8 = 0;
/// Bytes of the request header.
pub const HEADER_LEN: usize = 16;

/// Why the device could not be brought up or a request not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// The device lacks VERSION_1 or ACCESS_PLATFORM (`iommu_platform=on`).
    Features(u64),
    /// FEATURES_OK did not stick.
    FeaturesRejected,
    /// The queue size the device offers is unusable.
    QueueSize(u16),
    /// The virtqueue refused (full, or out of memory).
    Queue(QueueError),
    /// Mapping the ring failed (the caller's DMA layer said no).
    MapRing,
    /// The offset is not a multiple of [`SECTOR`].
    Unaligned(u64),
}

/// One block request's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// [`T_IN`] or [`T_OUT`].
    pub kind: u32,
    /// First sector.
    pub sector: u64,
}

impl Request {
    /// A read (`write = false`) or write of disk byte offset `offset`.
    pub fn at(write: bool, offset: u64) -> Result<Self, BlkError> {
        if offset % SECTOR != 0 {
            return Err(BlkError::Unaligned(offset));
        }
        Ok(Self { kind: if write { T_OUT } else { T_IN }, sector: offset / SECTOR })
    }

    /// `le32 type; le32 reserved; le64 sector;`
    pub fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&self.kind.to_le_bytes());
        h[8..16].copy_from_slice(&self.sector.to_le_bytes());
        h
    }

    /// The device writes the data of a read.
    pub fn device_writes_data(&self) -> bool {
        self.kind == T_IN
    }
}

/// The virtio-blk device and its one request queue.
pub struct BlkQueue<T: Transport, H: Hal> {
    transport: T,
    queue: SplitQueue<H>,
    capacity: u64,
    kicks: u64,
}

impl<T: Transport, H: Hal> BlkQueue<T, H> {
    /// Initialises the device (§3.1.1) with VERSION_1 and ACCESS_PLATFORM,
    /// and queue 0 of at most `queue_size` entries at the bus address
    /// `map_ring` gives for the ring's memory.
    pub fn new(
        mut transport: T,
        hal: Arc<H>,
        queue_size: u16,
        map_ring: impl FnOnce(&DmaRegion) -> Option<u64>,
    ) -> Result<Self, BlkError> {
        transport.set_status(0);
        transport.set_status(status::ACKNOWLEDGE);
        transport.set_status(status::ACKNOWLEDGE | status::DRIVER);
        let offered = transport.device_features();
        let wanted = bit(VERSION_1) | bit(ACCESS_PLATFORM);
        if offered & wanted != wanted {
            transport.set_status(status::FAILED);
            return Err(BlkError::Features(offered));
        }
        transport.set_driver_features(wanted);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        transport.set_status(st);
        if transport.status() & status::FEATURES_OK == 0 {
            transport.set_status(status::FAILED);
            return Err(BlkError::FeaturesRejected);
        }
        let size = queue_size.min(transport.max_queue_size(0));
        if size == 0 || !size.is_power_of_two() {
            return Err(BlkError::QueueSize(size));
        }
        let mut queue = SplitQueue::new(hal, 0, size, false).map_err(BlkError::Queue)?;
        queue.set_interrupts(false);
        let ring = map_ring(queue.region().region()).ok_or(BlkError::MapRing)?;
        queue.set_bus_addrs(queue.addrs_at(ring));
        queue.setup(&mut transport);
        let mut cap = [0u8; 8];
        transport.read_config(0, &mut cap);
        transport.set_status(st | status::DRIVER_OK);
        Ok(Self { transport, queue, capacity: u64::from_le_bytes(cap) * SECTOR, kicks: 0 })
    }

    /// Disk size in bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Notifications sent to the device.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// Queues one request whose header, data runs and status byte are at
    /// the bus addresses given; returns its token. Not yet notified.
    pub fn submit(
        &mut self,
        req: &Request,
        header: u64,
        data: &[(u64, u32)],
        status: u64,
    ) -> Result<u16, BlkError> {
        let mut chain = [Buffer::readable(0, 0); 18];
        if data.len() > chain.len() - 2 {
            return Err(BlkError::Queue(QueueError::TooLong));
        }
        chain[0] = Buffer::readable(header, HEADER_LEN as u32);
        for (c, &(addr, len)) in chain[1..].iter_mut().zip(data) {
            *c = Buffer { addr, len, device_writable: req.device_writes_data() };
        }
        chain[data.len() + 1] = Buffer::writable(status, 1);
        self.queue.add(&chain[..data.len() + 2]).map_err(BlkError::Queue)
    }

    /// Tells the device about the requests submitted since the last kick.
    pub fn kick(&mut self) {
        if self.queue.kick(&mut self.transport) {
            self.kicks += 1;
        }
    }

    /// A completed request, if any.
    pub fn poll(&mut self) -> Option<Used> {
        self.queue.pop_used()
    }
}

impl<T: Transport, H: Hal> Drop for BlkQueue<T, H> {
    fn drop(&mut self) {
        // Reset first: the device stops using the ring before it is freed.
        self.transport.set_status(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc as StdArc, Mutex};
    use viommu_driver::fake::{FakeHal, FakeMemory};
    use viommu_driver::transport::QueueAddrs;

    /// What the fake device saw.
    #[derive(Default, Debug)]
    struct Seen {
        statuses: Vec<u8>,
        driver_features: u64,
        queues: Vec<(u16, u16, QueueAddrs)>,
        notifies: Vec<u16>,
    }

    /// A virtio-blk transport that offers `features`, keeps FEATURES_OK only
    /// if `keeps_features_ok`, and has a 1 MiB disk.
    struct FakeBlk {
        features: u64,
        keeps_features_ok: bool,
        max_queue: u16,
        status: u8,
        seen: StdArc<Mutex<Seen>>,
    }

    impl FakeBlk {
        fn new(features: u64) -> (Self, StdArc<Mutex<Seen>>) {
            let seen = StdArc::default();
            let t = Self {
                features,
                keeps_features_ok: true,
                max_queue: 256,
                status: 0,
                seen: StdArc::clone(&seen),
            };
            (t, seen)
        }
    }

    impl Transport for FakeBlk {
        fn device_features(&mut self) -> u64 {
            self.features
        }
        fn set_driver_features(&mut self, f: u64) {
            self.seen.lock().unwrap().driver_features = f;
        }
        fn status(&mut self) -> u8 {
            self.status
        }
        fn set_status(&mut self, s: u8) {
            self.seen.lock().unwrap().statuses.push(s);
            self.status = if self.keeps_features_ok { s } else { s & !status::FEATURES_OK };
        }
        fn max_queue_size(&mut self, q: u16) -> u16 {
            if q == 0 {
                self.max_queue
            } else {
                0
            }
        }
        fn setup_queue(&mut self, q: u16, size: u16, addrs: QueueAddrs) {
            self.seen.lock().unwrap().queues.push((q, size, addrs));
        }
        fn notify(&mut self, q: u16) {
            self.seen.lock().unwrap().notifies.push(q);
        }
        fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
            let capacity = 2048u64.to_le_bytes(); // sectors: 1 MiB
            for (i, b) in buf.iter_mut().enumerate() {
                *b = capacity.get(offset + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _: usize, _: &[u8]) {}
    }

    const WANTED: u64 = 1 << 32 | 1 << 33; // VERSION_1 | ACCESS_PLATFORM

    fn hal() -> Arc<FakeHal> {
        Arc::new(FakeMemory::new(64).hal())
    }

    #[test]
    fn headers_follow_virtio_blk_req() {
        let r = Request::at(true, 3 * SECTOR).unwrap();
        assert_eq!(r.header(), [1, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert!(!r.device_writes_data());
        let r = Request::at(false, 1 << 40).unwrap();
        assert_eq!(&r.header()[..4], &T_IN.to_le_bytes());
        assert_eq!(u64::from_le_bytes(r.header()[8..].try_into().unwrap()), (1 << 40) / SECTOR);
        assert!(r.device_writes_data());
        assert_eq!(Request::at(false, 100), Err(BlkError::Unaligned(100)));
    }

    #[test]
    fn bring_up_puts_the_ring_at_the_mapped_address_and_requests_are_three_buffers() {
        let (t, seen) = FakeBlk::new(WANTED | 1 << 28);
        let mut blk = BlkQueue::new(t, hal(), 1024, |_| Some(0x7fff_0000_0000)).unwrap();
        assert_eq!(blk.capacity(), 1 << 20);
        {
            let s = seen.lock().unwrap();
            assert_eq!(s.driver_features, WANTED, "only what the path uses is accepted");
            assert_eq!(
                s.statuses.last(),
                Some(
                    &(status::ACKNOWLEDGE
                        | status::DRIVER
                        | status::FEATURES_OK
                        | status::DRIVER_OK)
                )
            );
            let (q, size, addrs) = s.queues[0];
            assert_eq!(
                (q, size, addrs.desc),
                (0, 256, 0x7fff_0000_0000),
                "the device's limit, at the IOVA"
            );
        }
        let req = Request::at(false, 0).unwrap();
        blk.submit(&req, 0x1000, &[(0x2000, 4096)], 0x1010).unwrap();
        blk.kick();
        assert_eq!((blk.kicks(), seen.lock().unwrap().notifies.clone()), (1, vec![0]));
        let runs = [(0x2000u64, 512u32); 17];
        assert_eq!(
            blk.submit(&req, 0x1000, &runs, 0x1010),
            Err(BlkError::Queue(QueueError::TooLong))
        );
        assert_eq!(blk.poll(), None, "nothing completed");
        drop(blk);
        assert_eq!(seen.lock().unwrap().statuses.last(), Some(&0), "dropping resets the device");
    }

    #[test]
    fn a_device_that_cannot_take_iovas_or_refuses_features_is_refused() {
        // No ACCESS_PLATFORM (iommu_platform=off): the device would bypass the IOMMU.
        let (t, seen) = FakeBlk::new(1 << 32);
        assert_eq!(
            BlkQueue::new(t, hal(), 256, |_| Some(0)).err(),
            Some(BlkError::Features(1 << 32))
        );
        assert_eq!(seen.lock().unwrap().statuses.last(), Some(&status::FAILED));
        let (mut t, _) = FakeBlk::new(WANTED);
        t.keeps_features_ok = false;
        assert_eq!(
            BlkQueue::new(t, hal(), 256, |_| Some(0)).err(),
            Some(BlkError::FeaturesRejected)
        );
        for max in [0, 100] {
            let (mut t, _) = FakeBlk::new(WANTED);
            t.max_queue = max;
            assert_eq!(
                BlkQueue::new(t, hal(), 256, |_| Some(0)).err(),
                Some(BlkError::QueueSize(max))
            );
        }
        let (t, _) = FakeBlk::new(WANTED);
        assert_eq!(BlkQueue::new(t, hal(), 256, |_| None).err(), Some(BlkError::MapRing));
    }
}
