//! `xent bench`: the load generator.
//!
//! A load test should answer three questions at once: how much a deployment sustains, how
//! long callers wait at that load, and whether the answers are still right. This module
//! answers all three:
//!
//! - **Closed loop** (`--concurrency N`): N callers, each sending its next request as soon as
//!   the previous one is answered. Measures capacity; latency here is service time.
//! - **Open loop** (`--rate R`): requests are *scheduled* R per second whatever the server
//!   does, and each latency is measured from the request's intended send time, not from when
//!   it was actually sent. A stalled server therefore shows up in the percentiles instead of
//!   silently slowing the generator down ("coordinated omission"). In-flight calls are
//!   bounded by `--max-in-flight`; when the bound is hit the schedule slips, and the slip is
//!   counted in the latencies.
//! - Latencies go into an HDR histogram (3 significant digits); errors are counted by gRPC
//!   status code; `--verify F` recomputes a deterministic fraction F of the answers with the
//!   float64 reference oracle ([`crate::kernel::reference`]) and counts those outside the
//!   contract's tolerances.
//!
//! Requests are built once, before the clock starts, and reused: a protobuf clone shares the
//! tensor bytes (`bytes::Bytes`), so the generator measures the server, not its own copies.
//! Several addresses are used round-robin, one HTTP/2 connection each. `--protocol oip` sends
//! the same requests through the Open Inference Protocol's `ModelInfer` instead of xent.v1's
//! `Evaluate`, so the two front ends can be compared on one server.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use ndarray::{Array1, Array2};
use serde::Serialize;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::api::oip;
use crate::api::tensor::{AnyTensor, decode};
use crate::cli::{OptionFlags, float_dtype, named};
use crate::client::{ClassId, EvalRequest, FloatElement, code_name};
use crate::dtype::{DType, Element};
use crate::eval::{LossKind, Named, Options, Output, Wanted};
use crate::kernel::reference::{self, RefLabels, RefOutput, RefProblem};
use crate::proto;
use crate::proto::inference::ModelInferRequest;
use crate::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use crate::proto::xent_client::XentClient;
use crate::verify::{max_error, tolerance};

/// Which API the load goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// `xent.v1.Xent/Evaluate`.
    Xent,
    /// The Open Inference Protocol's `inference.GRPCInferenceService/ModelInfer`, with raw
    /// input contents (as tritonclient sends them).
    Oip,
}

/// The flags of `xent bench` (the addresses and the per-call timeout are the CLI's global
/// `--address` and `--timeout`).
#[derive(Args, Clone, Debug)]
pub struct BenchArgs {
    /// Closed loop: this many callers, each sending as soon as its previous call is answered.
    /// The default mode (with 8 callers) when --rate is not given.
    #[arg(long, value_name = "N", conflicts_with = "rate")]
    pub concurrency: Option<usize>,

    /// Open loop: send this many requests per second on a fixed schedule; latency is measured
    /// from each request's intended send time.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,

    /// Open loop: most calls in flight at once; beyond it the schedule slips (and the slip is
    /// counted in the latencies).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_in_flight: usize,

    /// How long to send, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub duration: f64,

    /// Rows (examples) per request.
    #[arg(long, default_value_t = 64)]
    pub rows: usize,

    /// Classes per row.
    #[arg(long, default_value_t = 1000)]
    pub classes: usize,

    /// Element type of the logits on the wire.
    #[arg(long, value_parser = float_dtype(), default_value = "float32")]
    pub dtype: DType,

    /// Which loss: softmax_cross_entropy sends one-hot label rows, sparse_softmax_cross_entropy
    /// int64 class ids.
    #[arg(long, value_parser = named::<LossKind>(), default_value = "sparse_softmax_cross_entropy")]
    pub loss: LossKind,

    /// The scalar options.
    #[command(flatten)]
    pub options: OptionFlags,

    /// Outputs to ask for, comma-separated. Default: loss,grad_logits.
    #[arg(long, value_parser = named::<Output>(), value_delimiter = ',', value_name = "LIST")]
    pub outputs: Vec<Output>,

    /// Which API to load.
    #[arg(long, value_enum, default_value = "xent")]
    pub protocol: Protocol,

    /// Recompute this fraction of the answers (0 to 1, chosen deterministically) with the
    /// float64 reference and count those outside the contract's tolerances.
    #[arg(long, value_name = "F", default_value_t = 0.0)]
    pub verify: f64,

