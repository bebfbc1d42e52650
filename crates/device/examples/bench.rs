//! Prints the per-operation cost of MAP, UNMAP and translate (hit and miss) at 1k, 16k and
//! 256k live mappings, through the full virtqueue path (128 requests per kick) and directly,
//! and the request rate through the queue; then the cost of a lease on the hit path (plain
//! translate, translate + lease + release, and with a 16-byte access) from 1, 2 and 4
//! threads; then a translate hit in page-table mode against MAP mode.
//!
//! ```text
//! cargo run --release -p viommu-device --example bench [-- --quick | --sparse | --bulk | --leases | --pgtable]
//! ```

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use viommu_device::{
    Access, DeviceConfig, EndpointConfig, Iommu, Limits, Listener, Mapping, OfferedFeatures,
    VirtioIommu,
};
use viommu_proto::pgtable::{index, Pte};
use viommu_proto::{
    AttachBody, AttachTableBody, MapBody, Request, Status, UnmapBody, MAP_F_READ, MAP_F_WRITE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::little_endian::{U32, U64};

type Mem = GuestMemoryMmap<()>;

const QSIZE: u16 = 256;
const BATCH: u16 = 128;
const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const READ_BUFS: u64 = 0x10000;
const WRITE_BUFS: u64 = 0x20000;
const PAGE: u64 = 0x1000;

#[path = "support/rng.rs"]
mod rng;
use rng::Rng;

/// The driver side: 128 fixed two-descriptor slots; a batch rewrites the request bytes and
/// publishes all slots at once.
struct Driver {
    mem: Mem,
    avail_idx: u16,
}

impl Driver {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        for k in 0..u64::from(BATCH) {
            let (r, w) = (READ_BUFS + k * 64, WRITE_BUFS + k * 16);
            write_desc(&mem, 2 * k, r, 36, 1, 2 * k as u16 + 1);
            write_desc(&mem, 2 * k + 1, w, 4, 2, 0);
        }
        Self { mem, avail_idx: 0 }
    }

    fn publish(&mut self, reqs: &[Request]) {
        for (k, r) in reqs.iter().enumerate() {
            let mut b = [0u8; 72];
            let n = r.encode(&mut b).unwrap();
            let k = k as u64;
            self.mem.write_slice(&b[..n], GuestAddress(READ_BUFS + k * 64)).unwrap();
            write_desc(&self.mem, 2 * k, READ_BUFS + k * 64, n as u32, 1, 2 * k as u16 + 1);
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx.wrapping_add(k as u16) % QSIZE);
            self.mem.write_obj(2 * k as u16, GuestAddress(slot)).unwrap();
        }
        self.avail_idx = self.avail_idx.wrapping_add(reqs.len() as u16);
        self.mem.write_obj(self.avail_idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    fn check_ok(&self, n: usize) {
        for k in 0..n as u64 {
            let s: u8 = self.mem.read_obj(GuestAddress(WRITE_BUFS + k * 16)).unwrap();
            assert_eq!(s, Status::Ok as u8, "request {k} failed");
        }
    }
}

fn write_desc(mem: &Mem, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(DESC + 16 * i)).unwrap();
}

fn map(start: u64, phys: u64) -> Request {
    Request::Map(MapBody {
        domain: U32::new(1),
        virt_start: U64::new(start),
        virt_end: U64::new(start + PAGE - 1),
        phys_start: U64::new(phys),
        flags: U32::new(MAP_F_READ | MAP_F_WRITE),
    })
}

fn unmap(start: u64) -> Request {
    Request::Unmap(UnmapBody {
        domain: U32::new(1),
        virt_start: U64::new(start),
        virt_end: U64::new(start + PAGE - 1),
        reserved: [0; 4],
    })
}

/// Live mapping `i` sits at page 2i; page 2i+1 stays free for the MAP/UNMAP being timed.
fn live(i: u64) -> u64 {
    2 * i * PAGE
}

