//! Logs and traces: the tracing subscriber of `xentd`, and, behind the `otel` cargo feature,
//! OTLP trace export and W3C `traceparent` propagation so a trainer's trace continues into
//! xentd.
//!
//! The default build has no OpenTelemetry dependency and needs no collector; asking it for
//! OTLP export is a configuration error that says which feature to build with.

use tracing_subscriber::filter::Filtered;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// How logs and traces are set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetrySettings {
    /// Log filter (EnvFilter syntax); `RUST_LOG` wins when set.
    pub filter: String,
    /// JSON lines instead of text.
    pub json: bool,
    /// ANSI colours (when stderr is a terminal).
    pub ansi: bool,
    /// OTLP/gRPC collector endpoint; `None` exports no traces.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported traces.
    pub service_name: String,
}

/// What must live as long as the process for traces to be flushed.
#[must_use = "dropping the guard stops trace export"]
pub struct Guard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber: logs to stderr, and traces to OTLP when configured.
pub fn init(s: &TelemetrySettings) -> Result<Guard, String> {
    #[cfg(feature = "otel")]
    {
        let (tracer, provider) = match &s.otlp_endpoint {
            Some(endpoint) => {
                let (tracer, provider) = otel::otlp_tracer(endpoint, &s.service_name)?;
                (Some(tracer), Some(provider))
            }
            None => (None, None),
        };
        otel::install_propagator();
        subscriber(s, tracer)?
            .try_init()
            .map_err(|e| e.to_string())?;
        Ok(Guard { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        if s.otlp_endpoint.is_some() {
            return Err("--otlp-endpoint needs a build with the `otel` feature (cargo build --features otel)".into());
        }
        tracing_subscriber::registry()
            .with(log_layer(s)?)
            .try_init()
            .map_err(|e| e.to_string())?;
        Ok(Guard {})
    }
}

/// The logs layer, filtered.
type LogLayer = Filtered<Box<dyn Layer<Registry> + Send + Sync>, EnvFilter, Registry>;

/// The log filter: `RUST_LOG` when set, else `--log`.
fn log_filter(s: &TelemetrySettings) -> Result<EnvFilter, String> {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&s.filter))
        .map_err(|e| format!("--log {:?}: {e}", s.filter))
}

/// The logs: text or JSON lines on stderr, under the log filter only.
///
/// Each layer has its own filter. The log filter governs only the logs; at its default
/// (`info`) the per-stage child spans of a call (`decode`, `queue`, `kernel`, `encode`, at
/// `debug`) are then never created, which saves a few microseconds of every small call.
/// Trace export ([`subscriber`]) takes every xent span at `debug` and above whatever the log
/// filter says, so an exported trace always has the stages.
fn log_layer(s: &TelemetrySettings) -> Result<LogLayer, String> {
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(s.ansi);
    let fmt = if s.json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    Ok(fmt.with_filter(log_filter(s)?))
}

/// What [`init`] installs: the logs, and trace export through `tracer` when given (every xent
/// span at `debug` and above, and whatever else the log filter passes).
#[cfg(feature = "otel")]
pub fn subscriber(
    s: &TelemetrySettings,
    tracer: Option<opentelemetry_sdk::trace::SdkTracer>,
) -> Result<impl tracing::Subscriber + Send + Sync + 'static, String> {
    use tracing_subscriber::filter::FilterExt as _;
    let traces = match tracer {
        Some(tracer) => {
            let spans = tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span()
                    && meta.target().starts_with("xent")
                    && *meta.level() <= tracing::Level::DEBUG
            });
            let filter = spans.or(log_filter(s)?);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(filter),
            )
        }
        None => None,
    };
    Ok(tracing_subscriber::registry()
        .with(log_layer(s)?)
        .with(traces))
}

/// Makes the caller's W3C trace context (the `traceparent` metadata) the parent of `span`.
/// Without the `otel` feature there is no trace context to continue, and this does nothing.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    #[cfg(feature = "otel")]
    otel::set_parent(span, metadata);
    #[cfg(not(feature = "otel"))]
    let _ = (span, metadata);
}

#[cfg(feature = "otel")]
pub mod otel {
    //! The OpenTelemetry parts, compiled only with the `otel` feature.

    use opentelemetry::propagation::Extractor;
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use opentelemetry_sdk::propagation::TraceContextPropagator;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;

    /// Makes W3C trace context the global propagation format.
    pub fn install_propagator() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }

    /// A tracer exporting spans to an OTLP/gRPC collector at `endpoint`, and the provider
    /// that flushes it.
    pub fn otlp_tracer(
        endpoint: &str,
        service_name: &str,
    ) -> Result<(opentelemetry_sdk::trace::SdkTracer, SdkTracerProvider), String> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("--otlp-endpoint {endpoint}: {e}"))?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_string())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok((provider.tracer("xentd"), provider))
    }

    struct Metadata<'a>(&'a tonic::metadata::MetadataMap);

    impl Extractor for Metadata<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0
                .keys()
                .filter_map(|k| match k {
                    tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                    tonic::metadata::KeyRef::Binary(_) => None,
                })
                .collect()
        }
    }

    /// Sets `span`'s parent to the trace context carried in `metadata`, if any.
    pub fn set_parent(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Metadata(metadata)));
        let _ = span.set_parent(cx);
    }
}

/// A log line that may repeat without bound (a call shed under load), let through at most
/// [`LogLimit::PER_SECOND`] times a second; the next line let through after a second in which
/// some were held back says how many (`suppressed`).
#[derive(Debug, Default)]
pub struct LogLimit {
    /// The second (since the process's first use of this limit) the counts are of.
    second: std::sync::atomic::AtomicU64,
    /// Lines let through in that second.
    passed: std::sync::atomic::AtomicU64,
    /// Lines held back since the last one let through.
    held: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    /// Lines let through a second.
    pub const PER_SECOND: u64 = 10;

    /// A limit with nothing counted.
    pub const fn new() -> LogLimit {
        LogLimit {
            second: std::sync::atomic::AtomicU64::new(0),
            passed: std::sync::atomic::AtomicU64::new(0),
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Whether to write the line now: `Some(lines held back before it)`, or `None`.
    pub fn admit(&self) -> Option<u64> {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_secs();
        self.admit_at(now)
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.second.swap(now, Relaxed) != now {
            self.passed.store(0, Relaxed);
        }
        if self.passed.fetch_add(1, Relaxed) < Self::PER_SECOND {
            Some(self.held.swap(0, Relaxed))
        } else {
            self.held.fetch_add(1, Relaxed);
            None
        }
    }
}

#[cfg(test)]
mod log_limit_tests {
    use super::LogLimit;

    #[test]
    fn lines_past_the_rate_are_counted_and_reported_by_the_next_one() {
        let l = LogLimit::new();
        for _ in 0..LogLimit::PER_SECOND {
            assert_eq!(l.admit_at(5), Some(0));
        }
        for _ in 0..7 {
            assert_eq!(l.admit_at(5), None);
        }
        assert_eq!(l.admit_at(6), Some(7));
        assert_eq!(l.admit_at(6), Some(0));
    }
}
