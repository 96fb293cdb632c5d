//! The service's tensors: typed element buffers, shaped, of any dtype; what every front decodes
//! into and every encoder reads from.
//!
//! A request's raw tensor bytes arrive as a [`bytes::Bytes`] slice of the message the
//! transport received (prost takes them out of the message without copying). [`Buf`] keeps
//! them as they came, aligned for the element type or not: their offset in the message is
//! whatever the protobuf framing made it, so a float32 tensor is unaligned three times in four.
//!
//! - [`Buf::elems`] is how logits and dense labels reach the kernel: the elements in place
//!   where aligned, else the received bytes themselves as [`LeBytes`], never a copy. The
//!   kernel's vector fast path reads unaligned bytes in place (unaligned vector loads); its
//!   general path (class weights, class axis not last, float64, a labels gradient,
//!   probabilities) copies them once into an aligned buffer, on the compute thread (see
//!   `kernel::Input`). Copying every tensor whole up front cost a full pass over memory and an
//!   allocation (8 MB at 16 x 128256 float32) on three calls in four.
//! - [`Buf::slice`] gives a plain `&[T]`: in place where aligned, else a copy into an aligned
//!   buffer, made on whichever thread asks (for class ids, one per row, and the few callers
//!   outside the kernel's float inputs).
//!
//! Outputs go the other way: the compute step wraps each computed `Vec<T>` in a [`Buf`], and
//! an encoder takes it back out without a copy, as bytes ([`Buf::into_le_bytes`]) or as the
//! vector ([`Buf::into_vec`]). [`Buf::share`] lets a second reader (the sampled float64
//! verifier) hold the same elements: the buffer becomes reference-counted bytes, so only a
//! typed encoding of a shared buffer copies it.
//!
//! [`Shaped`] is a buffer with its shape and [`AnyTensor`] one of any dtype, as decoded.

use std::borrow::Cow;
use std::marker::PhantomData;

use bytemuck::Pod;
use bytes::Bytes;

use half::{bf16, f16};

use crate::dtype::{DType, HasDType};
use crate::kernel::{Elems, LeBytes};

/// Elements of type `T`, either borrowed from received bytes or owned.
#[derive(Clone, Debug)]
pub struct Buf<T: Pod> {
    repr: Repr<T>,
}

#[derive(Clone, Debug)]
enum Repr<T: Pod> {
    /// Little-endian bytes as received, a whole number of elements, aligned or not.
    Shared(Bytes, PhantomData<T>),
    Owned(Vec<T>),
}

/// `raw_data` whose length is not a whole number of elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaggedBytes {
    /// The byte length received.
    pub len: usize,
    /// The element size it should be a multiple of.
    pub elem_size: usize,
}

impl<T: Pod> Buf<T> {
    /// Takes little-endian elements as received; nothing is copied on a little-endian host.
    pub fn from_le_bytes(bytes: Bytes) -> Result<Self, RaggedBytes> {
        let size = std::mem::size_of::<T>();
        if !bytes.len().is_multiple_of(size) {
            return Err(RaggedBytes {
                len: bytes.len(),
                elem_size: size,
            });
        }
        if cfg!(target_endian = "little") {
            return Ok(Buf {
                repr: Repr::Shared(bytes, PhantomData),
            });
        }
        Ok(Buf {
            repr: Repr::Owned(le_bytes::<T>(&bytes).to_vec()),
        })
    }

    /// Wraps owned elements.
    pub fn from_vec(v: Vec<T>) -> Self {
        Buf {
            repr: Repr::Owned(v),
        }
    }

