//! Page-table mode (experimental; drafts): one test per choice of docs/spec-coverage.md
//! P13–P20, named after the rule, with the draft or spec sentence it follows; and the
//! strict promise for INVALIDATE, as tests/leases.rs checks it for UNMAP.

mod common;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use viommu_device::{
    Access, DeviceConfig, FaultKind, Listener, ListenerError, Mapping, VirtioIommu, Window,
};
use viommu_proto::features::{bit, ATTACH_TABLE};
use viommu_proto::pgtable::{index, leaf_level, Pte, PTE_READ, PTE_WRITE};
use viommu_proto::*;
use vm_memory::{Bytes, GuestAddress};
use zerocopy::little_endian::{U16, U32, U64};

/// Where the tables live, and the pages they map.
const TABLES: u64 = 0xa0_0000;
const PAGE_A: u64 = 0xc0_0000;
const PAGE_B: u64 = 0xc1_0000;
const IOVA: u64 = 0x4000_0000;

fn table_cfg(endpoints: &[u32]) -> DeviceConfig {
    let mut c = cfg(endpoints);
    c.features.attach_table = true;
    c
}

/// A device in page-table mode over `mem`, every offered feature negotiated.
fn table_device(d: &Driver<'_>, c: DeviceConfig) -> VirtioIommu {
    let dev = d.device(c);
    dev.iommu().set_table_memory(Some(Arc::new(d.mem.clone())));
    dev
}

fn attach_table(domain: u32, endpoint: u32, root: u64) -> Request {
    Request::AttachTable(AttachTableBody {
        domain: U32::new(domain),
        endpoint: U32::new(endpoint),
        pgd: U64::new(root),
        ..Default::default()
    })
}

fn inval_domain(domain: u32) -> Request {
    Request::Invalidate(InvalidateBody::domain(domain))
}

fn inval_range(domain: u32, start: u64, pages: u64) -> Request {
    Request::Invalidate(InvalidateBody::range(domain, start, pages, 12))
}

/// A format-3 table built in guest memory, the way a driver would.
struct Table<'a> {
    mem: &'a Mem,
    root: u64,
    next: u64,
}

impl<'a> Table<'a> {
    fn new(mem: &'a Mem, base: u64) -> Self {
        mem.write_slice(&[0; 4096], GuestAddress(base)).unwrap();
        Self { mem, root: base, next: base + 4096 }
    }

    fn get(&self, gpa: u64) -> u64 {
        let mut b = [0; 8];
        self.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        u64::from_le_bytes(b)
    }

    fn set(&self, gpa: u64, raw: u64) {
        self.mem.write_slice(&raw.to_le_bytes(), GuestAddress(gpa)).unwrap();
    }

    /// The address of `iova`'s entry at `level`, making tables down to it.
    fn slot(&mut self, iova: u64, level: usize) -> u64 {
        let mut table = self.root;
        for l in 0..level {
            let gpa = table + 8 * index(iova, l) as u64;
            let raw = self.get(gpa);
            table = if raw & 3 == 3 {
                raw & 0xf_ffff_ffff_f000
            } else {
                let t = self.next;
                self.next += 4096;
                self.mem.write_slice(&[0; 4096], GuestAddress(t)).unwrap();
                self.set(gpa, Pte::table(t).get());
                t
            };
        }
        table + 8 * index(iova, level) as u64
    }

    fn map(&mut self, iova: u64, oa: u64, size: u64, read: bool, write: bool) {
        let level = leaf_level(size).unwrap();
        let gpa = self.slot(iova, level);
        self.set(gpa, Pte::leaf(oa, read, write).get());
    }

    fn unmap(&mut self, iova: u64, size: u64) {
        let gpa = self.slot(iova, leaf_level(size).unwrap());
        self.set(gpa, 0);
    }
}

/// Endpoint 1 attached to table domain 1, `IOVA` -> `PAGE_A` read-write.
fn mapped<'a>(d: &mut Driver<'a>, mem: &'a Mem) -> (VirtioIommu, Table<'a>) {
    let mut dev = table_device(d, table_cfg(&[1, 2]));
    let mut t = Table::new(mem, TABLES);
    t.map(IOVA, PAGE_A, 4096, true, true);
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, t.root)), Status::Ok);
    (dev, t)
}

fn addr(dev: &VirtioIommu, ep: u32, iova: u64, access: Access) -> Result<u64, FaultKind> {
    let i = dev.iommu();
    let r = i.translate(ep, iova, 8, access).map(|t| t.contiguous().unwrap().addr);
    r.map_err(|f| f.kind)
}

// ---- offered only when asked ------------------------------------------------------------

