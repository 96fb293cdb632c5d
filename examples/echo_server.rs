//! The transport ceiling for service benchmarks: `xent.v1.Xent` on the same tonic stack and
//! message limits as xentd, answering each request with as many bytes as a real answer has
//! (the logits' bytes as `grad_logits`, zeros as `loss`) without computing anything, with
//! xentd's allocator.
//!
//! `cargo run --release --example echo_server -- 127.0.0.1:50052`

use std::pin::Pin;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use xent::config::Settings;
use xent::proto::xent_server::{Xent, XentServer};
use xent::proto::{self, EvaluateRequest, EvaluateResponse};

/// The allocator xentd uses, so the ceiling differs from xentd only in the work it skips.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy)]
struct Echo;

fn echo(req: EvaluateRequest) -> Result<EvaluateResponse, Status> {
    let logits = req
        .logits
        .ok_or_else(|| Status::invalid_argument("logits is required"))?;
    let dtype = xent::api::tensor::dtype_from_proto(logits.dtype)
        .ok_or_else(|| Status::invalid_argument("logits has no valid dtype"))?;
    let rows: i64 = logits.shape.iter().rev().skip(1).product();
    let loss = proto::Tensor {
        dtype: logits.dtype,
        shape: vec![rows],
        raw_data: vec![0u8; rows as usize * dtype.size()].into(),
        ..Default::default()
    };
    Ok(EvaluateResponse {
        request_id: req.request_id,
        loss: Some(loss),
        grad_logits: Some(logits),
        grad_labels: None,
        health: Some(Default::default()),
    })
}

#[tonic::async_trait]
impl Xent for Echo {
    async fn evaluate(
        &self,
        request: Request<EvaluateRequest>,
    ) -> Result<Response<EvaluateResponse>, Status> {
        echo(request.into_inner()).map(Response::new)
    }

    type EvaluateStreamStream =
        Pin<Box<dyn Stream<Item = Result<proto::EvaluateStreamResponse, Status>> + Send>>;

    async fn evaluate_stream(
        &self,
        request: Request<Streaming<EvaluateRequest>>,
    ) -> Result<Response<Self::EvaluateStreamStream>, Status> {
        let out = request.into_inner().map(|item| {
            let resp = echo(item?)?;
            Ok(proto::EvaluateStreamResponse {
                request_id: resp.request_id.clone(),
                result: Some(proto::evaluate_stream_response::Result::Response(resp)),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:50052".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let settings = Settings::default();
    let service = XentServer::new(Echo)
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes);
    let routes = tonic::service::Routes::new(service).prepare();
    xent::server::transport::serve(
        listener,
        routes,
        Default::default(),
        xent::server::method_kinds()?,
        &settings.transport,
        std::future::pending::<()>(),
    )
    .await;
    Ok(())
}
