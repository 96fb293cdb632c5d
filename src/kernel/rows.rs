//! The fused computation of one row: statistics, loss and gradients in three passes over the
//! row (max; sum of exponentials with the label sums; gradients), with no softmax stored.
//!
//! Both label kinds go through the same code: a [`LabelRow`] gives the *effective* label
//! `y'_j` (after label smoothing and class weights) and its derivative with respect to the
//! given label, so dense rows and class ids differ only in how `y'_j` is produced (spec §2–3):
//! - dense: `y'_j = w_j * (y_j * (1 - eps) + eps / C)`
//! - class id `t`: `y'_j = (1 - eps) * w_t * [j == t] + (eps / C) * w_j`
//!
//! With `Y = sum_j y'_j` and `A = sum_{j: y'_j != 0} y'_j (x_j - m)` the loss is
//! `log S * Y - A` (plus the z-loss), i.e. `-sum_j y'_j log_softmax_j` with `log_softmax`
//! formed as `(x_j - m) - log S`, and terms with `y'_j = 0` skipped so `-inf` logits at
//! zero labels contribute nothing (spec Deviation 4). The gradient is
//! `softmax_j * (Y + 2 z lse) - y'_j` (spec Deviation 1: the true gradient). Where `Y` is
//! infinite (an infinite label or class weight) the loss is summed term by term instead
//! ([`loss_term_by_term`]), as `A` would hold `inf * 0` at a class holding the maximum.
//!
//! Sums inside a row run in class order in `f64`, so a row's result depends on nothing but
//! the row.

use ndarray::{ArrayView1, ArrayViewMut1};
use num_traits::Float;

use super::dtype::{Calc, Element};

/// Effective labels of one row.
pub(super) trait LabelRow {
    /// `y'_j`.
    fn y(&self, j: usize) -> f64;
    /// `d y'_j / d y_j`, the factor of the labels gradient (dense rows only).
    fn dy(&self, j: usize) -> f64;
    /// Sum and count of non-finite values of the given labels `y_j` (dense rows only), for
    /// the numerical health report.
    fn given_stats(&self) -> LabelStats {
        LabelStats::default()
    }
}

/// What a dense label row looked like before smoothing and weights.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct LabelStats {
    /// `sum_j y_j` in `f64`.
    pub sum: f64,
    /// How many `y_j` are NaN or infinite.
    pub nonfinite: u32,
}

/// What one row gives back besides its gradients.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct RowOut {
    /// The unweighted loss.
    pub loss: f64,
    /// How many logits (or probabilities) of the row are NaN or infinite.
    pub nonfinite: u32,
}

/// A dense label row.
pub(super) struct DenseRow<'a, T> {
    pub y: ArrayView1<'a, T>,
    /// `1 - eps`.
    pub keep: f64,
    /// `eps / C`.
    pub add: f64,
    pub class_weights: Option<&'a [f64]>,
}

impl<T: Element> LabelRow for DenseRow<'_, T> {
    #[inline]
    fn y(&self, j: usize) -> f64 {
        let v = self.y[j].to_f64() * self.keep + self.add;
        match self.class_weights {
            Some(w) => w[j] * v,
            None => v,
        }
    }
    #[inline]
    fn dy(&self, j: usize) -> f64 {
        match self.class_weights {
            Some(w) => w[j] * self.keep,
            None => self.keep,
        }
    }
    fn given_stats(&self) -> LabelStats {
        let (mut sum, mut nonfinite) = (0.0, 0);
        for v in self.y.iter() {
            let v = v.to_f64();
            sum += v;
            nonfinite += u32::from(!v.is_finite());
        }
        LabelStats { sum, nonfinite }
    }
}

/// A class id row.
pub(super) struct SparseRow<'a> {
    pub target: usize,
    /// `(1 - eps) * w_t`.
    pub keep_wt: f64,
    /// `eps / C`.
    pub add: f64,
    pub class_weights: Option<&'a [f64]>,
}

