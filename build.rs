//! Compiles `proto/` with protox, a pure-Rust protobuf compiler, so a build needs no system
//! `protoc`. The encoded descriptor set is written to `OUT_DIR` for gRPC server reflection.

use std::path::PathBuf;

use protox::prost::Message as _;

const PROTOS: &[&str] = &["proto/xent/v1/xent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out = PathBuf::from(std::env::var_os("OUT_DIR").ok_or("OUT_DIR not set")?);
    std::fs::write(out.join("xent_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Tensor payloads decode as `bytes::Bytes` slices of the received frame: no copy.
        .bytes(".xent.v1.Tensor.raw_data")
        .compile_fds(fds)?;
    Ok(())
}
