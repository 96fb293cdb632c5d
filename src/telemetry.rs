//! Logs and traces: the tracing subscriber of `xentd`, and, behind the `otel` cargo feature,
//! OTLP trace export and W3C `traceparent` propagation so a trainer's trace continues into
//! xentd.
//!
//! Where traces go is xentd's `--otlp-endpoint` when given, else what the standard
//! OpenTelemetry variables say (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
//! `OTEL_EXPORTER_OTLP_ENDPOINT`; `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`
//! turn export off), so a platform that injects them into every container needs nothing
//! xent-specific. The SDK itself reads the rest: `OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER(_ARG)`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*`.
//!
//! The exporter's gRPC channel lives on a Tokio runtime: [`init`] must be called with one
//! entered, and the [`Guard`] dropped while it still runs (it flushes the last spans).
//!
//! The default build has no OpenTelemetry dependency and needs no collector; asking it for
//! OTLP export with `--otlp-endpoint` is a configuration error that says which feature to
//! build with (the `OTEL_*` variables only get a warning: a platform may set them for all).

use std::sync::atomic::{AtomicBool, Ordering};

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
    /// `--otlp-endpoint`: the OTLP/gRPC collector; `None` leaves it to the `OTEL_*`
    /// variables ([`traces_endpoint`]).
    pub otlp_endpoint: Option<String>,
    /// `--service-name`: `service.name` of exported traces; `None` leaves it to
    /// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, else [`DEFAULT_SERVICE_NAME`].
    pub service_name: Option<String>,
}

/// `service.name` when neither `--service-name` nor the `OTEL_*` variables give one.
pub const DEFAULT_SERVICE_NAME: &str = "xentd";

/// Whether spans are exported: set once, when the subscriber with a tracer is built.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans go to OpenTelemetry. The span of every call carries the RPC semantic
/// conventions (`otel.kind`, `rpc.*`) only then: the logs have no use for them, and five more
/// fields on the span of every small call cost the log layer time for nothing.
#[inline]
pub fn exporting() -> bool {
    cfg!(feature = "otel") && EXPORTING.load(Ordering::Relaxed)
}

