//! xent.v1's answer to a `ModelInferResponse`: outputs in the order requested, buffers moved
//! (not copied) into `raw_output_contents` or typed contents, the numerical health as response
//! parameters.

use std::collections::HashMap;

use super::{MODEL_VERSION, OutputName, Reply, datatype};
use crate::api::tensor;
use crate::error::Error;
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_response::InferOutputTensor;
use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferResponse};

/// The `ModelInferResponse` carrying `resp`, the xent.v1 answer to the request `reply` came
/// from. Raw buffers are moved into `raw_output_contents`, not copied. The numerical health
/// counts become response parameters of the same names ([`HEALTH_PARAMETERS`]).
pub fn response(reply: Reply, resp: proto::EvaluateResponse) -> Result<ModelInferResponse, Error> {
    let proto::EvaluateResponse {
        mut loss,
        mut grad_logits,
        mut grad_labels,
        health,
        ..
    } = resp;
    let mut out = ModelInferResponse {
        model_name: reply.model.name().into(),
        model_version: MODEL_VERSION.into(),
        id: reply.id,
        parameters: health.map(health_parameters).unwrap_or_default(),
        ..Default::default()
    };
    for name in reply.outputs {
        let t = match name {
            OutputName::Loss => loss.take(),
            OutputName::GradLogits => grad_logits.take(),
            OutputName::GradLabels => grad_labels.take(),
        }
        .ok_or_else(|| Error::Internal(format!("output {} was not computed", name.name())))?;
        let dtype = tensor::dtype_from_proto(t.dtype)
            .ok_or_else(|| Error::Internal(format!("output {} has no dtype", name.name())))?;
        let mut tensor = InferOutputTensor {
            name: name.name().into(),
            datatype: datatype(dtype).into(),
            shape: t.shape,
            ..Default::default()
        };
        if reply.raw {
            out.raw_output_contents.push(t.raw_data);
        } else {
            tensor.contents = Some(InferTensorContents {
                fp32_contents: t.float_data,
                fp64_contents: t.double_data,
                ..Default::default()
            });
        }
        out.outputs.push(tensor);
    }
    Ok(out)
}

/// Response parameters carrying xent.v1's `NumericalHealth`, named as its fields.
pub const HEALTH_PARAMETERS: [&str; 3] = [
    "nonfinite_inputs",
    "unnormalized_label_rows",
    "nonfinite_loss_rows",
];

/// The health counts as int64 parameters (tritonclient reads no uint64 custom parameters).
fn health_parameters(h: proto::NumericalHealth) -> HashMap<String, InferParameter> {
    [
        h.nonfinite_inputs,
        h.unnormalized_label_rows,
        h.nonfinite_loss_rows,
    ]
    .into_iter()
    .zip(HEALTH_PARAMETERS)
    .map(|(count, name)| {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        let value = InferParameter {
            parameter_choice: Some(ParameterChoice::Int64Param(count)),
        };
        (name.to_string(), value)
    })
    .collect()
}
