//! The PVH start info (Xen's `xen/include/public/arch-x86/hvm/start_info.h`):
//! what the loader tells the kernel in `ebx`. QEMU's PVH option ROM fills
//! it, including the RSDP address and the E820 memory map (version 1).

/// "xEn3" with the 0x80 bit of the "E" set.
pub const MAGIC: u32 = 0x336e_c578;
/// Bytes of the version 1 structure.
pub const LEN: usize = 56;
/// Bytes of one memory map entry (`hvm_memmap_table_entry`).
pub const MEMMAP_ENTRY_LEN: usize = 24;
/// Memory map type of usable RAM (E820 type 1).
pub const MEMMAP_RAM: u32 = 1;

/// The fields of `hvm_start_info` this guest uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartInfo {
    /// Version of the structure (0 has no memory map).
    pub version: u32,
    /// Physical address of the ACPI RSDP, 0 if none.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version 1 and above).
    pub memmap_paddr: u64,
    /// Entries of the memory map.
    pub memmap_entries: u32,
}

/// Why a start info was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PvhError {
    /// Fewer bytes than the structure's version needs.
    Truncated,
    /// The magic value is wrong: not booted through PVH.
    BadMagic(u32),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u32_at(b, at) as u64 | (u32_at(b, at + 4) as u64) << 32
}

impl StartInfo {
    /// Parses the structure from its bytes (at least 40; 56 for version 1).
    ///
    /// ```
    /// use viommu_baremetal::pvh::{StartInfo, MAGIC};
    /// let mut b = [0u8; 56];
    /// b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    /// b[32..40].copy_from_slice(&0xf_5a40u64.to_le_bytes());
    /// assert_eq!(StartInfo::parse(&b).unwrap().rsdp_paddr, 0xf_5a40);
    /// ```
    pub fn parse(b: &[u8]) -> Result<Self, PvhError> {
        if b.len() < 40 {
            return Err(PvhError::Truncated);
        }
        let magic = u32_at(b, 0);
        if magic != MAGIC {
            return Err(PvhError::BadMagic(magic));
        }
        let version = u32_at(b, 4);
        let (memmap_paddr, memmap_entries) = if version >= 1 {
            if b.len() < LEN {
                return Err(PvhError::Truncated);
            }
            (u64_at(b, 40), u32_at(b, 48))
        } else {
            (0, 0)
        };
        Ok(Self { version, rsdp_paddr: u64_at(b, 32), memmap_paddr, memmap_entries })
    }
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemmapEntry {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// E820 type ([`MEMMAP_RAM`] for RAM).
    pub kind: u32,
}

impl MemmapEntry {
    /// Parses one 24-byte entry; `None` if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Self> {
        (b.len() >= MEMMAP_ENTRY_LEN).then(|| Self {
            addr: u64_at(b, 0),
            size: u64_at(b, 8),
            kind: u32_at(b, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(version: u32) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..8].copy_from_slice(&version.to_le_bytes());
        b[32..40].copy_from_slice(&0x000f_5a40u64.to_le_bytes());
        b[40..48].copy_from_slice(&0x1234_5000u64.to_le_bytes());
        b[48..52].copy_from_slice(&5u32.to_le_bytes());
        b
    }

    #[test]
    fn version_1_has_a_memory_map_and_version_0_none() {
        let s = StartInfo::parse(&info(1)).unwrap();
        assert_eq!((s.rsdp_paddr, s.memmap_paddr, s.memmap_entries), (0xf_5a40, 0x1234_5000, 5));
        let s = StartInfo::parse(&info(0)[..40]).unwrap();
        assert_eq!((s.version, s.rsdp_paddr, s.memmap_entries), (0, 0xf_5a40, 0));
    }

    #[test]
    fn wrong_magic_or_short_input_is_refused() {
        let mut b = info(1);
        assert_eq!(StartInfo::parse(&b[..LEN - 1]), Err(PvhError::Truncated));
        assert_eq!(StartInfo::parse(&b[..39]), Err(PvhError::Truncated));
        b[3] = 0;
        assert_eq!(StartInfo::parse(&b), Err(PvhError::BadMagic(0x006e_c578)));
    }

    #[test]
    fn memmap_entries_parse() {
        let mut e = [0u8; 24];
        e[0..8].copy_from_slice(&0x10_0000u64.to_le_bytes());
        e[8..16].copy_from_slice(&0x1ff0_0000u64.to_le_bytes());
        e[16..20].copy_from_slice(&MEMMAP_RAM.to_le_bytes());
        let m = MemmapEntry::parse(&e).unwrap();
        assert_eq!((m.addr, m.size, m.kind), (0x10_0000, 0x1ff0_0000, MEMMAP_RAM));
        assert_eq!(MemmapEntry::parse(&e[..23]), None);
    }
}
