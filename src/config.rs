//! All of `xentd`'s configuration: one clap struct whose every flag has an `XENT_*`
//! environment variable, validated into [`Settings`] before anything starts.
//!
//! The doc comment of each field is its `--help` text and its row in README's table.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, CommandFactory, FromArgMatches, Parser};

use crate::batcher::{BatcherSettings, Limits};
use crate::server::TransportSettings;
use crate::server::tls::TlsFiles;

/// One MiB.
pub const MIB: usize = 1 << 20;

/// `xentd`: serves softmax cross-entropy losses and gradients over gRPC.
#[derive(Clone, Debug, Parser)]
#[command(name = "xentd", version, about)]
pub struct Config {
    /// Address to listen on for gRPC (port 0 picks a free port).
    #[arg(long, env = "XENT_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Threads of the compute pool that runs the kernel (0: one per CPU core).
    #[arg(long, env = "XENT_COMPUTE_THREADS", default_value_t = 0)]
    pub compute_threads: usize,

    /// Tokio worker threads for network I/O (0: chosen from the core count).
    #[arg(long, env = "XENT_IO_THREADS", default_value_t = 0)]
    pub io_threads: usize,

    /// Largest gRPC message accepted or sent, in bytes (a 16x128256 float32 batch with dense
    /// labels is 16 MiB).
    #[arg(long, env = "XENT_MAX_MESSAGE_BYTES", default_value_t = 256 * MIB)]
    pub max_message_bytes: usize,

    /// Requests of one EvaluateStream or ModelStreamInfer evaluated concurrently (answers keep
    /// request order).
    #[arg(long, env = "XENT_STREAM_CONCURRENCY", default_value_t = 4)]
    pub stream_concurrency: usize,

    /// Seconds that calls in flight may take to finish after SIGTERM or SIGINT before the
    /// server exits anyway.
    #[arg(long, env = "XENT_SHUTDOWN_GRACE_SECS", default_value_t = 10.0)]
    pub shutdown_grace_secs: f64,

    /// Gather concurrent compatible requests into one compute job (`false`: one job each).
    #[arg(long, env = "XENT_BATCHING", default_value_t = true, action = ArgAction::Set)]
    pub batching: bool,

    /// Longest a request waits for company when a compute slot is free, in milliseconds
    /// (0: never wait; batches then form only from requests queued while the pool is busy).
    #[arg(long, env = "XENT_MAX_BATCH_DELAY_MS", default_value_t = 0.0)]
    pub max_batch_delay_ms: f64,

    /// Row budget of one batch.
    #[arg(long, env = "XENT_MAX_BATCH_ROWS", default_value_t = 4096)]
    pub max_batch_rows: usize,

    /// Byte budget of one batch (inputs and outputs).
    #[arg(long, env = "XENT_MAX_BATCH_BYTES", default_value_t = 64 * MIB)]
    pub max_batch_bytes: usize,

    /// Requests at least this many bytes run alone, without waiting for company.
    #[arg(long, env = "XENT_LARGE_REQUEST_BYTES", default_value_t = MIB)]
    pub large_request_bytes: usize,

    /// Requests that may wait for the compute pool; more are refused with UNAVAILABLE.
    #[arg(long, env = "XENT_MAX_QUEUE_REQUESTS", default_value_t = 1024)]
    pub max_queue_requests: usize,

    /// Bytes (inputs and outputs) that may wait; more are refused with UNAVAILABLE.
    #[arg(long, env = "XENT_MAX_QUEUE_BYTES", default_value_t = 1024 * MIB)]
    pub max_queue_bytes: usize,

    /// Priority levels of the queue: a request at level 1 is taken before one at level 2, and
    /// so on; first come first served within a level. Requests that name no level (the Open
    /// Inference Protocol's `priority` 0 or absent, every xent.v1 request) get the last one.
    #[arg(long, env = "XENT_PRIORITY_LEVELS", default_value_t = 2)]
    pub priority_levels: u32,

