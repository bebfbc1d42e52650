//! The data pattern endpoints move: each byte is a function of its offset on
//! the emulated disk (or in the packet stream), so any misdirected or stale
//! DMA shows up as a mismatch.

fn word(offset: u64) -> u64 {
    (offset >> 3).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a_5a5a_0f0f_0f0f
}

fn byte(offset: u64) -> u8 {
    (word(offset) >> ((offset & 7) * 8)) as u8
}

/// Fills `buf` with the pattern of bytes `[offset, offset + buf.len())`.
pub fn fill(buf: &mut [u8], offset: u64) {
    if offset % 8 == 0 {
        let mut chunks = buf.chunks_exact_mut(8);
        let mut o = offset;
        for c in &mut chunks {
            c.copy_from_slice(&word(o).to_le_bytes());
            o += 8;
        }
        for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
            *b = byte(o + i as u64);
        }
    } else {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte(offset + i as u64);
        }
    }
}

/// True if `buf` holds the pattern of bytes `[offset, offset + buf.len())`.
pub fn check(buf: &[u8], offset: u64) -> bool {
    if offset % 8 == 0 {
        let mut chunks = buf.chunks_exact(8);
        let mut o = offset;
        for c in &mut chunks {
            if c != word(o).to_le_bytes() {
                return false;
            }
            o += 8;
        }
        chunks.remainder().iter().enumerate().all(|(i, &b)| b == byte(o + i as u64))
    } else {
        buf.iter().enumerate().all(|(i, &b)| b == byte(offset + i as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_detect_errors() {
        for (len, off) in [(4096, 0u64), (1500, 2048), (13, 3), (0, 8)] {
            let mut b = vec![0u8; len];
            fill(&mut b, off);
            assert!(check(&b, off));
            if len > 0 {
                assert!(!check(&b, off + 8), "a shifted offset must not match");
                b[len / 2] ^= 1;
                assert!(!check(&b, off));
            }
        }
        let mut a = [0u8; 16];
        fill(&mut a, 5);
        let mut full = [0u8; 24];
        fill(&mut full, 0);
        assert_eq!(a, full[5..21], "unaligned fill agrees with the aligned one");
    }
}
