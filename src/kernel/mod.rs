//! The fused softmax cross-entropy kernel: pure functions over ndarray views and little-endian
//! byte slices.
//!
//! This module knows nothing of gRPC, async or metrics (`.ci/run` checks it): it takes
//! checked inputs and caller-owned gradient buffers and returns the loss. The contract it
//! implements is the project's semantics document; the formulas are in the `rows` module's docs.
//!
//! Float inputs ([`Input`]) are ndarray views or little-endian bytes at any alignment (a raw
//! tensor as it arrived over the wire, rarely aligned for its type): the vector fast path
//! reads either in place; the general path copies unaligned bytes into aligned buffers once
//! per call. The `input` module says why.
//!
//! How a call runs:
//! 1. [`reduce`] computes each example's effective weight and the reduction's denominator,
//!    serially, so each row's gradient factor is known before any row is computed;
//! 2. rows are split into blocks of whole outer slabs and computed on the current rayon
//!    pool (serially when the call is small); each row is one fused pass structure;
//! 3. per-example losses are summed in index order for reduced losses.
//!
//! Alongside the loss each call reports its numerical [`Health`]: non-finite logits and
//! labels, dense label rows that do not sum to one, rows whose loss is not finite. The
//! counts come from sums the passes make anyway: a row pays for an exact count only when it
//! holds a non-finite value.
//!
//! A row's result therefore depends only on that row, its weights and the reduction's
//! denominator: never on the thread count or on what else was computed with it.

pub mod dtype;
mod input;
mod layout;
mod options;
pub mod reduce;
pub mod reference;
mod rows;
pub mod simd;

use ndarray::{ArrayView1, ArrayView3, ArrayViewMut1, ArrayViewMut3, ShapeBuilder};
use rayon::prelude::*;

use dtype::Element;
#[cfg(test)]
pub use input::copies;
pub use input::{Elems, Input, LeBytes};
pub use layout::{Layout, normalize_axis};
pub use options::{Options, Reduction};
use rows::{DenseRow, LabelRow, RowGrads, RowOut, SparseRow, logits_row, probabilities_row};

/// Class ids, one per row, in row order.
#[derive(Clone, Copy, Debug)]
pub enum ClassIds<'a> {
    /// int32 ids.
    I32(&'a [i32]),
    /// int64 ids.
    I64(&'a [i64]),
}

impl ClassIds<'_> {
    /// The id of row `r`.
    #[inline]
    pub fn get(&self, r: usize) -> i64 {
        match self {
            ClassIds::I32(v) => i64::from(v[r]),
            ClassIds::I64(v) => v[r],
        }
    }

    /// Number of ids.
    pub fn len(&self) -> usize {
        match self {
            ClassIds::I32(v) => v.len(),
            ClassIds::I64(v) => v.len(),
        }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The labels of a problem.
#[derive(Clone, Copy, Debug)]
pub enum Labels<'a, T> {
    /// Dense label rows laid out like the logits.
    Dense(Input<'a, T>),
    /// One class id per row.
    Sparse(ClassIds<'a>),
}

/// The upstream gradient multiplied into the returned gradients.
#[derive(Clone, Copy, Debug, Default)]
pub enum Upstream<'a> {
    /// All ones.
    #[default]
    Ones,
    /// One value per row (reduction `None`).
    PerExample(&'a [f64]),
    /// One value for a reduced loss.
    Scalar(f64),
}

/// A checked problem: logits seen as `(outer, classes, inner)` and everything else per row.
#[derive(Clone, Copy, Debug)]
pub struct Problem<'a, T> {
    /// Logits (or probabilities) as `(outer, classes, inner)`, in standard layout.
    pub logits: Input<'a, T>,
    /// Labels.
    pub labels: Labels<'a, T>,
    /// Scalar options (the axis is already applied through the layout).
    pub options: Options,
    /// Per-class weights, length `classes`.
    pub class_weights: Option<&'a [f64]>,
    /// Per-row sample weights (already broadcast), length `rows`.
    pub sample_weights: Option<&'a [f64]>,
    /// Upstream gradient.
    pub upstream: Upstream<'a>,
}

/// Gradient buffers, laid out like the logits.
#[derive(Debug, Default)]
pub struct Grads<'a, T> {
    /// Gradient w.r.t. the logits.
    pub logits: Option<ArrayViewMut3<'a, T>>,
    /// Gradient w.r.t. dense labels.
    pub labels: Option<ArrayViewMut3<'a, T>>,
}

/// The loss as returned.
#[derive(Clone, Debug, PartialEq)]
pub enum Loss {
    /// Weighted per-example losses `L_i`, in row order (reduction `None`).
    PerExample(Vec<f64>),
    /// The reduced loss.
    Reduced(f64),
}

/// What a call's inputs and results looked like numerically: counts over the rows computed
/// (rows of an ignored class id are not read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health {
    /// NaN or infinite values among the logits and dense labels (`-inf` logits included:
    /// masking with them is allowed, but they are counted).
    pub nonfinite_inputs: u64,
    /// Dense label rows whose sum is farther than [`label_sum_tolerance`] from 1 (NaN sums
    /// included).
    pub unnormalized_label_rows: u64,
    /// Rows whose returned (weighted) per-example loss is NaN or infinite.
    pub nonfinite_loss_rows: u64,
}