    /// The elements: borrowed where they can be read in place, else copied into an aligned
    /// buffer (on every call).
    pub fn slice(&self) -> Cow<'_, [T]> {
        match self.elems() {
            Elems::Slice(s) => Cow::Borrowed(s),
            Elems::Le(b) => Cow::Owned(b.to_vec()),
        }
    }

    /// The elements as the kernel reads them, never copied: in place where aligned for `T`
    /// (or owned), else the received little-endian bytes.
    pub fn elems(&self) -> Elems<'_, T> {
        match &self.repr {
            Repr::Owned(v) => Elems::Slice(v),
            Repr::Shared(b, _) => match bytemuck::try_cast_slice(b) {
                Ok(s) => Elems::Slice(s),
                Err(_) => Elems::Le(le_bytes(b)),
            },
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.repr {
            Repr::Owned(v) => v.len(),
            Repr::Shared(b, _) => b.len() / std::mem::size_of::<T>(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether [`Buf::slice`] reads the elements in place from received bytes (they are
    /// aligned for `T`). [`Buf::elems`] reads them in place either way.
    pub fn is_borrowed(&self) -> bool {
        match &self.repr {
            Repr::Shared(b, _) => bytemuck::try_cast_slice::<u8, T>(b).is_ok(),
            Repr::Owned(_) => false,
        }
    }

    /// Another handle on the same elements, without copying them: owned elements become
    /// reference-counted bytes first (which moves the vector, it does not copy it).
    pub fn share(&mut self) -> Self
    where
        T: Send + Sync,
    {
        if let Repr::Owned(v) = &mut self.repr {
            let bytes = vec_into_bytes(std::mem::take(v));
            self.repr = Repr::Shared(bytes, PhantomData);
        }
        self.clone()
    }

    /// The elements as little-endian bytes: received or shared bytes as they are, owned
    /// elements without a copy on little-endian hosts.
    pub fn into_le_bytes(self) -> Bytes
    where
        T: Send + Sync,
    {
        match self.repr {
            Repr::Shared(b, _) => b,
            Repr::Owned(v) => vec_into_bytes(v),
        }
    }

    /// The elements as a vector: owned ones moved out, shared ones copied.
    pub fn into_vec(self) -> Vec<T> {
        match self.repr {
            Repr::Owned(v) => v,
            Repr::Shared(..) => self.slice().into_owned(),
        }
    }
}

impl<T: Pod + PartialEq> PartialEq for Buf<T> {
    fn eq(&self, other: &Self) -> bool {
        *self.slice() == *other.slice()
    }
}

/// A tensor of elements `T`: a shape and its row-major elements.
#[derive(Clone, Debug)]
pub struct Shaped<T: Pod> {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Row-major elements.
    pub data: Buf<T>,
}

impl<T: Pod> Shaped<T> {
    /// The elements as an owned n-dimensional array.
    pub fn to_array(&self) -> ndarray::ArrayD<T> {
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(&self.shape), self.data.slice().into_owned())
            .expect("shape and length are checked at decode")
    }
}

/// A tensor of any dtype.
#[derive(Clone, Debug)]
pub enum AnyTensor {
    /// float16 elements.
    F16(Shaped<f16>),
    /// bfloat16 elements.
    BF16(Shaped<bf16>),
    /// float32 elements.
    F32(Shaped<f32>),
    /// float64 elements.
    F64(Shaped<f64>),
    /// int32 elements.
    I32(Shaped<i32>),
    /// int64 elements.
    I64(Shaped<i64>),
}

impl AnyTensor {
    /// The dtype.
    pub fn dtype(&self) -> DType {
        match self {
            AnyTensor::F16(_) => DType::F16,
            AnyTensor::BF16(_) => DType::BF16,
            AnyTensor::F32(_) => DType::F32,
            AnyTensor::F64(_) => DType::F64,
            AnyTensor::I32(_) => DType::I32,
            AnyTensor::I64(_) => DType::I64,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        match self {
            AnyTensor::F16(t) => &t.shape,
            AnyTensor::BF16(t) => &t.shape,
            AnyTensor::F32(t) => &t.shape,
            AnyTensor::F64(t) => &t.shape,
            AnyTensor::I32(t) => &t.shape,
            AnyTensor::I64(t) => &t.shape,
        }
    }

    /// Every element widened to `f64`, for small float tensors (weights, upstream).
    /// `None` for integer tensors.
    pub fn floats_to_f64(&self) -> Option<Vec<f64>> {
        fn widen<T: Pod + Into<f64>>(t: &Shaped<T>) -> Vec<f64> {
            t.data.slice().iter().map(|&v| v.into()).collect()
        }
        Some(match self {
            AnyTensor::F16(t) => widen(t),
            AnyTensor::BF16(t) => widen(t),
            AnyTensor::F32(t) => widen(t),
            AnyTensor::F64(t) => widen(t),
            AnyTensor::I32(_) | AnyTensor::I64(_) => return None,
        })
    }
}

/// An element type an [`AnyTensor`] holds tensors of.
pub trait TensorElement: HasDType {
    /// The tensor as an [`AnyTensor`].
    fn into_any(t: Shaped<Self>) -> AnyTensor;
    /// The tensor `t` holds, if of this element type; else `t`, given back.
    fn from_any(t: AnyTensor) -> Result<Shaped<Self>, AnyTensor>;
}

/// Each element type and its variant of [`AnyTensor`].
macro_rules! tensor_element {
    ($($t:ty => $variant:ident),*) => {$(
        impl TensorElement for $t {
            fn into_any(t: Shaped<$t>) -> AnyTensor {
                AnyTensor::$variant(t)
            }
            fn from_any(t: AnyTensor) -> Result<Shaped<$t>, AnyTensor> {
                match t {
                    AnyTensor::$variant(s) => Ok(s),
                    other => Err(other),
                }
            }
        }
    )*};
}

tensor_element!(f16 => F16, bf16 => BF16, f32 => F32, f64 => F64, i32 => I32, i64 => I64);

impl<T: TensorElement> From<Shaped<T>> for AnyTensor {
    fn from(t: Shaped<T>) -> AnyTensor {
        T::into_any(t)
    }
}

/// Bytes whose length was checked on arrival to be a whole number of elements.
fn le_bytes<T: Pod>(bytes: &[u8]) -> LeBytes<'_, T> {
    LeBytes::new(bytes).expect("a whole number of elements, checked on arrival")
}

/// The bytes of a `Vec<T>` as little-endian [`Bytes`], without a copy on little-endian hosts.
pub fn vec_into_bytes<T: Pod + Send + Sync>(v: Vec<T>) -> Bytes {
    if cfg!(target_endian = "little") {
        Bytes::from_owner(PodVec(v))
    } else {
        let size = std::mem::size_of::<T>();
        let mut raw: Vec<u8> = bytemuck::cast_slice(&v).to_vec();
        raw.chunks_exact_mut(size).for_each(<[u8]>::reverse);
        Bytes::from(raw)
    }
}

struct PodVec<T>(Vec<T>);

impl<T: Pod> AsRef<[u8]> for PodVec<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_bytes_are_borrowed_and_round_trip() {
        let bytes = vec_into_bytes(vec![1.5f32, -2.0, 3.25]);
        let buf = Buf::<f32>::from_le_bytes(bytes).unwrap();
        assert!(buf.is_borrowed());
        assert!(matches!(buf.slice(), Cow::Borrowed(_)));
        assert_eq!(&*buf.slice(), &[1.5, -2.0, 3.25]);
    }

    #[test]
    fn unaligned_bytes_are_copied_when_read() {
        let mut raw = vec![0u8];
        raw.extend_from_slice(&7.0f64.to_le_bytes());
        raw.extend_from_slice(&(-1.0f64).to_le_bytes());
        let bytes = Bytes::from(raw).slice(1..);
        let buf = Buf::<f64>::from_le_bytes(bytes).unwrap();
        assert!(!buf.is_borrowed());
        assert!(matches!(buf.slice(), Cow::Owned(_)));
        assert_eq!(&*buf.slice(), &[7.0, -1.0]);
    }

    #[test]
    fn unaligned_bytes_reach_the_kernel_as_the_received_bytes() {
        let mut raw = vec![0u8; 3];
        for v in [1.5f32, -2.0, 3.25] {
            raw.extend_from_slice(&v.to_le_bytes());
        }
        let bytes = Bytes::from(raw);
        for offset in 1..=3 {
            let tail = bytes.slice(offset..offset + 8);
            let buf = Buf::<f32>::from_le_bytes(tail.clone()).unwrap();
            let aligned = tail.as_ptr().align_offset(4) == 0;
            match buf.elems() {
                Elems::Le(b) => {
                    assert!(!aligned);
                    // The very bytes received, not a copy.
                    assert_eq!(b.as_bytes().as_ptr(), tail.as_ptr());
                    assert_eq!(b.len(), 2);
                }
                Elems::Slice(s) => {
                    assert!(aligned);
                    assert_eq!(s.as_ptr().cast::<u8>(), tail.as_ptr());
                }
            }
        }
        let aligned = Buf::<f32>::from_le_bytes(vec_into_bytes(vec![1.0f32, 2.0])).unwrap();
        assert!(matches!(aligned.elems(), Elems::Slice(&[1.0, 2.0])));
    }

    #[test]
    fn ragged_length_is_refused() {
        let err = Buf::<f32>::from_le_bytes(Bytes::from_static(&[0, 0, 0, 0, 1])).unwrap_err();
        assert_eq!(
            err,
            RaggedBytes {
                len: 5,
                elem_size: 4
            }
        );
    }
}
