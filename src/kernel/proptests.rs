//! Property tests: the kernel against the float64 oracle in [`super::reference`], on random
//! shapes, axes, labels, options, reductions, upstream gradients, magnitudes and dtypes; the
//! oracle's gradients against finite differences of its own loss; and bit-identical results
//! whatever the thread count and whatever batch a row was computed in.
//!
//! Inputs are generated in `f64`, rounded once into the dtype under test, and the oracle is fed
//! the exactly widened values, so the only differences measured are the kernel's own.

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;

use super::dtype::{DType, Element};
use super::reference::{self, RefLabels, RefOutput, RefProblem};
use super::*;

/// `cases` per property (enough to cover the option space over a few runs, few enough that
/// `cargo test` stays quick in debug builds), unless `PROPTEST_CASES` asks for a longer run.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Generated cases

/// How logits are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Magnitude {
    /// In `[-10, 10]`.
    Moderate,
    /// Near the dtype's extreme (`±1e30`, `±2e3` for float16), with moderate values mixed in.
    Huge,
    /// Near zero (`±1e-30`, `±1e-5` for float16).
    Tiny,
    /// A mixture of all scales, including gaps of 60 to 90 where `exp` underflows in `f32`.
    Spread,
    /// Moderate, with `-inf`, `+inf` and NaN mixed in (contract §6).
    NonFinite,
}

