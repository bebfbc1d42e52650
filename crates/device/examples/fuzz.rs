//! Fuzz target that runs on stable Rust (no cargo-fuzz): arbitrary device configurations,
//! descriptor chains, request bytes, config writes, translations, resets and migrations,
//! for a bounded time. It fails (panics, exit code 101) on any panic in the device or on a
//! broken invariant, and prints the seed that reproduces it.
//!
//! ```text
//! cargo run -p viommu-device --example fuzz -- --seconds 60 [--seed N]
//! ```
//! `VIOMMU_FUZZ_SECONDS` and `VIOMMU_FUZZ_SEED` work too. Each case is derived from
//! (seed, case number), so `--seed S --case K` replays one case.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use viommu_device::{
    Access, DeviceConfig, DeviceState, EndpointConfig, Limits, OfferedFeatures, ResvKind,
    ResvRegion, VirtioIommu,
};
use viommu_proto::pgtable::Pte;
use viommu_proto::Request;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

type Mem = GuestMemoryMmap<()>;

/// Guest memory: two regions with a hole, so "out of guest memory" is reachable.
const LOW: usize = 512 << 10;
const HIGH_START: u64 = 1 << 20;
const HIGH: usize = 256 << 10;
const RQ: u64 = 0x0;
const EQ: u64 = 0x8000;
const DATA: u64 = 0x1_0000;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// (is MSI, first page, extra pages) of a reserved region.
type FuzzResv = (bool, u16, u8);

#[derive(Arbitrary, Debug)]
struct FuzzConfig {
    features: [bool; 8],
    /// Page-table mode (experimental): offered, and guest memory given to the walker.
    attach_table: bool,
    granule_shift: u8,
    probe_size: u16,
    bypass: bool,
    endpoints: Vec<(u8, Vec<FuzzResv>)>,
    limits: (u8, u8, u8),
}

impl FuzzConfig {
    /// A valid configuration most of the time (an invalid one is refused by `new`, which
    /// is checked too): unique endpoints, disjoint regions, probe_size large enough.
    fn build(&self) -> DeviceConfig {
        let f = self.features;
        let mut endpoints: Vec<EndpointConfig> = Vec::new();
        for (id, resv) in self.endpoints.iter().take(6) {
            let id = u32::from(*id % 8);
            if endpoints.iter().any(|e| e.id == id) {
                continue;
            }
            let resv = resv
                .iter()
                .take(3)
                .enumerate()
                .map(|(i, &(msi, page, n))| {
                    let start = ((i as u64) << 28) + (u64::from(page) << 12);
                    ResvRegion {
                        kind: if msi && i == 0 { ResvKind::Msi } else { ResvKind::Reserved },
                        start,
                        end: start + (u64::from(n) << 12) + 0xfff,
                    }
                })
                .collect();
            endpoints.push(EndpointConfig { id, resv });
        }
        if endpoints.len() < 2 {
            endpoints.extend([EndpointConfig::new(100), EndpointConfig::new(101)]);
        }
        DeviceConfig {
            features: OfferedFeatures {
                input_range: f[0],
                domain_range: f[1],
                map_unmap: !f[2] || f[7],
                probe: f[3],
                mmio: f[4],
                bypass_config: f[5],
                legacy_bypass: f[6] && !f[5],
                access_platform: f[7],
                indirect_desc: f[0] ^ f[3],
                attach_table: self.attach_table,
            },
            page_size_mask: !0u64
                << [0, 9, 12, 12, 12, 12, 16, 21][usize::from(self.granule_shift % 8)],
            input_range: (0, (1 << 30) - 1),
            domain_range: (0, 7),
            probe_size: 64 + u32::from(self.probe_size % 256),
            bypass: self.bypass,
            limits: Limits {
                max_domains: 1 + usize::from(self.limits.0 % 8),
                max_mappings_per_domain: 1 + usize::from(self.limits.1),
                max_mappings_total: 1 + usize::from(self.limits.1) * 2,
                max_endpoints: 1 + usize::from(self.limits.2 % 4),
                max_pending_faults: usize::from(self.limits.2 % 16),
            },
            endpoints,
            ..DeviceConfig::default()
        }
    }
}

/// Where a descriptor points.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Place {
    Data(u16),
    EndOfLow(u8),
    Hole(u16),
    Anywhere(u64),
}

