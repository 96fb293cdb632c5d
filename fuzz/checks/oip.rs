//! Open Inference Protocol requests from arbitrary bytes, down the server's path: the protobuf
//! decode of a `ModelInferRequest`, the front's translation and the domain's validation, and
//! for a request that passes, the computation and the encoded `ModelInferResponse`. Nothing may
//! panic, and a refusal is never an internal error.

use prost::Message as _;
use xent::error::Error;
use xent::proto::inference::ModelInferRequest;

/// Panics on a failure.
pub fn check(data: &[u8]) {
    let Ok(req) = ModelInferRequest::decode(data) else {
        return;
    };
    let (ev, _schedule, reply) = match xent::api::oip::decode::decode(req) {
        Ok(decoded) => decoded,
        Err(Error::Internal(e)) => panic!("decode: internal error {e}"),
        Err(_) => return,
    };
    let out = xent::compute::evaluate(&ev).expect("a validated request computes");
    xent::api::oip::encode::response(reply, &ev, out).expect("computed outputs encode");
}
