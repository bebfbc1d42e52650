//! PCI config space (PCI Local Bus 3.0 §6): a bounded scan of every bus,
//! the capability list, memory BARs, and the virtio-pci capabilities
//! (virtio 1.2 §4.1.4) that say where a device's registers are.
//!
//! Access goes through [`ConfigSpace`]: the kernel binary implements it with
//! the 0xcf8/0xcfc ports ([`cam_address`]), the tests with a fake.

use alloc::vec::Vec;

/// Config space offsets and bits.
pub mod regs {
    /// Vendor ID (16 bits); device ID in the upper half.
    pub const ID: u8 = 0x00;
    /// Command (16 bits); status in the upper half.
    pub const COMMAND: u8 = 0x04;
    /// Class code (upper 24 bits), revision.
    pub const CLASS: u8 = 0x08;
    /// Header type in byte 0x0e; bit 7: multi-function.
    pub const HEADER: u8 = 0x0c;
    /// First BAR.
    pub const BAR0: u8 = 0x10;
    /// Pointer to the first capability.
    pub const CAP_PTR: u8 = 0x34;
    /// Command: respond to memory-space accesses.
    pub const CMD_MEM: u16 = 1 << 1;
    /// Command: the function may master the bus (DMA).
    pub const CMD_BUS_MASTER: u16 = 1 << 2;
    /// Command: INTx interrupts off.
    pub const CMD_INTX_DISABLE: u16 = 1 << 10;
    /// Status: a capability list is present.
    pub const STATUS_CAP_LIST: u16 = 1 << 4;
    /// Capability ID of vendor-specific capabilities (virtio's).
    pub const CAP_ID_VENDOR: u8 = 0x09;
}

/// Bus, device and function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number, 0..32.
    pub dev: u8,
    /// Function number, 0..8.
    pub func: u8,
}

impl Bdf {
    /// The requester ID: `bus << 8 | dev << 3 | func`, which VIOT ranges use.
    pub fn rid(self) -> u16 {
        (self.bus as u16) << 8 | (self.dev as u16) << 3 | self.func as u16
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.dev, self.func)
    }
}

/// The 0xcf8 address of a dword of config space (configuration mechanism #1).
pub fn cam_address(bdf: Bdf, offset: u8) -> u32 {
    0x8000_0000
        | (bdf.bus as u32) << 16
        | (bdf.dev as u32 & 0x1f) << 11
        | (bdf.func as u32 & 7) << 8
        | (offset & 0xfc) as u32
}

/// Dword access to config space.
pub trait ConfigSpace {
    /// Reads the dword at `offset` (a multiple of 4); all ones if there is no function.
    fn read32(&mut self, bdf: Bdf, offset: u8) -> u32;
    /// Writes the dword at `offset`.
    fn write32(&mut self, bdf: Bdf, offset: u8, v: u32);

    /// Reads 16 bits at an even `offset`.
    fn read16(&mut self, bdf: Bdf, offset: u8) -> u16 {
        (self.read32(bdf, offset & 0xfc) >> ((offset & 2) * 8)) as u16
    }
    /// Reads the byte at `offset`.
    fn read8(&mut self, bdf: Bdf, offset: u8) -> u8 {
        (self.read32(bdf, offset & 0xfc) >> ((offset & 3) * 8)) as u8
    }
    /// Writes the command register, leaving the status register alone
    /// (its bits are write-one-to-clear).
    fn set_command(&mut self, bdf: Bdf, cmd: u16) {
        self.write32(bdf, regs::COMMAND, cmd as u32);
    }
}

/// A function found by [`scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class, subclass and programming interface.
    pub class: u32,
}

/// Every function on buses 0..=255: at most 256 × 32 × 8 reads of the ID.
pub fn scan(cs: &mut dyn ConfigSpace) -> Vec<Function> {
    let mut out = Vec::new();
    for bus in 0..=255u8 {
        for dev in 0..32u8 {
            for func in 0..8u8 {
                let bdf = Bdf { bus, dev, func };
                let id = cs.read32(bdf, regs::ID);
                let vendor = id as u16;
                if vendor == 0xffff || vendor == 0 {
                    if func == 0 {
                        break; // no device: no other functions either
                    }
                    continue;
                }
                out.push(Function {
                    bdf,
                    vendor,
                    device: (id >> 16) as u16,
                    class: cs.read32(bdf, regs::CLASS) >> 8,
                });
                let multi = cs.read8(bdf, regs::HEADER + 2) & 0x80 != 0;
                if func == 0 && !multi {
                    break;
                }
            }
        }
    }
    out
}

