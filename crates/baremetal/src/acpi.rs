//! ACPI from the RSDP to one table (ACPI 6.5 §5.2.5 RSDP, §5.2.7 RSDT,
//! §5.2.8 XSDT, §5.2.9 FADT): enough to hand the VIOT to
//! `viommu_driver::topology::viot` and to find the PM timer.
//!
//! Tables are read through [`PhysMem`] and copied out, every length is
//! checked against [`MAX_TABLE`], and the walk is bounded by the RSDT/XSDT
//! length, so a lying table gives an [`AcpiError`], never a wild read loop.

use alloc::vec;
use alloc::vec::Vec;

/// Longest table this module copies (QEMU's largest, the DSDT, is ~8 KiB).
pub const MAX_TABLE: u32 = 1 << 20;
/// Bytes of the common table header (§5.2.6).
pub const HEADER_LEN: usize = 36;

/// Physical memory as the tables are read from it.
pub trait PhysMem {
    /// Copies `buf.len()` bytes at `paddr`; false if that memory cannot be read.
    fn read(&self, paddr: u64, buf: &mut [u8]) -> bool;
}

/// Why a table was not found or refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcpiError {
    /// Bytes at this address could not be read.
    Unreadable(u64),
    /// No "RSD PTR " signature at the address.
    NoRsdp,
    /// A checksum over the structure with this signature does not sum to 0.
    BadChecksum([u8; 4]),
    /// A length out of bounds, in the structure with this signature.
    BadLength([u8; 4]),
    /// A table pointed to by the RSDT/XSDT has another signature than expected.
    WrongSignature([u8; 4]),
    /// No table with this signature.
    NotFound([u8; 4]),
}

/// The RSDP: where the root table is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rsdp {
    /// ACPI revision (0 for ACPI 1.0: RSDT only).
    pub revision: u8,
    /// RSDT address (32-bit entries).
    pub rsdt: u32,
    /// XSDT address (64-bit entries), revision 2 and above; 0 otherwise.
    pub xsdt: u64,
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u32_at(b, at) as u64 | (u32_at(b, at + 4) as u64) << 32
}

fn read(mem: &dyn PhysMem, paddr: u64, buf: &mut [u8]) -> Result<(), AcpiError> {
    mem.read(paddr, buf).then_some(()).ok_or(AcpiError::Unreadable(paddr))
}

impl Rsdp {
    /// Reads and checks the RSDP at `paddr` (§5.2.5.3: the first 20 bytes
    /// sum to 0; from revision 2 on, all `length` bytes do too).
    pub fn read(mem: &dyn PhysMem, paddr: u64) -> Result<Self, AcpiError> {
        let mut b = [0u8; 36];
        read(mem, paddr, &mut b[..20])?;
        if &b[..8] != b"RSD PTR " {
            return Err(AcpiError::NoRsdp);
        }
        if sum(&b[..20]) != 0 {
            return Err(AcpiError::BadChecksum(*b"RSD "));
        }
        let revision = b[15];
        let rsdt = u32_at(&b, 16);
        if revision < 2 {
            return Ok(Self { revision, rsdt, xsdt: 0 });
        }
        read(mem, paddr + 20, &mut b[20..36])?;
        if u32_at(&b, 20) < 36 {
            return Err(AcpiError::BadLength(*b"RSD "));
        }
        if sum(&b[..36]) != 0 {
            return Err(AcpiError::BadChecksum(*b"RSD "));
        }
        Ok(Self { revision, rsdt, xsdt: u64_at(&b, 24) })
    }
}

/// Copies the table at `paddr` and checks its length and checksum.
pub fn read_table(mem: &dyn PhysMem, paddr: u64) -> Result<Vec<u8>, AcpiError> {
    let mut h = [0u8; HEADER_LEN];
    read(mem, paddr, &mut h)?;
    let sig = [h[0], h[1], h[2], h[3]];
    let len = u32_at(&h, 4);
    if (len as usize) < HEADER_LEN || len > MAX_TABLE {
        return Err(AcpiError::BadLength(sig));
    }
    let mut t = vec![0u8; len as usize];
    read(mem, paddr, &mut t)?;
    if sum(&t) != 0 {
        return Err(AcpiError::BadChecksum(sig));
    }
    Ok(t)
}

/// The tables an RSDP leads to: the root table's entries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// Physical addresses of the tables, in the root table's order.
    pub entries: Vec<u64>,
    /// Whether they came from the XSDT (else the RSDT).
    pub xsdt: bool,
}

