//! The class axis: how an N-D tensor is seen as rows.
//!
//! A row-major tensor with the class axis at `axis` is viewed as `(outer, classes, inner)`:
//! `outer` is the product of the dimensions before the axis and `inner` of those after it.
//! Row `r = o * inner + i` holds the elements at `o * classes * inner + j * inner + i` for
//! `j in 0..classes`, and `r` is also the row-major index of that example in the loss shape.

/// A tensor's shape seen as `(outer, classes, inner)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Product of the dimensions before the class axis.
    pub outer: usize,
    /// Length of the class axis (`C`).
    pub classes: usize,
    /// Product of the dimensions after the class axis.
    pub inner: usize,
}

impl Layout {
    /// The layout of `shape` with the class axis at `axis` (already in `0..shape.len()`).
    pub fn new(shape: &[usize], axis: usize) -> Layout {
        Layout {
            outer: shape[..axis].iter().product(),
            classes: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        }
    }

    /// Number of rows (examples).
    pub fn rows(&self) -> usize {
        self.outer * self.inner
    }

    /// Number of elements.
    pub fn elements(&self) -> usize {
        self.rows() * self.classes
    }

    /// As a 3-D shape for ndarray.
    pub fn dims(&self) -> (usize, usize, usize) {
        (self.outer, self.classes, self.inner)
    }
}

/// Normalises an axis that may be negative; `None` when out of range for `rank`.
pub fn normalize_axis(axis: i64, rank: usize) -> Option<usize> {
    let rank = i64::try_from(rank).ok()?;
    let a = if axis < 0 { axis + rank } else { axis };
    (0..rank).contains(&a).then_some(a as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts() {
        assert_eq!(
            Layout::new(&[2, 3], 1),
            Layout {
                outer: 2,
                classes: 3,
                inner: 1
            }
        );
        assert_eq!(
            Layout::new(&[2, 3, 4, 5], 1),
            Layout {
                outer: 2,
                classes: 3,
                inner: 20
            }
        );
        assert_eq!(Layout::new(&[7], 0).rows(), 1);
        assert_eq!(Layout::new(&[0, 4], 1).rows(), 0);
    }

    #[test]
    fn axes() {
        assert_eq!(normalize_axis(-1, 3), Some(2));
        assert_eq!(normalize_axis(-3, 3), Some(0));
        assert_eq!(normalize_axis(3, 3), None);
        assert_eq!(normalize_axis(-4, 3), None);
        assert_eq!(normalize_axis(0, 0), None);
        assert_eq!(normalize_axis(i64::MIN, 2), None);
    }
}
