//! Block I/O through the Linux kernel's own virtio-blk driver (and, when
//! the guest has one, its virtio-iommu driver): the same workloads our
//! userspace driver runs, issued with `O_DIRECT` on `/dev/vda`, so both can
//! be measured in the same session on the same device.
//!
//! - queue depth 1: `pread`/`pwrite`;
//! - deeper queues: Linux native AIO (`io_submit`/`io_getevents`) through
//!   raw system calls, keeping the queue full;
//! - buffers: physically contiguous (inside one 2 MiB hugetlb page), or
//!   scattered: virtually contiguous, but no 4 KiB page physically next to
//!   the one before it, so each page is its own DMA segment.
//!
//! Data is checked against [`crate::pattern`] outside the timed part.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use viommu_driver::hal::{DmaBuffer, PAGE_SIZE};

use crate::hugepage::{pagemap_pfn, HugePageHal, HUGE_PAGE};
use crate::{pattern, Error};

/// How long one I/O may take before we call the device stuck (TCG is slow).
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// One workload: `bytes` from disk offset `base`, `size` bytes per I/O, up
/// to `qd` in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Write (the device reads memory) rather than read.
    pub write: bool,
    /// Bytes per I/O, a multiple of 4 KiB, at most 1 MiB.
    pub size: usize,
    /// Every 4 KiB page of a buffer physically apart from the one before.
    pub scattered: bool,
    /// I/Os in flight at once.
    pub qd: usize,
    /// Bytes in all, a multiple of `size`.
    pub bytes: u64,
    /// Disk offset of the first I/O.
    pub base: u64,
    /// Pattern tag the data is filled with (writes) or checked against (reads).
    pub tag: u64,
}

/// What a workload measured.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Seconds in the I/O loop, without filling and checking data.
    pub secs: f64,
    /// I/Os completed.
    pub ios: u64,
}

/// Physical frame numbers of `pages` pages starting at `va`.
fn frames(pagemap: &File, va: usize, pages: usize) -> Result<Vec<u64>, Error> {
    let mut raw = vec![0u8; pages * 8];
    pagemap
        .read_exact_at(&mut raw, (va / PAGE_SIZE) as u64 * 8)
        .map_err(|e| Error::io("read /proc/self/pagemap".into(), e))?;
    raw.chunks_exact(8).map(|e| pagemap_pfn(u64::from_le_bytes(e.try_into().expect("8")))).collect()
}

/// Whether no frame directly follows or precedes the one before it.
pub fn all_apart(pfns: &[u64]) -> bool {
    pfns.windows(2).all(|w| w[1] != w[0] + 1 && w[0] != w[1] + 1)
}

/// Picks `n` of `pfns` (by index) in ascending frame order, taking every
/// other one, so that no two consecutive picks are physically adjacent.
/// Needs `pfns.len() >= 2 * n - 1` distinct frames.
pub fn pick_apart(pfns: &[u64], n: usize) -> Option<Vec<usize>> {
    let mut order: Vec<usize> = (0..pfns.len()).collect();
    order.sort_unstable_by_key(|&i| pfns[i]);
    let picks: Vec<usize> = order.into_iter().step_by(2).take(n).collect();
    (picks.len() == n).then_some(picks)
}

