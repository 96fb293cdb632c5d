//! A Rust client for `xentd`: ndarray arrays in, ndarray arrays out.
//!
//! The generated [`XentClient`] speaks protobuf: every tensor is a `proto::Tensor` with a dtype
//! enum, an `i64` shape and little-endian bytes. This module is the layer a Rust program
//! actually wants on top of it:
//!
//! - [`Client::connect`] opens a channel tuned for tensors: message limits far above tonic's
//!   4 MiB default in both directions, HTTP/2 flow-control windows sized for multi-MiB
//!   messages, and an optional per-call deadline sent as `grpc-timeout`.
//! - [`EvalRequest`] builds a request from ndarray views of any layout and any of the float
//!   element types xent computes in ([`half::f16`], [`half::bf16`], `f32`, `f64`), encoded as
//!   raw bytes (the server reads them in place).
//! - [`Client::evaluate`] returns an [`EvalResult`] of `ArrayD<T>` in the logits' own element
//!   type, after checking every returned tensor's dtype and shape against the request: a
//!   malformed response is a [`ClientError::Response`], never a panic.
//!
//! - [`Client::connect_many`] balances calls over several servers: a static list of
//!   addresses, or DNS names re-resolved every [`ClientConfig::resolve_interval`] (a
//!   Kubernetes headless Service gives one A record per ready pod), each address one HTTP/2
//!   connection, calls spread by tonic's power-of-two-choices balancer.
//! - Calls answered UNAVAILABLE (a server draining, a connection lost, a replica shedding
//!   load) are retried with exponential backoff and full jitter, at most
//!   [`RetryPolicy::max_attempts`] times and never past the call's deadline: the request is
//!   the same bytes each time, and evaluation has no side effects, so a retry is always safe.
//!
//! Callers who build protobuf messages themselves use [`Client::evaluate_raw`] and
//! [`Client::evaluate_stream`]; [`EvalRequest::to_proto`] and [`EvalRequest::decode_response`]
//! bridge the two worlds, e.g. to pipeline ndarray batches over one stream.
//!
//! ```no_run
//! use ndarray::array;
//! use xent::client::{Client, EvalRequest};
//! use xent::eval::{Options, Reduction};
//!
//! # async fn run() -> Result<(), xent::client::ClientError> {
//! let mut client = Client::connect("127.0.0.1:50051").await?;
//! let logits = array![[1.0f32, 2.0, 0.5], [0.2, 0.8, 1.5]].into_dyn();
//! let labels = array![1i64, 2].into_dyn();
//! let options = Options { reduction: Reduction::Mean, ..Options::default() };
//! let out = client
//!     .evaluate(EvalRequest::sparse(logits.view(), labels.view()).options(options))
//!     .await?;
//! println!("loss {:?}, grad {:?}", out.loss, out.grad_logits);
//! # Ok(())
//! # }
//! ```

use std::collections::HashSet;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::Stream;
use ndarray::{ArrayD, ArrayView, Dimension, IxDyn};
use tokio::time::Instant;
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::channel::Change;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::api::convert;
use crate::api::tensor::{WireElement, decode, encode};
use crate::dtype::Element;
use crate::eval::{LossKind, OptionName, Options, Output, Reduction, Wanted};
pub use crate::kernel::Health;
use crate::proto;
use crate::proto::xent_client::XentClient;

/// One mebibyte.
const MIB: usize = 1 << 20;

/// How a [`Client`] connects and how large its messages may be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Largest message sent or accepted, in bytes. Default 256 MiB (tonic's own default is
    /// 4 MiB, which a single batch of logits easily exceeds).
    pub max_message_bytes: usize,
    /// Deadline of each unary call (sent to the server as `grpc-timeout` and enforced locally).
    /// Streams are long-lived and get none. Default: no deadline.
    pub timeout: Option<Duration>,
    /// Limit on establishing the connection. Default 10 s.
    pub connect_timeout: Option<Duration>,
    /// Let HTTP/2 grow its flow-control windows from measured bandwidth-delay product instead
    /// of using the fixed windows below. Default `false`.
    pub adaptive_window: bool,
    /// Initial HTTP/2 stream window, in bytes (when `adaptive_window` is off). Default 16 MiB,
    /// so a multi-MiB request or response is not throttled to 64 KiB round trips.
    pub stream_window_bytes: u32,
    /// Initial HTTP/2 connection window, in bytes (when `adaptive_window` is off). Default
    /// 64 MiB, room for several concurrent streams of `stream_window_bytes`.
    pub connection_window_bytes: u32,
    /// How calls answered UNAVAILABLE are retried.
    pub retry: RetryPolicy,
    /// [`Client::connect_many`]: how often DNS names are resolved again, so replicas that
    /// come and go behind one name are picked up and dropped. Default 30 s.
    pub resolve_interval: Duration,
    /// TLS, and mutual TLS with a client certificate. Default: plaintext.
    pub tls: Option<ClientTls>,
    /// A bearer token sent with every call (`authorization: Bearer TOKEN`). Default: none.
    pub token: Option<Token>,
}

