//! xent.v1's enums, options and tensor fields to the domain's and back: one conversion of
//! each, used by the server's decoder and encoder, the Rust client, the Open Inference Protocol
//! front and its client.
//!
//! The protobuf enums are open (a field may carry a number no version of the proto names), so
//! reading one can fail; the refusal names the field, as every INVALID_ARGUMENT does.

use tonic::Status;

use crate::error::Error;
use crate::eval::{Input, LossKind, OptionName, OptionValue, Output, Reduction};
use crate::kernel::Health;
use crate::proto;

/// The loss a request names.
pub fn loss_kind(v: i32) -> Result<LossKind, Error> {
    match proto::LossKind::try_from(v) {
        Ok(proto::LossKind::SoftmaxCrossEntropy) => Ok(LossKind::Dense),
        Ok(proto::LossKind::SparseSoftmaxCrossEntropy) => Ok(LossKind::Sparse),
        Ok(proto::LossKind::Unspecified) => Err(Error::invalid(
            "loss",
            "is required: LOSS_KIND_SOFTMAX_CROSS_ENTROPY or LOSS_KIND_SPARSE_SOFTMAX_CROSS_ENTROPY",
        )),
        Err(_) => Err(Error::invalid("loss", format!("has unknown value {v}"))),
    }
}

impl From<LossKind> for proto::LossKind {
    fn from(k: LossKind) -> proto::LossKind {
        match k {
            LossKind::Dense => proto::LossKind::SoftmaxCrossEntropy,
            LossKind::Sparse => proto::LossKind::SparseSoftmaxCrossEntropy,
        }
    }
}

/// The reduction a request names; unset means `none`.
pub fn reduction(v: i32) -> Result<Reduction, Error> {
    match proto::Reduction::try_from(v) {
        Ok(proto::Reduction::Unspecified | proto::Reduction::None) => Ok(Reduction::None),
        Ok(proto::Reduction::Sum) => Ok(Reduction::Sum),
        Ok(proto::Reduction::Mean) => Ok(Reduction::Mean),
        Ok(proto::Reduction::SumOverBatchSize) => Ok(Reduction::SumOverBatchSize),
        Ok(proto::Reduction::SumByNonzeroWeights) => Ok(Reduction::SumByNonzeroWeights),
        Err(_) => Err(Error::invalid(
            "reduction",
            format!("has unknown value {v}"),
        )),
    }
}

impl From<Reduction> for proto::Reduction {
    fn from(r: Reduction) -> proto::Reduction {
        match r {
            Reduction::None => proto::Reduction::None,
            Reduction::Sum => proto::Reduction::Sum,
            Reduction::Mean => proto::Reduction::Mean,
            Reduction::SumOverBatchSize => proto::Reduction::SumOverBatchSize,
            Reduction::SumByNonzeroWeights => proto::Reduction::SumByNonzeroWeights,
        }
    }
}

/// One entry of a request's `outputs`.
pub fn output(v: i32) -> Result<Output, Error> {
    match proto::Output::try_from(v) {
        Ok(proto::Output::Loss) => Ok(Output::Loss),
        Ok(proto::Output::GradLogits) => Ok(Output::GradLogits),
        Ok(proto::Output::GradLabels) => Ok(Output::GradLabels),
        Ok(proto::Output::Unspecified) | Err(_) => {
            Err(Error::invalid("outputs", format!("has unknown value {v}")))
        }
    }
}

impl From<Output> for proto::Output {
    fn from(o: Output) -> proto::Output {
        match o {
            Output::Loss => proto::Output::Loss,
            Output::GradLogits => proto::Output::GradLogits,
            Output::GradLabels => proto::Output::GradLabels,
        }
    }
}

/// Whether a request's `response_encoding` asks for raw bytes (the default) or typed fields.
pub fn raw_response(v: i32) -> Result<bool, Error> {
    match proto::Encoding::try_from(v) {
        Ok(proto::Encoding::Unspecified | proto::Encoding::Raw) => Ok(true),
        Ok(proto::Encoding::Typed) => Ok(false),
        Err(_) => Err(Error::invalid(
            "response_encoding",
            format!("has unknown value {v}"),
        )),
    }
}

/// The `response_encoding` for raw bytes (`true`) or typed fields.
pub fn encoding(raw: bool) -> proto::Encoding {
    if raw {
        proto::Encoding::Raw
    } else {
        proto::Encoding::Typed
    }
}

