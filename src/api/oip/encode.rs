//! Computed outputs to a `ModelInferResponse`: outputs in the order requested, buffers moved
//! (not copied) into `raw_output_contents` or typed contents, the numerical health as response
//! parameters. Runs on the compute pool, as the batcher's encoder.

use std::collections::HashMap;

use half::{bf16, f16};

use super::{MODEL_VERSION, Reply, datatype};
use crate::dtype::Element;
use crate::error::Error;
use crate::eval::names::{HEALTH_NAMES, health_counts};
use crate::eval::{Evaluated, Evaluation, Outputs};
use crate::kernel::Health;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_response::InferOutputTensor;
use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferResponse};
use crate::tensor::Buf;

/// Response parameters carrying the numerical health, named as xent.v1's `NumericalHealth`
/// fields.
pub const HEALTH_PARAMETERS: [&str; 3] = HEALTH_NAMES;

/// The response parameter that says a response is its request's last, when the request set
/// `triton_enable_empty_final_response` (Triton's streaming clients wait for it).
pub const FINAL_RESPONSE: &str = "triton_final_response";

/// The `ModelInferResponse` to the request `reply` came from, carrying `out`, the outputs
/// computed for `ev`. Raw buffers are moved into `raw_output_contents`, not copied. The
/// numerical health counts become response parameters ([`HEALTH_PARAMETERS`]).
pub fn response(
    reply: Reply,
    ev: &Evaluation,
    out: Evaluated,
) -> Result<ModelInferResponse, Error> {
    crate::match_float!(out, Evaluated, o => typed(reply, ev, o))
}

fn typed<T: Contents>(
    reply: Reply,
    ev: &Evaluation,
    mut out: Outputs<T>,
) -> Result<ModelInferResponse, Error> {
    let mut resp = ModelInferResponse {
        model_name: reply.model.name().into(),
        model_version: MODEL_VERSION.into(),
        id: reply.id,
        parameters: health_parameters(out.health),
        ..Default::default()
    };
    if reply.final_flag {
        // Each request has exactly one response, so it is the final one.
        resp.parameters.insert(
            FINAL_RESPONSE.into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::BoolParam(true)),
            },
        );
    }
    for name in reply.outputs {
        let buf = out
            .take(name)
            .ok_or_else(|| Error::Internal(format!("output {name} was not computed")))?;
        let mut tensor = InferOutputTensor {
            name: name.name().into(),
            datatype: datatype(T::DTYPE).into(),
            shape: ev.output_shape(name).iter().map(|&d| d as i64).collect(),
            ..Default::default()
        };
        if reply.raw {
            resp.raw_output_contents.push(buf.into_le_bytes());
        } else {
            tensor.contents = Some(T::contents(buf));
        }
        resp.outputs.push(tensor);
    }
    Ok(resp)
}

/// Float elements as the protocol's typed contents.
trait Contents: Element {
    /// The elements in the contents field of their type (moved where they can be).
    fn contents(buf: Buf<Self>) -> InferTensorContents;
}

impl Contents for f32 {
    fn contents(buf: Buf<f32>) -> InferTensorContents {
        InferTensorContents {
            fp32_contents: buf.into_vec(),
            ..Default::default()
        }
    }
}

impl Contents for f64 {
    fn contents(buf: Buf<f64>) -> InferTensorContents {
        InferTensorContents {
            fp64_contents: buf.into_vec(),
            ..Default::default()
        }
    }
}

/// Halves have no typed contents in the protocol (their outputs travel raw, see `decode`);
/// were they asked for typed, they would go as their exact float32 values.
macro_rules! half_contents {
    ($($t:ty),*) => {$(
        impl Contents for $t {
            fn contents(buf: Buf<$t>) -> InferTensorContents {
                InferTensorContents {
                    fp32_contents: buf.slice().iter().map(|v| v.to_f32()).collect(),
                    ..Default::default()
                }
            }
        }
    )*};
}

half_contents!(f16, bf16);

/// The health counts as int64 parameters (tritonclient reads no uint64 custom parameters).
fn health_parameters(h: Health) -> HashMap<String, InferParameter> {
    health_counts(&h)
        .into_iter()
        .map(|(name, count)| {
            let count = i64::try_from(count).unwrap_or(i64::MAX);
            let value = InferParameter {
                parameter_choice: Some(ParameterChoice::Int64Param(count)),
            };
            (name.to_string(), value)
        })
        .collect()
}
