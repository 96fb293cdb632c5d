//! Stamps each call with the instant its HTTP/2 headers arrived, before its message is read.
//!
//! A drain must finish calls that began before it and refuse those that begin after; a large
//! unary request can still be arriving when SIGTERM comes, so "began" is taken here, at the
//! headers, not when the handler finally runs.

use std::task::{Context, Poll};
use std::time::Instant;

/// When a call's headers arrived (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Arrived(pub Instant);

/// The tower layer adding [`Arrived`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ArrivalLayer;

impl<S> tower::Layer<S> for ArrivalLayer {
    type Service = Stamp<S>;
    fn layer(&self, inner: S) -> Stamp<S> {
        Stamp(inner)
    }
}

/// The service wrapper of [`ArrivalLayer`].
#[derive(Clone, Debug)]
pub struct Stamp<S>(S);

impl<S, B> tower::Service<http::Request<B>> for Stamp<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(Arrived(Instant::now()));
        self.0.call(req)
    }
}

/// The arrival stamp of a tonic request, or now if it has none.
pub fn arrived<T>(req: &tonic::Request<T>) -> Instant {
    req.extensions()
        .get::<Arrived>()
        .map_or_else(Instant::now, |a| a.0)
}
