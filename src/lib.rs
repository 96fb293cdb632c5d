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
//! - [`bench`]: the load generator behind `xent bench`.
//! - [`error`]: the one error enum and its mapping to gRPC status codes.
//! - [`metrics`]: every exported metric's name and the Prometheus exporter.
//! - [`cpus`]: the CPUs the process may use (cores and cgroup quota), for the default pools.
#![deny(missing_docs)]

pub mod api;
pub mod batcher;
pub mod bench;
pub mod client;
pub mod compute;
pub mod config;
pub mod cpus;
pub mod dtype;
pub mod error;
pub mod eval;
pub mod kernel;
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
