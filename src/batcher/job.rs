//! What a waiting request carries, and how its answer gets back to its caller.
//!
//! The batcher does not know what an answer looks like: each front hands over, with its
//! request, an encoder from the computed outputs to its own answer (an xent.v1
//! `EvaluateResponse`, an Open Inference Protocol `ModelInferResponse`, ...). A [`Reply`]
//! joins that encoder to the oneshot channel the caller waits on, behind one object type, so
//! requests of every front wait in one queue and batch together. The encoder runs where the
//! batch job runs, on the compute pool: encoding a large answer never runs on a tokio thread.

use std::panic::{AssertUnwindSafe, catch_unwind};

use tokio::sync::oneshot;

use crate::error::Error;
use crate::eval::{Evaluated, Evaluation};

/// What a waiting request carries.
pub(super) struct Job {
    /// The validated request.
    pub ev: Evaluation,
    /// The caller's `rpc` span, re-entered where the request is computed.
    pub span: tracing::Span,
    /// Open while the request waits; closed at dispatch.
    pub queue_span: tracing::Span,
    /// Where the answer goes.
    pub reply: Box<dyn Reply>,
}

/// A request's way back to its caller: its front's encoder and its caller's channel.
pub(super) trait Reply: Send {
    /// Whether the caller stopped waiting (the answer would go nowhere).
    fn is_closed(&self) -> bool;
    /// Encodes the computed outputs (or keeps the error) for [`Reply::send`]. A panic in the
    /// encoder becomes [`Error::Internal`].
    fn encode(&mut self, ev: &Evaluation, result: Result<Evaluated, Error>);
    /// Sends what [`Reply::encode`] made.
    fn send(self: Box<Self>);
    /// Answers with `error` instead, without computing.
    fn refuse(self: Box<Self>, error: Error);
}

/// The answer of a caller waiting for an `R`.
pub(super) type Answer<R> = oneshot::Receiver<Result<R, Error>>;

/// A [`Reply`] that encodes with `encoder`, and the channel its answer arrives on.
pub(super) fn reply<R, E>(encoder: E) -> (Box<dyn Reply>, Answer<R>)
where
    R: Send + 'static,
    E: FnOnce(&Evaluation, Evaluated) -> Result<R, Error> + Send + 'static,
{
    let (tx, rx) = oneshot::channel();
    let reply = Encoding {
        tx,
        encoder: Some(encoder),
        answer: None,
    };
    (Box::new(reply), rx)
}

struct Encoding<R, E> {
    tx: oneshot::Sender<Result<R, Error>>,
    encoder: Option<E>,
    answer: Option<Result<R, Error>>,
}

impl<R, E> Reply for Encoding<R, E>
where
    R: Send,
    E: FnOnce(&Evaluation, Evaluated) -> Result<R, Error> + Send,
{
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn encode(&mut self, ev: &Evaluation, result: Result<Evaluated, Error>) {
        let encoder = self.encoder.take();
        self.answer = Some(result.and_then(|out| {
            let encoder = encoder.ok_or_else(|| Error::Internal("encoded twice".into()))?;
            tracing::debug_span!("encode").in_scope(|| {
                catch_unwind(AssertUnwindSafe(|| encoder(ev, out)))
                    .unwrap_or_else(|_| Err(panicked()))
            })
        }));
    }

    fn send(self: Box<Self>) {
        let answer = self
            .answer
            .unwrap_or_else(|| Err(Error::Internal("the answer was never encoded".into())));
        // The receiver is gone when the caller went away; nothing to do then.
        let _ = self.tx.send(answer);
    }

    fn refuse(self: Box<Self>, error: Error) {
        let _ = self.tx.send(Err(error));
    }
}

/// The error of a request whose computation panicked.
pub(super) fn panicked() -> Error {
    Error::Internal("the kernel panicked on this request".into())
}
