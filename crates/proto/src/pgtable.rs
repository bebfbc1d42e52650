//! Page-table format 3, the "Virt I/O page table" of the 2023 page-table draft
//! (virtio-comment proposal, Linux branch `virtio-iommu/pgtables`,
//! `drivers/iommu/io-pgtable-virt.c`).
//!
//! 48-bit IOVA, 52-bit output address, 4 KiB granule, four levels of 512 entries
//! (level 0 indexes IOVA bits 47–39, level 3 bits 20–12). An entry is a
//! little-endian `u64`: bit 0 VALID, bit 1 TABLE, bit 2 READ, bit 3 WRITE, the
//! output address in bits 12–51. Leaves are 1 GiB blocks at level 1, 2 MiB blocks at
//! level 2 and 4 KiB pages at level 3.
//!
//! The draft calls the format "loosely specified"; where it is silent this module
//! chooses, and docs/spec-coverage.md lists each choice:
//! - an entry without VALID is invalid whatever its other bits;
//! - bits 4–11 and 52–63 are reserved and must be zero, in tables and leaves;
//! - a leaf's address must be aligned on its block size (the bits below are reserved);
//! - a table entry carries no permissions: READ and WRITE are reserved in it;
//! - a leaf at level 0 (512 GiB) and TABLE at level 3 are malformed.
//!
//! [`walk`] is the format's translation, bounded by [`LEVELS`] reads, each entry read
//! once: a table that changes under a walk gives the old or the new translation of the
//! entries it read, never a mix within one entry.
//!
//! ```
//! use viommu_proto::pgtable::{walk, Pte, Translation};
//! // A table at 0x1000 (level 0) -> 0x2000 (level 1) -> a 1 GiB block at 0x4000_0000.
//! let mem = |gpa: u64| -> Option<u64> {
//!     Some(match gpa {
//!         0x1000 => Pte::table(0x2000).get(),
//!         0x2000 => Pte::leaf(0x4000_0000, true, false).get(),
//!         _ => 0,
//!     })
//! };
//! let t = walk(0x1000, 0x1234_5678, mem).unwrap();
//! assert_eq!(t.output(0x1234_5678), 0x4000_0000 + 0x1234_5678);
//! assert!(t.read && !t.write);
//! assert_eq!(t.size, 1 << 30);
//! ```

use core::fmt;
use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Format 1: Arm LPAE page tables (draft; not supported by this project).
pub const FORMAT_ARM_LPAE: u16 = 1;
/// Format 2: Arm SMMUv3 PASID tables (draft; not supported by this project).
pub const FORMAT_ARM_SMMU_V3_PST: u16 = 2;
/// Format 3: the Virt I/O page table.
pub const FORMAT_VIRT: u16 = 3;

/// Number of levels.
pub const LEVELS: usize = 4;
/// The level whose entries map 4 KiB pages.
pub const LAST_LEVEL: usize = LEVELS - 1;
/// Width of the input address (IOVA).
pub const IOVA_BITS: u32 = 48;
/// Width of the output address.
pub const OA_BITS: u32 = 52;
/// The granule: size of a table and of the smallest page.
pub const GRANULE: u64 = 4096;
/// Entries per table.
pub const ENTRIES: usize = 512;
/// The page sizes a leaf can map: 4 KiB, 2 MiB, 1 GiB (a `page_size_mask`).
pub const PAGE_SIZES: u64 = (1 << 12) | (1 << 21) | (1 << 30);
/// Largest IOVA the format translates.
pub const IOVA_MAX: u64 = (1 << IOVA_BITS) - 1;

/// Entry bit: the entry is valid.
pub const PTE_VALID: u64 = 1 << 0;
/// Entry bit: the entry points to a next-level table.
pub const PTE_TABLE: u64 = 1 << 1;
/// Entry bit: a leaf allows reads.
pub const PTE_READ: u64 = 1 << 2;
/// Entry bit: a leaf allows writes.
pub const PTE_WRITE: u64 = 1 << 3;