/// An anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn anon(len: usize, prot: i32, flags: i32) -> Result<Self, Error> {
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Dma(format!(
                "mmap of {len} bytes: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Self { ptr: NonNull::new(p.cast()).expect("mmap never returns NULL"), len })
    }

    fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len came from mmap; holes left by mremap are fine to unmap.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

fn os_err(what: &str) -> Error {
    Error::io(what.into(), std::io::Error::last_os_error())
}

/// `count` scattered buffers of `size` bytes in one virtually contiguous
/// mapping: pages are taken from a pool twice as large, every other one in
/// physical order, and moved into place with `mremap`.
fn scattered(pagemap: &File, count: usize, size: usize) -> Result<Mapping, Error> {
    let pages = count * size / PAGE_SIZE;
    let pool_pages = 2 * pages;
    let pool = Mapping::anon(pool_pages * PAGE_SIZE, libc::PROT_READ | libc::PROT_WRITE, 0)?;
    // SAFETY: advice and locking on our own fresh mapping. No transparent
    // hugepages: their 4 KiB parts would be physically adjacent anyway, but
    // mremap of one would split them first.
    unsafe {
        libc::madvise(pool.ptr.as_ptr().cast(), pool.len, libc::MADV_NOHUGEPAGE);
        if libc::mlock(pool.ptr.as_ptr().cast(), pool.len) != 0 {
            return Err(os_err("mlock the scattered-page pool"));
        }
    }
    let pfns = frames(pagemap, pool.addr(), pool_pages)?;
    let picks = pick_apart(&pfns, pages).ok_or_else(|| Error::Dma("too few pool pages".into()))?;
    let target = Mapping::anon(pages * PAGE_SIZE, libc::PROT_NONE, libc::MAP_NORESERVE)?;
    for (k, &i) in picks.iter().enumerate() {
        let (from, to) = (pool.addr() + i * PAGE_SIZE, target.addr() + k * PAGE_SIZE);
        // SAFETY: moves one locked page of the pool over one page of our
        // reserved target; both ranges are ours and nothing references them.
        let got = unsafe {
            libc::mremap(
                from as *mut libc::c_void,
                PAGE_SIZE,
                PAGE_SIZE,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        if got as usize != to {
            return Err(os_err("mremap a scattered page"));
        }
    }
    drop(pool);
    // The moved pages must be the frames we picked, and apart.
    let now = frames(pagemap, target.addr(), pages)?;
    let per = size / PAGE_SIZE;
    if now.iter().zip(&picks).any(|(&f, &i)| f != pfns[i]) || !now.chunks(per).all(all_apart) {
        return Err(Error::Dma("scattered buffer pages are not where they were picked".into()));
    }
    Ok(target)
}

/// The buffers of one workload, one per I/O in flight.
struct Buffers<'h> {
    ptrs: Vec<NonNull<u8>>,
    size: usize,
    /// The hugetlb buffers behind `ptrs`, freed on drop: no I/O is in flight
    /// then, as the AIO context (which waits for its I/Os when destroyed)
    /// never outlives the buffers.
    regions: Vec<DmaBuffer<&'h HugePageHal>>,
    _scattered: Option<Mapping>,
}

impl<'h> Buffers<'h> {
    fn new(hal: &'h HugePageHal, pagemap: &File, job: &Job) -> Result<Self, Error> {
        let mut b =
            Buffers { ptrs: Vec::new(), size: job.size, regions: Vec::new(), _scattered: None };
        if job.scattered {
            let m = scattered(pagemap, job.qd, job.size)?;
            // SAFETY: every offset lies inside the mapping.
            b.ptrs = (0..job.qd).map(|i| unsafe { m.ptr.add(i * job.size) }).collect();
            b._scattered = Some(m);
        } else {
            for _ in 0..job.qd {
                // Inside one 2 MiB hugetlb page: physically contiguous.
                let r = DmaBuffer::new(hal, job.size.div_ceil(PAGE_SIZE))
                    .ok_or_else(|| Error::Dma("out of hugetlb memory".into()))?;
                b.ptrs.push(r.region().vaddr);
                b.regions.push(r);
            }
        }
        Ok(b)
    }

    /// Buffer `i`, while no I/O uses it.
    fn get(&mut self, i: usize) -> &mut [u8] {
        // SAFETY: the buffer is ours, `size` bytes long, and the caller
        // touches it only between I/Os (`&mut self` keeps it unique).
        unsafe { std::slice::from_raw_parts_mut(self.ptrs[i].as_ptr(), self.size) }
    }
}

// ------------------------------------------------------------ native AIO

/// The kernel's `struct iocb` (64 bytes, little-endian field order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Iocb {
    data: u64,
    key: u32,
    rw_flags: i32,
    opcode: u16,
    reqprio: i16,
    fildes: u32,
    buf: u64,
    nbytes: u64,
    offset: i64,
    reserved2: u64,
    flags: u32,
    resfd: u32,
}

/// The kernel's `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct IoEvent {
    data: u64,
    obj: u64,
    res: i64,
    res2: i64,
}

const _: () = assert!(size_of::<Iocb>() == 64 && size_of::<IoEvent>() == 32);
const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;

/// An AIO context; destroying it waits for its outstanding I/Os.
struct Aio {
    ctx: libc::c_ulong,
}

impl Aio {
    fn new(nr: usize) -> Result<Self, Error> {
        let mut ctx: libc::c_ulong = 0;
        // SAFETY: io_setup writes the context id into `ctx`.
        if unsafe { libc::syscall(libc::SYS_io_setup, nr as libc::c_long, &mut ctx) } != 0 {
            return Err(os_err("io_setup"));
        }
        Ok(Self { ctx })
    }