impl LabelRow for SparseRow<'_> {
    #[inline]
    fn y(&self, j: usize) -> f64 {
        let hit = if j == self.target { self.keep_wt } else { 0.0 };
        match self.class_weights {
            // Without smoothing there is no `(eps / C) w_j` term: an infinite class weight
            // elsewhere does not enter the row (`0 * inf` would make it NaN).
            Some(_) if self.add == 0.0 => hit,
            Some(w) => hit + self.add * w[j],
            None => hit + self.add,
        }
    }
    #[inline]
    fn dy(&self, _j: usize) -> f64 {
        0.0
    }
}

/// Where a row's gradients go, already scaled by the row's factor `scale`.
pub(super) struct RowGrads<'a, T> {
    pub logits: Option<ArrayViewMut1<'a, T>>,
    pub labels: Option<ArrayViewMut1<'a, T>>,
    /// `d returned_loss / d loss_i` times the upstream gradient.
    pub scale: f64,
}

impl<T: Element> RowGrads<'_, T> {
    /// Every gradient element of the row set to `v`.
    pub fn fill(&mut self, v: f64) {
        let v = T::from_f64(v);
        if let Some(g) = self.logits.as_mut() {
            g.fill(v);
        }
        if let Some(g) = self.labels.as_mut() {
            g.fill(v);
        }
    }
}

/// Loss of one row of logits (unweighted by sample weight), writing its scaled gradients.
pub(super) fn logits_row<T: Element, L: LabelRow>(
    x: ArrayView1<'_, T>,
    labels: &L,
    z_loss: f64,
    mut grads: RowGrads<'_, T>,
) -> RowOut {
    // Pass 1: the maximum, whether the row holds NaN or +inf, and how many non-finite values.
    let mut m = <T::Calc as Float>::neg_infinity();
    let mut poisoned = false;
    let mut nonfinite = 0u32;
    for &v in x.iter() {
        let v = v.load();
        poisoned |= v.is_nan() | (v == <T::Calc as Float>::infinity());
        nonfinite += u32::from(!v.is_finite());
        if v > m {
            m = v;
        }
    }
    if poisoned || m == <T::Calc as Float>::neg_infinity() {
        grads.fill(f64::NAN);
        return RowOut {
            loss: f64::NAN,
            nonfinite,
        };
    }
    // Pass 2: S = sum exp(x - m), Y = sum y', A = sum y' (x - m) over non-zero y'.
    let (mut s, mut y_sum, mut a) = (0.0f64, 0.0f64, 0.0f64);
    for (j, &v) in x.iter().enumerate() {
        let d = v.load() - m;
        s += d.exp().into();
        let y = labels.y(j);
        y_sum += y;
        if y != 0.0 {
            a += y * d.into();
        }
    }
    let log_s = s.ln();
    let lse = m.into() + log_s;
    let loss = if y_sum.is_infinite() {
        // `A` would hold `inf * 0` at a maximum's class: the terms one by one instead.
        loss_term_by_term(x.iter().enumerate().map(|(j, &v)| {
            let log_softmax = (v.load() - m).into() - log_s;
            (labels.y(j), log_softmax)
        }))
    } else {
        log_s * y_sum - a
    } + z_loss * lse * lse;

    // Pass 3: gradients.
    if let Some(g) = grads.logits.as_mut() {
        let k = <T::Calc as Calc>::from_f64(y_sum + 2.0 * z_loss * lse);
        let inv_s = <T::Calc as Calc>::from_f64(1.0 / s);
        let scale = <T::Calc as Calc>::from_f64(grads.scale);
        for (j, (out, &v)) in g.iter_mut().zip(x.iter()).enumerate() {
            let p = (v.load() - m).exp() * inv_s;
            let y = <T::Calc as Calc>::from_f64(labels.y(j));
            *out = T::store(scale * (p * k - y));
        }
    }
    if let Some(g) = grads.labels.as_mut() {
        let scale = grads.scale;
        for (j, (out, &v)) in g.iter_mut().zip(x.iter()).enumerate() {
            // Where y_j does not enter the loss (dy = 0) its gradient is 0, even at a -inf
            // logit: 0 * log 0 = 0, as for the loss itself (spec Deviation 4).
            let dy = labels.dy(j);
            let log_softmax = (v.load() - m).into() - log_s;
            *out = T::from_f64(if dy == 0.0 {
                0.0
            } else {
                -scale * dy * log_softmax
            });
        }
    }
    RowOut { loss, nonfinite }
}