    /// Batches computed at once (0: one per compute thread).
    #[arg(long, env = "XENT_MAX_INFLIGHT_BATCHES", default_value_t = 0)]
    pub max_inflight_batches: usize,

    /// Largest request, in logits elements; larger ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "XENT_MAX_REQUEST_ELEMENTS", default_value_t = 1 << 26)]
    pub max_request_elements: usize,

    /// Deadline of a call whose client sets none, in seconds.
    #[arg(long, env = "XENT_DEFAULT_TIMEOUT_SECS", default_value_t = 60.0)]
    pub default_timeout_secs: f64,

    /// Concurrent HTTP/2 streams (calls) per client connection.
    #[arg(long, env = "XENT_MAX_CONCURRENT_STREAMS", default_value_t = 256)]
    pub max_concurrent_streams: u32,

    /// How long a client may take to open a connection: TCP accepted to its HTTP/2 preface
    /// and SETTINGS, in seconds (on the metrics listener: to a request's headers).
    #[arg(long, env = "XENT_HANDSHAKE_TIMEOUT_SECS", default_value_t = 10.0)]
    pub handshake_timeout_secs: f64,

    /// Seconds a connection may stay with no call in flight before it gets GOAWAY and is
    /// closed (0: never).
    #[arg(long, env = "XENT_IDLE_TIMEOUT_SECS", default_value_t = 300.0)]
    pub idle_timeout_secs: f64,

    /// Seconds between HTTP/2 PINGs the server sends to find connections whose client is
    /// gone (0: none).
    #[arg(long, env = "XENT_KEEPALIVE_INTERVAL_SECS", default_value_t = 30.0)]
    pub keepalive_interval_secs: f64,

    /// Seconds a keepalive PING may go unanswered before the connection is closed.
    #[arg(long, env = "XENT_KEEPALIVE_TIMEOUT_SECS", default_value_t = 10.0)]
    pub keepalive_timeout_secs: f64,

    /// Seconds after which a connection is told GOAWAY so that its client reconnects,
    /// possibly to another replica (0: never). Spread by up to 10 % so connections made
    /// together do not all go at once.
    #[arg(long, env = "XENT_MAX_CONNECTION_AGE_SECS", default_value_t = 0.0)]
    pub max_connection_age_secs: f64,

