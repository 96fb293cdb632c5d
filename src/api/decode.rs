//! `EvaluateRequest` to a validated [`Evaluation`], or an error naming the field and why.
//!
//! This is where the contract's refusals live (semantics §7): after `decode`, nothing the
//! kernel receives can be out of range, mis-shaped or of mixed dtypes.

use bytemuck::Pod;
use ndarray::{ArrayViewD, IxDyn};

use super::tensor::{self, AnyTensor, Shaped, TensorError};
use crate::error::Error;
use crate::eval::{
    ClassIds, Evaluation, Inputs, Labels, LossKind, Options, Reduction, Tensors, Wanted,
};
use crate::kernel::{self, KernelError, Layout};
use crate::proto;

/// Longest `request_id` accepted, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;

fn field_err(field: &'static str) -> impl Fn(TensorError) -> Error {
    move |e| Error::invalid(field, e.to_string())
}

/// Validates a request.
pub fn decode(req: proto::EvaluateRequest) -> Result<Evaluation, Error> {
    if req.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(Error::invalid(
            "request_id",
            format!(
                "is {} bytes long; at most {MAX_REQUEST_ID_BYTES} are allowed",
                req.request_id.len()
            ),
        ));
    }
    let kind = match proto::LossKind::try_from(req.loss) {
        Ok(proto::LossKind::SoftmaxCrossEntropy) => LossKind::Dense,
        Ok(proto::LossKind::SparseSoftmaxCrossEntropy) => LossKind::Sparse,
        Ok(proto::LossKind::Unspecified) => {
            return Err(Error::invalid(
                "loss",
                "is required: LOSS_KIND_SOFTMAX_CROSS_ENTROPY or LOSS_KIND_SPARSE_SOFTMAX_CROSS_ENTROPY",
            ));
        }
        Err(_) => {
            return Err(Error::invalid(
                "loss",
                format!("has unknown value {}", req.loss),
            ));
        }
    };
    let options = options(&req, kind)?;
    let wanted = wanted(&req.outputs, kind)?;
    let raw_response = match proto::Encoding::try_from(req.response_encoding) {
        Ok(proto::Encoding::Unspecified | proto::Encoding::Raw) => true,
        Ok(proto::Encoding::Typed) => false,
        Err(_) => {
            return Err(Error::invalid(
                "response_encoding",
                format!("has unknown value {}", req.response_encoding),
            ));
        }
    };

    let logits = tensor::decode(req.logits).map_err(field_err("logits"))?;
    let dtype = logits.dtype();
    if !dtype.is_float() {
        return Err(Error::invalid(
            "logits",
            format!("has dtype {dtype}; expected float16, bfloat16, float32 or float64"),
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
                "has shape {shape:?} whose class axis {axis} has length 0; at least one class is needed"
            ),
        ));
    }
    let mut loss_shape = shape.clone();
    loss_shape.remove(axis);

    let labels = tensor::decode(req.labels).map_err(field_err("labels"))?;
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

    let class_weights = req
        .class_weights
        .map(|t| {
            let w = float_tensor("class_weights", t)?;
            if w.shape() != [layout.classes] {
                return Err(Error::invalid(
                    "class_weights",
                    format!(
                        "has shape {:?}; expected [{}], one weight per class",
                        w.shape(),
                        layout.classes
                    ),
                ));
            }
            Ok(w.floats_to_f64().expect("float tensor"))
        })
        .transpose()?;
    let mut sample_nonfinite = 0;
    let sample_weights = req
        .sample_weights
        .map(|t| {
            let w = float_tensor("sample_weights", t)?;
            let values = w.floats_to_f64().expect("float tensor");
            sample_nonfinite = values.iter().filter(|w| !w.is_finite()).count() as u64;
            let view = ArrayViewD::from_shape(IxDyn(w.shape()), &values).expect("decoded shape");
            let b = view.broadcast(IxDyn(&loss_shape)).ok_or_else(|| {
                Error::invalid(
                    "sample_weights",
                    format!(
                        "has shape {:?}, which does not broadcast to the loss shape {loss_shape:?}",
                        w.shape()
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
    let upstream = req
        .upstream
        .map(|t| {
            let g = float_tensor("upstream", t)?;
            if g.shape() != returned_shape.as_slice() {
                return Err(Error::invalid(
                    "upstream",
                    format!(
                        "has shape {:?}; it must have the returned loss's shape {returned_shape:?} (reduction {})",
                        g.shape(),
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
        request_id: req.request_id,
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

fn options(req: &proto::EvaluateRequest, kind: LossKind) -> Result<Options, Error> {
    let reduction = match proto::Reduction::try_from(req.reduction) {
        Ok(proto::Reduction::Unspecified | proto::Reduction::None) => Reduction::None,
        Ok(proto::Reduction::Sum) => Reduction::Sum,
        Ok(proto::Reduction::Mean) => Reduction::Mean,
        Ok(proto::Reduction::SumOverBatchSize) => Reduction::SumOverBatchSize,
        Ok(proto::Reduction::SumByNonzeroWeights) => Reduction::SumByNonzeroWeights,
        Err(_) => {
            return Err(Error::invalid(
                "reduction",
                format!("has unknown value {}", req.reduction),
            ));
        }
    };
    let eps = req.label_smoothing;
    if !(0.0..=1.0).contains(&eps) {
        return Err(Error::invalid(
            "label_smoothing",
            format!("is {eps}; it must be in [0, 1]"),
        ));
    }
    let z = req.z_loss;
    if !(z >= 0.0 && z.is_finite()) {
        return Err(Error::invalid(
            "z_loss",
            format!("is {z}; it must be finite and >= 0"),
        ));
    }
    let from_logits = req.from_logits.unwrap_or(true);
    if z > 0.0 && !from_logits {
        return Err(Error::invalid(
            "z_loss",
            "applies to logits, but from_logits is false (the inputs are probabilities)",
        ));
    }
    if req.ignore_index.is_some() && kind == LossKind::Dense {
        return Err(Error::invalid(
            "ignore_index",
            "applies to class ids (sparse_softmax_cross_entropy) only",
        ));
    }
    Ok(Options {
        axis: req.axis.unwrap_or(-1),
        label_smoothing: eps,
        ignore_index: req.ignore_index,
        from_logits,
        z_loss: z,
        reduction,
    })
}

fn wanted(outputs: &[i32], kind: LossKind) -> Result<Wanted, Error> {
    if outputs.is_empty() {
        return Ok(Wanted::default());
    }
    let mut w = Wanted {
        loss: false,
        grad_logits: false,
        grad_labels: false,
    };
    for &o in outputs {
        match proto::Output::try_from(o) {
            Ok(proto::Output::Loss) => w.loss = true,
            Ok(proto::Output::GradLogits) => w.grad_logits = true,
            Ok(proto::Output::GradLabels) if kind == LossKind::Sparse => {
                return Err(Error::invalid(
                    "outputs",
                    "asks for OUTPUT_GRAD_LABELS, but class ids have no gradient",
                ));
            }
            Ok(proto::Output::GradLabels) => w.grad_labels = true,
            Ok(proto::Output::Unspecified) | Err(_) => {
                return Err(Error::invalid("outputs", format!("has unknown value {o}")));
            }
        }
    }
    Ok(w)
}

fn float_tensor(field: &'static str, t: proto::Tensor) -> Result<AnyTensor, Error> {
    let t = tensor::decode(Some(t)).map_err(field_err(field))?;
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
                "has shape {:?}; dense labels must have the logits' shape {:?}",
                labels.shape(),
                logits.shape()
            ),
        ));
    }
    fn pair<T: Pod>(x: Shaped<T>, y: Shaped<T>) -> Inputs<T> {
        Inputs {
            logits: x,
            labels: Labels::Dense(y),
        }
    }
    Ok(match (logits, labels) {
        (AnyTensor::F16(x), AnyTensor::F16(y)) => Tensors::F16(pair(x, y)),
        (AnyTensor::BF16(x), AnyTensor::BF16(y)) => Tensors::BF16(pair(x, y)),
        (AnyTensor::F32(x), AnyTensor::F32(y)) => Tensors::F32(pair(x, y)),
        (AnyTensor::F64(x), AnyTensor::F64(y)) => Tensors::F64(pair(x, y)),
        _ => return Err(Error::Internal("dtypes checked equal but differ".into())),
    })
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
                "has shape {id_shape:?}; class ids must have the logits' shape without the class axis, {loss_shape:?}"
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
            format!("class id {value} at index {index:?} is out of range [0, {classes}){ignore}"),
        ));
    }
    fn with<T: Pod>(x: Shaped<T>, ids: ClassIds) -> Inputs<T> {
        Inputs {
            logits: x,
            labels: Labels::Sparse(ids),
        }
    }
    Ok(match logits {
        AnyTensor::F16(x) => Tensors::F16(with(x, ids)),
        AnyTensor::BF16(x) => Tensors::BF16(with(x, ids)),
        AnyTensor::F32(x) => Tensors::F32(with(x, ids)),
        AnyTensor::F64(x) => Tensors::F64(with(x, ids)),
        AnyTensor::I32(_) | AnyTensor::I64(_) => {
            return Err(Error::Internal("logits checked float".into()));
        }
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tensor::encode;

    fn request(
        logits: proto::Tensor,
        labels: proto::Tensor,
        loss: proto::LossKind,
    ) -> proto::EvaluateRequest {
        proto::EvaluateRequest {
            loss: loss as i32,
            logits: Some(logits),
            labels: Some(labels),
            ..Default::default()
        }
    }

    fn dense_ok() -> proto::EvaluateRequest {
        request(
            encode(&[2, 3], vec![0f32; 6], true),
            encode(&[2, 3], vec![0f32; 6], true),
            proto::LossKind::SoftmaxCrossEntropy,
        )
    }

    fn field_of(r: proto::EvaluateRequest) -> (String, String) {
        match decode(r).unwrap_err() {
            Error::InvalidArgument { field, reason } => (field, reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_valid_request_decodes_with_defaults() {
        let ev = decode(dense_ok()).unwrap();
        assert_eq!(
            ev.layout,
            Layout {
                outer: 2,
                classes: 3,
                inner: 1
            }
        );
        assert_eq!(ev.options.axis, 1);
        assert_eq!(ev.wanted, Wanted::default());
        assert!(ev.raw_response);
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = dense_ok();
        r.labels = Some(encode(&[2, 2], vec![0f32; 4], true));
        assert_eq!(field_of(r).0, "labels");
        let mut r = dense_ok();
        r.labels = Some(encode(&[2, 3], vec![0f64; 6], true));
        assert!(field_of(r).1.contains("dtype"));
        let mut r = dense_ok();
        r.axis = Some(2);
        assert_eq!(field_of(r).0, "axis");
        let mut r = dense_ok();
        r.label_smoothing = 1.5;
        assert_eq!(field_of(r).0, "label_smoothing");
        let mut r = dense_ok();
        r.z_loss = -1.0;
        assert_eq!(field_of(r).0, "z_loss");
        let mut r = dense_ok();
        r.class_weights = Some(encode(&[2], vec![1f32; 2], true));
        assert_eq!(field_of(r).0, "class_weights");
        let mut r = dense_ok();
        r.sample_weights = Some(encode(&[3], vec![1f32; 3], true));
        assert_eq!(field_of(r).0, "sample_weights");
        let mut r = dense_ok();
        r.upstream = Some(encode(&[], vec![1f32], true));
        assert_eq!(field_of(r).0, "upstream");
        let mut r = dense_ok();
        r.loss = 0;
        assert_eq!(field_of(r).0, "loss");
        let mut r = dense_ok();
        r.logits = Some(encode(&[2, 0], Vec::<f32>::new(), true));
        r.labels = Some(encode(&[2, 0], Vec::<f32>::new(), true));
        assert_eq!(field_of(r).0, "logits");
        let mut r = dense_ok();
        r.logits = None;
        assert_eq!(field_of(r), ("logits".into(), "is required".into()));
    }

    #[test]
    fn out_of_range_class_ids_name_their_index() {
        let r = request(
            encode(&[2, 2, 3], vec![0f32; 12], true),
            encode(&[2, 2], vec![0i64, 1, 2, 3], true),
            proto::LossKind::SparseSoftmaxCrossEntropy,
        );
        let (field, reason) = field_of(r);
        assert_eq!(field, "labels");
        assert_eq!(reason, "class id 3 at index [1, 1] is out of range [0, 3)");
        let mut r = request(
            encode(&[2, 3], vec![0f32; 6], true),
            encode(&[2], vec![-100i32, 2], true),
            proto::LossKind::SparseSoftmaxCrossEntropy,
        );
        r.ignore_index = Some(-100);
        assert!(decode(r).is_ok());
    }

    #[test]
    fn sample_weights_broadcast_to_rows() {
        let mut r = request(
            encode(&[2, 4, 3], vec![0f32; 24], true),
            encode(&[2, 4, 3], vec![0f32; 24], true),
            proto::LossKind::SoftmaxCrossEntropy,
        );
        r.sample_weights = Some(encode(&[2, 1], vec![1.0f64, 2.0], true));
        let ev = decode(r).unwrap();
        assert_eq!(
            ev.sample_weights.unwrap(),
            vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
        );
    }
}
