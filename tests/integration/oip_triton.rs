//! Triton's extensions of the Open Inference Protocol on a running xentd: the reserved request
//! parameters `priority` (levels of the queue) and `timeout` (the queue timeout), ModelConfig
//! read from the settings, ModelStatistics counted by the batcher, ModelStreamInfer through
//! the same batcher, and the RPCs xentd does not serve answering UNIMPLEMENTED with a reason.
//! Queues are made deterministic by blocking the compute pool, never by sleeping.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use xent::api::oip;
use xent::config::Settings;
use xent::proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use xent::proto::inference::infer_parameter::ParameterChoice;
use xent::proto::inference::model_config::SchedulingChoice;
use xent::proto::inference::{
    InferParameter, ModelConfigRequest, ModelInferRequest, ModelStatisticsRequest,
};
use xent::proto::{EvaluateRequest, LossKind, Reduction};

use crate::common::{CLIENT_MAX_MESSAGE, TestServer};

type OipClient = GrpcInferenceServiceClient<Channel>;

async fn oip_client(server: &TestServer) -> OipClient {
    GrpcInferenceServiceClient::new(server.channel().await)
        .max_decoding_message_size(CLIENT_MAX_MESSAGE)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE)
}

async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

/// A sparse request of `rows` rows of 64 classes, as the protocol's request, with `id`.
fn sparse(rows: usize, id: &str) -> ModelInferRequest {
    let classes = 64;
    let logits: Vec<f32> = (0..rows * classes)
        .map(|i| (i % 17) as f32 * 0.25)
        .collect();
    let ids: Vec<i64> = (0..rows as i64).map(|i| i % classes as i64).collect();
    let req = EvaluateRequest {
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(xent::api::tensor::encode(&[rows, classes], logits, true)),
        labels: Some(xent::api::tensor::encode(&[rows], ids, true)),
        reduction: Reduction::Mean as i32,
        request_id: id.into(),
        ..Default::default()
    };
    oip::infer_request(req, true).unwrap()
}

fn with(mut r: ModelInferRequest, key: &str, p: ParameterChoice) -> ModelInferRequest {
    r.parameters.insert(
        key.into(),
        InferParameter {
            parameter_choice: Some(p),
        },
    );
    r
}

