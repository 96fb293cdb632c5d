//! Typed element buffers that may borrow the received gRPC frame.
//!
//! A request's `raw_data` arrives as a [`bytes::Bytes`] slice of the message tonic received
//! (prost takes it out of the message without copying). [`Buf`] keeps it as it came: where the
//! slice is aligned for the element type, [`Buf::slice`] reads it in place; where it is not (its
//! offset in the message is whatever the protobuf framing made it), `slice` copies it once into
//! an aligned buffer, on whichever thread asks, which for tensors is the compute pool, never
//! the async runtime. Outputs go the other way: [`vec_into_bytes`] hands a computed `Vec<T>`
//! to the encoder without copying it.

use std::borrow::Cow;
use std::marker::PhantomData;

use bytemuck::Pod;
use bytes::Bytes;

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
            repr: Repr::Owned(copy_le(&bytes)),
        })
    }

    /// Wraps owned elements.
    pub fn from_vec(v: Vec<T>) -> Self {
        Buf {
            repr: Repr::Owned(v),
        }
    }

    /// The elements: borrowed where they can be read in place, else copied once into an
    /// aligned buffer.
    pub fn slice(&self) -> Cow<'_, [T]> {
        match &self.repr {
            Repr::Owned(v) => Cow::Borrowed(v),
            Repr::Shared(b, _) => match bytemuck::try_cast_slice(b) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => Cow::Owned(copy_le(b)),
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

    /// Whether the elements are read in place from received bytes (no copy is made).
    pub fn is_borrowed(&self) -> bool {
        match &self.repr {
            Repr::Shared(b, _) => bytemuck::try_cast_slice::<u8, T>(b).is_ok(),
            Repr::Owned(_) => false,
        }
    }
}

/// Little-endian bytes (a whole number of elements) into an aligned `Vec`.
fn copy_le<T: Pod>(bytes: &[u8]) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    let mut out: Vec<T> = bytemuck::zeroed_vec(bytes.len() / size);
    let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut out);
    dst.copy_from_slice(bytes);
    if cfg!(target_endian = "big") {
        dst.chunks_exact_mut(size).for_each(<[u8]>::reverse);
    }
    out
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
