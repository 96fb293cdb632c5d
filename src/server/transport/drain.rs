//! What a drain does to the calls themselves: every stream the server accepted is counted
//! until it is answered, and the streams that would never end on their own are ended cleanly.
//!
//! HTTP/2's graceful shutdown stops new streams but lets open ones run, so a drain ends only
//! when every open stream has. Unary calls and server-streaming calls end by themselves. Two
//! kinds do not:
//! - client-streaming calls (`EvaluateStream`, reflection): the client may keep sending. When
//!   the connection's [`Cut`] fires (everything the client sent before it learned of the
//!   shutdown has arrived: `conn` says how that is known), each such stream notes how many of
//!   its bytes had arrived ([`Mark`]); its request body ends with UNAVAILABLE at the first
//!   message boundary after them (`stream`). The handler answers every request it read, in
//!   order, then ends the stream with that status, so the client knows which requests to send
//!   elsewhere. A message that had begun to arrive is always read to its end.
//! - health's `Watch`, which streams status changes for as long as the client listens: after
//!   the cut, once it has nothing more to send (NOT_SERVING went out at the signal), it ends
//!   with UNAVAILABLE.
//!
//! [`Streams`] counts every stream from its headers to the end of its answer, so the drain
//! can report what it had to cut off when the grace period ran out (and tests can prove that
//! nothing accepted was lost).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prost::Message as _;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tonic::body::Body;

use crate::error::Error;

/// The moment a draining connection stops reading new requests of client-streaming calls.
/// A request extension, one per connection.
#[derive(Clone, Debug, Default)]
pub struct Cut(Arc<CutInner>);

#[derive(Debug, Default)]
struct CutInner {
    token: CancellationToken,
    marks: Mutex<Vec<Weak<Mark>>>,
    /// Why the connection is going, once the cut has fired.
    why: OnceLock<Going>,
}

/// Why a connection stops taking requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Going {
    /// The server is shutting down.
    Shutdown,
    /// The connection reached its maximum age: its client should reconnect.
    Aged,
    /// The connection was idle.
    Idle,
}

/// Where one client-streaming stream stands at the cut: how many bytes of its body had
/// arrived, read or waiting in h2's buffer.
#[derive(Debug)]
pub struct Mark {
    flow: h2::FlowControl,
    /// Bytes of the body handed to the call so far. Raised before their flow-control
    /// capacity is released, so `delivered + used capacity` never misses a byte.
    pub delivered: AtomicU64,
    limit: OnceLock<u64>,
}

impl Mark {
    /// How many bytes of the body arrived before the cut, once the cut has fired.
    pub fn limit(&self) -> Option<u64> {
        self.limit.get().copied()
    }

    fn set_limit(&self) -> u64 {
        *self.limit.get_or_init(|| {
            self.delivered.load(Ordering::SeqCst) + self.flow.used_capacity() as u64
        })
    }
}

impl Cut {
    /// Registers a client-streaming stream whose flow control is `flow`.
    pub fn register(&self, flow: h2::FlowControl) -> Arc<Mark> {
        let mark = Arc::new(Mark {
            flow,
            delivered: AtomicU64::new(0),
            limit: OnceLock::new(),
        });
        // Under the lock [`Cut::fire`] holds while it fires, so a stream registers either
        // before (and gets its limit from `fire`) or after (and takes it here).
        let mut marks = self.0.marks.lock().expect("marks");
        if self.0.token.is_cancelled() {
            mark.set_limit();
        } else {
            marks.retain(|m| m.strong_count() > 0);
            marks.push(Arc::downgrade(&mark));
        }
        mark
    }

    /// Notes where every registered stream stands, then fires.
    pub fn fire(&self, why: Going) {
        let _ = self.0.why.set(why);
        let mut marks = self.0.marks.lock().expect("marks");
        for mark in marks.drain(..).filter_map(|m| m.upgrade()) {
            mark.set_limit();
        }
        self.0.token.cancel();
    }

    /// Whether it has fired.
    pub fn fired(&self) -> bool {
        self.0.token.is_cancelled()
    }

    /// Completes when it fires.
    pub fn fired_owned(&self) -> WaitForCancellationFutureOwned {
        self.0.token.clone().cancelled_owned()
    }

    /// The status that ends a stream at this cut.
    pub fn status(&self) -> Status {
        match self.0.why.get() {
            Some(Going::Aged | Going::Idle) => aged(),
            _ => draining(),
        }
    }
}

/// The retry delay suggested to a client whose stream was ended by a drain.
const RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// Counts of the streams a server accepted, for its drain report: a stream is answered once
/// the last frame of its answer went to h2, reset when it ended otherwise (the client reset
/// it or went away, or the grace period cut it off).
#[derive(Debug, Default)]
pub struct Streams {
    accepted: AtomicU64,
    answered: AtomicU64,
    reset: AtomicU64,
}

/// One stream counted in [`Streams`] from its headers on: answered if [`Open::answered`] was
/// called before it is dropped, reset otherwise.
#[derive(Debug)]
pub struct Open {
    streams: Arc<Streams>,
    answered: bool,
}

impl Open {
    /// Counts a stream accepted.
    pub fn new(streams: Arc<Streams>) -> Open {
        streams.accepted.fetch_add(1, Ordering::SeqCst);
        Open {
            streams,
            answered: false,
        }
    }

    /// Its answer is out.
    pub fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let count = if self.answered {
            &self.streams.answered
        } else {
            &self.streams.reset
        };
        count.fetch_add(1, Ordering::SeqCst);
    }
}

