//! Every metric xentd exports: its name (a constant here, nowhere else), its unit and help
//! text, and the Prometheus exposition that the metrics listener serves ([`router`]).
//!
//! Recording goes through the `metrics` facade, so code that records knows nothing of
//! Prometheus; without an installed recorder (embedded servers, tests) recording is a no-op.
//! Label values come from closed sets (`method`, gRPC `code`, shed and close reasons), never
//! from request data.

mod process;

pub use process::max_fds;

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::Code;

use crate::error::Error;

/// Calls answered, by `method` and gRPC `code`.
pub const CALLS: &str = "xent_calls_total";
/// Time from a call's arrival to its answer, by `method`.
pub const CALL_DURATION: &str = "xent_call_duration_seconds";
/// Time a request waited in the batcher's queue.
pub const QUEUE_WAIT: &str = "xent_queue_wait_seconds";
/// Time the kernel (and encoding) took for one request.
pub const COMPUTE: &str = "xent_compute_seconds";
/// Rows (examples) per request.
pub const REQUEST_ROWS: &str = "xent_request_rows";
/// Requests per formed batch.
pub const BATCH_REQUESTS: &str = "xent_batch_requests";
/// Rows per formed batch.
pub const BATCH_ROWS: &str = "xent_batch_rows";
/// Batches formed, by close `reason`.
pub const BATCHES: &str = "xent_batches_total";
/// Requests waiting in the queue.
pub const QUEUE_REQUESTS: &str = "xent_queue_requests";
/// Bytes (inputs and outputs) of the requests waiting in the queue.
pub const QUEUE_BYTES: &str = "xent_queue_bytes";
/// Calls being handled.
pub const IN_FLIGHT: &str = "xent_calls_in_flight";
/// Bytes of requests received (protobuf encoded).
pub const RECEIVED_BYTES: &str = "xent_received_bytes_total";
/// Bytes of responses sent (protobuf encoded).
pub const SENT_BYTES: &str = "xent_sent_bytes_total";
/// Logits elements computed.
pub const ELEMENTS: &str = "xent_elements_computed_total";
/// Requests refused or dropped without being computed, by `reason`.
pub const SHED: &str = "xent_shed_total";
/// Streams and connections still open when a drain's grace period ran out, cut off, by
/// `what` (`streams`, `connections`).
pub const DRAIN_CUT: &str = "xent_drain_cut_total";
/// Calls refused for their bearer token, by `reason` (`missing`, `malformed`, `wrong`).
pub const AUTH_REFUSED: &str = "xent_auth_refused_total";
/// Bytes in transit on the gRPC listener: requests still arriving, answers not yet written.
pub const TRANSIT_BYTES: &str = "xent_transit_bytes";
/// Connections and calls the transport ended or refused for a limit or a timeout, by
/// `why` (see [`Ended`]).
pub const TRANSPORT_ENDED: &str = "xent_transport_ended_total";
/// Calls whose handling panicked, answered INTERNAL by the handlers' backstop, by `method`.
pub const PANICS: &str = "xent_panics_total";
/// Non-finite values (NaN, +inf, -inf) seen in logits and labels.
pub const NONFINITE_INPUTS: &str = "xent_nonfinite_inputs_total";
/// Dense label rows whose sum is not 1 (within 1e-3 relative).
pub const UNNORMALIZED_LABEL_ROWS: &str = "xent_unnormalized_label_rows_total";
/// Rows whose loss is not finite.
pub const NONFINITE_LOSS_ROWS: &str = "xent_nonfinite_loss_rows_total";
/// Rows recomputed in float64 by `--verify-fraction`.
pub const VERIFIED_ROWS: &str = "xent_verified_rows_total";
/// Largest error of the kernel seen by `--verify-fraction`, divided by the contract's
/// tolerance for its dtype (at most 1: within the contract).
pub const VERIFY_MAX_ERROR_RATIO: &str = "xent_verify_max_error_ratio";
/// 1, labelled with the `version` and the CPU `features` the kernel can use.
pub const BUILD_INFO: &str = "xent_build_info";

// The process metrics of Prometheus' own clients, read from /proc when scraped
// (`process.rs`).
/// User and system CPU time, in seconds.
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
/// Open file descriptors.
pub const PROCESS_OPEN_FDS: &str = "process_open_fds";
/// The soft limit on open file descriptors.
pub const PROCESS_MAX_FDS: &str = "process_max_fds";
/// Virtual memory size, in bytes.
pub const PROCESS_VIRTUAL: &str = "process_virtual_memory_bytes";
/// Resident memory size, in bytes.
pub const PROCESS_RESIDENT: &str = "process_resident_memory_bytes";
/// Start time, in seconds since the Unix epoch.
pub const PROCESS_START: &str = "process_start_time_seconds";
/// OS threads.
pub const PROCESS_THREADS: &str = "process_threads";

