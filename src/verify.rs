//! Sampled float64 verification of the kernel in production (`--verify-fraction`).
//!
//! A fraction of requests, chosen deterministically from a counter, is recomputed by the float64
//! reference oracle on a thread of its own, after the caller has its answer, and compared with
//! the outputs that were computed for it (the ones its answer was encoded from). The largest
//! error seen is exported as a gauge, so an operator can watch the kernel's accuracy on real
//! traffic. A sample clones the request and shares the outputs' buffers instead of copying
//! them ([`Evaluated::share`]); the widening to `f64` and the recomputation happen on the
//! verifier's thread. When that thread is busy, samples are dropped rather than queued:
//! verification never slows serving.
//!
//! The error of one element is `|got - want| / (|want| + abs / rel)` with the contract's
//! tolerances for the dtype (semantics §8), so a value at most 1 means "within the contract".

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};

use crate::dtype::Element;
use crate::eval::{Evaluated, Evaluation, Inputs, Labels, Outputs, Tensors};
use crate::kernel::reference::{self, RefLabels, RefProblem};
use crate::metrics as m;
use crate::tensor::Buf;

/// Requests larger than this many logits elements are not sampled.
const MAX_SAMPLE_ELEMENTS: usize = 1 << 22;

/// What the verifier has seen.
#[derive(Debug, Default)]
pub struct VerifyStats {
    /// Requests recomputed.
    pub requests: AtomicU64,
    /// Rows recomputed.
    pub rows: AtomicU64,
    /// Largest error seen (f64 bits), in units of the contract's tolerance.
    max_error: AtomicU64,
}

impl VerifyStats {
    /// Largest error seen, in units of the contract's tolerance (at most 1: within it).
    pub fn max_error(&self) -> f64 {
        f64::from_bits(self.max_error.load(Ordering::Relaxed))
    }
}

/// Samples requests and checks them on its own thread.
#[derive(Debug)]
pub struct Verifier {
    tx: SyncSender<Sample>,
    /// Sample when `hash(n) < threshold`.
    threshold: u64,
    seen: AtomicU64,
    stats: Arc<VerifyStats>,
}

impl Verifier {
    /// A verifier sampling `fraction` of requests; `None` when the fraction is 0.
    pub fn start(fraction: f64) -> Option<Verifier> {
        if fraction <= 0.0 {
            return None;
        }
        let (tx, rx) = sync_channel::<Sample>(2);
        let stats = Arc::new(VerifyStats::default());
        let s = stats.clone();
        std::thread::Builder::new()
            .name("xent-verify".into())
            .spawn(move || {
                for Sample(ev, out) in rx {
                    check(&ev, &out, &s);
                }
            })
            .ok()?;
        let threshold = if fraction >= 1.0 {
            u64::MAX
        } else {
            (fraction * u64::MAX as f64) as u64
        };
        Some(Verifier {
            tx,
            threshold,
            seen: AtomicU64::new(0),
            stats,
        })
    }

    /// What has been verified so far.
    pub fn stats(&self) -> &VerifyStats {
        &self.stats
    }

    /// Decides whether a computed request is sampled; if it is, the sample to offer once its
    /// caller has the answer (it shares `out`'s buffers, see [`Evaluated::share`]).
    pub fn sample(&self, ev: &Evaluation, out: &mut Evaluated) -> Option<Sample> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        // A multiplicative hash spreads the sampled requests evenly over the counter.
        if n.wrapping_mul(0x9E37_79B9_7F4A_7C15) > self.threshold
            || ev.elements() > MAX_SAMPLE_ELEMENTS
        {
            return None;
        }
        Some(Sample(ev.clone(), out.share()))
    }

    /// Hands a sample to the verifier's thread; returns at once (a busy thread drops it).
    pub fn offer(&self, sample: Sample) {
        match self.tx.try_send(sample) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

/// A request and the outputs computed for it, to be checked.
#[derive(Debug)]
pub struct Sample(Evaluation, Evaluated);

pub use crate::dtype::tolerance;

/// Largest error of `got` against `want`, in units of the tolerance `(rel, abs)`.
pub fn max_error(got: &[f64], want: &[f64], (rel, abs): (f64, f64)) -> f64 {
    let floor = abs / rel;
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if (g.is_nan() && w.is_nan()) || g == w {
                0.0
            } else if !(g.is_finite() && w.is_finite()) {
                f64::INFINITY
            } else {
                (g - w).abs() / (w.abs() + floor) / rel
            }
        })
        .fold(0.0, f64::max)
}

