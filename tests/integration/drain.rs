//! Shutdown loses nothing: every stream the server accepted is answered, a new caller gets an
//! answer at once, and the process exits 0.
//!
//! Two kinds of test. The first drives HTTP/2 by hand (the h2 crate) so that the moments that
//! matter are certain rather than likely: an upload half sent when the final GOAWAY goes out,
//! a stream with a request half sent, an idle stream, a health Watch. The others repeat
//! SIGTERM-under-load at random moments, in this process (200 rounds) and with the real
//! binary (20 rounds), and compare what every client saw with what the server says it
//! accepted and answered.
//!
//! A call counts as answered by the server when the client read a status the server sent
//! (OK or an error); a failure of the transport (a refused connection, a stream the server
//! never saw) is not an answer. The server's count of streams answered must then equal the
//! clients' count of answers read, and no stream may be cut off. The one allowance is for a
//! bug of hyper's client (which tonic uses): when a GOAWAY arrives just as it opens a stream,
//! it resets the stream it has just sent and fails the call with an h2 `GoAway` error. The
//! server saw that stream and answered or lost it, so such streams may stand on the server's
//! side of the count, and nowhere else.

use std::error::Error as _;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use xent::api::tensor::encode;
use xent::config::Settings;
use xent::proto::{self, EvaluateRequest, EvaluateResponse, EvaluateStreamResponse, LossKind};

use crate::common::{CLIENT_MAX_MESSAGE, Client, TestServer, spawn_xentd};
use crate::raw::{Raw, answer, grpc_frame, next_message};

/// A dense request of `rows` x `classes` constant logits and uniform labels: every row's
/// loss is ln(classes), which is how its answer is checked.
pub fn request(rows: usize, classes: usize, id: &str) -> EvaluateRequest {
    let n = rows * classes;
    EvaluateRequest {
        request_id: id.into(),
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[rows, classes], vec![0.25f32; n], true)),
        labels: Some(encode(
            &[rows, classes],
            vec![1.0 / classes as f32; n],
            true,
        )),
        ..Default::default()
    }
}

/// Whether `resp` is the right answer to [`request`] with `classes`.
fn is_right(resp: &EvaluateResponse, rows: usize, classes: usize) -> bool {
    let Ok(loss) = xent::api::tensor::decode(resp.loss.clone()) else {
        return false;
    };
    let Some(loss) = loss.floats_to_f64() else {
        return false;
    };
    let want = (classes as f64).ln();
    loss.len() == rows
        && loss
            .iter()
            .all(|l| (l - want).abs() <= 1e-5 * want.max(1.0))
}

