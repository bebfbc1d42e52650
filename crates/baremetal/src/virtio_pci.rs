//! The virtio-pci modern transport (virtio 1.2 §4.1.4) over memory-mapped
//! BARs: viommu-driver's [`Transport`], for the virtio-iommu and for our
//! hand-built virtio-blk path.
//!
//! Register access goes through [`Mmio`] (volatile loads and stores in the
//! kernel binary, a recording fake in the tests). The transport counts
//! its config writes and notifies, which QEMU traces: a [`ConfigMarker`]
//! uses the count to say which trace line a moment is (scripts/real-guest).

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use viommu_driver::transport::{QueueAddrs, Transport};

use crate::pci::{Bar, CapRegion, VirtioCaps};

/// Offsets in the common configuration structure (§4.1.4.3).
mod common {
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    pub const DEVICE_FEATURE: u64 = 0x04;
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    pub const DRIVER_FEATURE: u64 = 0x0c;
    pub const NUM_QUEUES: u64 = 0x12;
    pub const DEVICE_STATUS: u64 = 0x14;
    pub const CONFIG_GENERATION: u64 = 0x15;
    pub const QUEUE_SELECT: u64 = 0x16;
    pub const QUEUE_SIZE: u64 = 0x18;
    pub const QUEUE_ENABLE: u64 = 0x1c;
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    pub const QUEUE_DESC: u64 = 0x20;
    pub const QUEUE_DRIVER: u64 = 0x28;
    pub const QUEUE_DEVICE: u64 = 0x30;
}

/// Device registers at physical addresses.
pub trait Mmio: Clone + Send {
    /// Reads a byte.
    fn read8(&self, addr: u64) -> u8;
    /// Reads 16 bits.
    fn read16(&self, addr: u64) -> u16;
    /// Reads 32 bits.
    fn read32(&self, addr: u64) -> u32;
    /// Writes a byte.
    fn write8(&self, addr: u64, v: u8);
    /// Writes 16 bits.
    fn write16(&self, addr: u64, v: u16);
    /// Writes 32 bits.
    fn write32(&self, addr: u64, v: u32);
}

/// A virtio structure at a physical address. Accesses outside it, which
/// only a device's own numbers (a short structure, a `queue_notify_off`)
/// can cause, read as all ones and write nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Physical address of byte 0.
    pub base: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Window {
    /// The window of `r` in a function whose BARs are `bars`; `None` if
    /// that BAR is not assigned or the structure does not fit in it.
    pub fn of(r: CapRegion, bars: &[Option<Bar>; 6]) -> Option<Self> {
        let bar = bars.get(r.bar as usize).copied().flatten()?;
        let end = (r.offset as u64).checked_add(r.length as u64)?;
        (end <= bar.size).then(|| Self { base: bar.addr + r.offset as u64, len: r.length as u64 })
    }

    fn at(&self, offset: u64, size: u64) -> Option<u64> {
        let end = offset.checked_add(size)?;
        (end <= self.len).then(|| self.base + offset)
    }
}

/// How a config access of `len` bytes at `offset` is split: natural widths,
/// 32 bits where aligned, then 16, then bytes. Each piece is one register
/// access, and QEMU traces each config write on its own.
pub fn access_widths(offset: usize, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut at = 0;
    core::iter::from_fn(move || {
        let left = len.checked_sub(at).filter(|&l| l > 0)?;
        let o = offset + at;
        let w = if o % 4 == 0 && left >= 4 {
            4
        } else if o % 2 == 0 && left >= 2 {
            2
        } else {
            1
        };
        at += w;
        Some((at - w, w))
    })
}

/// Config writes and notifies a transport made, shared with its markers.
#[derive(Debug, Default)]
pub struct Counters {
    /// Write accesses to the device-config structure (QEMU traces each).
    pub config_writes: AtomicU64,
    /// Notifications of queue 0 and 1.
    pub notifies: [AtomicU64; 2],
    /// Register accesses that fell outside their structure (dropped).
    pub out_of_window: AtomicU64,
}

