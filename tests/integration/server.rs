//! A running xentd: options and dtypes through both encodings, both RPCs, every refusal with
//! its field, health, reflection, large messages, hostile input, and shutdown by signal.

use std::process::{Command, Stdio};
use std::time::Duration;

use half::{bf16, f16};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use xent::api::tensor::{decode, encode};
use xent::proto::{self, EvaluateRequest, LossKind, Output, Reduction};

use crate::common::TestServer;

const X: [f32; 6] = [1.0, 2.0, 0.5, 0.2, 0.8, 1.5];
const Y: [f32; 6] = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
/// Spec §9.
const LOSS: [f64; 2] = [0.464_368_78, 0.570_480_61];

fn dense(x: proto::Tensor, y: proto::Tensor) -> EvaluateRequest {
    EvaluateRequest {
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(x),
        labels: Some(y),
        ..Default::default()
    }
}

fn example() -> EvaluateRequest {
    dense(
        encode(&[2, 3], X.to_vec(), true),
        encode(&[2, 3], Y.to_vec(), true),
    )
}

fn floats(t: Option<proto::Tensor>) -> (Vec<usize>, Vec<f64>) {
    let t = decode(t).expect("output tensor");
    (t.shape().to_vec(), t.floats_to_f64().expect("float output"))
}

fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
}

/// softmax - onehot for the spec example, in f64.
fn example_grad() -> Vec<f64> {
    let mut g = Vec::new();
    for r in 0..2 {
        let row: Vec<f64> = X[r * 3..r * 3 + 3].iter().map(|&v| f64::from(v)).collect();
        let s: f64 = row.iter().map(|v| v.exp()).sum();
        g.extend(
            row.iter()
                .enumerate()
                .map(|(j, v)| v.exp() / s - f64::from(Y[r * 3 + j])),
        );
    }
    g
}

#[tokio::test]
async fn health_and_reflection_report_the_services() {
    let server = TestServer::start().await;
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert_eq!(server.health("xent.v1.Xent").await, ServingStatus::Serving);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut r = ServerReflectionClient::new(server.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = r
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "xent.v1.Xent",
        "grpc.health.v1.Health",
        "inference.GRPCInferenceService",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    server
        .stop()
        .await
        .expect("serve returns cleanly after shutdown");
}

#[tokio::test]
async fn every_dtype_both_encodings_and_output_selection() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let grad = example_grad();
    for raw in [true, false] {
        let cases: Vec<(EvaluateRequest, f64)> = vec![
            (
                dense(
                    encode(&[2, 3], X.map(f16::from_f32).to_vec(), raw),
                    encode(&[2, 3], Y.map(f16::from_f32).to_vec(), raw),
                ),
                4e-3,
            ),
            (
                dense(
                    encode(&[2, 3], X.map(bf16::from_f32).to_vec(), raw),
                    encode(&[2, 3], Y.map(bf16::from_f32).to_vec(), raw),
                ),
                2e-2,
            ),
            (
                dense(
                    encode(&[2, 3], X.to_vec(), raw),
                    encode(&[2, 3], Y.to_vec(), raw),
                ),
                3e-5,
            ),
            (
                dense(
                    encode(&[2, 3], X.map(f64::from).to_vec(), raw),
                    encode(&[2, 3], Y.map(f64::from).to_vec(), raw),
                ),
                1e-8,
            ),
        ];
        for (mut req, tol) in cases {
            let dtype = req.logits.as_ref().unwrap().dtype;
            req.response_encoding = if raw {
                proto::Encoding::Raw
            } else {
                proto::Encoding::Typed
            } as i32;
            let resp = c.evaluate(req).await.unwrap().into_inner();
            let loss = resp.loss.clone().unwrap();
            assert_eq!(loss.dtype, dtype, "outputs keep the logits' dtype");
            assert_eq!(loss.raw_data.is_empty(), !raw, "response encoding honoured");
            let (shape, l) = floats(resp.loss);
            assert_eq!(shape, vec![2]);
            assert!(close(&l, &LOSS, tol), "{l:?}");
            let (shape, g) = floats(resp.grad_logits);
            assert_eq!(shape, vec![2, 3]);
            assert!(close(&g, &grad, tol), "{g:?}");
            assert!(resp.grad_labels.is_none(), "not asked for");
        }
    }
    let mut req = example();
    req.outputs = vec![Output::GradLabels as i32];
    let resp = c.evaluate(req).await.unwrap().into_inner();
    assert!(resp.loss.is_none() && resp.grad_logits.is_none());
    let (_, gy) = floats(resp.grad_labels);
    // d loss / d y_j = -log_softmax_j
    let expected: Vec<f64> = grad
        .iter()
        .zip(Y)
        .map(|(g, y)| -(g + f64::from(y)).ln())
        .collect();
    assert!(close(&gy, &expected, 1e-5), "{gy:?}");
}

