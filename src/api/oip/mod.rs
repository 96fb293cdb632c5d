//! The KServe v2 Open Inference Protocol (OIP) to and from xent.v1's messages.
//!
//! xentd serves the protocol's `ModelInfer` beside `xent.v1.Xent/Evaluate` so that clients
//! written for inference servers (tritonclient, KServe's) can call it unmodified. Rather than
//! validate a second time, [`decode()`] translates a `ModelInferRequest` into the
//! `EvaluateRequest` it means (model name to loss kind, named inputs to tensors, request
//! parameters to options) and hands it to [`crate::api::decode()`], so both protocols refuse
//! exactly the same requests for the same reasons and produce the same [`Evaluation`]; only
//! the protocol's own rules (model names, datatype strings, raw versus typed contents,
//! parameter types) are checked in this module. [`response()`] moves the answer's buffers
//! into a `ModelInferResponse` without copying them.
//!
//! Names are the xent.v1 names everywhere: inputs `logits`, `labels`, `class_weights`,
//! `sample_weights`, `upstream`; outputs `loss`, `grad_logits`, `grad_labels`; parameters
//! `axis`, `label_smoothing`, `ignore_index`, `from_logits`, `z_loss`, `reduction`. An error
//! names the input, parameter or request field at fault as the protocol calls it.
//!
//! - [`decode`](mod@decode): a `ModelInferRequest` to an [`Evaluation`] (server side).
//! - [`encode`]: an `EvaluateResponse` to a `ModelInferResponse` (server side).
//! - [`client`]: an `EvaluateRequest` to the equivalent `ModelInferRequest`, and a
//!   `ModelInferResponse` back to tensors (used by `xent bench --protocol oip` and the tests).
//! - here: the models, their names, datatypes and metadata, shared by all three.

pub mod client;
pub mod decode;
pub mod encode;
#[cfg(test)]
mod tests;

pub use client::{infer_request, outputs};
pub use decode::decode;
pub use encode::{HEALTH_PARAMETERS, response};

use crate::dtype::DType;
use crate::error::Error;
#[cfg(doc)]
use crate::eval::Evaluation;
use crate::eval::LossKind;
use crate::proto;
use crate::proto::inference::ModelMetadataResponse;
use crate::proto::inference::model_metadata_response::TensorMetadata;

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

/// `ModelMetadata` of a model. The protocol has one datatype string per tensor, and tools
/// generate inputs from it (perf_analyzer, KServe clients), so each tensor gets one standard
/// name: `FP32` for floats and `INT64` for class ids, the types most callers send. Every input
/// also takes the others (FP16, BF16, FP64; INT32), and outputs follow the logits' type.
/// `-1` is a dimension of any length. Shapes are those of logits of rank 2 with the class
/// axis last, the common case; any rank >= 1 and any class axis are accepted (parameter
/// `axis`).
pub fn metadata(model: LossKind) -> ModelMetadataResponse {
    const FLOATS: &str = "FP32";
    let t = |name: &str, datatype: &str, shape: &[i64]| TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    };
    let labels = match model {
        LossKind::Dense => t("labels", FLOATS, &[-1, -1]),
        LossKind::Sparse => t("labels", "INT64", &[-1]),
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
