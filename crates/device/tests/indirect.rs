//! VIRTIO_F_RING_INDIRECT_DESC through the virtqueue path: what virtio-queue's chain walker
//! does with each kind of indirect table, and the device's bound on chain length.
//! Split-ring rules (virtio 1.3 §2.7.5.3): "The driver MUST NOT set the
//! VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor", "A driver MUST NOT create a
//! descriptor chain longer than the Queue Size of the device", "The device MUST ignore the
//! write-only flag ... in the descriptor that refers to an indirect table", "The device
//! MUST handle the case of zero or more normal chained descriptors followed by a single
//! descriptor with flags&VIRTQ_DESC_F_INDIRECT."

mod common;
use common::*;
use viommu_device::{DeviceConfig, VirtioIommu};
use viommu_proto::features::{bit, RING_INDIRECT_DESC};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};

const F_INDIRECT: u16 = 4;

/// (address, length, flags, next) of one table entry.
type Entry = (u64, u32, u16, u16);

/// (address, length, flags) of one ring descriptor.
type Ring = (u64, u32, u16);

/// Writes an indirect table; returns its address.
fn table(drv: &mut Driver, entries: &[Entry]) -> u64 {
    let t = drv.alloc(16 * entries.len().max(1) as u64);
    for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
        drv.mem.write_obj(desc(addr, len, flags, next), GuestAddress(t + 16 * i as u64)).unwrap();
    }
    t
}

/// An ATTACH(1, 1) request in guest memory and a tail buffer filled with 0xaa.
fn request(drv: &mut Driver) -> (u64, u64) {
    let r = drv.alloc(64);
    drv.mem.write_slice(&encode(&attach(1, 1)), GuestAddress(r)).unwrap();
    let w = drv.alloc(16);
    drv.mem.write_slice(&[0xaa; 16], GuestAddress(w)).unwrap();
    (r, w)
}

/// Submits a ring chain, kicks, and returns the used length.
fn run(drv: &mut Driver, dev: &mut VirtioIommu, ring: &[Ring]) -> u32 {
    let head = drv.push_chain(0, ring);
    dev.process_request_queue(drv.mem).unwrap();
    let used = drv.take_used(0);
    assert_eq!(used.len(), 1);
    assert_eq!(used[0].id, u32::from(head));
    used[0].len
}

fn setup(mem: &Mem) -> (Driver<'_>, VirtioIommu) {
    let drv = Driver::new(mem);
    let dev = drv.device(cfg(&[1]));
    assert_ne!(dev.acked_features() & bit(RING_INDIRECT_DESC), 0);
    (drv, dev)
}

/// Refused chains are answered with used length 0, execute nothing, write nothing, and the
/// device keeps serving.
fn assert_refused(drv: &mut Driver, dev: &mut VirtioIommu, len: u32, w: u64, what: &str) {
    assert_eq!(len, 0, "{what}");
    assert_eq!(drv.read(w, 4), vec![0xaa; 4], "{what}");
    assert_eq!(dev.iommu().endpoint_domain(1), None, "{what}");
    assert_eq!(drv.request(dev, &probe(1)), Status::Ok, "{what}: still serving");
}

/// INDIRECT_DESC is offered by default and can be withheld.
#[test]
fn indirect_desc_offered_by_default_and_optional() {
    let dev = VirtioIommu::new(cfg(&[1])).unwrap();
    assert_ne!(dev.device_features() & bit(RING_INDIRECT_DESC), 0);
    let mut c = cfg(&[1]);
    c.features.indirect_desc = false;
    let dev = VirtioIommu::new(DeviceConfig { ..c }).unwrap();
    assert_eq!(dev.device_features() & bit(RING_INDIRECT_DESC), 0);
}

/// One table holding the whole request is served; so is a table behind direct descriptors
/// ("zero or more normal chained descriptors followed by a single descriptor with
/// flags&VIRTQ_DESC_F_INDIRECT"), and the WRITE flag of the descriptor naming the table is
/// ignored ("The device MUST ignore the write-only flag").
#[test]
fn indirect_tables_are_served() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let (r, w) = request(&mut drv);
    let t = table(&mut drv, &[(r, 20, F_NEXT, 1), (w, 4, F_WRITE, 0)]);
    assert_eq!(run(&mut drv, &mut dev, &[(t, 32, F_INDIRECT)]), 4);
    assert_eq!(drv.read(w, 4), vec![0; 4]);
    assert_eq!(drv.request(&mut dev, &detach(1, 1)), Status::Ok);
    // Direct readable descriptor, then a table with the tail.
    let (r, w) = request(&mut drv);
    let t = table(&mut drv, &[(w, 4, F_WRITE, 0)]);
    assert_eq!(run(&mut drv, &mut dev, &[(r, 20, 0), (t, 16, F_INDIRECT)]), 4);
    assert_eq!(drv.read(w, 4), vec![0; 4]);
    assert_eq!(drv.request(&mut dev, &detach(1, 1)), Status::Ok);
    // WRITE set on the table's own descriptor.
    let (r, w) = request(&mut drv);
    let t = table(&mut drv, &[(r, 20, F_NEXT, 1), (w, 4, F_WRITE, 0)]);
    assert_eq!(run(&mut drv, &mut dev, &[(t, 32, F_INDIRECT | F_WRITE)]), 4);
    assert_eq!(dev.iommu().endpoint_domain(1), Some(1));
}

