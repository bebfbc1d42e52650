//! Page-table mode (drafts, issue #15) against the device crate's model,
//! which walks the driver's tables in the fake's memory: no MAP request,
//! INVALIDATE on unmap, ATTACH_TABLE on attach, and the table walked with
//! proto's walk equal to the driver's tree.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use viommu_device::Access;
use viommu_driver::dma::{DmaDirection, DmaDomain, DmaOptions, FlushQueueConfig, Policy};
use viommu_driver::fake::FakeMemory;
use viommu_driver::{Domain, DomainKind, DriverOptions, Error, Prot, VirtioIommu};
use viommu_proto::pgtable::{walk, Translation, WalkError};

const RW: Prot = Prot(Prot::READ.0 | Prot::WRITE.0);

fn table_setup_with(opts: DriverOptions) -> (FakeDevice, Iommu) {
    let fake = FakeDevice::with_page_tables(device_config(), Default::default());
    let iommu = VirtioIommu::new(fake.transport(), fake.hal(), opts).expect("driver init");
    (fake, iommu)
}

fn table_setup() -> (FakeDevice, Iommu) {
    table_setup_with(DriverOptions::default())
}

/// The driver's table as the device would walk it: proto's walk over the fake's memory.
fn walk_table(mem: &FakeMemory, d: &Domain, iova: u64) -> Result<Translation, WalkError> {
    walk(d.page_table_root().expect("table domain"), iova, |gpa| mem.read_u64(gpa))
}

/// Where the device model sends an access of `len` bytes at `iova`.
fn device_phys(fake: &FakeDevice, ep: u32, iova: u64, access: Access) -> Option<u64> {
    let model = fake.model();
    let t = model.translate(ep, iova, 1, access).ok()?;
    t.contiguous().map(|s| s.addr)
}

#[test]
fn table_mode_only_when_offered_and_wanted() {
    let (_fake, iommu) = table_setup();
    let d = iommu.alloc_paging(1).unwrap();
    assert!(d.uses_page_table());
    assert_eq!(d.aperture().1, (1 << 48) - 1, "format 3 translates 48 bits");
    assert!(!iommu.alloc_identity(2).unwrap().uses_page_table());
    assert!(!iommu.alloc_blocking().unwrap().uses_page_table());
    let (_fake, iommu) =
        table_setup_with(DriverOptions { page_tables: false, ..Default::default() });
    assert!(!iommu.alloc_paging(1).unwrap().uses_page_table());
    let (_fake, iommu) = setup(device_config());
    assert!(!iommu.alloc_paging(1).unwrap().uses_page_table());
}

/// Mapping writes entries and sends nothing; attaching sends one
/// ATTACH_TABLE and no MAP; the device translates through the table.
#[test]
fn map_sends_nothing_and_the_device_walks_the_table() {
    let (fake, iommu) = table_setup();
    let d = iommu.alloc_paging(1).unwrap();
    d.map_pages(0x10_0000, 0x8000_0000, 0x2000, RW).unwrap();
    let before = fake.stats();
    iommu.attach(&d, 1).unwrap();
    d.map_pages(0x20_0000, 0x9000_0000, 0x1000, Prot::READ).unwrap();
    d.iotlb_sync_map(0x20_0000, 0x1000).unwrap();
    let s = fake.stats();
    assert_eq!((s.maps() - before.maps(), s.attach_tables() - before.attach_tables()), (0, 1));
    assert_eq!(s.kicks - before.kicks, 1, "the ATTACH_TABLE only");
    assert_eq!(iommu.counters().map, 0);
    assert_eq!(device_phys(&fake, 1, 0x10_1234, Access::Write), Some(0x8000_1234));
    assert_eq!(device_phys(&fake, 1, 0x20_0010, Access::Read), Some(0x9000_0010));
    assert_eq!(device_phys(&fake, 1, 0x20_0010, Access::Write), None, "read-only");
    assert_eq!(device_phys(&fake, 1, 0x30_0000, Access::Read), None);
    assert_eq!(d.iova_to_phys(0x10_1234), Some(0x8000_1234));
}