impl std::ops::Add for Health {
    type Output = Health;
    fn add(self, o: Health) -> Health {
        Health {
            nonfinite_inputs: self.nonfinite_inputs + o.nonfinite_inputs,
            unnormalized_label_rows: self.unnormalized_label_rows + o.unnormalized_label_rows,
            nonfinite_loss_rows: self.nonfinite_loss_rows + o.nonfinite_loss_rows,
        }
    }
}

impl Health {
    fn label_row(&mut self, dtype: dtype::DType, sum: f64, nonfinite: u32) {
        self.nonfinite_inputs += u64::from(nonfinite);
        // NaN compares false: a NaN sum counts as unnormalised.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        let off = !((sum - 1.0).abs() <= label_sum_tolerance(dtype));
        self.unnormalized_label_rows += u64::from(off);
    }
}

/// How far from 1 a dense label row's sum may be before it counts as unnormalised: 1e-3,
/// and 1e-2 for float16 and bfloat16, whose rounding of each label alone moves a sum by up to
/// 2^-11 and 2^-8 of it.
pub fn label_sum_tolerance(dtype: dtype::DType) -> f64 {
    use dtype::DType;
    match dtype {
        DType::F16 | DType::BF16 => 1e-2,
        _ => 1e-3,
    }
}

/// Inputs the kernel refuses. Requests are validated before they get here, so outside of
/// tests these mean a bug in validation, except [`KernelError::ClassIdOutOfRange`], which the
/// validator finds by calling [`check_class_ids`].
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum KernelError {
    /// A class id outside `[0, C)` that is not the ignore index.
    #[error("class id {value} at position {position} is out of range [0, {classes})")]
    ClassIdOutOfRange {
        /// Row-major position of the id in the labels.
        position: usize,
        /// The id.
        value: i64,
        /// `C`.
        classes: usize,
    },
    /// Buffers whose sizes or layouts do not agree with the logits.
    #[error("inconsistent problem: {0}")]
    Inconsistent(&'static str),
}

/// Finds the first class id outside `[0, classes)` that is not `ignore_index`.
pub fn check_class_ids(
    ids: ClassIds<'_>,
    classes: usize,
    ignore_index: Option<i64>,
) -> Result<(), KernelError> {
    let bad = (0..ids.len()).find(|&r| {
        let v = ids.get(r);
        Some(v) != ignore_index && !(0..classes as i64).contains(&v)
    });
    match bad {
        Some(position) => Err(KernelError::ClassIdOutOfRange {
            position,
            value: ids.get(position),
            classes,
        }),
        None => Ok(()),
    }
}

/// Elements per parallel task; smaller calls run on the calling thread.
const BLOCK_ELEMENTS: usize = 1 << 15;

/// Evaluates the loss, writing the requested gradients into `grads`.
pub fn evaluate<T: Element>(
    problem: &Problem<'_, T>,
    grads: Grads<'_, T>,
) -> Result<Loss, KernelError> {
    evaluate_with_health(problem, grads).map(|(loss, _)| loss)
}

/// [`evaluate`], also reporting the call's numerical [`Health`].
pub fn evaluate_with_health<T: Element>(
    problem: &Problem<'_, T>,
    grads: Grads<'_, T>,
) -> Result<(Loss, Health), KernelError> {
    let (outer, classes, inner) = problem.logits.dim();
    let layout = Layout {
        outer,
        classes,
        inner,
    };
    let rows = layout.rows();
    check(problem, &grads, layout)?;
    let opts = &problem.options;
    let ignored = |r: usize| match (problem.labels, opts.ignore_index) {
        (Labels::Sparse(ids), Some(k)) => ids.get(r) == k,
        _ => false,
    };
    let sample = |r: usize| problem.sample_weights.map_or(1.0, |s| s[r]);
    let omega = |r: usize| {
        if ignored(r) {
            return 0.0;
        }
        let class_w = match (problem.labels, problem.class_weights) {
            (Labels::Sparse(ids), Some(w)) => w[ids.get(r) as usize],
            _ => 1.0,
        };
        sample(r) * class_w
    };
    let denom = reduce::denominator(opts.reduction, rows, omega, ignored);
    // d returned / d loss_i, times upstream.
    let scale = |r: usize| match (denom, problem.upstream) {
        (None, Upstream::PerExample(g)) => g[r] * sample(r),
        (None, _) => sample(r),
        (Some(d), Upstream::Scalar(g)) => reduce::safe_div(g * sample(r), d),
        (Some(d), _) => reduce::safe_div(sample(r), d),
    };

    let fast = fast_inputs(problem, grads.labels.is_some(), layout);
    // The general path reads ndarray views: inputs given as unaligned bytes are copied into
    // aligned buffers for it here, once per call. The fast path reads them in place.
    let (mut xbuf, mut ybuf) = (Vec::new(), Vec::new());
    let general = fast.is_none().then(|| General {
        x: problem.logits.aligned_view(&mut xbuf),
        y: match &problem.labels {
            Labels::Dense(y) => Some(y.aligned_view(&mut ybuf)),
            Labels::Sparse(_) => None,
        },
    });
    let mut losses = vec![0.0f64; rows];
    let block_outer = BLOCK_ELEMENTS.div_ceil((classes * inner).max(1)).max(1);
    let blocks = split_blocks(outer, block_outer, inner, &mut losses, grads);
    let run = |b: Block<'_, '_, T>| {
        let Block {
            first_outer,
            losses,
            mut grad_logits,
            mut grad_labels,
        } = b;
        let mut health = Health::default();
        if let Some(f) = &fast {
            let c = classes;
            let mut g = grad_logits.as_mut().and_then(|g| g.as_slice_mut());
            let mut scratch = simd::row::Scratch::new();
            for (k, loss) in losses.iter_mut().enumerate() {
                let r = first_outer + k;
                let grow = g.as_deref_mut().map(|g| &mut g[k * c..(k + 1) * c]);
                *loss = if ignored(r) {
                    if let Some(g) = grow {
                        g.fill(T::from_f64(0.0));
                    }
                    0.0
                } else {
                    sample(r) * f.row(&mut scratch, problem, r, grow, scale(r), &mut health)
                };
                health.nonfinite_loss_rows += u64::from(!loss.is_finite());
            }
            return health;
        }
        let Some(v) = &general else {
            unreachable!("the general path has its views when the fast path is off")
        };
        for (k, loss) in losses.iter_mut().enumerate() {
            let (o, i) = (first_outer + k / inner, k % inner);
            let r = o * inner + i;
            let row_grads = RowGrads {
                logits: grad_logits.as_mut().map(|g| row_mut(g, k / inner, i)),
                labels: grad_labels.as_mut().map(|g| row_mut(g, k / inner, i)),
                scale: scale(r),
            };
            *loss = if ignored(r) {
                let mut g = row_grads;
                g.fill(0.0);
                0.0
            } else {
                sample(r) * row_loss(problem, v, layout, (o, i, r), row_grads, &mut health)
            };
            health.nonfinite_loss_rows += u64::from(!loss.is_finite());
        }
        health
    };
    // Counts add in any order: the report is as deterministic as the loss.
    let health = if blocks.len() == 1 {
        blocks
            .into_iter()
            .map(run)
            .fold(Health::default(), |a, b| a + b)
    } else {
        blocks
            .into_par_iter()
            .map(run)
            .reduce(Health::default, |a, b| a + b)
    };
    let loss = match denom {
        None => Loss::PerExample(losses),
        Some(d) => Loss::Reduced(reduce::safe_div(reduce::ordered_sum(&losses), d)),
    };
    Ok((loss, health))
}

/// The float inputs as the general path reads them: ndarray views of aligned elements.
struct General<'a, T> {
    x: ArrayView3<'a, T>,
    y: Option<ArrayView3<'a, T>>,
}

