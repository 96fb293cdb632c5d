//! gzip for the RPCs of `proto/`, done on tokio's blocking pool instead of the I/O thread.
//!
//! tonic inflates a compressed request and deflates a compressed answer inside the poll of the
//! call, on a tokio worker that also serves every other connection: a 250 KB request that
//! inflates to 250 MiB held that worker for seconds, and so did deflating a 29 MiB answer,
//! and a health check on another connection waited as long. So for the RPCs of `proto/`
//! (health and reflection keep tonic's own handling; their messages are small), this layer
//! does both itself:
//!
//! - **Requests**: when the call says `grpc-encoding: gzip`, each compressed message is
//!   buffered whole (its compressed size is already bounded by `MessageSizeLayer`), inflated
//!   on the blocking pool to at most `--max-message-bytes` (more: RESOURCE_EXHAUSTED, said as
//!   soon as the limit is passed, without inflating the rest; corrupt: INVALID_ARGUMENT),
//!   pre-scanned as the codec would ([`crate::api::codec::prescan_method`]: a bomb of packed
//!   zeros is refused here, before tonic copies it into its buffer on the I/O thread), and
//!   passed on as an uncompressed message, so tonic never inflates.
//! - **Answers**: `gzip` is taken out of the request's `grpc-accept-encoding` so tonic sends
//!   every answer uncompressed; this layer compresses each message itself (those of
//!   [`OFFLOAD_BYTES`] or more on the blocking pool) and says `grpc-encoding: gzip`.

use std::future::Future;
use std::io::{Read as _, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::{Buf as _, BufMut as _, Bytes, BytesMut};
use http::HeaderValue;
use http_body::{Frame, SizeHint};
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::body::Body;

use super::message_size::method_of;
use crate::api::codec::OFFLOAD_BYTES;
use crate::error::Error;
use crate::metrics::{self as m, ShedReason};

const ENCODING: &str = "grpc-encoding";
const ACCEPT: &str = "grpc-accept-encoding";

/// The tower layer doing gzip for the RPCs of `proto/`, with `limit` on inflated messages.
#[derive(Clone, Copy, Debug)]
pub struct GzipLayer {
    limit: usize,
}

impl GzipLayer {
    /// Inflates requests to at most `limit` bytes a message.
    pub fn new(limit: usize) -> GzipLayer {
        GzipLayer { limit }
    }
}

impl<S> tower::Layer<S> for GzipLayer {
    type Service = Gzip<S>;
    fn layer(&self, inner: S) -> Gzip<S> {
        Gzip {
            inner,
            limit: self.limit,
        }
    }
}

/// The service wrapper of [`GzipLayer`].
#[derive(Clone, Debug)]
pub struct Gzip<S> {
    inner: S,
    limit: usize,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> tower::Service<http::Request<Body>> for Gzip<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let Some(method) = method_of(req.uri().path()) else {
            return Box::pin(self.inner.call(req));
        };
        let inflate = req
            .headers()
            .get(ENCODING)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
        let deflate = take_gzip(req.headers_mut());
        if inflate {
            let limit = self.limit;
            req = req.map(|body| {
                Body::new(Inflate {
                    inner: body,
                    frames: Deframer::default(),
                    pending: None,
                    limit,
                    method,
                    arrived: Instant::now(),
                    inner_done: false,
                    failed: false,
                })
            });
        }
        let answer = self.inner.call(req);
        Box::pin(async move {
            let mut resp = answer.await?;
            if deflate {
                resp.headers_mut()
                    .insert(ENCODING, HeaderValue::from_static("gzip"));
                resp = resp.map(|body| {
                    Body::new(Deflate {
                        inner: body,
                        frames: Deframer::default(),
                        pending: None,
                        inner_done: false,
                    })
                });
            }
            Ok(resp)
        })
    }
}

