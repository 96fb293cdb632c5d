//! A `ModelInferRequest` to the [`Evaluation`] xent.v1 would make of the same request: the
//! protocol's own rules (datatype strings, raw versus typed contents, parameter types,
//! output names) are checked here, everything else by [`crate::api::decode()`].

use std::collections::HashMap;

use bytes::Bytes;

use super::{Reply, model, option_value, parameter_type, parse_datatype};
use crate::api::{convert, tensor};
use crate::dtype::DType;
use crate::echo;
use crate::error::Error;
use crate::eval::{Evaluation, Input, LossKind, Named, OptionName, Output};
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
        loss: proto::LossKind::from(model) as i32,
        ..Default::default()
    };
    options(&parameters, &mut out)?;

    let mut logits_dtype = None;
    let mut raws = raw_input_contents.into_iter();
    for input in inputs {
        let data = raws.next();
        let name = input.name.clone();
        let Some(which) = Input::from_name(&name) else {
            return Err(Error::invalid(
                name,
                format!(
                    "is not an input of model {}; its inputs are {}",
                    model.name(),
                    names(Input::ALL)
                ),
            ));
        };
        let slot = convert::input_mut(&mut out, which);
        if slot.is_some() {
            return Err(Error::invalid(name, "is given more than once"));
        }
        let t = input_tensor(input, data)?;
        if which == Input::Logits {
            logits_dtype = tensor::dtype_from_proto(t.dtype);
        }
        *slot = Some(t);
    }

    // Halves have no typed contents in the protocol, so their outputs always travel raw.
    let raw_response = raw || matches!(logits_dtype, Some(DType::F16 | DType::BF16));
    out.response_encoding = convert::encoding(raw_response) as i32;

    let wanted = requested_outputs(model, outputs)?;
    out.outputs = wanted
        .iter()
        .map(|&o| proto::Output::from(o) as i32)
        .collect();
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

/// Names joined by commas.
fn names<T: Named>(all: impl IntoIterator<Item = T>) -> String {
    all.into_iter().map(T::name).collect::<Vec<_>>().join(", ")
}

/// Request parameters into the options of `out`, each read as the kind of its option.
fn options(
    parameters: &HashMap<String, InferParameter>,
    out: &mut proto::EvaluateRequest,
) -> Result<(), Error> {
    // Sorted, so the error for several bad parameters does not depend on hashing.
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    for key in keys {
        let Some(name) = OptionName::from_name(key) else {
            return Err(Error::invalid(
                key.clone(),
                format!(
                    "is not a parameter xentd knows; the parameters are {}",
                    names(OptionName::ALL)
                ),
            ));
        };
        let p = parameters[key].parameter_choice.as_ref();
        let value = option_value(name.kind(), p).map_err(|bad| {
            let reason = match bad {
                Some(s) => format!(
                    "is {}; expected {}",
                    echo::Quoted(&s),
                    crate::eval::Reduction::names_or()
                ),
                None => format!(
                    "is {}; expected {}",
                    describe(p),
                    parameter_type(name.kind())
                ),
            };
            Error::invalid(key.clone(), reason)
        })?;
        convert::set_option(out, name, value)
            .map_err(|_| Error::Internal(format!("{name} read as another kind")))?;
    }
    Ok(())
}

fn describe(v: Option<&ParameterChoice>) -> String {
    match v {
        None => "unset".into(),
        Some(ParameterChoice::BoolParam(b)) => format!("bool_param {b}"),
        Some(ParameterChoice::Int64Param(i)) => format!("int64_param {i}"),
        Some(ParameterChoice::StringParam(s)) => format!("string_param {}", echo::Quoted(s)),
        Some(ParameterChoice::DoubleParam(d)) => format!("double_param {d}"),
        Some(ParameterChoice::Uint64Param(u)) => format!("uint64_param {u}"),
    }
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
                "has parameters {}; xentd takes none on inputs (shared memory is not supported: send the data in the request)",
                echo::List(&keys)
            ),
        ));
    }
    let dtype = parse_datatype(&datatype).ok_or_else(|| {
        Error::invalid(
            name.clone(),
            format!(
                "has datatype {}; expected FP16, BF16, FP32, FP64, INT32 or INT64",
                echo::Quoted(&datatype)
            ),
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
) -> Result<Vec<Output>, Error> {
    if outputs.is_empty() {
        return Ok(Output::DEFAULT.to_vec());
    }
    let mut wanted = Vec::with_capacity(outputs.len());
    for o in outputs {
        let Some(&name) = model.outputs().iter().find(|n| n.name() == o.name) else {
            return Err(Error::invalid(
                "outputs",
                format!(
                    "asks for {}, which is not an output of model {}; its outputs are {}",
                    echo::Quoted(&o.name),
                    model.name(),
                    names(model.outputs().iter().copied())
                ),
            ));
        };
        if wanted.contains(&name) {
            return Err(Error::invalid(
                "outputs",
                format!("asks for {} more than once", echo::Quoted(&o.name)),
            ));
        }
        if !o.parameters.is_empty() {
            return Err(Error::invalid(
                "outputs",
                format!(
                    "gives parameters for {}; xentd's outputs take none",
                    echo::Quoted(&o.name)
                ),
            ));
        }
        wanted.push(name);
    }
    Ok(wanted)
}
