//! The validated evaluation request and its result, shared by every layer.
//!
//! `api::decode` turns a protobuf request into an [`Evaluation`] (or an error naming the
//! field); `compute` runs it through the kernel into an [`Evaluated`]; `api::encode` turns that
//! into a response. Once an `Evaluation` exists, every shape, option and class id in it has
//! been checked against the contract, so the kernel never sees an input it must refuse.

use half::{bf16, f16};

use crate::api::tensor::Shaped;
use crate::dtype::DType;
pub use crate::kernel::{Options, Reduction};

/// Which loss to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// Labels are rows shaped like the logits (`softmax_cross_entropy`).
    Dense,
    /// Labels are class ids (`sparse_softmax_cross_entropy`).
    Sparse,
}

impl LossKind {
    /// The name used in every API.
    pub const fn name(self) -> &'static str {
        match self {
            LossKind::Dense => "softmax_cross_entropy",
            LossKind::Sparse => "sparse_softmax_cross_entropy",
        }
    }
}

/// Which outputs to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The loss.
    pub loss: bool,
    /// Gradient w.r.t. the logits.
    pub grad_logits: bool,
    /// Gradient w.r.t. dense labels.
    pub grad_labels: bool,
}

impl Default for Wanted {
    fn default() -> Self {
        Wanted { loss: true, grad_logits: true, grad_labels: false }
    }
}

/// Float logits (and dense labels) of one dtype.
#[derive(Clone, Debug)]
pub enum Floats {
    /// float16.
    F16(Shaped<f16>),
    /// bfloat16.
    BF16(Shaped<bf16>),
    /// float32.
    F32(Shaped<f32>),
    /// float64.
    F64(Shaped<f64>),
}

impl Floats {
    /// The dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Floats::F16(_) => DType::F16,
            Floats::BF16(_) => DType::BF16,
            Floats::F32(_) => DType::F32,
            Floats::F64(_) => DType::F64,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            Floats::F16(t) => &t.shape,
            Floats::BF16(t) => &t.shape,
            Floats::F32(t) => &t.shape,
            Floats::F64(t) => &t.shape,
        }
    }
}

/// Class ids of either integer width.
#[derive(Clone, Debug)]
pub enum ClassIds {
    /// int32 ids.
    I32(Shaped<i32>),
    /// int64 ids.
    I64(Shaped<i64>),
}

/// The labels of a request.
#[derive(Clone, Debug)]
pub enum Labels {
    /// Dense label rows, same shape and dtype as the logits.
    Dense(Floats),
    /// Class ids, the logits' shape without the class axis.
    Sparse(ClassIds),
}

/// A validated request: everything the kernel needs, all of it checked.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Caller's id, echoed back.
    pub request_id: String,
    /// Which loss (implied by `labels`, kept for logs and metrics).
    pub kind: LossKind,
    /// Logits or probabilities.
    pub logits: Floats,
    /// Labels.
    pub labels: Labels,
    /// Scalar options, with the axis normalised to `0..rank`.
    pub options: Options,
    /// Class weights, length `C`.
    pub class_weights: Option<Vec<f64>>,
    /// Sample weights as given (shape broadcastable to the loss shape) and their shape.
    pub sample_weights: Option<(Vec<usize>, Vec<f64>)>,
    /// Upstream gradient, shape of the returned loss.
    pub upstream: Option<Vec<f64>>,
    /// Outputs wanted.
    pub wanted: Wanted,
    /// Whether the response uses raw bytes (else typed fields).
    pub raw_response: bool,
}

impl Evaluation {
    /// The class axis, normalised to `0..rank`.
    pub fn axis(&self) -> usize {
        self.options.axis as usize
    }

    /// Shape of the per-example loss: the logits' shape without the class axis.
    pub fn loss_shape(&self) -> Vec<usize> {
        let mut s = self.logits.shape().to_vec();
        s.remove(self.axis());
        s
    }

    /// Shape of the returned loss: per-example for `none`, `[]` otherwise.
    pub fn returned_loss_shape(&self) -> Vec<usize> {
        match self.options.reduction {
            Reduction::None => self.loss_shape(),
            _ => Vec::new(),
        }
    }

    /// Number of logits elements.
    pub fn elements(&self) -> usize {
        self.logits.shape().iter().product()
    }
}

/// Computed outputs of one dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<T> {
    /// The returned loss, shaped by [`Evaluation::returned_loss_shape`].
    pub loss: Option<Vec<T>>,
    /// Gradient w.r.t. the logits, shaped like them.
    pub grad_logits: Option<Vec<T>>,
    /// Gradient w.r.t. dense labels, shaped like them.
    pub grad_labels: Option<Vec<T>>,
}

/// The result of an evaluation, in the logits' dtype.
#[derive(Clone, Debug, PartialEq)]
pub enum Evaluated {
    /// float16 outputs.
    F16(Outputs<f16>),
    /// bfloat16 outputs.
    BF16(Outputs<bf16>),
    /// float32 outputs.
    F32(Outputs<f32>),
    /// float64 outputs.
    F64(Outputs<f64>),
}
