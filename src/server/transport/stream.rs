//! One HTTP/2 stream: its request handed to the gRPC service as an `http` request, its answer
//! sent back under flow control.
//!
//! This is the part of an HTTP server that hyper would otherwise do; it is here so that the
//! drain can see what hyper hides: each stream's flow control (how many bytes of a request
//! have arrived and wait in h2's buffer, which is how a client-streaming call knows where to
//! stop at the cut) and the stream's reset by the client.
//!
//! An answer is sent only as fast as the client's flow-control window allows, one window's
//! worth at a time, so h2 never buffers more of it than the client has asked for.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body as _, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;
use tower::ServiceExt as _;

use super::budget::{Budget, Held};
use super::drain::{Cut, Late, Mark, MethodKinds, Open};
use super::{GrpcService, TransportSettings};
use crate::error::Error;
use crate::metrics::Ended;
use crate::server::framing::Framing;

/// What a stream needs from its connection.
pub struct Call<S> {
    pub service: S,
    pub cut: Cut,
    pub kinds: Arc<MethodKinds>,
    pub settings: Arc<TransportSettings>,
    pub budget: Arc<Budget>,
    /// The connection was made during the drain.
    pub late: bool,
}

/// How often a request body held back by a spent budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(20);

/// Serves one stream: calls the service with its request, sends the answer, and counts it in
/// `open`. A reset by the client drops the call.
pub async fn serve_stream(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    call: Call<impl GrpcService>,
    open: Open,
) {
    let (mut parts, recv) = request.into_parts();
    if let Some(refusal) = refusal(&parts, &call) {
        let (head, ()) = refusal.into_http::<()>().into_parts();
        if respond
            .send_response(http::Response::from_parts(head, ()), true)
            .is_ok()
        {
            open.answered();
        }
        return;
    }
    let client_streaming = call.kinds.is_client_streaming(parts.uri.path());
    let deadline = parts
        .headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(crate::server::parse_timeout)
        .or((!client_streaming).then_some(call.settings.default_timeout))
        .map(|t| Instant::now() + t);
    let body = RequestBody::new(
        recv,
        &call.cut,
        client_streaming,
        Held::new(call.budget.clone()),
        call.settings.transfer_idle_timeout,
        deadline,
    );
    parts.extensions.insert(call.cut);
    if call.late {
        parts.extensions.insert(Late);
    }
    let answer = call
        .service
        .oneshot(http::Request::from_parts(parts, Body::new(body)));
    tokio::pin!(answer);
    let answer = tokio::select! {
        biased;
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
        answer = &mut answer => match answer {
            Ok(answer) => answer,
            Err(never) => match never {},
        },
    };
    let (head, body) = answer.into_parts();
    let head = http::Response::from_parts(head, ());
    if body.is_end_stream() {
        if respond.send_response(head, true).is_ok() {
            open.answered();
        }
        return;
    }
    let Ok(tx) = respond.send_response(head, false) else {
        return;
    };
    let out = Out {
        held: Held::new(call.budget),
        stall: call.settings.transfer_idle_timeout,
    };
    if send_body(body, tx, out).await {
        open.answered();
    }
}

/// Why a stream is refused before its request is read, if it is: metadata over the limit,
/// or (for anything but health) a spent budget.
fn refusal<S>(parts: &http::request::Parts, call: &Call<S>) -> Option<Status> {
    // Sizes as HTTP/2 counts them for SETTINGS_MAX_HEADER_LIST_SIZE.
    let metadata: usize = parts
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    let limit = call.settings.max_header_bytes as usize;
    if metadata > limit {
        Ended::OversizedMetadata.count();
        return Some(
            Error::ResourceExhausted(format!(
                "the call's metadata is {metadata} bytes, over the limit of {limit} (--max-header-bytes)"
            ))
            .into_status(),
        );
    }
    if call.budget.spent() && !parts.uri.path().starts_with(crate::server::HEALTH_PATHS) {
        Ended::OverBudget.count();
        return Some(
            Error::Unavailable {
                reason: format!(
                    "xentd has {} MiB of requests and answers in transit, its limit: try again shortly",
                    call.budget.used() >> 20
                ),
                retry_after: OVER_BUDGET_RETRY,
            }
            .into_status(),
        );
    }
    None
}

/// The retry hint of a call refused for a spent budget.
const OVER_BUDGET_RETRY: Duration = Duration::from_millis(200);

/// What an answer holds while it is written.
struct Out {
    held: Held,
    /// How long the client may leave its window shut.
    stall: Duration,
}

