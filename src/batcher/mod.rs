//! The dynamic batcher between the gRPC handlers and the compute pool.
//!
//! Three parts, as in the inference servers this is modelled on:
//! - [`Batcher`], the cheap handle handlers call: it refuses at once what cannot be admitted
//!   (queue full: UNAVAILABLE with a retry delay; over a hard limit: RESOURCE_EXHAUSTED; a
//!   deadline that cannot be met: DEADLINE_EXCEEDED; draining: UNAVAILABLE), so refusals
//!   never wait behind the queue;
//! - one task that owns the queue ([`policy::Queue`]), forms batches when the pool has a free
//!   slot, and answers requests that expired or were abandoned while waiting;
//! - batch jobs on the compute pool: one job per batch, its requests spread over the pool's
//!   threads, each answered through its own oneshot inside its own tracing span.
//!
//! A row's result never depends on its batch: each request is evaluated on its own rows with
//! sums whose order is fixed by the row, so batching changes throughput, not bits.

pub mod policy;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use tokio::sync::{mpsc, oneshot};

use crate::api;
use crate::compute::{self, ComputePool};
use crate::error::Error;
use crate::eval::{Evaluation, LossKind};
use crate::metrics::{self as m, ShedReason};
use crate::proto;
use crate::verify::Verifier;
pub use policy::{BatchKey, CloseReason, Limits};
use policy::{Dropped, Entry, Full, Next, Queue};

/// Settings of the batcher beyond the queue's own limits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatcherSettings {
    /// Queue and batch limits.
    pub limits: Limits,
    /// Batches computed at once.
    pub max_inflight_batches: usize,
    /// Largest request accepted, in logits elements.
    pub max_request_elements: usize,
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
    /// Requests waiting now.
    pub queued_requests: AtomicUsize,
    /// Bytes waiting now.
    pub queued_bytes: AtomicUsize,
    /// Batches being computed now.
    pub inflight_batches: AtomicUsize,
}

impl Stats {
    /// Batches closed for `reason`.
    pub fn batches_closed(&self, reason: CloseReason) -> u64 {
        let i = CloseReason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("listed");
        self.batches[i].load(Ordering::Relaxed)
    }

    /// Batches run, for every reason.
    pub fn batches_total(&self) -> u64 {
        self.batches.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }
}

struct Shared {
    settings: BatcherSettings,
    verifier: Option<Verifier>,
    stats: Stats,
    /// When the drain began: calls that arrive after it are refused.
    closed: OnceLock<Instant>,
    /// Measured kernel cost, ns per logits element (f64 bits); 0 until measured.
    ns_per_element: AtomicU64,
    threads: usize,
}

/// What a waiting request carries.
struct Job {
    ev: Evaluation,
    span: tracing::Span,
    /// Open while the request waits; closed at dispatch.
    queue_span: tracing::Span,
    reply: oneshot::Sender<Result<proto::EvaluateResponse, Error>>,
}

/// What the handle tells the task.
enum Msg {
    /// A request to queue.
    Submit(Box<Entry<Job>>),
    /// A caller stopped waiting: look for requests to drop.
    Wake,
}

/// A caller's wait for its answer. If the caller stops waiting (cancelled, or past its
/// deadline), dropping this closes the answer channel and wakes the task, so the request
/// leaves the queue at once instead of at the next batch.
struct Waiting {
    answer: oneshot::Receiver<Result<proto::EvaluateResponse, Error>>,
    wake: mpsc::UnboundedSender<Msg>,
    answered: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if !self.answered {
            self.answer.close();
            let _ = self.wake.send(Msg::Wake);
        }
    }
}

/// The handle handlers call; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("settings", &self.shared.settings)
            .finish()
    }
}

/// Bytes a request holds while it waits and runs: inputs and the outputs it will produce.
fn footprint(ev: &Evaluation) -> usize {
    let size = ev.tensors.dtype().size();
    let n = ev.elements();
    let dense = ev.kind == LossKind::Dense;
    let inputs = n * size * if dense { 2 } else { 1 } + ev.layout.rows() * 8;
    let outputs =
        n * size * (usize::from(ev.wanted.grad_logits) + usize::from(ev.wanted.grad_labels));
    inputs + outputs + ev.layout.rows() * size
}

