//! The KServe v2 Open Inference Protocol (OIP): its requests to the domain, the domain's
//! outputs to its responses.
//!
//! xentd serves the protocol's `ModelInfer` beside `xent.v1.Xent/Evaluate` so that clients
//! written for inference servers (tritonclient, KServe's) can call it unmodified. Rather than
//! validate a second time, [`decode()`] translates a `ModelInferRequest` into the
//! `EvaluateRequest` it means (model name to loss kind, named inputs to tensors, request
//! parameters to options) and hands it to [`crate::api::decode()`], so both protocols refuse
//! exactly the same requests for the same reasons and produce the same [`Evaluation`]; only
//! the protocol's own rules (model names, datatype strings, raw versus typed contents,
//! parameter types) are checked in this module. [`response()`] encodes the computed outputs
//! straight into a `ModelInferResponse`, moving their buffers, not copying them.
//!
//! Names are the shared vocabulary's ([`crate::eval::names`]) everywhere: inputs, outputs and
//! request parameters (the options, each of the parameter type its kind says). An error
//! names the input, parameter or request field at fault as the protocol calls it.
//!
//! - [`decode`](mod@decode): a `ModelInferRequest` to an [`Evaluation`] (server side).
//! - [`encode`]: computed outputs to a `ModelInferResponse` (server side).
//! - [`config`](mod@config): `ModelConfig` from the server's settings, `ModelStatistics` from
//!   the batcher's counts.
//! - [`client`]: an `EvaluateRequest` to the equivalent `ModelInferRequest`, and a
//!   `ModelInferResponse` back to tensors (used by `xent bench --protocol oip` and the tests).
//! - here: the models, their names, datatypes, parameters and metadata, shared by all three.

pub mod client;
pub mod config;
pub mod decode;
pub mod encode;
#[cfg(test)]
mod tests;

pub use client::{infer_request, outputs};
pub use config::{config, statistics};
pub use decode::decode;
pub use encode::{HEALTH_PARAMETERS, response};

use crate::dtype::DType;
use crate::echo;
use crate::error::Error;
#[cfg(doc)]
use crate::eval::Evaluation;
use crate::eval::{LossKind, Named, OptionKind, OptionValue, Output};
use crate::proto::inference::ModelMetadataResponse;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_metadata_response::TensorMetadata;

/// The one version of each model.
pub const MODEL_VERSION: &str = "1";

/// What `ModelMetadata` reports as the models' platform.
pub const PLATFORM: &str = "xent";

/// The models served, in the order they are listed.
pub const MODELS: [LossKind; 2] = [LossKind::Dense, LossKind::Sparse];

/// The parameter type that carries an option of `kind`, as the protocol names it.
const fn parameter_type(kind: OptionKind) -> &'static str {
    match kind {
        OptionKind::Int => "an int64_param",
        OptionKind::Float => "a double_param (or a string_param holding a number)",
        OptionKind::Bool => "a bool_param",
        OptionKind::Reduction => "a string_param",
    }
}

/// An option's value as a request parameter.
pub fn parameter(v: OptionValue) -> ParameterChoice {
    match v {
        OptionValue::Int(i) => ParameterChoice::Int64Param(i),
        OptionValue::Float(f) => ParameterChoice::DoubleParam(f),
        OptionValue::Bool(b) => ParameterChoice::BoolParam(b),
        OptionValue::Reduction(r) => ParameterChoice::StringParam(r.name().into()),
    }
}

/// A request parameter as the value of an option of `kind`: integers are also taken for
/// floats (clients send `0` as an int64), and so are strings holding a number (KServe's
/// client has no double parameter: it sends `label_smoothing=0.1` as the string "0.1");
/// unsigned integers are taken for signed ones. `Err(None)`:
/// the parameter has the wrong type; `Err(Some(s))`: `s` names no reduction.
fn option_value(
    kind: OptionKind,
    p: Option<&ParameterChoice>,
) -> Result<OptionValue, Option<String>> {
    let p = p.ok_or(None)?;
    Ok(match (kind, p) {
        (OptionKind::Int, ParameterChoice::Int64Param(i)) => OptionValue::Int(*i),
        (OptionKind::Int, ParameterChoice::Uint64Param(u)) => {
            OptionValue::Int(i64::try_from(*u).map_err(|_| None)?)
        }
        (OptionKind::Float, ParameterChoice::DoubleParam(d)) => OptionValue::Float(*d),
        (OptionKind::Float, ParameterChoice::Int64Param(i)) => OptionValue::Float(*i as f64),
        (OptionKind::Float, ParameterChoice::Uint64Param(u)) => OptionValue::Float(*u as f64),
        (OptionKind::Float, ParameterChoice::StringParam(s)) => {
            OptionValue::Float(s.trim().parse::<f64>().map_err(|_| None)?)
        }
        (OptionKind::Bool, ParameterChoice::BoolParam(b)) => OptionValue::Bool(*b),
        (OptionKind::Reduction, ParameterChoice::StringParam(s)) => {
            OptionValue::Reduction(Named::from_name(s).ok_or_else(|| Some(s.clone()))?)
        }
        _ => return Err(None),
    })
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
                "model {} is not served here; the models are softmax_cross_entropy and sparse_softmax_cross_entropy",
                echo::Quoted(name)
            ))
        })?;
    if !(version.is_empty() || version == MODEL_VERSION) {
        return Err(Error::NotFound(format!(
            "model {} has no version {}; its only version is {MODEL_VERSION:?}",
            echo::Quoted(name),
            echo::Quoted(version)
        )));
    }
    Ok(kind)
}

/// `ModelMetadata` of a model. The protocol has one datatype string per tensor, and tools
/// generate inputs from it (perf_analyzer, KServe clients), so each tensor gets one standard
/// name: `FP32` for floats and `INT64` for class ids, the types most callers send. Every input
/// also takes the others (FP16, BF16, FP64; INT32), and outputs follow the logits' type.
/// `-1` is a dimension of any length. Shapes are those of logits of rank 2 with the class
/// axis last, the common case; any rank >= 1 and any class axis are accepted (parameter
/// `axis`). The first dimension is the batch (the rows), as `ModelConfig` says; the inputs
/// with one value per row (sparse labels, sample weights, upstream) are `[-1, 1]`, Triton's
/// shape for a batch of scalars, and are taken as `[-1]` too (see `decode`).
pub fn metadata(model: LossKind) -> ModelMetadataResponse {
    const FLOATS: &str = "FP32";
    let t = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    };
    let labels = match model {
        LossKind::Dense => t("labels", FLOATS, &[-1, -1]),
        LossKind::Sparse => t("labels", "INT64", &[-1, 1]),
    };
    let outputs = model
        .outputs()
        .iter()
        .map(|&o| match o {
            Output::Loss => t(o.name(), FLOATS, &[-1]),
            Output::GradLogits | Output::GradLabels => t(o.name(), FLOATS, &[-1, -1]),
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
            t("sample_weights", FLOATS, &[-1, 1]),
            t("upstream", FLOATS, &[-1, 1]),
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
    pub outputs: Vec<Output>,
    /// Whether outputs travel in `raw_output_contents` (else typed contents).
    pub raw: bool,
    /// Whether the request set `triton_enable_empty_final_response`: in a stream, its
    /// response then carries `triton_final_response` (true: each request has one response).
    pub final_flag: bool,
}