/// Why the transport ended or refused a connection or a call (the `why` label of
/// [`TRANSPORT_ENDED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// A connection over `--max-connections`, closed as it came.
    ConnectionLimit,
    /// No HTTP/2 preface (or, on the HTTP listener, no request head) in time.
    HandshakeTimeout,
    /// A keepalive PING went unanswered.
    KeepaliveTimeout,
    /// A connection without calls for `--idle-timeout-secs`, told GOAWAY.
    Idle,
    /// A connection past `--max-connection-age-secs`, told GOAWAY.
    MaxAge,
    /// ...and closed when its grace ran out.
    MaxAgeGrace,
    /// A call refused because the bytes in transit are over the budget.
    OverBudget,
    /// A call whose metadata is over `--max-header-bytes`.
    OversizedMetadata,
    /// A request that stalled mid-message.
    RequestStalled,
    /// An answer its client did not read.
    AnswerStalled,
    /// A deadline that passed while the request was still arriving.
    DeadlineInTransfer,
    /// A TLS handshake that failed: plaintext on a TLS port, an unknown CA, no client
    /// certificate under mutual TLS, a client outside the allow-list.
    TlsHandshake,
}

impl Ended {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Ended::ConnectionLimit => "connection_limit",
            Ended::HandshakeTimeout => "handshake_timeout",
            Ended::KeepaliveTimeout => "keepalive_timeout",
            Ended::Idle => "idle",
            Ended::MaxAge => "max_age",
            Ended::MaxAgeGrace => "max_age_grace",
            Ended::OverBudget => "over_budget",
            Ended::OversizedMetadata => "oversized_metadata",
            Ended::RequestStalled => "request_stalled",
            Ended::AnswerStalled => "answer_stalled",
            Ended::DeadlineInTransfer => "deadline_in_transfer",
            Ended::TlsHandshake => "tls_handshake",
        }
    }

    /// Counts one.
    pub fn count(self) {
        metrics::counter!(TRANSPORT_ENDED, "why" => self.label()).increment(1);
    }
}

/// Why a request was not computed (the `reason` label of [`SHED`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShedReason {
    /// Too many requests waiting.
    QueueRequests,
    /// Too many bytes waiting.
    QueueBytes,
    /// The server is draining.
    Draining,
    /// Over a hard per-request limit.
    TooLarge,
    /// Could not meet its deadline.
    Deadline,
    /// Its deadline passed while it waited.
    Expired,
    /// Its caller went away while it waited.
    Abandoned,
}

impl ShedReason {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ShedReason::QueueRequests => "queue_requests",
            ShedReason::QueueBytes => "queue_bytes",
            ShedReason::Draining => "draining",
            ShedReason::TooLarge => "too_large",
            ShedReason::Deadline => "deadline",
            ShedReason::Expired => "expired",
            ShedReason::Abandoned => "abandoned",
        }
    }
}

/// Counts a request shed for `reason`.
pub fn shed(reason: ShedReason) {
    metrics::counter!(SHED, "reason" => reason.label()).increment(1);
}

/// The canonical upper-case name of a gRPC code (the `code` label).
pub fn code_label(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The SIMD features of this CPU that matter to the kernel, comma-separated.
pub fn cpu_features() -> String {
    let mut f: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::arch::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::arch::is_x86_feature_detected!("f16c") {
            f.push("f16c");
        }
    }
    #[cfg(target_arch = "aarch64")]
    f.push("neon");
    if f.is_empty() {
        "none".into()
    } else {
        f.join(",")
    }
}

/// Counts a call's numerical health (the counters are created at 0 by [`install`]).
pub fn numerical_health(h: crate::kernel::Health) {
    for (name, n) in [
        (NONFINITE_INPUTS, h.nonfinite_inputs),
        (UNNORMALIZED_LABEL_ROWS, h.unnormalized_label_rows),
        (NONFINITE_LOSS_ROWS, h.nonfinite_loss_rows),
    ] {
        if n > 0 {
            metrics::counter!(name).increment(n);
        }
    }
}

