//! `EvaluateRequest` to a validated [`Evaluation`], or an error naming the field and why.
//!
//! What is xent.v1's own is read here (the open enums, the tensors' wire form); the contract's
//! refusals are the domain's ([`Request::validate`]). The checks that come before a tensor is
//! read are made as soon as what they check is read, so a request with several faults is
//! refused for the first in the contract's order, as every front refuses it.

use super::convert;
use super::tensor;
use crate::error::Error;
use crate::eval::request::{check_options, check_request_id};
use crate::eval::{Evaluation, OptionName, Options, Request, Wanted};
use crate::proto;

/// Validates a request.
pub fn decode(req: proto::EvaluateRequest) -> Result<Evaluation, Error> {
    check_request_id(&req.request_id)?;
    let kind = convert::loss_kind(req.loss)?;
    let mut options = Options::default();
    for name in OptionName::ALL {
        if let Some(value) = convert::option(&req, name)? {
            name.set(&mut options, value)
                .map_err(|_| Error::Internal(format!("{name} read as another kind")))?;
        }
    }
    check_options(&options, kind)?;
    let wanted = Wanted::from_outputs(req.outputs.iter().map(|&o| convert::output(o)), kind)?;
    let raw_response = convert::raw_response(req.response_encoding)?;
    let read = |t: Option<proto::Tensor>| tensor::decode(t).map_err(|e| e.to_string());
    Request {
        request_id: req.request_id,
        kind,
        options,
        wanted,
        raw_response,
        logits: read(req.logits),
        labels: read(req.labels),
        class_weights: req.class_weights.map(|t| read(Some(t))),
        sample_weights: req.sample_weights.map(|t| read(Some(t))),
        upstream: req.upstream.map(|t| read(Some(t))),
    }
    .validate()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tensor::encode;
    use crate::kernel::Layout;

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
