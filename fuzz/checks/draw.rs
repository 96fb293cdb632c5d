//! Draws values from a fuzzer's bytes: each read takes the next bytes, and reads past the
//! end give zeros, so every input (even an empty one) describes one case and a small change
//! to the bytes makes a small change to it.

/// The bytes not read yet.
pub struct Draw<'a>(pub &'a [u8]);

impl Draw<'_> {
    /// The next `N` bytes, zero past the end.
    pub fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }

    pub fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    pub fn i8(&mut self) -> i8 {
        self.u8() as i8
    }

    pub fn i16(&mut self) -> i16 {
        self.u16() as i16
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// True `num` times in `den` (for the byte read).
    pub fn ratio(&mut self, num: u8, den: u8) -> bool {
        self.u8() % den < num
    }

    /// In `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let span = hi - lo + 1;
        let v = if span <= 256 {
            u64::from(self.u8())
        } else {
            u64::from(self.u32())
        };
        lo + v % span
    }

    pub fn choose<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.range(0, from.len() as u64 - 1) as usize]
    }

    /// The rest of the bytes.
    pub fn rest(&mut self) -> &[u8] {
        std::mem::take(&mut self.0)
    }
}