/// The OTLP endpoint traces go to, if any: `flag` (`--otlp-endpoint`) when given, else
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`; none at all when
/// `OTEL_SDK_DISABLED` is `true` or `OTEL_TRACES_EXPORTER` is `none`. `env` reads a variable
/// (empty counts as unset). An exporter other than `otlp` is refused, by name.
pub fn traces_endpoint(
    flag: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<String>, String> {
    let env = |name: &str| {
        env(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Ok(None);
    }
    if let Some(exporters) = env("OTEL_TRACES_EXPORTER") {
        let exporters: Vec<&str> = exporters.split(',').map(str::trim).collect();
        if exporters.iter().any(|e| e.eq_ignore_ascii_case("none")) {
            return Ok(None);
        }
        if let Some(other) = exporters.iter().find(|e| !e.eq_ignore_ascii_case("otlp")) {
            return Err(format!(
                "OTEL_TRACES_EXPORTER={other:?}: xentd exports traces over OTLP only (`otlp` or `none`)"
            ));
        }
    }
    Ok(flag
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT")))
}

/// A process environment variable, for [`traces_endpoint`].
fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
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

/// Installs the global subscriber: logs to stderr, and traces to OTLP when configured. Call
/// it inside a Tokio runtime (the exporter's channel is made on it).
pub fn init(s: &TelemetrySettings) -> Result<Guard, String> {
    #[cfg(feature = "otel")]
    {
        let endpoint = traces_endpoint(s.otlp_endpoint.as_deref(), process_env)?;
        let (tracer, provider) = match &endpoint {
            Some(endpoint) => {
                let (tracer, provider) =
                    otel::otlp_tracer(endpoint, s.service_name.as_deref(), process_env)?;
                (Some(tracer), Some(provider))
            }
            None => (None, None),
        };
        otel::install_propagator();
        subscriber(s, tracer)?
            .try_init()
            .map_err(|e| e.to_string())?;
        if let Some(endpoint) = &endpoint {
            tracing::info!(%endpoint, "exporting traces over OTLP/gRPC");
        }
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
        match traces_endpoint(None, process_env) {
            Ok(None) => {}
            Ok(Some(endpoint)) => tracing::warn!(
                %endpoint,
                "an OTEL_EXPORTER_OTLP_* variable names a collector, but this build exports \
                 no traces (build with --features otel)"
            ),
            Err(e) => tracing::warn!("{e}; this build exports no traces anyway"),
        }
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
            EXPORTING.store(true, Ordering::Relaxed);
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
/// Without trace export there is no trace to continue, and this does nothing.
pub fn continue_trace(span: &tracing::Span, metadata: &tonic::metadata::MetadataMap) {
    #[cfg(feature = "otel")]
    if exporting() {
        otel::set_parent(span, metadata);
    }
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

    /// The `service.name` to set over the SDK's own choice: `flag` when given; else none when
    /// `OTEL_SERVICE_NAME` or `service.name` in `OTEL_RESOURCE_ATTRIBUTES` names one (the
    /// SDK's resource reads them); else [`super::DEFAULT_SERVICE_NAME`], where the SDK would
    /// say `unknown_service`.
    pub fn service_name(
        flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Option<String> {
        if let Some(name) = flag.filter(|f| !f.is_empty()) {
            return Some(name.to_string());
        }
        let from_env = env("OTEL_SERVICE_NAME").is_some_and(|v| !v.trim().is_empty())
            || env("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
                attrs.split(',').any(|kv| {
                    kv.split_once('=')
                        .is_some_and(|(k, _)| k.trim() == "service.name")
                })
            });
        (!from_env).then(|| super::DEFAULT_SERVICE_NAME.to_string())
    }

    /// A tracer exporting spans in batches to the OTLP/gRPC collector at `endpoint`, and the
    /// provider that flushes it. The channel to the collector is made on the current Tokio
    /// runtime (it connects lazily: a collector that is down costs dropped spans, not a
    /// failed start). The sampler is the SDK's default, which reads `OTEL_TRACES_SAMPLER`.
    pub fn otlp_tracer(
        endpoint: &str,
        service_name_flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(opentelemetry_sdk::trace::SdkTracer, SdkTracerProvider), String> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err("OTLP export must be set up inside the Tokio runtime".into());
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTLP endpoint {endpoint}: {e}"))?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if let Some(name) = service_name(service_name_flag, env) {
            resource = resource.with_service_name(name);
        }
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource.build())
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

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_flag_names_the_service_else_the_sdk_or_xentd() {
            let none = |_: &str| None;
            assert_eq!(
                service_name(Some("trainer-loss"), none).as_deref(),
                Some("trainer-loss")
            );
            assert_eq!(service_name(None, none).as_deref(), Some("xentd"));
            let named = |k: &str| (k == "OTEL_SERVICE_NAME").then(|| "from-env".to_string());
            assert_eq!(
                service_name(None, named),
                None,
                "the SDK reads OTEL_SERVICE_NAME"
            );
            assert_eq!(service_name(Some("flag"), named).as_deref(), Some("flag"));
            let attrs = |k: &str| {
                (k == "OTEL_RESOURCE_ATTRIBUTES").then(|| "team=ml, service.name=loss".to_string())
            };
            assert_eq!(
                service_name(None, attrs),
                None,
                "the SDK reads OTEL_RESOURCE_ATTRIBUTES"
            );
            let other = |k: &str| (k == "OTEL_RESOURCE_ATTRIBUTES").then(|| "team=ml".to_string());
            assert_eq!(service_name(None, other).as_deref(), Some("xentd"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_flag_then_the_signal_variable_then_the_generic_one() {
        let all = [
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://any:4317"),
        ];
        fn at(flag: Option<&str>, vars: &[(&str, &str)]) -> Option<String> {
            traces_endpoint(flag, env(vars)).unwrap()
        }
        assert_eq!(
            at(Some("http://flag:4317"), &all).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(at(Some(""), &all).as_deref(), Some("http://traces:4317"));
        assert_eq!(at(None, &all).as_deref(), Some("http://traces:4317"));
        assert_eq!(at(None, &all[1..]).as_deref(), Some("http://any:4317"));
        assert_eq!(
            at(None, &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", " "), all[1]]).as_deref(),
            Some("http://any:4317"),
            "empty counts as unset"
        );
        assert_eq!(at(None, &[]), None);
    }

    #[test]
    fn the_standard_off_switches_win() {
        let flag = Some("http://flag:4317");
        for off in [
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            assert_eq!(traces_endpoint(flag, env(&[off])).unwrap(), None, "{off:?}");
        }
        let on = [
            ("OTEL_SDK_DISABLED", "false"),
            ("OTEL_TRACES_EXPORTER", "otlp"),
        ];
        assert!(traces_endpoint(flag, env(&on)).unwrap().is_some());
        let err = traces_endpoint(flag, env(&[("OTEL_TRACES_EXPORTER", "zipkin")])).unwrap_err();
        assert!(
            err.contains("OTEL_TRACES_EXPORTER") && err.contains("zipkin"),
            "{err}"
        );
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
