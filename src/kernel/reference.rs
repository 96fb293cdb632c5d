//! A slow, plain float64 implementation of the semantics document, used as the oracle.
//!
//! The fused kernel is fast because it is clever: it merges label smoothing and class weights
//! into effective labels, skips the softmax, splits rows across threads and computes half types
//! in `f32`. This module is the opposite on purpose. It is written straight from the formulas
//! of the contract, one section at a time, in `f64`, sharing nothing with the kernel but the
//! [`Options`] and [`Reduction`] types: every row is gathered into its own `Vec` by its own
//! index arithmetic, every quantity the contract names (`m`, `S`, `lse`, `log_softmax`,
//! `softmax`) is materialised, and each loss kind uses the formula the contract gives for it.
//! Sums are compensated, so the oracle's own rounding stays far below every tolerance. Clarity
//! wins over speed everywhere.
//!
//! It exists to check the kernel: the property tests compare the two on random inputs of
//! every dtype, benches can check what they time, and a production deployment can re-evaluate
//! a small sample of requests with it to detect numerical regressions.
//!
//! Conventions, all from the contract:
//! - a product `c * log(q)` whose coefficient `c` is exactly zero is zero, even when the
//!   logarithm is `-inf` (`0 * log 0 = 0`, Deviation 4); the same holds for every derivative
//!   of such a term, since the loss does not depend on it; so is a smoothing share `(eps / C) w_j`
//!   without smoothing, whatever the class weight `w_j`;
//! - a row of logits holding NaN or `+inf`, or only `-inf`, has a NaN loss and NaN gradients;
//! - an ignored row has loss 0, gradients 0 and effective weight 0, whatever its logits;
//! - a reduction whose denominator is zero gives 0, and every gradient through it is 0 times
//!   the row's gradient (so still NaN for a NaN row);
//! - everything else is plain IEEE arithmetic: a sample weight of 0 times an infinite loss is
//!   NaN, as in TensorFlow.

use super::options::{Options, Reduction};

/// The clip bound of probabilities when `from_logits` is false (Keras's `epsilon`).
pub const PROBABILITY_EPSILON: f64 = 1e-7;

/// The labels of a [`RefProblem`].
#[derive(Clone, Debug, PartialEq)]
pub enum RefLabels {
    /// Dense labels, row-major, exactly the shape of the logits.
    Dense(Vec<f64>),
    /// One class id per example, row-major in the loss shape (the logits' shape without the
    /// class axis).
    Ids(Vec<i64>),
}

/// One evaluation, with owned row-major data, for [`evaluate`].
#[derive(Clone, Debug, PartialEq)]
pub struct RefProblem {
    /// Shape of the logits, rank >= 1.
    pub shape: Vec<usize>,
    /// Logits (or probabilities when `options.from_logits` is false), row-major.
    pub logits: Vec<f64>,
    /// Labels.
    pub labels: RefLabels,
    /// Options; `options.axis` is the class axis and may be negative.
    pub options: Options,
    /// Per-class weights, length `C`.
    pub class_weights: Option<Vec<f64>>,
    /// Sample weights already broadcast to the loss shape: one per example, row-major.
    pub sample_weights: Option<Vec<f64>>,
    /// Upstream gradient with the returned loss's shape: one value per example for
    /// [`Reduction::None`], a single value otherwise. `None` means all ones.
    pub upstream: Option<Vec<f64>>,
}

/// What [`evaluate`] returns: the outputs of the contract, plus the intermediate per-example
/// quantities, which tests use to size tolerances and people use to diagnose a disagreement.
#[derive(Clone, Debug, PartialEq)]
pub struct RefOutput {
    /// The returned loss: the weighted per-example losses `L_i` in row-major order of the loss
    /// shape for [`Reduction::None`] (one value for a rank-1 input), else one reduced value.
    pub loss: Vec<f64>,
    /// Gradient of the returned loss w.r.t. the logits, times the upstream gradient; row-major,
    /// shaped like the logits.
    pub grad_logits: Vec<f64>,
    /// Gradient of the returned loss w.r.t. dense labels, times the upstream gradient; `None`
    /// for class ids.
    pub grad_labels: Option<Vec<f64>>,
    /// Unweighted per-example losses `loss_i` (0 for ignored examples).
    pub example_losses: Vec<f64>,
    /// Effective weight `omega_i` of every example (contract §4).
    pub omega: Vec<f64>,
    /// The reduction's denominator; `None` for [`Reduction::None`].
    pub denominator: Option<f64>,
    /// Per example, `d returned / d loss_i` times the upstream gradient: the factor every
    /// gradient element of that example carries (0 for ignored examples).
    pub grad_factor: Vec<f64>,
}

