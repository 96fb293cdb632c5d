//! `inference.GRPCInferenceService`, the KServe v2 Open Inference Protocol, beside xent.v1 on
//! the same port, so inference-server clients (tritonclient, KServe's) call xentd unmodified.
//!
//! The handlers are as thin as xent.v1's: `ModelInfer` and each request of `ModelStreamInfer`
//! are translated by [`api::oip`] into the same validated evaluation and go through the same
//! batcher, compute pool, metrics (methods `ModelInfer`, `ModelStreamInfer`) and spans; a
//! stream answers its requests in order, up to `--stream-concurrency` at once, like xent.v1's
//! `EvaluateStream`, and a refused request is answered in the stream (`error_message`) without
//! ending it. `ModelConfig` is read from the batcher's settings and `ModelStatistics` from its
//! counts. Readiness is not tracked twice: `ServerReady` and `ModelReady` ask the grpc.health
//! service for its answer about this service, which turns SERVING after the warm-up and
//! NOT_SERVING again on shutdown. The RPCs of the protocol that xentd does not serve answer
//! UNIMPLEMENTED saying what xentd does instead.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

use super::arrival::arrived;
use super::call::{Call, MODEL_INFER, MODEL_STREAM_INFER, Rpc, rpc_span};
use super::deadline::deadline;
use super::message_size::AnswerRoom;
use crate::api::oip;
use crate::batcher::Batcher;
use crate::error::Error;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceService;
use crate::proto::inference::{self as pb};
use crate::proto::inference::{
    ModelConfigRequest, ModelConfigResponse, ModelInferRequest, ModelInferResponse,
    ModelMetadataRequest, ModelMetadataResponse, ModelReadyRequest, ModelReadyResponse,
    ModelStatisticsRequest, ModelStatisticsResponse, ModelStreamInferResponse, ServerLiveRequest,
    ServerLiveResponse, ServerMetadataRequest, ServerMetadataResponse, ServerReadyRequest,
    ServerReadyResponse,
};

/// The name health reports this service under.
pub const SERVICE_NAME: &str = "inference.GRPCInferenceService";

/// What `ServerMetadata` reports as the server's name.
pub const SERVER_NAME: &str = "xentd";

/// The protocol extensions `ServerMetadata` lists, by Triton's names: `ModelConfig`
/// (`model_configuration`), the request parameters `priority` and `timeout`
/// (`schedule_policy`) and `ModelStatistics` (`statistics`; perf_analyzer reads server-side
/// statistics only from a server that lists it).
pub const EXTENSIONS: [&str; 3] = ["model_configuration", "schedule_policy", "statistics"];