/// How a client speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientTls {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain (PEM), for mutual TLS, with `key`.
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The name the server's certificate must have. Default: the endpoint's host.
    pub domain: Option<String>,
}

impl ClientTls {
    /// tonic's configuration, from the files.
    fn config(&self, default_domain: Option<&str>) -> Result<ClientTlsConfig, ClientError> {
        let read = |what: &str, path: &Path| {
            std::fs::read(path)
                .map_err(|e| ClientError::Tls(format!("{what} {}: {e}", path.display())))
        };
        let mut config =
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read("CA", &self.ca)?));
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read("certificate", cert)?,
                    read("key", key)?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ClientError::Tls(
                    "a client certificate needs its key, and a key its certificate".into(),
                ));
            }
        }
        if let Some(domain) = self.domain.as_deref().or(default_domain) {
            config = config.domain_name(domain);
        }
        Ok(config)
    }
}

/// A bearer token; its `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

impl Token {
    /// The first token of a token file (one per line, `#` starts a comment), as xentd reads
    /// it.
    pub fn from_file(path: &Path) -> Result<Token, ClientError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Tls(format!("token file {}: {e}", path.display())))?;
        crate::server::auth::tokens_in(&text)
            .next()
            .map(|t| Token(t.to_owned()))
            .ok_or_else(|| {
                ClientError::Tls(format!("token file {}: holds no token", path.display()))
            })
    }

    fn header(&self) -> Result<MetadataValue<Ascii>, ClientError> {
        format!("Bearer {}", self.0)
            .parse()
            .map_err(|_| ClientError::Tls("the token is not printable ASCII".into()))
    }
}

/// Retries of calls answered `UNAVAILABLE`: exponential backoff with full jitter (each wait
/// is uniform in `[0, backoff]`, the backoff doubling from `initial_backoff` up to
/// `max_backoff`), so many clients of a restarting server do not return in lockstep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries. Default 4.
    pub max_attempts: u32,
    /// Backoff before the first retry. Default 50 ms.
    pub initial_backoff: Duration,
    /// Largest backoff. Default 2 s.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// The backoff before retry number `retry` (1 for the first), before jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2f64.powi(retry.saturating_sub(1).min(30) as i32);
        self.initial_backoff.mul_f64(factor).min(self.max_backoff)
    }
}

/// A uniform draw in `[0, 1)` from the clock and a counter: jitter needs spread, not quality.
fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    let mut z = nanos ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_message_bytes: 256 * MIB,
            timeout: None,
            connect_timeout: Some(Duration::from_secs(10)),
            adaptive_window: false,
            stream_window_bytes: 16 * MIB as u32,
            connection_window_bytes: 64 * MIB as u32,
            retry: RetryPolicy::default(),
            resolve_interval: Duration::from_secs(30),
            tls: None,
            token: None,
        }
    }
}

/// What went wrong with a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The endpoint is not a valid URI or the connection could not be established.
    #[error("cannot connect to {endpoint}: {}", error_chain(.source))]
    Connect {
        /// The endpoint as given to [`Client::connect`] (with `http://` added when missing).
        endpoint: String,
        /// The transport's error.
        #[source]
        source: tonic::transport::Error,
    },
    /// A TLS file or the token file cannot be read or used.
    #[error("{0}")]
    Tls(String),
    /// [`Client::connect_many`] got no endpoint, or a name that does not resolve.
    #[error("cannot resolve {0}")]
    Resolve(String),
    /// The server (or the transport) answered with a gRPC error status.
    #[error("{}", status_line(.0))]
    Status(#[from] Status),
    /// The server's answer does not match the request (wrong dtype, shape, missing output).
    #[error("malformed response: {0}")]
    Response(String),
}

impl ClientError {
    /// The gRPC status code, for [`ClientError::Status`].
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

pub use crate::api::convert::stream_error_status;

/// The canonical upper-case name of a gRPC code, e.g. `INVALID_ARGUMENT`.
pub use crate::metrics::code_label as code_name;

/// `CODE: message`, the message falling back to the code's description when empty.
fn status_line(s: &Status) -> String {
    let message = if s.message().is_empty() {
        s.code().description()
    } else {
        s.message()
    };
    format!("{}: {}", code_name(s.code()), message)
}

/// An error and its sources joined by `": "` (tonic's transport errors say little on their own).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// Adds `http://` to a bare `host:port`.
fn endpoint_uri(endpoint: &str, tls: bool) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

/// A connection to `xentd`: the Xent service and the standard gRPC health service.
///
/// Cloning is cheap and shares the underlying HTTP/2 connection; clone it to issue calls
/// concurrently from several tasks.
#[derive(Clone, Debug)]
pub struct Client {
    xent: XentClient<Channel>,
    health: HealthClient<Channel>,
    timeout: Option<Duration>,
    retry: RetryPolicy,
    token: Option<MetadataValue<Ascii>>,
}

impl Client {
    /// Connects with the default [`ClientConfig`]. `endpoint` is `host:port` (plain-text HTTP/2
    /// is assumed) or a URI such as `http://127.0.0.1:50051`.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, ClientConfig::default()).await
    }

