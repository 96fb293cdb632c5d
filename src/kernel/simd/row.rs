//! One contiguous row on the fast path: statistics with an online maximum, then the gradient.
//!
//! The formulas are those of [`super::super::rows`] (spec §1–3, Deviation 1 and 4), restricted
//! to rows without class weights: effective labels `y'_j = y_j (1 - eps) + eps / C` (dense) or
//! `(1 - eps) [j == t] + eps / C` (class id `t`).
//!
//! A row's call is one value, [`Row`]: its inputs, its scratch buffers, where its gradient goes
//! and by what it is scaled. [`fast_row`] routes it to the copy of [`body`] compiled for the
//! inputs' representation and the instruction set, and `body` runs the passes in order:
//! 1. [`Passes::statistics`]: the maximum, the sum of exponentials and the label sum, block by
//!    block, keeping each exponential where the gradient goes when it can;
//! 2. [`count_nonfinite`], only in a row whose sums showed a NaN or an infinity;
//! 3. the gradient pass: [`Passes::gradient_from_kept`] rescales the kept exponentials,
//!    [`Passes::dense_gradient`] and [`Passes::sparse_gradient`] compute them again; each also
//!    sums the `x - m` the loss needs;
//! 4. the loss, from the sums ([`Factors`], [`sparse_a`]); term by term in a row whose labels
//!    sum to an infinity, as the general path does (`rows::loss_term_by_term`).
//!
//! Every lane loop goes through one driver, [`for_each_vector`]; the `read` module says how the
//! values reach the lanes.

use half::{bf16, f16};

use super::super::input::{Elems, LeBytes};
use super::super::rows;
use super::Level;
use super::exp::{W, exp, exp1};
#[cfg(target_arch = "x86_64")]
use super::lanes::{Avx2, Avx512};
use super::lanes::{Portable, Simd};
use super::read::{Lanes, RowIn};

/// Elements per block: 4 KiB of `f32`, read twice from L1 in the statistics pass.
pub const BLOCK: usize = 1024;

/// The labels of a fast row, dense ones read as `Y`.
#[derive(Clone, Copy)]
pub enum FastLabels<Y> {
    /// A dense label row.
    Dense {
        /// The given labels.
        y: Y,
        /// `1 - eps`.
        keep: f64,
        /// `eps / C`.
        add: f64,
    },
    /// A class id.
    Sparse {
        /// The class id, in `[0, C)`.
        target: usize,
        /// `1 - eps`.
        keep: f64,
        /// `eps / C`.
        add: f64,
    },
}

impl<Y> FastLabels<Y> {
    /// The same labels with dense ones read as `Z`.
    #[inline(always)]
    fn map<Z>(&self, f: impl FnOnce(&Y) -> Z) -> FastLabels<Z> {
        match self {
            FastLabels::Dense { y, keep, add } => FastLabels::Dense {
                y: f(y),
                keep: *keep,
                add: *add,
            },
            &FastLabels::Sparse { target, keep, add } => FastLabels::Sparse { target, keep, add },
        }
    }

    /// `(1 - eps, eps / C)`.
    #[inline(always)]
    fn smoothing(&self) -> (f64, f64) {
        match *self {
            FastLabels::Dense { keep, add, .. } | FastLabels::Sparse { keep, add, .. } => {
                (keep, add)
            }
        }
    }
}

/// Per-task buffers for widening halves and narrowing gradients: made once per block of rows
/// by the caller, so rows allocate and clear nothing.
pub struct Scratch {
    x: [f32; BLOCK],
    y: [f32; BLOCK],
    g: [f32; BLOCK],
    /// The running maximum after each block of the row (grows once, to the longest row).
    maxes: Vec<f32>,
}

impl Scratch {
    /// Zeroed buffers, on the heap.
    pub fn new() -> Box<Scratch> {
        Box::new(Scratch {
            x: [0.0; BLOCK],
            y: [0.0; BLOCK],
            g: [0.0; BLOCK],
            maxes: Vec::new(),
        })
    }
}

/// One row's call on the fast path: the logits read as `X`, the labels (dense ones read as
/// `Y`), and where `scale * d loss / d x` goes as `T`.
pub struct Row<'s, 'g, X, Y, T> {
    /// The task's buffers.
    pub scratch: &'s mut Scratch,
    /// The logits.
    pub x: X,
    /// The labels.
    pub labels: FastLabels<Y>,
    /// The z-loss coefficient.
    pub z_loss: f64,
    /// The gradient, when asked for.
    pub grad: Option<&'g mut [T]>,
    /// The gradient's factor: `d returned / d loss` times the upstream gradient.
    pub scale: f64,
}

/// A row's call as the kernel makes it: logits and dense labels as elements of `T`, read in
/// place, aligned or not.
pub type RowCall<'s, 'g, 'a, T> = Row<'s, 'g, Elems<'a, T>, Elems<'a, T>, T>;

impl<'s, 'g, X, Y, T> Row<'s, 'g, X, Y, T> {
    /// The same call with the logits read as `x` and dense labels as `f` reads them.
    #[inline(always)]
    fn reading<X2, Y2>(self, x: X2, f: impl FnOnce(&Y) -> Y2) -> Row<'s, 'g, X2, Y2, T> {
        Row {
            scratch: self.scratch,
            x,
            labels: self.labels.map(f),
            z_loss: self.z_loss,
            grad: self.grad,
            scale: self.scale,
        }
    }
}

impl<'s, 'g, 'a, T: bytemuck::Pod> RowCall<'s, 'g, 'a, T> {
    /// The same call on the same memory as elements of `U`, of the same size and alignment
    /// (panics otherwise): how a generic caller names the type it holds.
    #[inline(always)]
    pub fn cast<U: bytemuck::Pod>(self) -> RowCall<'s, 'g, 'a, U> {
        let x = self.x.cast::<U>();
        let grad = self.grad.map(bytemuck::cast_slice_mut::<T, U>);
        let Row {
            scratch,
            labels,
            z_loss,
            scale,
            ..
        } = self;
        Row {
            scratch,
            x,
            labels: labels.map(|y| y.cast::<U>()),
            z_loss,
            grad,
            scale,
        }
    }
}