    /// Submits all of `iocbs`; the kernel copies each at submission.
    fn submit(&self, iocbs: &mut [*mut Iocb]) -> Result<(), Error> {
        let mut at = 0;
        while at < iocbs.len() {
            let rest = &mut iocbs[at..];
            // SAFETY: every pointer refers to a live, filled-in iocb whose
            // buffer stays valid until its completion is reaped.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_submit,
                    self.ctx,
                    rest.len() as libc::c_long,
                    rest.as_mut_ptr(),
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) {
                    continue;
                }
                return Err(Error::io("io_submit".into(), e));
            }
            at += r as usize;
        }
        Ok(())
    }

    /// Waits up to [`IO_TIMEOUT`] for at least one completion.
    fn reap(&self, events: &mut [IoEvent]) -> Result<usize, Error> {
        let ts = libc::timespec { tv_sec: IO_TIMEOUT.as_secs() as libc::time_t, tv_nsec: 0 };
        loop {
            // SAFETY: `events` has room for `len` entries; `ts` is a valid timespec.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    1 as libc::c_long,
                    events.len() as libc::c_long,
                    events.as_mut_ptr(),
                    &ts,
                )
            };
            if r > 0 {
                return Ok(r as usize);
            }
            if r == 0 {
                return Err(Error::Timeout(format!("no AIO completion within {IO_TIMEOUT:?}")));
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::io("io_getevents".into(), e));
            }
        }
    }
}

impl Drop for Aio {
    fn drop(&mut self) {
        // SAFETY: our own context; io_destroy waits for what is in flight.
        unsafe { libc::syscall(libc::SYS_io_destroy, self.ctx) };
    }
}

// ------------------------------------------------------------ the disk

