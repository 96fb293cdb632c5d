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
//! - [`echo`]: bounded, escaped display of client input in errors and logs.
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
pub mod echo;
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
    /// The encoded `FileDescriptorSet` of `proto/xent` and `proto/inference`, served by gRPC
    /// reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("xent_descriptor");

    /// Every RPC of `proto/` (both packages, served or not), as `(path, method name)`: e.g.
    /// `("/xent.v1.Xent/Evaluate", "Evaluate")`. Written by build.rs from the protos.
    pub const METHODS: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/methods.rs"));
    /// The encoded `FileDescriptorSet` of googleapis' `google/rpc/status.proto` and
    /// `error_details.proto`, with the well-known types they import. Served by gRPC reflection
    /// so that a client can decode the error details xentd sends; their Rust types are
    /// `tonic_types::pb`.
    pub const ERROR_DETAILS_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("error_details_descriptor");

    /// The KServe v2 Open Inference Protocol (`inference.GRPCInferenceService`), generated from
    /// `proto/inference/grpc_service.proto`.
    pub mod inference {
        #![allow(missing_docs, clippy::all, clippy::pedantic)]
        tonic::include_proto!("inference");
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use prost_types::FileDescriptorSet;

    /// The error details reflection describes are the ones xentd encodes: every message of
    /// `proto/google/rpc` has the fields of tonic-types' copy, tag for tag.
    #[test]
    fn served_error_details_match_the_encoded_types() {
        let served = FileDescriptorSet::decode(crate::proto::ERROR_DETAILS_DESCRIPTOR_SET).unwrap();
        let encoded = FileDescriptorSet::decode(tonic_types::pb::FILE_DESCRIPTOR_SET).unwrap();
        let messages = |set: &FileDescriptorSet| {
            let mut all: Vec<_> = set
                .file
                .iter()
                .filter(|f| f.package() == "google.rpc")
                .flat_map(|f| f.message_type.clone())
                .collect();
            all.sort_by(|a, b| a.name().cmp(b.name()));
            all
        };
        let (served, encoded) = (messages(&served), messages(&encoded));
        let names = |m: &[prost_types::DescriptorProto]| -> Vec<String> {
            m.iter().map(|m| m.name().to_owned()).collect()
        };
        assert!(names(&served).contains(&"BadRequest".to_owned()));
        assert_eq!(names(&served), names(&encoded));
        for (s, e) in served.iter().zip(&encoded) {
            assert_eq!(s, e, "google.rpc.{} differs from tonic-types'", s.name());
        }
    }
}