/// The VMM must ask: without `attach_table` the feature is not offered, the draft's request
/// types are unknown ones (used length 0), and PROBE reports no table format.
#[test]
fn page_table_mode_is_off_unless_the_vmm_asks() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = d.device(cfg(&[1]));
    assert_eq!(dev.device_features() & bit(ATTACH_TABLE), 0);
    // §5.13.6.2: "If a request type is not recognized, the device SHOULD NOT write the
    // buffer and SHOULD set the used length to zero."
    let w = d.submit(&attach_table(1, 1, TABLES), 0);
    dev.process_request_queue(&mem).unwrap();
    assert_eq!(d.take_used(0)[0].len, 0);
    assert_eq!(d.read(w, 4), [0xaa; 4]);
    assert!(probe_formats(&mut d, &mut dev, 1).is_empty());

    let mut dev = table_device(&d, table_cfg(&[1]));
    assert_ne!(dev.device_features() & bit(ATTACH_TABLE), 0);
    assert_eq!(dev.device_features() & bit(features::MQ), 0);
    assert_eq!(probe_formats(&mut d, &mut dev, 1), [pgtable::FORMAT_VIRT]);
}

/// The PAGE_TABLE_FMT properties PROBE returns for `ep`.
fn probe_formats(d: &mut Driver<'_>, dev: &mut VirtioIommu, ep: u32) -> Vec<u16> {
    let ps = dev.iommu().config().probe_size;
    let w = d.submit(&probe(ep), ps);
    dev.process_request_queue(d.mem).unwrap();
    d.take_used(0);
    let props = d.read(w, ps as usize);
    PropertyIter::new(&props)
        .filter_map(|p| match p {
            Ok(Property::PageTableFormat(f)) => Some(f.format.get()),
            _ => None,
        })
        .collect()
}

/// P5 (P23's 4-byte value, one property per format): it comes after the RESV_MEM
/// properties and counts in the probe_size check.
#[test]
fn p5_probe_reports_format_3_after_the_reserved_regions() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut c = cfg_with_resv();
    c.features.attach_table = true;
    let mut dev = table_device(&d, c.clone());
    assert_eq!(probe_formats(&mut d, &mut dev, 2), [pgtable::FORMAT_VIRT]);
    // Room for the RESV_MEM property only: the configuration is refused.
    c.probe_size = 24;
    assert!(VirtioIommu::new(c).is_err());
}

/// P1: the draft's requests come with F_ATTACH_TABLE; offered but not negotiated they get
/// UNSUPP, as MAP without F_MAP_UNMAP does here.
#[test]
fn p1_requests_without_the_negotiated_feature_are_unsupp() {
    let mem = new_mem();
    let mut dev = VirtioIommu::new(table_cfg(&[1])).unwrap();
    dev.ack_features(dev.device_features() & !bit(ATTACH_TABLE));
    let i = dev.iommu();
    i.set_table_memory(Some(Arc::new(mem.clone())));
    assert_eq!(i.execute(&attach_table(1, 1, TABLES), &mut []), Status::Unsupp);
    assert_eq!(i.execute(&inval_domain(1), &mut []), Status::Unsupp);
}

// ---- ATTACH_TABLE -----------------------------------------------------------------------

/// P14: format 3 defines no flag, and reserved fields are zero, as for ATTACH: "If the
/// reserved field of an ATTACH request is not zero, the device MUST reject the request and
/// set status to VIRTIO_IOMMU_S_INVAL." P15: a format not reported by PROBE is UNSUPP.
#[test]
fn p14_p15_attach_table_flags_reserved_and_format() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = table_device(&d, table_cfg(&[1]));
    Table::new(&mem, TABLES);
    let with = |f: &dyn Fn(&mut AttachTableBody)| {
        let Request::AttachTable(mut b) = attach_table(1, 1, TABLES) else { unreachable!() };
        f(&mut b);
        Request::AttachTable(b)
    };
    assert_eq!(d.request(&mut dev, &with(&|b| b.flags = U32::new(1))), Status::Inval);
    assert_eq!(d.request(&mut dev, &with(&|b| b.reserved[5] = 1)), Status::Inval);
    assert_eq!(d.request(&mut dev, &with(&|b| b.reserved2[47] = 1)), Status::Inval);
    let lpae = with(&|b| b.format = U16::new(pgtable::FORMAT_ARM_LPAE));
    assert_eq!(d.request(&mut dev, &lpae), Status::Unsupp);
    assert_eq!(d.request(&mut dev, &with(&|b| b.endpoint = U32::new(9))), Status::NoEnt);
    assert_eq!(dev.iommu().domain_count(), 0);
    assert_eq!(d.request(&mut dev, &with(&|_| ())), Status::Ok);
}

/// P16: the root is a 4 KiB aligned table in guest RAM, else RANGE; without table memory
/// the device cannot walk anything: DEVERR.
#[test]
fn p16_root_unaligned_or_outside_ram_is_range() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = table_device(&d, table_cfg(&[1]));
    for bad in [TABLES + 8, 1 << 52, MEM_SIZE as u64, !0xfff_u64] {
        assert_eq!(d.request(&mut dev, &attach_table(1, 1, bad)), Status::Range, "{bad:#x}");
    }
    dev.iommu().set_table_memory(None);
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, TABLES)), Status::DevErr);
    assert_eq!(dev.iommu().domain_count(), 0);
}

