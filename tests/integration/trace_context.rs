//! Traces as a tracing back end sees them: the real xentd binary exports over OTLP/gRPC to a
//! collector run here (opentelemetry-proto's `TraceService` on a tonic server, on a real
//! socket). Each call is a SERVER span named after its method's path, with the RPC semantic
//! conventions and xent's own fields; a `traceparent` sent by the caller is its parent; the
//! stages are its children; the standard `OTEL_*` variables are honoured.

use std::collections::HashMap;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt as _;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use tokio::sync::mpsc;
use tonic::Code;
use xent::api::tensor::encode;
use xent::proto::inference::ModelInferRequest;
use xent::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use xent::proto::{EvaluateRequest, LossKind, evaluate_stream_response};

use crate::common::{Client, xentd_bin};

/// How long spans get to arrive.
const PATIENCE: Duration = Duration::from_secs(30);

/// A span as exported, with the `service.name` of the resource it came with.
struct Exported {
    span: Span,
    service: String,
    resource: HashMap<String, Value>,
}

/// The collector: every span of every export request, sent on.
struct Collector(mpsc::UnboundedSender<Exported>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let resource = attributes(&rs.resource.map(|r| r.attributes).unwrap_or_default());
            let service = match resource.get("service.name") {
                Some(Value::StringValue(s)) => s.clone(),
                other => panic!("service.name is a string: {other:?}"),
            };
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let _ = self.0.send(Exported {
                    span,
                    service: service.clone(),
                    resource: resource.clone(),
                });
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A collector on an ephemeral loopback port: its endpoint and what it receives.
async fn collector() -> (String, mpsc::UnboundedReceiver<Exported>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (format!("http://{addr}"), rx)
}

fn attributes(kvs: &[KeyValue]) -> HashMap<String, Value> {
    kvs.iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
        .collect()
}

fn string(v: &str) -> Value {
    Value::StringValue(v.into())
}

/// xentd, started with `args` and `env` (and no `OTEL_*` variable of the test's own), and its
/// endpoint.
fn xentd(args: &[&str], env: &[(&str, &str)], log: &std::path::Path) -> (Child, String) {
    use std::io::BufRead as _;
    let mut cmd = Command::new(xentd_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(File::create(log).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") || k.starts_with("XENT_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let mut child = cmd.spawn().expect("xentd starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        let _ = child.kill();
        panic!(
            "xentd printed {line:?}; its log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    };
    (child, format!("http://{addr}"))
}

fn request(id: &str, labels: [i64; 2]) -> EvaluateRequest {
    EvaluateRequest {
        request_id: id.into(),
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], vec![1.0f32, 2.0, 0.5, 0.2, 0.8, 1.5], true)),
        labels: Some(encode(&[2], labels.to_vec(), true)),
        ..Default::default()
    }
}

/// Receives spans until `done` says the ones wanted are in.
async fn receive(
    rx: &mut mpsc::UnboundedReceiver<Exported>,
    mut done: impl FnMut(&[Exported]) -> bool,
) -> Vec<Exported> {
    let deadline = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some(s)) => got.push(s),
            _ => {
                let names: Vec<&str> = got.iter().map(|e| e.span.name.as_str()).collect();
                panic!("the spans wanted never arrived; got {names:?}");
            }
        }
    }
    got
}