fn widen<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

fn problem<T: Element>(ev: &Evaluation, t: &Inputs<T>) -> RefProblem {
    RefProblem {
        shape: ev.shape.clone(),
        logits: widen(&t.logits.data.slice()),
        labels: match &t.labels {
            Labels::Dense(y) => RefLabels::Dense(widen(&y.data.slice())),
            Labels::Sparse(ids) => {
                RefLabels::Ids(ids.with_kernel(|k| (0..k.len()).map(|r| k.get(r)).collect()))
            }
        },
        options: ev.options,
        class_weights: ev.class_weights.clone(),
        sample_weights: ev.sample_weights.clone(),
        upstream: ev.upstream.clone(),
    }
}

/// The computed outputs widened to `f64`: loss, logits gradient, labels gradient.
fn widened(out: &Evaluated) -> [Option<Vec<f64>>; 3] {
    fn each<T: Element>(o: &Outputs<T>) -> [Option<Vec<f64>>; 3] {
        let w = |b: &Option<Buf<T>>| b.as_ref().map(|b| widen(&b.slice()));
        [w(&o.loss), w(&o.grad_logits), w(&o.grad_labels)]
    }
    crate::match_float!(out, Evaluated, o => each(o))
}

/// Recomputes one request in `f64` and records how far the computed outputs were.
fn check(ev: &Evaluation, out: &Evaluated, stats: &VerifyStats) {
    let p = crate::match_float!(&ev.tensors, Tensors, t => problem(ev, t));
    let Ok(want) = reference::evaluate(&p) else {
        return;
    };
    let tol = tolerance(ev.tensors.dtype());
    let mut err: f64 = 0.0;
    let [loss, grad_logits, grad_labels] = widened(out);
    let pairs = [
        (loss, Some(&want.loss)),
        (grad_logits, Some(&want.grad_logits)),
        (grad_labels, want.grad_labels.as_ref()),
    ];
    for (got, want) in pairs {
        if let (Some(g), Some(w)) = (got, want) {
            err = err.max(max_error(&g, w, tol));
        }
    }
    let rows = ev.layout.rows() as u64;
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats.rows.fetch_add(rows, Ordering::Relaxed);
    let old = stats.max_error.fetch_max(err.to_bits(), Ordering::Relaxed);
    // Non-negative f64 bit patterns order as the values do, so fetch_max on bits is a max.
    let max = f64::from_bits(old).max(err);
    metrics::counter!(m::VERIFIED_ROWS).increment(rows);
    metrics::gauge!(m::VERIFY_MAX_ERROR_RATIO).set(max);
    if err > 1.0 {
        tracing::warn!(request_id = %crate::echo::Id(&ev.request_id), error = err, "a verified answer is outside the contract's tolerance");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_in_units_of_the_tolerance() {
        let tol = (3e-5, 2e-6);
        assert_eq!(max_error(&[1.0, f64::NAN], &[1.0, f64::NAN], tol), 0.0);
        let e = max_error(&[1.0 + 3e-5], &[1.0], tol);
        assert!(e > 0.9 && e < 1.0, "{e}");
        assert!(max_error(&[1.0], &[f64::INFINITY], tol).is_infinite());
        assert!(
            max_error(&[1.9e-6], &[0.0], tol) <= 1.0,
            "the absolute floor applies near zero"
        );
    }
}