    /// Connects with an explicit configuration.
    pub async fn connect_with(
        endpoint: impl Into<String>,
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let uri = endpoint_uri(&endpoint.into(), config.tls.is_some());
        let connect_error = |source| ClientError::Connect {
            endpoint: uri.clone(),
            source,
        };
        let tls = match &config.tls {
            Some(t) => Some(t.config(None)?),
            None => None,
        };
        let ep = tuned_endpoint(&uri, &config, tls).map_err(connect_error)?;
        let channel = ep.connect().await.map_err(connect_error)?;
        Self::with_token(channel, &config)
    }

    /// Connects to several servers and balances calls over them. Each entry is `host:port`
    /// (or `http://host:port`); a host name is resolved now and again every
    /// `config.resolve_interval`, and every address it resolves to becomes an endpoint, so
    /// one headless-Service name reaches every replica. Connections are made lazily; an
    /// entry that does not resolve at first is an error, as is an empty list.
    pub async fn connect_many(
        endpoints: &[impl AsRef<str>],
        config: ClientConfig,
    ) -> Result<Self, ClientError> {
        let targets: Vec<String> = endpoints
            .iter()
            .map(|e| {
                let uri = endpoint_uri(e.as_ref(), false);
                uri.split_once("://")
                    .map(|(_, rest)| rest.trim_end_matches('/').to_string())
                    .unwrap_or(uri)
            })
            .collect();
        if targets.is_empty() {
            return Err(ClientError::Resolve("an empty list of endpoints".into()));
        }
        let mut first = HashSet::new();
        for t in &targets {
            let found = resolve(t)
                .await
                .map_err(|e| ClientError::Resolve(format!("{t}: {e}")))?;
            first.extend(found);
        }
        let (channel, changes) = Channel::balance_channel::<SocketAddr>(64);
        let mut known = HashSet::new();
        // The addresses are resolved: the certificate is checked against the name given.
        let host = targets[0]
            .rsplit_once(':')
            .map_or(targets[0].as_str(), |(h, _)| h);
        let tls = match &config.tls {
            Some(t) => Some(t.config(Some(host))?),
            None => None,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        for addr in first {
            let ep = tuned_endpoint(&format!("{scheme}://{addr}"), &config, tls.clone()).map_err(
                |source| ClientError::Connect {
                    endpoint: addr.to_string(),
                    source,
                },
            )?;
            if changes.send(Change::Insert(addr, ep)).await.is_ok() {
                known.insert(addr);
            }
        }
        tokio::spawn(re_resolve(targets, known, changes, config.clone(), tls));
        Self::with_token(channel, &config)
    }

    /// [`Client::from_channel`], with the config's token.
    fn with_token(channel: Channel, config: &ClientConfig) -> Result<Self, ClientError> {
        let mut client = Self::from_channel(channel, config);
        client.token = config.token.as_ref().map(Token::header).transpose()?;
        Ok(client)
    }

    /// Wraps an existing channel (the config's connection settings and token are not used,
    /// its message limits and timeout are).
    pub fn from_channel(channel: Channel, config: &ClientConfig) -> Self {
        let xent = XentClient::new(channel.clone())
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        let health = HealthClient::new(channel)
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes);
        Client {
            xent,
            health,
            timeout: config.timeout,
            retry: config.retry.clone(),
            token: None,
        }
    }

    /// A request carrying the token and the per-call deadline, if configured.
    fn request<M>(&self, message: M) -> tonic::Request<M> {
        let mut r = self.authorized(message);
        if let Some(t) = self.timeout {
            r.set_timeout(t);
        }
        r
    }

    /// A request carrying the token, if one is configured.
    fn authorized<M>(&self, message: M) -> tonic::Request<M> {
        let mut r = tonic::Request::new(message);
        if let Some(token) = &self.token {
            r.metadata_mut().insert("authorization", token.clone());
        }
        r
    }

    /// tonic reports a local deadline as `CANCELLED: Timeout expired`; gRPC calls it
    /// `DEADLINE_EXCEEDED`, which is what callers match on.
    fn deadline(&self, status: Status) -> Status {
        match self.timeout {
            Some(t)
                if status.code() == Code::Cancelled
                    && status.message() == tonic::TimeoutExpired(()).to_string() =>
            {
                Status::deadline_exceeded(format!("no answer within the timeout of {t:?}"))
            }
            _ => status,
        }
    }