    /// Seconds a connection past its maximum age gets to finish its calls before it is
    /// closed.
    #[arg(
        long,
        env = "XENT_MAX_CONNECTION_AGE_GRACE_SECS",
        default_value_t = 30.0
    )]
    pub max_connection_age_grace_secs: f64,

    /// Connections open at once on each listener; more are closed as they come (0: three
    /// quarters of the process's file-descriptor limit).
    #[arg(long, env = "XENT_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Seconds a request message may stall half received, or an answer wait for a client
    /// that does not read it, before the call is ended.
    #[arg(long, env = "XENT_TRANSFER_IDLE_TIMEOUT_SECS", default_value_t = 30.0)]
    pub transfer_idle_timeout_secs: f64,

    /// Largest header block (gRPC metadata) a call may send, in bytes; a call over it gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "XENT_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: u32,

    /// MiB of requests still arriving and answers not yet written, across all calls, past
    /// which new calls get UNAVAILABLE and uploads are held back (0: a quarter of the memory
    /// the process may use, at least 256).
    #[arg(long, env = "XENT_TRANSIT_BUDGET_MIB", default_value_t = 0)]
    pub transit_budget_mib: u64,

    /// The server's TLS certificate chain (PEM, leaf first); with `--tls-key`, the gRPC
    /// listener speaks only TLS. Reloaded on SIGHUP and when the file changes.
    #[arg(long, env = "XENT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of `--tls-cert` (PEM).
    #[arg(long, env = "XENT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// CA certificates (PEM) that client certificates must chain to: mutual TLS; a client
    /// without one is refused in the handshake.
    #[arg(long, env = "XENT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// With `--tls-client-ca`, the only client certificate subject names accepted (common
    /// name, or DNS, URI or e-mail alternative name), comma-separated.
    #[arg(
        long,
        env = "XENT_TLS_CLIENT_ALLOW",
        value_delimiter = ',',
        requires = "tls_client_ca"
    )]
    pub tls_client_allow: Vec<String>,

    /// A file of bearer tokens, one per line (`#` starts a comment): every call but health's
    /// must send `authorization: Bearer TOKEN` with one of them. Reloaded like the
    /// certificates.
    #[arg(long, env = "XENT_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// A plaintext listener that serves grpc.health.v1 and nothing else, for probes that
    /// cannot do TLS or send tokens (`off`: none).
    #[arg(long, env = "XENT_HEALTH_LISTEN", default_value = "off")]
    pub health_listen: String,

    /// Serve gRPC server reflection.
    #[arg(long, env = "XENT_REFLECTION", default_value_t = true, action = ArgAction::Set)]
    pub reflection: bool,

    /// Accept gzip-compressed requests and compress answers for clients that accept gzip.
    #[arg(long, env = "XENT_GZIP", default_value_t = true, action = ArgAction::Set)]
    pub gzip: bool,

    /// Fraction of requests recomputed in float64, after they are answered, to measure the
    /// kernel's error on real traffic (0 disables).
    #[arg(long, env = "XENT_VERIFY_FRACTION", default_value_t = 0.0)]
    pub verify_fraction: f64,

    /// Address of the Prometheus `/metrics` listener (`off` disables it).
    #[arg(long, env = "XENT_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: String,

    /// Log line format: `text` for people, `json` for log pipelines.
    #[arg(long, env = "XENT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// OTLP/gRPC collector to export traces to, e.g. `http://127.0.0.1:4317` (needs a build
    /// with the `otel` feature; empty: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, else
    /// OTEL_EXPORTER_OTLP_ENDPOINT, else no export).
    #[arg(long, env = "XENT_OTLP_ENDPOINT", default_value = "")]
    pub otlp_endpoint: String,

    /// `service.name` of exported traces (empty: OTEL_SERVICE_NAME, else `service.name` in
    /// OTEL_RESOURCE_ATTRIBUTES, else `xentd`).
    #[arg(long, env = "XENT_SERVICE_NAME", default_value = "")]
    pub service_name: String,

    /// Log filter in `tracing` EnvFilter syntax (RUST_LOG, if set, takes precedence).
    #[arg(long, env = "XENT_LOG", default_value = "info")]
    pub log: String,
}

impl Config {
    /// The command line with every flag's environment variable left unread, so its
    /// defaults are the documented ones whatever the shell holds.
    fn command_without_env() -> clap::Command {
        Config::command().mut_args(|a| a.env(None))
    }

    /// The configuration `args` give (the program name first) with no `XENT_*` variable
    /// read (`Config::parse` reads them): for tests and embedding programs, whose settings
    /// must not depend on the shell they run in.
    pub fn from_args_only<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Config::command_without_env().try_get_matches_from(args)?;
        Config::from_arg_matches(&matches)
    }

    /// Every flag at its documented default, whatever the environment holds.
    pub fn defaults() -> Config {
        Config::from_args_only(["xentd"]).expect("the defaults are a valid command line")
    }

    /// How logs and traces are to be set up.
    pub fn telemetry(&self, ansi: bool) -> crate::telemetry::TelemetrySettings {
        crate::telemetry::TelemetrySettings {
            filter: self.log.clone(),
            json: self.log_format == "json",
            ansi,
            otlp_endpoint: (!self.otlp_endpoint.is_empty()).then(|| self.otlp_endpoint.clone()),
            service_name: (!self.service_name.is_empty()).then(|| self.service_name.clone()),
        }
    }
}

