//! A block endpoint served by a vhost-user back-end (viommu-vhost-user's vhost-user-blk) in
//! another thread, over a unix socket, on guest RAM shared through a memfd. Our driver
//! programs our device; the front-end listener turns the endpoint's MAP / UNMAP into IOTLB
//! UPDATE / INVALIDATE; the back-end reaches the ring and the buffers only through its IOTLB.
//! Data is checked on the disk and in guest memory; IOTLB messages are counted per I/O.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use viommu_driver::{DmaDirection, DmaDomain};
use viommu_vhost_user::backend::{Backend, BackendError, BackendStats};
use viommu_vhost_user::blk::{self, BlockDevice};
use viommu_vhost_user::frontend::{Frontend, FrontendCounts, FrontendOptions, SharedRegion};
use viommu_vm::bench::{DriverMode, Mode};
use viommu_vm::machine::Machine;
use viommu_vm::GuestRam;

const EP: u32 = 8;
const QSIZE: u16 = 256;
/// Ring layout in its 3 pages: descriptors, available ring, used ring.
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const RAM: usize = 16 << 20;
const DISK: u64 = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memfd(name: &std::ffi::CStr, len: u64) -> File {
    // SAFETY: a NUL-terminated name, no other pointer.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here only.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

fn eventfd() -> File {
    // SAFETY: no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: just created, owned here only.
    unsafe { File::from_raw_fd(fd) }
}

/// The disk's initial byte at `offset`.
fn disk_byte(offset: u64) -> u8 {
    (offset.wrapping_mul(31) >> 3) as u8 ^ 0x5a
}

struct Rig {
    m: Machine,
    fe: Frontend,
    backend: Option<JoinHandle<Result<(), BackendError>>>,
    stats: Arc<BackendStats>,
    disk: File,
    ring_gpa: u64,
    avail_idx: u16,
    used_idx: u16,
    call: File,
    kick: File,
}

impl Rig {
    fn new(options: FrontendOptions) -> Self {
        Self::with_iotlb(options, viommu_vhost_user::iotlb::MAX_ENTRIES)
    }

    /// With a back-end IOTLB emptied every `capacity` UPDATEs.
    fn with_iotlb(options: FrontendOptions, capacity: u64) -> Self {
        let ram = GuestRam::new_shared(RAM).unwrap();
        let m = Machine::new(ram.clone(), EP, Mode::Driver(DriverMode::Strict)).unwrap();
        let disk = memfd(c"disk", DISK);
        let init: Vec<u8> = (0..DISK).map(disk_byte).collect();
        disk.write_all_at(&init, 0).unwrap();

        let (fe_sock, be_sock) = UnixStream::pair().unwrap();
        let dev = BlockDevice::new(disk.try_clone().unwrap(), "viommu-vhost-test").unwrap();
        let mut backend = Backend::new(dev, be_sock).with_iotlb_capacity(capacity);
        let stats = backend.stats();
        let backend = std::thread::spawn(move || backend.run());

        let iommu = m.iommu();
        let region = SharedRegion {
            gpa: 0,
            size: RAM as u64,
            host: ram.host_address(),
            file: ram.shared_file().unwrap().try_clone().unwrap(),
            offset: 0,
        };
        let features = blk::F_FLUSH | blk::F_SEG_MAX | blk::F_BLK_SIZE;
        let mut fe = Frontend::connect(fe_sock, &iommu, EP, features, &[region], options).unwrap();
        fe.iotlb_listener(&iommu);

        let ring = ram.alloc_pages(3).unwrap();
        let ring_iova =
            dma(&m).map_single(ring.gpa, 3 * 4096, DmaDirection::Bidirectional).unwrap();
        let (kick, call) = (eventfd(), eventfd());
        fe.set_vring(QSIZE, ring_iova, ring_iova + AVAIL, ring_iova + USED, &kick, &call).unwrap();
        Self {
            m,
            fe,
            backend: Some(backend),
            stats,
            disk,
            ring_gpa: ring.gpa,
            avail_idx: 0,
            used_idx: 0,
            call,
            kick,
        }
    }

    fn ram(&self) -> &GuestRam {
        self.m.ram()
    }

    /// Puts a chain of (iova, len, flags) at descriptor 0.., makes it available, kicks, and
    /// waits for its used entry. Returns the used length.
    fn submit(&mut self, descs: &[(u64, u32, u16)]) -> u32 {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            let more = if i + 1 < descs.len() { F_NEXT } else { 0 };
            d[12..14].copy_from_slice(&(flags | more).to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            self.ram().write(self.ring_gpa + 16 * i as u64, &d).unwrap();
        }
        let slot = self.ring_gpa + AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.ram().write(slot, &0u16.to_le_bytes()).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.ram().write(self.ring_gpa + AVAIL + 2, &self.avail_idx.to_le_bytes()).unwrap();
        (&self.kick).write_all_at_eventfd();
        self.wait_used()
    }

    fn wait_used(&mut self) -> u32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let mut idx = [0u8; 2];
            self.ram().read(self.ring_gpa + USED + 2, &mut idx).unwrap();
            if u16::from_le_bytes(idx) != self.used_idx {
                let elem = self.ring_gpa + USED + 4 + 8 * u64::from(self.used_idx % QSIZE);
                let mut e = [0u8; 8];
                self.ram().read(elem, &mut e).unwrap();
                self.used_idx = self.used_idx.wrapping_add(1);
                return u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
            }
            let mut p =
                libc::pollfd { fd: self.call.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 100) };
            let mut b = [0u8; 8];
            if p.revents != 0 {
                let _ = std::io::Read::read(&mut &self.call, &mut b);
            }
            if self.backend.as_ref().is_some_and(|b| b.is_finished()) {
                let r = self.backend.take().unwrap().join();
                panic!("the back-end ended: {r:?}");
            }
            assert!(std::time::Instant::now() < deadline, "no used entry within 20 s");
        }
    }

    /// One block request as Linux's virtio-blk lays it out: header (16 bytes, readable),
    /// data, status (1 byte, writable), each mapped on its own with the DMA API and
    /// unmapped after completion. Returns (status, used length).
    fn io(&mut self, kind: u32, sector: u64, data_gpa: u64, len: u32) -> (u8, u32) {
        let hdr = self.ram().alloc_pages(1).unwrap();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.ram().write(hdr.gpa, &h).unwrap();
        self.ram().write(hdr.gpa + 512, &[0xff]).unwrap();
        let d = dma(&self.m).clone();
        let hdr_iova = d.map_single(hdr.gpa, 16, DmaDirection::ToDevice).unwrap();
        let (dir, flag) = match kind {
            blk::T_OUT => (DmaDirection::ToDevice, 0),
            _ => (DmaDirection::FromDevice, F_WRITE),
        };
        let data_iova = (len > 0).then(|| d.map_single(data_gpa, len as usize, dir).unwrap());
        let st_iova = d.map_single(hdr.gpa + 512, 1, DmaDirection::FromDevice).unwrap();
        let mut chain = vec![(hdr_iova, 16, 0)];
        chain.extend(data_iova.map(|a| (a, len, flag)));
        chain.push((st_iova, 1, F_WRITE));
        let used = self.submit(&chain);
        d.unmap_single(st_iova, 1, DmaDirection::FromDevice).unwrap();
        if let Some(a) = data_iova {
            d.unmap_single(a, len as usize, dir).unwrap();
        }
        d.unmap_single(hdr_iova, 16, DmaDirection::ToDevice).unwrap();
        let mut st = [0u8];
        self.ram().read(hdr.gpa + 512, &mut st).unwrap();
        self.ram().free_pages(hdr);
        (st[0], used)
    }

    fn counts(&self) -> FrontendCounts {
        self.fe.counts()
    }

    /// Stops the ring (its base is where the guest got to), closes the connection and
    /// checks the back-end ended cleanly.
    fn finish(self) {
        let Rig { fe, backend, avail_idx, m, .. } = self;
        assert_eq!(fe.stop().unwrap(), avail_idx);
        assert_eq!(fe.counts().errors, 0);
        drop(fe);
        backend.unwrap().join().unwrap().unwrap();
        drop(m);
    }
}

