//! The fuzz targets' checks (fuzz/checks/, the code libFuzzer runs) under plain `cargo test`,
//! on every seed of fuzz/corpus/<target>/ and every input that once made a target fail,
//! kept in fuzz/regressions/<target>/. An input a target finds failing goes into that
//! directory and is tested from then on; while the failure is not fixed, it gets an
//! `#[ignore]`d test of its own below (and [`KNOWN`] keeps it out of the directory's test).
//!
//! The seeds of the request targets are real requests, written by this file
//! (`XENT_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions`), and a test checks that the
//! committed files are still what it writes and that each request is valid, so the fuzzer
//! starts from requests that reach the computation.

#[allow(dead_code)]
#[path = "../fuzz/checks/draw.rs"]
mod draw;
#[path = "../fuzz/checks/kernel.rs"]
mod kernel;
#[path = "../fuzz/checks/message_prefix.rs"]
mod message_prefix;
#[path = "../fuzz/checks/oip.rs"]
mod oip;
#[path = "../fuzz/checks/xent_v1.rs"]
mod xent_v1;

use std::path::{Path, PathBuf};

use half::{bf16, f16};
use prost::Message as _;
use xent::api::tensor::encode;
use xent::proto::{self, EvaluateRequest, LossKind, Output};

/// Inputs of fuzz/regressions/ that fail today, `(target, file)`, each with an ignored test.
const KNOWN: &[(&str, &str)] = &[
    ("kernel", "zero_probability_row"),
    ("kernel", "float32_logit_span_overflow"),
    ("kernel", "float32_loss_term_overflow"),
    ("kernel", "found_by_ci_fuzzing"),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of fuzz/<dir>/<target>/, sorted, with their contents.
fn inputs(dir: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(fuzz_dir().join(dir).join(target)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    files.sort();
    files
}

/// Runs `check` on every seed and regression of `target` but the known failures; reports
/// every failing file, not only the first.
fn run_all(target: &str, check: fn(&[u8])) {
    let mut failed = Vec::new();
    let mut ran = 0;
    for dir in ["corpus", "regressions"] {
        for (name, data) in inputs(dir, target) {
            if KNOWN.contains(&(target, name.as_str())) {
                continue;
            }
            ran += 1;
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failed.push(format!("fuzz/{dir}/{target}/{name}"));
            }
        }
    }
    assert!(ran > 0, "no inputs for {target}");
    assert!(failed.is_empty(), "failing inputs: {failed:?}");
}

/// Runs `check` on one file of fuzz/regressions/<target>/.
#[allow(dead_code)]
fn run_one(target: &str, name: &str, check: fn(&[u8])) {
    check(&std::fs::read(fuzz_dir().join("regressions").join(target).join(name)).unwrap());
}

/// bfloat16 probabilities (`from_logits = false`) `[0.0]`, one class, class id 0, sample
/// weight 0, upstream 0, reduction NONE: the kernel's per-example loss is NaN, the oracle's 0.
/// A probability row summing to 0 normalises to 0/0; the contract does not say what such a row
/// gives, and the kernel and `kernel::reference` disagree. (`kernel.rs` in fuzz/checks/ skips
/// zero probability rows until this is settled.)
#[test]
#[ignore = "kernel and oracle disagree on a probability row of zeros"]
fn kernel_zero_probability_row() {
    run_one("kernel", "zero_probability_row", kernel::check_strict);
}

/// An `EvaluateRequest` whose `sample_weights` has no elements but dimensions whose product,
/// leaving out the zeros, overflows `isize`: it once passed validation and then panicked in
/// `ArrayViewD::from_shape`; the shape check refuses it now with INVALID_ARGUMENT.
#[test]
fn xent_v1_shape_overflow() {
    run_one("xent_v1", "shape_overflow", xent_v1::check);
}

/// bfloat16 logits `[2816, 3.38e38, -3.39e38, 4.625]`, class id 1, label smoothing 0.153,
/// sample weight 2.25, SUM_OVER_BATCH_SIZE: the oracle's loss is 1.16e38 (in bfloat16's range),
/// the kernel's +inf, because `x - m` for the smallest logit overflows the float32 it computes
/// in (semantics §1 promises no overflow for logits up to the dtype's max).
#[test]
#[ignore = "x - m overflows float32 when a row's logits span more than f32::MAX"]
fn kernel_float32_logit_span_overflow() {
    run_one(
        "kernel",
        "float32_logit_span_overflow",
        kernel::check_strict,
    );
}

/// bfloat16 logits with a maximum of 1.73e38, dense labels `[-3.47, 1, 1, 1, 0, 0, 0]`: the
/// oracle's loss is -1.27e38 (in range), the kernel's -inf, because the term
/// `-3.47 * log_softmax` overflows the float32 it computes in.
#[test]
#[ignore = "a label times x - m overflows float32 though the loss is in range"]
fn kernel_float32_loss_term_overflow() {
    run_one("kernel", "float32_loss_term_overflow", kernel::check_strict);
}

#[test]
fn xent_v1_inputs_pass() {
    run_all("xent_v1", xent_v1::check);
}

#[test]
fn oip_inputs_pass() {
    run_all("oip", oip::check);
}

#[test]
fn message_prefix_inputs_pass() {
    run_all("message_prefix", message_prefix::check);
}

#[test]
fn kernel_inputs_pass() {
    run_all("kernel", kernel::check);
}

// ---------------------------------------------------------------------------------------------
// Seeds

fn request(loss: LossKind, logits: proto::Tensor, labels: proto::Tensor) -> EvaluateRequest {
    EvaluateRequest {
        request_id: "seed".into(),
        loss: loss as i32,
        logits: Some(logits),
        labels: Some(labels),
        ..Default::default()
    }
}

/// A few real requests covering the dtypes, both loss kinds, both encodings and the options.
fn seed_requests() -> Vec<(&'static str, EvaluateRequest)> {
    let dense = LossKind::SoftmaxCrossEntropy;
    let sparse = LossKind::SparseSoftmaxCrossEntropy;
    // The contract's worked example (semantics §9).
    let x = vec![1.0f32, 2.0, 0.5, 0.2, 0.8, 1.5];
    let y = vec![0.0f32, 1.0, 0.0, 0.0, 0.0, 1.0];
    let worked = request(
        dense,
        encode(&[2, 3], x.clone(), true),
        encode(&[2, 3], y, true),
    );

    let mut ids = request(
        sparse,
        encode(&[2, 2, 3], (0..12).map(|k| k as f32 / 4.0).collect(), true),
        encode(&[2, 2], vec![0i64, 2, -100, 1], true),
    );
    ids.ignore_index = Some(-100);
    ids.label_smoothing = 0.1;
    ids.class_weights = Some(encode(&[3], vec![1.0f32, 2.0, 0.5], true));
    ids.reduction = proto::Reduction::Mean as i32;

    let half = |v: &[f32]| v.iter().map(|&a| f16::from_f32(a)).collect::<Vec<_>>();
    let mut typed = request(
        dense,
        encode(&[3, 2], half(&[0.5, -1.0, 3.0, 0.0, -2.0, 2.0]), false),
        encode(&[3, 2], half(&[0.25, 0.75, 1.0, 0.0, 0.5, 0.5]), false),
    );
    typed.axis = Some(0);
    typed.outputs = vec![Output::Loss as i32, Output::GradLabels as i32];
    typed.response_encoding = proto::Encoding::Typed as i32;

    let brain = |v: &[f32]| v.iter().map(|&a| bf16::from_f32(a)).collect::<Vec<_>>();
    let mut weighted = request(
        sparse,
        encode(
            &[4, 2],
            brain(&[1.0, -1.0, 0.0, 2.0, 3.0, 3.0, -4.0, 1.0]),
            true,
        ),
        encode(&[4], vec![1i32, 0, 1, 0], false),
    );
    weighted.sample_weights = Some(encode(&[4], vec![1.0f64, 0.0, 2.0, 0.5], true));
    weighted.z_loss = 1e-3;
    weighted.reduction = proto::Reduction::SumByNonzeroWeights as i32;
    weighted.upstream = Some(encode(&[], vec![0.5f64], true));

    let mut probabilities = request(
        dense,
        encode(&[1, 2, 2], vec![0.2f64, 0.9, 0.8, 0.1], false),
        encode(&[1, 2, 2], vec![0.0f64, 1.0, 1.0, 0.0], false),
    );
    probabilities.from_logits = Some(false);
    probabilities.axis = Some(-2);
    probabilities.reduction = proto::Reduction::None as i32;
    probabilities.upstream = Some(encode(&[1, 2], vec![1.0f64, -1.0], true));
    probabilities.outputs = vec![Output::GradLogits as i32];

    let empty = request(
        dense,
        encode(&[0, 4], Vec::<f32>::new(), true),
        encode(&[0, 4], Vec::<f32>::new(), true),
    );
    vec![
        ("worked_example", worked),
        ("class_ids_options", ids),
        ("float16_typed_axis0", typed),
        ("bfloat16_weighted", weighted),
        ("float64_probabilities", probabilities),
        ("empty_batch", empty),
    ]
}

/// A request body of `messages` framed as gRPC sends them, cut into frames of `cut` bytes,
/// in the message_prefix target's input format.
fn framed(limit: u16, path: u8, trailers: bool, messages: &[Vec<u8>], cut: usize) -> Vec<u8> {
    let mut wire = Vec::new();
    for m in messages {
        wire.push(0);
        wire.extend_from_slice(&(m.len() as u32).to_be_bytes());
        wire.extend_from_slice(m);
    }
    let mut out = limit.to_le_bytes().to_vec();
    out.push(path);
    out.push(u8::from(trailers));
    for frame in wire.chunks(cut.min(255)) {
        out.push(frame.len() as u8);
        out.extend_from_slice(frame);
    }
    out
}

/// Every seed file, `(target, name, bytes)`.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    let requests = seed_requests();
    for (name, req) in &requests {
        out.push(("xent_v1", format!("{name}.pb"), req.encode_to_vec()));
        for raw in [true, false] {
            // Only the requests whose tensors all have the one encoding translate.
            // Only the requests whose tensors all have the one encoding translate, and OIP
            // has no typed contents for the half types.
            let Ok(infer) = xent::api::oip::client::infer_request(req.clone(), raw) else {
                continue;
            };
            if xent::api::oip::decode::decode(infer.clone()).is_ok() {
                let kind = if raw { "raw" } else { "typed" };
                out.push(("oip", format!("{name}_{kind}.pb"), infer.encode_to_vec()));
            }
        }
    }
    let evaluate = xent::proto::METHODS
        .iter()
        .position(|m| m.0 == "/xent.v1.Xent/Evaluate")
        .unwrap() as u8;
    let stream = xent::proto::METHODS
        .iter()
        .position(|m| m.0 == "/xent.v1.Xent/EvaluateStream")
        .unwrap() as u8;
    let bodies: Vec<Vec<u8>> = requests.iter().map(|(_, r)| r.encode_to_vec()).collect();
    out.push((
        "message_prefix",
        "unary_under_limit".into(),
        framed(4096, evaluate, true, &bodies[..1], 255),
    ));
    out.push((
        "message_prefix",
        "stream_third_over_limit".into(),
        framed(60, stream, false, &bodies[1..4], 7),
    ));
    out.push((
        "message_prefix",
        "health_path_unlimited".into(),
        framed(0, 255, true, &bodies[..2], 33),
    ));
    // The kernel's input is a sequence of draws (fuzz/checks/kernel.rs): a few byte patterns.
    let patterns: [(&str, Vec<u8>); 3] = [
        ("zeros", vec![0; 64]),
        ("counting", (0..=255).collect()),
        (
            "mixed",
            (0u32..512)
                .map(|k| (k.wrapping_mul(2654435761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (name, bytes) in patterns {
        out.push(("kernel", name.into(), bytes));
    }
    out
}

#[test]
fn the_seed_corpus_is_what_this_file_writes() {
    let write = std::env::var_os("XENT_WRITE_FUZZ_SEEDS").is_some();
    for (target, name, bytes) in seeds() {
        let path = fuzz_dir().join("corpus").join(target).join(&name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        }
        let on_disk = std::fs::read(&path).unwrap_or_default();
        // The order of OIP's parameters (a protobuf map) is not fixed: the same request.
        let same = if target == "oip" {
            let decode = |b: &[u8]| proto::inference::ModelInferRequest::decode(b).ok();
            decode(&on_disk).is_some() && decode(&on_disk) == decode(&bytes)
        } else {
            on_disk == bytes
        };
        assert!(
            same,
            "{} is stale: XENT_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions",
            path.display()
        );
    }
}

#[test]
fn the_request_seeds_are_valid_requests() {
    for (name, req) in seed_requests() {
        let ev = xent::api::decode(req.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        xent::compute::evaluate(&ev).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    let mut oip = 0;
    for (target, name, bytes) in seeds() {
        if target == "oip" {
            let req = proto::inference::ModelInferRequest::decode(&bytes[..]).unwrap();
            xent::api::oip::decode::decode(req).unwrap_or_else(|e| panic!("{name}: {e}"));
            oip += 1;
        }
    }
    assert!(oip >= 4, "{oip} OIP seeds");
}

/// Found by the kernel target in CI: a row where the f64 reference's gradient is NaN and the
/// kernel's is 0 (element 20, example 5, class 0). Not yet analysed; it may be the oracle's
/// fault rather than the kernel's.
#[test]
#[ignore = "kernel gradient 0 where the f64 reference gives NaN; not yet analysed"]
fn kernel_found_by_ci_fuzzing() {
    run_one("kernel", "found_by_ci_fuzzing", kernel::check_strict);
}
