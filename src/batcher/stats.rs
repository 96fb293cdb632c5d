//! What the batcher did, counted once: every count that is also a metric is bumped here,
//! beside its metric, so the two cannot disagree; and the queue's occupancy (requests and
//! bytes waiting), whose one owner this is: the handle reserves room here before a request is
//! queued, and the room is released here when the request is dispatched or dropped.
//!
//! Per model (loss kind), the counts and durations the Open Inference Protocol's
//! `ModelStatistics` reports ([`ModelStats`]) are kept here too, each from the same measured
//! duration that its metric records: a call's time from arrival to answer
//! ([`m::CALL_DURATION`]), its wait in the queue ([`m::QUEUE_WAIT`]), its kernel and encoding
//! time ([`m::COMPUTE`], split into the two).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use super::policy::{CloseReason, Full, Limits};
use crate::eval::LossKind;
use crate::metrics::{self as m, ShedReason};

/// How many times something happened, and for how long in all.
#[derive(Debug, Default)]
pub struct Timed {
    /// Times it happened.
    pub count: AtomicU64,
    /// Nanoseconds it took, summed.
    pub ns: AtomicU64,
}

impl Timed {
    fn add(&self, took: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `(count, ns)`.
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        )
    }
}

/// What one model's requests did, in the terms of Triton's model statistics. Requests of every
/// front are counted (xent.v1 and the Open Inference Protocol evaluate the same models);
/// requests refused by validation (malformed, or for a model not served) are not.
#[derive(Debug, Default)]
pub struct ModelStats {
    /// Calls answered OK: time from arrival to answer.
    pub success: Timed,
    /// Calls refused or failed after validation (queue full, deadline or queue timeout
    /// passed, ...): time from arrival to answer.
    pub fail: Timed,
    /// Requests taken by a batch: time they waited in the queue.
    pub queue: Timed,
    /// Requests validated: time their validation and conversion took.
    pub compute_input: Timed,
    /// Requests computed: kernel time.
    pub compute_infer: Timed,
    /// Requests computed: time encoding their answers took.
    pub compute_output: Timed,
    /// Rows (examples) of the calls answered OK.
    pub inference_count: AtomicU64,
    /// Batches computed.
    pub execution_count: AtomicU64,
    /// When a call was last answered OK, in milliseconds since the Unix epoch (0: never).
    pub last_inference_ms: AtomicU64,
}

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
    /// Per model, in the order of [`crate::api::oip::MODELS`].
    models: [ModelStats; 2],
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

    /// What the requests of `kind` did.
    pub fn model(&self, kind: LossKind) -> &ModelStats {
        match kind {
            LossKind::Dense => &self.models[0],
            LossKind::Sparse => &self.models[1],
        }
    }

    /// Counts a batch of `kind` closed for `reason`, here and in [`m::BATCHES`].
    pub(super) fn batch(&self, kind: LossKind, reason: CloseReason) {
        self.batches[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.model(kind)
            .execution_count
            .fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::BATCHES, "reason" => reason.label()).increment(1);
    }

    /// Counts a request of `kind` that waited `waited` before a batch took it, here and in
    /// [`m::QUEUE_WAIT`].
    pub(super) fn waited(&self, kind: LossKind, waited: Duration) {
        self.model(kind).queue.add(waited);
        metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
    }

    /// Counts a computed request of `kind`, `rows` rows and `elements` logits elements whose
    /// kernel took `infer` and whose encoding took `output`, here and in [`m::ELEMENTS`] and
    /// [`m::COMPUTE`] (which has their sum).
    pub(super) fn computed(
        &self,
        kind: LossKind,
        rows: usize,
        elements: usize,
        infer: Duration,
        output: Duration,
    ) {
        self.computed_requests.fetch_add(1, Ordering::Relaxed);
        self.computed_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.computed_elements
            .fetch_add(elements as u64, Ordering::Relaxed);
        let model = self.model(kind);
        model.compute_infer.add(infer);
        model.compute_output.add(output);
        metrics::counter!(m::ELEMENTS).increment(elements as u64);
        metrics::histogram!(m::COMPUTE).record((infer + output).as_secs_f64());
    }

    /// Counts a request of `kind` validated in `took`.
    pub fn validated(&self, kind: LossKind, took: Duration) {
        self.model(kind).compute_input.add(took);
    }

    /// Counts a call of `kind` and `rows` rows answered after `took`, OK or not. The caller
    /// records the same `took` in [`m::CALL_DURATION`].
    pub fn answered(&self, kind: LossKind, rows: usize, took: Duration, ok: bool) {
        let model = self.model(kind);
        if ok {
            model.success.add(took);
            model
                .inference_count
                .fetch_add(rows as u64, Ordering::Relaxed);
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            model.last_inference_ms.fetch_max(now, Ordering::Relaxed);
        } else {
            model.fail.add(took);
        }
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
