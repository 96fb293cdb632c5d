//! The `xent` command-line client and the `xent::client` library against a running server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use futures::StreamExt;
use half::bf16;
use ndarray::{Array2, ArrayD, array};
use ndarray_npy::{ReadableElement, WritableElement, read_npy, write_npy};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use xent::client::{Client, ClientError, EvalRequest};
use xent::eval::{Options, Reduction, Wanted};
use xent::proto;

use crate::common::TestServer;

/// Spec §9: per-example losses and their mean.
const LOSSES: [f64; 2] = [0.46436878, 0.57048061];
const MEAN: f64 = 0.51742470;

fn logits() -> Array2<f64> {
    array![[1.0, 2.0, 0.5], [0.2, 0.8, 1.5]]
}

fn onehot() -> Array2<f64> {
    array![[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
}

/// softmax(logits) - onehot, computed here in f64.
fn expected_grad() -> Array2<f64> {
    let x = logits();
    let mut g = x.clone();
    for (mut row, xr) in g.rows_mut().into_iter().zip(x.rows()) {
        let m = xr.fold(f64::NEG_INFINITY, |a, &b| a.max(b));
        let s: f64 = xr.iter().map(|v| (v - m).exp()).sum();
        row.iter_mut()
            .zip(xr)
            .for_each(|(o, v)| *o = (v - m).exp() / s);
    }
    g - onehot()
}

fn close(got: f64, want: f64, tol: f64) -> bool {
    (got - want).abs() <= tol
}

fn save<T: WritableElement, D: ndarray::Dimension>(
    dir: &Path,
    name: &str,
    a: &ndarray::Array<T, D>,
) -> String {
    let path = dir.join(name);
    write_npy(&path, a).expect("write npy");
    path.to_str().unwrap().to_string()
}

fn load<T: ReadableElement>(path: PathBuf) -> ArrayD<T> {
    read_npy(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Runs the real `xent` binary off the async runtime (the in-process server needs it).
async fn xent(args: Vec<String>, env: Option<(&'static str, String)>) -> Output {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xent"));
        cmd.args(&args).env_remove("XENT_ADDRESS");
        if let Some((k, v)) = env {
            cmd.env(k, v);
        }
        cmd.output().expect("run xent")
    })
    .await
    .expect("join")
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "xent failed ({:?})\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[tokio::test]
async fn cli_eval_dense_worked_example() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out/nested");
    let x = save(dir.path(), "x.npy", &logits());
    let y = save(dir.path(), "y.npy", &onehot());
    let out = xent(
        args(&[
            "eval",
            "--address",
            &server.endpoint(),
            "--logits",
            &x,
            "--labels",
            &y,
            "--timeout",
            "30",
            "--out",
            out_dir.to_str().unwrap(),
        ]),
        None,
    )
    .await;
    assert_ok(&out);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("softmax_cross_entropy float64"), "{stdout}");
    assert!(
        stdout.contains("loss") && stdout.contains("grad_logits"),
        "{stdout}"
    );
    assert!(stdout.contains("elapsed"), "{stdout}");

    let loss: ArrayD<f64> = load(out_dir.join("loss.npy"));
    assert_eq!(loss.shape(), &[2]);
    for (got, want) in loss.iter().zip(LOSSES) {
        assert!(close(*got, want, 1e-6), "loss {loss} vs {LOSSES:?}");
    }
    let grad: ArrayD<f64> = load(out_dir.join("grad_logits.npy"));
    assert_eq!(grad.shape(), &[2, 3]);
    for (got, want) in grad.iter().zip(expected_grad().iter()) {
        assert!(
            close(*got, *want, 1e-6),
            "grad_logits {grad} vs {}",
            expected_grad()
        );
    }
    assert!(!out_dir.join("grad_labels.npy").exists(), "not asked for");
}

#[tokio::test]
async fn cli_eval_sparse_int64_mean() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let x = save(dir.path(), "x.npy", &logits().mapv(|v| v as f32));
    let y = save(dir.path(), "y.npy", &array![1i64, 2]);
    let out_dir = dir.path().join("out");
    let out = xent(
        args(&[
            "eval",
            "--logits",
            &x,
            "--labels",
            &y,
            "--reduction",
            "mean",
            "--out",
            out_dir.to_str().unwrap(),
        ]),
        Some(("XENT_ADDRESS", server.addr.to_string())),
    )
    .await;
    assert_ok(&out);
    assert!(text(&out.stdout).contains("sparse_softmax_cross_entropy float32"));
    let loss: ArrayD<f32> = load(out_dir.join("loss.npy"));
    assert_eq!(loss.ndim(), 0, "a reduced loss is a scalar");
    let value = f64::from(loss.first().copied().unwrap());
    assert!(close(value, MEAN, 1e-6), "mean loss {value}");
    let grad: ArrayD<f32> = load(out_dir.join("grad_logits.npy"));
    for (got, want) in grad.iter().zip(expected_grad().iter()) {
        assert!(
            close(f64::from(*got), want / 2.0, 1e-6),
            "grad_logits {grad}"
        );
    }
}

#[tokio::test]
async fn cli_eval_bfloat16_on_the_wire() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let x = save(dir.path(), "x.npy", &logits().mapv(|v| v as f32));
    let y = save(dir.path(), "y.npy", &onehot().mapv(|v| v as f32));
    let out_dir = dir.path().join("out");
    let out = xent(
        args(&[
            "eval",
            "--address",
            &server.endpoint(),
            "--logits",
            &x,
            "--labels",
            &y,
            "--dtype",
            "bfloat16",
            "--outputs",
            "loss,grad_labels",
            "--out",
            out_dir.to_str().unwrap(),
        ]),
        None,
    )
    .await;
    assert_ok(&out);
    assert!(text(&out.stdout).contains("bfloat16"));
    // bfloat16 outputs are written as float32 files holding bfloat16 values.
    let loss: ArrayD<f32> = load(out_dir.join("loss.npy"));
    for (got, want) in loss.iter().zip(LOSSES) {
        assert_eq!(
            bf16::from_f32(*got).to_f32(),
            *got,
            "{got} is a bfloat16 value"
        );
        assert!(close(f64::from(*got), want, 2e-2 * want), "loss {loss}");
    }
    // d loss / d labels = -log_softmax.
    let grad_labels: ArrayD<f32> = load(out_dir.join("grad_labels.npy"));
    assert_eq!(grad_labels.shape(), &[2, 3]);
    let log_softmax = (expected_grad() + onehot()).mapv(f64::ln);
    for (got, want) in grad_labels.iter().zip(log_softmax.iter()) {
        assert!(
            close(f64::from(*got), -want, 2e-2 * want.abs()),
            "grad_labels {grad_labels}"
        );
    }
    assert!(!out_dir.join("grad_logits.npy").exists(), "not asked for");
}