/// A block device opened with `O_DIRECT`, plus memory for its buffers.
pub struct Disk {
    file: File,
    pagemap: File,
    hal: HugePageHal,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

impl Disk {
    /// Opens `path` (e.g. `/dev/vda`) read-write with `O_DIRECT`; contiguous
    /// buffers come from `hal`.
    pub fn open(path: &str, hal: HugePageHal) -> Result<Self, Error> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| Error::io(format!("open {path}"), e))?;
        let pagemap = File::open("/proc/self/pagemap")
            .map_err(|e| Error::io("open /proc/self/pagemap".into(), e))?;
        Ok(Self { file, pagemap, hal })
    }

    /// Size of the device in bytes.
    pub fn capacity(&self) -> Result<u64, Error> {
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut bytes) } != 0 {
            return Err(os_err("BLKGETSIZE64"));
        }
        Ok(bytes)
    }

    /// Runs `job`; fails on a short or failed I/O, a timeout, or wrong data.
    pub fn run(&self, job: &Job) -> Result<Outcome, Error> {
        if job.size == 0
            || job.size % PAGE_SIZE != 0
            || job.size > HUGE_PAGE / 2
            || job.qd == 0
            || job.bytes % job.size as u64 != 0
        {
            return Err(Error::Device(format!("bad job {job:?}")));
        }
        let mut bufs = Buffers::new(&self.hal, &self.pagemap, job)?;
        if job.qd == 1 {
            self.run_sync(job, &mut bufs)
        } else {
            self.run_aio(job, &mut bufs)
        }
    }

    fn run_sync(&self, job: &Job, bufs: &mut Buffers) -> Result<Outcome, Error> {
        let n = job.bytes / job.size as u64;
        let fd = self.file.as_raw_fd();
        let mut untimed = Duration::ZERO;
        let t0 = Instant::now();
        for i in 0..n {
            let off = job.base + i * job.size as u64;
            let buf = bufs.get(0);
            if job.write {
                let t = Instant::now();
                pattern::fill(buf, off, job.tag);
                untimed += t.elapsed();
            }
            let p = buf.as_mut_ptr().cast();
            // SAFETY: `buf` is `size` bytes of our memory, unused otherwise
            // during the call.
            let r = unsafe {
                if job.write {
                    libc::pwrite(fd, p, job.size, off as libc::off_t)
                } else {
                    libc::pread(fd, p, job.size, off as libc::off_t)
                }
            };
            if r != job.size as isize {
                return Err(Error::io(
                    format!("I/O of {} bytes at {off:#x} returned {r}", job.size),
                    std::io::Error::last_os_error(),
                ));
            }
            if !job.write {
                let t = Instant::now();
                check(buf, off, job.tag)?;
                untimed += t.elapsed();
            }
        }
        Ok(Outcome { secs: t0.elapsed().saturating_sub(untimed).as_secs_f64(), ios: n })
    }

    fn run_aio(&self, job: &Job, bufs: &mut Buffers) -> Result<Outcome, Error> {
        let n = job.bytes / job.size as u64;
        let aio = Aio::new(job.qd)?;
        let mut iocbs = vec![Iocb::default(); job.qd];
        let mut events = vec![IoEvent::default(); job.qd];
        let mut batch: Vec<*mut Iocb> = Vec::with_capacity(job.qd);
        let (mut next, mut done) = (0u64, 0u64);
        let mut untimed = Duration::ZERO;
        let fd = self.file.as_raw_fd() as u32;
        let mut prepare = |slot: usize, next: u64, bufs: &mut Buffers, iocbs: &mut [Iocb]| {
            let off = job.base + next * job.size as u64;
            let buf = bufs.get(slot);
            if job.write {
                let t = Instant::now();
                pattern::fill(buf, off, job.tag);
                untimed += t.elapsed();
            }
            iocbs[slot] = Iocb {
                data: slot as u64,
                opcode: if job.write { IOCB_CMD_PWRITE } else { IOCB_CMD_PREAD },
                fildes: fd,
                buf: buf.as_mut_ptr() as u64,
                nbytes: job.size as u64,
                offset: off as i64,
                ..Iocb::default()
            };
            &mut iocbs[slot] as *mut Iocb
        };
        let t0 = Instant::now();
        while next < n.min(job.qd as u64) {
            batch.push(prepare(next as usize, next, bufs, &mut iocbs));
            next += 1;
        }
        aio.submit(&mut batch)?;
        let mut check_time = Duration::ZERO;
        while done < n {
            let got = aio.reap(&mut events)?;
            batch.clear();
            for ev in &events[..got] {
                let slot = ev.data as usize;
                let off = iocbs.get(slot).map(|c| c.offset as u64).ok_or_else(|| {
                    Error::Device(format!("AIO completion for unknown slot {slot}"))
                })?;
                if ev.res != job.size as i64 {
                    return Err(Error::Device(format!(
                        "I/O of {} bytes at {off:#x} returned {}",
                        job.size, ev.res
                    )));
                }
                if !job.write {
                    let t = Instant::now();
                    check(bufs.get(slot), off, job.tag)?;
                    check_time += t.elapsed();
                }
                done += 1;
                if next < n {
                    batch.push(prepare(slot, next, bufs, &mut iocbs));
                    next += 1;
                }
            }
            aio.submit(&mut batch)?;
        }
        let secs = t0.elapsed().saturating_sub(untimed + check_time).as_secs_f64();
        Ok(Outcome { secs, ios: n })
    }
}

fn check(buf: &[u8], off: u64, tag: u64) -> Result<(), Error> {
    pattern::check(buf, off, tag)
        .map_err(|bad| Error::Device(format!("wrong data at disk offset {bad:#x}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_are_never_physically_adjacent() {
        // A pool that is mostly one contiguous run, in descending order, as
        // a fresh allocator often hands it out.
        let pfns: Vec<u64> = (0..20).rev().map(|i| 1000 + i).chain([7, 9, 50]).collect();
        let picks = pick_apart(&pfns, 11).unwrap();
        let chosen: Vec<u64> = picks.iter().map(|&i| pfns[i]).collect();
        assert!(all_apart(&chosen), "{chosen:?}");
        assert_eq!(chosen.len(), 11);
        assert!(pick_apart(&pfns, 13).is_none(), "23 frames give at most 12 picks");
        assert!(!all_apart(&[5, 9, 8]));
        assert!(!all_apart(&[5, 6]));
    }

    #[test]
    fn iocb_fields_sit_where_the_kernel_reads_them() {
        let c = Iocb { opcode: 1, fildes: 3, buf: 0x1000, offset: 0x2000, ..Iocb::default() };
        // SAFETY: Iocb is plain old data, 64 bytes.
        let raw: [u8; 64] = unsafe { std::mem::transmute(c) };
        assert_eq!(raw[16..18], [1, 0]);
        assert_eq!(raw[20..24], [3, 0, 0, 0]);
        assert_eq!(raw[24..32], 0x1000u64.to_le_bytes());
        assert_eq!(raw[40..48], 0x2000u64.to_le_bytes());
    }
}
