//! The message size limit (`--max-message-bytes`) in both directions, refused with
//! RESOURCE_EXHAUSTED naming the limit, the size and the flag that raises it.
//!
//! tonic's codec refuses a message over its limit with OUT_OF_RANGE and a message about its
//! own buffers, which reads like a bug and gives a client nothing to act on; a request over a
//! hard limit should be refused as such, and never retried. So:
//! - Inbound, [`MessageSizeLayer`] wraps the body of every call of an RPC in `proto/`
//!   (`xent.v1.Xent`, the Open Inference Protocol; the list is written from the protos by the
//!   build, so a new RPC is covered without anyone listing it) and reads the 5-byte gRPC prefix
//!   of every message as its frames arrive. A prefix announcing more than the
//!   limit ends the body with a [`tonic::Status`] error before the message is buffered; tonic
//!   hands a `Status` found in a body error to the caller unchanged (`Status::from_error`
//!   downcasts), as the call's status (unary) or the request stream's error (streaming).
//!   Messages before it in the same frame still reach the decoder. The limit applies to the
//!   message as sent (compressed, if it is); tonic's own codec keeps the same limit for the
//!   decompressed size.
//! - Outbound, [`answer_bytes_at_least`] lets a handler refuse before computing an answer whose
//!   data alone would be over the limit, and [`check_answer`] refuses the exact encoded size
//!   after computing, so tonic's encoder never meets an answer over the limit.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tonic::Status;
use tonic::body::Body;

use super::framing::Framing;
use crate::error::Error;
use crate::eval::{Evaluation, Reduction};
use crate::metrics::{self as m, ShedReason};

/// The flag (and environment variable) that sets the limit, named in every refusal.
const FLAG: &str = "--max-message-bytes (XENT_MAX_MESSAGE_BYTES)";

/// The tower layer refusing request messages of the RPCs in `proto/` over `limit` bytes.
#[derive(Clone, Copy, Debug)]
pub struct MessageSizeLayer {
    limit: usize,
}

impl MessageSizeLayer {
    /// Refuses request messages longer than `limit` bytes.
    pub fn new(limit: usize) -> MessageSizeLayer {
        MessageSizeLayer { limit }
    }
}

impl<S> tower::Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;
    fn layer(&self, inner: S) -> MessageSize<S> {
        MessageSize {
            inner,
            limit: self.limit,
        }
    }
}

/// The service wrapper of [`MessageSizeLayer`].
#[derive(Clone, Debug)]
pub struct MessageSize<S> {
    inner: S,
    limit: usize,
}

impl<S> tower::Service<http::Request<Body>> for MessageSize<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The method label comes from a closed set (the protos' RPCs); a path outside it is
        // another service's (health, reflection, which keep tonic's own limit) or answered
        // UNIMPLEMENTED by tonic.
        let Some(method) = method_of(req.uri().path()) else {
            return self.inner.call(req);
        };
        let limit = self.limit;
        self.inner.call(req.map(|body| {
            Body::new(Limited {
                inner: body,
                limit,
                method,
                arrived: Instant::now(),
                scan: Scan::default(),
                refusal: None,
                done: false,
            })
        }))
    }
}

/// The name of the RPC at `path`, if it is one of `proto/`'s.
pub(super) fn method_of(path: &str) -> Option<&'static str> {
    crate::proto::METHODS
        .iter()
        .find(|(p, _)| *p == path)
        .map(|&(_, name)| name)
}

/// Where the scan of a body's messages stands.
#[derive(Debug, Default)]
struct Scan(Framing);

impl Scan {
    /// Reads `data`; on a prefix announcing more than `limit` bytes, returns where that prefix
    /// starts in `data` (0 if it began in an earlier frame) and the announced length.
    fn feed(&mut self, data: &[u8], limit: usize) -> Option<(usize, u64)> {
        let mut at = 0;
        while at < data.len() {
            // A prefix completed by this step began where the step did (or in an earlier
            // frame, when the step starts at 0).
            let (n, len) = self.0.step(&data[at..]);
            if let Some(len) = len.filter(|&l| l > limit as u64) {
                return Some((at, len));
            }
            at += n;
        }
        None
    }
}