/// Shift of the IOVA bits that index a table of `level` (39, 30, 21, 12).
pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (LAST_LEVEL - level) as u32
}

/// Bytes one entry of `level` covers.
pub const fn level_size(level: usize) -> u64 {
    1 << level_shift(level)
}

/// Index of `iova`'s entry in a table of `level`.
pub const fn index(iova: u64, level: usize) -> usize {
    ((iova >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// The output-address bits of an entry of `level` (a table pointer uses the last level's).
pub const fn oa_mask(level: usize) -> u64 {
    ((1u64 << OA_BITS) - 1) & !(level_size(level) - 1)
}

/// The level whose leaves are `size` bytes, if the format has such blocks.
pub const fn leaf_level(size: u64) -> Option<usize> {
    match size {
        0x1000 => Some(3),
        0x20_0000 => Some(2),
        0x4000_0000 => Some(1),
        _ => None,
    }
}

/// One page-table entry, as it lies in guest memory.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
#[repr(C)]
pub struct Pte(pub U64);

const _: () = assert!(size_of::<Pte>() == 8);

impl Pte {
    /// The invalid entry.
    pub const INVALID: Self = Self(U64::ZERO);

    /// An entry pointing to the next-level table at `table` (4 KiB aligned).
    pub fn table(table: u64) -> Self {
        Self(U64::new((table & oa_mask(LAST_LEVEL)) | PTE_VALID | PTE_TABLE))
    }

    /// A leaf mapping `oa` with the given permissions.
    pub fn leaf(oa: u64, read: bool, write: bool) -> Self {
        let mut v = (oa & oa_mask(LAST_LEVEL)) | PTE_VALID;
        if read {
            v |= PTE_READ;
        }
        if write {
            v |= PTE_WRITE;
        }
        Self(U64::new(v))
    }

    /// The raw value.
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// Decodes the entry as one of a table of `level` (0..=3).
    pub fn decode(self, level: usize) -> Result<Entry, PteError> {
        decode(self.get(), level)
    }
}

/// What an entry means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not valid: nothing is mapped under it.
    Invalid,
    /// A pointer to the next-level table.
    Table {
        /// Guest-physical address of the table.
        next: u64,
    },
    /// A page or block.
    Leaf {
        /// Output address of the block's first byte.
        oa: u64,
        /// Reads allowed.
        read: bool,
        /// Writes allowed.
        write: bool,
    },
}

/// Why an entry is malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PteError {
    /// Reserved bits are set (including address bits below a block's alignment).
    Reserved,
    /// A leaf at level 0: the format has no 512 GiB blocks.
    LeafAtLevel0,
    /// TABLE at the last level.
    TableAtLastLevel,
    /// The level is not 0..=3.
    BadLevel,
}

/// Decodes the raw entry `raw` of a table of `level`.
pub fn decode(raw: u64, level: usize) -> Result<Entry, PteError> {
    if level > LAST_LEVEL {
        return Err(PteError::BadLevel);
    }
    if raw & PTE_VALID == 0 {
        return Ok(Entry::Invalid);
    }
    if raw & PTE_TABLE != 0 {
        if level == LAST_LEVEL {
            return Err(PteError::TableAtLastLevel);
        }
        if raw & !(PTE_VALID | PTE_TABLE | oa_mask(LAST_LEVEL)) != 0 {
            return Err(PteError::Reserved);
        }
        return Ok(Entry::Table { next: raw & oa_mask(LAST_LEVEL) });
    }
    if level == 0 {
        return Err(PteError::LeafAtLevel0);
    }
    if raw & !(PTE_VALID | PTE_READ | PTE_WRITE | oa_mask(level)) != 0 {
        return Err(PteError::Reserved);
    }
    Ok(Entry::Leaf {
        oa: raw & oa_mask(level),
        read: raw & PTE_READ != 0,
        write: raw & PTE_WRITE != 0,
    })
}

/// A walk's result: one leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// First IOVA of the leaf.
    pub iova: u64,
    /// Output address of the leaf's first byte.
    pub oa: u64,
    /// Bytes the leaf maps (4 KiB, 2 MiB or 1 GiB).
    pub size: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
}