    /// Seed of the generated logits and labels.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Print the report as one JSON object on stdout instead of text.
    #[arg(long)]
    pub json: bool,

    /// Also write a latency-by-percentile chart to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Everything a run needs, checked.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    /// Endpoints, used round-robin (`host:port` or URIs).
    pub addresses: Vec<String>,
    /// Per-call deadline.
    pub timeout: Option<Duration>,
    /// The flags.
    pub args: BenchArgs,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

/// The result of a run, printed as text or JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// API loaded.
    pub protocol: Protocol,
    /// Endpoints.
    pub addresses: Vec<String>,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Closed loop: callers.
    pub concurrency: Option<usize>,
    /// Open loop: scheduled requests per second.
    pub rate: Option<f64>,
    /// Loss name.
    pub loss: &'static str,
    /// Wire dtype.
    pub dtype: &'static str,
    /// Rows per request.
    pub rows: usize,
    /// Classes per row.
    pub classes: usize,
    /// Bytes of logits per request.
    pub logits_bytes: usize,
    /// Seconds from the first send to the last answer.
    pub elapsed_s: f64,
    /// Calls made; equals `ok` plus the sum of `errors`.
    pub requests: u64,
    /// Calls answered with OK.
    pub ok: u64,
    /// Failed calls by gRPC status code name (e.g. `UNAVAILABLE`).
    pub errors: BTreeMap<String, u64>,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Rows of successful requests per second.
    pub rows_per_s: f64,
    /// Gigabytes (1e9) of logits of successful requests per second.
    pub logits_gb_per_s: f64,
    /// Latency of successful calls, in milliseconds.
    pub latency_ms: Latency,
    /// Checking of answers against the float64 reference, when asked for.
    pub verify: Option<VerifyReport>,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    /// Fastest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
    /// `(percentile, ms)` points of the whole distribution, for plotting.
    #[serde(skip)]
    pub curve: Vec<(f64, f64)>,
}

/// Outcome of `--verify`.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The fraction asked for.
    pub fraction: f64,
    /// Answers recomputed.
    pub checked: u64,
    /// Answers with an element outside the contract's tolerance.
    pub mismatches: u64,
    /// Largest error seen, in units of the tolerance (at most 1 is within the contract).
    pub max_error: f64,
}

/// Counts shared by every caller.
#[derive(Debug)]
struct Recorder {
    /// Microseconds.
    hist: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    checked: u64,
    mismatches: u64,
    max_error: f64,
}

impl Recorder {
    fn new() -> Recorder {
        Recorder {
            // 1 us to 1 h at 3 significant digits; slower answers are recorded as 1 h.
            hist: Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds"),
            ok: 0,
            errors: BTreeMap::new(),
            checked: 0,
            mismatches: 0,
            max_error: 0.0,
        }
    }
}

/// A request built once, and what a correct answer to it is.
struct Prepared {
    logits_bytes: usize,
    dtype: DType,
    kind: LossKind,
    wanted: Wanted,
    xent: proto::EvaluateRequest,
    /// The same request in the Open Inference Protocol, raw contents.
    oip: ModelInferRequest,
    /// The float64 reference answer, computed only when verifying.
    reference: Option<RefOutput>,
}

/// Outputs of one answer widened to f64, for verification.
#[derive(Default)]
struct Answer {
    loss: Option<Vec<f64>>,
    grad_logits: Option<Vec<f64>>,
    grad_labels: Option<Vec<f64>>,
}

/// A small deterministic generator (SplitMix64): the data only needs to be varied and
/// reproducible.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl BenchArgs {
    fn options(&self) -> Options {
        self.options.apply(Options::default())
    }

    fn wanted(&self) -> Wanted {
        Wanted::of(&self.outputs)
    }

    fn kind(&self) -> LossKind {
        self.loss
    }

    /// Refuses flags that cannot make a run.
    fn check(&self) -> Result<(), String> {
        if !(self.duration.is_finite() && self.duration > 0.0) {
            return Err(format!(
                "--duration {} must be a positive number of seconds",
                self.duration
            ));
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            return Err(format!(
                "--rate {r} must be a positive number of requests per second"
            ));
        }
        if self.concurrency == Some(0) || self.max_in_flight == 0 {
            return Err("--concurrency and --max-in-flight must be at least 1".into());
        }
        if self.rows == 0 || self.classes == 0 {
            return Err("--rows and --classes must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.verify) {
            return Err(format!("--verify {} must be in [0, 1]", self.verify));
        }
        Ok(())
    }
}

