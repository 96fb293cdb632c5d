//! The `xent` command line's one vocabulary: every subcommand (`eval`, `bench`) names a loss,
//! an output, a reduction or a dtype as the API does (semantics §10), read by one parser each
//! that takes exactly those names (no abbreviations, no other case), and the scalar options
//! both take are one set of flags.

use clap::Args;
use clap::builder::{PossibleValuesParser, TypedValueParser};

use crate::dtype::DType;
use crate::eval::{Named, Options, Reduction};

/// A value parser for a closed set of API names: `--help` lists them, and anything else is
/// refused.
pub fn named<T>() -> impl TypedValueParser<Value = T>
where
    T: Named + Clone + Send + Sync,
{
    PossibleValuesParser::new(T::ALL.iter().map(|v| v.name()))
        .try_map(|s: String| T::parse_name(&s))
}

/// A value parser for a float dtype by its API name (`float16`, `bfloat16`, `float32`,
/// `float64`).
pub fn float_dtype() -> impl TypedValueParser<Value = DType> {
    let floats = DType::ALL.iter().filter(|d| d.is_float()).map(|d| d.name());
    PossibleValuesParser::new(floats).try_map(|s: String| DType::parse_name(&s))
}

/// The scalar options every subcommand takes; each unset one keeps the contract's default.
#[derive(Args, Clone, Debug, Default, PartialEq)]
pub struct OptionFlags {
    /// Label smoothing in [0, 1]. Default 0.
    #[arg(long, value_name = "E")]
    pub label_smoothing: Option<f64>,

    /// Class ids equal to this get loss 0, gradient 0 and weight 0 (class ids only; `bench`
    /// sets every 16th row's label to it).
    #[arg(long, value_name = "K", allow_negative_numbers = true)]
    pub ignore_index: Option<i64>,

    /// z-loss coefficient >= 0: adds L * logsumexp(logits)^2 to each example's loss. Default 0.
    #[arg(long, value_name = "L")]
    pub z_loss: Option<f64>,

    /// Reduction of the per-example losses. Default none.
    #[arg(long, value_parser = named::<Reduction>())]
    pub reduction: Option<Reduction>,
}

impl OptionFlags {
    /// `base` with the options given on the command line.
    pub fn apply(&self, base: Options) -> Options {
        Options {
            label_smoothing: self.label_smoothing.unwrap_or(base.label_smoothing),
            ignore_index: self.ignore_index.or(base.ignore_index),
            z_loss: self.z_loss.unwrap_or(base.z_loss),
            reduction: self.reduction.unwrap_or(base.reduction),
            ..base
        }
    }
}
