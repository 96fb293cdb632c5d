//! One call of any protocol, from its decoded request to its answer: its `rpc` span, its
//! counts and timings in the metrics, its log line. xent.v1's `Evaluate` and
//! `EvaluateStream` and the Open Inference Protocol's `ModelInfer` differ only in how they
//! decode a request and encode an answer; everything an operator sees of a call is done here,
//! once, the same way for each.

use std::time::Instant;

use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use tracing::{Instrument, field};

use super::message_size::{AnswerRoom, answer_bytes_at_least};
use crate::batcher::Batcher;
use crate::error::Error;
use crate::eval::{Evaluated, Evaluation};
use crate::metrics as m;

/// The span of one call; its trace continues the caller's when `metadata` carries one.
pub(super) fn rpc_span(
    method: &'static str,
    request_id: &str,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    let span = tracing::info_span!(
        "rpc",
        method,
        // Bounded and escaped: the span is made before the id's length is checked, and a
        // newline in it would forge a log line.
        request_id = %crate::echo::Id(request_id),
        loss = field::Empty,
        dtype = field::Empty,
        shape = field::Empty,
        rows = field::Empty,
        code = field::Empty,
        queue_wait_ms = field::Empty,
        compute_ms = field::Empty,
    );
    crate::telemetry::continue_trace(&span, metadata);
    span
}

/// Where a call goes and what is known of it before it is decoded.
pub(super) struct Call {
    /// The batcher that computes it.
    pub batcher: Batcher,
    /// The RPC, as metrics and spans label it.
    pub method: &'static str,
    /// Its `rpc` span.
    pub span: tracing::Span,
    /// Protobuf-encoded size of the request.
    pub received_bytes: usize,
    /// When it arrived.
    pub arrived: Instant,
    /// When it must be answered by.
    pub deadline: Instant,
    /// How large its answer may be.
    pub room: AnswerRoom,
}

impl Call {
    /// Runs the call: `decode` validates the request (into the evaluation and whatever
    /// `encode` needs from it), the batcher computes it, and `encode` turns the computed
    /// outputs into the protocol's answer, on the compute pool. Counted, timed and logged
    /// once, inside the `rpc` span.
    pub(super) async fn run<C, R>(
        self,
        decode: impl FnOnce() -> Result<(Evaluation, C), Error>,
        encode: impl FnOnce(C, &Evaluation, Evaluated) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error>
    where
        C: Send + 'static,
        R: prost::Message + Send + 'static,
    {
        let Call {
            batcher,
            method,
            span,
            received_bytes,
            arrived,
            deadline,
            room,
        } = self;
        let _in_flight = InFlight::enter();
        // Counts the call as CANCELLED if the client goes away and this future is dropped.
        let mut record = CallRecord {
            method,
            arrived,
            done: false,
        };
        metrics::counter!(m::RECEIVED_BYTES).increment(received_bytes as u64);
        let work = async {
            let (ev, context) = tracing::debug_span!("decode").in_scope(decode)?;
            let span = tracing::Span::current();
            span.record("loss", ev.kind.name());
            span.record("dtype", ev.tensors.dtype().name());
            span.record("shape", field::debug(&ev.shape));
            span.record("rows", ev.layout.rows());
            metrics::histogram!(m::REQUEST_ROWS).record(ev.layout.rows() as f64);
            // Refused before computing when its data alone cannot be sent.
            room.check(answer_bytes_at_least(&ev), false)?;
            let answer = batcher
                .submit(ev, arrived, deadline, move |ev, out| {
                    encode(context, ev, out)
                })
                .await?;
            room.check(answer.encoded_len(), true)?;
            Ok(answer)
        }
        .instrument(span.clone());
        // The backstop: a panic anywhere in the call (a bug; every input is meant to be
        // refused before it can cause one) answers this call INTERNAL and is counted as such,
        // instead of unwinding into the transport, which would reset the stream (an
        // `EvaluateStream` with every answer after it) and count a client cancellation.
        let result = match AssertUnwindSafe(work).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => {
                metrics::counter!(m::PANICS, "method" => method).increment(1);
                let what = crate::echo::message(&panic_message(&panic));
                span.in_scope(
                    || tracing::error!(panic = %what, "a call panicked; answered INTERNAL"),
                );
                Err(Error::Internal(
                    "the server failed on this request (a bug, logged); the server keeps serving"
                        .into(),
                ))
            }
        };
        let code = result
            .as_ref()
            .map_or_else(Error::code, |_| tonic::Code::Ok);
        span.record("code", m::code_label(code));
        record.finish(code);
        if let Ok(resp) = &result {
            metrics::counter!(m::SENT_BYTES).increment(resp.encoded_len() as u64);
        }
        span.in_scope(|| match &result {
            Ok(_) => tracing::debug!("evaluated"),
            // Shed calls come in floods when a replica is overloaded: rate-limited.
            Err(e @ Error::Unavailable { .. }) => {
                if let Some(suppressed) = SHED_LOG.admit() {
                    tracing::info!(error = %e.message(), suppressed, "refused");
                }
            }
            Err(e) => tracing::info!(error = %e.message(), "refused"),
        });
        result
    }
}