/// Longest capability copied out (virtio's notify capability is 20 bytes).
pub const CAP_BYTES: usize = 24;
/// Most capabilities followed: (256 - 64) / 4, the most that fit.
pub const MAX_CAPS: usize = 48;

/// One capability, as raw bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Capability ID (byte 0).
    pub id: u8,
    /// Its offset in config space.
    pub offset: u8,
    /// The first [`CAP_BYTES`] bytes (past the end of config space: 0).
    pub bytes: [u8; CAP_BYTES],
}

/// The capability list, at most [`MAX_CAPS`] entries: a loop or a pointer
/// into the header ends it.
pub fn capabilities(cs: &mut dyn ConfigSpace, bdf: Bdf) -> Vec<Capability> {
    let mut out = Vec::new();
    if cs.read16(bdf, regs::COMMAND + 2) & regs::STATUS_CAP_LIST == 0 {
        return out;
    }
    let mut ptr = cs.read8(bdf, regs::CAP_PTR) & 0xfc;
    while ptr >= 0x40 && out.len() < MAX_CAPS {
        let mut bytes = [0u8; CAP_BYTES];
        for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
            let off = ptr as usize + i * 4;
            if off <= 0xfc {
                chunk.copy_from_slice(&cs.read32(bdf, off as u8).to_le_bytes());
            }
        }
        out.push(Capability { id: bytes[0], offset: ptr, bytes });
        ptr = bytes[1] & 0xfc;
    }
    out
}

/// A memory BAR: where the firmware put it and how large it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    /// Physical address.
    pub addr: u64,
    /// Size in bytes (a power of two).
    pub size: u64,
}

/// The memory BARs of a function, sized (PCI 3.0 §6.2.5.1: "software
/// writes a value of all 1's to the register, then reads it back"), with
/// memory decoding off meanwhile and the command register and BARs put
/// back after. I/O BARs, unassigned BARs and upper halves are `None`.
pub fn memory_bars(cs: &mut dyn ConfigSpace, bdf: Bdf) -> [Option<Bar>; 6] {
    let mut out = [None; 6];
    let cmd = cs.read16(bdf, regs::COMMAND);
    cs.set_command(bdf, cmd & !regs::CMD_MEM);
    let mut i = 0u8;
    while i < 6 {
        let reg = regs::BAR0 + 4 * i;
        let lo = cs.read32(bdf, reg);
        let is64 = lo & 1 == 0 && (lo >> 1) & 3 == 2 && i < 5;
        if lo & 1 != 0 || ((lo >> 1) & 3 != 0 && !is64) {
            i += 1; // I/O space, or a memory type we do not map
            continue;
        }
        let hi = if is64 { cs.read32(bdf, reg + 4) } else { 0 };
        cs.write32(bdf, reg, u32::MAX);
        let mut mask = (cs.read32(bdf, reg) & !0xf) as u64;
        cs.write32(bdf, reg, lo);
        if is64 {
            cs.write32(bdf, reg + 4, u32::MAX);
            mask |= (cs.read32(bdf, reg + 4) as u64) << 32;
            cs.write32(bdf, reg + 4, hi);
        } else {
            mask |= 0xffff_ffff_0000_0000;
        }
        let addr = (hi as u64) << 32 | (lo & !0xf) as u64;
        let size = (!mask).wrapping_add(1);
        if addr != 0 && mask != 0 && size.is_power_of_two() {
            out[i as usize] = Some(Bar { addr, size });
        }
        i += if is64 { 2 } else { 1 };
    }
    cs.set_command(bdf, cmd);
    out
}

pub use viommu_driver::transport::pci_caps::{cfg_type, CapError, CapRegion, VirtioCaps};

