//! Runs kernel work on a dedicated rayon pool, never on tokio's worker threads.
//!
//! [`ComputePool::evaluate`] moves a validated request onto the pool with `spawn`, re-enters
//! the caller's tracing span there, and answers through a oneshot channel, so the async
//! runtime only ever awaits. A panic inside the kernel becomes [`Error::Internal`] for that
//! call; the pool and every other call carry on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use tokio::sync::oneshot;

use crate::dtype::Element;
use crate::error::Error;
use crate::eval::{ClassIds, Evaluated, Evaluation, Inputs, Labels, Outputs, Tensors};
use crate::kernel::{self, Grads, Loss, Problem, Upstream};

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
            let _entered = span.enter();
            let result = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
                Err(Error::Internal(format!(
                    "kernel panicked: {}",
                    panic_message(&panic)
                )))
            });
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

    /// Evaluates a request on the pool.
    pub async fn evaluate(&self, ev: Arc<Evaluation>) -> Result<Evaluated, Error> {
        self.run(move || evaluate(&ev)).await
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
    Ok(match &ev.tensors {
        Tensors::F16(t) => Evaluated::F16(typed(ev, t)?),
        Tensors::BF16(t) => Evaluated::BF16(typed(ev, t)?),
        Tensors::F32(t) => Evaluated::F32(typed(ev, t)?),
        Tensors::F64(t) => Evaluated::F64(typed(ev, t)?),
    })
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
        loss,
        grad_logits,
        grad_labels,
        health,
    })
}

/// The spec's worked example (semantics §9) as a request, used to warm the pool up.
pub fn warm_up_request() -> Result<Evaluation, Error> {
    use crate::api::tensor::encode;
    crate::api::decode(crate::proto::EvaluateRequest {
        request_id: "warm-up".into(),
        loss: crate::proto::LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], vec![1.0f32, 2.0, 0.5, 0.2, 0.8, 1.5], true)),
        labels: Some(encode(&[2, 3], vec![0.0f32, 1.0, 0.0, 0.0, 0.0, 1.0], true)),
        ..Default::default()
    })
}

/// Checks the warm-up's answer against the spec's published losses.
pub fn check_warm_up(out: &Evaluated) -> Result<(), Error> {
    const EXPECTED: [f32; 2] = [0.464_368_8, 0.570_480_6];
    match out {
        Evaluated::F32(Outputs { loss: Some(l), .. })
            if l.len() == 2 && l.iter().zip(EXPECTED).all(|(a, b)| (a - b).abs() < 1e-6) =>
        {
            Ok(())
        }
        other => Err(Error::Internal(format!("warm-up gave {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use half::bf16;
    use prost::Message as _;

    use super::*;
    use crate::api::tensor::encode;
    use crate::dtype::DType;
    use crate::eval::Tensors;
    use crate::kernel::{Elems, copies};
    use crate::proto;

    const ROWS: usize = 4;
    const CLASSES: usize = 2500;

    /// A request of float32 or bfloat16 logits with dense labels or class ids; class weights
    /// send it down the kernel's general path.
    fn request(id: &str, dtype: DType, sparse: bool, weighted: bool) -> proto::EvaluateRequest {
        let shape = [ROWS, CLASSES];
        let x: Vec<f32> = (0..ROWS * CLASSES)
            .map(|k| ((k * 7919) % 1013) as f32 / 101.0 - 5.0)
            .collect();
        let ids: Vec<i32> = (0..ROWS).map(|r| (r * 31 % CLASSES) as i32).collect();
        let mut y = vec![0.0f32; ROWS * CLASSES];
        for (r, &t) in ids.iter().enumerate() {
            y[r * CLASSES + t as usize] = 1.0;
        }
        let float = |v: Vec<f32>| match dtype {
            DType::BF16 => encode(&shape, v.into_iter().map(bf16::from_f32).collect(), true),
            _ => encode(&shape, v, true),
        };
        proto::EvaluateRequest {
            request_id: id.into(),
            loss: if sparse {
                proto::LossKind::SparseSoftmaxCrossEntropy
            } else {
                proto::LossKind::SoftmaxCrossEntropy
            } as i32,
            logits: Some(float(x)),
            labels: Some(if sparse {
                encode(&[ROWS], ids, true)
            } else {
                float(y)
            }),
            label_smoothing: 0.1,
            class_weights: weighted.then(|| encode(&[CLASSES], vec![1.0f32; CLASSES], true)),
            ..Default::default()
        }
    }

    /// The request as the server receives it: decoded from one buffer, so each `raw_data` is a
    /// slice of that buffer at whatever offset the protobuf framing gives it.
    fn received(req: &proto::EvaluateRequest) -> Evaluation {
        let frame = Bytes::from(req.encode_to_vec());
        crate::api::decode(proto::EvaluateRequest::decode(frame).unwrap()).unwrap()
    }

    /// Whether the logits reached the kernel as unaligned bytes.
    fn unaligned_logits(ev: &Evaluation) -> bool {
        match &ev.tensors {
            Tensors::F32(t) => matches!(t.logits.data.elems(), Elems::Le(_)),
            Tensors::BF16(t) => matches!(t.logits.data.elems(), Elems::Le(_)),
            _ => unreachable!("float32 and bfloat16 only"),
        }
    }

    /// Request ids of 0 to 3 bytes move the tensors through every offset modulo 4: on the fast
    /// path, unaligned logits and dense labels are read where they were received, with no
    /// full-size copy (only unaligned class ids, one per row, are copied), and give the bits
    /// of aligned ones. The general path copies them, once per call.
    #[test]
    fn unaligned_raw_tensors_reach_the_fast_path_without_a_copy() {
        let fast = kernel::simd::Level::current() != kernel::simd::Level::General;
        for dtype in [DType::F32, DType::BF16] {
            for sparse in [false, true] {
                for weighted in [false, true] {
                    // Encoded tensors are aligned `Vec`s, read in place.
                    let direct = crate::api::decode(request("", dtype, sparse, weighted));
                    let direct = direct.unwrap();
                    assert!(!unaligned_logits(&direct));
                    let aligned = evaluate(&direct);
                    let mut unaligned_seen = 0;
                    for id in ["", "a", "ab", "abc"] {
                        let ev = received(&request(id, dtype, sparse, weighted));
                        unaligned_seen += usize::from(unaligned_logits(&ev));
                        let before = copies::bytes();
                        let got = evaluate(&ev);
                        let copied = copies::bytes() - before;
                        let what = format!("{dtype} sparse {sparse} weighted {weighted} id {id:?}");
                        // (Not `assert_eq!`: the outputs are too long to print.)
                        assert!(got.as_ref().unwrap() == aligned.as_ref().unwrap(), "{what}");
                        let tensor = ROWS * CLASSES * dtype.size();
                        if fast && !weighted {
                            assert!(copied <= ROWS * 4, "{what}: {copied} bytes copied");
                        } else if unaligned_logits(&ev) {
                            assert!(copied >= tensor, "{what}: {copied} bytes copied");
                        }
                    }
                    let want = if dtype == DType::F32 { 3 } else { 2 };
                    assert_eq!(unaligned_seen, want, "{dtype} sparse {sparse}");
                }
            }
        }
    }
}
