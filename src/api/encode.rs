//! Computed outputs to an `EvaluateResponse`, handing each buffer to the encoder without a
//! copy when raw bytes are asked for.

use super::tensor::{WireElement, encode};
use crate::eval::{Evaluated, Evaluation, Outputs};
use crate::kernel::Health;
use crate::proto;

/// The response to `ev` carrying `out`.
pub fn response(ev: &Evaluation, out: Evaluated) -> proto::EvaluateResponse {
    match out {
        Evaluated::F16(o) => typed(ev, o),
        Evaluated::BF16(o) => typed(ev, o),
        Evaluated::F32(o) => typed(ev, o),
        Evaluated::F64(o) => typed(ev, o),
    }
}

fn typed<T: WireElement>(ev: &Evaluation, out: Outputs<T>) -> proto::EvaluateResponse {
    let raw = ev.raw_response;
    proto::EvaluateResponse {
        request_id: ev.request_id.clone(),
        loss: out.loss.map(|v| encode(&ev.returned_loss_shape(), v, raw)),
        grad_logits: out.grad_logits.map(|v| encode(&ev.shape, v, raw)),
        grad_labels: out.grad_labels.map(|v| encode(&ev.shape, v, raw)),
        health: Some(health(out.health)),
    }
}

/// The kernel's health counts as sent.
pub fn health(h: Health) -> proto::NumericalHealth {
    proto::NumericalHealth {
        nonfinite_inputs: h.nonfinite_inputs,
        unnormalized_label_rows: h.unnormalized_label_rows,
        nonfinite_loss_rows: h.nonfinite_loss_rows,
    }
}
