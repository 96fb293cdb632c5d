//! A trace started by the caller continues into xentd: the `traceparent` sent as gRPC metadata
//! is the parent of the server's `rpc` span (spans captured by an in-memory exporter).

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use xent::api::tensor::encode;
use xent::proto::{EvaluateRequest, LossKind};

use crate::common::TestServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_traceparent_is_the_parent_of_the_server_span() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    // xentd's own subscriber at its default log filter, `info`: the stages' spans are at
    // `debug`, and trace export must have them anyway.
    let settings = xent::telemetry::TelemetrySettings {
        filter: "info".into(),
        json: false,
        ansi: false,
        otlp_endpoint: None,
        service_name: "xentd".into(),
    };
    let subscriber = xent::telemetry::subscriber(&settings, Some(provider.tracer("test")))
        .expect("the subscriber builds");
    // Global, as in xentd: spans are entered on tokio and rayon threads, and the registry
    // closes them through each thread's default subscriber. No other test installs one.
    tracing::subscriber::set_global_default(subscriber)
        .expect("the only global subscriber of this binary");
    xent::telemetry::otel::install_propagator();

    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut req = tonic::Request::new(EvaluateRequest {
        request_id: "traced".into(),
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], vec![1.0f32, 2.0, 0.5, 0.2, 0.8, 1.5], true)),
        labels: Some(encode(&[2], vec![1i64, 2], true)),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-{parent}-01").parse().unwrap(),
    );
    client.evaluate(req).await.expect("evaluated");

    let mut rpc = None;
    for _ in 0..200 {
        let _ = provider.force_flush();
        rpc = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .find(|s| {
                s.name == "rpc" && s.attributes.iter().any(|kv| kv.value.as_str() == "traced")
            });
        if rpc.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rpc = rpc.expect("the server's rpc span was exported");
    let spans = exporter.get_finished_spans().unwrap();
    for child in ["decode", "queue", "kernel", "encode"] {
        let c = spans
            .iter()
            .find(|s| s.name == child)
            .unwrap_or_else(|| panic!("{child} span exported"));
        assert_eq!(
            c.parent_span_id,
            rpc.span_context.span_id(),
            "{child} is a child of rpc"
        );
    }
    assert_eq!(
        rpc.span_context.trace_id(),
        TraceId::from_hex(trace).unwrap(),
        "same trace"
    );
    assert_eq!(
        rpc.parent_span_id,
        SpanId::from_hex(parent).unwrap(),
        "the caller's span is the parent"
    );
    let fields: Vec<String> = rpc.attributes.iter().map(|kv| kv.key.to_string()).collect();
    for f in ["method", "request_id", "loss", "dtype", "code"] {
        assert!(
            fields.iter().any(|k| k == f),
            "{f} recorded on the span: {fields:?}"
        );
    }
}