/// Blocks where alignment and size allow: a 2 MiB + 4 KiB range at a
/// 2 MiB-aligned IOVA and address is one block and one page; a 1 GiB
/// range is one level-1 leaf and makes no table below level 1.
#[test]
fn blocks_where_alignment_allows() {
    let (fake, iommu) = table_setup();
    let d = attached(&iommu, 1);
    let mem = fake.memory();
    d.map_pages(0x4020_0000, 0x1_0020_0000, 0x20_1000, RW).unwrap();
    let t = walk_table(mem, &d, 0x4020_0000).unwrap();
    assert_eq!((t.iova, t.oa, t.size), (0x4020_0000, 0x1_0020_0000, 0x20_0000));
    let t = walk_table(mem, &d, 0x4040_0000).unwrap();
    assert_eq!((t.oa, t.size), (0x1_0040_0000, 0x1000));
    // Misaligned physically by 4 KiB: pages only.
    d.map_pages(0x8000_0000, 0x2_0000_1000, 0x20_0000, RW).unwrap();
    assert_eq!(walk_table(mem, &d, 0x8010_0000).unwrap().size, 0x1000);
    let tables = d.page_table_pages().unwrap().0;
    d.map_pages(0x80_0000_0000, 0x40_0000_0000, 1 << 30, Prot::READ).unwrap();
    let t = walk_table(mem, &d, 0x80_1234_5678).unwrap();
    assert_eq!((t.size, t.output(0x80_1234_5678)), (1 << 30, 0x40_1234_5678));
    assert_eq!(d.page_table_pages().unwrap().0, tables + 1, "one level-1 table, nothing below");
    assert_eq!(device_phys(&fake, 1, 0x80_3fff_fff0, Access::Read), Some(0x40_3fff_fff0));
}

/// Strict unmap through the domain: the entries go, one INVALIDATE is
/// synced, the device no longer translates, and the tables left empty are
/// freed once the INVALIDATE completed (kept as spares: the next map takes
/// no page from the Hal).
#[test]
fn unmap_clears_invalidates_and_frees_empty_tables() {
    let (fake, iommu) = table_setup();
    let d = attached(&iommu, 1);
    let pages_before = fake.memory().live_pages();
    let (tables, _) = d.page_table_pages().unwrap();
    d.map_pages(0x7f_0000_0000, 0x8000_0000, 0x3000, RW).unwrap();
    assert_eq!(d.page_table_pages().unwrap(), (tables + 3, 0), "levels 1, 2, 3");
    assert!(device_phys(&fake, 1, 0x7f_0000_2000, Access::Read).is_some());
    let before = fake.stats();
    assert_eq!(d.unmap_pages(0x7f_0000_0000, 0x3000).unwrap(), 0x3000);
    assert_eq!(d.page_table_pages().unwrap(), (tables, 3), "unlinked, not yet freed");
    d.iotlb_sync().unwrap();
    assert_eq!(d.page_table_pages().unwrap(), (tables, 0));
    assert_eq!(fake.memory().live_pages(), pages_before + 3, "three spares");
    let s = fake.stats();
    assert_eq!((s.invalidates() - before.invalidates(), s.unmaps() - before.unmaps()), (1, 0));
    assert_eq!(device_phys(&fake, 1, 0x7f_0000_2000, Access::Read), None);
    assert!(matches!(
        walk_table(fake.memory(), &d, 0x7f_0000_2000),
        Err(WalkError::NotMapped { level: 0 })
    ));
    // flush_iotlb_all: one domain-wide INVALIDATE.
    d.flush_iotlb_all().unwrap();
    assert_eq!(fake.stats().invalidates() - before.invalidates(), 2);
    d.map_pages(0x7f_0000_0000, 0x8000_0000, 0x3000, RW).unwrap();
    assert_eq!(fake.memory().live_pages(), pages_before + 3, "the spares, reused");
    assert_eq!(device_phys(&fake, 1, 0x7f_0000_2010, Access::Read), Some(0x8000_2010));
}