/// Generates the inputs once, in f64, rounded to the wire dtype `T` (so the reference sees
/// exactly the values the server does).
fn prepare<T: FloatElement>(args: &BenchArgs) -> Result<Prepared, String> {
    let (rows, classes) = (args.rows, args.classes);
    let mut rng = SplitMix(args.seed);
    let logits = Array2::from_shape_fn((rows, classes), |_| T::from_f64(rng.unit() * 8.0 - 4.0));
    let ids = Array1::from_shape_fn(rows, |r| match args.options.ignore_index {
        Some(k) if r % 16 == 15 => k,
        _ => (rng.next() % classes as u64) as i64,
    });
    let kind = args.kind();
    let options = args.options();
    let wanted = args.wanted();
    let request: EvalRequest<T> = match kind {
        LossKind::Dense => {
            let onehot = Array2::from_shape_fn((rows, classes), |(r, c)| {
                T::from_f64(if ids[r] == c as i64 { 1.0 } else { 0.0 })
            });
            EvalRequest::dense(logits.view(), onehot.view())
        }
        LossKind::Sparse => sparse_request(logits.view(), ids.view()),
    };
    let xent = request.options(options).wanted(wanted).to_proto();
    let oip = oip::infer_request(xent.clone(), true)?;
    let reference = if args.verify > 0.0 {
        let problem = RefProblem {
            shape: vec![rows, classes],
            logits: logits.iter().map(|v| v.to_f64()).collect(),
            labels: match kind {
                LossKind::Dense => RefLabels::Dense(
                    (0..rows * classes)
                        .map(|i| {
                            if ids[i / classes] == (i % classes) as i64 {
                                1.0
                            } else {
                                0.0
                            }
                        })
                        .collect(),
                ),
                LossKind::Sparse => RefLabels::Ids(ids.to_vec()),
            },
            options,
            class_weights: None,
            sample_weights: None,
            upstream: None,
        };
        Some(
            reference::evaluate(&problem)
                .map_err(|e| format!("the reference refuses this request: {e}"))?,
        )
    } else {
        None
    };
    Ok(Prepared {
        logits_bytes: rows * classes * <T as Element>::DTYPE.size(),
        dtype: <T as Element>::DTYPE,
        kind,
        wanted,
        xent,
        oip,
        reference,
    })
}

fn sparse_request<T: FloatElement, I: ClassId>(
    logits: ndarray::ArrayView2<'_, T>,
    ids: ndarray::ArrayView1<'_, I>,
) -> EvalRequest<T> {
    EvalRequest::sparse(logits, ids)
}

/// Where calls go: one connection per address, taken in turn.
#[derive(Clone)]
struct Target {
    protocol: Protocol,
    xent: Vec<XentClient<Channel>>,
    oip: Vec<GrpcInferenceServiceClient<Channel>>,
    next: Arc<AtomicU64>,
    timeout: Option<Duration>,
}

impl Target {
    async fn connect(
        addresses: &[String],
        protocol: Protocol,
        timeout: Option<Duration>,
    ) -> Result<Target, String> {
        let (mut xent, mut oip) = (Vec::new(), Vec::new());
        for a in addresses {
            let uri = if a.contains("://") {
                a.clone()
            } else {
                format!("http://{a}")
            };
            let channel = Endpoint::from_shared(uri.clone())
                .map_err(|e| format!("{uri}: {e}"))?
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_secs(10))
                .initial_stream_window_size(16 << 20)
                .initial_connection_window_size(64 << 20)
                .connect()
                .await
                .map_err(|e| format!("cannot connect to {uri}: {e}"))?;
            oip.push(
                GrpcInferenceServiceClient::new(channel.clone())
                    .max_decoding_message_size(1 << 30)
                    .max_encoding_message_size(1 << 30),
            );
            xent.push(
                XentClient::new(channel)
                    .max_decoding_message_size(1 << 30)
                    .max_encoding_message_size(1 << 30),
            );
        }
        Ok(Target {
            protocol,
            xent,
            oip,
            next: Arc::new(AtomicU64::new(0)),
            timeout,
        })
    }

    /// One call; the outputs are decoded only when `decode_outputs`.
    async fn call(&self, prepared: &Prepared, decode_outputs: bool) -> Result<Answer, Status> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % self.xent.len();
        match self.protocol {
            Protocol::Xent => {
                let mut request = tonic::Request::new(prepared.xent.clone());
                if let Some(t) = self.timeout {
                    request.set_timeout(t);
                }
                let response = self.xent[i].clone().evaluate(request).await?.into_inner();
                if !decode_outputs {
                    return Ok(Answer::default());
                }
                let floats = |t: Option<proto::Tensor>| {
                    t.and_then(|t| decode(Some(t)).ok())
                        .as_ref()
                        .and_then(AnyTensor::floats_to_f64)
                };
                Ok(Answer {
                    loss: floats(response.loss),
                    grad_logits: floats(response.grad_logits),
                    grad_labels: floats(response.grad_labels),
                })
            }
            Protocol::Oip => {
                let mut request = tonic::Request::new(prepared.oip.clone());
                if let Some(t) = self.timeout {
                    request.set_timeout(t);
                }
                let response = self.oip[i].clone().model_infer(request).await?.into_inner();
                if !decode_outputs {
                    return Ok(Answer::default());
                }
                // An answer that cannot be read counts as missing its outputs (a mismatch).
                let mut answer = Answer::default();
                for (name, t) in oip::outputs(response).unwrap_or_default() {
                    let values = t.floats_to_f64();
                    match Output::from_name(&name) {
                        Some(Output::Loss) => answer.loss = values,
                        Some(Output::GradLogits) => answer.grad_logits = values,
                        Some(Output::GradLabels) => answer.grad_labels = values,
                        None => {}
                    }
                }
                Ok(answer)
            }
        }
    }
}

