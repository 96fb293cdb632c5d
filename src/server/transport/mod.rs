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
//! 1. health turns NOT_SERVING (the server does that before it signals the transport); a
//!    connection made from now on is still accepted, but only to tell its client at once:
//!    health answers NOT_SERVING, every other call UNAVAILABLE, and the connection gets
//!    GOAWAY. (Closing the listener instead would leave a client that connects while it
//!    closes with a SYN the kernel drops, and a connect stalled for a second.)
//! 2. every connection starts HTTP/2's two-phase GOAWAY; streams up to the final GOAWAY's id
//!    run to the end: their bodies are read in full, computed and answered; the client knows
//!    the streams above it were never seen and may retry them elsewhere (`conn`);
//! 3. once everything a client sent before it learned of the shutdown is in (`conn` says how
//!    that is known), client-streaming calls stop after those requests and health Watch
//!    streams end (`drain`, `stream`);
//! 4. a connection with no stream left closes with a lingering close (`wire`);
//! 5. when the grace period runs out, whatever is left is dropped and reported.

mod budget;
mod conn;
pub mod drain;
mod stream;
mod web;
mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::body::Body;

use crate::metrics::Ended;
use crate::server::tls::Tls;
pub use budget::default_limit as default_transit_budget;
use conn::{Shared, serve_connection};
use drain::{DrainLayer, MethodKinds, Streams};
pub use web::serve_http;

/// How connections are served: the limits and timeouts that keep any client from holding
/// the server's memory, descriptors or time (each is a flag: src/config.rs).
#[derive(Clone, Debug, PartialEq)]
pub struct TransportSettings {
    /// HTTP/2 `MAX_CONCURRENT_STREAMS` of each connection.
    pub max_concurrent_streams: u32,
    /// Time the streams open at shutdown get to finish.
    pub shutdown_grace: Duration,
    /// From accept to the client's HTTP/2 preface and SETTINGS.
    pub handshake_timeout: Duration,
    /// A connection with no stream for this long gets GOAWAY.
    pub idle_timeout: Option<Duration>,
    /// The server PINGs a connection this often...
    pub keepalive_interval: Option<Duration>,
    /// ...and closes it when a PING is not answered within this.
    pub keepalive_timeout: Duration,
    /// A connection this old (spread by up to 10 %) gets GOAWAY, so its client reconnects.
    pub max_connection_age: Option<Duration>,
    /// ...and is closed this much later.
    pub max_connection_age_grace: Duration,
    /// Connections open at once on a listener; more are closed as they come.
    pub max_connections: usize,
    /// A request message stalled half received, or an answer the client does not read, for
    /// this long ends its call.
    pub transfer_idle_timeout: Duration,
    /// The deadline of a unary call whose client sets no `grpc-timeout`.
    pub default_timeout: Duration,
    /// Largest header block a call may send.
    pub max_header_bytes: u32,
    /// Bytes in transit (requests arriving, answers unwritten) past which calls are refused.
    pub transit_budget: u64,
}

impl Default for TransportSettings {
    /// xentd's defaults.
    fn default() -> Self {
        crate::config::Settings::default().transport
    }
}