impl Batcher {
    /// Starts the batcher's task on the current runtime.
    pub fn start(
        pool: ComputePool,
        settings: BatcherSettings,
        verifier: Option<Verifier>,
    ) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            settings,
            verifier,
            stats: Stats::default(),
            closed: OnceLock::new(),
            ns_per_element: AtomicU64::new(0f64.to_bits()),
            threads: pool.threads(),
        });
        tokio::spawn(run(rx, shared.clone(), pool));
        Batcher { tx, shared }
    }

    /// The sampled float64 verifier, when `--verify-fraction` is set.
    pub fn verifier(&self) -> Option<&Verifier> {
        self.shared.verifier.as_ref()
    }

    /// What the batcher has done so far.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Refuses requests that arrive from now on; those that arrived before, waiting or still
    /// being received, are computed.
    pub fn close(&self) {
        let _ = self.shared.closed.set(Instant::now());
    }

    /// The measured kernel cost in ns per logits element, if measured yet.
    pub fn ns_per_element(&self) -> Option<f64> {
        let v = f64::from_bits(self.shared.ns_per_element.load(Ordering::Relaxed));
        (v > 0.0).then_some(v)
    }

    /// Queues a validated request that `arrived` at the server, and waits for its response
    /// until `deadline`.
    pub async fn submit(
        &self,
        ev: Evaluation,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<proto::EvaluateResponse, Error> {
        let s = &self.shared;
        let stats = &s.stats;
        if s.closed.get().is_some_and(|&t| arrived >= t) {
            stats.shed_draining.fetch_add(1, Ordering::Relaxed);
            m::shed(ShedReason::Draining);
            return Err(Error::Unavailable {
                reason: "the server is shutting down; retry on another replica".into(),
                retry_after: Duration::from_millis(100),
            });
        }
        let elements = ev.elements();
        let bytes = footprint(&ev);
        let limits = s.settings.limits;
        if elements > s.settings.max_request_elements {
            stats.refused_too_large.fetch_add(1, Ordering::Relaxed);
            m::shed(ShedReason::TooLarge);
            return Err(Error::ResourceExhausted(format!(
                "logits have {elements} elements; this server accepts at most {} per request",
                s.settings.max_request_elements
            )));
        }
        if bytes > limits.max_queue_bytes {
            stats.refused_too_large.fetch_add(1, Ordering::Relaxed);
            m::shed(ShedReason::TooLarge);
            return Err(Error::ResourceExhausted(format!(
                "the request needs {bytes} bytes to compute; this server's queue holds at most {}",
                limits.max_queue_bytes
            )));
        }
        let now = Instant::now();
        if let Err(e) = meets_deadline(elements, self.ns_per_element(), now, deadline) {
            stats.refused_deadline.fetch_add(1, Ordering::Relaxed);
            m::shed(ShedReason::Deadline);
            return Err(e);
        }
        self.reserve(bytes)?;
        let (reply, answer) = oneshot::channel();
        let key = BatchKey {
            kind: ev.kind,
            dtype: ev.tensors.dtype(),
            classes: ev.layout.classes,
        };
        let rows = ev.layout.rows();
        let job = Job {
            ev,
            span: tracing::Span::current(),
            queue_span: tracing::debug_span!("queue"),
            reply,
        };
        let entry = Entry {
            key,
            rows,
            bytes,
            arrived: now,
            deadline,
            payload: job,
        };
        if self.tx.send(Msg::Submit(Box::new(entry))).is_err() {
            self.release(bytes);
            return Err(Error::Internal("the batcher has stopped".into()));
        }
        let mut waiting = Waiting {
            answer,
            wake: self.tx.clone(),
            answered: false,
        };
        let result = match tokio::time::timeout_at(deadline.into(), &mut waiting.answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Internal("the batcher dropped the call".into())),
            Err(_) => {
                return Err(Error::DeadlineExceeded(
                    "the deadline passed before the answer was ready".into(),
                ));
            }
        };
        waiting.answered = true;
        result
    }

    /// Counts a request into the queue's budgets, or refuses it with the limit it hit.
    fn reserve(&self, bytes: usize) -> Result<(), Error> {
        let s = &self.shared;
        let limits = s.settings.limits;
        let requests = s.stats.queued_requests.fetch_add(1, Ordering::SeqCst);
        let queued = s.stats.queued_bytes.fetch_add(bytes, Ordering::SeqCst);
        let full = if requests >= limits.max_queue_requests {
            Some(Full::Requests)
        } else if queued + bytes > limits.max_queue_bytes {
            Some(Full::Bytes)
        } else {
            None
        };
        let Some(full) = full else { return Ok(()) };
        self.release(bytes);
        m::shed(match full {
            Full::Requests => ShedReason::QueueRequests,
            Full::Bytes => ShedReason::QueueBytes,
        });
        let (limit, counter) = match full {
            Full::Requests => (
                format!("{} requests waiting", limits.max_queue_requests),
                &s.stats.shed_queue_requests,
            ),
            Full::Bytes => (
                format!("{} bytes waiting", limits.max_queue_bytes),
                &s.stats.shed_queue_bytes,
            ),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Err(Error::Unavailable {
            reason: format!("the queue is full ({limit}); retry later or on another replica"),
            retry_after: self.retry_delay(),
        })
    }

    fn release(&self, bytes: usize) {
        self.shared
            .stats
            .queued_requests
            .fetch_sub(1, Ordering::SeqCst);
        self.shared
            .stats
            .queued_bytes
            .fetch_sub(bytes, Ordering::SeqCst);
    }

    /// About how long the waiting work takes to compute, within [20 ms, 5 s].
    fn retry_delay(&self) -> Duration {
        let bytes = self.shared.stats.queued_bytes.load(Ordering::Relaxed) as f64;
        let ns = self.ns_per_element().unwrap_or(1.0);
        // A request's footprint is a few bytes per element; 4 is a fair middle.
        let secs = bytes / 4.0 * ns * 1e-9 / self.shared.threads.max(1) as f64;
        Duration::from_secs_f64(secs.clamp(0.02, 5.0))
    }
}

