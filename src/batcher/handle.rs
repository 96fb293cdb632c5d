//! The handle handlers call, and admission: a request is refused here, at once, when the
//! server is draining, when it is over a hard limit, when its deadline cannot be met or when
//! the queue is full; only an admitted request reaches the task.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::job::{self, Job};
use super::policy::{BatchKey, Entry, Full, Schedule};
use super::{BatcherSettings, Shared, Stats, rate, task};
use crate::compute::ComputePool;
use crate::error::Error;
use crate::eval::{Evaluated, Evaluation, LossKind};
use crate::metrics::ShedReason;
use crate::verify::Verifier;

/// The handle handlers call; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Box<Entry<Job>>>,
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

/// A caller's wait for its answer. If the caller stops waiting (cancelled, or past its
/// deadline), dropping this closes the answer channel and wakes the task, so the request
/// leaves the queue at once instead of at the next batch.
struct Waiting<R> {
    answer: job::Answer<R>,
    shared: Arc<Shared>,
    answered: bool,
}

impl<R> Drop for Waiting<R> {
    fn drop(&mut self) {
        if !self.answered {
            self.answer.close();
            self.shared.wake.caller_left();
        }
    }
}

impl Batcher {
    /// Starts the batcher's task on the current runtime.
    pub fn start(
        pool: ComputePool,
        settings: BatcherSettings,
        verifier: Option<Verifier>,
    ) -> Batcher {
        // Every request in the channel holds room in the queue, reserved before it is sent, so
        // a channel as long as the queue never refuses a send. (The clamp is tokio's largest
        // bound; a bound allocates nothing until messages are sent.)
        let capacity = settings.limits.max_queue_requests.clamp(1, usize::MAX >> 4);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            settings,
            verifier,
            stats: Stats::default(),
            closed: OnceLock::new(),
            rate: rate::KernelRate::new(),
            wake: task::Wake::default(),
            threads: pool.threads(),
        });
        tokio::spawn(task::run(rx, shared.clone(), pool));
        Batcher { tx, shared }
    }

    /// The sampled float64 verifier, when `--verify-fraction` is set.
    pub fn verifier(&self) -> Option<&Verifier> {
        self.shared.verifier.as_ref()
    }

    /// The settings it runs with.
    pub fn settings(&self) -> &BatcherSettings {
        &self.shared.settings
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
        self.shared.rate.ns_per_element()
    }

    /// Queues a validated request that `arrived` at the server at the level and with the
    /// queue timeout of `schedule`, and waits until `deadline` for its answer, which `encode`
    /// makes from the computed outputs (on the compute pool).
    pub async fn submit<R, E>(
        &self,
        ev: Evaluation,
        schedule: Schedule,
        arrived: Instant,
        deadline: Instant,
        encode: E,
    ) -> Result<R, Error>
    where
        R: Send + 'static,
        E: FnOnce(&Evaluation, Evaluated) -> Result<R, Error> + Send + 'static,
    {
        let s = &self.shared;
        let stats = &s.stats;
        if s.closed.get().is_some_and(|&t| arrived >= t) {
            stats.shed(ShedReason::Draining);
            return Err(Error::Unavailable {
                reason: "the server is shutting down; retry on another replica".into(),
                retry_after: Duration::from_millis(100),
            });
        }
        let elements = ev.elements();
        let bytes = footprint(&ev);
        let limits = s.settings.limits;
        let level = level(schedule, limits.priority_levels)?;
        if elements > s.settings.max_request_elements {
            stats.shed(ShedReason::TooLarge);
            return Err(Error::ResourceExhausted(format!(
                "logits have {elements} elements; this server accepts at most {} per request",
                s.settings.max_request_elements
            )));
        }
        if bytes > limits.max_queue_bytes {
            stats.shed(ShedReason::TooLarge);
            return Err(Error::ResourceExhausted(format!(
                "the request needs {bytes} bytes to compute; this server's queue holds at most {}",
                limits.max_queue_bytes
            )));
        }
        let now = Instant::now();
        if let Err(e) = meets_deadline(elements, self.ns_per_element(), now, deadline) {
            stats.shed(ShedReason::Deadline);
            return Err(e);
        }
        self.reserve(bytes)?;
        let (reply, answer) = job::reply(encode);
        let key = BatchKey {
            kind: ev.kind,
            dtype: ev.tensors.dtype(),
            classes: ev.layout.classes,
        };
        let rows = ev.layout.rows();
        let queue_deadline = schedule
            .queue_timeout
            .and_then(|t| now.checked_add(t))
            .map_or(deadline, |t| t.min(deadline));
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
            queue_deadline,
            level,
            payload: job,
        };
        if let Err(e) = self.tx.try_send(Box::new(entry)) {
            stats.release(bytes);
            return Err(match e {
                mpsc::error::TrySendError::Closed(_) => {
                    Error::Internal("the batcher has stopped".into())
                }
                mpsc::error::TrySendError::Full(_) => self.full(Full::Requests),
            });
        }
        let mut waiting = Waiting {
            answer,
            shared: self.shared.clone(),
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

    /// Reserves room in the queue, or refuses the request with the limit it hit.
    fn reserve(&self, bytes: usize) -> Result<(), Error> {
        self.shared
            .stats
            .reserve(bytes, &self.shared.settings.limits)
            .map_err(|full| self.full(full))
    }

    /// Counts a request refused because the queue is full, and says so.
    fn full(&self, full: Full) -> Error {
        let limits = self.shared.settings.limits;
        let (limit, reason) = match full {
            Full::Requests => (
                format!("{} requests waiting", limits.max_queue_requests),
                ShedReason::QueueRequests,
            ),
            Full::Bytes => (
                format!("{} bytes waiting", limits.max_queue_bytes),
                ShedReason::QueueBytes,
            ),
        };
        self.shared.stats.shed(reason);
        Error::Unavailable {
            reason: format!("the queue is full ({limit}); retry later or on another replica"),
            retry_after: self.retry_delay(),
        }
    }

    /// About how long the waiting work takes to compute, within [20 ms, 5 s].
    fn retry_delay(&self) -> Duration {
        let bytes = self
            .shared
            .stats
            .queued_bytes
            .load(std::sync::atomic::Ordering::Relaxed) as f64;
        let ns = self.ns_per_element().unwrap_or(1.0);
        // A request's footprint is a few bytes per element; 4 is a fair middle.
        let secs = bytes / 4.0 * ns * 1e-9 / self.shared.threads.max(1) as f64;
        Duration::from_secs_f64(secs.clamp(0.02, 5.0))
    }
}

/// The level a request waits at: the one it names, or the lowest of `levels`.
fn level(schedule: Schedule, levels: u32) -> Result<u32, Error> {
    match schedule.level {
        None => Ok(levels),
        Some(l) if (1..=u64::from(levels)).contains(&l) => Ok(l as u32),
        Some(l) => Err(Error::invalid(
            "priority",
            format!(
                "is {l}; this server's priority levels are 1 (first) to {levels} (the default), set by --priority-levels"
            ),
        )),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_checked_and_the_default_is_the_lowest() {
        let at = |level| Schedule {
            level,
            queue_timeout: None,
        };
        assert_eq!(level(at(None), 3), Ok(3));
        assert_eq!(level(at(Some(1)), 3), Ok(1));
        let e = level(at(Some(4)), 3).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.to_string().contains("priority"), "{e}");
        assert!(level(at(Some(0)), 3).is_err());
    }

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