fn dma(m: &Machine) -> &Arc<DmaDomain> {
    m.dma().expect("strict mode has a DMA layer")
}

trait Kick {
    fn write_all_at_eventfd(self);
}

impl Kick for &File {
    fn write_all_at_eventfd(self) {
        std::io::Write::write_all(&mut &*self, &1u64.to_ne_bytes()).unwrap();
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// Writes and reads through the back-end with data checked, and counts the IOTLB messages
/// of each I/O: with UPDATE on MAP, one UPDATE per MAP and one acknowledged INVALIDATE per
/// UNMAP, no MISS.
#[test]
fn block_io_through_vhost_user_with_iotlb() {
    let mut rig = Rig::new(FrontendOptions { update_on_map: true });
    let buf = rig.ram().alloc_pages(16).unwrap();

    // GET_ID.
    let (st, used) = rig.io(blk::T_GET_ID, 0, buf.gpa, 20);
    assert_eq!((st, used), (blk::S_OK, 21));
    let mut id = [0u8; 17];
    rig.ram().read(buf.gpa, &mut id).unwrap();
    assert_eq!(&id, b"viommu-vhost-test");

    // Reads see the disk's contents.
    let (st, used) = rig.io(blk::T_IN, 8, buf.gpa, 8192);
    assert_eq!((st, used), (blk::S_OK, 8193));
    let mut got = vec![0u8; 8192];
    rig.ram().read(buf.gpa, &mut got).unwrap();
    let want: Vec<u8> = (4096..4096 + 8192).map(disk_byte).collect();
    assert!(got == want, "IN data differs from the disk");

    // A write lands on the disk; reading it back into other pages returns it.
    let before = rig.counts();
    let data = pattern(0x33, 65536);
    rig.ram().write(buf.gpa, &data).unwrap();
    let n = 4;
    for k in 0..n {
        let (st, _) = rig.io(blk::T_OUT, 128 + 128 * k, buf.gpa, 65536);
        assert_eq!(st, blk::S_OK);
    }
    let per = rig.counts();
    let mut disk = vec![0u8; 65536];
    rig.disk.read_exact_at(&mut disk, (128 + 128) * 512).unwrap();
    assert!(disk == data, "OUT data not on the disk");
    let (st, _) = rig.io(blk::T_IN, 128, rig.ram().alloc_pages(16).unwrap().gpa, 65536);
    assert_eq!(st, blk::S_OK);
    let (st, _) = rig.io(blk::T_FLUSH, 0, buf.gpa, 0);
    assert_eq!(st, blk::S_OK);

    // IOTLB messages per I/O (header, data, status each mapped and unmapped on their own).
    let d = |a: u64, b: u64| (a - b) as f64 / n as f64;
    let (up, inv, miss) = (
        d(per.updates, before.updates),
        d(per.invalidates, before.invalidates),
        d(per.misses, before.misses),
    );
    eprintln!(
        "vhost-user, UPDATE on MAP: per 64 KiB OUT: {up} UPDATE, {inv} INVALIDATE, {miss} MISS"
    );
    assert_eq!((up, inv, miss), (3.0, 3.0, 0.0));
    let b = rig.stats.snapshot();
    assert_eq!((b.misses, b.access_fails, b.refused_updates), (0, 0, 0));
    assert_eq!(rig.counts().errors, 0);
    rig.finish();
}

/// Without UPDATE on MAP the back-end asks: one MISS per mapped buffer, answered through the
/// device's non-faulting lookup, and the data is the same.
#[test]
fn misses_fill_the_back_end_iotlb() {
    let mut rig = Rig::new(FrontendOptions { update_on_map: false });
    let buf = rig.ram().alloc_pages(16).unwrap();
    let data = pattern(0x11, 16384);
    rig.ram().write(buf.gpa, &data).unwrap();
    // The first I/O also misses on the ring page.
    let (st, _) = rig.io(blk::T_OUT, 64, buf.gpa, 16384);
    assert_eq!(st, blk::S_OK);
    let before = rig.counts();
    let n = 4;
    for _ in 0..n {
        let (st, _) = rig.io(blk::T_OUT, 64, buf.gpa, 16384);
        assert_eq!(st, blk::S_OK);
    }
    let c = rig.counts();
    let d = |a: u64, b: u64| (a - b) as f64 / n as f64;
    let (up, inv, miss) = (
        d(c.updates, before.updates),
        d(c.invalidates, before.invalidates),
        d(c.misses, before.misses),
    );
    eprintln!(
        "vhost-user, UPDATE on MISS: per 16 KiB OUT: {up} UPDATE, {inv} INVALIDATE, {miss} MISS"
    );
    assert_eq!((up, inv, miss), (3.0, 3.0, 3.0));
    let mut disk = vec![0u8; 16384];
    rig.disk.read_exact_at(&mut disk, 64 * 512).unwrap();
    assert!(disk == data);
    assert_eq!(c.misses_refused, 0);
    rig.finish();
}

/// The guest unmaps a buffer that the back-end's IOTLB held (UPDATE on MAP) before the
/// request runs: the INVALIDATE was acknowledged before the UNMAP completed, so the access
/// misses, the front-end finds nothing to send, the back-end refuses the access
/// (ACCESS_FAIL) and fails the request, and no data moves either way.
#[test]
fn access_after_unmap_fails_and_moves_no_data() {
    let mut rig = Rig::new(FrontendOptions { update_on_map: true });
    let buf = rig.ram().alloc_pages(4).unwrap();
    let hdr = rig.ram().alloc_pages(1).unwrap();
    let d = dma(&rig.m).clone();
    for (kind, seed) in [(blk::T_OUT, 0x77u8), (blk::T_IN, 0x99)] {
        let guest = pattern(seed, 8192);
        rig.ram().write(buf.gpa, &guest).unwrap();
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&16u64.to_le_bytes());
        rig.ram().write(hdr.gpa, &h).unwrap();
        rig.ram().write(hdr.gpa + 512, &[0xff]).unwrap();
        let (dir, flag) = if kind == blk::T_OUT {
            (DmaDirection::ToDevice, 0)
        } else {
            (DmaDirection::FromDevice, F_WRITE)
        };
        let hdr_iova = d.map_single(hdr.gpa, 16, DmaDirection::ToDevice).unwrap();
        let data_iova = d.map_single(buf.gpa, 8192, dir).unwrap();
        let st_iova = d.map_single(hdr.gpa + 512, 1, DmaDirection::FromDevice).unwrap();
        let before = (rig.stats.snapshot(), rig.counts());
        // The UNMAP completes only after the back-end acknowledged the INVALIDATE.
        d.unmap_single(data_iova, 8192, dir).unwrap();
        assert_eq!(rig.counts().invalidates, before.1.invalidates + 1);
        let used = rig.submit(&[(hdr_iova, 16, 0), (data_iova, 8192, flag), (st_iova, 1, F_WRITE)]);
        let mut st = [0u8];
        rig.ram().read(hdr.gpa + 512, &mut st).unwrap();
        assert_eq!((st[0], used), (blk::S_IOERR, 1), "request {kind} must fail");
        let after = (rig.stats.snapshot(), rig.counts());
        assert_eq!(after.0.misses - before.0.misses, 1, "one MISS for the unmapped buffer");
        assert_eq!(after.1.misses_refused - before.1.misses_refused, 1);
        assert_eq!(after.0.access_fails - before.0.access_fails, 1);
        // No data moved: the disk keeps its contents, the guest buffer its own.
        let mut disk = vec![0u8; 8192];
        rig.disk.read_exact_at(&mut disk, 16 * 512).unwrap();
        let init: Vec<u8> = (16 * 512..16 * 512 + 8192).map(disk_byte).collect();
        assert!(disk == init, "the disk changed after UNMAP");
        let mut g = vec![0u8; 8192];
        rig.ram().read(buf.gpa, &mut g).unwrap();
        assert!(g == guest, "guest memory changed after UNMAP");
        d.unmap_single(st_iova, 1, DmaDirection::FromDevice).unwrap();
        d.unmap_single(hdr_iova, 16, DmaDirection::ToDevice).unwrap();
    }
    // The back-end keeps serving.
    let (st, _) = rig.io(blk::T_IN, 0, buf.gpa, 4096);
    assert_eq!(st, blk::S_OK);
    rig.finish();
}

/// Hostile chains get a status (or used length 0) and the back-end keeps serving: no
/// writable byte, a length past the bound, an unknown type, a sector past the end, a
/// header at an IOVA the guest never mapped.
#[test]
fn hostile_chains_are_answered_and_serving_goes_on() {
    let mut rig = Rig::new(FrontendOptions::default());
    let d = dma(&rig.m).clone();
    let page = rig.ram().alloc_pages(1).unwrap();
    let hdr_iova = d.map_single(page.gpa, 16, DmaDirection::ToDevice).unwrap();
    let st_iova = d.map_single(page.gpa + 512, 1, DmaDirection::FromDevice).unwrap();
    let header = |rig: &Rig, kind: u32, sector: u64| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        rig.ram().write(page.gpa, &h).unwrap();
        rig.ram().write(page.gpa + 512, &[0xff]).unwrap();
    };
    let status = |rig: &Rig| {
        let mut st = [0u8];
        rig.ram().read(page.gpa + 512, &mut st).unwrap();
        st[0]
    };
    // No writable descriptor: nowhere to put a status.
    header(&rig, blk::T_IN, 0);
    assert_eq!(rig.submit(&[(hdr_iova, 16, 0)]), 0);
    // 8 MiB of IN data (past MAX_REQUEST_BYTES), at an IOVA never mapped: refused first.
    assert_eq!(
        rig.submit(&[(hdr_iova, 16, 0), (0xdead_0000, 8 << 20, F_WRITE), (st_iova, 1, F_WRITE)]),
        1
    );
    assert_eq!(status(&rig), blk::S_IOERR);
    // An unknown type.
    header(&rig, 77, 0);
    assert_eq!(rig.submit(&[(hdr_iova, 16, 0), (st_iova, 1, F_WRITE)]), 1);
    assert_eq!(status(&rig), blk::S_UNSUPP);
    // A sector past the end of the disk.
    header(&rig, blk::T_IN, DISK / 512);
    let buf = rig.ram().alloc_pages(1).unwrap();
    let buf_iova = d.map_single(buf.gpa, 4096, DmaDirection::FromDevice).unwrap();
    assert_eq!(
        rig.submit(&[(hdr_iova, 16, 0), (buf_iova, 4096, F_WRITE), (st_iova, 1, F_WRITE)]),
        1
    );
    assert_eq!(status(&rig), blk::S_IOERR);
    // A header the guest never mapped: one MISS, refused, ACCESS_FAIL, IOERR.
    let before = rig.stats.snapshot();
    header(&rig, blk::T_IN, 0);
    assert_eq!(
        rig.submit(&[(0x7777_0000, 16, 0), (buf_iova, 4096, F_WRITE), (st_iova, 1, F_WRITE)]),
        1
    );
    assert_eq!(status(&rig), blk::S_IOERR);
    let after = rig.stats.snapshot();
    assert_eq!((after.misses - before.misses, after.access_fails - before.access_fails), (1, 1));
    // Still serving.
    assert_eq!(
        rig.submit(&[(hdr_iova, 16, 0), (buf_iova, 4096, F_WRITE), (st_iova, 1, F_WRITE)]),
        4097
    );
    assert_eq!(status(&rig), blk::S_OK);
    for (iova, len, dir) in [
        (hdr_iova, 16, DmaDirection::ToDevice),
        (st_iova, 1, DmaDirection::FromDevice),
        (buf_iova, 4096, DmaDirection::FromDevice),
    ] {
        d.unmap_single(iova, len, dir).unwrap();
    }
    rig.finish();
}

