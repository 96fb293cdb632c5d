//! How the kernel reads its float inputs: aligned elements, or little-endian bytes at any
//! alignment.
//!
//! A tensor received over the wire is little-endian bytes at whatever offset the message's
//! framing put it, so an `f32` tensor is 4-byte aligned only one time in four. Copying such a
//! tensor whole into an aligned buffer before reading it costs a full pass over memory (8 MB at
//! 16 x 128256 `f32`) and an allocation; instead the caller hands the kernel the bytes as
//! [`LeBytes`] (inside an [`Input`]) and:
//! - the vector fast path ([`super::simd`]) reads them in place: `f32` with unaligned vector
//!   loads, halves widened a block at a time into its scratch block as they always are, single
//!   elements with unaligned loads. No copy of the tensor is made and the rows compute the
//!   same bits as from aligned elements;
//! - the general path ([`super::rows`], for class weights, a class axis that is not last,
//!   `f64`, a labels gradient, probabilities) reads ndarray views, which need aligned elements:
//!   it copies the tensor once per call into an aligned buffer ([`LeBytes::to_vec`]).
//!
//! The bytes are read as little-endian on any host. Integer class ids (one per row) are not
//! read through here: the caller copies them when they are unaligned.

use std::marker::PhantomData;
use std::ops::Range;

use bytemuck::Pod;
use ndarray::ArrayView3;

use super::{KernelError, Layout, view3};

/// Little-endian elements of type `T` in bytes of any alignment, a whole number of them.
#[derive(Clone, Copy, Debug)]
pub struct LeBytes<'a, T> {
    bytes: &'a [u8],
    elem: PhantomData<T>,
}

/// Element `T` from its little-endian bytes (exactly `size_of::<T>()` of them), at any
/// alignment.
#[inline(always)]
fn read_le<T: Pod>(b: &[u8]) -> T {
    let mut v: T = bytemuck::pod_read_unaligned(b);
    if cfg!(target_endian = "big") {
        bytemuck::bytes_of_mut(&mut v).reverse();
    }
    v
}

impl<'a, T: Pod> LeBytes<'a, T> {
    /// The bytes as elements of `T`; `None` when their length is not a whole number of them.
    pub fn new(bytes: &'a [u8]) -> Option<Self> {
        bytes
            .len()
            .is_multiple_of(size_of::<T>())
            .then_some(LeBytes {
                bytes,
                elem: PhantomData,
            })
    }

    /// The bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Number of elements.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.bytes.len() / size_of::<T>()
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Element `i` (panics when out of bounds).
    #[inline(always)]
    pub fn get(&self, i: usize) -> T {
        let s = size_of::<T>();
        read_le(&self.bytes[i * s..(i + 1) * s])
    }

    /// Elements `r`.
    #[inline(always)]
    pub fn range(&self, r: Range<usize>) -> Self {
        let s = size_of::<T>();
        LeBytes {
            bytes: &self.bytes[r.start * s..r.end * s],
            elem: PhantomData,
        }
    }

    /// The elements in order.
    #[inline(always)]
    pub fn iter(&self) -> impl Iterator<Item = T> + 'a {
        self.bytes.chunks_exact(size_of::<T>()).map(read_le)
    }

    /// Copies the elements into `dst`, which must have as many.
    #[inline(always)]
    pub fn copy_to(&self, dst: &mut [T]) {
        let out: &mut [u8] = bytemuck::cast_slice_mut(dst);
        out.copy_from_slice(self.bytes);
        if cfg!(target_endian = "big") {
            out.chunks_exact_mut(size_of::<T>())
                .for_each(<[u8]>::reverse);
        }
    }

    /// The elements in place, where the bytes are aligned for `T` (on a little-endian host).
    pub fn aligned(&self) -> Option<&'a [T]> {
        if cfg!(target_endian = "big") {
            return None;
        }
        bytemuck::try_cast_slice(self.bytes).ok()
    }

    /// The elements copied into an aligned buffer: the one full-size copy of a tensor, made
    /// for the general path (and for callers that need owned elements).
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = bytemuck::zeroed_vec(self.len());
        self.copy_to(&mut out);
        #[cfg(test)]
        copies::note(self.bytes.len());
        out
    }

    /// The same bytes as elements of `U`, of the same size (panics otherwise).
    #[inline(always)]
    pub fn cast<U: Pod>(self) -> LeBytes<'a, U> {
        assert_eq!(size_of::<T>(), size_of::<U>(), "cast between sizes");
        LeBytes {
            bytes: self.bytes,
            elem: PhantomData,
        }
    }
}