impl Streams {
    /// Streams accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Streams whose answer was sent to its end.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::SeqCst)
    }

    /// Streams that ended before their answer did: the client reset them or went away, or
    /// the grace period cut them off.
    pub fn reset(&self) -> u64 {
        self.reset.load(Ordering::SeqCst)
    }

    /// Streams accepted and not yet ended.
    pub fn open(&self) -> u64 {
        // Read in this order so that a stream ending meanwhile is never counted as open
        // twice; the result is exact once no stream is starting.
        let ended = self.answered() + self.reset();
        self.accepted().saturating_sub(ended)
    }
}

/// How the methods a server serves stream, read from the descriptor sets of its services.
#[derive(Debug, Default)]
pub struct MethodKinds {
    client_streaming: HashMap<String, bool>,
}

impl MethodKinds {
    /// The methods of every service in the encoded `FileDescriptorSet`s.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<MethodKinds, Error> {
        let mut client_streaming = HashMap::new();
        for set in sets {
            let set = prost_types::FileDescriptorSet::decode(*set)
                .map_err(|e| Error::Internal(format!("descriptor set: {e}")))?;
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        let path = if package.is_empty() {
                            format!("/{}/{}", service.name(), method.name())
                        } else {
                            format!("/{package}.{}/{}", service.name(), method.name())
                        };
                        client_streaming.insert(path, method.client_streaming());
                    }
                }
            }
        }
        Ok(MethodKinds { client_streaming })
    }

    /// Whether the method at `path` takes a stream of requests.
    pub fn is_client_streaming(&self, path: &str) -> bool {
        self.client_streaming.get(path).copied().unwrap_or(false)
    }
}

/// Marks a stream of a connection accepted during the drain (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Late;

/// The tower layer that refuses every call of a late connection but health's, with
/// UNAVAILABLE and a retry delay.
#[derive(Clone, Copy, Debug, Default)]
pub struct LateLayer;

impl<S> tower::Layer<S> for LateLayer {
    type Service = LateService<S>;
    fn layer(&self, inner: S) -> LateService<S> {
        LateService(inner)
    }
}

/// The service wrapper of [`LateLayer`].
#[derive(Clone, Debug)]
pub struct LateService<S>(S);

impl<S> tower::Service<http::Request<Body>> for LateService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        if req.extensions().get::<Late>().is_none() || path.starts_with(crate::server::HEALTH_PATHS)
        {
            return Box::pin(self.0.call(req));
        }
        if let Some(method) = super::super::message_size::method_of(path) {
            crate::metrics::shed(crate::metrics::ShedReason::Draining);
            super::super::call::count_call(
                method,
                std::time::Instant::now(),
                tonic::Code::Unavailable,
            );
        }
        let refusal = Error::Unavailable {
            reason: "xentd is shutting down and takes no new calls; retry on another replica"
                .into(),
            retry_after: RETRY_AFTER,
        }
        .into_status();
        Box::pin(std::future::ready(Ok(refusal.into_http())))
    }
}

/// The one stream that only ends when its client leaves.
const HEALTH_WATCH: &str = "/grpc.health.v1.Health/Watch";

/// The tower layer that ends health's Watch at the cut.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrainLayer;

impl<S> tower::Layer<S> for DrainLayer {
    type Service = DrainService<S>;
    fn layer(&self, inner: S) -> DrainService<S> {
        DrainService { inner }
    }
}

/// The service wrapper of [`DrainLayer`].
#[derive(Clone, Debug)]
pub struct DrainService<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> tower::Service<http::Request<Body>> for DrainService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let cut = req.extensions().get::<Cut>().cloned().unwrap_or_default();
        let watch = req.uri().path() == HEALTH_WATCH;
        let call = self.inner.call(req);
        if !watch {
            return Box::pin(call);
        }
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| {
                Body::new(Watch {
                    inner: body,
                    end_at_cut: Box::pin(cut.fired_owned()),
                    cut: cut.clone(),
                    ended: false,
                })
            }))
        })
    }
}

/// The status that ends a stream at the cut.
pub fn draining() -> Status {
    Error::Unavailable {
        reason: "xentd is shutting down: this stream takes no more requests; send the rest to another replica".into(),
        retry_after: RETRY_AFTER,
    }
    .into_status()
}

/// The status that ends a stream at the cut of a connection past its maximum age.
pub fn aged() -> Status {
    Error::Unavailable {
        reason: "this connection reached its maximum age: it takes no more requests; send the rest on a new connection".into(),
        retry_after: std::time::Duration::ZERO,
    }
    .into_status()
}

/// Health's Watch answer, ended with UNAVAILABLE once the cut has fired and it has
/// nothing more to send.
struct Watch {
    inner: Body,
    end_at_cut: Pin<Box<WaitForCancellationFutureOwned>>,
    cut: Cut,
    ended: bool,
}

impl http_body::Body for Watch {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => {
                ready!(self.end_at_cut.as_mut().poll(cx));
                self.ended = true;
                let mut trailers = http::HeaderMap::new();
                self.cut.status().add_header(&mut trailers)?;
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        };
        match &frame {
            Some(Ok(f)) if f.is_trailers() => self.ended = true,
            None => self.ended = true,
            Some(_) => {}
        }
        Poll::Ready(frame.map(|f| f.map_err(|e| Status::from_error(e.into()))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_kinds_come_from_the_descriptors() {
        let kinds = MethodKinds::from_descriptor_sets(&[
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ])
        .unwrap();
        assert!(kinds.is_client_streaming("/xent.v1.Xent/EvaluateStream"));
        assert!(!kinds.is_client_streaming("/xent.v1.Xent/Evaluate"));
        assert!(!kinds.is_client_streaming(HEALTH_WATCH));
        assert!(!kinds.is_client_streaming("/nope/Nope"));
    }
}