/// What the vector fast path ([`simd`]) needs: contiguous rows (class axis last), logits,
/// no class weights, no labels gradient, a type computed in `f32`. Its inputs are read in
/// place, aligned or not.
struct FastInputs<'a, T> {
    level: simd::Level,
    x: Elems<'a, T>,
    y: Option<Elems<'a, T>>,
    classes: usize,
    keep: f64,
    add: f64,
}

fn fast_inputs<'a, T: Element>(
    p: &Problem<'a, T>,
    labels_grad: bool,
    layout: Layout,
) -> Option<FastInputs<'a, T>> {
    let level = simd::Level::current();
    let opts = &p.options;
    if level == simd::Level::General
        || layout.inner != 1
        || !opts.from_logits
        || p.class_weights.is_some()
        || labels_grad
        || T::DTYPE == dtype::DType::F64
    {
        return None;
    }
    let x = p.logits.contiguous()?;
    let y = match p.labels {
        Labels::Dense(y) => Some(y.contiguous()?),
        Labels::Sparse(_) => None,
    };
    let c = layout.classes as f64;
    Some(FastInputs {
        level,
        x,
        y,
        classes: layout.classes,
        keep: 1.0 - opts.label_smoothing,
        add: opts.label_smoothing / c,
    })
}

impl<T: Element> FastInputs<'_, T> {
    /// The unweighted loss of row `r`, writing `scale * d loss / d x` into `grad` and adding
    /// the row's inputs to `health`.
    fn row(
        &self,
        scratch: &mut simd::row::Scratch,
        p: &Problem<'_, T>,
        r: usize,
        grad: Option<&mut [T]>,
        scale: f64,
        health: &mut Health,
    ) -> f64 {
        use dtype::DType;
        let c = self.classes;
        let (keep, add) = (self.keep, self.add);
        let y = self.y.map(|y| y.range(r * c..(r + 1) * c));
        let labels = match (y, p.labels) {
            (Some(y), _) => simd::FastLabels::Dense { y, keep, add },
            (None, Labels::Sparse(ids)) => simd::FastLabels::Sparse {
                target: ids.get(r) as usize,
                keep,
                add,
            },
            (None, Labels::Dense(_)) => unreachable!("dense labels have their elements"),
        };
        let row = simd::RowCall {
            scratch,
            x: self.x.range(r * c..(r + 1) * c),
            labels,
            z_loss: p.options.z_loss,
            grad,
            scale,
        };
        let out = match T::DTYPE {
            DType::F32 => simd::fast_row(self.level, row.cast::<f32>()),
            DType::BF16 => simd::fast_row(self.level, row.cast::<half::bf16>()),
            DType::F16 => simd::fast_row(self.level, row.cast::<half::f16>()),
            _ => unreachable!("fast_inputs admits only types computed in f32"),
        };
        health.nonfinite_inputs += u64::from(out.nonfinite);
        if let Some(y) = y {
            // Only a row whose sum is not finite holds a non-finite label.
            let nonfinite = if out.label_sum.is_finite() {
                0
            } else {
                (0..y.len())
                    .map(|j| u32::from(!y.get(j).to_f64().is_finite()))
                    .sum()
            };
            health.label_row(T::DTYPE, out.label_sum, nonfinite);
        }
        out.loss
    }
}

