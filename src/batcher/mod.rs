//! The dynamic batcher between the protocol handlers and the compute pool.
//!
//! Three parts, as in the inference servers this is modelled on, each in a file of its own:
//! - [`Batcher`] (`handle.rs`), the cheap handle handlers call, and admission: it refuses at
//!   once what cannot be admitted (queue full: UNAVAILABLE with a retry delay; over a hard
//!   limit: RESOURCE_EXHAUSTED; a deadline that cannot be met: DEADLINE_EXCEEDED; draining:
//!   UNAVAILABLE), so refusals never wait behind the queue;
//! - one task (`task.rs`) that owns the queue ([`policy::Queue`], the batching rules as a plain
//!   state machine: ordered by priority level, then arrival), forms batches when the pool has a
//!   free slot, and answers requests that expired, passed their queue timeout or were
//!   abandoned while waiting;
//! - dispatch (`dispatch.rs`): one job per batch on the compute pool, its requests spread over
//!   the pool's threads, each computed, encoded by its front's encoder and answered through its
//!   own oneshot inside its own tracing span.
//!
//! Around them: what a waiting request carries and how its answer gets back (`job.rs`), the
//! counters and the queue's occupancy, whose one owner is [`Stats`] (`stats.rs`), and the
//! measured kernel rate admission and retry delays are based on (`rate.rs`). The channel from
//! the handle to the task is bounded by the queue's own request limit; the task's other
//! wake-ups (a caller left, a slot freed) are flags and one `Notify`, so nothing grows without
//! bound.
//!
//! The batcher knows neither protobuf nor formulas: it takes [`Evaluation`]s, each with its
//! [`Schedule`] (priority level and queue timeout, which only the Open Inference Protocol's
//! front reads from its requests), and hands each request's [`crate::eval::Evaluated`] to the
//! encoder its front gave with it. A row's result never depends on its batch: each request is
//! evaluated on its own rows with sums whose order is fixed by the row, so batching changes
//! throughput, not bits.
//!
//! [`Evaluation`]: crate::eval::Evaluation

mod dispatch;
mod handle;
mod job;
pub mod policy;
mod rate;
mod stats;
mod task;

use std::sync::OnceLock;
use std::time::Instant;

pub use handle::{Batcher, meets_deadline};
pub use policy::{BatchKey, CloseReason, Limits, Schedule};
pub use stats::{ModelStats, Stats, Timed};

use crate::verify::Verifier;

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

/// What the handle, the task and the batch jobs share.
struct Shared {
    settings: BatcherSettings,
    verifier: Option<Verifier>,
    stats: Stats,
    /// When the drain began: calls that arrive after it are refused.
    closed: OnceLock<Instant>,
    /// Measured kernel cost.
    rate: rate::KernelRate,
    /// Wakes the task when a caller leaves or a slot is freed.
    wake: task::Wake,
    threads: usize,
}