struct Row {
    n: u64,
    queue_map: f64,
    queue_unmap: f64,
    direct_map: f64,
    direct_unmap: f64,
    hit: f64,
    hot: f64,
    miss: f64,
}

fn measure(n: u64, batches: usize, lookups: usize) -> Row {
    let queue_only = std::env::var("BENCH_QUEUE_ONLY").is_ok();
    let cfg = DeviceConfig {
        input_range: (0, u64::MAX),
        limits: Limits { max_mappings_per_domain: 1 << 22, ..Limits::default() },
        endpoints: vec![EndpointConfig::new(1)],
        ..Default::default()
    };
    let mut dev = VirtioIommu::new(cfg).unwrap();
    let f = dev.device_features();
    dev.ack_features(f);
    dev.set_queue(0, QSIZE, DESC, AVAIL, USED).unwrap();
    dev.set_queue(1, QSIZE, 0x4000, 0x5000, 0x6000).unwrap();
    dev.activate().unwrap();
    let iommu = dev.iommu();
    let attach = AttachBody { domain: U32::new(1), endpoint: U32::new(1), ..Default::default() };
    assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
    let mut rng = Rng(n);
    for i in 0..n {
        assert_eq!(
            iommu.execute(&map(live(i), rng.next() & !0xfff & 0xffff_ffff_f000), &mut []),
            Status::Ok
        );
    }
    let mut drv = Driver::new();

    // Through the queue: 128 MAPs into free pages spread over the tree, one kick; then the
    // 128 UNMAPs, one kick. Only the kick is timed.
    let (mut t_map, mut t_unmap) = (vec![], vec![]);
    for _ in 0..batches {
        let pages: Vec<u64> = (0..BATCH).map(|_| live(rng.next() % n) + PAGE).collect();
        let mut pages = pages;
        pages.sort_unstable();
        pages.dedup();
        let maps: Vec<Request> = pages.iter().map(|&p| map(p, p)).collect();
        drv.publish(&maps);
        let t = Instant::now();
        dev.process_request_queue(&drv.mem).unwrap();
        t_map.push(t.elapsed().as_secs_f64() / maps.len() as f64);
        drv.check_ok(maps.len());
        let unmaps: Vec<Request> = pages.iter().map(|&p| unmap(p)).collect();
        drv.publish(&unmaps);
        let t = Instant::now();
        dev.process_request_queue(&drv.mem).unwrap();
        t_unmap.push(t.elapsed().as_secs_f64() / unmaps.len() as f64);
        drv.check_ok(unmaps.len());
    }

    if queue_only {
        let (m, u) = (median(t_map), median(t_unmap));
        return Row {
            n,
            queue_map: m,
            queue_unmap: u,
            direct_map: 0.0,
            direct_unmap: 0.0,
            hit: 0.0,
            hot: 0.0,
            miss: 0.0,
        };
    }
    // Directly, without virtqueues (Iommu::execute).
    let ops = batches * usize::from(BATCH);
    let pages: Vec<u64> = (0..ops).map(|_| live(rng.next() % n) + PAGE).collect();
    let reqs: Vec<(Request, Request)> = pages.iter().map(|&p| (map(p, p), unmap(p))).collect();
    let (mut d_map, mut d_unmap) = (vec![], vec![]);
    for chunk in reqs.chunks(usize::from(BATCH)) {
        let t = Instant::now();
        for (m, _) in chunk {
            black_box(iommu.execute(m, &mut []));
        }
        d_map.push(t.elapsed().as_secs_f64() / chunk.len() as f64);
        let t = Instant::now();
        for (_, u) in chunk {
            black_box(iommu.execute(u, &mut []));
        }
        d_unmap.push(t.elapsed().as_secs_f64() / chunk.len() as f64);
    }

    // Translate: random live pages (hit) and random free pages (miss, which raises a
    // coalesced fault event).
    let hits: Vec<u64> = (0..4096).map(|_| live(rng.next() % n) + (rng.next() & 0xff0)).collect();
    let time_lookups = |addrs: &[u64], count: usize, ok: bool| {
        let mut per = vec![];
        for chunk in 0..count / 10_000 {
            let t = Instant::now();
            for k in chunk * 10_000..(chunk + 1) * 10_000 {
                let r = iommu.translate(1, addrs[k % addrs.len()], 16, Access::Read);
                assert_eq!(r.is_ok(), ok);
                black_box(r).ok();
            }
            per.push(t.elapsed().as_secs_f64() / 10_000.0);
        }
        median(per)
    };
    let hit = time_lookups(&hits, lookups, true);
    let hot = time_lookups(&hits[..16], lookups, true);
    let misses: Vec<u64> = hits.iter().map(|&a| a + PAGE).collect();
    let miss = time_lookups(&misses, lookups / 4, false);

    if n == 1 << 14 && !queue_only && batches > 1 {
        // Two translating threads on the same endpoint and domain.
        let both = |addrs: &[u64]| {
            let t = Instant::now();
            let per_thread = lookups / 4;
            std::thread::scope(|s| {
                for _ in 0..2 {
                    s.spawn(|| {
                        for k in 0..per_thread {
                            let a = addrs[k % addrs.len()];
                            black_box(iommu.translate(1, a, 16, Access::Read).unwrap());
                        }
                    });
                }
            });
            t.elapsed().as_secs_f64() / per_thread as f64 * 1e9
        };
        let (random, hot) = (both(&hits), both(&hits[..16]));
        println!("(16k mappings, 2 threads translating at once, per translation per thread: {random:.0} ns random, {hot:.0} ns hot)");
    }
    Row {
        n,
        queue_map: median(t_map),
        queue_unmap: median(t_unmap),
        direct_map: median(d_map),
        direct_unmap: median(d_unmap),
        hit,
        hot,
        miss,
    }
}

