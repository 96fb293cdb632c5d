//! The batcher's task: it owns the queue, forms batches when the pool has a free slot, hands
//! them to dispatch, and answers requests that expired or were abandoned while they waited.
//!
//! It wakes for three things: a request sent by the handle (a bounded channel), a caller who
//! stopped waiting or a batch that finished ([`Wake`]: flags and one `Notify`, which keeps a
//! wake-up that comes while the task is busy), the time the first group waits for, and the
//! time a waiting request's queue timeout or deadline passes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

use super::Shared;
use super::dispatch::dispatch;
use super::job::Job;
use super::policy::{Dropped, Entry, Next, Queue};
use crate::compute::ComputePool;
use crate::error::Error;
use crate::metrics::ShedReason;

/// What wakes the task besides a new request.
#[derive(Debug, Default)]
pub(super) struct Wake {
    notify: Notify,
    /// A caller stopped waiting: look for requests to drop.
    left: AtomicBool,
    /// Batches finished since the task last looked.
    freed: AtomicUsize,
}

impl Wake {
    /// A caller stopped waiting.
    pub(super) fn caller_left(&self) {
        self.left.store(true, Ordering::Release);
        self.notify.notify_one();
    }

    /// A batch finished: its slot is free.
    pub(super) fn slot_freed(&self) {
        self.freed.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

/// Owns the queue, forms batches, hands them to the pool; returns once the handles are gone
/// and every request is answered.
pub(super) async fn run(
    mut rx: mpsc::Receiver<Box<Entry<Job>>>,
    shared: Arc<Shared>,
    pool: ComputePool,
) {
    let settings = shared.settings;
    let mut queue: Queue<Job> = Queue::new(settings.limits);
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
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(e) => queue.push(*e),
                None => open = false,
            },
            () = shared.wake.notify.notified() => {}
            () = sleep => {}
        }
        // Take everything else already sent, so one wake-up serves a burst.
        take_sent(&mut rx, &mut queue);
        if settings.limits.batching && inflight < settings.max_inflight_batches && !queue.is_empty()
        {
            // A slot is free. Before filling it, let the handlers that are already runnable
            // submit too: tokio runs a task woken by a send next (its LIFO slot), so this task
            // would otherwise dispatch each request alone as it comes, however many are ready
            // right behind it. The yield waits for no timer: this task runs again once the
            // work already runnable has run and the sockets have been polled once.
            tokio::task::yield_now().await;
            take_sent(&mut rx, &mut queue);
        }
        // Whether a caller stopped waiting: only then can a request have been abandoned.
        let left = shared.wake.left.swap(false, Ordering::AcqRel);
        // Slots freed meanwhile, so one wake-up dispatches into all of them.
        inflight -= shared.wake.freed.swap(0, Ordering::AcqRel);
        let now = Instant::now();
        if left || queue.deadline_passed(now) {
            for dropped in queue.purge(now, |job| job.reply.is_closed()) {
                answer_dropped(dropped, &shared);
            }
        }
        wake = None;
        while inflight < settings.max_inflight_batches {
            match queue.next(now) {
                Next::Run(batch) => {
                    inflight += 1;
                    dispatch(batch, &shared, &pool);
                }
                Next::WaitUntil(t) => {
                    wake = Some(t);
                    break;
                }
                Next::Idle => break,
            }
        }
        // A request whose queue timeout passes leaves then, even if nothing else wakes the task
        // (its caller, still within its deadline, does not).
        if let Some(expiry) = queue.next_expiry() {
            wake = Some(wake.map_or(expiry, |w| w.min(expiry)));
        }
        shared.stats.publish(inflight);
        if !open && queue.is_empty() && inflight == 0 {
            return;
        }
    }
}

/// Queues every request sent so far.
fn take_sent(rx: &mut mpsc::Receiver<Box<Entry<Job>>>, queue: &mut Queue<Job>) {
    while let Ok(e) = rx.try_recv() {
        queue.push(*e);
    }
}

/// Counts and answers a request that left the queue uncomputed.
fn answer_dropped(dropped: Dropped<Job>, shared: &Shared) {
    let (entry, reason, error) = match dropped {
        Dropped::Expired(e) => (
            e,
            ShedReason::Expired,
            Error::DeadlineExceeded(
                "the deadline passed while the call waited in the queue".into(),
            ),
        ),
        Dropped::TimedOut(e) => {
            let timeout = e.queue_deadline.saturating_duration_since(e.arrived);
            let error = Error::DeadlineExceeded(format!(
                "the call waited its queue timeout of {} us (request parameter timeout) without a batch taking it",
                timeout.as_micros()
            ));
            (e, ShedReason::Expired, error)
        }
        Dropped::Abandoned(e) => (e, ShedReason::Abandoned, Error::Cancelled),
    };
    shared.stats.shed(reason);
    shared.stats.release(entry.bytes);
    entry.payload.reply.refuse(error);
}
