//! The scan of gRPC message prefixes (a flag byte and a big-endian u32 length) that refuses a
//! request message over `--max-message-bytes` before it is buffered: the server's
//! `MessageSizeLayer`, given a request body cut into arbitrary frames, against a plain reading
//! of the same bytes as one buffer.
//!
//! Whatever the cut, the body must deliver exactly the bytes before the first message whose
//! prefix announces more than the limit (and, when that prefix began in an earlier frame, the
//! frames already passed on), then RESOURCE_EXHAUSTED naming the announced length, then end.
//! With no such message, or on a path outside the protos' RPCs, every byte and the trailers
//! pass unchanged.
//!
//! The input: the limit (u16, little-endian), which path (an index into the protos' RPCs, or
//! any other value for a path outside them), whether trailers follow, then frames, each a
//! length byte and that many bytes (fewer for the last if the input ends).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use tonic::body::Body;
use tower::{Layer as _, Service as _};

use crate::draw::Draw;

/// A request body of given frames.
struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = tonic::Status;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }
}

/// Where the first message announcing more than `limit` bytes starts, and its length.
fn first_oversized(wire: &[u8], limit: u64) -> Option<(usize, u64)> {
    let mut at = 0;
    while at + 5 <= wire.len() {
        let len = u64::from(u32::from_be_bytes(wire[at + 1..at + 5].try_into().unwrap()));
        if len > limit {
            return Some((at, len));
        }
        at += 5 + len as usize;
    }
    None
}

/// Panics on a failure.
pub fn check(data: &[u8]) {
    let mut d = Draw(data);
    let limit = usize::from(d.u16());
    let path = d.u8();
    let with_trailers = d.bool();
    let mut rest = d.rest();
    let mut frames = Vec::new();
    while let Some((&n, tail)) = rest.split_first() {
        let n = usize::from(n).min(tail.len());
        frames.push(&tail[..n]);
        rest = &tail[n..];
    }

    let methods = xent::proto::METHODS;
    let path = methods
        .get(usize::from(path))
        .map_or("/grpc.health.v1.Health/Check", |m| m.0);
    let limited = methods.iter().any(|m| m.0 == path);
    let wire: Vec<u8> = frames.concat();
    let mut body_frames: VecDeque<_> = frames
        .iter()
        .map(|f| Frame::data(Bytes::copy_from_slice(f)))
        .collect();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-end", http::HeaderValue::from_static("1"));
    if with_trailers {
        body_frames.push_back(Frame::trailers(trailers.clone()));
    }
    let inner = tower::service_fn(|req: http::Request<Body>| async move {
        Ok::<_, Infallible>(req.into_body())
    });
    let mut service = xent::server::MessageSizeLayer::new(limit).layer(inner);
    let request = http::Request::builder()
        .uri(path)
        .body(Body::new(Frames(body_frames)))
        .unwrap();
    let mut body = futures::executor::block_on(service.call(request)).unwrap();

    let mut delivered = Vec::new();
    let mut refusal = None;
    let mut got_trailers = false;
    let mut polls = 0;
    let next = |body: &mut Body| {
        futures::executor::block_on(std::future::poll_fn(|cx| {
            Pin::new(&mut *body).poll_frame(cx)
        }))
    };
    while let Some(frame) = next(&mut body) {
        polls += 1;
        assert!(polls <= frames.len() + 2, "the body does not end");
        assert!(refusal.is_none(), "a frame after the refusal");
        match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => {
                    assert!(!got_trailers, "data after the trailers");
                    delivered.extend_from_slice(&data);
                }
                Err(frame) => {
                    assert_eq!(frame.into_trailers().unwrap(), trailers);
                    got_trailers = true;
                }
            },
            Err(status) => refusal = Some(status),
        }
    }

    let oversized = if limited {
        first_oversized(&wire, limit as u64)
    } else {
        None
    };
    let Some((start, len)) = oversized else {
        assert!(refusal.is_none(), "refused: {refusal:?}");
        assert!(delivered == wire, "bytes lost or changed");
        assert_eq!(got_trailers, with_trailers);
        return;
    };
    // The frame holding the prefix's last byte begins at `frame_start`.
    let mut frame_start = 0;
    for f in &frames {
        if frame_start + f.len() > start + 4 {
            break;
        }
        frame_start += f.len();
    }
    let status = refusal.expect("a message over the limit was not refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let says = format!("is {len} bytes");
    assert!(status.message().contains(&says), "{status:?}");
    assert!(!got_trailers, "trailers after the refusal");
    assert_eq!(delivered.len(), start.max(frame_start), "bytes delivered");
    assert!(delivered == wire[..delivered.len()], "bytes changed");
}
