//! The real-guest test program (see `scripts/real-guest` and docs/real-guest.md).
//!
//! - `viommu-guest gen-disk FILE`: writes the known disk pattern (on the host);
//! - `viommu-guest run`: the tests, inside the guest, options from
//!   /proc/cmdline: `vg.policy=strict|lazy|lazy-single|lazy-batch|bypass`,
//!   or `linux-lazy|linux-strict|linux-noiommu` (Linux's own drivers, see
//!   `run_kernel`),
//!   `vg.mib=N` (MiB per workload), `vg.neg=0|1` (negative tests).
//!
//! Output lines for the host script, all starting with `VG `:
//! `PASS name`, `FAIL name: why`, `MARK name cfgw=K` (the K-th traced config
//! write starts workload `name`), `PERF name k=v...` (the guest's counters).
#![deny(clippy::undocumented_unsafe_blocks, unsafe_op_in_unsafe_fn)]

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use viommu_driver::hal::{DmaRegion, Hal, PAGE_SIZE};
use viommu_driver::{DriverOptions, FaultRecord, Prot, VirtioIommu};
use viommu_guest::blk::{BlkOp, VirtioBlk, S_OK};
use viommu_guest::hugepage::HugePageHal;
use viommu_guest::kernel_boot::{self, BoundMarker};
use viommu_guest::kernel_io;
use viommu_guest::pattern;
use viommu_guest::virtio_pci::{ConfigMarker, PciTransport};
use viommu_proto::{fault, Config};

use viommu_guest::mapper::{DmaMapper, IdentityMapper, Mapper, RoundBuf};

const IOMMU_BDF: &str = "00:04.0";
const BLK_BDF: &str = "00:05.0";
/// Requester ID of 00:05.0.
const BLK_ENDPOINT: u32 = 0x28;
/// Entries of the virtio-blk queue (QEMU runs with `queue-size=1024`).
const BLK_QUEUE_SIZE: u16 = 1024;
/// Size of the disk image: the read region, then the write region.
const DISK_MIB: u64 = 128;
const READ_BASE: u64 = 0;
const WRITE_BASE: u64 = 64 << 20;
/// IOVA for the read-only test: the DMA layer allocates top-down, far above.
const NEG_RO_IOVA: u64 = 0x5000_0000;
/// How long a request may take before we call it stuck (TCG is slow).
const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a negative test waits for faults to arrive.
const FAULT_WAIT: Duration = Duration::from_secs(2);

type Iommu = VirtioIommu<PciTransport, HugePageHal>;
type Blk = VirtioBlk<PciTransport, HugePageHal>;

fn gen_disk(path: &str) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..DISK_MIB {
        pattern::fill(&mut buf, mib << 20, pattern::DISK_TAG);
        f.write_all(&buf)?;
    }
    f.flush()
}

/// Options from the kernel command line.
#[derive(Debug)]
struct Opts {
    policy: String,
    mib: u64,
    neg: bool,
    /// Also run scattered variants of the sizes above 4 KiB.
    sg: bool,
    sizes: Vec<usize>,
    qds: Vec<usize>,
    /// linux-* boots: let the block layer merge adjacent I/Os into one
    /// request (Linux's default). Off, every I/O is one request, as in ours.
    merges: bool,
}

fn parse_size(s: &str) -> Option<usize> {
    let (n, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1 << 10),
        b'm' | b'M' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    n.parse::<usize>().ok().map(|n| n * mult)
}

impl Opts {
    fn from_cmdline(cmdline: &str) -> Result<Self, String> {
        let mut o = Opts {
            policy: "strict".into(),
            mib: 4,
            neg: true,
            sg: true,
            sizes: vec![4 << 10, 64 << 10, 1 << 20],
            qds: vec![1, 32],
            merges: false,
        };
        for kv in cmdline.split_whitespace() {
            let Some((k, v)) = kv.split_once('=') else { continue };
            match k {
                "vg.policy" => o.policy = v.into(),
                "vg.mib" => o.mib = v.parse().map_err(|_| format!("bad {kv}"))?,
                "vg.neg" => o.neg = v == "1",
                "vg.sg" => o.sg = v == "1",
                "vg.merges" => o.merges = v == "1",
                "vg.sizes" => {
                    o.sizes = v
                        .split(',')
                        .map(parse_size)
                        .collect::<Option<_>>()
                        .ok_or(format!("bad {kv}"))?
                }
                "vg.qds" => {
                    o.qds = v
                        .split(',')
                        .map(|q| q.parse().ok())
                        .collect::<Option<_>>()
                        .ok_or(format!("bad {kv}"))?
                }
                _ => {}
            }
        }
        if o.mib == 0 || o.mib > 64 {
            return Err(format!("vg.mib={} outside 1..=64", o.mib));
        }
        Ok(o)
    }
}

/// PASS/FAIL bookkeeping.
#[derive(Default)]
struct Results {
    passed: u32,
    failed: u32,
}