    /// Evaluates one request and decodes the outputs into arrays of the logits' element type.
    pub async fn evaluate<T: FloatElement>(
        &mut self,
        request: EvalRequest<T>,
    ) -> Result<EvalResult<T>, ClientError> {
        let response = self.evaluate_raw(request.to_proto()).await?;
        request.decode_response(response)
    }

    /// Sends a protobuf request as is and returns the protobuf response, retrying
    /// UNAVAILABLE answers as the [`RetryPolicy`] says, within the deadline.
    pub async fn evaluate_raw(
        &mut self,
        request: proto::EvaluateRequest,
    ) -> Result<proto::EvaluateResponse, Status> {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let mut call = self.authorized(request.clone());
            if let Some(t) = self.timeout {
                // Every attempt gets what is left of the call's deadline.
                match t.checked_sub(started.elapsed()) {
                    Some(left) if !left.is_zero() => call.set_timeout(left),
                    _ => {
                        return Err(Status::deadline_exceeded(format!(
                            "no answer within the timeout of {t:?}"
                        )));
                    }
                }
            }
            let status = match self.xent.evaluate(call).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => self.deadline(status),
            };
            if status.code() != Code::Unavailable || attempt >= self.retry.max_attempts {
                return Err(status);
            }
            let wait = self.retry.backoff(attempt).mul_f64(jitter());
            if let Some(t) = self.timeout
                && started.elapsed() + wait >= t
            {
                return Err(status);
            }
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Opens an `EvaluateStream`: requests are evaluated concurrently and answered in the order
    /// sent, each answer carrying its request's id; an invalid request is answered in-stream
    /// and the stream goes on. No deadline is set on streams.
    pub async fn evaluate_stream<S>(
        &mut self,
        requests: S,
    ) -> Result<Streaming<proto::EvaluateStreamResponse>, Status>
    where
        S: Stream<Item = proto::EvaluateRequest> + Send + 'static,
    {
        let requests = self.authorized(requests);
        Ok(self.xent.evaluate_stream(requests).await?.into_inner())
    }

    /// Asks the gRPC health service about `service` (`""` for the server as a whole).
    pub async fn health(&mut self, service: &str) -> Result<ServingStatus, ClientError> {
        let request = self.request(HealthCheckRequest {
            service: service.to_string(),
        });
        let status = match self.health.check(request).await {
            Ok(response) => response.into_inner().status,
            Err(status) => return Err(self.deadline(status).into()),
        };
        ServingStatus::try_from(status)
            .map_err(|_| ClientError::Response(format!("unknown serving status {status}")))
    }
}

/// An endpoint with the connection settings of `config`.
fn tuned_endpoint(
    uri: &str,
    config: &ClientConfig,
    tls: Option<ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let mut ep = Endpoint::from_shared(uri.to_string())?.tcp_nodelay(true);
    if let Some(tls) = tls {
        ep = ep.tls_config(tls)?;
    }
    if let Some(t) = config.connect_timeout {
        ep = ep.connect_timeout(t);
    }
    Ok(if config.adaptive_window {
        ep.http2_adaptive_window(true)
    } else {
        ep.initial_stream_window_size(config.stream_window_bytes)
            .initial_connection_window_size(config.connection_window_bytes)
    })
}

/// The addresses `host:port` stands for (an IP literal stands for itself).
async fn resolve(target: &str) -> std::io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host(target).await?.collect())
}

/// Resolves `targets` every `config.resolve_interval` and tells the balancer which addresses
/// appeared and which went away. A failed lookup keeps that name's last answer (a DNS hiccup
/// must not empty the pool). Ends when the client, and with it the balancer, is dropped.
async fn re_resolve(
    targets: Vec<String>,
    mut known: HashSet<SocketAddr>,
    changes: tokio::sync::mpsc::Sender<Change<SocketAddr, Endpoint>>,
    config: ClientConfig,
    tls: Option<ClientTlsConfig>,
) {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut last: Vec<Option<Vec<SocketAddr>>> = vec![None; targets.len()];
    loop {
        tokio::time::sleep(config.resolve_interval).await;
        if changes.is_closed() {
            return;
        }
        let mut now = HashSet::new();
        for (t, previous) in targets.iter().zip(last.iter_mut()) {
            match resolve(t).await {
                Ok(found) => {
                    now.extend(found.iter().copied());
                    *previous = Some(found);
                }
                Err(e) => {
                    tracing::warn!(target = %t, error = %e, "re-resolving failed; keeping the last addresses");
                    match previous {
                        Some(found) => now.extend(found.iter().copied()),
                        None => now.extend(known.iter().copied()),
                    }
                }
            }
        }
        for gone in known.difference(&now).copied().collect::<Vec<_>>() {
            if changes.send(Change::Remove(gone)).await.is_err() {
                return;
            }
            known.remove(&gone);
        }
        for new in now.difference(&known).copied().collect::<Vec<_>>() {
            let Ok(ep) = tuned_endpoint(&format!("{scheme}://{new}"), &config, tls.clone()) else {
                continue;
            };
            if changes.send(Change::Insert(new, ep)).await.is_err() {
                return;
            }
            known.insert(new);
        }
    }
}

