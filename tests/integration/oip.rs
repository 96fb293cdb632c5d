//! The Open Inference Protocol (`inference.GRPCInferenceService`) of a running xentd: every
//! answer compared bit for bit with xent.v1's answer to the same request (dense and sparse,
//! raw and typed contents, halves, requested outputs), its refusals with the same codes and
//! fields, readiness and metadata, and a full queue refused the same way.

use std::sync::atomic::Ordering;
use std::time::Duration;

use half::{bf16, f16};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;
use xent::api::oip;
use xent::api::tensor::{AnyTensor, decode, encode};
use xent::config::Settings;
use xent::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use xent::proto::inference::infer_parameter::ParameterChoice;
use xent::proto::inference::{
    InferParameter, ModelInferRequest, ModelMetadataRequest, ModelReadyRequest, ServerLiveRequest,
    ServerMetadataRequest, ServerReadyRequest,
};
use xent::proto::{self, EvaluateRequest, LossKind, Output, Reduction};

use crate::common::{CLIENT_MAX_MESSAGE, TestServer};

type OipClient = GrpcInferenceServiceClient<Channel>;

async fn oip_client(server: &TestServer) -> OipClient {
    GrpcInferenceServiceClient::new(server.channel().await)
        .max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE)
}

fn values(n: usize, seed: usize) -> Vec<f64> {
    (0..n)
        .map(|k| (((k + seed) * 2_654_435_761) % 2003) as f64 / 97.0 - 10.0)
        .collect()
}

fn dense_f32(raw: bool) -> EvaluateRequest {
    let (rows, classes) = (4, 5);
    let x: Vec<f32> = values(rows * classes, 1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let y: Vec<f32> = values(rows * classes, 2)
        .iter()
        .map(|&v| (v.abs() / 10.0) as f32)
        .collect();
    EvaluateRequest {
        request_id: "dense-f32".into(),
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[rows, classes], x, raw)),
        labels: Some(encode(&[rows, classes], y, raw)),
        label_smoothing: 0.1,
        class_weights: Some(encode(&[classes], vec![1.0f32, 2.0, 0.5, 1.0, 1.5], raw)),
        reduction: Reduction::Mean as i32,
        outputs: vec![
            Output::Loss as i32,
            Output::GradLogits as i32,
            Output::GradLabels as i32,
        ],
        ..Default::default()
    }
}

fn sparse_f64_typed() -> EvaluateRequest {
    EvaluateRequest {
        request_id: "sparse-f64".into(),
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[3, 2, 4], values(24, 3), false)),
        labels: Some(encode(
            &[3, 4],
            vec![0i64, 1, -1, 1, 1, 0, 0, -1, 1, 1, 0, 0],
            false,
        )),
        axis: Some(1),
        ignore_index: Some(-1),
        sample_weights: Some(encode(&[3, 1], vec![1.0f64, 0.5, 2.0], false)),
        z_loss: 1e-3,
        outputs: vec![Output::GradLogits as i32],
        ..Default::default()
    }
}

fn sparse_bf16() -> EvaluateRequest {
    let mut x: Vec<bf16> = values(12, 4).iter().map(|&v| bf16::from_f64(v)).collect();
    // A NaN logit: its row's loss is NaN, and both are counted in the answer's health.
    x[4] = bf16::NAN;
    EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[4, 3], x, true)),
        labels: Some(encode(&[4], vec![2i32, 0, 1, 2], true)),
        reduction: Reduction::SumOverBatchSize as i32,
        upstream: Some(encode(&[], vec![0.5f32], true)),
        from_logits: Some(true),
        ..Default::default()
    }
}

fn dense_f16_probabilities() -> EvaluateRequest {
    let x: Vec<f16> = values(6, 5)
        .iter()
        .map(|&v| f16::from_f64(v.abs() + 0.1))
        .collect();
    EvaluateRequest {
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], x, true)),
        labels: Some(encode(
            &[2, 3],
            [0.0, 1.0, 0.0, 0.5, 0.0, 0.5].map(f16::from_f64).to_vec(),
            true,
        )),
        from_logits: Some(false),
        reduction: Reduction::Sum as i32,
        ..Default::default()
    }
}