/// The call span whose `request_id` is `id`.
fn call<'a>(spans: &'a [Exported], id: &str) -> Option<&'a Exported> {
    spans.iter().find(|e| {
        attributes(&e.span.attributes).get("request_id") == Some(&string(id))
            && e.span.kind == SpanKind::Server as i32
    })
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    child.wait().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_a_server_span_that_continues_the_callers_trace() {
    let (endpoint, mut rx) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("xentd.log");
    // The default batch delay (5 s): the spans come when xentd exits, which must flush them.
    let (mut child, addr) = xentd(&["--otlp-endpoint", &endpoint], &[], &log);
    let channel = tonic::transport::Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .expect("connect");
    let mut client: Client = xent::proto::xent_client::XentClient::new(channel.clone());

    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut traced = tonic::Request::new(request("traced", [1, 2]));
    traced.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    client.evaluate(traced).await.expect("evaluated");
    let err = client
        .evaluate(request("refused", [1, 7]))
        .await
        .expect_err("a class id out of range is refused");
    assert_eq!(err.code(), Code::InvalidArgument);
    let answers: Vec<_> = client
        .evaluate_stream(futures::stream::iter([request("streamed", [0, 1])]))
        .await
        .expect("stream opens")
        .into_inner()
        .map_ok(|a| a.result)
        .try_collect()
        .await
        .expect("stream answers");
    assert!(matches!(
        answers[..],
        [Some(evaluate_stream_response::Result::Response(_))]
    ));
    let err = GrpcInferenceServiceClient::new(channel)
        .model_infer(ModelInferRequest {
            model_name: "no_such_model".into(),
            id: "inferred".into(),
            ..Default::default()
        })
        .await
        .expect_err("an unknown model is refused");
    let infer_code = err.code();
    assert_ne!(infer_code, Code::Ok);

    let status = tokio::task::spawn_blocking(move || sigterm(&mut child))
        .await
        .unwrap();
    assert!(
        status.success(),
        "xentd exits 0: {status:?}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let spans = receive(&mut rx, |got| {
        ["traced", "refused", "streamed", "inferred"]
            .iter()
            .all(|id| call(got, id).is_some())
            && ["decode", "queue", "kernel", "encode"].iter().all(|stage| {
                got.iter()
                    .any(|e| e.span.name == *stage && hex(&e.span.trace_id) == trace)
            })
    })
    .await;

    let rpc = call(&spans, "traced").unwrap();
    assert_eq!(rpc.service, "xentd", "the default service.name");
    assert_eq!(
        rpc.resource.get("telemetry.sdk.language"),
        Some(&string("rust")),
        "the SDK's resource attributes are kept"
    );
    let span = &rpc.span;
    assert_eq!(span.name, "xent.v1.Xent/Evaluate");
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&span.trace_id), trace, "the caller's trace continues");
    assert_eq!(
        hex(&span.parent_span_id),
        parent,
        "the caller's span is the parent"
    );
    let attrs = attributes(&span.attributes);
    for (k, v) in [
        ("rpc.system", string("grpc")),
        ("rpc.service", string("xent.v1.Xent")),
        ("rpc.method", string("Evaluate")),
        ("rpc.grpc.status_code", Value::IntValue(0)),
        ("method", string("Evaluate")),
        ("request_id", string("traced")),
        ("loss", string("sparse_softmax_cross_entropy")),
        ("dtype", string("float32")),
        ("code", string("OK")),
        ("rows", Value::IntValue(2)),
    ] {
        assert_eq!(attrs.get(k), Some(&v), "{k} on the span: {attrs:?}");
    }
    for k in ["shape", "queue_wait_ms", "compute_ms"] {
        assert!(attrs.contains_key(k), "{k} on the span: {attrs:?}");
    }
    assert!(
        !attrs.keys().any(|k| k.starts_with("otel.")),
        "otel.* fields steer the export and are no attributes: {attrs:?}"
    );
    let status = span.status.clone().unwrap_or_default();
    assert_eq!(status.code, StatusCode::Unset as i32, "an OK call");
    for stage in ["decode", "queue", "kernel", "encode"] {
        let child = spans
            .iter()
            .find(|e| e.span.name == stage && e.span.trace_id == span.trace_id)
            .unwrap_or_else(|| panic!("a {stage} span in the call's trace"));
        assert_eq!(
            child.span.parent_span_id, span.span_id,
            "{stage} is a child of the call"
        );
        assert_eq!(child.span.kind, SpanKind::Internal as i32, "{stage}");
    }

    // A refused call: the caller's fault, so its span status stays unset (the RPC
    // conventions mark only server failures as errors); no traceparent, a trace of its own.
    let refused = &call(&spans, "refused").unwrap().span;
    let attrs = attributes(&refused.attributes);
    assert_eq!(refused.name, "xent.v1.Xent/Evaluate");
    assert_eq!(
        attrs.get("rpc.grpc.status_code"),
        Some(&Value::IntValue(Code::InvalidArgument as i64))
    );
    assert_eq!(attrs.get("code"), Some(&string("INVALID_ARGUMENT")));
    assert_eq!(
        refused.status.clone().unwrap_or_default().code,
        StatusCode::Unset as i32
    );
    assert!(refused.parent_span_id.is_empty(), "a root span");
    assert_ne!(refused.trace_id, span.trace_id);

    let streamed = &call(&spans, "streamed").unwrap().span;
    assert_eq!(streamed.name, "xent.v1.Xent/EvaluateStream");
    assert_eq!(
        attributes(&streamed.attributes).get("rpc.method"),
        Some(&string("EvaluateStream"))
    );
    let inferred = &call(&spans, "inferred").unwrap().span;
    let attrs = attributes(&inferred.attributes);
    assert_eq!(inferred.name, "inference.GRPCInferenceService/ModelInfer");
    assert_eq!(
        attrs.get("rpc.service"),
        Some(&string("inference.GRPCInferenceService"))
    );
    assert_eq!(
        attrs.get("rpc.grpc.status_code"),
        Some(&Value::IntValue(infer_code as i64))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standard_otel_variables_alone_configure_export() {
    let (endpoint, mut rx) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("xentd.log");
    let (mut child, addr) = xentd(
        &[],
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "loss-service"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test,team=ml",
            ),
            // Spans leave within 50 ms, while xentd runs.
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
        &log,
    );
    let mut client: Client = xent::proto::xent_client::XentClient::connect(addr)
        .await
        .expect("connect");
    client
        .evaluate(request("by-env", [1, 2]))
        .await
        .expect("evaluated");
    let spans = receive(&mut rx, |got| call(got, "by-env").is_some()).await;
    let rpc = call(&spans, "by-env").unwrap();
    assert_eq!(rpc.service, "loss-service", "OTEL_SERVICE_NAME");
    assert_eq!(
        rpc.resource.get("team"),
        Some(&string("ml")),
        "OTEL_RESOURCE_ATTRIBUTES"
    );
    assert_eq!(
        rpc.resource.get("deployment.environment"),
        Some(&string("test"))
    );
    assert_eq!(rpc.span.name, "xent.v1.Xent/Evaluate");
    let status = tokio::task::spawn_blocking(move || sigterm(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "xentd exits 0: {status:?}");
    // xentd flushes at exit: everything it exported is in.
    while rx.try_recv().is_ok() {}

    // OTEL_SDK_DISABLED=true: nothing is exported, even with --otlp-endpoint (which would
    // flush at exit what it had).
    let (mut child, addr) = xentd(
        &["--otlp-endpoint", &endpoint],
        &[("OTEL_SDK_DISABLED", "true")],
        &log,
    );
    let mut client: Client = xent::proto::xent_client::XentClient::connect(addr)
        .await
        .expect("connect");
    client
        .evaluate(request("disabled", [1, 2]))
        .await
        .expect("evaluated");
    let status = tokio::task::spawn_blocking(move || sigterm(&mut child))
        .await
        .unwrap();
    assert!(status.success(), "xentd exits 0: {status:?}");
    let late: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
        .map(|e| e.span.name)
        .collect();
    assert!(
        late.is_empty(),
        "exported with OTEL_SDK_DISABLED=true: {late:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
