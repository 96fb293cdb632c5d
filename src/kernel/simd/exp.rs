//! A vectorisable `exp` for `x <= 0` in `f32`, the only range softmax needs (`x = x_j - max`).
//!
//! Method: `x = n ln2 + r` with `n = round(x / ln2)` (by the 1.5 * 2^23 trick, no float to int
//! conversion) and `ln2` split in two (Cody-Waite), `e^r` by Cephes' degree-7 polynomial on
//! `|r| <= ln2 / 2`, and `2^n` applied as two factors `2^(n/2)` so that results in the
//! subnormal range (`-103.97 < x < -87.34`) round once, like a correctly rounded exp would.
//! Inputs below -110, `-inf` and NaN give 0 (NaN rows are caught before their exponentials
//! are used). No fused multiply-add, so every instruction set gives the same bits.
//!
//! Maximum error, measured against `f64::exp` by the test below over every 7th `f32` in
//! `[-110, 0]`: 2 ulp where the result is normal (`x >= -87.33`), and within 1 unit of the
//! smallest subnormal (2^-149) below that.
//!
//! [`exp`] is the vector form, written once over [`Simd`] and compiled per level; [`exp1`] is
//! the same operations on one lane (tested to give the same bits as every level).

/// Lanes per vector: 16 `f32`, one AVX-512 register, two AVX2 registers, four SSE2/NEON.
pub const W: usize = 16;

use super::lanes::Simd;

const LO: f32 = -110.0;
/// `1.5 * 2^23`: adding it rounds to an integer held in the low mantissa bits.
pub(super) const MAGIC: f32 = 12_582_912.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for one lane; see the module docs for range and error.
#[inline(always)]
pub fn exp1(x: f32) -> f32 {
    // NaN and anything below LO become LO (the comparison is false for NaN).
    let x = if x > LO { x } else { LO };
    let x = if x < 0.0 { x } else { 0.0 };
    let t = x * LOG2E + MAGIC;
    let n = t.to_bits() as i32 - MAGIC.to_bits() as i32;
    let nf = t - MAGIC;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * (r * r) + r + 1.0;
    let n1 = n >> 1;
    let n2 = n - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    e * s1 * s2
}

/// `e^x` lane by lane: the operations of [`exp1`] in the same order.
#[inline(always)]
pub fn exp<S: Simd>(s: S, x: S::V) -> S::V {
    let x = s.max(x, s.splat(LO));
    let x = s.min(x, s.splat(0.0));
    let t = s.add(s.mul(x, s.splat(LOG2E)), s.splat(MAGIC));
    let nf = s.sub(t, s.splat(MAGIC));
    let r = s.sub(
        s.sub(x, s.mul(nf, s.splat(LN2_HI))),
        s.mul(nf, s.splat(LN2_LO)),
    );
    let mut p = s.splat(1.987_569_1e-4);
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ] {
        p = s.add(s.mul(p, r), s.splat(c));
    }
    let e = s.add(s.add(s.mul(p, s.mul(r, r)), r), s.splat(1.0));
    s.scale2(e, t, nf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, exact: f64) -> f64 {
        let e = exact as f32;
        let ulp = f32::from_bits(e.to_bits() + 1) - e;
        ((a as f64 - exact) / ulp as f64).abs()
    }

    #[test]
    fn max_error_over_the_whole_range() {
        let (mut worst_normal, mut worst_sub) = (0.0f64, 0.0f64);
        // Every 7th float from -110 up to 0 (the sign bit set: larger bits = more negative).
        let (lo, hi) = ((-110.0f32).to_bits(), (-0.0f32).to_bits());
        let mut b = hi;
        while b <= lo {
            let x = f32::from_bits(b);
            let got = exp1(x);
            let exact = (x as f64).exp();
            if exact >= f32::MIN_POSITIVE as f64 {
                worst_normal = worst_normal.max(ulps(got, exact));
            } else {
                worst_sub = worst_sub.max((got as f64 - exact).abs() / 2f64.powi(-149));
            }
            b += 7;
        }
        assert!(worst_normal <= 2.0, "worst error {worst_normal} ulp");
        assert!(
            worst_sub <= 1.0,
            "worst subnormal error {worst_sub} x 2^-149"
        );
    }

    /// Every level's vector form against `exp1`, bit for bit, over every 1009th float in
    /// `[-120, 0]`, every 7th in the subnormal band and the special values.
    #[test]
    fn every_level_matches_exp1() {
        use super::super::lanes::Portable;
        let mut xs: Vec<f32> = vec![0.0, -0.0, f32::NEG_INFINITY, f32::NAN, -f32::MAX];
        let (lo, hi) = ((-120.0f32).to_bits(), (-0.0f32).to_bits());
        xs.extend((hi..=lo).step_by(1009).map(f32::from_bits));
        let (lo, hi) = ((-104.0f32).to_bits(), (-87.0f32).to_bits());
        xs.extend((hi..=lo).step_by(7).map(f32::from_bits));
        xs.resize(xs.len().next_multiple_of(W), 0.0);
        fn run<S: Simd>(s: S, xs: &[f32]) -> Vec<u32> {
            xs.chunks_exact(W)
                .flat_map(|c| s.to_array(exp(s, s.load(c.try_into().unwrap()))))
                .map(f32::to_bits)
                .collect()
        }
        let want: Vec<u32> = xs.iter().map(|&x| exp1(x).to_bits()).collect();
        assert!(run(Portable, &xs) == want, "portable");
        #[cfg(target_arch = "x86_64")]
        {
            use super::super::lanes::{Avx2, Avx512};
            if let Some(s) = Avx2::new() {
                assert!(run(s, &xs) == want, "avx2");
            }
            if let Some(s) = Avx512::new() {
                assert!(run(s, &xs) == want, "avx512");
            }
        }
    }

    #[test]
    fn edges() {
        assert_eq!(exp1(0.0), 1.0);
        assert_eq!(exp1(-0.0), 1.0);
        assert_eq!(exp1(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp1(-104.0), 0.0);
        assert_eq!(exp1(-200.0), 0.0);
        assert!(exp1(-103.0) > 0.0);
        assert_eq!(exp1(f32::NAN), 0.0);
        // Every float in the subnormal band, not a sample.
        let (lo, hi) = ((-104.0f32).to_bits(), (-87.0f32).to_bits());
        for b in (hi..=lo).step_by(3) {
            let x = f32::from_bits(b);
            let exact = (x as f64).exp();
            let err = (exp1(x) as f64 - exact).abs();
            assert!(err <= 2f64.powi(-149).max(exact * 2.4e-7), "{x}");
        }
    }
}
