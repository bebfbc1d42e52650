//! The known disk contents. Every 8-byte word holds a value derived from its
//! byte offset on the disk and a tag, so misplaced, stale or missing data
//! is caught: not just "some bytes arrived".

/// Tag of the pattern the host writes to the whole disk image.
pub const DISK_TAG: u64 = 0x5649_4f4d_4d55_0001;

/// The word at disk byte offset `offset` (a multiple of 8) for `tag`.
#[inline]
pub fn word(offset: u64, tag: u64) -> u64 {
    offset.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag
}

/// Fills `buf`, which holds the disk bytes starting at `disk_offset`.
pub fn fill(buf: &mut [u8], disk_offset: u64, tag: u64) {
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&word(disk_offset + i as u64 * 8, tag).to_le_bytes());
    }
}

/// Checks `buf` against the pattern; returns the disk offset of the first
/// wrong word.
pub fn check(buf: &[u8], disk_offset: u64, tag: u64) -> Result<(), u64> {
    for (i, chunk) in buf.chunks_exact(8).enumerate() {
        let off = disk_offset + i as u64 * 8;
        if u64::from_le_bytes(chunk.try_into().expect("8 bytes")) != word(off, tag) {
            return Err(off);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_detect_shift() {
        let mut b = vec![0u8; 4096];
        fill(&mut b, 8192, DISK_TAG);
        assert_eq!(check(&b, 8192, DISK_TAG), Ok(()));
        // The same bytes at another disk offset, or under another tag, fail.
        assert_eq!(check(&b, 4096, DISK_TAG), Err(4096));
        assert_eq!(check(&b, 8192, 7), Err(8192));
        b[4000] ^= 1;
        assert_eq!(check(&b, 8192, DISK_TAG), Err(8192 + 4000 / 8 * 8));
        // All-zero (what a faulted DMA leaves) never passes.
        assert!(check(&[0u8; 64], 0, DISK_TAG).is_err());
    }
}
