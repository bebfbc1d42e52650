//! The strict promise through the VM's `DmaEngine`: a long copy takes one lease per chunk,
//! so an UNMAP of its last page completes after at most one chunk, and the guest's data
//! written into that page after the UNMAP completed survives the copy.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use viommu_device::FaultKind;
use viommu_driver::{Prot, PAGE_SIZE};
use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::endpoint::{DmaEngine, DmaFault};
use viommu_vm::machine::{device_config, Machine, MachineOptions};
use viommu_vm::GuestRam;

const EP: u32 = 8;
const COPY: usize = 256 << 20;
const IOVA: u64 = 0x1_0000_0000;
const PAGE: u64 = PAGE_SIZE as u64;

fn machine(ram: Arc<GuestRam>) -> Machine {
    let opts = MachineOptions::deterministic();
    Machine::with_options(ram, device_config(EP), EP, Mode::Driver(DriverMode::Strict), opts)
        .unwrap()
}

/// A 256 MiB device write into guest memory; the guest unmaps the last page while it
/// runs and reuses the page at once. Before chunked leases the copy, translated once up
/// front, overwrote the page after the UNMAP had completed.
#[test]
fn a_long_copy_does_not_outlive_the_unmap_of_its_last_page() {
    let ram = GuestRam::new(COPY + (16 << 20)).unwrap();
    let m = machine(ram.clone());
    let run = ram.alloc_pages(COPY / PAGE_SIZE).unwrap();
    let last_iova = IOVA + (COPY - PAGE_SIZE) as u64;
    let last_gpa = run.gpa + (COPY - PAGE_SIZE) as u64;
    let d = m.domain().unwrap();
    let rw = Prot::READ | Prot::WRITE;
    // The last page is its own mapping, so that it can be unmapped alone.
    d.map_pages(IOVA, run.gpa, (COPY - PAGE_SIZE) as u64, rw).unwrap();
    d.map_pages(last_iova, last_gpa, PAGE, rw).unwrap();
    d.iotlb_sync_map(IOVA, COPY as u64).unwrap();

    let engine = Arc::new(DmaEngine::translated(ram.clone(), m.iommu(), EP));
    let started = Arc::new(AtomicBool::new(false));
    let copier = {
        let (engine, started) = (engine.clone(), started.clone());
        thread::spawn(move || {
            let data = vec![0xdd_u8; COPY];
            started.store(true, SeqCst);
            engine.write(IOVA, &data)
        })
    };
    // Wait until the copy is under way: its first bytes are in guest memory.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut first = [0u8; 1];
    while !started.load(SeqCst) || first[0] != 0xdd {
        assert!(Instant::now() < deadline, "the copy never started");
        thread::yield_now();
        ram.read(run.gpa, &mut first).unwrap();
    }
    assert_eq!(d.unmap_pages(last_iova, PAGE).unwrap(), PAGE);
    d.iotlb_sync().unwrap();
    // Strict: the UNMAP has completed, the page is the guest's again.
    ram.write(last_gpa, &[0x66; PAGE_SIZE]).unwrap();
    let result = copier.join().unwrap();
    let mut page = vec![0u8; PAGE_SIZE];
    ram.read(last_gpa, &mut page).unwrap();
    assert!(page.iter().all(|&b| b == 0x66), "the copy wrote the page after its UNMAP");
    match result {
        Err(DmaFault::Iommu(f)) => {
            assert_eq!((f.kind, f.address), (FaultKind::Unmapped, last_iova));
        }
        other => panic!("the copy should fault at the unmapped page, got {other:?}"),
    }
}

/// One translation (and lease) per chunk, chunks cut at chunk-aligned IOVAs.
#[test]
fn dma_takes_one_lease_per_chunk() {
    let ram = GuestRam::new(16 << 20).unwrap();
    let m = machine(ram.clone());
    let run = ram.alloc_pages(4).unwrap();
    let d = m.domain().unwrap();
    d.map_pages(IOVA, run.gpa, 4 * PAGE, Prot::READ | Prot::WRITE).unwrap();
    d.iotlb_sync_map(IOVA, 4 * PAGE).unwrap();
    let page = DmaEngine::translated(ram.clone(), m.iommu(), EP);
    // Three pages starting mid-page span four pages.
    page.write(IOVA + 0x800, &[7; 3 * PAGE_SIZE]).unwrap();
    assert_eq!(page.translations(), 4);
    let small = DmaEngine::translated(ram.clone(), m.iommu(), EP).with_chunk(512);
    let mut back = vec![0u8; 3 * PAGE_SIZE];
    small.read(IOVA + 0x800, &mut back).unwrap();
    assert_eq!(small.translations(), 24);
    assert!(back.iter().all(|&b| b == 7));
}
