//! A request as a front read it, and its validation into an [`Evaluation`]: the contract's
//! refusals (semantics §7), written once for every protocol.
//!
//! A front (xent.v1, the Open Inference Protocol, ...) turns what it received into a
//! [`Request`]: enums mapped to the domain's, tensors decoded into [`AnyTensor`]s (or the
//! reason a tensor could not be read, kept under its field's name for [`Request::validate`] to
//! report in order). `validate` then checks everything the contract checks, in a fixed order,
//! so a request with several faults is refused for the same one whatever front it came by.
//! After it, nothing the kernel receives can be out of range, mis-shaped or of mixed dtypes.

use ndarray::{ArrayViewD, IxDyn};

use super::{
    ClassIds, Evaluation, Inputs, Labels, LossKind, Named, Options, Output, Reduction, Tensors,
    Wanted,
};
use crate::dtype::DType;
use crate::echo::Shape;
use crate::error::Error;
use crate::kernel::{self, KernelError, Layout};
use crate::tensor::{AnyTensor, TensorElement};

/// Longest `request_id` accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

/// A tensor as a front received it: decoded, or why it could not be read (the reason, to be
/// given under the field's name).
pub type Received = Result<AnyTensor, String>;

/// Everything a front read from one request, not yet checked against the contract.
#[derive(Clone, Debug)]
pub struct Request {
    /// Caller's id, echoed back.
    pub request_id: String,
    /// Which loss.
    pub kind: LossKind,
    /// Scalar options, `axis` as sent (it may be negative).
    pub options: Options,
    /// Outputs asked for.
    pub wanted: Wanted,
    /// Whether the answer's tensors are to be raw bytes (else typed fields).
    pub raw_response: bool,
    /// Logits (or probabilities).
    pub logits: Received,
    /// Dense labels or class ids.
    pub labels: Received,
    /// Class weights, if sent.
    pub class_weights: Option<Received>,
    /// Sample weights, if sent.
    pub sample_weights: Option<Received>,
    /// Upstream gradient, if sent.
    pub upstream: Option<Received>,
}

/// Refuses a `request_id` longer than [`MAX_REQUEST_ID_BYTES`].
pub fn check_request_id(id: &str) -> Result<(), Error> {
    if id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::invalid(
            "request_id",
            format!(
                "is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed",
                id.len()
            ),
        ));
    }
    Ok(())
}

/// Refuses scalar options out of range or that do not apply to `kind`.
pub fn check_options(options: &Options, kind: LossKind) -> Result<(), Error> {
    let eps = options.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::invalid(
            "label_smoothing",
            format!("is {eps}; it must be in [0, 1]"),
        ));
    }
    let z = options.z_loss;
    if !(z >= 0.0 && z.is_finite()) {
        return Err(Error::invalid(
            "z_loss",
            format!("is {z}; it must be finite and >= 0"),
        ));
    }
    if z > 0.0 && !options.from_logits {
        return Err(Error::invalid(
            "z_loss",
            "applies to logits, but from_logits is false (the inputs are probabilities)",
        ));
    }
    if options.ignore_index.is_some() && kind == LossKind::Dense {
        return Err(Error::invalid(
            "ignore_index",
            "applies to class ids (sparse_softmax_cross_entropy) only",
        ));
    }
    Ok(())
}

impl Wanted {
    /// The outputs asked for, in the order a front read them; each item is an output or the
    /// front's refusal of it, reported in turn. None asked for means the default.
    pub fn from_outputs(
        outputs: impl IntoIterator<Item = Result<Output, Error>>,
        kind: LossKind,
    ) -> Result<Wanted, Error> {
        let mut w = Wanted::NONE;
        let mut any = false;
        for o in outputs {
            any = true;
            let o = o?;
            if o == Output::GradLabels {
                check_grad_labels(kind)?;
            }
            w.add(o);
        }
        Ok(if any { w } else { Wanted::default() })
    }
}

fn check_grad_labels(kind: LossKind) -> Result<(), Error> {
    if kind == LossKind::Sparse {
        return Err(Error::invalid(
            "outputs",
            "asks for OUTPUT_GRAD_LABELS, but class ids have no gradient",
        ));
    }
    Ok(())
}

fn field_err(field: &'static str) -> impl Fn(String) -> Error {
    move |reason| Error::invalid(field, reason)
}

