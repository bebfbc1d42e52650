//! The hand-built virtio-blk path through our batch API: every buffer of
//! one I/O (header, data, status) mapped in one `DmaBatch`, so one sync and
//! one kick of the IOMMU per I/O; under `best` (lazy + batch + coalescing)
//! the UNMAPs ride on later kicks.

use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;

use viommu_baremetal::blk::{BlkQueue, Request, HEADER_LEN, S_OK};
use viommu_baremetal::pattern;
use viommu_baremetal::virtio_pci::PciTransport;
use viommu_driver::dma::{DmaDirection, DmaDomain};
use viommu_driver::hal::{DmaBuffer, PAGE_SIZE};
use viommu_driver::Mode;

use crate::arch::PhysMmio;
use crate::iommu::Rig;
use crate::memory::HeapHal;
use crate::workload::{print_perf, Perf, Workload};
use crate::Results;

/// Ring entries of the block queue.
const QUEUE_SIZE: u16 = 256;
/// How long one request may take.
const IO_TIMEOUT_NS: u64 = 5_000_000_000;
/// Polls of one wait, whatever the clock says.
const MAX_SPINS: u64 = 200_000_000;

/// Runs `workloads` on the blk device behind `rig`'s domain under `mode`,
/// then (if `negative`) the negative test.
pub fn run(
    rig: &Rig,
    transport: PciTransport<PhysMmio>,
    mode: Mode,
    workloads: &[Workload],
    negative: bool,
    res: &mut Results,
) -> Result<(), String> {
    let dma = rig.dma(mode)?;
    // The ring is mapped once, for the device's lifetime.
    let mut ring = None;
    let mut blk = BlkQueue::new(transport, Arc::new(HeapHal), QUEUE_SIZE, |r| {
        let len = r.pages * PAGE_SIZE;
        let iova = dma.map_single(r.bus_addr, len, DmaDirection::Bidirectional).ok()?;
        ring = Some((iova, len));
        Some(iova)
    })
    .map_err(|e| format!("virtio-blk: {e:?}"))?;
    crate::println!("VG INFO batch blk capacity={} MiB mode={}", blk.capacity() >> 20, mode.name());
    for w in workloads {
        let r = run_one(rig, &dma, &mut blk, w).map(|p| print_perf(w, &p));
        let r = r.and_then(|()| {
            if !w.write {
                return Ok(());
            }
            let v = w.verify();
            run_one(rig, &dma, &mut blk, &v).map(|p| print_perf(&v, &p))
        });
        res.record(&format!("{}-{}", mode.name(), w.name), r);
    }
    if negative {
        rig.mark("neg-unmapped-iova");
        res.record("neg-unmapped-iova", neg_unmapped_iova(rig, &dma, &mut blk));
    }
    // Its own trace segment, with no PERF line: the teardown's UNMAPs are
    // no workload's.
    rig.mark("batch-teardown");
    // The device is reset first (the drop), so it no longer reads the
    // ring; then the ring's mapping goes, and the domain is left as found
    // for the next DMA layer on it.
    drop(blk);
    if let Some((iova, len)) = ring {
        dma.unmap_single(iova, len, DmaDirection::Bidirectional)
            .map_err(|e| format!("unmap ring: {e}"))?;
    }
    dma.flush().map_err(|e| format!("flush: {e}"))?;
    Ok(())
}

/// Waits for one completion, at most 5 s by the clock and a spin bound
/// (in case the clock stands still).
fn wait_used(rig: &Rig, blk: &mut BlkQueue<PciTransport<PhysMmio>, HeapHal>) -> Result<(), String> {
    let start = rig.clock.now_ns();
    for _ in 0..MAX_SPINS {
        if blk.poll().is_some() {
            return Ok(());
        }
        if rig.clock.now_ns() - start > IO_TIMEOUT_NS {
            break;
        }
        core::hint::spin_loop();
    }
    Err(String::from("no completion within 5 s"))
}