impl Translation {
    /// The output address of `iova`, which must lie in the leaf.
    pub fn output(&self, iova: u64) -> u64 {
        self.oa + (iova - self.iova)
    }

    /// Whether `iova` lies in the leaf.
    pub fn contains(&self, iova: u64) -> bool {
        iova >= self.iova && iova - self.iova < self.size
    }
}

/// Why a walk found no translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The IOVA is above [`IOVA_MAX`].
    OutOfRange,
    /// An invalid entry at `level`: nothing mapped.
    NotMapped {
        /// The level of the invalid entry.
        level: usize,
    },
    /// The entry of `level` lies at `gpa`, which the reader could not read.
    TableOutsideMemory {
        /// The level of the table.
        level: usize,
        /// Guest-physical address of the entry.
        gpa: u64,
    },
    /// A malformed entry at `level`.
    Malformed {
        /// The level of the entry.
        level: usize,
        /// Its raw value.
        raw: u64,
        /// What is wrong with it.
        error: PteError,
    },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::OutOfRange => f.write_str("IOVA above 48 bits"),
            Self::NotMapped { level } => write!(f, "invalid entry at level {level}"),
            Self::TableOutsideMemory { level, gpa } => {
                write!(f, "level-{level} entry at {gpa:#x} is outside guest memory")
            }
            Self::Malformed { level, raw, error } => {
                write!(f, "malformed level-{level} entry {raw:#x}: {error:?}")
            }
        }
    }
}

impl core::error::Error for WalkError {}

