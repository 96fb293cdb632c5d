//! xent: softmax cross-entropy losses and their gradients, evaluated by a gRPC service.
//!
//! Each layer depends only on those below it (`.ci/run` checks the two rules that matter
//! most: the kernel names nothing above it, and only the fronts, the clients and the binaries
//! name the generated protobuf types):
//!
//! ```text
//! bin xentd -> server -> api (fronts: xent.v1, api::oip) --------------------+
//!                     -> batcher -> compute, verify ------------------------+ |
//! bin xent  -> loadgen, cli -> client -> api                                v v
//!                                              eval (the domain) -> tensor -> dtype -> kernel
//! ```
//!
//! and, used across the layers without pointing up: [`error`] (-> kernel), [`metrics`]
//! (-> error), [`telemetry`], [`config`] (-> batcher's settings).
//!
//! - [`kernel`]: the fused numerics over ndarray views; no async, no gRPC, no service module.
//! - [`dtype`]: the element types (the kernel's) and the one dispatch over them.
//! - [`tensor`]: shaped buffers of any dtype, borrowing received bytes where they can.
//! - [`eval`]: the domain: a request as the contract sees it, its validation, its outputs, and
//!   the vocabulary every API shares. It knows no protocol.
//! - [`compute`]: runs kernel work on a dedicated rayon pool, never on tokio's threads.
//! - [`verify`]: sampled float64 checks of answers in production.
//! - [`batcher`]: admission, the queue and its batches, dispatch onto the pool; it hands each
//!   request's outputs to the encoder its front gave.
//! - [`api`]: the fronts, the only modules that convert protobuf messages (xent.v1 and the
//!   Open Inference Protocol): decode into the domain, encode from it.
//! - [`server`]: the tonic services, health, reflection, limits, shutdown.
//! - [`client`]: a Rust client with ndarray in and out, used by the `xent` CLI.
//! - [`loadgen`]: the load generator behind `xent bench`; [`cli`]: the CLI's shared vocabulary.
//! - [`error`]: the one error enum and its mapping to gRPC status codes.
//! - [`metrics`]: every exported metric's name and the Prometheus exporter.
//! - [`cpus`]: the CPUs the process may use (cores and cgroup quota), for the default pools.
#![deny(missing_docs)]

pub mod api;
pub mod batcher;
pub mod cli;
pub mod client;
pub mod compute;
pub mod config;
pub mod cpus;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod kernel;
pub mod loadgen;
pub mod metrics;
pub mod server;
pub mod telemetry;
pub mod tensor;
pub mod verify;

/// Generated protobuf types and the service's descriptor set (for reflection).
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("xent.v1");
    /// The encoded `FileDescriptorSet` of `proto/` (xent.v1 and inference), served by gRPC
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xent_descriptor");

    /// Every RPC of `proto/` (both packages, served or not), as `(path, method name)`: e.g.
    /// `("/xent.v1.Xent/Evaluate", "Evaluate")`. Written by build.rs from the protos.
    pub const METHODS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/methods.rs"));

    /// The KServe v2 Open Inference Protocol (`inference.GRPCInferenceService`), generated from
    /// `proto/inference/grpc_service.proto`.
    pub mod inference {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("inference");
    }
}