/// A float element type logits, dense labels and outputs can have: [`half::f16`],
/// [`half::bf16`], `f32` or `f64`.
pub trait FloatElement: WireElement + Element {}

impl<T: WireElement + Element> FloatElement for T {}

/// An integer element type class ids can have: `i32` or `i64`.
pub trait ClassId: WireElement + private::Sealed {}

impl ClassId for i32 {}
impl ClassId for i64 {}

mod private {
    /// Keeps [`super::ClassId`] to the integer types the API accepts.
    pub trait Sealed {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
}

/// A tensor for the wire: row-major elements of any view, as raw little-endian bytes.
fn tensor<T: WireElement, D: Dimension>(a: ArrayView<'_, T, D>) -> proto::Tensor {
    let data = match a.as_slice() {
        Some(s) => s.to_vec(),
        None => a.iter().copied().collect(),
    };
    encode(a.shape(), data, true)
}

/// One evaluation, built from ndarray views; `T` is the logits' element type (and the dense
/// labels' and the outputs').
///
/// The tensors are encoded when the request is built, so the views need not outlive it.
#[derive(Clone, Debug)]
pub struct EvalRequest<T> {
    kind: LossKind,
    logits: proto::Tensor,
    labels: proto::Tensor,
    logits_shape: Vec<usize>,
    labels_shape: Vec<usize>,
    options: Options,
    wanted: Wanted,
    request_id: String,
    class_weights: Option<proto::Tensor>,
    sample_weights: Option<proto::Tensor>,
    upstream: Option<proto::Tensor>,
    _elem: PhantomData<fn() -> T>,
}

impl<T: FloatElement> EvalRequest<T> {
    fn new(kind: LossKind, logits: proto::Tensor, labels: proto::Tensor) -> Self {
        let shape = |t: &proto::Tensor| t.shape.iter().map(|&d| d as usize).collect();
        EvalRequest {
            kind,
            logits_shape: shape(&logits),
            labels_shape: shape(&labels),
            logits,
            labels,
            options: Options::default(),
            wanted: Wanted::default(),
            request_id: String::new(),
            class_weights: None,
            sample_weights: None,
            upstream: None,
            _elem: PhantomData,
        }
    }

    /// `softmax_cross_entropy`: labels are rows of the logits' shape and element type.
    pub fn dense<D1: Dimension, D2: Dimension>(
        logits: ArrayView<'_, T, D1>,
        labels: ArrayView<'_, T, D2>,
    ) -> Self {
        Self::new(LossKind::Dense, tensor(logits), tensor(labels))
    }

    /// `sparse_softmax_cross_entropy`: labels are class ids (`i32` or `i64`), shaped as the
    /// logits without the class axis.
    pub fn sparse<I: ClassId, D1: Dimension, D2: Dimension>(
        logits: ArrayView<'_, T, D1>,
        class_ids: ArrayView<'_, I, D2>,
    ) -> Self {
        Self::new(LossKind::Sparse, tensor(logits), tensor(class_ids))
    }

    /// Sets every scalar option (axis, label smoothing, ignore index, from_logits, z-loss,
    /// reduction) at once.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// Sets the reduction, keeping the other options.
    pub fn reduction(mut self, reduction: Reduction) -> Self {
        self.options.reduction = reduction;
        self
    }

    /// Sets the class axis (negative counts from the end), keeping the other options.
    pub fn axis(mut self, axis: i64) -> Self {
        self.options.axis = axis;
        self
    }

    /// Per-class weights, shape `[C]`, any float element type.
    pub fn class_weights<W: FloatElement, D: Dimension>(mut self, w: ArrayView<'_, W, D>) -> Self {
        self.class_weights = Some(tensor(w));
        self
    }

    /// Per-example weights broadcastable (numpy rules) to the loss shape, any float element
    /// type; a scalar is a 0-dimensional array.
    pub fn sample_weights<W: FloatElement, D: Dimension>(mut self, w: ArrayView<'_, W, D>) -> Self {
        self.sample_weights = Some(tensor(w));
        self
    }

    /// Upstream gradient multiplied into the returned gradients, shaped as the returned loss
    /// (0-dimensional for a reduced loss), any float element type.
    pub fn upstream<W: FloatElement, D: Dimension>(mut self, g: ArrayView<'_, W, D>) -> Self {
        self.upstream = Some(tensor(g));
        self
    }