/// Element types the fast path computes in `f32`.
pub trait FastElem: bytemuck::Pod {
    /// Computes the row on the instruction set of `level`, each input read as it reads best:
    /// `f32` as a slice where aligned and as bytes where not, halves widened block by block.
    fn route(level: Level, row: RowCall<'_, '_, '_, Self>) -> FastRow;
    /// An `f32` view of `dst` to write the block's results into: `dst` itself, or for halves
    /// `buf`, which [`FastElem::narrow_from`] then rounds into `dst`.
    fn out_view<'a>(dst: &'a mut [Self], buf: &'a mut [f32; BLOCK]) -> &'a mut [f32];
    /// Rounds what [`FastElem::out_view`] gave into `dst` (nothing to do for `f32`).
    fn narrow_from(dst: &mut [Self], buf: &[f32; BLOCK]);
    /// `dst` itself when it is `f32`.
    fn as_f32_mut(dst: &mut [Self]) -> Option<&mut [f32]>;
    /// Rounds one value.
    fn from_f32(v: f32) -> Self;
    /// Widens one value.
    fn to_f32(self) -> f32;
}

/// What one fast row gives back besides its gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FastRow {
    /// The unweighted loss.
    pub loss: f64,
    /// How many logits are NaN or infinite (counted only in rows that hold one).
    pub nonfinite: u32,
    /// `sum_j y_j` of a dense row's given labels (0 for class ids).
    pub label_sum: f64,
}