/// Contiguous elements as the kernel reads them: in place, aligned or not.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a, T> {
    /// Aligned elements.
    Slice(&'a [T]),
    /// Little-endian bytes at any alignment.
    Le(LeBytes<'a, T>),
}

impl<'a, T: Pod> Elems<'a, T> {
    /// Number of elements.
    #[inline(always)]
    pub fn len(&self) -> usize {
        match self {
            Elems::Slice(s) => s.len(),
            Elems::Le(b) => b.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` (panics when out of bounds).
    #[inline(always)]
    pub fn get(&self, i: usize) -> T {
        match self {
            Elems::Slice(s) => s[i],
            Elems::Le(b) => b.get(i),
        }
    }

    /// Elements `r`.
    #[inline(always)]
    pub fn range(&self, r: Range<usize>) -> Self {
        match self {
            Elems::Slice(s) => Elems::Slice(&s[r]),
            Elems::Le(b) => Elems::Le(b.range(r)),
        }
    }

    /// The same elements as `U`, of the same size and alignment (panics otherwise).
    #[inline(always)]
    pub fn cast<U: Pod>(self) -> Elems<'a, U> {
        match self {
            Elems::Slice(s) => Elems::Slice(bytemuck::cast_slice(s)),
            Elems::Le(b) => Elems::Le(b.cast()),
        }
    }
}

impl<'a, T> From<&'a [T]> for Elems<'a, T> {
    fn from(s: &'a [T]) -> Self {
        Elems::Slice(s)
    }
}

/// A float input (logits or dense labels) seen as `(outer, classes, inner)`.
#[derive(Clone, Copy, Debug)]
pub enum Input<'a, T> {
    /// An ndarray view (rows are read in place where it is in standard layout).
    View(ArrayView3<'a, T>),
    /// Little-endian bytes at any alignment, row-major as `layout` says.
    Le(LeBytes<'a, T>, Layout),
}

impl<'a, T> From<ArrayView3<'a, T>> for Input<'a, T> {
    fn from(v: ArrayView3<'a, T>) -> Self {
        Input::View(v)
    }
}

impl<'a, T: Pod> Input<'a, T> {
    /// Row-major elements as `(outer, classes, inner)`; refused when their number does not
    /// match `layout`.
    pub fn new(elems: Elems<'a, T>, layout: Layout) -> Result<Self, KernelError> {
        match elems {
            Elems::Slice(s) => view3(s, layout).map(Input::View),
            Elems::Le(b) if b.len() == layout.elements() => Ok(Input::Le(b, layout)),
            Elems::Le(_) => Err(KernelError::Inconsistent("buffer length")),
        }
    }

    /// `(outer, classes, inner)`.
    pub fn dim(&self) -> (usize, usize, usize) {
        match self {
            Input::View(v) => v.dim(),
            Input::Le(_, l) => (l.outer, l.classes, l.inner),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Input::View(v) => v.len(),
            Input::Le(b, _) => b.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the elements are as many as `(outer, classes, inner)` says.
    pub(super) fn consistent(&self) -> bool {
        match self {
            Input::View(_) => true,
            Input::Le(b, l) => b.len() == l.elements(),
        }
    }

    /// The elements in row-major order, read in place; `None` for a view that is not in
    /// standard layout.
    pub(super) fn contiguous(&self) -> Option<Elems<'a, T>> {
        match self {
            Input::View(v) => v.to_slice().map(Elems::Slice),
            Input::Le(b, _) => Some(Elems::Le(*b)),
        }
    }

    /// An ndarray view of the elements: the view itself, or the bytes copied into `buf`.
    pub(super) fn aligned_view<'b>(&'b self, buf: &'b mut Vec<T>) -> ArrayView3<'b, T> {
        match self {
            Input::View(v) => v.view(),
            Input::Le(b, l) => {
                let s: &[T] = match b.aligned() {
                    Some(s) => s,
                    None => {
                        *buf = b.to_vec();
                        buf
                    }
                };
                view3(s, *l).expect("the length is checked before")
            }
        }
    }
}

/// Test builds count the full-size copies [`LeBytes::to_vec`] makes on each thread, so tests
/// can tell whether a call read its inputs in place.
#[cfg(test)]
pub mod copies {
    use std::cell::Cell;

    thread_local! {
        static BYTES: Cell<usize> = const { Cell::new(0) };
    }

    pub(super) fn note(bytes: usize) {
        BYTES.with(|b| b.set(b.get() + bytes));
    }

    /// Bytes copied by [`super::LeBytes::to_vec`] on this thread so far.
    pub fn bytes() -> usize {
        BYTES.with(Cell::get)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unaligned_bytes_read_as_their_elements() {
        let v = [1.5f32, -2.0, f32::NAN, 7.25];
        let mut raw = vec![0u8; 3];
        raw.extend_from_slice(bytemuck::cast_slice(&v));
        let b = LeBytes::<f32>::new(&raw[3..]).unwrap();
        assert_eq!(b.len(), 4);
        assert_eq!(b.get(1), -2.0);
        assert_eq!(b.range(3..4).get(0), 7.25);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&b.iter().collect::<Vec<_>>()), bits(&v));
        assert_eq!(bits(&b.to_vec()), bits(&v));
        assert!(LeBytes::<f32>::new(&raw[..5]).is_none());
    }
}

/// Misaligned copies of test inputs.
#[cfg(test)]
pub mod testing {
    use bytemuck::Pod;

    use super::{Elems, LeBytes};

    /// The bytes of some elements, stored `offset` bytes past an 8-byte aligned address (so
    /// misaligned for `f32` at offsets 1 to 3, and for halves at odd offsets).
    pub struct Misaligned {
        words: Vec<u64>,
        offset: usize,
        len: usize,
    }

    impl Misaligned {
        /// `v`'s little-endian bytes at `offset` (the tests run on little-endian hosts).
        pub fn new<T: Pod>(v: &[T], offset: usize) -> Misaligned {
            let bytes: &[u8] = bytemuck::cast_slice(v);
            let mut words = vec![0u64; (offset + bytes.len()).div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[offset..offset + bytes.len()]
                .copy_from_slice(bytes);
            Misaligned {
                words,
                offset,
                len: bytes.len(),
            }
        }

        /// The bytes.
        pub fn bytes(&self) -> &[u8] {
            &bytemuck::cast_slice::<u64, u8>(&self.words)[self.offset..self.offset + self.len]
        }

        /// The bytes as elements, read through [`LeBytes`] (even where they happen to be
        /// aligned for `T`).
        pub fn elems<T: Pod>(&self) -> Elems<'_, T> {
            Elems::Le(LeBytes::new(self.bytes()).expect("a whole number of elements"))
        }
    }
}
