//! A real xentd on an ephemeral port, stopped when dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use xent::batcher::{Batcher, Stats};
use xent::compute::ComputePool;
use xent::config::Settings;
use xent::proto::xent_client::XentClient;

/// The generated client of xent.v1.Xent.
pub type Client = XentClient<Channel>;

/// Message limit the test clients use: above every server default.
pub const CLIENT_MAX_MESSAGE: usize = 1 << 30;

/// A server running in this process on 127.0.0.1 with a port chosen by the OS.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The server's batcher (its counters).
    pub batcher: Batcher,
    /// The server's compute pool.
    pub pool: ComputePool,
    /// The server's counts of streams accepted, answered and reset.
    pub streams: std::sync::Arc<xent::server::transport::drain::Streams>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<xent::server::DrainReport, xent::error::Error>>>,
}

impl TestServer {
    /// Starts a server with default settings and waits until health says SERVING.
    pub async fn start() -> TestServer {
        Self::with_settings(Settings::default()).await
    }

    /// Starts a server with `settings` (the listen address is ignored) and waits for SERVING.
    pub async fn with_settings(settings: Settings) -> TestServer {
        let server = Self::unready(settings).await;
        server.wait_serving(&server.endpoint()).await;
        server
    }

    /// Starts a server with TLS or tokens in `settings`, and waits for SERVING on its plaintext
    /// health-only listener (one on a free port if `settings` have none), as a probe would.
    pub async fn with_security(mut settings: Settings) -> TestServer {
        let health = *settings
            .security
            .health_listen
            .get_or_insert_with(|| SocketAddr::from(([127, 0, 0, 1], free_port())));
        let server = Self::unready(settings).await;
        server.wait_serving(&format!("http://{health}")).await;
        server
    }

    /// Starts a server with `settings` without waiting for it.
    async fn unready(settings: Settings) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = xent::server::Server::new(settings)
            .await
            .expect("server starts");
        let (batcher, pool) = (server.batcher().clone(), server.compute_pool().clone());
        let streams = server.streams().clone();
        let task = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            batcher,
            pool,
            streams,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// The batcher's counters.
    pub fn stats(&self) -> &Stats {
        self.batcher.stats()
    }

    /// Occupies every compute thread until the returned sender is dropped or sent to, so
    /// calls queue deterministically.
    pub fn block_compute(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for _ in 0..self.pool.threads() {
            let (rx, started) = (rx.clone(), started_tx.clone());
            self.pool.spawn(move || {
                started.send(()).unwrap();
                let _ = rx.lock().unwrap().recv();
            });
        }
        // Hold the lock-free part until every thread is inside a blocker.
        for _ in 0..self.pool.threads() {
            started_rx.recv().unwrap();
        }
        tx
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A connected channel.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.endpoint())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// A client of xent.v1.Xent with large message limits.
    pub async fn client(&self) -> XentClient<Channel> {
        XentClient::new(self.channel().await)
            .max_decoding_message_size(CLIENT_MAX_MESSAGE)
            .max_encoding_message_size(CLIENT_MAX_MESSAGE)
    }

    /// The health status of `service`.
    pub async fn health(&self, service: &str) -> ServingStatus {
        let mut h = HealthClient::new(self.channel().await);
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check");
        r.into_inner().status()
    }

    async fn wait_serving(&self, endpoint: &str) {
        for _ in 0..500 {
            if let Ok(ch) = Channel::from_shared(endpoint.to_string())
                .unwrap()
                .connect()
                .await
            {
                let mut h = HealthClient::new(ch);
                if let Ok(r) = h
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    && r.into_inner().status() == ServingStatus::Serving
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("xentd at {} never became SERVING", self.addr);
    }

    /// Triggers shutdown (as SIGTERM does in the binary) without waiting.
    pub fn signal(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers shutdown and waits for the server to return its drain report.
    pub async fn stop(mut self) -> Result<xent::server::DrainReport, xent::error::Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.task.take().unwrap().await.expect("server task")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the real `xentd` binary on an ephemeral port with `args`, and returns it with its
/// endpoint (`http://ADDR`, read from its `listening on ADDR` stdout line). Its metrics
/// listener is off unless `args` set one: the default port may be taken by another test or by
/// a xentd the developer is running.
pub fn spawn_xentd(args: &[&str], stderr: std::process::Stdio) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let metrics_off: &[&str] = if args.contains(&"--metrics-listen") {
        &[]
    } else {
        &["--metrics-listen", "off"]
    };
    let mut child = std::process::Command::new(xentd_bin())
        .args(["--listen", "127.0.0.1:0"])
        .args(metrics_off)
        .args(args)
        // Logs at xentd's default level (info), whatever RUST_LOG the tests run under.
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("xentd starts");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout piped"))
        .read_line(&mut line)
        .expect("xentd's first stdout line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("first stdout line names the address");
    (child, format!("http://{addr}"))
}

/// The xentd binary the tests run: `XENTD_BIN` when set (as for the Python suites), so a
/// built test binary can be run against a binary copied elsewhere; else the one cargo built.
pub fn xentd_bin() -> std::ffi::OsString {
    std::env::var_os("XENTD_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_xentd").into())
}

/// A loopback port nobody listens on (the OS's choice, released at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// `GET path` and the status and body of the answer. HTTP/1.0, so the body is never chunked
/// and ends when the server closes the connection.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw).map_err(std::io::Error::other)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no end of headers in {raw:?}")))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    Ok((status, body.to_string()))
}