impl FastElem for f32 {
    /// Aligned elements are read as slices, unaligned ones as bytes with unaligned vector
    /// loads; logits and dense labels independently (each is aligned or not on its own).
    #[inline(always)]
    fn route(level: Level, row: RowCall<'_, '_, '_, f32>) -> FastRow {
        let dense = match row.labels {
            FastLabels::Dense { y, .. } => Some(y),
            FastLabels::Sparse { .. } => None,
        };
        fn bytes<'a>(y: &Elems<'a, f32>) -> LeBytes<'a, f32> {
            match y {
                Elems::Le(b) => *b,
                Elems::Slice(_) => unreachable!("matched as bytes"),
            }
        }
        fn slice<'a>(y: &Elems<'a, f32>) -> &'a [f32] {
            match y {
                Elems::Slice(s) => s,
                Elems::Le(_) => unreachable!("matched as a slice"),
            }
        }
        // Class ids read no label row: they take the logits' representation.
        match (row.x, dense) {
            (Elems::Slice(x), None | Some(Elems::Slice(_))) => {
                run_level(level, row.reading(x, slice))
            }
            (Elems::Le(x), None | Some(Elems::Le(_))) => run_level(level, row.reading(x, bytes)),
            (Elems::Slice(x), Some(Elems::Le(_))) => run_level(level, row.reading(x, bytes)),
            (Elems::Le(x), Some(Elems::Slice(_))) => run_level(level, row.reading(x, slice)),
        }
    }
    #[inline(always)]
    fn out_view<'a>(dst: &'a mut [f32], _buf: &'a mut [f32; BLOCK]) -> &'a mut [f32] {
        dst
    }
    #[inline(always)]
    fn narrow_from(_dst: &mut [f32], _buf: &[f32; BLOCK]) {}
    #[inline(always)]
    fn as_f32_mut(dst: &mut [f32]) -> Option<&mut [f32]> {
        Some(dst)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

macro_rules! half_elem {
    ($t:ty) => {
        impl FastElem for $t {
            /// Halves are widened into the scratch block whatever their alignment: one body.
            #[inline(always)]
            fn route(level: Level, row: RowCall<'_, '_, '_, $t>) -> FastRow {
                run_level(level, row)
            }
            #[inline(always)]
            fn out_view<'a>(dst: &'a mut [$t], buf: &'a mut [f32; BLOCK]) -> &'a mut [f32] {
                &mut buf[..dst.len()]
            }
            #[inline(always)]
            fn narrow_from(dst: &mut [$t], buf: &[f32; BLOCK]) {
                for (o, v) in dst.iter_mut().zip(buf.iter()) {
                    *o = <$t>::from_f32(*v);
                }
            }
            #[inline(always)]
            fn as_f32_mut(_dst: &mut [$t]) -> Option<&mut [f32]> {
                None
            }
            #[inline(always)]
            fn from_f32(v: f32) -> $t {
                <$t>::from_f32(v)
            }
            #[inline(always)]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
        }
    };
}
half_elem!(f16);
half_elem!(bf16);

/// The one lane loop: `step(i, n)` for the vector at `i` of `len` values, `n` of its lanes
/// real. Full vectors (`n == W`) run in a loop of their own, with no test for the tail in it;
/// the tail, if any, runs once after. Steps read their vectors with [`Lanes::load_at`] (which
/// pads a tail) and write them with [`store_at`]. Callers mark their closures
/// `#[inline(always)]`: their vector operations compile for the caller's instruction set only
/// when they are inlined, and with two call sites the compiler may not inline them otherwise.
#[inline(always)]
fn for_each_vector(len: usize, mut step: impl FnMut(usize, usize)) {
    let full = len / W * W;
    let mut i = 0;
    while i < full {
        step(i, W);
        i += W;
    }
    if full < len {
        step(full, len - full);
    }
}

/// Writes the `n` real lanes of `g` into `out` at `i`.
#[inline(always)]
fn store_at<S: Simd>(s: S, g: S::V, out: &mut [f32], i: usize, n: usize) {
    if n == W {
        s.store(g, (&mut out[i..i + W]).try_into().unwrap());
    } else {
        out[i..].copy_from_slice(&s.to_array(g)[..n]);
    }
}

/// Where a row's exponentials are kept between the passes: the gradient itself when it is
/// `f32`, else (rows of at most one block) the scratch buffer.
#[inline(always)]
fn exps_of<'a, T: FastElem>(g: &'a mut [T], gbuf: &'a mut [f32; BLOCK]) -> &'a mut [f32] {
    let n = g.len();
    match T::as_f32_mut(g) {
        Some(g) => g,
        None => &mut gbuf[..n],
    }
}

/// Whether pass 1 can keep a row's exponentials for the gradient pass: where the gradient is
/// `f32` (it holds them), or the row fits the one scratch block of halves.
#[inline(always)]
fn keeps_exps<T: FastElem>(c: usize) -> bool {
    T::as_f32_mut(&mut []).is_some() || c <= BLOCK
}

/// The first sweep of a block: its maximum, whether the lane sum of its logits is finite, and
/// the lane sums of its dense labels (0 for class ids). The tail is padded with one of the
/// block's own logits (neutral for the maximum and the check) and with 0 labels.
///
/// The lane sum is not finite when the block holds a NaN or an infinity (or, harmlessly, when
/// finite logits near `f32::MAX` overflow it; [`count_nonfinite`] then finds nothing).
#[inline(always)]
fn max_sweep<S: Simd>(s: S, xs: impl Lanes, ys: Option<impl Lanes>) -> (f32, bool, S::V) {
    let pad = xs.at(0);
    let mut mx = s.splat(f32::NEG_INFINITY);
    let mut chk = s.splat(0.0);
    let mut ysum = s.splat(0.0);
    let mut step = {
        #[inline(always)]
        |v| {
            mx = s.max(v, mx);
            chk = s.add(chk, v);
        }
    };
    match ys {
        Some(ys) => {
            assert_eq!(ys.len(), xs.len());
            for_each_vector(
                xs.len(),
                #[inline(always)]
                |i, n| {
                    step(xs.load_at(s, i, n, pad));
                    ysum = s.add(ysum, ys.load_at(s, i, n, 0.0));
                },
            );
        }
        None => for_each_vector(
            xs.len(),
            #[inline(always)]
            |i, n| step(xs.load_at(s, i, n, pad)),
        ),
    }
    let bmax = s
        .to_array(mx)
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    let finite = s.to_array(chk).iter().all(|v| v.is_finite());
    (bmax, finite, ysum)
}

/// The second sweep of a block: the lane sums of `exp(x - m)`, each exponential also written
/// into `kept` when given (the tail is padded with -inf, whose exponential is 0).
#[inline(always)]
fn exp_sweep<S: Simd>(s: S, xs: impl Lanes, mv: S::V, kept: Option<&mut [f32]>) -> S::V {
    let mut acc = s.splat(0.0);
    let pad = f32::NEG_INFINITY;
    match kept {
        Some(out) => for_each_vector(
            xs.len(),
            #[inline(always)]
            |i, n| {
                let ex = exp(s, s.sub(xs.load_at(s, i, n, pad), mv));
                acc = s.add(acc, ex);
                store_at(s, ex, out, i, n);
            },
        ),
        None => for_each_vector(
            xs.len(),
            #[inline(always)]
            |i, n| acc = s.add(acc, exp(s, s.sub(xs.load_at(s, i, n, pad), mv))),
        ),
    }
    acc
}

/// Lane sums of `x - m` over a block (the tail padded with `m`, which adds 0).
#[inline(always)]
fn sum_minus_max<S: Simd>(s: S, xs: impl Lanes, m: f32, mv: S::V) -> S::V {
    let mut acc = s.splat(0.0);
    for_each_vector(
        xs.len(),
        #[inline(always)]
        |i, n| acc = s.add(acc, s.sub(xs.load_at(s, i, n, m), mv)),
    );
    acc
}

/// The constants of a dense row's gradient pass.
#[derive(Clone, Copy)]
struct DenseK<V> {
    /// The maximum `m`.
    mv: V,
    /// `k exp(m_b - m)`: turns a kept `exp(x - m_b)` into the softmax times `k`.
    krv: V,
    /// `1 - eps`.
    keepv: V,
    /// `eps / C`.
    addv: V,
    /// The gradient's scale.
    scv: V,
}

/// One block of a dense row's fused gradient pass: rewrites the kept exponentials `io` as
/// `scale * (e k_b - y')` and returns the lane sums of `y' (x - m)` (nonzero `y'` only).
/// `PLAIN` is no label smoothing (`keep == 1`, `add == 0`) and `UNIT` a scale of 1: they skip
/// operations that would give back their input, with the same bits. With `PLAIN`, `y' = y + 0`
/// (as `y * 1 + 0`, turning a -0 label into +0) and the tail lanes are already 0.
#[inline(always)]
fn dense_grad<S: Simd, const PLAIN: bool, const UNIT: bool>(
    s: S,
    io: &mut [f32],
    xs: impl Lanes,
    ys: impl Lanes,
    k: DenseK<S::V>,
) -> S::V {
    let zero = s.splat(0.0);
    let mut acc = zero;
    // Tail lanes are not written back and add y' = 0 (zeroed below when smoothing).
    for_each_vector(
        io.len(),
        #[inline(always)]
        |i, n| {
            let ev = (&*io).load_at(s, i, n, 0.0);
            let v = xs.load_at(s, i, n, f32::NEG_INFINITY);
            let yv = ys.load_at(s, i, n, 0.0);
            let d = s.sub(v, k.mv);
            let yy = if PLAIN {
                s.add(yv, zero)
            } else {
                effective_labels(s, yv, k.keepv, k.addv, n)
            };
            acc = s.add(acc, s.mul_nonzero(yy, d));
            let g = s.sub(s.mul(ev, k.krv), yy);
            store_at(s, if UNIT { g } else { s.mul(k.scv, g) }, io, i, n);
        },
    );
    acc
}

/// One block of a class-id row's fused gradient pass: rewrites the kept exponentials `io` as
/// `scale * (e k_b - eps / C)` (the target is set afterwards). `SMOOTHED` is `eps / C` other
/// than +0 and `UNIT` a scale of 1: without the one the subtraction of +0 and with the other
/// the multiplication by 1 are left out, as they give back their input bit for bit (`-0 - 0`
/// is `-0`).
#[inline(always)]
fn sparse_grad<S: Simd, const SMOOTHED: bool, const UNIT: bool>(
    s: S,
    io: &mut [f32],
    krv: S::V,
    addv: S::V,
    scv: S::V,
) {
    for_each_vector(
        io.len(),
        #[inline(always)]
        |i, n| {
            let g = s.mul((&*io).load_at(s, i, n, 0.0), krv);
            let g = if SMOOTHED { s.sub(g, addv) } else { g };
            store_at(s, if UNIT { g } else { s.mul(scv, g) }, io, i, n);
        },
    );
}

/// Adds the lanes of `v` to `acc`, in `f64`.
#[inline(always)]
fn add_lanes<S: Simd>(s: S, acc: &mut [f64; W], v: S::V) {
    let a = s.to_array(v);
    for l in 0..W {
        acc[l] += f64::from(a[l]);
    }
}

/// Sum of lanes in lane order.
#[inline(always)]
fn lane_sum(v: &[f64; W]) -> f64 {
    v.iter().sum()
}

/// The effective labels `y' = y (1 - eps) + eps / C` of a vector of which `n` lanes are real;
/// the other lanes are 0.
#[inline(always)]
fn effective_labels<S: Simd>(s: S, yv: S::V, keepv: S::V, addv: S::V, n: usize) -> S::V {
    let yy = s.add(s.mul(yv, keepv), addv);
    if n < W {
        let mut a = s.to_array(yy);
        a[n..].fill(0.0);
        s.load(&a)
    } else {
        yy
    }
}

/// `A` of a class-id row: `keep (x_t - m) + (eps / C) sum_j (x_j - m)`, where `dt = x_t - m`
/// and `d64` holds the lane sums of `x - m` (used only when smoothing). A term whose
/// coefficient is 0 contributes 0 even at a -inf logit (0 * log 0 = 0, spec Deviation 4):
/// with smoothing 1 the target's own share is 0.
#[inline(always)]
fn sparse_a(keep: f64, add: f64, dt: f32, d64: &[f64; W]) -> f64 {
    let sum_d = if add != 0.0 { add * lane_sum(d64) } else { 0.0 };
    let target_term = if keep == 0.0 {
        0.0
    } else {
        keep * f64::from(dt)
    };
    target_term + sum_d
}

/// What the statistics pass finds in a row.
struct Stats {
    /// The maximum `m`.
    m: f32,
    /// Lane sums of `exp(x - m)`.
    s64: [f64; W],
    /// `sum_j y_j` of dense labels (0 for class ids).
    label_sum: f64,
    /// Whether some block's lane sum of logits was not finite.
    bad: bool,
}

/// How many logits of a row are NaN or infinite, and whether the row is poisoned (holds a NaN
/// or a +inf; -inf logits are masked classes, spec Deviation 4). Read only in rows whose
/// statistics pass found a non-finite lane sum.
#[inline(always)]
fn count_nonfinite(x: impl RowIn) -> (u32, bool) {
    let mut nonfinite = 0u32;
    let mut poisoned = false;
    for j in 0..x.len() {
        let v = x.at(j);
        nonfinite += u32::from(!v.is_finite());
        poisoned |= v.is_nan() || v == f32::INFINITY;
    }
    (nonfinite, poisoned)
}

/// A row's constants after the statistics pass: in `f64` for the loss, in `f32` as the lanes
/// use them.
#[derive(Clone, Copy)]
struct Factors {
    /// The maximum `m`.
    m: f32,
    /// `log S`.
    log_s: f64,
    /// `m + log S`.
    lse: f64,
    /// `1 - eps` and `eps / C`.
    keep: f64,
    add: f64,
    /// `Y = sum_j y'_j`.
    y_sum: f64,
    /// `(Y + 2 z lse) / S`: the gradient is `e_j k - y'_j` (times the scale), `e_j` the
    /// exponential `exp(x_j - m)`.
    k: f32,
    /// The scale, `1 - eps` and `eps / C` in `f32`.
    sc: f32,
    keep32: f32,
    add32: f32,
}

impl Factors {
    #[inline(always)]
    fn new<Y>(st: &Stats, labels: &FastLabels<Y>, c: usize, z_loss: f64, scale: f64) -> Factors {
        let sum = lane_sum(&st.s64);
        let log_s = sum.ln();
        let lse = f64::from(st.m) + log_s;
        let (keep, add) = labels.smoothing();
        let y_sum = match labels {
            FastLabels::Dense { .. } => keep * st.label_sum + add * c as f64,
            FastLabels::Sparse { .. } => keep + add * c as f64,
        };
        Factors {
            m: st.m,
            log_s,
            lse,
            keep,
            add,
            y_sum,
            k: ((y_sum + 2.0 * z_loss * lse) / sum) as f32,
            sc: scale as f32,
            keep32: keep as f32,
            add32: add as f32,
        }
    }
}

/// What every pass reads: a row's logits and labels on one instruction set, and the scratch
/// blocks halves are widened into.
struct Passes<'b, S, X, Y> {
    s: S,
    x: X,
    labels: FastLabels<Y>,
    xbuf: &'b mut [f32; BLOCK],
    ybuf: &'b mut [f32; BLOCK],
}

