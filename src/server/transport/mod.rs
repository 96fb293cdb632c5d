//! The connections under the gRPC services: the accept loop, HTTP/2 on each connection, and a
//! drain that loses no call the server accepted.
//!
//! tonic's own `Server` (on hyper) stops accepting at shutdown but keeps its listener open
//! until every connection has finished, so a client that connects during a drain is accepted
//! by the kernel and then never answered; it closes a finished connection at once, so bytes
//! the client still sends (a WINDOW_UPDATE, the tail of an upload) make the kernel reset the
//! socket, which can destroy an answer the client has not read yet; and it cannot tell a
//! client-streaming call where the client's requests from before the shutdown end, so such a
//! call either runs until the grace period cuts it or is cut short. This module owns the
//! connections instead, on the h2 crate directly, and a drain goes like this:
//! 1. the accept loop ends and the listener is closed: a new connection is refused at once;
//! 2. every connection starts HTTP/2's two-phase GOAWAY; streams up to the final GOAWAY's id
//!    run to the end: their bodies are read in full, computed and answered; the client knows
//!    the streams above it were never seen and may retry them elsewhere (`conn`);
//! 3. once everything a client sent before it learned of the shutdown is in (`conn` says how
//!    that is known), client-streaming calls stop after those requests and health Watch
//!    streams end (`drain`, `stream`);
//! 4. a connection with no stream left closes with a lingering close (`wire`);
//! 5. when the grace period runs out, whatever is left is dropped and reported.

mod conn;
pub mod drain;
mod stream;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;

use conn::{Shared, serve_connection};
use drain::{DrainLayer, MethodKinds, Streams};

/// How connections are served.
#[derive(Clone, Debug)]
pub struct TransportSettings {
    /// HTTP/2 `MAX_CONCURRENT_STREAMS` of each connection.
    pub max_concurrent_streams: u32,
    /// Time the streams open at shutdown get to finish.
    pub shutdown_grace: Duration,
}

/// What a server did with its streams, and what its drain had to cut off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Streams accepted since the server started.
    pub accepted: u64,
    /// Streams answered to their end.
    pub answered: u64,
    /// Streams that ended before their answer: reset or abandoned by the client, or cut off.
    pub reset: u64,
    /// Streams still open when the grace period ran out, cut off.
    pub cut_streams: u64,
    /// Connections still open when the grace period ran out, cut off.
    pub cut_connections: u64,
}

/// The service every connection calls: the gRPC routes under the server's layers.
pub trait GrpcService:
    tower::Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S> GrpcService for S where
    S: tower::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serves `service` on the connections of `listener` until `shutdown` completes, then
/// drains. Streams are counted in `streams`; `kinds` says which methods are client-streaming.
pub async fn serve(
    listener: TcpListener,
    service: impl GrpcService,
    streams: Arc<Streams>,
    kinds: Arc<MethodKinds>,
    settings: &TransportSettings,
    shutdown: impl Future<Output = ()>,
) -> DrainReport {
    let service = tower::ServiceBuilder::new()
        .layer(DrainLayer::new(streams.clone()))
        .service(service);
    let shared = Shared {
        service,
        kinds,
        settings: Arc::new(settings.clone()),
        draining: CancellationToken::new(),
        force: CancellationToken::new(),
        streams: TaskTracker::new(),
    };
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    backoff.reset();
                    // Without it, a small answer waits for the client's delayed ACK (about
                    // 40 ms a call).
                    let _ = tcp.set_nodelay(true);
                    connections.spawn(serve_connection(tcp, shared.clone()));
                }
                Err(e) => backoff.wait(e).await,
            },
        }
    }
    // Refused from now on, rather than accepted by the kernel and never answered.
    drop(listener);
    shared.draining.cancel();
    connections.close();
    shared.streams.close();
    let all_done = async {
        connections.wait().await;
        shared.streams.wait().await;
    };
    let mut report = DrainReport::default();
    if tokio::time::timeout(settings.shutdown_grace, all_done)
        .await
        .is_err()
    {
        report.cut_streams = streams.open();
        report.cut_connections = connections.len() as u64;
        shared.force.cancel();
        connections.wait().await;
        // A stream whose connection is gone ends at its next step; its answer is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.streams.wait()).await;
    }
    report.accepted = streams.accepted();
    report.answered = streams.answered();
    report.reset = streams.reset();
    report
}

/// What the accept loop does when `accept` fails: a connection that died in the backlog is
/// skipped at once; anything else (out of file descriptors, above all) waits a little longer
/// each time, so the loop neither spins nor floods the log, and resumes as soon as an accept
/// succeeds.
#[derive(Debug, Default)]
struct AcceptBackoff {
    delay: Duration,
    failures: u64,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(5);
    const MAX: Duration = Duration::from_secs(1);

    fn reset(&mut self) {
        if self.failures > 0 {
            tracing::info!(failures = self.failures, "accepting connections again");
        }
        *self = AcceptBackoff::default();
    }

    async fn wait(&mut self, e: io::Error) {
        if matches!(
            e.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            return;
        }
        self.failures += 1;
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        if self.failures.is_power_of_two() {
            tracing::warn!(error = %e, failures = self.failures, retry_ms = self.delay.as_millis() as u64, "cannot accept connections");
        }
        tokio::time::sleep(self.delay).await;
    }
}