    /// Which outputs to return. Default: loss and gradient w.r.t. the logits.
    pub fn wanted(mut self, wanted: Wanted) -> Self {
        self.wanted = wanted;
        self
    }

    /// The caller's id, echoed in the response (at most 128 bytes).
    pub fn request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }

    /// The loss kind.
    pub fn kind(&self) -> LossKind {
        self.kind
    }

    /// The logits' shape.
    pub fn logits_shape(&self) -> &[usize] {
        &self.logits_shape
    }

    /// The protobuf message. Cheap: tensor bytes are reference-counted, not copied.
    pub fn to_proto(&self) -> proto::EvaluateRequest {
        let mut req = proto::EvaluateRequest {
            request_id: self.request_id.clone(),
            loss: proto::LossKind::from(self.kind) as i32,
            logits: Some(self.logits.clone()),
            labels: Some(self.labels.clone()),
            class_weights: self.class_weights.clone(),
            sample_weights: self.sample_weights.clone(),
            upstream: self.upstream.clone(),
            outputs: Output::ALL
                .into_iter()
                .filter(|&o| self.wanted.has(o))
                .map(|o| proto::Output::from(o) as i32)
                .collect(),
            response_encoding: convert::encoding(true) as i32,
            ..Default::default()
        };
        // Every option is sent (ignore_index when set), so the server's defaults never decide.
        for name in OptionName::ALL {
            if let Some(v) = name.get(&self.options) {
                convert::set_option(&mut req, name, v).expect("an option's own kind");
            }
        }
        req
    }

    /// The shape the returned loss must have, when the axis is valid for the logits.
    fn loss_shape(&self) -> Option<Vec<usize>> {
        if self.options.reduction != Reduction::None {
            return Some(Vec::new());
        }
        let rank = self.logits_shape.len() as i64;
        let axis = self.options.axis;
        if !(-rank..rank).contains(&axis) {
            return None;
        }
        let mut shape = self.logits_shape.clone();
        shape.remove(axis.rem_euclid(rank) as usize);
        Some(shape)
    }

    /// Decodes a response to this request, checking each tensor's dtype and shape and that
    /// every output asked for is present.
    pub fn decode_response(
        &self,
        response: proto::EvaluateResponse,
    ) -> Result<EvalResult<T>, ClientError> {
        // An empty output list means the server's default: loss and grad_logits.
        let nothing = !self.wanted.loss && !self.wanted.grad_logits && !self.wanted.grad_labels;
        let wanted = if nothing {
            Wanted::default()
        } else {
            self.wanted
        };
        let loss_shape = self.loss_shape();
        Ok(EvalResult {
            loss: output("loss", response.loss, wanted.loss, loss_shape.as_deref())?,
            grad_logits: output(
                "grad_logits",
                response.grad_logits,
                wanted.grad_logits,
                Some(&self.logits_shape),
            )?,
            grad_labels: output(
                "grad_labels",
                response.grad_labels,
                wanted.grad_labels,
                Some(&self.labels_shape),
            )?,
            health: response.health.map_or_else(Health::default, Health::from),
            request_id: response.request_id,
        })
    }
}

/// Decodes one output tensor of the response into an array of `T`.
fn output<T: FloatElement>(
    name: &str,
    tensor: Option<proto::Tensor>,
    wanted: bool,
    shape: Option<&[usize]>,
) -> Result<Option<ArrayD<T>>, ClientError> {
    let Some(tensor) = tensor else {
        return if wanted {
            Err(ClientError::Response(format!(
                "{name} was asked for but is missing"
            )))
        } else {
            Ok(None)
        };
    };
    let any = decode(Some(tensor)).map_err(|e| ClientError::Response(format!("{name} {e}")))?;
    let got = any.dtype();
    let want = <T as Element>::DTYPE;
    let shaped = T::take(any)
        .ok_or_else(|| ClientError::Response(format!("{name} has dtype {got}, expected {want}")))?;
    if let Some(expected) = shape
        && shaped.shape != expected
    {
        return Err(ClientError::Response(format!(
            "{name} has shape {:?}, expected {expected:?}",
            shaped.shape
        )));
    }
    let array = ArrayD::from_shape_vec(IxDyn(&shaped.shape), shaped.data.slice().into_owned())
        .map_err(|e| ClientError::Response(format!("{name}: {e}")))?;
    Ok(Some(array))
}

/// The outputs of one evaluation, in the logits' element type.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalResult<T> {
    /// The request's id, echoed.
    pub request_id: String,
    /// The loss: per-example (the logits' shape without the class axis) for reduction `none`,
    /// 0-dimensional otherwise.
    pub loss: Option<ArrayD<T>>,
    /// Gradient w.r.t. the logits, shaped as the logits.
    pub grad_logits: Option<ArrayD<T>>,
    /// Gradient w.r.t. dense labels, shaped as the labels.
    pub grad_labels: Option<ArrayD<T>>,
    /// Non-finite inputs, unnormalised label rows and non-finite losses the server saw
    /// (all 0 from a server that does not report them).
    pub health: Health,
}