/// Takes `gzip` out of `grpc-accept-encoding`; whether it was there.
fn take_gzip(headers: &mut http::HeaderMap) -> bool {
    let Some(accept) = headers.get(ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let rest: Vec<&str> = accept
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .collect();
    let had = rest.iter().any(|e| e.eq_ignore_ascii_case("gzip"));
    if !had {
        return false;
    }
    let others: Vec<&str> = rest
        .into_iter()
        .filter(|e| !e.eq_ignore_ascii_case("gzip"))
        .collect();
    match HeaderValue::from_str(&others.join(",")) {
        Ok(v) if !others.is_empty() => {
            headers.insert(ACCEPT, v);
        }
        _ => {
            headers.remove(ACCEPT);
        }
    }
    true
}

/// Splits a gRPC body into its messages: a compression flag, a big-endian u32 length, then
/// the message.
#[derive(Debug, Default)]
struct Deframer {
    buf: BytesMut,
}

impl Deframer {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole message, with its compression flag.
    fn next(&mut self) -> Option<(u8, Bytes)> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes(self.buf[1..5].try_into().expect("four bytes")) as usize;
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return None;
        }
        let flag = self.buf[0];
        self.buf.advance(5);
        Some((flag, self.buf.split_to(len).freeze()))
    }

    /// What is left that is not a whole message.
    fn rest(&mut self) -> Option<Bytes> {
        (!self.buf.is_empty()).then(|| self.buf.split().freeze())
    }
}