/// P13: a domain keeps its mode and root for life, as ATTACH's bypass flag: "If the domain
/// already exists and the VIRTIO_IOMMU_ATTACH_F_BYPASS flag is not consistent with that
/// domain, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_INVAL."
#[test]
fn p13_a_domain_keeps_its_mode_and_root() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, t) = mapped(&mut d, &mem);
    // Same root: a second endpoint joins; again: nothing to do.
    assert_eq!(d.request(&mut dev, &attach_table(1, 2, t.root)), Status::Ok);
    assert_eq!(d.request(&mut dev, &attach_table(1, 2, t.root)), Status::Ok);
    assert_eq!(addr(&dev, 2, IOVA, Access::Read), Ok(PAGE_A));
    // Another root, a plain ATTACH, MAP and UNMAP: the domain is a table domain.
    Table::new(&mem, TABLES + 0x10_0000);
    assert_eq!(d.request(&mut dev, &attach_table(1, 2, TABLES + 0x10_0000)), Status::Inval);
    assert_eq!(d.request(&mut dev, &attach(1, 2)), Status::Inval);
    assert_eq!(d.request(&mut dev, &map(1, 0x1000, 0x1fff, PAGE_B, RW)), Status::Inval);
    assert_eq!(d.request(&mut dev, &unmap(1, 0, u64::MAX)), Status::Inval);
    // A MAP domain refuses ATTACH_TABLE.
    assert_eq!(d.request(&mut dev, &attach(2, 2)), Status::Ok);
    assert_eq!(d.request(&mut dev, &attach_table(2, 1, t.root)), Status::Inval);
    // Moving endpoint 1 into a table domain of its own works, like ATTACH's move.
    assert_eq!(d.request(&mut dev, &attach_table(3, 1, TABLES + 0x10_0000)), Status::Ok);
    assert_eq!(dev.iommu().endpoint_domain(1), Some(3));
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Err(FaultKind::Unmapped));
}

// ---- the walk ---------------------------------------------------------------------------

/// P6: 4 KiB pages, 2 MiB and 1 GiB blocks; an access across leaves gives one segment per
/// discontiguity; READ and WRITE are checked per leaf.
#[test]
fn p6_walk_translates_pages_and_blocks_with_their_permissions() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, mut t) = mapped(&mut d, &mem);
    t.map(IOVA + 0x1000, PAGE_B, 4096, true, false);
    t.map(0x8020_0000, 0x20_0000, 2 << 20, false, true);
    t.map(0x1_4000_0000, 0x4000_0000, 1 << 30, true, true);
    assert_eq!(addr(&dev, 1, IOVA + 8, Access::Write), Ok(PAGE_A + 8));
    assert_eq!(addr(&dev, 1, IOVA + 0x1010, Access::Read), Ok(PAGE_B + 0x10));
    assert_eq!(addr(&dev, 1, IOVA + 0x1010, Access::Write), Err(FaultKind::Permission));
    assert_eq!(addr(&dev, 1, 0x8030_0000, Access::Write), Ok(0x30_0000));
    assert_eq!(addr(&dev, 1, 0x8030_0000, Access::Read), Err(FaultKind::Permission));
    assert_eq!(addr(&dev, 1, 0x1_7fff_fff0, Access::Read), Ok(0x7fff_fff0));
    let i = dev.iommu();
    let tr = i.translate(1, IOVA + 0xff0, 0x20, Access::Read).unwrap();
    let segs: Vec<_> = tr.iter().map(|s| (s.addr, s.len)).collect();
    assert_eq!(segs, [(PAGE_A + 0xff0, 0x10), (PAGE_B, 0x10)]);
}

/// P12 (R21 fault reasons): a table outside guest RAM is WALK_EABT (3), a malformed entry
/// PTE_FETCH (4), an invalid entry or an IOVA above 48 bits MAPPING; each is reported
/// through the event queue like any fault.
#[test]
fn p12_walk_faults_carry_the_draft_reasons() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, mut t) = mapped(&mut d, &mem);
    let beyond = 0x1_0000_0000;
    // A level-2 table pointer outside RAM.
    let l2 = t.slot(0x8000_0000, 1);
    t.set(l2, Pte::table(beyond).get());
    // Reserved bit 4 in a level-3 leaf.
    let bad = t.slot(IOVA + 0x2000, 3);
    t.set(bad, Pte::leaf(PAGE_B, true, true).get() | 1 << 4);
    assert_eq!(addr(&dev, 1, 0x8000_0000, Access::Read), Err(FaultKind::TableOutsideMemory));
    assert_eq!(addr(&dev, 1, IOVA + 0x2000, Access::Read), Err(FaultKind::BadTableEntry));
    assert_eq!(addr(&dev, 1, IOVA + 0x3000, Access::Read), Err(FaultKind::Unmapped));
    assert_eq!(addr(&dev, 1, 1 << 48, Access::Read), Err(FaultKind::Unmapped));
    let reasons: Vec<u8> = dev.snapshot().faults.iter().map(|f| f.reason).collect();
    assert_eq!(reasons, [fault::R_WALK_EABT, fault::R_PTE_FETCH, fault::R_MAPPING]);
    // Delivered through the event queue.
    let ev = d.add_event_buffer(24);
    dev.process_event_queue(&mem).unwrap();
    let e = d.read(ev, 24);
    assert_eq!(e[0], fault::R_WALK_EABT);
    assert_eq!(e[16..24], 0x8000_0000u64.to_le_bytes());
}

