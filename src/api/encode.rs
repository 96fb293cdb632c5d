//! Computed outputs to an `EvaluateResponse`, each buffer moved into its tensor without a copy
//! when raw bytes are asked for. Runs on the compute pool, as the batcher's encoder.

use super::convert;
use super::tensor::{WireElement, encode_buf};
use crate::error::Error;
use crate::eval::{Evaluated, Evaluation, Output, Outputs};
use crate::proto;

/// The response to `ev` carrying `out`.
pub fn response(ev: &Evaluation, out: Evaluated) -> Result<proto::EvaluateResponse, Error> {
    Ok(crate::match_float!(out, Evaluated, o => typed(ev, o)))
}

fn typed<T: WireElement>(ev: &Evaluation, mut out: Outputs<T>) -> proto::EvaluateResponse {
    let mut resp = proto::EvaluateResponse {
        request_id: ev.request_id.clone(),
        health: Some(out.health.into()),
        ..Default::default()
    };
    for output in Output::ALL {
        if let Some(buf) = out.take(output) {
            let shape = ev.output_shape(output);
            *convert::output_mut(&mut resp, output) =
                Some(encode_buf(&shape, buf, ev.raw_response));
        }
    }
    resp
}