/// The virtio structures named by `caps` (see [`VirtioCaps::parse`]).
pub fn virtio_caps(caps: &[Capability]) -> Result<VirtioCaps, CapError> {
    VirtioCaps::parse(caps.iter().map(|c| &c.bytes[..]))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Config spaces of a few functions, 256 bytes each.
    #[derive(Default)]
    pub(crate) struct FakeConfig {
        pub(crate) funcs: BTreeMap<Bdf, [u8; 256]>,
        pub(crate) reads: usize,
        /// Size masks of BAR registers: a write keeps only these bits.
        pub(crate) bar_masks: BTreeMap<(Bdf, u8), u32>,
    }

    impl FakeConfig {
        pub(crate) fn add(
            &mut self,
            bdf: Bdf,
            vendor: u16,
            device: u16,
            multi: bool,
        ) -> &mut [u8; 256] {
            let c = self.funcs.entry(bdf).or_insert([0u8; 256]);
            c[0..2].copy_from_slice(&vendor.to_le_bytes());
            c[2..4].copy_from_slice(&device.to_le_bytes());
            c[0x0e] = if multi { 0x80 } else { 0 };
            c
        }
    }

    impl ConfigSpace for FakeConfig {
        fn read32(&mut self, bdf: Bdf, offset: u8) -> u32 {
            self.reads += 1;
            let o = offset as usize & 0xfc;
            self.funcs
                .get(&bdf)
                .map_or(u32::MAX, |c| u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]))
        }
        fn write32(&mut self, bdf: Bdf, offset: u8, v: u32) {
            let mask = self.bar_masks.get(&(bdf, offset & 0xfc)).copied();
            if let Some(c) = self.funcs.get_mut(&bdf) {
                let o = offset as usize & 0xfc;
                let old = u32::from_le_bytes([c[o], c[o + 1], c[o + 2], c[o + 3]]);
                // A BAR's flag bits are read-only, its low address bits hardwired to 0.
                let v = mask.map_or(v, |m| (v & m) | (old & 0xf & !m));
                c[o..o + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    fn bdf(bus: u8, dev: u8, func: u8) -> Bdf {
        Bdf { bus, dev, func }
    }

    #[test]
    fn scan_finds_functions_and_honours_multi_function() {
        let mut cs = FakeConfig::default();
        cs.add(bdf(0, 0, 0), 0x8086, 0x29c0, false);
        // Function 1 of a single-function device is not looked at.
        cs.add(bdf(0, 0, 1), 0x1234, 0x1111, false);
        cs.add(bdf(0, 4, 0), 0x1af4, 0x1057, false);
        cs.add(bdf(0, 0x1f, 0), 0x8086, 0x2918, true);
        cs.add(bdf(0, 0x1f, 3), 0x8086, 0x2930, false);
        cs.add(bdf(2, 1, 0), 0x1af4, 0x1042, false);
        let found: Vec<_> = scan(&mut cs).iter().map(|f| (f.bdf.to_string(), f.device)).collect();
        assert_eq!(
            found,
            [
                ("00:00.0".into(), 0x29c0),
                ("00:04.0".into(), 0x1057),
                ("00:1f.0".into(), 0x2918),
                ("00:1f.3".into(), 0x2930),
                ("02:01.0".into(), 0x1042)
            ]
        );
        assert!(cs.reads < 256 * 32 + 64, "one read per empty slot: {}", cs.reads);
        assert_eq!(bdf(0, 5, 0).rid(), 0x28);
        assert_eq!(cam_address(bdf(1, 5, 2), 0x13), 0x8001_2a10);
    }

    /// A virtio-pci function as QEMU lays it out: everything in BAR 4.
    pub(crate) fn virtio_function(cs: &mut FakeConfig, at: Bdf, device: u16) {
        let c = cs.add(at, 0x1af4, device, false);
        c[0x06] = regs::STATUS_CAP_LIST as u8;
        c[0x34] = 0x40;
        // (offset, cfg_type, offset in BAR, length, cap_len, next)
        let caps = [
            (0x40, cfg_type::COMMON, 0x0, 0x1000, 16, 0x50),
            (0x50, cfg_type::ISR, 0x1000, 0x1000, 16, 0x60),
            (0x60, cfg_type::DEVICE, 0x2000, 0x1000, 16, 0x70),
            (0x70, cfg_type::NOTIFY, 0x3000, 0x1000, 20, 0x88),
            // A second common capability is ignored: the first one wins.
            (0x88, cfg_type::COMMON, 0x8000, 0x1000, 16, 0x00),
        ];
        for (at, ty, off, len, cap_len, next) in caps {
            c[at] = regs::CAP_ID_VENDOR;
            c[at + 1] = next;
            c[at + 2] = cap_len;
            c[at + 3] = ty;
            c[at + 4] = 4;
            c[at + 8..at + 12].copy_from_slice(&(off as u32).to_le_bytes());
            c[at + 12..at + 16].copy_from_slice(&(len as u32).to_le_bytes());
            if ty == cfg_type::NOTIFY {
                c[at + 16..at + 20].copy_from_slice(&4u32.to_le_bytes());
            }
        }
        // BAR 4: 64-bit memory, 16 KiB at 0x8_0000_4000 (BAR 5 holds the
        // upper half); BAR 1: 32-bit memory, 4 KiB at 0xfebfe000; BAR 0: I/O.
        c[0x20..0x24].copy_from_slice(&0x4004u32.to_le_bytes());
        c[0x24..0x28].copy_from_slice(&8u32.to_le_bytes());
        c[0x14..0x18].copy_from_slice(&0xfebf_e000u32.to_le_bytes());
        c[0x10..0x14].copy_from_slice(&0xc041u32.to_le_bytes());
        cs.bar_masks.insert((at, 0x20), !(0x4000 - 1));
        cs.bar_masks.insert((at, 0x24), u32::MAX);
        cs.bar_masks.insert((at, 0x14), !(0x1000 - 1));
        cs.bar_masks.insert((at, 0x10), !(0x40 - 1));
        cs.funcs.get_mut(&at).unwrap()[0x04] = regs::CMD_MEM as u8;
    }

    #[test]
    fn virtio_capabilities_and_64_bit_bars() {
        let mut cs = FakeConfig::default();
        let at = bdf(0, 4, 0);
        virtio_function(&mut cs, at, 0x1057);
        let caps = capabilities(&mut cs, at);
        assert_eq!(caps.len(), 5);
        let v = virtio_caps(&caps).unwrap();
        assert_eq!(v.common, CapRegion { bar: 4, offset: 0, length: 0x1000 });
        assert_eq!((v.notify.offset, v.notify_off_multiplier), (0x3000, 4));
        assert_eq!(v.device.unwrap().offset, 0x2000);
        let bars = memory_bars(&mut cs, at);
        assert_eq!(bars[4], Some(Bar { addr: 0x8_0000_4000, size: 0x4000 }));
        assert_eq!(bars[5], None, "the upper half of BAR 4");
        assert_eq!(bars[1], Some(Bar { addr: 0xfebf_e000, size: 0x1000 }));
        assert_eq!((bars[0], bars[2]), (None, None), "I/O space; unassigned");
        // Sizing put every register back, memory decoding included.
        let c = &cs.funcs[&at];
        assert_eq!(u32::from_le_bytes(c[0x20..0x24].try_into().unwrap()), 0x4004);
        assert_eq!(u32::from_le_bytes(c[0x24..0x28].try_into().unwrap()), 8);
        assert_eq!(cs.read16(at, regs::COMMAND), regs::CMD_MEM);
    }

    #[test]
    fn a_capability_loop_or_a_bad_notify_capability_is_bounded_or_refused() {
        let mut cs = FakeConfig::default();
        let at = bdf(0, 4, 0);
        virtio_function(&mut cs, at, 0x1057);
        let c = cs.funcs.get_mut(&at).unwrap();
        c[0x89] = 0x40; // the last capability points back to the first
        assert_eq!(capabilities(&mut cs, at).len(), MAX_CAPS);
        let c = cs.funcs.get_mut(&at).unwrap();
        c[0x72] = 16; // a notify capability without its multiplier
        let caps = capabilities(&mut cs, at);
        assert_eq!(virtio_caps(&caps), Err(CapError::Missing(cfg_type::NOTIFY)));
        let c = cs.funcs.get_mut(&at).unwrap();
        c[0x06] = 0; // no capability list at all
        assert!(capabilities(&mut cs, at).is_empty());
    }
}
