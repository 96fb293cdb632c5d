//! The measured kernel cost in nanoseconds per logits element: admission refuses calls that
//! cannot meet their deadline at this rate, and a full queue's retry delay is based on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Elements a batch must hold before its timing updates the estimate (smaller ones mostly
/// measure dispatch).
const SAMPLE_ELEMENTS: usize = 1 << 17;

/// An exponentially weighted mean of the cost of batches of at least [`SAMPLE_ELEMENTS`].
#[derive(Debug)]
pub(super) struct KernelRate {
    /// ns per logits element (f64 bits); 0 until measured.
    ns_per_element: AtomicU64,
}

impl KernelRate {
    pub(super) fn new() -> KernelRate {
        KernelRate {
            ns_per_element: AtomicU64::new(0f64.to_bits()),
        }
    }

    /// The cost in ns per logits element, if measured yet.
    pub(super) fn ns_per_element(&self) -> Option<f64> {
        let v = f64::from_bits(self.ns_per_element.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// Counts a batch of `elements` that took `took`.
    pub(super) fn record(&self, elements: usize, took: Duration) {
        if elements < SAMPLE_ELEMENTS {
            return;
        }
        let sample = took.as_secs_f64() * 1e9 / elements as f64;
        let new = match self.ns_per_element() {
            Some(old) => 0.8 * old + 0.2 * sample,
            None => sample,
        };
        self.ns_per_element.store(new.to_bits(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_batches_do_not_count_and_the_mean_moves_a_fifth() {
        let r = KernelRate::new();
        r.record(SAMPLE_ELEMENTS - 1, Duration::from_secs(1));
        assert_eq!(r.ns_per_element(), None);
        r.record(1_000_000, Duration::from_millis(2));
        assert_eq!(r.ns_per_element(), Some(2.0));
        r.record(1_000_000, Duration::from_millis(7));
        assert!((r.ns_per_element().unwrap() - 3.0).abs() < 1e-12);
    }
}
