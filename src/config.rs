//! All of `xentd`'s configuration: one clap struct whose every flag has an `XENT_*`
//! environment variable, validated into [`Settings`] before anything starts.
//!
//! The doc comment of each field is its `--help` text and its row in README's table.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

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

    /// Requests of one EvaluateStream evaluated concurrently (answers keep request order).
    #[arg(long, env = "XENT_STREAM_CONCURRENCY", default_value_t = 4)]
    pub stream_concurrency: usize,

    /// Seconds that calls in flight may take to finish after SIGTERM or SIGINT before the
    /// server exits anyway.
    #[arg(long, env = "XENT_SHUTDOWN_GRACE_SECS", default_value_t = 10.0)]
    pub shutdown_grace_secs: f64,

    /// Log filter in `tracing` EnvFilter syntax (RUST_LOG, if set, takes precedence).
    #[arg(long, env = "XENT_LOG", default_value = "info")]
    pub log: String,
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
}

impl Default for Settings {
    fn default() -> Self {
        Config::parse_from(["xentd"])
            .validate()
            .expect("defaults are valid")
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
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
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
        Ok(Settings {
            listen: self.listen,
            compute_threads: if self.compute_threads == 0 {
                compute
            } else {
                self.compute_threads
            },
            io_threads: if self.io_threads == 0 {
                io
            } else {
                self.io_threads
            },
            max_message_bytes: self.max_message_bytes,
            stream_concurrency: self.stream_concurrency,
            shutdown_grace: Duration::from_secs_f64(self.shutdown_grace_secs),
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
    fn nonsense_is_refused_with_the_flag_named() {
        let bad = |args: &[&str]| {
            Config::parse_from([&["xentd"], args].concat())
                .validate()
                .unwrap_err()
        };
        assert!(bad(&["--max-message-bytes", "10"]).contains("--max-message-bytes"));
        assert!(bad(&["--stream-concurrency", "0"]).contains("--stream-concurrency"));
        assert!(bad(&["--shutdown-grace-secs=-1"]).contains("--shutdown-grace-secs"));
        let ok = Config::parse_from(["xentd", "--listen", "127.0.0.1:0"])
            .validate()
            .unwrap();
        assert!(ok.max_message_bytes >= 256 * MIB);
    }
}