/// xent.v1's outputs by name, in the order `oip::outputs` would list them for `names`.
fn xent_outputs(resp: proto::EvaluateResponse, names: &[&str]) -> Vec<(String, AnyTensor)> {
    names
        .iter()
        .map(|&n| {
            let t = match n {
                "loss" => resp.loss.clone(),
                "grad_logits" => resp.grad_logits.clone(),
                "grad_labels" => resp.grad_labels.clone(),
                _ => unreachable!(),
            };
            (n.to_string(), decode(t).expect("xent.v1 output"))
        })
        .collect()
}

/// The bytes of a decoded tensor, for bitwise comparison.
fn bits(t: &AnyTensor) -> (Vec<usize>, xent::dtype::DType, Vec<u8>) {
    fn b<T: bytemuck::Pod>(s: &xent::api::tensor::Shaped<T>) -> Vec<u8> {
        bytemuck::cast_slice(&s.data.slice()).to_vec()
    }
    let data = match t {
        AnyTensor::F16(s) => b(s),
        AnyTensor::BF16(s) => b(s),
        AnyTensor::F32(s) => b(s),
        AnyTensor::F64(s) => b(s),
        AnyTensor::I32(s) => b(s),
        AnyTensor::I64(s) => b(s),
    };
    (t.shape().to_vec(), t.dtype(), data)
}

#[tokio::test]
async fn model_infer_answers_exactly_as_evaluate_does() {
    let server = TestServer::start().await;
    let (mut xent, mut oip_c) = (server.client().await, oip_client(&server).await);
    let cases: Vec<(EvaluateRequest, bool, &[&str])> = vec![
        (
            dense_f32(true),
            true,
            &["loss", "grad_logits", "grad_labels"],
        ),
        (
            dense_f32(false),
            false,
            &["loss", "grad_logits", "grad_labels"],
        ),
        (sparse_f64_typed(), false, &["grad_logits"]),
        (sparse_bf16(), true, &["loss", "grad_logits"]),
        (dense_f16_probabilities(), true, &["loss", "grad_logits"]),
    ];
    let mut unhealthy = 0;
    for (req, raw, names) in cases {
        let id = req.request_id.clone();
        let model = if req.loss == LossKind::SoftmaxCrossEntropy as i32 {
            "softmax_cross_entropy"
        } else {
            "sparse_softmax_cross_entropy"
        };
        let infer = oip::infer_request(req.clone(), raw).unwrap();
        assert_eq!(infer.model_name, model);
        let mut want_req = req;
        want_req.response_encoding = if raw {
            proto::Encoding::Raw
        } else {
            proto::Encoding::Typed
        } as i32;
        let want = xent.evaluate(want_req).await.unwrap().into_inner();
        let got = oip_c.model_infer(infer).await.unwrap().into_inner();
        let h = want.health.unwrap();
        let counts = [
            h.nonfinite_inputs,
            h.unnormalized_label_rows,
            h.nonfinite_loss_rows,
        ];
        unhealthy += counts.iter().filter(|&&c| c > 0).count();
        for (name, count) in oip::HEALTH_PARAMETERS.iter().zip(counts) {
            assert_eq!(
                got.parameters[*name].parameter_choice,
                Some(ParameterChoice::Int64Param(count as i64)),
                "{model}: health {name} as xent.v1 counts it"
            );
        }
        assert_eq!(got.model_name, model);
        assert_eq!(got.model_version, "1");
        assert_eq!(got.id, id, "the request id is echoed");
        assert_eq!(
            got.raw_output_contents.len(),
            if raw { names.len() } else { 0 },
            "{model}: raw inputs get raw outputs, typed inputs typed outputs"
        );
        let got_names: Vec<&str> = got.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(got_names, names, "{model}: the requested outputs, in order");
        let got = oip::outputs(got).unwrap();
        let want = xent_outputs(want, names);
        for ((gn, g), (wn, w)) in got.iter().zip(&want) {
            assert_eq!(gn, wn);
            assert_eq!(bits(g), bits(w), "{model} {gn}: same bits as xent.v1");
        }
    }
    // Unnormalised dense labels (twice) and the NaN logit (input and loss row).
    assert_eq!(unhealthy, 4, "the cases exercise the health counts");
}

#[tokio::test]
async fn no_requested_outputs_means_loss_and_grad_logits() {
    let server = TestServer::start().await;
    let mut c = oip_client(&server).await;
    let mut req = dense_f32(true);
    req.outputs.clear();
    let got = c
        .model_infer(oip::infer_request(req, true).unwrap())
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = got.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["loss", "grad_logits"]);
    assert_eq!(got.outputs[0].datatype, "FP32");
    assert_eq!(got.outputs[0].shape, Vec::<i64>::new(), "a reduced loss");
    assert_eq!(got.outputs[1].shape, vec![4, 5]);
}