impl<S: Simd, X: RowIn, Y: RowIn> Passes<'_, S, X, Y> {
    /// Pass 1, block by block: the running maximum `m`, the lane sums of `exp(x - m)` (rescaled
    /// by `exp(m_old - m_new)` when a block raises the maximum), the sum of dense labels and
    /// whether a logit may be non-finite. With `kept`, each `exp(x_j - m_b)` is written there
    /// and `m_b`, the running maximum after block `b`, pushed onto `maxes`.
    #[inline(always)]
    fn statistics(&mut self, mut kept: Option<&mut [f32]>, maxes: &mut Vec<f32>) -> Stats {
        let s = self.s;
        let c = self.x.len();
        let mut m = f32::NEG_INFINITY;
        let mut s64 = [0.0f64; W];
        let mut y64 = [0.0f64; W];
        let mut bad = false;
        for b in (0..c).step_by(BLOCK) {
            let e = c.min(b + BLOCK);
            let xs = self.x.block(b, e, self.xbuf);
            let (bmax, finite, ysum) = match self.labels {
                FastLabels::Dense { y, .. } => max_sweep(s, xs, Some(y.block(b, e, self.ybuf))),
                FastLabels::Sparse { .. } => max_sweep(s, xs, None::<&[f32]>),
            };
            bad |= !finite;
            if bmax > m {
                // exp(-inf) is 0: the first block's rescale needs no call into libm.
                let f = if m == f32::NEG_INFINITY {
                    0.0
                } else {
                    (f64::from(m) - f64::from(bmax)).exp()
                };
                for v in s64.iter_mut() {
                    *v *= f;
                }
                m = bmax;
            }
            let out = kept.as_deref_mut().map(|k| {
                maxes.push(m);
                &mut k[b..e]
            });
            add_lanes(s, &mut s64, exp_sweep(s, xs, s.splat(m), out));
            if let FastLabels::Dense { .. } = self.labels {
                add_lanes(s, &mut y64, ysum);
            }
        }
        let label_sum = match self.labels {
            FastLabels::Dense { .. } => lane_sum(&y64),
            FastLabels::Sparse { .. } => 0.0,
        };
        Stats {
            m,
            s64,
            label_sum,
            bad,
        }
    }

    /// Pass 2 where pass 1 kept the exponentials in `exps`: rescales each block's by
    /// `exp(m_b - m)` (exactly 1 in the block that set the maximum) into the gradient, and
    /// returns the lane sums of `y' (x - m)` (dense) or of `x - m` (smoothed class ids; the
    /// logits are read again only where the loss needs them). Loop-invariant choices each
    /// have their loop, on the `f32` factors the lanes use: no smoothing (`y * 1 + 0`; +0
    /// exactly, as `- (-0)` is not an identity) and a unit scale.
    #[inline(always)]
    fn gradient_from_kept(&mut self, exps: &mut [f32], maxes: &[f32], f: &Factors) -> [f64; W] {
        let s = self.s;
        let c = self.x.len();
        let add0 = f.add32.to_bits() == 0;
        let plain = f.keep32 == 1.0 && add0;
        let unit = f.sc == 1.0;
        let smoothed = f.add != 0.0;
        let (mv, scv) = (s.splat(f.m), s.splat(f.sc));
        let (keepv, addv) = (s.splat(f.keep32), s.splat(f.add32));
        let mut a64 = [0.0f64; W];
        for (bi, b) in (0..c).step_by(BLOCK).enumerate() {
            let e = c.min(b + BLOCK);
            let rescale = if maxes[bi] == f.m {
                1.0
            } else {
                exp1(maxes[bi] - f.m)
            };
            let krv = s.splat(f.k * rescale);
            let io = &mut exps[b..e];
            let acc = match self.labels {
                FastLabels::Dense { y, .. } => {
                    let xs = self.x.block(b, e, self.xbuf);
                    let ys = y.block(b, e, self.ybuf);
                    let k = DenseK {
                        mv,
                        krv,
                        keepv,
                        addv,
                        scv,
                    };
                    match (plain, unit) {
                        (true, true) => dense_grad::<S, true, true>(s, io, xs, ys, k),
                        (true, false) => dense_grad::<S, true, false>(s, io, xs, ys, k),
                        (false, true) => dense_grad::<S, false, true>(s, io, xs, ys, k),
                        (false, false) => dense_grad::<S, false, false>(s, io, xs, ys, k),
                    }
                }
                FastLabels::Sparse { .. } => {
                    match (!add0, unit) {
                        (false, true) => sparse_grad::<S, false, true>(s, io, krv, addv, scv),
                        (false, false) => sparse_grad::<S, false, false>(s, io, krv, addv, scv),
                        (true, true) => sparse_grad::<S, true, true>(s, io, krv, addv, scv),
                        (true, false) => sparse_grad::<S, true, false>(s, io, krv, addv, scv),
                    }
                    if smoothed {
                        sum_minus_max(s, self.x.block(b, e, self.xbuf), f.m, mv)
                    } else {
                        s.splat(0.0)
                    }
                }
            };
            add_lanes(s, &mut a64, acc);
        }
        a64
    }

    /// Pass 2 of a dense row whose exponentials were not kept: computes them again, writes
    /// `scale * (e k - y')` into `grad` when given, and returns the lane sums of `y' (x - m)`
    /// (tail lanes: `x = -inf` and `y' = 0`, so they add nothing).
    #[inline(always)]
    fn dense_gradient<T: FastElem>(
        &mut self,
        y: Y,
        mut grad: Option<&mut [T]>,
        gbuf: &mut [f32; BLOCK],
        f: &Factors,
    ) -> [f64; W] {
        let s = self.s;
        let c = self.x.len();
        let (mv, kv, scv) = (s.splat(f.m), s.splat(f.k), s.splat(f.sc));
        let (keepv, addv) = (s.splat(f.keep32), s.splat(f.add32));
        let mut a64 = [0.0f64; W];
        for b in (0..c).step_by(BLOCK) {
            let e = c.min(b + BLOCK);
            let xs = self.x.block(b, e, self.xbuf);
            let ys = y.block(b, e, self.ybuf);
            let mut acc = s.splat(0.0);
            let mut out = grad.as_deref_mut().map(|g| T::out_view(&mut g[b..e], gbuf));
            for_each_vector(
                xs.len(),
                #[inline(always)]
                |i, n| {
                    let d = s.sub(xs.load_at(s, i, n, f32::NEG_INFINITY), mv);
                    let yy = effective_labels(s, ys.load_at(s, i, n, 0.0), keepv, addv, n);
                    let ex = exp(s, d);
                    acc = s.add(acc, s.mul_nonzero(yy, d));
                    // `match`, not `Option::map`: that is not always inlined, and a call in
                    // the loop costs it its registers.
                    if let Some(o) = out.as_deref_mut() {
                        store_at(s, s.mul(scv, s.sub(s.mul(ex, kv), yy)), o, i, n);
                    }
                },
            );
            if let Some(g) = grad.as_deref_mut() {
                T::narrow_from(&mut g[b..e], gbuf);
            }
            add_lanes(s, &mut a64, acc);
        }
        a64
    }

    /// Pass 2 of a class-id row whose exponentials were not kept: computes them again, writes
    /// `scale * (e k - eps / C)` into `grad` (the target is set afterwards), and returns the
    /// lane sums of `x - m` (tail lanes: `x = m`, so `d = 0` adds nothing).
    #[inline(always)]
    fn sparse_gradient<T: FastElem>(
        &mut self,
        grad: &mut [T],
        gbuf: &mut [f32; BLOCK],
        f: &Factors,
    ) -> [f64; W] {
        let s = self.s;
        let c = self.x.len();
        let (mv, kv, scv, addv) = (s.splat(f.m), s.splat(f.k), s.splat(f.sc), s.splat(f.add32));
        let mut d64 = [0.0f64; W];
        for b in (0..c).step_by(BLOCK) {
            let e = c.min(b + BLOCK);
            let xs = self.x.block(b, e, self.xbuf);
            let mut acc = s.splat(0.0);
            let out = T::out_view(&mut grad[b..e], gbuf);
            for_each_vector(
                xs.len(),
                #[inline(always)]
                |i, n| {
                    let d = s.sub(xs.load_at(s, i, n, f.m), mv);
                    acc = s.add(acc, d);
                    let g = s.mul(scv, s.sub(s.mul(exp(s, d), kv), addv));
                    store_at(s, g, out, i, n);
                },
            );
            T::narrow_from(&mut grad[b..e], gbuf);
            add_lanes(s, &mut d64, acc);
        }
        d64
    }

    /// The lane sums of `x - m` over the row, for a smoothed class-id row without a gradient.
    #[inline(always)]
    fn sums_minus_max(&mut self, m: f32) -> [f64; W] {
        let s = self.s;
        let c = self.x.len();
        let mut d64 = [0.0f64; W];
        for b in (0..c).step_by(BLOCK) {
            let e = c.min(b + BLOCK);
            let acc = sum_minus_max(s, self.x.block(b, e, self.xbuf), m, s.splat(m));
            add_lanes(s, &mut d64, acc);
        }
        d64
    }
}