/// Whether call number `n` is verified: exactly `floor(n * f)` of the first `n` calls are.
fn sampled(n: u64, fraction: f64) -> bool {
    fraction > 0.0 && ((n + 1) as f64 * fraction).floor() > (n as f64 * fraction).floor()
}

/// Error of an answer against the reference, in units of the dtype's tolerance; a missing
/// output that was asked for counts as infinitely wrong.
fn answer_error(
    answer: &Answer,
    want: &RefOutput,
    wanted: Wanted,
    kind: LossKind,
    dtype: DType,
) -> f64 {
    let tol = tolerance(dtype);
    let mut err: f64 = 0.0;
    let pairs = [
        (wanted.loss, &answer.loss, Some(&want.loss)),
        (
            wanted.grad_logits,
            &answer.grad_logits,
            Some(&want.grad_logits),
        ),
        (
            wanted.grad_labels && kind == LossKind::Dense,
            &answer.grad_labels,
            want.grad_labels.as_ref(),
        ),
    ];
    for (asked, got, want) in pairs {
        match (asked, got, want) {
            (false, _, _) => {}
            (true, Some(g), Some(w)) if g.len() == w.len() => err = err.max(max_error(g, w, tol)),
            (true, _, _) => err = f64::INFINITY,
        }
    }
    err
}

/// One call, timed from `intended` (the scheduled send time in the open loop, the actual one
/// in the closed loop), recorded.
async fn one_call(
    target: &Target,
    prepared: &Prepared,
    n: u64,
    fraction: f64,
    intended: Instant,
    rec: &Mutex<Recorder>,
) {
    let verify = prepared.reference.is_some() && sampled(n, fraction);
    let result = target.call(prepared, verify).await;
    let micros = intended.elapsed().as_micros().max(1) as u64;
    let error = match (&result, &prepared.reference) {
        (Ok(answer), Some(want)) if verify => Some(answer_error(
            answer,
            want,
            prepared.wanted,
            prepared.kind,
            prepared.dtype,
        )),
        _ => None,
    };
    let mut r = rec.lock().expect("recorder lock");
    match result {
        Ok(_) => {
            r.ok += 1;
            r.hist.saturating_record(micros);
        }
        Err(status) => {
            *r.errors
                .entry(code_name(status.code()).to_string())
                .or_default() += 1
        }
    }
    if let Some(e) = error {
        r.checked += 1;
        r.max_error = r.max_error.max(e);
        if e > 1.0 {
            r.mismatches += 1;
        }
    }
}

