//! The fused kernel on arbitrary shapes, class axes, labels, options, weights, upstream
//! gradients, input alignments and values of every float dtype, against the float64 oracle
//! (`xent::kernel::reference`) within the contract's tolerances (semantics §8), with the
//! comparison rules of the kernel's property tests: NaN matches only NaN, an infinity only
//! itself, and each value's allowance scales with the size of the terms it was computed from.
//!
//! Logits are drawn in the dtype: any finite bit pattern (within 1e300 for float64), small
//! values, zeros, the dtype's extremes, and (in one case in eight) infinities and NaN,
//! compared as contract §6 says. The oracle is given them exactly widened. Labels, weights and
//! upstream gradients stay moderate, so that a gradient stored in a half type is in its range
//! (a loss or gradient the oracle gives beyond the dtype's range may come back as that
//! infinity, as it is answered in the dtype); probabilities (`from_logits = false`) are
//! positive and at most 1e6. Class ids are in range, the ignore index, or now and then out of
//! range, which the kernel must refuse, naming the first.

use half::{bf16, f16};
use xent::kernel::dtype::{DType, Element};
use xent::kernel::reference::{self, RefLabels, RefProblem};
use xent::kernel::{
    ClassIds, Elems, Grads, Input, KernelError, Labels, Layout, LeBytes, Loss, Options, Problem,
    Reduction, Upstream, evaluate, normalize_axis, view3, view3_mut,
};

use crate::draw::Draw;

/// One generated problem, its values already representable in the dtype.
#[derive(Debug)]
struct Case {
    dtype: DType,
    shape: Vec<usize>,
    logits: Vec<f64>,
    dense: Option<Vec<f64>>,
    ids: Vec<i64>,
    wide_ids: bool,
    options: Options,
    class_weights: Option<Vec<f64>>,
    sample_weights: Option<Vec<f64>>,
    upstream: Option<Vec<f64>>,
    /// Byte offsets of logits and dense labels past an aligned address, when read as bytes.
    misaligned: Option<(usize, usize)>,
    grad_logits: bool,
    grad_labels: bool,
}

fn round(dtype: DType, v: f64) -> f64 {
    match dtype {
        DType::F16 => f16::from_f64(v).to_f64(),
        DType::BF16 => bf16::from_f64(v).to_f64(),
        DType::F32 => v as f32 as f64,
        _ => v,
    }
}

fn max_of(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => f16::MAX.to_f64(),
        DType::BF16 => bf16::MAX.to_f64(),
        DType::F32 => f32::MAX as f64,
        _ => f64::MAX,
    }
}

/// Any finite value of the dtype, from its bits.
fn any_finite(d: &mut Draw<'_>, dtype: DType) -> f64 {
    let v = match dtype {
        DType::F16 => f16::from_bits(d.u16()).to_f64(),
        DType::BF16 => bf16::from_bits(d.u16()).to_f64(),
        DType::F32 => f32::from_bits(d.u32()) as f64,
        _ => f64::from_bits(d.u64()),
    };
    if v.is_finite() {
        v.clamp(-largest_logit(dtype), largest_logit(dtype))
    } else {
        0.0
    }
}

/// The dtype's largest value, but 1e300 for float64: the oracle computes in float64 too, and
/// products of logits within a few powers of ten of its maximum overflow in it where the
/// kernel, multiplying in another order, is finite (fuzz/regressions/kernel/
/// float64_oracle_overflow).
fn largest_logit(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e300,
        _ => max_of(dtype),
    }
}

fn logit(d: &mut Draw<'_>, dtype: DType, nonfinite: bool) -> f64 {
    let v = match d.range(0, 9) {
        0..=2 => any_finite(d, dtype),
        3..=5 => f64::from(d.i8()) / 8.0,
        6 => 0.0,
        7 => {
            let sign = if d.bool() { -1.0 } else { 1.0 };
            sign * largest_logit(dtype) / 2.0 * (1.0 + f64::from(d.u8()) / 256.0)
        }
        _ if nonfinite => d.choose(&[f64::NEG_INFINITY, f64::INFINITY, f64::NAN]),
        _ => f64::from(d.i16()),
    };
    round(dtype, v)
}