impl Results {
    fn record(&mut self, name: &str, r: Result<(), String>) -> bool {
        match r {
            Ok(()) => {
                self.passed += 1;
                println!("VG PASS {name}");
                true
            }
            Err(e) => {
                self.failed += 1;
                println!("VG FAIL {name}: {e}");
                false
            }
        }
    }
}

/// Fault records the driver handed to our handler.
type FaultLog = Arc<Mutex<Vec<FaultRecord>>>;

/// Everything a test needs.
struct Rig {
    hal: HugePageHal,
    marker: ConfigMarker,
    iommu: Option<Iommu>,
    /// The blk endpoint's paging domain.
    domain: Option<viommu_driver::Domain>,
    faults: FaultLog,
}

impl Rig {
    fn mark(&self, name: &str) {
        let k = self.marker.mark();
        println!("VG MARK {name} cfgw={k}");
    }

    fn poll_events(&self) {
        if let Some(i) = &self.iommu {
            if let Err(e) = i.poll_events() {
                println!("VG INFO poll_events: {e}");
            }
        }
    }

    fn take_faults(&self) -> Vec<FaultRecord> {
        std::mem::take(&mut *self.faults.lock().expect("fault log"))
    }
}

/// The first `len` bytes of a buffer, read while no request uses it.
fn bytes_of(r: &DmaRegion, len: usize) -> &[u8] {
    bytes_at(r, 0, len)
}

/// `len` bytes at offset `at` of a buffer, read while no request uses it.
fn bytes_at(r: &DmaRegion, at: usize, len: usize) -> &[u8] {
    assert!(at + len <= r.pages * PAGE_SIZE);
    // SAFETY: the range lies in the region, which is ours (from the HAL);
    // the device touches it only while a request is in flight, and we read
    // it only when none is.
    unsafe { std::slice::from_raw_parts(r.vaddr.as_ptr().add(at), len) }
}

/// Runs `f` on the first `len` bytes of a buffer no request uses.
fn with_buf_mut<R>(r: &DmaRegion, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    with_bytes_mut(r, 0, len, f)
}

/// Runs `f` on `len` bytes at offset `at` of a buffer no request uses.
fn with_bytes_mut<R>(r: &DmaRegion, at: usize, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    assert!(at + len <= r.pages * PAGE_SIZE);
    // SAFETY: as in `bytes_at`; the slice does not outlive this call.
    f(unsafe { std::slice::from_raw_parts_mut(r.vaddr.as_ptr().add(at), len) })
}

/// The physical segments of a workload buffer: one run, or (scattered)
/// every other 4 KiB page.
fn segments(r: &DmaRegion, w: &Workload) -> Vec<(u64, usize)> {
    if !w.scattered {
        return vec![(r.bus_addr, w.size)];
    }
    (0..w.size / PAGE_SIZE).map(|i| (r.bus_addr + (2 * i * PAGE_SIZE) as u64, PAGE_SIZE)).collect()
}

/// Byte offsets in the buffer of each segment, with the length.
fn segment_offsets(r: &DmaRegion, w: &Workload) -> impl Iterator<Item = (usize, usize)> {
    let base = r.bus_addr;
    segments(r, w).into_iter().map(move |(p, l)| ((p - base) as usize, l))
}

/// Fills a buffer with the pattern of disk offset `off`.
fn fill_buf(r: &DmaRegion, w: &Workload, off: u64) {
    let mut disk = off;
    for (at, len) in segment_offsets(r, w) {
        with_bytes_mut(r, at, len, |s| pattern::fill(s, disk, w.tag));
        disk += len as u64;
    }
}

/// Checks a buffer against the pattern of disk offset `off`.
fn check_buf(r: &DmaRegion, w: &Workload, off: u64) -> Result<(), String> {
    let mut disk = off;
    for (at, len) in segment_offsets(r, w) {
        pattern::check(bytes_at(r, at, len), disk, w.tag)
            .map_err(|bad| format!("wrong data at disk offset {bad:#x}"))?;
        disk += len as u64;
    }
    Ok(())
}

/// One workload: `op` of `bytes` at `base`, `size` bytes per request, up to `qd` in flight.
struct Workload {
    name: String,
    op: BlkOp,
    size: usize,
    /// Every 4 KiB page of a request's buffer is physically apart (as in
    /// the Linux baseline's "scattered"); otherwise buffers are contiguous.
    scattered: bool,
    qd: usize,
    bytes: u64,
    base: u64,
    tag: u64,
}

struct Perf {
    secs: f64,
    /// Of `secs`, the time spent in the DMA layer.
    dma_secs: f64,
    ios: u64,
    counts: viommu_driver::CounterSnapshot,
    blk_kicks: u64,
}

/// Runs a workload; data is filled (writes) and checked (reads) outside
/// the timed part.
fn run_workload(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    w: &Workload,
) -> Result<Perf, String> {
    let pages = w.size.div_ceil(PAGE_SIZE) * if w.scattered { 2 } else { 1 };
    let mut bufs = Vec::with_capacity(w.qd);
    for _ in 0..w.qd {
        bufs.push(rig.hal.dma_alloc(pages).ok_or("out of hugetlb memory for buffers")?);
    }
    let result = run_workload_on(rig, blk, m, w, &bufs);
    if result.is_err() {
        drain(blk);
    }
    for b in bufs {
        // SAFETY: no request is in flight (the run finished or the device is
        // wedged, in which case the suite ends right after).
        unsafe { rig.hal.dma_dealloc(b) };
    }
    result
}