/// A request body that ends with RESOURCE_EXHAUSTED at the first message over the limit.
struct Limited {
    inner: Body,
    limit: usize,
    method: &'static str,
    arrived: Instant,
    scan: Scan,
    /// The refusal to yield after the data before the oversized message.
    refusal: Option<Status>,
    done: bool,
}

impl Limited {
    fn refuse(&self, len: u64) -> Status {
        m::shed(ShedReason::TooLarge);
        super::call::count_call(self.method, self.arrived, tonic::Code::ResourceExhausted);
        let e = Error::ResourceExhausted(format!(
            "the request message is {len} bytes; this server accepts messages of at most {} bytes (raise it with {FLAG}, or send fewer rows per request)",
            self.limit
        ));
        // As the handlers log every call not answered OK (no handler sees this one).
        tracing::info!(method = self.method, code = "RESOURCE_EXHAUSTED", error = %e.message(), "refused");
        e.into_status()
    }
}

impl http_body::Body for Limited {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(refusal) = self.refusal.take() {
            self.done = true;
            return Poll::Ready(Some(Err(refusal)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let frame = match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let Some(data) = frame.data_ref() else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let limit = self.limit;
        let Some((start, len)) = self.scan.feed(data, limit) else {
            return Poll::Ready(Some(Ok(frame)));
        };
        let refusal = self.refuse(len);
        if start == 0 {
            self.done = true;
            return Poll::Ready(Some(Err(refusal)));
        }
        // The messages before the oversized one are decoded and answered first.
        let before = frame.into_data().expect("a data frame").slice(..start);
        self.refusal = Some(refusal);
        Poll::Ready(Some(Ok(Frame::data(before))))
    }

    fn is_end_stream(&self) -> bool {
        self.refusal.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.refusal.is_some() || self.done {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

/// The fewest bytes the answer to `ev` can take encoded: its data alone, without shapes or
/// framing.
pub fn answer_bytes_at_least(ev: &Evaluation) -> usize {
    let dtype = ev.tensors.dtype();
    let per_element = if ev.raw_response {
        dtype.size()
    } else {
        crate::api::tensor::typed_size(dtype)
    };
    let losses = match ev.options.reduction {
        Reduction::None => ev.layout.rows(),
        _ => 1,
    };
    let elements = ev.elements();
    let w = ev.wanted;
    per_element
        * (usize::from(w.loss) * losses
            + (usize::from(w.grad_logits) + usize::from(w.grad_labels)) * elements)
}

/// Refuses an answer of `bytes` encoded bytes (at least) over `limit`.
pub fn check_answer(bytes: usize, limit: usize, computed: bool) -> Result<(), Error> {
    if bytes <= limit {
        return Ok(());
    }
    m::shed(ShedReason::TooLarge);
    let size = if computed {
        format!("is {bytes} bytes")
    } else {
        format!("would be at least {bytes} bytes")
    };
    Err(Error::ResourceExhausted(format!(
        "the answer {size}; this server sends messages of at most {limit} bytes (raise it with {FLAG}, or ask for fewer outputs, raw encoding or fewer rows per request)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(len: u32) -> Vec<u8> {
        let mut m = vec![0u8];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, len as usize));
        m
    }

    #[test]
    fn prefixes_are_read_across_frames_and_messages() {
        let mut wire = message(10);
        wire.extend(message(3));
        wire.extend(message(0));
        wire.extend(message(20));
        let big_at = wire.len() - 25;
        // Every split of the wire into two frames finds the oversized prefix where it starts.
        for cut in 0..=wire.len() {
            let mut scan = Scan::default();
            let (a, b) = wire.split_at(cut);
            match scan.feed(a, 15) {
                Some(found) => {
                    assert!(cut > big_at + 4, "cut {cut}");
                    assert_eq!(found, (big_at, 20), "cut {cut}");
                }
                None => {
                    let (start, len) = scan.feed(b, 15).expect("found in the second frame");
                    assert_eq!(len, 20);
                    assert_eq!(start, big_at.saturating_sub(cut), "cut {cut}");
                }
            }
        }
        let mut scan = Scan::default();
        assert_eq!(scan.feed(&wire[..big_at], 15), None, "all under the limit");
        assert_eq!(
            scan.feed(&message(15), 15),
            None,
            "the limit itself is allowed"
        );
    }

    /// The few fields of `google.protobuf.FileDescriptorSet` that name the RPCs.
    mod descriptor {
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct FileDescriptorSet {
            #[prost(message, repeated, tag = "1")]
            pub file: Vec<File>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct File {
            #[prost(string, tag = "2")]
            pub package: String,
            #[prost(message, repeated, tag = "6")]
            pub service: Vec<Service>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Service {
            #[prost(string, tag = "1")]
            pub name: String,
            #[prost(message, repeated, tag = "2")]
            pub method: Vec<Method>,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        pub struct Method {
            #[prost(string, tag = "1")]
            pub name: String,
        }
    }

    #[test]
    fn every_rpc_of_the_protos_is_limited_under_its_name() {
        assert_eq!(method_of("/xent.v1.Xent/Evaluate"), Some("Evaluate"));
        assert_eq!(
            method_of("/xent.v1.Xent/EvaluateStream"),
            Some("EvaluateStream")
        );
        assert_eq!(
            method_of("/inference.GRPCInferenceService/ModelInfer"),
            Some("ModelInfer")
        );
        assert_eq!(
            method_of("/inference.GRPCInferenceService/ServerLive"),
            Some("ServerLive")
        );
        assert_eq!(method_of("/grpc.health.v1.Health/Check"), None);
        assert_eq!(method_of("/xent.v1.Xent/Nope"), None);
        // Every RPC of the descriptor set served for reflection is in the list.
        use prost::Message as _;
        let fds = descriptor::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut rpcs = 0;
        for f in &fds.file {
            for s in &f.service {
                for m in &s.method {
                    let path = format!("/{}.{}/{}", f.package, s.name, m.name);
                    assert_eq!(method_of(&path), Some(m.name.as_str()), "{path}");
                    rpcs += 1;
                }
            }
        }
        assert_eq!(rpcs, crate::proto::METHODS.len());
    }

    #[test]
    fn answers_over_the_limit_name_the_size_and_the_flag() {
        assert!(check_answer(100, 100, true).is_ok());
        let e = check_answer(101, 100, false).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        let text = e.to_string();
        assert!(text.contains("at least 101 bytes"), "{text}");
        assert!(text.contains("at most 100 bytes"), "{text}");
        assert!(text.contains("--max-message-bytes"), "{text}");
    }
}

/// How large an answer may be: the message limit, less what the RPC wraps around it.
#[derive(Clone, Copy, Debug)]
pub(super) struct AnswerRoom {
    /// The message limit, less the wrapper's fixed fields.
    pub bytes: usize,
    /// Whether the answer is wrapped in an `EvaluateStreamResponse` (as field 2, `response`).
    pub in_stream: bool,
}

impl AnswerRoom {
    /// Refuses an answer of `answer` bytes (at least, unless `computed`) that does not fit.
    pub fn check(self, answer: usize, computed: bool) -> Result<(), Error> {
        // A one-byte tag and the length as a varint.
        let wrapper = if self.in_stream {
            1 + prost::encoding::encoded_len_varint(answer as u64)
        } else {
            0
        };
        check_answer(answer + wrapper, self.bytes, computed)
    }
}