/// Re-attach is one ATTACH_TABLE: after the last detach the device forgot
/// the domain; attaching again gives it the same root, and the mappings are
/// back without a MAP.
#[test]
fn reattach_is_one_attach_table() {
    let (fake, iommu) = table_setup();
    let d = attached(&iommu, 1);
    d.map_pages(0x10_0000, 0x8000_0000, 0x1000, RW).unwrap();
    iommu.detach(1).unwrap();
    assert_eq!(device_phys(&fake, 1, 0x10_0000, Access::Read), None);
    // Unmapped while detached: nothing to invalidate.
    d.map_pages(0x20_0000, 0x8100_0000, 0x1000, RW).unwrap();
    d.unmap_pages(0x20_0000, 0x1000).unwrap();
    assert_eq!(d.page_table_pages().unwrap().1, 0);
    let before = fake.stats();
    iommu.attach(&d, 1).unwrap();
    iommu.attach(&d, 2).unwrap();
    let s = fake.stats();
    assert_eq!(s.attach_tables() - before.attach_tables(), 2, "one per endpoint");
    assert_eq!((s.maps() - before.maps(), s.invalidates() - before.invalidates()), (0, 0));
    assert_eq!(device_phys(&fake, 1, 0x10_0010, Access::Read), Some(0x8000_0010));
    assert_eq!(device_phys(&fake, 2, 0x10_0010, Access::Read), Some(0x8000_0010));
    // Moving endpoint 2 to a MAP-mode identity domain and back works too.
    let id = iommu.alloc_identity(2).unwrap();
    iommu.attach(&id, 2).unwrap();
    assert_eq!(device_phys(&fake, 2, 0x10_0010, Access::Read), Some(0x10_0010));
    let blocking = iommu.alloc_blocking().unwrap();
    iommu.attach(&blocking, 2).unwrap();
    assert_eq!(device_phys(&fake, 2, 0x10_0010, Access::Read), None);
    iommu.attach(&d, 2).unwrap();
    assert_eq!(device_phys(&fake, 2, 0x10_0010, Access::Read), Some(0x8000_0010));
}

/// MMIO mappings have no place in format 3.
#[test]
fn mmio_is_refused_in_table_mode() {
    let (_fake, iommu) = table_setup();
    let d = attached(&iommu, 1);
    let r = d.map_pages(0x10_0000, 0x8000_0000, 0x1000, Prot(Prot::READ.0 | Prot::MMIO.0));
    assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
}

fn dma_table(policy: Policy) -> (FakeDevice, Iommu, DmaDomain, Arc<ManualClock>) {
    let (fake, iommu) = table_setup();
    let d = attached(&iommu, 1);
    let resv = iommu.reserved_regions(1).unwrap();
    let clock = Arc::new(ManualClock::default());
    let opts = DmaOptions {
        policy,
        lazy: FlushQueueConfig { entries: 8, timeout_ns: 1_000_000 },
        ..Default::default()
    };
    let dma = DmaDomain::new(d, &resv, opts, clock.clone()).unwrap();
    (fake, iommu, dma, clock)
}

/// One I/O through the batch API: no request to map; strict: one
/// INVALIDATE and one kick to unmap, after which the device cannot reach
/// the buffers and the IOVAs are free.
#[test]
fn dma_strict_is_one_invalidate_per_io() {
    let (fake, iommu, dma, _clock) = dma_table(Policy::Strict);
    for _ in 0..4 {
        let before = iommu.counters();
        let mut io = dma.begin();
        let hdr = io.map(0x4000_0000, 16, DmaDirection::ToDevice).unwrap();
        let segs = [(0x5000_0000, 0x1_0000), (0x6000_3000, 0x2000)];
        let data = io.map_sg(&segs, DmaDirection::FromDevice).unwrap();
        let m = io.commit().unwrap();
        let mapped = iommu.counters().since(&before);
        assert_eq!((mapped.requests(), mapped.kicks), (0, 0));
        assert_eq!(device_phys(&fake, 1, hdr, Access::Read), Some(0x4000_0000));
        assert_eq!(device_phys(&fake, 1, data[1].addr + 0x10, Access::Write), Some(0x6000_3010));
        dma.unmap(m).unwrap();
        let used = iommu.counters().since(&before);
        assert_eq!((used.invalidate, used.unmap, used.map, used.kicks), (1, 0, 0, 1));
        assert_eq!(device_phys(&fake, 1, hdr, Access::Read), None);
        assert_eq!(device_phys(&fake, 1, data[0].addr, Access::Write), None);
        assert_eq!(dma.iova_in_use(), 0);
    }
}

