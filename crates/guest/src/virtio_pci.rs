//! The virtio-pci modern transport (virtio 1.2 §4.1.4) over a sysfs-mapped
//! BAR: common, notify, ISR and device-config structures.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use viommu_driver::transport::pci_caps::{CapRegion, VirtioCaps};
use viommu_driver::transport::{QueueAddrs, Transport, UsedWaiter};

use crate::pci::{regs, Mmio, PciDevice};
use crate::uio::UioIrq;
use crate::Error;

/// Offsets in the common configuration structure.
mod common {
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    pub const DEVICE_FEATURE: usize = 0x04;
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    pub const DRIVER_FEATURE: usize = 0x0c;
    pub const NUM_QUEUES: usize = 0x12;
    pub const DEVICE_STATUS: usize = 0x14;
    pub const CONFIG_GENERATION: usize = 0x15;
    pub const QUEUE_SELECT: usize = 0x16;
    pub const QUEUE_SIZE: usize = 0x18;
    pub const QUEUE_ENABLE: usize = 0x1c;
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    pub const QUEUE_DESC: usize = 0x20;
    pub const QUEUE_DRIVER: usize = 0x28;
    pub const QUEUE_DEVICE: usize = 0x30;
}

/// The virtio structures of `pci`, from its capability list.
pub fn virtio_caps(pci: &PciDevice) -> Result<VirtioCaps, Error> {
    let caps = pci.capabilities()?;
    VirtioCaps::parse(caps.iter().map(|c| &c.bytes[..])).map_err(|e| Error::Device(e.to_string()))
}

/// A window into a mapped BAR: offsets are relative to the window and checked.
#[derive(Clone, Debug)]
struct Window {
    bar: Arc<Mmio>,
    base: usize,
    len: usize,
}

impl Window {
    fn new(bars: &[Option<Arc<Mmio>>; 6], r: CapRegion) -> Result<Self, Error> {
        let bar = bars[r.bar as usize].clone().expect("BARs of all capabilities are mapped");
        let (base, len) = (r.offset as usize, r.length as usize);
        if base.checked_add(len).is_none_or(|end| end > bar.len()) {
            return Err(Error::Device(format!(
                "virtio structure at {base:#x}+{len:#x} is outside BAR {} ({:#x} bytes)",
                r.bar,
                bar.len()
            )));
        }
        Ok(Self { bar, base, len })
    }

    fn check(&self, offset: usize, size: usize) -> usize {
        assert!(
            offset + size <= self.len,
            "access at {offset:#x} outside a {:#x} window",
            self.len
        );
        self.base + offset
    }

    fn r8(&self, o: usize) -> u8 {
        self.bar.read8(self.check(o, 1))
    }
    fn r16(&self, o: usize) -> u16 {
        self.bar.read16(self.check(o, 2))
    }
    fn r32(&self, o: usize) -> u32 {
        self.bar.read32(self.check(o, 4))
    }
    fn w8(&self, o: usize, v: u8) {
        self.bar.write8(self.check(o, 1), v)
    }
    fn w16(&self, o: usize, v: u16) {
        self.bar.write16(self.check(o, 2), v)
    }
    fn w32(&self, o: usize, v: u32) {
        self.bar.write32(self.check(o, 4), v)
    }
    /// 64-bit registers as two 32-bit halves, low first.
    fn w64(&self, o: usize, v: u64) {
        self.w32(o, v as u32);
        self.w32(o + 4, (v >> 32) as u32);
    }
}

/// Counts accesses that QEMU traces, so the guest can tell the host which
/// trace line corresponds to which moment (see `scripts/real-guest`).
#[derive(Clone, Debug, Default)]
pub struct TransportCounters {
    /// Write accesses to the device-config structure (QEMU traces each).
    pub config_writes: Arc<AtomicU64>,
    /// Notifications sent, per queue 0 and 1 (other queues are not counted).
    pub notifies: [Arc<AtomicU64>; 2],
    /// Interrupts waited for and taken (with [`PciTransport::enable_interrupts`]).
    pub interrupts: Arc<AtomicU64>,
}

/// Marks a moment in QEMU's trace: rewrites one device-config byte with
/// the value it holds, which QEMU traces as a config write (for the
/// virtio-iommu: `virtio_iommu_set_config`) and which changes nothing.
/// Shares the write counter with its transport, so the count it returns is
/// the ordinal of the traced event.
#[derive(Clone, Debug)]
pub struct ConfigMarker {
    window: Window,
    offset: usize,
    writes: Arc<AtomicU64>,
}

