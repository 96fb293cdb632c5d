//! One call of any protocol, from its decoded request to its answer: its `rpc` span, its
//! counts and timings in the metrics, its log line. xent.v1's `Evaluate` and
//! `EvaluateStream` and the Open Inference Protocol's `ModelInfer` differ only in how they
//! decode a request and encode an answer; everything an operator sees of a call is done here,
//! once, the same way for each.

use std::time::Instant;

use tracing::{Instrument, field};

use super::message_size::{AnswerRoom, answer_bytes_at_least};
use crate::batcher::{Batcher, Schedule};
use crate::error::Error;
use crate::eval::{Evaluated, Evaluation, LossKind};
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
        request_id = %request_id,
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
            model: None,
            batcher: batcher.clone(),
            done: false,
        };
        metrics::counter!(m::RECEIVED_BYTES).increment(received_bytes as u64);
        let model = &mut record.model;
        let result = async {
            let started = Instant::now();
            let (ev, schedule, context) = tracing::debug_span!("decode").in_scope(decode)?;
            batcher.stats().validated(ev.kind, started.elapsed());
            *model = Some((ev.kind, ev.layout.rows()));
            let span = tracing::Span::current();
            span.record("loss", ev.kind.name());
            span.record("dtype", ev.tensors.dtype().name());
            span.record("shape", field::debug(&ev.shape));
            span.record("rows", ev.layout.rows());
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
        .instrument(span.clone())
        .await;
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
            Err(e) => tracing::info!(error = %e, "refused"),
        });
        result
    }
}

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