/// Lazy: unmaps queue; a full queue flushes with one INVALIDATE, kicked at
/// once; the IOVAs come back only after it completed.
#[test]
fn dma_lazy_is_one_invalidate_per_flush() {
    let (fake, iommu, dma, _clock) = dma_table(Policy::Lazy);
    let before = iommu.counters();
    let mut iovas = Vec::new();
    for i in 0..7 {
        let iova = dma.map_single(0x4000_0000 + i * 0x10_0000, 0x1000, DmaDirection::ToDevice);
        iovas.push(iova.unwrap());
    }
    for &iova in &iovas {
        // The device walks it once, and caches the leaf.
        assert!(device_phys(&fake, 1, iova, Access::Read).is_some());
        dma.unmap_single(iova, 0x1000, DmaDirection::ToDevice).unwrap();
    }
    let used = iommu.counters().since(&before);
    assert_eq!((used.requests(), used.kicks), (0, 0), "queued, nothing sent");
    assert_eq!(dma.iova_in_use(), 7 * 0x1000, "not free before the INVALIDATE");
    // The entries are gone, the device's cached leaves stay until the
    // flush's INVALIDATE (the lazy promise: reachable until then).
    assert!(walk_table(fake.memory(), dma.domain(), iovas[0]).is_err());
    assert!(device_phys(&fake, 1, iovas[0], Access::Read).is_some());
    let iova = dma.map_single(0x4800_0000, 0x1000, DmaDirection::ToDevice).unwrap();
    dma.unmap_single(iova, 0x1000, DmaDirection::ToDevice).unwrap();
    let used = iommu.counters().since(&before);
    assert_eq!((used.invalidate, used.kicks, used.map, used.unmap), (1, 1, 0, 0));
    for &iova in &iovas {
        assert_eq!(device_phys(&fake, 1, iova, Access::Read), None);
    }
    dma.flush().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert_eq!(iommu.counters().since(&before).invalidate, 1, "nothing left to invalidate");
    assert_eq!(dma.domain().page_table_pages().unwrap().1, 0, "retired tables freed");
}

/// A failed INVALIDATE leaves its range to the next one, and its IOVAs
/// are not reused before that one completed.
#[test]
fn a_failed_invalidate_is_sent_again() {
    use viommu_driver::fake::{InjectReply, Injection};
    use viommu_proto::{RequestType, Status};
    let (fake, iommu, dma, _clock) = dma_table(Policy::Strict);
    let iova = dma.map_single(0x4000_0000, 0x1000, DmaDirection::ToDevice).unwrap();
    fake.inject(Injection {
        request: Some(RequestType::Invalidate),
        reply: InjectReply::Status(Status::DevErr),
    });
    let r = dma.unmap_single(iova, 0x1000, DmaDirection::ToDevice);
    assert!(matches!(r, Err(Error::Device { request: RequestType::Invalidate, .. })), "{r:?}");
    assert_eq!(dma.iova_in_use(), 0x1000, "held until an INVALIDATE covers it");
    dma.flush().unwrap();
    assert_eq!(dma.iova_in_use(), 0);
    assert_eq!(iommu.counters().invalidate, 2);
}

/// A domain whose endpoints are all gone holds no table the device walks:
/// dropping it frees every table page.
#[test]
fn dropping_the_domain_frees_its_tables() {
    let (fake, iommu) = table_setup();
    let live = fake.memory().live_pages();
    let d = attached(&iommu, 1);
    d.map_pages(0x10_0000, 0x8000_0000, 0x10_0000, RW).unwrap();
    assert!(fake.memory().live_pages() > live);
    drop(d);
    assert_eq!(fake.memory().live_pages(), live);
    assert_eq!(fake.endpoint_domain(1), None);
}

