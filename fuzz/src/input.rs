//! The byte format of every target: integers little-endian, read in order, zero once the
//! input is exhausted; byte strings carry their length in front. A plain format (rather
//! than `arbitrary`'s derived one) lets [`Seed`] write the seed corpus by hand.

use arbitrary::Unstructured;

/// Reads a fuzz input front to back.
pub struct Input<'a>(Unstructured<'a>);

impl<'a> Input<'a> {
    /// Reads `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self(Unstructured::new(data))
    }

    /// True once every byte was read.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.0.len()
    }

    /// One byte (0 when exhausted).
    pub fn u8(&mut self) -> u8 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Two bytes, little-endian (missing bytes read as 0).
    pub fn u16(&mut self) -> u16 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Four bytes, little-endian.
    pub fn u32(&mut self) -> u32 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Eight bytes, little-endian.
    pub fn u64(&mut self) -> u64 {
        self.0.arbitrary().unwrap_or(0)
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        self.0.bytes(n).unwrap_or(&[])
    }

    /// A byte string: its length (one byte), then its bytes.
    pub fn string(&mut self) -> &'a [u8] {
        let n = self.u8();
        self.bytes(usize::from(n))
    }
}

/// Writes an input in the format [`Input`] reads, for the seed corpus.
#[derive(Default)]
pub struct Seed(pub Vec<u8>);

impl Seed {
    /// Appends one byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }

    /// Appends a u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }

    /// Appends a byte string with its length in front (at most 255 bytes).
    pub fn string(&mut self, b: &[u8]) -> &mut Self {
        let b = &b[..b.len().min(255)];
        self.u8(b.len() as u8);
        self.0.extend_from_slice(b);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_reads_back() {
        let mut s = Seed::default();
        s.u8(7).u16(0x1234).u32(0xdead_beef).u64(u64::MAX - 1).string(b"abc");
        let mut i = Input::new(&s.0);
        assert_eq!((i.u8(), i.u16(), i.u32(), i.u64()), (7, 0x1234, 0xdead_beef, u64::MAX - 1));
        assert_eq!(i.string(), b"abc");
        assert!(i.is_empty());
        assert_eq!((i.u8(), i.u32()), (0, 0));
    }
}
