//! One HTTP/2 connection: the handshake, its streams, and its part in a drain.
//!
//! At the drain a connection starts h2's graceful shutdown (a GOAWAY with the highest stream
//! id and a PING; when the client answers, the final GOAWAY with the last stream id the
//! server saw), and at the same time sends a PING of its own. When is everything the client
//! sent before it learned of the shutdown in hand? Not when those PINGs are answered: an
//! HTTP/2 client writes a PING's answer ahead of the DATA it has queued, so a request queued
//! just before the first GOAWAY arrived can follow the answer. It is written in the same turn
//! of the client's connection, though. So, once its first PING is answered, the connection
//! sends a second one; h2 hands every frame that came before that second answer to its stream
//! before it reports the answer, so at that moment every byte sent before the shutdown is in
//! the streams' buffers, and the connection fires its [`Cut`].

use std::sync::Arc;
use std::task::Poll;

use bytes::Bytes;
use h2::{Ping, PingPong};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::drain::{Cut, MethodKinds, Open, Streams};
use super::stream::serve_stream;
use super::wire::Wire;
use super::{GrpcService, TransportSettings};

/// HTTP/2 flow-control windows sized for multi-MiB tensors: a 16 MiB message streams without
/// waiting on window updates.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame the server accepts.
const MAX_FRAME: u32 = 1 << 20;
/// How long a connection made during a drain may stay without a stream before its GOAWAY.
const LATE_IDLE: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a connection stands in a drain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Drain {
    Serving,
    /// GOAWAY and the first drain PING sent.
    FirstPing,
    /// The first PING answered, the second sent.
    SecondPing,
    /// The cut has fired.
    Cut,
}

/// Everything a connection needs from its server.
#[derive(Clone)]
pub struct Shared<S> {
    /// Accepted during the drain: only health is served, every other call refused.
    pub late: bool,
    pub service: S,
    pub kinds: Arc<MethodKinds>,
    pub settings: Arc<TransportSettings>,
    /// Where every stream is counted.
    pub counts: Arc<Streams>,
    /// Set when the server starts draining.
    pub draining: CancellationToken,
    /// Set when the grace period is over: everything still open is dropped.
    pub force: CancellationToken,
    /// The streams of every connection, so the server can wait for them.
    pub streams: TaskTracker,
}

/// Serves one connection until it closes, or until `force`.
pub async fn serve_connection<T>(io: T, shared: Shared<impl GrpcService>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(shared.settings.max_concurrent_streams);
    let handshake = builder.handshake::<_, Bytes>(Wire::new(io));
    let mut conn = tokio::select! {
        biased;
        () = shared.force.cancelled() => return,
        // A connection that has not finished its handshake has no stream to finish.
        () = shared.draining.cancelled(), if !shared.late => return,
        conn = handshake => match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
        },
    };
    let mut pings = conn.ping_pong().expect("a new connection has its PingPong");
    let cut = Cut::default();
    let mut drain = Drain::Serving;
    // A connection made during the drain says GOAWAY once its first stream is in (so a probe's
    // health check is answered, NOT_SERVING), or after a moment without one.
    let late_idle = tokio::time::sleep(LATE_IDLE);
    tokio::pin!(late_idle);
    let mut late_heard = false;
    loop {
        let go_away = !shared.late || late_heard;
        tokio::select! {
            biased;
            () = shared.force.cancelled() => return,
            () = shared.draining.cancelled(), if drain == Drain::Serving && go_away => {
                conn.graceful_shutdown();
                drain = next_ping(&mut pings, Drain::FirstPing, &cut);
            }
            () = &mut late_idle, if !go_away => late_heard = true,
            pong = pong(&mut pings), if matches!(drain, Drain::FirstPing | Drain::SecondPing) => {
                drain = match (drain, pong) {
                    (Drain::FirstPing, Ok(())) => next_ping(&mut pings, Drain::SecondPing, &cut),
                    // Answered, or the connection is failing: nothing more will come.
                    _ => {
                        cut.fire();
                        Drain::Cut
                    }
                };
            }
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    late_heard = true;
                    shared.streams.spawn(serve_stream(
                        request,
                        respond,
                        shared.service.clone(),
                        cut.clone(),
                        shared.kinds.clone(),
                        shared.late,
                        Open::new(shared.counts.clone()),
                    ));
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection error");
                }
                None => return,
            },
        }
    }
}

/// Sends a drain PING and moves to `then`; if it cannot be sent, fires the cut at once.
fn next_ping(pings: &mut PingPong, then: Drain, cut: &Cut) -> Drain {
    match pings.send_ping(Ping::opaque()) {
        Ok(()) => then,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send the drain PING");
            cut.fire();
            Drain::Cut
        }
    }
}

/// Completes when the PING sent is answered.
async fn pong(pings: &mut PingPong) -> Result<(), h2::Error> {
    std::future::poll_fn(|cx| match pings.poll_pong(cx) {
        Poll::Ready(r) => Poll::Ready(r.map(drop)),
        Poll::Pending => Poll::Pending,
    })
    .await
}
