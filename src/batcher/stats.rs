//! What the batcher did, counted once: every count that is also a metric is bumped here,
//! beside its metric, so the two cannot disagree; and the queue's occupancy (requests and
//! bytes waiting), whose one owner this is: the handle reserves room here before a request is
//! queued, and the room is released here when the request is dispatched or dropped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::policy::{CloseReason, Full, Limits};
use crate::metrics::{self as m, ShedReason};

/// Counters of what the batcher did, read by tests and exported as metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Requests handed to the compute pool.
    pub dispatched_requests: AtomicU64,
    /// Requests computed.
    pub computed_requests: AtomicU64,
    /// Rows computed.
    pub computed_rows: AtomicU64,
    /// Logits elements computed.
    pub computed_elements: AtomicU64,
    /// Batches run, by [`CloseReason`] (index in [`CloseReason::ALL`]).
    pub batches: [AtomicU64; 5],
    /// Requests refused because too many were waiting.
    pub shed_queue_requests: AtomicU64,
    /// Requests refused because too many bytes were waiting.
    pub shed_queue_bytes: AtomicU64,
    /// Requests refused while draining.
    pub shed_draining: AtomicU64,
    /// Requests refused for exceeding a hard limit.
    pub refused_too_large: AtomicU64,
    /// Requests refused at admission because their deadline could not be met.
    pub refused_deadline: AtomicU64,
    /// Requests whose deadline passed while they waited (never computed).
    pub expired_in_queue: AtomicU64,
    /// Requests whose caller went away while they waited (never computed).
    pub abandoned_in_queue: AtomicU64,
    /// Requests waiting now (admitted, not yet dispatched or dropped).
    pub queued_requests: AtomicUsize,
    /// Bytes waiting now.
    pub queued_bytes: AtomicUsize,
    /// Batches being computed now.
    pub inflight_batches: AtomicUsize,
}

impl Stats {
    /// Batches closed for `reason`.
    pub fn batches_closed(&self, reason: CloseReason) -> u64 {
        self.batches[reason.index()].load(Ordering::Relaxed)
    }

    /// Batches run, for every reason.
    pub fn batches_total(&self) -> u64 {
        self.batches.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// Counts a request refused or dropped without being computed, here and in
    /// [`m::SHED`].
    pub(super) fn shed(&self, reason: ShedReason) {
        let counter = match reason {
            ShedReason::QueueRequests => &self.shed_queue_requests,
            ShedReason::QueueBytes => &self.shed_queue_bytes,
            ShedReason::Draining => &self.shed_draining,
            ShedReason::TooLarge => &self.refused_too_large,
            ShedReason::Deadline => &self.refused_deadline,
            ShedReason::Expired => &self.expired_in_queue,
            ShedReason::Abandoned => &self.abandoned_in_queue,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        m::shed(reason);
    }

    /// Counts a batch closed for `reason`, here and in [`m::BATCHES`].
    pub(super) fn batch(&self, reason: CloseReason) {
        self.batches[reason.index()].fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::BATCHES, "reason" => reason.label()).increment(1);
    }

    /// Counts a computed request of `rows` rows and `elements` logits elements, here and in
    /// [`m::ELEMENTS`].
    pub(super) fn computed(&self, rows: usize, elements: usize) {
        self.computed_requests.fetch_add(1, Ordering::Relaxed);
        self.computed_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.computed_elements
            .fetch_add(elements as u64, Ordering::Relaxed);
        metrics::counter!(m::ELEMENTS).increment(elements as u64);
    }

    /// Reserves room for a request of `bytes` in the queue, or says which limit it hit (and
    /// reserves nothing).
    pub(super) fn reserve(&self, bytes: usize, limits: &Limits) -> Result<(), Full> {
        let requests = self.queued_requests.fetch_add(1, Ordering::SeqCst);
        let queued = self.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        let full = if requests >= limits.max_queue_requests {
            Full::Requests
        } else if queued.saturating_add(bytes) > limits.max_queue_bytes {
            Full::Bytes
        } else {
            return Ok(());
        };
        self.release(bytes);
        Err(full)
    }

    /// Frees the room of a request of `bytes` that left the queue.
    pub(super) fn release(&self, bytes: usize) {
        self.queued_requests.fetch_sub(1, Ordering::SeqCst);
        self.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
    }

    /// Sets the queue and in-flight gauges from the counts.
    pub(super) fn publish(&self, inflight: usize) {
        self.inflight_batches.store(inflight, Ordering::Relaxed);
        metrics::gauge!(m::QUEUE_REQUESTS).set(self.queued_requests.load(Ordering::Relaxed) as f64);
        metrics::gauge!(m::QUEUE_BYTES).set(self.queued_bytes.load(Ordering::Relaxed) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::for_tests()
    }

    #[test]
    fn admission_is_bounded_by_requests_and_bytes() {
        let s = Stats::default();
        for _ in 0..8 {
            s.reserve(10, &limits()).unwrap();
        }
        assert_eq!(s.reserve(10, &limits()), Err(Full::Requests));
        let s = Stats::default();
        s.reserve(1_500_000, &limits()).unwrap();
        assert_eq!(s.reserve(600_000, &limits()), Err(Full::Bytes));
        assert_eq!(
            (
                s.queued_requests.load(Ordering::SeqCst),
                s.queued_bytes.load(Ordering::SeqCst)
            ),
            (1, 1_500_000),
            "a refusal reserves nothing"
        );
        s.release(1_500_000);
        s.reserve(600_000, &limits()).unwrap();
    }

    #[test]
    fn each_shed_reason_has_its_counter() {
        let s = Stats::default();
        for r in [
            ShedReason::QueueRequests,
            ShedReason::QueueBytes,
            ShedReason::Draining,
            ShedReason::TooLarge,
            ShedReason::Deadline,
            ShedReason::Expired,
            ShedReason::Abandoned,
        ] {
            s.shed(r);
        }
        for c in [
            &s.shed_queue_requests,
            &s.shed_queue_bytes,
            &s.shed_draining,
            &s.refused_too_large,
            &s.refused_deadline,
            &s.expired_in_queue,
            &s.abandoned_in_queue,
        ] {
            assert_eq!(c.load(Ordering::Relaxed), 1);
        }
    }
}
