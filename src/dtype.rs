//! Element types as the service names and handles them, and the one place that lists them
//! for dispatch.
//!
//! The types themselves ([`DType`], and the [`Element`] and [`Calc`] traits that say how each
//! float type is computed) belong to the kernel, which must depend on nothing above it; this
//! module re-exports them for the rest of the service and adds what only the service needs:
//! the dtype of every element type, integers included, the contract's tolerances, and the
//! dispatch from a dtype known at run time to code written once, generically, for its element
//! type. (Their names, as every API spells them, are in `eval::names`.)
//!
//! Dispatch is by these macros, the only place outside the kernel and the protocols' name
//! tables that lists the element types: [`with_dtype!`](crate::with_dtype) and
//! [`with_float!`](crate::with_float) from a [`DType`] to a generic body,
//! [`float_enum!`](crate::float_enum) to declare an enum with a variant per float dtype, and
//! [`match_float!`](crate::match_float) to run a generic body on whichever variant a value
//! holds. A new dtype is added to them (and to the kernel's `DType` and `Element`); every match
//! they expand is exhaustive, so the build says what else needs it.

pub use crate::kernel::dtype::{Calc, DType, Element};

/// The dtype of an element type, integers included (the kernel's [`Element`] is for the float
/// types it computes with).
pub trait HasDType: bytemuck::Pod + Send + Sync {
    /// The dtype.
    const DTYPE: DType;
}

/// Each element type and its dtype.
macro_rules! has_dtype {
    ($($t:ty => $d:ident),*) => {$(
        impl HasDType for $t {
            const DTYPE: DType = DType::$d;
        }
    )*};
}

has_dtype!(half::f16 => F16, half::bf16 => BF16, f32 => F32, f64 => F64, i32 => I32, i64 => I64);

/// The contract's `(rel, abs)` tolerance of a dtype against a float64 reference (semantics
/// §8); integers are exact.
pub fn tolerance(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F64 => (1e-9, 1e-12),
        DType::F32 => (3e-5, 2e-6),
        DType::F16 => (4e-3, 1e-4),
        DType::BF16 => (2e-2, 1e-3),
        DType::I32 | DType::I64 => (0.0, 0.0),
    }
}

/// Evaluates `$body` with the type alias `$T` naming the element type of `$dtype` (a
/// [`DType`], any of the six).
///
/// ```
/// use xent::dtype::DType;
/// let size = xent::with_dtype!(DType::BF16, T => std::mem::size_of::<T>());
/// assert_eq!(size, 2);
/// ```
#[macro_export]
macro_rules! with_dtype {
    ($dtype:expr, $T:ident => $body:expr $(,)?) => {
        match $dtype {
            $crate::dtype::DType::I32 => {
                type $T = i32;
                $body
            }
            $crate::dtype::DType::I64 => {
                type $T = i64;
                $body
            }
            float => $crate::with_float!(float, $T => $body, int => unreachable!("{float} is a float dtype")),
        }
    };
}

/// Evaluates `$body` with the type alias `$T` naming the element type of `$dtype` when it is
/// a float dtype, else `$int`.
///
/// ```
/// use xent::dtype::{DType, Element};
/// let name = xent::with_float!(DType::F16, T => <T as Element>::DTYPE.name(), int => "an integer");
/// assert_eq!(name, "float16");
/// ```
#[macro_export]
macro_rules! with_float {
    ($dtype:expr, $T:ident => $body:expr, int => $int:expr $(,)?) => {
        match $dtype {
            $crate::dtype::DType::F16 => {
                type $T = ::half::f16;
                $body
            }
            $crate::dtype::DType::BF16 => {
                type $T = ::half::bf16;
                $body
            }
            $crate::dtype::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::dtype::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::dtype::DType::I32 | $crate::dtype::DType::I64 => $int,
        }
    };
}

/// Declares an enum with one variant per float dtype, each holding `$Inner<T>` for the
/// variant's element type `T`, with a `dtype()` method and a `From<$Inner<T>>` for each `T`.
#[macro_export]
macro_rules! float_enum {
    ($(#[$meta:meta])* $vis:vis enum $Enum:ident($Inner:ident)) => {
        $(#[$meta])*
        $vis enum $Enum {
            /// float16.
            F16($Inner<::half::f16>),
            /// bfloat16.
            BF16($Inner<::half::bf16>),
            /// float32.
            F32($Inner<f32>),
            /// float64.
            F64($Inner<f64>),
        }

        impl $Enum {
            /// The float dtype.
            pub fn dtype(&self) -> $crate::dtype::DType {
                match self {
                    $Enum::F16(_) => $crate::dtype::DType::F16,
                    $Enum::BF16(_) => $crate::dtype::DType::BF16,
                    $Enum::F32(_) => $crate::dtype::DType::F32,
                    $Enum::F64(_) => $crate::dtype::DType::F64,
                }
            }
        }

        impl From<$Inner<::half::f16>> for $Enum {
            fn from(v: $Inner<::half::f16>) -> Self {
                $Enum::F16(v)
            }
        }

        impl From<$Inner<::half::bf16>> for $Enum {
            fn from(v: $Inner<::half::bf16>) -> Self {
                $Enum::BF16(v)
            }
        }

        impl From<$Inner<f32>> for $Enum {
            fn from(v: $Inner<f32>) -> Self {
                $Enum::F32(v)
            }
        }

        impl From<$Inner<f64>> for $Enum {
            fn from(v: $Inner<f64>) -> Self {
                $Enum::F64(v)
            }
        }
    };
}

/// Matches `$value`, of an enum declared with [`float_enum!`](crate::float_enum) and named
/// `$Enum` where this is used, and evaluates `$body` with its contents bound to `$x` (a
/// different element type in each arm, so `$body` is generic code).
#[macro_export]
macro_rules! match_float {
    ($value:expr, $Enum:ident, $x:pat => $body:expr $(,)?) => {
        match $value {
            $Enum::F16($x) => $body,
            $Enum::BF16($x) => $body,
            $Enum::F32($x) => $body,
            $Enum::F64($x) => $body,
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatch_reaches_each_element_type() {
        use crate::eval::Named;
        for &d in DType::ALL {
            assert_eq!(
                crate::with_dtype!(d, T => std::mem::size_of::<T>()),
                d.size()
            );
            let float = crate::with_float!(d, T => Some(<T as Element>::DTYPE), int => None);
            assert_eq!(float, d.is_float().then_some(d));
        }
        assert_eq!("bfloat16".parse::<DType>(), Ok(DType::BF16));
        assert!("bf16".parse::<DType>().is_err());
    }
}
