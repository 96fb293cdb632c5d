//! `xent.v1.Tensor` to typed buffers and back, for the server's decoder and the client alike.
//!
//! Decoding checks everything a tensor can get wrong on its own (dtype, shape, data length,
//! which data field is used) and reports it as a [`TensorError`]; the caller names the field.
//! Raw bytes become a [`Buf`] that borrows the received frame where it can.

use half::{bf16, f16};

use crate::dtype::{DType, HasDType};
use crate::proto;
pub use crate::tensor::{AnyTensor, Shaped};
use crate::tensor::{Buf, TensorElement};

/// What is wrong with one tensor, without the name of the field it came in.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum TensorError {
    /// The message is absent.
    #[error("is required")]
    Missing,
    /// `dtype` is unset or unknown.
    #[error(
        "has no valid dtype (got {0}); expected one of float16, bfloat16, float32, float64, int32, int64"
    )]
    UnknownDType(i32),
    /// A dimension is negative.
    #[error("has a negative dimension {dim} at position {pos} of its shape")]
    NegativeDim {
        /// The dimension's position.
        pos: usize,
        /// Its value.
        dim: i64,
    },
    /// The element count (or its byte size) does not fit in memory addressing.
    #[error(
        "has a shape {} whose element count overflows (its dimensions other than 0 multiplied, in bytes)",
        crate::echo::Shape(shape)
    )]
    ShapeOverflow {
        /// The shape as received.
        shape: Vec<i64>,
    },
    /// More than one data field is set.
    #[error("sets more than one data field ({0}); set exactly one")]
    SeveralDataFields(String),
    /// The typed field used does not belong to the dtype.
    #[error("carries {field} for dtype {dtype}; use raw_data or {expected}")]
    WrongDataField {
        /// The field that was set.
        field: &'static str,
        /// The tensor's dtype.
        dtype: DType,
        /// The field that goes with the dtype.
        expected: &'static str,
    },
    /// The data does not have as many elements as the shape says.
    #[error(
        "has {got} {unit} of data but shape {} with dtype {dtype} needs {want}",
        crate::echo::Shape(shape)
    )]
    WrongLength {
        /// The shape.
        shape: Vec<usize>,
        /// The dtype.
        dtype: DType,
        /// Bytes or elements.
        unit: &'static str,
        /// Received count.
        got: usize,
        /// Needed count.
        want: usize,
    },
}

/// The API's dtype enum to ours.
pub fn dtype_from_proto(v: i32) -> Option<DType> {
    match proto::DType::try_from(v).ok()? {
        proto::DType::DtypeUnspecified => None,
        proto::DType::DtypeFloat16 => Some(DType::F16),
        proto::DType::DtypeBfloat16 => Some(DType::BF16),
        proto::DType::DtypeFloat32 => Some(DType::F32),
        proto::DType::DtypeFloat64 => Some(DType::F64),
        proto::DType::DtypeInt32 => Some(DType::I32),
        proto::DType::DtypeInt64 => Some(DType::I64),
    }
}

/// Ours to the API's.
pub fn dtype_to_proto(d: DType) -> proto::DType {
    match d {
        DType::F16 => proto::DType::DtypeFloat16,
        DType::BF16 => proto::DType::DtypeBfloat16,
        DType::F32 => proto::DType::DtypeFloat32,
        DType::F64 => proto::DType::DtypeFloat64,
        DType::I32 => proto::DType::DtypeInt32,
        DType::I64 => proto::DType::DtypeInt64,
    }
}

/// Checks a shape and returns it as `usize` with its element count.
///
/// The element count must fit, and so must the product of the dimensions other than zero,
/// times the element size: ndarray (and so every view the kernel and the validation take)
/// refuses a shape whose nonzero dimensions overflow `isize` in bytes even when one dimension
/// is zero, so `[0, 2^62, 4]`, which holds no element, is refused here rather than met there.
pub fn checked_shape(shape: &[i64], dtype: DType) -> Result<(Vec<usize>, usize), TensorError> {
    let overflow = || TensorError::ShapeOverflow {
        shape: shape.to_vec(),
    };
    let mut dims = Vec::with_capacity(shape.len());
    let mut nonzero: usize = 1;
    for (pos, &dim) in shape.iter().enumerate() {
        let d = usize::try_from(dim).map_err(|_| TensorError::NegativeDim { pos, dim })?;
        if d != 0 {
            nonzero = nonzero.checked_mul(d).ok_or_else(overflow)?;
        }
        dims.push(d);
    }
    // The byte size must be addressable too (and within isize for slices).
    nonzero
        .checked_mul(dtype.size())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(overflow)?;
    let count = if dims.contains(&0) { 0 } else { nonzero };
    Ok((dims, count))
}