/// P11: "each entry read once", at most four reads: a table whose entries all point at
/// itself ends at level 3 as malformed, whatever the IOVA.
#[test]
fn p11_a_table_pointing_at_itself_is_a_bounded_pte_fetch_fault() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = table_device(&d, table_cfg(&[1]));
    let t = Table::new(&mem, TABLES);
    for i in 0..512 {
        t.set(TABLES + 8 * i, Pte::table(TABLES).get());
    }
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, TABLES)), Status::Ok);
    for iova in [0, IOVA, 0xffff_ffff_f000] {
        assert_eq!(addr(&dev, 1, iova, Access::Read), Err(FaultKind::BadTableEntry));
    }
}

/// P10 as the device applies it: READ/WRITE in a table entry, a misaligned block and a
/// leaf at level 0 are PTE_FETCH faults, never a translation.
#[test]
fn p10_malformed_entries_never_translate() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, mut t) = mapped(&mut d, &mem);
    let l1 = t.slot(IOVA, 1);
    let good = t.get(l1);
    for raw in [good | PTE_READ, good | PTE_WRITE, good | 1 << 60] {
        t.set(l1, raw);
        assert_eq!(addr(&dev, 1, IOVA, Access::Read), Err(FaultKind::BadTableEntry));
    }
    t.set(l1, good);
    // A 2 MiB block at a 4 KiB-aligned address.
    let l2 = t.slot(0x8040_0000, 2);
    t.set(l2, 0x20_1000 | 1 | PTE_READ);
    assert_eq!(addr(&dev, 1, 0x8040_0000, Access::Read), Err(FaultKind::BadTableEntry));
    // A leaf at level 0.
    let l0 = t.slot(1 << 39, 0);
    t.set(l0, 1 | PTE_READ);
    assert_eq!(addr(&dev, 1, 1 << 39, Access::Read), Err(FaultKind::BadTableEntry));
}

/// §5.13.3 input_range ("Any mapping request to virtual addresses outside of this range
/// fails"): a table cannot map outside it either, not even through a block that
/// straddles its end.
#[test]
fn p19_input_range_bounds_table_translations() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut c = table_cfg(&[1]);
    c.input_range = (0, 0x4010_0fff);
    let mut dev = table_device(&d, c);
    let mut t = Table::new(&mem, TABLES);
    t.map(0x4000_0000, 0x20_0000, 2 << 20, true, true);
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, t.root)), Status::Ok);
    assert_eq!(addr(&dev, 1, 0x4010_0ff8, Access::Read), Ok(0x30_0ff8));
    assert_eq!(addr(&dev, 1, 0x4010_1000, Access::Read), Err(FaultKind::Unmapped));
    let i = dev.iommu();
    let f = i.translate(1, 0x4010_0ff0, 0x20, Access::Read).unwrap_err();
    assert_eq!((f.kind, f.address), (FaultKind::Unmapped, 0x4010_1000));
    let Some((Window::Mapping(m), _)) = i.lookup(1, 0x4000_0000) else { panic!() };
    assert_eq!((m.start, m.end), (0x4000_0000, 0x4010_0fff));
}

/// Reserved regions come before the domain, as in MAP mode: RESV_MEM_T_RESERVED faults and
/// the MSI doorbell is identity, even where the guest's table maps them; lookup's window
/// stops at them.
#[test]
fn reserved_regions_apply_to_table_domains() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut c = cfg_with_resv();
    c.features.attach_table = true;
    let mut dev = table_device(&d, c);
    let mut t = Table::new(&mem, TABLES);
    t.map(0xc000_0000, 0, 1 << 30, true, true); // covers the MSI doorbell
    t.map(0x8000_0000, 0x4000_0000, 1 << 30, true, true); // covers ep 2's reserved region
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, t.root)), Status::Ok);
    assert_eq!(d.request(&mut dev, &attach_table(1, 2, t.root)), Status::Ok);
    assert_eq!(addr(&dev, 1, 0xfee0_0040, Access::Write), Ok(0xfee0_0040));
    assert_eq!(addr(&dev, 1, 0xc000_1000, Access::Write), Ok(0x1000));
    assert_eq!(addr(&dev, 2, 0x8000_1000, Access::Write), Err(FaultKind::Reserved));
    let i = dev.iommu();
    let Some((Window::Mapping(m), p)) = i.lookup(1, 0xc000_1000) else { panic!() };
    assert_eq!((m.start, m.end, m.phys, p.write), (0xc000_0000, 0xfedf_ffff, 0, true));
}

