//! The workload matrix and the buffers a workload moves data through.

use viommu_driver::hal::{DmaBuffer, DmaRegion, Hal, PAGE_SIZE};
use viommu_guest::blk::BlkOp;
use viommu_guest::kernel_io::Job;
use viommu_guest::pattern;

use crate::opts::Opts;
use crate::{READ_BASE, WRITE_BASE};

/// One workload: a named [`Job`], the same for our drivers and Linux's.
#[derive(Debug)]
pub struct Workload {
    pub name: String,
    /// What it moves: read or write, sizes, queue depth, place and pattern.
    /// Scattered: every 4 KiB page of a request's buffer is physically apart
    /// (as in the Linux baseline); otherwise buffers are contiguous.
    pub job: Job,
}

impl Workload {
    /// A helper workload of one contiguous buffer size (verify, prepare).
    pub fn plain(
        name: &str,
        op: BlkOp,
        size: usize,
        qd: usize,
        base: u64,
        bytes: u64,
        tag: u64,
    ) -> Self {
        let write = op == BlkOp::Write;
        let job = Job { write, size, scattered: false, qd, bytes, base, tag };
        Workload { name: name.into(), job }
    }

    /// Read or write.
    pub fn op(&self) -> BlkOp {
        if self.job.write {
            BlkOp::Write
        } else {
            BlkOp::Read
        }
    }

    /// 4 KiB pages of one request's buffer (scattered: twice, every other used).
    pub fn buffer_pages(&self) -> usize {
        self.job.size.div_ceil(PAGE_SIZE) * if self.job.scattered { 2 } else { 1 }
    }
}

/// How long the guest idles after asking the host for a CPU sample, so
/// that the sample lands while the guest does nothing.
const SAMPLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(50);

/// Asks the host for a sample of QEMU's CPU time (`viommu sample-cpu`),
/// then idles for [`SAMPLE_PAUSE`].
fn host_cpu_sample() {
    println!("VG SAMPLE");
    std::thread::sleep(SAMPLE_PAUSE);
}

/// Steps of the calibration loop: about 70 ms under TCG on an idle host,
/// long enough that QEMU's idle work in the sample pause is a few percent.
const CALIBRATION_STEPS: u64 = 1 << 24;

/// A fixed piece of guest work (loads, stores and arithmetic over 64 KiB),
/// timed on the guest's clock: how fast this guest runs right now. Under
/// TCG that moves with the host's speed, which drifts by tens of percent
/// over a minute even on an idle host (docs/real-guest.md, "Noise").
fn calibrate() -> f64 {
    let mut table = vec![0u64; 8192];
    // Untimed: page faults on the table and TCG translating the loop.
    let warm = calibration_steps(&mut table, CALIBRATION_STEPS / 64);
    let t0 = std::time::Instant::now();
    let x = calibration_steps(&mut table, CALIBRATION_STEPS);
    let secs = t0.elapsed().as_secs_f64();
    std::hint::black_box((warm, x, &table));
    secs
}

fn calibration_steps(table: &mut [u64], steps: u64) -> u64 {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..steps {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % table.len() as u64) as usize;
        table[i] = table[i].wrapping_add(x);
    }
    x
}

/// Runs one workload between host CPU samples: a sample, the calibration,
/// a sample, the workload, a sample. `viommu sample-cpu` adds to the next
/// `VG PERF` line the CPU of the last window (`host_cpu_ns`) and of the
/// calibration (`calib_cpu_ns`); the guest prints the calibration's own
/// time as `calib_secs`. Ours and Linux's workloads alike. Without `cpu`
/// (`vg.cpu=0`), the workload alone, and a calibration of 0.
pub fn measured<T>(cpu: bool, run: impl FnOnce() -> T) -> (T, f64) {
    if !cpu {
        return (run(), 0.0);
    }
    host_cpu_sample();
    let calib = calibrate();
    host_cpu_sample();
    let r = run();
    host_cpu_sample();
    (r, calib)
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
/// `ring` is the virtio-blk ring size.
pub fn plan(o: &Opts, ring: usize) -> Vec<Workload> {
    let bytes = o.mib << 20;
    let boot_tag = o
        .policy
        .name()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut out = Vec::new();
    for op in [BlkOp::Read, BlkOp::Write] {
        let variants = o.sizes.iter().flat_map(|&size| {
            // Without an IOMMU a scattered buffer is one descriptor per page
            // (we have no indirect descriptors): it must fit in the ring, and
            // the queue depth is cut to what fits (3 at 1 MiB in 1024 entries).
            let fits = !o.policy.unmapped() || size / PAGE_SIZE + 2 <= ring;
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
                let write = op == BlkOp::Write;
                let job = Job { write, size, scattered, qd, bytes, base, tag };
                out.push(Workload { name, job });
            }
        }
    }
    out
}

/// MiB/s.
pub fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
}

