//! The transport's limits and timeouts, against clients that misbehave on purpose: each test
//! sets one limit low, breaks it over a real socket with HTTP/2 driven by hand, and checks the
//! answer the client gets, how soon, and that well-behaved calls go on being served.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use xent::config::Settings;
use xent::server::TransportSettings;

use crate::common::TestServer;
use crate::drain::request;
use crate::raw::{Raw, answer, grpc_frame};

/// A server whose transport is `transport`.
async fn server(transport: TransportSettings) -> TestServer {
    TestServer::with_settings(Settings {
        compute_threads: 2,
        transport,
        ..Settings::default()
    })
    .await
}

/// A health Check on a new connection, answered SERVING within `within`.
async fn health_answers(addr: std::net::SocketAddr, within: Duration) {
    let start = Instant::now();
    let mut raw = Raw::connect(addr).await;
    let (resp, mut body) = raw.open("/grpc.health.v1.Health/Check").await.unwrap();
    body.send_data(grpc_frame(&HealthCheckRequest::default()), true)
        .unwrap();
    let a = answer(resp).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
    assert!(
        start.elapsed() < within,
        "health took {:?}",
        start.elapsed()
    );
}

/// Whether a health Check on `raw` is answered SERVING within a second.
async fn serves_health(raw: &mut Raw) -> bool {
    let check = async {
        let (resp, mut body) = raw.open("/grpc.health.v1.Health/Check").await.ok()?;
        body.send_data(grpc_frame(&HealthCheckRequest::default()), true)
            .ok()?;
        let resp = resp.await.ok()?;
        Some(resp.status() == 200)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(true))
    )
}

