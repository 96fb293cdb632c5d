//! The batching rules as a plain state machine: no tokio, no channels, time
//! passed in, so every rule is unit-tested directly.
//!
//! Requests wait in one queue ordered by priority level, then arrival: level 1 before level 2
//! and so on, first come first served within a level (a request's level is its
//! [`Schedule`]'s; requests that name none get the lowest, [`Limits::priority_levels`]). When
//! the compute pool has a free slot, the first waiting request decides which [`BatchKey`] is
//! served next (so within a level no key starves), and every waiting request with that key
//! joins it, in queue order, up to the row and byte budgets. A batch leaves:
//! - at once when the oldest request is large ([`CloseReason::LargeBypass`]: it is not held
//!   back for company) or when the budgets are filled ([`CloseReason::FullRows`],
//!   [`CloseReason::FullBytes`]);
//! - with `max_delay` zero, with whatever is waiting ([`CloseReason::QueueEmpty`]): batches then
//!   form only from requests that queued while the pool was busy, so batching never adds
//!   latency;
//! - otherwise once the first request has waited `max_delay` ([`CloseReason::DelayExpired`]).
//!
//! Requests whose caller has gone, whose deadline has passed or that waited longer than their
//! queue timeout are removed when a batch forms and never computed. Lower levels wait as long
//! as higher ones keep the pool busy: that is what levels are for, and the queue timeout is
//! how a caller bounds the wait.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::dtype::DType;
use crate::eval::LossKind;

/// What requests must share to be computed in one kernel job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    /// Loss kind.
    pub kind: LossKind,
    /// Float dtype (one monomorphised kernel per job).
    pub dtype: DType,
    /// Length of the class axis.
    pub classes: usize,
}

/// Why a batch left the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The row budget was reached.
    FullRows,
    /// The byte budget was reached.
    FullBytes,
    /// The oldest request waited `max_delay`.
    DelayExpired,
    /// No waiting time is configured and every compatible request was taken.
    QueueEmpty,
    /// A large request, sent alone without waiting.
    LargeBypass,
}

impl CloseReason {
    /// Every reason, for metrics.
    pub const ALL: [CloseReason; 5] = [
        CloseReason::FullRows,
        CloseReason::FullBytes,
        CloseReason::DelayExpired,
        CloseReason::QueueEmpty,
        CloseReason::LargeBypass,
    ];

    /// Its position in [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// A stable label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::FullRows => "full_rows",
            CloseReason::FullBytes => "full_bytes",
            CloseReason::DelayExpired => "delay_expired",
            CloseReason::QueueEmpty => "queue_empty",
            CloseReason::LargeBypass => "large_request",
        }
    }
}

/// The queue's and the batches' limits (the queue's own are enforced at admission, by
/// [`super::Stats`], which owns the queue's occupancy).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Whether requests are gathered at all (else every batch holds one request).
    pub batching: bool,
    /// Longest time the oldest request waits for company.
    pub max_delay: Duration,
    /// Row budget of a batch.
    pub max_batch_rows: usize,
    /// Byte budget of a batch.
    pub max_batch_bytes: usize,
    /// Requests at least this large go alone.
    pub large_request_bytes: usize,
    /// Requests that may wait at once.
    pub max_queue_requests: usize,
    /// Bytes that may wait at once.
    pub max_queue_bytes: usize,
    /// Priority levels, 1 (first) to this one, which is also the level of requests that name
    /// none.
    pub priority_levels: u32,
}

/// How a request waits: its priority level and how long it may wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// Its level, 1 (first) to [`Limits::priority_levels`]; `None`: the lowest.
    pub level: Option<u64>,
    /// Longest it may wait in the queue before a batch takes it; `None`: until its deadline.
    pub queue_timeout: Option<std::time::Duration>,
}

#[cfg(test)]
impl Limits {
    /// The limits the batcher's unit tests run with: 100 rows or 1 MB a batch, large from
    /// 400 kB, 8 requests or 2 MB waiting.
    pub(crate) fn for_tests() -> Limits {
        Limits {
            batching: true,
            max_delay: Duration::from_millis(2),
            max_batch_rows: 100,
            max_batch_bytes: 1_000_000,
            large_request_bytes: 400_000,
            max_queue_requests: 8,
            max_queue_bytes: 2_000_000,
            priority_levels: 2,
        }
    }
}

/// A waiting request.
#[derive(Debug)]
pub struct Entry<P> {
    /// Its batch key.
    pub key: BatchKey,
    /// Its rows.
    pub rows: usize,
    /// Its bytes (inputs plus outputs it will produce).
    pub bytes: usize,
    /// When it arrived.
    pub arrived: Instant,
    /// When its caller stops waiting.
    pub deadline: Instant,
    /// When it leaves the queue uncomputed if no batch took it: its deadline, or earlier when
    /// it has a queue timeout.
    pub queue_deadline: Instant,
    /// Its priority level (1 first).
    pub level: u32,
    /// What the batcher carries for it.
    pub payload: P,
}