/// A virtio-pci modern device.
#[derive(Clone, Debug)]
pub struct PciTransport<M: Mmio> {
    mmio: M,
    common: Window,
    notify: Window,
    notify_mult: u32,
    device: Option<Window>,
    notify_offs: Vec<Option<u16>>,
    counters: Arc<Counters>,
}

impl<M: Mmio> PciTransport<M> {
    /// The transport of a function whose virtio capabilities are `caps`
    /// and BARs `bars` (memory decoding must be on). `None` if a structure
    /// lies in an unassigned BAR.
    pub fn new(mmio: M, caps: &VirtioCaps, bars: &[Option<Bar>; 6]) -> Option<Self> {
        let common = Window::of(caps.common, bars)?;
        let notify = Window::of(caps.notify, bars)?;
        let device = match caps.device {
            Some(r) => Some(Window::of(r, bars)?),
            None => None,
        };
        // VirtioCaps::parse checked that the common structure has all its registers.
        let num_queues = mmio.read16(common.at(common::NUM_QUEUES, 2)?) as usize;
        Some(Self {
            mmio,
            common,
            notify,
            notify_mult: caps.notify_off_multiplier,
            device,
            notify_offs: vec![None; num_queues],
            counters: Arc::default(),
        })
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.notify_offs.len() as u16
    }

    /// The shared counters of traced accesses.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// A marker that rewrites device-config byte `offset`; `None` without
    /// a device config or outside it.
    pub fn marker(&self, offset: u64) -> Option<ConfigMarker<M>> {
        let w = self.device?;
        (offset < w.len).then(|| ConfigMarker {
            mmio: self.mmio.clone(),
            addr: w.base + offset,
            counters: self.counters.clone(),
        })
    }

    fn read(&self, w: Window, o: u64, size: u64) -> u32 {
        let Some(a) = w.at(o, size) else {
            self.counters.out_of_window.fetch_add(1, Ordering::Relaxed);
            return u32::MAX;
        };
        match size {
            1 => self.mmio.read8(a) as u32,
            2 => self.mmio.read16(a) as u32,
            _ => self.mmio.read32(a),
        }
    }

    fn write(&self, w: Window, o: u64, size: u64, v: u32) {
        let Some(a) = w.at(o, size) else {
            self.counters.out_of_window.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match size {
            1 => self.mmio.write8(a, v as u8),
            2 => self.mmio.write16(a, v as u16),
            _ => self.mmio.write32(a, v),
        }
    }

    fn r8(&self, o: u64) -> u8 {
        self.read(self.common, o, 1) as u8
    }
    fn r16(&self, o: u64) -> u16 {
        self.read(self.common, o, 2) as u16
    }
    fn r32(&self, o: u64) -> u32 {
        self.read(self.common, o, 4)
    }
    fn w8(&self, o: u64, v: u8) {
        self.write(self.common, o, 1, v as u32)
    }
    fn w16(&self, o: u64, v: u16) {
        self.write(self.common, o, 2, v as u32)
    }
    fn w32(&self, o: u64, v: u32) {
        self.write(self.common, o, 4, v)
    }
    /// 64-bit fields as two 32-bit halves, low first (§4.1.3.1).
    fn w64(&self, o: u64, v: u64) {
        self.w32(o, v as u32);
        self.w32(o + 4, (v >> 32) as u32);
    }

    /// The device config; a device without one has an empty window.
    fn device_window(&self) -> Window {
        self.device.unwrap_or(Window { base: 0, len: 0 })
    }
}

impl<M: Mmio> Transport for PciTransport<M> {
    fn device_features(&mut self) -> u64 {
        self.w32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.r32(common::DEVICE_FEATURE);
        self.w32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.r32(common::DEVICE_FEATURE);
        (hi as u64) << 32 | lo as u64
    }