/// The unweighted loss of row `(o, i)` (row-major index `r`), writing its gradients and adding
/// its inputs to `health`.
fn row_loss<T: Element>(
    p: &Problem<'_, T>,
    v: &General<'_, T>,
    layout: Layout,
    (o, i, r): (usize, usize, usize),
    grads: RowGrads<'_, T>,
    health: &mut Health,
) -> f64 {
    let x = v.x.slice(ndarray::s![o, .., i]);
    let opts = &p.options;
    let c = layout.classes as f64;
    let (keep, add) = (1.0 - opts.label_smoothing, opts.label_smoothing / c);
    match (p.labels, &v.y) {
        (Labels::Dense(_), Some(y)) => {
            let lab = DenseRow {
                y: y.slice(ndarray::s![o, .., i]),
                keep,
                add,
                class_weights: p.class_weights,
            };
            let given = lab.given_stats();
            health.label_row(T::DTYPE, given.sum, given.nonfinite);
            dispatch(x, &lab, opts, grads, health)
        }
        (Labels::Dense(_), None) => unreachable!("dense labels have their view"),
        (Labels::Sparse(ids), _) => {
            let target = ids.get(r) as usize;
            let wt = p.class_weights.map_or(1.0, |w| w[target]);
            let lab = SparseRow {
                target,
                keep_wt: keep * wt,
                add,
                class_weights: p.class_weights,
            };
            dispatch(x, &lab, opts, grads, health)
        }
    }
}