/// Which queue limit refused a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Full {
    /// Too many requests waiting.
    Requests,
    /// Too many bytes waiting.
    Bytes,
}

/// A batch ready to run.
#[derive(Debug)]
pub struct Batch<P> {
    /// Its requests, in queue order.
    pub entries: Vec<Entry<P>>,
    /// Why it left.
    pub reason: CloseReason,
}

/// What the queue wants next.
#[derive(Debug)]
pub enum Next<P> {
    /// Run this batch.
    Run(Batch<P>),
    /// Nothing to run before this instant (unless a request arrives).
    WaitUntil(Instant),
    /// Nothing waits.
    Idle,
}

/// Requests removed without being computed.
#[derive(Debug)]
pub enum Dropped<P> {
    /// The deadline passed while it waited.
    Expired(Entry<P>),
    /// It waited its queue timeout.
    TimedOut(Entry<P>),
    /// The caller went away.
    Abandoned(Entry<P>),
}

/// The waiting requests, by level, then in arrival order.
#[derive(Debug)]
pub struct Queue<P> {
    limits: Limits,
    waiting: VecDeque<Entry<P>>,
    /// No waiting request's queue deadline is earlier than this (it may be earlier than every one
    /// of them once requests leave; `purge` makes it exact again).
    earliest_deadline: Option<Instant>,
}

impl<P> Queue<P> {
    /// An empty queue.
    pub fn new(limits: Limits) -> Queue<P> {
        Queue {
            limits,
            waiting: VecDeque::new(),
            earliest_deadline: None,
        }
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Bytes waiting, summed over the waiting requests.
    pub fn bytes(&self) -> usize {
        self.waiting.iter().map(|e| e.bytes).sum()
    }

    /// Queues a request (admitted already: the queue's limits are checked on admission)
    /// behind every request of its level or a higher one (requests are pushed in arrival
    /// order, so each level stays first come first served).
    pub fn push(&mut self, entry: Entry<P>) {
        self.earliest_deadline = Some(
            self.earliest_deadline
                .map_or(entry.queue_deadline, |d| d.min(entry.queue_deadline)),
        );
        let at = self.waiting.partition_point(|e| e.level <= entry.level);
        self.waiting.insert(at, entry);
    }

    /// When a waiting request may next leave uncomputed (at the latest then; possibly
    /// earlier than any does, see `earliest_deadline`).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.earliest_deadline
    }

    /// Whether a waiting request's deadline may have passed by `now` (so [`Queue::purge`]
    /// has work to do even if no caller left).
    pub fn deadline_passed(&self, now: Instant) -> bool {
        self.earliest_deadline.is_some_and(|d| d <= now)
    }

    /// Removes requests whose queue deadline passed or whose caller left (`gone`), in place and in
    /// one pass: the requests kept stay in order; the common case, nothing to remove,
    /// allocates nothing.
    pub fn purge(&mut self, now: Instant, gone: impl Fn(&P) -> bool) -> Vec<Dropped<P>> {
        let mut earliest: Option<Instant> = None;
        let mut kept = 0;
        for i in 0..self.waiting.len() {
            let e = &self.waiting[i];
            if e.queue_deadline > now && !gone(&e.payload) {
                earliest = Some(earliest.map_or(e.queue_deadline, |d| d.min(e.queue_deadline)));
                self.waiting.swap(kept, i);
                kept += 1;
            }
        }
        let dropped: Vec<_> = self
            .waiting
            .split_off(kept)
            .into_iter()
            .map(|e| {
                if e.deadline <= now {
                    Dropped::Expired(e)
                } else if e.queue_deadline <= now {
                    Dropped::TimedOut(e)
                } else {
                    Dropped::Abandoned(e)
                }
            })
            .collect();
        self.earliest_deadline = earliest;
        dropped
    }

