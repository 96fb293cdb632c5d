//! One call of any protocol, from its decoded request to its answer: its `rpc` span, its
//! counts and timings in the metrics, its log line. xent.v1's `Evaluate` and
//! `EvaluateStream` and the Open Inference Protocol's `ModelInfer` differ only in how they
//! decode a request and encode an answer; everything an operator sees of a call is done here,
//! once, the same way for each.

use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures::FutureExt as _;
use tracing::{Instrument, field};

use super::message_size::{AnswerRoom, answer_bytes_at_least};
use crate::batcher::{Batcher, Schedule};
use crate::error::Error;
use crate::eval::{Evaluated, Evaluation, LossKind};
use crate::metrics as m;

/// One RPC as metrics, logs and traces name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Rpc {
    /// The fully qualified gRPC service, e.g. `xent.v1.Xent` (`rpc.service`).
    pub service: &'static str,
    /// The method, e.g. `Evaluate`: the `method` label of metrics and field of the span, and
    /// `rpc.method`.
    pub method: &'static str,
    /// `service/method`, the span's name in OpenTelemetry (the RPC conventions' name).
    pub path: &'static str,
}

/// xent.v1's unary call.
pub(super) const EVALUATE: Rpc = Rpc {
    service: "xent.v1.Xent",
    method: "Evaluate",
    path: "xent.v1.Xent/Evaluate",
};
/// xent.v1's bidirectional stream (one span per request of the stream).
pub(super) const EVALUATE_STREAM: Rpc = Rpc {
    service: "xent.v1.Xent",
    method: "EvaluateStream",
    path: "xent.v1.Xent/EvaluateStream",
};
/// The Open Inference Protocol's inference call.
pub(super) const MODEL_INFER: Rpc = Rpc {
    service: "inference.GRPCInferenceService",
    method: "ModelInfer",
    path: "inference.GRPCInferenceService/ModelInfer",
};
/// The Open Inference Protocol's bidirectional stream (one span per request of the stream).
pub(super) const MODEL_STREAM_INFER: Rpc = Rpc {
    service: "inference.GRPCInferenceService",
    method: "ModelStreamInfer",
    path: "inference.GRPCInferenceService/ModelStreamInfer",
};

/// The `rpc` span with today's fields, and `$($otel)*` before them.
macro_rules! rpc_span {
    ($rpc:expr, $request_id:expr, $($otel:tt)*) => {
        tracing::info_span!(
            "rpc",
            $($otel)*
            method = $rpc.method,
            // Bounded and escaped: the span is made before the id's length is checked, and a
            // newline in it would forge a log line.
            request_id = %crate::echo::Id($request_id),
            loss = field::Empty,
            dtype = field::Empty,
            shape = field::Empty,
            rows = field::Empty,
            code = field::Empty,
            queue_wait_ms = field::Empty,
            compute_ms = field::Empty,
        )
    };
}

/// The span of one call; its trace continues the caller's when `metadata` carries one.
///
/// When spans are exported it is also an OpenTelemetry SERVER span named after the method's
/// path and carrying the RPC semantic conventions (`rpc.system`, `rpc.service`, `rpc.method`,
/// and `rpc.grpc.status_code` once answered, set by [`record_code`]), which tracing back
/// ends use to draw service graphs and derive call metrics. Without export those fields
/// would only be noise in the logs and cost on every call, so the span is then the plain one.
pub(super) fn rpc_span(
    rpc: Rpc,
    request_id: &str,
    metadata: &tonic::metadata::MetadataMap,
) -> tracing::Span {
    if !crate::telemetry::exporting() {
        return rpc_span!(rpc, request_id,);
    }
    let span = rpc_span!(
        rpc,
        request_id,
        otel.name = rpc.path,
        otel.kind = "server",
        otel.status_code = field::Empty,
        rpc.system = "grpc",
        rpc.service = rpc.service,
        rpc.method = rpc.method,
        rpc.grpc.status_code = field::Empty,
    );
    crate::telemetry::continue_trace(&span, metadata);
    span
}

/// Whether a server span answered with `code` is an error in OpenTelemetry's gRPC
/// conventions: only the codes that say the server failed. A refused request (an invalid
/// argument, a deadline the client set too short to meet) is the caller's doing; its span
/// status stays unset.
fn is_server_error(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(
        code,
        Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss
    )
}

/// Records the answer's `code` on a call's span: `code` (the label), and, on an exported
/// span, `rpc.grpc.status_code` (the number) and the OpenTelemetry status. Recording a field
/// a span lacks does nothing.
pub(super) fn record_code(span: &tracing::Span, code: tonic::Code) {
    span.record("code", m::code_label(code));
    if crate::telemetry::exporting() {
        span.record("rpc.grpc.status_code", code as i64);
        if is_server_error(code) {
            span.record("otel.status_code", "error");
        }
    }
}

