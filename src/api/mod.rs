//! The only module that converts protobuf messages: decoding and validating requests into
//! [`crate::eval::Evaluation`], and encoding outputs into responses. The transport above it
//! knows nothing of the math; the kernel below it knows nothing of protobuf. The Open
//! Inference Protocol ([`oip`]) is translated to and from the same messages, so it shares
//! their validation.

pub mod decode;
pub mod encode;
pub mod oip;
pub mod tensor;

pub use decode::decode;
pub use encode::response;