/// One compute thread, one batch at a time, no gathering: requests run one by one in queue
/// order.
fn one_at_a_time() -> Settings {
    let mut s = Settings {
        compute_threads: 1,
        ..Settings::default()
    };
    s.batcher.max_inflight_batches = 1;
    s.batcher.limits.batching = false;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_level_one_runs_before_level_two_and_each_level_in_arrival_order() {
    let server = TestServer::with_settings(one_at_a_time()).await;
    let c = oip_client(&server).await;
    let mut gate = server.block_compute();
    let send = |req: ModelInferRequest| {
        let mut c = c.clone();
        let id = req.id.clone();
        let call = tokio::spawn(async move { c.model_infer(req).await.map(|_| ()) });
        (id, call)
    };
    // The first takes the only slot (behind the blocked pool); the others queue, one by one.
    let mut pending = vec![send(sparse(8, "first"))];
    eventually("the first holds the slot", || {
        server.stats().dispatched_requests.load(Ordering::SeqCst) == 1
    })
    .await;
    let level = ParameterChoice::Uint64Param;
    let queued = [
        with(sparse(8, "default-a"), "priority", level(0)),
        sparse(8, "default-b"),
        with(sparse(8, "one-a"), "priority", level(1)),
        with(sparse(8, "two"), "priority", level(2)),
        with(
            sparse(8, "one-b"),
            "priority",
            ParameterChoice::Int64Param(1),
        ),
    ];
    for (n, req) in queued.into_iter().enumerate() {
        pending.push(send(req));
        eventually("queued", || {
            server.stats().queued_requests.load(Ordering::SeqCst) == n + 1
        })
        .await;
    }
    // One request at a time: a new blocker goes onto the pool's queue behind the batch
    // dispatched last, then the current blocker is released, so exactly that batch runs and
    // the next one is dispatched behind the new blocker. Which call was computed is then the
    // one call that finishes.
    let total = pending.len();
    let mut order = Vec::new();
    for k in 1..=total {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        server.pool.spawn(move || {
            let _ = rx.recv();
        });
        drop(std::mem::replace(&mut gate, tx));
        eventually("one more computed", || {
            server.stats().computed_requests.load(Ordering::SeqCst) == k as u64
        })
        .await;
        for _ in 0..3000 {
            if pending.iter().any(|(_, call)| call.is_finished()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let finished: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].1.is_finished())
            .collect();
        assert_eq!(finished.len(), 1, "one call computed in step {k}");
        let (id, call) = pending.remove(finished[0]);
        call.await.unwrap().expect("answered");
        order.push(id);
        if k < total {
            eventually("the next dispatched", || {
                server.stats().dispatched_requests.load(Ordering::SeqCst) == k as u64 + 1
            })
            .await;
        }
    }
    drop(gate);
    assert_eq!(
        order,
        ["first", "one-a", "one-b", "default-a", "default-b", "two"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_beyond_the_levels_is_refused_naming_the_flag() {
    let server = TestServer::with_settings(one_at_a_time()).await;
    let mut c = oip_client(&server).await;
    let status = c
        .model_infer(with(
            sparse(2, "x"),
            "priority",
            ParameterChoice::Uint64Param(3),
        ))
        .await
        .expect_err("level 3 of 2");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("priority is 3;")
            && status.message().contains("--priority-levels"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeout_parameter_bounds_the_wait_in_the_queue() {
    let server = TestServer::with_settings(one_at_a_time()).await;
    let c = oip_client(&server).await;
    let gate = server.block_compute();
    let first = {
        let mut c = c.clone();
        tokio::spawn(async move { c.model_infer(sparse(4, "first")).await })
    };
    eventually("the first holds the slot", || {
        server.stats().inflight_batches.load(Ordering::SeqCst) == 1
    })
    .await;
    // 20 ms in the queue at most, while the call's own deadline is the default (60 s).
    let started = std::time::Instant::now();
    let status = c
        .clone()
        .model_infer(with(
            sparse(4, "timed"),
            "timeout",
            ParameterChoice::Int64Param(20_000),
        ))
        .await
        .expect_err("times out in the queue");
    assert_eq!(
        status.code(),
        Code::DeadlineExceeded,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("queue timeout of 20000 us"),
        "{}",
        status.message()
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(server.stats().expired_in_queue.load(Ordering::SeqCst), 1);
    let stats = server.stats().model(xent::eval::LossKind::Sparse);
    assert_eq!(stats.fail.get().0, 1, "counted as a failure of its model");
    drop(gate);
    first.await.unwrap().expect("the first is answered");
    // A timeout that is not reached changes nothing.
    c.clone()
        .model_infer(with(
            sparse(4, "roomy"),
            "timeout",
            ParameterChoice::Uint64Param(10_000_000),
        ))
        .await
        .expect("within its queue timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_config_is_read_from_the_settings() {
    let mut s = Settings::default();
    s.batcher.limits.max_delay = Duration::from_micros(1500);
    s.batcher.limits.priority_levels = 5;
    s.batcher.limits.max_queue_requests = 77;
    s.batcher.limits.max_batch_rows = 123;
    s.batcher.max_request_elements = 50_000;
    s.batcher.max_inflight_batches = 3;
    let server = TestServer::with_settings(s).await;
    let c = oip_client(&server).await;
    let config = |name: &str| {
        let mut c = c.clone();
        let name = name.to_string();
        async move {
            c.model_config(ModelConfigRequest {
                name,
                version: String::new(),
            })
            .await
        }
    };
    let cfg = config("sparse_softmax_cross_entropy")
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(cfg.name, "sparse_softmax_cross_entropy");
    assert_eq!(cfg.max_batch_size, 50_000);
    let inputs: Vec<(&str, Vec<i64>, bool)> = cfg
        .input
        .iter()
        .map(|i| (i.name.as_str(), i.dims.clone(), i.optional))
        .collect();
    assert_eq!(
        inputs,
        [
            ("logits", vec![-1], false),
            ("labels", vec![1], false),
            ("class_weights", vec![], true),
            ("sample_weights", vec![1], true),
            ("upstream", vec![1], true),
        ]
    );
    assert_eq!(
        cfg.input[1].reshape.as_ref().map(|r| r.shape.len()),
        Some(0),
        "a batch of scalars: [1] reshaped to []"
    );
    let Some(SchedulingChoice::DynamicBatching(db)) = cfg.scheduling_choice else {
        panic!("dynamic batching");
    };
    assert_eq!(db.max_queue_delay_microseconds, 1500);
    assert_eq!((db.priority_levels, db.default_priority_level), (5, 5));
    assert_eq!(db.preferred_batch_size, [123]);
    let policy = db.default_queue_policy.unwrap();
    assert_eq!(policy.max_queue_size, 77);
    assert!(policy.allow_timeout_override);
    assert_eq!(cfg.instance_group[0].count, 3);
    let dense = config("softmax_cross_entropy")
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(dense.input[1].dims, [-1], "dense labels have a class axis");
    assert_eq!(dense.output.len(), 3);
    let missing = config("resnet50").await.expect_err("unknown model");
    assert_eq!(missing.code(), Code::NotFound);
    let unbatched = TestServer::with_settings(one_at_a_time()).await;
    let cfg = oip_client(&unbatched)
        .await
        .model_config(ModelConfigRequest {
            name: "softmax_cross_entropy".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert!(
        cfg.scheduling_choice.is_none(),
        "no batching, no dynamic_batching"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_statistics_count_what_the_batcher_did() {
    let server = TestServer::start().await;
    let mut c = oip_client(&server).await;
    for rows in [3, 5] {
        c.model_infer(sparse(rows, "ok")).await.unwrap();
    }
    // Refused after validation (a level this server does not have): a failure of its model.
    let bad = with(
        sparse(2, "bad"),
        "priority",
        ParameterChoice::Uint64Param(9),
    );
    c.model_infer(bad).await.expect_err("no level 9");
    // Refused by validation: not counted (as Triton, whose statistics count requests that
    // reached their model).
    let mut malformed = sparse(2, "malformed");
    malformed.inputs[1].shape = vec![3];
    c.model_infer(malformed)
        .await
        .expect_err("labels do not match");
    let all = c
        .model_statistics(ModelStatisticsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        ["softmax_cross_entropy", "sparse_softmax_cross_entropy"]
    );
    let m = &all[1];
    assert_eq!(m.version, "1");
    assert_eq!(m.inference_count, 8, "rows answered OK");
    assert!((1..=2).contains(&m.execution_count));
    assert!(m.last_inference > 1_700_000_000_000, "ms since the epoch");
    let s = m.inference_stats.unwrap();
    let (ok, fail, queue, infer) = (
        s.success.unwrap(),
        s.fail.unwrap(),
        s.queue.unwrap(),
        s.compute_infer.unwrap(),
    );
    assert_eq!(
        (ok.count, fail.count, queue.count, infer.count),
        (2, 1, 2, 2)
    );
    assert!(
        ok.ns >= queue.ns + infer.ns,
        "a call's time covers its wait and its kernel"
    );
    assert!(infer.ns > 0);
    let kept = server.stats().model(xent::eval::LossKind::Sparse);
    assert_eq!(kept.success.get(), (ok.count, ok.ns));
    assert_eq!(all[0].inference_stats.unwrap().success.unwrap().count, 0);
    let one = c
        .model_statistics(ModelStatisticsRequest {
            name: "sparse_softmax_cross_entropy".into(),
            version: "1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .model_stats;
    assert_eq!(one.len(), 1);
    let missing = c
        .model_statistics(ModelStatisticsRequest {
            name: "sparse_softmax_cross_entropy".into(),
            version: "7".into(),
        })
        .await
        .expect_err("no version 7");
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_stream_infer_answers_each_request_in_order_and_goes_on_after_a_refusal() {
    let server = TestServer::start().await;
    let mut c = oip_client(&server).await;
    let mut bad = sparse(2, "bad");
    bad.model_name = "resnet50".into();
    let final_flag = with(
        sparse(4, "flagged"),
        "triton_enable_empty_final_response",
        ParameterChoice::BoolParam(true),
    );
    let requests = vec![sparse(3, "a"), bad, final_flag, sparse(5, "b")];
    let want: Vec<_> = {
        let mut unary = c.clone();
        let mut out = Vec::new();
        for r in [sparse(3, "a"), sparse(5, "b")] {
            out.push(unary.model_infer(r).await.unwrap().into_inner());
        }
        out
    };
    let answers: Vec<_> = {
        use futures::StreamExt;
        c.model_stream_infer(futures::stream::iter(requests))
            .await
            .unwrap()
            .into_inner()
            .map(|r| r.unwrap())
            .collect()
            .await
    };
    let ids: Vec<&str> = answers
        .iter()
        .map(|a| a.infer_response.as_ref().unwrap().id.as_str())
        .collect();
    assert_eq!(ids, ["a", "bad", "flagged", "b"]);
    assert!(
        answers[1].error_message.starts_with("model \"resnet50\""),
        "{}",
        answers[1].error_message
    );
    for i in [0, 2, 3] {
        assert_eq!(answers[i].error_message, "");
    }
    let flagged = &answers[2].infer_response.as_ref().unwrap().parameters;
    assert_eq!(
        flagged["triton_final_response"].parameter_choice,
        Some(ParameterChoice::BoolParam(true))
    );
    assert!(
        !answers[0]
            .infer_response
            .as_ref()
            .unwrap()
            .parameters
            .contains_key("triton_final_response")
    );
    // The same bits as the unary answers to the same requests.
    assert_eq!(
        answers[0]
            .infer_response
            .as_ref()
            .unwrap()
            .raw_output_contents,
        want[0].raw_output_contents
    );
    assert_eq!(
        answers[3]
            .infer_response
            .as_ref()
            .unwrap()
            .raw_output_contents,
        want[1].raw_output_contents
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rpcs_xentd_does_not_serve_say_what_it_does_instead() {
    use xent::proto::inference as pb;
    let server = TestServer::start().await;
    let mut c = oip_client(&server).await;
    let mut refusals = vec![
        c.repository_index(pb::RepositoryIndexRequest::default())
            .await
            .map(|_| ()),
        c.repository_model_load(pb::RepositoryModelLoadRequest::default())
            .await
            .map(|_| ()),
        c.repository_model_unload(pb::RepositoryModelUnloadRequest::default())
            .await
            .map(|_| ()),
        c.system_shared_memory_status(pb::SystemSharedMemoryStatusRequest::default())
            .await
            .map(|_| ()),
        c.system_shared_memory_register(pb::SystemSharedMemoryRegisterRequest::default())
            .await
            .map(|_| ()),
        c.system_shared_memory_unregister(pb::SystemSharedMemoryUnregisterRequest::default())
            .await
            .map(|_| ()),
        c.cuda_shared_memory_status(pb::CudaSharedMemoryStatusRequest::default())
            .await
            .map(|_| ()),
        c.cuda_shared_memory_register(pb::CudaSharedMemoryRegisterRequest::default())
            .await
            .map(|_| ()),
        c.cuda_shared_memory_unregister(pb::CudaSharedMemoryUnregisterRequest::default())
            .await
            .map(|_| ()),
        c.trace_setting(pb::TraceSettingRequest::default())
            .await
            .map(|_| ()),
        c.log_settings(pb::LogSettingsRequest::default())
            .await
            .map(|_| ()),
    ];
    let starts = [
        vec!["xentd has no model repository"; 3],
        vec!["xentd does not read or write shared memory"; 6],
        vec!["xentd's tracing is set when it starts"],
        vec!["xentd's logging is set when it starts"],
    ]
    .concat();
    for (r, start) in refusals.drain(..).zip(starts) {
        let status = r.expect_err("not served");
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(status.message().starts_with(start), "{}", status.message());
    }
}