/// Bypass is untouched: global bypass still serves unattached endpoints, and a table
/// domain is never a bypass one.
#[test]
fn global_bypass_and_table_domains_coexist() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, _t) = mapped(&mut d, &mem);
    assert!(dev.write_config(36, &[1]));
    assert_eq!(addr(&dev, 2, 0x5000, Access::Write), Ok(0x5000));
    assert_eq!(addr(&dev, 1, 0x5000, Access::Write), Err(FaultKind::Unmapped));
    assert_eq!(d.request(&mut dev, &attach_flags(4, 2, ATTACH_F_BYPASS)), Status::Ok);
    assert_eq!(d.request(&mut dev, &attach_table(4, 1, TABLES)), Status::Inval);
}

// ---- INVALIDATE -------------------------------------------------------------------------

/// P17 (P23 header): granularity exactly DOMAIN or VA; PASID is unsupported (no PASID
/// tables); unknown cache types and flags are INVAL; a VA range of no page is INVAL.
#[test]
fn p17_invalidate_fields_are_checked() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, _t) = mapped(&mut d, &mem);
    let with = |f: &dyn Fn(&mut InvalidateBody)| {
        let mut b = InvalidateBody::range(1, IOVA, 1, 12);
        f(&mut b);
        Request::Invalidate(b)
    };
    type Edit<'a> = &'a dyn Fn(&mut InvalidateBody);
    let cases: [(Edit, Status); 10] = [
        (&|_| (), Status::Ok),
        (&|b| b.inv_gran = U16::new(inval::G_DOMAIN), Status::Ok),
        (&|b| b.inv_gran = U16::new(inval::G_PASID), Status::Unsupp),
        (&|b| b.inv_gran = U16::new(inval::G_VA | inval::G_DOMAIN), Status::Inval),
        (&|b| b.inv_gran = U16::new(0), Status::Inval),
        (&|b| b.inv_type = U16::new(0), Status::Inval),
        (&|b| b.inv_type = U16::new(1 << 5), Status::Inval),
        (&|b| b.flags = U16::new(inval::F_PASID), Status::Unsupp),
        (&|b| b.nr_pages = U64::new(0), Status::Inval),
        (&|b| b.granule = 11, Status::Inval),
    ];
    for (i, (f, want)) in cases.iter().enumerate() {
        assert_eq!(d.request(&mut dev, &with(*f)), *want, "case {i}");
    }
    // F_LEAF and F_ARCHID are hints; every cache type is accepted.
    let hint = with(&|b| {
        b.flags = U16::new(inval::F_LEAF | inval::F_ARCHID);
        b.inv_type = U16::new(inval::T_MASK);
    });
    assert_eq!(d.request(&mut dev, &hint), Status::Ok);
}

/// P18: INVALIDATE names an existing table domain: NOENT for none ("If domain does not
/// exist, the device SHOULD reject the request and set status to VIRTIO_IOMMU_S_NOENT", as
/// MAP), INVAL for a MAP or bypass domain.
#[test]
fn p18_invalidate_needs_a_table_domain() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, _t) = mapped(&mut d, &mem);
    assert_eq!(d.request(&mut dev, &inval_domain(7)), Status::NoEnt);
    assert_eq!(d.request(&mut dev, &attach(2, 2)), Status::Ok);
    assert_eq!(d.request(&mut dev, &inval_domain(2)), Status::Inval);
}

/// P20: the device may serve a translation from its cache until INVALIDATE; after a
/// range INVALIDATE the range is walked afresh, outside it the cache still answers; a
/// domain-wide one empties everything.
#[test]
fn p20_invalidate_empties_the_cache_by_range_or_domain() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, mut t) = mapped(&mut d, &mem);
    t.map(IOVA + 0x10_0000, PAGE_A, 4096, true, true);
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Ok(PAGE_A));
    assert_eq!(addr(&dev, 1, IOVA + 0x10_0000, Access::Read), Ok(PAGE_A));
    // The guest repoints both pages without telling the device: the cache answers.
    t.map(IOVA, PAGE_B, 4096, true, true);
    t.map(IOVA + 0x10_0000, PAGE_B, 4096, true, true);
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Ok(PAGE_A));
    assert_eq!(d.request(&mut dev, &inval_range(1, IOVA, 1)), Status::Ok);
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Ok(PAGE_B));
    assert_eq!(addr(&dev, 1, IOVA + 0x10_0000, Access::Read), Ok(PAGE_A));
    assert_eq!(d.request(&mut dev, &inval_domain(1)), Status::Ok);
    assert_eq!(addr(&dev, 1, IOVA + 0x10_0000, Access::Read), Ok(PAGE_B));
    // Unmapped and invalidated: the translation is gone, on every thread.
    t.unmap(IOVA, 4096);
    assert_eq!(d.request(&mut dev, &inval_range(1, IOVA, 1)), Status::Ok);
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Err(FaultKind::Unmapped));
    let i = dev.iommu();
    let other = thread::spawn(move || i.translate(1, IOVA, 8, Access::Read).is_err());
    assert!(other.join().unwrap());
}

