//! `inference.GRPCInferenceService`, the KServe v2 Open Inference Protocol, beside xent.v1 on
//! the same port, so inference-server clients (tritonclient, KServe's) call xentd unmodified.
//!
//! The handlers are as thin as xent.v1's: `ModelInfer` is translated by [`api::oip`] into the
//! same validated evaluation and goes through the same batcher, compute pool, metrics (method
//! `ModelInfer`) and spans. Readiness is not tracked twice: `ServerReady` and `ModelReady` ask
//! the grpc.health service for its answer about this service, which turns SERVING after the
//! warm-up and NOT_SERVING again on shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message as _;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

use super::arrival::arrived;
use super::call::{Call, MODEL_INFER, rpc_span};
use super::deadline::deadline;
use super::message_size::AnswerRoom;
use crate::api::oip;
use crate::batcher::Batcher;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::{
    ModelInferRequest, ModelInferResponse, ModelMetadataRequest, ModelMetadataResponse,
    ModelReadyRequest, ModelReadyResponse, ServerLiveRequest, ServerLiveResponse,
    ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest, ServerReadyResponse,
};

/// The name health reports this service under.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// What `ServerMetadata` reports as the server's name.
pub const SERVER_NAME: &str = "xentd";

/// Handlers of `inference.GRPCInferenceService`.
#[derive(Clone)]
pub struct OipService {
    batcher: Batcher,
    default_timeout: Duration,
    max_message_bytes: usize,
    health: Arc<HealthService>,
}

impl std::fmt::Debug for OipService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OipService")
            .field("default_timeout", &self.default_timeout)
            .finish_non_exhaustive()
    }
}

impl OipService {
    /// A service queueing work on `batcher`, sending answers of at most `max_message_bytes`
    /// and reporting the readiness `health` reports.
    pub fn new(
        batcher: Batcher,
        default_timeout: Duration,
        max_message_bytes: usize,
        health: HealthService,
    ) -> OipService {
        OipService {
            batcher,
            default_timeout,
            max_message_bytes,
            health: Arc::new(health),
        }
    }

    /// Whether health says this service is SERVING (a service health has no status for yet
    /// is not).
    async fn ready(&self) -> bool {
        let answer = self
            .health
            .check(Request::new(tonic_health::pb::HealthCheckRequest {
                service: SERVICE_NAME.into(),
            }))
            .await;
        answer.is_ok_and(|a| a.into_inner().status == ServingStatus::Serving as i32)
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for OipService {
    async fn server_live(
        &self,
        _: Request<ServerLiveRequest>,
    ) -> Result<Response<ServerLiveResponse>, Status> {
        Ok(Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<ServerReadyRequest>,
    ) -> Result<Response<ServerReadyResponse>, Status> {
        let ready = self.ready().await;
        Ok(Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: Request<ModelReadyRequest>,
    ) -> Result<Response<ModelReadyResponse>, Status> {
        let r = request.get_ref();
        oip::model(&r.name, &r.version)?;
        let ready = self.ready().await;
        Ok(Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<ServerMetadataRequest>,
    ) -> Result<Response<ServerMetadataResponse>, Status> {
        Ok(Response::new(ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<ModelMetadataRequest>,
    ) -> Result<Response<ModelMetadataResponse>, Status> {
        let r = request.get_ref();
        let model = oip::model(&r.name, &r.version)?;
        Ok(Response::new(oip::metadata(model)))
    }

    async fn model_infer(
        &self,
        request: Request<ModelInferRequest>,
    ) -> Result<Response<ModelInferResponse>, Status> {
        let arrived: Instant = arrived(&request);
        let deadline = deadline(request.metadata(), arrived, self.default_timeout);
        let span = rpc_span(MODEL_INFER, &request.get_ref().id, request.metadata());
        let req = request.into_inner();
        let call = Call {
            batcher: self.batcher.clone(),
            rpc: MODEL_INFER,
            span,
            received_bytes: req.encoded_len(),
            arrived,
            deadline,
            room: AnswerRoom {
                bytes: self.max_message_bytes,
                in_stream: false,
            },
        };
        let out = call.run(|| oip::decode(req), oip::response).await?;
        Ok(Response::new(out))
    }
}

#[cfg(test)]
mod tests {
    use tonic_health::ServingStatus;
    use tonic_health::server::HealthReporter;

    use super::*;
    use crate::compute::ComputePool;
    use crate::config::Settings;

    #[tokio::test]
    async fn readiness_follows_health() {
        let settings = Settings::default();
        let batcher = Batcher::start(ComputePool::new(1).unwrap(), settings.batcher, None);
        let health = HealthReporter::new();
        let service = OipService::new(
            batcher,
            settings.default_timeout,
            settings.max_message_bytes,
            HealthService::from_health_reporter(health.clone()),
        );
        let ready = || async {
            let server = service
                .server_ready(Request::new(ServerReadyRequest {}))
                .await
                .unwrap()
                .into_inner()
                .ready;
            let model = service
                .model_ready(Request::new(ModelReadyRequest {
                    name: "softmax_cross_entropy".into(),
                    version: String::new(),
                }))
                .await
                .unwrap()
                .into_inner()
                .ready;
            assert_eq!(server, model);
            server
        };
        assert!(!ready().await, "not ready before health has a status");
        for (status, want) in [
            (ServingStatus::NotServing, false),
            (ServingStatus::Serving, true),
            (ServingStatus::NotServing, false),
        ] {
            health.set_service_status(SERVICE_NAME, status).await;
            assert_eq!(ready().await, want, "{status:?}");
        }
        let live = service
            .server_live(Request::new(ServerLiveRequest {}))
            .await;
        assert!(live.unwrap().into_inner().live, "live whatever health says");
    }
}
