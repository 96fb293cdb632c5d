//! Every case in tests/reference, produced by TensorFlow, Keras and PyTorch (see its README),
//! sent to a running xentd through both RPCs and compared with the spec's tolerances (§8).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use ndarray::ArrayD;
use ndarray_npy::read_npy;
use serde_json::Value;
use xent::api::tensor::{AnyTensor, decode, encode};
use xent::proto;

use crate::common::TestServer;

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

fn manifest() -> Vec<Value> {
    let text =
        std::fs::read_to_string(reference_dir().join("manifest.json")).expect("manifest.json");
    let v: Value = serde_json::from_str(&text).expect("manifest is JSON");
    v["cases"].as_array().expect("cases").clone()
}

/// Float arrays are stored as float64, or float32 in float32 cases.
fn read_floats(rel: &str) -> (Vec<usize>, Vec<f64>) {
    let path = reference_dir().join(rel);
    if let Ok(a) = read_npy::<_, ArrayD<f64>>(&path) {
        return (a.shape().to_vec(), a.iter().copied().collect());
    }
    let a: ArrayD<f32> = read_npy(&path).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (
        a.shape().to_vec(),
        a.iter().map(|&v| f64::from(v)).collect(),
    )
}

fn read_ids(rel: &str) -> (Vec<usize>, Vec<i64>) {
    let a: ArrayD<i64> =
        read_npy(reference_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    (a.shape().to_vec(), a.iter().copied().collect())
}

fn float_tensor(dtype: &str, shape: &[usize], v: &[f64]) -> proto::Tensor {
    match dtype {
        "float16" => encode(shape, v.iter().map(|&x| f16::from_f64(x)).collect(), true),
        "bfloat16" => encode(shape, v.iter().map(|&x| bf16::from_f64(x)).collect(), true),
        "float32" => encode(shape, v.iter().map(|&x| x as f32).collect(), true),
        "float64" => encode(shape, v.to_vec(), true),
        other => panic!("unknown dtype {other}"),
    }
}

fn reduction(name: &str) -> proto::Reduction {
    match name {
        "none" => proto::Reduction::None,
        "sum" => proto::Reduction::Sum,
        "mean" => proto::Reduction::Mean,
        "sum_over_batch_size" => proto::Reduction::SumOverBatchSize,
        "sum_by_nonzero_weights" => proto::Reduction::SumByNonzeroWeights,
        other => panic!("unknown reduction {other}"),
    }
}

/// The request a case describes.
fn request(case: &Value) -> proto::EvaluateRequest {
    let dtype = case["dtype"].as_str().unwrap();
    let inputs = &case["inputs"];
    let opts = &case["options"];
    let sparse = case["loss"] == "sparse_softmax_cross_entropy";
    let (shape, x) = read_floats(inputs["logits"].as_str().unwrap());
    let labels = if sparse {
        let (s, ids) = read_ids(inputs["labels"].as_str().unwrap());
        match case["label_dtype"].as_str().unwrap_or("int64") {
            "int32" => encode(&s, ids.iter().map(|&v| v as i32).collect(), true),
            _ => encode(&s, ids, true),
        }
    } else {
        let (s, y) = read_floats(inputs["labels"].as_str().unwrap());
        float_tensor(dtype, &s, &y)
    };
    let f64_input = |key: &str| {
        inputs[key].as_str().map(|p| {
            let (s, v) = read_floats(p);
            encode(&s, v, true)
        })
    };
    let mut outputs = vec![proto::Output::Loss as i32, proto::Output::GradLogits as i32];
    if !sparse {
        outputs.push(proto::Output::GradLabels as i32);
    }
    proto::EvaluateRequest {
        request_id: case["name"].as_str().unwrap().into(),
        loss: if sparse {
            proto::LossKind::SparseSoftmaxCrossEntropy
        } else {
            proto::LossKind::SoftmaxCrossEntropy
        } as i32,
        logits: Some(float_tensor(dtype, &shape, &x)),
        labels: Some(labels),
        axis: opts["axis"].as_i64(),
        label_smoothing: opts["label_smoothing"].as_f64().unwrap_or(0.0),
        class_weights: f64_input("class_weights"),
        sample_weights: f64_input("sample_weights"),
        ignore_index: opts["ignore_index"].as_i64(),
        from_logits: opts["from_logits"].as_bool(),
        z_loss: opts["z_loss"].as_f64().unwrap_or(0.0),
        reduction: reduction(opts["reduction"].as_str().unwrap()) as i32,
        upstream: f64_input("upstream"),
        outputs,
        response_encoding: proto::Encoding::Raw as i32,
    }
}

/// Spec §8 tolerances `(rel, abs)` by dtype; the absolute floor covers values near zero.
fn tolerance(dtype: &str) -> (f64, f64) {
    match dtype {
        "float64" => (1e-9, 1e-12),
        "float32" => (3e-5, 2e-6),
        "float16" => (4e-3, 1e-4),
        "bfloat16" => (2e-2, 1e-3),
        other => panic!("unknown dtype {other}"),
    }
}

/// Largest errors seen, over elements where the expected value is finite.
#[derive(Clone, Copy, Debug, Default)]
struct Errors {
    abs: f64,
    rel: f64,
}

fn compare(
    name: &str,
    what: &str,
    dtype: &str,
    got: &AnyTensor,
    expected: &str,
    errs: &mut Errors,
) -> Result<(), String> {
    let (shape, want) = read_floats(expected);
    if got.shape() != shape.as_slice() {
        return Err(format!(
            "{name}: {what} has shape {:?}, expected {shape:?}",
            got.shape()
        ));
    }
    if got.dtype().name() != dtype {
        return Err(format!(
            "{name}: {what} has dtype {}, expected {dtype}",
            got.dtype()
        ));
    }
    let got = got.floats_to_f64().unwrap();
    let (rel, abs) = tolerance(dtype);
    for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
        let same_special = (g.is_nan() && w.is_nan()) || (g.is_infinite() && g == w);
        if same_special {
            continue;
        }
        let d = (g - w).abs();
        if d.is_nan() || d > abs + rel * w.abs() {
            return Err(format!(
                "{name}: {what}[{k}] = {g:e}, expected {w:e} (tolerance rel {rel:e} abs {abs:e})"
            ));
        }
        errs.abs = errs.abs.max(d);
        if w.abs() > abs {
            errs.rel = errs.rel.max(d / w.abs());
        }
    }
    Ok(())
}

