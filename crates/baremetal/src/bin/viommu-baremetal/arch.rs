//! The machine: port I/O, MMIO, the TSC, the PCI configuration ports and
//! QEMU's `isa-debug-exit` device.

use core::arch::asm;

use viommu_baremetal::pci::{cam_address, Bdf, ConfigSpace};
use viommu_baremetal::virtio_pci::Mmio;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the ports
    // used are the serial line, PCI config and the exit device.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Writes 32 bits to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as in `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads 32 bits from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as in `outb`.
    unsafe {
        asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags))
    }
    v
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc reads a counter; no memory is touched.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (hi as u64) << 32 | lo as u64
}

/// Ends the run through QEMU's `isa-debug-exit` at port 0xf4: QEMU exits
/// with status `code << 1 | 1`. Without the device, halts.
pub fn exit(code: u8) -> ! {
    outb(0xf4, code);
    loop {
        // SAFETY: hlt with interrupts off stops the CPU; nothing follows.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// PCI configuration mechanism #1: address to 0xcf8, data at 0xcfc.
pub struct PortConfig;

impl ConfigSpace for PortConfig {
    fn read32(&mut self, bdf: Bdf, offset: u8) -> u32 {
        outl(0xcf8, cam_address(bdf, offset));
        inl(0xcfc)
    }
    fn write32(&mut self, bdf: Bdf, offset: u8, v: u32) {
        outl(0xcf8, cam_address(bdf, offset));
        outl(0xcfc, v);
    }
}

/// Device registers through the identity map: volatile accesses at the
/// physical address. Only BAR windows found in config space are used.
#[derive(Clone, Copy, Debug)]
pub struct PhysMmio;

macro_rules! volatile {
    ($read:ident, $write:ident, $t:ty) => {
        fn $read(&self, addr: u64) -> $t {
            // SAFETY: `addr` is inside a BAR window that the paging module
            // mapped (crate::paging::map_mmio) and that config space gave;
            // aligned by the transport's register layout.
            unsafe { (addr as *const $t).read_volatile() }
        }
        fn $write(&self, addr: u64, v: $t) {
            // SAFETY: as for the read.
            unsafe { (addr as *mut $t).write_volatile(v) }
        }
    };
}

impl Mmio for PhysMmio {
    volatile!(read8, write8, u8);
    volatile!(read16, write16, u16);
    volatile!(read32, write32, u32);
}