/// Walks the table rooted at `root` for `iova`. `read` returns the `u64` at a
/// guest-physical address (8-byte aligned), or `None` outside guest memory; it is
/// called at most [`LEVELS`] times, once per level, so the walk is bounded whatever
/// the table holds (a table pointing at itself ends at the last level as malformed).
pub fn walk(
    root: u64,
    iova: u64,
    mut read: impl FnMut(u64) -> Option<u64>,
) -> Result<Translation, WalkError> {
    if iova > IOVA_MAX {
        return Err(WalkError::OutOfRange);
    }
    let mut table = root & oa_mask(LAST_LEVEL);
    for level in 0..LEVELS {
        let gpa = table + 8 * index(iova, level) as u64;
        let raw = read(gpa).ok_or(WalkError::TableOutsideMemory { level, gpa })?;
        match decode(raw, level) {
            Err(error) => return Err(WalkError::Malformed { level, raw, error }),
            Ok(Entry::Invalid) => return Err(WalkError::NotMapped { level }),
            Ok(Entry::Table { next }) => table = next,
            Ok(Entry::Leaf { oa, read, write }) => {
                let size = level_size(level);
                return Ok(Translation { iova: iova & !(size - 1), oa, size, read, write });
            }
        }
    }
    // decode() refuses TABLE at the last level, so the loop always returns.
    Err(WalkError::Malformed { level: LAST_LEVEL, raw: 0, error: PteError::TableAtLastLevel })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_masks_and_indices_match_the_draft() {
        assert_eq!([0, 1, 2, 3].map(level_shift), [39, 30, 21, 12]);
        assert_eq!(oa_mask(0), 0xf_ff80_0000_0000);
        assert_eq!(oa_mask(1), 0xf_ffff_c000_0000);
        assert_eq!(oa_mask(2), 0xf_ffff_ffe0_0000);
        assert_eq!(oa_mask(3), 0xf_ffff_ffff_f000);
        assert_eq!(index(0x7652_7640_1000, 1), 0x149);
        assert_eq!(PAGE_SIZES, 0x4020_1000);
        assert_eq!(
            [0x1000, 0x20_0000, 0x4000_0000, 0x8000].map(leaf_level),
            [Some(3), Some(2), Some(1), None]
        );
    }

    #[test]
    fn decode_rules() {
        assert_eq!(decode(0, 2), Ok(Entry::Invalid));
        // Not VALID: other bits are ignored.
        assert_eq!(decode(!PTE_VALID, 2), Ok(Entry::Invalid));
        assert_eq!(decode(0x5000 | 3, 0), Ok(Entry::Table { next: 0x5000 }));
        assert_eq!(decode(0x5000 | 3, 3), Err(PteError::TableAtLastLevel));
        assert_eq!(decode(0x5000 | 3 | PTE_READ, 1), Err(PteError::Reserved));
        assert_eq!(decode(0x5000 | 3 | (1 << 52), 1), Err(PteError::Reserved));
        assert_eq!(decode(0x5000 | 3 | (1 << 4), 1), Err(PteError::Reserved));
        assert_eq!(decode(1 << 39 | 1, 0), Err(PteError::LeafAtLevel0));
        assert_eq!(
            decode(0x4000_0000 | 0xd, 1),
            Ok(Entry::Leaf { oa: 0x4000_0000, read: true, write: true })
        );
        // A 2 MiB block whose address is only 4 KiB aligned.
        assert_eq!(decode(0x20_1000 | 1, 2), Err(PteError::Reserved));
        assert_eq!(
            decode(0x20_1000 | 1, 3),
            Ok(Entry::Leaf { oa: 0x20_1000, read: false, write: false })
        );
        assert_eq!(decode(1, 4), Err(PteError::BadLevel));
    }

    #[test]
    fn walk_is_bounded_on_a_self_referencing_table() {
        // Every entry of the table at 0x1000 points at the table itself.
        let mut reads = 0;
        let r = walk(0x1000, 0x1234_5000, |_| {
            reads += 1;
            Some(Pte::table(0x1000).get())
        });
        assert_eq!(reads, LEVELS);
        assert!(matches!(
            r,
            Err(WalkError::Malformed { level: 3, error: PteError::TableAtLastLevel, .. })
        ));
    }

    #[test]
    fn walk_errors_carry_level_and_address() {
        assert_eq!(walk(0, 1 << 48, |_| Some(0)), Err(WalkError::OutOfRange));
        assert_eq!(walk(0x1000, 0, |_| Some(0)), Err(WalkError::NotMapped { level: 0 }));
        let r = walk(0x1000, 0x20_3000, |gpa| (gpa < 0x2000).then(|| Pte::table(0x9000).get()));
        assert_eq!(r, Err(WalkError::TableOutsideMemory { level: 1, gpa: 0x9000 }));
    }

    #[test]
    fn walk_4k_leaf() {
        // 0x1000 -> 0x2000 -> 0x3000 -> 0x4000 -> page 0x8_8000, read-only
        let iova = 0x0000_0040_0060_1abc_u64;
        let t = walk(0x1000, iova, |gpa| {
            Some(match gpa & !0xfff {
                0x1000 => Pte::table(0x2000).get(),
                0x2000 => Pte::table(0x3000).get(),
                0x3000 => Pte::table(0x4000).get(),
                0x4000 if gpa == 0x4000 + 8 * index(iova, 3) as u64 => {
                    Pte::leaf(0x8_8000, false, true).get()
                }
                _ => 0,
            })
        })
        .unwrap();
        assert_eq!(
            t,
            Translation { iova: iova & !0xfff, oa: 0x8_8000, size: 4096, read: false, write: true }
        );
        assert_eq!(t.output(iova), 0x8_8abc);
        assert!(t.contains(iova) && !t.contains(iova + 0x1000));
    }
}