/// The log lines of calls shed with UNAVAILABLE.
static SHED_LOG: crate::telemetry::LogLimit = crate::telemetry::LogLimit::new();

/// Records a call in [`m::CALLS`] and [`m::CALL_DURATION`] once: with its code when it is
/// answered, or as CANCELLED when its future is dropped first (the client went away).
struct CallRecord {
    method: &'static str,
    arrived: Instant,
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: tonic::Code) {
        self.done = true;
        count_call(self.method, self.arrived, code);
    }
}

/// Counts a call of `method` that `arrived`, answered with `code`.
pub(super) fn count_call(method: &'static str, arrived: Instant, code: tonic::Code) {
    metrics::counter!(m::CALLS, "method" => method, "code" => m::code_label(code)).increment(1);
    metrics::histogram!(m::CALL_DURATION, "method" => method)
        .record(arrived.elapsed().as_secs_f64());
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        if !self.done {
            self.finish(tonic::Code::Cancelled);
        }
    }
}

/// Counts a call in [`m::IN_FLIGHT`] for as long as it lives.
struct InFlight;

impl InFlight {
    fn enter() -> InFlight {
        metrics::gauge!(m::IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(m::IN_FLIGHT).decrement(1.0);
    }
}

/// What a panic said, if it said it as a string.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with no message".into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::compute::ComputePool;
    use crate::proto::EvaluateResponse;

    fn call(batcher: &Batcher) -> Call {
        Call {
            batcher: batcher.clone(),
            method: "Evaluate",
            span: tracing::Span::none(),
            received_bytes: 0,
            arrived: Instant::now(),
            deadline: Instant::now() + Duration::from_secs(10),
            room: AnswerRoom {
                bytes: 1 << 20,
                in_stream: false,
            },
        }
    }

    /// A panic while a call is decoded or encoded is that call's INTERNAL answer, and the
    /// calls after it are served as before.
    #[tokio::test]
    async fn a_panic_is_answered_internal_and_the_next_call_is_served() {
        let settings = crate::config::Settings::default();
        let batcher = Batcher::start(ComputePool::new(1).unwrap(), settings.batcher, None);
        let decode_panics = call(&batcher)
            .run(
                || -> Result<(Evaluation, ()), Error> { panic!("decoding failed") },
                |(), _, _| -> Result<EvaluateResponse, Error> { unreachable!() },
            )
            .await;
        let e = decode_panics.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e}");
        let request = || crate::compute::warm_up_request().map(|ev| (ev, ()));
        let encode_panics = call(&batcher)
            .run(request, |(), _, _| -> Result<EvaluateResponse, Error> {
                panic!("encoding failed")
            })
            .await;
        assert_eq!(encode_panics.unwrap_err().code(), tonic::Code::Internal);
        let fine = call(&batcher)
            .run(request, |(), ev, out| crate::api::response(ev, out))
            .await;
        assert!(fine.is_ok(), "{fine:?}");
    }
}
