//! A `ModelInferRequest` to the [`Evaluation`] xent.v1 would make of the same request: the
//! protocol's own rules (datatype strings, raw versus typed contents, parameter types,
//! output names) are checked here, everything else by [`crate::api::decode()`].

use std::collections::HashMap;

use bytes::Bytes;

use super::{INPUTS, OutputName, PARAMETERS, Reply, model, parse_datatype};
use crate::api::tensor;
use crate::dtype::DType;
use crate::error::Error;
use crate::eval::{Evaluation, LossKind};
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};

/// Validates a `ModelInferRequest` into the [`Evaluation`] xent.v1 would make of the same
/// request, and what its response needs.
pub fn decode(req: ModelInferRequest) -> Result<(Evaluation, Reply), Error> {
    let model = model(&req.model_name, &req.model_version)?;
    let (evaluate, reply) = to_evaluate_request(model, req)?;
    let ev = crate::api::decode(evaluate).map_err(|e| match e {
        // The one field whose name differs between the protocols.
        Error::InvalidArgument { field, reason } if field == "request_id" => {
            Error::invalid("id", reason)
        }
        other => other,
    })?;
    Ok((ev, reply))
}

/// The xent.v1 request a `ModelInferRequest` for `model` means; tensor bytes are moved, not
/// copied.
fn to_evaluate_request(
    model: LossKind,
    req: ModelInferRequest,
) -> Result<(proto::EvaluateRequest, Reply), Error> {
    let ModelInferRequest {
        id,
        parameters,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = req;
    let raw = !raw_input_contents.is_empty();
    if raw && raw_input_contents.len() != inputs.len() {
        return Err(Error::invalid(
            "raw_input_contents",
            format!(
                "has {} entries for {} inputs; give one per input, in the order of inputs",
                raw_input_contents.len(),
                inputs.len()
            ),
        ));
    }
    let mut out = proto::EvaluateRequest {
        request_id: id.clone(),
        loss: match model {
            LossKind::Dense => proto::LossKind::SoftmaxCrossEntropy,
            LossKind::Sparse => proto::LossKind::SparseSoftmaxCrossEntropy,
        } as i32,
        ..Default::default()
    };
    options(&parameters, &mut out)?;

    let mut logits_dtype = None;
    let mut raws = raw_input_contents.into_iter();
    for input in inputs {
        let data = raws.next();
        let name = input.name.clone();
        let slot = match name.as_str() {
            "logits" => &mut out.logits,
            "labels" => &mut out.labels,
            "class_weights" => &mut out.class_weights,
            "sample_weights" => &mut out.sample_weights,
            "upstream" => &mut out.upstream,
            _ => {
                return Err(Error::invalid(
                    name.clone(),
                    format!(
                        "is not an input of model {}; its inputs are {}",
                        model.name(),
                        INPUTS.join(", ")
                    ),
                ));
            }
        };
        if slot.is_some() {
            return Err(Error::invalid(name, "is given more than once"));
        }
        let t = input_tensor(input, data)?;
        if name == "logits" {
            logits_dtype = tensor::dtype_from_proto(t.dtype);
        }
        *slot = Some(t);
    }

    // Halves have no typed contents in the protocol, so their outputs always travel raw.
    let raw_response = raw || matches!(logits_dtype, Some(DType::F16 | DType::BF16));
    out.response_encoding = if raw_response {
        proto::Encoding::Raw
    } else {
        proto::Encoding::Typed
    } as i32;

    let wanted = requested_outputs(model, outputs)?;
    out.outputs = wanted.iter().map(|o| o.to_proto() as i32).collect();
    Ok((
        out,
        Reply {
            model,
            id,
            outputs: wanted,
            raw: raw_response,
        },
    ))
}

/// Request parameters into the options of `out`.
fn options(
    parameters: &HashMap<String, InferParameter>,
    out: &mut proto::EvaluateRequest,
) -> Result<(), Error> {
    // Sorted, so the error for several bad parameters does not depend on hashing.
    let mut names: Vec<&String> = parameters.keys().collect();
    names.sort();
    for name in names {
        let value = parameters[name].parameter_choice.as_ref();
        let wrong = |expected: &str| {
            Error::invalid(
                name.clone(),
                format!("is {}; expected {expected}", describe(value)),
            )
        };
        match name.as_str() {
            "axis" => out.axis = Some(int(value).ok_or_else(|| wrong("an int64_param"))?),
            "ignore_index" => {
                out.ignore_index = Some(int(value).ok_or_else(|| wrong("an int64_param"))?);
            }
            "label_smoothing" => {
                out.label_smoothing = float(value).ok_or_else(|| wrong("a double_param"))?;
            }
            "z_loss" => out.z_loss = float(value).ok_or_else(|| wrong("a double_param"))?,
            "from_logits" => match value {
                Some(ParameterChoice::BoolParam(b)) => out.from_logits = Some(*b),
                _ => return Err(wrong("a bool_param")),
            },
            "reduction" => {
                let Some(ParameterChoice::StringParam(s)) = value else {
                    return Err(wrong("a string_param"));
                };
                out.reduction = reduction(s).ok_or_else(|| {
                    Error::invalid(
                        name.clone(),
                        format!(
                            "is {s:?}; expected none, sum, mean, sum_over_batch_size or sum_by_nonzero_weights"
                        ),
                    )
                })? as i32;
            }
            _ => {
                return Err(Error::invalid(
                    name.clone(),
                    format!(
                        "is not a parameter xentd knows; the parameters are {}",
                        PARAMETERS.join(", ")
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn int(v: Option<&ParameterChoice>) -> Option<i64> {
    match v? {
        ParameterChoice::Int64Param(i) => Some(*i),
        ParameterChoice::Uint64Param(u) => i64::try_from(*u).ok(),
        _ => None,
    }
}

/// A double, or an integer (clients send `0` as an int64).
fn float(v: Option<&ParameterChoice>) -> Option<f64> {
    match v? {
        ParameterChoice::DoubleParam(d) => Some(*d),
        ParameterChoice::Int64Param(i) => Some(*i as f64),
        ParameterChoice::Uint64Param(u) => Some(*u as f64),
        _ => None,
    }
}

fn describe(v: Option<&ParameterChoice>) -> String {
    match v {
        None => "unset".into(),
        Some(ParameterChoice::BoolParam(b)) => format!("bool_param {b}"),
        Some(ParameterChoice::Int64Param(i)) => format!("int64_param {i}"),
        Some(ParameterChoice::StringParam(s)) => format!("string_param {s:?}"),
        Some(ParameterChoice::DoubleParam(d)) => format!("double_param {d}"),
        Some(ParameterChoice::Uint64Param(u)) => format!("uint64_param {u}"),
    }
}

fn reduction(s: &str) -> Option<proto::Reduction> {
    Some(match s {
        "none" => proto::Reduction::None,
        "sum" => proto::Reduction::Sum,
        "mean" => proto::Reduction::Mean,
        "sum_over_batch_size" => proto::Reduction::SumOverBatchSize,
        "sum_by_nonzero_weights" => proto::Reduction::SumByNonzeroWeights,
        _ => return None,
    })
}

/// One input as an xent.v1 tensor; `raw` is its entry of `raw_input_contents`, if the request
/// uses them.
fn input_tensor(input: InferInputTensor, raw: Option<Bytes>) -> Result<proto::Tensor, Error> {
    let InferInputTensor {
        name,
        datatype,
        shape,
        parameters,
        contents,
    } = input;
    if !parameters.is_empty() {
        let mut keys: Vec<&String> = parameters.keys().collect();
        keys.sort();
        return Err(Error::invalid(
            name,
            format!(
                "has parameters {keys:?}; xentd takes none on inputs (shared memory is not supported: send the data in the request)"
            ),
        ));
    }
    let dtype = parse_datatype(&datatype).ok_or_else(|| {
        Error::invalid(
            name.clone(),
            format!("has datatype {datatype:?}; expected FP16, BF16, FP32, FP64, INT32 or INT64"),
        )
    })?;
    let mut t = proto::Tensor {
        dtype: tensor::dtype_to_proto(dtype) as i32,
        shape,
        ..Default::default()
    };
    let contents = contents.unwrap_or_default();
    let typed = typed_fields(&contents);
    if let Some(raw) = raw {
        if let Some(field) = typed.first() {
            return Err(Error::invalid(
                name,
                format!(
                    "carries {field}, but the request uses raw_input_contents; use one or the other for every input"
                ),
            ));
        }
        t.raw_data = raw;
        return Ok(t);
    }
    let expected = match dtype {
        DType::F16 | DType::BF16 => {
            if let Some(field) = typed.first() {
                return Err(Error::invalid(
                    name,
                    format!(
                        "carries {field}, but {} has no typed contents in the protocol; send it in raw_input_contents",
                        datatype
                    ),
                ));
            }
            return Ok(t);
        }
        DType::F32 => "fp32_contents",
        DType::F64 => "fp64_contents",
        DType::I32 => "int_contents",
        DType::I64 => "int64_contents",
    };
    if let Some(field) = typed.iter().find(|&&f| f != expected) {
        return Err(Error::invalid(
            name,
            format!(
                "carries {field} for datatype {datatype}; use {expected} or raw_input_contents"
            ),
        ));
    }
    let InferTensorContents {
        int_contents,
        int64_contents,
        fp32_contents,
        fp64_contents,
        ..
    } = contents;
    t.float_data = fp32_contents;
    t.double_data = fp64_contents;
    t.int32_data = int_contents;
    t.int64_data = int64_contents;
    Ok(t)
}

/// The typed fields of `c` that hold values.
fn typed_fields(c: &InferTensorContents) -> Vec<&'static str> {
    [
        ("bool_contents", c.bool_contents.is_empty()),
        ("int_contents", c.int_contents.is_empty()),
        ("int64_contents", c.int64_contents.is_empty()),
        ("uint_contents", c.uint_contents.is_empty()),
        ("uint64_contents", c.uint64_contents.is_empty()),
        ("fp32_contents", c.fp32_contents.is_empty()),
        ("fp64_contents", c.fp64_contents.is_empty()),
        ("bytes_contents", c.bytes_contents.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, empty)| (!empty).then_some(name))
    .collect()
}

/// The outputs asked for, in the order asked; the default outputs when none are.
fn requested_outputs(
    model: LossKind,
    outputs: Vec<InferRequestedOutputTensor>,
) -> Result<Vec<OutputName>, Error> {
    if outputs.is_empty() {
        return Ok(OutputName::DEFAULT.to_vec());
    }
    let mut wanted = Vec::with_capacity(outputs.len());
    for o in outputs {
        let Some(&name) = OutputName::of(model).iter().find(|n| n.name() == o.name) else {
            let names: Vec<&str> = OutputName::of(model).iter().map(|n| n.name()).collect();
            return Err(Error::invalid(
                "outputs",
                format!(
                    "asks for {:?}, which is not an output of model {}; its outputs are {}",
                    o.name,
                    model.name(),
                    names.join(", ")
                ),
            ));
        };
        if wanted.contains(&name) {
            return Err(Error::invalid(
                "outputs",
                format!("asks for {:?} more than once", o.name),
            ));
        }
        if !o.parameters.is_empty() {
            return Err(Error::invalid(
                "outputs",
                format!(
                    "gives parameters for {:?}; xentd's outputs take none",
                    o.name
                ),
            ));
        }
        wanted.push(name);
    }
    Ok(wanted)
}