impl Place {
    fn addr(self) -> u64 {
        match self {
            Place::Data(o) => DATA + u64::from(o) * 4,
            Place::EndOfLow(b) => LOW as u64 - u64::from(b),
            Place::Hole(o) => LOW as u64 + u64::from(o),
            Place::Anywhere(a) => a,
        }
    }
}

#[derive(Arbitrary, Debug)]
struct Desc {
    place: Place,
    len: u16,
    huge: bool,
    flags: u8,
    next: u16,
    sequential: bool,
}

/// What a readable buffer holds.
#[derive(Arbitrary, Debug)]
enum Payload {
    Raw(Vec<u8>),
    Req { ty: u8, body: [u8; 76], len: u8 },
}

/// A well-formed request on a small ID and address space, so that cases reach deep states.
#[derive(Arbitrary, Debug)]
enum GoodReq {
    Attach {
        d: u8,
        e: u8,
        bypass: bool,
    },
    Detach {
        d: u8,
        e: u8,
    },
    Map {
        d: u8,
        page: u8,
        pages: u8,
        phys: u16,
        flags: u8,
    },
    Unmap {
        d: u8,
        page: u8,
        pages: u8,
    },
    Probe {
        e: u8,
    },
    /// A MAP ending at the last byte of the address space (no INPUT_RANGE limits it then).
    MapTop {
        d: u8,
        pages: u8,
        flags: u8,
    },
    /// Draft ATTACH_TABLE, the root a page of the table area (or anywhere).
    AttachTable {
        d: u8,
        e: u8,
        root: Root,
    },
    /// Draft INVALIDATE: domain-wide, a range, or malformed fields.
    Invalidate {
        d: u8,
        gran: u8,
        page: u8,
        pages: u8,
        granule: u8,
        types: u8,
        flags: u8,
    },
}

/// Where a page-table root (or a table pointer) points.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Root {
    /// A page of the table area.
    Table(u8),
    /// Any guest-physical address (unaligned, in the hole, above RAM).
    Anywhere(u64),
}

/// Guest pages whose contents the cases shape into page tables (inside the low region).
const TABLE_AREA: u64 = 0x4_0000;
const TABLE_PAGES: u64 = 32;

impl Root {
    fn addr(self) -> u64 {
        match self {
            Root::Table(p) => TABLE_AREA + (u64::from(p) % TABLE_PAGES) * 0x1000,
            Root::Anywhere(a) => a,
        }
    }
}

