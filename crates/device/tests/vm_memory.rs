//! The vm-memory adapter (feature `vm-memory-iommu`): virtio-queue over `IommuMemory` on
//! IOVAs, faults queued once, and old IOVAs refused after UNMAP and after bypass 1->0.

mod common;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use viommu_device::{DeviceConfig, EndpointIommu, Iommu};
use viommu_proto::{Request, Status, MAP_F_READ, MAP_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, IommuMemory};

const EP: u32 = 1;
type IoMem = IommuMemory<Mem, EndpointIommu>;

fn setup(cfg: DeviceConfig) -> (Arc<Iommu>, IoMem) {
    let iommu = Arc::new(Iommu::new(cfg).unwrap());
    let mem = IommuMemory::new(new_mem(), EndpointIommu::new(iommu.clone(), EP), true, ());
    (iommu, mem)
}

fn run(iommu: &Iommu, req: &Request) {
    assert_eq!(iommu.execute(req, &mut []), Status::Ok, "{req:?}");
}

fn phys(mem: &IoMem) -> &Mem {
    mem.get_backend()
}

/// Ring and buffers at IOVAs; each buffer crosses a page whose two halves sit far apart
/// in guest-physical memory. The device pops the chain, reads, writes, adds the used entry.
#[test]
fn virtio_queue_runs_on_iovas() {
    let (iommu, mem) = setup(cfg(&[EP]));
    run(&iommu, &attach(1, EP));
    let (ring_iova, ring_gpa) = (0x4000_0000, 0x2_0000);
    run(&iommu, &map(1, ring_iova, ring_iova + 0xfff, ring_gpa, MAP_F_READ | MAP_F_WRITE));
    // Readable buffer: IOVA pages 0x5000_0000 -> 0x3_0000, 0x5000_1000 -> 0x5_0000.
    run(&iommu, &map(1, 0x5000_0000, 0x5000_0fff, 0x3_0000, MAP_F_READ));
    run(&iommu, &map(1, 0x5000_1000, 0x5000_1fff, 0x5_0000, MAP_F_READ));
    // Writable buffer: 0x6000_0000 -> 0x6_0000, 0x6000_1000 -> 0x8_0000, write-only.
    run(&iommu, &map(1, 0x6000_0000, 0x6000_0fff, 0x6_0000, MAP_F_WRITE));
    run(&iommu, &map(1, 0x6000_1000, 0x6000_1fff, 0x8_0000, MAP_F_WRITE));

    // The driver lays out the ring in guest-physical memory, with IOVAs in it.
    let gpa = Rings::at(ring_gpa, 16);
    let p = phys(&mem);
    p.write_obj(desc(0x5000_0ff8, 16, F_NEXT, 1), GuestAddress(gpa.desc_addr(0))).unwrap();
    p.write_obj(desc(0x6000_0ffc, 8, F_WRITE, 0), GuestAddress(gpa.desc_addr(1))).unwrap();
    Rings::write_u16(p, gpa.avail_entry_addr(0), 0);
    Rings::write_u16(p, gpa.avail_idx_addr(), 1);
    p.write_slice(&[1u8; 8], GuestAddress(0x3_0ff8)).unwrap();
    p.write_slice(&[2u8; 8], GuestAddress(0x5_0000)).unwrap();

    let iova = Rings::at(ring_iova, 16);
    let mut q = Queue::new(16).unwrap();
    q.set_size(16);
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(iova.desc);
    q.set_desc_table_address(lo, hi);
    let (lo, hi) = split(iova.avail);
    q.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(iova.used);
    q.set_used_ring_address(lo, hi);
    q.set_ready(true);
    assert!(q.is_valid(&mem));

    let chain = q.pop_descriptor_chain(&mem).expect("a chain");
    let head = chain.head_index();
    let descs: Vec<_> = chain.collect();
    assert_eq!(descs.len(), 2);
    let mut got = [0u8; 16];
    mem.read_slice(&mut got, descs[0].addr()).unwrap();
    assert_eq!(got, [[1u8; 8], [2u8; 8]].concat()[..]);
    assert!(descs[1].is_write_only());
    mem.write_slice(&[3, 3, 3, 3, 4, 4, 4, 4], descs[1].addr()).unwrap();
    q.add_used(&mem, head, 8).unwrap();

    // Landed where the mappings point, nowhere else.
    assert_eq!(read_phys(p, 0x6_0ffc, 4), [3; 4]);
    assert_eq!(read_phys(p, 0x8_0000, 4), [4; 4]);
    assert_eq!(Rings::read_u16(p, gpa.used_idx_addr()), 1);
    let used: [u32; 2] = p.read_obj(GuestAddress(gpa.used_entry_addr(0))).unwrap();
    assert_eq!(used, [u32::from(head), 8]);
    assert_eq!(iommu.pending_faults(), 0);
}

fn read_phys(p: &Mem, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    p.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A write to a read-only mapping fails, after a read filled the mirror, and queues exactly
/// one fault event; the memory is unchanged.
#[test]
fn write_to_read_only_mapping_faults_once() {
    let (iommu, mem) = setup(cfg(&[EP]));
    run(&iommu, &attach(1, EP));
    run(&iommu, &map(1, 0x1000, 0x1fff, 0x9000, MAP_F_READ));
    phys(&mem).write_obj(5u64, GuestAddress(0x9010)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1010)).unwrap(), 5);
    assert!(mem.write_obj(6u64, GuestAddress(0x1010)).is_err());
    assert_eq!(iommu.pending_faults(), 1);
    assert_eq!(phys(&mem).read_obj::<u64>(GuestAddress(0x9010)).unwrap(), 5);
    assert!(!mem.check_range(GuestAddress(0x1010), 8, vm_memory::Permissions::Write));
}