/// A block split by the guest: a range INVALIDATE of one page of a cached 2 MiB block drops
/// the whole block's entry, so an access that crosses into the unmapped page faults.
#[test]
fn p20_a_range_invalidate_drops_a_block_it_touches() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (mut dev, mut t) = mapped(&mut d, &mem);
    t.map(0x8000_0000, 0x20_0000, 2 << 20, true, true);
    assert_eq!(addr(&dev, 1, 0x8000_0000, Access::Read), Ok(0x20_0000));
    // Split: a level-3 table with every page but the second.
    let l2 = t.slot(0x8000_0000, 2);
    t.set(l2, 0);
    for p in (0..512u64).filter(|&p| p != 1) {
        t.map(0x8000_0000 + (p << 12), 0x20_0000 + (p << 12), 4096, true, true);
    }
    assert_eq!(d.request(&mut dev, &inval_range(1, 0x8000_1000, 1)), Status::Ok);
    let i = dev.iommu();
    let f = i.translate(1, 0x8000_0ff0, 0x20, Access::Read).unwrap_err();
    assert_eq!((f.kind, f.address), (FaultKind::Unmapped, 0x8000_1000));
    assert_eq!(addr(&dev, 1, 0x8000_2000, Access::Read), Ok(0x20_2000));
}

// ---- the strict promise -----------------------------------------------------------------

/// Runs `f` on its own thread; fails if it has not finished within `limit` (a deadlock).
fn watchdog<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = channel();
    thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(limit).expect("deadlock: the test did not finish in time")
}

/// The strict promise in page-table mode: the guest clears the PTE and sends INVALIDATE;
/// a device thread that translated before holds its lease and then writes. The used entry
/// appears only after that write, so the page the guest reuses afterwards keeps what the
/// guest wrote; translations after it fault.
fn invalidate_completes_after_an_older_lease(req: Request) {
    watchdog(Duration::from_secs(120), move || {
        let mem = new_mem();
        let mut d = Driver::new(&mem);
        let (mut dev, mut t) = mapped(&mut d, &mem);
        let written = Arc::new(AtomicBool::new(false));
        let (tx, rx) = channel();
        let holder = {
            let (i, mem, written) = (dev.iommu(), mem.clone(), written.clone());
            thread::spawn(move || {
                let tr = i.translate(1, IOVA, 4096, Access::Write).unwrap();
                tx.send(()).unwrap();
                thread::sleep(Duration::from_millis(100));
                tr.write_at(&mem, 0, &[0xdd; 4096]).unwrap();
                written.store(true, SeqCst);
            })
        };
        rx.recv().unwrap();
        let grace = dev.iommu().counters().grace_periods;
        t.unmap(IOVA, 4096);
        let used_idx = d.rq.used_idx_addr();
        let before: u16 = mem.read_obj(GuestAddress(used_idx)).unwrap();
        let watcher = {
            let (mem, written) = (mem.clone(), written.clone());
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                while mem.read_obj::<u16>(GuestAddress(used_idx)).unwrap() == before {
                    assert!(Instant::now() < deadline, "no used entry");
                    thread::yield_now();
                }
                written.load(SeqCst)
            })
        };
        assert_eq!(d.request(&mut dev, &req), Status::Ok);
        assert!(watcher.join().unwrap(), "the used entry appeared while an older lease was held");
        assert_eq!(dev.iommu().counters().grace_periods, grace + 1);
        assert!(addr(&dev, 1, IOVA, Access::Write).is_err());
        mem.write_slice(&[0x66; 4096], GuestAddress(PAGE_A)).unwrap();
        holder.join().unwrap();
        let got = d.read(PAGE_A, 4096);
        assert!(got.iter().all(|&b| b == 0x66), "a write under the lease landed after completion");
    });
}

#[test]
fn invalidate_range_completes_after_an_older_lease() {
    invalidate_completes_after_an_older_lease(inval_range(1, IOVA, 1));
}

#[test]
fn invalidate_domain_completes_after_an_older_lease() {
    invalidate_completes_after_an_older_lease(inval_domain(1));
}

#[test]
fn detach_of_a_table_domain_completes_after_an_older_lease() {
    invalidate_completes_after_an_older_lease(detach(1, 1));
}

/// A table rewritten during walks: every translation is the old leaf or the new one (each
/// entry is read with one 8-byte load), never a mix, never a fault. Walked through
/// `lookup`, which does not cache.
#[test]
fn a_table_changing_under_walks_gives_the_old_or_the_new_translation() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, mut t) = mapped(&mut d, &mem);
    let slot = t.slot(IOVA, 3);
    let (a, b) = (Pte::leaf(PAGE_A, true, true).get(), Pte::leaf(PAGE_B, true, false).get());
    let i = dev.iommu();
    concurrent::overlapped(
        2,
        2000,
        20,
        |k| t.set(slot, if k % 2 == 0 { b } else { a }),
        |_| match i.lookup(1, IOVA) {
            Some((Window::Mapping(m), p)) => {
                assert!((m.phys, p.write) == (PAGE_A, true) || (m.phys, p.write) == (PAGE_B, false))
            }
            other => panic!("a torn or missing translation: {other:?}"),
        },
    );
}

