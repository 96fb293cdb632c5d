//! Sixteen `f32` lanes on each instruction set: the few operations the row math needs.
//!
//! Why it looks like this:
//! - **Explicit intrinsics at AVX2 and AVX-512F.** Written over plain arrays, the compiler
//!   vectorised the row loops only in part (about 42 instructions per element at every level);
//!   with the operations spelled out as `core::arch` intrinsics the row math is a few
//!   instructions per element. [`Portable`] keeps the array form: it is the fallback for any
//!   other CPU and the reference the other levels are tested against, bit for bit.
//! - **Sixteen lanes everywhere** (one AVX-512 register, two AVX2 registers, an array of 16 at
//!   the portable level), so element `j` of a block always lands in lane `j % 16`, and sums
//!   taken lane-wise and then across lanes in lane order round the same at every level.
//! - **Operations that round the same on every level:** add, subtract and multiply (no fused
//!   multiply-add), `max`/`min` with the x86 rule (`a > b ? a : b`, so a NaN in `a` keeps
//!   `b`), and a power-of-two scaling ([`Simd::scale2`]) that rounds once: AVX-512F's `scalef`
//!   and the other levels' two exact-then-rounding multiplications give the same bits.
//! - **Tokens, not `unsafe fn`s:** [`Avx2`] and [`Avx512`] can only be made where the CPU has
//!   the instruction set (checked once, in [`super::row::fast_row`]), so their operations are
//!   safe to call; they are `#[inline(always)]` and expand inside the `#[target_feature]`
//!   wrappers of [`super::row`], where the intrinsics compile to the wide instructions.

use super::exp::{MAGIC, W};

/// The operations of one instruction set on 16 `f32` lanes.
pub trait Simd: Copy {
    /// A vector of 16 lanes.
    type V: Copy;
    /// Every lane `x`.
    fn splat(self, x: f32) -> Self::V;
    /// Loads 16 values.
    fn load(self, x: &[f32; W]) -> Self::V;
    /// Loads 16 values from their little-endian bytes, at any alignment.
    fn load_le(self, x: &[u8; 4 * W]) -> Self::V;
    /// Stores 16 values.
    fn store(self, v: Self::V, out: &mut [f32; W]);
    /// `a + b`.
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a - b`.
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b`.
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a > b ? a : b` (so `b` where `a` is NaN).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a < b ? a : b` (so `b` where `a` is NaN).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// `y != 0 ? y * d : 0`: a zero label contributes nothing, even at `d = -inf`.
    fn mul_nonzero(self, y: Self::V, d: Self::V) -> Self::V;
    /// `e * 2^n`, rounded once, where `t = n + MAGIC` and `nf = n` (`-159 <= n <= 0`, `e` in
    /// about `[0.7, 1.42]`).
    fn scale2(self, e: Self::V, t: Self::V, nf: Self::V) -> Self::V;
    /// The lanes as an array.
    #[inline(always)]
    fn to_array(self, v: Self::V) -> [f32; W] {
        let mut a = [0.0; W];
        self.store(v, &mut a);
        a
    }
}

/// The build's baseline instruction set, through arrays the compiler vectorises as it can.
#[derive(Clone, Copy, Debug)]
pub struct Portable;

#[inline(always)]
fn map2(a: [f32; W], b: [f32; W], f: impl Fn(f32, f32) -> f32) -> [f32; W] {
    let mut out = [0.0; W];
    for l in 0..W {
        out[l] = f(a[l], b[l]);
    }
    out
}

/// `2^n` for `-126 <= n <= 127`, from its bits.
#[inline(always)]
fn pow2i(n: i32) -> f32 {
    f32::from_bits(((n + 127) as u32) << 23)
}