/// After a failed workload: takes whatever completes within a short while,
/// so the next workload starts with an idle queue.
fn drain(blk: &mut Blk) {
    let mut quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(500) {
        if blk.poll().is_some() {
            quiet = Instant::now();
        }
        std::hint::spin_loop();
    }
}

fn run_workload_on(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    w: &Workload,
    bufs: &[DmaRegion],
) -> Result<Perf, String> {
    let n = w.bytes / w.size as u64;
    let write = w.op == BlkOp::Write;
    let mut free: Vec<usize> = (0..bufs.len()).rev().collect();
    // By blk tag: buffer, mapping handle, disk offset.
    let mut inflight: HashMap<u16, (usize, u64, u64)> = HashMap::new();
    let (mut next, mut done) = (0u64, 0u64);
    let mut untimed = Duration::ZERO;
    // Time inside the DMA layer (map, unmap, flush), syncs included.
    let mut in_dma = Duration::ZERO;
    let blk_kicks0 = blk.kicks();
    rig.mark(&w.name);
    let before = m.counts();
    let t0 = Instant::now();
    let mut round = Vec::with_capacity(w.qd);
    while done < n {
        // Completions first, then one round of new requests and one kick.
        while let Some(c) = blk.poll() {
            let (b, handle, off) = inflight.remove(&c.tag).ok_or("completion with unknown tag")?;
            if c.status != S_OK {
                return Err(format!("request at {off:#x} failed with status {}", c.status));
            }
            let t = Instant::now();
            m.complete(handle)?;
            in_dma += t.elapsed();
            if !write {
                let t = Instant::now();
                check_buf(&bufs[b], w, off)?;
                untimed += t.elapsed();
            }
            free.push(b);
            done += 1;
        }
        // The lazy flush-queue timeout (10 ms) needs a timer; this loop is it.
        let t = Instant::now();
        m.tick()?;
        in_dma += t.elapsed();
        round.clear();
        // Header + status + the data descriptors.
        let per_req = m.max_descs(segments(&bufs[0], w).len()) + 2;
        let mut descs = blk.free_descriptors() as usize;
        while next + (round.len() as u64) < n && descs >= per_req {
            let Some(b) = free.pop() else { break };
            round.push(b);
            descs -= per_req;
        }
        if !round.is_empty() {
            if write {
                let t = Instant::now();
                for (i, &b) in round.iter().enumerate() {
                    let off = w.base + (next + i as u64) * w.size as u64;
                    fill_buf(&bufs[b], w, off);
                }
                untimed += t.elapsed();
            }
            let rb: Vec<_> = round
                .iter()
                .map(|&b| RoundBuf { segs: segments(&bufs[b], w), device_writes: !write })
                .collect();
            let t = Instant::now();
            let mapped = m.map_round(&rb)?;
            in_dma += t.elapsed();
            for (&b, mp) in round.iter().zip(mapped) {
                let off = w.base + next * w.size as u64;
                let tag = blk.submit(w.op, off, &mp.descs).map_err(|e| e.to_string())?;
                inflight.insert(tag, (b, mp.handle, off));
                next += 1;
            }
            blk.kick();
        }
        if done < n {
            // Wait for at least one completion before the next round.
            let start = Instant::now();
            while !blk.has_used() {
                if start.elapsed() > IO_TIMEOUT {
                    return Err(format!("no completion within {IO_TIMEOUT:?} ({done}/{n} done)"));
                }
                std::hint::spin_loop();
            }
        }
    }
    let t = Instant::now();
    m.flush()?;
    in_dma += t.elapsed();
    let secs = (t0.elapsed().saturating_sub(untimed)).as_secs_f64();
    let counts = m.counts().since(&before);
    Ok(Perf {
        secs,
        dma_secs: in_dma.as_secs_f64(),
        ios: n,
        counts,
        blk_kicks: blk.kicks() - blk_kicks0,
    })
}

/// Reads `[base, base+bytes)` back with 1 MiB requests at QD32 and checks it against `tag`.
fn verify_region(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    base: u64,
    bytes: u64,
    tag: u64,
) -> Result<(), String> {
    let size = (1usize << 20).min(bytes as usize);
    let w = Workload {
        name: "verify".into(),
        op: BlkOp::Read,
        size,
        scattered: false,
        qd: 32,
        bytes,
        base,
        tag,
    };
    run_workload(rig, blk, m, &w).map(|_| ())
}

fn size_name(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}m", size >> 20)
    } else {
        format!("{}k", size >> 10)
    }
}