impl ConfigMarker {
    /// Makes the traced write; returns how many config writes the
    /// transport has made so far, this one included.
    pub fn mark(&self) -> u64 {
        let v = self.window.r8(self.offset);
        self.window.w8(self.offset, v);
        self.writes.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// A virtio-pci modern device driven from Linux userspace.
///
/// ```no_run
/// use viommu_driver::Transport;
/// let mut t = viommu_guest::virtio_pci::PciTransport::open("00:04.0").unwrap();
/// t.set_status(0);
/// let features = t.device_features();
/// assert!(features & (1 << 32) != 0, "a modern device offers VERSION_1");
/// ```
#[derive(Debug)]
pub struct PciTransport {
    pci: PciDevice,
    common: Window,
    notify: Window,
    notify_mult: u32,
    isr: Window,
    device: Option<Window>,
    notify_offs: Vec<Option<u16>>,
    counters: TransportCounters,
    /// The function's interrupt, once [`PciTransport::enable_interrupts`] bound it.
    irq: Option<Arc<UioIrq>>,
}

impl PciTransport {
    /// Takes the function at `bdf` from the kernel: unbinds its driver,
    /// enables it with memory space, bus mastering and INTx off, and maps
    /// the BARs that hold its virtio structures.
    pub fn open(bdf: &str) -> Result<Self, Error> {
        let pci = PciDevice::open(bdf)?;
        let (vendor, device_id) = pci.ids()?;
        if vendor != 0x1af4 || !(0x1040..=0x107f).contains(&device_id) {
            return Err(Error::Device(format!(
                "{bdf}: {vendor:04x}:{device_id:04x} is not a modern virtio-pci device"
            )));
        }
        pci.unbind()?;
        pci.enable()?;
        pci.set_command(regs::CMD_MEM | regs::CMD_BUS_MASTER | regs::CMD_INTX_DISABLE)?;
        let caps = virtio_caps(&pci)?;
        let isr_region =
            caps.isr.ok_or_else(|| Error::Device(format!("{bdf}: no virtio ISR capability")))?;
        let mut bars: [Option<Arc<Mmio>>; 6] = Default::default();
        for r in [Some(caps.common), Some(caps.notify), Some(isr_region), caps.device]
            .into_iter()
            .flatten()
        {
            if bars[r.bar as usize].is_none() {
                bars[r.bar as usize] = Some(pci.map_bar(r.bar)?);
            }
        }
        let common = Window::new(&bars, caps.common)?;
        let notify = Window::new(&bars, caps.notify)?;
        let isr = Window::new(&bars, isr_region)?;
        let device = caps.device.map(|r| Window::new(&bars, r)).transpose()?;
        let num_queues = common.r16(common::NUM_QUEUES) as usize;
        Ok(Self {
            pci,
            common,
            notify,
            notify_mult: caps.notify_off_multiplier,
            isr,
            device,
            notify_offs: vec![None; num_queues],
            counters: TransportCounters::default(),
            irq: None,
        })
    }

    /// The PCI function.
    pub fn pci(&self) -> &PciDevice {
        &self.pci
    }

    /// Number of queues the device has.
    pub fn num_queues(&self) -> u16 {
        self.notify_offs.len() as u16
    }

    /// Completes by interrupt from now on, through the function's uio
    /// device (see [`crate::uio`]; the module must be loaded), so that [`Transport::wait_for_used`]
    /// and the [`UsedWaiter`] block until the device interrupts, instead of
    /// spinning. The queues' drivers must ask for interrupts (no
    /// `VIRTQ_AVAIL_F_NO_INTERRUPT`).
    pub fn enable_interrupts(&mut self) -> Result<(), Error> {
        if self.irq.is_none() {
            let irq = UioIrq::open(self.pci.bdf())?;
            self.counters.interrupts = irq.taken();
            self.irq = Some(Arc::new(irq));
        }
        Ok(())
    }

    /// Reads (and so clears) the ISR status byte.
    pub fn read_isr(&mut self) -> u8 {
        self.isr.r8(0)
    }

    /// Shared counters of traced accesses.
    pub fn counters(&self) -> TransportCounters {
        self.counters.clone()
    }

    /// A handle that makes config writes QEMU traces, to mark moments in
    /// its trace; see [`ConfigMarker`]. `None` without a device config.
    pub fn marker(&self, offset: usize) -> Option<ConfigMarker> {
        let window = self.device.clone()?;
        (offset < window.len).then(|| ConfigMarker {
            window,
            offset,
            writes: self.counters.config_writes.clone(),
        })
    }

    fn select_queue(&mut self, queue: u16) {
        self.common.w16(common::QUEUE_SELECT, queue);
    }

    fn notify_offset(&mut self, queue: u16) -> Option<usize> {
        let slot = self.notify_offs.get(queue as usize).copied()?;
        let off = match slot {
            Some(off) => off,
            None => {
                self.select_queue(queue);
                let off = self.common.r16(common::QUEUE_NOTIFY_OFF);
                self.notify_offs[queue as usize] = Some(off);
                off
            }
        };
        Some(off as usize * self.notify_mult as usize)
    }

    fn device_window(&self) -> &Window {
        self.device.as_ref().expect("device has no device-config structure")
    }
}

impl Transport for PciTransport {
    fn device_features(&mut self) -> u64 {
        self.common.w32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common.r32(common::DEVICE_FEATURE);
        self.common.w32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common.r32(common::DEVICE_FEATURE);
        (hi as u64) << 32 | lo as u64
    }

    fn set_driver_features(&mut self, features: u64) {
        self.common.w32(common::DRIVER_FEATURE_SELECT, 0);
        self.common.w32(common::DRIVER_FEATURE, features as u32);
        self.common.w32(common::DRIVER_FEATURE_SELECT, 1);
        self.common.w32(common::DRIVER_FEATURE, (features >> 32) as u32);
    }

    fn status(&mut self) -> u8 {
        self.common.r8(common::DEVICE_STATUS)
    }

    fn set_status(&mut self, status: u8) {
        self.common.w8(common::DEVICE_STATUS, status);
        if status == 0 {
            // Reset completes when the status reads back 0 (§4.1.4.3.2).
            // QEMU resets synchronously; the bound covers anything else.
            for _ in 0..1_000_000 {
                if self.common.r8(common::DEVICE_STATUS) == 0 {
                    break;
                }
                std::hint::spin_loop();
            }
            self.notify_offs.iter_mut().for_each(|o| *o = None);
        }
    }

    fn max_queue_size(&mut self, queue: u16) -> u16 {
        if queue >= self.num_queues() {
            return 0;
        }
        self.select_queue(queue);
        self.common.r16(common::QUEUE_SIZE)
    }

    fn setup_queue(&mut self, queue: u16, size: u16, addrs: QueueAddrs) {
        self.select_queue(queue);
        self.common.w16(common::QUEUE_SIZE, size);
        self.common.w64(common::QUEUE_DESC, addrs.desc);
        self.common.w64(common::QUEUE_DRIVER, addrs.avail);
        self.common.w64(common::QUEUE_DEVICE, addrs.used);
        let off = self.common.r16(common::QUEUE_NOTIFY_OFF);
        if let Some(slot) = self.notify_offs.get_mut(queue as usize) {
            *slot = Some(off);
        }
        self.common.w16(common::QUEUE_ENABLE, 1);
    }

    fn notify(&mut self, queue: u16) {
        let Some(off) = self.notify_offset(queue) else { return };
        if let Some(c) = self.counters.notifies.get(queue as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.notify.w16(off, queue);
    }

    fn read_config(&mut self, offset: usize, buf: &mut [u8]) {
        let w = self.device_window().clone();
        let mut i = 0;
        while i < buf.len() {
            let o = offset + i;
            let left = buf.len() - i;
            // Natural width: 32-bit where aligned, then 16, then bytes.
            if o % 4 == 0 && left >= 4 {
                buf[i..i + 4].copy_from_slice(&w.r32(o).to_le_bytes());
                i += 4;
            } else if o % 2 == 0 && left >= 2 {
                buf[i..i + 2].copy_from_slice(&w.r16(o).to_le_bytes());
                i += 2;
            } else {
                buf[i] = w.r8(o);
                i += 1;
            }
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        let w = self.device_window().clone();
        let mut i = 0;
        while i < data.len() {
            let o = offset + i;
            let left = data.len() - i;
            if o % 4 == 0 && left >= 4 {
                w.w32(o, u32::from_le_bytes(data[i..i + 4].try_into().expect("4 bytes")));
                i += 4;
            } else if o % 2 == 0 && left >= 2 {
                w.w16(o, u16::from_le_bytes([data[i], data[i + 1]]));
                i += 2;
            } else {
                w.w8(o, data[i]);
                i += 1;
            }
            self.counters.config_writes.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn config_generation(&mut self) -> u32 {
        self.common.r8(common::CONFIG_GENERATION) as u32
    }

    fn wait_for_used(&mut self, _queue: u16) {
        match &self.irq {
            Some(irq) => wait_for_interrupt(&self.isr, irq),
            None => core::hint::spin_loop(),
        }
    }

    fn used_waiter(&mut self) -> Option<Box<dyn UsedWaiter>> {
        let irq = self.irq.clone()?;
        Some(Box::new(IrqWaiter { isr: self.isr.clone(), irq }))
    }
}

/// How long one wait for an interrupt blocks at most: the driver checks its
/// own timeout between waits.
const IRQ_WAIT: Duration = Duration::from_millis(10);

/// Acknowledges the device's interrupt, unmasks the line and blocks until
/// an interrupt or [`IRQ_WAIT`]. Reading the ISR lowers the device's INTx
/// (QEMU), and the line stays masked from the kernel's handler to our
/// unmask, so a completion posted at any point before the unmask raises it
/// again on unmask, and one posted after raises it then: none is missed.
fn wait_for_interrupt(isr: &Window, irq: &UioIrq) {
    let _ = isr.r8(0);
    if irq.unmask().is_err() || irq.wait(IRQ_WAIT).is_err() {
        // A broken uio device: the driver's re-check and timeout still bound
        // the wait; do not spin hot.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The [`UsedWaiter`] of an interrupt-driven [`PciTransport`]: threads
/// block on the uio device, not on the transport. With more than one
/// waiter, one takes each interrupt and the others wake at [`IRQ_WAIT`].
struct IrqWaiter {
    isr: Window,
    irq: Arc<UioIrq>,
}

impl UsedWaiter for IrqWaiter {
    fn wait_for_used(&self, _queue: u16) {
        wait_for_interrupt(&self.isr, &self.irq);
    }
}