/// Waits, without deciding anything by time, until `cond` holds (or fails after 10 s).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "never: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn settings(grace_secs: u64) -> Settings {
    Settings {
        compute_threads: 2,
        shutdown_grace: Duration::from_secs(grace_secs),
        ..Settings::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_was_on_the_wire_at_the_signal_is_answered_and_the_rest_is_told_to_go_elsewhere() {
    let mut server = TestServer::with_settings(settings(60)).await;
    let streams = server.streams.clone();
    let mut raw = Raw::connect(server.addr).await;
    let accepted_before = streams.accepted();

    // A health Watch, which never ends on its own.
    let (watch, mut w) = raw.open("/grpc.health.v1.Health/Watch").await.unwrap();
    w.send_data(grpc_frame(&HealthCheckRequest::default()), true)
        .unwrap();
    let mut watch = watch.await.unwrap().into_body();
    let mut wbuf = Vec::new();
    let first = next_message(&mut watch, &mut wbuf).await.unwrap();
    assert_eq!(
        HealthCheckResponse::decode(first).unwrap().status(),
        ServingStatus::Serving
    );

    // An upload half sent.
    let (rows, classes) = (16, 4096);
    let big = grpc_frame(&request(rows, classes, "upload"));
    let (upload, mut u) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    u.send_data(big.slice(..big.len() / 2), false).unwrap();

    // A stream with two requests sent and a third half sent.
    let (piped, mut p) = raw.open("/xent.v1.Xent/EvaluateStream").await.unwrap();
    let third = grpc_frame(&request(2, 10, "3"));
    for id in ["1", "2"] {
        p.send_data(grpc_frame(&request(2, 10, id)), false).unwrap();
    }
    p.send_data(third.slice(..7), false).unwrap();

    // A stream with nothing sent, and one that sends a request and its end.
    let (idle, _idle_body) = raw.open("/xent.v1.Xent/EvaluateStream").await.unwrap();
    let (done, mut d) = raw.open("/xent.v1.Xent/EvaluateStream").await.unwrap();
    d.send_data(grpc_frame(&request(1, 10, "only")), true)
        .unwrap();

    until("the server has seen all five streams", || {
        streams.accepted() == accepted_before + 5
    })
    .await;
    server.signal();

    // Watch reports NOT_SERVING, then ends: by then the final GOAWAY and the drain ping are
    // through, so everything sent above has reached the server.
    let second = next_message(&mut watch, &mut wbuf).await.unwrap();
    assert_eq!(
        HealthCheckResponse::decode(second).unwrap().status(),
        ServingStatus::NotServing
    );
    assert!(next_message(&mut watch, &mut wbuf).await.is_none());
    let trailers = watch.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "14", "{trailers:?}");

    // New callers are told at once: on a new connection, health says NOT_SERVING and a call
    // is UNAVAILABLE; a new stream on this connection is refused by the client's own HTTP/2
    // (the server said it will take no more).
    let t = Instant::now();
    let (mut late, driver) = Raw::unpolled(server.addr).await;
    let (check, mut c) = late.open("/grpc.health.v1.Health/Check").await.unwrap();
    c.send_data(grpc_frame(&HealthCheckRequest::default()), true)
        .unwrap();
    let (call, mut c) = late.open("/xent.v1.Xent/Evaluate").await.unwrap();
    c.send_data(grpc_frame(&request(1, 10, "late")), true)
        .unwrap();
    tokio::spawn(driver);
    let check = answer(check).await;
    assert_eq!(check.status, Code::Ok);
    assert_eq!(
        HealthCheckResponse::decode(check.messages[0].clone())
            .unwrap()
            .status(),
        ServingStatus::NotServing
    );
    let call = answer(call).await;
    assert_eq!(call.status, Code::Unavailable);
    assert!(call.message.contains("shutting down"), "{}", call.message);
    assert!(raw.open("/xent.v1.Xent/Evaluate").await.is_err());
    assert!(t.elapsed() < Duration::from_secs(1));

    // The idle stream is ended, the client told to go elsewhere.
    let idle = answer(idle).await;
    assert!(idle.messages.is_empty());
    assert_eq!(idle.status, Code::Unavailable);
    assert!(idle.message.contains("shutting down"), "{}", idle.message);

    // The rest of the upload, sent after the final GOAWAY, is read, computed and answered.
    u.send_data(big.slice(big.len() / 2..), true).unwrap();
    let upload = answer(upload).await;
    assert_eq!(upload.status, Code::Ok, "{}", upload.message);
    let resp = EvaluateResponse::decode(upload.messages[0].clone()).unwrap();
    assert!(is_right(&resp, rows, classes));

    // The request begun before the cut is read to its end; the stream then ends with every
    // answer before its status.
    p.send_data(third.slice(7..), false).unwrap();
    let piped = answer(piped).await;
    let ids: Vec<String> = piped
        .messages
        .iter()
        .map(|m| {
            EvaluateStreamResponse::decode(m.clone())
                .unwrap()
                .request_id
        })
        .collect();
    assert_eq!(ids, ["1", "2", "3"]);
    for m in &piped.messages {
        let r = EvaluateStreamResponse::decode(m.clone()).unwrap();
        match r.result {
            Some(proto::evaluate_stream_response::Result::Response(resp)) => {
                assert!(is_right(&resp, 2, 10));
            }
            other => panic!("request {} got {other:?}", r.request_id),
        }
    }
    assert_eq!(piped.status, Code::Unavailable);
    assert!(piped.message.contains("shutting down"), "{}", piped.message);

    // The stream that had ended its requests ends with OK.
    let done = answer(done).await;
    assert_eq!((done.status, done.messages.len()), (Code::Ok, 1));

    let report = server.stop().await.unwrap();
    assert_eq!((report.cut_streams, report.cut_connections), (0, 0));
    assert_eq!(report.reset, 0, "no stream was reset: {report:?}");
    assert_eq!(report.answered, report.accepted, "{report:?}");
}