/// Whether a call of `elements` can finish by `deadline` if started `now`, at the measured
/// kernel cost (unknown cost: assume it can).
pub fn meets_deadline(
    elements: usize,
    ns_per_element: Option<f64>,
    now: Instant,
    deadline: Instant,
) -> Result<(), Error> {
    let needed = Duration::from_secs_f64(elements as f64 * ns_per_element.unwrap_or(0.0) * 1e-9);
    if now + needed <= deadline && now < deadline {
        return Ok(());
    }
    Err(Error::DeadlineExceeded(format!(
        "the call needs about {:.3} ms of compute but its deadline is {:.3} ms away",
        needed.as_secs_f64() * 1e3,
        deadline.saturating_duration_since(now).as_secs_f64() * 1e3
    )))
}

/// The batcher's task: owns the queue, forms batches, hands them to the pool.
async fn run(mut rx: mpsc::UnboundedReceiver<Msg>, shared: Arc<Shared>, pool: ComputePool) {
    let mut queue: Queue<Job> = Queue::new(shared.settings.limits);
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<()>();
    let mut inflight = 0usize;
    let mut wake: Option<Instant> = None;
    let mut open = true;
    loop {
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        };
        // Whether a caller stopped waiting: only then can a request have been abandoned.
        let mut left = false;
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(Msg::Submit(e)) => accept(&mut queue, *e, &shared),
                Some(Msg::Wake) => left = true,
                None => open = false,
            },
            Some(()) = done_rx.recv() => inflight -= 1,
            () = sleep => {}
        }
        // Take everything else already sent, so one wake-up serves a burst.
        left |= take_sent(&mut rx, &mut queue, &shared);
        if shared.settings.limits.batching
            && inflight < shared.settings.max_inflight_batches
            && !queue.is_empty()
        {
            // A slot is free. Before filling it, let the handlers that are already runnable
            // submit too: tokio runs a task woken by a send next (its LIFO slot), so this task
            // would otherwise dispatch each request alone as it comes, however many are ready
            // right behind it. The yield waits for no timer: this task runs again once the
            // work already runnable has run and the sockets have been polled once.
            tokio::task::yield_now().await;
            left |= take_sent(&mut rx, &mut queue, &shared);
        }
        // Freed slots reported meanwhile, so one wake-up dispatches into all of them.
        while done_rx.try_recv().is_ok() {
            inflight -= 1;
        }
        let now = Instant::now();
        let purge = left || queue.deadline_passed(now);
        let dropped = if purge {
            queue.purge(now, |job| job.reply.is_closed())
        } else {
            Vec::new()
        };
        for dropped in dropped {
            let (entry, counter, reason, error) = match dropped {
                Dropped::Expired(e) => (
                    e,
                    &shared.stats.expired_in_queue,
                    ShedReason::Expired,
                    Error::DeadlineExceeded(
                        "the deadline passed while the call waited in the queue".into(),
                    ),
                ),
                Dropped::Abandoned(e) => (
                    e,
                    &shared.stats.abandoned_in_queue,
                    ShedReason::Abandoned,
                    Error::Cancelled,
                ),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            m::shed(reason);
            release(&shared, entry.bytes);
            let _ = entry.payload.reply.send(Err(error));
        }
        wake = None;
        while inflight < shared.settings.max_inflight_batches {
            match queue.next(now) {
                Next::Run(batch) => {
                    inflight += 1;
                    dispatch(batch, &shared, &pool, done_tx.clone());
                }
                Next::WaitUntil(t) => {
                    wake = Some(t);
                    break;
                }
                Next::Idle => break,
            }
        }
        shared
            .stats
            .inflight_batches
            .store(inflight, Ordering::Relaxed);
        metrics::gauge!(m::QUEUE_REQUESTS).set(queue.len() as f64);
        metrics::gauge!(m::QUEUE_BYTES).set(queue.bytes() as f64);
        if !open && queue.is_empty() && inflight == 0 {
            return;
        }
    }
}

