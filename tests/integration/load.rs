//! Behaviour under load, asserted on outcomes and counters, never on wall-clock time: batching
//! changes no bits, overload is refused at once and survived, expired and abandoned calls are
//! never computed (shutdown under load: `drain`).
//!
//! Queueing is made deterministic by occupying the compute pool (`TestServer::block_compute`).

use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;

use half::bf16;
use prost::Message as _;
use tonic::{Code, Request};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_types::StatusExt;
use xent::api::tensor::encode;
use xent::batcher::CloseReason;
use xent::config::Settings;
use xent::proto::{EvaluateRequest, EvaluateResponse, LossKind, Output, Reduction};

use crate::common::{Client, TestServer, spawn_xentd};

fn settings(batching: bool, threads: usize, inflight: usize, delay_ms: u64) -> Settings {
    let defaults = Settings::default();
    let mut batcher = defaults.batcher;
    batcher.limits.batching = batching;
    batcher.limits.max_delay = Duration::from_millis(delay_ms);
    batcher.max_inflight_batches = inflight;
    Settings {
        compute_threads: threads,
        batcher,
        ..defaults
    }
}

fn values(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|k| (((k + seed) * 2_654_435_761) % 2003) as f32 / 97.0 - 10.0)
        .collect()
}

/// Requests of several shapes, dtypes, kinds and options.
fn mixed_requests() -> Vec<EvaluateRequest> {
    let mut out = Vec::new();
    for i in 0..48usize {
        let rows = [1, 3, 17, 64][i % 4];
        let classes = [10, 1000][(i / 4) % 2];
        let n = rows * classes;
        let x = values(n, i);
        let sparse = i % 3 != 0;
        let mut req = EvaluateRequest {
            request_id: format!("r{i}"),
            outputs: vec![Output::Loss as i32, Output::GradLogits as i32],
            ..Default::default()
        };
        if sparse {
            req.loss = LossKind::SparseSoftmaxCrossEntropy as i32;
            req.labels = Some(encode(
                &[rows],
                (0..rows).map(|r| ((r * 7 + i) % classes) as i64).collect(),
                true,
            ));
        } else {
            req.loss = LossKind::SoftmaxCrossEntropy as i32;
            let mut y = vec![0.0f32; n];
            for r in 0..rows {
                y[r * classes + (r + i) % classes] = 0.75;
                y[r * classes + (r + i + 1) % classes] = 0.25;
            }
            req.labels = Some(if i % 4 == 1 {
                encode(
                    &[rows, classes],
                    y.iter().map(|&v| bf16::from_f32(v)).collect(),
                    true,
                )
            } else {
                encode(&[rows, classes], y, true)
            });
            req.outputs.push(Output::GradLabels as i32);
        }
        req.logits = Some(if !sparse && i % 4 == 1 {
            encode(
                &[rows, classes],
                x.iter().map(|&v| bf16::from_f32(v)).collect(),
                true,
            )
        } else if i % 5 == 0 {
            // float64 logits need float64 labels when dense.
            if !sparse {
                let y = req.labels.take().unwrap();
                let y32: Vec<f32> = y
                    .raw_data
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                req.labels = Some(encode(
                    &[rows, classes],
                    y32.iter().map(|&v| f64::from(v)).collect(),
                    true,
                ));
            }
            encode(
                &[rows, classes],
                x.iter().map(|&v| f64::from(v)).collect(),
                true,
            )
        } else {
            encode(&[rows, classes], x, true)
        });
        req.label_smoothing = [0.0, 0.1][i % 2];
        req.reduction = [Reduction::None, Reduction::Mean, Reduction::Sum][i % 3] as i32;
        req.z_loss = if i % 7 == 0 { 1e-3 } else { 0.0 };
        out.push(req);
    }
    out
}

