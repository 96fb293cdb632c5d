//! One batch as one job on the compute pool: its requests spread over the pool's threads, each
//! computed inside its caller's span, encoded by its front's encoder, counted, answered, and
//! (when sampled) handed to the float64 verifier after its caller has the answer.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use super::Shared;
use super::job::{Job, panicked};
use super::policy::Batch;
use crate::compute::{self, ComputePool};
use crate::metrics as m;

/// Logits elements of a batch's requests below which they are computed on one thread. A
/// share handed to another compute thread wakes it, which costs more than computing a few
/// small requests (a 1x1000 row takes about a microsecond); from about this size (tens of
/// microseconds of kernel work) spreading pays.
const SPLIT_ELEMENTS: usize = 1 << 16;

/// Runs one batch as one job on the pool; its slot is freed when the job ends, however it
/// ends.
pub(super) fn dispatch(batch: Batch<Job>, shared: &Arc<Shared>, pool: &ComputePool) {
    let shared = shared.clone();
    if let Some(first) = batch.entries.first() {
        shared.stats.batch(first.key.kind, batch.reason);
    }
    let now = Instant::now();
    metrics::histogram!(m::BATCH_REQUESTS).record(batch.entries.len() as f64);
    metrics::histogram!(m::BATCH_ROWS)
        .record(batch.entries.iter().map(|e| e.rows).sum::<usize>() as f64);
    for e in &batch.entries {
        let waited = now.saturating_duration_since(e.arrived);
        shared.stats.waited(e.key.kind, waited);
        e.payload
            .span
            .record("queue_wait_ms", waited.as_secs_f64() * 1e3);
    }
    // Dispatched requests no longer wait: their room in the queue is free again.
    shared.stats.dispatched_requests.fetch_add(
        batch.entries.len() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    for e in &batch.entries {
        shared.stats.release(e.bytes);
    }
    let mean_elements = batch
        .entries
        .iter()
        .map(|e| e.payload.ev.elements())
        .sum::<usize>()
        / batch.entries.len().max(1);
    let min_share = (SPLIT_ELEMENTS / mean_elements.max(1)).max(1);
    pool.spawn(move || {
        let _slot = SlotGuard(&shared);
        let started = Instant::now();
        let elements = batch
            .entries
            .into_par_iter()
            .with_min_len(min_share)
            .map(|entry| run(entry.payload, entry.rows, &shared))
            .sum::<usize>();
        shared.rate.record(elements, started.elapsed());
    });
}

/// Computes, encodes and answers one request; the logits elements computed.
fn run(job: Job, rows: usize, shared: &Shared) -> usize {
    let Job {
        ev,
        span,
        queue_span,
        mut reply,
    } = job;
    drop(queue_span);
    if reply.is_closed() {
        return 0;
    }
    let started = Instant::now();
    let mut computed = started;
    let sample = span.in_scope(|| {
        let result = catch_unwind(AssertUnwindSafe(|| {
            let out = tracing::debug_span!("kernel").in_scope(|| compute::evaluate(&ev))?;
            m::numerical_health(out.health());
            Ok(out)
        }))
        .unwrap_or_else(|_| Err(panicked()));
        let (result, sample) = match (result, &shared.verifier) {
            (Ok(mut out), Some(v)) => {
                let sample = v.sample(&ev, &mut out);
                (Ok(out), sample)
            }
            (result, _) => (result, None),
        };
        computed = Instant::now();
        reply.encode(&ev, result);
        sample
    });
    let encoded = Instant::now();
    let (infer, output) = (computed - started, encoded - computed);
    span.record("compute_ms", (infer + output).as_secs_f64() * 1e3);
    // Counted before the caller can see its answer, so a caller that has every answer also
    // sees every one counted.
    shared
        .stats
        .computed(ev.kind, rows, ev.elements(), infer, output);
    // Let go of the call's span before the caller has its answer: the span then closes with
    // the call, so an exported trace is complete when the caller sees the answer, and a
    // process that exits once its calls are answered exports every span.
    drop(span);
    reply.send();
    // After the caller has its answer: sampling never delays it.
    if let (Some(v), Some(sample)) = (&shared.verifier, sample) {
        v.offer(sample);
    }
    ev.elements()
}

/// Frees its batch's slot when dropped.
struct SlotGuard<'a>(&'a Shared);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.0.wake.slot_freed();
    }
}
