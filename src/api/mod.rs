//! The only module that converts protobuf messages: decoding and validating requests into
//! [`crate::eval::Evaluation`], and encoding outputs into responses.

pub mod tensor;