#[cfg(test)]
mod tests {
    use half::bf16;
    use ndarray::{Array2, array};

    use super::*;
    use crate::api::tensor::AnyTensor;

    fn floats(t: &proto::Tensor) -> Vec<f64> {
        decode(Some(t.clone())).unwrap().floats_to_f64().unwrap()
    }

    #[test]
    fn dense_request_carries_tensors_and_options() {
        let logits = array![[1.0f32, 2.0, 0.5], [0.2, 0.8, 1.5]];
        let labels = array![[0.0f32, 1.0, 0.0], [0.0, 0.0, 1.0]];
        let options = Options {
            axis: 1,
            label_smoothing: 0.1,
            ignore_index: None,
            from_logits: false,
            z_loss: 1e-4,
            reduction: Reduction::SumByNonzeroWeights,
        };
        let req = EvalRequest::dense(logits.view(), labels.view())
            .options(options)
            .class_weights(array![1.0f64, 2.0, 3.0].view())
            .sample_weights(ndarray::arr0(0.5f64).view())
            .upstream(ndarray::arr0(2.0f32).view())
            .wanted(Wanted {
                loss: true,
                grad_logits: false,
                grad_labels: true,
            })
            .request_id("r1");
        let p = req.to_proto();
        assert_eq!(p.request_id, "r1");
        assert_eq!(p.loss, proto::LossKind::SoftmaxCrossEntropy as i32);
        let l = p.logits.as_ref().unwrap();
        assert_eq!(l.dtype, proto::DType::DtypeFloat32 as i32);
        assert_eq!(l.shape, vec![2, 3]);
        assert_eq!(l.raw_data.len(), 24, "raw bytes by default");
        let sent: Vec<f64> = logits.iter().map(|&v| v as f64).collect();
        assert_eq!(floats(l), sent);
        assert_eq!(floats(p.labels.as_ref().unwrap())[1], 1.0);
        assert_eq!(p.axis, Some(1));
        assert_eq!(p.label_smoothing, 0.1);
        assert_eq!(p.ignore_index, None);
        assert_eq!(p.from_logits, Some(false));
        assert_eq!(p.z_loss, 1e-4);
        assert_eq!(p.reduction, proto::Reduction::SumByNonzeroWeights as i32);
        assert_eq!(
            floats(p.class_weights.as_ref().unwrap()),
            vec![1.0, 2.0, 3.0]
        );
        let sw = p.sample_weights.as_ref().unwrap();
        assert!(sw.shape.is_empty());
        assert_eq!(sw.dtype, proto::DType::DtypeFloat64 as i32);
        assert_eq!(
            p.upstream.as_ref().unwrap().dtype,
            proto::DType::DtypeFloat32 as i32
        );
        assert_eq!(
            p.outputs,
            vec![proto::Output::Loss as i32, proto::Output::GradLabels as i32]
        );
        assert_eq!(p.response_encoding, proto::Encoding::Raw as i32);
    }

    #[test]
    fn sparse_request_and_non_standard_layouts() {
        // A transposed view is sent in logical row-major order.
        let stored = array![[1.0f64, 0.2], [2.0, 0.8], [0.5, 1.5]];
        let ids = array![1i32, 2];
        let req = EvalRequest::sparse(stored.t(), ids.view()).reduction(Reduction::Mean);
        let p = req.to_proto();
        assert_eq!(p.loss, proto::LossKind::SparseSoftmaxCrossEntropy as i32);
        assert_eq!(p.logits.as_ref().unwrap().shape, vec![2, 3]);
        assert_eq!(
            floats(p.logits.as_ref().unwrap()),
            vec![1.0, 2.0, 0.5, 0.2, 0.8, 1.5]
        );
        let AnyTensor::I32(labels) = decode(p.labels).unwrap() else {
            panic!("int32 labels")
        };
        assert_eq!(&*labels.data.slice(), &[1, 2]);
        assert_eq!(p.axis, Some(-1));
        assert_eq!(p.from_logits, Some(true));
        assert_eq!(p.reduction, proto::Reduction::Mean as i32);
        assert_eq!(
            p.outputs,
            vec![proto::Output::Loss as i32, proto::Output::GradLogits as i32]
        );
        let req64 = EvalRequest::sparse(stored.t(), array![0i64, 1].view());
        assert_eq!(
            req64.to_proto().labels.unwrap().dtype,
            proto::DType::DtypeInt64 as i32
        );
    }

    fn dense_request() -> EvalRequest<f32> {
        let x = Array2::<f32>::zeros((2, 3));
        EvalRequest::dense(x.view(), x.view())
    }