#[tokio::test]
async fn sparse_ids_of_both_widths_with_options() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for ids in [
        encode(&[2], vec![1i32, 2], true),
        encode(&[2], vec![1i64, 2], false),
    ] {
        let req = EvaluateRequest {
            loss: LossKind::SparseSoftmaxCrossEntropy as i32,
            logits: Some(encode(&[2, 3], X.to_vec(), true)),
            labels: Some(ids),
            reduction: Reduction::Mean as i32,
            upstream: Some(encode(&[], vec![2.0f64], true)),
            ..Default::default()
        };
        let resp = c.evaluate(req).await.unwrap().into_inner();
        let (shape, l) = floats(resp.loss);
        assert_eq!(shape, Vec::<usize>::new(), "a reduced loss is a scalar");
        assert!(close(&l, &[0.517_424_70], 1e-6));
        let (_, g) = floats(resp.grad_logits);
        let expected: Vec<f64> = example_grad().iter().map(|v| v * 2.0 / 2.0).collect();
        assert!(close(&g, &expected, 1e-5), "upstream 2 times d mean: {g:?}");
    }
    // ignore_index and class weights with the weighted mean.
    let req = EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], X.to_vec(), true)),
        labels: Some(encode(&[2], vec![1i64, -100], true)),
        ignore_index: Some(-100),
        class_weights: Some(encode(&[3], vec![1.0f32, 3.0, 1.0], true)),
        reduction: Reduction::Mean as i32,
        ..Default::default()
    };
    let resp = c.evaluate(req).await.unwrap().into_inner();
    let (_, l) = floats(resp.loss);
    assert!(close(&l, &[LOSS[0]], 1e-6), "3 * l0 / 3: {l:?}");
    let (_, g) = floats(resp.grad_logits);
    assert_eq!(&g[3..], &[0.0, 0.0, 0.0], "an ignored row has gradient 0");
}

/// The status of a call that must fail, with its BadRequest field.
async fn refusal(
    c: &mut crate::common::Client,
    req: EvaluateRequest,
) -> (Code, String, Option<String>) {
    let status = c.evaluate(req).await.expect_err("must be refused");
    let field = status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()));
    (status.code(), status.message().to_string(), field)
}

#[tokio::test]
async fn every_refusal_names_its_field() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let t = |shape: &[usize], n: usize| encode(shape, vec![0.5f32; n], true);
    let mut cases: Vec<(&str, EvaluateRequest, &str)> = Vec::new();
    let mut r = example();
    r.labels = Some(t(&[2, 4], 8));
    cases.push(("labels", r, "shape"));
    let mut r = example();
    r.logits.as_mut().unwrap().raw_data = bytes::Bytes::from(vec![0u8; 23]);
    cases.push(("logits", r, "23 bytes"));
    let mut r = example();
    r.logits.as_mut().unwrap().dtype = 42;
    cases.push(("logits", r, "dtype"));
    let mut r = example();
    r.logits = None;
    cases.push(("logits", r, "required"));
    let mut r = example();
    r.axis = Some(-3);
    cases.push(("axis", r, "out of range"));
    let mut r = example();
    r.logits.as_mut().unwrap().shape = vec![1 << 62, 1 << 62];
    cases.push(("logits", r, "overflow"));
    let mut r = example();
    r.logits.as_mut().unwrap().shape = vec![-2, -3];
    cases.push(("logits", r, "negative"));
    let mut r = example();
    r.labels = Some(encode(&[2, 3], Y.map(f64::from).to_vec(), true));
    cases.push(("labels", r, "dtype"));
    let mut r = example();
    r.sample_weights = Some(t(&[3], 3));
    cases.push(("sample_weights", r, "broadcast"));
    let mut r = example();
    r.class_weights = Some(t(&[2], 2));
    cases.push(("class_weights", r, "[3]"));
    let mut r = example();
    r.upstream = Some(t(&[], 1));
    cases.push(("upstream", r, "shape"));
    let mut r = example();
    r.label_smoothing = f64::NAN;
    cases.push(("label_smoothing", r, "[0, 1]"));
    let mut r = example();
    r.z_loss = -0.5;
    cases.push(("z_loss", r, ">= 0"));
    let mut r = example();
    r.ignore_index = Some(0);
    cases.push(("ignore_index", r, "class ids"));
    let mut r = example();
    r.loss = 0;
    cases.push(("loss", r, "required"));
    let mut r = example();
    r.reduction = 77;
    cases.push(("reduction", r, "unknown"));
    let mut r = example();
    r.outputs = vec![9];
    cases.push(("outputs", r, "unknown"));
    let mut r = example();
    r.request_id = "x".repeat(129);
    cases.push(("request_id", r, "128"));
    let mut r = example();
    r.logits.as_mut().unwrap().float_data = vec![1.0; 6];
    cases.push(("logits", r, "more than one"));
    let sparse = |ids: proto::Tensor| EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], X.to_vec(), true)),
        labels: Some(ids),
        ..Default::default()
    };
    cases.push((
        "labels",
        sparse(encode(&[2], vec![0i64, 3], true)),
        "class id 3 at index [1]",
    ));
    cases.push((
        "labels",
        sparse(encode(&[2], vec![-1i32, 0], true)),
        "out of range",
    ));
    cases.push((
        "labels",
        sparse(encode(&[2, 1], vec![0i64, 1], true)),
        "shape",
    ));
    cases.push((
        "labels",
        sparse(encode(&[2], vec![0.0f32, 1.0], true)),
        "int32 or int64",
    ));
    let mut r = sparse(encode(&[2], vec![0i64, 1], true));
    r.outputs = vec![Output::GradLabels as i32];
    cases.push(("outputs", r, "no gradient"));
    let mut r = example();
    r.logits = Some(t(&[], 1));
    r.labels = Some(t(&[], 1));
    cases.push(("logits", r, "rank"));
    let mut r = example();
    r.logits = Some(t(&[2, 0], 0));
    r.labels = Some(t(&[2, 0], 0));
    cases.push(("logits", r, "length 0"));

    for (field, req, contains) in cases {
        let (code, message, detail) = refusal(&mut c, req).await;
        assert_eq!(code, Code::InvalidArgument, "{field}: {message}");
        assert!(
            message.starts_with(field) && message.contains(contains),
            "{field}/{contains}: {message}"
        );
        assert_eq!(
            detail.as_deref(),
            Some(field),
            "BadRequest names the field: {message}"
        );
    }
    assert_eq!(server.health("").await, ServingStatus::Serving);
}