fn probability(d: &mut Draw<'_>, dtype: DType) -> f64 {
    let v = match d.range(0, 4) {
        0 => any_finite(d, dtype).abs().min(1e6),
        1 | 2 => (f64::from(d.u8()) + 1.0) / 256.0,
        3 => 1e-9 * f64::from(d.u8()),
        _ => 1.0,
    };
    round(dtype, v)
}

fn label(d: &mut Draw<'_>, dtype: DType) -> f64 {
    let v = match d.range(0, 5) {
        0 | 1 => 0.0,
        2 => 1.0,
        3 | 4 => f64::from(d.u8()) / 255.0,
        _ => f64::from(d.i8()) / 32.0,
    };
    round(dtype, v)
}

fn weight(d: &mut Draw<'_>) -> f64 {
    d.range(0, 16) as f64 / 4.0
}

fn case(d: &mut Draw<'_>) -> Case {
    let dtype = d.choose(&[DType::F64, DType::F32, DType::F16, DType::BF16]);
    let rank = d.range(1, 4) as usize;
    let mut shape: Vec<usize> = (0..rank).map(|_| d.range(0, 4) as usize).collect();
    let axis = d.range(0, rank as u64 - 1) as usize;
    shape[axis] = d.range(1, 9) as usize;
    let classes = shape[axis];
    let elements: usize = shape.iter().product();
    let examples = elements / classes;
    let from_logits = d.ratio(3, 4);
    let nonfinite = d.ratio(1, 8);
    let logits = (0..elements)
        .map(|_| {
            if from_logits {
                logit(d, dtype, nonfinite)
            } else {
                probability(d, dtype)
            }
        })
        .collect();
    let kind = d.range(0, 2);
    let dense = (kind == 0).then(|| (0..elements).map(|_| label(d, dtype)).collect());
    let ignore_index = match (kind, d.range(0, 2)) {
        (0, _) | (_, 0) => None,
        (_, 1) => Some(-100),
        _ => Some(d.range(0, classes as u64 - 1) as i64),
    };
    let ids = (0..examples)
        .map(|_| match (d.range(0, 15), ignore_index) {
            (0..=2, Some(k)) => k,
            (3, _) => d.choose(&[-1, classes as i64, i64::MIN, i64::from(i32::MAX)]),
            _ => d.range(0, classes as u64 - 1) as i64,
        })
        .collect();
    let label_smoothing = match d.range(0, 3) {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => f64::from(d.u8()) / 255.0,
    };
    let z_loss = if from_logits && d.ratio(1, 3) {
        f64::from(d.u8()) / 2550.0
    } else {
        0.0
    };
    let reduction = d.choose(&Reduction::ALL);
    let class_weights = d
        .ratio(1, 3)
        .then(|| (0..classes).map(|_| weight(d)).collect());
    let sample_weights = d
        .ratio(1, 3)
        .then(|| (0..examples).map(|_| weight(d)).collect());
    let upstream = d.ratio(1, 3).then(|| {
        let n = if reduction == Reduction::None {
            examples
        } else {
            1
        };
        (0..n).map(|_| f64::from(d.i8()) / 32.0).collect()
    });
    let misaligned = d
        .bool()
        .then(|| (d.range(0, 7) as usize, d.range(0, 7) as usize));
    let negative_axis = d.bool();
    Case {
        dtype,
        shape,
        logits,
        dense,
        ids,
        wide_ids: kind == 2,
        options: Options {
            axis: if negative_axis {
                axis as i64 - rank as i64
            } else {
                axis as i64
            },
            label_smoothing,
            ignore_index,
            from_logits,
            z_loss,
            reduction,
        },
        class_weights,
        sample_weights,
        upstream,
        misaligned,
        grad_logits: d.ratio(7, 8),
        grad_labels: d.bool(),
    }
}

