//! The client side of the protocol: an xent.v1 request as the equivalent `ModelInferRequest`,
//! and a `ModelInferResponse` read back into tensors. Used by `xent bench --protocol oip` and
//! the tests, so both protocols are driven by the same requests.

use std::collections::HashMap;

use super::{datatype, parameter, parse_datatype};
use crate::api::convert;
use crate::api::tensor::{self, AnyTensor};
use crate::eval::{Input, OptionName};
use crate::proto;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
};

/// The `ModelInferRequest` equivalent to an xent.v1 request, for clients. With `raw`, every
/// tensor must carry `raw_data` (or no data) and goes to `raw_input_contents`; without it,
/// every tensor must carry its typed field and goes to `contents`. `outputs` and the options
/// become requested outputs and parameters of the same names.
pub fn infer_request(
    mut req: proto::EvaluateRequest,
    raw: bool,
) -> Result<ModelInferRequest, String> {
    let model =
        convert::loss_kind(req.loss).map_err(|_| format!("loss {} names no model", req.loss))?;
    let mut out = ModelInferRequest {
        model_name: model.name().into(),
        id: std::mem::take(&mut req.request_id),
        ..Default::default()
    };
    for name in OptionName::ALL {
        if let Some(v) = convert::option(&req, name).map_err(|e| e.to_string())? {
            out.parameters.insert(
                name.name().into(),
                InferParameter {
                    parameter_choice: Some(parameter(v)),
                },
            );
        }
    }
    let tensors = Input::ALL.map(|i| (i.name(), convert::input_mut(&mut req, i).take()));
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
        let name = convert::output(o).map_err(|_| format!("output {o} has no name"))?;
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
