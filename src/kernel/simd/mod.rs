//! The vector fast path: contiguous rows (class axis last), logits in, no class weights.
//!
//! Why it looks like this:
//! - **One body, several instruction sets.** The row math ([`row`]) is written once over the
//!   16-lane operations of [`lanes::Simd`] and compiled three times: with the portable array
//!   form (the build's baseline: SSE2 on x86-64, NEON on aarch64), and with explicit AVX2 and
//!   AVX-512F intrinsics inside `#[target_feature]` wrappers chosen at run time ([`Level`]).
//!   The release binary therefore runs on any x86-64. (Left to the compiler, the array form
//!   alone ran about 42 instructions per element at every level; see BENCHMARKS.md.)
//! - **The same bits at every level.** The body uses no fused multiply-add and sums in a fixed
//!   lane order, so every level rounds identically: a row gives the same bits whatever level,
//!   thread count or batch it was computed in (tested).
//! - **Each row is read twice**: once for the statistics with an online maximum (blocks of
//!   [`row::BLOCK`] elements; the running sum is rescaled by `exp(m_old - m_new)` when a block
//!   raises the maximum), once for the gradient (which reads the stored exponentials below, and
//!   the logits only where the loss needs `x - m`: dense labels, smoothed class ids). Blocks
//!   are small enough to stay in L1 between their max and sum sweeps. Non-finite logits show
//!   as a non-finite lane sum in the max sweep; only such rows are counted exactly.
//! - **Each exponential is computed once** when a gradient is asked for: the statistics pass
//!   writes `exp(x_j - m_b)` (`m_b` the running maximum after block `b`) where the gradient
//!   goes, and the gradient pass scales it by `exp(m_b - m)`, one scalar per block (exactly 1
//!   in the block that set the maximum, so rows of one block give the bits they would give
//!   with the exponential computed again). The exponential is most of the arithmetic; the
//!   gradient buffer is written anyway, and measured on rows up to 128256 classes (which stay
//!   in L2/L3 between the passes) storing beats recomputing. Halves keep them in the `f32`
//!   scratch block, so only for rows of one block; longer half rows compute them twice.
//! - **Sums whose error does not grow with `C`**: `f32` lanes within a block, `f64` across
//!   blocks.
//! - **Unaligned `f32` is read where it lies.** A raw tensor reaches the kernel as the bytes
//!   received (its offset in the gRPC message is whatever the framing made it, so three times
//!   in four it is not 4-byte aligned). The lane loops read their values through
//!   `read`'s `Lanes`: an `f32` slice, or little-endian bytes loaded with unaligned vector
//!   loads ([`lanes::Simd::load_le`]), and single elements with unaligned scalar loads. The
//!   same values land in the same lanes, so aligned and unaligned inputs give the same bits
//!   (tested at every level, logits and labels unaligned together and each alone). The body is
//!   compiled for each mix of slice and bytes (four per level for `f32`). Copying each block
//!   of bytes into the scratch block instead (one loop body) ran dense 16x128256 at 0.65 of
//!   the aligned speed, against 0.82 with unaligned loads (BENCHMARKS.md).
//! - Halves are widened one block at a time into a scratch block made once per block of rows
//!   (no per-row allocation), from a slice or from bytes at any alignment alike.
//!
//! `XENT_KERNEL_LEVEL` (`general`, `portable`, `avx2`, `avx512`) caps the level, for
//! benchmarks and for the instruction-count guard (`scripts/kernel-guard`); `general` turns the
//! fast path off so every row takes the general path of [`super::rows`].

// The crate denies unsafe code (Cargo.toml's `[lints]`); this module alone needs it: the
// `core::arch` intrinsics of `lanes` are unsafe to call, and so are the `#[target_feature]`
// copies of the row body in `row`. Each block says why it is sound.
#![allow(unsafe_code)]

pub mod exp;
pub mod lanes;
mod read;
pub mod row;

use std::sync::OnceLock;

/// Which compiled copy of the fast path runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// No fast path: every row takes the general (scalar, `f64` label) path.
    General,
    /// The build's baseline instruction set.
    Portable,
    /// AVX2 (x86-64).
    Avx2,
    /// AVX-512F (x86-64).
    Avx512,
}

impl Level {
    /// The best level this CPU supports.
    pub fn detected() -> Level {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Level::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2") {
                return Level::Avx2;
            }
        }
        Level::Portable
    }

    /// Parses a level name as `XENT_KERNEL_LEVEL` takes it.
    pub fn parse(s: &str) -> Option<Level> {
        match s {
            "general" => Some(Level::General),
            "portable" | "scalar" => Some(Level::Portable),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }

    /// The level in use: the detected one, capped by `XENT_KERNEL_LEVEL` when set (read once).
    pub fn current() -> Level {
        static LEVEL: OnceLock<Level> = OnceLock::new();
        *LEVEL.get_or_init(|| {
            let best = Level::detected();
            match std::env::var("XENT_KERNEL_LEVEL")
                .ok()
                .as_deref()
                .and_then(Level::parse)
            {
                Some(cap) => cap.min(best),
                None => best,
            }
        })
    }
}

pub(super) use row::{FastLabels, RowCall, fast_row};
