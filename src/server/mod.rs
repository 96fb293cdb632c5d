//! The gRPC server: `xent.v1.Xent`, `grpc.health.v1.Health` and server reflection on one
//! port, with a warm-up before health says SERVING and a bounded graceful shutdown.
//!
//! [`serve`] takes a bound listener and a shutdown future, so tests bind port 0 and stop it
//! at will, and the binary only adds signals.

mod service;

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

pub use service::XentService;

use crate::compute::{self, ComputePool};
use crate::config::Settings;
use crate::error::Error;
use crate::proto;
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
    let pool = ComputePool::new(settings.compute_threads)?;
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    tokio::spawn(warm_up(pool.clone(), health.clone()));

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
    let xent = XentServer::new(XentService::new(pool, settings.stream_concurrency))
        .max_decoding_message_size(settings.max_message_bytes)
        .max_encoding_message_size(settings.max_message_bytes)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = {
        let health = health.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down: health NOT_SERVING, finishing calls in flight");
            set_health(&health, ServingStatus::NotServing).await;
            let _ = stop_tx.send(());
        }
    };
    let server = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(xent)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
    let grace = settings.shutdown_grace;
    let deadline = async move {
        // Runs out only once shutdown has begun.
        if stop_rx.await.is_ok() {
            tokio::time::sleep(grace).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = server => result.map_err(|e| Error::Internal(format!("transport: {e}"))),
        () = deadline => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "grace period over; exiting with calls still in flight");
            Ok(())
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health.set_service_status(SERVICE_NAME, status).await;
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

/// How long a client should wait between polls of health during warm-up.
pub const WARM_UP_POLL: Duration = Duration::from_millis(20);