impl From<Health> for proto::NumericalHealth {
    fn from(h: Health) -> proto::NumericalHealth {
        proto::NumericalHealth {
            nonfinite_inputs: h.nonfinite_inputs,
            unnormalized_label_rows: h.unnormalized_label_rows,
            nonfinite_loss_rows: h.nonfinite_loss_rows,
        }
    }
}

impl From<proto::NumericalHealth> for Health {
    fn from(h: proto::NumericalHealth) -> Health {
        Health {
            nonfinite_inputs: h.nonfinite_inputs,
            unnormalized_label_rows: h.unnormalized_label_rows,
            nonfinite_loss_rows: h.nonfinite_loss_rows,
        }
    }
}

/// An error answering one request of a stream: the status the error maps to (the one
/// mapping every refusal goes through), with its details, and the field at fault.
pub fn stream_error(e: Error) -> proto::StreamError {
    let field = e.field().unwrap_or_default().to_string();
    let status = e.into_status();
    proto::StreamError {
        code: status.code() as i32,
        message: status.message().to_string(),
        field,
        details: status.details().to_vec(),
    }
}

/// The status an in-stream error stands for, details included (read them with
/// `tonic_types::StatusExt`, as for a unary call's refusal).
pub fn stream_error_status(e: &proto::StreamError) -> Status {
    Status::with_details(
        tonic::Code::from_i32(e.code),
        e.message.clone(),
        bytes::Bytes::copy_from_slice(&e.details),
    )
}

/// Option `name` as `req` sets it: `None` where the field is unset (a proto3 scalar is unset
/// when it is `+0.0`, which means the same as the default).
pub fn option(
    req: &proto::EvaluateRequest,
    name: OptionName,
) -> Result<Option<OptionValue>, Error> {
    Ok(match name {
        OptionName::Axis => req.axis.map(OptionValue::Int),
        OptionName::LabelSmoothing => set_float(req.label_smoothing),
        OptionName::IgnoreIndex => req.ignore_index.map(OptionValue::Int),
        OptionName::FromLogits => req.from_logits.map(OptionValue::Bool),
        OptionName::ZLoss => set_float(req.z_loss),
        OptionName::Reduction => match req.reduction {
            r if r == proto::Reduction::Unspecified as i32 => None,
            r => Some(OptionValue::Reduction(reduction(r)?)),
        },
    })
}

/// A proto3 double as an option value, `None` when it is unset (`+0.0`).
fn set_float(v: f64) -> Option<OptionValue> {
    (v.to_bits() != 0).then_some(OptionValue::Float(v))
}

/// Sets option `name` of `req` to `value`, or says which kind of value it takes.
pub fn set_option(
    req: &mut proto::EvaluateRequest,
    name: OptionName,
    value: OptionValue,
) -> Result<(), crate::eval::OptionKind> {
    match (name, value) {
        (OptionName::Axis, OptionValue::Int(a)) => req.axis = Some(a),
        (OptionName::LabelSmoothing, OptionValue::Float(e)) => req.label_smoothing = e,
        (OptionName::IgnoreIndex, OptionValue::Int(k)) => req.ignore_index = Some(k),
        (OptionName::FromLogits, OptionValue::Bool(b)) => req.from_logits = Some(b),
        (OptionName::ZLoss, OptionValue::Float(z)) => req.z_loss = z,
        (OptionName::Reduction, OptionValue::Reduction(r)) => {
            req.reduction = proto::Reduction::from(r) as i32;
        }
        _ => return Err(name.kind()),
    }
    Ok(())
}

/// The field of `req` that carries `input`.
pub fn input_mut(req: &mut proto::EvaluateRequest, input: Input) -> &mut Option<proto::Tensor> {
    match input {
        Input::Logits => &mut req.logits,
        Input::Labels => &mut req.labels,
        Input::ClassWeights => &mut req.class_weights,
        Input::SampleWeights => &mut req.sample_weights,
        Input::Upstream => &mut req.upstream,
    }
}

/// The field of `resp` that carries `output`.
pub fn output_mut(
    resp: &mut proto::EvaluateResponse,
    output: Output,
) -> &mut Option<proto::Tensor> {
    match output {
        Output::Loss => &mut resp.loss,
        Output::GradLogits => &mut resp.grad_logits,
        Output::GradLabels => &mut resp.grad_labels,
    }
}
