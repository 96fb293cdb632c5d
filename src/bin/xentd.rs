//! `xentd`: the xent server. Configuration comes from flags or `XENT_*` variables
//! (`xentd --help`); logs go to stderr; stdout gets one line, `listening on ADDR`, once the
//! socket is bound, so scripts and tests can find a server started on port 0.

use std::io::{IsTerminal as _, Write as _};
use std::process::ExitCode;

use clap::Parser;
use xent::config::Config;

/// mimalloc rather than the system allocator: a small call allocates and frees a few dozen
/// buffers (HTTP/2 frames, protobuf messages, outputs) across threads, and glibc's malloc was
/// about a tenth of xentd's CPU time under many small calls (BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    let _telemetry = match xent::telemetry::init(&config.telemetry(std::io::stderr().is_terminal()))
    {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("xentd: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = match config.validate() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xentd: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(?settings, version = env!("CARGO_PKG_VERSION"), "starting");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.io_threads)
        .thread_name("xent-io")
        .enable_all()
        .build();
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            eprintln!("xentd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listener = match tokio::net::TcpListener::bind(settings.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("xentd: cannot listen on {}: {e}", settings.listen);
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = settings.metrics_listen {
            if let Err(e) = xent::metrics::install(addr) {
                eprintln!("xentd: cannot serve metrics on {addr}: {e}");
                return ExitCode::FAILURE;
            }
            tracing::info!(%addr, "serving Prometheus metrics at /metrics");
        }
        let addr = listener
            .local_addr()
            .map_or_else(|_| settings.listen.to_string(), |a| a.to_string());
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, "listening");
        match xent::server::serve(listener, settings, shutdown_signal()).await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Completes on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}
