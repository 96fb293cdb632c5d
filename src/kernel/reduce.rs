//! Per-example weights, reduction denominators, and sums across rows in index order.
//!
//! Everything here runs before or after the parallel pass, serially and in row order, so a
//! reduced loss never depends on how rows were split across threads (determinism lives here).

use super::options::Reduction;

/// A sum of `f64` values in index order, pairwise so the rounding error grows with `log n`.
/// The split points depend only on `n`, never on threads.
pub fn ordered_sum(v: &[f64]) -> f64 {
    const LEAF: usize = 64;
    if v.len() <= LEAF {
        v.iter().sum()
    } else {
        let (a, b) = v.split_at(v.len() / 2);
        ordered_sum(a) + ordered_sum(b)
    }
}

/// The denominator of a reduction given every example's effective weight `omega` and whether
/// it is ignored. `None` for `Reduction::None`.
pub fn denominator(
    reduction: Reduction,
    rows: usize,
    omega: impl Fn(usize) -> f64,
    ignored: impl Fn(usize) -> bool,
) -> Option<f64> {
    match reduction {
        Reduction::None => None,
        Reduction::Sum => Some(1.0),
        Reduction::Mean => {
            let w: Vec<f64> = (0..rows).map(omega).collect();
            Some(ordered_sum(&w))
        }
        Reduction::SumOverBatchSize => Some((0..rows).filter(|&r| !ignored(r)).count() as f64),
        Reduction::SumByNonzeroWeights => {
            Some((0..rows).filter(|&r| omega(r) != 0.0).count() as f64)
        }
    }
}

/// `a / b`, or 0 when `b` is 0 (TensorFlow's safe division).
pub fn safe_div(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_are_pairwise_and_exact_for_small_integers() {
        let v: Vec<f64> = (0..1000).map(f64::from).collect();
        assert_eq!(ordered_sum(&v), 499_500.0);
        assert_eq!(ordered_sum(&[]), 0.0);
    }

    #[test]
    fn denominators() {
        let w = [1.0, 0.0, 2.0, 0.5];
        let ign = [false, true, false, false];
        let d = |r| denominator(r, 4, |i| w[i], |i| ign[i]).unwrap();
        assert_eq!(d(Reduction::Sum), 1.0);
        assert_eq!(d(Reduction::Mean), 3.5);
        assert_eq!(d(Reduction::SumOverBatchSize), 3.0);
        assert_eq!(d(Reduction::SumByNonzeroWeights), 3.0);
        assert_eq!(denominator(Reduction::None, 4, |_| 1.0, |_| false), None);
        assert_eq!(safe_div(1.0, 0.0), 0.0);
    }
}