/// Evaluates `problem` as the contract says, or explains why the input is invalid.
///
/// The checks are those of contract §7 that apply to owned `f64` data (dtype checks do not),
/// plus the two combinations the API refuses: `z_loss > 0` with probabilities, and
/// `ignore_index` with dense labels.
pub fn evaluate(problem: &RefProblem) -> Result<RefOutput, String> {
    let geometry = Geometry::new(&problem.shape, problem.options.axis)?;
    check(problem, &geometry)?;
    let options = &problem.options;
    let examples = geometry.examples();
    let classes = geometry.classes;

    // Per example: is it ignored, its sample weight, its effective weight omega.
    let ids = match &problem.labels {
        RefLabels::Ids(ids) => Some(ids.as_slice()),
        RefLabels::Dense(_) => None,
    };
    let ignored: Vec<bool> = (0..examples)
        .map(|e| match (ids, options.ignore_index) {
            (Some(ids), Some(k)) => ids[e] == k,
            _ => false,
        })
        .collect();
    let sample: Vec<f64> = (0..examples)
        .map(|e| problem.sample_weights.as_ref().map_or(1.0, |s| s[e]))
        .collect();
    let omega: Vec<f64> = (0..examples)
        .map(|e| {
            if ignored[e] {
                return 0.0;
            }
            let class_weight = match (ids, &problem.class_weights) {
                (Some(ids), Some(w)) => w[ids[e] as usize],
                _ => 1.0,
            };
            sample[e] * class_weight
        })
        .collect();

    // Every example's unweighted loss and unscaled gradients.
    let weights = problem
        .class_weights
        .clone()
        .unwrap_or_else(|| vec![1.0; classes]);
    let mut example_losses = vec![0.0; examples];
    let mut row_grads: Vec<RowResult> = Vec::with_capacity(examples);
    for e in 0..examples {
        if ignored[e] {
            row_grads.push(RowResult::zero(classes));
            continue;
        }
        let x = geometry.gather(&problem.logits, e);
        let labels = match &problem.labels {
            RefLabels::Dense(y) => RowLabels::Dense(geometry.gather(y, e)),
            RefLabels::Ids(ids) => RowLabels::Id(ids[e] as usize),
        };
        let row = if options.from_logits {
            logits_row(
                &x,
                &labels,
                &weights,
                options.label_smoothing,
                options.z_loss,
            )
        } else {
            probabilities_row(&x, &labels, &weights, options.label_smoothing)
        };
        example_losses[e] = row.loss;
        row_grads.push(row);
    }

    // Weighted losses L_i and the reduction (contract §4).
    let weighted: Vec<f64> = (0..examples)
        .map(|e| {
            if ignored[e] {
                0.0
            } else {
                sample[e] * example_losses[e]
            }
        })
        .collect();
    let denominator = match options.reduction {
        Reduction::None => None,
        Reduction::Sum => Some(1.0),
        Reduction::Mean => Some(accurate_sum(omega.iter().copied())),
        Reduction::SumOverBatchSize => Some(ignored.iter().filter(|&&i| !i).count() as f64),
        Reduction::SumByNonzeroWeights => Some(omega.iter().filter(|&&w| w != 0.0).count() as f64),
    };
    let loss = match denominator {
        None => weighted.clone(),
        Some(d) => vec![safe_divide(accurate_sum(weighted.iter().copied()), d)],
    };

    // Gradients of the returned loss (contract §5): d returned / d loss_i times upstream.
    let upstream = |e: usize| match &problem.upstream {
        None => 1.0,
        Some(g) if denominator.is_none() => g[e],
        Some(g) => g[0],
    };
    let grad_factor: Vec<f64> = (0..examples)
        .map(|e| {
            if ignored[e] {
                return 0.0;
            }
            match denominator {
                None => upstream(e) * sample[e],
                Some(d) => safe_divide(upstream(e) * sample[e], d),
            }
        })
        .collect();

    let dense = matches!(problem.labels, RefLabels::Dense(_));
    let mut grad_logits = vec![0.0; problem.logits.len()];
    let mut grad_labels = dense.then(|| vec![0.0; problem.logits.len()]);
    for (e, row) in row_grads.iter().enumerate() {
        let scaled: Vec<f64> = row.d_logits.iter().map(|&d| grad_factor[e] * d).collect();
        geometry.scatter(&mut grad_logits, e, &scaled);
        if let Some(out) = grad_labels.as_mut() {
            let scaled: Vec<f64> = row.d_labels.iter().map(|&d| grad_factor[e] * d).collect();
            geometry.scatter(out, e, &scaled);
        }
    }

    Ok(RefOutput {
        loss,
        grad_logits,
        grad_labels,
        example_losses,
        omega,
        denominator,
        grad_factor,
    })
}

