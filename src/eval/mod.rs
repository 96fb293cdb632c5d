//! The domain of the service: a request as the contract sees it, validated, and its result.
//! Nothing here knows a protocol.
//!
//! A front (`api` for xent.v1, `api::oip` for the Open Inference Protocol) reads what it
//! received into a [`Request`]; [`Request::validate`] checks it against the contract into an
//! [`Evaluation`]; `compute` runs that through the kernel into an [`Evaluated`]; the front's
//! encoder turns that into its answer. Once an `Evaluation` exists, every shape, option and
//! class id in it has been checked, so the kernel never sees an input it must refuse.
//!
//! - [`names`]: the vocabulary every API shares (loss kinds, inputs, outputs, options).
//! - [`request`](mod@request): the front's reading of a request and the contract's refusals.
//! - here: the validated request and the computed outputs.

pub mod names;
pub mod request;

use crate::kernel::{self, Health, Layout};
use crate::tensor::{Buf, Shaped};
use bytemuck::Pod;
pub use names::{Input, LossKind, Named, OptionKind, OptionName, OptionValue, Output};
pub use names::{Options, Reduction};
pub use request::{MAX_REQUEST_ID_BYTES, Received, Request};

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

impl Wanted {
    /// No output at all.
    pub const NONE: Wanted = Wanted {
        loss: false,
        grad_logits: false,
        grad_labels: false,
    };

    /// The outputs listed; none listed means the default.
    pub fn of(outputs: &[Output]) -> Wanted {
        if outputs.is_empty() {
            return Wanted::default();
        }
        let mut w = Wanted::NONE;
        for &o in outputs {
            w.add(o);
        }
        w
    }

    /// Adds `output`.
    pub fn add(&mut self, output: Output) {
        match output {
            Output::Loss => self.loss = true,
            Output::GradLogits => self.grad_logits = true,
            Output::GradLabels => self.grad_labels = true,
        }
    }

    /// Whether `output` is wanted.
    pub const fn has(self, output: Output) -> bool {
        match output {
            Output::Loss => self.loss,
            Output::GradLogits => self.grad_logits,
            Output::GradLabels => self.grad_labels,
        }
    }
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

crate::float_enum! {
    /// The inputs, by dtype: logits and dense labels agree by construction.
    #[derive(Clone, Debug)]
    pub enum Tensors(Inputs)
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

    /// Shape of an output: the returned loss's, or the logits' for a gradient.
    pub fn output_shape(&self, output: Output) -> Vec<usize> {
        match output {
            Output::Loss => self.returned_loss_shape(),
            Output::GradLogits | Output::GradLabels => self.shape.clone(),
        }
    }

    /// Number of logits elements.
    pub fn elements(&self) -> usize {
        self.layout.elements()
    }
}

/// Computed outputs of one dtype, as flat row-major buffers ready to be sent.
#[derive(Clone, Debug, PartialEq)]
pub struct Outputs<T: Pod> {
    /// The returned loss, shaped by [`Evaluation::returned_loss_shape`].
    pub loss: Option<Buf<T>>,
    /// Gradient w.r.t. the logits, shaped like them.
    pub grad_logits: Option<Buf<T>>,
    /// Gradient w.r.t. dense labels, shaped like them.
    pub grad_labels: Option<Buf<T>>,
    /// Non-finite inputs, unnormalised label rows and non-finite losses of the call.
    pub health: Health,
}

impl<T: Pod + Send + Sync> Outputs<T> {
    /// The buffer of `output`, taken out (for an encoder, which moves it into its answer).
    pub fn take(&mut self, output: Output) -> Option<Buf<T>> {
        match output {
            Output::Loss => self.loss.take(),
            Output::GradLogits => self.grad_logits.take(),
            Output::GradLabels => self.grad_labels.take(),
        }
    }

    /// Another handle on the same outputs, without copying them (see [`Buf::share`]).
    pub fn share(&mut self) -> Self {
        Outputs {
            loss: self.loss.as_mut().map(Buf::share),
            grad_logits: self.grad_logits.as_mut().map(Buf::share),
            grad_labels: self.grad_labels.as_mut().map(Buf::share),
            health: self.health,
        }
    }
}

crate::float_enum! {
    /// The result of an evaluation, in the logits' dtype.
    #[derive(Clone, Debug, PartialEq)]
    pub enum Evaluated(Outputs)
}

impl Evaluated {
    /// Another handle on the same outputs, without copying them (see [`Buf::share`]).
    pub fn share(&mut self) -> Evaluated {
        crate::match_float!(self, Evaluated, o => Evaluated::from(o.share()))
    }

    /// The call's numerical health.
    pub fn health(&self) -> Health {
        crate::match_float!(self, Evaluated, o => o.health)
    }
}