/// Queues every request sent so far; whether a caller stopped waiting meanwhile.
fn take_sent(
    rx: &mut mpsc::UnboundedReceiver<Msg>,
    queue: &mut Queue<Job>,
    shared: &Shared,
) -> bool {
    let mut left = false;
    while let Ok(msg) = rx.try_recv() {
        match msg {
            Msg::Submit(e) => accept(queue, *e, shared),
            Msg::Wake => left = true,
        }
    }
    left
}

fn accept(queue: &mut Queue<Job>, entry: Entry<Job>, shared: &Shared) {
    // The handle reserved room already, so this only fails if limits disagree.
    if let Err((_, e)) = queue.push(entry) {
        release(shared, e.bytes);
        let _ = e.payload.reply.send(Err(Error::Unavailable {
            reason: "the queue is full; retry later or on another replica".into(),
            retry_after: Duration::from_millis(50),
        }));
    }
}

fn release(shared: &Shared, bytes: usize) {
    shared.stats.queued_requests.fetch_sub(1, Ordering::SeqCst);
    shared.stats.queued_bytes.fetch_sub(bytes, Ordering::SeqCst);
}

/// Elements a batch must hold before its timing updates the kernel-rate estimate (smaller
/// ones mostly measure dispatch).
const RATE_SAMPLE_ELEMENTS: usize = 1 << 17;

/// Logits elements of a batch's requests below which they are computed on one thread. A
/// share handed to another compute thread wakes it, which costs more than computing a few
/// small requests (a 1x1000 row takes about a microsecond); from about this size (tens of
/// microseconds of kernel work) spreading pays.
const SPLIT_ELEMENTS: usize = 1 << 16;

