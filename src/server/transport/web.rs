//! The listeners that speak plain HTTP rather than gRPC (the Prometheus metrics, the KServe v2
//! REST front): HTTP/1.1 and cleartext HTTP/2 on one port, with the same accept loop, the same
//! drain and the same lingering close as the gRPC listener.
//!
//! A drain here is HTTP's own: at `shutdown`, a keep-alive HTTP/1.1 connection closes after
//! the request in flight (or at once when idle), an HTTP/2 one gets GOAWAY, and `serve_http`
//! returns once every connection is done or the grace period has passed.
//!
//! The limits are the gRPC listener's flags: connections past `--max-connections` are closed
//! as they come, a request's head must arrive within `--handshake-timeout-secs`, and HTTP/2
//! connections are kept alive with PINGs.

use std::future::Future;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::wire::Wire;
use super::{AcceptBackoff, TransportSettings};

/// Serves `router` on the connections of `listener` until `shutdown` completes, then lets
/// the requests in flight finish for at most the shutdown grace.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    settings: &TransportSettings,
    shutdown: impl Future<Output = ()>,
) {
    let grace = settings.shutdown_grace;
    let draining = CancellationToken::new();
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(settings.max_header_bytes)
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => {
                let Some(tcp) = backoff.accepted(accepted).await else {
                    continue;
                };
                if connections.len() >= settings.max_connections {
                    super::refuse(tcp);
                    continue;
                }
                let (builder, draining) = (builder.clone(), draining.clone());
                let service = TowerToHyperService::new(router.clone());
                connections.spawn(async move {
                    let conn = builder.serve_connection(TokioIo::new(Wire::new(tcp)), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => return,
                        () = draining.cancelled() => conn.as_mut().graceful_shutdown(),
                    }
                    let _ = conn.await;
                });
            }
        }
    }
    drop(listener);
    draining.cancel();
    connections.close();
    let _ = tokio::time::timeout(grace, connections.wait()).await;
}
