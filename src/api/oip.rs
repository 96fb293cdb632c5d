//! The KServe v2 Open Inference Protocol (OIP) to and from xent.v1's messages.
//!
//! xentd serves the protocol's `ModelInfer` beside `xent.v1.Xent/Evaluate` so that clients
//! written for inference servers (tritonclient, KServe's) can call it unmodified. Rather than
//! validate a second time, [`decode`] translates a `ModelInferRequest` into the
//! `EvaluateRequest` it means (model name to loss kind, named inputs to tensors, request
//! parameters to options) and hands it to [`super::decode`], so both protocols refuse exactly
//! the same requests for the same reasons and produce the same [`Evaluation`]; only the
//! protocol's own rules (model names, datatype strings, raw versus typed contents, parameter
//! types) are checked here. [`response`] moves the answer's buffers into a
//! `ModelInferResponse` without copying them.
//!
//! Names are the xent.v1 names everywhere: inputs `logits`, `labels`, `class_weights`,
//! `sample_weights`, `upstream`; outputs `loss`, `grad_logits`, `grad_labels`; parameters
//! `axis`, `label_smoothing`, `ignore_index`, `from_logits`, `z_loss`, `reduction`. An error
//! names the input, parameter or request field at fault as the protocol calls it.
//!
//! The client side (used by `xent bench --protocol oip` and the tests) is here too:
//! [`infer_request`] turns an `EvaluateRequest` into the equivalent `ModelInferRequest`, and
//! [`outputs`] reads a `ModelInferResponse` back into tensors.

use std::collections::HashMap;

use bytes::Bytes;

use super::tensor::{self, AnyTensor};
use crate::dtype::DType;
use crate::error::Error;
use crate::eval::{Evaluation, LossKind};
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::{InferInputTensor, InferRequestedOutputTensor};
use crate::proto::inference::model_infer_response::InferOutputTensor;
use crate::proto::inference::model_metadata_response::TensorMetadata;
use crate::proto::inference::{
    InferParameter, InferTensorContents, ModelInferRequest, ModelInferResponse,
    ModelMetadataResponse,
};

/// The one version of each model.
pub const MODEL_VERSION: &str = "1";

/// What `ModelMetadata` reports as the models' platform.
pub const PLATFORM: &str = "xent";

/// The models served, in the order they are listed.
pub const MODELS: [LossKind; 2] = [LossKind::Dense, LossKind::Sparse];

/// Input names, in the order `ModelMetadata` lists them.
const INPUTS: [&str; 5] = [
    "logits",
    "labels",
    "class_weights",
    "sample_weights",
    "upstream",
];

/// Request parameters, each an option of the xent.v1 `EvaluateRequest` of the same name.
const PARAMETERS: [&str; 6] = [
    "axis",
    "label_smoothing",
    "ignore_index",
    "from_logits",
    "z_loss",
    "reduction",
];

/// An output of the models.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputName {
    /// `loss`.
    Loss,
    /// `grad_logits`.
    GradLogits,
    /// `grad_labels` (dense labels only).
    GradLabels,
}

impl OutputName {
    /// The protocol name.
    pub const fn name(self) -> &'static str {
        match self {
            OutputName::Loss => "loss",
            OutputName::GradLogits => "grad_logits",
            OutputName::GradLabels => "grad_labels",
        }
    }

    fn to_proto(self) -> proto::Output {
        match self {
            OutputName::Loss => proto::Output::Loss,
            OutputName::GradLogits => proto::Output::GradLogits,
            OutputName::GradLabels => proto::Output::GradLabels,
        }
    }

    /// The outputs a model has.
    pub fn of(model: LossKind) -> &'static [OutputName] {
        match model {
            LossKind::Dense => &[
                OutputName::Loss,
                OutputName::GradLogits,
                OutputName::GradLabels,
            ],
            LossKind::Sparse => &[OutputName::Loss, OutputName::GradLogits],
        }
    }

    /// The outputs returned when none are requested (as in xent.v1).
    pub const DEFAULT: [OutputName; 2] = [OutputName::Loss, OutputName::GradLogits];
}

/// The protocol's datatype name for a dtype.
pub const fn datatype(d: DType) -> &'static str {
    match d {
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::F32 => "FP32",
        DType::F64 => "FP64",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
    }
}

/// A protocol datatype name to a dtype, if xent computes with it.
pub fn parse_datatype(s: &str) -> Option<DType> {
    Some(match s {
        "FP16" => DType::F16,
        "BF16" => DType::BF16,
        "FP32" => DType::F32,
        "FP64" => DType::F64,
        "INT32" => DType::I32,
        "INT64" => DType::I64,
        _ => return None,
    })
}