/// Median of per-batch costs: robust to the preemptions of a shared machine.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// UNMAP over sparse address space: `k` mappings, each alone in its 64-granule chunk
/// (2 MiB apart), removed by one UNMAP [0, u64::MAX]; and UNMAPs of the empty 2 MiB gaps
/// between them. Shows that cost follows the removed mappings, not the range's size.
fn sparse_unmap() {
    println!("| sparse mappings (1 per 2 MiB) | UNMAP [0, 2^64-1], per removed mapping | UNMAP of an empty gap |");
    println!("|---:|---:|---:|");
    for k in [1u64 << 10, 1 << 14, 1 << 18] {
        let cfg = DeviceConfig {
            input_range: (0, u64::MAX),
            endpoints: vec![EndpointConfig::new(1)],
            limits: Limits {
                max_mappings_per_domain: 1 << 20,
                max_mappings_total: 1 << 20,
                ..Limits::default()
            },
            ..DeviceConfig::default()
        };
        let iommu = Iommu::new(cfg).unwrap();
        let attach =
            AttachBody { domain: U32::new(1), endpoint: U32::new(1), ..Default::default() };
        assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
        let mut rounds = Vec::new();
        let mut gaps = Vec::new();
        for _ in 0..3 {
            for i in 0..k {
                assert_eq!(iommu.execute(&map(i << 21, i << 12), &mut []), Status::Ok);
            }
            let t = Instant::now();
            for i in 0..k.min(4096) {
                let gap = UnmapBody {
                    domain: U32::new(1),
                    virt_start: U64::new((i << 21) + PAGE),
                    virt_end: U64::new(((i + 1) << 21) - 1),
                    reserved: [0; 4],
                };
                black_box(iommu.execute(&Request::Unmap(gap), &mut []));
            }
            gaps.push(t.elapsed().as_secs_f64() / k.min(4096) as f64);
            let all = UnmapBody {
                domain: U32::new(1),
                virt_start: U64::new(0),
                virt_end: U64::new(u64::MAX),
                reserved: [0; 4],
            };
            let t = Instant::now();
            assert_eq!(iommu.execute(&Request::Unmap(all), &mut []), Status::Ok);
            rounds.push(t.elapsed().as_secs_f64() / k as f64);
            assert_eq!(iommu.mappings(1).map(|m| m.len()), Some(0));
        }
        println!(
            "| {}k | {:.0} ns | {:.0} ns |",
            k >> 10,
            median(rounds) * 1e9,
            median(gaps) * 1e9
        );
    }
}