#[derive(Clone, Debug)]
enum Op {
    /// Map `pages` pages at page `at` of a 4 GiB window, to a physical
    /// address `phys_shift` pages from the IOVA (0: block-aligned when the IOVA is).
    Map { at: u64, pages: u64, phys_shift: u64, write: bool },
    /// Unmap whatever lies in `pages` pages at page `at`.
    Unmap { at: u64, pages: u64 },
    /// Sync the queued INVALIDATEs.
    Sync,
}

fn op() -> impl Strategy<Value = Op> {
    let at = prop_oneof![0..1024u64, (0..4u64).prop_map(|k| k * 512), Just(0x4_0000)];
    let pages = prop_oneof![1..8u64, Just(512u64), Just(513u64), Just(1024u64)];
    prop_oneof![
        4 => (at.clone(), pages.clone(), prop_oneof![Just(0u64), 1..3u64], any::<bool>())
            .prop_map(|(at, pages, phys_shift, write)| Op::Map { at, pages, phys_shift, write }),
        3 => (at, pages).prop_map(|(at, pages)| Op::Unmap { at, pages }),
        1 => Just(Op::Sync),
    ]
}

/// The IOVAs the model test probes: every page boundary the ops can make.
fn probes(ops: &[Op]) -> Vec<u64> {
    let mut v = Vec::new();
    for op in ops {
        if let Op::Map { at, pages, .. } | Op::Unmap { at, pages } = *op {
            for p in [at, at + pages - 1, at + pages, at.saturating_sub(1), at + pages / 2] {
                v.push(BASE + p * 0x1000 + 0x18);
            }
        }
    }
    v.sort_unstable();
    v.dedup();
    v
}

const BASE: u64 = 0x40_0000_0000;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random maps, unmaps and syncs: after each, the table walked with
    /// proto's walk (as the device reads it) translates exactly what the
    /// driver's tree holds, and, once synced, so does the device model.
    #[test]
    fn table_walk_equals_the_tree(ops in proptest::collection::vec(op(), 1..40)) {
        let (fake, iommu) = table_setup();
        let d = attached(&iommu, 1);
        let mem = fake.memory().clone();
        let probe = probes(&ops);
        for op in &ops {
            match *op {
                Op::Map { at, pages, phys_shift, write } => {
                    let iova = BASE + at * 0x1000;
                    let prot = if write { RW } else { Prot::READ };
                    let paddr = 0x1_0000_0000 + at * 0x1000 + phys_shift * 0x1000;
                    let r = d.map_pages(iova, paddr, pages * 0x1000, prot);
                    prop_assert!(r.is_ok() || matches!(r, Err(Error::Overlap { .. })), "{:?}", r);
                }
                Op::Unmap { at, pages } => {
                    let r = d.unmap_pages(BASE + at * 0x1000, pages * 0x1000);
                    prop_assert!(r.is_ok() || matches!(r, Err(Error::WouldSplit { .. })), "{:?}", r);
                }
                Op::Sync => d.iotlb_sync().unwrap(),
            }
            for &iova in &probe {
                let want = d.mappings().into_iter().find(|m| m.iova <= iova && iova <= m.last);
                match (walk_table(&mem, &d, iova), want) {
                    (Ok(t), Some(m)) => {
                        prop_assert_eq!(t.output(iova), m.paddr + (iova - m.iova));
                        prop_assert_eq!(t.write, m.prot.0 & Prot::WRITE.0 != 0);
                        prop_assert!(t.read);
                        prop_assert!(m.iova <= t.iova && t.iova + (t.size - 1) <= m.last);
                    }
                    (Err(WalkError::NotMapped { .. }), None) => {}
                    (got, want) => prop_assert!(false, "{iova:#x}: walk {got:?}, tree {want:?}"),
                }
            }
        }
        d.iotlb_sync().unwrap();
        for &iova in &probe {
            let want = d.iova_to_phys(iova);
            prop_assert_eq!(device_phys(&fake, 1, iova, Access::Read), want, "{:#x}", iova);
        }
        // Everything unmapped and synced: only the root is left.
        d.unmap_pages(0, 1 << 48).unwrap();
        d.iotlb_sync().unwrap();
        prop_assert_eq!(d.page_table_pages(), Some((1, 0)));
        prop_assert_eq!(d.kind(), DomainKind::Paging);
    }
}