/// Where the elements of every example live in a row-major tensor.
struct Geometry {
    /// The logits' shape.
    shape: Vec<usize>,
    /// The class axis, in `0..rank`.
    axis: usize,
    /// `C`.
    classes: usize,
}

impl Geometry {
    fn new(shape: &[usize], axis: i64) -> Result<Geometry, String> {
        let rank = shape.len() as i64;
        if rank == 0 {
            return Err("logits: rank 0; the rank must be at least 1".into());
        }
        let normalised = if axis < 0 { axis + rank } else { axis };
        if !(0..rank).contains(&normalised) {
            return Err(format!("axis: {axis} is out of range for rank {rank}"));
        }
        let axis = normalised as usize;
        let classes = shape[axis];
        if classes == 0 {
            return Err("logits: the class axis has length 0".into());
        }
        Ok(Geometry {
            shape: shape.to_vec(),
            axis,
            classes,
        })
    }

    /// Number of elements of the logits.
    fn elements(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of examples: elements of the loss shape.
    fn examples(&self) -> usize {
        self.elements() / self.classes
    }

    /// Row-major flat offset of every class of example `e`, where `e` is the row-major index
    /// of the example in the loss shape (the logits' shape without the class axis).
    fn offsets(&self, e: usize) -> Vec<usize> {
        // Multi-index of `e` in the loss shape, last dimension fastest.
        let loss_dims: Vec<usize> = self
            .shape
            .iter()
            .enumerate()
            .filter(|&(d, _)| d != self.axis)
            .map(|(_, &n)| n)
            .collect();
        let mut index = vec![0; loss_dims.len()];
        let mut rest = e;
        for d in (0..loss_dims.len()).rev() {
            index[d] = rest % loss_dims[d];
            rest /= loss_dims[d];
        }
        // Insert the class index and flatten with row-major strides.
        (0..self.classes)
            .map(|j| {
                let mut full = index.clone();
                full.insert(self.axis, j);
                let mut offset = 0;
                for (d, &i) in full.iter().enumerate() {
                    offset = offset * self.shape[d] + i;
                }
                offset
            })
            .collect()
    }

    /// The `C` values of example `e`.
    fn gather(&self, data: &[f64], e: usize) -> Vec<f64> {
        self.offsets(e).into_iter().map(|o| data[o]).collect()
    }

    /// Writes the `C` values of example `e`.
    fn scatter(&self, data: &mut [f64], e: usize, row: &[f64]) {
        for (o, &v) in self.offsets(e).into_iter().zip(row) {
            data[o] = v;
        }
    }
}

fn check(p: &RefProblem, g: &Geometry) -> Result<(), String> {
    let o = &p.options;
    let (elements, examples, classes) = (g.elements(), g.examples(), g.classes);
    if p.logits.len() != elements {
        return Err(format!(
            "logits: {} values for shape {:?}",
            p.logits.len(),
            p.shape
        ));
    }
    match &p.labels {
        RefLabels::Dense(y) if y.len() != elements => {
            return Err(format!(
                "labels: {} values; the logits have {elements}",
                y.len()
            ));
        }
        RefLabels::Dense(_) if o.ignore_index.is_some() => {
            return Err("ignore_index: applies to class ids only".into());
        }
        RefLabels::Ids(ids) if ids.len() != examples => {
            return Err(format!(
                "labels: {} class ids for {examples} examples",
                ids.len()
            ));
        }
        RefLabels::Ids(ids) => {
            let bad = ids
                .iter()
                .position(|&t| Some(t) != o.ignore_index && !(0..classes as i64).contains(&t));
            if let Some(position) = bad {
                return Err(format!(
                    "labels: class id {} at {position} is out of range [0, {classes})",
                    ids[position]
                ));
            }
        }
        RefLabels::Dense(_) => {}
    }
    if p.class_weights.as_ref().is_some_and(|w| w.len() != classes) {
        return Err(format!("class_weights: the length must be C = {classes}"));
    }
    if p.sample_weights
        .as_ref()
        .is_some_and(|s| s.len() != examples)
    {
        return Err(format!(
            "sample_weights: one per example ({examples}) expected"
        ));
    }
    let returned = if o.reduction == Reduction::None {
        examples
    } else {
        1
    };
    if p.upstream.as_ref().is_some_and(|u| u.len() != returned) {
        return Err(format!("upstream: {returned} values expected"));
    }
    if !(0.0..=1.0).contains(&o.label_smoothing) {
        return Err("label_smoothing: must be in [0, 1]".into());
    }
    if !(o.z_loss.is_finite() && o.z_loss >= 0.0) {
        return Err("z_loss: must be finite and >= 0".into());
    }
    if o.z_loss > 0.0 && !o.from_logits {
        return Err("z_loss: applies to logits, but from_logits is false".into());
    }
    Ok(())
}

/// The labels of one example.
enum RowLabels {
    /// The `C` dense labels.
    Dense(Vec<f64>),
    /// The target class `t`.
    Id(usize),
}

/// The loss of one example and its derivatives, unweighted and unscaled.
struct RowResult {
    loss: f64,
    /// `d loss / d x_j`.
    d_logits: Vec<f64>,
    /// `d loss / d y_j` (zeros for class ids, whose vector is unused).
    d_labels: Vec<f64>,
}

impl RowResult {
    fn zero(classes: usize) -> RowResult {
        RowResult {
            loss: 0.0,
            d_logits: vec![0.0; classes],
            d_labels: vec![0.0; classes],
        }
    }