/// A blk READ whose data buffer is an IOVA nothing maps: the IOVA equals
/// the physical address of a poisoned page, so a DMA that escaped
/// translation would overwrite it. The device must fault (endpoint of the
/// blk function, reason MAPPING, addresses inside the page) and the page
/// keep its poison. (QEMU still completes the request with status OK.)
fn neg_unmapped_iova(
    rig: &Rig,
    dma: &DmaDomain,
    blk: &mut BlkQueue<PciTransport<PhysMmio>, HeapHal>,
) -> Result<(), String> {
    let mut slot = DmaBuffer::new(HeapHal, 1).ok_or("no memory for the header")?;
    let mut poison = DmaBuffer::new(HeapHal, 1).ok_or("no memory for the page")?;
    poison.fill(0, PAGE_SIZE, 0x5a);
    let iova = poison.paddr();
    if rig.domain.iova_to_phys(iova).is_some() {
        return Err(format!("IOVA {iova:#x} is mapped"));
    }
    let before = rig.take_faults(0);
    let req = Request::at(false, 0).map_err(|e| format!("{e:?}"))?;
    slot.write(0, &req.header());
    slot.write(HEADER_LEN, &[0xff]);
    let mut b = dma.begin();
    let map_err = |e| format!("map: {e}");
    let header = b.map(slot.paddr(), HEADER_LEN, DmaDirection::ToDevice).map_err(map_err)?;
    let status =
        b.map(slot.paddr() + HEADER_LEN as u64, 1, DmaDirection::FromDevice).map_err(map_err)?;
    let mapping = b.commit().map_err(|e| format!("commit: {e}"))?;
    blk.submit(&req, header, &[(iova, PAGE_SIZE as u32)], status).map_err(|e| format!("{e:?}"))?;
    blk.kick();
    let done = wait_used(rig, blk);
    let f = rig.take_faults(2_000_000_000);
    dma.unmap(mapping).map_err(|e| format!("unmap: {e}"))?;
    done?;
    crate::println!(
        "VG INFO neg-unmapped-iova iova={iova:#x} faults={} other={} addresses={:#x}..={:#x}",
        f.count,
        f.other,
        f.range.0,
        f.range.1
    );
    // SAFETY: the request completed: the device is done with the page.
    let intact = unsafe { poison.as_slice(0, PAGE_SIZE) }.iter().all(|&b| b == 0x5a);
    let inside = f.range.0 >= iova && f.range.1 < iova + PAGE_SIZE as u64;
    match (before.count, f.count, f.other, inside, intact) {
        (0, 1.., 0, true, true) => Ok(()),
        _ => Err(format!("faults before {before:?}, after {f:?}, poison intact: {intact}")),
    }
}

/// Most requests per round: 32-byte header+status slots in one page.
const MAX_QD: usize = PAGE_SIZE / SLOT;
/// Bytes of one request's header and status in the slot page.
const SLOT: usize = 32;