/// Scattered 800 KiB requests (200 pages, each mapped on its own, in one chain) with MISS only, on a
/// back-end IOTLB emptied every 300 UPDATEs, so that the second request sees it emptied
/// half-way: its pages are asked for anew and it completes with its data (an emptying used
/// to exhaust the request's MISS budget and fail it, as QEMU boots of Linux showed).
#[test]
fn scattered_request_survives_iotlb_evictions() {
    let mut rig = Rig::with_iotlb(FrontendOptions { update_on_map: false }, 300);
    let d = dma(&rig.m).clone();
    let page = rig.ram().alloc_pages(1).unwrap();
    let hdr_iova = d.map_single(page.gpa, 16, DmaDirection::ToDevice).unwrap();
    let st_iova = d.map_single(page.gpa + 512, 1, DmaDirection::FromDevice).unwrap();
    let bufs: Vec<_> = (0..200).map(|_| rig.ram().alloc_pages(1).unwrap()).collect();
    for (kind, dir, flag) in
        [(blk::T_IN, DmaDirection::FromDevice, F_WRITE), (blk::T_OUT, DmaDirection::ToDevice, 0)]
    {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&0u64.to_le_bytes());
        rig.ram().write(page.gpa, &h).unwrap();
        if kind == blk::T_OUT {
            for (i, b) in bufs.iter().enumerate() {
                rig.ram().write(b.gpa, &pattern(i as u8, 4096)).unwrap();
            }
        }
        let iovas: Vec<u64> =
            bufs.iter().map(|b| d.map_single(b.gpa, 4096, dir).unwrap()).collect();
        let mut chain = vec![(hdr_iova, 16, 0)];
        chain.extend(iovas.iter().map(|&a| (a, 4096, flag)));
        chain.push((st_iova, 1, F_WRITE));
        let before = rig.stats.snapshot();
        rig.ram().write(page.gpa + 512, &[0xff]).unwrap();
        rig.submit(&chain);
        let mut st = [0u8];
        rig.ram().read(page.gpa + 512, &mut st).unwrap();
        let after = rig.stats.snapshot();
        assert_eq!(st[0], blk::S_OK, "request {kind}: {before:?} -> {after:?}");
        assert_eq!(after.access_fails, before.access_fails);
        for &a in &iovas {
            d.unmap_single(a, 4096, dir).unwrap();
        }
        for (i, b) in bufs.iter().enumerate() {
            let (mut got, at) = (vec![0u8; 4096], i as u64 * 4096);
            if kind == blk::T_IN {
                rig.ram().read(b.gpa, &mut got).unwrap();
                assert!(got == (at..at + 4096).map(disk_byte).collect::<Vec<_>>(), "IN page {i}");
            } else {
                rig.disk.read_exact_at(&mut got, at).unwrap();
                assert!(got == pattern(i as u8, 4096), "OUT page {i}");
            }
        }
    }
    rig.finish();
}
