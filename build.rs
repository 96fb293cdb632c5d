//! Compiles `proto/` with protox, a pure-Rust protobuf compiler, so a build needs no system
//! `protoc`: the xent.v1 API and the Open Inference Protocol subset xentd serves beside it. The
//! encoded descriptor set (both packages) is written to `OUT_DIR` for gRPC server reflection,
//! and the list of every RPC's path and name (`methods.rs`), so that what applies to each
//! RPC (the message size limit) is applied from the protos themselves and a new RPC cannot
//! be left out.

use std::path::PathBuf;

use protox::prost::Message as _;

const PROTOS: &[&str] = &[
    "proto/xent/v1/xent.proto",
    "proto/inference/grpc_service.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
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
        // Tensor payloads decode as `bytes::Bytes` slices of the received frame: no copy.
        .bytes(".xent.v1.Tensor.raw_data")
        .bytes(".inference.ModelInferRequest.raw_input_contents")
        .bytes(".inference.ModelInferResponse.raw_output_contents")
        .compile_fds(fds)?;
    Ok(())
}