    fn nan(classes: usize) -> RowResult {
        RowResult {
            loss: f64::NAN,
            d_logits: vec![f64::NAN; classes],
            d_labels: vec![f64::NAN; classes],
        }
    }
}

/// The loss terms of contract §2–3 in terms of `log_p_j` (a log-softmax or a log-probability):
/// returns the loss, `c_j = -d loss / d log_p_j` (the effective labels), and
/// `d loss / d y_j` for dense labels.
fn cross_entropy(
    log_p: &[f64],
    labels: &RowLabels,
    w: &[f64],
    eps: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let classes = log_p.len();
    let c = classes as f64;
    match labels {
        RowLabels::Dense(y) => {
            // y <- y * (1 - eps) + eps / C; loss = -sum_j w_j y_j log_p_j.
            let smoothed: Vec<f64> = y.iter().map(|&y| y * (1.0 - eps) + eps / c).collect();
            let coefficient: Vec<f64> = (0..classes).map(|j| w[j] * smoothed[j]).collect();
            let loss = -accurate_sum((0..classes).map(|j| times(coefficient[j], log_p[j])));
            // d loss / d y_j = -w_j (1 - eps) log_p_j.
            let d_labels = (0..classes)
                .map(|j| -times(w[j] * (1.0 - eps), log_p[j]))
                .collect();
            (loss, coefficient, d_labels)
        }
        RowLabels::Id(t) => {
            let t = *t;
            // loss = -(1 - eps) w_t log_p_t - (eps / C) sum_j w_j log_p_j.
            let target = times((1.0 - eps) * w[t], log_p[t]);
            let spread = times(
                eps / c,
                accurate_sum((0..classes).map(|j| times(w[j], log_p[j]))),
            );
            let loss = -target - spread;
            // The smoothing share `(eps / C) w_j` is 0 without smoothing, whatever `w_j`.
            let coefficient = (0..classes)
                .map(|j| {
                    if j == t {
                        (1.0 - eps) * w[t] + times(eps / c, w[j])
                    } else {
                        times(eps / c, w[j])
                    }
                })
                .collect();
            (loss, coefficient, vec![0.0; classes])
        }
    }
}

/// One example from logits (contract §1–3, §6).
fn logits_row(x: &[f64], labels: &RowLabels, w: &[f64], eps: f64, z_loss: f64) -> RowResult {
    let classes = x.len();
    if x.iter().any(|v| v.is_nan() || *v == f64::INFINITY)
        || x.iter().all(|&v| v == f64::NEG_INFINITY)
    {
        return RowResult::nan(classes);
    }
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s = accurate_sum(x.iter().map(|&v| (v - m).exp()));
    let log_s = s.ln();
    let lse = m + log_s;
    let log_softmax: Vec<f64> = x.iter().map(|&v| (v - m) - log_s).collect();
    let softmax: Vec<f64> = x.iter().map(|&v| (v - m).exp() / s).collect();

    let (ce, coefficient, d_labels) = cross_entropy(&log_softmax, labels, w, eps);
    let loss = ce + z_loss * lse * lse;
    // d loss / d x_j = softmax_j * sum_k c_k - c_j + 2 z lse softmax_j, since
    // d log_softmax_k / d x_j = [j == k] - softmax_j.
    let total = accurate_sum(coefficient.iter().copied());
    let d_logits = (0..classes)
        .map(|j| softmax[j] * total - coefficient[j] + 2.0 * z_loss * lse * softmax[j])
        .collect();
    RowResult {
        loss,
        d_logits,
        d_labels,
    }
}

/// One example from probabilities (contract §2, `from_logits = false`).
fn probabilities_row(p: &[f64], labels: &RowLabels, w: &[f64], eps: f64) -> RowResult {
    let classes = p.len();
    let total = accurate_sum(p.iter().copied());
    let normalised: Vec<f64> = p.iter().map(|&v| v / total).collect();
    let (low, high) = (PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON);
    let clipped: Vec<bool> = normalised.iter().map(|&r| r < low || r > high).collect();
    let q: Vec<f64> = normalised.iter().map(|&r| r.max(low).min(high)).collect();
    let log_q: Vec<f64> = q.iter().map(|v| v.ln()).collect();

    let (loss, coefficient, d_labels) = cross_entropy(&log_q, labels, w, eps);
    // d loss / d q_j, zero where the clip was active.
    let d: Vec<f64> = (0..classes)
        .map(|j| {
            if clipped[j] || coefficient[j] == 0.0 {
                0.0
            } else {
                -coefficient[j] / q[j]
            }
        })
        .collect();
    // Through the normalisation r_k = p_k / total: d r_k / d p_j = ([j == k] - r_k) / total.
    let dot = accurate_sum((0..classes).map(|k| d[k] * normalised[k]));
    let d_logits = (0..classes).map(|j| (d[j] - dot) / total).collect();
    RowResult {
        loss,
        d_logits,
        d_labels,
    }
}

/// `c * v`, but 0 when `c` is 0 (so `0 * log 0 = 0`).
fn times(c: f64, v: f64) -> f64 {
    if c == 0.0 { 0.0 } else { c * v }
}

/// `a / b`, or 0 when `b` is 0 (the contract's safe division).
fn safe_divide(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// A compensated (Neumaier) sum, so the oracle's own rounding error does not grow with the
/// number of terms; non-finite sums are returned as the plain sum gives them.
fn accurate_sum(values: impl IntoIterator<Item = f64>) -> f64 {
    let (mut sum, mut compensation) = (0.0f64, 0.0f64);
    for v in values {
        let t = sum + v;
        compensation += if sum.abs() >= v.abs() {
            (sum - t) + v
        } else {
            (v - t) + sum
        };
        sum = t;
    }
    if sum.is_finite() {
        sum + compensation
    } else {
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(shape: &[usize], x: &[f64], y: &[f64]) -> RefProblem {
        RefProblem {
            shape: shape.to_vec(),
            logits: x.to_vec(),
            labels: RefLabels::Dense(y.to_vec()),
            options: Options::default(),
            class_weights: None,
            sample_weights: None,
            upstream: None,
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn worked_example_of_the_contract() {
        let mut p = dense(
            &[2, 3],
            &[1.0, 2.0, 0.5, 0.2, 0.8, 1.5],
            &[0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
        );
        let out = evaluate(&p).unwrap();
        assert!((out.loss[0] - 0.46436878).abs() < 1e-8 && (out.loss[1] - 0.57048061).abs() < 1e-8);
        let e = std::f64::consts::E;
        assert!(close(out.loss[0], (e + e * e + e.sqrt()).ln() - 2.0));
        p.options.reduction = Reduction::Mean;
        assert!((evaluate(&p).unwrap().loss[0] - 0.51742470).abs() < 1e-8);
    }

    #[test]
    fn class_axis_anywhere() {
        // Shape (2, 3) with axis 0: examples are the columns.
        let x = [1.0, 0.2, 5.0, 2.0, 0.8, 5.0, 0.5, 1.5, 5.0];
        let mut p = dense(&[3, 3], &x, &[0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        p.options.axis = -2;
        let by_column = evaluate(&p).unwrap();
        let transposed = dense(
            &[3, 3],
            &[1.0, 2.0, 0.5, 0.2, 0.8, 1.5, 5.0, 5.0, 5.0],
            &[0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0],
        );
        let by_row = evaluate(&transposed).unwrap();
        assert_eq!(by_column.loss, by_row.loss);
        assert!(close(by_row.loss[2], 3f64.ln()));
        assert_eq!(by_column.grad_logits[3], by_row.grad_logits[1]);
    }

    #[test]
    fn huge_logits_and_masking() {
        let out = evaluate(&dense(&[2], &[1e30, -1e30], &[0.0, 1.0])).unwrap();
        assert_eq!(out.loss, vec![2e30]);
        assert_eq!(out.grad_logits, vec![1.0, -1.0]);
        let out = evaluate(&dense(&[2], &[f64::NEG_INFINITY, 0.0], &[0.0, 1.0])).unwrap();
        assert_eq!((out.loss, out.grad_logits), (vec![0.0], vec![0.0, 0.0]));
        let out = evaluate(&dense(&[2], &[f64::NEG_INFINITY, 0.0], &[1.0, 0.0])).unwrap();
        assert_eq!(
            (out.loss, out.grad_logits),
            (vec![f64::INFINITY], vec![-1.0, 1.0])
        );
        let out = evaluate(&dense(&[2], &[f64::NEG_INFINITY; 2], &[1.0, 0.0])).unwrap();
        assert!(out.loss[0].is_nan() && out.grad_logits.iter().all(|g| g.is_nan()));
    }

    #[test]
    fn class_ids_with_smoothing_weights_and_ignore_index() {
        let x = [1.0, 2.0, 0.5, f64::NAN, 0.0, 0.0];
        let mut p = dense(&[2, 3], &x, &[]);
        p.labels = RefLabels::Ids(vec![1, -100]);
        p.options.ignore_index = Some(-100);
        p.options.label_smoothing = 0.3;
        p.options.reduction = Reduction::Mean;
        p.class_weights = Some(vec![1.0, 2.0, 3.0]);
        let out = evaluate(&p).unwrap();
        let lse = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
        let ls = [1.0 - lse, 2.0 - lse, 0.5 - lse];
        let want = -(0.7 * 2.0 * ls[1]) - 0.1 * (ls[0] + 2.0 * ls[1] + 3.0 * ls[2]);
        assert_eq!(out.omega, vec![2.0, 0.0]);
        assert!(close(out.loss[0], want / 2.0), "{:?}", out.loss);
        assert_eq!(&out.grad_logits[3..], &[0.0; 3]);
        assert!(close(out.grad_logits.iter().sum::<f64>(), 0.0));
    }

    #[test]
    fn probabilities_are_normalised_and_clipped() {
        let mut p = dense(&[3], &[2.0, 2.0, 0.0], &[0.0, 1.0, 0.0]);
        p.options.from_logits = false;
        let out = evaluate(&p).unwrap();
        assert!(close(out.loss[0], 2f64.ln()));
        // d/dp of -log(p_1 / (p_0 + p_1 + p_2)), nothing through the clipped p_2 = 0.
        assert!(
            close(out.grad_logits[0], 0.25)
                && close(out.grad_logits[1], -0.25)
                && close(out.grad_logits[2], 0.25)
        );
    }

    #[test]
    fn invalid_inputs_are_refused() {
        assert!(evaluate(&dense(&[], &[1.0], &[1.0])).is_err());
        assert!(evaluate(&dense(&[2, 0], &[], &[])).is_err());
        let mut p = dense(&[0, 3], &[], &[]);
        p.options.axis = 2;
        assert!(evaluate(&p).is_err());
        p.options.axis = -1;
        p.options.reduction = Reduction::Mean;
        assert_eq!(evaluate(&p).unwrap().loss, vec![0.0]);
    }
}
