//! Prints the cost of a read through vm-memory's `IommuMemory` over [`EndpointIommu`] on a
//! hit, next to the same read on physical memory, through our `translate()` + `read_at`, and
//! through `IommuMemory` over a bare vm-memory `Iotlb` (no lock, no lease: the floor that
//! vm-memory's own lookup sets), all in one run. 64 hot 4 KiB mappings, visited in turn.
//!
//! ```text
//! cargo run --release -p viommu-device --example vm_memory
//! ```

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use viommu_device::{Access, DeviceConfig, EndpointConfig, EndpointIommu, Iommu};
use viommu_proto::{AttachBody, MapBody, Request, Status, MAP_F_READ, MAP_F_WRITE};
use vm_memory::iommu::{Error, IotlbIterator};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory, Iotlb, Permissions};
use zerocopy::little_endian::{U32, U64};

type Mem = GuestMemoryMmap<()>;

const EP: u32 = 1;
const PAGES: u64 = 64;
const IOVA: u64 = 0x1000_0000;
const GPA: u64 = 0x10_0000;
const PAGE: u64 = 0x1000;
const ITERS: u64 = 200_000;
const ROUNDS: usize = 7;

/// Page `k`'s guest-physical address: scattered, so that no two mappings merge.
fn gpa(k: u64) -> u64 {
    GPA + (k * 7 % PAGES) * PAGE
}

/// vm-memory's `Iotlb` with nothing around it: what any `Iommu` implementation pays at least.
#[derive(Debug)]
struct Bare(Iotlb);

impl vm_memory::Iommu for Bare {
    type IotlbGuard<'a> = &'a Iotlb;
    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<&Iotlb>, Error> {
        Iotlb::lookup(&self.0, iova, length, access)
            .map_err(|_| Error::IommuMisconfigured { reason: "miss".into() })
    }
}

fn mem() -> Mem {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 21)]).unwrap()
}

fn iommu() -> Arc<Iommu> {
    let cfg = DeviceConfig { endpoints: vec![EndpointConfig::new(EP)], ..Default::default() };
    let iommu = Arc::new(Iommu::new(cfg).unwrap());
    let attach = Request::Attach(AttachBody {
        domain: U32::new(1),
        endpoint: U32::new(EP),
        ..Default::default()
    });
    assert_eq!(iommu.execute(&attach, &mut []), Status::Ok);
    for k in 0..PAGES {
        let map = Request::Map(MapBody {
            domain: U32::new(1),
            virt_start: U64::new(IOVA + k * PAGE),
            virt_end: U64::new(IOVA + k * PAGE + PAGE - 1),
            phys_start: U64::new(gpa(k)),
            flags: U32::new(MAP_F_READ | MAP_F_WRITE),
        });
        assert_eq!(iommu.execute(&map, &mut []), Status::Ok);
    }
    iommu
}

/// Nanoseconds per call of `f(page)`, the median over rounds.
fn time(mut f: impl FnMut(u64)) -> f64 {
    let mut v: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let t = Instant::now();
            for i in 0..ITERS {
                f(i % PAGES);
            }
            t.elapsed().as_nanos() as f64 / ITERS as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[ROUNDS / 2]
}

fn main() {
    let iommu = iommu();
    let ours = IommuMemory::new(mem(), EndpointIommu::new(iommu.clone(), EP), true, ());
    let mut tlb = Iotlb::new();
    for k in 0..PAGES {
        let (iova, gpa) = (GuestAddress(IOVA + k * PAGE), GuestAddress(gpa(k)));
        tlb.set_mapping(iova, gpa, PAGE as usize, Permissions::ReadWrite).unwrap();
    }
    let bare = IommuMemory::new(mem(), Bare(tlb), true, ());
    let phys = mem();
    let mut buf = vec![0u8; PAGE as usize];

    // Warm: every page in the mirror and in the per-thread translate cache.
    for k in 0..PAGES {
        ours.read_obj::<u64>(GuestAddress(IOVA + k * PAGE)).unwrap();
        drop(iommu.translate(EP, IOVA + k * PAGE, 8, Access::Read).unwrap());
    }

    println!("viommu-device vm-memory bench: reads on a hit, 64 hot 4 KiB mappings in turn;");
    println!("median of {ROUNDS} rounds of {ITERS} reads, ns per read (ratio to physical)");
    println!();
    println!("| read | physical | our translate() + read_at | IommuMemory over EndpointIommu | IommuMemory over a bare Iotlb (vm-memory's floor) |");
    println!("|---|---:|---:|---:|---:|");
    for (name, len) in [("8 B", 8usize), ("4 KiB", PAGE as usize)] {
        let b = &mut buf[..len];
        let p = time(|k| phys.read_slice(black_box(&mut *b), GuestAddress(gpa(k))).unwrap());
        let t = time(|k| {
            let t = iommu.translate(EP, IOVA + k * PAGE, len as u64, Access::Read).unwrap();
            t.read_at(&phys, 0, black_box(&mut *b)).unwrap();
        });
        let o =
            time(|k| ours.read_slice(black_box(&mut *b), GuestAddress(IOVA + k * PAGE)).unwrap());
        let f =
            time(|k| bare.read_slice(black_box(&mut *b), GuestAddress(IOVA + k * PAGE)).unwrap());
        println!(
            "| {name} | {p:.1} | {t:.1} ({:.2}x) | {o:.1} ({:.2}x) | {f:.1} ({:.2}x) |",
            t / p,
            o / p,
            f / p
        );
    }
}