/// Decodes a received tensor, taking ownership so raw bytes are borrowed, not copied.
pub fn decode(t: Option<proto::Tensor>) -> Result<AnyTensor, TensorError> {
    let mut t = t.ok_or(TensorError::Missing)?;
    let dtype = dtype_from_proto(t.dtype).ok_or(TensorError::UnknownDType(t.dtype))?;
    let (shape, count) = checked_shape(&t.shape, dtype)?;
    let set: Vec<&'static str> = [
        ("raw_data", !t.raw_data.is_empty()),
        ("float_data", !t.float_data.is_empty()),
        ("double_data", !t.double_data.is_empty()),
        ("int32_data", !t.int32_data.is_empty()),
        ("int64_data", !t.int64_data.is_empty()),
    ]
    .into_iter()
    .filter_map(|(name, present)| present.then_some(name))
    .collect();
    if set.len() > 1 {
        return Err(TensorError::SeveralDataFields(set.join(", ")));
    }
    let field = set.first().copied().unwrap_or("raw_data");
    let expected = typed_field(dtype);
    if field != "raw_data" && field != expected {
        return Err(TensorError::WrongDataField {
            field,
            dtype,
            expected,
        });
    }
    let wrong_len = |unit, got| TensorError::WrongLength {
        shape: shape.clone(),
        dtype,
        unit,
        got,
        want: if unit == "bytes" {
            count * dtype.size()
        } else {
            count
        },
    };
    if field == "raw_data" {
        let raw = std::mem::take(&mut t.raw_data);
        if raw.len() != count * dtype.size() {
            return Err(wrong_len("bytes", raw.len()));
        }
        return Ok(crate::with_dtype!(dtype, T => {
            let data = Buf::<T>::from_le_bytes(raw).expect("length checked against the shape");
            AnyTensor::from(Shaped { shape, data })
        }));
    }
    crate::with_dtype!(dtype, T => {
        let got = T::typed_len(&t);
        if got != count {
            return Err(wrong_len("elements", got));
        }
        let data = Buf::from_vec(T::take_typed(&mut t));
        Ok(AnyTensor::from(Shaped { shape, data }))
    })
}

/// The typed data field that goes with a dtype.
pub fn typed_field(dtype: DType) -> &'static str {
    crate::with_dtype!(dtype, T => T::TYPED_FIELD)
}

/// Bytes one element takes in its typed field (halves travel as float32 values).
pub fn typed_size(dtype: DType) -> usize {
    crate::with_dtype!(dtype, T => T::TYPED_SIZE)
}

/// Element types that can be put on the wire, and the typed field each travels in.
pub trait WireElement: TensorElement {
    /// The name of its typed field.
    const TYPED_FIELD: &'static str;
    /// Bytes an element takes in the typed field.
    const TYPED_SIZE: usize;
    /// Moves elements into the tensor's typed field.
    fn put_typed(v: Vec<Self>, t: &mut proto::Tensor);
    /// Elements in the tensor's typed field.
    fn typed_len(t: &proto::Tensor) -> usize;
    /// Takes the elements out of the tensor's typed field.
    fn take_typed(t: &mut proto::Tensor) -> Vec<Self>;
    /// Takes a decoded tensor of this element type, if it is one.
    fn take(t: AnyTensor) -> Option<Shaped<Self>> {
        Self::from_any(t).ok()
    }
}

/// The element types whose typed field holds them as they are.
macro_rules! wire_element {
    ($($t:ty => $field:ident),*) => {$(
        impl WireElement for $t {
            const TYPED_FIELD: &'static str = stringify!($field);
            const TYPED_SIZE: usize = std::mem::size_of::<$t>();
            fn put_typed(v: Vec<Self>, t: &mut proto::Tensor) {
                t.$field = v;
            }
            fn typed_len(t: &proto::Tensor) -> usize {
                t.$field.len()
            }
            fn take_typed(t: &mut proto::Tensor) -> Vec<Self> {
                std::mem::take(&mut t.$field)
            }
        }
    )*};
}

/// The half types, which travel in `float_data` as their (exact) float32 values.
macro_rules! half_wire_element {
    ($($t:ident),*) => {$(
        impl WireElement for $t {
            const TYPED_FIELD: &'static str = "float_data";
            const TYPED_SIZE: usize = 4;
            fn put_typed(v: Vec<Self>, t: &mut proto::Tensor) {
                t.float_data = v.iter().map(|x| x.to_f32()).collect();
            }
            fn typed_len(t: &proto::Tensor) -> usize {
                t.float_data.len()
            }
            fn take_typed(t: &mut proto::Tensor) -> Vec<Self> {
                t.float_data.iter().map(|&v| $t::from_f32(v)).collect()
            }
        }
    )*};
}

wire_element!(f32 => float_data, f64 => double_data, i32 => int32_data, i64 => int64_data);
half_wire_element!(f16, bf16);

/// Encodes elements and a shape as a tensor, raw bytes (no copy) or typed.
pub fn encode<T: WireElement>(shape: &[usize], data: Vec<T>, raw: bool) -> proto::Tensor {
    encode_buf(shape, Buf::from_vec(data), raw)
}

