//! The gRPC server: `xent.v1.Xent`, the Open Inference Protocol's
//! `inference.GRPCInferenceService`, `grpc.health.v1.Health` and server reflection on one
//! port, with a warm-up before health says SERVING and a bounded graceful shutdown.
//!
//! [`Server::serve`] takes a bound listener and a shutdown future, so tests bind port 0 and
//! stop it at will, and the binary only adds signals. Shutdown drains: health turns
//! NOT_SERVING, the batcher refuses new calls with UNAVAILABLE, calls already accepted finish
//! within the grace period, then `serve` returns.

mod arrival;
pub mod auth;
mod call;
mod deadline;
mod framing;
mod gzip;
mod message_size;
mod oip;
pub mod reload;
mod service;
pub mod tls;
pub mod transport;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use deadline::parse_timeout;
#[doc(hidden)] // For the fuzz target of the message prefix scan (fuzz/).
pub use message_size::MessageSizeLayer;
pub use oip::OipService;
pub use service::XentService;
use transport::drain::{MethodKinds, Streams};
pub use transport::{DrainReport, TransportSettings, default_transit_budget};

use crate::batcher::Batcher;
use crate::compute::{self, ComputePool};
use crate::config::Settings;
use crate::error::Error;
use crate::proto;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::xent_server::XentServer;

/// The path prefix of grpc.health.v1's methods: health is served to late connections, whatever
/// the byte budget, and without a token.
pub(crate) const HEALTH_PATHS: &str = "/grpc.health.v1.Health/";

/// The name health reports the evaluation service under.
pub const SERVICE_NAME: &str = "xent.v1.Xent";

/// Serves on `listener` until `shutdown` completes, then lets the calls accepted finish for at
/// most `settings.shutdown_grace`, and reports what the drain did.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<DrainReport, Error> {
    Server::new(settings).await?.serve(listener, shutdown).await
}

/// A server whose compute pool and batcher are running, ready to serve.
#[derive(Debug)]
pub struct Server {
    settings: Settings,
    pool: ComputePool,
    batcher: Batcher,
    health: HealthReporter,
    streams: Arc<Streams>,
    /// The certificates and tokens, read at start and reloaded while serving.
    reloadable: reload::Reloadable,
}

impl Server {
    /// Starts the compute pool, the batcher and the warm-up; health is NOT_SERVING until the
    /// warm-up passes.
    pub async fn new(settings: Settings) -> Result<Server, Error> {
        // The files first: a bad one stops the server before anything starts.
        let reloadable = reload::Reloadable {
            tls: match &settings.security.tls {
                Some(files) => Some(tls::Tls::load(files.clone(), &[b"h2"])?),
                None => None,
            },
            tokens: match &settings.security.auth_token_file {
                Some(path) => Some(auth::Tokens::load(path.clone())?),
                None => None,
            },
        };
        let pool = ComputePool::new(settings.compute_threads)?;
        let health = HealthReporter::new();
        set_health(&health, ServingStatus::NotServing).await;
        tokio::spawn(warm_up(pool.clone(), health.clone()));
        let verifier = crate::verify::Verifier::start(settings.verify_fraction);
        let batcher = Batcher::start(pool.clone(), settings.batcher, verifier);
        Ok(Server {
            settings,
            pool,
            batcher,
            health,
            streams: Arc::default(),
            reloadable,
        })
    }

    /// The compute pool (for embedding programs and tests that need to occupy it).
    pub fn compute_pool(&self) -> &ComputePool {
        &self.pool
    }

    /// The batcher, whose counters say what was computed, shed or dropped.
    pub fn batcher(&self) -> &Batcher {
        &self.batcher
    }

    /// The counts of the streams this server has accepted, answered and reset.
    pub fn streams(&self) -> &Arc<Streams> {
        &self.streams
    }

