//! Element types the kernel computes with, and the one place that says how each is computed.
//!
//! Half types are computed in `f32` and rounded once at the end (as `tf.nn` does); `f32` is
//! computed in `f32` with row sums accumulated in `f64`; `f64` in `f64`. The [`Element`] trait
//! carries that choice as an associated type, so the kernel is written once and monomorphised
//! per dtype. The service's `dtype` module builds on these types (it re-exports them and adds
//! what only the service needs); they live here so the kernel depends on nothing above it.

use std::fmt;

use half::{bf16, f16};

/// A tensor's element type as named in the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary16.
    F16,
    /// bfloat16 (the upper half of an IEEE 754 binary32).
    BF16,
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary64.
    F64,
    /// 32-bit signed integer (class ids).
    I32,
    /// 64-bit signed integer (class ids).
    I64,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// Whether this is one of the float types losses are computed in.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }

    /// The lower-case name used in documents and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I32 => "int32",
            DType::I64 => "int64",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The float type a row is computed in: `f32` or `f64`.
pub trait Calc: num_traits::Float + Copy + Send + Sync + fmt::Debug + Into<f64> + 'static {
    /// Rounds an `f64` to this type.
    fn from_f64(v: f64) -> Self;
}

impl Calc for f32 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Calc for f64 {
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// A float element type of logits, labels and outputs.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + fmt::Debug + PartialEq + 'static {
    /// The type this element is computed in.
    type Calc: Calc;
    /// Its API name.
    const DTYPE: DType;
    /// Widens to the compute type (exact).
    fn load(self) -> Self::Calc;
    /// Rounds from the compute type (once, to nearest even).
    fn store(v: Self::Calc) -> Self;
    /// Rounds from `f64` (once, to nearest even).
    fn from_f64(v: f64) -> Self;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
}

impl Element for f16 {
    type Calc = f32;
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        f16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        f16::from_f64(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

impl Element for bf16 {
    type Calc = f32;
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        bf16::from_f32(v)
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        bf16::from_f64(v)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

impl Element for f32 {
    type Calc = f32;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    type Calc = f64;
    const DTYPE: DType = DType::F64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn from_f64(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_rounding_is_to_nearest() {
        assert_eq!(<f16 as Element>::from_f64(1.0 + 1.0 / 4096.0).to_f64(), 1.0);
        assert_eq!(<bf16 as Element>::store(3.0).to_f64(), 3.0);
        assert_eq!(DType::BF16.size(), 2);
        assert!(!DType::I64.is_float());
    }
}
