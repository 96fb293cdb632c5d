//! The `xent.v1.Xent` service: thin handlers that validate each request, give it to the
//! batcher with its deadline, and map errors to status in one place.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use super::arrival::arrived;
use super::call::{Call, EVALUATE, EVALUATE_STREAM, Rpc, rpc_span};
use super::deadline::deadline;
use super::message_size::AnswerRoom;
use crate::api;
use crate::batcher::{Batcher, Schedule};
use crate::error::Error;
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

    /// Validates one request and waits for its answer, inside its `rpc` span. The answer must
    /// fit in `room`.
    async fn evaluate_one(
        batcher: Batcher,
        rpc: Rpc,
        span: tracing::Span,
        req: proto::EvaluateRequest,
        arrived: Instant,
        deadline: Instant,
        room: AnswerRoom,
    ) -> Result<proto::EvaluateResponse, Error> {
        let call = Call {
            batcher,
            rpc,
            span,
            received_bytes: req.encoded_len(),
            arrived,
            deadline,
            room,
        };
        call.run(
            || api::decode(req).map(|ev| (ev, Schedule::default(), ())),
            |(), ev, out| api::response(ev, out),
        )
        .await
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
        let span = rpc_span(EVALUATE, &request.get_ref().request_id, request.metadata());
        let out = Self::evaluate_one(
            self.batcher.clone(),
            EVALUATE,
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
                    // Echoed with the answer only when it is a valid id: an over-long one is
                    // refused, and its refusal is not made as long as it.
                    let id = if req.request_id.len() <= crate::eval::MAX_REQUEST_ID_BYTES {
                        req.request_id.clone()
                    } else {
                        String::new()
                    };
                    // Each request of a stream arrives when it is received.
                    let now = Instant::now();
                    let span = rpc_span(EVALUATE_STREAM, &id, &metadata);
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
                        EVALUATE_STREAM,
                        span,
                        req,
                        now,
                        now + per_request,
                        room,
                    )
                    .await
                    {
                        Ok(resp) => proto::evaluate_stream_response::Result::Response(resp),
                        Err(e) => proto::evaluate_stream_response::Result::Error(
                            api::convert::stream_error(e),
                        ),
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