/// The model a request names, or NOT_FOUND.
pub fn model(name: &str, version: &str) -> Result<LossKind, Error> {
    let kind = MODELS
        .into_iter()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            Error::NotFound(format!(
                "model {name:?} is not served here; the models are softmax_cross_entropy and sparse_softmax_cross_entropy"
            ))
        })?;
    if !(version.is_empty() || version == MODEL_VERSION) {
        return Err(Error::NotFound(format!(
            "model {name:?} has no version {version:?}; its only version is {MODEL_VERSION:?}"
        )));
    }
    Ok(kind)
}

/// `ModelMetadata` of a model. A tensor whose datatype may be one of several lists them
/// separated by `|` (the protocol has one string per tensor); `-1` is a dimension of any
/// length. Shapes are those of logits of rank 2 with the class axis last, the common case;
/// any rank >= 1 and any class axis are accepted (parameter `axis`).
pub fn metadata(model: LossKind) -> ModelMetadataResponse {
    const FLOATS: &str = "FP16|BF16|FP32|FP64";
    let t = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    };
    let labels = match model {
        LossKind::Dense => t("labels", FLOATS, &[-1, -1]),
        LossKind::Sparse => t("labels", "INT32|INT64", &[-1]),
    };
    let outputs = OutputName::of(model)
        .iter()
        .map(|o| match o {
            OutputName::Loss => t("loss", FLOATS, &[-1]),
            OutputName::GradLogits => t("grad_logits", FLOATS, &[-1, -1]),
            OutputName::GradLabels => t("grad_labels", FLOATS, &[-1, -1]),
        })
        .collect();
    ModelMetadataResponse {
        name: model.name().into(),
        versions: vec![MODEL_VERSION.into()],
        platform: PLATFORM.into(),
        inputs: vec![
            t("logits", FLOATS, &[-1, -1]),
            labels,
            t("class_weights", FLOATS, &[-1]),
            t("sample_weights", FLOATS, &[-1]),
            t("upstream", FLOATS, &[-1]),
        ],
        outputs,
    }
}

/// What the response to a request needs from it.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The model evaluated.
    pub model: LossKind,
    /// The request's `id`, echoed.
    pub id: String,
    /// Outputs to return, in the order requested.
    pub outputs: Vec<OutputName>,
    /// Whether outputs travel in `raw_output_contents` (else typed contents).
    pub raw: bool,
}