/// Describes every metric (help text and unit).
pub fn describe() {
    describe_counter!(
        CALLS,
        Unit::Count,
        "Calls answered, by method and gRPC code."
    );
    describe_histogram!(
        CALL_DURATION,
        Unit::Seconds,
        "Time from a call's arrival to its answer."
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "Time a request waited for the compute pool."
    );
    describe_histogram!(
        COMPUTE,
        Unit::Seconds,
        "Kernel and encoding time of one request."
    );
    describe_histogram!(REQUEST_ROWS, Unit::Count, "Rows (examples) per request.");
    describe_histogram!(BATCH_REQUESTS, Unit::Count, "Requests per formed batch.");
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per formed batch.");
    describe_counter!(
        BATCHES,
        Unit::Count,
        "Batches formed, by the reason they closed."
    );
    describe_gauge!(
        QUEUE_REQUESTS,
        Unit::Count,
        "Requests waiting for the compute pool."
    );
    describe_gauge!(
        QUEUE_BYTES,
        Unit::Bytes,
        "Bytes of the requests waiting for the compute pool."
    );
    describe_gauge!(IN_FLIGHT, Unit::Count, "Calls being handled.");
    describe_counter!(
        RECEIVED_BYTES,
        Unit::Bytes,
        "Bytes of requests received (protobuf encoded)."
    );
    describe_counter!(
        SENT_BYTES,
        Unit::Bytes,
        "Bytes of responses sent (protobuf encoded)."
    );
    describe_counter!(ELEMENTS, Unit::Count, "Logits elements computed.");
    describe_counter!(
        SHED,
        Unit::Count,
        "Requests refused or dropped without being computed, by reason."
    );
    describe_counter!(
        DRAIN_CUT,
        Unit::Count,
        "Streams and connections cut off when the shutdown grace period ran out, by what."
    );
    describe_counter!(
        AUTH_REFUSED,
        Unit::Count,
        "Calls refused UNAUTHENTICATED for their bearer token, by reason."
    );
    describe_gauge!(
        TRANSIT_BYTES,
        Unit::Bytes,
        "Bytes of requests still arriving and answers not yet written."
    );
    describe_counter!(
        TRANSPORT_ENDED,
        Unit::Count,
        "Connections and calls ended or refused by a transport limit or timeout, by why."
    );
    describe_counter!(
        PANICS,
        Unit::Count,
        "Calls whose handling panicked (a bug), answered INTERNAL, by method."
    );
    describe_counter!(
        NONFINITE_INPUTS,
        Unit::Count,
        "NaN or infinite values seen in inputs (logits, labels, weights, upstream)."
    );
    describe_counter!(
        UNNORMALIZED_LABEL_ROWS,
        Unit::Count,
        "Dense label rows whose sum differs from 1 by more than 1e-3 (1e-2 for halves)."
    );
    describe_counter!(
        NONFINITE_LOSS_ROWS,
        Unit::Count,
        "Rows whose loss is not finite."
    );
    describe_counter!(
        VERIFIED_ROWS,
        Unit::Count,
        "Rows recomputed in float64 to check the kernel."
    );
    describe_gauge!(
        VERIFY_MAX_ERROR_RATIO,
        Unit::Count,
        "Largest relative error of the kernel seen by sampled float64 checks."
    );
    describe_gauge!(
        BUILD_INFO,
        Unit::Count,
        "Always 1; labelled with the version and the CPU features the kernel can use."
    );
}

/// Latency buckets in seconds: 50 us to 60 s.
const SECONDS: &[f64] = &[
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];
/// Count buckets: powers of two to 65536.
const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
    16384.0, 32768.0, 65536.0,
];

/// How often the recorder's histograms are compacted (what the exporter's own listener
/// would do).
const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the process-wide Prometheus recorder, and returns the handle that renders it.
/// Call once, from within the tokio runtime.
pub fn install() -> Result<PrometheusHandle, Error> {
    let err = |e: metrics_exporter_prometheus::BuildError| {
        Error::Internal(format!("metrics exporter: {e}"))
    };
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Suffix("_rows".into()), COUNTS)
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Full(BATCH_REQUESTS.into()), COUNTS)
        .map_err(err)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| Error::Internal(format!("metrics recorder: {e}")))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    describe();
    // Present from the start, so a rate over them is 0, not absent, until something is seen.
    for name in [
        NONFINITE_INPUTS,
        UNNORMALIZED_LABEL_ROWS,
        NONFINITE_LOSS_ROWS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION"), "features" => cpu_features()).set(1.0);
    Ok(handle)
}

/// The metrics listener's routes: `GET /metrics`, the exposition (xent's metrics, then the
/// process metrics); `GET /health`, `OK` (a probe that costs no rendering); anything else,
/// 404, so a mistyped scrape path fails the target instead of passing for it.
pub fn router(handle: PrometheusHandle) -> axum::Router {
    axum::Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .route("/health", axum::routing::get(|| async { "OK" }))
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: try /metrics\n") })
        .with_state(handle)
}

/// The content type of Prometheus' text format.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`, rendered on a blocking thread (rendering every histogram takes a while and
/// must not hold up the I/O thread's other connections).
async fn scrape(State(handle): State<PrometheusHandle>) -> axum::response::Response {
    let rendered = tokio::task::spawn_blocking(move || {
        let mut text = handle.render();
        process::render(&mut text);
        text
    })
    .await;
    match rendered {
        Ok(text) => ([(header::CONTENT_TYPE, TEXT_FORMAT)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering failed: {e}\n"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_canonical() {
        assert_eq!(code_label(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(ShedReason::QueueBytes.label(), "queue_bytes");
        assert!(!cpu_features().is_empty());
    }
}