/// What a client saw of its calls.
#[derive(Default)]
struct Tally {
    /// Calls whose status came from the server (OK or not).
    answered: AtomicU64,
    /// Of those, OK with the right answer.
    ok: AtomicU64,
    /// Calls the server never saw (refused connection or stream).
    transport: AtomicU64,
    /// Of those, streams the client's HTTP/2 gave up after it had sent their headers: hyper's
    /// client drops a request whose stream it has just opened when a GOAWAY (even the
    /// announcing one, which refuses nothing) arrives at that moment, and resets it. The server
    /// counts such a stream as reset.
    abandoned: AtomicU64,
    /// How those failed, for the message of a failing round.
    failures: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    /// Counts `result`: a wrong answer or a server status that is not a drain's fails the
    /// test. True while the call was answered (a worker goes on).
    fn count<T>(
        &self,
        what: &str,
        result: &Result<T, tonic::Status>,
        right: impl FnOnce(&T) -> bool,
    ) -> bool {
        match result {
            Ok(v) => {
                assert!(right(v), "a wrong answer");
                self.answered.fetch_add(1, Ordering::SeqCst);
                self.ok.fetch_add(1, Ordering::SeqCst);
                true
            }
            Err(s) if s.source().is_some() => {
                self.transport.fetch_add(1, Ordering::SeqCst);
                if format!("{s:?}").contains("GoAway(") {
                    self.abandoned.fetch_add(1, Ordering::SeqCst);
                }
                self.failures.lock().unwrap().push(format!("{what}: {s:?}"));
                false
            }
            Err(s) => {
                assert!(
                    s.code() == Code::Unavailable && s.message().contains("shutting down"),
                    "only a drain refuses a call here: {s:?}"
                );
                self.answered.fetch_add(1, Ordering::SeqCst);
                false
            }
        }
    }
}

/// Deterministic pseudo-random numbers for the rounds (reproducible by round).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

async fn connect(endpoint: &str) -> Option<Channel> {
    Channel::from_shared(endpoint.to_string())
        .unwrap()
        .connect()
        .await
        .ok()
}

fn client(ch: Channel) -> Client {
    proto::xent_client::XentClient::new(ch)
        .max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE)
}

/// The sizes the unary workers send: small, medium, and one large enough to be still
/// uploading at the signal now and then.
const SIZES: [(usize, usize); 3] = [(1, 10), (8, 1000), (2, 1 << 16)];

/// Calls until the server stops answering: unary calls of each size on connections of their
/// own, and a stream of requests. Returns when every worker has stopped.
async fn load(endpoint: String, tally: Arc<Tally>, seed: u64) -> Vec<tokio::task::JoinHandle<()>> {
    let mut workers = Vec::new();
    for (i, &(rows, classes)) in SIZES.iter().enumerate() {
        let ch = connect(&endpoint).await.expect("connect before the signal");
        for _ in 0..if i == 0 { 2 } else { 1 } {
            let (mut c, tally) = (client(ch.clone()), tally.clone());
            workers.push(tokio::spawn(async move {
                let req = request(rows, classes, "");
                loop {
                    let r = c.evaluate(req.clone()).await;
                    if !tally.count("unary", &r, |resp| is_right(resp.get_ref(), rows, classes)) {
                        return;
                    }
                }
            }));
        }
    }
    // A stream pipelining requests, at most eight unanswered at a time as a trainer would;
    // its answers must come in order, each right, and the stream must end with a status the
    // server sent.
    let ch = connect(&endpoint).await.expect("connect before the signal");
    let (mut c, tally) = (client(ch), tally.clone());
    workers.push(tokio::spawn(async move {
        let (tx, rx) = mpsc::channel::<EvaluateRequest>(1);
        let window = Arc::new(tokio::sync::Semaphore::new(8));
        let feeder = {
            let window = window.clone();
            tokio::spawn(async move {
                for k in 0u64.. {
                    window.acquire().await.expect("open").forget();
                    let req = request(1 + (k + seed) as usize % 3, 10, &k.to_string());
                    if tx.send(req).await.is_err() {
                        return;
                    }
                }
            })
        };
        let stream = c
            .evaluate_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let mut inbound = match stream {
            Ok(s) => s.into_inner(),
            Err(s) => {
                tally.count::<()>("stream", &Err(s), |_| true);
                feeder.abort();
                return;
            }
        };
        let mut next = 0u64;
        loop {
            match inbound.message().await {
                Ok(Some(r)) => {
                    assert_eq!(r.request_id, next.to_string(), "answers in request order");
                    next += 1;
                    window.add_permits(1);
                    match r.result {
                        Some(proto::evaluate_stream_response::Result::Response(resp)) => {
                            assert!(resp.loss.is_some());
                        }
                        other => panic!("request {} got {other:?}", r.request_id),
                    }
                }
                Ok(None) => {
                    tally.count("stream", &Ok(()), |_| true);
                    break;
                }
                Err(s) => {
                    tally.count::<()>("stream", &Err(s), |_| true);
                    break;
                }
            }
        }
        feeder.abort();
    }));
    workers
}

