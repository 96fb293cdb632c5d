//! The gRPC server: `xent.v1.Xent`, the Open Inference Protocol's
//! `inference.GRPCInferenceService`, `grpc.health.v1.Health` and server reflection on one
//! port, with a warm-up before health says SERVING and a bounded graceful shutdown.
//!
//! [`Server::serve`] takes a bound listener and a shutdown future, so tests bind port 0 and
//! stop it at will, and the binary only adds signals. Shutdown drains: health turns
//! NOT_SERVING, the batcher refuses new calls with UNAVAILABLE, calls already accepted finish
//! within the grace period, then `serve` returns.

mod arrival;
mod call;
mod deadline;
mod message_size;
mod oip;
mod service;

use std::future::Future;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use deadline::parse_timeout;
pub use oip::OipService;
pub use service::XentService;

use crate::batcher::Batcher;
use crate::compute::{self, ComputePool};
use crate::config::Settings;
use crate::error::Error;
use crate::proto;
use crate::proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::proto::xent_server::XentServer;

/// The name health reports the evaluation service under.
pub const SERVICE_NAME: &str = "xent.v1.Xent";

/// HTTP/2 flow-control windows sized for multi-MiB tensors: a 16 MiB message streams without
/// waiting on window updates.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;

/// Serves on `listener` until `shutdown` completes, then lets calls in flight finish for at
/// most `settings.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    Server::new(settings).await?.serve(listener, shutdown).await
}

/// A server whose compute pool and batcher are running, ready to serve.
#[derive(Debug)]
pub struct Server {
    settings: Settings,
    pool: ComputePool,
    batcher: Batcher,
    health: HealthReporter,
}

impl Server {
    /// Starts the compute pool, the batcher and the warm-up; health is NOT_SERVING until the
    /// warm-up passes.
    pub async fn new(settings: Settings) -> Result<Server, Error> {
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

    /// Serves on `listener` until `shutdown` completes, then drains.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let Server {
            settings,
            batcher,
            health,
            ..
        } = self;
        let stats_batcher = batcher.clone();
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );

        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Internal(format!("reflection: {e}")))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
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
        .max_encoding_message_size(settings.max_message_bytes + settings.max_message_bytes / 64)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
        let inference = GrpcInferenceServiceServer::new(OipService::new(
            batcher.clone(),
            settings.default_timeout,
            settings.max_message_bytes,
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        ))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes + settings.max_message_bytes / 64)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutting down: health NOT_SERVING, finishing calls in flight");
                set_health(&health, ServingStatus::NotServing).await;
                batcher.close();
                let _ = stop_tx.send(());
            }
        };
        let server = transport(&settings)
            .layer(arrival::ArrivalLayer)
            .layer(message_size::MessageSizeLayer::new(
                settings.max_message_bytes,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(xent)
            .add_service(inference)
            .serve_with_incoming_shutdown(incoming(listener), signal);
        let grace = settings.shutdown_grace;
        let deadline = async move {
            // Runs out only once shutdown has begun.
            if stop_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let result = tokio::select! {
            result = server => result.map_err(|e| Error::Internal(format!("transport: {e}"))),
            () = deadline => {
                tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over; exiting with calls still in flight");
                Ok(())
            }
        };
        let st = stats_batcher.stats();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            dispatched = load(&st.dispatched_requests),
            computed = load(&st.computed_requests),
            expired = load(&st.expired_in_queue),
            abandoned = load(&st.abandoned_in_queue),
            shed_draining = load(&st.shed_draining),
            "drained"
        );
        result
    }
}

/// The HTTP/2 transport every xent service runs on: windows sized for multi-MiB tensors,
/// large frames, no Nagle delay, and the per-connection stream limit. Public so benchmarks
/// can measure other services on exactly this stack.
pub fn transport(settings: &Settings) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
}

/// The connections accepted on `listener`, with Nagle's algorithm off: tonic applies its
/// `tcp_nodelay` only to listeners it binds itself, and with Nagle on, a small answer waits
/// for the client's delayed ACK (about 40 ms a call at low concurrency).
pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
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