/// `v` as little-endian bytes at `offset` past an aligned address.
struct Shifted {
    buf: Vec<u64>,
    offset: usize,
    len: usize,
}

impl Shifted {
    fn new<T: Element>(v: &[T], offset: usize) -> Shifted {
        let bytes: &[u8] = bytemuck::cast_slice(v);
        let mut buf = vec![0u64; (bytes.len() + offset).div_ceil(8) + 1];
        let raw: &mut [u8] = bytemuck::cast_slice_mut(&mut buf);
        raw[offset..offset + bytes.len()].copy_from_slice(bytes);
        Shifted {
            buf,
            offset,
            len: bytes.len(),
        }
    }

    fn elems<T: Element>(&self) -> Elems<'_, T> {
        let raw: &[u8] = bytemuck::cast_slice(&self.buf);
        Elems::Le(LeBytes::new(&raw[self.offset..self.offset + self.len]).unwrap())
    }
}

/// Tolerances of one dtype (contract §8), sized as the property tests size them:
/// `|got - want| <= rel * |want| + abs * scale + floor`.
struct Tolerance {
    rel: f64,
    abs: f64,
    floor: f64,
}

fn tolerance(dtype: DType) -> Tolerance {
    let (rel, abs, floor) = match dtype {
        DType::F64 => (1e-9, 1e-12, 0.0),
        DType::F32 => (3e-5, 2e-6, 0.0),
        DType::F16 => (4e-3, 2e-6, 6e-8),
        _ => (2e-2, 2e-6, 0.0),
    };
    Tolerance { rel, abs, floor }
}

/// NaN matches NaN, an infinity only itself; a NaN allowance (from `inf / inf`) bounds
/// nothing. A value beyond `max` (a gradient stored in the dtype) may be that infinity.
fn matches(got: f64, want: f64, tol: f64, max: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    let tol = if tol.is_nan() { f64::INFINITY } else { tol };
    if want.abs() > max && got.is_infinite() && got.signum() == want.signum() {
        return true;
    }
    got == want || (got.is_finite() && want.is_finite() && (got - want).abs() <= tol)
}

/// Panics on a failure, but for the known disagreements (see [`run`]).
pub fn check(data: &[u8]) {
    check_with(data, true);
}

/// [`check`], the known disagreements included.
#[allow(dead_code)]
pub fn check_strict(data: &[u8]) {
    check_with(data, false);
}

fn check_with(data: &[u8], skip_known: bool) {
    let c = case(&mut Draw(data));
    if std::env::var_os("XENT_FUZZ_DEBUG").is_some() {
        eprintln!("{c:?}");
    }
    match c.dtype {
        DType::F64 => run::<f64>(&c, skip_known),
        DType::F32 => run::<f32>(&c, skip_known),
        DType::F16 => run::<f16>(&c, skip_known),
        _ => run::<bf16>(&c, skip_known),
    }
}