impl Tables {
    /// Reads the XSDT if the RSDP gives one, else the RSDT.
    pub fn read(mem: &dyn PhysMem, rsdp: &Rsdp) -> Result<Self, AcpiError> {
        let (addr, sig, width) =
            if rsdp.xsdt != 0 { (rsdp.xsdt, *b"XSDT", 8) } else { (rsdp.rsdt as u64, *b"RSDT", 4) };
        let t = read_table(mem, addr)?;
        if t[..4] != sig {
            return Err(AcpiError::WrongSignature(sig));
        }
        let entries = t[HEADER_LEN..]
            .chunks_exact(width)
            .map(|e| if width == 8 { u64_at(e, 0) } else { u32_at(e, 0) as u64 })
            .collect();
        Ok(Self { entries, xsdt: width == 8 })
    }

    /// The first table with signature `sig`, copied and checked. Entries
    /// that cannot be read or fail their checksum are skipped, so one bad
    /// table does not hide the others.
    pub fn find(&self, mem: &dyn PhysMem, sig: &[u8; 4]) -> Result<Vec<u8>, AcpiError> {
        for &addr in &self.entries {
            let mut s = [0u8; 4];
            if !mem.read(addr, &mut s) || &s != sig {
                continue;
            }
            if let Ok(t) = read_table(mem, addr) {
                return Ok(t);
            }
        }
        Err(AcpiError::NotFound(*sig))
    }
}

/// The ACPI PM timer (§4.8.3.3): a 3.579545 MHz counter, 24 or 32 bits wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PmTimer {
    /// I/O port of the counter.
    pub port: u16,
    /// The counter is 32 bits wide (FADT flag TMR_VAL_EXT), else 24.
    pub bits32: bool,
}

/// Frequency of the PM timer, in Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;

impl PmTimer {
    /// The PM timer a FADT describes: `X_PM_TMR_BLK` (offset 208) when it
    /// is in system I/O space, else `PM_TMR_BLK` (offset 76); `None` if the
    /// table has neither or puts it in memory space.
    pub fn from_fadt(fadt: &[u8]) -> Option<Self> {
        if fadt.len() < 116 || &fadt[..4] != b"FACP" {
            return None;
        }
        let bits32 = u32_at(fadt, 112) & (1 << 8) != 0;
        // X_PM_TMR_BLK: a Generic Address Structure, address space 1 = I/O.
        if fadt.len() >= 220 && fadt[208] == 1 {
            let addr = u64_at(fadt, 212);
            if addr != 0 && addr <= u16::MAX as u64 {
                return Some(Self { port: addr as u16, bits32 });
            }
        }
        let blk = u32_at(fadt, 76);
        (blk != 0 && blk <= u16::MAX as u32).then_some(Self { port: blk as u16, bits32 })
    }

    /// Ticks from `earlier` to `now`, two counter readings less than one
    /// wrap apart.
    pub fn elapsed(&self, earlier: u32, now: u32) -> u32 {
        let mask = if self.bits32 { u32::MAX } else { 0x00ff_ffff };
        now.wrapping_sub(earlier) & mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Memory made of byte blocks at addresses; reads must stay inside one.
    #[derive(Default)]
    struct Mem(BTreeMap<u64, Vec<u8>>);

    impl PhysMem for Mem {
        fn read(&self, paddr: u64, buf: &mut [u8]) -> bool {
            let Some((&base, b)) = self.0.range(..=paddr).next_back() else { return false };
            let at = (paddr - base) as usize;
            match b.get(at..at + buf.len()) {
                Some(s) => {
                    buf.copy_from_slice(s);
                    true
                }
                None => false,
            }
        }
    }

    fn fix_checksum(t: &mut [u8], at: usize, over: usize) {
        t[at] = 0;
        t[at] = 0u8.wrapping_sub(sum(&t[..over]));
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; HEADER_LEN];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        let n = t.len();
        fix_checksum(&mut t, 9, n);
        t
    }

    fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
        let mut b = vec![0u8; 36];
        b[..8].copy_from_slice(b"RSD PTR ");
        b[15] = revision;
        b[16..20].copy_from_slice(&rsdt.to_le_bytes());
        b[20..24].copy_from_slice(&36u32.to_le_bytes());
        b[24..32].copy_from_slice(&xsdt.to_le_bytes());
        fix_checksum(&mut b, 8, 20);
        fix_checksum(&mut b, 32, 36);
        b
    }

    /// An RSDT (revision 0) or XSDT (revision 2) machine with a FADT and a VIOT.
    fn machine(revision: u8) -> Mem {
        let mut m = Mem::default();
        m.0.insert(0x1000, table(b"FACP", &[0u8; 80]));
        m.0.insert(0x2000, table(b"VIOT", b"nodes"));
        let entries: Vec<u64> = vec![0x1000, 0x9000, 0x2000];
        if revision >= 2 {
            let body: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
            m.0.insert(0x3000, table(b"XSDT", &body));
            m.0.insert(0xf0000, rsdp(2, 0, 0x3000));
        } else {
            let body: Vec<u8> = entries.iter().flat_map(|&e| (e as u32).to_le_bytes()).collect();
            m.0.insert(0x3000, table(b"RSDT", &body));
            m.0.insert(0xf0000, rsdp(0, 0x3000, 0));
        }
        m
    }

    #[test]
    fn finds_a_table_through_the_rsdt_and_the_xsdt() {
        for rev in [0, 2] {
            let m = machine(rev);
            let r = Rsdp::read(&m, 0xf0000).unwrap();
            let t = Tables::read(&m, &r).unwrap();
            assert_eq!((t.entries.len(), t.xsdt), (3, rev == 2));
            // The entry at 0x9000 points to nothing readable and is skipped.
            assert_eq!(&t.find(&m, b"VIOT").unwrap()[HEADER_LEN..], b"nodes");
            assert_eq!(t.find(&m, b"MCFG"), Err(AcpiError::NotFound(*b"MCFG")));
        }
    }

    #[test]
    fn bad_signatures_checksums_and_lengths_are_refused() {
        let mut m = machine(2);
        assert_eq!(Rsdp::read(&m, 0x1000), Err(AcpiError::NoRsdp));
        assert_eq!(Rsdp::read(&m, 0x7_0000), Err(AcpiError::Unreadable(0x7_0000)));
        m.0.get_mut(&0xf0000).unwrap()[30] ^= 1; // inside the extended checksum only
        assert_eq!(Rsdp::read(&m, 0xf0000), Err(AcpiError::BadChecksum(*b"RSD ")));
        let mut m = machine(0);
        m.0.get_mut(&0x2000).unwrap()[HEADER_LEN] ^= 1;
        assert_eq!(read_table(&m, 0x2000), Err(AcpiError::BadChecksum(*b"VIOT")));
        let r = Rsdp::read(&m, 0xf0000).unwrap();
        let t = Tables::read(&m, &r).unwrap();
        assert_eq!(
            t.find(&m, b"VIOT"),
            Err(AcpiError::NotFound(*b"VIOT")),
            "a bad table is skipped"
        );
        // A length that claims more than the memory holds, or than MAX_TABLE.
        let v = m.0.get_mut(&0x2000).unwrap();
        v[4..8].copy_from_slice(&4096u32.to_le_bytes());
        assert_eq!(read_table(&m, 0x2000), Err(AcpiError::Unreadable(0x2000)));
        let v = m.0.get_mut(&0x2000).unwrap();
        v[4..8].copy_from_slice(&(MAX_TABLE + 1).to_le_bytes());
        assert_eq!(read_table(&m, 0x2000), Err(AcpiError::BadLength(*b"VIOT")));
        let v = m.0.get_mut(&0x2000).unwrap();
        v[4..8].copy_from_slice(&35u32.to_le_bytes());
        assert_eq!(read_table(&m, 0x2000), Err(AcpiError::BadLength(*b"VIOT")));
        // The root table must have the signature the RSDP promises.
        m.0.insert(0x3000, table(b"XSDT", &[]));
        assert_eq!(Tables::read(&m, &r), Err(AcpiError::WrongSignature(*b"RSDT")));
    }

    #[test]
    fn pm_timer_from_the_fadt_and_its_wrap() {
        let mut f = table(b"FACP", &[0u8; 244 - HEADER_LEN]);
        f[76..80].copy_from_slice(&0x608u32.to_le_bytes());
        let t = PmTimer::from_fadt(&f).unwrap();
        assert_eq!(t, PmTimer { port: 0x608, bits32: false });
        assert_eq!(t.elapsed(0x00ff_fff0, 0x10), 0x20, "24-bit wrap");
        f[112] = 0; // flags
        f[113] = 1; // TMR_VAL_EXT
        f[208] = 1;
        f[212..220].copy_from_slice(&0x408u64.to_le_bytes());
        let t = PmTimer::from_fadt(&f).unwrap();
        assert_eq!(t, PmTimer { port: 0x408, bits32: true });
        assert_eq!(t.elapsed(0xffff_fff0, 0x10), 0x20, "32-bit wrap");
        f[208] = 0; // memory space: fall back to PM_TMR_BLK
        assert_eq!(PmTimer::from_fadt(&f).unwrap().port, 0x608);
        f[76..80].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(PmTimer::from_fadt(&f), None);
        assert_eq!(PmTimer::from_fadt(&f[..100]), None);
    }
}