/// Encodes a buffer and a shape as a tensor: raw bytes moved in (no copy), or the typed field
/// (no copy of owned `f32`, `f64` and integer elements).
pub fn encode_buf<T: WireElement>(shape: &[usize], data: Buf<T>, raw: bool) -> proto::Tensor {
    let mut t = proto::Tensor {
        dtype: dtype_to_proto(<T as HasDType>::DTYPE) as i32,
        shape: shape.iter().map(|&d| d as i64).collect(),
        ..Default::default()
    };
    if raw {
        t.raw_data = data.into_le_bytes();
    } else {
        T::put_typed(data.into_vec(), &mut t);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::strategy::Just;

    fn f32_tensor(shape: Vec<i64>, raw: Vec<u8>) -> proto::Tensor {
        proto::Tensor {
            dtype: proto::DType::DtypeFloat32 as i32,
            shape,
            raw_data: raw.into(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_round_trip() {
        for raw in [true, false] {
            let t = encode(&[2, 2], vec![1.0f32, 2.0, 3.0, 4.0], raw);
            let AnyTensor::F32(s) = decode(Some(t)).unwrap() else {
                panic!("dtype")
            };
            assert_eq!(s.shape, vec![2, 2]);
            assert_eq!(&*s.data.slice(), &[1.0, 2.0, 3.0, 4.0]);
        }
        let t = encode(&[3], vec![bf16::from_f32(0.5); 3], false);
        assert_eq!(decode(Some(t)).unwrap().dtype(), DType::BF16);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(decode(None).unwrap_err(), TensorError::Missing);
        let e = decode(Some(f32_tensor(vec![2, 3], vec![0; 20]))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "has 20 bytes of data but shape [2, 3] with dtype float32 needs 24"
        );
        let e = decode(Some(f32_tensor(vec![2, -1], vec![]))).unwrap_err();
        assert!(matches!(e, TensorError::NegativeDim { pos: 1, dim: -1 }));
        let e = decode(Some(f32_tensor(vec![1 << 40, 1 << 40], vec![]))).unwrap_err();
        assert!(matches!(e, TensorError::ShapeOverflow { .. }));
        let mut t = f32_tensor(vec![1], vec![]);
        t.double_data = vec![1.0];
        assert!(matches!(
            decode(Some(t)).unwrap_err(),
            TensorError::WrongDataField { .. }
        ));
        let mut t = f32_tensor(vec![1], vec![0; 4]);
        t.float_data = vec![1.0];
        assert!(matches!(
            decode(Some(t)).unwrap_err(),
            TensorError::SeveralDataFields(_)
        ));
        let mut t = f32_tensor(vec![1], vec![0; 4]);
        t.dtype = 99;
        assert_eq!(decode(Some(t)).unwrap_err(), TensorError::UnknownDType(99));
    }

    #[test]
    fn shapes_whose_nonzero_dims_overflow_are_refused_even_when_empty() {
        for dtype in [DType::F16, DType::F32, DType::F64, DType::I64] {
            for shape in [
                vec![0, 1 << 62, 4],
                vec![1 << 62, 0, 4],
                vec![0, i64::MAX],
                vec![0, 1 << 31, 1 << 31, 1 << 2],
                vec![i64::MAX, i64::MAX, 0],
            ] {
                let e = checked_shape(&shape, dtype).unwrap_err();
                assert!(matches!(e, TensorError::ShapeOverflow { .. }), "{shape:?}");
            }
        }
        assert_eq!(checked_shape(&[0, 1 << 20, 4], DType::F32).unwrap().1, 0);
        assert_eq!(checked_shape(&[], DType::F32).unwrap(), (vec![], 1));
        assert_eq!(checked_shape(&[3, 0], DType::F32).unwrap(), (vec![3, 0], 0));
    }

    proptest::proptest! {
        /// Whatever the shape, `checked_shape` either refuses it or returns a shape that
        /// ndarray takes and an element count equal to its product.
        #[test]
        fn checked_shapes_are_ones_ndarray_takes(
            shape in proptest::collection::vec(
                proptest::prop_oneof![
                    Just(0i64), 1i64..5, Just(1i64 << 31), Just(1i64 << 62), Just(i64::MAX), Just(-1i64)
                ],
                0..6,
            ),
        ) {
            if let Ok((dims, count)) = checked_shape(&shape, DType::F64) {
                let product: u128 = dims.iter().map(|&d| d as u128).product();
                proptest::prop_assert_eq!(product, count as u128);
                let view = ndarray::ArrayViewD::<f64>::from_shape(ndarray::IxDyn(&dims), &[]);
                if count == 0 {
                    proptest::prop_assert!(view.is_ok(), "{:?}", dims);
                }
            }
        }
    }

    #[test]
    fn empty_tensors_need_no_data() {
        let t = f32_tensor(vec![0, 5], vec![]);
        assert_eq!(decode(Some(t)).unwrap().shape(), &[0, 5]);
    }
}