    #[test]
    fn responses_decode_to_arrays() {
        let req = dense_request();
        let response = proto::EvaluateResponse {
            request_id: "id".into(),
            loss: Some(encode(&[2], vec![0.5f32, 0.25], true)),
            grad_logits: Some(encode(
                &[2, 3],
                vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0],
                false,
            )),
            grad_labels: None,
            health: Some(proto::NumericalHealth {
                nonfinite_inputs: 3,
                ..Default::default()
            }),
        };
        let out = req.decode_response(response).unwrap();
        assert_eq!(out.health.nonfinite_inputs, 3);
        assert_eq!(out.request_id, "id");
        assert_eq!(out.loss.unwrap(), array![0.5f32, 0.25].into_dyn());
        assert_eq!(
            out.grad_logits.unwrap(),
            array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]].into_dyn()
        );
        assert_eq!(out.grad_labels, None);

        // A reduced loss is 0-dimensional.
        let req = dense_request().reduction(Reduction::Mean);
        let response = proto::EvaluateResponse {
            loss: Some(encode(&[], vec![0.75f32], true)),
            grad_logits: Some(encode(&[2, 3], vec![0.0f32; 6], true)),
            ..Default::default()
        };
        let out = req.decode_response(response).unwrap();
        assert_eq!(out.loss.unwrap(), ndarray::arr0(0.75f32).into_dyn());
    }

    #[test]
    fn half_outputs_decode() {
        let x = Array2::<bf16>::zeros((1, 4));
        let req = EvalRequest::sparse(x.view(), array![3i64].view()).wanted(Wanted {
            loss: true,
            grad_logits: false,
            grad_labels: false,
        });
        let response = proto::EvaluateResponse {
            loss: Some(encode(&[1], vec![bf16::from_f32(1.5)], true)),
            ..Default::default()
        };
        let out = req.decode_response(response).unwrap();
        assert_eq!(out.loss.unwrap()[[0]], bf16::from_f32(1.5));
    }

    #[test]
    fn malformed_responses_are_errors() {
        let err = |response| {
            dense_request()
                .decode_response(response)
                .unwrap_err()
                .to_string()
        };
        let grad = || Some(encode(&[2, 3], vec![0.0f32; 6], true));
        // Wrong dtype.
        let e = err(proto::EvaluateResponse {
            loss: Some(encode(&[2], vec![0.5f64, 0.25], true)),
            grad_logits: grad(),
            ..Default::default()
        });
        assert_eq!(
            e,
            "malformed response: loss has dtype float64, expected float32"
        );
        // Wrong shape.
        let e = err(proto::EvaluateResponse {
            loss: Some(encode(&[1, 2], vec![0.5f32, 0.25], true)),
            grad_logits: grad(),
            ..Default::default()
        });
        assert_eq!(e, "malformed response: loss has shape [1, 2], expected [2]");
        // Missing output.
        let e = err(proto::EvaluateResponse {
            grad_logits: grad(),
            ..Default::default()
        });
        assert_eq!(e, "malformed response: loss was asked for but is missing");
        // Data that does not fit the shape.
        let mut bad = encode(&[2], vec![0.5f32, 0.25], true);
        bad.shape = vec![3];
        let e = err(proto::EvaluateResponse {
            loss: Some(bad),
            grad_logits: grad(),
            ..Default::default()
        });
        assert!(e.starts_with("malformed response: loss has 8 bytes"), "{e}");
    }

    #[test]
    fn errors_display_code_and_message() {
        let e = ClientError::from(Status::invalid_argument("labels has shape [2, 4]"));
        assert_eq!(e.to_string(), "INVALID_ARGUMENT: labels has shape [2, 4]");
        assert_eq!(e.code(), Some(Code::InvalidArgument));
        let e = ClientError::from(Status::new(Code::Unavailable, ""));
        assert_eq!(
            e.to_string(),
            "UNAVAILABLE: The service is currently unavailable"
        );
    }

    #[test]
    fn endpoints_get_a_scheme() {
        assert_eq!(
            endpoint_uri("127.0.0.1:50051", false),
            "http://127.0.0.1:50051"
        );
        assert_eq!(
            endpoint_uri("127.0.0.1:50051", true),
            "https://127.0.0.1:50051"
        );
        assert_eq!(endpoint_uri("http://h:1", true), "http://h:1");
        assert_eq!(endpoint_uri("https://h:1", false), "https://h:1");
    }

    #[tokio::test]
    async fn connect_failure_is_a_connect_error() {
        let e = Client::connect("not a uri").await.unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        // Port 1 on loopback refuses connections.
        let config = ClientConfig {
            connect_timeout: Some(Duration::from_secs(2)),
            ..ClientConfig::default()
        };
        let e = Client::connect_with("127.0.0.1:1", config)
            .await
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to http://127.0.0.1:1: "),
            "{e}"
        );
    }
}