/// The code, message and BadRequest field of a refused ModelInfer.
async fn refusal(c: &mut OipClient, req: ModelInferRequest) -> (Code, String, Option<String>) {
    let status = c.model_infer(req).await.expect_err("must be refused");
    let field = status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
    (status.code(), status.message().to_string(), field)
}

#[tokio::test]
async fn refusals_match_xent_v1_and_name_the_input_or_parameter() {
    let server = TestServer::start().await;
    let (mut xent, mut c) = (server.client().await, oip_client(&server).await);

    // The same invalid request through both protocols: same code, message and field.
    let mut bad = sparse_f64_typed();
    bad.labels = Some(encode(
        &[3, 4],
        vec![0i64, 1, 7, 1, 1, 0, 0, 1, 1, 1, 0, 0],
        false,
    ));
    let x = xent.evaluate(bad.clone()).await.expect_err("out of range");
    let (code, message, field) = refusal(&mut c, oip::infer_request(bad, false).unwrap()).await;
    assert_eq!(code, Code::InvalidArgument);
    assert_eq!(message, x.message());
    assert_eq!(field.as_deref(), Some("labels"));
    assert!(message.contains("class id 7 at index [0, 2]"), "{message}");

    let base = || oip::infer_request(dense_f32(true), true).unwrap();
    let param = |v: ParameterChoice| InferParameter {
        parameter_choice: Some(v),
    };
    let mut cases: Vec<(ModelInferRequest, Code, Option<&str>, &str)> = Vec::new();
    let mut r = base();
    r.model_name = "resnet50".into();
    cases.push((r, Code::NotFound, None, "resnet50"));
    let mut r = base();
    r.model_version = "7".into();
    cases.push((r, Code::NotFound, None, "version"));
    let mut r = base();
    r.parameters.insert(
        "reduction".into(),
        param(ParameterChoice::StringParam("avg".into())),
    );
    cases.push((r, Code::InvalidArgument, Some("reduction"), "\"avg\""));
    let mut r = base();
    r.parameters
        .insert("z_loss".into(), param(ParameterChoice::DoubleParam(-1.0)));
    cases.push((r, Code::InvalidArgument, Some("z_loss"), ">= 0"));
    let mut r = base();
    r.parameters
        .insert("sequence_id".into(), param(ParameterChoice::Uint64Param(1)));
    cases.push((
        r,
        Code::InvalidArgument,
        Some("sequence_id"),
        "sequence batcher",
    ));
    let mut r = base();
    r.inputs[1].name = "target".into();
    cases.push((r, Code::InvalidArgument, Some("target"), "not an input"));
    let mut r = base();
    r.inputs[0].datatype = "FP8".into();
    cases.push((r, Code::InvalidArgument, Some("logits"), "datatype"));
    let mut r = base();
    r.inputs.remove(1);
    r.raw_input_contents.remove(1);
    cases.push((r, Code::InvalidArgument, Some("labels"), "required"));
    let mut r = base();
    r.raw_input_contents[0] = r.raw_input_contents[0].slice(4..);
    cases.push((r, Code::InvalidArgument, Some("logits"), "bytes"));
    let mut r = base();
    r.outputs[0].name = "probabilities".into();
    cases.push((r, Code::InvalidArgument, Some("outputs"), "probabilities"));
    let mut r = oip::infer_request(sparse_bf16(), true).unwrap();
    r.outputs.push(Default::default());
    r.outputs[0].name = "grad_labels".into();
    cases.push((r, Code::InvalidArgument, Some("outputs"), "grad_labels"));
    for (req, code, field, needle) in cases {
        let (got_code, message, got_field) = refusal(&mut c, req).await;
        assert_eq!((got_code, got_field.as_deref()), (code, field), "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }
}

#[tokio::test]
async fn readiness_and_metadata() {
    let server = TestServer::start().await;
    let mut c = oip_client(&server).await;
    assert!(
        c.server_live(ServerLiveRequest {})
            .await
            .unwrap()
            .into_inner()
            .live
    );
    assert!(
        c.server_ready(ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
    );
    for name in ["softmax_cross_entropy", "sparse_softmax_cross_entropy"] {
        for version in ["", "1"] {
            let r = ModelReadyRequest {
                name: name.into(),
                version: version.into(),
            };
            assert!(c.model_ready(r).await.unwrap().into_inner().ready);
        }
    }
    let r = ModelReadyRequest {
        name: "nope".into(),
        version: String::new(),
    };
    assert_eq!(c.model_ready(r).await.unwrap_err().code(), Code::NotFound);

    let m = c
        .server_metadata(ServerMetadataRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (m.name.as_str(), m.version.as_str()),
        ("xentd", env!("CARGO_PKG_VERSION"))
    );

    let m = c
        .model_metadata(ModelMetadataRequest {
            name: "sparse_softmax_cross_entropy".into(),
            version: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.versions, ["1"]);
    let inputs: Vec<(&str, &str, &[i64])> = m
        .inputs
        .iter()
        .map(|t| (t.name.as_str(), t.datatype.as_str(), t.shape.as_slice()))
        .collect();
    const F: &str = "FP32";
    assert_eq!(
        inputs,
        [
            ("logits", F, &[-1i64, -1][..]),
            ("labels", "INT64", &[-1, 1][..]),
            ("class_weights", F, &[-1][..]),
            ("sample_weights", F, &[-1, 1][..]),
            ("upstream", F, &[-1, 1][..]),
        ]
    );
    let outputs: Vec<&str> = m.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        outputs,
        ["loss", "grad_logits"],
        "class ids have no gradient"
    );
    let r = ModelMetadataRequest {
        name: "softmax_cross_entropy".into(),
        version: "2".into(),
    };
    assert_eq!(
        c.model_metadata(r).await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        server.health("inference.GRPCInferenceService").await,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_model_infer_with_a_retry_delay() {
    let mut s = Settings {
        compute_threads: 1,
        ..Settings::default()
    };
    s.batcher.max_inflight_batches = 1;
    s.batcher.limits.max_queue_requests = 1;
    let server = TestServer::with_settings(s).await;
    let (xent, mut c) = (server.client().await, oip_client(&server).await);
    let gate = server.block_compute();
    // One call computing (behind the blocked pool), one waiting, the third shed: full. The
    // first takes the only compute slot alone (calls sent together may share its batch).
    let call = || {
        let mut x = xent.clone();
        tokio::spawn(async move { x.evaluate(dense_f32(true)).await })
    };
    let mut calls = vec![call()];
    for _ in 0..3000 {
        if server.stats().inflight_batches.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    calls.extend((0..2).map(|_| call()));
    for _ in 0..3000 {
        if server.stats().shed_queue_requests.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.stats().shed_queue_requests.load(Ordering::SeqCst), 1);
    let status = c
        .model_infer(oip::infer_request(dense_f32(true), true).unwrap())
        .await
        .expect_err("the queue is full");
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.get_details_retry_info().is_some(),
        "RetryInfo detail"
    );
    drop(gate);
    let answered = futures::future::join_all(calls).await;
    assert_eq!(
        answered.iter().filter(|r| matches!(r, Ok(Ok(_)))).count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_infer_over_the_message_limit_is_resource_exhausted() {
    let s = Settings {
        max_message_bytes: 64 << 10,
        ..Settings::default()
    };
    let server = TestServer::with_settings(s).await;
    let mut c = oip_client(&server).await;
    let (rows, classes) = (40, 1000);
    let dense = EvaluateRequest {
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[rows, classes], vec![0.5f32; rows * classes], true)),
        labels: Some(encode(
            &[rows, classes],
            vec![0.001f32; rows * classes],
            true,
        )),
        ..Default::default()
    };
    // 2 x 40 x 1000 x 4 bytes = 320 KB in: refused from the message's prefix.
    let err = c
        .model_infer(oip::infer_request(dense, true).unwrap())
        .await
        .expect_err("request over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    for part in [
        "request message is",
        "at most 65536 bytes",
        "--max-message-bytes",
    ] {
        assert!(err.message().contains(part), "{part}: {}", err.message());
    }
    assert_eq!(
        server.stats().computed_requests.load(Ordering::SeqCst),
        0,
        "nothing over the limit was computed"
    );
    // The layer's refusal is a call like any other: the server goes on answering.
    c.model_infer(oip::infer_request(dense_f32(true), true).unwrap())
        .await
        .expect("a small call is answered");
}