/// After UNMAP, an IOVA the mirror held (it was just read through) fails.
#[test]
fn unmapped_iova_fails() {
    let (iommu, mem) = setup(cfg(&[EP]));
    run(&iommu, &attach(1, EP));
    run(&iommu, &map(1, 0x1000, 0x1fff, 0x9000, MAP_F_READ | MAP_F_WRITE));
    mem.write_obj(5u64, GuestAddress(0x1010)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1010)).unwrap(), 5);
    run(&iommu, &unmap(1, 0x1000, 0x1fff));
    assert!(mem.read_obj::<u64>(GuestAddress(0x1010)).is_err());
    assert!(mem.write_obj(6u64, GuestAddress(0x1010)).is_err());
    assert_eq!(phys(&mem).read_obj::<u64>(GuestAddress(0x9010)).unwrap(), 5);
}

/// After global bypass goes 1 -> 0, identity IOVAs the mirror held fail.
#[test]
fn bypass_off_refuses_old_iovas() {
    let (iommu, mem) = setup(DeviceConfig { bypass: true, ..cfg(&[EP]) });
    mem.write_obj(5u64, GuestAddress(0x9010)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x9010)).unwrap(), 5);
    iommu.set_bypass(false);
    assert!(mem.read_obj::<u64>(GuestAddress(0x9010)).is_err());
    assert!(mem.write_obj(6u64, GuestAddress(0x9010)).is_err());
    assert_eq!(phys(&mem).read_obj::<u64>(GuestAddress(0x9010)).unwrap(), 5);
}

/// An access in progress through `IommuMemory` (a mirror hit, held across a delay inside
/// the copy) delays the UNMAP that removes its mapping: UNMAP returns only after it.
#[test]
fn unmap_waits_for_an_access_in_progress() {
    let (iommu, mem) = setup(cfg(&[EP]));
    run(&iommu, &attach(1, EP));
    run(&iommu, &map(1, 0x1000, 0x1fff, 0x9000, MAP_F_READ | MAP_F_WRITE));
    mem.write_obj(0u64, GuestAddress(0x1000)).unwrap(); // fills the mirror
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let access = {
        let done = done.clone();
        std::thread::spawn(move || {
            // A slow source: the copy (and so the guard) lasts 200 ms.
            let mut src = SlowSource { tx: Some(tx) };
            mem.read_volatile_from(GuestAddress(0x1000), &mut src, 8).unwrap();
            done.store(true, SeqCst);
        })
    };
    rx.recv().unwrap();
    run(&iommu, &unmap(1, 0x1000, 0x1fff));
    assert!(done.load(SeqCst), "UNMAP completed while an access through its mapping ran");
    access.join().unwrap();
}

/// Reads nothing useful: tells the test it is inside the copy, then sleeps.
struct SlowSource {
    tx: Option<mpsc::Sender<()>>,
}

impl vm_memory::ReadVolatile for SlowSource {
    fn read_volatile<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        buf: &mut vm_memory::VolatileSlice<B>,
    ) -> Result<usize, vm_memory::VolatileMemoryError> {
        if let Some(tx) = self.tx.take() {
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(200));
        }
        buf.write_slice(&[7u8; 8][..buf.len().min(8)], 0)?;
        Ok(buf.len().min(8))
    }
}

/// Page-table mode through the mirror: its fills come from walks (`lookup`), and an
/// INVALIDATE flushes it through the listener's default `on_invalidate` (its `on_unmap`),
/// so a repointed entry is seen and a cleared one refused once the INVALIDATE completed.
#[test]
fn a_table_domain_is_followed_through_invalidate() {
    use viommu_proto::pgtable::Pte;
    use viommu_proto::{AttachTableBody, InvalidateBody};
    use zerocopy::little_endian::{U32, U64};
    let mut c = cfg(&[EP]);
    c.features.attach_table = true;
    let (iommu, mem) = setup(c);
    iommu.set_table_memory(Some(Arc::new(phys(&mem).clone())));
    // Levels 0-2 at 0xa0_0000.., the level-3 table at 0xa0_3000; IOVA 0x1000 is its entry 1.
    let root = 0xa0_0000;
    let p = phys(&mem);
    let pte = |gpa: u64, v: Pte| p.write_slice(&v.get().to_le_bytes(), GuestAddress(gpa)).unwrap();
    for level in 0..3 {
        pte(root + level * 0x1000, Pte::table(root + (level + 1) * 0x1000));
    }
    let leaf = root + 0x3000 + 8;
    pte(leaf, Pte::leaf(0x9000, true, true));
    let at = AttachTableBody {
        domain: U32::new(1),
        endpoint: U32::new(EP),
        pgd: U64::new(root),
        ..Default::default()
    };
    run(&iommu, &Request::AttachTable(at));
    mem.write_obj(5u64, GuestAddress(0x1010)).unwrap();
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1010)).unwrap(), 5);
    assert_eq!(p.read_obj::<u64>(GuestAddress(0x9010)).unwrap(), 5);
    let invalidate = Request::Invalidate(InvalidateBody::range(1, 0x1000, 1, 12));
    pte(leaf, Pte::leaf(0xb000, true, false));
    run(&iommu, &invalidate);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1010)).unwrap(), 0);
    assert!(mem.write_obj(6u64, GuestAddress(0x1010)).is_err(), "now read-only");
    pte(leaf, Pte::INVALID);
    run(&iommu, &invalidate);
    assert!(mem.read_obj::<u64>(GuestAddress(0x1010)).is_err());
}
