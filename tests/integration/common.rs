//! A real xentd on an ephemeral port, stopped when dropped.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), xent::error::Error>>>,
}

impl TestServer {
    /// Starts a server with default settings and waits until health says SERVING.
    pub async fn start() -> TestServer {
        Self::with_settings(Settings::default()).await
    }

    /// Starts a server with `settings` (the listen address is ignored) and waits for SERVING.
    pub async fn with_settings(settings: Settings) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(xent::server::serve(listener, settings, async move {
            let _ = rx.await;
        }));
        let server = TestServer {
            addr,
            stop: Some(tx),
            task: Some(task),
        };
        server.wait_serving().await;
        server
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

    async fn wait_serving(&self) {
        for _ in 0..500 {
            if let Ok(ch) = Channel::from_shared(self.endpoint())
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

    /// Triggers shutdown and waits for the server to return.
    pub async fn stop(mut self) -> Result<(), xent::error::Error> {
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
