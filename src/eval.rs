//! The validated evaluation request and its result, shared by every layer.
//!
//! `api::decode` turns a protobuf request into an [`Evaluation`] (or an error naming the
//! field); `compute` runs it through the kernel into an [`Evaluated`]; `api::encode` turns that
//! into a response. Once an `Evaluation` exists, every shape, option and class id in it has
//! been checked against the contract, so the kernel never sees an input it must refuse.

use bytemuck::Pod;
use half::{bf16, f16};

use crate::api::tensor::Shaped;
use crate::dtype::DType;
use crate::kernel::{self, Health, Layout};
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
        Wanted {
            loss: true,
            grad_logits: true,
            grad_labels: false,
        }
    }
}

/// Class ids of either integer width, one per example, in row order.
#[derive(Clone, Debug)]
pub enum ClassIds {
    /// int32 ids.
    I32(Shaped<i32>),
    /// int64 ids.
    I64(Shaped<i64>),
}

impl ClassIds {
    /// Calls `f` with the ids as the kernel reads them.
    pub fn with_kernel<R>(&self, f: impl FnOnce(kernel::ClassIds<'_>) -> R) -> R {
        match self {
            ClassIds::I32(t) => f(kernel::ClassIds::I32(&t.data.slice())),
            ClassIds::I64(t) => f(kernel::ClassIds::I64(&t.data.slice())),
        }
    }
}

/// Labels whose float dtype, when dense, is the logits' own.
#[derive(Clone, Debug)]
pub enum Labels<T: Pod> {
    /// Dense label rows, same shape as the logits.
    Dense(Shaped<T>),
    /// Class ids, the logits' shape without the class axis.
    Sparse(ClassIds),
}

/// Logits and labels of one float dtype.
#[derive(Clone, Debug)]
pub struct Inputs<T: Pod> {
    /// Logits (or probabilities).
    pub logits: Shaped<T>,
    /// Labels.
    pub labels: Labels<T>,
}

/// The inputs, by dtype: logits and dense labels agree by construction.
#[derive(Clone, Debug)]
pub enum Tensors {
    /// float16.
    F16(Inputs<f16>),
    /// bfloat16.
    BF16(Inputs<bf16>),
    /// float32.
    F32(Inputs<f32>),
    /// float64.
    F64(Inputs<f64>),
}

impl Tensors {
    /// The float dtype of logits and outputs.
    pub fn dtype(&self) -> DType {
        match self {
            Tensors::F16(_) => DType::F16,
            Tensors::BF16(_) => DType::BF16,
            Tensors::F32(_) => DType::F32,
            Tensors::F64(_) => DType::F64,
        }
    }
}

/// A validated request: everything the kernel needs, all of it checked.
#[derive(Clone, Debug)]
pub struct Evaluation {
    /// Caller's id, echoed back.
    pub request_id: String,
    /// Which loss.
    pub kind: LossKind,
    /// Logits and labels.
    pub tensors: Tensors,
    /// The logits' shape.
    pub shape: Vec<usize>,
    /// The logits seen as `(outer, classes, inner)`.
    pub layout: Layout,
    /// Scalar options (`axis` normalised to `0..rank`).
    pub options: Options,
    /// Class weights, length `C`.
    pub class_weights: Option<Vec<f64>>,
    /// Sample weights broadcast to one per example, in row order.
    pub sample_weights: Option<Vec<f64>>,
    /// Upstream gradient: one per example for reduction `none`, else one value.
    pub upstream: Option<Vec<f64>>,
    /// NaN or infinite values among the class weights, sample weights (as received, before
    /// broadcasting) and upstream gradient, for the numerical health report.
    pub nonfinite_weights: u64,
    /// Outputs wanted.
    pub wanted: Wanted,
    /// Whether the response uses raw bytes (else typed fields).
    pub raw_response: bool,
}

impl Evaluation {
    /// Shape of the per-example loss: the logits' shape without the class axis.
    pub fn loss_shape(&self) -> Vec<usize> {
        let mut s = self.shape.clone();
        s.remove(self.options.axis as usize);
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
        self.layout.elements()
    }
}

/// Computed outputs of one dtype, as flat row-major buffers ready to be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<T> {
    /// The returned loss, shaped by [`Evaluation::returned_loss_shape`].
    pub loss: Option<Vec<T>>,
    /// Gradient w.r.t. the logits, shaped like them.
    pub grad_logits: Option<Vec<T>>,
    /// Gradient w.r.t. dense labels, shaped like them.
    pub grad_labels: Option<Vec<T>>,
    /// Non-finite inputs, unnormalised label rows and non-finite losses of the call.
    pub health: Health,
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

impl Evaluated {
    /// The call's numerical health.
    pub fn health(&self) -> Health {
        match self {
            Evaluated::F16(o) => o.health,
            Evaluated::BF16(o) => o.health,
            Evaluated::F32(o) => o.health,
            Evaluated::F64(o) => o.health,
        }
    }
}