/// How long the connections made during a drain get, once it is over, to finish.
const LATE_GRACE: Duration = Duration::from_secs(1);

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
/// drains. Streams are counted in `streams`; `kinds` says which methods are client-streaming;
/// with `tls`, every connection is TLS.
pub async fn serve(
    listener: TcpListener,
    service: impl GrpcService,
    streams: Arc<Streams>,
    kinds: Arc<MethodKinds>,
    tls: Option<Arc<Tls>>,
    settings: &TransportSettings,
    shutdown: impl Future<Output = ()>,
) -> DrainReport {
    let service = tower::ServiceBuilder::new()
        .layer(DrainLayer)
        .layer(drain::LateLayer)
        .service(service);
    let shared = Shared {
        late: false,
        service,
        kinds,
        settings: Arc::new(settings.clone()),
        counts: streams.clone(),
        budget: Arc::new(budget::Budget::new(settings.transit_budget)),
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
            accepted = listener.accept() => {
                if let Some(tcp) = backoff.accepted(accepted).await {
                    if connections.len() >= settings.max_connections {
                        refuse(tcp);
                    } else {
                        connections.spawn(connect(tcp, tls.clone(), shared.clone()));
                    }
                }
            }
        }
    }
    shared.draining.cancel();
    connections.close();
    shared.streams.close();
    // Connections made during the drain are still accepted, so that their clients hear at
    // once that this server is going (health NOT_SERVING, calls UNAVAILABLE, then GOAWAY)
    // rather than wait on a closing listener; the drain does not wait for them.
    let late = Shared {
        late: true,
        force: CancellationToken::new(),
        streams: TaskTracker::new(),
        ..shared.clone()
    };
    let drained = tokio::time::timeout(settings.shutdown_grace, async {
        connections.wait().await;
        shared.streams.wait().await;
    });
    tokio::pin!(drained);
    let in_time = loop {
        tokio::select! {
            biased;
            result = &mut drained => break result.is_ok(),
            accepted = listener.accept() => {
                if let Some(tcp) = backoff.accepted(accepted).await {
                    late.streams.spawn(connect(tcp, tls.clone(), late.clone()));
                }
            }
        }
    };
    drop(listener);
    let mut report = DrainReport::default();
    if !in_time {
        report.cut_streams = streams.open();
        report.cut_connections = connections.len() as u64;
        shared.force.cancel();
        connections.wait().await;
        // A stream whose connection is gone ends at its next step; its answer is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(1), shared.streams.wait()).await;
    }
    // The connections made during the drain have their answers and a GOAWAY; a moment for
    // their clients to read them and close, then they go too.
    late.streams.close();
    if tokio::time::timeout(LATE_GRACE, late.streams.wait())
        .await
        .is_err()
    {
        late.force.cancel();
        late.streams.wait().await;
    }
    report.accepted = streams.accepted();
    report.answered = streams.answered();
    report.reset = streams.reset();
    report
}

/// Serves a connection, after its TLS handshake when the listener has TLS. The handshake has
/// the handshake timeout, and a drain cancels it (a late connection's goes on).
async fn connect(tcp: TcpStream, tls: Option<Arc<Tls>>, shared: Shared<impl GrpcService>) {
    let Some(tls) = tls else {
        return serve_connection(tcp, shared).await;
    };
    let handshake = tokio::time::timeout(
        shared.settings.handshake_timeout,
        tls.acceptor().accept(tcp),
    );
    let stream = tokio::select! {
        biased;
        () = shared.force.cancelled() => return,
        () = shared.draining.cancelled(), if !shared.late => return,
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                Ended::TlsHandshake.count();
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                Ended::HandshakeTimeout.count();
                tracing::debug!("no TLS handshake within the handshake timeout");
                return;
            }
        },
    };
    serve_connection(stream, shared).await;
}

/// Closes a connection over the limit as it comes (its client sees the connection closed
/// and, as gRPC clients do, tries again or elsewhere), counted, and logged with the project's
/// log-line limit.
fn refuse(tcp: TcpStream) {
    static LOG: crate::telemetry::LogLimit = crate::telemetry::LogLimit::new();
    Ended::ConnectionLimit.count();
    drop(tcp);
    if let Some(suppressed) = LOG.admit() {
        tracing::warn!(
            suppressed,
            "connection limit reached: connections closed as they come (--max-connections)"
        );
    }
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

    /// The connection `accepted` gave, ready to serve, or None after waiting out a failure.
    async fn accepted(
        &mut self,
        accepted: io::Result<(TcpStream, std::net::SocketAddr)>,
    ) -> Option<TcpStream> {
        match accepted {
            Ok((tcp, _)) => {
                self.reset();
                // Without it, a small answer waits for the client's delayed ACK (about 40 ms
                // a call).
                let _ = tcp.set_nodelay(true);
                Some(tcp)
            }
            Err(e) => {
                self.wait(e).await;
                None
            }
        }
    }

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