/// "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within an indirect descriptor":
/// a nested table (first or later entry) cuts the chain short: used length 0.
#[test]
fn nested_indirect_table_is_refused() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let (r, w) = request(&mut drv);
    let inner = table(&mut drv, &[(w, 4, F_WRITE, 0)]);
    let outer = table(&mut drv, &[(r, 20, F_NEXT, 1), (inner, 16, F_INDIRECT, 0)]);
    let len = run(&mut drv, &mut dev, &[(outer, 32, F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "nested table after a descriptor");
    let inner = table(&mut drv, &[(r, 20, F_NEXT, 1), (w, 4, F_WRITE, 0)]);
    let outer = table(&mut drv, &[(inner, 32, F_INDIRECT, 0)]);
    let len = run(&mut drv, &mut dev, &[(outer, 16, F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "nested table first");
}

/// Tables of length 0, of a length that is not a multiple of 16, outside guest memory, or
/// with a `next` past their end: used length 0.
#[test]
fn malformed_indirect_tables_are_refused() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let (r, w) = request(&mut drv);
    let good = table(&mut drv, &[(r, 20, F_NEXT, 1), (w, 4, F_WRITE, 0)]);
    let cases: Vec<(&str, Vec<Ring>)> = vec![
        ("zero-length table", vec![(good, 0, F_INDIRECT)]),
        ("length not a multiple of 16", vec![(good, 40, F_INDIRECT)]),
        ("length 8", vec![(good, 8, F_INDIRECT)]),
        ("table outside guest memory", vec![(MEM_SIZE as u64 - 16, 32, F_INDIRECT)]),
        ("table past 2^64", vec![(u64::MAX - 15, 32, F_INDIRECT)]),
        ("table shorter than its chain", vec![(good, 16, F_INDIRECT)]),
        ("huge table", vec![(good, 0xfff0_0000, F_INDIRECT)]),
    ];
    for (what, ring) in cases {
        let len = run(&mut drv, &mut dev, &ring);
        assert_refused(&mut drv, &mut dev, len, w, what);
    }
    let bad_next = table(&mut drv, &[(r, 20, F_NEXT, 7), (w, 4, F_WRITE, 0)]);
    let len = run(&mut drv, &mut dev, &[(bad_next, 32, F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "next past the table");
}

/// A loop inside a table stops after the table's length: used length 0, no hang.
#[test]
fn loop_inside_indirect_table_is_refused() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let (r, w) = request(&mut drv);
    let t = table(&mut drv, &[(r, 20, F_NEXT, 1), (r, 20, F_NEXT, 0)]);
    let len = run(&mut drv, &mut dev, &[(t, 32, F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "loop 0 -> 1 -> 0");
    let t = table(&mut drv, &[(r, 20, F_NEXT, 0)]);
    let len = run(&mut drv, &mut dev, &[(t, 16, F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "self loop");
}

/// "A driver MUST NOT create a descriptor chain longer than the Queue Size of the device":
/// virtio-queue allows a table of up to 65535 entries; the device refuses a chain of more
/// than queue-size descriptors (used length 0), and serves one of exactly queue size.
#[test]
fn indirect_chain_longer_than_queue_is_refused() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let (r, w) = request(&mut drv);
    // A readable head (if `head`) then writable tails, chained in order: `n` entries.
    let chain = |n: u16, head: bool| -> Vec<Entry> {
        (0..n)
            .map(|i| {
                let next = if i + 1 < n { F_NEXT } else { 0 };
                if i == 0 && head {
                    (r, 20, next, 1)
                } else {
                    (w, 4, F_WRITE | next, i + 1)
                }
            })
            .collect()
    };
    let long = table(&mut drv, &chain(QSIZE + 1, true));
    let len = run(&mut drv, &mut dev, &[(long, 16 * u32::from(QSIZE + 1), F_INDIRECT)]);
    assert_refused(&mut drv, &mut dev, len, w, "queue size + 1 descriptors");
    // Direct descriptors count too: 2 direct + a table of QSIZE - 1 entries.
    let tails = table(&mut drv, &chain(QSIZE - 1, false));
    let ring = [(r, 20, 0), (r, 0, 0), (tails, 16 * u32::from(QSIZE - 1), F_INDIRECT)];
    let len = run(&mut drv, &mut dev, &ring);
    assert_refused(&mut drv, &mut dev, len, w, "direct + table over queue size");
    let exact = table(&mut drv, &chain(QSIZE, true));
    assert_eq!(run(&mut drv, &mut dev, &[(exact, 16 * u32::from(QSIZE), F_INDIRECT)]), 4);
    assert_eq!(dev.iommu().endpoint_domain(1), Some(1));
}

/// Event buffers may be indirect too: a fault event lands in a table's buffer.
#[test]
fn indirect_event_buffer_receives_fault() {
    let mem = new_mem();
    let (mut drv, mut dev) = setup(&mem);
    let iommu = dev.iommu();
    assert!(iommu.translate(1, 0x1000, 4, viommu_device::Access::Read).is_err());
    let b = drv.alloc(32);
    let t = table(&mut drv, &[(b, 12, F_WRITE | F_NEXT, 1), (b + 12, 12, F_WRITE, 0)]);
    drv.push_chain(1, &[(t, 32, F_INDIRECT)]);
    dev.process_event_queue(&mem).unwrap();
    assert_eq!(drv.take_used(1), vec![Used { id: 0, len: 24 }]);
    let ev = drv.read(b, 24);
    assert_eq!((ev[0], u32::from_le_bytes(ev[8..12].try_into().unwrap())), (fault::R_DOMAIN, 1));
    assert_eq!(iommu.pending_faults(), 0);
}