fn run<T: Element>(c: &Case, skip_known: bool) {
    let axis = normalize_axis(c.options.axis, c.shape.len()).unwrap();
    let layout = Layout::new(&c.shape, axis);
    let (rows, elements) = (layout.rows(), layout.elements());
    let typed = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
    let x = typed(&c.logits);
    let y = c.dense.as_deref().map(typed);
    // int32 ids hold what an int32 holds.
    let ids32: Vec<i32> = c.ids.iter().map(|&t| t as i32).collect();
    let ids: Vec<i64> = if c.wide_ids {
        c.ids.clone()
    } else {
        ids32.iter().map(|&t| i64::from(t)).collect()
    };
    let shifted = c.misaligned.map(|(ox, oy)| {
        let sy = y.as_deref().map(|y| Shifted::new(y, oy));
        (Shifted::new(&x, ox), sy)
    });
    let logits = match &shifted {
        Some((sx, _)) => Input::new(sx.elems(), layout).unwrap(),
        None => Input::from(view3(&x, layout).unwrap()),
    };
    let labels = match (&y, &shifted) {
        (Some(_), Some((_, Some(sy)))) => Labels::Dense(Input::new(sy.elems(), layout).unwrap()),
        (Some(y), _) => Labels::Dense(Input::from(view3(y, layout).unwrap())),
        (None, _) if c.wide_ids => Labels::Sparse(ClassIds::I64(&ids)),
        (None, _) => Labels::Sparse(ClassIds::I32(&ids32)),
    };
    let upstream = match (&c.upstream, c.options.reduction) {
        (None, _) => Upstream::Ones,
        (Some(g), Reduction::None) => Upstream::PerExample(g),
        (Some(g), _) => Upstream::Scalar(g[0]),
    };
    let problem = Problem {
        logits,
        labels,
        options: c.options,
        class_weights: c.class_weights.as_deref(),
        sample_weights: c.sample_weights.as_deref(),
        upstream,
    };
    // Filled with a value the kernel must overwrite everywhere.
    let fill = T::from_f64(12345.0);
    let mut grad_logits = vec![fill; if c.grad_logits { elements } else { 0 }];
    let mut grad_labels = (c.grad_labels && y.is_some()).then(|| vec![fill; elements]);
    let grads = Grads {
        logits: c
            .grad_logits
            .then(|| view3_mut(&mut grad_logits, layout).unwrap()),
        labels: grad_labels.as_mut().map(|g| view3_mut(g, layout).unwrap()),
    };
    let got = evaluate(&problem, grads);

    let in_range =
        |t: i64| Some(t) == c.options.ignore_index || (0..layout.classes as i64).contains(&t);
    if let Some(position) = y
        .is_none()
        .then(|| ids.iter().position(|&t| !in_range(t)))
        .flatten()
    {
        match got {
            Err(KernelError::ClassIdOutOfRange { position: p, .. }) => {
                assert_eq!(p, position, "the first bad class id")
            }
            other => panic!(
                "class id {} at {position} accepted: {other:?}",
                ids[position]
            ),
        }
        return;
    }
    let got = got.expect("the kernel refused a valid problem");
    let (classes, inner) = (layout.classes, layout.inner);
    let at = |r: usize, j: usize| ((r / inner) * classes + j) * inner + r % inner;
    // Known disagreement, not compared until it is settled: a probability row of zeros (its
    // sum is 0), where the kernel's loss is NaN and the oracle's finite
    // (fuzz/regressions/kernel/zero_probability_row, an ignored test in
    // tests/fuzz_regressions.rs).
    let zero_row = |r: usize| (0..classes).all(|j| x[at(r, j)].to_f64() == 0.0);
    if skip_known && !c.options.from_logits && (0..rows).any(zero_row) {
        return;
    }
    let widen = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
    let problem = RefProblem {
        shape: c.shape.clone(),
        logits: widen(&x),
        labels: match &y {
            Some(y) => RefLabels::Dense(widen(y)),
            None => RefLabels::Ids(ids.clone()),
        },
        options: c.options,
        class_weights: c.class_weights.clone(),
        sample_weights: c.sample_weights.clone(),
        upstream: c.upstream.clone(),
    };
    let want = reference::evaluate(&problem).expect("the oracle refused a valid problem");
    let tol = tolerance(T::DTYPE);
    // Losses and gradients are answered in the dtype: beyond its range they are infinities.
    let max = max_of(T::DTYPE);

    // Per example, a bound on `sum_j |y'_j|`, the size of the terms of its loss and gradients.
    let w = c
        .class_weights
        .as_ref()
        .map_or(1.0, |w| w.iter().fold(1.0f64, |a, &b| a.max(b.abs())));
    let mass: Vec<f64> = (0..rows)
        .map(|r| match &problem.labels {
            RefLabels::Dense(y) => w * ((0..classes).map(|j| y[at(r, j)].abs()).sum::<f64>() + 1.0),
            RefLabels::Ids(_) => 2.0 * w,
        })
        .collect();
    // Known disagreement, not compared until it is settled: float32, float16 and bfloat16 rows
    // whose logits span, times the row's label mass, more than f32::MAX: `x - m`, or a label
    // times it, overflows in the float32 the kernel computes in, and a loss the oracle finds
    // finite and in range comes back infinite (fuzz/regressions/kernel/
    // float32_logit_span_overflow and float32_loss_term_overflow, ignored tests).
    let span = |r: usize| {
        let row = (0..classes)
            .map(|j| x[at(r, j)].to_f64())
            .filter(|v| v.is_finite());
        let (lo, hi) = row.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        hi - lo
    };
    let beyond_f32 = |r: usize| span(r) * mass[r].max(1.0) > f64::from(f32::MAX);
    if skip_known && T::DTYPE != DType::F64 && (0..rows).any(beyond_f32) {
        return;
    }
    let sample = |r: usize| c.sample_weights.as_ref().map_or(1.0, |s| s[r].abs());
    match (&got, want.denominator) {
        (Loss::PerExample(l), None) => {
            assert_eq!(l.len(), want.loss.len());
            for (r, (&g, &v)) in l.iter().zip(&want.loss).enumerate() {
                let allowed = tol.rel * v.abs() + tol.abs * sample(r) * mass[r];
                assert!(
                    matches(g, v, allowed, max),
                    "loss of example {r}: kernel {g:e}, oracle {v:e}, allowed {allowed:e}"
                );
            }
        }
        (Loss::Reduced(g), Some(den)) => {
            let v = want.loss[0];
            let terms: f64 = (0..rows).map(|r| sample(r) * mass[r]).sum();
            let scaled = if den == 0.0 {
                0.0
            } else {
                tol.abs * terms / den.abs()
            };
            let allowed = tol.rel * v.abs() + scaled;
            assert!(
                matches(*g, v, allowed, max),
                "reduced loss: kernel {g:e}, oracle {v:e}, allowed {allowed:e}"
            );
        }
        (got, _) => panic!(
            "kernel returned {got:?} for reduction {}",
            c.options.reduction
        ),
    }
    for (what, got, wanted) in [
        (
            "grad_logits",
            c.grad_logits.then_some(&grad_logits),
            Some(&want.grad_logits),
        ),
        (
            "grad_labels",
            grad_labels.as_ref(),
            want.grad_labels.as_ref(),
        ),
    ] {
        let (Some(got), Some(wanted)) = (got, wanted) else {
            continue;
        };
        assert_eq!(got.len(), wanted.len(), "{what} length");
        for (r, (&factor, &m)) in want.grad_factor.iter().zip(&mass).enumerate() {
            let row_max = (0..classes)
                .map(|j| wanted[at(r, j)])
                .filter(|v| v.is_finite())
                .fold(0.0f64, |a, v| a.max(v.abs()));
            // Probabilities: the gradient is `(d_j - sum_k d_k p_k) / S`, with `S` the row's sum
            // and `|d_k| <= |y'_k| / p_k`, so the rounding of the numerator is divided by `S`.
            let amplified = if c.options.from_logits {
                0.0
            } else {
                let sum: f64 = (0..classes).map(|j| x[at(r, j)].to_f64()).sum();
                let least = (0..classes)
                    .map(|j| x[at(r, j)].to_f64() / sum)
                    .fold(1.0f64, f64::min)
                    .max(reference::PROBABILITY_EPSILON);
                factor.abs() * 2.0 * m / least / sum
            };
            let scale = factor.abs() * 2.0 * m + row_max + amplified;
            for j in 0..classes {
                let (g, v) = (got[at(r, j)].to_f64(), wanted[at(r, j)]);
                let allowed = tol.rel * v.abs() + tol.abs * scale + tol.floor;
                assert!(
                    matches(g, v, allowed, max),
                    "{what} at element {} (example {r}, class {j}): kernel {g:e}, oracle {v:e}, allowed {allowed:e}",
                    at(r, j)
                );
            }
        }
    }
}