/// Runs one batch as one job on the pool.
fn dispatch(
    batch: policy::Batch<Job>,
    shared: &Arc<Shared>,
    pool: &ComputePool,
    done: mpsc::UnboundedSender<()>,
) {
    let shared = shared.clone();
    let reason = batch.reason;
    let i = CloseReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("listed");
    shared.stats.batches[i].fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    metrics::counter!(m::BATCHES, "reason" => reason.label()).increment(1);
    metrics::histogram!(m::BATCH_REQUESTS).record(batch.entries.len() as f64);
    metrics::histogram!(m::BATCH_ROWS)
        .record(batch.entries.iter().map(|e| e.rows).sum::<usize>() as f64);
    for e in &batch.entries {
        let waited = now.saturating_duration_since(e.arrived);
        metrics::histogram!(m::QUEUE_WAIT).record(waited.as_secs_f64());
        e.payload
            .span
            .record("queue_wait_ms", waited.as_secs_f64() * 1e3);
    }
    // Dispatched requests no longer wait: their room in the queue is free again.
    shared
        .stats
        .dispatched_requests
        .fetch_add(batch.entries.len() as u64, Ordering::Relaxed);
    for e in &batch.entries {
        release(&shared, e.bytes);
    }
    let mean_elements = batch
        .entries
        .iter()
        .map(|e| e.payload.ev.elements())
        .sum::<usize>()
        / batch.entries.len().max(1);
    let min_share = (SPLIT_ELEMENTS / mean_elements.max(1)).max(1);
    pool.spawn(move || {
        // Frees the batch's slot however this job ends.
        let _done = SlotGuard(done);
        let started = Instant::now();
        let elements = batch
            .entries
            .into_par_iter()
            .with_min_len(min_share)
            .map(|entry| {
                let Job {
                    ev,
                    span,
                    queue_span,
                    reply,
                } = entry.payload;
                drop(queue_span);
                if reply.is_closed() {
                    return 0;
                }
                let started = Instant::now();
                let result = span.in_scope(|| {
                    catch_unwind(AssertUnwindSafe(|| {
                        let out =
                            tracing::debug_span!("kernel").in_scope(|| compute::evaluate(&ev))?;
                        m::numerical_health(out.health());
                        Ok(tracing::debug_span!("encode").in_scope(|| api::response(&ev, out)))
                    }))
                    .unwrap_or_else(|_| {
                        Err(Error::Internal(
                            "the kernel panicked on this request".into(),
                        ))
                    })
                });
                let took = started.elapsed().as_secs_f64();
                metrics::histogram!(m::COMPUTE).record(took);
                metrics::counter!(m::ELEMENTS).increment(ev.elements() as u64);
                span.record("compute_ms", took * 1e3);
                let verify = match (&shared.verifier, &result) {
                    (Some(v), Ok(resp)) => Some((v, resp.clone())),
                    _ => None,
                };
                // Counted before the caller can see its answer, so a caller that has every
                // answer also sees every one counted.
                let s = &shared.stats;
                s.computed_requests.fetch_add(1, Ordering::Relaxed);
                s.computed_rows
                    .fetch_add(entry.rows as u64, Ordering::Relaxed);
                s.computed_elements
                    .fetch_add(ev.elements() as u64, Ordering::Relaxed);
                let _ = reply.send(result);
                // After the caller has its answer: sampling never delays it.
                if let Some((v, resp)) = verify {
                    v.offer(&ev, &resp);
                }
                ev.elements()
            })
            .sum::<usize>();
        if elements >= RATE_SAMPLE_ELEMENTS {
            let sample = started.elapsed().as_secs_f64() * 1e9 / elements as f64;
            let old = f64::from_bits(shared.ns_per_element.load(Ordering::Relaxed));
            let new = if old > 0.0 {
                0.8 * old + 0.2 * sample
            } else {
                sample
            };
            shared
                .ns_per_element
                .store(new.to_bits(), Ordering::Relaxed);
        }
    });
}

struct SlotGuard(mpsc::UnboundedSender<()>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_that_cannot_meet_their_deadline_are_refused() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        // 1e6 elements at 2 ns each need 2 ms.
        assert!(meets_deadline(1_000_000, Some(2.0), now, now + ms(3)).is_ok());
        let e = meets_deadline(1_000_000, Some(2.0), now, now + ms(1)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::DeadlineExceeded);
        assert!(e.to_string().contains("needs about 2.000 ms"), "{e}");
        assert!(
            meets_deadline(1_000_000, None, now, now + ms(1)).is_ok(),
            "unknown cost: admitted"
        );
        assert!(
            meets_deadline(1, None, now, now).is_err(),
            "a deadline already past"
        );
    }
}
