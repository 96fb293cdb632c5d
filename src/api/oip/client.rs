//! The client side of the protocol: an xent.v1 request as the equivalent `ModelInferRequest`,
//! and a `ModelInferResponse` read back into tensors. Used by `xent bench --protocol oip` and
//! the tests, so both protocols are driven by the same requests.

use std::collections::HashMap;

use super::{OutputName, datatype, parse_datatype};
use crate::api::tensor::{self, AnyTensor};
use crate::eval::LossKind;
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};

/// The `ModelInferRequest` equivalent to an xent.v1 request, for clients. With `raw`, every
/// tensor must carry `raw_data` (or no data) and goes to `raw_input_contents`; without it,
/// every tensor must carry its typed field and goes to `contents`. `outputs` and the options
/// become requested outputs and parameters of the same names.
pub fn infer_request(req: proto::EvaluateRequest, raw: bool) -> Result<ModelInferRequest, String> {
    let model = match proto::LossKind::try_from(req.loss) {
        Ok(proto::LossKind::SoftmaxCrossEntropy) => LossKind::Dense,
        Ok(proto::LossKind::SparseSoftmaxCrossEntropy) => LossKind::Sparse,
        _ => return Err(format!("loss {} names no model", req.loss)),
    };
    let mut out = ModelInferRequest {
        model_name: model.name().into(),
        id: req.request_id,
        ..Default::default()
    };
    let mut param = |name: &str, p: ParameterChoice| {
        out.parameters.insert(
            name.into(),
            InferParameter {
                parameter_choice: Some(p),
            },
        );
    };
    if let Some(a) = req.axis {
        param("axis", ParameterChoice::Int64Param(a));
    }
    if req.label_smoothing != 0.0 {
        param(
            "label_smoothing",
            ParameterChoice::DoubleParam(req.label_smoothing),
        );
    }
    if let Some(k) = req.ignore_index {
        param("ignore_index", ParameterChoice::Int64Param(k));
    }
    if let Some(f) = req.from_logits {
        param("from_logits", ParameterChoice::BoolParam(f));
    }
    if req.z_loss != 0.0 {
        param("z_loss", ParameterChoice::DoubleParam(req.z_loss));
    }
    if let Some(r) = proto::Reduction::try_from(req.reduction)
        .ok()
        .and_then(reduction_name)
    {
        param("reduction", ParameterChoice::StringParam(r.into()));
    }
    let tensors = [
        ("logits", req.logits),
        ("labels", req.labels),
        ("class_weights", req.class_weights),
        ("sample_weights", req.sample_weights),
        ("upstream", req.upstream),
    ];
    for (name, t) in tensors {
        let Some(t) = t else { continue };
        let dtype = tensor::dtype_from_proto(t.dtype).ok_or(format!("{name} has no dtype"))?;
        let has_typed = !(t.float_data.is_empty()
            && t.double_data.is_empty()
            && t.int32_data.is_empty()
            && t.int64_data.is_empty());
        let mut input = InferInputTensor {
            name: name.into(),
            datatype: datatype(dtype).into(),
            shape: t.shape,
            ..Default::default()
        };
        if raw {
            if has_typed {
                return Err(format!("{name} carries typed data; raw_data is needed"));
            }
            out.raw_input_contents.push(t.raw_data);
        } else {
            if !t.raw_data.is_empty() {
                return Err(format!("{name} carries raw_data; typed data is needed"));
            }
            input.contents = Some(InferTensorContents {
                fp32_contents: t.float_data,
                fp64_contents: t.double_data,
                int_contents: t.int32_data,
                int64_contents: t.int64_data,
                ..Default::default()
            });
        }
        out.inputs.push(input);
    }
    for o in req.outputs {
        let name = match proto::Output::try_from(o) {
            Ok(proto::Output::Loss) => OutputName::Loss,
            Ok(proto::Output::GradLogits) => OutputName::GradLogits,
            Ok(proto::Output::GradLabels) => OutputName::GradLabels,
            _ => return Err(format!("output {o} has no name")),
        };
        out.outputs.push(InferRequestedOutputTensor {
            name: name.name().into(),
            parameters: HashMap::new(),
        });
    }
    Ok(out)
}

/// The outputs of a `ModelInferResponse`, by name, decoded like xent.v1 tensors (raw or
/// typed, length checked against shape and datatype).
pub fn outputs(resp: ModelInferResponse) -> Result<Vec<(String, AnyTensor)>, String> {
    let raw = !resp.raw_output_contents.is_empty();
    if raw && resp.raw_output_contents.len() != resp.outputs.len() {
        return Err(format!(
            "{} raw_output_contents for {} outputs",
            resp.raw_output_contents.len(),
            resp.outputs.len()
        ));
    }
    let mut raws = resp.raw_output_contents.into_iter();
    let mut decoded = Vec::with_capacity(resp.outputs.len());
    for o in resp.outputs {
        let dtype = parse_datatype(&o.datatype)
            .ok_or_else(|| format!("output {} has datatype {:?}", o.name, o.datatype))?;
        let mut t = proto::Tensor {
            dtype: tensor::dtype_to_proto(dtype) as i32,
            shape: o.shape,
            ..Default::default()
        };
        if raw {
            t.raw_data = raws.next().unwrap_or_default();
        } else {
            let c = o.contents.unwrap_or_default();
            t.float_data = c.fp32_contents;
            t.double_data = c.fp64_contents;
        }
        let a = tensor::decode(Some(t)).map_err(|e| format!("output {} {e}", o.name))?;
        decoded.push((o.name, a));
    }
    Ok(decoded)
}

/// The lower-case protocol name of an xent.v1 reduction (`None` for unspecified).
fn reduction_name(r: proto::Reduction) -> Option<&'static str> {
    Some(match r {
        proto::Reduction::Unspecified => return None,
        proto::Reduction::None => "none",
        proto::Reduction::Sum => "sum",
        proto::Reduction::Mean => "mean",
        proto::Reduction::SumOverBatchSize => "sum_over_batch_size",
        proto::Reduction::SumByNonzeroWeights => "sum_by_nonzero_weights",
    })
}