/// Runs the benchmark and returns its report.
pub async fn run(config: BenchConfig) -> Result<Report, String> {
    let args = &config.args;
    args.check()?;
    if config.addresses.is_empty() {
        return Err("no --address given".into());
    }
    let prepared = Arc::new(
        crate::with_float!(args.dtype, T => prepare::<T>(args)?, int => {
            return Err(format!("--dtype {} is not a float dtype", args.dtype));
        }),
    );
    let target = Target::connect(&config.addresses, args.protocol, config.timeout).await?;
    let rec = Arc::new(Mutex::new(Recorder::new()));
    let duration = Duration::from_secs_f64(args.duration);
    let bar = progress_bar(config.progress, duration);
    let fraction = args.verify;
    let started = Instant::now();
    let end = started + duration;
    let counter = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));

    let ticker = {
        let (bar, rec, done) = (bar.clone(), rec.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            while !done.load(Ordering::Relaxed) {
                tick.tick().await;
                let (ok, errors) = {
                    let r = rec.lock().expect("recorder lock");
                    (r.ok, r.errors.values().sum::<u64>())
                };
                bar.set_position(started.elapsed().as_millis().min(duration.as_millis()) as u64);
                bar.set_message(format!("{ok} ok, {errors} errors"));
            }
        })
    };

    let (mode, concurrency) = match args.rate {
        None => {
            let n = args.concurrency.unwrap_or(8);
            let mut tasks = Vec::with_capacity(n);
            for _ in 0..n {
                let (target, prepared, rec, counter) = (
                    target.clone(),
                    prepared.clone(),
                    rec.clone(),
                    counter.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < end {
                        let k = counter.fetch_add(1, Ordering::Relaxed);
                        one_call(&target, &prepared, k, fraction, Instant::now(), &rec).await;
                    }
                }));
            }
            for t in tasks {
                t.await.map_err(|e| format!("a caller failed: {e}"))?;
            }
            ("closed", Some(n))
        }
        Some(rate) => {
            let permits = Arc::new(tokio::sync::Semaphore::new(args.max_in_flight));
            let period = Duration::from_secs_f64(1.0 / rate);
            let mut k: u64 = 0;
            loop {
                let intended = started + period.mul_f64(k as f64);
                if intended >= end {
                    break;
                }
                tokio::time::sleep_until(intended).await;
                let permit = permits.clone().acquire_owned().await.expect("never closed");
                let (target, prepared, rec) = (target.clone(), prepared.clone(), rec.clone());
                tokio::spawn(async move {
                    one_call(&target, &prepared, k, fraction, intended, &rec).await;
                    drop(permit);
                });
                k += 1;
            }
            // Every scheduled call is answered (or fails) before the counts are read.
            let _all = permits
                .acquire_many(args.max_in_flight as u32)
                .await
                .expect("never closed");
            ("open", None)
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = ticker.await;
    bar.finish_and_clear();

    let r = rec.lock().expect("recorder lock");
    let errors_total: u64 = r.errors.values().sum();
    let ms = |us: u64| us as f64 / 1e3;
    let h = &r.hist;
    let latency = if h.is_empty() {
        Latency {
            min: 0.0,
            mean: 0.0,
            p50: 0.0,
            p90: 0.0,
            p99: 0.0,
            p999: 0.0,
            max: 0.0,
            curve: Vec::new(),
        }
    } else {
        Latency {
            min: ms(h.min()),
            mean: h.mean() / 1e3,
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            curve: h
                .iter_quantiles(4)
                .map(|v| (v.quantile_iterated_to() * 100.0, ms(v.value_iterated_to())))
                .collect(),
        }
    };
    let ok = r.ok as f64;
    Ok(Report {
        protocol: args.protocol,
        addresses: config.addresses.clone(),
        mode,
        concurrency,
        rate: args.rate,
        loss: args.kind().name(),
        dtype: prepared.dtype.name(),
        rows: args.rows,
        classes: args.classes,
        logits_bytes: prepared.logits_bytes,
        elapsed_s: elapsed,
        requests: r.ok + errors_total,
        ok: r.ok,
        errors: r.errors.clone(),
        requests_per_s: ok / elapsed,
        rows_per_s: ok * args.rows as f64 / elapsed,
        logits_gb_per_s: ok * prepared.logits_bytes as f64 / elapsed / 1e9,
        latency_ms: latency,
        verify: (fraction > 0.0).then_some(VerifyReport {
            fraction,
            checked: r.checked,
            mismatches: r.mismatches,
            max_error: r.max_error,
        }),
    })
}

