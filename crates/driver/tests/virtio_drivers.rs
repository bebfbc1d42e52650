//! The virtio-drivers adapters (feature `virtio-drivers`) with
//! virtio-drivers' own `VirtIOBlk` and `VirtQueue`, against the fake
//! virtio-iommu (the device crate's model) and a virtio-blk device whose
//! every access is translated by it: data checked, and MAPs, UNMAPs and
//! kicks per I/O counted exactly.
//!
//! The OS here is the test process: its virtio-drivers `Hal` ([`HostHal`])
//! hands out host memory with physical address = host address, so the
//! IOMMU maps IOVAs to host addresses and the device reaches the bytes
//! through them.

#[path = "common/blk.rs"]
mod blk;
mod common;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use viommu_device::Access;
use viommu_driver::adapter::{
    DmaSlot, IommuHal, IommuTransport, SharedDma, StaticDma, ACCESS_PLATFORM,
};
use viommu_driver::dma::{DmaOptions, Policy};
use viommu_driver::{CounterSnapshot, DmaDomain, Transport as _, PAGE_SIZE};
use virtio_drivers::device::blk::VirtIOBlk;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceStatus, Transport as _};
use virtio_drivers::{BufferDirection, Hal as VdHalTrait, PhysAddr};

use blk::{BlkDevice, BusDma, F_INDIRECT_DESC, SECTOR, SECTORS};
use common::{attached, FakeDevice, Iommu};

const EP: u32 = 3;

thread_local! {
    /// `(address, length)` of every buffer shared on this thread.
    static SHARED: RefCell<Vec<(u64, usize)>> = const { RefCell::new(Vec::new()) };
}

/// The OS's virtio-drivers HAL: host memory, physical = host address.
struct HostHal;

// SAFETY: `dma_alloc` returns zeroed, page-aligned memory of its own, freed
// only by `dma_dealloc` with the same layout; `share` hands out the buffer's
// own address, valid while the caller keeps it.
unsafe impl VdHalTrait for HostHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = std::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: a non-zero size.
        let p = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) }).unwrap();
        (p.as_ptr() as u64, p)
    }
    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = std::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: allocated in `dma_alloc` with this layout (the caller's promise).
        unsafe { std::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }
    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("no MMIO here")
    }
    unsafe fn share(buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        let addr = buffer.as_ptr().cast::<u8>() as u64;
        SHARED.with(|s| s.borrow_mut().push((addr, buffer.len())));
        addr
    }
    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// The blk device's DMA: translated by the IOMMU model, then host memory.
struct HostDma {
    iommu: Arc<viommu_device::Iommu>,
    ep: u32,
}

impl BusDma for HostDma {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Ok(t) = self.iommu.translate(self.ep, addr, buf.len() as u64, Access::Read) else {
            return false;
        };
        let mut at = 0;
        for seg in t.iter() {
            // SAFETY: the IOMMU maps only host memory this test shared or
            // allocated and keeps alive while the device holds it.
            unsafe {
                let src = seg.addr as *const u8;
                std::ptr::copy_nonoverlapping(src, buf[at..].as_mut_ptr(), seg.len as usize)
            };
            at += seg.len as usize;
        }
        true
    }
    fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Ok(t) = self.iommu.translate(self.ep, addr, data.len() as u64, Access::Write) else {
            return false;
        };
        let mut at = 0;
        for seg in t.iter() {
            // SAFETY: as in `read`.
            unsafe {
                let dst = seg.addr as *mut u8;
                std::ptr::copy_nonoverlapping(data[at..].as_ptr(), dst, seg.len as usize)
            };
            at += seg.len as usize;
        }
        true
    }
}

/// The byte at disk offset `off`.
fn pattern(off: usize) -> u8 {
    (off as u64).wrapping_mul(0x9e37_79b9).rotate_right(13) as u8 ^ (off >> 9) as u8
}

fn disk() -> Vec<u8> {
    (0..SECTORS as usize * SECTOR).map(pattern).collect()
}