/// `-sum_j y'_j log_softmax_j` from the pairs `(y'_j, log_softmax_j)`, a term with `y'_j = 0`
/// contributing 0 (spec Deviation 4): the cross-entropy of a row whose effective labels sum to
/// an infinity. There `log S * Y - A` is no longer the same sum: an infinite label at a class
/// holding the maximum puts `inf * 0` (NaN) into `A`, where the term itself is
/// `-inf * log_softmax_j`, infinite like the loss the frameworks give. Rows whose labels sum to
/// NaN stay NaN either way; finite sums keep the fused formula.
pub(super) fn loss_term_by_term(terms: impl Iterator<Item = (f64, f64)>) -> f64 {
    -terms
        .map(|(y, log_softmax)| if y == 0.0 { 0.0 } else { y * log_softmax })
        .fold(0.0, |a, t| a + t)
}

/// The clip bound of probabilities (Keras's epsilon), exact in `f64`.
pub(super) const PROB_EPS: f64 = 1e-7;

/// Loss of one row of probabilities (`from_logits = false`, spec §2): the row is normalised,
/// clipped to `[eps, 1 - eps]`, and the gradient flows through both (zero where clipped).
/// Computed in `f64` for every dtype.
pub(super) fn probabilities_row<T: Element, L: LabelRow>(
    p: ArrayView1<'_, T>,
    labels: &L,
    mut grads: RowGrads<'_, T>,
) -> RowOut {
    let total: f64 = p.iter().map(|v| v.to_f64()).sum();
    let nonfinite = p.iter().map(|v| u32::from(!v.to_f64().is_finite())).sum();
    // NaN is not "clipped": it must propagate into the gradient, which `contains` would hide.
    #[allow(clippy::manual_range_contains)]
    let clip = |r: f64| {
        let q = r.clamp(PROB_EPS, 1.0 - PROB_EPS);
        (q, r < PROB_EPS || r > 1.0 - PROB_EPS)
    };
    // d_j = d loss / d q_j where not clipped, 0 where clipped; dot = sum_k d_k r_k.
    let d_of = |y: f64, q: f64, clipped: bool| if clipped || y == 0.0 { 0.0 } else { -y / q };
    let (mut loss, mut dot) = (0.0f64, 0.0f64);
    for (j, v) in p.iter().enumerate() {
        let r = v.to_f64() / total;
        let (q, clipped) = clip(r);
        let y = labels.y(j);
        if y != 0.0 {
            loss -= y * q.ln();
        }
        dot += d_of(y, q, clipped) * r;
    }
    if let Some(g) = grads.logits.as_mut() {
        let scale = grads.scale;
        for (j, (out, v)) in g.iter_mut().zip(p.iter()).enumerate() {
            let (q, clipped) = clip(v.to_f64() / total);
            *out = T::from_f64(scale * (d_of(labels.y(j), q, clipped) - dot) / total);
        }
    }
    if let Some(g) = grads.labels.as_mut() {
        let scale = grads.scale;
        for (j, (out, v)) in g.iter_mut().zip(p.iter()).enumerate() {
            let (q, _) = clip(v.to_f64() / total);
            *out = T::from_f64(-scale * labels.dy(j) * q.ln());
        }
    }
    RowOut { loss, nonfinite }
}
