//! The integration tests: one binary, each module against a real xentd on a real socket.

// The xent CLI and the Rust client library.
mod cli;
mod common;
// Every reference case of tests/reference (made by TensorFlow, Keras and PyTorch) over gRPC.
mod conformance;
// Batching, backpressure, deadlines and drain under load.
mod load;
// Options, dtypes, both RPCs, errors, health, reflection and shutdown of a running server.
mod server;