type Blk<D> = VirtIOBlk<IommuHal<HostHal, D>, IommuTransport<BlkDevice<HostDma>>>;

/// The IOMMU with `EP` attached to a paging domain under `policy`, and a
/// virtio-drivers `VirtIOBlk` behind it.
struct Rig<D: StaticDma> {
    fake: FakeDevice,
    iommu: Iommu,
    dma: &'static SharedDma,
    dev: Arc<blk::BlkCounts>,
    blk: Blk<D>,
}

/// `EP` attached to a new paging domain, its DMA layer under `policy` in `slot`.
fn dma_for(iommu: &Iommu, policy: Policy, slot: &DmaSlot) -> &'static SharedDma {
    let domain = attached(iommu, EP);
    let resv = iommu.reserved_regions(EP).unwrap();
    let opts = DmaOptions { policy, ..Default::default() };
    // A clock that stands still: no lazy flush comes from a timeout.
    let clock = Arc::new(common::ManualClock::default());
    let dma = DmaDomain::new(domain, &resv, opts, clock).unwrap();
    slot.install(SharedDma::new(dma)).unwrap()
}

impl<D: StaticDma> Rig<D> {
    fn new(slot: &DmaSlot, policy: Policy, extra: u64) -> Self {
        let (fake, iommu) = common::setup(common::device_config());
        Self::with(fake, iommu, slot, policy, extra)
    }

    fn with(fake: FakeDevice, iommu: Iommu, slot: &DmaSlot, policy: Policy, extra: u64) -> Self {
        let dma = dma_for(&iommu, policy, slot);
        let dev = BlkDevice::new(HostDma { iommu: fake.model(), ep: EP }, disk(), extra);
        let counts = dev.counts();
        let blk = VirtIOBlk::new(IommuTransport::new(dev, dma)).expect("VirtIOBlk::new");
        Self { fake, iommu, dma, dev: counts, blk }
    }

    /// Runs `io` and returns what it cost: the driver's counters, the
    /// buffers shared, and the blk device's kicks.
    fn measure<R>(
        &mut self,
        io: impl FnOnce(&mut Blk<D>) -> R,
    ) -> (R, CounterSnapshot, Vec<(u64, usize)>, u64) {
        SHARED.with(|s| s.borrow_mut().clear());
        let before = self.iommu.counters();
        let kicks = self.dev.get().0;
        let r = io(&mut self.blk);
        let used = self.iommu.counters().since(&before);
        (r, used, SHARED.with(|s| s.take()), self.dev.get().0 - kicks)
    }
}

/// MAPs one batch of `shares` needs: one per distinct page of the buffers
/// that fit in one page (they share its mapping), one per larger buffer.
fn expected_maps(shares: &[(u64, usize)]) -> u64 {
    let g = PAGE_SIZE as u64;
    let mut pages = BTreeSet::new();
    let mut big = 0;
    for &(addr, len) in shares {
        let first = addr / g;
        let last = (addr + len as u64 - 1) / g;
        if first == last {
            pages.insert(first);
        } else {
            big += 1;
        }
    }
    pages.len() as u64 + big
}

/// A page-aligned I/O buffer, so that data never shares a page with a header.
#[repr(align(4096))]
struct Page([u8; PAGE_SIZE]);

fn page() -> Box<Page> {
    Box::new(Page([0; PAGE_SIZE]))
}