/// The workload matrix of a boot, in order: reads then writes; each size,
/// then its scattered variant; each queue depth. Write workloads get a tag
/// per boot and workload, so data left by an earlier boot never passes.
fn plan(o: &Opts, ring: usize) -> Vec<Workload> {
    let bytes = o.mib << 20;
    let boot_tag = o
        .policy
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut out = Vec::new();
    for op in [BlkOp::Read, BlkOp::Write] {
        let variants = o.sizes.iter().flat_map(|&size| {
            // Without an IOMMU a scattered buffer is one descriptor per page
            // (we have no indirect descriptors): it must fit in the ring, and
            // the queue depth is cut to what fits (3 at 1 MiB in 1024 entries).
            let fits = o.policy != "bypass" || size / PAGE_SIZE + 2 <= ring;
            let sg = (o.sg && size > PAGE_SIZE && fits).then_some((size, true));
            [Some((size, false)), sg].into_iter().flatten()
        });
        for (size, scattered) in variants {
            for &qd in &o.qds {
                let opn = if op == BlkOp::Read { "read" } else { "write" };
                let sg = if scattered { "-sg" } else { "" };
                let name = format!("{opn}-{}{sg}-qd{qd}", size_name(size));
                let (base, tag) = match op {
                    BlkOp::Read => (READ_BASE, pattern::DISK_TAG),
                    BlkOp::Write => (WRITE_BASE, boot_tag ^ (out.len() as u64 + 1)),
                };
                out.push(Workload { name, op, size, scattered, qd, bytes, base, tag });
            }
        }
    }
    out
}

