//! Scalar options of a loss and the reductions (spec §3 and §4), with the contract's defaults.

use std::fmt;
use std::str::FromStr;

/// How per-example losses are reduced (spec §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Reduction {
    /// Per-example losses.
    #[default]
    None,
    /// `sum_i L_i`.
    Sum,
    /// `sum_i L_i / sum_i omega_i`.
    Mean,
    /// `sum_i L_i / count(not ignored)`.
    SumOverBatchSize,
    /// `sum_i L_i / count(omega_i != 0)`.
    SumByNonzeroWeights,
}

impl Reduction {
    /// Every reduction, in API order.
    pub const ALL: [Reduction; 5] = [
        Reduction::None,
        Reduction::Sum,
        Reduction::Mean,
        Reduction::SumOverBatchSize,
        Reduction::SumByNonzeroWeights,
    ];

    /// The lower-case name used in every API.
    pub const fn name(self) -> &'static str {
        match self {
            Reduction::None => "none",
            Reduction::Sum => "sum",
            Reduction::Mean => "mean",
            Reduction::SumOverBatchSize => "sum_over_batch_size",
            Reduction::SumByNonzeroWeights => "sum_by_nonzero_weights",
        }
    }
}

impl fmt::Display for Reduction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Reduction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Reduction::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| format!("unknown reduction {s:?}; expected one of none, sum, mean, sum_over_batch_size, sum_by_nonzero_weights"))
    }
}

/// Scalar options of a loss (spec §3), with the contract's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// The class axis, negative counting from the end.
    pub axis: i64,
    /// Label smoothing in `[0, 1]`.
    pub label_smoothing: f64,
    /// Class ids equal to this are ignored (class ids only).
    pub ignore_index: Option<i64>,
    /// `false`: the logits are probabilities.
    pub from_logits: bool,
    /// z-loss coefficient, `>= 0`.
    pub z_loss: f64,
    /// The reduction.
    pub reduction: Reduction,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            axis: -1,
            label_smoothing: 0.0,
            ignore_index: None,
            from_logits: true,
            z_loss: 0.0,
            reduction: Reduction::None,
        }
    }
}
