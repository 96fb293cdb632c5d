//! `xent`: the command-line client of xentd.
//!
//! `xent eval` reads logits and labels from `.npy` files, asks a running xentd for the loss
//! and its gradients, writes them back as `.npy` files and prints a short summary;
//! `xent health` asks the standard gRPC health service whether the server is serving.
//!
//! Numpy files are read and written with the `ndarray-npy` crate, which knows float32,
//! float64, int32 and int64. Numpy has no bfloat16 and `ndarray-npy` no float16, so inputs
//! for a half-precision evaluation are given as float32 or float64 and rounded to the wire
//! dtype chosen with `--dtype`; half-precision outputs are written as float32 `.npy` (exact:
//! every float16 and bfloat16 value is a float32 value).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{ArgAction, Args, Parser, Subcommand};
use ndarray::ArrayD;
use ndarray_npy::{ReadNpyError, ReadNpyExt};
use tonic_health::pb::health_check_response::ServingStatus;
use xent::cli::{OptionFlags, float_dtype, named};
use xent::client::{Client, ClientConfig, EvalRequest, EvalResult, FloatElement};
use xent::dtype::{DType, Element};
use xent::eval::{LossKind, Options, Output, Wanted};
use xent::loadgen::{BenchArgs, BenchConfig};

/// A failure to report on one line; the process exits non-zero.
type Failure = String;