/// Sends `body` on `tx`: data as the client's window allows, then trailers. A reset by the
/// client ends it; a body error, or a client that opens no window for `out.stall`, resets
/// the stream. True when all of it went out.
async fn send_body(mut body: Body, mut tx: SendStream<Bytes>, mut out: Out) -> bool {
    loop {
        let frame = std::future::poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            Pin::new(&mut body).poll_frame(cx).map(Some)
        })
        .await;
        let frame = match frame {
            // Reset by the client.
            None => return false,
            Some(None) => return tx.send_data(Bytes::new(), true).is_ok(),
            Some(Some(Err(_))) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return false;
            }
            Some(Some(Ok(frame))) => frame,
        };
        let frame = match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                out.held.add(data.len());
                match send_data(&mut tx, data, end, &mut out).await {
                    Err(()) => return false,
                    Ok(()) if end => return true,
                    Ok(()) => continue,
                }
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            return tx.send_trailers(trailers).is_ok();
        }
    }
}

/// Sends `data` in pieces no larger than the capacity the client's window grants.
async fn send_data(
    tx: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
    out: &mut Out,
) -> Result<(), ()> {
    if data.is_empty() {
        return tx.send_data(data, end).map_err(drop);
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = tokio::time::timeout(
            out.stall,
            std::future::poll_fn(|cx| {
                if tx.poll_reset(cx).is_ready() {
                    return Poll::Ready(None);
                }
                tx.poll_capacity(cx)
            }),
        )
        .await;
        let n = match granted {
            Ok(Some(Ok(n))) if n > 0 => n.min(data.len()),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return Err(()),
            Err(_) => {
                // The status cannot reach a client that reads nothing: the stream is reset.
                Ended::AnswerStalled.count();
                tracing::debug!("answer unread for the transfer timeout: stream reset");
                tx.send_reset(Reason::CANCEL);
                return Err(());
            }
        };
        let piece = data.split_to(n);
        tx.send_data(piece, end && data.is_empty()).map_err(drop)?;
        out.held.free(n);
    }
    Ok(())
}

/// A request body read from h2, its capacity released as it is read. It holds what it has of
/// an incomplete message in the byte budget, and while the budget is spent it keeps the
/// capacity back, so the client can send no more than its window. It ends the call with a
/// status when a message stalls half received for the transfer timeout, or when the call's
/// deadline passes before the request is in. For a client-streaming call it ends, once the
/// connection's cut has fired, at the first message boundary after the bytes that had
/// arrived by then.
struct RequestBody {
    recv: RecvStream,
    data_done: bool,
    framing: Framing,
    /// The current message's bytes, in the budget.
    held: Held,
    /// Capacity kept back while the budget is spent.
    withheld: usize,
    stall_after: Duration,
    /// When a message in progress counts as stalled, or a spent budget is looked at again.
    stall: Pin<Box<Sleep>>,
    stall_armed: bool,
    /// When the message in progress last received bytes.
    stalled_from: Instant,
    deadline: Option<Pin<Box<Sleep>>>,
    /// Set once the body has ended itself with a status.
    failed: bool,
    cut: Option<Cutting>,
}

/// The cut of one client-streaming request body.
struct Cutting {
    cut: Cut,
    mark: Arc<Mark>,
    fired: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// Ended at the cut: the draining status is due (`Some(false)`) or given (`Some(true)`).
    ended: Option<bool>,
}

impl RequestBody {
    fn new(
        mut recv: RecvStream,
        cut: &Cut,
        client_streaming: bool,
        held: Held,
        stall_after: Duration,
        deadline: Option<Instant>,
    ) -> RequestBody {
        let cut = client_streaming.then(|| Cutting {
            cut: cut.clone(),
            mark: cut.register(recv.flow_control().clone()),
            fired: Box::pin(cut.fired_owned()),
            ended: None,
        });
        RequestBody {
            recv,
            data_done: false,
            framing: Framing::default(),
            held,
            withheld: 0,
            stall_after,
            stall: Box::pin(tokio::time::sleep(stall_after)),
            stall_armed: false,
            stalled_from: Instant::now(),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
            failed: false,
            cut,
        }
    }

