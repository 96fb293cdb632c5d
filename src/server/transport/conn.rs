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
//!
//! The same GOAWAY, PINGs and cut end a connection that reaches `--max-connection-age-secs`
//! (its client-streaming calls are told to reconnect), and it is closed when the age's grace
//! runs out. The connection also owns its other timers: the handshake timeout, keepalive PINGs
//! (h2 allows one PING of the server's own at a time, so a drain that starts while one is out
//! sends its first PING when that one is answered) and the idle timeout.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use h2::{Ping, PingPong};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::budget::Budget;
use super::drain::{Cut, Going, MethodKinds, Open, Streams};
use super::stream::{Call, serve_stream};
use super::wire::Wire;
use super::{GrpcService, TransportSettings};
use crate::metrics::Ended;

/// HTTP/2 flow-control windows sized for multi-MiB tensors: a 16 MiB message streams without
/// waiting on window updates.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 64 << 20;
/// Largest HTTP/2 frame the server accepts.
const MAX_FRAME: u32 = 1 << 20;
/// How long a connection made during a drain may stay without a stream before its GOAWAY.
const LATE_IDLE: Duration = Duration::from_secs(1);
/// h2's own header limit, as a multiple of `--max-header-bytes`.
const H2_HEADER_SLACK: u32 = 4;

/// What the connection's one outstanding PING of its own is for (h2 allows one at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pinging {
    /// None outstanding.
    Idle,
    /// A keepalive PING: unanswered by the deadline, the client is taken for gone.
    Keepalive,
    /// Going away: the first drain PING sent.
    First,
    /// Going away: the first drain PING answered, the second sent.
    Second,
    /// The cut has fired.
    Done,
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
    /// Bytes in transit, across every connection.
    pub budget: Arc<Budget>,
    /// Set when the server starts draining.
    pub draining: CancellationToken,
    /// Set when the grace period is over: everything still open is dropped.
    pub force: CancellationToken,
    /// The streams of every connection, so the server can wait for them.
    pub streams: TaskTracker,
}

/// The streams of one connection, for its idle timeout.
#[derive(Debug)]
struct Local {
    open: AtomicUsize,
    /// When the last stream ended, or the connection began.
    last_end: Mutex<Instant>,
}

impl Local {
    /// When the connection will have been without a stream for `idle`, if it has none now.
    fn idle_until(&self, idle: Duration) -> Option<Instant> {
        let last = *self.last_end.lock().expect("last_end");
        (self.open.load(Ordering::SeqCst) == 0).then_some(last + idle)
    }
}

/// A moment that never comes, for timers that are off.
fn never() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 86_400)
}

/// When a connection made now reaches its maximum age: `age` less up to 10 %, at random,
/// so that connections made together do not all go together.
fn aged_at(age: Duration) -> Instant {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let spread = (random % 1000) as f64 / 10_000.0;
    Instant::now() + age.mul_f64(1.0 - spread)
}

