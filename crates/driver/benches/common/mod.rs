//! What both driver benches share: the device model behind the fake (the
//! tests' own), a clock the bench moves by hand, and one virtio-blk-like I/O
//! (header, data, status byte in the header's page).

use std::sync::atomic::{AtomicU64, Ordering};

use viommu_driver::dma::{DmaDirection as Dir, DmaDomain, DmaPlatform};

// The tests' adapter, whose state checks the benches do not use.
#[allow(dead_code)]
#[path = "../../tests/common/device.rs"]
mod device;
pub use device::{device_config, FakeDevice};

/// A clock the bench advances itself, so flush timeouts fire at fixed points.
pub struct Clock(pub AtomicU64);

impl DmaPlatform for Clock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn cpu_id(&self) -> usize {
        0
    }
}

/// Bus address of the request header; the status byte follows it in the same page.
pub const HDR: u64 = 0x4000_0000;
/// Simulated time per I/O.
pub const IO_NS: u64 = 25_000;

/// Maps one I/O, unmaps it, then lets the flush timer run. With `batch`, every
/// buffer goes through one `begin`/`commit` (one sync); without it, one map
/// call per buffer, as Linux's virtio ring does.
pub fn blk_io(dma: &DmaDomain, clock: &Clock, segs: &[(u64, usize)], batch: bool) {
    if batch {
        let mut b = dma.begin();
        b.map(HDR, 16, Dir::ToDevice).unwrap();
        b.map_sg(segs, Dir::FromDevice).unwrap();
        b.map(HDR + 16, 1, Dir::FromDevice).unwrap();
        let mapping = b.commit().unwrap();
        dma.unmap(mapping).unwrap();
    } else {
        let h = dma.map_single(HDR, 16, Dir::ToDevice).unwrap();
        let d = dma.map_sg(segs, Dir::FromDevice).unwrap();
        let s = dma.map_single(HDR + 16, 1, Dir::FromDevice).unwrap();
        dma.unmap_single(h, 16, Dir::ToDevice).unwrap();
        dma.unmap_sg(d).unwrap();
        dma.unmap_single(s, 1, Dir::FromDevice).unwrap();
    }
    clock.0.fetch_add(IO_NS, Ordering::Relaxed);
    dma.tick().unwrap();
}