fn progress_bar(enabled: bool, duration: Duration) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    // The stderr target draws nothing when stderr is not a terminal.
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(duration.as_millis() as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {percent:>3}% {msg}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

impl Report {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let load = match (self.concurrency, self.rate) {
            (Some(n), _) => format!("closed loop, {n} callers"),
            (_, Some(r)) => format!("open loop, {r} req/s scheduled"),
            _ => self.mode.to_string(),
        };
        let _ = writeln!(
            s,
            "{} {} {}x{} {} over {} endpoint(s), {load}",
            protocol_name(self.protocol),
            self.loss,
            self.rows,
            self.classes,
            self.dtype,
            self.addresses.len()
        );
        let _ = writeln!(
            s,
            "requests     {} in {:.2} s: {} ok, {} failed",
            self.requests,
            self.elapsed_s,
            self.ok,
            self.requests - self.ok
        );
        for (code, n) in &self.errors {
            let _ = writeln!(s, "  {code:<20} {n}");
        }
        let _ = writeln!(
            s,
            "throughput   {:.1} req/s  {:.0} rows/s  {:.3} GB/s of logits",
            self.requests_per_s, self.rows_per_s, self.logits_gb_per_s
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "latency ms   p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        if let Some(v) = &self.verify {
            let _ = writeln!(
                s,
                "verify       {} checked against the float64 reference: {} outside tolerance (max error {:.3} of the tolerance)",
                v.checked, v.mismatches, v.max_error
            );
        }
        s
    }

    /// A latency-by-percentile chart (the HDR histogram's classic plot: the x axis spreads the
    /// tail, 90% / 99% / 99.9% ... equally spaced) as a standalone SVG document.
    pub fn svg(&self) -> String {
        let (w, h) = (720.0, 420.0);
        let (left, right, top, bottom) = (70.0, 20.0, 40.0, 50.0);
        let points: Vec<(f64, f64)> = self
            .latency_ms
            .curve
            .iter()
            .map(|&(p, ms)| (nines(p), ms))
            .collect();
        let max_x = points
            .iter()
            .map(|p| p.0)
            .fold(2.0, f64::max)
            .ceil()
            .min(6.0);
        let max_y = nice_ceiling(points.iter().map(|p| p.1).fold(0.0, f64::max));
        let x = |v: f64| left + (v.min(max_x) / max_x) * (w - left - right);
        let y = |v: f64| h - bottom - (v / max_y) * (h - top - bottom);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let title = format!(
            "xent bench: {} {}x{} {}, {} ({:.0} req/s)",
            self.loss, self.rows, self.classes, self.dtype, self.mode, self.requests_per_s
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            w / 2.0,
            escape(&title)
        );
        for k in 0..=(max_x as usize) {
            let label = match k {
                0 => "0%".to_string(),
                k => format!("{}%", 100.0 - 100.0 / 10f64.powi(k as i32)),
            };
            let xv = x(k as f64);
            let _ = writeln!(
                s,
                r##"<line x1="{xv:.1}" y1="{top}" x2="{xv:.1}" y2="{}" stroke="#ddd"/>"##,
                h - bottom
            );
            let _ = writeln!(
                s,
                r#"<text x="{xv:.1}" y="{}" text-anchor="middle">{label}</text>"#,
                h - bottom + 16.0
            );
        }
        for k in 0..=4 {
            let v = max_y * k as f64 / 4.0;
            let yv = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{yv:.1}" x2="{}" y2="{yv:.1}" stroke="#ddd"/>"##,
                w - right
            );
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                yv + 4.0,
                short(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>"#,
            w / 2.0,
            h - 12.0
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">latency (ms)</text>"#,
            h / 2.0,
            h / 2.0
        );
        let path: Vec<String> = points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        let _ = writeln!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            path.join(" ")
        );
        let _ = writeln!(s, "</svg>");
        s
    }
}

/// `log10(1 / (1 - p))`: 90% -> 1, 99% -> 2, ...
fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-6);
    -rest.log10()
}

/// 1, 2 or 5 times a power of ten, at least `v`.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let base = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * base)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * base)
}

fn short(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Xent => "xent.v1",
        Protocol::Oip => "oip (KServe v2 ModelInfer)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_takes_exactly_the_fraction() {
        let n = (0..1000).filter(|&k| sampled(k, 0.1)).count();
        assert_eq!(n, 100);
        assert_eq!((0..1000).filter(|&k| sampled(k, 1.0)).count(), 1000);
        assert_eq!((0..1000).filter(|&k| sampled(k, 0.0)).count(), 0);
    }

    #[test]
    fn chart_axes_are_readable() {
        assert!((nines(90.0) - 1.0).abs() < 1e-9);
        assert!((nines(99.9) - 3.0).abs() < 1e-9);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(12.0), 20.0);
    }
}