/// The peers' way to UNMAP a range (cloud-hypervisor and crosvm keep a domain's mappings in
/// a `BTreeMap` keyed by IOVA): walk the range in order, collecting what it holds, then
/// remove each key. Written here as the comparator, run on the same mappings.
struct PeerTree(BTreeMap<u64, (u64, u64, u32)>);

impl PeerTree {
    fn unmap(&mut self, start: u64, end: u64) -> Vec<(u64, u64, u64, u32)> {
        let gone: Vec<_> = self.0.range(start..=end).map(|(&s, &(e, p, f))| (s, e, p, f)).collect();
        for g in &gone {
            self.0.remove(&g.0);
        }
        gone
    }
}

/// Counts what a listener is handed, so the removed list is built and used.
#[derive(Default)]
struct CountUnmaps(std::sync::atomic::AtomicUsize);

impl Listener for CountUnmaps {
    fn on_unmap(&self, _: u32, _: u64, _: u64, removed: &[Mapping]) {
        self.0.fetch_add(removed.len(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// One UNMAP of a 1 GiB range holding 256k contiguous 4 KiB mappings: the device (without
/// and with a listener) against the peers' B-tree walk, median of 5 rounds each.
fn bulk_unmap() {
    const N: u64 = 1 << 18;
    let gib = N * PAGE - 1;
    let cfg = DeviceConfig {
        input_range: (0, u64::MAX),
        endpoints: vec![EndpointConfig::new(1)],
        ..DeviceConfig::default()
    };
    let all = Request::Unmap(UnmapBody {
        domain: U32::new(1),
        virt_start: U64::new(0),
        virt_end: U64::new(gib),
        reserved: [0; 4],
    });
    let device = |listener: bool| {
        let iommu = Iommu::new(cfg.clone()).unwrap();
        let count = Arc::new(CountUnmaps::default());
        if listener {
            iommu.add_listener(count.clone());
        }
        let attach =
            AttachBody { domain: U32::new(1), endpoint: U32::new(1), ..Default::default() };
        assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
        let mut rounds = vec![];
        for _ in 0..5 {
            for i in 0..N {
                assert_eq!(iommu.execute(&map(i * PAGE, i * PAGE), &mut []), Status::Ok);
            }
            let t = Instant::now();
            assert_eq!(iommu.execute(&all, &mut []), Status::Ok);
            rounds.push(t.elapsed().as_secs_f64());
            assert_eq!(iommu.mappings(1).map(|m| m.len()), Some(0));
        }
        let told = count.0.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(told, if listener { 5 * N as usize } else { 0 });
        median(rounds)
    };
    let (ours, ours_listener) = (device(false), device(true));
    let mut rounds = vec![];
    for _ in 0..5 {
        let mut peer = PeerTree(BTreeMap::new());
        for i in 0..N {
            peer.0.insert(i * PAGE, (i * PAGE + PAGE - 1, i * PAGE, 3));
        }
        let t = Instant::now();
        let gone = black_box(peer.unmap(0, gib));
        rounds.push(t.elapsed().as_secs_f64());
        assert_eq!((gone.len(), peer.0.len()), (N as usize, 0));
    }
    let peer = median(rounds);
    let ms = |s: f64| format!("{:.2} ms", s * 1e3);
    println!("| one UNMAP of 1 GiB holding 256k 4 KiB mappings | viommu | viommu with a listener | peers' B-tree walk + removal | viommu / peers |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| Iommu::execute, median of 5 | {} | {} | {} | {:.2}x |",
        ms(ours),
        ms(ours_listener),
        ms(peer),
        ours / peer
    );
}

/// The three hit-path variants timed per thread.
#[derive(Clone, Copy)]
enum HitPath {
    /// translate()'s work without the lease: the same lookup, the same segments built and
    /// dropped (a fair comparator: only the lease differs).
    Plain,
    /// translate(): lookup under a lease, released at once.
    Leased,
    /// translate(), a 16-byte read through the translation, release.
    LeasedAccess,
}

/// CPU time the calling thread has used, in seconds: on a loaded host (more runnable
/// threads than cores) wall-clock time would count the time others ran.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; the clock ID is a constant Linux knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU nanoseconds per operation per thread for each of `paths` (median over batches of
/// 10k, averaged over threads), `threads` threads each doing `per_thread` hits per path on
/// `addrs`; started together at a barrier. The paths' batches alternate, so a change in
/// the load (other processes, frequency) hits every path alike and the differences hold.
fn time_hits(
    iommu: &Iommu,
    mem: &Mem,
    addrs: &[u64],
    threads: usize,
    per_thread: usize,
    paths: &[HitPath],
) -> Vec<f64> {
    let start = std::sync::Barrier::new(threads);
    let per: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    let mut buf = [0u8; 16];
                    let off = t * 997;
                    start.wait();
                    let mut batches = vec![vec![]; paths.len()];
                    for b in 0..per_thread / 10_000 {
                        for (p, &path) in paths.iter().enumerate() {
                            let t0 = thread_cpu_secs();
                            for k in b * 10_000..(b + 1) * 10_000 {
                                hit(iommu, mem, addrs[(off + k) % addrs.len()], path, &mut buf);
                            }
                            batches[p].push((thread_cpu_secs() - t0) / 10_000.0 * 1e9);
                        }
                    }
                    batches.into_iter().map(median).collect::<Vec<f64>>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (0..paths.len()).map(|p| per.iter().map(|t| t[p]).sum::<f64>() / per.len() as f64).collect()
}

/// One translation of `a` by `path`.
#[inline(always)]
fn hit(iommu: &Iommu, mem: &Mem, a: u64, path: HitPath, buf: &mut [u8; 16]) {
    match path {
        HitPath::Plain => {
            black_box(iommu.bench_translate_unleased(1, a, 16, Access::Read).unwrap());
        }
        HitPath::Leased => {
            black_box(iommu.translate(1, a, 16, Access::Read).unwrap());
        }
        HitPath::LeasedAccess => {
            let tr = iommu.translate(1, a, 16, Access::Read).unwrap();
            tr.read_at(mem, 0, buf).unwrap();
            black_box(&buf);
        }
    }
}

/// The lowest of three runs of [`time_hits`], per path: the figures least disturbed by
/// other load.
fn best_of_3(
    iommu: &Iommu,
    mem: &Mem,
    addrs: &[u64],
    threads: usize,
    per: usize,
    paths: &[HitPath],
) -> Vec<f64> {
    (0..3)
        .map(|_| time_hits(iommu, mem, addrs, threads, per, paths))
        .fold(vec![f64::MAX; paths.len()], |best, run| {
            best.iter().zip(run).map(|(b, r)| b.min(r)).collect()
        })
}

/// The lease rows: `n` live 4 KiB mappings onto 1 MiB of guest RAM; hits on 4096 random
/// live pages (mostly missing the per-thread cache) and on 16 hot pages (cache hits).
fn lease_rows(lookups: usize) {
    println!("| live mappings | threads | random: translate, no lease | random: translate + lease + release | random: + 16-byte read | hot: translate, no lease | hot: translate + lease + release | lease overhead, hot / random |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in [1u64 << 10, 1 << 14, 1 << 18] {
        let cfg = DeviceConfig {
            input_range: (0, u64::MAX),
            limits: Limits { max_mappings_per_domain: 1 << 22, ..Limits::default() },
            endpoints: vec![EndpointConfig::new(1)],
            ..Default::default()
        };
        let iommu = Iommu::new(cfg).unwrap();
        let attach =
            AttachBody { domain: U32::new(1), endpoint: U32::new(1), ..Default::default() };
        assert_eq!(iommu.execute(&Request::Attach(attach), &mut []), Status::Ok);
        for i in 0..n {
            assert_eq!(iommu.execute(&map(live(i), (i % 256) * PAGE), &mut []), Status::Ok);
        }
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut rng = Rng(n ^ 0x1ea5e);
        let addrs: Vec<u64> =
            (0..4096).map(|_| live(rng.next() % n) + (rng.next() & 0xff0)).collect();
        for threads in [1, 2, 4] {
            let per = lookups / threads;
            use HitPath::*;
            let run =
                |a: &[u64], paths: &[HitPath]| best_of_3(&iommu, &mem, a, threads, per, paths);
            let [plain, leased, access] = run(&addrs, &[Plain, Leased, LeasedAccess])[..] else {
                unreachable!()
            };
            let [hot_plain, hot_leased] = run(&addrs[..16], &[Plain, Leased])[..] else {
                unreachable!()
            };
            println!(
                "| {}k | {threads} | {plain:.0} ns | {leased:.0} ns | {access:.0} ns | {hot_plain:.0} ns | {hot_leased:.0} ns | {:.0} / {:.0} ns |",
                n >> 10,
                hot_leased - hot_plain,
                leased - plain
            );
        }
    }
}

/// Page-table mode against MAP mode, one run: 4096 live 4 KiB pages at consecutive IOVAs,
/// mapped by MAP requests in one device and by a format-3 table in guest memory in the
/// other; translate (with its lease) on 16 hot pages (per-thread TLB hits), 256 pages (the
/// domain's cache in table mode, the page index in MAP mode) and all 4096 (walks, beyond
/// the 512-leaf cache).
fn table_rows(lookups: usize) {
    const PAGES: u64 = 4096;
    const BASE: u64 = 0x1_0000_0000;
    const TABLES: u64 = 0x10_0000;
    let cfg = DeviceConfig { endpoints: vec![EndpointConfig::new(1)], ..Default::default() };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let by_map = Iommu::new(cfg.clone()).unwrap();
    let attach = AttachBody { domain: U32::new(1), endpoint: U32::new(1), ..Default::default() };
    assert_eq!(by_map.execute(&Request::Attach(attach), &mut []), Status::Ok);
    for i in 0..PAGES {
        assert_eq!(by_map.execute(&map(BASE + i * PAGE, (i % 256) * PAGE), &mut []), Status::Ok);
    }
    // Level 0, 1 and 2 tables, then PAGES / 512 level-3 tables, one after the other.
    let pte = |gpa: u64, v: Pte| mem.write_obj(v.get().to_le(), GuestAddress(gpa)).unwrap();
    let l3 = TABLES + 3 * PAGE;
    pte(TABLES + 8 * index(BASE, 0) as u64, Pte::table(TABLES + PAGE));
    pte(TABLES + PAGE + 8 * index(BASE, 1) as u64, Pte::table(TABLES + 2 * PAGE));
    for j in 0..PAGES / 512 {
        pte(TABLES + 2 * PAGE + 8 * (index(BASE, 2) as u64 + j), Pte::table(l3 + j * PAGE));
    }
    for i in 0..PAGES {
        pte(l3 + 8 * i, Pte::leaf((i % 256) * PAGE, true, true));
    }
    let table_cfg = DeviceConfig {
        features: OfferedFeatures { attach_table: true, ..Default::default() },
        ..cfg
    };
    let by_table = Iommu::new(table_cfg).unwrap();
    by_table.set_table_memory(Some(Arc::new(mem.clone())));
    let at = AttachTableBody {
        domain: U32::new(1),
        endpoint: U32::new(1),
        pgd: U64::new(TABLES),
        ..Default::default()
    };
    assert_eq!(by_table.execute(&Request::AttachTable(at), &mut []), Status::Ok);
    let mut rng = Rng(0x7ab1e);
    let addrs: Vec<u64> = (0..PAGES).map(|i| BASE + i * PAGE + (rng.next() & 0xff0)).collect();
    let mut shuffled = addrs.clone();
    for i in (1..shuffled.len()).rev() {
        shuffled.swap(i, rng.next() as usize % (i + 1));
    }
    println!("| pages touched (4 KiB, 1 thread, translate + lease) | MAP mode | page-table mode | table / MAP |");
    println!("|---|---:|---:|---:|");
    for (name, set) in [
        ("16 hot (per-thread TLB)", &addrs[..16]),
        ("256 (domain cache / page index)", &shuffled[..256]),
        ("4096 (walks / page index)", &shuffled[..]),
    ] {
        // Rounds alternate the two devices, so a change in the load hits both alike.
        let (mut m, mut t) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            m = m.min(time_hits(&by_map, &mem, set, 1, lookups, &[HitPath::Leased])[0]);
            t = t.min(time_hits(&by_table, &mem, set, 1, lookups, &[HitPath::Leased])[0]);
        }
        println!("| {name} | {m:.0} ns | {t:.0} ns | {:.2} |", t / m);
    }
}

fn main() {
    if std::env::args().any(|a| a == "--sparse") {
        sparse_unmap();
        return;
    }
    if std::env::args().any(|a| a == "--bulk") {
        bulk_unmap();
        return;
    }
    let quick = std::env::args().any(|a| a == "--quick");
    if std::env::args().any(|a| a == "--leases") {
        lease_rows(if quick { 100_000 } else { 1_000_000 });
        return;
    }
    if std::env::args().any(|a| a == "--pgtable") {
        table_rows(if quick { 100_000 } else { 1_000_000 });
        return;
    }
    let (mut batches, lookups) = if quick { (20, 200_000) } else { (200, 4_000_000) };
    if let Some(b) = std::env::var("BENCH_BATCHES").ok().and_then(|b| b.parse().ok()) {
        batches = b;
    }
    println!("viommu-device bench: 1 domain, 1 endpoint, 4 KiB mappings at random addresses; queue path = 128 requests per kick;");
    println!("each figure is the median over batches (128 requests, or 10k translations) of the per-operation cost");
    println!();
    println!("| live mappings | MAP via queue | UNMAP via queue | MAP direct | UNMAP direct | translate hit, random | translate hit, 16 hot pages | translate miss (+fault) | queue requests/s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let sizes: Vec<u64> = match std::env::var("BENCH_SIZES") {
        Ok(v) => v.split(',').filter_map(|x| x.parse().ok()).collect(),
        Err(_) => vec![1 << 10, 1 << 14, 1 << 18],
    };
    // Warm up (page faults, CPU frequency) so the first row is not penalised.
    measure(1 << 10, batches / 4 + 1, lookups / 4);
    for n in sizes {
        let r = measure(n, batches, lookups);
        let ns = |s: f64| format!("{:.0} ns", s * 1e9);
        let rate = 2.0 / (r.queue_map + r.queue_unmap);
        println!(
            "| {}k | {} | {} | {} | {} | {} | {} | {} | {:.2} M |",
            r.n >> 10,
            ns(r.queue_map),
            ns(r.queue_unmap),
            ns(r.direct_map),
            ns(r.direct_unmap),
            ns(r.hit),
            ns(r.hot),
            ns(r.miss),
            rate / 1e6
        );
    }
    println!();
    sparse_unmap();
    println!();
    bulk_unmap();
    println!();
    lease_rows(lookups / 4);
    println!();
    table_rows(lookups / 4);
}