fn check_answer(
    case: &Value,
    answer: Result<proto::EvaluateResponse, (tonic::Code, String)>,
    errs: &mut Errors,
) -> Result<(), String> {
    let name = case["name"].as_str().unwrap();
    if let Some(err) = case.get("error") {
        let field = err["field"].as_str().unwrap();
        let contains = err["contains"].as_str().unwrap_or("");
        return match answer {
            Err((tonic::Code::InvalidArgument, msg))
                if msg.starts_with(field) && msg.contains(contains) =>
            {
                Ok(())
            }
            Err((code, msg)) => Err(format!(
                "{name}: expected INVALID_ARGUMENT on {field} containing {contains:?}, got {code:?}: {msg}"
            )),
            Ok(_) => Err(format!(
                "{name}: expected INVALID_ARGUMENT on {field}, got a result"
            )),
        };
    }
    let resp = answer.map_err(|(c, m)| format!("{name}: {c:?}: {m}"))?;
    if resp.request_id != name {
        return Err(format!(
            "{name}: answer carries request_id {:?}",
            resp.request_id
        ));
    }
    let dtype = case["dtype"].as_str().unwrap();
    let expected = &case["expected"];
    let outputs = [
        ("loss", resp.loss),
        ("grad_logits", resp.grad_logits),
        ("grad_labels", resp.grad_labels),
    ];
    for (what, tensor) in outputs {
        let Some(path) = expected[what].as_str() else {
            continue;
        };
        let t = decode(tensor).map_err(|e| format!("{name}: {what} {e}"))?;
        compare(name, what, dtype, &t, path, errs)?;
    }
    Ok(())
}

fn report(label: &str, per_dtype: &BTreeMap<String, Errors>, failures: &[String], cases: usize) {
    eprintln!("conformance over {label}: {cases} cases");
    for (dtype, e) in per_dtype {
        eprintln!(
            "  {dtype:>9}: max abs error {:.3e}, max rel error {:.3e}",
            e.abs, e.rel
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_case_matches_over_unary_calls() {
    let cases = manifest();
    assert!(
        cases.len() >= 100,
        "the reference set is incomplete: {} cases",
        cases.len()
    );
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut per_dtype: BTreeMap<String, Errors> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let answer = client
            .evaluate(request(case))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| (s.code(), s.message().to_string()));
        let errs = per_dtype
            .entry(case["dtype"].as_str().unwrap().to_string())
            .or_default();
        if let Err(f) = check_answer(case, answer, errs) {
            failures.push(f);
        }
    }
    report("Evaluate", &per_dtype, &failures, cases.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reference_case_matches_over_one_stream() {
    let cases = manifest();
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let requests: Vec<_> = cases.iter().map(request).collect();
    let mut answers = client
        .evaluate_stream(futures::stream::iter(requests))
        .await
        .expect("stream opens")
        .into_inner();
    let mut per_dtype: BTreeMap<String, Errors> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in &cases {
        let item = answers
            .message()
            .await
            .expect("stream item")
            .expect("an answer per request");
        assert_eq!(
            item.request_id,
            case["name"].as_str().unwrap(),
            "answers come in request order"
        );
        let answer = match item.result.expect("result set") {
            proto::evaluate_stream_response::Result::Response(r) => Ok(r),
            proto::evaluate_stream_response::Result::Error(e) => {
                Err((tonic::Code::from_i32(e.code), e.message))
            }
        };
        let errs = per_dtype
            .entry(case["dtype"].as_str().unwrap().to_string())
            .or_default();
        if let Err(f) = check_answer(case, answer, errs) {
            failures.push(f);
        }
    }
    assert!(answers.message().await.expect("clean end").is_none());
    report("EvaluateStream", &per_dtype, &failures, cases.len());
}
