//! The `xent.v1.Xent` service: thin handlers that move each request onto the compute pool
//! (decode, kernel, encode all run there) and map errors to status in one place.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, field};

use crate::api;
use crate::compute::{self, ComputePool};
use crate::error::Error;
use crate::proto;
use crate::proto::xent_server::Xent;

/// Handlers of `xent.v1.Xent`.
#[derive(Clone, Debug)]
pub struct XentService {
    pool: ComputePool,
    stream_concurrency: usize,
}

impl XentService {
    /// A service computing on `pool`, evaluating up to `stream_concurrency` requests of one
    /// stream at once.
    pub fn new(pool: ComputePool, stream_concurrency: usize) -> XentService {
        XentService {
            pool,
            stream_concurrency,
        }
    }

    /// Decode, compute and encode one request on the pool, inside a span that records it.
    async fn evaluate_one(
        pool: ComputePool,
        method: &'static str,
        req: proto::EvaluateRequest,
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
        let result = pool
            .run(move || {
                let ev = api::decode(req)?;
                let span = tracing::Span::current();
                span.record("loss", ev.kind.name());
                span.record("dtype", ev.tensors.dtype().name());
                span.record("shape", field::debug(&ev.shape));
                let out = compute::evaluate(&ev)?;
                Ok(api::response(&ev, out))
            })
            .instrument(span.clone())
            .await;
        let code = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind(),
        };
        span.record("code", code);
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
        let out = Self::evaluate_one(self.pool.clone(), "Evaluate", request.into_inner()).await?;
        Ok(Response::new(out))
    }

    type EvaluateStreamStream = ResponseStream;

    async fn evaluate_stream(
        &self,
        request: Request<Streaming<proto::EvaluateRequest>>,
    ) -> Result<Response<Self::EvaluateStreamStream>, Status> {
        let pool = self.pool.clone();
        let inbound = request.into_inner();
        let answers = inbound
            .map(move |item| {
                let pool = pool.clone();
                async move {
                    let req = item?;
                    let id = req.request_id.clone();
                    let result = match Self::evaluate_one(pool, "EvaluateStream", req).await {
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

/// Keeps the compiler honest that the service is shareable across connections.
const _: fn() = || {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    shareable::<XentService>();
    shareable::<Arc<XentService>>();
};