/// Where a call goes and what is known of it before it is decoded.
pub(super) struct Call {
    /// The batcher that computes it.
    pub batcher: Batcher,
    /// The RPC, as metrics and spans label it.
    pub rpc: Rpc,
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
    /// Runs the call: `decode` validates the request (into the evaluation, how it waits in
    /// the queue and whatever `encode` needs from it), the batcher computes it, and `encode`
    /// turns the computed outputs into the protocol's answer, on the compute pool. Counted,
    /// timed and logged once, inside the `rpc` span.
    pub(super) async fn run<C, R>(
        self,
        decode: impl FnOnce() -> Result<(Evaluation, Schedule, C), Error>,
        encode: impl FnOnce(C, &Evaluation, Evaluated) -> Result<R, Error> + Send + 'static,
    ) -> Result<R, Error>
    where
        C: Send + 'static,
        R: prost::Message + Send + 'static,
    {
        let Call {
            batcher,
            rpc,
            span,
            received_bytes,
            arrived,
            deadline,
            room,
        } = self;
        let _in_flight = InFlight::enter();
        // Counts the call as CANCELLED if the client goes away and this future is dropped.
        let mut record = CallRecord {
            method: rpc.method,
            arrived,
            model: None,
            batcher: batcher.clone(),
            done: false,
        };
        metrics::counter!(m::RECEIVED_BYTES).increment(received_bytes as u64);
        let model = &mut record.model;
        let work = async {
            let started = Instant::now();
            let (ev, schedule, context) = tracing::debug_span!("decode").in_scope(decode)?;
            batcher.stats().validated(ev.kind, started.elapsed());
            *model = Some((ev.kind, ev.layout.rows()));
            let span = tracing::Span::current();
            span.record("loss", ev.kind.name());
            span.record("dtype", ev.tensors.dtype().name());
            span.record("shape", field::debug(&ev.shape));
            // As i64: an exported span then carries an integer (a u64 is exported as text).
            span.record("rows", ev.layout.rows() as i64);
            metrics::histogram!(m::REQUEST_ROWS).record(ev.layout.rows() as f64);
            // Refused before computing when its data alone cannot be sent.
            room.check(answer_bytes_at_least(&ev), false)?;
            let answer = batcher
                .submit(ev, schedule, arrived, deadline, move |ev, out| {
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
                metrics::counter!(m::PANICS, "method" => rpc.method).increment(1);
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
        record_code(&span, code);
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

/// Records a call in [`m::CALLS`] and [`m::CALL_DURATION`] once, and in its model's
/// statistics once its model is known: with its code when it is answered, or as CANCELLED
/// when its future is dropped first (the client went away).
struct CallRecord {
    method: &'static str,
    arrived: Instant,
    /// Its model and rows, once decoded.
    model: Option<(LossKind, usize)>,
    batcher: Batcher,
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: tonic::Code) {
        self.done = true;
        let took = count_call(self.method, self.arrived, code);
        if let Some((kind, rows)) = self.model {
            self.batcher
                .stats()
                .answered(kind, rows, took, code == tonic::Code::Ok);
        }
    }
}

/// Counts a call of `method` that `arrived`, answered with `code`; the time it took.
pub(super) fn count_call(
    method: &'static str,
    arrived: Instant,
    code: tonic::Code,
) -> std::time::Duration {
    let took = arrived.elapsed();
    metrics::counter!(m::CALLS, "method" => method, "code" => m::code_label(code)).increment(1);
    metrics::histogram!(m::CALL_DURATION, "method" => method).record(took.as_secs_f64());
    took
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
    use super::*;

    #[test]
    fn every_rpc_is_named_as_the_protos_name_it() {
        for rpc in [EVALUATE, EVALUATE_STREAM, MODEL_INFER, MODEL_STREAM_INFER] {
            assert_eq!(rpc.path, format!("{}/{}", rpc.service, rpc.method));
            let path = format!("/{}", rpc.path);
            assert!(
                crate::proto::METHODS.contains(&(path.as_str(), rpc.method)),
                "{path} is an RPC of proto/"
            );
        }
    }

    #[test]
    fn only_the_servers_failures_are_span_errors() {
        assert!(is_server_error(tonic::Code::Internal));
        assert!(is_server_error(tonic::Code::Unavailable));
        assert!(is_server_error(tonic::Code::DeadlineExceeded));
        assert!(!is_server_error(tonic::Code::Ok));
        assert!(!is_server_error(tonic::Code::InvalidArgument));
        assert!(!is_server_error(tonic::Code::ResourceExhausted));
        assert!(!is_server_error(tonic::Code::Cancelled));
    }

    use std::time::Duration;

    use crate::compute::ComputePool;

    fn call(batcher: &Batcher) -> Call {
        Call {
            batcher: batcher.clone(),
            rpc: EVALUATE,
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
                || -> Result<(Evaluation, Schedule, ()), Error> { panic!("decoding failed") },
                |(), _, _| -> Result<prost_types::Duration, Error> { unreachable!() },
            )
            .await;
        let e = decode_panics.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal, "{e}");
        let request = || crate::compute::warm_up_request().map(|ev| (ev, Schedule::default(), ()));
        let encode_panics = call(&batcher)
            .run(
                request,
                |(), _, _| -> Result<prost_types::Duration, Error> { panic!("encoding failed") },
            )
            .await;
        assert_eq!(encode_panics.unwrap_err().code(), tonic::Code::Internal);
        let fine = call(&batcher)
            .run(request, |(), ev, out| crate::api::response(ev, out))
            .await;
        assert!(fine.is_ok(), "{fine:?}");
    }
}