/// One workload, in rounds of `w.qd` requests: a round's buffers are
/// mapped in one batch (its headers and statuses share the slot page, so
/// one MAP for all of them) and the round is one kick of the block device;
/// the next round starts when all of it completed. Data are filled and
/// checked outside the timed part.
fn run_one(
    rig: &Rig,
    dma: &DmaDomain,
    blk: &mut BlkQueue<PciTransport<PhysMmio>, HeapHal>,
    w: &Workload,
) -> Result<Perf, String> {
    let clock = &rig.clock;
    let qd = w.qd.clamp(1, MAX_QD);
    // Header at j * SLOT, status at j * SLOT + HEADER_LEN.
    let mut slots = DmaBuffer::new(HeapHal, 1).ok_or("no memory for the headers")?;
    // A scattered buffer takes every other page of twice as many.
    let pages = w.size.div_ceil(PAGE_SIZE);
    let stride = if w.scattered { 2 } else { 1 };
    let mut bufs = Vec::with_capacity(qd);
    for _ in 0..qd {
        bufs.push(DmaBuffer::new(HeapHal, pages * stride).ok_or("no memory for data")?);
    }
    // (offset in a buffer, length) of each physically separate piece.
    let pieces: Vec<(usize, usize)> = if w.scattered {
        (0..pages).map(|p| (p * 2 * PAGE_SIZE, PAGE_SIZE.min(w.size - p * PAGE_SIZE))).collect()
    } else {
        vec![(0, w.size)]
    };
    let data_dir = if w.write { DmaDirection::ToDevice } else { DmaDirection::FromDevice };
    let mut untimed = 0u64;
    let blk_kicks0 = blk.kicks();
    rig.mark(&w.name);
    let before = rig.counters();
    let t0 = clock.now_ns();
    let mut descs: Vec<Vec<(u64, u32)>> =
        (0..qd).map(|_| Vec::with_capacity(pieces.len())).collect();
    let mut first = 0;
    while first < w.count {
        let n = qd.min((w.count - first) as usize);
        let t = clock.now_ns();
        for (j, data) in bufs.iter_mut().take(n).enumerate() {
            let mut disk = w.offset(first + j as u64);
            if w.write {
                for &(o, l) in &pieces {
                    // SAFETY: no request is in flight: the device does not touch the buffer.
                    pattern::fill(unsafe { data.as_mut_slice(o, l) }, disk, w.tag);
                    disk += l as u64;
                }
            }
        }
        untimed += clock.now_ns() - t;
        let mut b = dma.begin();
        let map_err = |e| format!("map: {e}");
        let mut addrs = [(0u64, 0u64); MAX_QD];
        for j in 0..n {
            let req =
                Request::at(w.write, w.offset(first + j as u64)).map_err(|e| format!("{e:?}"))?;
            let at = j * SLOT;
            slots.write(at, &req.header());
            slots.write(at + HEADER_LEN, &[0xff]); // "never written"
            let slot = slots.paddr() + at as u64;
            let header = b.map(slot, HEADER_LEN, DmaDirection::ToDevice).map_err(map_err)?;
            // One IOVA range for the whole list: the device sees one contiguous buffer.
            let segs: Vec<(u64, usize)> =
                pieces.iter().map(|&(o, l)| (bufs[j].paddr() + o as u64, l)).collect();
            descs[j].clear();
            for s in b.map_sg(&segs, data_dir).map_err(map_err)? {
                match descs[j].last_mut() {
                    Some(d) if d.0 + d.1 as u64 == s.addr => d.1 += s.len as u32,
                    _ => descs[j].push((s.addr, s.len as u32)),
                }
            }
            let status =
                b.map(slot + HEADER_LEN as u64, 1, DmaDirection::FromDevice).map_err(map_err)?;
            addrs[j] = (header, status);
        }
        let mapping = b.commit().map_err(|e| format!("commit: {e}"))?;
        for j in 0..n {
            let req =
                Request::at(w.write, w.offset(first + j as u64)).map_err(|e| format!("{e:?}"))?;
            let (header, status) = addrs[j];
            blk.submit(&req, header, &descs[j], status).map_err(|e| format!("{e:?}"))?;
        }
        blk.kick();
        for done in 0..n {
            wait_used(rig, blk)
                .map_err(|e| format!("round at request {first}, {done} of {n} done: {e}"))?;
        }
        for j in 0..n {
            let mut st = [0u8];
            slots.read(j * SLOT + HEADER_LEN, &mut st);
            if st[0] != S_OK {
                return Err(format!(
                    "request at {:#x}: status {}",
                    w.offset(first + j as u64),
                    st[0]
                ));
            }
        }
        dma.unmap(mapping).map_err(|e| format!("unmap: {e}"))?;
        dma.tick().map_err(|e| format!("tick: {e}"))?;
        if !w.write {
            let t = clock.now_ns();
            for (j, data) in bufs.iter().take(n).enumerate() {
                let mut disk = w.offset(first + j as u64);
                for &(o, l) in &pieces {
                    // SAFETY: the request completed: the device is done with the buffer.
                    pattern::check(unsafe { data.as_slice(o, l) }, disk, w.tag)
                        .map_err(|bad| format!("wrong data at disk offset {bad:#x}"))?;
                    disk += l as u64;
                }
            }
            untimed += clock.now_ns() - t;
        }
        first += n as u64;
    }
    dma.flush().map_err(|e| format!("flush: {e}"))?;
    let secs = clock.now_ns().saturating_sub(t0 + untimed) as f64 / 1e9;
    Ok(Perf {
        secs,
        counts: rig.counters().since(&before),
        blk_kicks: Some(blk.kicks() - blk_kicks0),
    })
}
