//! The `xent.v1.Xent` service: thin handlers that validate each request, give it to the
//! batcher with its deadline, and map errors to status in one place.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, field};

use super::arrival::arrived;
use super::deadline::deadline;
use super::message_size::{answer_bytes_at_least, check_answer};
use crate::api;
use crate::batcher::Batcher;
use crate::error::Error;
use crate::metrics as m;
use crate::proto;
use crate::proto::xent_server::Xent;

/// Handlers of `xent.v1.Xent`.
#[derive(Clone, Debug)]
pub struct XentService {
    batcher: Batcher,
    stream_concurrency: usize,
    default_timeout: Duration,
    max_message_bytes: usize,
}

impl XentService {
    /// A service queueing work on `batcher`, sending answers of at most `max_message_bytes`.
    pub fn new(
        batcher: Batcher,
        stream_concurrency: usize,
        default_timeout: Duration,
        max_message_bytes: usize,
    ) -> XentService {
        XentService {
            batcher,
            stream_concurrency,
            default_timeout,
            max_message_bytes,
        }
    }

    /// The span of one call; its trace continues the caller's when `metadata` carries one.
    fn rpc_span(
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

    /// Validates one request and waits for its answer, inside its `rpc` span. The answer must
    /// fit in `room`.
    async fn evaluate_one(
        batcher: Batcher,
        method: &'static str,
        span: tracing::Span,
        req: proto::EvaluateRequest,
        arrived: Instant,
        deadline: Instant,
        room: AnswerRoom,
    ) -> Result<proto::EvaluateResponse, Error> {
        let _in_flight = InFlight::enter();
        // Counts the call as CANCELLED if the client goes away and this future is dropped.
        let mut record = CallRecord {
            method,
            arrived,
            done: false,
        };
        metrics::counter!(m::RECEIVED_BYTES).increment(req.encoded_len() as u64);
        let result = async {
            let ev = tracing::info_span!("decode").in_scope(|| api::decode(req))?;
            let span = tracing::Span::current();
            span.record("loss", ev.kind.name());
            span.record("dtype", ev.tensors.dtype().name());
            span.record("shape", field::debug(&ev.shape));
            span.record("rows", ev.layout.rows());
            metrics::histogram!(m::REQUEST_ROWS).record(ev.layout.rows() as f64);
            // Refused before computing when its data alone cannot be sent.
            room.check(answer_bytes_at_least(&ev), false)?;
            let resp = batcher.submit(ev, arrived, deadline).await?;
            room.check(resp.encoded_len(), true)?;
            Ok(resp)
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

/// How large an answer may be: the message limit, less what the RPC wraps around it.
#[derive(Clone, Copy, Debug)]
struct AnswerRoom {
    /// The message limit, less the wrapper's fixed fields.
    bytes: usize,
    /// Whether the answer is wrapped in an `EvaluateStreamResponse` (as field 2, `response`).
    in_stream: bool,
}

impl AnswerRoom {
    /// Refuses an answer of `answer` bytes (at least, unless `computed`) that does not fit.
    fn check(self, answer: usize, computed: bool) -> Result<(), Error> {
        // A one-byte tag and the length as a varint.
        let wrapper = if self.in_stream {
            1 + prost::encoding::encoded_len_varint(answer as u64)
        } else {
            0
        };
        check_answer(answer + wrapper, self.bytes, computed)
    }
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

type ResponseStream =
    Pin<Box<dyn Stream<Item = Result<proto::EvaluateStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Xent for XentService {
    async fn evaluate(
        &self,
        request: Request<proto::EvaluateRequest>,
    ) -> Result<Response<proto::EvaluateResponse>, Status> {
        let arrived = arrived(&request);
        let deadline = deadline(request.metadata(), arrived, self.default_timeout);
        let span = Self::rpc_span(
            "Evaluate",
            &request.get_ref().request_id,
            request.metadata(),
        );
        let out = Self::evaluate_one(
            self.batcher.clone(),
            "Evaluate",
            span,
            request.into_inner(),
            arrived,
            deadline,
            AnswerRoom {
                bytes: self.max_message_bytes,
                in_stream: false,
            },
        )
        .await?;
        Ok(Response::new(out))
    }

    type EvaluateStreamStream = ResponseStream;

    async fn evaluate_stream(
        &self,
        request: Request<Streaming<proto::EvaluateRequest>>,
    ) -> Result<Response<Self::EvaluateStreamStream>, Status> {
        let batcher = self.batcher.clone();
        let per_request = self.default_timeout;
        let max_message = self.max_message_bytes;
        // The stream's trace context (if any) is the parent of every request's span.
        let metadata = request.metadata().clone();
        let inbound = request.into_inner();
        let answers = inbound
            .map(move |item| {
                let batcher = batcher.clone();
                let metadata = metadata.clone();
                async move {
                    let req = item?;
                    let id = req.request_id.clone();
                    // Each request of a stream arrives when it is received.
                    let now = Instant::now();
                    let span = Self::rpc_span("EvaluateStream", &id, &metadata);
                    // Field 1 (`request_id`) takes its share of the limit.
                    let room = AnswerRoom {
                        bytes: max_message.saturating_sub(if id.is_empty() {
                            0
                        } else {
                            prost::encoding::string::encoded_len(1, &id)
                        }),
                        in_stream: true,
                    };
                    let result = match Self::evaluate_one(
                        batcher,
                        "EvaluateStream",
                        span,
                        req,
                        now,
                        now + per_request,
                        room,
                    )
                    .await
                    {
                        Ok(resp) => proto::evaluate_stream_response::Result::Response(resp),
                        Err(e) => {
                            proto::evaluate_stream_response::Result::Error(proto::StreamError {
                                code: e.code() as i32,
                                field: e.field().unwrap_or_default().to_string(),
                                message: e.to_string(),
                            })
                        }
                    };
                    Ok(proto::EvaluateStreamResponse {
                        request_id: id,
                        result: Some(result),
                    })
                }
            })
            .buffered(self.stream_concurrency)
            // A transport error on the inbound side (e.g. an oversized message) ends the stream
            // with that status after the answers before it.
            .scan(false, |failed, item: Result<_, Status>| {
                let out = if *failed { None } else { Some(item) };
                if matches!(out, Some(Err(_))) {
                    *failed = true;
                }
                futures::future::ready(out)
            });
        Ok(Response::new(Box::pin(answers)))
    }
}