/// Strict: each read and write costs its MAPs (header and status byte
/// share one when they share a page) and **one** sync for all of them,
/// then one UNMAP and sync per allocation; one kick of the blk device.
/// Every byte read matches the disk, and a write reads back.
#[test]
fn virtio_blk_through_the_iommu_strict() {
    viommu_driver::static_dma!(StrictBlk);
    let mut rig = Rig::<StrictBlk>::new(StrictBlk::slot(), Policy::Strict, 0);
    assert_eq!(rig.blk.capacity(), SECTORS);
    let rings = rig.dma.counts().allocs;
    let domain = rig.dma.dma().domain().id();
    assert_eq!(rig.fake.mappings(domain).len() as u64, rings, "only the rings are mapped");
    let mut buf = page();
    for sector in 0..8usize {
        let len = SECTOR * (1 + sector % 8);
        let (r, used, shares, kicks) = rig.measure(|b| b.read_blocks(sector, &mut buf.0[..len]));
        r.expect("read");
        assert!(buf.0[..len].iter().enumerate().all(|(i, &b)| b == pattern(sector * SECTOR + i)));
        assert_eq!(shares.len(), 3, "header, data, status");
        let maps = expected_maps(&shares);
        assert_eq!((used.map, used.unmap), (maps, maps));
        assert_eq!((used.kicks, used.syncs), (1 + maps, 1 + maps), "one sync for the MAPs");
        assert_eq!(kicks, 1);
    }
    buf.0[..SECTOR].iter_mut().enumerate().for_each(|(i, b)| *b = !pattern(i));
    let (r, used, shares, _) = rig.measure(|b| b.write_blocks(0, &buf.0[..SECTOR]));
    r.expect("write");
    let maps = expected_maps(&shares);
    assert_eq!((used.map, used.unmap, used.syncs), (maps, maps, 1 + maps));
    let mut back = page();
    rig.blk.read_blocks(0, &mut back.0[..2 * SECTOR]).expect("read back");
    assert!(back.0[..SECTOR].iter().enumerate().all(|(i, &b)| b == !pattern(i)));
    assert!(back.0[SECTOR..2 * SECTOR].iter().enumerate().all(|(i, &b)| b == pattern(SECTOR + i)));
    assert_eq!(rig.dev.get().2, 0, "no DMA fault");
    assert_eq!(rig.fake.mappings(domain).len() as u64, rings, "every buffer unmapped");
    let c = rig.dma.counts();
    assert_eq!((c.shares, c.unshares, c.failures), (30, 30, 0));
}

/// The same strict reads with `set_sync_on_share` (each share synced at
/// once, as virtio-drivers' `share` would be without the queue): every
/// buffer is its own MAP and sync, 6 syncs per read, against the queue's
/// MAPs + 1 (3 when header and status share a page).
#[test]
fn one_sync_per_notify_against_one_per_share() {
    viommu_driver::static_dma!(PerShareBlk);
    let mut rig = Rig::<PerShareBlk>::new(PerShareBlk::slot(), Policy::Strict, 0);
    let mut buf = page();
    let mut read = |rig: &mut Rig<PerShareBlk>, sector: usize| {
        let (r, used, shares, _) = rig.measure(|b| b.read_blocks(sector, &mut buf.0[..SECTOR]));
        r.expect("read");
        assert!(buf.0[..SECTOR]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(sector * SECTOR + i)));
        (used, expected_maps(&shares))
    };
    let (queued, maps) = read(&mut rig, 7);
    assert_eq!((queued.map, queued.unmap, queued.syncs), (maps, maps, 1 + maps));
    rig.dma.set_sync_on_share(true);
    for sector in [7, 8, 9] {
        let (each, _) = read(&mut rig, sector);
        assert_eq!((each.map, each.unmap, each.kicks, each.syncs), (3, 3, 6, 6));
    }
}

/// An identity domain: IOVA = physical address, so the adapters send
/// nothing at all, and the device still reaches every byte through
/// `translate()`.
#[test]
fn virtio_blk_through_an_identity_domain() {
    viommu_driver::static_dma!(IdentityBlk);
    let (fake, iommu) = common::setup(common::device_config());
    let domain = iommu.alloc_identity(EP).unwrap();
    iommu.attach(&domain, EP).unwrap();
    let clock = Arc::new(common::ManualClock::default());
    let dma = DmaDomain::new(domain, &[], DmaOptions::default(), clock).unwrap();
    let dma = IdentityBlk::slot().install(SharedDma::new(dma)).unwrap();
    let dev = BlkDevice::new(HostDma { iommu: fake.model(), ep: EP }, disk(), 0);
    let mut blk =
        VirtIOBlk::<IommuHal<HostHal, IdentityBlk>, _>::new(IommuTransport::new(dev, dma))
            .expect("VirtIOBlk::new");
    let before = iommu.counters();
    let mut buf = page();
    for sector in [0usize, 17, 255] {
        blk.read_blocks(sector, &mut buf.0[..SECTOR]).expect("read");
        assert!(buf.0[..SECTOR]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(sector * SECTOR + i)));
    }
    let used = iommu.counters().since(&before);
    assert_eq!((used.map, used.unmap, used.kicks, used.syncs), (0, 0, 0, 0));
    assert_eq!(dma.counts().shares, 9);
}