    /// The next batch to run, given that a compute slot is free.
    pub fn next(&mut self, now: Instant) -> Next<P> {
        let Some(oldest) = self.waiting.front() else {
            return Next::Idle;
        };
        let l = self.limits;
        let is_large =
            |e: &Entry<P>| e.bytes >= l.large_request_bytes || e.rows >= l.max_batch_rows;
        if !l.batching || is_large(oldest) {
            let reason = if l.batching {
                CloseReason::LargeBypass
            } else {
                CloseReason::QueueEmpty
            };
            let e = self.waiting.pop_front().expect("oldest exists");
            return Next::Run(Batch {
                entries: vec![e],
                reason,
            });
        }
        let key = oldest.key;
        let (mut rows, mut bytes) = (0usize, 0usize);
        let mut take = Vec::new();
        let mut full = None;
        for (i, e) in self.waiting.iter().enumerate() {
            if e.key != key || is_large(e) {
                continue;
            }
            if !take.is_empty() && rows + e.rows > l.max_batch_rows {
                full = Some(CloseReason::FullRows);
                break;
            }
            if !take.is_empty() && bytes + e.bytes > l.max_batch_bytes {
                full = Some(CloseReason::FullBytes);
                break;
            }
            rows += e.rows;
            bytes += e.bytes;
            take.push(i);
            if rows >= l.max_batch_rows {
                full = Some(CloseReason::FullRows);
                break;
            }
            if bytes >= l.max_batch_bytes {
                full = Some(CloseReason::FullBytes);
                break;
            }
        }
        let due = oldest.arrived + l.max_delay;
        let reason = match full {
            Some(r) => r,
            None if l.max_delay.is_zero() => CloseReason::QueueEmpty,
            None if now >= due => CloseReason::DelayExpired,
            None => {
                // The slot is free while this group waits for company: a large request behind
                // it runs now instead of waiting too.
                if let Some(i) = self.waiting.iter().position(is_large) {
                    let e = self.waiting.remove(i).expect("index from this queue");
                    return Next::Run(Batch {
                        entries: vec![e],
                        reason: CloseReason::LargeBypass,
                    });
                }
                return Next::WaitUntil(due);
            }
        };
        let mut entries = Vec::with_capacity(take.len());
        for (removed, i) in take.into_iter().enumerate() {
            let e = self
                .waiting
                .remove(i - removed)
                .expect("index from this queue");
            entries.push(e);
        }
        Next::Run(Batch { entries, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: BatchKey = BatchKey {
        kind: LossKind::Sparse,
        dtype: DType::F32,
        classes: 1000,
    };

    fn limits() -> Limits {
        Limits::for_tests()
    }

    fn entry(key: BatchKey, rows: usize, bytes: usize, at: Instant, id: u32) -> Entry<u32> {
        Entry {
            key,
            rows,
            bytes,
            arrived: at,
            deadline: at + Duration::from_secs(1),
            queue_deadline: at + Duration::from_secs(1),
            level: 2,
            payload: id,
        }
    }

    fn ids(n: Next<u32>) -> (Vec<u32>, CloseReason) {
        match n {
            Next::Run(b) => (b.entries.iter().map(|e| e.payload).collect(), b.reason),
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    #[test]
    fn waits_for_company_then_leaves_when_the_delay_expires() {
        let t = Instant::now();
        let mut q = Queue::new(limits());
        q.push(entry(K, 10, 100, t, 1));
        assert!(matches!(q.next(t), Next::WaitUntil(d) if d == t + Duration::from_millis(2)));
        q.push(entry(K, 10, 100, t, 2));
        assert_eq!(
            ids(q.next(t + Duration::from_millis(2))),
            (vec![1, 2], CloseReason::DelayExpired)
        );
        assert!(matches!(q.next(t), Next::Idle));
        assert_eq!(q.bytes(), 0);
    }

    #[test]
    fn zero_delay_takes_what_waits_and_never_waits() {
        let t = Instant::now();
        let mut q = Queue::new(Limits {
            max_delay: Duration::ZERO,
            ..limits()
        });
        q.push(entry(K, 10, 100, t, 1));
        q.push(entry(K, 10, 100, t, 2));
        assert_eq!(ids(q.next(t)), (vec![1, 2], CloseReason::QueueEmpty));
    }

    #[test]
    fn budgets_close_batches_and_keys_are_served_oldest_first() {
        let t = Instant::now();
        let other = BatchKey { classes: 10, ..K };
        let mut q = Queue::new(limits());
        q.push(entry(K, 60, 100, t, 1));
        q.push(entry(other, 5, 100, t, 2));
        q.push(entry(K, 60, 100, t, 3));
        q.push(entry(K, 40, 100, t, 4));
        // 60 + 60 > 100: the batch closes full after the first; the rest waits its turn.
        assert_eq!(ids(q.next(t)), (vec![1], CloseReason::FullRows));
        assert!(
            matches!(q.next(t), Next::WaitUntil(_)),
            "the other key's request waits for company"
        );
        assert_eq!(
            ids(q.next(t + Duration::from_millis(3))),
            (vec![2], CloseReason::DelayExpired)
        );
        assert_eq!(ids(q.next(t)), (vec![3, 4], CloseReason::FullRows));
        let mut q = Queue::new(limits());
        q.push(entry(K, 1, 300_000, t, 1));
        q.push(entry(K, 1, 300_000, t, 2));
        q.push(entry(K, 1, 300_000, t, 3));
        q.push(entry(K, 1, 300_000, t, 4));
        assert_eq!(ids(q.next(t)), (vec![1, 2, 3], CloseReason::FullBytes));
    }

    #[test]
    fn large_requests_go_alone_at_once() {
        let t = Instant::now();
        let mut q = Queue::new(limits());
        q.push(entry(K, 1, 500_000, t, 1));
        q.push(entry(K, 1, 10, t, 2));
        assert_eq!(ids(q.next(t)), (vec![1], CloseReason::LargeBypass));
        let mut q = Queue::new(limits());
        q.push(entry(K, 1, 10, t, 1));
        q.push(entry(K, 1, 500_000, t, 2));
        assert_eq!(
            ids(q.next(t)),
            (vec![2], CloseReason::LargeBypass),
            "not stuck behind a waiting batch"
        );
        let mut q = Queue::new(Limits {
            batching: false,
            ..limits()
        });
        q.push(entry(K, 1, 10, t, 1));
        q.push(entry(K, 1, 10, t, 2));
        assert_eq!(
            ids(q.next(t)).0,
            vec![1],
            "without batching each request runs alone"
        );
    }

    #[test]
    fn reasons_are_listed_at_their_index() {
        for (i, r) in CloseReason::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn expired_and_abandoned_requests_are_dropped_uncomputed() {
        let t = Instant::now();
        let mut q = Queue::new(limits());
        q.push(entry(K, 1, 10, t, 1));
        let mut soon = entry(K, 1, 10, t, 2);
        soon.deadline = t + Duration::from_millis(1);
        soon.queue_deadline = soon.deadline;
        q.push(soon);
        q.push(entry(K, 1, 10, t, 3));
        let dropped = q.purge(t + Duration::from_millis(1), |&id| id == 3);
        assert!(matches!(
            dropped[0],
            Dropped::Expired(Entry { payload: 2, .. })
        ));
        assert!(matches!(
            dropped[1],
            Dropped::Abandoned(Entry { payload: 3, .. })
        ));
        assert_eq!((q.len(), q.bytes()), (1, 10));
        assert!(!q.deadline_passed(t + Duration::from_millis(999)));
        assert!(q.deadline_passed(t + Duration::from_secs(1)));
        assert!(q.purge(t, |_| false).is_empty(), "nothing more to drop");
    }

    #[test]
    fn level_one_goes_before_level_two_and_each_level_is_fifo() {
        let t = Instant::now();
        let other = BatchKey { classes: 10, ..K };
        let mut q = Queue::new(Limits {
            max_delay: Duration::ZERO,
            ..limits()
        });
        let at = |key, level, id| Entry {
            level,
            ..entry(key, 60, 100, t, id)
        };
        q.push(at(K, 2, 1));
        q.push(at(other, 2, 2));
        q.push(at(K, 1, 3));
        q.push(at(other, 1, 4));
        q.push(at(K, 1, 5));
        q.push(at(K, 2, 6));
        // 60 rows each and 100 a batch: one request a batch, in queue order.
        let order: Vec<u32> = std::iter::from_fn(|| match q.next(t) {
            Next::Run(b) => Some(b.entries[0].payload),
            _ => None,
        })
        .collect();
        assert_eq!(order, vec![3, 4, 5, 1, 2, 6]);
        // With room, the first request's key gathers its level first, then the lower one.
        let mut q = Queue::new(Limits {
            max_delay: Duration::ZERO,
            ..limits()
        });
        let small = |level, id| Entry {
            level,
            ..entry(K, 10, 100, t, id)
        };
        q.push(small(2, 1));
        q.push(small(1, 2));
        q.push(small(2, 3));
        q.push(small(1, 4));
        assert_eq!(ids(q.next(t)), (vec![2, 4, 1, 3], CloseReason::QueueEmpty));
    }

    #[test]
    fn a_request_past_its_queue_timeout_is_dropped_before_its_deadline() {
        let t = Instant::now();
        let mut q = Queue::new(limits());
        let mut short = entry(K, 1, 10, t, 1);
        short.queue_deadline = t + Duration::from_millis(5);
        q.push(short);
        q.push(entry(K, 1, 10, t, 2));
        assert!(!q.deadline_passed(t + Duration::from_millis(4)));
        assert!(q.deadline_passed(t + Duration::from_millis(5)));
        let dropped = q.purge(t + Duration::from_millis(5), |_| false);
        assert!(matches!(
            dropped[..],
            [Dropped::TimedOut(Entry { payload: 1, .. })]
        ));
        assert_eq!(q.len(), 1);
    }
}
