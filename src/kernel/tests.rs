//! Hand-checked cases; property tests against the f64 reference live in `proptests`.

use super::*;

fn dense<'a>(x: &'a [f64], y: &'a [f64], c: usize) -> Problem<'a, f64> {
    let l = Layout {
        outer: x.len() / c,
        classes: c,
        inner: 1,
    };
    Problem {
        logits: view3(x, l).unwrap().into(),
        labels: Labels::Dense(view3(y, l).unwrap().into()),
        options: Options::default(),
        class_weights: None,
        sample_weights: None,
        upstream: Upstream::Ones,
    }
}

fn run(p: &Problem<'_, f64>) -> (Loss, Vec<f64>) {
    let mut g = vec![0.0; p.logits.len()];
    let loss = evaluate(
        p,
        Grads {
            logits: Some(
                view3_mut(
                    &mut g,
                    Layout::new(&[p.logits.dim().0, p.logits.dim().1, p.logits.dim().2], 1),
                )
                .unwrap(),
            ),
            labels: None,
        },
    )
    .unwrap();
    (loss, g)
}

#[test]
fn worked_example_of_the_spec() {
    let x = [1.0, 2.0, 0.5, 0.2, 0.8, 1.5];
    let y = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
    let (loss, _) = run(&dense(&x, &y, 3));
    let Loss::PerExample(l) = loss else { panic!() };
    assert!(
        (l[0] - 0.46436878).abs() < 1e-8 && (l[1] - 0.57048061).abs() < 1e-8,
        "{l:?}"
    );
    let mut p = dense(&x, &y, 3);
    p.options.reduction = Reduction::Mean;
    assert!(matches!(run(&p).0, Loss::Reduced(v) if (v - 0.51742470).abs() < 1e-8));
}

#[test]
fn minus_inf_at_a_zero_label_contributes_nothing() {
    let (loss, g) = run(&dense(&[f64::NEG_INFINITY, 0.0], &[0.0, 1.0], 2));
    assert_eq!(loss, Loss::PerExample(vec![0.0]));
    assert_eq!(g, vec![0.0, 0.0]);
    let (loss, _) = run(&dense(&[f64::NEG_INFINITY, 0.0], &[1.0, 0.0], 2));
    assert_eq!(loss, Loss::PerExample(vec![f64::INFINITY]));
}

#[test]
fn nan_and_plus_inf_poison_only_their_row() {
    let (loss, g) = run(&dense(&[f64::NAN, 0.0, 1.0, 2.0], &[0.0, 1.0, 0.0, 1.0], 2));
    let Loss::PerExample(l) = loss else { panic!() };
    assert!(l[0].is_nan() && l[1].is_finite());
    assert!(g[0].is_nan() && g[1].is_nan() && g[2].is_finite());
    let (loss, _) = run(&dense(&[f64::INFINITY, 0.0], &[0.0, 1.0], 2));
    assert!(matches!(loss, Loss::PerExample(l) if l[0].is_nan()));
}

#[test]
fn huge_logits_do_not_cancel() {
    let (loss, _) = run(&dense(&[1e30, -1e30], &[0.0, 1.0], 2));
    assert_eq!(loss, Loss::PerExample(vec![2e30]));
    let (loss, _) = run(&dense(&[1e30, 1e30 - 1e15, 1e30], &[1.0, 0.0, 0.0], 3));
    assert!(matches!(loss, Loss::PerExample(l) if (l[0] - 2f64.ln()).abs() < 1e-12));
}