/// Labels as generated.
#[derive(Clone, Debug)]
enum GenLabels {
    Dense(Vec<f64>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// One generated problem, before rounding into a dtype.
#[derive(Clone, Debug)]
struct Case {
    shape: Vec<usize>,
    /// The class axis as the caller gives it: in `0..rank` or in `-rank..0`.
    axis: i64,
    logits: Vec<f64>,
    labels: GenLabels,
    options: Options,
    class_weights: Option<Vec<f64>>,
    sample_weights: Option<Vec<f64>>,
    /// The upstream gradient with the returned loss's shape.
    upstream: Option<Vec<f64>>,
}

impl Case {
    fn layout(&self) -> Layout {
        Layout::new(
            &self.shape,
            normalize_axis(self.axis, self.shape.len()).unwrap(),
        )
    }
}

/// Rank 1..=4, batch dimensions 0..=4 (0 now and then), `C` in 1..=6; the class axis position.
fn shape() -> impl Strategy<Value = (Vec<usize>, usize)> {
    let dim = prop_oneof![1 => Just(0usize), 8 => 1..=4usize];
    (
        prop::collection::vec(dim, 1..=4),
        1..=6usize,
        any::<prop::sample::Index>(),
    )
        .prop_map(|(mut dims, c, axis)| {
            let axis = axis.index(dims.len());
            dims[axis] = c;
            (dims, axis)
        })
}

fn logit(dtype: DType, magnitude: Magnitude) -> BoxedStrategy<f64> {
    let (huge, tiny) = if dtype == DType::F16 {
        (2e3, 1e-5)
    } else {
        (1e30, 1e-30)
    };
    match magnitude {
        Magnitude::Moderate => (-10.0..10.0).boxed(),
        // Exact ties at the top are where `x - lse` (instead of `(x - m) - log S`) cancels.
        Magnitude::Huge => prop_oneof![
            2 => Just(huge),
            1 => Just(-huge),
            1 => Just(huge / 2.0),
            2 => (0.5..1.0).prop_map(move |v: f64| v * huge),
            1 => (0.5..1.0).prop_map(move |v: f64| -v * huge),
            1 => -huge..huge,
            1 => -10.0..10.0,
        ]
        .boxed(),
        Magnitude::Tiny => (-tiny..tiny).boxed(),
        Magnitude::Spread => prop_oneof![
            -10.0..10.0,
            -1e3..1e3,
            60.0..90.0,
            -90.0..-60.0,
            -huge..huge
        ]
        .boxed(),
        Magnitude::NonFinite => prop_oneof![
            20 => -10.0..10.0,
            4 => Just(f64::NEG_INFINITY),
            1 => Just(f64::INFINITY),
            1 => Just(f64::NAN),
        ]
        .boxed(),
    }
}

/// Probabilities (`from_logits = false`): positive, some tiny enough to be clipped. float16
/// stays in `[0.1, 1]` so that gradients (which scale like `1 / p`) stay in its range.
fn probability(dtype: DType, clipping: bool) -> BoxedStrategy<f64> {
    if dtype == DType::F16 || !clipping {
        (0.1..1.0).boxed()
    } else {
        prop_oneof![6 => 0.01..1.0, 2 => 1e-9..1e-6, 1 => Just(1.0)].boxed()
    }
}

/// Weights: zero now and then, else in `[0.5, 2]` (so reduction denominators stay away from
/// zero unless they are zero, and half-precision gradients stay in range).
fn weight() -> impl Strategy<Value = f64> {
    prop_oneof![1 => Just(0.0), 4 => 0.5..2.0]
}

/// A random problem in `dtype`. `smooth` leaves out non-finite and huge logits and clipped
/// probabilities, for finite differences.
fn case(dtype: DType, smooth: bool) -> impl Strategy<Value = Case> {
    let magnitudes = if smooth {
        vec![Magnitude::Moderate]
    } else {
        vec![
            Magnitude::Moderate,
            Magnitude::Moderate,
            Magnitude::Huge,
            Magnitude::Tiny,
            Magnitude::Spread,
            Magnitude::NonFinite,
        ]
    };
    (
        shape(),
        prop::bool::weighted(0.75),
        0..3u8,
        select(magnitudes),
    )
        .prop_flat_map(move |((shape, axis), from_logits, kind, magnitude)| {
            let elements: usize = shape.iter().product();
            let classes = shape[axis];
            let examples = elements / classes;
            let rank = shape.len() as i64;
            let value = if from_logits {
                logit(dtype, magnitude)
            } else {
                probability(dtype, !smooth)
            };
            let label = prop_oneof![3 => Just(0.0), 1 => Just(1.0), 3 => 0.0..1.0];
            let ignore = prop_oneof![
                Just(None),
                Just(Some(-100i64)),
                (0..classes as i64).prop_map(Some)
            ];
            let ids =
                prop::collection::vec((0..classes as i64, prop::bool::weighted(0.25)), examples);
            let options = (
                prop_oneof![2 => Just(0.0), 1 => Just(1.0), 3 => 0.0..=1.0],
                prop_oneof![2 => Just(0.0), 1 => 0.0..0.1],
                select(Reduction::ALL.to_vec()),
                any::<bool>(),
            );
            let weights = (
                prop::option::of(prop::collection::vec(weight(), classes)),
                prop::option::of(prop::collection::vec(weight(), examples)),
                prop::option::of((prop::collection::vec(-2.0..2.0, examples), -2.0..2.0)),
            );
            (
                Just((shape, axis, from_logits, kind)),
                prop::collection::vec(value, elements),
                prop::collection::vec(label, elements),
                ids,
                ignore,
                options,
                weights,
            )
                .prop_map(
                    move |(fixed, logits, dense, ids, ignore, options, weights)| {
                        let (shape, axis, from_logits, kind) = fixed;
                        let (label_smoothing, z_loss, reduction, negative_axis) = options;
                        let (class_weights, sample_weights, upstream) = weights;
                        let ignore_index = if kind == 0 { None } else { ignore };
                        let ids: Vec<i64> = ids
                            .into_iter()
                            .map(|(id, ignored)| match ignore_index {
                                Some(k) if ignored => k,
                                _ => id,
                            })
                            .collect();
                        let labels = match kind {
                            0 => GenLabels::Dense(dense),
                            1 => GenLabels::I32(ids.iter().map(|&t| t as i32).collect()),
                            _ => GenLabels::I64(ids),
                        };
                        let upstream = upstream.map(|(per_example, scalar)| match reduction {
                            Reduction::None => per_example,
                            _ => vec![scalar],
                        });
                        Case {
                            axis: if negative_axis {
                                axis as i64 - rank
                            } else {
                                axis as i64
                            },
                            shape,
                            logits,
                            labels,
                            options: Options {
                                axis: 0,
                                label_smoothing,
                                ignore_index,
                                from_logits,
                                z_loss: if from_logits { z_loss } else { 0.0 },
                                reduction,
                            },
                            class_weights,
                            sample_weights,
                            upstream,
                        }
                    },
                )
                .prop_map(|mut case| {
                    case.options.axis = case.axis;
                    case
                })
        })
}

// ---------------------------------------------------------------------------------------------
// Running the kernel and the oracle

/// Labels rounded into the dtype.
enum TypedLabels<T> {
    Dense(Vec<T>),
    I32(Vec<i32>),
    I64(Vec<i64>),
}

/// A case rounded into `T`.
struct Typed<'c, T> {
    case: &'c Case,
    logits: Vec<T>,
    labels: TypedLabels<T>,
}

/// How a call reads its float inputs and which gradients it asks for.
#[derive(Clone, Copy, Debug)]
struct How {
    /// Logits and dense labels as little-endian bytes at these byte offsets past an aligned
    /// address, instead of aligned views.
    misaligned: Option<(usize, usize)>,
    grad_logits: bool,
    /// Asked for only with dense labels.
    grad_labels: bool,
}

impl Default for How {
    fn default() -> Self {
        How {
            misaligned: None,
            grad_logits: true,
            grad_labels: true,
        }
    }
}

/// What the kernel returned.
struct KernelOut<T> {
    loss: Loss,
    health: Health,
    grad_logits: Vec<T>,
    grad_labels: Option<Vec<T>>,
}

impl<'c, T: Element> Typed<'c, T> {
    fn new(case: &'c Case) -> Self {
        let round = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        let labels = match &case.labels {
            GenLabels::Dense(y) => TypedLabels::Dense(round(y)),
            GenLabels::I32(ids) => TypedLabels::I32(ids.clone()),
            GenLabels::I64(ids) => TypedLabels::I64(ids.clone()),
        };
        Typed {
            case,
            logits: round(&case.logits),
            labels,
        }
    }

    /// The same problem for the oracle, with exactly widened values.
    fn reference(&self) -> RefProblem {
        let widen = |v: &[T]| v.iter().map(|x| x.to_f64()).collect::<Vec<f64>>();
        RefProblem {
            shape: self.case.shape.clone(),
            logits: widen(&self.logits),
            labels: match &self.labels {
                TypedLabels::Dense(y) => RefLabels::Dense(widen(y)),
                TypedLabels::I32(ids) => {
                    RefLabels::Ids(ids.iter().map(|&t| i64::from(t)).collect())
                }
                TypedLabels::I64(ids) => RefLabels::Ids(ids.clone()),
            },
            options: self.case.options,
            class_weights: self.case.class_weights.clone(),
            sample_weights: self.case.sample_weights.clone(),
            upstream: self.case.upstream.clone(),
        }
    }