/// Serves one connection until it closes, or until `force`.
pub async fn serve_connection<T>(io: T, shared: Shared<impl GrpcService>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let settings = shared.settings.clone();
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(settings.max_concurrent_streams)
        // Metadata over `max_header_bytes` is refused per call, with a gRPC status, by
        // `serve_stream`; h2 itself refuses a stream (HTTP 431) only past this, and past four
        // times this (its own fixed abuse limit) ends the whole connection.
        .max_header_list_size(settings.max_header_bytes.saturating_mul(H2_HEADER_SLACK));
    let handshake = builder.handshake::<_, Bytes>(Wire::new(io));
    let mut conn = tokio::select! {
        biased;
        () = shared.force.cancelled() => return,
        // A connection that has not finished its handshake has no stream to finish.
        () = shared.draining.cancelled(), if !shared.late => return,
        conn = tokio::time::timeout(settings.handshake_timeout, handshake) => match conn {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 handshake failed");
                return;
            }
            Err(_) => {
                Ended::HandshakeTimeout.count();
                tracing::debug!("no HTTP/2 preface within the handshake timeout");
                return;
            }
        },
    };
    let mut pings = conn.ping_pong().expect("a new connection has its PingPong");
    let cut = Cut::default();
    let mut pinging = Pinging::Idle;
    // Why the connection is going away, once it is: it has sent its first GOAWAY.
    let mut going: Option<Going> = None;
    // The first drain PING waits for an outstanding keepalive PING's answer.
    let mut drain_ping_due = false;
    let local = Arc::new(Local {
        open: AtomicUsize::new(0),
        last_end: Mutex::new(Instant::now()),
    });
    // Timers of a late connection are its drain's; the others are off for it.
    let timers = !shared.late;
    let idle = settings.idle_timeout.filter(|_| timers);
    let idle_timer = sleep_until(idle.map_or_else(never, |d| Instant::now() + d));
    let keepalive = settings.keepalive_interval.filter(|_| timers);
    let keepalive_timer = sleep_until(keepalive.map_or_else(never, |d| Instant::now() + d));
    let age_timer = sleep_until(
        settings
            .max_connection_age
            .filter(|_| timers)
            .map_or_else(never, aged_at),
    );
    // A connection past its age is closed this long after its GOAWAY, calls or not.
    let aged_close = sleep_until(never());
    tokio::pin!(idle_timer, keepalive_timer, age_timer, aged_close);
    // A connection made during the drain says GOAWAY once its first stream is in (so a probe's
    // health check is answered, NOT_SERVING), or after a moment without one.
    let late_idle = tokio::time::sleep(LATE_IDLE);
    tokio::pin!(late_idle);
    let mut late_heard = false;
    loop {
        let go_away = !shared.late || late_heard;
        let mut begin = None;
        tokio::select! {
            biased;
            () = shared.force.cancelled() => return,
            () = &mut aged_close => {
                Ended::MaxAgeGrace.count();
                tracing::debug!("connection past its maximum age and grace closed");
                return;
            }
            () = shared.draining.cancelled(), if going.is_none() && go_away => {
                begin = Some(Going::Shutdown);
            }
            () = &mut age_timer, if going.is_none() => {
                Ended::MaxAge.count();
                aged_close.as_mut().reset(Instant::now() + settings.max_connection_age_grace);
                begin = Some(Going::Aged);
            }
            () = &mut late_idle, if !go_away => late_heard = true,
            () = &mut keepalive_timer, if keepalive.is_some() => {
                if pinging == Pinging::Keepalive {
                    Ended::KeepaliveTimeout.count();
                    tracing::debug!("keepalive PING unanswered: connection closed");
                    return;
                }
                if pinging == Pinging::Idle
                    && going.is_none()
                    && pings.send_ping(Ping::opaque()).is_ok()
                {
                    pinging = Pinging::Keepalive;
                    keepalive_timer.as_mut().reset(Instant::now() + settings.keepalive_timeout);
                    continue;
                }
                keepalive_timer.as_mut().reset(Instant::now() + keepalive.unwrap_or_default());
            }
            () = &mut idle_timer, if idle.is_some() && going.is_none() => {
                let idle = idle.unwrap_or_default();
                match local.idle_until(idle) {
                    Some(at) if at <= Instant::now() => {
                        Ended::Idle.count();
                        tracing::debug!("idle connection told GOAWAY");
                        conn.graceful_shutdown();
                        idle_timer.as_mut().reset(never());
                        // No stream is open; one racing the GOAWAY is served as usual.
                        going = Some(Going::Idle);
                    }
                    Some(at) => idle_timer.as_mut().reset(at),
                    None => idle_timer.as_mut().reset(Instant::now() + idle),
                }
            }
            pong = pong(&mut pings), if !matches!(pinging, Pinging::Idle | Pinging::Done) => {
                pinging = match (pinging, pong) {
                    (Pinging::Keepalive, Ok(())) => {
                        keepalive_timer.as_mut().reset(Instant::now() + keepalive.unwrap_or_default());
                        if drain_ping_due {
                            drain_ping_due = false;
                            next_ping(&mut pings, Pinging::First, &cut, going)
                        } else {
                            Pinging::Idle
                        }
                    }
                    (Pinging::First, Ok(())) => next_ping(&mut pings, Pinging::Second, &cut, going),
                    (Pinging::Keepalive, Err(_)) => return,
                    // Answered, or the connection is failing: nothing more will come.
                    _ => {
                        cut.fire(going.unwrap_or(Going::Shutdown));
                        Pinging::Done
                    }
                };
            }
            next = conn.accept() => match next {
                Some(Ok((request, respond))) => {
                    late_heard = true;
                    local.open.fetch_add(1, Ordering::SeqCst);
                    let stream = serve_stream(
                        request,
                        respond,
                        Call {
                            service: shared.service.clone(),
                            cut: cut.clone(),
                            kinds: shared.kinds.clone(),
                            settings: settings.clone(),
                            budget: shared.budget.clone(),
                            late: shared.late,
                        },
                        Open::new(shared.counts.clone()),
                    );
                    let local = local.clone();
                    shared.streams.spawn(async move {
                        stream.await;
                        *local.last_end.lock().expect("last_end") = Instant::now();
                        local.open.fetch_sub(1, Ordering::SeqCst);
                    });
                }
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "connection error");
                }
                None => return,
            },
        }
        if let Some(why) = begin {
            conn.graceful_shutdown();
            going = Some(why);
            if pinging == Pinging::Keepalive {
                drain_ping_due = true;
            } else {
                pinging = next_ping(&mut pings, Pinging::First, &cut, going);
            }
        }
    }
}

/// Sends a drain PING and moves to `then`; if it cannot be sent, fires the cut at once.
fn next_ping(pings: &mut PingPong, then: Pinging, cut: &Cut, going: Option<Going>) -> Pinging {
    match pings.send_ping(Ping::opaque()) {
        Ok(()) => then,
        Err(e) => {
            tracing::debug!(error = %e, "cannot send the drain PING");
            cut.fire(going.unwrap_or(Going::Shutdown));
            Pinging::Done
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