fn dispatch<T: Element, L: LabelRow>(
    x: ArrayView1<'_, T>,
    lab: &L,
    opts: &Options,
    grads: RowGrads<'_, T>,
    health: &mut Health,
) -> f64 {
    let RowOut { loss, nonfinite } = if opts.from_logits {
        logits_row(x, lab, opts.z_loss, grads)
    } else {
        probabilities_row(x, lab, grads)
    };
    health.nonfinite_inputs += u64::from(nonfinite);
    loss
}

/// Rows `(outer range) x inner` with their slice of every output.
struct Block<'l, 'g, T> {
    first_outer: usize,
    losses: &'l mut [f64],
    grad_logits: Option<ArrayViewMut3<'g, T>>,
    grad_labels: Option<ArrayViewMut3<'g, T>>,
}

/// Splits the outputs into blocks of `block_outer` outer slabs (one allocation per call).
fn split_blocks<'l, 'g, T>(
    outer: usize,
    block_outer: usize,
    inner: usize,
    losses: &'l mut [f64],
    grads: Grads<'g, T>,
) -> Vec<Block<'l, 'g, T>> {
    let n = outer.div_ceil(block_outer).max(1);
    let mut logits = grads.logits.map(|g| g.into_outer_chunks(block_outer));
    let mut labels = grads.labels.map(|g| g.into_outer_chunks(block_outer));
    let mut blocks = Vec::with_capacity(n);
    let mut rest = losses;
    for b in 0..n {
        let first = b * block_outer;
        let take = (outer.min(first + block_outer) - first.min(outer)) * inner;
        let (head, tail) = rest.split_at_mut(take);
        rest = tail;
        blocks.push(Block {
            first_outer: first,
            losses: head,
            grad_logits: logits.as_mut().and_then(Iterator::next),
            grad_labels: labels.as_mut().and_then(Iterator::next),
        });
    }
    blocks
}