/// The unweighted loss of one row, writing `scale * d loss / d x` into its gradient when given.
#[inline(always)]
fn body<S: Simd, X: RowIn, Y: RowIn, T: FastElem>(s: S, row: Row<'_, '_, X, Y, T>) -> FastRow {
    let Row {
        scratch,
        x,
        labels,
        z_loss,
        mut grad,
        scale,
    } = row;
    let Scratch {
        x: xbuf,
        y: ybuf,
        g: gbuf,
        maxes,
    } = scratch;
    let c = x.len();
    let mut passes = Passes {
        s,
        x,
        labels,
        xbuf,
        ybuf,
    };
    // Pass 1 keeps each exp(x - m_b) where the gradient goes, and pass 2 rescales it by
    // exp(m_b - m) instead of computing it again.
    let kept = grad.is_some() && keeps_exps::<T>(c);
    maxes.clear();
    let st = {
        let exps = grad
            .as_deref_mut()
            .filter(|_| kept)
            .map(|g| exps_of(g, gbuf));
        passes.statistics(exps, maxes)
    };
    // Rare: the row holds a NaN or an infinity. Count them, and poison the row unless they
    // are all -inf (masked classes, spec Deviation 4).
    let (nonfinite, poisoned) = if st.bad {
        count_nonfinite(x)
    } else {
        (0, false)
    };
    if poisoned || st.m == f32::NEG_INFINITY {
        if let Some(g) = grad {
            g.fill(T::from_f32(f32::NAN));
        }
        return FastRow {
            loss: f64::NAN,
            nonfinite,
            label_sum: st.label_sum,
        };
    }
    let f = Factors::new(&st, &labels, c, z_loss, scale);

    // Pass 2: gradients and A = sum_{y' != 0} y' (x - m) (dense), or sum (x - m) (smoothed ids).
    let sums = match (grad.as_deref_mut(), labels) {
        (Some(g), _) if kept => {
            let sums = passes.gradient_from_kept(exps_of(&mut *g, gbuf), maxes, &f);
            T::narrow_from(g, gbuf);
            sums
        }
        (g, FastLabels::Dense { y, .. }) => passes.dense_gradient(y, g, gbuf, &f),
        (Some(g), FastLabels::Sparse { .. }) => passes.sparse_gradient(g, gbuf, &f),
        (None, FastLabels::Sparse { .. }) if f.add != 0.0 => passes.sums_minus_max(f.m),
        (None, FastLabels::Sparse { .. }) => [0.0; W],
    };
    let a = match labels {
        FastLabels::Dense { .. } => lane_sum(&sums),
        FastLabels::Sparse { target, .. } => {
            let dt = x.at(target) - f.m;
            if let Some(g) = grad {
                g[target] = T::from_f32(f.sc * (exp1(dt) * f.k - (f.keep32 + f.add32)));
            }
            sparse_a(f.keep, f.add, dt, &sums)
        }
    };
    let cross_entropy = match labels {
        // Rare: an infinite label. `A` holds `inf * 0` at a class holding the maximum.
        FastLabels::Dense { y, keep, add } if f.y_sum.is_infinite() => {
            rows::loss_term_by_term((0..c).map(|j| {
                let log_softmax = (f64::from(x.at(j)) - f64::from(f.m)) - f.log_s;
                (f64::from(y.at(j)) * keep + add, log_softmax)
            }))
        }
        _ => f.log_s * f.y_sum - a,
    };
    FastRow {
        loss: cross_entropy + z_loss * f.lse * f.lse,
        nonfinite,
        label_sum: st.label_sum,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn body_avx512<X: RowIn, Y: RowIn, T: FastElem>(s: Avx512, row: Row<'_, '_, X, Y, T>) -> FastRow {
    body(s, row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn body_avx2<X: RowIn, Y: RowIn, T: FastElem>(s: Avx2, row: Row<'_, '_, X, Y, T>) -> FastRow {
    body(s, row)
}

#[inline(never)]
fn body_portable<X: RowIn, Y: RowIn, T: FastElem>(row: Row<'_, '_, X, Y, T>) -> FastRow {
    body(Portable, row)
}

/// The unweighted loss of one contiguous row of logits, writing `scale * d loss / d x` into
/// its gradient when given, on the instruction set of `level` (capped at [`Level::detected`];
/// [`Level::General`] is treated as portable). Logits and dense labels are read in place,
/// aligned or not.
pub fn fast_row<T: FastElem>(level: Level, row: RowCall<'_, '_, '_, T>) -> FastRow {
    T::route(level, row)
}

/// [`body`] on the instruction set of `level`, capped as [`fast_row`] says.
#[inline(always)]
fn run_level<X: RowIn, Y: RowIn, T: FastElem>(level: Level, row: Row<'_, '_, X, Y, T>) -> FastRow {
    let level = level.min(Level::detected());
    #[cfg(target_arch = "x86_64")]
    match level {
        Level::Avx512 => {
            if let Some(s) = Avx512::new() {
                // SAFETY: the token proves the CPU has AVX-512F.
                return unsafe { body_avx512(s, row) };
            }
        }
        Level::Avx2 => {
            if let Some(s) = Avx2::new() {
                // SAFETY: the token proves the CPU has AVX2.
                return unsafe { body_avx2(s, row) };
            }
        }
        _ => {}
    }
    body_portable(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense<Y>(y: Y, keep: f64, add: f64) -> FastLabels<Y> {
        FastLabels::Dense { y, keep, add }
    }

    fn sparse<Y>(target: usize, keep: f64, add: f64) -> FastLabels<Y> {
        FastLabels::Sparse { target, keep, add }
    }

    /// One `f32` row at `level`, with fresh scratch buffers.
    fn run(
        level: Level,
        x: &[f32],
        labels: FastLabels<Elems<'_, f32>>,
        z_loss: f64,
        grad: Option<&mut [f32]>,
        scale: f64,
    ) -> FastRow {
        let scratch = &mut Scratch::new();
        let x = Elems::Slice(x);
        fast_row(
            level,
            Row {
                scratch,
                x,
                labels,
                z_loss,
                grad,
                scale,
            },
        )
    }

    fn row(c: usize) -> (Vec<f32>, Vec<f32>) {
        let x = (0..c)
            .map(|k| ((k * 7919) % 1013) as f32 / 37.0 - 13.0)
            .collect();
        let y = (0..c)
            .map(|k| if k % 97 == 3 { 0.25 } else { 0.0 })
            .collect();
        (x, y)
    }

    #[test]
    fn every_level_gives_the_same_bits() {
        for c in [1, 15, 17, 1000, 1025, 5000] {
            let (x, mut y) = row(c);
            // Negative zeros: without smoothing the gradient reads them as +0, as `y * 1 + 0`.
            for v in y.iter_mut().step_by(5) {
                if *v == 0.0 {
                    *v = -0.0;
                }
            }
            let labels = [
                dense(Elems::Slice(&y), 0.9, 0.1 / c as f64),
                dense(Elems::Slice(&y), 1.0, 0.0),
                sparse(c / 3, 1.0, -0.0),
                sparse(c / 2, 1.0, 0.0),
                sparse(c - 1, 0.8, 0.2 / c as f64),
            ];
            // Each gradient loop: with and without smoothing, unit scale or not.
            for (lab, scale) in labels.iter().flat_map(|l| [(l, 0.5), (l, 1.0)]) {
                let mut first: Option<(u64, Vec<u32>)> = None;
                for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                    let mut g = vec![0.0f32; c];
                    let loss = run(level, &x, *lab, 1e-4, Some(&mut g), scale).loss;
                    let bits = (
                        loss.to_bits(),
                        g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    );
                    match &first {
                        None => first = Some(bits),
                        Some(f) => assert_eq!(f, &bits, "C = {c}, {level:?}, scale {scale}"),
                    }
                }
            }
        }
    }

    /// Unaligned little-endian bytes give the bits of aligned elements, at every level, for
    /// every element type, with and without a gradient, rows shorter and longer than a block
    /// and with tails that are not a whole vector, and with non-finite logits.
    #[test]
    fn unaligned_bytes_give_the_bits_of_aligned_elements_at_every_level() {
        use super::super::super::input::testing::Misaligned;
        /// Dense labels and class ids, each without and with label smoothing.
        fn four_labels<T: FastElem>(y: Elems<'_, T>, c: usize) -> [FastLabels<Elems<'_, T>>; 4] {
            let (keep, add) = (0.9, 0.1 / c as f64);
            [
                dense(y, 1.0, 0.0),
                dense(y, keep, add),
                sparse(c / 2, 1.0, 0.0),
                sparse(c - 1, keep, add),
            ]
        }
        fn check<T: FastElem>() {
            for c in [1usize, 15, 16, 17, 1000, 1024, 1025, 2049, 5000] {
                let (x32, y32) = row(c);
                for poison in [None, Some(f32::NEG_INFINITY), Some(f32::NAN)] {
                    let mut x: Vec<T> = x32.iter().map(|&v| T::from_f32(v)).collect();
                    if let Some(p) = poison {
                        x[c / 3] = T::from_f32(p);
                    }
                    let y: Vec<T> = y32.iter().map(|&v| T::from_f32(v)).collect();
                    for offset in 1..=3 {
                        let (xm, ym) =
                            (Misaligned::new(&x, offset), Misaligned::new(&y, 4 - offset));
                        let aligned = four_labels(Elems::Slice(&y), c);
                        let unaligned = four_labels(ym.elems(), c);
                        for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                            for (la, lu) in aligned.iter().zip(&unaligned) {
                                for with_grad in [false, true] {
                                    let run = |x: Elems<'_, T>, lab: &FastLabels<Elems<'_, T>>| {
                                        let mut g = vec![T::from_f32(7.0); c];
                                        let grad = with_grad.then_some(&mut g[..]);
                                        let out = fast_row(
                                            level,
                                            Row {
                                                scratch: &mut Scratch::new(),
                                                x,
                                                labels: *lab,
                                                z_loss: 1e-4,
                                                grad,
                                                scale: 0.5,
                                            },
                                        );
                                        let bits: Vec<u32> =
                                            g.iter().map(|v| v.to_f32().to_bits()).collect();
                                        (
                                            out.loss.to_bits(),
                                            out.nonfinite,
                                            out.label_sum.to_bits(),
                                            bits,
                                        )
                                    };
                                    let want = run(Elems::Slice(&x), la);
                                    // Both unaligned, and each alone (mixed representations).
                                    for (which, x, lab) in [
                                        ("both", xm.elems(), lu),
                                        ("logits", xm.elems(), la),
                                        ("labels", Elems::Slice(&x), lu),
                                    ] {
                                        assert_eq!(
                                            want,
                                            run(x, lab),
                                            "C = {c}, offset {offset}, {level:?}, poison \
                                             {poison:?}, grad {with_grad}, unaligned {which}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        check::<f32>();
        check::<f16>();
        check::<bf16>();
    }

    /// Rows whose maximum rises block after block (and far: later exponentials rescale the
    /// kept ones by factors down to 0) against the formulas in `f64`.
    #[test]
    fn kept_exponentials_are_rescaled_per_block() {
        for (c, step) in [(3000usize, 0.01f32), (4100, 0.03), (2500, 0.1)] {
            let x: Vec<f32> = (0..c)
                .map(|j| (j as f32 * step).sin() + j as f32 * step)
                .collect();
            let m = x
                .iter()
                .fold(f64::NEG_INFINITY, |a, &v| a.max(f64::from(v)));
            let sum: f64 = x.iter().map(|&v| (f64::from(v) - m).exp()).sum();
            let target = c / 3;
            let lab = sparse(target, 1.0, 0.0);
            for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                let mut g = vec![0.0f32; c];
                let loss = run(level, &x, lab, 0.0, Some(&mut g), 1.0);
                let want = m + sum.ln() - f64::from(x[target]);
                assert!(
                    (loss.loss - want).abs() <= 3e-5 * want.abs(),
                    "{c} {level:?}"
                );
                for (j, &gj) in g.iter().enumerate() {
                    let p = (f64::from(x[j]) - m).exp() / sum;
                    let want = p - if j == target { 1.0 } else { 0.0 };
                    let err = (f64::from(gj) - want).abs();
                    assert!(err <= 2e-6f64.max(3e-5 * want.abs()), "{c} {level:?} {j}");
                }
            }
        }
    }

    #[test]
    fn a_zero_coefficient_skips_a_minus_inf_target() {
        // Class ids with smoothing 1: the target's own share is 0, the smoothing share 1/C
        // meets the -inf logit, so the loss is +inf, not 0 * -inf = NaN.
        let x = [f32::NEG_INFINITY, 0.0];
        let lab = sparse(0, 0.0, 0.5);
        for level in [Level::Portable, Level::Avx2, Level::Avx512] {
            let loss = run(level, &x, lab, 0.0, None, 1.0).loss;
            assert_eq!(loss, f64::INFINITY, "{level:?}");
        }
    }

    /// A dense label of +inf or -inf at the class holding the maximum gives an infinite loss of
    /// its sign (the term `-y_j log_softmax_j`; `log S * Y - A` met `inf * 0` there) at every
    /// level, with the same bits, with and without smoothing and a gradient, in rows of one
    /// block and of several.
    #[test]
    fn infinite_labels_at_the_maximum_give_infinite_losses_at_every_level() {
        for c in [3, 17, 1025, 5000] {
            let (x, mut y) = row(c);
            let top = (0..c).fold(0, |b, j| if x[j] > x[b] { j } else { b });
            for (label, want) in [
                (f32::INFINITY, f64::INFINITY),
                (f32::NEG_INFINITY, -f64::INFINITY),
            ] {
                y[top] = label;
                for labels in [
                    dense(Elems::Slice(&y), 1.0, 0.0),
                    dense(Elems::Slice(&y), 0.9, 0.1 / c as f64),
                ] {
                    for with_grad in [false, true] {
                        let mut first = None;
                        for level in [Level::Portable, Level::Avx2, Level::Avx512] {
                            let mut g = vec![0.0f32; c];
                            let out = run(
                                level,
                                &x,
                                labels,
                                1e-4,
                                with_grad.then_some(&mut g[..]),
                                0.5,
                            );
                            assert_eq!(out.loss, want, "C = {c}, {level:?}, grad {with_grad}");
                            let bits: Vec<u32> = g.iter().map(|v| v.to_bits()).collect();
                            match &first {
                                None => first = Some(bits),
                                Some(f) => assert_eq!(f, &bits, "C = {c}, {level:?}"),
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_rules_hold_on_the_fast_path() {
        let labels = sparse(1, 1.0, 0.0);
        let run = |x: &[f32], grad: Option<&mut [f32]>| {
            run(Level::detected(), x, labels, 0.0, grad, 1.0).loss
        };
        let mut g = vec![0.0f32; 20];
        let mut x = vec![0.0f32; 20];
        x[0] = f32::NEG_INFINITY;
        let loss = run(&x, Some(&mut g));
        assert!((loss - 19f64.ln()).abs() < 1e-6 && g[0] == 0.0);
        x[17] = f32::NAN;
        assert!(run(&x, Some(&mut g)).is_nan());
        assert!(g.iter().all(|v| v.is_nan()));
        let x = vec![f32::NEG_INFINITY; 20];
        assert!(run(&x, None).is_nan());
        let mut x = vec![0.0f32; 20];
        x[1] = f32::NEG_INFINITY;
        assert_eq!(run(&x, None), f64::INFINITY);
    }
}