// ---- listeners and snapshots ------------------------------------------------------------

#[derive(Default)]
struct Log(Mutex<Vec<String>>);

impl Listener for Log {
    fn on_attach_table(&self, ep: u32, domain: u32, root: u64) -> Result<(), ListenerError> {
        self.0.lock().unwrap().push(format!("table {ep} {domain} {root:#x}"));
        Ok(())
    }
    fn on_invalidate(&self, ep: u32, domain: u32, start: u64, end: u64) {
        self.0.lock().unwrap().push(format!("inval {ep} {domain} {start:#x} {end:#x}"));
    }
    fn on_detach(&self, ep: u32, domain: u32) {
        self.0.lock().unwrap().push(format!("detach {ep} {domain}"));
    }
}

/// A listener that only knows MAP mode: the defaults turn a table attach into `on_attach`
/// and an INVALIDATE into `on_unmap` of its range, so its cache is flushed.
#[derive(Default)]
struct MapOnly(Mutex<Vec<String>>);

impl Listener for MapOnly {
    fn on_attach(&self, ep: u32, domain: u32, bypass: bool) {
        self.0.lock().unwrap().push(format!("attach {ep} {domain} {bypass}"));
    }
    fn on_unmap(&self, ep: u32, start: u64, end: u64, removed: &[Mapping]) {
        self.0.lock().unwrap().push(format!("unmap {ep} {start:#x} {end:#x} {}", removed.len()));
    }
}

#[test]
fn listeners_learn_of_table_domains_and_invalidations() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = table_device(&d, table_cfg(&[1, 2]));
    let (log, old) = (Arc::new(Log::default()), Arc::new(MapOnly::default()));
    dev.add_listener(log.clone());
    dev.add_listener(old.clone());
    Table::new(&mem, TABLES);
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, TABLES)), Status::Ok);
    assert_eq!(d.request(&mut dev, &attach_table(1, 2, TABLES)), Status::Ok);
    assert_eq!(d.request(&mut dev, &inval_range(1, IOVA, 2)), Status::Ok);
    assert_eq!(d.request(&mut dev, &inval_domain(1)), Status::Ok);
    assert_eq!(d.request(&mut dev, &detach(1, 2)), Status::Ok);
    let got = log.0.lock().unwrap().clone();
    assert_eq!(
        got,
        [
            "table 1 1 0xa00000",
            "table 2 1 0xa00000",
            "inval 1 1 0x40000000 0x40001fff",
            "inval 2 1 0x40000000 0x40001fff",
            "inval 1 1 0x0 0xffffffffffffffff",
            "inval 2 1 0x0 0xffffffffffffffff",
            "detach 2 1",
        ]
    );
    let got = old.0.lock().unwrap().clone();
    assert_eq!(
        got[..3],
        ["attach 1 1 false", "attach 2 1 false", "unmap 1 0x40000000 0x40001fff 0"]
    );
}

/// A back-end that cannot follow a table refuses it: ATTACH_TABLE fails with its status and
/// the endpoint is left detached.
#[test]
fn a_listener_refusing_a_table_fails_the_attach() {
    struct NoTables;
    impl Listener for NoTables {
        fn on_attach_table(&self, _: u32, _: u32, _: u64) -> Result<(), ListenerError> {
            Err(ListenerError::DevErr)
        }
    }
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let mut dev = table_device(&d, table_cfg(&[1]));
    dev.add_listener(Arc::new(NoTables));
    Table::new(&mem, TABLES);
    assert_eq!(d.request(&mut dev, &attach_table(1, 1, TABLES)), Status::DevErr);
    assert_eq!(dev.iommu().endpoint_domain(1), None);
}

/// Snapshot carries the roots and the mode, not the cache: the restored device walks the
/// table it finds in (the copy of) guest memory.
#[test]
fn snapshot_carries_roots_not_the_cache() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, mut t) = mapped(&mut d, &mem);
    assert_eq!(addr(&dev, 1, IOVA, Access::Read), Ok(PAGE_A));
    // Changed without INVALIDATE: the original still answers from its cache.
    t.map(IOVA, PAGE_B, 4096, true, true);
    let state = dev.snapshot();
    assert_eq!(state.domains[0].page_table, Some(TABLES));
    let json = serde_json::to_string(&state).unwrap();
    let mem2 = new_mem();
    let _d2 = d.fork(&mem2);
    let mut dev2 = VirtioIommu::new(table_cfg(&[1, 2])).unwrap();
    dev2.iommu().set_table_memory(Some(Arc::new(mem2.clone())));
    dev2.restore(serde_json::from_str(&json).unwrap()).unwrap();
    assert_eq!(addr(&dev2, 1, IOVA, Access::Read), Ok(PAGE_B));
    assert_eq!(dev2.snapshot(), state);
}