/// New callers during a drain: a new connection's health check, a call on a new channel.
/// Each must be told (refused, NOT_SERVING, or answered) within a second.
async fn probe_new_callers(endpoint: &str, tally: &Tally) {
    let t = Instant::now();
    let within = Duration::from_secs(1);
    let steps = std::sync::Mutex::new(Vec::new());
    let step = |what: &str| {
        steps
            .lock()
            .unwrap()
            .push(format!("{what} at {:?}", t.elapsed()))
    };
    let health = tokio::time::timeout(within, async {
        let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
        step("parsed");
        let raw = tokio::net::TcpStream::connect(addr).await;
        step(&format!("raw connect {:?}", raw.as_ref().map(|_| ())));
        drop(raw);
        let ch = connect(endpoint).await;
        step("connected");
        let r = HealthClient::new(ch?)
            .check(HealthCheckRequest::default())
            .await;
        step("checked");
        Some(r)
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a new health check is answered or refused within a second: {:?}",
            steps.lock().unwrap()
        )
    });
    if let Some(r) = health {
        match r {
            Ok(r) => {
                assert_eq!(r.into_inner().status(), ServingStatus::NotServing);
                tally.answered.fetch_add(1, Ordering::SeqCst);
            }
            Err(s) => {
                tally.count::<()>("health probe", &Err(s), |_| true);
            }
        }
    }
    let call = tokio::time::timeout(within, async {
        let ch = connect(endpoint).await?;
        Some(client(ch).evaluate(request(1, 10, "late")).await)
    })
    .await
    .expect("a new call is answered or refused within a second");
    if let Some(r) = call {
        tally.count("late call", &r, |resp| is_right(resp.get_ref(), 1, 10));
    }
}

