//! xent.v1 requests from arbitrary bytes, down the server's path: the protobuf decode of an
//! `EvaluateRequest`, the front's decode and the domain's validation, and for a request that
//! passes, the computation and the encoded response. Nothing may panic, and a refusal is
//! never an internal error (that would be a request validation let through to the kernel).

use prost::Message as _;
use xent::error::Error;

/// Panics on a failure.
pub fn check(data: &[u8]) {
    let Ok(req) = xent::proto::EvaluateRequest::decode(data) else {
        return;
    };
    let ev = match xent::api::decode(req) {
        Ok(ev) => ev,
        Err(Error::Internal(e)) => panic!("decode: internal error {e}"),
        Err(_) => return,
    };
    let out = xent::compute::evaluate(&ev).expect("a validated request computes");
    let resp = xent::api::response(&ev, out).expect("computed outputs encode");
    assert_eq!(resp.request_id, ev.request_id);
}
