//! Negative tests (strict boot): the device must not reach memory that is
//! not mapped, or mapped read-only, or reachable only by an unattached
//! endpoint. Each checks the fault records and the data, because the blk
//! status alone claims success: QEMU completes a faulted transfer with OK.

use std::sync::Arc;
use std::time::{Duration, Instant};

use viommu_driver::hal::{DmaBuffer, DmaRegion, PAGE_SIZE};
use viommu_driver::queue::QueueLayout;
use viommu_driver::Transport;
use viommu_driver::{FaultRecord, Prot};
use viommu_guest::blk::{BlkOp, VirtioBlk, S_OK};
use viommu_guest::mapper::{Mapper, RoundBuf};
use viommu_guest::pattern;
use viommu_guest::virtio_pci::PciTransport;
use viommu_proto::fault;

use crate::io::write_region;
use crate::outcome::{Outcome, Results};
use crate::rig::Rig;
use crate::workload::{bytes_at, with_bytes_mut};
use crate::{Blk, BLK_BDF, BLK_ENDPOINT, BLK_QUEUE_SIZE, IO_TIMEOUT, READ_BASE, WRITE_BASE};

/// IOVA for the read-only test: the DMA layer allocates top-down, far above.
const NEG_RO_IOVA: u64 = 0x5000_0000;
/// IOVAs of the ring-crossing check: ring, request headers, data buffer.
const SPLIT_RING_IOVA: u64 = 0x5100_0000;
const SPLIT_SLOTS_IOVA: u64 = 0x5200_0000;
const SPLIT_DATA_IOVA: u64 = 0x5300_0000;
/// What the check fills the page standing in for the ring's with.
const SPLIT_POISON: u8 = 0xee;
/// How long a negative test waits for faults to arrive.
const FAULT_WAIT: Duration = Duration::from_secs(2);

/// Runs the negative tests and the check of QEMU's ring-crossing bug;
/// the last leaves the endpoint detached and `blk` gone.
pub fn run(rig: &Rig, mut blk: Blk, m: &mut dyn Mapper, res: &mut Results) {
    res.record("neg-unmapped-iova", neg_unmapped(rig, &mut blk, m));
    res.record("neg-read-only-mapping", neg_read_only(rig, &mut blk));
    drop(blk); // resets the device: the last two set it up their own way
    res.record("qemu-used-ring-page-split", used_ring_page_split(rig));
    res.record("neg-unattached-endpoint", neg_unattached(rig));
}

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
    faults.extend(drain_faults(rig));
    (faults, status)
}

