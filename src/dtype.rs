//! Element types as the service names and handles them.
//!
//! The types themselves ([`DType`], and the [`Element`] and [`Calc`] traits that say how each
//! float type is computed) belong to the kernel, which must depend on nothing above it; this
//! module re-exports them for the rest of the service.

pub use crate::kernel::dtype::{Calc, DType, Element};