    /// Ends the body with `status`, counted as `why`.
    fn fail(&mut self, status: Status, why: Ended) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = true;
        self.held.free_all();
        why.count();
        Poll::Ready(Some(Err(status.into())))
    }

    /// Gives the client back the capacity kept while the budget was spent, once it is not.
    fn release_withheld(&mut self) {
        if self.withheld > 0 && !self.held.budget().spent() {
            let _ = self.recv.flow_control().release_capacity(self.withheld);
            self.withheld = 0;
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        if let Some(c) = &mut this.cut {
            match c.ended {
                Some(true) => return Poll::Ready(None),
                Some(false) => {
                    c.ended = Some(true);
                    return Poll::Ready(Some(Err(c.cut.status().into())));
                }
                None => {}
            }
        }
        if !this.data_done {
            if let Some(d) = &mut this.deadline
                && d.as_mut().poll(cx).is_ready()
            {
                return this.fail(
                    Status::deadline_exceeded(
                        "the call's deadline passed while its request was still arriving",
                    ),
                    Ended::DeadlineInTransfer,
                );
            }
            this.release_withheld();
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(mut data))) => {
                    let n = data.len();
                    let mut cut_here = false;
                    if let Some(c) = &mut this.cut {
                        let at = c.mark.delivered.fetch_add(n as u64, Ordering::SeqCst);
                        if let Some(end) = c.take(&mut this.framing, at, &data) {
                            data.truncate(end);
                            cut_here = true;
                        }
                    } else {
                        this.framing.feed(&data);
                    }
                    this.held.add(n);
                    if this.framing.at_boundary() {
                        // The message is whole: from here it is the decoder's and the queue's.
                        this.held.free_all();
                    }
                    if this.held.budget().spent() {
                        this.withheld += n;
                    } else {
                        let _ = this.recv.flow_control().release_capacity(n + this.withheld);
                        this.withheld = 0;
                    }
                    this.stall_armed = false;
                    if let Some(c) = this.cut.as_mut().filter(|_| cut_here) {
                        if data.is_empty() {
                            c.ended = Some(true);
                            return Poll::Ready(Some(Err(c.cut.status().into())));
                        }
                        c.ended = Some(false);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    this.data_done = true;
                    this.held.free_all();
                }
                Poll::Pending => {
                    if let Some(c) = &mut this.cut {
                        // Nothing waiting, between two messages, after the cut: nothing more
                        // of what came before it can be on its way.
                        if this.framing.at_boundary() && c.fired.as_mut().poll(cx).is_ready() {
                            c.ended = Some(true);
                            return Poll::Ready(Some(Err(c.cut.status().into())));
                        }
                    }
                    if !this.framing.at_boundary() {
                        return this.poll_stall(cx);
                    }
                    if this.withheld > 0 {
                        // Between messages with capacity kept back: look at the budget again
                        // soon, the client cannot send until it is given back.
                        this.stall.as_mut().reset(Instant::now() + BUDGET_RECHECK);
                        if this.stall.as_mut().poll(cx).is_ready() {
                            cx.waker().wake_by_ref();
                        }
                    }
                    return Poll::Pending;
                }
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed
            || self.cut.as_ref().is_some_and(|c| c.ended == Some(true))
            || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl RequestBody {
    /// Waits, in the middle of a message, for its next bytes: ends the call if none come for
    /// the transfer timeout (counting from the last bytes), and meanwhile gives back kept
    /// capacity as soon as the budget allows.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let now = Instant::now();
        if !self.stall_armed {
            self.stall_armed = true;
            self.stalled_from = now;
        }
        let stalled_at = self.stalled_from + self.stall_after;
        if now >= stalled_at {
            return self.fail(
                Error::Unavailable {
                    reason: format!(
                        "no bytes of the request message arrived for {} s (--transfer-idle-timeout-secs): the call is ended",
                        self.stall_after.as_secs_f64()
                    ),
                    retry_after: Duration::ZERO,
                }
                .into_status(),
                Ended::RequestStalled,
            );
        }
        let wake = if self.withheld > 0 {
            stalled_at.min(now + BUDGET_RECHECK)
        } else {
            stalled_at
        };
        self.stall.as_mut().reset(wake);
        if self.stall.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }
}

impl Cutting {
    /// Reads `data`, the body's bytes from offset `at`, into `framing`. Returns where in it to
    /// end the body: the first message boundary at or after the cut's limit, if it falls in
    /// `data`.
    fn take(&mut self, framing: &mut Framing, at: u64, data: &[u8]) -> Option<usize> {
        let Some(limit) = self.mark.limit() else {
            framing.feed(data);
            return None;
        };
        // Up to the limit, everything goes; from there, up to the next boundary.
        let free =
            usize::try_from(limit.saturating_sub(at)).map_or(data.len(), |f| f.min(data.len()));
        framing.feed(&data[..free]);
        if at + (free as u64) < limit {
            return None;
        }
        let mut pos = free;
        loop {
            if framing.at_boundary() {
                return Some(pos);
            }
            if pos == data.len() {
                return None;
            }
            pos += framing.feed_to_boundary(&data[pos..]);
        }
    }
}