/// Lazy: one sync per I/O and no UNMAP until the flush queue is flushed;
/// then one (coalesced) UNMAP covers them and the IOVAs come back.
#[test]
fn virtio_blk_through_the_iommu_lazy() {
    viommu_driver::static_dma!(LazyBlk);
    let mut rig = Rig::<LazyBlk>::new(LazyBlk::slot(), Policy::Lazy, 0);
    let in_use = rig.dma.dma().iova_in_use();
    let mut buf = page();
    let mut total_maps = 0;
    for sector in 0..16usize {
        let (r, used, shares, kicks) = rig.measure(|b| b.read_blocks(sector, &mut buf.0[..SECTOR]));
        r.expect("read");
        assert!(buf.0[..SECTOR]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(sector * SECTOR + i)));
        let maps = expected_maps(&shares);
        assert_eq!((used.map, used.unmap, used.kicks, used.syncs), (maps, 0, 1, 1));
        assert_eq!(kicks, 1);
        total_maps += maps;
    }
    assert!(rig.dma.dma().pending_unmaps() as u64 == total_maps);
    let before = rig.iommu.counters();
    rig.dma.dma().flush().expect("flush");
    let used = rig.iommu.counters().since(&before);
    assert!(used.unmap >= 1 && used.unmap <= total_maps, "{} UNMAPs", used.unmap);
    assert_eq!(rig.dma.dma().iova_in_use(), in_use, "IOVAs back after the flush");
}

/// With indirect descriptors the descriptor table is one more shared
/// buffer; it rides in the same sync.
#[test]
fn virtio_blk_with_indirect_descriptors() {
    viommu_driver::static_dma!(IndirectBlk);
    let mut rig = Rig::<IndirectBlk>::new(IndirectBlk::slot(), Policy::Strict, F_INDIRECT_DESC);
    let mut buf = page();
    for sector in [0usize, 5, 200] {
        let (r, used, shares, _) = rig.measure(|b| b.read_blocks(sector, &mut buf.0[..SECTOR]));
        r.expect("read");
        assert!(buf.0[..SECTOR]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(sector * SECTOR + i)));
        assert_eq!(shares.len(), 4, "header, data, status, indirect table");
        let maps = expected_maps(&shares);
        assert_eq!((used.map, used.unmap, used.syncs), (maps, maps, 1 + maps));
    }
}