#[derive(Parser, Debug)]
#[command(
    name = "xent",
    version,
    about = "Command-line client of xentd: softmax cross-entropy losses and their gradients",
    propagate_version = true
)]
struct Cli {
    /// Address of xentd: HOST:PORT or a URI such as http://HOST:PORT. `bench` takes several
    /// (repeat the flag or separate them with commas) and uses them round-robin; the other
    /// commands use the first.
    #[arg(
        long,
        global = true,
        env = "XENT_ADDRESS",
        default_value = "127.0.0.1:50051",
        value_name = "ADDRESS",
        value_delimiter = ','
    )]
    address: Vec<String>,

    /// Deadline of each call in seconds (sent to the server as grpc-timeout). Default: none.
    #[arg(long, global = true, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,

    /// Speak TLS, checking the server's certificate against these CA certificates (PEM).
    #[arg(long, global = true, env = "XENT_TLS_CA", value_name = "PEM")]
    tls_ca: Option<PathBuf>,

    /// A client certificate (PEM) for mutual TLS, with --tls-key.
    #[arg(long, global = true, env = "XENT_TLS_CERT", value_name = "PEM", requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        global = true,
        env = "XENT_TLS_KEY",
        value_name = "PEM",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,

    /// The name the server's certificate must have. Default: the address's host.
    #[arg(
        long,
        global = true,
        env = "XENT_TLS_DOMAIN",
        value_name = "NAME",
        requires = "tls_ca"
    )]
    tls_domain: Option<String>,

    /// A file whose first token (one per line, # starts a comment) is sent as a bearer token.
    #[arg(long, global = true, env = "XENT_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Evaluate a loss and its gradients for logits and labels stored as .npy files.
    Eval(Box<EvalArgs>),
    /// Ask the server's gRPC health service whether it is serving (exit 0 only when SERVING).
    Health(HealthArgs),
    /// Load-test one or several servers: closed or open loop, latency percentiles, errors by
    /// code, optional checking of answers against the float64 reference.
    Bench(Box<BenchArgs>),
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// Logits (or probabilities with --from-logits false): a float32 or float64 .npy file.
    #[arg(long, value_name = "NPY")]
    logits: PathBuf,

    /// Labels: dense label rows shaped like the logits (float .npy), or class ids shaped like
    /// the logits without the class axis (int32 or int64 .npy).
    #[arg(long, value_name = "NPY")]
    labels: PathBuf,

    /// Which loss. Default: sparse_softmax_cross_entropy when the labels file holds integers,
    /// else softmax_cross_entropy.
    #[arg(long, value_parser = named::<LossKind>())]
    loss: Option<LossKind>,

    /// The class axis; negative counts from the end. Default -1.
    #[arg(long, allow_negative_numbers = true)]
    axis: Option<i64>,

    /// Per-class weights: a .npy of shape [C].
    #[arg(long, value_name = "NPY")]
    class_weights: Option<PathBuf>,

    /// Per-example weights: a .npy broadcastable to the loss shape.
    #[arg(long, value_name = "NPY")]
    sample_weights: Option<PathBuf>,

    /// Whether --logits holds logits (true) or probabilities (false). Default true.
    #[arg(long, value_name = "BOOL", action = ArgAction::Set)]
    from_logits: Option<bool>,

    /// The scalar options.
    #[command(flatten)]
    options: OptionFlags,

    /// Upstream gradient multiplied into the gradients: a .npy shaped as the returned
    /// loss (shape [] for a reduced loss).
    #[arg(long, value_name = "NPY")]
    upstream: Option<PathBuf>,

    /// Outputs to compute, comma-separated. Default: loss,grad_logits.
    #[arg(long, value_parser = named::<Output>(), value_delimiter = ',', value_name = "LIST")]
    outputs: Vec<Output>,

    /// Element type on the wire and of the outputs. Default: the logits file's dtype.
    /// float16 and bfloat16 outputs are written as float32 .npy files.
    #[arg(long, value_parser = float_dtype())]
    dtype: Option<DType>,

    /// Directory to write loss.npy, grad_logits.npy and grad_labels.npy to (those computed);
    /// created if missing. Without it only the summary is printed.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct HealthArgs {
    /// Service to ask about; empty for the server as a whole.
    #[arg(long, default_value = "", value_name = "NAME")]
    service: String,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("{s} must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The load generator needs every core to keep up with a server; the other commands make
    // one call.
    let mut builder = match cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let token = match &cli.token_file {
        Some(path) => match xent::client::Token::from_file(path) {
            Ok(t) => Some(t),
            Err(e) => return fail(format!("--token-file: {e}")),
        },
        None => None,
    };
    let config = ClientConfig {
        timeout: cli.timeout,
        tls: cli.tls_ca.clone().map(|ca| xent::client::ClientTls {
            ca,
            cert: cli.tls_cert.clone(),
            key: cli.tls_key.clone(),
            domain: cli.tls_domain.clone(),
        }),
        token,
        ..ClientConfig::default()
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Eval(args) => eval(&cli.address[0], config, *args).await,
            Command::Health(args) => health(&cli.address[0], config, args).await,
            Command::Bench(args) => bench(cli.address, cli.timeout, *args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(message) => fail(message),
    }
}

/// Prints the failure on one line to stderr.
fn fail(message: Failure) -> ExitCode {
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("error: {line}");
    ExitCode::FAILURE
}

async fn bench(
    addresses: Vec<String>,
    timeout: Option<Duration>,
    args: BenchArgs,
) -> Result<ExitCode, Failure> {
    let (json, plot) = (args.json, args.plot.clone());
    let report = xent::loadgen::run(BenchConfig {
        addresses,
        timeout,
        args,
        progress: true,
    })
    .await?;
    if let Some(path) = plot {
        std::fs::write(&path, report.svg())
            .map_err(|e| format!("--plot {}: {e}", path.display()))?;
    }
    if json {
        let line = serde_json::to_string(&report).map_err(|e| e.to_string())?;
        println!("{line}");
    } else {
        print!("{}", report.text());
    }
    Ok(ExitCode::SUCCESS)
}

async fn health(
    address: &str,
    config: ClientConfig,
    args: HealthArgs,
) -> Result<ExitCode, Failure> {
    let mut client = Client::connect_with(address, config)
        .await
        .map_err(|e| e.to_string())?;
    let status = client
        .health(&args.service)
        .await
        .map_err(|e| e.to_string())?;
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An array read from a `.npy` file, in the dtype it was stored in.
enum Npy {
    F32(ArrayD<f32>),
    F64(ArrayD<f64>),
    I32(ArrayD<i32>),
    I64(ArrayD<i64>),
}

impl Npy {
    fn dtype(&self) -> DType {
        match self {
            Npy::F32(_) => DType::F32,
            Npy::F64(_) => DType::F64,
            Npy::I32(_) => DType::I32,
            Npy::I64(_) => DType::I64,
        }
    }

    /// Every element rounded (once) to the float type `T`.
    fn to_float<T: Element>(&self) -> ArrayD<T> {
        match self {
            Npy::F32(a) => a.mapv(|v| T::from_f64(f64::from(v))),
            Npy::F64(a) => a.mapv(T::from_f64),
            Npy::I32(a) => a.mapv(|v| T::from_f64(f64::from(v))),
            Npy::I64(a) => a.mapv(|v| T::from_f64(v as f64)),
        }
    }
}

/// Reads a `.npy` file of float32, float64, int32 or int64 elements.
fn read_npy(flag: &str, path: &Path) -> Result<Npy, Failure> {
    let bytes = std::fs::read(path).map_err(|e| format!("--{flag} {}: {e}", path.display()))?;
    let bad =
        |e: ReadNpyError| format!("--{flag} {}: not a readable .npy file: {e}", path.display());
    macro_rules! attempt {
        ($t:ty, $variant:ident) => {
            match ArrayD::<$t>::read_npy(bytes.as_slice()) {
                Ok(a) => return Ok(Npy::$variant(a)),
                Err(ReadNpyError::WrongDescriptor(d)) => d,
                Err(e) => return Err(bad(e)),
            }
        };
    }
    attempt!(f32, F32);
    attempt!(f64, F64);
    attempt!(i32, I32);
    let descr = attempt!(i64, I64);
    Err(format!(
        "--{flag} {}: unsupported element type {descr}; use float32, float64, int32 or int64 \
         (store float16/bfloat16 data as float32 and pass --dtype)",
        path.display()
    ))
}

/// Reads an optional `.npy` of weights or upstream gradients as float64 (any element type).
fn read_floats(flag: &str, path: Option<&Path>) -> Result<Option<ArrayD<f64>>, Failure> {
    path.map(|p| Ok(read_npy(flag, p)?.to_float::<f64>()))
        .transpose()
}

/// Everything read from disk, checked, before connecting.
struct Inputs {
    kind: LossKind,
    logits: Npy,
    labels: Npy,
    class_weights: Option<ArrayD<f64>>,
    sample_weights: Option<ArrayD<f64>>,
    upstream: Option<ArrayD<f64>>,
    options: Options,
    wanted: Wanted,
    out: Option<PathBuf>,
}

async fn eval(address: &str, config: ClientConfig, args: EvalArgs) -> Result<ExitCode, Failure> {
    let logits = read_npy("logits", &args.logits)?;
    if !logits.dtype().is_float() {
        return Err(format!(
            "--logits {}: expected float32 or float64 elements, got {}",
            args.logits.display(),
            logits.dtype()
        ));
    }
    let labels = read_npy("labels", &args.labels)?;
    let kind = match args.loss {
        Some(kind) => kind,
        None if labels.dtype().is_float() => LossKind::Dense,
        None => LossKind::Sparse,
    };
    if kind == LossKind::Sparse && labels.dtype().is_float() {
        return Err(format!(
            "--labels {}: class ids must be int32 or int64, got {}",
            args.labels.display(),
            labels.dtype()
        ));
    }
    let dtype = args.dtype.unwrap_or(match logits.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    });
    let defaults = Options::default();
    let options = args.options.apply(Options {
        axis: args.axis.unwrap_or(defaults.axis),
        from_logits: args.from_logits.unwrap_or(defaults.from_logits),
        ..defaults
    });
    let wanted = Wanted::of(&args.outputs);
    let inputs = Inputs {
        kind,
        class_weights: read_floats("class-weights", args.class_weights.as_deref())?,
        sample_weights: read_floats("sample-weights", args.sample_weights.as_deref())?,
        upstream: read_floats("upstream", args.upstream.as_deref())?,
        logits,
        labels,
        options,
        wanted,
        out: args.out,
    };
    let mut client = Client::connect_with(address, config)
        .await
        .map_err(|e| e.to_string())?;
    xent::with_float!(dtype, T => run::<T>(&mut client, inputs).await, int => {
        Err(format!("--dtype {dtype} is not a float dtype"))
    })
}

/// Evaluates with `T` on the wire, writes the outputs and prints the summary.
async fn run<T: FloatElement>(client: &mut Client, inputs: Inputs) -> Result<ExitCode, Failure> {
    let logits = inputs.logits.to_float::<T>();
    let mut request = match (&inputs.labels, inputs.kind) {
        (Npy::I32(ids), LossKind::Sparse) => EvalRequest::sparse(logits.view(), ids.view()),
        (Npy::I64(ids), LossKind::Sparse) => EvalRequest::sparse(logits.view(), ids.view()),
        // Dense labels, including integer ones (e.g. one-hot rows), in the wire dtype.
        (labels, _) => EvalRequest::dense(logits.view(), labels.to_float::<T>().view()),
    };
    request = request.options(inputs.options).wanted(inputs.wanted);
    if let Some(w) = &inputs.class_weights {
        request = request.class_weights(w.view());
    }
    if let Some(w) = &inputs.sample_weights {
        request = request.sample_weights(w.view());
    }
    if let Some(g) = &inputs.upstream {
        request = request.upstream(g.view());
    }
    drop(logits);

    let started = Instant::now();
    let result = client.evaluate(request).await.map_err(|e| e.to_string())?;
    let elapsed = started.elapsed();

    report(&result, inputs.kind, &inputs.options, inputs.out.as_deref())?;
    println!("{:<12} {:.3} ms", "elapsed", elapsed.as_secs_f64() * 1e3);
    Ok(ExitCode::SUCCESS)
}

/// Writes each output present and prints one line about it.
fn report<T: FloatElement>(
    result: &EvalResult<T>,
    kind: LossKind,
    options: &Options,
    out: Option<&Path>,
) -> Result<(), Failure> {
    println!(
        "{} {} reduction={} axis={}",
        kind.name(),
        <T as Element>::DTYPE,
        options.reduction,
        options.axis
    );
    if let Some(dir) = out {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--out {}: cannot create the directory: {e}", dir.display()))?;
    }
    let outputs = [
        ("loss", &result.loss),
        ("grad_logits", &result.grad_logits),
        ("grad_labels", &result.grad_labels),
    ];
    for (name, array) in outputs {
        let Some(array) = array else { continue };
        let values = array.mapv(Element::to_f64);
        let mut line = format!("{name:<12} shape {:?}", values.shape());
        if name == "loss" {
            line += &loss_summary::<T>(&values);
        } else {
            let norm = values.iter().map(|v| v * v).sum::<f64>().sqrt();
            line += &format!("  norm {}", show::<T>(norm));
        }
        if let Some(dir) = out {
            let path = dir.join(format!("{name}.npy"));
            write_npy::<T>(&path, values)?;
            line += &format!("  -> {}", path.display());
        }
        println!("{line}");
    }
    Ok(())
}

/// The value of a scalar loss, or mean/min/max of per-example losses.
fn loss_summary<T: Element>(values: &ArrayD<f64>) -> String {
    if values.ndim() == 0 {
        return format!("  value {}", show::<T>(values.iter().copied().sum()));
    }
    if values.is_empty() {
        return "  (empty)".to_string();
    }
    let nan = values.iter().filter(|v| v.is_nan()).count();
    let mean = values.iter().sum::<f64>() / values.len() as f64;
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = format!(
        "  mean {}  min {}  max {}",
        show::<T>(mean),
        show::<T>(min),
        show::<T>(max)
    );
    if nan > 0 {
        s += &format!("  ({nan} NaN)");
    }
    s
}

/// A number in the precision of `T` (shortest round-trip digits).
fn show<T: Element>(v: f64) -> String {
    match T::DTYPE {
        DType::F64 => format!("{v}"),
        _ => format!("{}", v as f32),
    }
}

/// Writes float64 outputs as float64 `.npy`, every other float type as float32 (exactly).
fn write_npy<T: Element>(path: &Path, values: ArrayD<f64>) -> Result<(), Failure> {
    let written = match T::DTYPE {
        DType::F64 => ndarray_npy::write_npy(path, &values),
        _ => ndarray_npy::write_npy(path, &values.mapv(|v| v as f32)),
    };
    written.map_err(|e| format!("cannot write {}: {e}", path.display()))
}
