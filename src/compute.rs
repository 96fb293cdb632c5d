//! Runs kernel work on a dedicated rayon pool, never on tokio's worker threads, and evaluates
//! a validated request through the kernel.
//!
//! [`ComputePool::run`] moves work onto the pool with `spawn`, re-enters the caller's tracing
//! span there, and answers through a oneshot channel, so the async runtime only ever awaits. A
//! panic inside the kernel becomes [`Error::Internal`] for that call; the pool and every other
//! call carry on. [`evaluate`] is the step from an [`Evaluation`] to its [`Evaluated`] outputs,
//! on whichever pool thread runs it.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::dtype::Element;
use crate::error::Error;
use crate::eval::{
    ClassIds, Evaluated, Evaluation, Inputs, Labels, LossKind, Options, Outputs, Request, Tensors,
    Wanted,
};
use crate::kernel::{self, Grads, Loss, Problem, Upstream};
use crate::tensor::{AnyTensor, Buf, Shaped};

/// A named rayon pool for kernel work.
#[derive(Clone, Debug)]
pub struct ComputePool {
    pool: Arc<rayon::ThreadPool>,
}

impl ComputePool {
    /// A pool of `threads` threads named `xent-compute-N`.
    pub fn new(threads: usize) -> Result<ComputePool, Error> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("xent-compute-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the compute pool: {e}")))?;
        Ok(ComputePool {
            pool: Arc::new(pool),
        })
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` on the pool and awaits its result.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error> {
        let (tx, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.pool.spawn(move || {
            let result = span.in_scope(|| {
                catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                    Err(Error::Internal(format!(
                        "kernel panicked: {}",
                        panic_message(&panic)
                    )))
                })
            });
            // The caller's span is let go before the caller can go on (see batcher::dispatch).
            drop(span);
            // The receiver is gone when the caller went away; nothing to do then.
            let _ = tx.send(result);
        });
        rx.await
            .map_err(|_| Error::Internal("compute pool dropped the call".into()))?
    }

    /// Runs `f` on the pool without waiting for it, inside the caller's span. A panic is
    /// logged and contained.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let span = tracing::Span::current();
        self.pool.spawn(move || {
            let _entered = span.enter();
            if let Err(panic) = catch_unwind(AssertUnwindSafe(f)) {
                tracing::error!(panic = panic_message(&panic), "a compute job panicked");
            }
        });
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Evaluates a request on the current thread (and the current rayon pool for its rows).
pub fn evaluate(ev: &Evaluation) -> Result<Evaluated, Error> {
    Ok(crate::match_float!(&ev.tensors, Tensors, t => Evaluated::from(typed(ev, t)?)))
}

fn typed<T: Element>(ev: &Evaluation, t: &Inputs<T>) -> Result<Outputs<T>, Error> {
    let layout = ev.layout;
    let n = layout.elements();
    // Raw float tensors reach the kernel as received, aligned or not: its fast path reads
    // unaligned ones a block at a time, its general path copies them into aligned buffers.
    // Unaligned class ids (one per row) are copied here, on the compute thread.
    let logits = kernel::Input::new(t.logits.data.elems(), layout)?;
    let (ids32, ids64);
    let labels = match &t.labels {
        Labels::Dense(y) => kernel::Labels::Dense(kernel::Input::new(y.data.elems(), layout)?),
        Labels::Sparse(ClassIds::I32(ids)) => {
            ids32 = ids.data.slice();
            kernel::Labels::Sparse(kernel::ClassIds::I32(&ids32))
        }
        Labels::Sparse(ClassIds::I64(ids)) => {
            ids64 = ids.data.slice();
            kernel::Labels::Sparse(kernel::ClassIds::I64(&ids64))
        }
    };
    let upstream = match (&ev.upstream, ev.options.reduction) {
        (None, _) => Upstream::Ones,
        (Some(g), kernel::Reduction::None) => Upstream::PerExample(g),
        (Some(g), _) => Upstream::Scalar(g[0]),
    };
    let problem = Problem {
        logits,
        labels,
        options: ev.options,
        class_weights: ev.class_weights.as_deref(),
        sample_weights: ev.sample_weights.as_deref(),
        upstream,
    };
    // `zeroed_vec` allocates zeroed memory (fresh pages need no memset), which `vec![x; n]` of
    // a generic `x` does not.
    let mut grad_logits = ev.wanted.grad_logits.then(|| bytemuck::zeroed_vec::<T>(n));
    let mut grad_labels = ev.wanted.grad_labels.then(|| bytemuck::zeroed_vec::<T>(n));
    let grads = Grads {
        logits: grad_logits
            .as_deref_mut()
            .map(|g| kernel::view3_mut(g, layout))
            .transpose()?,
        labels: grad_labels
            .as_deref_mut()
            .map(|g| kernel::view3_mut(g, layout))
            .transpose()?,
    };
    let (loss, mut health) = kernel::evaluate_with_health(&problem, grads)?;
    health.nonfinite_inputs += ev.nonfinite_weights;
    let loss = ev.wanted.loss.then(|| match loss {
        Loss::PerExample(l) => l.into_iter().map(T::from_f64).collect(),
        Loss::Reduced(v) => vec![T::from_f64(v)],
    });
    Ok(Outputs {
        loss: loss.map(Buf::from_vec),
        grad_logits: grad_logits.map(Buf::from_vec),
        grad_labels: grad_labels.map(Buf::from_vec),
        health,
    })
}

/// The spec's worked example (semantics §9) as a request, used to warm the pool up.
pub fn warm_up_request() -> Result<Evaluation, Error> {
    let f32s = |v: Vec<f32>| {
        Ok(AnyTensor::F32(Shaped {
            shape: vec![2, 3],
            data: Buf::from_vec(v),
        }))
    };
    Request {
        request_id: "warm-up".into(),
        kind: LossKind::Dense,
        options: Options::default(),
        wanted: Wanted::default(),
        raw_response: true,
        logits: f32s(vec![1.0, 2.0, 0.5, 0.2, 0.8, 1.5]),
        labels: f32s(vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
        class_weights: None,
        sample_weights: None,
        upstream: None,
    }
    .validate()
}

/// Checks the warm-up's answer against the spec's published losses.
pub fn check_warm_up(out: &Evaluated) -> Result<(), Error> {
    const EXPECTED: [f32; 2] = [0.464_368_8, 0.570_480_6];
    match out {
        Evaluated::F32(Outputs { loss: Some(l), .. })
            if l.len() == 2
                && l.slice()
                    .iter()
                    .zip(EXPECTED)
                    .all(|(a, b)| (a - b).abs() < 1e-6) =>
        {
            Ok(())
        }
        other => Err(Error::Internal(format!("warm-up gave {other:?}"))),
    }
}