impl GoodReq {
    /// Encodes the request; endpoint numbers index the configured endpoints (8 = unknown).
    fn bytes(&self, eps: &[u32], granule: u64) -> Vec<u8> {
        let ep =
            |e: u8| if e % 9 == 8 || eps.is_empty() { 99 } else { eps[usize::from(e) % eps.len()] };
        let mut b = vec![0u8; 72];
        let put32 =
            |b: &mut Vec<u8>, at: usize, v: u32| b[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
        let len = match *self {
            GoodReq::Attach { d, e, bypass } => {
                b[0] = 1;
                put32(&mut b, 4, u32::from(d % 3));
                put32(&mut b, 8, ep(e));
                put32(&mut b, 12, u32::from(bypass));
                20
            }
            GoodReq::Detach { d, e } => {
                b[0] = 2;
                put32(&mut b, 4, u32::from(d % 3));
                put32(&mut b, 8, ep(e));
                20
            }
            GoodReq::Map { d, page, pages, phys, flags } => {
                b[0] = 3;
                put32(&mut b, 4, u32::from(d % 3));
                let start = u64::from(page) << 12;
                put64(&mut b, 8, start);
                put64(&mut b, 16, start + (u64::from(pages % 16) << 12) + 0xfff);
                put64(&mut b, 24, u64::from(phys) << 12);
                put32(&mut b, 32, u32::from(flags % 8));
                36
            }
            GoodReq::Unmap { d, page, pages } => {
                b[0] = 4;
                put32(&mut b, 4, u32::from(d % 3));
                let start = u64::from(page) << 12;
                put64(&mut b, 8, start);
                put64(
                    &mut b,
                    16,
                    if pages == 255 { u64::MAX } else { start + (u64::from(pages) << 12) + 0xfff },
                );
                28
            }
            GoodReq::MapTop { d, pages, flags } => {
                b[0] = 3;
                put32(&mut b, 4, u32::from(d % 3));
                put64(&mut b, 8, u64::MAX - (u64::from(pages % 8) + 1) * granule + 1);
                put64(&mut b, 16, u64::MAX);
                put64(&mut b, 24, 0x10_0000);
                put32(&mut b, 32, u32::from(flags % 8));
                36
            }
            GoodReq::Probe { e } => {
                b[0] = 5;
                put32(&mut b, 4, ep(e));
                72
            }
            GoodReq::AttachTable { d, e, root } => {
                b.resize(80, 0);
                b[0] = 6;
                put32(&mut b, 4, u32::from(d % 3));
                put32(&mut b, 8, ep(e));
                b[16] = 3; // format 3
                put64(&mut b, 24, root.addr());
                80
            }
            GoodReq::Invalidate { d, gran, page, pages, granule, types, flags } => {
                b.resize(60, 0);
                b[0] = 7;
                // Mostly DOMAIN or VA; sometimes PASID, none or several.
                b[4] = [1, 4, 4, 1, 2, 0, 5, gran][usize::from(gran % 8)];
                b[6] = if types % 8 == 7 { types } else { 1 };
                b[8] = if flags % 8 == 7 { flags } else { 0 };
                put32(&mut b, 12, u32::from(d % 3));
                put64(&mut b, 32, u64::from(page) << 12);
                put64(&mut b, 40, u64::from(pages % 32) + u64::from(pages == 255));
                b[48] = if granule % 4 == 3 { granule } else { 12 };
                60
            }
        };
        b.truncate(len);
        b
    }
}

#[derive(Arbitrary, Debug)]
enum Action {
    Good {
        reqs: Vec<GoodReq>,
    },
    Chain {
        descs: Vec<Desc>,
        payload: Payload,
        at: u8,
    },
    KickRequests,
    EventBuffers {
        descs: Vec<Desc>,
    },
    KickEvents,
    Translate {
        ep: u8,
        iova: u32,
        len: u16,
        access: u8,
    },
    WriteConfig {
        offset: u8,
        data: Vec<u8>,
    },
    ReadConfig {
        offset: u8,
        len: u8,
    },
    AvailIdx {
        q: bool,
        idx: u16,
    },
    UsedEvent {
        idx: u16,
    },
    Raw {
        readable: Vec<u8>,
        writable: u16,
    },
    Reset,
    Migrate,
    /// An indirect table written at `table` (entries may nest tables, loop, point anywhere),
    /// named by one ring descriptor, possibly behind direct ones.
    Indirect {
        entries: Vec<Desc>,
        payload: Vec<u8>,
        len_mode: u8,
        direct: u8,
        table: u16,
    },
    /// The device's own snapshot, edited, restored onto a fresh device.
    HostileRestore {
        edits: Vec<StateEdit>,
    },
    /// Page-table mode: one entry of the table area, shaped like a real one (a pointer to
    /// another page of the area, a leaf) or raw; small indices so low IOVAs reach it.
    Pte {
        page: u8,
        index: u8,
        kind: u8,
        target: Root,
        raw: u64,
    },
    /// A translation at an IOVA made of small table indices, so walks go deep.
    TranslateTable {
        ep: u8,
        l1: u8,
        l2: u8,
        l3: u8,
        len: u16,
        access: u8,
    },
    /// A domain-wide INVALIDATE of the endpoint's table domain, then: `translate` agrees
    /// with a fresh walk (`lookup`) at `iova`.
    InvalidateAgrees {
        ep: u8,
        l2: u8,
        l3: u8,
    },
}

/// An IOVA from small indices of levels 1–3 (level 0 index 0).
fn table_iova(l1: u8, l2: u8, l3: u8) -> u64 {
    (u64::from(l1 % 4) << 30) | (u64::from(l2 % 8) << 21) | (u64::from(l3 % 8) << 12)
}

/// One edit of a snapshot.
#[derive(Arbitrary, Debug)]
enum StateEdit {
    MappingField { domain: u8, index: u8, field: u8, value: u64 },
    AddMapping { domain: u8, start: u64, end: u64, phys: u64, flags: u32 },
    DomainId { domain: u8, id: u32 },
    DomainBypass { domain: u8 },
    Endpoints { domain: u8, endpoints: Vec<u32> },
    CloneDomain { domain: u8, id: u32 },
    Fault { reason: u8, flags: u32, endpoint: u32, address: u64 },
    PageTable { domain: u8, root: Option<u64> },
    Queue { q: bool, max_size: u16, size: u16, next_avail: u16, next_used: u16, ready: bool },
    Features { acked: u64 },
}

impl StateEdit {
    fn apply(&self, s: &mut DeviceState) {
        let pick = |n: usize, i: u8| (n > 0).then(|| usize::from(i) % n);
        match *self {
            StateEdit::MappingField { domain, index, field, value } => {
                let Some(d) = pick(s.domains.len(), domain) else { return };
                let maps = &mut s.domains[d].mappings;
                let Some(i) = pick(maps.len(), index) else { return };
                match field % 4 {
                    0 => maps[i].start = value,
                    1 => maps[i].end = value,
                    2 => maps[i].phys = value,
                    _ => maps[i].flags = value as u32,
                }
            }
            StateEdit::AddMapping { domain, start, end, phys, flags } => {
                let Some(d) = pick(s.domains.len(), domain) else { return };
                s.domains[d].mappings.push(viommu_device::Mapping { start, end, phys, flags });
            }
            StateEdit::DomainId { domain, id } => {
                if let Some(d) = pick(s.domains.len(), domain) {
                    s.domains[d].id = id % 12;
                }
            }
            StateEdit::DomainBypass { domain } => {
                if let Some(d) = pick(s.domains.len(), domain) {
                    s.domains[d].bypass ^= true;
                }
            }
            StateEdit::Endpoints { domain, ref endpoints } => {
                if let Some(d) = pick(s.domains.len(), domain) {
                    s.domains[d].endpoints = endpoints.iter().take(8).map(|e| e % 10).collect();
                }
            }
            StateEdit::CloneDomain { domain, id } => {
                if let Some(d) = pick(s.domains.len(), domain) {
                    let mut c = s.domains[d].clone();
                    c.id = id % 12;
                    s.domains.push(c);
                }
            }
            StateEdit::Fault { reason, flags, endpoint, address } => {
                s.faults.push(viommu_device::PendingFault {
                    reason: reason % 6,
                    flags,
                    endpoint: endpoint % 10,
                    address,
                });
            }
            StateEdit::Queue { q, max_size, size, next_avail, next_used, ready } => {
                let qs = &mut s.queues[usize::from(q)];
                (qs.max_size, qs.size, qs.next_avail, qs.next_used, qs.ready) =
                    (max_size, size, next_avail, next_used, ready);
            }
            StateEdit::Features { acked } => s.acked_features = acked,
            StateEdit::PageTable { domain, root } => {
                if let Some(d) = pick(s.domains.len(), domain) {
                    s.domains[d].page_table = root;
                }
            }
        }
    }
}

/// One case's device and driver-side bookkeeping.
struct Case {
    mem: Mem,
    dev: VirtioIommu,
    cfg: DeviceConfig,
    qsize: u16,
    next_desc: [u16; 2],
}

impl Case {
    fn new(cfg: DeviceConfig, qsize: u16) -> Option<Self> {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), LOW),
            (GuestAddress(HIGH_START), HIGH),
        ])
        .unwrap();
        let mut dev = VirtioIommu::new(cfg.clone()).ok()?;
        set_table_memory(&dev, &mem);
        let f = dev.device_features();
        dev.ack_features(f);
        let mut c = Self { mem, dev, cfg, qsize, next_desc: [0; 2] };
        c.setup();
        Some(c)
    }

    fn ring(&self, q: usize) -> (u64, u64, u64) {
        let base = if q == 0 { RQ } else { EQ };
        let avail = base + 16 * u64::from(self.qsize);
        let used = (avail + 6 + 2 * u64::from(self.qsize)).next_multiple_of(4);
        (base, avail, used)
    }

    fn setup(&mut self) {
        for q in 0..2 {
            let (d, a, u) = self.ring(q);
            self.dev.set_queue(q as u16, self.qsize, d, a, u).unwrap();
        }
        self.dev.activate().unwrap();
    }

    fn push(&mut self, q: usize, descs: &[Desc], at: u16) {
        self.push_with_len(q, descs, at, u32::MAX);
    }

    /// Like `push`; a last descriptor naming an indirect table gets length `table_len`
    /// (`u32::MAX`: as its `Desc` says).
    fn push_with_len(&mut self, q: usize, descs: &[Desc], at: u16, table_len: u32) {
        let (table, avail, _) = self.ring(q);
        let base = at % self.qsize;
        for (i, d) in descs.iter().take(usize::from(self.qsize)).enumerate() {
            let idx = (base + i as u16) % self.qsize;
            let next = if d.sequential { (idx + 1) % self.qsize } else { d.next };
            let mut flags = u16::from(d.flags & 0x7);
            if i + 1 < descs.len() && d.sequential {
                flags |= 1;
            }
            let mut len = if d.huge { u32::MAX - u32::from(d.len) } else { u32::from(d.len) };
            if table_len != u32::MAX && i + 1 == descs.len() {
                len = table_len;
            }
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.place.addr().to_le_bytes());
            raw[8..12].copy_from_slice(&len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            self.mem.write_slice(&raw, GuestAddress(table + 16 * u64::from(idx))).unwrap();
        }
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).unwrap();
        let slot = avail + 4 + 2 * u64::from(idx % self.qsize);
        self.mem.write_obj(base, GuestAddress(slot)).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).unwrap();
        self.next_desc[q] = (base + descs.len() as u16) % self.qsize;
    }

    fn run(&mut self, a: Action) {
        match a {
            Action::Good { reqs } => {
                // Two descriptors per request: a batch fills at most half the table.
                for batch in reqs.chunks(usize::from(self.qsize / 2)) {
                    for r in batch {
                        let eps: Vec<u32> = self.cfg.endpoints.iter().map(|e| e.id).collect();
                        let bytes = r.bytes(&eps, self.cfg.granule());
                        let at = self.next_desc[0];
                        let rd = DATA + 0x4000 + u64::from(at) * 0x400;
                        self.mem.write_slice(&bytes, GuestAddress(rd)).unwrap();
                        let wlen = self.cfg.probe_size as u16 + 4;
                        let descs = [
                            Desc {
                                place: Place::Anywhere(rd),
                                len: bytes.len() as u16,
                                huge: false,
                                flags: 0,
                                next: 0,
                                sequential: true,
                            },
                            Desc {
                                place: Place::Anywhere(rd + 0x100),
                                len: wlen,
                                huge: false,
                                flags: 2,
                                next: 0,
                                sequential: true,
                            },
                        ];
                        self.push(0, &descs, at);
                    }
                    let _ = self.dev.process_request_queue(&self.mem);
                }
            }
            Action::Chain { descs, payload, at } => {
                let bytes = match payload {
                    Payload::Raw(b) => b,
                    Payload::Req { ty, body, len } => {
                        let mut b = vec![ty % 9, 0, 0, 0];
                        b.extend_from_slice(&body[..usize::from(len % 77)]);
                        b
                    }
                };
                if let Some(d) = descs.first() {
                    let _ = self.mem.write_slice(&bytes, GuestAddress(d.place.addr()));
                }
                let at = if at % 2 == 0 { self.next_desc[0] } else { u16::from(at) };
                self.push(0, &descs, at);
            }
            Action::KickRequests => {
                let _ = self.dev.process_request_queue(&self.mem);
            }
            Action::EventBuffers { descs } => {
                let at = self.next_desc[1];
                self.push(1, &descs, at);
            }
            Action::KickEvents => {
                let _ = self.dev.process_event_queue(&self.mem);
            }
            Action::Translate { ep, iova, len, access } => {
                let access =
                    [Access::Read, Access::Write, Access::ReadWrite][usize::from(access % 3)];
                let iommu = self.dev.iommu();
                // Odd values reach down from the top of the address space.
                let iova =
                    if iova & 1 == 1 { u64::MAX - u64::from(iova >> 1) } else { u64::from(iova) };
                if let Ok(t) = iommu.translate(u32::from(ep % 9), iova, u64::from(len), access) {
                    let total: u64 = t.iter().map(|s| s.len).sum();
                    assert_eq!(total, u64::from(len), "segments cover the access exactly");
                };
            }
            Action::WriteConfig { offset, data } => {
                self.dev.write_config(u64::from(offset % 48), &data);
            }
            Action::ReadConfig { offset, len } => {
                let mut b = vec![0; usize::from(len % 48)];
                self.dev.read_config(u64::from(offset), &mut b);
            }
            Action::AvailIdx { q, idx } => {
                let (_, avail, _) = self.ring(usize::from(q));
                self.mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
            }
            Action::UsedEvent { idx } => {
                let (_, avail, _) = self.ring(0);
                self.mem
                    .write_obj(idx, GuestAddress(avail + 4 + 2 * u64::from(self.qsize)))
                    .unwrap();
            }
            Action::Raw { readable, writable } => {
                let mut w = vec![0u8; usize::from(writable % 600)];
                let used = self.dev.iommu().handle_request(&readable, &mut w);
                assert!(used as usize <= w.len());
                if let Ok(req) = Request::parse(&readable) {
                    let _ = req;
                }
            }
            Action::Reset => {
                self.dev.reset();
                let f = self.dev.device_features();
                self.dev.ack_features(f);
                for q in 0..2 {
                    let (_, avail, used) = self.ring(q);
                    self.mem.write_slice(&[0; 4], GuestAddress(avail)).unwrap();
                    self.mem.write_slice(&[0; 4], GuestAddress(used)).unwrap();
                }
                self.setup();
            }
            Action::Indirect { entries, payload, len_mode, direct, table } => {
                let table = DATA + 0x2_0000 + u64::from(table % 0x1000) * 16;
                let n = entries.len().min(300);
                for (i, d) in entries.iter().take(n).enumerate() {
                    let next = if d.sequential { i as u16 + 1 } else { d.next };
                    let mut flags = u16::from(d.flags & 0x7);
                    if d.sequential && i + 1 < n {
                        flags |= 1;
                    }
                    let len = if d.huge { u32::MAX - u32::from(d.len) } else { u32::from(d.len) };
                    let mut raw = [0u8; 16];
                    raw[0..8].copy_from_slice(&d.place.addr().to_le_bytes());
                    raw[8..12].copy_from_slice(&len.to_le_bytes());
                    raw[12..14].copy_from_slice(&flags.to_le_bytes());
                    raw[14..16].copy_from_slice(&next.to_le_bytes());
                    let _ = self.mem.write_slice(&raw, GuestAddress(table + 16 * i as u64));
                }
                if let Some(d) = entries.first() {
                    let _ = self.mem.write_slice(&payload, GuestAddress(d.place.addr()));
                }
                // Exact, zero, odd, one entry short, or huge table lengths.
                let len = match len_mode % 5 {
                    0 => 16 * n as u32,
                    1 => 0,
                    2 => 16 * n as u32 + 8,
                    3 => (16 * n as u32).saturating_sub(16),
                    _ => 0xffff_fff0,
                };
                let rd = DATA + 0x1_0000;
                let mut ring: Vec<Desc> = (0..direct % 3)
                    .map(|_| Desc {
                        place: Place::Anywhere(rd),
                        len: 20,
                        huge: false,
                        flags: 0,
                        next: 0,
                        sequential: true,
                    })
                    .collect();
                ring.push(Desc {
                    place: Place::Anywhere(table),
                    len: 0,
                    huge: false,
                    flags: 4 | (len_mode & 2),
                    next: 0,
                    sequential: true,
                });
                let at = self.next_desc[0];
                self.push_with_len(0, &ring, at, len);
                let _ = self.dev.process_request_queue(&self.mem);
            }
            Action::HostileRestore { edits } => {
                let mut state = self.dev.snapshot();
                for e in edits.iter().take(8) {
                    e.apply(&mut state);
                }
                let mut dev = VirtioIommu::new(self.cfg.clone()).unwrap();
                set_table_memory(&dev, &self.mem);
                match dev.restore(state) {
                    Ok(()) => {
                        // Whatever was accepted is a state the device keeps exactly.
                        let again = dev.snapshot();
                        let mut other = VirtioIommu::new(self.cfg.clone()).unwrap();
                        set_table_memory(&other, &self.mem);
                        other.restore(again.clone()).expect("an accepted state restores again");
                        assert_eq!(other.snapshot(), again, "restore is exact");
                        self.dev = dev;
                        TOTALS[5].fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        let i = dev.iommu();
                        assert_eq!((i.domain_count(), i.pending_faults()), (0, 0), "left reset");
                        TOTALS[6].fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Action::Pte { page, index, kind, target, raw } => {
                let at = Root::Table(page).addr() + 8 * u64::from(index % 8);
                let v = match kind % 4 {
                    0 => Pte::table(target.addr()).get(),
                    1 => Pte::leaf(target.addr() & !0xfff, kind & 4 != 0, kind & 8 != 0).get(),
                    2 => 0,
                    _ => raw,
                };
                self.mem.write_obj(v.to_le(), GuestAddress(at)).unwrap();
            }
            Action::TranslateTable { ep, l1, l2, l3, len, access } => {
                let access =
                    [Access::Read, Access::Write, Access::ReadWrite][usize::from(access % 3)];
                let iova = table_iova(l1, l2, l3) + u64::from(len & 0xff0);
                let iommu = self.dev.iommu();
                if let Ok(t) = iommu.translate(u32::from(ep % 9), iova, u64::from(len), access) {
                    let total: u64 = t.iter().map(|s| s.len).sum();
                    assert_eq!(total, u64::from(len), "segments cover the access exactly");
                    TOTALS[7].fetch_add(1, Ordering::Relaxed);
                };
            }
            Action::InvalidateAgrees { ep, l2, l3 } => self.invalidate_agrees(ep, l2, l3),
            Action::Migrate => {
                let state = self.dev.snapshot();
                let json = serde_json::to_string(&state).unwrap();
                let back: DeviceState = serde_json::from_str(&json).unwrap();
                let mut dev = VirtioIommu::new(self.cfg.clone()).unwrap();
                set_table_memory(&dev, &self.mem);
                dev.restore(back).expect("a device's own snapshot restores");
                assert_eq!(dev.snapshot(), state, "restore is exact");
                self.dev = dev;
            }
        }
    }

    /// A valid (aliased) table at area page 0: level-1 entries 0–3 share one level-2
    /// table, whose entries 0–7 share one level-3 table of eight read-write pages.
    fn seed_tables(&self) {
        let page = |p: u64| TABLE_AREA + p * 0x1000;
        let set =
            |gpa: u64, v: Pte| self.mem.write_obj(v.get().to_le(), GuestAddress(gpa)).unwrap();
        set(page(0), Pte::table(page(1)));
        for i in 0..8 {
            if i < 4 {
                set(page(1) + 8 * i, Pte::table(page(2)));
            }
            set(page(2) + 8 * i, Pte::table(page(3)));
            set(page(3) + 8 * i, Pte::leaf(DATA + i * 0x1000, true, true));
        }
    }

    /// After a domain-wide INVALIDATE, a translation is what a fresh walk finds: the cache
    /// keeps nothing from before.
    fn invalidate_agrees(&self, ep: u8, l2: u8, l3: u8) {
        let iommu = self.dev.iommu();
        let eps = &self.cfg.endpoints;
        let Some(ep) = eps.get(usize::from(ep) % eps.len().max(1)) else { return };
        let Some(domain) = iommu.endpoint_domain(ep.id) else { return };
        let body = viommu_proto::InvalidateBody::domain(domain);
        if iommu.execute(&Request::Invalidate(body), &mut []) != viommu_proto::Status::Ok {
            return;
        }
        let iova = table_iova(0, l2, l3);
        let fresh = iommu.lookup(ep.id, iova);
        let got = iommu.translate(ep.id, iova, 1, Access::Read).map(|t| t.segments()[0].addr);
        match fresh {
            Some((w, p)) if p.read => {
                assert_eq!(got.ok(), w.translate(iova), "translate after INVALIDATE = a fresh walk")
            }
            _ => assert!(got.is_err(), "translate after INVALIDATE found what a walk did not"),
        }
    }

    fn check(&self) {
        let c = self.dev.iommu().counters();
        let statuses: u64 = c.statuses.iter().sum();
        // requests[0] counts unknown types: returned unwritten, no status.
        let requests: u64 = c.requests[1..].iter().sum();
        assert_eq!(statuses, requests, "every parsed request gets exactly one status");
    }
}

/// Page-table mode reads tables in the case's guest memory.
fn set_table_memory(dev: &VirtioIommu, mem: &Mem) {
    if dev.iommu().config().features.attach_table {
        dev.iommu().set_table_memory(Some(Arc::new(mem.clone())));
    }
}

/// Totals over all cases, printed at the end to show how deep the cases reach.
static TOTALS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

fn run_case(seed: u64, case: u64) {
    let mut rng = Rng(seed ^ case.wrapping_mul(0x2545_f491_4f6c_dd1d));
    let n = 256 + (rng.next() % 8192) as usize;
    let data = rng.bytes(n);
    let mut u = Unstructured::new(&data);
    let Ok(cfg) = FuzzConfig::arbitrary(&mut u) else { return };
    let qsize = 1u16 << (u.int_in_range(1..=8u8).unwrap_or(4));
    let Some(mut c) = Case::new(cfg.build(), qsize) else { return };
    TOTALS[4].fetch_add(1, Ordering::Relaxed);
    // A warm-up batch of well-formed requests puts the device in a deep state first.
    let warm = (rng.next() % 200) as usize;
    let tables = c.cfg.features.attach_table;
    if tables {
        c.seed_tables();
    }
    let mut reqs: Vec<GoodReq> = (0..6)
        .map(|e| match rng.next() % 8 {
            0 => GoodReq::Attach { d: e % 3, e, bypass: true },
            1..=5 if tables => GoodReq::AttachTable { d: e % 3, e, root: Root::Table(0) },
            _ => GoodReq::Attach { d: e % 3, e, bypass: false },
        })
        .collect();
    reqs.extend((0..warm).map_while(|_| GoodReq::arbitrary(&mut u).ok()));
    let nreq = reqs.len();
    c.run(Action::Good { reqs });
    if std::env::var("FUZZ_DEBUG").is_ok() {
        eprintln!("warm {nreq} qsize {qsize}: {:?}", c.dev.iommu().counters());
    }
    while let Ok(a) = Action::arbitrary(&mut u) {
        c.run(a);
        c.check();
        if u.is_empty() {
            break;
        }
    }
    // Drain once more so every action's effects went through the queues.
    let _ = c.dev.process_request_queue(&c.mem);
    let _ = c.dev.process_event_queue(&c.mem);
    c.check();
    let k = c.dev.iommu().counters();
    let ok = k.statuses[0];
    for (t, v) in TOTALS.iter().zip([k.requests.iter().sum(), ok, k.malformed, k.faults_raised]) {
        t.fetch_add(v, Ordering::Relaxed);
    }
}

fn arg(name: &str, env: &str) -> Option<u64> {
    let args: Vec<String> = std::env::args().collect();
    let from_args = args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)?.parse().ok());
    from_args.or_else(|| std::env::var(env).ok()?.parse().ok())
}