/// virtio-drivers' `VirtQueue` with two requests added before one notify:
/// both requests' MAPs go out in that notify's one sync.
#[test]
fn virtqueue_two_requests_one_notify_one_sync() {
    viommu_driver::static_dma!(QueueBlk);
    let fake = FakeDevice::default();
    let iommu = Iommu::new(fake.transport(), fake.hal(), Default::default()).unwrap();
    let dma = dma_for(&iommu, Policy::Lazy, QueueBlk::slot());
    let dev = BlkDevice::new(HostDma { iommu: fake.model(), ep: EP }, disk(), 0);
    let counts = dev.counts();
    let mut t = IommuTransport::new(dev, dma);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(blk::F_VERSION_1);
    let mut q = VirtQueue::<IommuHal<HostHal, QueueBlk>, 16>::new(&mut t, 0, false, false).unwrap();
    t.finish_init();
    assert!(t.get_status().contains(DeviceStatus::DRIVER_OK));
    let hdr = |sector: u64| {
        let mut h = [0u8; 16];
        h[8..].copy_from_slice(&sector.to_le_bytes());
        h
    };
    let (h0, h1) = (hdr(3), hdr(9));
    let (mut d0, mut d1) = (page(), page());
    let (mut s0, mut s1) = ([0xffu8], [0xffu8]);
    SHARED.with(|s| s.borrow_mut().clear());
    let before = iommu.counters();
    let (t0, t1);
    {
        let (i0, i1) = ([&h0[..]], [&h1[..]]);
        let mut o0 = [&mut d0.0[..SECTOR], &mut s0[..]];
        let mut o1 = [&mut d1.0[..SECTOR], &mut s1[..]];
        // SAFETY: the buffers outlive the requests, popped below before use.
        t0 = unsafe { q.add(&i0, &mut o0) }.unwrap();
        // SAFETY: as above.
        t1 = unsafe { q.add(&i1, &mut o1) }.unwrap();
        let maps = expected_maps(&SHARED.with(|s| s.borrow().clone()));
        assert_eq!(dma.queued() as u64, maps, "the six buffers' MAPs wait for the notify");
        assert_eq!(iommu.counters().since(&before).map, 0, "nothing sent before the notify");
        assert!(q.should_notify());
        t.notify(0);
        assert_eq!(counts.get().1, 2, "the device served both");
        // SAFETY: the same buffers as added.
        unsafe { q.pop_used(t0, &i0, &mut o0) }.unwrap();
        // SAFETY: as above.
        unsafe { q.pop_used(t1, &i1, &mut o1) }.unwrap();
    }
    let used = iommu.counters().since(&before);
    let shares = SHARED.with(|s| s.take());
    assert_eq!(shares.len(), 6);
    assert_eq!((used.map, used.kicks, used.syncs), (expected_maps(&shares), 1, 1));
    assert_eq!((s0, s1), ([0], [0]));
    assert!(d0.0[..SECTOR].iter().enumerate().all(|(i, &b)| b == pattern(3 * SECTOR + i)));
    assert!(d1.0[..SECTOR].iter().enumerate().all(|(i, &b)| b == pattern(9 * SECTOR + i)));
}

/// virtio-drivers' drivers do not accept ACCESS_PLATFORM, so a device that
/// needs it refuses FEATURES_OK (as QEMU's iommu_platform=on does); behind
/// `IommuTransport` the feature is accepted and the device starts.
#[test]
fn the_wrapper_accepts_access_platform() {
    viommu_driver::static_dma!(FeatureBlk);
    let fake = FakeDevice::default();
    let iommu = Iommu::new(fake.transport(), fake.hal(), Default::default()).unwrap();
    let dma = dma_for(&iommu, Policy::Strict, FeatureBlk::slot());
    let ok = DeviceStatus::FEATURES_OK | DeviceStatus::DRIVER_OK;

    let bare = BlkDevice::new(HostDma { iommu: fake.model(), ep: EP }, disk(), 0);
    let counts = bare.counts();
    // virtio-drivers does not read FEATURES_OK back: `new` succeeds on a
    // device that refused it (and an I/O would then wait forever).
    let blk = VirtIOBlk::<IommuHal<HostHal, FeatureBlk>, _>::new(bare).expect("new");
    assert_eq!(counts.features.load(Relaxed) & ACCESS_PLATFORM, 0);
    assert!(!DeviceStatus::from_bits_retain(counts.status.load(Relaxed) as u32).intersects(ok));
    drop(blk);

    let dev = BlkDevice::new(HostDma { iommu: fake.model(), ep: EP }, disk(), 0);
    let counts = dev.counts();
    let blk = VirtIOBlk::<IommuHal<HostHal, FeatureBlk>, _>::new(IommuTransport::new(dev, dma));
    let mut blk = blk.expect("starts");
    assert_ne!(counts.features.load(Relaxed) & ACCESS_PLATFORM, 0);
    assert!(DeviceStatus::from_bits_retain(counts.status.load(Relaxed) as u32).contains(ok));
    let mut buf = page();
    blk.read_blocks(1, &mut buf.0[..SECTOR]).expect("read");
    assert!(buf.0[..SECTOR].iter().enumerate().all(|(i, &b)| b == pattern(SECTOR + i)));
}