/// `len` bytes at offset `at` of a buffer, read while no request uses it.
pub fn bytes_at<H: Hal>(r: &DmaBuffer<H>, at: usize, len: usize) -> &[u8] {
    // SAFETY: the device touches the buffer only while a request is in
    // flight, and we read it only when none is.
    unsafe { r.as_slice(at, len) }
}

/// Runs `f` on `len` bytes at offset `at` of a buffer no request uses.
pub fn with_bytes_mut<H: Hal, R>(
    r: &mut DmaBuffer<H>,
    at: usize,
    len: usize,
    f: impl FnOnce(&mut [u8]) -> R,
) -> R {
    // SAFETY: as in `bytes_at`; the slice does not outlive this call.
    f(unsafe { r.as_mut_slice(at, len) })
}

/// The physical segments of a workload buffer: one run, or (scattered)
/// every other 4 KiB page.
pub fn segments(r: &DmaRegion, w: &Workload) -> Vec<(u64, usize)> {
    if !w.job.scattered {
        return vec![(r.bus_addr, w.job.size)];
    }
    (0..w.job.size / PAGE_SIZE)
        .map(|i| (r.bus_addr + (2 * i * PAGE_SIZE) as u64, PAGE_SIZE))
        .collect()
}

/// Byte offsets in the buffer of each segment, with the length.
fn segment_offsets(r: &DmaRegion, w: &Workload) -> impl Iterator<Item = (usize, usize)> {
    let base = r.bus_addr;
    segments(r, w).into_iter().map(move |(p, l)| ((p - base) as usize, l))
}

/// Fills a buffer with the pattern of disk offset `off`.
pub fn fill_buf<H: Hal>(r: &mut DmaBuffer<H>, w: &Workload, off: u64) {
    let mut disk = off;
    for (at, len) in segment_offsets(r.region(), w) {
        with_bytes_mut(r, at, len, |s| pattern::fill(s, disk, w.job.tag));
        disk += len as u64;
    }
}

/// Checks a buffer against the pattern of disk offset `off`.
pub fn check_buf<H: Hal>(r: &DmaBuffer<H>, w: &Workload, off: u64) -> Result<(), String> {
    let mut disk = off;
    for (at, len) in segment_offsets(r.region(), w) {
        pattern::check(bytes_at(r, at, len), disk, w.job.tag)
            .map_err(|bad| format!("wrong data at disk offset {bad:#x}"))?;
        disk += len as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::opts::Opts;

    #[test]
    fn plan_is_the_same_matrix_for_every_policy_but_identity() {
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
        assert!(p[..10].iter().all(|w| w.op() == BlkOp::Read && w.job.tag == pattern::DISK_TAG));
        assert_eq!(p[10].job.tag ^ p[11].job.tag, 11 ^ 12);
        assert!(p.iter().all(|w| w.job.bytes == 16 << 20));
        let other = plan(&Opts::from_cmdline("vg.policy=lazy vg.mib=16").unwrap(), 1024);
        assert_eq!(other.len(), 20);
        assert_ne!(other[10].job.tag, p[10].job.tag, "a tag per boot");
        // Without an IOMMU, scattered 1 MiB (258 descriptors) needs a ring that holds it.
        let b = plan(&Opts::from_cmdline("vg.policy=identity").unwrap(), 256);
        assert_eq!(b.len(), 16);
        assert!(!b.iter().any(|w| w.name.contains("1m-sg")));
        assert_eq!(plan(&Opts::from_cmdline("vg.policy=strict").unwrap(), 256).len(), 20);
    }

    #[test]
    fn scattered_buffers_use_every_other_page() {
        let r = DmaRegion { bus_addr: 0x20_0000, vaddr: std::ptr::NonNull::dangling(), pages: 32 };
        let mut w = Workload::plain("", BlkOp::Read, 64 << 10, 1, 0, 0, 0);
        w.job.scattered = true;
        assert_eq!(w.buffer_pages(), 32);
        let segs = segments(&r, &w);
        assert_eq!(segs.len(), 16);
        assert_eq!(segs[1], (0x20_2000, 4096));
        assert_eq!(segs[15].0 + 4096, 0x20_0000 + 32 * 4096 - 4096);
        w.job.scattered = false;
        assert_eq!(segments(&r, &w), [(0x20_0000, 64 << 10)]);
        assert_eq!(w.buffer_pages(), 16);
    }
}