    fn set_driver_features(&mut self, features: u64) {
        self.w32(common::DRIVER_FEATURE_SELECT, 0);
        self.w32(common::DRIVER_FEATURE, features as u32);
        self.w32(common::DRIVER_FEATURE_SELECT, 1);
        self.w32(common::DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn status(&mut self) -> u8 {
        self.r8(common::DEVICE_STATUS)
    }

    fn set_status(&mut self, status: u8) {
        self.w8(common::DEVICE_STATUS, status);
        if status == 0 {
            // "The driver MUST wait for a read of device_status to return 0
            // before reinitializing the device" (§4.1.4.3.2); bounded here.
            for _ in 0..1_000_000 {
                if self.r8(common::DEVICE_STATUS) == 0 {
                    break;
                }
                core::hint::spin_loop();
            }
            self.notify_offs.iter_mut().for_each(|o| *o = None);
        }
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        if queue >= self.num_queues() {
            return 0;
        }
        self.w16(common::QUEUE_SELECT, queue);
        self.r16(common::QUEUE_SIZE)
    }

    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.w16(common::QUEUE_SELECT, queue);
        self.w16(common::QUEUE_SIZE, size);
        self.w64(common::QUEUE_DESC, addrs.desc);
        self.w64(common::QUEUE_DRIVER, addrs.avail);
        self.w64(common::QUEUE_DEVICE, addrs.used);
        let off = self.r16(common::QUEUE_NOTIFY_OFF);
        if let Some(slot) = self.notify_offs.get_mut(queue as usize) {
            *slot = Some(off);
        }
        self.w16(common::QUEUE_ENABLE, 1);
    }

    fn notify(&mut self, queue: u16) {
        let Some(slot) = self.notify_offs.get(queue as usize).copied() else { return };
        let off = match slot {
            Some(off) => off,
            None => {
                self.w16(common::QUEUE_SELECT, queue);
                let off = self.r16(common::QUEUE_NOTIFY_OFF);
                self.notify_offs[queue as usize] = Some(off);
                off
            }
        };
        if let Some(c) = self.counters.notifies.get(queue as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        // "queue_notify_off * notify_off_multiplier" from the notify base (§4.1.4.4).
        let at = off as u64 * self.notify_mult as u64;
        self.write(self.notify, at, 2, queue as u32);
    }

    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        let w = self.device_window();
        for (i, width) in access_widths(offset, buf.len()) {
            let v = self.read(w, (offset + i) as u64, width as u64).to_le_bytes();
            buf[i..i + width].copy_from_slice(&v[..width]);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let w = self.device_window();
        for (i, width) in access_widths(offset, data.len()) {
            let mut v = [0u8; 4];
            v[..width].copy_from_slice(&data[i..i + width]);
            self.write(w, (offset + i) as u64, width as u64, u32::from_le_bytes(v));
            self.counters.config_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn config_generation(&mut self) -> u32 {
        self.r8(common::CONFIG_GENERATION) as u32
    }
}

/// Marks a moment in QEMU's trace: rewrites one device-config byte with
/// the value it holds (for the virtio-iommu QEMU traces
/// `virtio_iommu_set_config`; nothing changes).
#[derive(Clone, Debug)]
pub struct ConfigMarker<M: Mmio> {
    mmio: M,
    addr: u64,
    counters: Arc<Counters>,
}

impl<M: Mmio> ConfigMarker<M> {
    /// The counters whose config writes the marks are numbered among.
    pub fn counters(&self) -> Arc<Counters> {
        self.counters.clone()
    }

    /// Makes the traced write; returns the ordinal of this config write
    /// among all of its transport's.
    pub fn mark(&self) -> u64 {
        let v = self.mmio.read8(self.addr);
        self.mmio.write8(self.addr, v);
        self.counters.config_writes.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Any transport, with its config writes and notifies counted in
/// `counters` as [`PciTransport`] counts its own: so that a marker keeps
/// numbering the trace's config writes when another transport (such as
/// viommu-driver's `VdTransport` over virtio-drivers' `PciTransport`)
/// drives the device. The count assumes the inner transport splits config
/// writes by [`access_widths`], as virtio-drivers does.
#[derive(Debug)]
pub struct Counting<T> {
    inner: T,
    counters: Arc<Counters>,
}

impl<T: Transport> Counting<T> {
    /// Counts `inner`'s accesses in `counters`.
    pub fn new(inner: T, counters: Arc<Counters>) -> Self {
        Self { inner, counters }
    }
}

impl<T: Transport> Transport for Counting<T> {
    fn device_features(&mut self) -> u64 {
        self.inner.device_features()
    }
    fn set_driver_features(&mut self, features: u64) {
        self.inner.set_driver_features(features)
    }
    fn status(&mut self) -> u8 {
        self.inner.status()
    }
    fn set_status(&mut self, status: u8) {
        self.inner.set_status(status)
    }
    fn max_queue_size(&mut self, queue: u16) -> u16 {
        self.inner.max_queue_size(queue)
    }
    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.inner.setup_queue(queue, size, addrs)
    }
    fn notify(&mut self, queue: u16) {
        if let Some(c) = self.counters.notifies.get(queue as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.notify(queue)
    }
    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        self.inner.read_config(offset, buf)
    }
    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let n = access_widths(offset, data.len()).count() as u64;
        self.counters.config_writes.fetch_add(n, Ordering::Relaxed);
        self.inner.write_config(offset, data)
    }
    fn config_generation(&mut self) -> u32 {
        self.inner.config_generation()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::tests::{virtio_function, FakeConfig};
    use crate::pci::{capabilities, memory_bars, Bdf};
    use std::sync::Mutex;

    /// Register bytes from `BASE`, and a log of (offset, value) writes.
    type Regs = (Vec<u8>, Vec<(u64, u32)>);

    #[derive(Clone, Default)]
    struct FakeMmio(Arc<Mutex<Regs>>);

    const BASE: u64 = 0x8_0000_4000;

    impl FakeMmio {
        fn get(&self, addr: u64, n: usize) -> u32 {
            let m = self.0.lock().unwrap();
            let o = (addr - BASE) as usize;
            m.0[o..o + n].iter().rev().fold(0, |a, &b| a << 8 | b as u32)
        }
        fn put(&self, addr: u64, n: usize, v: u32) {
            let mut m = self.0.lock().unwrap();
            let o = (addr - BASE) as usize;
            m.0[o..o + n].copy_from_slice(&v.to_le_bytes()[..n]);
            m.1.push((addr - BASE, v));
        }
        fn writes(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut self.0.lock().unwrap().1)
        }
    }

    impl Mmio for FakeMmio {
        fn read8(&self, a: u64) -> u8 {
            self.get(a, 1) as u8
        }
        fn read16(&self, a: u64) -> u16 {
            self.get(a, 2) as u16
        }
        fn read32(&self, a: u64) -> u32 {
            self.get(a, 4)
        }
        fn write8(&self, a: u64, v: u8) {
            self.put(a, 1, v as u32)
        }
        fn write16(&self, a: u64, v: u16) {
            self.put(a, 2, v as u32)
        }
        fn write32(&self, a: u64, v: u32) {
            self.put(a, 4, v)
        }
    }

    fn transport() -> (PciTransport<FakeMmio>, FakeMmio) {
        let mut cs = FakeConfig::default();
        let at = Bdf { bus: 0, dev: 4, func: 0 };
        virtio_function(&mut cs, at, 0x1057);
        let caps = crate::pci::virtio_caps(&capabilities(&mut cs, at)).unwrap();
        let bars = memory_bars(&mut cs, at);
        let mmio = FakeMmio::default();
        mmio.0.lock().unwrap().0 = vec![0u8; 0x4000];
        mmio.put(BASE + common::NUM_QUEUES, 2, 2);
        mmio.put(BASE + common::QUEUE_NOTIFY_OFF, 2, 3);
        mmio.writes();
        (PciTransport::new(mmio.clone(), &caps, &bars).unwrap(), mmio)
    }

    #[test]
    fn queue_setup_and_notify_hit_the_registers_the_spec_names() {
        let (mut t, mmio) = transport();
        assert_eq!(t.num_queues(), 2);
        assert_eq!(t.max_queue_size(2), 0, "no such queue");
        t.setup_queue(1, 64, QueueAddrs { desc: 0x1_0000_2000, avail: 0x3000, used: 0x4000 });
        assert_eq!(
            mmio.writes(),
            [
                (0x16, 1),
                (0x18, 64),
                (0x20, 0x2000),
                (0x24, 1),
                (0x28, 0x3000),
                (0x2c, 0),
                (0x30, 0x4000),
                (0x34, 0),
                (0x1c, 1)
            ]
        );
        t.notify(1);
        // The notify area is at 0x3000 of the BAR; off 3 × multiplier 4.
        assert_eq!(mmio.writes(), [(0x3000 + 12, 1)]);
        t.notify(7);
        assert!(mmio.writes().is_empty(), "a queue the device lacks is not notified");
        assert_eq!(t.counters().notifies[1].load(Ordering::Relaxed), 1);
    }

    #[test]
    fn config_accesses_use_natural_widths_and_markers_count_the_writes() {
        let (mut t, mmio) = transport();
        t.write_config(1, &[1, 2, 3, 4, 5, 6, 7]);
        // Bytes 1, 2-3, 4-7 of the device config at 0x2000.
        assert_eq!(mmio.writes(), [(0x2001, 1), (0x2002, 0x0302), (0x2004, 0x0706_0504)]);
        let mut b = [0u8; 7];
        t.read_config(1, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7]);
        let m = t.marker(36).unwrap();
        assert_eq!(m.mark(), 4, "three writes of the transport, then the marker's");
        assert_eq!(mmio.writes(), [(0x2000 + 36, 0)]);
        assert!(t.marker(0x1000).is_none());
    }

    #[test]
    fn the_devices_numbers_cannot_move_an_access_out_of_its_structure() {
        let (mut t, mmio) = transport();
        // queue_notify_off 0x400 × multiplier 4 is past the 4 KiB notify area.
        mmio.put(BASE + common::QUEUE_NOTIFY_OFF, 2, 0x400);
        t.setup_queue(0, 8, QueueAddrs { desc: 0, avail: 0, used: 0 });
        mmio.writes();
        t.notify(0);
        assert!(mmio.writes().is_empty(), "the notify is dropped");
        let mut b = [0u8; 6];
        t.read_config(0xffe, &mut b);
        assert_eq!(b, [0, 0, 0xff, 0xff, 0xff, 0xff], "past the device config: all ones");
        assert_eq!(
            t.counters().out_of_window.load(Ordering::Relaxed),
            2,
            "the notify and one read"
        );
        // A structure that does not fit in its BAR gives no window.
        let bar = Some(Bar { addr: BASE, size: 0x4000 });
        let bars = [None, None, None, None, bar, None];
        assert!(Window::of(CapRegion { bar: 4, offset: 0x3000, length: 0x1000 }, &bars).is_some());
        assert!(Window::of(CapRegion { bar: 4, offset: 0x3001, length: 0x1000 }, &bars).is_none());
        assert!(Window::of(CapRegion { bar: 2, offset: 0, length: 4 }, &bars).is_none());
    }

    #[test]
    fn access_widths_are_natural_and_counting_counts_them() {
        let w: Vec<_> = access_widths(1, 7).collect();
        assert_eq!(w, [(0, 1), (1, 2), (3, 4)]);
        assert_eq!(access_widths(36, 1).collect::<Vec<_>>(), [(0, 1)]);
        assert_eq!(access_widths(8, 0).count(), 0);
        let (t, mmio) = transport();
        let counters = Arc::new(Counters::default());
        let mut c = Counting::new(t, counters.clone());
        c.write_config(1, &[1, 2, 3, 4, 5, 6, 7]);
        c.notify(1);
        assert_eq!(counters.config_writes.load(Ordering::Relaxed), 3);
        assert_eq!(counters.notifies[1].load(Ordering::Relaxed), 1);
        // The inner transport made the accesses: 3 config writes, then the
        // queue select that finds queue 1's notify offset, and the notify.
        assert_eq!(mmio.writes().len(), 5);
    }

    #[test]
    fn features_are_read_and_written_as_two_halves() {
        let (mut t, mmio) = transport();
        t.set_driver_features(0x1_0000_0003);
        assert_eq!(mmio.writes(), [(0x08, 0), (0x0c, 3), (0x08, 1), (0x0c, 1)]);
    }
}
