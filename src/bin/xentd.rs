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
    let settings = match config.validate() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("xentd: {e}");
            return ExitCode::from(2);
        }
    };
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
    // Inside the runtime: the OTLP exporter's gRPC channel is made on it.
    let telemetry = {
        let _runtime = runtime.enter();
        xent::telemetry::init(&config.telemetry(std::io::stderr().is_terminal()))
    };
    let telemetry = match telemetry {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("xentd: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(?settings, version = env!("CARGO_PKG_VERSION"), "starting");
    let code = serve(&runtime, settings);
    // Flushes the last spans while the runtime that carries the exporter's channel still runs.
    drop(telemetry);
    code
}

/// Runs the server on `runtime` until a signal has drained it.
fn serve(runtime: &tokio::runtime::Runtime, settings: xent::config::Settings) -> ExitCode {
    runtime.block_on(async move {
        let shutdown = match shutdown_signal() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("xentd: cannot handle signals: {e}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match tokio::net::TcpListener::bind(settings.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("xentd: cannot listen on {}: {e}", settings.listen);
                return ExitCode::FAILURE;
            }
        };
        // The metrics listener answers until the server has drained: scrapes during a drain
        // see it.
        let metrics_stop = tokio_util::sync::CancellationToken::new();
        let metrics = match settings.metrics_listen {
            Some(addr) => {
                match serve_metrics(addr, &settings.transport, metrics_stop.clone()).await {
                    Ok(task) => Some(task),
                    Err(e) => {
                        eprintln!("xentd: cannot serve metrics on {addr}: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            None => None,
        };
        let addr = listener
            .local_addr()
            .map_or_else(|_| settings.listen.to_string(), |a| a.to_string());
        println!("listening on {addr}");
        let _ = std::io::stdout().flush();
        tracing::info!(%addr, "listening");
        let code = match xent::server::serve(listener, settings, shutdown).await {
            Ok(_) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(error = %e, "server failed");
                ExitCode::FAILURE
            }
        };
        metrics_stop.cancel();
        if let Some(task) = metrics {
            let _ = task.await;
        }
        code
    })
}

/// How long a scrape in flight at exit gets to finish.
const METRICS_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Installs the metrics recorder and serves `/metrics` on `addr` until `stop` is cancelled,
/// under the gRPC listener's connection limits and timeouts.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    transport: &xent::server::transport::TransportSettings,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let handle = xent::metrics::install().map_err(|e| e.to_string())?;
    let addr = listener.local_addr().unwrap_or(addr);
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    let transport = xent::server::transport::TransportSettings {
        shutdown_grace: METRICS_GRACE,
        ..transport.clone()
    };
    Ok(tokio::spawn(async move {
        xent::server::transport::serve_http(
            listener,
            xent::metrics::router(handle),
            &transport,
            stop.cancelled_owned(),
        )
        .await;
    }))
}

/// Completes on the first SIGINT or SIGTERM. The handlers are installed here, at once, not
/// when the future is first polled: a signal that comes right after the address is printed
/// must drain like any other, not kill the process.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()> + Send> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        // SIGHUP reloads the certificates and tokens (server::reload). Its default action
        // ends the process, so it is taken over here too, before the address is printed; a
        // handler, once registered, stays for the life of the process.
        drop(signal(SignalKind::hangup())?);
        Ok(async move {
            tokio::select! {
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = term.recv() => tracing::info!("SIGTERM received"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::info!("Ctrl-C received");
            } else {
                std::future::pending::<()>().await;
            }
        })
    }
}