impl Simd for Portable {
    type V = [f32; W];
    #[inline(always)]
    fn splat(self, x: f32) -> [f32; W] {
        [x; W]
    }
    #[inline(always)]
    fn load(self, x: &[f32; W]) -> [f32; W] {
        *x
    }
    #[inline(always)]
    fn load_le(self, x: &[u8; 4 * W]) -> [f32; W] {
        let mut out = [0.0; W];
        for (o, b) in out.iter_mut().zip(x.chunks_exact(4)) {
            *o = f32::from_le_bytes(b.try_into().unwrap());
        }
        out
    }
    #[inline(always)]
    fn store(self, v: [f32; W], out: &mut [f32; W]) {
        *out = v;
    }
    #[inline(always)]
    fn add(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |a, b| a + b)
    }
    #[inline(always)]
    fn sub(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |a, b| a - b)
    }
    #[inline(always)]
    fn mul(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |a, b| a * b)
    }
    #[inline(always)]
    fn max(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |a, b| if a > b { a } else { b })
    }
    #[inline(always)]
    fn min(self, a: [f32; W], b: [f32; W]) -> [f32; W] {
        map2(a, b, |a, b| if a < b { a } else { b })
    }
    #[inline(always)]
    fn mul_nonzero(self, y: [f32; W], d: [f32; W]) -> [f32; W] {
        map2(y, d, |y, d| if y != 0.0 { y * d } else { 0.0 })
    }
    #[inline(always)]
    fn scale2(self, e: [f32; W], t: [f32; W], _nf: [f32; W]) -> [f32; W] {
        let mut out = [0.0; W];
        for l in 0..W {
            let n = t[l].to_bits() as i32 - MAGIC.to_bits() as i32;
            let n1 = n >> 1;
            // `e * 2^n1` is exact (a normal result), so only the second product rounds.
            out[l] = e[l] * pow2i(n1) * pow2i(n - n1);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

// The AVX-512 intrinsics are stable from Rust 1.89, the crate's `rust-version`.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{MAGIC, Simd, W};

    /// AVX2: 16 lanes as two 256-bit registers (lanes 0-7, 8-15).
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2(());

    impl Avx2 {
        /// The token, if this CPU has AVX2.
        pub fn new() -> Option<Avx2> {
            std::arch::is_x86_feature_detected!("avx2").then_some(Avx2(()))
        }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx2` exists only where
    // `is_x86_feature_detected!("avx2")` held, so the AVX2 intrinsics are supported; the loads
    // and stores go through references to exactly 16 `f32`s (unaligned forms).
    impl Simd for Avx2 {
        type V = [__m256; 2];
        #[inline(always)]
        fn splat(self, x: f32) -> [__m256; 2] {
            // SAFETY: see the impl.
            let v = unsafe { _mm256_set1_ps(x) };
            [v, v]
        }
        #[inline(always)]
        fn load(self, x: &[f32; W]) -> [__m256; 2] {
            // SAFETY: see the impl; `x` holds 16 `f32`s.
            unsafe {
                [
                    _mm256_loadu_ps(x.as_ptr()),
                    _mm256_loadu_ps(x.as_ptr().add(8)),
                ]
            }
        }
        #[inline(always)]
        fn load_le(self, x: &[u8; 4 * W]) -> [__m256; 2] {
            // SAFETY: see the impl; `x` holds 16 little-endian `f32`s (x86-64 is little-endian)
            // and `loadu` takes any alignment.
            unsafe {
                let p = x.as_ptr().cast::<f32>();
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))]
            }
        }
        #[inline(always)]
        fn store(self, v: [__m256; 2], out: &mut [f32; W]) {
            // SAFETY: see the impl; `out` holds 16 `f32`s.
            unsafe {
                _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
                _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
            }
        }
        #[inline(always)]
        fn add(self, a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe { [_mm256_add_ps(a[0], b[0]), _mm256_add_ps(a[1], b[1])] }
        }
        #[inline(always)]
        fn sub(self, a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe { [_mm256_sub_ps(a[0], b[0]), _mm256_sub_ps(a[1], b[1])] }
        }
        #[inline(always)]
        fn mul(self, a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe { [_mm256_mul_ps(a[0], b[0]), _mm256_mul_ps(a[1], b[1])] }
        }
        #[inline(always)]
        fn max(self, a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
            // `vmaxps` returns its second operand unless the first is greater.
            // SAFETY: see the impl.
            unsafe { [_mm256_max_ps(a[0], b[0]), _mm256_max_ps(a[1], b[1])] }
        }
        #[inline(always)]
        fn min(self, a: [__m256; 2], b: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe { [_mm256_min_ps(a[0], b[0]), _mm256_min_ps(a[1], b[1])] }
        }
        #[inline(always)]
        fn mul_nonzero(self, y: [__m256; 2], d: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe {
                let z = _mm256_setzero_ps();
                let keep0 = _mm256_cmp_ps::<_CMP_NEQ_UQ>(y[0], z);
                let keep1 = _mm256_cmp_ps::<_CMP_NEQ_UQ>(y[1], z);
                [
                    _mm256_and_ps(keep0, _mm256_mul_ps(y[0], d[0])),
                    _mm256_and_ps(keep1, _mm256_mul_ps(y[1], d[1])),
                ]
            }
        }
        #[inline(always)]
        fn scale2(self, e: [__m256; 2], t: [__m256; 2], _nf: [__m256; 2]) -> [__m256; 2] {
            // SAFETY: see the impl.
            unsafe { [scale2_256(e[0], t[0]), scale2_256(e[1], t[1])] }
        }
    }

    /// [`Simd::scale2`] on 8 lanes: `2^n` as two normal factors `2^(n/2)`, built from bits.
    ///
    /// # Safety
    ///
    /// The CPU must have AVX2 (as it has wherever an [`Avx2`] token exists).
    #[inline(always)]
    unsafe fn scale2_256(e: __m256, t: __m256) -> __m256 {
        // SAFETY: called only from `Avx2`'s methods (the CPU has AVX2).
        unsafe {
            let n = _mm256_sub_epi32(
                _mm256_castps_si256(t),
                _mm256_set1_epi32(MAGIC.to_bits() as i32),
            );
            let n1 = _mm256_srai_epi32::<1>(n);
            let n2 = _mm256_sub_epi32(n, n1);
            let bias = _mm256_set1_epi32(127);
            let s1 = _mm256_slli_epi32::<23>(_mm256_add_epi32(n1, bias));
            let s2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(n2, bias));
            _mm256_mul_ps(
                _mm256_mul_ps(e, _mm256_castsi256_ps(s1)),
                _mm256_castsi256_ps(s2),
            )
        }
    }

    /// AVX-512F: 16 lanes in one register.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512(());

    impl Avx512 {
        /// The token, if this CPU has AVX-512F.
        pub fn new() -> Option<Avx512> {
            std::arch::is_x86_feature_detected!("avx512f").then_some(Avx512(()))
        }
    }

    // SAFETY (every `unsafe` block in this impl): an `Avx512` exists only where
    // `is_x86_feature_detected!("avx512f")` held, so the AVX-512F intrinsics are supported;
    // the loads and stores go through references to exactly 16 `f32`s (unaligned forms).
    impl Simd for Avx512 {
        type V = __m512;
        #[inline(always)]
        fn splat(self, x: f32) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_set1_ps(x) }
        }
        #[inline(always)]
        fn load(self, x: &[f32; W]) -> __m512 {
            // SAFETY: see the impl; `x` holds 16 `f32`s.
            unsafe { _mm512_loadu_ps(x.as_ptr()) }
        }
        #[inline(always)]
        fn load_le(self, x: &[u8; 4 * W]) -> __m512 {
            // SAFETY: see the impl; `x` holds 16 little-endian `f32`s (x86-64 is little-endian)
            // and `loadu` takes any alignment.
            unsafe { _mm512_loadu_ps(x.as_ptr().cast::<f32>()) }
        }
        #[inline(always)]
        fn store(self, v: __m512, out: &mut [f32; W]) {
            // SAFETY: see the impl; `out` holds 16 `f32`s.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
        }
        #[inline(always)]
        fn add(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        fn sub(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        fn mul(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        fn max(self, a: __m512, b: __m512) -> __m512 {
            // `vmaxps` returns its second operand unless the first is greater.
            // SAFETY: see the impl.
            unsafe { _mm512_max_ps(a, b) }
        }
        #[inline(always)]
        fn min(self, a: __m512, b: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe { _mm512_min_ps(a, b) }
        }
        #[inline(always)]
        fn mul_nonzero(self, y: __m512, d: __m512) -> __m512 {
            // SAFETY: see the impl.
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_NEQ_UQ>(y, _mm512_setzero_ps());
                _mm512_maskz_mul_ps(keep, y, d)
            }
        }
        #[inline(always)]
        fn scale2(self, e: __m512, _t: __m512, nf: __m512) -> __m512 {
            // `e * 2^floor(nf)` rounded once: the same bits as the exact-then-rounding pair of
            // multiplications of the other levels.
            // SAFETY: see the impl.
            unsafe { _mm512_scalef_ps(e, nf) }
        }
    }
}