async fn all_at_once(
    client: &Client,
    reqs: &[EvaluateRequest],
) -> Vec<Result<EvaluateResponse, tonic::Status>> {
    let calls = reqs.iter().cloned().map(|r| {
        let mut c = client.clone();
        tokio::spawn(async move { c.evaluate(r).await.map(|r| r.into_inner()) })
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect()
}

/// Polls `cond` until it holds (fails after 30 s, which only a hang reaches).
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_bit_identical_whatever_the_batch_or_thread_count() {
    let reqs = mixed_requests();
    // Batched: every request queues behind a blocked pool, then batches form.
    let batched = TestServer::with_settings(settings(true, 2, 1, 5)).await;
    let client = batched.client().await;
    let gate = batched.block_compute();
    let pending = {
        let (client, reqs) = (client.clone(), reqs.clone());
        tokio::spawn(async move { all_at_once(&client, &reqs).await })
    };
    eventually("every request queued or dispatched", || {
        let s = batched.stats();
        s.queued_requests.load(Ordering::SeqCst) as u64
            + s.dispatched_requests.load(Ordering::SeqCst)
            == reqs.len() as u64
    })
    .await;
    drop(gate);
    let a = pending.await.unwrap();
    let stats = batched.stats();
    let (computed, batches) = (
        stats.computed_requests.load(Ordering::SeqCst),
        stats.batches_total(),
    );
    assert_eq!(computed, reqs.len() as u64);
    assert!(
        batches < computed,
        "requests were gathered: {batches} batches for {computed} requests"
    );

    // Unbatched, one thread; and batched without delay on three threads.
    let alone = TestServer::with_settings(settings(false, 1, 1, 0)).await;
    let b = all_at_once(&alone.client().await, &reqs).await;
    let wide = TestServer::with_settings(settings(true, 3, 3, 0)).await;
    let c = all_at_once(&wide.client().await, &reqs).await;
    for (i, ((a, b), c)) in a.iter().zip(&b).zip(&c).enumerate() {
        let a = a.as_ref().expect("batched answer");
        assert_eq!(
            Some(a),
            b.as_ref().ok(),
            "request {i}: batched and unbatched differ"
        );
        assert_eq!(
            Some(a),
            c.as_ref().ok(),
            "request {i}: 2 and 3 threads differ"
        );
    }
    assert_eq!(alone.stats().batches_total(), reqs.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once_and_survived() {
    let mut s = settings(true, 1, 1, 0);
    s.batcher.limits.max_queue_requests = 4;
    let server = TestServer::with_settings(s).await;
    let client = server.client().await;
    let gate = server.block_compute();
    let req = mixed_requests().swap_remove(7);
    let call = || {
        let (mut c, r) = (client.clone(), req.clone());
        tokio::spawn(async move { c.evaluate(r).await })
    };
    // One call takes the only compute slot first (calls sent together may share its batch).
    let mut calls = vec![call()];
    eventually("the first call holds the slot", || {
        server.stats().inflight_batches.load(Ordering::SeqCst) == 1
    })
    .await;
    calls.extend((0..19).map(|_| call()));
    // While the pool is still blocked, the refusals have all been answered: nothing waited.
    eventually("15 refusals while blocked", || {
        server.stats().shed_queue_requests.load(Ordering::SeqCst) == 15
    })
    .await;
    assert_eq!(
        server.health("").await,
        ServingStatus::Serving,
        "health answers under overload"
    );
    drop(gate);
    let (mut ok, mut refused) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                assert!(
                    s.message().contains("queue is full (4 requests waiting)"),
                    "{}",
                    s.message()
                );
                let retry = s.get_details_retry_info().expect("RetryInfo detail");
                assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
                refused += 1;
            }
        }
    }
    assert_eq!(
        (ok, refused),
        (5, 15),
        "one computing and four waiting were accepted"
    );
    assert!(
        client.clone().evaluate(req).await.is_ok(),
        "later calls are served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_stream_refusals_carry_the_details_of_unary_ones() {
    let mut s = settings(true, 1, 1, 0);
    s.batcher.limits.max_queue_requests = 2;
    s.stream_concurrency = 8;
    let server = TestServer::with_settings(s).await;
    let client = server.client().await;
    let gate = server.block_compute();
    let req = mixed_requests().swap_remove(7);
    let first = {
        let (mut c, r) = (client.clone(), req.clone());
        tokio::spawn(async move { c.evaluate(r).await })
    };
    eventually("the first call holds the slot", || {
        server.stats().inflight_batches.load(Ordering::SeqCst) == 1
    })
    .await;
    // Seven valid requests and an invalid one, all submitted at once: two wait, five are shed.
    let mut reqs = vec![req.clone(); 7];
    let mut bad = req.clone();
    bad.label_smoothing = 2.0;
    reqs.push(bad);
    let stream = {
        let mut c = client.clone();
        tokio::spawn(async move {
            let mut answers = c
                .evaluate_stream(futures::stream::iter(reqs))
                .await
                .unwrap()
                .into_inner();
            let mut all = Vec::new();
            while let Some(a) = answers.message().await.unwrap() {
                all.push(a);
            }
            all
        })
    };
    eventually("five refusals while blocked", || {
        server.stats().shed_queue_requests.load(Ordering::SeqCst) == 5
    })
    .await;
    drop(gate);
    assert!(first.await.unwrap().is_ok());
    let answers = stream.await.unwrap();
    assert_eq!(answers.len(), 8);
    let (mut ok, mut shed) = (0, 0);
    for answer in answers {
        use xent::proto::evaluate_stream_response::Result as R;
        match answer.result.expect("a result") {
            R::Response(_) => ok += 1,
            R::Error(e) if e.code == Code::Unavailable as i32 => {
                let status = xent::client::stream_error_status(&e);
                assert!(
                    status
                        .message()
                        .contains("queue is full (2 requests waiting)")
                );
                let retry = status.get_details_retry_info().expect("RetryInfo detail");
                assert!(retry.retry_delay.is_some_and(|d| d > Duration::ZERO));
                shed += 1;
            }
            R::Error(e) => {
                assert_eq!(e.code, Code::InvalidArgument as i32, "{e:?}");
                assert_eq!(e.field, "label_smoothing");
                let status = xent::client::stream_error_status(&e);
                let bad = status.get_details_bad_request().expect("BadRequest detail");
                assert_eq!(bad.field_violations[0].field, "label_smoothing");
            }
        }
    }
    assert_eq!((ok, shed), (2, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_abandoned_calls_are_never_computed() {
    let server = TestServer::with_settings(settings(true, 1, 1, 0)).await;
    let client = server.client().await;
    let req = mixed_requests().swap_remove(2);
    let gate = server.block_compute();
    let first = {
        let (mut c, r) = (client.clone(), req.clone());
        tokio::spawn(async move { c.evaluate(r).await })
    };
    eventually("the first call holds the slot", || {
        server.stats().inflight_batches.load(Ordering::SeqCst) == 1
    })
    .await;
    // One call whose deadline passes while it waits, one whose caller goes away. The deadline
    // leaves the call time to reach the queue however loaded the machine is (a call still on
    // its way when its deadline passes is refused at admission, not expired in the queue).
    let mut timed = Request::new(req.clone());
    timed.set_timeout(Duration::from_millis(500));
    let timed = {
        let mut c = client.clone();
        tokio::spawn(async move { c.evaluate(timed).await })
    };
    eventually("the timed call is queued", || {
        server.stats().queued_requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let err = timed.await.unwrap().expect_err("expires while queued");
    // xentd answers DEADLINE_EXCEEDED 2 ms before the deadline; tonic's client enforces the
    // same grpc-timeout itself and ends the call CANCELLED ("Timeout expired") when that answer
    // is late, which a loaded machine (client and server share this runtime) sometimes makes
    // it. Either way the call ended at its deadline; that the server dropped it uncomputed is
    // checked below.
    assert!(
        err.code() == Code::DeadlineExceeded
            || (err.code() == Code::Cancelled && err.message() == "Timeout expired"),
        "{:?}: {}",
        err.code(),
        err.message()
    );
    let abandoned = {
        let (mut c, r) = (client.clone(), req.clone());
        tokio::spawn(async move { c.evaluate(r).await })
    };
    eventually("the abandoned call is queued", || {
        let s = server.stats();
        s.queued_requests.load(Ordering::SeqCst) as u64 + s.expired_in_queue.load(Ordering::SeqCst)
            == 2
    })
    .await;
    abandoned.abort();
    let stats = server.stats();
    // Both leave the queue while the pool is still blocked: neither can have been computed.
    eventually("both dropped from the queue", || {
        stats.expired_in_queue.load(Ordering::SeqCst) == 1
            && stats.abandoned_in_queue.load(Ordering::SeqCst) == 1
    })
    .await;
    drop(gate);
    assert!(first.await.unwrap().is_ok());
    assert_eq!(
        stats.computed_requests.load(Ordering::SeqCst),
        1,
        "only the first call was computed"
    );

    // Admission refuses calls that cannot meet their deadline at the measured kernel rate
    // (`batcher::meets_deadline`, unit-tested): over a socket a microsecond deadline runs out
    // while the request is still arriving, and tonic answers it before any handler runs.
    client
        .clone()
        .evaluate(req)
        .await
        .expect("later calls are served");
    assert_eq!(stats.computed_requests.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_hard_limits_are_resource_exhausted() {
    let mut s = settings(true, 1, 1, 0);
    s.batcher.max_request_elements = 1000;
    let server = TestServer::with_settings(s).await;
    let mut client = server.client().await;
    let req = EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 1000], values(2000, 0), true)),
        labels: Some(encode(&[2], vec![0i64, 1], true)),
        ..Default::default()
    };
    let err = client
        .evaluate(req)
        .await
        .expect_err("over the element limit");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    assert!(err.get_details_retry_info().is_none(), "not worth retrying");
}

#[test]
fn close_reasons_have_stable_labels() {
    let labels: Vec<&str> = CloseReason::ALL.iter().map(|r| r.label()).collect();
    assert_eq!(
        labels,
        [
            "full_rows",
            "full_bytes",
            "delay_expired",
            "queue_empty",
            "large_request"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_answers_are_verified_in_float64_and_within_the_contract() {
    let mut s = settings(true, 2, 2, 0);
    s.verify_fraction = 1.0;
    let server = TestServer::with_settings(s).await;
    let mut client = server.client().await;
    let reqs = mixed_requests();
    for r in &reqs[..12] {
        client.evaluate(r.clone()).await.expect("answered");
    }
    let v = server.batcher.verifier().expect("a verifier runs").stats();
    eventually("some answers verified", || {
        v.requests.load(Ordering::SeqCst) >= 1
    })
    .await;
    // Samples are dropped rather than queued when the verifier is busy; give it the rest.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(v.rows.load(Ordering::SeqCst) >= 1);
    assert!(
        v.max_error() <= 1.0,
        "the kernel is within the contract's tolerance: {}",
        v.max_error()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_over_the_size_limit_are_resource_exhausted_naming_the_limit() {
    let mut s = settings(true, 1, 1, 0);
    s.max_message_bytes = 1 << 20;
    let server = TestServer::with_settings(s).await;
    let mut client = server.client().await;
    let dense = |rows: usize| EvaluateRequest {
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[rows, 1000], values(rows * 1000, 3), true)),
        labels: Some(encode(&[rows, 1000], vec![0.001f32; rows * 1000], true)),
        outputs: vec![
            Output::Loss as i32,
            Output::GradLogits as i32,
            Output::GradLabels as i32,
        ],
        ..Default::default()
    };
    let too_large = |err: &tonic::Status, size: &str| {
        assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
        for part in [size, "at most 1048576 bytes", "--max-message-bytes"] {
            assert!(err.message().contains(part), "{part}: {}", err.message());
        }
        assert!(err.get_details_retry_info().is_none(), "not worth retrying");
    };
    // 2 x 400 rows x 1000 x 4 bytes = 3.2 MB in.
    let big = dense(400);
    let err = client
        .evaluate(big.clone())
        .await
        .map(|_| ())
        .expect_err("request too large");
    too_large(
        &err,
        &format!("request message is {} bytes", big.encoded_len()),
    );

    // In a stream, the requests before the oversized one are answered, then the stream ends.
    let small = EvaluateRequest {
        request_id: "small".into(),
        ..dense(10)
    };
    let outbound = futures::stream::iter([small.clone(), big.clone(), small]);
    let mut answers = client
        .evaluate_stream(outbound)
        .await
        .expect("stream opens")
        .into_inner();
    let first = answers.message().await.expect("first answer").unwrap();
    assert_eq!(first.request_id, "small");
    assert!(matches!(
        first.result,
        Some(xent::proto::evaluate_stream_response::Result::Response(_))
    ));
    let err = answers.message().await.expect_err("the oversized message");
    too_large(
        &err,
        &format!("request message is {} bytes", big.encoded_len()),
    );

    // Raw bfloat16 in (2 x 160k x 2 bytes = 0.64 MB), both gradients as typed float fields out
    // (2 x 160k x 4 bytes = 1.28 MB): refused before it is computed.
    let n = 160 * 1000;
    let halves = |v: f32| vec![bf16::from_f32(v); n];
    let answer_too_large = EvaluateRequest {
        loss: LossKind::SoftmaxCrossEntropy as i32,
        logits: Some(encode(&[160, 1000], halves(0.5), true)),
        labels: Some(encode(&[160, 1000], halves(0.001), true)),
        outputs: vec![Output::GradLogits as i32, Output::GradLabels as i32],
        response_encoding: xent::proto::Encoding::Typed as i32,
        ..Default::default()
    };
    let computed = server.stats().computed_requests.load(Ordering::SeqCst);
    let err = client
        .evaluate(answer_too_large.clone())
        .await
        .map(|_| ())
        .expect_err("answer too large");
    too_large(&err, "answer would be at least 1280000 bytes");
    let mut answers = client
        .evaluate_stream(futures::stream::iter([answer_too_large]))
        .await
        .expect("stream opens")
        .into_inner();
    match answers
        .message()
        .await
        .expect("an in-stream answer")
        .unwrap()
        .result
    {
        Some(xent::proto::evaluate_stream_response::Result::Error(e)) => {
            assert_eq!(e.code, Code::ResourceExhausted as i32, "{}", e.message);
            assert!(e.message.contains("at least 128000"), "{}", e.message);
        }
        other => panic!("expected an in-stream error, got {other:?}"),
    }
    assert_eq!(
        server.stats().computed_requests.load(Ordering::SeqCst),
        computed,
        "neither was computed"
    );

    // Exactly 1 MiB of gradient data (bfloat16 in, typed float fields out) fits; its shape and
    // framing do not: refused once its exact size is known.
    let exact = EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(
            &[256, 1024],
            values(256 * 1024, 5)
                .into_iter()
                .map(bf16::from_f32)
                .collect(),
            true,
        )),
        labels: Some(encode(&[256], vec![3i64; 256], true)),
        outputs: vec![Output::GradLogits as i32],
        response_encoding: xent::proto::Encoding::Typed as i32,
        ..Default::default()
    };
    let err = client
        .evaluate(exact)
        .await
        .map(|_| ())
        .expect_err("answer over the limit by its framing");
    too_large(&err, "answer is 1048");

    assert!(
        client.evaluate(dense(10)).await.is_ok(),
        "the server goes on"
    );
}

/// The Prometheus exposition served at `addr`, once it answers.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read as _, Write as _};
    for _ in 0..300 {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: xentd\r\n\r\n");
            let mut body = String::new();
            if s.read_to_string(&mut body).is_ok() && body.contains("xent_") {
                return body;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no metrics at {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_counted_as_refused_calls_and_shed() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (mut child, endpoint) = spawn_xentd(
        &[
            "--max-message-bytes",
            "1048576",
            "--metrics-listen",
            &metrics.to_string(),
        ],
        Stdio::null(),
    );
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = xent::proto::xent_client::XentClient::new(channel)
        .max_encoding_message_size(crate::common::CLIENT_MAX_MESSAGE);
    let rows = 300;
    let err = client
        .evaluate(EvaluateRequest {
            loss: LossKind::SparseSoftmaxCrossEntropy as i32,
            logits: Some(encode(&[rows, 1000], values(rows * 1000, 1), true)),
            labels: Some(encode(&[rows], vec![0i64; rows], true)),
            ..Default::default()
        })
        .await
        .expect_err("over the limit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let body = scrape(metrics).await;
    let _ = child.kill();
    let _ = child.wait();
    for series in [
        "xent_shed_total{reason=\"too_large\"} 1",
        "xent_calls_total{method=\"Evaluate\",code=\"RESOURCE_EXHAUSTED\"} 1",
    ] {
        assert!(body.contains(series), "{series} in\n{body}");
    }
}
