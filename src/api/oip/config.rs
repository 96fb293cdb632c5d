//! `ModelConfig` and `ModelStatistics`: what a model is and what it has done, in Triton's
//! terms, so that tools that plan their load from them (perf_analyzer, tritonclient) see the
//! server as it is.
//!
//! The configuration is read from the server's settings, not written beside them: the batch
//! dimension is the rows of logits whose class axis is last (the first dimension of every
//! batched input, left out of `dims` as Triton does), `max_batch_size` is the most rows a
//! request may have (`--max-request-elements`, logits of one class), and `dynamic_batching`
//! is present exactly when the batcher gathers requests, with its delay, its priority levels
//! and its queue's limit. Inputs with one value per row (sparse labels, sample weights,
//! upstream) are Triton's batch of scalars, `dims: [1]` reshaped to `[]`: clients send them
//! as `[rows, 1]` (or `[rows]`). One thing Triton's configuration cannot say: `class_weights`
//! has one value per class, not per row; like the other weights it is optional.
//!
//! The statistics are the batcher's [`ModelStats`], which count each duration where its
//! Prometheus metric records it; durations are in nanoseconds.

use super::{MODEL_VERSION, PLATFORM};
use crate::batcher::{BatcherSettings, ModelStats, Timed};
use crate::eval::{LossKind, Output};
use crate::proto::inference::model_config::SchedulingChoice;
use crate::proto::inference::model_instance_group::Kind;
use crate::proto::inference::model_queue_policy::TimeoutAction;
use crate::proto::inference::model_version_policy::{Latest, PolicyChoice};
use crate::proto::inference::{
    DataType, InferStatistics, ModelConfig, ModelDynamicBatching, ModelInput, ModelInstanceGroup,
    ModelOutput, ModelQueuePolicy, ModelStatistics, ModelTensorReshape, ModelVersionPolicy,
    StatisticDuration,
};

/// The configuration of `model` on a server whose batcher runs with `settings`.
pub fn config(model: LossKind, settings: &BatcherSettings) -> ModelConfig {
    let limits = settings.limits;
    let input = |name: &str, data_type: DataType, dims: &[i64], optional: bool| ModelInput {
        name: name.into(),
        data_type: data_type as i32,
        dims: dims.to_vec(),
        optional,
        ..Default::default()
    };
    // One value per row: Triton's batch of scalars, sent as [rows, 1], seen as [rows].
    let per_row = |name: &str, data_type: DataType, optional: bool| ModelInput {
        reshape: Some(ModelTensorReshape { shape: vec![] }),
        ..input(name, data_type, &[1], optional)
    };
    let labels = match model {
        LossKind::Dense => input("labels", DataType::TypeFp32, &[-1], false),
        LossKind::Sparse => per_row("labels", DataType::TypeInt64, false),
    };
    let output = model
        .outputs()
        .iter()
        .map(|&o| ModelOutput {
            name: o.name().into(),
            data_type: DataType::TypeFp32 as i32,
            dims: match o {
                Output::Loss => vec![],
                Output::GradLogits | Output::GradLabels => vec![-1],
            },
            ..Default::default()
        })
        .collect();
    let clamp_i32 = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
    let dynamic_batching = limits.batching.then(|| ModelDynamicBatching {
        preferred_batch_size: vec![clamp_i32(limits.max_batch_rows)],
        max_queue_delay_microseconds: u64::try_from(limits.max_delay.as_micros())
            .unwrap_or(u64::MAX),
        preserve_ordering: false,
        priority_levels: u64::from(limits.priority_levels),
        default_priority_level: u64::from(limits.priority_levels),
        default_queue_policy: Some(ModelQueuePolicy {
            timeout_action: TimeoutAction::Reject as i32,
            default_timeout_microseconds: 0,
            allow_timeout_override: true,
            max_queue_size: u32::try_from(limits.max_queue_requests).unwrap_or(u32::MAX),
        }),
        ..Default::default()
    });
    ModelConfig {
        name: model.name().into(),
        platform: PLATFORM.into(),
        version_policy: Some(ModelVersionPolicy {
            policy_choice: Some(PolicyChoice::Latest(Latest { num_versions: 1 })),
        }),
        max_batch_size: clamp_i32(settings.max_request_elements),
        input: vec![
            input("logits", DataType::TypeFp32, &[-1], false),
            labels,
            input("class_weights", DataType::TypeFp32, &[], true),
            per_row("sample_weights", DataType::TypeFp32, true),
            per_row("upstream", DataType::TypeFp32, true),
        ],
        output,
        scheduling_choice: dynamic_batching.map(SchedulingChoice::DynamicBatching),
        instance_group: vec![ModelInstanceGroup {
            name: model.name().into(),
            kind: Kind::Cpu as i32,
            count: clamp_i32(settings.max_inflight_batches),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// `ModelStatistics` of `model` from what the batcher counted.
pub fn statistics(model: LossKind, s: &ModelStats) -> ModelStatistics {
    use std::sync::atomic::Ordering::Relaxed;
    let d = |t: &Timed| {
        let (count, ns) = t.get();
        Some(StatisticDuration { count, ns })
    };
    ModelStatistics {
        name: model.name().into(),
        version: MODEL_VERSION.into(),
        last_inference: s.last_inference_ms.load(Relaxed),
        inference_count: s.inference_count.load(Relaxed),
        execution_count: s.execution_count.load(Relaxed),
        inference_stats: Some(InferStatistics {
            success: d(&s.success),
            fail: d(&s.fail),
            queue: d(&s.queue),
            compute_input: d(&s.compute_input),
            compute_infer: d(&s.compute_infer),
            compute_output: d(&s.compute_output),
            cache_hit: Some(StatisticDuration::default()),
            cache_miss: Some(StatisticDuration::default()),
        }),
        ..Default::default()
    }
}
