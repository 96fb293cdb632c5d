//! A `ModelInferRequest` to the [`Evaluation`] xent.v1 would make of the same request: the
//! protocol's own rules (datatype strings, raw versus typed contents, parameter types,
//! output names) are checked here, everything else by [`crate::api::decode()`].
//!
//! Triton's reserved request parameters are read here too, into the domain's terms:
//! `priority` (a level of the batcher's queue, 0 the default) and `timeout` (how long the
//! request may wait in the queue, in microseconds, 0 no limit) into a [`Schedule`];
//! `triton_enable_empty_final_response` into the [`Reply`] (a stream's answers then say they
//! are final). Every other `triton_` parameter is accepted and ignored: the prefix is
//! Triton's, its clients send them, and none changes what xentd computes. The sequence
//! batcher's parameters are refused: xentd's models keep no state between requests.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::{Reply, model, option_value, parameter_type, parse_datatype};
use crate::api::{convert, tensor};
use crate::batcher::Schedule;
use crate::dtype::DType;
use crate::echo;
use crate::error::Error;
use crate::eval::{Evaluation, Input, LossKind, Named, OptionName, Output};
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};

/// Validates a `ModelInferRequest` into the [`Evaluation`] xent.v1 would make of the same
/// request, how it waits in the queue, and what its response needs.
pub fn decode(req: ModelInferRequest) -> Result<(Evaluation, Schedule, Reply), Error> {
    let model = model(&req.model_name, &req.model_version)?;
    let (evaluate, schedule, reply) = to_evaluate_request(model, req)?;
    let ev = crate::api::decode(evaluate).map_err(|e| match e {
        // The one field whose name differs between the protocols.
        Error::InvalidArgument { field, reason } if field == "request_id" => {
            Error::invalid("id", reason)
        }
        other => other,
    })?;
    Ok((ev, schedule, reply))
}

/// The xent.v1 request a `ModelInferRequest` for `model` means; tensor bytes are moved, not
/// copied.
fn to_evaluate_request(
    model: LossKind,
    req: ModelInferRequest,
) -> Result<(proto::EvaluateRequest, Schedule, Reply), Error> {
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
    let reserved = options(&parameters, &mut out)?;

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

    batched_scalars(model, &mut out);

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
        reserved.schedule,
        Reply {
            model,
            id,
            outputs: wanted,
            raw: raw_response,
            final_flag: reserved.final_flag,
        },
    ))
}

/// Triton's reshape of a batch of scalars: an input with one value per row (sparse labels,
/// sample weights, upstream) may come shaped as the rows with a trailing dimension of 1, as
/// `ModelConfig` declares it (`dims: [1]`, `reshape: []`: a batching model's input cannot
/// have no dimension but the batch), and is taken shaped as the rows. The shape is the only
/// thing that changes; the elements and their order are the same. Such a shape is never
/// valid as it is, so nothing that was accepted changes meaning.
fn batched_scalars(model: LossKind, out: &mut proto::EvaluateRequest) {
    let Some(logits) = &out.logits else { return };
    let rank = logits.shape.len() as i64;
    let axis = out.axis.unwrap_or(-1);
    let axis = if axis < 0 { axis + rank } else { axis };
    // A bad axis is refused by the shared validation.
    let Ok(axis) = usize::try_from(axis) else {
        return;
    };
    if axis >= logits.shape.len() {
        return;
    }
    let mut rows = logits.shape.clone();
    rows.remove(axis);
    let mut with_one = rows.clone();
    with_one.push(1);
    let mut inputs = vec![Input::SampleWeights, Input::Upstream];
    if model == LossKind::Sparse {
        inputs.push(Input::Labels);
    }
    for input in inputs {
        if let Some(t) = convert::input_mut(out, input)
            && t.shape == with_one
        {
            t.shape.clone_from(&rows);
        }
    }
}

/// Names joined by commas.
fn names<T: Named>(all: impl IntoIterator<Item = T>) -> String {
    all.into_iter().map(T::name).collect::<Vec<_>>().join(", ")
}

/// What Triton's reserved request parameters ask for.
#[derive(Debug, Default)]
struct Reserved {
    schedule: Schedule,
    final_flag: bool,
}