/// Polls until the event queue gives nothing for a few polls in a row (at
/// most [`FAULT_WAIT`]): poll_events takes a bounded budget of records per
/// call, and the records one test leaves must not land in the next.
fn drain_faults(rig: &Rig) -> Vec<FaultRecord> {
    let start = Instant::now();
    let mut faults = Vec::new();
    let mut quiet = 0;
    while quiet < 3 && start.elapsed() < FAULT_WAIT {
        rig.poll_events();
        let got = rig.take_faults();
        quiet = if got.is_empty() { quiet + 1 } else { 0 };
        faults.extend(got);
        std::thread::sleep(Duration::from_millis(1));
    }
    faults
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
fn neg_unmapped(rig: &Rig, blk: &mut Blk, m: &mut dyn Mapper) -> Outcome {
    let domain = rig.domain.clone().ok_or("no domain")?;
    let len = 4096u64;
    // Freed on return: the device never had a mapping of it.
    let mut b = DmaBuffer::new(&rig.hal, 1).ok_or("no memory")?;
    let r = (|| -> Outcome {
        let iova = b.paddr();
        if domain.iova_to_phys(iova).is_some() {
            return Err(format!("IOVA {iova:#x} is mapped: pick another").into());
        }
        // Device writes memory.
        rig.take_faults();
        with_bytes_mut(&mut b, 0, len as usize, |s| s.fill(0xa5));
        blk.submit(BlkOp::Read, READ_BASE, &[(iova, len as u32)])?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        // QEMU reports a missing mapping with ADDRESS only, read or write.
        let n = check_mapping_faults(&faults, iova, len, fault::F_ADDRESS)
            .map_err(|e| format!("device write: {e}"))?;
        if bytes_at(&b, 0, len as usize).iter().any(|&x| x != 0xa5) {
            return Err("device write through an unmapped IOVA reached memory".into());
        }
        println!("VG INFO unmapped, device write: {n} fault records, blk status {status:?}");
        // Device reads memory.
        let off = WRITE_BASE + (60 << 20);
        let old = pattern::DISK_TAG ^ 0x0eee;
        let secret = pattern::DISK_TAG ^ 0x5ec7;
        write_region(rig, blk, m, off, len as usize, old)?;
        with_bytes_mut(&mut b, 0, len as usize, |s| pattern::fill(s, off, secret));
        rig.take_faults();
        blk.submit(BlkOp::Write, off, &[(iova, len as u32)])?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        let n = check_mapping_faults(&faults, iova, len, fault::F_ADDRESS)
            .map_err(|e| format!("device read: {e}"))?;
        println!("VG INFO unmapped, device read: {n} fault records, blk status {status:?}");
        read_region_into(rig, blk, m, off, b.region())?;
        let leaked = bytes_at(&b, 0, len as usize).chunks_exact(8).enumerate().any(|(i, w)| {
            u64::from_le_bytes(w.try_into().expect("8 bytes"))
                == pattern::word(off + i as u64 * 8, secret)
        });
        if leaked {
            return Err("data from memory behind an unmapped IOVA reached the disk".into());
        }
        Ok(())
    })();
    r
}

/// Reads 4 KiB at `off` into `b` through a proper mapping.
fn read_region_into(
    rig: &Rig,
    blk: &mut Blk,
    m: &mut dyn Mapper,
    off: u64,
    b: &DmaRegion,
) -> Outcome {
    let mapped =
        m.map_round(&[RoundBuf { segs: vec![(b.bus_addr, 4096)], device_writes: true }])?;
    blk.submit(BlkOp::Read, off, &mapped[0].descs)?;
    blk.kick();
    let (_, status) = collect_faults(rig, blk, true);
    m.complete(mapped[0].handle)?;
    m.flush()?;
    match status {
        Some(S_OK) => Ok(()),
        s => Err(format!("read-back status {s:?}").into()),
    }
}

/// A blk READ into a buffer mapped read-only: faults MAPPING with WRITE,
/// and the buffer keeps its poison.
fn neg_read_only(rig: &Rig, blk: &mut Blk) -> Outcome {
    rig.take_faults();
    let domain = rig.domain.clone().ok_or("no domain")?;
    // Freed on return, after the unmap below.
    let mut buf = DmaBuffer::new(&rig.hal, 1).ok_or("no memory")?;
    with_bytes_mut(&mut buf, 0, 4096, |s| s.fill(0xa5));
    let len = 4096u64;
    domain.map_pages(NEG_RO_IOVA, buf.paddr(), len, Prot::READ)?;
    domain.iotlb_sync_map(NEG_RO_IOVA, len)?;
    let r = (|| -> Outcome {
        blk.submit(BlkOp::Read, READ_BASE, &[(NEG_RO_IOVA, len as u32)])?;
        blk.kick();
        let (faults, status) = collect_faults(rig, blk, true);
        let n = check_mapping_faults(&faults, NEG_RO_IOVA, len, fault::F_ADDRESS | fault::F_WRITE)?;
        if bytes_at(&buf, 0, 4096).iter().any(|&b| b != 0xa5) {
            return Err("the device wrote through a read-only mapping".into());
        }
        println!("VG INFO read-only: {n} fault records, blk status {status:?}");
        Ok(())
    })();
    let u = domain.unmap_pages(NEG_RO_IOVA, len).and_then(|_| domain.iotlb_sync());
    r?;
    Ok(u?)
}

/// Detaches the endpoint (bypass is 0) and restarts virtio-blk with rings
/// and buffer at IOVA = physical address, so that any DMA that escaped the
/// IOMMU would work and move data. Nothing must complete, data must not
/// move, and faults must arrive.
fn neg_unattached(rig: &Rig) -> Outcome {
    let iommu = rig.iommu.as_ref().ok_or("no iommu")?;
    iommu.detach(BLK_ENDPOINT)?;
    rig.take_faults();
    // Allocated before the device and so freed after its reset, on every path.
    let mut buf = DmaBuffer::new(&rig.hal, 1).ok_or("no memory")?;
    let t = PciTransport::open(BLK_BDF)?;
    let hal = Arc::new(rig.hal.clone());
    let mut blk = VirtioBlk::new(t, hal, 64, |r| Ok(r.bus_addr))?;
    with_bytes_mut(&mut buf, 0, 4096, |s| s.fill(0xa5));
    blk.submit(BlkOp::Read, READ_BASE, &[(buf.paddr(), 4096)])?;
    blk.kick();
    let (faults, status) = collect_faults(rig, &mut blk, false);
    let moved = bytes_at(&buf, 0, 4096).iter().any(|&b| b != 0xa5);
    drop(blk); // resets the device
    let mine: Vec<_> = faults.iter().filter(|f| f.endpoint == BLK_ENDPOINT).collect();
    if status.is_some() {
        return Err(format!(
            "request completed (status {status:?}) though the endpoint is unattached"
        )
        .into());
    }
    if moved {
        return Err("data moved to an unattached endpoint's buffer".into());
    }
    if mine.is_empty() {
        return Err(format!("no fault record ({})", describe(&faults)).into());
    }
    if let Some(f) =
        mine.iter().find(|f| f.reason != fault::R_UNKNOWN && f.reason != fault::R_DOMAIN)
    {
        return Err(format!("unexpected fault reason {f:?}").into());
    }
    println!("VG INFO unattached: {} fault records, first {:?}", mine.len(), mine[0]);
    Ok(())
}

/// Where the device's write of the one used-ring element that straddles a
/// page boundary went, when the ring's pages are contiguous in IOVA space
/// but not in guest-physical memory.
///
/// QEMU 10.0's `address_space_write_cached_slow` (system/physmem.c)
/// translates such a write once, at its first byte, and writes the rest
/// to the guest-physical bytes that follow, so the tail lands in whatever
/// page is physically next instead of going through the IOMMU. Linux's
/// rings are built from separately allocated pages behind an IOMMU, so
/// this corrupts guest memory (docs/real-guest.md, "QEMU's ring-crossing
/// bug"). The check maps the ring 1:1 except for the page holding the
/// tail of that element, which it maps to a page of its own, then runs
/// requests until the element is used. Either outcome passes, and the
/// line printed says which QEMU did; anything else is a failure.
fn used_ring_page_split(rig: &Rig) -> Outcome {
    let domain = rig.domain.clone().ok_or("no domain")?;
    let page = PAGE_SIZE as u64;
    // Allocated before the device and so freed after its reset.
    let mut spare = DmaBuffer::new(&rig.hal, 1).ok_or("no memory")?;
    let data = DmaBuffer::new(&rig.hal, 1).ok_or("no memory")?;
    with_bytes_mut(&mut spare, 0, PAGE_SIZE, |s| s.fill(SPLIT_POISON));
    let spare_pa = spare.paddr();
    let mut mapped: Vec<(u64, u64)> = Vec::new();
    let r = (|| -> Outcome {
        let mut t = PciTransport::open(BLK_BDF)?;
        let hal = Arc::new(rig.hal.clone());
        let n = t.max_queue_size(0).min(BLK_QUEUE_SIZE);
        let layout = QueueLayout::new(n);
        // The first element whose 8 bytes straddle a page boundary.
        let (index, head) = (0..u64::from(n))
            .map(|i| (i, layout.used as u64 + 4 + 8 * i))
            .find(|&(_, at)| at % page > page - 8)
            .ok_or_else(|| format!("no used element of a {n}-entry ring crosses a page"))?;
        let tail_page = head / page + 1;
        let tail_len = (head + 8 - tail_page * page) as usize;
        let mut calls = 0;
        let mut blk = VirtioBlk::new(t, hal, n, |r| {
            calls += 1;
            let iova = if calls == 1 { SPLIT_RING_IOVA } else { SPLIT_SLOTS_IOVA };
            for p in 0..r.pages as u64 {
                let pa =
                    if calls == 1 && p == tail_page { spare_pa } else { r.bus_addr + p * page };
                domain.map_pages(iova + p * page, pa, page, Prot::READ | Prot::WRITE)?;
                mapped.push((iova + p * page, page));
            }
            domain.iotlb_sync_map(iova, r.pages as u64 * page)?;
            Ok(iova)
        })?;
        domain.map_pages(SPLIT_DATA_IOVA, data.paddr(), page, Prot::READ | Prot::WRITE)?;
        mapped.push((SPLIT_DATA_IOVA, page));
        domain.iotlb_sync_map(SPLIT_DATA_IOVA, page)?;
        let mut last = None;
        for _ in 0..=index {
            let tag = blk.submit(BlkOp::Read, READ_BASE, &[(SPLIT_DATA_IOVA, PAGE_SIZE as u32)])?;
            blk.kick();
            let start = Instant::now();
            let done = loop {
                if let Some(c) = blk.poll() {
                    break c;
                }
                if start.elapsed() > IO_TIMEOUT {
                    return Err(format!("request {tag} not completed in {IO_TIMEOUT:?}").into());
                }
                std::hint::spin_loop();
            };
            if done.tag != tag || done.status != S_OK {
                return Err(format!("request {tag} completed as {done:?}").into());
            }
            last = Some(tag);
        }
        // The element the device wrote: id (the chain's head) and length
        // (the data plus the status byte).
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(last.unwrap_or(0)).to_le_bytes());
        elem[4..].copy_from_slice(&(page as u32 + 1).to_le_bytes());
        let want = &elem[8 - tail_len..];
        let mut behind = vec![0u8; tail_len];
        blk.ring().read(tail_page as usize * PAGE_SIZE, &mut behind);
        drop(blk); // resets the device before its ring is unmapped
        let through = bytes_at(&spare, 0, tail_len);
        let poison = vec![SPLIT_POISON; tail_len];
        let verdict = if through == want && behind.iter().all(|&b| b == 0) {
            "went through the IOMMU (fixed)"
        } else if behind == want && through == poison.as_slice() {
            "landed in the physically next page (QEMU's bug)"
        } else {
            return Err(format!(
                "element {index}: tail {want:02x?} is neither in the mapped page ({through:02x?}) \
                 nor behind it ({behind:02x?})"
            )
            .into());
        };
        println!(
            "VG INFO used-ring page split: {n}-entry ring, element {index} at ring offset \
             {head:#x}: its last {tail_len} bytes {verdict}"
        );
        Ok(())
    })();
    for (iova, len) in mapped {
        domain.unmap_pages(iova, len)?;
    }
    domain.iotlb_sync()?;
    r
}
