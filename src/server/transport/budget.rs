//! One budget for the bytes in transit on the gRPC listener: request messages still arriving
//! and answers not yet written to their clients.
//!
//! The batcher's queue limits count decoded requests only, so before this budget a client
//! could hold any amount of memory with transfers that never complete: uploads stopped one
//! byte short of their message's end, or answers to a reader that never opens its window.
//! Every stream charges what it holds here. Past the limit, a new call is refused at once
//! (UNAVAILABLE with a retry hint), and the streams already running stop releasing HTTP/2
//! flow-control capacity, so their clients can send no more than the windows they were
//! already granted; a transfer that then makes no progress is ended by the transfer timeout.
//! The worst case is the limit plus one connection window per connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::metrics as m;

/// The bytes in transit, against a limit.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: AtomicU64,
    /// `xent_transit_bytes`, looked up once: it is set on every piece of every transfer.
    gauge: metrics::Gauge,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: AtomicU64::new(0),
            gauge: metrics::gauge!(m::TRANSIT_BYTES),
        }
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Whether the budget is spent: new calls are refused, uploads held back.
    pub fn spent(&self) -> bool {
        self.used() >= self.limit
    }

    fn charge(&self, n: u64) {
        let now = self.used.fetch_add(n, Ordering::Relaxed) + n;
        self.gauge.set(now as f64);
    }

    fn release(&self, n: u64) {
        let now = self.used.fetch_sub(n, Ordering::Relaxed) - n;
        self.gauge.set(now as f64);
    }
}

/// What one stream holds of the budget; given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Held {
    /// Nothing held yet.
    pub fn new(budget: Arc<Budget>) -> Held {
        Held { budget, bytes: 0 }
    }

    /// Holds `n` more bytes.
    pub fn add(&mut self, n: usize) {
        if n > 0 {
            self.bytes += n as u64;
            self.budget.charge(n as u64);
        }
    }

    /// Gives back `n` of the bytes held.
    pub fn free(&mut self, n: usize) {
        let n = (n as u64).min(self.bytes);
        if n > 0 {
            self.bytes -= n;
            self.budget.release(n);
        }
    }

    /// Gives back everything held.
    pub fn free_all(&mut self) {
        self.free(usize::try_from(self.bytes).unwrap_or(usize::MAX));
    }

    /// The budget this is held from.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.free_all();
    }
}

/// The default budget: a quarter of the memory the process may use (its cgroup's limit, or
/// the machine's memory), at least 256 MiB.
pub fn default_limit() -> u64 {
    let memory = crate::cpus::memory_limit().unwrap_or(4 << 30);
    (memory / 4).max(256 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_are_given_back_when_dropped() {
        let budget = Arc::new(Budget::new(100));
        let mut a = Held::new(budget.clone());
        a.add(60);
        let mut b = Held::new(budget.clone());
        b.add(40);
        assert!(budget.spent());
        b.free(30);
        assert_eq!(budget.used(), 70);
        assert!(!budget.spent());
        drop(a);
        assert_eq!(budget.used(), 10);
        b.free(1000);
        assert_eq!(budget.used(), 0);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
