//! The integration tests: one binary, each module against a real xentd on a real socket.

// The load generator, `xent bench`.
mod bench;
// xentd's calls counter against the load generator's own counts.
mod call_counts;
// The xent CLI and the Rust client library.
mod cli;
mod common;
// Every reference case of tests/reference (made by TensorFlow, Keras and PyTorch) over gRPC.
mod conformance;
// Shutdown under load: every accepted stream answered, new callers told at once, exit 0.
mod drain;
// Hostile input: overflowing shapes, megabyte strings, log forgery, gzip bombs, undecodable
// bytes; bounded answers and a health check that keeps answering.
mod hostile;
// Batching, backpressure, deadlines and drain under load.
mod load;
// HTTP/2 driven by hand.
mod raw;
// The transport's limits and timeouts against clients that misbehave.
mod transport;
// The Open Inference Protocol (KServe v2) beside xent.v1, answer for answer.
mod oip;
// Triton's extensions of it: priority and queue timeout, ModelConfig, ModelStatistics,
// ModelStreamInfer, and the RPCs not served.
mod oip_triton;
// Metrics scraped by a real Prometheus; the deploy/ rules and dashboard run on it.
mod observability;
// A caller's trace continues into xentd (needs the `otel` feature).
#[cfg(feature = "otel")]
mod trace_context;
// TLS, mutual TLS, the allow-list and bearer tokens, with real handshakes.
mod security;
// Options, dtypes, both RPCs, errors, health, reflection and shutdown of a running server.
mod server;
