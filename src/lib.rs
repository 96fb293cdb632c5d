//! xent: softmax cross-entropy losses and their gradients, evaluated by a gRPC service.
//!
//! Layers, each depending only on those below it:
//!
//! ```text
//! bin (xentd, xent) -> server -> api -> compute -> kernel
//!                      client -> api
//! ```
//!
//! - [`kernel`]: the fused numerics over ndarray views; no async, no gRPC.
//! - [`eval`]: the validated request shared by the layers.
//! - [`api`]: the only module that converts protobuf messages (decode and validate, encode).
//! - [`compute`]: runs kernel work on a dedicated rayon pool, never on tokio's threads.
//! - [`server`]: the tonic services, health, reflection, shutdown.
//! - [`client`]: a Rust client with ndarray in and out, used by the `xent` CLI.
//! - [`loadgen`]: the load generator behind `xent bench`.
//! - [`error`]: the one error enum and its mapping to gRPC status codes.
//! - [`metrics`]: every exported metric's name and the Prometheus exporter.
#![deny(missing_docs)]

pub mod api;
pub mod batcher;
pub mod cli;
pub mod client;
pub mod compute;
pub mod config;
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
