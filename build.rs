//! Compiles `proto/` with protox, a pure-Rust protobuf compiler, so a build needs no system
//! `protoc`.
//!
//! - The xent.v1 API and the Open Inference Protocol subset xentd serves beside it: Rust types
//!   and services are generated, their encoded descriptor set is written to `OUT_DIR` for gRPC
//!   server reflection, and so is the list of every RPC's path and name (`methods.rs`), so
//!   that what applies to each RPC (the message size limit) is applied from the protos
//!   themselves and a new RPC cannot be left out.
//! - `google/rpc/status.proto` and `google/rpc/error_details.proto` (googleapis' files,
//!   verbatim; the copies published in googleapis-common-protos 1.76.0): only their descriptor
//!   set is written, with `google/protobuf/any.proto` and `duration.proto` that they import.
//!   Reflection serves it so that a client without these files compiled in (grpcurl) can
//!   decode the `BadRequest`, `RetryInfo` and other details xentd attaches to its errors. The
//!   Rust types for them come from tonic-types, whose copies of the two files have the same
//!   messages and fields.

use std::path::PathBuf;

use protox::prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/xent/v1/xent.proto",
    "proto/inference/grpc_service.proto",
];

const ERROR_DETAILS_PROTOS: &[&str] = &[
    "proto/google/rpc/status.proto",
    "proto/google/rpc/error_details.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS.iter().chain(ERROR_DETAILS_PROTOS) {
        println!("cargo:rerun-if-changed={proto}");
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);

    let error_details = protox::compile(ERROR_DETAILS_PROTOS, ["proto"])?;
    std::fs::write(
        out.join("error_details_descriptor.bin"),
        error_details.encode_to_vec(),
    )?;

    let fds = protox::compile(PROTOS, ["proto"])?;
    std::fs::write(out.join("xent_descriptor.bin"), fds.encode_to_vec())?;
    let mut methods = String::from("&[\n");
    for file in &fds.file {
        let package = file.package();
        for service in &file.service {
            for method in &service.method {
                let (service, method) = (service.name(), method.name());
                methods += &format!("    (\"/{package}.{service}/{method}\", \"{method}\"),\n");
            }
        }
    }
    methods += "]\n";
    std::fs::write(out.join("methods.rs"), methods)?;
    tonic_prost_build::configure()
        // xent's codec: pre-scans requests, decodes and encodes large messages off the tokio
        // worker, and refuses undecodable ones as INVALID_ARGUMENT (src/api/codec.rs).
        .codec_path("crate::api::codec::XentCodec")
        // Tensor payloads decode as `bytes::Bytes` slices of the received frame: no copy.
        .bytes(".xent.v1.Tensor.raw_data")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(fds)?;
    Ok(())
}