#[test]
fn out_of_range_ids_are_refused_and_ignore_index_is_not() {
    let ids = [0i64, 3, -100];
    assert_eq!(
        check_class_ids(ClassIds::I64(&ids), 3, Some(-100)),
        Err(KernelError::ClassIdOutOfRange {
            position: 1,
            value: 3,
            classes: 3
        })
    );
    assert!(check_class_ids(ClassIds::I64(&ids[..1]), 3, None).is_ok());
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let c = 1000;
    let rows = 300;
    let x: Vec<f32> = (0..rows * c)
        .map(|k| ((k * 7919) % 1013) as f32 / 37.0 - 13.0)
        .collect();
    let ids: Vec<i32> = (0..rows).map(|r| (r * 31 % c) as i32).collect();
    let l = Layout {
        outer: rows,
        classes: c,
        inner: 1,
    };
    let mut options = Options {
        reduction: Reduction::Mean,
        label_smoothing: 0.1,
        ..Options::default()
    };
    options.z_loss = 1e-4;
    let p = Problem {
        logits: view3(&x, l).unwrap().into(),
        labels: Labels::Sparse(ClassIds::I32(&ids)),
        options,
        class_weights: None,
        sample_weights: None,
        upstream: Upstream::Scalar(0.5),
    };
    let on = |threads| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut g = vec![0.0f32; x.len()];
        let loss = pool.install(|| {
            evaluate(
                &p,
                Grads {
                    logits: Some(view3_mut(&mut g, l).unwrap()),
                    labels: None,
                },
            )
            .unwrap()
        });
        (loss, g)
    };
    let (a, b) = (on(1), on(4));
    assert_eq!(a.0, b.0);
    assert!(
        a.1.iter()
            .zip(&b.1)
            .all(|(u, v)| u.to_bits() == v.to_bits())
    );
}

/// The health of a float32 problem of `rows` rows of `c` classes, dense or by class id, on
/// the fast path (no class weights) and on the general one (class weights of 1).
fn health_f32(x: &[f32], y: Option<&[f32]>, ids: &[i32], c: usize, weighted: bool) -> Health {
    let l = Layout {
        outer: x.len() / c,
        classes: c,
        inner: 1,
    };
    let ones = vec![1.0; c];
    let p = Problem {
        logits: view3(x, l).unwrap().into(),
        labels: match y {
            Some(y) => Labels::Dense(view3(y, l).unwrap().into()),
            None => Labels::Sparse(ClassIds::I32(ids)),
        },
        options: Options::default(),
        class_weights: weighted.then_some(&ones[..]),
        sample_weights: None,
        upstream: Upstream::Ones,
    };
    let mut g = vec![0.0f32; x.len()];
    let grads = Grads {
        logits: Some(view3_mut(&mut g, l).unwrap()),
        labels: None,
    };
    evaluate_with_health(&p, grads).unwrap().1
}

#[test]
fn health_counts_non_finite_inputs_unnormalised_rows_and_non_finite_losses() {
    // Four rows of 40 classes (more than one vector, with a tail).
    let c = 40;
    let mut x: Vec<f32> = (0..4 * c).map(|k| (k % 7) as f32 * 0.3 - 1.0).collect();
    let mut y = vec![0.0f32; 4 * c];
    for r in 0..4 {
        y[r * c + r] = 1.0;
    }
    x[3] = f32::NEG_INFINITY; // row 0, label 0: masked, counted, loss finite
    x[c + 39] = f32::NAN; // row 1: NaN loss
    x[c + 5] = f32::INFINITY; // row 1 again
    y[2 * c + 7] = 0.5; // row 2 sums to 1.5
    y[3 * c] = f32::NAN; // row 3: NaN label, NaN sum, NaN loss
    let want = Health {
        nonfinite_inputs: 4,
        unnormalized_label_rows: 2,
        nonfinite_loss_rows: 2,
    };
    for weighted in [false, true] {
        assert_eq!(
            health_f32(&x, Some(&y), &[], c, weighted),
            want,
            "{weighted}"
        );
    }
    let ids = [0, 1, 2, 3];
    let want = Health {
        nonfinite_inputs: 3,
        unnormalized_label_rows: 0,
        nonfinite_loss_rows: 1,
    };
    for weighted in [false, true] {
        assert_eq!(health_f32(&x, None, &ids, c, weighted), want, "{weighted}");
    }
    // A -inf at the target: an infinite loss.
    x[2 * c + 2] = f32::NEG_INFINITY;
    assert_eq!(health_f32(&x, None, &ids, c, false).nonfinite_loss_rows, 2);
}

#[test]
fn label_sums_within_rounding_are_normalised() {
    let c = 1000;
    let x = vec![0.0f32; c];
    // Probabilities that sum to 1 up to float32 rounding.
    let y: Vec<f32> = (0..c).map(|_| 1.0 / c as f32).collect();
    assert_eq!(health_f32(&x, Some(&y), &[], c, false), Health::default());
    let y: Vec<f32> = (0..c).map(|_| 0.9995 / c as f32).collect();
    assert_eq!(health_f32(&x, Some(&y), &[], c, false), Health::default());
    let y: Vec<f32> = (0..c).map(|_| 0.99 / c as f32).collect();
    assert_eq!(
        health_f32(&x, Some(&y), &[], c, true).unnormalized_label_rows,
        1
    );
}