/// Request parameters into the options of `out`, each read as the kind of its option, and
/// Triton's reserved parameters into what they ask for.
fn options(
    parameters: &HashMap<String, InferParameter>,
    out: &mut proto::EvaluateRequest,
) -> Result<Reserved, Error> {
    // Sorted, so the error for several bad parameters does not depend on hashing.
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    let mut reserved = Reserved::default();
    for key in keys {
        let p = parameters[key].parameter_choice.as_ref();
        if reserved_parameter(key, p, &mut reserved)? {
            continue;
        }
        let Some(name) = OptionName::from_name(key) else {
            return Err(Error::invalid(
                key.clone(),
                format!(
                    "is not a parameter xentd knows; the parameters are {}",
                    names(OptionName::ALL)
                ),
            ));
        };
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
    Ok(reserved)
}

/// Reads `key` into `reserved` if it is one of Triton's reserved parameters (`Ok(true)`).
fn reserved_parameter(
    key: &str,
    p: Option<&ParameterChoice>,
    reserved: &mut Reserved,
) -> Result<bool, Error> {
    // A non-negative integer, as an int64_param or a uint64_param.
    let count = |what: &str| match p {
        Some(ParameterChoice::Int64Param(i)) if *i >= 0 => Ok(i.unsigned_abs()),
        Some(ParameterChoice::Uint64Param(u)) => Ok(*u),
        _ => Err(Error::invalid(
            key,
            format!(
                "is {}; expected a non-negative int64_param or uint64_param ({what})",
                describe(p)
            ),
        )),
    };
    match key {
        "priority" => {
            let level = count("the priority level: 1 first, 0 the default")?;
            reserved.schedule.level = match level {
                0 => None,
                l => Some(l),
            };
        }
        "timeout" => {
            let us = count("the queue timeout in microseconds, 0 for none")?;
            reserved.schedule.queue_timeout = (us > 0).then(|| Duration::from_micros(us));
        }
        "triton_enable_empty_final_response" => match p {
            Some(ParameterChoice::BoolParam(b)) => reserved.final_flag = *b,
            _ => {
                return Err(Error::invalid(
                    key,
                    format!("is {}; expected a bool_param", describe(p)),
                ));
            }
        },
        "sequence_id" | "sequence_start" | "sequence_end" => {
            return Err(Error::invalid(
                key,
                "is a parameter of Triton's sequence batcher; xentd's models keep no state between requests, so they take no sequences",
            ));
        }
        k if k.starts_with("triton_") => {}
        _ => return Ok(false),
    }
    Ok(true)
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
    let binary_data_size = input_parameters(&name, &parameters)?;
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
        if let Some(size) = binary_data_size.filter(|&s| s != raw.len() as u64) {
            return Err(Error::invalid(
                name,
                format!(
                    "has binary_data_size {size}, but its entry of raw_input_contents has {} bytes",
                    raw.len()
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

/// The parameters of input `name`: only `binary_data_size`, the length of its raw contents
/// (KServe's client adds it to every input it sends raw), is taken.
fn input_parameters(
    name: &str,
    parameters: &HashMap<String, InferParameter>,
) -> Result<Option<u64>, Error> {
    let mut keys: Vec<&String> = parameters.keys().collect();
    keys.sort();
    let mut size = None;
    for key in keys {
        let p = parameters[key].parameter_choice.as_ref();
        if key != "binary_data_size" {
            return Err(Error::invalid(
                name,
                format!(
                    "has parameter {}; xentd takes only binary_data_size on inputs (shared memory is not supported: send the data in the request)",
                    echo::Quoted(key)
                ),
            ));
        }
        size = Some(match p {
            Some(ParameterChoice::Int64Param(i)) if *i >= 0 => i.unsigned_abs(),
            Some(ParameterChoice::Uint64Param(u)) => *u,
            _ => {
                return Err(Error::invalid(
                    name,
                    format!(
                        "has binary_data_size {}; expected a non-negative int64_param",
                        describe(p)
                    ),
                ));
            }
        });
    }
    Ok(size)
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