/// Validated settings the server runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Listen address.
    pub listen: SocketAddr,
    /// Compute pool threads.
    pub compute_threads: usize,
    /// Tokio worker threads.
    pub io_threads: usize,
    /// Message size limit, both directions.
    pub max_message_bytes: usize,
    /// Concurrency within one stream.
    pub stream_concurrency: usize,
    /// Grace period of a shutdown.
    pub shutdown_grace: Duration,
    /// The batcher.
    pub batcher: BatcherSettings,
    /// Deadline of calls that set none.
    pub default_timeout: Duration,
    /// How connections are served.
    pub transport: TransportSettings,
    /// TLS, tokens, and what is served.
    pub security: SecuritySettings,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Fraction of requests verified in float64.
    pub verify_fraction: f64,
}

impl Default for Settings {
    /// The settings of [`Config::defaults`]: no flag, and no `XENT_*` variable either.
    fn default() -> Self {
        Config::defaults().validate().expect("defaults are valid")
    }
}

/// TLS, bearer tokens, and what is served where.
#[derive(Clone, Debug, PartialEq)]
pub struct SecuritySettings {
    /// TLS on the gRPC listener.
    pub tls: Option<TlsFiles>,
    /// Bearer tokens every call but health's must carry.
    pub auth_token_file: Option<PathBuf>,
    /// A plaintext health-only listener.
    pub health_listen: Option<SocketAddr>,
    /// Serve reflection.
    pub reflection: bool,
    /// Accept and send gzip.
    pub gzip: bool,
}

/// Connections per listener when `--max-connections` is 0: three quarters of the soft
/// file-descriptor limit (the rest is for the other listener, logs and the like), at least 16.
pub fn default_max_connections() -> usize {
    let nofile =
        crate::metrics::max_fds().map_or(1024, |n| usize::try_from(n).unwrap_or(usize::MAX));
    (nofile / 4 * 3).max(16)
}

/// `value` of the listener flag `flag` as an address, or None for `off`.
fn listen_address(flag: &str, value: &str, example: &str) -> Result<Option<SocketAddr>, String> {
    match value {
        "off" | "" => Ok(None),
        a => a
            .parse::<SocketAddr>()
            .map(Some)
            .map_err(|e| format!("{flag} {a:?}: {e} (an address like {example}, or off)")),
    }
}

/// How the machine's cores are split: `(io_threads, compute_threads)`. The kernel is
/// CPU-bound and owns every core; network I/O needs a fraction of one core per few cores.
pub fn thread_split(cores: usize) -> (usize, usize) {
    let cores = cores.max(1);
    ((cores / 4).max(1), cores)
}

