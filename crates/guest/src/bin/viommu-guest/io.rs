//! Running a workload through our virtio-blk driver and a [`Mapper`]:
//! rounds of requests, one kick per round, completions by polling.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use viommu_driver::hal::{DmaBuffer, Hal};
use viommu_driver::{CounterSnapshot, Transport};
use viommu_guest::blk::{BlkOp, S_OK};
use viommu_guest::mapper::{Mapper, RoundBuf};

use crate::outcome::{Outcome, Results};
use crate::rig::Rig;
use crate::workload::{check_buf, fill_buf, mbps, measured, plan, segments, Workload};
use crate::{Blk, Opts, IO_TIMEOUT};

/// What a workload cost.
pub struct Perf {
    pub secs: f64,
    /// Of `secs`, the time spent in the DMA layer.
    pub dma_secs: f64,
    pub ios: u64,
    pub counts: CounterSnapshot,
    pub blk_kicks: u64,
    /// Interrupts taken, virtio-iommu and virtio-blk (0 when polling).
    pub irqs: u64,
}

/// Runs a workload; data is filled (writes) and checked (reads) outside
/// the timed part.
pub fn run_workload(rig: &Rig, blk: &mut Blk, m: &mut dyn Mapper, w: &Workload) -> Outcome<Perf> {
    let mut bufs = Vec::with_capacity(w.job.qd);
    for _ in 0..w.job.qd {
        let b = DmaBuffer::new(&rig.hal, w.buffer_pages());
        bufs.push(b.ok_or("out of hugetlb memory for buffers")?);
    }
    let result = run_on(rig, blk, m, w, &mut bufs);
    if result.is_err() {
        drain(blk);
    }
    // The buffers are freed here: no request is in flight (the run finished
    // or the device is wedged, in which case the suite ends right after).
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

/// A request in flight: its buffer, mapping handle and disk offset.
type Inflight = (usize, u64, u64);

/// The I/O loop of a workload over buffers `bufs`.
fn run_on<H: Hal>(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    w: &Workload,
    bufs: &mut [DmaBuffer<H>],
) -> Outcome<Perf> {
    let n = w.job.bytes / w.job.size as u64;
    let write = w.op() == BlkOp::Write;
    let mut free: Vec<usize> = (0..bufs.len()).rev().collect();
    let mut inflight: HashMap<u16, Inflight> = HashMap::new();
    let (mut next, mut done) = (0u64, 0u64);
    let mut untimed = Duration::ZERO;
    // Time inside the DMA layer (map, unmap, flush), syncs included.
    let mut in_dma = Duration::ZERO;
    let blk_kicks0 = blk.kicks();
    let irqs0 = rig.interrupts();
    rig.mark(&w.name);
    let before = m.counts();
    let t0 = Instant::now();
    let mut round = Vec::with_capacity(w.job.qd);
    while done < n {
        // Completions first, then one round of new requests and one kick.
        while let Some(c) = blk.poll() {
            let (b, handle, off) = inflight.remove(&c.tag).ok_or("completion with unknown tag")?;
            if c.status != S_OK {
                return Err(format!("request at {off:#x} failed with status {}", c.status).into());
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
        let per_req = m.max_descs(segments(bufs[0].region(), w).len()) + 2;
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
                    fill_buf(&mut bufs[b], w, w.job.base + (next + i as u64) * w.job.size as u64);
                }
                untimed += t.elapsed();
            }
            let rb: Vec<_> = round
                .iter()
                .map(|&b| RoundBuf { segs: segments(bufs[b].region(), w), device_writes: !write })
                .collect();
            let t = Instant::now();
            let mapped = m.map_round(&rb)?;
            in_dma += t.elapsed();
            for (&b, mp) in round.iter().zip(mapped) {
                let off = w.job.base + next * w.job.size as u64;
                let tag = blk.submit(w.op(), off, &mp.descs)?;
                inflight.insert(tag, (b, mp.handle, off));
                next += 1;
            }
            blk.kick();
        }
        if done < n {
            wait_used(blk, done, n)?;
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
        irqs: rig.interrupts() - irqs0,
    })
}

/// Waits for at least one completion before the next round: spins, or
/// blocks on the interrupt when the boot takes interrupts.
fn wait_used(blk: &mut Blk, done: u64, n: u64) -> Outcome {
    let start = Instant::now();
    while !blk.has_used() {
        if start.elapsed() > IO_TIMEOUT {
            return Err(format!("no completion within {IO_TIMEOUT:?} ({done}/{n} done)").into());
        }
        blk.transport_mut().wait_for_used(0);
    }
    Ok(())
}

/// Reads `[base, base+bytes)` back with 1 MiB requests at QD32 and checks it against `tag`.
pub fn verify_region(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    base: u64,
    bytes: u64,
    tag: u64,
) -> Outcome {
    let size = (1usize << 20).min(bytes as usize);
    let w = Workload::plain("verify", BlkOp::Read, size, 32, base, bytes, tag);
    run_workload(rig, blk, m, &w).map(|_| ())
}

/// Writes `len` bytes of pattern `tag` at `off`, with one request.
pub fn write_region(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    off: u64,
    len: usize,
    tag: u64,
) -> Outcome {
    let w = Workload::plain("prep", BlkOp::Write, len, 1, off, len as u64, tag);
    run_workload(rig, blk, m, &w).map(|_| ())
}

/// The boot's workload matrix, each a test: its data checked, and its
/// counters printed as `VG PERF` for the host's trace check. Writes are
/// read back and checked.
pub fn run_workloads(rig: &Rig, blk: &mut Blk, m: &mut dyn Mapper, o: &Opts, res: &mut Results) {
    for w in plan(o, blk.queue_size() as usize) {
        let (r, calib) = measured(o.cpu, || run_workload(rig, blk, m, &w));
        let r = r.and_then(|p| {
            let c = p.counts;
            println!(
                "VG PERF {} ios={} reqs={} bytes={} secs={:.3} dma_secs={:.3} mbps={:.1} map={} unmap={} attach={} kicks={} syncs={} blk_kicks={} irqs={} calib_secs={calib:.6}",
                w.name, p.ios, p.ios, w.job.bytes, p.secs, p.dma_secs, mbps(w.job.bytes, p.secs), c.map, c.unmap, c.attach, c.kicks, c.syncs, p.blk_kicks, p.irqs
            );
            if w.op() == BlkOp::Write {
                rig.mark(&format!("verify-{}", w.name));
                verify_region(rig, blk, m, w.job.base, w.job.bytes, w.job.tag)?;
            }
            Ok(())
        });
        res.record(&format!("{}-{}", o.policy, w.name), r);
    }
    rig.mark("end");
}