/// A MAP the device fails: the request reaches the device with IOVAs that
/// map nothing, so its accesses fault and the read fails with an error,
/// not wrong data; the next read works, and the failed I/O's IOVAs are
/// unmapped and freed by the next flush.
#[test]
fn a_failed_map_fails_the_request_and_recovers() {
    use viommu_driver::fake::{InjectReply, Injection};
    use viommu_proto::{RequestType, Status};
    viommu_driver::static_dma!(FailBlk);
    let mut rig = Rig::<FailBlk>::new(FailBlk::slot(), Policy::Strict, 0);
    let in_use = rig.dma.dma().iova_in_use();
    let mut buf = page();
    rig.fake.inject(Injection {
        request: Some(RequestType::Map),
        reply: InjectReply::Status(Status::NoMem),
    });
    let (r, used, _, kicks) = rig.measure(|b| b.read_blocks(4, &mut buf.0[..SECTOR]));
    assert!(r.is_err(), "the read failed");
    assert_eq!((used.syncs, kicks), (1, 1), "one failed sync, the notify still went out");
    assert!(rig.dev.get().2 >= 1, "the device faulted");
    assert!(buf.0[..SECTOR].iter().all(|&b| b == 0), "nothing reached the buffer");
    assert_eq!(rig.dma.counts().failures, 1);
    rig.blk.read_blocks(4, &mut buf.0[..SECTOR]).expect("the next read works");
    assert!(buf.0[..SECTOR].iter().enumerate().all(|(i, &b)| b == pattern(4 * SECTOR + i)));
    rig.dma.dma().flush().expect("flush");
    assert_eq!(rig.dma.dma().iova_in_use(), in_use);
}

thread_local! {
    /// The fake IOMMU's memory, for [`FakeVdHal`] (a `Hal` without `self`).
    static FAKE_MEM: RefCell<Option<viommu_driver::fake::FakeHal>> = const { RefCell::new(None) };
}

/// The OS's virtio-drivers HAL over the fake's guest memory, where the fake
/// IOMMU looks for its rings.
struct FakeVdHal;

// SAFETY: regions come from FakeHal (zeroed, page-aligned, contiguous,
// unaliased until freed) and go back to it unchanged.
unsafe impl VdHalTrait for FakeVdHal {
    fn dma_alloc(pages: usize, _dir: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        use viommu_driver::Hal;
        let r = FAKE_MEM.with(|m| m.borrow().as_ref().unwrap().dma_alloc(pages));
        r.map_or((0, NonNull::dangling()), |r| (r.bus_addr, r.vaddr))
    }
    unsafe fn dma_dealloc(paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        use viommu_driver::Hal;
        let region = viommu_driver::DmaRegion { bus_addr: paddr, vaddr, pages };
        // SAFETY: virtio-drivers' promise: what `dma_alloc` returned, unused now.
        FAKE_MEM.with(|m| unsafe { m.borrow().as_ref().unwrap().dma_dealloc(region) });
        0
    }
    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        unreachable!("no MMIO here")
    }
    unsafe fn share(_buffer: NonNull<[u8]>, _dir: BufferDirection) -> PhysAddr {
        unreachable!("the IOMMU driver shares nothing")
    }
    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _dir: BufferDirection) {}
}

/// The fake IOMMU as a virtio-drivers transport (the OS's `PciTransport`
/// would be in its place), logging the width of every config access.
struct VdFake {
    t: std::sync::Mutex<viommu_driver::fake::FakeTransport>,
    legacy: bool,
    widths: Arc<std::sync::Mutex<Vec<(usize, usize)>>>,
}

impl VdFake {
    fn t(&self) -> std::sync::MutexGuard<'_, viommu_driver::fake::FakeTransport> {
        self.t.lock().unwrap()
    }
}