    /// Serves on `listener` until `shutdown` completes, then drains, and reports what the
    /// drain did.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<DrainReport, Error> {
        let Server {
            settings,
            batcher,
            health,
            streams,
            reloadable,
            ..
        } = self;
        let gzip = settings.security.gzip;
        let stats_batcher = batcher.clone();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc's error details, so that clients can decode the details of errors.
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // google.rpc's error details, so that clients can decode the details of errors.
            .register_encoded_file_descriptor_set(proto::ERROR_DETAILS_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let xent = XentServer::new(XentService::new(
            batcher.clone(),
            settings.stream_concurrency,
            settings.default_timeout,
            settings.max_message_bytes,
        ))
        // The handlers and `MessageSizeLayer` refuse what is over the limit first, with
        // RESOURCE_EXHAUSTED; tonic's checks stay as a backstop (the decoding one also bounds a
        // decompressed message, and the encoding one leaves room for gzip's worst case).
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes + settings.max_message_bytes / 64);
        let xent = if gzip {
            xent.accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        } else {
            xent
        };
        let inference = GrpcInferenceServiceServer::new(OipService::new(
            batcher.clone(),
            settings.stream_concurrency,
            settings.default_timeout,
            settings.max_message_bytes,
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        ))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes + settings.max_message_bytes / 64);
        let inference = if gzip {
            inference
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
                .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        } else {
            inference
        };

        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: health NOT_SERVING, finishing the calls accepted");
                set_health(&health, ServingStatus::NotServing).await;
            }
        };
        let mut routes = tonic::service::Routes::new(health_service.clone());
        if settings.security.reflection {
            routes = routes.add_service(reflection).add_service(reflection_alpha);
        }
        let routes = routes.add_service(xent).add_service(inference).prepare();
        let service = tower::ServiceBuilder::new()
            .layer(auth::AuthLayer(reloadable.tokens.clone()))
            .layer(arrival::ArrivalLayer)
            .layer(message_size::MessageSizeLayer::new(
                settings.max_message_bytes,
            ))
            .option_layer(gzip.then(|| gzip::GzipLayer::new(settings.max_message_bytes)))
            .service(routes);
        // The health-only plaintext listener serves until the drain is over, so probes read
        // NOT_SERVING throughout it.
        let done = tokio_util::sync::CancellationToken::new();
        let health_task = match settings.security.health_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr).await.map_err(|e| {
                    Error::Startup(format!("--health-listen {addr}: cannot listen: {e}"))
                })?;
                tracing::info!(%addr, "serving grpc.health.v1 in plaintext");
                let routes = tonic::service::Routes::new(health_service).prepare();
                let done = done.clone();
                let transport = settings.transport.clone();
                let kinds = method_kinds()?;
                Some(tokio::spawn(async move {
                    transport::serve(
                        listener,
                        routes,
                        Arc::default(),
                        kinds,
                        None,
                        &transport,
                        done.cancelled_owned(),
                    )
                    .await
                }))
            }
            None => None,
        };
        let reloader = tokio::spawn(reloadable.clone().run(done.clone()));
        let report = transport::serve(
            listener,
            service,
            streams,
            method_kinds()?,
            reloadable.tls.clone(),
            &settings.transport,
            signal,
        )
        .await;
        done.cancel();
        let _ = reloader.await;
        if let Some(task) = health_task {
            let _ = task.await;
        }
        batcher.close();
        record_drain(&report);
        let st = stats_batcher.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            streams_accepted = report.accepted,
            streams_answered = report.answered,
            streams_reset = report.reset,
            cut_streams = report.cut_streams,
            cut_connections = report.cut_connections,
            dispatched = load(&st.dispatched_requests),
            computed = load(&st.computed_requests),
            expired = load(&st.expired_in_queue),
            abandoned = load(&st.abandoned_in_queue),
            "drained"
        );
        Ok(report)
    }
}

/// Which of the served methods are client-streaming, read from the services' descriptors.
pub fn method_kinds() -> Result<Arc<MethodKinds>, Error> {
    MethodKinds::from_descriptor_sets(&[
        proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
    .map(Arc::new)
}

/// Counts what the grace period cut off, and says so.
fn record_drain(report: &DrainReport) {
    if report.cut_streams > 0 || report.cut_connections > 0 {
        metrics::counter!(crate::metrics::DRAIN_CUT, "what" => "streams")
            .increment(report.cut_streams);
        metrics::counter!(crate::metrics::DRAIN_CUT, "what" => "connections")
            .increment(report.cut_connections);
        tracing::warn!(
            cut_streams = report.cut_streams,
            cut_connections = report.cut_connections,
            "grace period over; cut off what was still open"
        );
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
    health.set_service_status(oip::SERVICE_NAME, status).await;
}

/// Runs the spec's worked example through the pool; SERVING only once it gives the right
/// answer, so a replica never takes traffic it would answer wrongly.
async fn warm_up(pool: ComputePool, health: HealthReporter) {
    let started = std::time::Instant::now();
    let result = pool
        .run(|| compute::evaluate(&compute::warm_up_request()?))
        .await;
    match result.map(|out| compute::check_warm_up(&out)) {
        Ok(Ok(())) => {
            set_health(&health, ServingStatus::Serving).await;
            tracing::info!(
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "warm-up passed; SERVING"
            );
        }
        Ok(Err(e)) | Err(e) => tracing::error!(error = %e, "warm-up failed; staying NOT_SERVING"),
    }
}
