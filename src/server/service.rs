//! The `xent.v1.Xent` service: thin handlers that validate each request, give it to the
//! batcher with its deadline, and map errors to status in one place.

use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, field};

use super::arrival::arrived;
use super::deadline::deadline;
use crate::api;
use crate::batcher::Batcher;
use crate::error::Error;
use crate::proto;
use crate::proto::xent_server::Xent;

/// Handlers of `xent.v1.Xent`.
#[derive(Clone, Debug)]
pub struct XentService {
    batcher: Batcher,
    stream_concurrency: usize,
    default_timeout: Duration,
}

impl XentService {
    /// A service queueing work on `batcher`.
    pub fn new(
        batcher: Batcher,
        stream_concurrency: usize,
        default_timeout: Duration,
    ) -> XentService {
        XentService {
            batcher,
            stream_concurrency,
            default_timeout,
        }
    }

    /// Validates one request and waits for its answer, inside a span that records it.
    async fn evaluate_one(
        batcher: Batcher,
        method: &'static str,
        req: proto::EvaluateRequest,
        arrived: Instant,
        deadline: Instant,
    ) -> Result<proto::EvaluateResponse, Error> {
        let span = tracing::info_span!(
            "rpc",
            method,
            request_id = %req.request_id,
            loss = field::Empty,
            dtype = field::Empty,
            shape = field::Empty,
            code = field::Empty,
        );
        let result = async {
            let ev = api::decode(req)?;
            let span = tracing::Span::current();
            span.record("loss", ev.kind.name());
            span.record("dtype", ev.tensors.dtype().name());
            span.record("shape", field::debug(&ev.shape));
            batcher.submit(ev, arrived, deadline).await
        }
        .instrument(span.clone())
        .await;
        span.record("code", result.as_ref().map_or_else(Error::kind, |_| "ok"));
        span.in_scope(|| match &result {
            Ok(_) => tracing::debug!("evaluated"),
            Err(e) => tracing::info!(error = %e, "refused"),
        });
        result
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
        let out = Self::evaluate_one(
            self.batcher.clone(),
            "Evaluate",
            request.into_inner(),
            arrived,
            deadline,
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
        let inbound = request.into_inner();
        let answers = inbound
            .map(move |item| {
                let batcher = batcher.clone();
                async move {
                    let req = item?;
                    let id = req.request_id.clone();
                    // Each request of a stream arrives when it is received.
                    let now = Instant::now();
                    let result = match Self::evaluate_one(
                        batcher,
                        "EvaluateStream",
                        req,
                        now,
                        now + per_request,
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