fn run_workloads(rig: &Rig, blk: &mut Blk, m: &mut dyn Mapper, o: &Opts, res: &mut Results) {
    for w in plan(o, blk.queue_size() as usize) {
        let r = run_workload(rig, blk, m, &w).and_then(|p| {
            let c = p.counts;
            println!(
                "VG PERF {} ios={} reqs={} bytes={} secs={:.3} dma_secs={:.3} mbps={:.1} map={} unmap={} attach={} kicks={} syncs={} blk_kicks={}",
                w.name, p.ios, p.ios, w.bytes, p.secs, p.dma_secs, mbps(w.bytes, p.secs), c.map, c.unmap, c.attach, c.kicks, c.syncs, p.blk_kicks
            );
            if w.op == BlkOp::Write {
                rig.mark(&format!("verify-{}", w.name));
                verify_region(rig, blk, m, w.base, w.bytes, w.tag)?;
            }
            Ok(())
        });
        res.record(&format!("{}-{}", o.policy, w.name), r);
    }
    rig.mark("end");
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

// ------------------------------------------------------------------ Linux's drivers

/// Where `scripts/real-guest` puts the (decompressed) kernel modules.
const MODULE_DIR: &str = "/lib/modules";
/// The block device the kernel's virtio-blk creates.
const KERNEL_DISK: &str = "/dev/vda";
/// The block layer's merge switch for the disk.
const NOMERGES: &str = "/sys/block/vda/queue/nomerges";
/// How long after loading the modules the disk may take to appear.
const DISK_WAIT: Duration = Duration::from_secs(60);
/// Pause after each workload in a lazy Linux boot, so that the UNMAPs its
/// flush queue sends up to ~10 ms later land before the next mark.
const SETTLE: Duration = Duration::from_millis(500);

/// Loads Linux's virtio-iommu (when the boot has an IOMMU) and virtio-blk,
/// and waits for the disk; checks the IOMMU domain type of the endpoint.
fn kernel_setup(
    o: &Opts,
    res: &mut Results,
) -> Result<(kernel_io::Disk, Option<BoundMarker>), String> {
    let want_type = match o.policy.as_str() {
        "linux-lazy" => Some("DMA-FQ"),
        "linux-strict" => Some("DMA"),
        "linux-noiommu" => None,
        p => return Err(format!("unknown policy {p}")),
    };
    let hal = HugePageHal::new(60).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    if want_type.is_some() {
        kernel_boot::load_module(&format!("{MODULE_DIR}/virtio-iommu.ko"))
            .map_err(|e| e.to_string())?;
    }
    kernel_boot::load_module(&format!("{MODULE_DIR}/virtio_blk.ko")).map_err(|e| e.to_string())?;
    kernel_boot::wait_for(KERNEL_DISK, DISK_WAIT).map_err(|e| e.to_string())?;
    println!("VG INFO {KERNEL_DISK} up {:.2} s after loading modules", t0.elapsed().as_secs_f64());
    if !o.merges {
        // 2: no merging at all, so each I/O is one virtio-blk request.
        std::fs::write(NOMERGES, "2").map_err(|e| format!("write {NOMERGES}: {e}"))?;
    }
    let blk_bdf = format!("0000:{BLK_BDF}");
    let found = kernel_boot::iommu_domain_type(&blk_bdf);
    res.record(
        "iommu-domain-type",
        (found.as_deref() == want_type)
            .then_some(())
            .ok_or(format!("{blk_bdf}: domain type {found:?}, want {want_type:?}")),
    );
    let marker = match want_type {
        Some(_) => {
            Some(BoundMarker::open(IOMMU_BDF, Config::BYPASS_OFFSET).map_err(|e| e.to_string())?)
        }
        None => None,
    };
    let disk = kernel_io::Disk::open(KERNEL_DISK, hal).map_err(|e| e.to_string())?;
    Ok((disk, marker))
}

fn kernel_job(w: &Workload) -> kernel_io::Job {
    kernel_io::Job {
        write: w.op == BlkOp::Write,
        size: w.size,
        scattered: w.scattered,
        qd: w.qd,
        bytes: w.bytes,
        base: w.base,
        tag: w.tag,
    }
}

/// The workload matrix through the kernel's drivers on `/dev/vda`.
fn run_kernel(o: &Opts, res: &mut Results) {
    let (disk, marker) = match kernel_setup(o, res) {
        Ok(v) => v,
        Err(e) => {
            res.record(&format!("{}-setup", o.policy), Err(e));
            return;
        }
    };
    let mark = |name: &str| {
        if let Some(m) = &marker {
            println!("VG MARK {name} cfgw={}", m.mark());
        }
    };
    let settle = || {
        if marker.is_some() {
            std::thread::sleep(SETTLE);
        }
    };
    res.record(
        "blk-capacity",
        match disk.capacity() {
            Ok(c) if c == DISK_MIB << 20 => Ok(()),
            Ok(c) => Err(format!("capacity {c} bytes")),
            Err(e) => Err(e.to_string()),
        },
    );
    settle();
    for w in plan(o, BLK_QUEUE_SIZE as usize) {
        mark(&w.name);
        let r = disk.run(&kernel_job(&w)).map_err(|e| e.to_string()).and_then(|p| {
            println!(
                "VG PERF {} ios={} reqs={} bytes={} secs={:.3} mbps={:.1}",
                w.name,
                p.ios,
                p.ios,
                w.bytes,
                p.secs,
                mbps(w.bytes, p.secs)
            );
            settle();
            if w.op == BlkOp::Write {
                mark(&format!("verify-{}", w.name));
                let v = kernel_io::Job {
                    write: false,
                    size: 1 << 20,
                    scattered: false,
                    qd: 32,
                    ..kernel_job(&w)
                };
                disk.run(&v).map_err(|e| format!("read-back: {e}"))?;
                settle();
            }
            Ok(())
        });
        res.record(&format!("{}-{}", o.policy, w.name), r);
    }
    mark("end");
}

// ------------------------------------------------------------------ negative tests

/// Waits for faults of `BLK_ENDPOINT`; also returns whether the request completed.
fn collect_faults(
    rig: &Rig,
    blk: &mut Blk,
    want_completion: bool,
) -> (Vec<FaultRecord>, Option<u8>) {
    let start = Instant::now();
    let mut status = None;
    let mut faults = Vec::new();
    while start.elapsed() < FAULT_WAIT
        || (want_completion && status.is_none() && start.elapsed() < IO_TIMEOUT)
    {
        rig.poll_events();
        faults.extend(rig.take_faults());
        if status.is_none() {
            status = blk.poll().map(|c| c.status);
        }
        // Faults and completion both in: one more poll for stragglers, then stop.
        if status.is_some() && !faults.is_empty() && start.elapsed() > Duration::from_millis(200) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rig.poll_events();
    faults.extend(rig.take_faults());
    (faults, status)
}

fn describe(f: &[FaultRecord]) -> String {
    let first = f.first().map(|r| format!("{r:?}")).unwrap_or_default();
    format!("{} records, first {first}", f.len())
}

/// Checks that every fault of `BLK_ENDPOINT` in `faults` has reason
/// MAPPING, the flags in `want`, and an address in `[iova, iova+len)`.
fn check_mapping_faults(
    faults: &[FaultRecord],
    iova: u64,
    len: u64,
    want: u32,
) -> Result<usize, String> {
    let mine: Vec<_> = faults.iter().filter(|f| f.endpoint == BLK_ENDPOINT).collect();
    if mine.is_empty() {
        return Err(format!(
            "no fault record for endpoint {BLK_ENDPOINT:#x} ({})",
            describe(faults)
        ));
    }
    for f in &mine {
        let in_range = f.address.is_some_and(|a| (iova..iova + len).contains(&a));
        if f.reason != fault::R_MAPPING || f.flags & want != want || !in_range {
            return Err(format!("unexpected fault {f:?}"));
        }
    }
    Ok(mine.len())
}

/// Device accesses through an IOVA nothing maps. The IOVA is chosen equal
/// to the physical address of a buffer, so that a DMA which escaped
/// translation would land in (or come from) that buffer.
/// - blk READ (the device writes memory): faults MAPPING, the buffer
///   keeps its poison;
/// - blk WRITE (the device reads memory): faults MAPPING, and none of the
///   buffer's data reaches the disk (QEMU writes zeros there).
fn neg_unmapped(rig: &Rig, blk: &mut Blk, m: &mut dyn Mapper) -> Result<(), String> {
    let domain = rig.domain.clone().ok_or("no domain")?;
    let len = 4096u64;
    let b = rig.hal.dma_alloc(1).ok_or("no memory")?;
    let r = (|| -> Result<(), String> {
        let iova = b.bus_addr;
        if domain.iova_to_phys(iova).is_some() {
            return Err(format!("IOVA {iova:#x} is mapped: pick another"));
        }
        // Device writes memory.
        rig.take_faults();
        with_buf_mut(&b, len as usize, |s| s.fill(0xa5));
        blk.submit(BlkOp::Read, READ_BASE, &[(iova, len as u32)]).map_err(|e| e.to_string())?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        // QEMU reports a missing mapping with ADDRESS only, read or write.
        let n = check_mapping_faults(&faults, iova, len, fault::F_ADDRESS)
            .map_err(|e| format!("device write: {e}"))?;
        if bytes_of(&b, len as usize).iter().any(|&x| x != 0xa5) {
            return Err("device write through an unmapped IOVA reached memory".into());
        }
        println!("VG INFO unmapped, device write: {n} fault records, blk status {status:?}");
        // Device reads memory.
        let off = WRITE_BASE + (60 << 20);
        let old = pattern::DISK_TAG ^ 0x0eee;
        let secret = pattern::DISK_TAG ^ 0x5ec7;
        write_region(rig, blk, m, off, len as usize, old)?;
        with_buf_mut(&b, len as usize, |s| pattern::fill(s, off, secret));
        rig.take_faults();
        blk.submit(BlkOp::Write, off, &[(iova, len as u32)]).map_err(|e| e.to_string())?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        let n = check_mapping_faults(&faults, iova, len, fault::F_ADDRESS)
            .map_err(|e| format!("device read: {e}"))?;
        println!("VG INFO unmapped, device read: {n} fault records, blk status {status:?}");
        read_region_into(rig, blk, m, off, &b)?;
        let leaked = bytes_of(&b, len as usize).chunks_exact(8).enumerate().any(|(i, w)| {
            u64::from_le_bytes(w.try_into().expect("8 bytes"))
                == pattern::word(off + i as u64 * 8, secret)
        });
        if leaked {
            return Err("data from memory behind an unmapped IOVA reached the disk".into());
        }
        Ok(())
    })();
    // SAFETY: the device never had a mapping of this buffer.
    unsafe { rig.hal.dma_dealloc(b) };
    r
}

/// Reads 4 KiB at `off` into `b` through a proper mapping.
fn read_region_into(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    off: u64,
    b: &DmaRegion,
) -> Result<(), String> {
    let mapped =
        m.map_round(&[RoundBuf { segs: vec![(b.bus_addr, 4096)], device_writes: true }])?;
    blk.submit(BlkOp::Read, off, &mapped[0].descs).map_err(|e| e.to_string())?;
    blk.kick();
    let (_, status) = collect_faults(rig, blk, true);
    m.complete(mapped[0].handle)?;
    m.flush()?;
    match status {
        Some(S_OK) => Ok(()),
        s => Err(format!("read-back status {s:?}")),
    }
}

fn write_region(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    off: u64,
    len: usize,
    tag: u64,
) -> Result<(), String> {
    let w = Workload {
        name: "prep".into(),
        op: BlkOp::Write,
        size: len,
        scattered: false,
        qd: 1,
        bytes: len as u64,
        base: off,
        tag,
    };
    run_workload(rig, blk, m, &w).map(|_| ())
}

/// A blk READ into a buffer mapped read-only: faults MAPPING with WRITE,
/// and the buffer keeps its poison.
fn neg_read_only(rig: &Rig, blk: &mut Blk) -> Result<(), String> {
    rig.take_faults();
    let domain = rig.domain.clone().ok_or("no domain")?;
    let buf = rig.hal.dma_alloc(1).ok_or("no memory")?;
    with_buf_mut(&buf, 4096, |s| s.fill(0xa5));
    let len = 4096u64;
    domain.map_pages(NEG_RO_IOVA, buf.bus_addr, len, Prot::READ).map_err(|e| e.to_string())?;
    domain.iotlb_sync_map(NEG_RO_IOVA, len).map_err(|e| e.to_string())?;
    let r = (|| -> Result<(), String> {
        blk.submit(BlkOp::Read, READ_BASE, &[(NEG_RO_IOVA, len as u32)])
            .map_err(|e| e.to_string())?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        let n = check_mapping_faults(&faults, NEG_RO_IOVA, len, fault::F_ADDRESS | fault::F_WRITE)?;
        if bytes_of(&buf, 4096).iter().any(|&b| b != 0xa5) {
            return Err("the device wrote through a read-only mapping".into());
        }
        println!("VG INFO read-only: {n} fault records, blk status {status:?}");
        Ok(())
    })();
    let u = domain.unmap_pages(NEG_RO_IOVA, len).and_then(|_| domain.iotlb_sync());
    // SAFETY: unmapped and no request in flight on it.
    unsafe { rig.hal.dma_dealloc(buf) };
    r?;
    u.map_err(|e| e.to_string())
}

/// Detaches the endpoint (bypass is 0) and restarts virtio-blk with rings
/// and buffer at IOVA = physical address, so that any DMA that escaped the
/// IOMMU would work and move data. Nothing must complete, data must not
/// move, and faults must arrive.
fn neg_unattached(rig: &Rig, blk: Blk) -> Result<(), String> {
    let iommu = rig.iommu.as_ref().ok_or("no iommu")?;
    drop(blk); // resets the device
    iommu.detach(BLK_ENDPOINT).map_err(|e| e.to_string())?;
    rig.take_faults();
    let t = PciTransport::open(BLK_BDF).map_err(|e| e.to_string())?;
    let hal = Arc::new(rig.hal.clone());
    let mut blk = VirtioBlk::new(t, hal, 64, |r| Ok(r.bus_addr)).map_err(|e| e.to_string())?;
    let buf = rig.hal.dma_alloc(1).ok_or("no memory")?;
    with_buf_mut(&buf, 4096, |s| s.fill(0xa5));
    blk.submit(BlkOp::Read, READ_BASE, &[(buf.bus_addr, 4096)]).map_err(|e| e.to_string())?;
    blk.kick();
    let (faults, status) = collect_faults(rig, &mut blk, false);
    let moved = bytes_of(&buf, 4096).iter().any(|&b| b != 0xa5);
    drop(blk);
    // SAFETY: the device is reset and never saw a mapping of this buffer.
    unsafe { rig.hal.dma_dealloc(buf) };
    let mine: Vec<_> = faults.iter().filter(|f| f.endpoint == BLK_ENDPOINT).collect();
    if status.is_some() {
        return Err(format!(
            "request completed (status {status:?}) though the endpoint is unattached"
        ));
    }
    if moved {
        return Err("data moved to an unattached endpoint's buffer".into());
    }
    if mine.is_empty() {
        return Err(format!("no fault record ({})", describe(&faults)));
    }
    if let Some(f) =
        mine.iter().find(|f| f.reason != fault::R_UNKNOWN && f.reason != fault::R_DOMAIN)
    {
        return Err(format!("unexpected fault reason {f:?}"));
    }
    println!("VG INFO unattached: {} fault records, first {:?}", mine.len(), mine[0]);
    Ok(())
}

// ------------------------------------------------------------------ main

fn setup(o: &Opts, res: &mut Results) -> Result<(Rig, Blk, Box<dyn Mapper>), String> {
    let hal = HugePageHal::new(60).map_err(|e| e.to_string())?;
    let faults: FaultLog = Arc::default();
    let t = PciTransport::open(IOMMU_BDF).map_err(|e| e.to_string())?;
    let marker = t.marker(Config::BYPASS_OFFSET).ok_or("virtio-iommu has no device config")?;
    if o.policy == "bypass" {
        // No IOMMU driver: boot-bypass lets the endpoint reach memory directly.
        drop(t);
        let rig = Rig { hal: hal.clone(), marker, iommu: None, domain: None, faults };
        let blk = VirtioBlk::new(
            PciTransport::open(BLK_BDF).map_err(|e| e.to_string())?,
            Arc::new(hal),
            BLK_QUEUE_SIZE,
            |r| Ok(r.bus_addr),
        )
        .map_err(|e| e.to_string())?;
        return Ok((rig, blk, Box::new(IdentityMapper)));
    }
    let opts = DriverOptions { event_buffers: 256, ..DriverOptions::default() };
    let iommu = VirtioIommu::new(t, hal.clone(), opts).map_err(|e| e.to_string())?;
    let log = faults.clone();
    iommu.set_fault_handler(Some(Box::new(move |f| log.lock().expect("fault log").push(f))));
    let info = iommu.info();
    println!(
        "VG INFO iommu features={:#x} page_size_mask={:#x} input_range={:x?} queues={:?}",
        info.features, info.page_size_mask, info.input_range, info.queue_sizes
    );
    let resv = iommu.probe_endpoint(BLK_ENDPOINT).map_err(|e| e.to_string());
    res.record(
        "probe-msi-region",
        resv.and_then(|r| {
            r.iter()
                .any(|r| {
                    r.kind == viommu_driver::ResvKind::Msi
                        && r.start == 0xfee0_0000
                        && r.end == 0xfeef_ffff
                })
                .then_some(())
                .ok_or(format!("no MSI region [0xfee00000, 0xfeefffff] in {r:?}"))
        }),
    );
    let domain = iommu.alloc_paging(BLK_ENDPOINT).map_err(|e| e.to_string())?;
    iommu.attach(&domain, BLK_ENDPOINT).map_err(|e| e.to_string())?;
    let mut m = DmaMapper::new(&iommu, domain.clone(), BLK_ENDPOINT, &o.policy)?;
    let rig = Rig { hal: hal.clone(), marker, iommu: Some(iommu), domain: Some(domain), faults };
    let blk = VirtioBlk::new(
        PciTransport::open(BLK_BDF).map_err(|e| e.to_string())?,
        Arc::new(hal),
        BLK_QUEUE_SIZE,
        |r| m.map_coherent(r.bus_addr, r.pages * PAGE_SIZE).map_err(viommu_guest::Error::Driver),
    )
    .map_err(|e| e.to_string())?;
    Ok((rig, blk, Box::new(m)))
}

fn run() -> Results {
    let mut res = Results::default();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let o = match Opts::from_cmdline(&cmdline) {
        Ok(o) => o,
        Err(e) => {
            res.record("options", Err(e));
            return res;
        }
    };
    println!("VG INFO options {o:?}");
    if o.policy.starts_with("linux-") {
        run_kernel(&o, &mut res);
        return res;
    }
    let (rig, mut blk, mut m) = match setup(&o, &mut res) {
        Ok(v) => v,
        Err(e) => {
            res.record(&format!("{}-setup", o.policy), Err(e));
            return res;
        }
    };
    res.record(
        "blk-capacity",
        (blk.capacity() == DISK_MIB << 20)
            .then_some(())
            .ok_or(format!("capacity {} bytes", blk.capacity())),
    );
    run_workloads(&rig, &mut blk, m.as_mut(), &o, &mut res);
    if o.neg && rig.iommu.is_some() {
        res.record("neg-unmapped-iova", neg_unmapped(&rig, &mut blk, m.as_mut()));
        res.record("neg-read-only-mapping", neg_read_only(&rig, &mut blk));
        // Last: it leaves the endpoint detached.
        res.record("neg-unattached-endpoint", neg_unattached(&rig, blk));
    }
    res
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("gen-disk") if args.len() == 3 => {
            if let Err(e) = gen_disk(&args[2]) {
                eprintln!("gen-disk: {e}");
                std::process::exit(1);
            }
        }
        Some("run") => {
            let res = run();
            println!("VG DONE passed={} failed={}", res.passed, res.failed);
            std::process::exit(if res.failed == 0 { 0 } else { 1 });
        }
        _ => {
            eprintln!("usage: viommu-guest gen-disk FILE | run");
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_from_the_kernel_command_line() {
        let o = Opts::from_cmdline(
            "console=ttyS0 quiet vg.policy=lazy-batch vg.mib=8 vg.neg=0 vg.sizes=4k,1m vg.qds=32 vg.merges=1",
        )
        .unwrap();
        assert_eq!((o.policy.as_str(), o.mib, o.neg, o.sg), ("lazy-batch", 8, false, true));
        assert_eq!((o.sizes, o.qds, o.merges), (vec![4096, 1 << 20], vec![32], true));
        assert!(!Opts::from_cmdline("").unwrap().merges);
        assert!(Opts::from_cmdline("vg.mib=65").is_err(), "the write region is 64 MiB");
        assert!(Opts::from_cmdline("vg.sizes=4x").is_err());
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("512"), Some(512));
    }

    #[test]
    fn plan_is_the_same_matrix_for_every_policy_but_bypass() {
        let o = Opts::from_cmdline("vg.policy=linux-lazy vg.mib=16").unwrap();
        let p = plan(&o, 1024);
        let names: Vec<&str> = p.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names.len(), 20);
        assert_eq!(
            names[..5],
            ["read-4k-qd1", "read-4k-qd32", "read-64k-qd1", "read-64k-qd32", "read-64k-sg-qd1"]
        );
        assert_eq!(names[19], "write-1m-sg-qd32");
        // Reads check the host's pattern; each write its own tag (the 1-based
        // index of the workload, mixed with the policy's hash).
        assert!(p[..10].iter().all(|w| w.op == BlkOp::Read && w.tag == pattern::DISK_TAG));
        assert_eq!(p[10].tag ^ p[11].tag, 11 ^ 12);
        assert!(p.iter().all(|w| w.bytes == 16 << 20));
        let other = plan(&Opts::from_cmdline("vg.policy=lazy vg.mib=16").unwrap(), 1024);
        assert_eq!(other.len(), 20);
        assert_ne!(other[10].tag, p[10].tag, "a tag per boot");
        // Without an IOMMU, scattered 1 MiB (258 descriptors) needs a ring that holds it.
        let b = plan(&Opts::from_cmdline("vg.policy=bypass").unwrap(), 256);
        assert_eq!(b.len(), 16);
        assert!(!b.iter().any(|w| w.name.contains("1m-sg")));
    }

    #[test]
    fn scattered_buffers_use_every_other_page() {
        let r = DmaRegion { bus_addr: 0x20_0000, vaddr: std::ptr::NonNull::dangling(), pages: 32 };
        let mut w = Workload {
            name: String::new(),
            op: BlkOp::Read,
            size: 64 << 10,
            scattered: true,
            qd: 1,
            bytes: 0,
            base: 0,
            tag: 0,
        };
        let segs = segments(&r, &w);
        assert_eq!(segs.len(), 16);
        assert_eq!(segs[1], (0x20_2000, 4096));
        assert_eq!(segs[15].0 + 4096, 0x20_0000 + 32 * 4096 - 4096);
        w.scattered = false;
        assert_eq!(segments(&r, &w), [(0x20_0000, 64 << 10)]);
    }
}