impl virtio_drivers::transport::Transport for VdFake {
    fn device_type(&self) -> virtio_drivers::transport::DeviceType {
        virtio_drivers::transport::DeviceType::IOMMU
    }
    fn read_device_features(&mut self) -> u64 {
        self.t().device_features()
    }
    fn write_driver_features(&mut self, f: u64) {
        self.t().set_driver_features(f);
    }
    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.t().max_queue_size(queue).into()
    }
    fn notify(&mut self, queue: u16) {
        self.t().notify(queue);
    }
    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.t().status().into())
    }
    fn set_status(&mut self, status: DeviceStatus) {
        self.t().set_status(status.bits() as u8);
    }
    fn set_guest_page_size(&mut self, _size: u32) {}
    fn requires_legacy_layout(&self) -> bool {
        self.legacy
    }
    fn queue_set(&mut self, queue: u16, size: u32, desc: u64, avail: u64, used: u64) {
        let addrs = viommu_driver::QueueAddrs { desc, avail, used };
        self.t().setup_queue(queue, size as u16, addrs);
    }
    fn queue_unset(&mut self, _queue: u16) {}
    fn queue_used(&mut self, _queue: u16) -> bool {
        false
    }
    fn ack_interrupt(&mut self) -> virtio_drivers::transport::InterruptStatus {
        virtio_drivers::transport::InterruptStatus::empty()
    }
    fn read_config_generation(&self) -> u32 {
        self.t().config_generation()
    }
    fn read_config_space<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let mut v = T::new_zeroed();
        self.widths.lock().unwrap().push((offset, size_of::<T>()));
        self.t().read_config(offset, v.as_mut_bytes());
        Ok(v)
    }
    fn write_config_space<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        self.t().write_config(offset, value.as_bytes());
        Ok(())
    }
}

/// The IOMMU driver itself on virtio-drivers' plumbing: `VdTransport` over
/// a virtio-drivers transport and `VdHal` over the OS's virtio-drivers HAL.
/// It negotiates what it does directly, reads its config with 32-bit
/// aligned accesses, maps and syncs, and gives its ring pages back when
/// dropped; a legacy queue layout is refused.
#[test]
fn the_iommu_driver_on_virtio_drivers_transport_and_hal() {
    use viommu_driver::adapter::{VdHal, VdTransport};
    use viommu_driver::{DriverOptions, Prot, VirtioIommu};
    let direct = common::setup(common::device_config()).1.info();
    let fake = FakeDevice::default();
    FAKE_MEM.with(|m| *m.borrow_mut() = Some(fake.hal()));
    let widths = Arc::default();
    let vd = |legacy| VdFake {
        t: std::sync::Mutex::new(fake.transport_without_waiter()),
        legacy,
        widths: Arc::clone(&widths),
    };
    let refused = VdTransport::new(vd(true)).err();
    assert_eq!(refused, Some(viommu_driver::Error::Unsupported("legacy virtqueue layout")));
    let t = VdTransport::new(vd(false)).unwrap();
    let hal = VdHal::<FakeVdHal>::new();
    let iommu = VirtioIommu::new(t, hal, DriverOptions::default()).unwrap();
    assert_eq!(iommu.info(), direct);
    let w = widths.lock().unwrap().clone();
    assert!(!w.is_empty() && w.iter().all(|&(off, len)| len == 4 && off % 4 == 0), "{w:?}");
    assert!(fake.memory().live_pages() > 0, "the rings came from the OS's HAL");
    let d = iommu.alloc_paging(EP).unwrap();
    iommu.attach(&d, EP).unwrap();
    d.map_pages(0x10_0000, 0x8000_0000, 0x2000, Prot::READ).unwrap();
    d.iotlb_sync_map(0x10_0000, 0x2000).unwrap();
    assert_eq!(fake.mappings(d.id()), [(0x10_0000, 0x10_1fff, 0x8000_0000, 1)]);
    assert_eq!(iommu.counters().map, 1);
    drop(d);
    drop(iommu);
    assert_eq!(fake.memory().live_pages(), 0, "every page back through VdHal");
}