/// One message with its prefix.
fn frame(flag: u8, message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(flag);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Work on the blocking pool for a body: a JoinHandle, or an answer known at once.
type Pending = JoinHandle<Result<Bytes, Status>>;

fn run(heavy: bool, f: impl FnOnce() -> Result<Bytes, Status> + Send + 'static) -> Pending {
    if heavy {
        tokio::task::spawn_blocking(f)
    } else {
        // Small: not worth a thread hop, but kept in the same shape.
        let out = f();
        tokio::spawn(async move { out })
    }
}

fn joined(r: Result<Result<Bytes, Status>, tokio::task::JoinError>) -> Result<Bytes, Status> {
    r.unwrap_or_else(|e| Err(Error::Internal(format!("gzip work failed: {e}")).into_status()))
}

/// A request body whose gzip messages are inflated on the blocking pool.
struct Inflate {
    inner: Body,
    frames: Deframer,
    pending: Option<Pending>,
    limit: usize,
    method: &'static str,
    arrived: Instant,
    inner_done: bool,
    failed: bool,
}

/// Inflates `message` to at most `limit` bytes, as an uncompressed gRPC message (prefix
/// included, so the inflated bytes are not copied again).
fn inflate(message: &[u8], limit: usize) -> Result<Bytes, Error> {
    let mut out = Vec::with_capacity(5 + (message.len() * 4).min(limit));
    out.extend_from_slice(&[0; 5]);
    let read = flate2::read::GzDecoder::new(message)
        .take(limit as u64 + 1)
        .read_to_end(&mut out);
    let len = out.len() - 5;
    match read {
        Err(e) => Err(Error::invalid(
            "request",
            format!("is gzip-compressed but does not inflate ({e})"),
        )),
        Ok(_) if len > limit => Err(Error::ResourceExhausted(format!(
            "the request message inflates to more than {limit} bytes; this server accepts messages of at most {limit} bytes, compressed or not (raise it with --max-message-bytes (XENT_MAX_MESSAGE_BYTES), or send fewer rows per request)"
        ))),
        Ok(_) => {
            out[1..5].copy_from_slice(&(len as u32).to_be_bytes());
            Ok(out.into())
        }
    }
}

impl Inflate {
    /// A refusal of the body, counted and logged as `MessageSizeLayer` counts its own (no
    /// handler sees the message).
    fn refuse(method: &'static str, arrived: Instant, e: Error) -> Status {
        if e.code() == tonic::Code::ResourceExhausted {
            m::shed(ShedReason::TooLarge);
        }
        super::call::count_call(method, arrived, e.code());
        tracing::info!(method, code = m::code_label(e.code()), error = %e.message(), "refused");
        e.into_status()
    }
}

impl http_body::Body for Inflate {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if this.failed {
                return Poll::Ready(None);
            }
            if let Some(pending) = &mut this.pending {
                let out = joined(ready!(Pin::new(pending).poll(cx)));
                this.pending = None;
                return Poll::Ready(Some(match out {
                    Ok(message) => Ok(Frame::data(message)),
                    Err(status) => {
                        this.failed = true;
                        Err(status)
                    }
                }));
            }
            if let Some((flag, message)) = this.frames.next() {
                if flag == 0 {
                    return Poll::Ready(Some(Ok(Frame::data(frame(0, &message)))));
                }
                let (limit, method, arrived) = (this.limit, this.method, this.arrived);
                // Always on the blocking pool: a few compressed bytes can inflate to megabytes.
                this.pending = Some(run(true, move || {
                    // Pre-scanned here, before tonic copies the inflated message into its
                    // own buffer on the I/O thread.
                    inflate(&message, limit)
                        .and_then(|m| {
                            crate::api::codec::prescan_method(method, &m[5..])?;
                            Ok(m)
                        })
                        .map_err(|e| Inflate::refuse(method, arrived, e))
                }));
                continue;
            }
            if this.inner_done {
                // A truncated message is passed on as it is, for tonic to refuse.
                return Poll::Ready(this.frames.rest().map(|b| Ok(Frame::data(b))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => this.frames.push(&data),
                    Err(f) => return Poll::Ready(Some(Ok(f))),
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.inner_done = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed
            || (self.pending.is_none()
                && self.frames.buf.is_empty()
                && (self.inner_done || self.inner.is_end_stream()))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// An answer body whose messages are gzip-compressed, large ones on the blocking pool.
struct Deflate {
    inner: Body,
    frames: Deframer,
    pending: Option<Pending>,
    inner_done: bool,
}

fn deflate(message: &[u8]) -> Result<Bytes, Status> {
    let mut out = Vec::with_capacity(5 + message.len() / 2);
    out.extend_from_slice(&[1, 0, 0, 0, 0]);
    let mut gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    gz.write_all(message)
        .and_then(|()| gz.finish())
        .map(|mut out| {
            let len = (out.len() - 5) as u32;
            out[1..5].copy_from_slice(&len.to_be_bytes());
            Bytes::from(out)
        })
        .map_err(|e| Error::Internal(format!("compressing the answer: {e}")).into_status())
}

impl http_body::Body for Deflate {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        loop {
            if let Some(pending) = &mut this.pending {
                let out = joined(ready!(Pin::new(pending).poll(cx)));
                this.pending = None;
                return Poll::Ready(Some(out.map(Frame::data)));
            }
            if let Some((flag, message)) = this.frames.next() {
                if flag != 0 {
                    // Already compressed (not by tonic, which was told not to): as it is.
                    return Poll::Ready(Some(Ok(Frame::data(frame(flag, &message)))));
                }
                this.pending = Some(run(message.len() >= OFFLOAD_BYTES, move || {
                    deflate(&message)
                }));
                continue;
            }
            if this.inner_done {
                return Poll::Ready(this.frames.rest().map(|b| Ok(Frame::data(b))));
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(f)) => match f.into_data() {
                    Ok(data) => this.frames.push(&data),
                    // Trailers come after every message.
                    Err(f) => {
                        this.inner_done = true;
                        if let Some(rest) = this.frames.rest() {
                            this.frames.push(&rest);
                        }
                        return Poll::Ready(Some(Ok(f)));
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.inner_done = true,
            }
        }
    }

    // An answer with nothing to send (an error, trailers-only) must say so at once, as tonic's
    // own body does, or its status would follow an empty DATA frame that ends the stream.
    fn is_end_stream(&self) -> bool {
        self.pending.is_none()
            && self.frames.buf.is_empty()
            && (self.inner_done || self.inner.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_loses_gzip_only() {
        let mut h = http::HeaderMap::new();
        h.insert(ACCEPT, HeaderValue::from_static("identity, gzip,deflate"));
        assert!(take_gzip(&mut h));
        assert_eq!(h[ACCEPT], "identity,deflate");
        h.insert(ACCEPT, HeaderValue::from_static("gzip"));
        assert!(take_gzip(&mut h));
        assert!(h.get(ACCEPT).is_none());
        assert!(!take_gzip(&mut h));
    }

    #[test]
    fn messages_are_split_across_any_frames() {
        let mut wire = frame(0, b"abc").to_vec();
        wire.extend_from_slice(&frame(1, b""));
        wire.extend_from_slice(&frame(0, &[7; 300]));
        for cut in 0..wire.len() {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                d.push(part);
                while let Some(m) = d.next() {
                    got.push(m);
                }
            }
            assert_eq!(got.len(), 3, "cut {cut}");
            assert_eq!(got[0], (0, Bytes::from_static(b"abc")));
            assert_eq!(got[1], (1, Bytes::new()));
            assert_eq!(got[2].1.len(), 300);
            assert!(d.rest().is_none());
        }
    }

    #[test]
    fn inflation_stops_at_the_limit() {
        let zeros = vec![0u8; 1 << 20];
        let gz = deflate(&zeros).unwrap();
        assert!(gz.len() < 10_000, "{}", gz.len());
        assert_eq!(inflate(&gz[5..], 1 << 20).unwrap(), frame(0, &zeros));
        let e = inflate(&gz[5..], (1 << 20) - 1).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let e = inflate(b"not gzip", 100).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }
}
