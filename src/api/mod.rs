//! The xent.v1 front and the Open Inference Protocol front ([`oip`]): the only modules that
//! convert protobuf messages. Each decodes its requests into the domain's
//! [`crate::eval::Evaluation`] and encodes the domain's computed outputs into its answers;
//! the transport above knows nothing of the math, and the domain below knows no protocol.
//!
//! - [`codec`]: the protobuf codec of the generated services: a pre-scan refusing what
//!   would decode to more than its shapes use, large messages handled off the tokio worker.
//! - [`decode`](mod@decode): an `EvaluateRequest` to a validated evaluation.
//! - [`encode`]: computed outputs to an `EvaluateResponse`.
//! - [`convert`]: xent.v1's enums, options and tensor fields to the domain's and back, once.
//! - [`tensor`]: xent.v1's `Tensor` to the domain's tensors and back.
//! - [`oip`]: the Open Inference Protocol, translated to the same validation.

pub mod codec;
pub mod convert;
pub mod decode;
pub mod encode;
pub mod oip;
#[cfg(test)]
mod received;
pub mod tensor;

pub use decode::decode;
pub use encode::response;