/// The loss and logits gradient of one row, in `T`, with optional class weights: the fast path
/// takes float32 rows without them, the general path the rest.
fn one_row<T: Element>(x: &[f64], labels: &[f64], ids: Option<i64>, w: Option<&[f64]>) -> Loss {
    let c = x.len();
    let l = Layout {
        outer: 1,
        classes: c,
        inner: 1,
    };
    let x: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let y: Vec<T> = labels.iter().map(|&v| T::from_f64(v)).collect();
    let ids = ids.map(|t| [t]);
    let p = Problem {
        logits: view3(&x, l).unwrap().into(),
        labels: match &ids {
            Some(t) => Labels::Sparse(ClassIds::I64(t)),
            None => Labels::Dense(view3(&y, l).unwrap().into()),
        },
        options: Options::default(),
        class_weights: w,
        sample_weights: None,
        upstream: Upstream::Ones,
    };
    let mut g = vec![T::from_f64(0.0); c];
    let grads = Grads {
        logits: Some(view3_mut(&mut g, l).unwrap()),
        labels: None,
    };
    evaluate(&p, grads).unwrap()
}

/// An infinite label is summed as `-y_j log_softmax_j`, infinite like TensorFlow's, PyTorch's
/// and JAX's loss, also at the class holding the maximum, where the fused `log S * Y - A` met
/// `inf * 0` (NaN); an infinite class weight likewise. On the general path (float64, class
/// weights) and the fast one (float32 without class weights).
#[test]
fn infinite_labels_and_class_weights_give_infinite_losses() {
    let (inf, nan) = (f64::INFINITY, f64::NAN);
    let x = [1.0, 2.0, 0.5];
    let ones = [1.0; 3];
    let dense = [
        ([0.0, inf, 0.0], inf),   // at the maximum
        ([0.0, -inf, 0.0], -inf), // at the maximum
        ([inf, 0.0, 0.0], inf),
        ([0.25, inf, 0.5], inf),
        ([inf, -inf, 0.0], nan),
        ([nan, inf, 0.0], nan),
    ];
    let same = |a: f64, b: f64| a == b || (a.is_nan() && b.is_nan());
    for (y, want) in dense {
        for w in [None, Some(&ones[..])] {
            for loss in [
                one_row::<f64>(&x, &y, None, w),
                one_row::<f32>(&x, &y, None, w),
            ] {
                let Loss::PerExample(l) = loss else { panic!() };
                assert!(same(l[0], want), "{y:?} {w:?}: {l:?}, want {want}");
            }
        }
    }
    // One class: log_softmax is 0 and `inf * 0` is NaN, as in the frameworks.
    assert!(
        matches!(one_row::<f32>(&[3.0], &[inf], None, None), Loss::PerExample(l) if l[0].is_nan())
    );
    // `exp(-200)` is 0 in float32, so `log S` is 0 there; the term is still `-inf * -200`.
    let loss = one_row::<f32>(&[0.0, -200.0], &[0.0, inf], None, None);
    assert_eq!(loss, Loss::PerExample(vec![inf]));
    // Class ids: an infinite weight at the target (the maximum here) makes the loss infinite;
    // elsewhere it does not enter the row.
    let w = [1.0, inf, 1.0];
    assert_eq!(
        one_row::<f64>(&x, &[], Some(1), Some(&w)),
        Loss::PerExample(vec![inf])
    );
    let lse = (1f64.exp() + 2f64.exp() + 0.5f64.exp()).ln();
    let Loss::PerExample(l) = one_row::<f64>(&x, &[], Some(0), Some(&w)) else {
        panic!()
    };
    assert!((l[0] - (lse - 1.0)).abs() < 1e-12, "{l:?}");
    // Without weights a class id at the maximum is finite.
    let Loss::PerExample(l) = one_row::<f32>(&x, &[], Some(1), None) else {
        panic!()
    };
    assert!((l[0] - (lse - 2.0)).abs() < 1e-6, "{l:?}");
}