impl Config {
    /// Checks every value, naming the flag of the first that makes no sense.
    pub fn validate(&self) -> Result<Settings, String> {
        let cores = crate::cpus::available();
        let (io, compute) = thread_split(cores);
        if self.max_message_bytes < MIB || self.max_message_bytes > 2048 * MIB {
            return Err(format!(
                "--max-message-bytes {} must be between 1 MiB and 2 GiB",
                self.max_message_bytes
            ));
        }
        if self.stream_concurrency == 0 || self.stream_concurrency > 1024 {
            return Err(format!(
                "--stream-concurrency {} must be between 1 and 1024",
                self.stream_concurrency
            ));
        }
        if !(self.shutdown_grace_secs.is_finite()
            && (0.0..=3600.0).contains(&self.shutdown_grace_secs))
        {
            return Err(format!(
                "--shutdown-grace-secs {} must be between 0 and 3600",
                self.shutdown_grace_secs
            ));
        }
        if self.compute_threads > 1024 || self.io_threads > 1024 {
            return Err("--compute-threads and --io-threads must be at most 1024".into());
        }
        if !(self.max_batch_delay_ms.is_finite()
            && (0.0..=1000.0).contains(&self.max_batch_delay_ms))
        {
            return Err(format!(
                "--max-batch-delay-ms {} must be between 0 and 1000",
                self.max_batch_delay_ms
            ));
        }
        if self.max_batch_rows == 0 || self.max_batch_bytes == 0 || self.large_request_bytes == 0 {
            return Err(
                "--max-batch-rows, --max-batch-bytes and --large-request-bytes must be positive"
                    .into(),
            );
        }
        if self.max_queue_requests == 0
            || self.max_queue_bytes < self.max_batch_bytes.min(self.large_request_bytes)
        {
            return Err(format!(
                "--max-queue-requests must be positive and --max-queue-bytes ({}) at least the smaller of --max-batch-bytes and --large-request-bytes",
                self.max_queue_bytes
            ));
        }
        if !(1..=100).contains(&self.priority_levels) {
            return Err(format!(
                "--priority-levels {} must be between 1 and 100",
                self.priority_levels
            ));
        }
        if self.max_request_elements == 0 {
            return Err("--max-request-elements must be positive".into());
        }
        if !(self.default_timeout_secs.is_finite()
            && self.default_timeout_secs > 0.0
            && self.default_timeout_secs <= 86_400.0)
        {
            return Err(format!(
                "--default-timeout-secs {} must be in (0, 86400]",
                self.default_timeout_secs
            ));
        }
        if self.max_concurrent_streams == 0 {
            return Err("--max-concurrent-streams must be positive".into());
        }
        let secs = |flag: &str, v: f64, zero_ok: bool| -> Result<Duration, String> {
            if v.is_finite() && (0.0..=86_400.0).contains(&v) && (zero_ok || v > 0.0) {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!(
                    "{flag} {v} must be {} 86400 seconds",
                    if zero_ok {
                        "between 0 and"
                    } else {
                        "more than 0 and at most"
                    }
                ))
            }
        };
        let off_if_zero = |d: Duration| (!d.is_zero()).then_some(d);
        if self.max_header_bytes < 1024 {
            return Err(format!(
                "--max-header-bytes {} must be at least 1024",
                self.max_header_bytes
            ));
        }
        let transport = TransportSettings {
            max_concurrent_streams: self.max_concurrent_streams,
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_secs),
            handshake_timeout: secs(
                "--handshake-timeout-secs",
                self.handshake_timeout_secs,
                false,
            )?,
            idle_timeout: off_if_zero(secs("--idle-timeout-secs", self.idle_timeout_secs, true)?),
            keepalive_interval: off_if_zero(secs(
                "--keepalive-interval-secs",
                self.keepalive_interval_secs,
                true,
            )?),
            keepalive_timeout: secs(
                "--keepalive-timeout-secs",
                self.keepalive_timeout_secs,
                false,
            )?,
            max_connection_age: off_if_zero(secs(
                "--max-connection-age-secs",
                self.max_connection_age_secs,
                true,
            )?),
            max_connection_age_grace: secs(
                "--max-connection-age-grace-secs",
                self.max_connection_age_grace_secs,
                true,
            )?,
            max_connections: if self.max_connections == 0 {
                default_max_connections()
            } else {
                self.max_connections
            },
            transfer_idle_timeout: secs(
                "--transfer-idle-timeout-secs",
                self.transfer_idle_timeout_secs,
                false,
            )?,
            default_timeout: Duration::from_secs_f64(self.default_timeout_secs),
            max_header_bytes: self.max_header_bytes,
            transit_budget: if self.transit_budget_mib == 0 {
                crate::server::default_transit_budget()
            } else {
                self.transit_budget_mib.saturating_mul(MIB as u64)
            },
        };
        if !(0.0..=1.0).contains(&self.verify_fraction) {
            return Err(format!(
                "--verify-fraction {} must be between 0 and 1",
                self.verify_fraction
            ));
        }
        let metrics_listen =
            listen_address("--metrics-listen", &self.metrics_listen, "127.0.0.1:9464")?;
        let health_listen =
            listen_address("--health-listen", &self.health_listen, "0.0.0.0:50052")?;
        let security = SecuritySettings {
            tls: match (&self.tls_cert, &self.tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: self.tls_client_ca.clone(),
                    client_allow: self
                        .tls_client_allow
                        .iter()
                        .map(|n| n.trim().to_owned())
                        .filter(|n| !n.is_empty())
                        .collect(),
                }),
                _ => None,
            },
            auth_token_file: self.auth_token_file.clone(),
            health_listen,
            reflection: self.reflection,
            gzip: self.gzip,
        };
        let compute_threads = if self.compute_threads == 0 {
            compute
        } else {
            self.compute_threads
        };
        Ok(Settings {
            listen: self.listen,
            compute_threads,
            io_threads: if self.io_threads == 0 {
                io
            } else {
                self.io_threads
            },
            max_message_bytes: self.max_message_bytes,
            stream_concurrency: self.stream_concurrency,
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_secs),
            batcher: BatcherSettings {
                limits: Limits {
                    batching: self.batching,
                    max_delay: Duration::from_secs_f64(self.max_batch_delay_ms / 1e3),
                    max_batch_rows: self.max_batch_rows,
                    max_batch_bytes: self.max_batch_bytes,
                    large_request_bytes: self.large_request_bytes,
                    max_queue_requests: self.max_queue_requests,
                    max_queue_bytes: self.max_queue_bytes,
                    priority_levels: self.priority_levels,
                },
                max_inflight_batches: if self.max_inflight_batches == 0 {
                    compute_threads
                } else {
                    self.max_inflight_batches
                },
                max_request_elements: self.max_request_elements,
            },
            default_timeout: Duration::from_secs_f64(self.default_timeout_secs),
            transport,
            security,
            metrics_listen,
            verify_fraction: self.verify_fraction,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_split_keeps_every_core_for_compute() {
        assert_eq!(thread_split(0), (1, 1));
        assert_eq!(thread_split(2), (1, 2));
        assert_eq!(thread_split(16), (4, 16));
    }

    #[test]
    fn defaults_read_no_environment_variable() {
        // Every flag has a variable...
        let with_env = Config::command();
        assert!(
            with_env
                .get_arguments()
                .filter(|a| a.get_id() != "help" && a.get_id() != "version")
                .all(|a| a.get_env().is_some())
        );
        // ...and the defaults consult none of them.
        let without = Config::command_without_env();
        assert!(without.get_arguments().all(|a| a.get_env().is_none()));
        assert_eq!(
            Config::defaults().validate().unwrap(),
            Settings::default(),
            "Settings::default is Config::defaults"
        );
        assert_eq!(Config::defaults().max_message_bytes, 256 * MIB);
    }

    #[test]
    fn nonsense_is_refused_with_the_flag_named() {
        let bad = |args: &[&str]| {
            Config::from_args_only([&["xentd"], args].concat())
                .unwrap()
                .validate()
                .unwrap_err()
        };
        assert!(bad(&["--max-message-bytes", "10"]).contains("--max-message-bytes"));
        assert!(bad(&["--stream-concurrency", "0"]).contains("--stream-concurrency"));
        assert!(bad(&["--shutdown-grace-secs=-1"]).contains("--shutdown-grace-secs"));
        assert!(bad(&["--max-batch-delay-ms", "5000"]).contains("--max-batch-delay-ms"));
        assert!(bad(&["--default-timeout-secs", "0"]).contains("--default-timeout-secs"));
        assert!(bad(&["--max-queue-requests", "0"]).contains("--max-queue-requests"));
        assert!(bad(&["--metrics-listen", "nowhere"]).contains("--metrics-listen"));
        assert!(bad(&["--verify-fraction", "2"]).contains("--verify-fraction"));
        let off = Config::from_args_only(["xentd", "--metrics-listen", "off"])
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(off.metrics_listen, None);
        let ok = Config::from_args_only(["xentd", "--listen", "127.0.0.1:0"])
            .unwrap()
            .validate()
            .unwrap();
        assert!(ok.max_message_bytes >= 256 * MIB);
    }
}