#[tokio::test]
async fn empty_batches_are_valid() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for reduction in [
        Reduction::None,
        Reduction::Mean,
        Reduction::SumByNonzeroWeights,
    ] {
        let mut req = dense(
            encode(&[0, 5], Vec::<f32>::new(), true),
            encode(&[0, 5], Vec::<f32>::new(), true),
        );
        req.reduction = reduction as i32;
        let resp = c.evaluate(req).await.unwrap().into_inner();
        let (shape, l) = floats(resp.loss);
        if reduction == Reduction::None {
            assert_eq!((shape, l), (vec![0], vec![]));
        } else {
            assert_eq!((shape, l), (vec![], vec![0.0]));
        }
    }
}

#[tokio::test]
async fn a_stream_answers_in_order_and_survives_a_bad_request() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut reqs = Vec::new();
    for k in 0..6 {
        let mut r = example();
        r.request_id = format!("batch-{k}");
        if k == 3 {
            r.axis = Some(5);
        }
        reqs.push(r);
    }
    let mut answers = c
        .evaluate_stream(futures::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    for k in 0..6 {
        let a = answers.message().await.unwrap().expect("answer");
        assert_eq!(a.request_id, format!("batch-{k}"));
        match a.result.unwrap() {
            proto::evaluate_stream_response::Result::Error(e) => {
                assert_eq!(k, 3);
                assert_eq!(
                    (e.code, e.field.as_str()),
                    (Code::InvalidArgument as i32, "axis")
                );
            }
            proto::evaluate_stream_response::Result::Response(r) => {
                assert_ne!(k, 3);
                assert!(close(&floats(r.loss).1, &LOSS, 1e-6));
            }
        }
    }
    assert!(answers.message().await.unwrap().is_none());
}

#[tokio::test]
async fn a_128k_vocabulary_batch_fits_the_default_message_limits() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let (rows, classes) = (16, 128_256);
    let x: Vec<f32> = (0..rows * classes)
        .map(|k| ((k * 2_654_435_761usize) % 1000) as f32 / 100.0)
        .collect();
    let mut y = vec![0.0f32; rows * classes];
    for r in 0..rows {
        y[r * classes + (r * 7919) % classes] = 1.0;
    }
    let mut req = dense(
        encode(&[rows, classes], x, true),
        encode(&[rows, classes], y, true),
    );
    req.outputs = vec![
        Output::Loss as i32,
        Output::GradLogits as i32,
        Output::GradLabels as i32,
    ];
    let resp = c
        .evaluate(req)
        .await
        .expect("a 16 MiB request and a 16 MiB answer pass")
        .into_inner();
    let (shape, g) = floats(resp.grad_logits);
    assert_eq!(shape, vec![rows, classes]);
    // Each row of softmax - onehot sums to zero.
    for r in 0..rows {
        let s: f64 = g[r * classes..(r + 1) * classes].iter().sum();
        assert!(s.abs() < 1e-4, "row {r} sums to {s}");
    }
    assert_eq!(floats(resp.loss).1.len(), rows);
}

