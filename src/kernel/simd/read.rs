//! How the fast path reads a row's values into its lanes, whatever the input's representation.
//!
//! A row reaches the fast path as `f32` elements in place (aligned, or little-endian bytes at
//! any alignment, as a tensor arrives over the wire) or as halves (`f16`, `bf16`). [`RowIn`]
//! hands the passes one block of the row at a time, as [`Lanes`]: `f32` blocks are read where
//! they lie (a slice, or [`LeF32`] bytes with unaligned vector loads), halves are widened into a
//! scratch block first. The same values land in the same lanes either way, so every
//! representation gives the same bits.

use half::{bf16, f16};

use super::super::input::{Elems, LeBytes};
use super::exp::W;
use super::lanes::Simd;
use super::row::BLOCK;

/// `f32` values as the lane loops read them: an `f32` slice, or little-endian bytes at any
/// alignment ([`LeF32`]).
pub(super) trait Lanes: Copy {
    /// Number of values.
    fn len(self) -> usize;
    /// The [`W`] values at `i`.
    fn load<S: Simd>(self, s: S, i: usize) -> S::V;
    /// Copies the values at `i` into `out`.
    fn copy_to(self, i: usize, out: &mut [f32]);
    /// Value `j`.
    fn at(self, j: usize) -> f32;
    /// The vector at `i` of which `n` lanes are real: loaded straight when all are, else the
    /// rest padded with `pad`.
    #[inline(always)]
    fn load_at<S: Simd>(self, s: S, i: usize, n: usize, pad: f32) -> S::V {
        if n == W {
            self.load(s, i)
        } else {
            let mut p = [pad; W];
            self.copy_to(i, &mut p[..n]);
            s.load(&p)
        }
    }
}

impl Lanes for &[f32] {
    #[inline(always)]
    fn len(self) -> usize {
        <[f32]>::len(self)
    }
    #[inline(always)]
    fn load<S: Simd>(self, s: S, i: usize) -> S::V {
        s.load(self[i..i + W].try_into().unwrap())
    }
    #[inline(always)]
    fn copy_to(self, i: usize, out: &mut [f32]) {
        out.copy_from_slice(&self[i..i + out.len()]);
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        self[j]
    }
}

/// Little-endian `f32` bytes at any alignment, read with unaligned vector loads.
#[derive(Clone, Copy)]
pub(super) struct LeF32<'a>(&'a [u8]);

impl Lanes for LeF32<'_> {
    #[inline(always)]
    fn len(self) -> usize {
        self.0.len() / 4
    }
    #[inline(always)]
    fn load<S: Simd>(self, s: S, i: usize) -> S::V {
        s.load_le(self.0[4 * i..4 * (i + W)].try_into().unwrap())
    }
    #[inline(always)]
    fn copy_to(self, i: usize, out: &mut [f32]) {
        for (o, b) in out.iter_mut().zip(self.0[4 * i..].chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().unwrap());
        }
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        f32::from_le_bytes(self.0[4 * j..4 * j + 4].try_into().unwrap())
    }
}

/// A row of logits or dense labels as the fast path reads it: each block as [`Lanes`], read
/// in place (`f32`, aligned or not) or widened into a scratch block (halves).
pub(super) trait RowIn: Copy {
    /// What the lane loops read a block as.
    type Block<'b>: Lanes
    where
        Self: 'b;
    /// Number of elements.
    fn len(self) -> usize;
    /// Elements `b..e` (at most [`BLOCK`]), in place or widened into `buf`.
    fn block<'b>(self, b: usize, e: usize, buf: &'b mut [f32; BLOCK]) -> Self::Block<'b>
    where
        Self: 'b;
    /// Element `j` as `f32`.
    fn at(self, j: usize) -> f32;
}

impl RowIn for &[f32] {
    type Block<'b>
        = &'b [f32]
    where
        Self: 'b;
    #[inline(always)]
    fn len(self) -> usize {
        <[f32]>::len(self)
    }
    #[inline(always)]
    fn block<'b>(self, b: usize, e: usize, _buf: &'b mut [f32; BLOCK]) -> &'b [f32]
    where
        Self: 'b,
    {
        &self[b..e]
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        self[j]
    }
}

impl RowIn for LeBytes<'_, f32> {
    type Block<'b>
        = LeF32<'b>
    where
        Self: 'b;
    #[inline(always)]
    fn len(self) -> usize {
        LeBytes::len(&self)
    }
    #[inline(always)]
    fn block<'b>(self, b: usize, e: usize, _buf: &'b mut [f32; BLOCK]) -> LeF32<'b>
    where
        Self: 'b,
    {
        LeF32(self.range(b..e).as_bytes())
    }
    #[inline(always)]
    fn at(self, j: usize) -> f32 {
        self.get(j)
    }
}

macro_rules! half_row {
    ($t:ty) => {
        impl RowIn for Elems<'_, $t> {
            type Block<'b>
                = &'b [f32]
            where
                Self: 'b;
            #[inline(always)]
            fn len(self) -> usize {
                Elems::len(&self)
            }
            #[inline(always)]
            fn block<'b>(self, b: usize, e: usize, buf: &'b mut [f32; BLOCK]) -> &'b [f32]
            where
                Self: 'b,
            {
                let out = &mut buf[..e - b];
                match self {
                    Elems::Slice(s) => {
                        for (o, v) in out.iter_mut().zip(&s[b..e]) {
                            *o = v.to_f32();
                        }
                    }
                    Elems::Le(l) => {
                        for (o, v) in out.iter_mut().zip(l.range(b..e).iter()) {
                            *o = v.to_f32();
                        }
                    }
                }
                out
            }
            #[inline(always)]
            fn at(self, j: usize) -> f32 {
                self.get(j).to_f32()
            }
        }
    };
}
half_row!(f16);
half_row!(bf16);