/// One round in this process: load, the signal at a random moment, new callers, the drain.
async fn round_in_process(seed: u64) {
    let mut rng = Lcg(seed);
    let mut server = TestServer::with_settings(settings(30)).await;
    let streams = server.streams.clone();
    // The health checks that saw it SERVING count once their answers are all out.
    until("the first health checks are done", || streams.open() == 0).await;
    let answered0 = streams.answered();
    let tally = Arc::new(Tally::default());
    let workers = load(server.endpoint(), tally.clone(), seed).await;
    until("calls are answered", || tally.ok.load(Ordering::SeqCst) > 0).await;
    tokio::time::sleep(Duration::from_micros(rng.below(20_000))).await;
    server.signal();
    probe_new_callers(&server.endpoint(), &tally).await;
    for (i, w) in workers.into_iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "round {seed}: worker {i} never heard from the server ({} streams open)",
                    streams.open()
                )
            })
            .expect("worker");
    }
    let report = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("the drain ends")
        .expect("serve returns");
    assert_eq!(
        (report.cut_streams, report.cut_connections),
        (0, 0),
        "round {seed}: {report:?}"
    );
    assert_eq!(
        report.answered + report.reset,
        report.accepted,
        "round {seed}"
    );
    // Every stream the server accepted was answered and its answer read, but for streams the
    // client's HTTP/2 gave up itself (answered or reset by the server, as it happened).
    let answered = report.answered - answered0;
    let read = tally.answered.load(Ordering::SeqCst);
    let abandoned = tally.abandoned.load(Ordering::SeqCst);
    assert!(
        answered >= read && answered + report.reset <= read + abandoned,
        "round {seed}: the server answered {answered} and reset {} streams; the clients read {read} answers and gave up {abandoned} streams; the calls that failed: {:#?}",
        report.reset,
        tally.failures.lock().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_shutdowns_under_load_in_process_lose_no_accepted_call() {
    let started = Instant::now();
    for seed in 0..200 {
        round_in_process(seed).await;
    }
    eprintln!("200 rounds in {:.1} s", started.elapsed().as_secs_f64());
}

/// A count from xentd's final `drained` log line.
fn logged(line: &str, key: &str) -> u64 {
    let at = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("{key} in {line}"));
    line[at + key.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// One round with the real binary: SIGTERM at a random moment under load.
async fn round_with_the_binary(seed: u64) {
    let mut rng = Lcg(seed);
    let (mut child, endpoint) = spawn_xentd(
        &["--shutdown-grace-secs", "30", "--compute-threads", "2"],
        Stdio::piped(),
    );
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let tally = Arc::new(Tally::default());
    // Wait for SERVING with counted calls: the server counts these streams too.
    let ch = connect(&endpoint).await.expect("connect");
    let start = Instant::now();
    loop {
        let r = HealthClient::new(ch.clone())
            .check(HealthCheckRequest::default())
            .await;
        tally.answered.fetch_add(1, Ordering::SeqCst);
        if r.expect("health").into_inner().status() == ServingStatus::Serving {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never SERVING");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(ch);
    let workers = load(endpoint.clone(), tally.clone(), seed).await;
    until("calls are answered", || tally.ok.load(Ordering::SeqCst) > 0).await;
    tokio::time::sleep(Duration::from_micros(rng.below(30_000))).await;
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    for w in workers {
        tokio::time::timeout(Duration::from_secs(20), w)
            .await
            .expect("every worker hears from the server")
            .expect("worker");
    }
    probe_new_callers(&endpoint, &tally).await;
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "round {seed}: exit 0 after the drain: {status:?}"
    );
    let log = log.join().unwrap();
    let drained = log
        .iter()
        .find(|l| l.contains("drained"))
        .unwrap_or_else(|| panic!("round {seed}: the server reports its drain: {log:?}"));
    assert_eq!(logged(drained, "cut_streams"), 0, "{drained}");
    assert_eq!(
        logged(drained, "streams_accepted"),
        logged(drained, "streams_answered") + logged(drained, "streams_reset"),
        "{drained}"
    );
    let (answered, reset) = (
        logged(drained, "streams_answered"),
        logged(drained, "streams_reset"),
    );
    let read = tally.answered.load(Ordering::SeqCst);
    let abandoned = tally.abandoned.load(Ordering::SeqCst);
    assert!(
        answered >= read && answered + reset <= read + abandoned,
        "round {seed}: every answer the server sent was read, but for streams the client gave up ({abandoned}): {drained}; {:#?}",
        tally.failures.lock().unwrap()
    );
    assert_eq!(logged(drained, "dispatched"), logged(drained, "computed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigterms_under_load_of_the_binary_lose_no_accepted_call() {
    for seed in 0..20 {
        round_with_the_binary(1000 + seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_server_exits_at_once_on_sigterm() {
    let (mut child, endpoint) = spawn_xentd(&["--shutdown-grace-secs", "30"], Stdio::null());
    // An open connection, idle: it is closed by the drain, not waited for.
    let _idle = connect(&endpoint).await.expect("connect");
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_outlives_the_grace_period_is_cut_off_counted_and_the_exit_is_still_zero() {
    let (mut child, endpoint) = spawn_xentd(&["--shutdown-grace-secs", "1"], Stdio::piped());
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let addr: SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let mut raw = Raw::connect(addr).await;
    // An upload that never finishes.
    let (_resp, mut body) = raw.open("/xent.v1.Xent/Evaluate").await.unwrap();
    let big = grpc_frame(&request(4, 1000, "never"));
    body.send_data(big.slice(..100), false).unwrap();
    // Ready with the stream open: a health check on the same connection answers.
    let (check, mut c) = raw.open("/grpc.health.v1.Health/Check").await.unwrap();
    c.send_data(grpc_frame(&HealthCheckRequest::default()), true)
        .unwrap();
    assert_eq!(answer(check).await.status, Code::Ok);
    let t = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() >= Duration::from_secs(1), "the grace was given");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "and no more: {:?}",
        t.elapsed()
    );
    let log = log.join().unwrap();
    let drained = log
        .iter()
        .find(|l| l.contains("drained"))
        .expect("drain report");
    assert_eq!(logged(drained, "cut_streams"), 1, "{drained}");
    assert_eq!(logged(drained, "cut_connections"), 1, "{drained}");
    assert!(
        log.iter().any(|l| l.contains("grace period over")),
        "{log:?}"
    );
}