/// A hostile snapshot is refused cleanly (the device is left reset): a root that is not
/// aligned or not in guest RAM, a table domain with mappings or bypass, a table domain on
/// a device without page-table mode, a walk fault reason without it.
#[test]
fn a_hostile_snapshot_with_a_bad_root_is_refused() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, _t) = mapped(&mut d, &mem);
    assert_eq!(addr(&dev, 1, 0x1000, Access::Read), Err(FaultKind::Unmapped));
    let good = dev.snapshot();
    let fresh = || {
        let dev2 = VirtioIommu::new(table_cfg(&[1, 2])).unwrap();
        dev2.iommu().set_table_memory(Some(Arc::new(mem.clone())));
        dev2
    };
    let m = Mapping { start: 0, end: 0xfff, phys: 0, flags: 1 };
    let edits: [&dyn Fn(&mut viommu_device::DeviceState); 5] = [
        &|s| s.domains[0].page_table = Some(TABLES + 8),
        &|s| s.domains[0].page_table = Some(MEM_SIZE as u64),
        &|s| s.domains[0].page_table = Some(1 << 52),
        &|s| s.domains[0].mappings.push(m),
        &|s| s.domains[0].bypass = true,
    ];
    for (n, edit) in edits.iter().enumerate() {
        let mut bad = good.clone();
        edit(&mut bad);
        let mut dev2 = fresh();
        assert!(dev2.restore(bad).is_err(), "edit {n}");
        assert_eq!(dev2.iommu().domain_count(), 0);
        assert_eq!(dev2.acked_features(), 0);
    }
    let mut plain = VirtioIommu::new(cfg(&[1, 2])).unwrap();
    let mut s = good.clone();
    s.acked_features &= !bit(ATTACH_TABLE);
    assert!(plain.restore(s.clone()).is_err(), "a table domain without page-table mode");
    s.domains.clear();
    s.faults[0].reason = fault::R_WALK_EABT;
    assert!(plain.restore(s).is_err(), "a WALK fault reason without page-table mode");
    assert!(fresh().restore(good).is_ok());
}

/// Endpoint IDs, reasons and lookups agree: `lookup` answers for table domains without
/// raising faults, and sees the table as walks do.
#[test]
fn lookup_walks_without_faulting() {
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, _t) = mapped(&mut d, &mem);
    let i = dev.iommu();
    let Some((Window::Mapping(m), p)) = i.lookup(1, IOVA + 5) else { panic!() };
    assert_eq!((m.start, m.end, m.phys, p.read, p.write), (IOVA, IOVA + 0xfff, PAGE_A, true, true));
    assert!(i.lookup(1, IOVA + 0x1000).is_none());
    assert_eq!(i.pending_faults(), 0);
}

/// The draft's requests given to `execute` directly on a device without page-table mode
/// are refused (UNSUPP) and counted; before page-table mode the per-type counter had no
/// slot for them and `execute` panicked.
#[test]
fn draft_requests_on_a_device_without_page_table_mode_are_unsupp() {
    let i = viommu_device::Iommu::new(cfg(&[1])).unwrap();
    assert_eq!(i.execute(&attach_table(1, 1, TABLES), &mut []), Status::Unsupp);
    assert_eq!(i.execute(&inval_domain(1), &mut []), Status::Unsupp);
    let c = i.counters();
    assert_eq!(c.requests_of(RequestType::AttachTable), 1);
    assert_eq!(c.requests_of(RequestType::Invalidate), 1);
    assert_eq!(c.status(Status::Unsupp), 2);
}

/// The strict promise under concurrency: a writer repoints one entry to a new page and
/// sends INVALIDATE (by range or domain-wide, alternately), step after step, while readers
/// translate. A translation that began after the k-th INVALIDATE completed never returns a
/// page older than the k-th: no cache fill or TLB entry from before survives it.
#[test]
fn no_translation_after_an_invalidate_sees_an_older_entry() {
    use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Release};
    let mem = new_mem();
    let mut d = Driver::new(&mem);
    let (dev, mut t) = mapped(&mut d, &mem);
    let page = |k: u64| 0x1_0000_0000 + (k << 12);
    let slot = t.slot(IOVA, 3);
    t.set(slot, Pte::leaf(page(0), true, true).get());
    let i = dev.iommu();
    let done = AtomicU64::new(0);
    concurrent::overlapped(
        2,
        500,
        20,
        |k| {
            t.set(slot, Pte::leaf(page(k + 1), true, true).get());
            let inv = if k % 2 == 0 { inval_range(1, IOVA, 1) } else { inval_domain(1) };
            assert_eq!(i.execute(&inv, &mut []), Status::Ok);
            done.store(k + 1, Release);
        },
        |_| {
            let k = done.load(Acquire);
            let tr = i.translate(1, IOVA + 8, 8, Access::Read).unwrap();
            let got = tr.contiguous().unwrap().addr - 8;
            assert!(got >= page(k), "INVALIDATE {k} had completed, yet page {got:#x} was used");
        },
    );
}