#[tokio::test]
async fn cli_eval_shape_mismatch_is_invalid_argument() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let x = save(dir.path(), "x.npy", &logits());
    let y = save(dir.path(), "y.npy", &Array2::<f64>::zeros((2, 4)));
    let out = xent(
        args(&[
            "eval",
            "--address",
            &server.endpoint(),
            "--logits",
            &x,
            "--labels",
            &y,
        ]),
        None,
    )
    .await;
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
    assert!(stderr.contains("labels"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn cli_user_errors_are_one_line() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let x = save(dir.path(), "x.npy", &logits());
    let bad = dir.path().join("bad.npy");
    std::fs::write(&bad, b"not numpy").unwrap();
    let bad = bad.to_str().unwrap();
    let float_ids = save(dir.path(), "f.npy", &array![1.0f64, 2.0]);
    let cases: [(Vec<&str>, &str); 7] = [
        (
            vec!["--logits", "/nonexistent/x.npy", "--labels", &x],
            "/nonexistent/x.npy",
        ),
        (vec!["--logits", bad, "--labels", &x], "bad.npy"),
        (
            vec![
                "--logits",
                &x,
                "--labels",
                &float_ids,
                "--loss",
                "sparse_softmax_cross_entropy",
            ],
            "class ids",
        ),
        (
            vec!["--logits", &x, "--labels", &x, "--reduction", "avg"],
            "avg",
        ),
        (
            vec!["--logits", &x, "--labels", &x, "--label-smoothing", "2"],
            "INVALID_ARGUMENT",
        ),
        // The API's names only: no short names, no prefixes.
        (
            vec!["--logits", &x, "--labels", &x, "--loss", "dense"],
            "softmax_cross_entropy",
        ),
        (
            vec!["--logits", &x, "--labels", &x, "--outputs", "grad"],
            "grad_logits",
        ),
    ];
    for (extra, needle) in cases {
        let mut a = args(&["eval", "--address", &server.endpoint()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        let out = xent(a, None).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{extra:?} should fail");
        assert!(stderr.contains(needle), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
    }
    // `bench` takes the same names, and nothing else.
    for (flag, value, needle) in [
        ("--loss", "sparse", "sparse_softmax_cross_entropy"),
        ("--outputs", "loss,grad", "grad_labels"),
        ("--reduction", "avg", "sum_by_nonzero_weights"),
    ] {
        let a = args(&["bench", "--address", &server.endpoint(), flag, value]);
        let out = xent(a, None).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "bench {flag} {value} should fail");
        assert!(stderr.contains(needle), "bench {flag} {value}: {stderr}");
    }
    // Nothing listens on port 1.
    let out = xent(
        args(&[
            "eval",
            "--address",
            "127.0.0.1:1",
            "--logits",
            &x,
            "--labels",
            &x,
        ]),
        None,
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).starts_with("error: cannot connect"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn cli_health_reports_serving() {
    let server = TestServer::start().await;
    let out = xent(args(&["health", "--address", &server.endpoint()]), None).await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout).trim(), "SERVING");
    let out = xent(
        args(&["health"]),
        Some(("XENT_ADDRESS", server.addr.to_string())),
    )
    .await;
    assert_ok(&out);
    assert_eq!(text(&out.stdout).trim(), "SERVING");
    let out = xent(args(&["health", "--address", "127.0.0.1:1"]), None).await;
    assert!(!out.status.success());
}

#[tokio::test]
async fn library_client_f64_dense() {
    let server = TestServer::start().await;
    let mut client = Client::connect(server.endpoint()).await.expect("connect");
    assert_eq!(client.health("").await.unwrap(), ServingStatus::Serving);

    let (x, y) = (logits().into_dyn(), onehot().into_dyn());
    let request = EvalRequest::dense(x.view(), y.view())
        .wanted(Wanted {
            loss: true,
            grad_logits: true,
            grad_labels: true,
        })
        .request_id("f64");
    let out = client.evaluate(request).await.expect("evaluate");
    assert_eq!(out.request_id, "f64");
    let loss = out.loss.unwrap();
    assert_eq!(loss.shape(), &[2]);
    for (got, want) in loss.iter().zip(LOSSES) {
        assert!(close(*got, want, 1e-6), "{loss}");
    }
    let grad = out.grad_logits.unwrap();
    for (got, want) in grad.iter().zip(expected_grad().iter()) {
        assert!(close(*got, *want, 1e-12), "{grad}");
    }
    assert_eq!(out.grad_labels.unwrap().shape(), &[2, 3]);

    // Options reach the server: mean reduction with an upstream gradient of 2.
    let request = EvalRequest::dense(x.view(), y.view())
        .options(Options {
            reduction: Reduction::Mean,
            ..Options::default()
        })
        .upstream(ndarray::arr0(2.0f64).view());
    let out = client.evaluate(request).await.unwrap();
    assert!(close(out.loss.unwrap().sum(), MEAN, 1e-6));
    for (got, want) in out.grad_logits.unwrap().iter().zip(expected_grad().iter()) {
        assert!(close(*got, *want, 1e-12), "upstream 2 times the mean's 1/2");
    }

    // A server-side refusal is a Status error naming the field.
    let bad = Array2::<f64>::zeros((2, 4)).into_dyn();
    let err = client
        .evaluate(EvalRequest::dense(x.view(), bad.view()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Status(_)), "{err}");
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(err.to_string().starts_with("INVALID_ARGUMENT: "), "{err}");
    assert!(err.to_string().contains("labels"), "{err}");
}

#[tokio::test]
async fn library_client_f32_sparse_and_stream() {
    let server = TestServer::start().await;
    let mut client = Client::connect(server.addr.to_string())
        .await
        .expect("connect");
    let x = logits().mapv(|v| v as f32);
    let ids = array![1i32, 2];
    let out = client
        .evaluate(EvalRequest::sparse(x.view(), ids.view()).reduction(Reduction::Mean))
        .await
        .expect("evaluate");
    let loss = out.loss.unwrap();
    assert_eq!(loss.ndim(), 0);
    assert!(close(f64::from(loss.sum()), MEAN, 1e-6), "{loss}");
    let grad = out.grad_logits.unwrap();
    assert_eq!(grad.shape(), &[2, 3]);
    for (got, want) in grad.iter().zip(expected_grad().iter()) {
        assert!(close(f64::from(*got), want / 2.0, 1e-6), "{grad}");
    }

    // The same requests pipelined over one stream, decoded with the builder that made them.
    let requests: Vec<EvalRequest<f32>> = (0..4)
        .map(|i| EvalRequest::sparse(x.view(), ids.view()).request_id(format!("r{i}")))
        .collect();
    let protos: Vec<proto::EvaluateRequest> = requests.iter().map(EvalRequest::to_proto).collect();
    let mut stream = client
        .evaluate_stream(futures::stream::iter(protos))
        .await
        .unwrap();
    for request in &requests {
        let answer = stream
            .next()
            .await
            .expect("an answer")
            .expect("no stream error");
        let Some(proto::evaluate_stream_response::Result::Response(response)) = answer.result
        else {
            panic!("error in stream: {answer:?}");
        };
        let out = request.decode_response(response).unwrap();
        assert_eq!(out.request_id, answer.request_id);
        assert_eq!(
            out.request_id,
            request.to_proto().request_id,
            "answered in order"
        );
        let loss = out.loss.unwrap();
        for (got, want) in loss.iter().zip(LOSSES) {
            assert!(close(f64::from(*got), want, 1e-6), "{loss}");
        }
    }
    assert!(stream.next().await.is_none(), "one answer per request");
}

/// Two servers whose batchers count what they computed.
async fn counted_server() -> (
    std::net::SocketAddr,
    xent::batcher::Batcher,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<xent::server::DrainReport, xent::error::Error>>,
) {
    let server = xent::server::Server::new(xent::config::Settings::default())
        .await
        .expect("server");
    let batcher = server.batcher().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.serve(listener, async move {
        let _ = rx.await;
    }));
    let mut c = Client::connect(addr.to_string()).await.expect("connect");
    for _ in 0..500 {
        if c.health("").await.ok() == Some(ServingStatus::Serving) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    (addr, batcher, tx, task)
}

fn computed(b: &xent::batcher::Batcher) -> u64 {
    b.stats()
        .computed_requests
        .load(std::sync::atomic::Ordering::SeqCst)
}

#[tokio::test]
async fn balanced_client_spreads_calls_and_survives_a_server_stopping() {
    let (a, batcher_a, stop_a, task_a) = counted_server().await;
    let (b, batcher_b, _stop_b, _task_b) = counted_server().await;
    let config = xent::client::ClientConfig {
        timeout: Some(std::time::Duration::from_secs(20)),
        ..Default::default()
    };
    // One address as an IP literal, the other as a name that resolves to it.
    let endpoints = [a.to_string(), format!("localhost:{}", b.port())];
    let client = Client::connect_many(&endpoints, config)
        .await
        .expect("connect_many");
    let (x, y) = (logits().into_dyn(), onehot().into_dyn());
    let request = EvalRequest::dense(x.view(), y.view());
    let calls = |n: usize| {
        let (client, request) = (client.clone(), request.clone());
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let (mut c, r) = (client.clone(), request.clone());
                    tokio::spawn(async move { c.evaluate(r).await })
                })
                .collect();
            for t in tasks {
                let out = t.await.unwrap().expect("every call succeeds");
                assert_eq!(out.loss.unwrap().shape(), &[2]);
            }
        }
    };
    calls(64).await;
    let (na, nb) = (computed(&batcher_a), computed(&batcher_b));
    assert_eq!(na + nb, 64, "every call computed once: {na} + {nb}");
    assert!(na > 0 && nb > 0, "both servers get traffic: {na} and {nb}");

    let _ = stop_a.send(());
    task_a.await.unwrap().unwrap();
    calls(32).await;
    assert_eq!(
        computed(&batcher_b),
        nb + 32,
        "the survivor answers everything after the stop"
    );

    let e = Client::connect_many(&["no-such-host.invalid:1"], Default::default())
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Resolve(_)), "{e}");
}