    /// Runs the kernel on the outer slabs `outer` of the problem (all of it for `None`).
    fn run(&self, outer: Option<usize>) -> KernelOut<T> {
        self.run_with(outer, How::default())
    }

    /// [`Typed::run`], reading the inputs and asking for gradients as `how` says.
    fn run_with(&self, outer: Option<usize>, how: How) -> KernelOut<T> {
        use super::input::testing::Misaligned;
        let full = self.case.layout();
        let layout = Layout {
            outer: outer.unwrap_or(full.outer),
            ..full
        };
        let (elements, rows) = (layout.elements(), layout.rows());
        let misaligned = how.misaligned.map(|(ox, oy)| {
            let y = match &self.labels {
                TypedLabels::Dense(y) => Misaligned::new(&y[..elements], oy),
                _ => Misaligned::new::<T>(&[], oy),
            };
            (Misaligned::new(&self.logits[..elements], ox), y)
        });
        fn input<'a, T: Element>(v: &'a [T], m: Option<&'a Misaligned>, l: Layout) -> Input<'a, T> {
            match m {
                Some(m) => Input::new(m.elems(), l).unwrap(),
                None => view3(v, l).unwrap().into(),
            }
        }
        let logits = input(
            &self.logits[..elements],
            misaligned.as_ref().map(|m| &m.0),
            layout,
        );
        let labels = match &self.labels {
            TypedLabels::Dense(y) => Labels::Dense(input(
                &y[..elements],
                misaligned.as_ref().map(|m| &m.1),
                layout,
            )),
            TypedLabels::I32(ids) => Labels::Sparse(ClassIds::I32(&ids[..rows])),
            TypedLabels::I64(ids) => Labels::Sparse(ClassIds::I64(&ids[..rows])),
        };
        let upstream = match (&self.case.upstream, self.case.options.reduction) {
            (None, _) => Upstream::Ones,
            (Some(g), Reduction::None) => Upstream::PerExample(&g[..rows]),
            (Some(g), _) => Upstream::Scalar(g[0]),
        };
        let problem = Problem {
            logits,
            labels,
            options: self.case.options,
            class_weights: self.case.class_weights.as_deref(),
            sample_weights: self.case.sample_weights.as_ref().map(|s| &s[..rows]),
            upstream,
        };
        // Fill with a value the kernel must overwrite everywhere.
        let mut grad_logits = vec![T::from_f64(12345.0); elements];
        let mut grad_labels = (how.grad_labels && matches!(self.labels, TypedLabels::Dense(_)))
            .then(|| grad_logits.clone());
        if !how.grad_logits {
            grad_logits.clear();
        }
        let grads = Grads {
            logits: how
                .grad_logits
                .then(|| view3_mut(&mut grad_logits, layout).unwrap()),
            labels: grad_labels.as_mut().map(|g| view3_mut(g, layout).unwrap()),
        };
        let (loss, health) =
            evaluate_with_health(&problem, grads).expect("the kernel refused a valid problem");
        KernelOut {
            loss,
            health,
            grad_logits,
            grad_labels,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Comparing

/// Tolerances of one dtype (contract §8): `|got - want| <= rel * |want| + abs * scale + floor`,
/// where `scale` is the magnitude of the terms the value was computed from (so cancellation
/// near zero is judged against the size of what cancelled). Half types are computed in `f32`,
/// so their `abs` is float32's; their `rel` covers the final rounding.
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    rel: f64,
    abs: f64,
    /// An unscaled floor for gradients stored in the dtype (float16 subnormal spacing).
    floor: f64,
}

fn tolerance(dtype: DType) -> Tolerance {
    match dtype {
        DType::F64 => Tolerance {
            rel: 1e-9,
            abs: 1e-12,
            floor: 0.0,
        },
        DType::F32 => Tolerance {
            rel: 3e-5,
            abs: 2e-6,
            floor: 0.0,
        },
        DType::F16 => Tolerance {
            rel: 4e-3,
            abs: 2e-6,
            floor: 6e-8,
        },
        DType::BF16 => Tolerance {
            rel: 2e-2,
            abs: 2e-6,
            floor: 0.0,
        },
        DType::I32 | DType::I64 => unreachable!("not a float dtype"),
    }
}

/// Whether `got` matches `want` within `tol`; NaN matches NaN and infinities match only
/// themselves. A NaN `tol` (sized from infinite labels or weights, `inf / inf`) bounds nothing.
fn matches(got: f64, want: f64, tol: f64) -> bool {
    if got.is_nan() || want.is_nan() {
        return got.is_nan() && want.is_nan();
    }
    let tol = if tol.is_nan() { f64::INFINITY } else { tol };
    got == want || (got.is_finite() && want.is_finite() && (got - want).abs() <= tol)
}

/// Per example, a bound on `sum_j |y'_j|`, the size of the terms its loss and gradients are
/// made of (effective labels after smoothing and class weights).
fn label_mass(case: &Case, reference: &RefProblem) -> Vec<f64> {
    let layout = case.layout();
    let w = case
        .class_weights
        .as_ref()
        .map_or(1.0, |w| w.iter().fold(1.0f64, |a, &b| a.max(b.abs())));
    (0..layout.rows())
        .map(|r| match &reference.labels {
            RefLabels::Dense(y) => {
                let (o, i) = (r / layout.inner, r % layout.inner);
                let row: f64 = (0..layout.classes)
                    .map(|j| y[(o * layout.classes + j) * layout.inner + i].abs())
                    .sum();
                w * (row + 1.0)
            }
            RefLabels::Ids(_) => 2.0 * w,
        })
        .collect()
}

/// Compares one gradient tensor, row by row.
fn compare_grads<T: Element>(
    what: &str,
    case: &Case,
    got: &[T],
    want: &[f64],
    reference: &RefOutput,
    mass: &[f64],
    tol: Tolerance,
) -> Result<(), TestCaseError> {
    let layout = case.layout();
    prop_assert_eq!(got.len(), want.len());
    for (r, (&factor, &mass)) in reference.grad_factor.iter().zip(mass).enumerate() {
        let (o, i) = (r / layout.inner, r % layout.inner);
        let index = |j: usize| (o * layout.classes + j) * layout.inner + i;
        let row_max = (0..layout.classes)
            .map(|j| want[index(j)])
            .filter(|v| v.is_finite())
            .fold(0.0f64, |a, v| a.max(v.abs()));
        let scale = factor.abs() * 2.0 * mass + row_max;
        for j in 0..layout.classes {
            let (g, w) = (got[index(j)].to_f64(), want[index(j)]);
            let allowed = tol.rel * w.abs() + tol.abs * scale + tol.floor;
            prop_assert!(
                matches(g, w, allowed),
                "{} at element {} (example {}, class {}): kernel {:e}, oracle {:e}, allowed {:e}",
                what,
                index(j),
                r,
                j,
                g,
                w,
                allowed
            );
        }
    }
    Ok(())
}

/// The health report counted the slow way: every row not ignored, element by element, label
/// sums in `f64`; non-finite losses from the oracle's per-example losses.
fn expected_health<T: Element>(typed: &Typed<'_, T>, want: &RefOutput) -> Health {
    let layout = typed.case.layout();
    let (c, inner) = (layout.classes, layout.inner);
    let ignored = |r: usize| {
        let id = match &typed.labels {
            TypedLabels::I32(ids) => i64::from(ids[r]),
            TypedLabels::I64(ids) => ids[r],
            TypedLabels::Dense(_) => return false,
        };
        Some(id) == typed.case.options.ignore_index
    };
    let mut h = Health::default();
    for r in (0..layout.rows()).filter(|&r| !ignored(r)) {
        let (o, i) = (r / inner, r % inner);
        let at = |j: usize| (o * c + j) * inner + i;
        let finite = |v: &T| v.to_f64().is_finite();
        h.nonfinite_inputs += (0..c).filter(|&j| !finite(&typed.logits[at(j)])).count() as u64;
        if let TypedLabels::Dense(y) = &typed.labels {
            h.nonfinite_inputs += (0..c).filter(|&j| !finite(&y[at(j)])).count() as u64;
            let off = (0..c).map(|j| y[at(j)].to_f64()).sum::<f64>() - 1.0;
            let tol = label_sum_tolerance(T::DTYPE);
            h.unnormalized_label_rows += u64::from(off.is_nan() || off.abs() > tol);
        }
        let sample = typed.case.sample_weights.as_ref().map_or(1.0, |s| s[r]);
        h.nonfinite_loss_rows += u64::from(!(sample * want.example_losses[r]).is_finite());
    }
    h
}

/// Checks the kernel against the oracle on `case` rounded into `T`, with and without a labels
/// gradient.
fn check_against_oracle<T: Element>(case: &Case) -> Result<(), TestCaseError> {
    check_against_oracle_with::<T>(case, How::default())?;
    // Without a labels gradient dense rows of float32 and the halves take the fast path.
    let fast = How {
        grad_labels: false,
        ..How::default()
    };
    check_against_oracle_with::<T>(case, fast)
}

/// [`check_against_oracle`] for one way of calling the kernel.
fn check_against_oracle_with<T: Element>(case: &Case, how: How) -> Result<(), TestCaseError> {
    let tol = tolerance(T::DTYPE);
    let typed = Typed::<T>::new(case);
    let problem = typed.reference();
    let want = reference::evaluate(&problem).map_err(TestCaseError::fail)?;
    let got = typed.run_with(None, how);
    prop_assert_eq!(
        got.health,
        expected_health(&typed, &want),
        "numerical health"
    );
    let mass = label_mass(case, &problem);
    // Losses are returned in f64; a per-example loss is a sum of non-negative terms of size
    // about `mass`, so a relative bound plus a floor scaled by the sample weight suffices.
    let sample = |r: usize| case.sample_weights.as_ref().map_or(1.0, |s| s[r].abs());
    match (&got.loss, want.denominator) {
        (Loss::PerExample(l), None) => {
            prop_assert_eq!(l.len(), want.loss.len());
            for (r, (&g, &w)) in l.iter().zip(&want.loss).enumerate() {
                let allowed = tol.rel * w.abs() + tol.abs * sample(r) * mass[r];
                prop_assert!(
                    matches(g, w, allowed),
                    "loss of example {}: kernel {:e}, oracle {:e}, allowed {:e}",
                    r,
                    g,
                    w,
                    allowed
                );
            }
        }
        (Loss::Reduced(g), Some(d)) => {
            let w = want.loss[0];
            let terms: f64 = (0..mass.len()).map(|r| sample(r) * mass[r]).sum();
            let allowed = tol.rel * w.abs()
                + if d == 0.0 {
                    0.0
                } else {
                    tol.abs * terms / d.abs()
                };
            prop_assert!(
                matches(*g, w, allowed),
                "reduced loss: kernel {:e}, oracle {:e}, allowed {:e}",
                g,
                w,
                allowed
            );
        }
        (got, _) => prop_assert!(
            false,
            "kernel returned {:?} for reduction {}",
            got,
            case.options.reduction
        ),
    }
    compare_grads(
        "grad_logits",
        case,
        &got.grad_logits,
        &want.grad_logits,
        &want,
        &mass,
        tol,
    )?;
    match (&got.grad_labels, &want.grad_labels) {
        (Some(g), Some(w)) => compare_grads("grad_labels", case, g, w, &want, &mass, tol)?,
        (None, None) => {}
        (None, Some(_)) if !how.grad_labels => {}
        _ => prop_assert!(
            false,
            "labels gradient present in only one of kernel and oracle"
        ),
    }
    Ok(())
}

fn bits<T: Element>(v: &[T]) -> Vec<u64> {
    v.iter().map(|x| x.to_f64().to_bits()).collect()
}

/// A row's results do not depend on the batch it was computed in: the first outer slabs alone
/// give bit-identical per-example losses and gradients (reduction `None`, whose per-row
/// factors do not depend on other rows).
fn check_batch_independence<T: Element>(case: &Case, outer: usize) -> Result<(), TestCaseError> {
    let typed = Typed::<T>::new(case);
    let (all, part) = (typed.run(None), typed.run(Some(outer)));
    let layout = Layout {
        outer,
        ..case.layout()
    };
    let (Loss::PerExample(a), Loss::PerExample(p)) = (&all.loss, &part.loss) else {
        return Err(TestCaseError::fail(
            "reduction None must give per-example losses",
        ));
    };
    let loss_bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    prop_assert_eq!(loss_bits(&a[..layout.rows()]), loss_bits(p));
    prop_assert_eq!(
        bits(&all.grad_logits[..layout.elements()]),
        bits(&part.grad_logits)
    );
    if let (Some(a), Some(p)) = (&all.grad_labels, &part.grad_labels) {
        prop_assert_eq!(bits(&a[..layout.elements()]), bits(p));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The kernel against the oracle, one property per dtype

macro_rules! against_oracle {
    ($name:ident, $t:ty, $dtype:expr) => {
        proptest! {
            #![proptest_config(config(64))]
            #[test]
            fn $name(case in case($dtype, false), prefix in any::<prop::sample::Index>()) {
                check_against_oracle::<$t>(&case)?;
                let outer = case.layout().outer;
                if case.options.reduction == Reduction::None && outer > 0 {
                    check_batch_independence::<$t>(&case, prefix.index(outer))?;
                }
            }
        }
    };
}

against_oracle!(float64_matches_the_oracle, f64, DType::F64);
against_oracle!(float32_matches_the_oracle, f32, DType::F32);
against_oracle!(float16_matches_the_oracle, f16, DType::F16);
against_oracle!(bfloat16_matches_the_oracle, bf16, DType::BF16);

// ---------------------------------------------------------------------------------------------
// Infinite labels and class weights

/// Puts `+inf` or `-inf` into `case` at each pick `(example, at the maximum, negative)`: into a
/// dense label, at the class holding the example's largest input or at the next class; for
/// class ids, into the class weight of such a class (the target's where it holds the maximum).
/// An infinite effective label makes the loss `-sum_j y'_j log_softmax_j` infinite, NaN where
/// it meets a `log_softmax` of 0 or an infinity of the other sign.
fn put_infinities(case: &mut Case, picks: &[(prop::sample::Index, bool, bool)]) {
    let layout = case.layout();
    let (c, inner, rows) = (layout.classes, layout.inner, layout.rows());
    if rows == 0 {
        return;
    }
    let at = |r: usize, j: usize| ((r / inner) * c + j) * inner + r % inner;
    for (example, at_max, negative) in picks {
        let r = example.index(rows);
        let top = (0..c).fold(0, |b, j| {
            if case.logits[at(r, j)] > case.logits[at(r, b)] {
                j
            } else {
                b
            }
        });
        let class = if *at_max { top } else { (top + 1) % c };
        let v = if *negative {
            f64::NEG_INFINITY
        } else {
            f64::INFINITY
        };
        match &mut case.labels {
            GenLabels::Dense(y) => y[at(r, class)] = v,
            GenLabels::I32(_) | GenLabels::I64(_) => {
                case.class_weights.get_or_insert_with(|| vec![1.0; c])[class] = v;
            }
        }
    }
}

proptest! {
    #![proptest_config(config(64))]
    /// Infinite labels and class weights, at the class holding a row's maximum and elsewhere,
    /// against the oracle in every dtype, on the general path and the fast one. Logits stay
    /// moderate (no softmax underflows in `f32`), so non-finite gradients fall where the
    /// oracle's do.
    #[test]
    fn infinite_labels_and_class_weights_match_the_oracle(
        dtype in select(vec![DType::F16, DType::BF16, DType::F32, DType::F64]),
        case in case(DType::F32, true),
        picks in prop::collection::vec(
            (any::<prop::sample::Index>(), prop::bool::weighted(0.75), prop::bool::weighted(0.25)),
            1..=3,
        ),
    ) {
        let mut case = case;
        put_infinities(&mut case, &picks);
        match dtype {
            DType::F16 => check_against_oracle::<f16>(&case)?,
            DType::BF16 => check_against_oracle::<bf16>(&case)?,
            DType::F32 => check_against_oracle::<f32>(&case)?,
            _ => check_against_oracle::<f64>(&case)?,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The oracle against finite differences of itself

/// `sum_i g_i * returned_i`: the scalar whose gradient the oracle returns.
fn objective(problem: &RefProblem) -> (f64, f64) {
    let out = reference::evaluate(problem).unwrap();
    let g = |i: usize| problem.upstream.as_ref().map_or(1.0, |u| u[i]);
    let terms: Vec<f64> = out
        .loss
        .iter()
        .enumerate()
        .map(|(i, &l)| g(i) * l)
        .collect();
    (terms.iter().sum(), terms.iter().map(|t| t.abs()).sum())
}

/// Central differences of [`objective`] w.r.t. every element of `values(problem)`.
fn check_finite_differences(
    what: &str,
    problem: &RefProblem,
    analytic: &[f64],
    values: fn(&mut RefProblem) -> &mut Vec<f64>,
) -> Result<(), TestCaseError> {
    let (_, magnitude) = objective(problem);
    let mut p = problem.clone();
    for (k, &want) in analytic.iter().enumerate() {
        let x = values(&mut p)[k];
        let h = 1e-5 * x.abs().max(1.0);
        values(&mut p)[k] = x + h;
        let (up, _) = objective(&p);
        values(&mut p)[k] = x - h;
        let (down, _) = objective(&p);
        values(&mut p)[k] = x;
        let numeric = (up - down) / (2.0 * h);
        let allowed = 1e-5 * want.abs() + 1e-8 * (1.0 + magnitude);
        prop_assert!(
            (numeric - want).abs() <= allowed,
            "{} at element {}: oracle {:e}, finite difference {:e}",
            what,
            k,
            want,
            numeric
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(48))]
    #[test]
    fn oracle_gradients_match_finite_differences(case in case(DType::F64, true)) {
        let problem = Typed::<f64>::new(&case).reference();
        let out = reference::evaluate(&problem).map_err(TestCaseError::fail)?;
        check_finite_differences("grad_logits", &problem, &out.grad_logits, |p| &mut p.logits)?;
        if let Some(grad_labels) = &out.grad_labels {
            check_finite_differences("grad_labels", &problem, grad_labels, |p| match &mut p.labels {
                RefLabels::Dense(y) => y,
                RefLabels::Ids(_) => unreachable!("no labels gradient for class ids"),
            })?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Thread counts

/// A deterministic stream of values in `[-1, 1)` (xorshift), to fill large inputs quickly.
fn stream(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
}

/// The options of a [`large_case`] from generated `(label_smoothing, z_loss, reduction,
/// from_logits, ignore)`: class axis 1, `ignore_index` -100 for class ids when `ignore`, and
/// z-loss only with logits.
fn large_options(
    (label_smoothing, z_loss, reduction, from_logits, ignore): (f64, f64, Reduction, bool, bool),
    sparse: bool,
) -> Options {
    Options {
        axis: 1,
        label_smoothing,
        ignore_index: (sparse && ignore).then_some(-100),
        from_logits,
        z_loss: if from_logits { z_loss } else { 0.0 },
        reduction,
    }
}

/// A problem of `(outer, C, inner)` with about 80,000 elements, several parallel blocks.
fn large_case(
    classes: usize,
    inner: usize,
    sparse: bool,
    options: Options,
    weighted: bool,
    seed: u64,
) -> Case {
    sized_case(80_000, classes, inner, sparse, options, weighted, seed)
}

/// A problem of `(outer, C, inner)` with 3 outer slabs more than `elements` needs.
fn sized_case(
    elements: usize,
    classes: usize,
    inner: usize,
    sparse: bool,
    options: Options,
    weighted: bool,
    seed: u64,
) -> Case {
    let outer = elements.div_ceil(classes * inner) + 3;
    let shape = vec![outer, classes, inner];
    let (elements, rows) = (outer * classes * inner, outer * inner);
    let mut next = stream(seed);
    let logits: Vec<f64> = (0..elements)
        .map(|_| {
            if options.from_logits {
                8.0 * next()
            } else {
                0.5 + 0.5 * next()
            }
        })
        .collect();
    let labels = if sparse {
        GenLabels::I64(
            (0..rows)
                .map(|_| {
                    let t = ((next() + 1.0) * classes as f64) as i64;
                    if options.ignore_index.is_some() && next() < -0.6 {
                        -100
                    } else {
                        t.min(classes as i64 - 1)
                    }
                })
                .collect(),
        )
    } else {
        GenLabels::Dense((0..elements).map(|_| (next() + 1.0) / 2.0).collect())
    };
    let weights = |n: usize, next: &mut dyn FnMut() -> f64| {
        (0..n).map(|_| next() + 1.0).collect::<Vec<f64>>()
    };
    let (class_weights, sample_weights) = if weighted {
        (
            Some(weights(classes, &mut next)),
            Some(weights(rows, &mut next)),
        )
    } else {
        (None, None)
    };
    let upstream = match options.reduction {
        Reduction::None => Some(weights(rows, &mut next)),
        _ => Some(vec![0.75]),
    };
    Case {
        shape,
        axis: 1,
        logits,
        labels,
        options: Options { axis: 1, ..options },
        class_weights,
        sample_weights,
        upstream,
    }
}

fn check_thread_counts<T: Element>(case: &Case) -> Result<(), TestCaseError> {
    let typed = Typed::<T>::new(case);
    let on = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| typed.run(None))
    };
    let (one, three) = (on(1), on(3));
    let loss_bits = |l: &Loss| match l {
        Loss::PerExample(v) => v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        Loss::Reduced(x) => vec![x.to_bits()],
    };
    prop_assert!(
        loss_bits(&one.loss) == loss_bits(&three.loss),
        "losses differ between 1 and 3 threads"
    );
    prop_assert!(
        bits(&one.grad_logits) == bits(&three.grad_logits),
        "grad_logits differ between 1 and 3 threads"
    );
    prop_assert!(
        one.grad_labels.as_deref().map(bits) == three.grad_labels.as_deref().map(bits),
        "grad_labels differ between 1 and 3 threads"
    );
    Ok(())
}

proptest! {
    #![proptest_config(config(12))]
    #[test]
    fn results_are_bit_identical_across_thread_counts_and_batches(
        dtype in select(vec![DType::F16, DType::BF16, DType::F32, DType::F64]),
        classes in select(vec![1usize, 3, 100, 1000, 5000]),
        inner in select(vec![1usize, 3]),
        sparse in any::<bool>(),
        weighted in any::<bool>(),
        options in (
            0.0..=1.0,
            prop_oneof![Just(0.0), 0.0..0.1],
            select(Reduction::ALL.to_vec()),
            prop::bool::weighted(0.8),
            any::<bool>(),
        ),
        seed in any::<u64>(),
        prefix in any::<prop::sample::Index>(),
    ) {
        let options = large_options(options, sparse);
        let case = large_case(classes, inner, sparse, options, weighted, seed);
        let outer = prefix.index(case.layout().outer);
        match dtype {
            DType::F16 => check_thread_counts::<f16>(&case)?,
            DType::BF16 => check_thread_counts::<bf16>(&case)?,
            DType::F32 => check_thread_counts::<f32>(&case)?,
            _ => check_thread_counts::<f64>(&case)?,
        }
        if options.reduction == Reduction::None {
            match dtype {
                DType::F16 => check_batch_independence::<f16>(&case, outer)?,
                DType::BF16 => check_batch_independence::<bf16>(&case, outer)?,
                DType::F32 => check_batch_independence::<f32>(&case, outer)?,
                _ => check_batch_independence::<f64>(&case, outer)?,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Unaligned inputs

fn loss_bits(l: &Loss) -> Vec<u64> {
    match l {
        Loss::PerExample(v) => v.iter().map(|x| x.to_bits()).collect(),
        Loss::Reduced(x) => vec![x.to_bits()],
    }
}

/// Whether the kernel's vector fast path takes `case` (what `fast_inputs` admits).
fn takes_fast_path<T: Element>(case: &Case, how: How) -> bool {
    let dense = matches!(case.labels, GenLabels::Dense(_));
    simd::Level::current() != simd::Level::General
        && case.layout().inner == 1
        && case.options.from_logits
        && case.class_weights.is_none()
        && !(dense && how.grad_labels)
        && T::DTYPE != DType::F64
}

/// The first `outer` slabs of `case` (all for `None`) with the float inputs read from
/// misaligned bytes as `how` says, against the same call on aligned views: bit-identical losses,
/// gradients and health. Where the fast path runs, no full-size copy of an input is made; the
/// general path copies each misaligned input once.
fn check_unaligned<T: Element>(
    case: &Case,
    outer: Option<usize>,
    how: How,
) -> Result<(), TestCaseError> {
    let typed = Typed::<T>::new(case);
    let aligned = typed.run_with(
        outer,
        How {
            misaligned: None,
            ..how
        },
    );
    let before = copies::bytes();
    let unaligned = typed.run_with(outer, how);
    let copied = copies::bytes() - before;
    prop_assert_eq!(loss_bits(&aligned.loss), loss_bits(&unaligned.loss), "loss");
    prop_assert_eq!(aligned.health, unaligned.health, "health");
    prop_assert!(
        bits(&aligned.grad_logits) == bits(&unaligned.grad_logits),
        "grad_logits differ"
    );
    prop_assert!(
        aligned.grad_labels.as_deref().map(bits) == unaligned.grad_labels.as_deref().map(bits),
        "grad_labels differ"
    );
    let layout = Layout {
        outer: outer.unwrap_or(case.layout().outer),
        ..case.layout()
    };
    let (ox, oy) = how.misaligned.expect("a misaligned run");
    let dense = matches!(case.labels, GenLabels::Dense(_));
    let size = |offset: usize, present: bool| {
        let misaligned = !offset.is_multiple_of(align_of::<T>());
        if present && misaligned {
            layout.elements() * size_of::<T>()
        } else {
            0
        }
    };
    let want = if takes_fast_path::<T>(case, how) {
        0
    } else {
        size(ox, true) + size(oy, dense)
    };
    prop_assert_eq!(copied, want, "bytes copied");
    Ok(())
}

/// Puts a `-inf`, a `+inf` and a NaN among the logits and a NaN among dense labels, in
/// different rows, for the health report's non-finite scans.
fn poison(case: &mut Case) {
    let c = case.layout().classes;
    let n = case.logits.len();
    for (at, v) in [
        (3, f64::NEG_INFINITY),
        (c + 5, f64::INFINITY),
        (2 * c + c / 2, f64::NAN),
    ] {
        if at < n {
            case.logits[at] = v;
        }
    }
    if let GenLabels::Dense(y) = &mut case.labels
        && 3 * c + 1 < n
    {
        y[3 * c + 1] = f64::NAN;
    }
}

/// Every combination that matters, on a few rows: logits and dense labels at byte offsets 1,
/// 2 and 3, float32, float16 and bfloat16, dense labels and class ids, with and without
/// gradients and label smoothing, rows shorter and longer than a block (with tails that are
/// not a whole vector), on the fast path and on the general one (class weights, class axis
/// not last, float64), with non-finite values.
#[test]
fn unaligned_inputs_give_the_bits_of_aligned_ones() {
    let wants = [(false, false), (true, false), (true, true)];
    for classes in [17usize, 1000, 1025, 3000] {
        for sparse in [false, true] {
            for label_smoothing in [0.0, 0.1] {
                for (weighted, inner) in [(false, 1), (true, 1), (false, 3)] {
                    let options = Options {
                        axis: 1,
                        label_smoothing,
                        z_loss: 1e-4,
                        ..Options::default()
                    };
                    // Four outer slabs: rows enough for every poisoned row.
                    let mut case = sized_case(1, classes, inner, sparse, options, weighted, 7);
                    poison(&mut case);
                    let outer = None;
                    for offset in 1..=3 {
                        for (grad_logits, grad_labels) in wants {
                            let how = How {
                                misaligned: Some((offset, 4 - offset)),
                                grad_logits,
                                grad_labels,
                            };
                            let what = format!(
                                "C {classes}, sparse {sparse}, smoothing {label_smoothing}, \
                                 weighted {weighted}, inner {inner}, {how:?}"
                            );
                            let run = || -> Result<(), TestCaseError> {
                                check_unaligned::<f32>(&case, outer, how)?;
                                check_unaligned::<f16>(&case, outer, how)?;
                                check_unaligned::<bf16>(&case, outer, how)?;
                                if offset == 1 {
                                    check_unaligned::<f64>(&case, outer, how)?;
                                }
                                Ok(())
                            };
                            if let Err(e) = run() {
                                panic!("{what}: {e}");
                            }
                        }
                    }
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(config(12))]
    /// Misaligned inputs against aligned ones on whole problems of several parallel blocks.
    #[test]
    fn unaligned_inputs_are_bit_identical_to_aligned_ones(
        dtype in select(vec![DType::F16, DType::BF16, DType::F32, DType::F64]),
        classes in select(vec![1usize, 3, 16, 17, 1000, 1024, 1025, 5000]),
        inner in select(vec![1usize, 1, 3]),
        sparse in any::<bool>(),
        weighted in prop::bool::weighted(0.25),
        options in (
            prop_oneof![Just(0.0), 0.0..=1.0],
            prop_oneof![Just(0.0), 0.0..0.1],
            select(Reduction::ALL.to_vec()),
            prop::bool::weighted(0.8),
            any::<bool>(),
        ),
        offsets in (1..=3usize, 0..=3usize),
        grads in (any::<bool>(), any::<bool>()),
        poisoned in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let options = large_options(options, sparse);
        let mut case = large_case(classes, inner, sparse, options, weighted, seed);
        if poisoned {
            poison(&mut case);
        }
        let how = How { misaligned: Some(offsets), grad_logits: grads.0, grad_labels: grads.1 };
        match dtype {
            DType::F16 => check_unaligned::<f16>(&case, None, how)?,
            DType::BF16 => check_unaligned::<bf16>(&case, None, how)?,
            DType::F32 => check_unaligned::<f32>(&case, None, how)?,
            _ => check_unaligned::<f64>(&case, None, how)?,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal cases of disagreements found by the properties above

/// The `0 * log 0 = 0` convention (contract Deviation 4) for the labels gradient: when a
/// class's label does not enter the loss at all (class weight 0, or label smoothing 1), the
/// loss's derivative w.r.t. that label is 0, even where the logit is `-inf`; it is not
/// `0 * -inf = NaN`.
#[test]
fn labels_gradient_is_zero_where_the_label_does_not_enter_the_loss() {
    for (class_weights, label_smoothing) in [(Some(vec![0.0, 1.0]), 0.0), (None, 1.0)] {
        let case = Case {
            shape: vec![2],
            axis: -1,
            logits: vec![f64::NEG_INFINITY, 0.0],
            labels: GenLabels::Dense(vec![0.0, 1.0]),
            options: Options {
                label_smoothing,
                ..Options::default()
            },
            class_weights,
            sample_weights: None,
            upstream: None,
        };
        let typed = Typed::<f64>::new(&case);
        let want = reference::evaluate(&typed.reference()).unwrap();
        assert_eq!(want.grad_labels.as_deref(), Some(&[0.0, 0.0][..]));
        let got = typed.run(None);
        let got = got.grad_labels.unwrap();
        assert!(
            got.iter().all(|&g| g == 0.0),
            "{case:?}: kernel grad_labels {got:?}, oracle [0, 0]"
        );
    }
}