/// Waits until `conn` (a client connection's driver) ends: the server closed it.
async fn closed_within(
    conn: h2::client::Connection<tokio::net::TcpStream, Bytes>,
    within: Duration,
) -> Duration {
    let start = Instant::now();
    let _ = tokio::time::timeout(within, conn)
        .await
        .expect("the server closes the connection");
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_never_sends_its_preface_is_closed_at_the_handshake_timeout() {
    let server = server(TransportSettings {
        handshake_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let start = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    // Half a preface, then silence.
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    let mut buf = vec![0; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(_)) => continue, // the server's SETTINGS
            Err(_) => panic!("the connection is still open after 5 s"),
        }
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(250),
        "closed too soon: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "closed at {took:?}");
    health_answers(server.addr, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_answers_no_ping_is_closed_and_one_that_does_is_kept() {
    let server = server(TransportSettings {
        keepalive_interval: Some(Duration::from_millis(200)),
        keepalive_timeout: Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    // A connection nobody reads: its PINGs go unanswered.
    let (_deaf, conn) = Raw::unpolled(server.addr).await;
    // A connection that reads (h2 answers PINGs), with a call open all along.
    let mut alive = Raw::connect(server.addr).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The deaf one was closed meanwhile: its driver, started now, finds the end at once.
    let took = closed_within(conn, Duration::from_secs(2)).await;
    assert!(took < Duration::from_millis(500), "{took:?}");
    let (resp, mut body) = alive.open("/grpc.health.v1.Health/Check").await.unwrap();
    body.send_data(grpc_frame(&HealthCheckRequest::default()), true)
        .unwrap();
    assert_eq!(answer(resp).await.status, Code::Ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_gets_goaway_and_a_busy_one_does_not() {
    let server = server(TransportSettings {
        idle_timeout: Some(Duration::from_millis(300)),
        ..Default::default()
    })
    .await;
    let (_idle, conn) = Raw::unpolled(server.addr).await;
    let idle = tokio::spawn(async move {
        let start = Instant::now();
        let _ = conn.await;
        start.elapsed()
    });
    // A connection with a call in progress (an upload half sent) for longer than the idle
    // timeout is left alone; once the call is over it goes too.
    let mut busy = Raw::connect(server.addr).await;
    let req = grpc_frame(&request(2, 10, "slow"));
    let (resp, mut body) = busy.open("/xent.v1.Xent/Evaluate").await.unwrap();
    body.send_data(req.slice(..10), false).unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    body.send_data(req.slice(10..), true).unwrap();
    let a = answer(resp).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
    let took = idle.await.unwrap();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_past_its_age_ends_its_streams_at_a_message_boundary_then_closes() {
    let server = server(TransportSettings {
        max_connection_age: Some(Duration::from_millis(400)),
        max_connection_age_grace: Duration::from_millis(600),
        ..Default::default()
    })
    .await;
    let start = Instant::now();
    let (mut raw, conn) = Raw::unpolled(server.addr).await;
    let driver = tokio::spawn(conn);
    let (piped, mut p) = raw.open("/xent.v1.Xent/EvaluateStream").await.unwrap();
    p.send_data(grpc_frame(&request(2, 10, "1")), false)
        .unwrap();
    // An upload that will outlive the grace.
    let (upload, mut u) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    u.send_data(Bytes::from_static(&[0, 0, 0, 1]), false)
        .unwrap();
    let a = tokio::time::timeout(Duration::from_secs(3), answer(piped))
        .await
        .expect("the stream ends at the connection's age");
    assert_eq!(a.status, Code::Unavailable, "{}", a.message);
    assert!(a.message.contains("maximum age"), "{}", a.message);
    assert_eq!(a.messages.len(), 1, "the request sent before is answered");
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "{:?}",
        start.elapsed()
    );
    // A new call on the connection is refused by the client itself: it has the GOAWAY.
    assert!(raw.open("/xent.v1.Xent/Evaluate").await.is_err());
    // The upload is cut with the connection when the grace runs out.
    let cut = tokio::time::timeout(Duration::from_secs(3), upload)
        .await
        .expect("the connection is closed after its grace");
    assert!(cut.is_err(), "the upload cannot have been answered");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    health_answers(server.addr, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_as_they_come() {
    let server = server(TransportSettings {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    // Two connections served (the one that checked the server's start may still be closing,
    // and count, for a moment).
    let mut served = Vec::new();
    let start = Instant::now();
    while served.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "two connections never served"
        );
        let mut raw = Raw::connect(server.addr).await;
        if serves_health(&mut raw).await {
            served.push(raw);
        }
    }
    let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf))
        .await
        .expect("the third connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    drop(served);
    // Once the first two are gone, connections are served again.
    let start = Instant::now();
    loop {
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut buf = [0; 9];
        if tokio::time::timeout(Duration::from_millis(500), tcp.read_exact(&mut buf))
            .await
            .is_ok_and(|r| r.is_ok())
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never served again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_stalls_mid_message_is_ended_and_others_are_served_meanwhile() {
    let server = server(TransportSettings {
        transfer_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    })
    .await;
    let mut raw = Raw::connect(server.addr).await;
    let req = grpc_frame(&request(4, 1000, "stalled"));
    let (resp, mut body) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    body.send_data(req.slice(..req.len() / 2), false).unwrap();
    let start = Instant::now();
    health_answers(server.addr, Duration::from_millis(200)).await;
    let a = answer(resp).await;
    let took = start.elapsed();
    assert_eq!(a.status, Code::Unavailable, "{}", a.message);
    assert!(
        a.message.contains("--transfer-idle-timeout-secs"),
        "{}",
        a.message
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // Between two messages of a stream, silence is no stall.
    let (piped, mut p) = raw.open("/xent.v1.Xent/EvaluateStream").await.unwrap();
    p.send_data(grpc_frame(&request(1, 10, "a")), false)
        .unwrap();
    tokio::time::sleep(Duration::from_millis(900)).await;
    p.send_data(grpc_frame(&request(1, 10, "b")), true).unwrap();
    let a = answer(piped).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
    assert_eq!(a.messages.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_that_passes_while_the_request_arrives_is_deadline_exceeded() {
    let server = server(TransportSettings::default()).await;
    let mut raw = Raw::connect(server.addr).await;
    let req = grpc_frame(&request(4, 1000, "late"));
    let (resp, mut body) = raw
        .open_with("/xent.v1.Xent/Evaluate", &[("grpc-timeout", "300m")])
        .await
        .unwrap();
    body.send_data(req.slice(..100), false).unwrap();
    let start = Instant::now();
    let a = answer(resp).await;
    assert_eq!(a.status, Code::DeadlineExceeded, "{}", a.message);
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_its_client_never_reads_is_reset_at_the_transfer_timeout() {
    let server = server(TransportSettings {
        transfer_idle_timeout: Duration::from_millis(400),
        ..Default::default()
    })
    .await;
    // A client that grants no window at all: not a byte of DATA may come to it.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut raw = Raw {
        send,
        addr: server.addr,
    };
    let (resp, mut body) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    body.send_data(grpc_frame(&request(64, 1000, "unread")), true)
        .unwrap();
    let start = Instant::now();
    let resp = resp.await.expect("headers need no window");
    let mut body = resp.into_body();
    let end = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .expect("the stream is reset, not held");
    let took = start.elapsed();
    let err = end.expect("no data").expect_err("a reset");
    assert_eq!(err.reason(), Some(h2::Reason::CANCEL), "{err}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    health_answers(server.addr, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_metadata_fails_its_call_and_not_the_connection() {
    let server = server(TransportSettings {
        max_header_bytes: 4096,
        ..Default::default()
    })
    .await;
    let mut raw = Raw::connect(server.addr).await;
    // A call in progress on the same connection.
    let req = grpc_frame(&request(2, 10, "neighbour"));
    let (neighbour, mut n) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    n.send_data(req.slice(..10), false).unwrap();
    let big = "x".repeat(8 * 1024);
    let (resp, mut body) = raw
        .open_with("/xent.v1.Xent/Evaluate", &[("x-big", big.as_str())])
        .await
        .unwrap();
    body.send_data(grpc_frame(&request(2, 10, "big")), true)
        .unwrap();
    let a = answer(resp).await;
    assert_eq!(a.status, Code::ResourceExhausted, "{}", a.message);
    assert!(a.message.contains("--max-header-bytes"), "{}", a.message);
    n.send_data(req.slice(10..), true).unwrap();
    let a = answer(neighbour).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_transit_budget_new_calls_are_told_to_retry_and_health_still_answers() {
    let server = server(TransportSettings {
        transit_budget: 1 << 20,
        ..Default::default()
    })
    .await;
    let mut raw = Raw::connect(server.addr).await;
    // 2 MiB of an upload of about 4 MiB: over the 1 MiB budget.
    let req = grpc_frame(&request(256, 2048, "big"));
    let (upload, mut u) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    u.send_data(req.slice(..2 << 20), false).unwrap();
    let start = Instant::now();
    loop {
        let (resp, mut body) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
        body.send_data(grpc_frame(&request(1, 10, "small")), true)
            .unwrap();
        let a = answer(resp).await;
        if a.status == Code::Unavailable {
            assert!(a.message.contains("in transit"), "{}", a.message);
            break;
        }
        assert_eq!(a.status, Code::Ok, "{}", a.message);
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the budget never bites"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    health_answers(server.addr, Duration::from_millis(500)).await;
    // The upload, once whole, is served, and the budget is given back.
    u.send_data(req.slice(2 << 20..), true).unwrap();
    let a = answer(upload).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
    let (resp, mut body) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    body.send_data(grpc_frame(&request(1, 10, "after")), true)
        .unwrap();
    let a = answer(resp).await;
    assert_eq!(a.status, Code::Ok, "{}", a.message);
}