#[tokio::test]
async fn hostile_requests_never_panic_or_stop_the_server() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // A deterministic spread of malformed and odd requests.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..300 {
        let rank = (next() % 4) as usize;
        let shape: Vec<i64> = (0..rank)
            .map(|_| (next() % 5) as i64 - (next() % 8 == 0) as i64)
            .collect();
        let count: usize = shape.iter().map(|&d| d.max(0) as usize).product();
        let bytes = (count * 4)
            .saturating_add((next() % 3) as usize)
            .saturating_sub(1);
        let tensor = |dtype: i32, n: usize| proto::Tensor {
            dtype,
            shape: shape.clone(),
            raw_data: bytes::Bytes::from(vec![0x7fu8; n]),
            ..Default::default()
        };
        let req = EvaluateRequest {
            loss: (next() % 4) as i32,
            logits: Some(tensor((next() % 8) as i32, bytes)),
            labels: Some(tensor((next() % 8) as i32, bytes)),
            axis: (next() % 2 == 0).then(|| (next() % 9) as i64 - 4),
            label_smoothing: [0.0, 0.5, -1.0, f64::INFINITY][(next() % 4) as usize],
            ignore_index: (next() % 3 == 0).then_some(i64::MIN),
            reduction: (next() % 7) as i32,
            outputs: vec![(next() % 5) as i32],
            ..Default::default()
        };
        match c.evaluate(req).await {
            Ok(_) => {}
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message()),
        }
    }
    assert_eq!(server.health("").await, ServingStatus::Serving);
    assert!(c.evaluate(example()).await.is_ok());
}

#[tokio::test]
async fn the_binary_serves_then_drains_and_exits_zero_on_sigterm() {
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", crate::common::free_port())
        .parse()
        .unwrap();
    // A grace period long enough for the call on a loaded machine: the test is that the call
    // is finished, not how fast.
    let (mut child, endpoint) = crate::common::spawn_xentd(
        &[
            "--shutdown-grace-secs",
            "300",
            "--metrics-listen",
            &metrics.to_string(),
        ],
        Stdio::piped(),
    );
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = xent::proto::xent_client::XentClient::new(channel.clone())
        .max_decoding_message_size(1 << 30)
        .max_encoding_message_size(1 << 30);
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for _ in 0..500 {
        let s = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        if s.into_inner().status() == ServingStatus::Serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A call in flight when SIGTERM arrives still gets its answer. In flight means the
    // server is handling it, as its metrics say.
    let (rows, classes) = (64, 128_256);
    let big = dense(
        encode(&[rows, classes], vec![0.25f64; rows * classes], true),
        encode(
            &[rows, classes],
            vec![1.0 / classes as f64; rows * classes],
            true,
        ),
    );
    let in_flight = tokio::spawn(async move { c.evaluate(big).await });
    let started = std::time::Instant::now();
    loop {
        let (_, body) =
            tokio::task::spawn_blocking(move || crate::common::http_get(metrics, "/metrics"))
                .await
                .unwrap()
                .expect("metrics");
        if body.lines().any(|l| l == "xent_calls_in_flight 1") {
            break;
        }
        assert!(!in_flight.is_finished(), "the call ended before the signal");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the call never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let answer = in_flight.await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    let log = log.join().unwrap();
    let answer = answer.unwrap_or_else(|e| panic!("the call in flight completes: {e:?}; {log:#?}"));
    let (_, l) = floats(answer.into_inner().loss);
    assert!(close(&l[..1], &[(classes as f64).ln()], 1e-9));
    assert!(
        status.success(),
        "xentd exits 0 after draining: {status:?}; {log:#?}"
    );
}

#[test]
fn every_flag_is_documented_in_the_readme() {
    let help = Command::new(crate::common::xentd_bin())
        .arg("--help")
        .output()
        .expect("xentd --help");
    let help = String::from_utf8(help.stdout).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '<']).next().unwrap())
        .filter(|f| !matches!(*f, "help" | "version"))
        .collect();
    assert!(flags.len() > 20, "{flags:?}");
    for flag in flags {
        assert!(
            readme.contains(&format!("`--{flag}`")),
            "README's configuration table lacks --{flag}"
        );
    }
}