impl Request {
    /// Checks the request against the contract, in the contract's order: the id, the
    /// options, the outputs, then the tensors field by field.
    pub fn validate(self) -> Result<Evaluation, Error> {
        check_request_id(&self.request_id)?;
        let Request {
            request_id,
            kind,
            options,
            wanted,
            raw_response,
            logits,
            labels,
            class_weights,
            sample_weights,
            upstream,
        } = self;
        check_options(&options, kind)?;
        if wanted.grad_labels {
            check_grad_labels(kind)?;
        }

        let logits = logits.map_err(field_err("logits"))?;
        let dtype = logits.dtype();
        if !dtype.is_float() {
            return Err(Error::invalid(
                "logits",
                format!("has dtype {dtype}; expected {}", float_names()),
            ));
        }
        let shape = logits.shape().to_vec();
        if shape.is_empty() {
            return Err(Error::invalid(
                "logits",
                "is a scalar; it needs rank >= 1 (a class axis)",
            ));
        }
        let axis = kernel::normalize_axis(options.axis, shape.len()).ok_or_else(|| {
            Error::invalid(
                "axis",
                format!(
                    "{} is out of range for logits of rank {} (valid: -{} to {})",
                    options.axis,
                    shape.len(),
                    shape.len(),
                    shape.len() - 1
                ),
            )
        })?;
        let layout = Layout::new(&shape, axis);
        if layout.classes == 0 {
            return Err(Error::invalid(
                "logits",
                format!(
                    "has shape {} whose class axis {axis} has length 0; at least one class is needed",
                    Shape(&shape)
                ),
            ));
        }
        let mut loss_shape = shape.clone();
        loss_shape.remove(axis);

        let labels = labels.map_err(field_err("labels"))?;
        let tensors = match kind {
            LossKind::Dense => dense_inputs(logits, labels)?,
            LossKind::Sparse => sparse_inputs(
                logits,
                labels,
                &loss_shape,
                layout.classes,
                options.ignore_index,
            )?,
        };

        let class_weights = class_weights
            .map(|t| {
                let w = float_tensor("class_weights", t)?;
                if w.shape() != [layout.classes] {
                    return Err(Error::invalid(
                        "class_weights",
                        format!(
                            "has shape {}; expected [{}], one weight per class",
                            Shape(w.shape()),
                            layout.classes
                        ),
                    ));
                }
                Ok(w.floats_to_f64().expect("float tensor"))
            })
            .transpose()?;
        let mut sample_nonfinite = 0;
        let sample_weights = sample_weights
            .map(|t| {
                let w = float_tensor("sample_weights", t)?;
                let values = w.floats_to_f64().expect("float tensor");
                sample_nonfinite = values.iter().filter(|w| !w.is_finite()).count() as u64;
                let view =
                    ArrayViewD::from_shape(IxDyn(w.shape()), &values).expect("decoded shape");
                let b = view.broadcast(IxDyn(&loss_shape)).ok_or_else(|| {
                    Error::invalid(
                        "sample_weights",
                        format!(
                            "has shape {}, which does not broadcast to the loss shape {}",
                            Shape(w.shape()),
                            Shape(&loss_shape)
                        ),
                    )
                })?;
                Ok::<_, Error>(b.iter().copied().collect::<Vec<f64>>())
            })
            .transpose()?;
        let returned_shape: Vec<usize> = if options.reduction == Reduction::None {
            loss_shape.clone()
        } else {
            Vec::new()
        };
        let upstream = upstream
            .map(|t| {
                let g = float_tensor("upstream", t)?;
                if g.shape() != returned_shape.as_slice() {
                    return Err(Error::invalid(
                        "upstream",
                        format!(
                            "has shape {}; it must have the returned loss's shape {} (reduction {})",
                            Shape(g.shape()),
                            Shape(&returned_shape),
                            options.reduction
                        ),
                    ));
                }
                Ok(g.floats_to_f64().expect("float tensor"))
            })
            .transpose()?;

        // Counted as received, before sample weights are broadcast.
        let nonfinite = |v: &[f64]| v.iter().filter(|w| !w.is_finite()).count() as u64;
        let nonfinite_weights = class_weights.as_deref().map_or(0, nonfinite)
            + sample_nonfinite
            + upstream.as_deref().map_or(0, nonfinite);

        Ok(Evaluation {
            request_id,
            kind,
            tensors,
            shape,
            layout,
            options: Options {
                axis: axis as i64,
                ..options
            },
            class_weights,
            sample_weights,
            upstream,
            nonfinite_weights,
            wanted,
            raw_response,
        })
    }
}