/// Validates a `ModelInferRequest` into the [`Evaluation`] xent.v1 would make of the same
/// request, and what its response needs.
pub fn decode(req: ModelInferRequest) -> Result<(Evaluation, Reply), Error> {
    let model = model(&req.model_name, &req.model_version)?;
    let (evaluate, reply) = to_evaluate_request(model, req)?;
    let ev = super::decode(evaluate).map_err(|e| match e {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tensor::encode;

    fn xent_dense(raw: bool) -> proto::EvaluateRequest {
        proto::EvaluateRequest {
            loss: proto::LossKind::SoftmaxCrossEntropy as i32,
            logits: Some(encode(&[2, 3], vec![1f32, 2.0, 0.5, 0.2, 0.8, 1.5], raw)),
            labels: Some(encode(&[2, 3], vec![0f32, 1.0, 0.0, 0.0, 0.0, 1.0], raw)),
            label_smoothing: 0.1,
            reduction: proto::Reduction::Mean as i32,
            ..Default::default()
        }
    }

    fn invalid(req: ModelInferRequest) -> (String, String) {
        match decode(req).unwrap_err() {
            Error::InvalidArgument { field, reason } => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_translated_request_decodes_like_the_original() {
        for raw in [true, false] {
            let want = crate::api::decode(xent_dense(raw)).unwrap();
            let (got, reply) = decode(infer_request(xent_dense(raw), raw).unwrap()).unwrap();
            assert_eq!(got.kind, want.kind);
            assert_eq!(got.shape, want.shape);
            assert_eq!(got.options, want.options);
            assert_eq!(got.wanted, want.wanted);
            assert_eq!(got.raw_response, raw);
            assert_eq!(reply.outputs, OutputName::DEFAULT);
        }
    }

    #[test]
    fn unknown_models_and_versions_are_not_found() {
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.model_name = "resnet50".into();
        assert_eq!(decode(r).unwrap_err().code(), tonic::Code::NotFound);
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.model_version = "2".into();
        assert_eq!(decode(r).unwrap_err().code(), tonic::Code::NotFound);
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.model_version = "1".into();
        assert!(decode(r).is_ok());
    }

    #[test]
    fn protocol_errors_name_the_input_or_parameter() {
        let base = || infer_request(xent_dense(true), true).unwrap();
        let mut r = base();
        r.inputs[1].name = "targets".into();
        assert_eq!(invalid(r).0, "targets");
        let mut r = base();
        r.inputs[1].name = "logits".into();
        assert_eq!(
            invalid(r),
            ("logits".into(), "is given more than once".into())
        );
        let mut r = base();
        r.inputs[0].datatype = "UINT8".into();
        assert_eq!(invalid(r).0, "logits");
        let mut r = base();
        r.raw_input_contents.pop();
        assert_eq!(invalid(r).0, "raw_input_contents");
        let mut r = base();
        r.parameters.insert(
            "reduction".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("average".into())),
            },
        );
        assert_eq!(invalid(r).0, "reduction");
        let mut r = base();
        r.parameters.insert(
            "axis".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::StringParam("1".into())),
            },
        );
        assert_eq!(
            invalid(r),
            (
                "axis".into(),
                "is string_param \"1\"; expected an int64_param".into()
            )
        );
        let mut r = base();
        r.parameters.insert(
            "lable_smoothing".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(0.1)),
            },
        );
        assert_eq!(invalid(r).0, "lable_smoothing");
        let mut r = base();
        r.outputs.push(InferRequestedOutputTensor {
            name: "probabilities".into(),
            parameters: HashMap::new(),
        });
        assert_eq!(invalid(r).0, "outputs");
        let mut r = base();
        r.id = "x".repeat(200);
        assert_eq!(invalid(r).0, "id");
    }

    #[test]
    fn shared_validation_names_the_same_fields() {
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.parameters.insert(
            "label_smoothing".into(),
            InferParameter {
                parameter_choice: Some(ParameterChoice::DoubleParam(1.5)),
            },
        );
        assert_eq!(invalid(r).0, "label_smoothing");
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.inputs[1].shape = vec![3, 2];
        assert_eq!(invalid(r).0, "labels");
    }

    #[test]
    fn raw_and_typed_contents_do_not_mix() {
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.inputs[0].contents = Some(InferTensorContents {
            fp32_contents: vec![0.0; 6],
            ..Default::default()
        });
        assert!(invalid(r).1.contains("raw_input_contents"));
        let mut r = infer_request(xent_dense(false), false).unwrap();
        let c = r.inputs[0].contents.as_mut().unwrap();
        c.fp64_contents = std::mem::take(&mut c.fp32_contents)
            .into_iter()
            .map(f64::from)
            .collect();
        assert_eq!(
            invalid(r),
            (
                "logits".into(),
                "carries fp64_contents for datatype FP32; use fp32_contents or raw_input_contents"
                    .into()
            )
        );
    }

    #[test]
    fn halves_travel_raw_only() {
        let mut r = infer_request(xent_dense(false), false).unwrap();
        r.inputs[0].datatype = "FP16".into();
        assert_eq!(
            invalid(r),
            (
                "logits".into(),
                "carries fp32_contents, but FP16 has no typed contents in the protocol; send it in raw_input_contents".into()
            )
        );
        // An empty half tensor needs no contents, and its (empty) outputs travel raw.
        let req = proto::EvaluateRequest {
            loss: proto::LossKind::SoftmaxCrossEntropy as i32,
            logits: Some(encode(&[0, 3], Vec::<half::bf16>::new(), false)),
            labels: Some(encode(&[0, 3], Vec::<half::bf16>::new(), false)),
            ..Default::default()
        };
        let (ev, reply) = decode(infer_request(req, false).unwrap()).unwrap();
        assert!(ev.raw_response && reply.raw);
    }

    #[test]
    fn responses_carry_the_requested_outputs_in_order() {
        let mut req = xent_dense(true);
        req.outputs = vec![proto::Output::GradLabels as i32, proto::Output::Loss as i32];
        let (ev, reply) = decode(infer_request(req, true).unwrap()).unwrap();
        let out = crate::compute::evaluate(&ev).unwrap();
        let resp = response(reply, crate::api::response(&ev, out)).unwrap();
        let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["grad_labels", "loss"]);
        assert_eq!(resp.outputs[1].shape, Vec::<i64>::new());
        let decoded = outputs(resp).unwrap();
        assert_eq!(decoded[0].1.shape(), &[2, 3]);
        assert_eq!(decoded[1].1.dtype(), DType::F32);
    }
}