/// Handlers of `inference.GRPCInferenceService`.
#[derive(Clone)]
pub struct OipService {
    batcher: Batcher,
    stream_concurrency: usize,
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
    /// A service queueing work on `batcher` (up to `stream_concurrency` requests of a stream
    /// at once), sending answers of at most `max_message_bytes` and reporting the readiness
    /// `health` reports.
    pub fn new(
        batcher: Batcher,
        stream_concurrency: usize,
        default_timeout: Duration,
        max_message_bytes: usize,
        health: HealthService,
    ) -> OipService {
        OipService {
            batcher,
            stream_concurrency,
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

/// Runs one request of either inference RPC as a [`Call`].
async fn infer(
    batcher: Batcher,
    rpc: Rpc,
    span: tracing::Span,
    req: ModelInferRequest,
    arrived: Instant,
    deadline: Instant,
    room: AnswerRoom,
) -> Result<ModelInferResponse, Error> {
    let call = Call {
        batcher,
        rpc,
        span,
        received_bytes: req.encoded_len(),
        arrived,
        deadline,
        room,
    };
    call.run(|| oip::decode(req), oip::response).await
}

/// The answer of an RPC xentd does not serve.
fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Error::Unimplemented(what.into()).into())
}

const NO_REPOSITORY: &str = "xentd has no model repository: its two models, softmax_cross_entropy and sparse_softmax_cross_entropy, are built in and always loaded";
const NO_SHARED_MEMORY: &str = "xentd does not read or write shared memory: send tensors in the request (raw_input_contents or typed contents) and read them from the response";
const NO_TRACE_SETTING: &str = "xentd's tracing is set when it starts (--otlp-endpoint, W3C traceparent on each call), not through TraceSetting";
const NO_LOG_SETTINGS: &str = "xentd's logging is set when it starts (--log or RUST_LOG, --log-format), not through LogSettings";

type StreamAnswers = Pin<Box<dyn Stream<Item = Result<ModelStreamInferResponse, Status>> + Send>>;

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
            extensions: EXTENSIONS.iter().map(|&e| e.into()).collect(),
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
        let room = AnswerRoom {
            bytes: self.max_message_bytes,
            in_stream: false,
        };
        let out = infer(
            self.batcher.clone(),
            MODEL_INFER,
            span,
            request.into_inner(),
            arrived,
            deadline,
            room,
        )
        .await?;
        Ok(Response::new(out))
    }

    type ModelStreamInferStream = StreamAnswers;

    async fn model_stream_infer(
        &self,
        request: Request<Streaming<ModelInferRequest>>,
    ) -> Result<Response<Self::ModelStreamInferStream>, Status> {
        let batcher = self.batcher.clone();
        let per_request = self.default_timeout;
        let max_message = self.max_message_bytes;
        // The stream's trace context (if any) is the parent of every request's span.
        let metadata = request.metadata().clone();
        let answers = request
            .into_inner()
            .map(move |item| {
                let batcher = batcher.clone();
                let metadata = metadata.clone();
                async move {
                    let req = item?;
                    let (id, model_name) = (req.id.clone(), req.model_name.clone());
                    // Each request of a stream arrives when it is received.
                    let now = Instant::now();
                    let span = rpc_span(MODEL_STREAM_INFER, &id, &metadata);
                    let room = AnswerRoom {
                        bytes: max_message,
                        in_stream: true,
                    };
                    let answer = infer(
                        batcher,
                        MODEL_STREAM_INFER,
                        span,
                        req,
                        now,
                        now + per_request,
                        room,
                    )
                    .await;
                    Ok(match answer {
                        Ok(resp) => ModelStreamInferResponse {
                            error_message: String::new(),
                            infer_response: Some(resp),
                        },
                        // The request's id and model come back with its error, so a client
                        // with several requests in flight knows which one failed.
                        Err(e) => ModelStreamInferResponse {
                            error_message: e.into_status().message().to_string(),
                            infer_response: Some(ModelInferResponse {
                                model_name,
                                id,
                                ..Default::default()
                            }),
                        },
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

    async fn model_config(
        &self,
        request: Request<ModelConfigRequest>,
    ) -> Result<Response<ModelConfigResponse>, Status> {
        let r = request.get_ref();
        let model = oip::model(&r.name, &r.version)?;
        Ok(Response::new(ModelConfigResponse {
            config: Some(oip::config(model, self.batcher.settings())),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<ModelStatisticsRequest>,
    ) -> Result<Response<ModelStatisticsResponse>, Status> {
        let r = request.get_ref();
        // No name: every model (a version alone names none).
        let models = if r.name.is_empty() {
            oip::MODELS.to_vec()
        } else {
            vec![oip::model(&r.name, &r.version)?]
        };
        let stats = self.batcher.stats();
        Ok(Response::new(ModelStatisticsResponse {
            model_stats: models
                .into_iter()
                .map(|m| oip::statistics(m, stats.model(m)))
                .collect(),
        }))
    }

    async fn repository_index(
        &self,
        _: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        unimplemented(NO_REPOSITORY)
    }

    async fn repository_model_load(
        &self,
        _: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        unimplemented(NO_REPOSITORY)
    }

    async fn repository_model_unload(
        &self,
        _: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        unimplemented(NO_REPOSITORY)
    }

    async fn system_shared_memory_status(
        &self,
        _: Request<pb::SystemSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryStatusResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn system_shared_memory_register(
        &self,
        _: Request<pb::SystemSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryRegisterResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn system_shared_memory_unregister(
        &self,
        _: Request<pb::SystemSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::SystemSharedMemoryUnregisterResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn cuda_shared_memory_status(
        &self,
        _: Request<pb::CudaSharedMemoryStatusRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryStatusResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn cuda_shared_memory_register(
        &self,
        _: Request<pb::CudaSharedMemoryRegisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryRegisterResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn cuda_shared_memory_unregister(
        &self,
        _: Request<pb::CudaSharedMemoryUnregisterRequest>,
    ) -> Result<Response<pb::CudaSharedMemoryUnregisterResponse>, Status> {
        unimplemented(NO_SHARED_MEMORY)
    }

    async fn trace_setting(
        &self,
        _: Request<pb::TraceSettingRequest>,
    ) -> Result<Response<pb::TraceSettingResponse>, Status> {
        unimplemented(NO_TRACE_SETTING)
    }

    async fn log_settings(
        &self,
        _: Request<pb::LogSettingsRequest>,
    ) -> Result<Response<pb::LogSettingsResponse>, Status> {
        unimplemented(NO_LOG_SETTINGS)
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
            settings.stream_concurrency,
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