trait OuterChunks<'a, T> {
    fn into_outer_chunks(self, size: usize) -> std::vec::IntoIter<ArrayViewMut3<'a, T>>;
}

impl<'a, T> OuterChunks<'a, T> for ArrayViewMut3<'a, T> {
    fn into_outer_chunks(self, size: usize) -> std::vec::IntoIter<ArrayViewMut3<'a, T>> {
        let mut out = Vec::new();
        let mut rest = self;
        while rest.len_of(ndarray::Axis(0)) > size {
            let (head, tail) = rest.split_at(ndarray::Axis(0), size);
            out.push(head);
            rest = tail;
        }
        out.push(rest);
        out.into_iter()
    }
}

/// The mutable row `(o, :, i)` of a block.
fn row_mut<'b, T>(g: &'b mut ArrayViewMut3<'_, T>, o: usize, i: usize) -> ArrayViewMut1<'b, T> {
    g.slice_mut(ndarray::s![o, .., i])
}

/// Checks that buffers agree with the logits, so no index below can go out of bounds.
fn check<T: bytemuck::Pod>(
    p: &Problem<'_, T>,
    grads: &Grads<'_, T>,
    layout: Layout,
) -> Result<(), KernelError> {
    let rows = layout.rows();
    let dims = layout.dims();
    if layout.classes == 0 {
        return Err(KernelError::Inconsistent("no classes"));
    }
    if !p.logits.consistent() {
        return Err(KernelError::Inconsistent("buffer length"));
    }
    match p.labels {
        Labels::Dense(y) if y.dim() != dims || !y.consistent() => {
            return Err(KernelError::Inconsistent("labels shape"));
        }
        Labels::Sparse(ids) if ids.len() != rows => {
            return Err(KernelError::Inconsistent("class ids length"));
        }
        Labels::Sparse(ids) => check_class_ids(ids, layout.classes, p.options.ignore_index)?,
        Labels::Dense(_) => {}
    }
    if p.class_weights.is_some_and(|w| w.len() != layout.classes) {
        return Err(KernelError::Inconsistent("class weights length"));
    }
    if p.sample_weights.is_some_and(|w| w.len() != rows) {
        return Err(KernelError::Inconsistent("sample weights length"));
    }
    if let Upstream::PerExample(g) = p.upstream
        && (g.len() != rows || p.options.reduction != Reduction::None)
    {
        return Err(KernelError::Inconsistent("upstream shape"));
    }
    if grads.logits.as_ref().is_some_and(|g| g.dim() != dims)
        || grads.labels.as_ref().is_some_and(|g| g.dim() != dims)
    {
        return Err(KernelError::Inconsistent("gradient buffer shape"));
    }
    if grads.labels.is_some() && matches!(p.labels, Labels::Sparse(_)) {
        return Err(KernelError::Inconsistent(
            "no labels gradient for class ids",
        ));
    }
    Ok(())
}

/// Views a flat row-major buffer as `(outer, classes, inner)`.
pub fn view3<T>(data: &[T], layout: Layout) -> Result<ArrayView3<'_, T>, KernelError> {
    ArrayView3::from_shape(layout.dims().into_shape_with_order(), data)
        .map_err(|_| KernelError::Inconsistent("buffer length"))
}

/// Views a flat mutable row-major buffer as `(outer, classes, inner)`.
pub fn view3_mut<T>(data: &mut [T], layout: Layout) -> Result<ArrayViewMut3<'_, T>, KernelError> {
    ArrayViewMut3::from_shape(layout.dims().into_shape_with_order(), data)
        .map_err(|_| KernelError::Inconsistent("buffer length"))
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