fn float_tensor(field: &'static str, t: Received) -> Result<AnyTensor, Error> {
    let t = t.map_err(field_err(field))?;
    if !t.dtype().is_float() {
        return Err(Error::invalid(
            field,
            format!("has dtype {}; expected a float dtype", t.dtype()),
        ));
    }
    Ok(t)
}

fn dense_inputs(logits: AnyTensor, labels: AnyTensor) -> Result<Tensors, Error> {
    if labels.dtype() != logits.dtype() {
        return Err(Error::invalid(
            "labels",
            format!(
                "has dtype {} but logits have {}; dense labels must have the logits' dtype",
                labels.dtype(),
                logits.dtype()
            ),
        ));
    }
    if labels.shape() != logits.shape() {
        return Err(Error::invalid(
            "labels",
            format!(
                "has shape {}; dense labels must have the logits' shape {}",
                Shape(labels.shape()),
                Shape(logits.shape())
            ),
        ));
    }
    fn pair<T: TensorElement>(x: AnyTensor, y: AnyTensor) -> Option<Inputs<T>> {
        Some(Inputs {
            logits: T::from_any(x).ok()?,
            labels: Labels::Dense(T::from_any(y).ok()?),
        })
    }
    let inputs = crate::with_float!(logits.dtype(), T => pair::<T>(logits, labels).map(Tensors::from), int => None);
    inputs.ok_or_else(|| Error::Internal("dtypes checked equal and float but differ".into()))
}

fn sparse_inputs(
    logits: AnyTensor,
    labels: AnyTensor,
    loss_shape: &[usize],
    classes: usize,
    ignore_index: Option<i64>,
) -> Result<Tensors, Error> {
    let ids = match labels {
        AnyTensor::I32(t) => ClassIds::I32(t),
        AnyTensor::I64(t) => ClassIds::I64(t),
        other => {
            return Err(Error::invalid(
                "labels",
                format!(
                    "has dtype {}; class ids must be int32 or int64",
                    other.dtype()
                ),
            ));
        }
    };
    let id_shape = match &ids {
        ClassIds::I32(t) => t.shape.clone(),
        ClassIds::I64(t) => t.shape.clone(),
    };
    if id_shape != loss_shape {
        return Err(Error::invalid(
            "labels",
            format!(
                "has shape {}; class ids must have the logits' shape without the class axis, {}",
                Shape(&id_shape),
                Shape(loss_shape)
            ),
        ));
    }
    if let Err(KernelError::ClassIdOutOfRange {
        position,
        value,
        classes,
    }) = ids.with_kernel(|k| kernel::check_class_ids(k, classes, ignore_index))
    {
        let index = unravel(position, loss_shape);
        let ignore = ignore_index
            .map(|k| format!(" and is not ignore_index {k}"))
            .unwrap_or_default();
        return Err(Error::invalid(
            "labels",
            format!(
                "class id {value} at index {} is out of range [0, {classes}){ignore}",
                Shape(&index)
            ),
        ));
    }
    fn with<T: TensorElement>(x: AnyTensor, ids: ClassIds) -> Option<Inputs<T>> {
        Some(Inputs {
            logits: T::from_any(x).ok()?,
            labels: Labels::Sparse(ids),
        })
    }
    let inputs = crate::with_float!(logits.dtype(), T => with::<T>(logits, ids).map(Tensors::from), int => None);
    inputs.ok_or_else(|| Error::Internal("logits checked float".into()))
}

/// The float dtypes' names, as `a, b, c or d`.
fn float_names() -> String {
    let names: Vec<&str> = <DType as Named>::ALL
        .iter()
        .filter(|d| d.is_float())
        .map(|d| d.name())
        .collect();
    match names.split_last() {
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// A row-major flat position as an index into `shape`.
fn unravel(mut position: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (k, &d) in shape.iter().enumerate().rev() {
        if d > 0 {
            index[k] = position % d;
            position /= d;
        }
    }
    index
}
