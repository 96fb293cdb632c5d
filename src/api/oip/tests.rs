//! Translation both ways, the protocol's refusals, and responses.

use std::collections::HashMap;

use super::*;
use crate::api::tensor::encode;
use crate::proto;
use crate::proto::inference::infer_parameter::ParameterChoice;
use crate::proto::inference::model_infer_request::InferRequestedOutputTensor;
use crate::proto::inference::{InferParameter, InferTensorContents, ModelInferRequest};

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
        let (got, _, reply) = decode(infer_request(xent_dense(raw), raw).unwrap()).unwrap();
        assert_eq!(got.kind, want.kind);
        assert_eq!(got.shape, want.shape);
        assert_eq!(got.options, want.options);
        assert_eq!(got.wanted, want.wanted);
        assert_eq!(got.raw_response, raw);
        assert_eq!(reply.outputs, Output::DEFAULT);
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
    let (ev, _, reply) = decode(infer_request(req, false).unwrap()).unwrap();
    assert!(ev.raw_response && reply.raw);
}

#[test]
fn responses_carry_the_requested_outputs_in_order() {
    let mut req = xent_dense(true);
    req.outputs = vec![proto::Output::GradLabels as i32, proto::Output::Loss as i32];
    let (ev, _, reply) = decode(infer_request(req, true).unwrap()).unwrap();
    let out = crate::compute::evaluate(&ev).unwrap();
    let resp = response(reply, &ev, out).unwrap();
    let names: Vec<&str> = resp.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["grad_labels", "loss"]);
    assert_eq!(resp.outputs[1].shape, Vec::<i64>::new());
    let decoded = outputs(resp).unwrap();
    assert_eq!(decoded[0].1.shape(), &[2, 3]);
    assert_eq!(decoded[1].1.dtype(), DType::F32);
}

fn param(p: ParameterChoice) -> InferParameter {
    InferParameter {
        parameter_choice: Some(p),
    }
}

#[test]
fn tritons_reserved_parameters_become_the_schedule() {
    let mut r = infer_request(xent_dense(true), true).unwrap();
    r.parameters
        .insert("priority".into(), param(ParameterChoice::Uint64Param(1)));
    r.parameters
        .insert("timeout".into(), param(ParameterChoice::Int64Param(2500)));
    r.parameters.insert(
        "triton_enable_empty_final_response".into(),
        param(ParameterChoice::BoolParam(true)),
    );
    r.parameters.insert(
        "triton_anything_else".into(),
        param(ParameterChoice::StringParam("x".into())),
    );
    let (_, schedule, reply) = decode(r).unwrap();
    assert_eq!(schedule.level, Some(1));
    assert_eq!(
        schedule.queue_timeout,
        Some(std::time::Duration::from_micros(2500))
    );
    assert!(reply.final_flag);
    // 0 means the default for both.
    let mut r = infer_request(xent_dense(true), true).unwrap();
    r.parameters
        .insert("priority".into(), param(ParameterChoice::Int64Param(0)));
    r.parameters
        .insert("timeout".into(), param(ParameterChoice::Uint64Param(0)));
    let (_, schedule, reply) = decode(r).unwrap();
    assert_eq!(schedule, crate::batcher::Schedule::default());
    assert!(!reply.final_flag);
    for (key, p, start) in [
        (
            "priority",
            ParameterChoice::Int64Param(-1),
            "is int64_param -1",
        ),
        (
            "timeout",
            ParameterChoice::DoubleParam(1.0),
            "is double_param 1",
        ),
        (
            "triton_enable_empty_final_response",
            ParameterChoice::Int64Param(1),
            "is int64_param 1",
        ),
        (
            "sequence_id",
            ParameterChoice::Uint64Param(7),
            "is a parameter of Triton's sequence batcher",
        ),
    ] {
        let mut r = infer_request(xent_dense(true), true).unwrap();
        r.parameters.insert(key.into(), param(p));
        let (field, reason) = invalid(r);
        assert_eq!(field, key);
        assert!(reason.starts_with(start), "{reason}");
    }
}

#[test]
fn a_float_option_may_come_as_a_string_holding_a_number() {
    let mut r = infer_request(xent_dense(true), true).unwrap();
    r.parameters.insert(
        "label_smoothing".into(),
        param(ParameterChoice::StringParam("0.25".into())),
    );
    let (ev, _, _) = decode(r).unwrap();
    assert_eq!(ev.options.label_smoothing, 0.25);
    let mut r = infer_request(xent_dense(true), true).unwrap();
    r.parameters.insert(
        "label_smoothing".into(),
        param(ParameterChoice::StringParam("a tenth".into())),
    );
    assert_eq!(
        invalid(r),
        (
            "label_smoothing".into(),
            "is string_param \"a tenth\"; expected a double_param (or a string_param holding a number)".into()
        )
    );
}

#[test]
fn binary_data_size_is_taken_and_checked_against_the_raw_contents() {
    let mut r = infer_request(xent_dense(true), true).unwrap();
    let len = r.raw_input_contents[0].len() as i64;
    r.inputs[0].parameters.insert(
        "binary_data_size".into(),
        param(ParameterChoice::Int64Param(len)),
    );
    assert!(decode(r.clone()).is_ok());
    r.inputs[0].parameters.insert(
        "binary_data_size".into(),
        param(ParameterChoice::Int64Param(len + 4)),
    );
    assert_eq!(invalid(r.clone()).0, "logits");
    r.inputs[0].parameters.clear();
    r.inputs[0].parameters.insert(
        "shared_memory_region".into(),
        param(ParameterChoice::StringParam("r".into())),
    );
    assert!(invalid(r).1.contains("shared memory is not supported"));
}

#[test]
fn a_batch_of_scalars_may_carry_tritons_trailing_one() {
    let req = proto::EvaluateRequest {
        loss: proto::LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], vec![1f32, 2.0, 0.5, 0.2, 0.8, 1.5], true)),
        labels: Some(encode(&[2], vec![0i64, 2], true)),
        sample_weights: Some(encode(&[2], vec![1f32, 0.5], true)),
        ..Default::default()
    };
    let want = crate::api::decode(req.clone()).unwrap();
    let mut r = infer_request(req, true).unwrap();
    for i in [1, 2] {
        r.inputs[i].shape = vec![2, 1];
    }
    let (got, _, _) = decode(r.clone()).unwrap();
    assert_eq!(got.shape, want.shape);
    assert_eq!(got.tensors.dtype(), want.tensors.dtype());
    // Only a trailing 1 after the rows: [1, 2] is still refused.
    r.inputs[1].shape = vec![1, 2];
    assert_eq!(invalid(r).0, "labels");
}