fn main() {
    let seconds = arg("--seconds", "VIOMMU_FUZZ_SECONDS").unwrap_or(60);
    let seed = arg("--seed", "VIOMMU_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    if let Some(case) = arg("--case", "VIOMMU_FUZZ_CASE") {
        run_case(seed, case);
        println!("case {case} of seed {seed}: ok");
        return;
    }
    let current = Arc::new(AtomicU64::new(0));
    {
        // A hang is a failure too: no single case may run for 20 s.
        let current = current.clone();
        std::thread::spawn(move || {
            let mut last = u64::MAX;
            loop {
                std::thread::sleep(Duration::from_secs(20));
                let now = current.load(Ordering::Relaxed);
                if now == last {
                    eprintln!("fuzz: case {now} of seed {seed} hangs");
                    std::process::exit(2);
                }
                last = now;
            }
        });
    }
    let hook = std::panic::take_hook();
    let cur = current.clone();
    std::panic::set_hook(Box::new(move |info| {
        let case = cur.load(Ordering::Relaxed);
        eprintln!("fuzz: FAILED; replay with --seed {seed} --case {case}");
        hook(info);
    }));
    let start = Instant::now();
    let deadline = Duration::from_secs(seconds);
    let mut case = 0;
    while start.elapsed() < deadline {
        current.store(case, Ordering::Relaxed);
        run_case(seed, case);
        case += 1;
    }
    let t = TOTALS.each_ref().map(|t| t.load(Ordering::Relaxed));
    println!(
        "fuzz: {} devices, {} requests answered ({} OK), {} malformed chains, {} faults",
        t[4], t[0], t[1], t[2], t[3]
    );
    println!("fuzz: edited snapshots: {} restored, {} refused", t[5], t[6]);
    println!("fuzz: page-table mode: {} translations at table-shaped IOVAs", t[7]);
    println!(
        "fuzz: {case} cases in {:.1} s, seed {seed}: no panic, no hang",
        start.elapsed().as_secs_f64()
    );
}
