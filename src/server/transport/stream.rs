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

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body as _, Frame, SizeHint};
use tonic::body::Body;
use tower::ServiceExt as _;

use super::GrpcService;
use super::drain::{Cut, Late, Mark, MethodKinds, Open, draining};

/// Serves one stream: calls `service` with its request, sends the answer, and counts it in
/// `open`. A reset by the client drops the call.
pub async fn serve_stream(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    service: impl GrpcService,
    cut: Cut,
    kinds: Arc<MethodKinds>,
    late: bool,
    open: Open,
) {
    let (mut parts, recv) = request.into_parts();
    let body = RequestBody::new(recv, &cut, kinds.is_client_streaming(parts.uri.path()));
    parts.extensions.insert(cut);
    if late {
        parts.extensions.insert(Late);
    }
    let call = service.oneshot(http::Request::from_parts(parts, Body::new(body)));
    tokio::pin!(call);
    let answer = tokio::select! {
        biased;
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return,
        answer = &mut call => match answer {
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
    if send_body(body, tx).await {
        open.answered();
    }
}

/// Sends `body` on `tx`: data as the client's window allows, then trailers. A reset by the
/// client ends it; a body error resets the stream. True when all of it went out.
async fn send_body(mut body: Body, mut tx: SendStream<Bytes>) -> bool {
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
                match send_data(&mut tx, data, end).await {
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
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), ()> {
    if data.is_empty() {
        return tx.send_data(data, end).map_err(drop);
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = std::future::poll_fn(|cx| {
            if tx.poll_reset(cx).is_ready() {
                return Poll::Ready(None);
            }
            tx.poll_capacity(cx)
        })
        .await;
        let n = match granted {
            Some(Ok(n)) if n > 0 => n.min(data.len()),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(()),
        };
        let piece = data.split_to(n);
        tx.send_data(piece, end && data.is_empty()).map_err(drop)?;
    }
    Ok(())
}

/// A request body read from h2, its capacity released as it is read. For a client-streaming
/// call it ends, once the connection's cut has fired, at the first message boundary after
/// the bytes that had arrived by then.
struct RequestBody {
    recv: RecvStream,
    data_done: bool,
    cut: Option<Cutting>,
}

/// The cut of one client-streaming request body.
struct Cutting {
    mark: Arc<Mark>,
    fired: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    framing: Framing,
    /// Ended at the cut: the draining status is due (`Some(false)`) or given (`Some(true)`).
    ended: Option<bool>,
}

impl RequestBody {
    fn new(mut recv: RecvStream, cut: &Cut, client_streaming: bool) -> RequestBody {
        let cut = client_streaming.then(|| Cutting {
            mark: cut.register(recv.flow_control().clone()),
            fired: Box::pin(cut.fired_owned()),
            framing: Framing::default(),
            ended: None,
        });
        RequestBody {
            recv,
            data_done: false,
            cut,
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
        if let Some(c) = &mut this.cut {
            match c.ended {
                Some(true) => return Poll::Ready(None),
                Some(false) => {
                    c.ended = Some(true);
                    return Poll::Ready(Some(Err(draining().into())));
                }
                None => {}
            }
        }
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(mut data))) => {
                    let n = data.len();
                    let mut cut_here = false;
                    if let Some(c) = &mut this.cut {
                        let at = c.mark.delivered.fetch_add(n as u64, Ordering::SeqCst);
                        if let Some(end) = c.take(at, &data) {
                            data.truncate(end);
                            cut_here = true;
                        }
                    }
                    let _ = this.recv.flow_control().release_capacity(n);
                    if let Some(c) = this.cut.as_mut().filter(|_| cut_here) {
                        if data.is_empty() {
                            c.ended = Some(true);
                            return Poll::Ready(Some(Err(draining().into())));
                        }
                        c.ended = Some(false);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => {
                    if let Some(c) = &mut this.cut {
                        // Nothing waiting, between two messages, after the cut: nothing more
                        // of what came before it can be on its way.
                        if c.framing.at_boundary() && c.fired.as_mut().poll(cx).is_ready() {
                            c.ended = Some(true);
                            return Poll::Ready(Some(Err(draining().into())));
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
        self.cut.as_ref().is_some_and(|c| c.ended == Some(true)) || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Cutting {
    /// Reads `data`, the body's bytes from offset `at`. Returns where in it to end the body:
    /// the first message boundary at or after the cut's limit, if it falls in `data`.
    fn take(&mut self, at: u64, data: &[u8]) -> Option<usize> {
        let Some(limit) = self.mark.limit() else {
            self.framing.feed(data);
            return None;
        };
        // Up to the limit, everything goes; from there, up to the next boundary.
        let free =
            usize::try_from(limit.saturating_sub(at)).map_or(data.len(), |f| f.min(data.len()));
        self.framing.feed(&data[..free]);
        if at + (free as u64) < limit {
            return None;
        }
        let mut pos = free;
        loop {
            if self.framing.at_boundary() {
                return Some(pos);
            }
            if pos == data.len() {
                return None;
            }
            pos += self.framing.feed_to_boundary(&data[pos..]);
        }
    }
}

/// Length of the gRPC message prefix: a compression flag and a big-endian u32 length.
const PREFIX: usize = 5;

/// Where a byte stream of gRPC messages stands: inside a message, or between two.
#[derive(Debug, Default)]
struct Framing {
    prefix: [u8; PREFIX],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
}

impl Framing {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = self.feed_to_boundary(data);
            data = &data[n..];
        }
    }

    /// Reads `data` up to the end of the current message (or of `data`); returns how much.
    fn feed_to_boundary(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        while at < data.len() {
            if self.remaining > 0 {
                let skip = self.remaining.min((data.len() - at) as u64);
                self.remaining -= skip;
                at += skip as usize;
                if self.remaining == 0 {
                    return at;
                }
                continue;
            }
            let take = (PREFIX - self.have).min(data.len() - at);
            self.prefix[self.have..self.have + take].copy_from_slice(&data[at..at + take]);
            self.have += take;
            at += take;
            if self.have == PREFIX {
                self.have = 0;
                let len = u32::from_be_bytes(self.prefix[1..].try_into().expect("four bytes"));
                self.remaining = u64::from(len);
                if len == 0 {
                    return at;
                }
            }
        }
        at
    }

    /// Between two messages: nothing of a next one has arrived.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&n.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, n as usize));
        m
    }

    #[test]
    fn framing_knows_when_it_is_between_messages() {
        let mut bytes = msg(3);
        bytes.extend(msg(0));
        bytes.extend(msg(10));
        // Boundaries after 8, 13 and 28 bytes, whatever the pieces.
        for chunk in [1, 2, 3, 7, 28] {
            let mut f = Framing::default();
            assert!(f.at_boundary());
            let mut at = 0;
            for piece in bytes.chunks(chunk) {
                f.feed(piece);
                at += piece.len();
                assert_eq!(
                    f.at_boundary(),
                    [0, 8, 13, 28].contains(&at),
                    "{chunk} {at}"
                );
            }
        }
    }

    #[test]
    fn feeding_to_a_boundary_stops_at_each_message_end() {
        let mut bytes = msg(3);
        bytes.extend(msg(0));
        bytes.extend(msg(10));
        let mut f = Framing::default();
        assert_eq!(f.feed_to_boundary(&bytes), 8);
        assert_eq!(f.feed_to_boundary(&bytes[8..]), 5);
        assert_eq!(f.feed_to_boundary(&bytes[13..20]), 7);
        assert!(!f.at_boundary());
        assert_eq!(f.feed_to_boundary(&bytes[20..]), 8);
        assert!(f.at_boundary());
    }
}
