//! The vocabulary every API shares (semantics §10): the loss kinds, the request's tensors, the
//! outputs, the scalar options with the kind of value each takes, and the numerical health
//! counts. Each is a closed enum with its one name, so a front, a client or the CLI that
//! handles them matches exhaustively: adding a name breaks the build where it must be handled,
//! instead of being skipped by a list somebody forgot.

use std::fmt;
use std::str::FromStr;

use crate::dtype::DType;
use crate::kernel::Health;
pub use crate::kernel::{Options, Reduction};

/// A closed set of names, each value with the one name every API gives it.
pub trait Named: Copy + Sized + 'static {
    /// Every value, in API order.
    const ALL: &'static [Self];
    /// What the values are, for error messages (e.g. `loss`).
    const WHAT: &'static str;
    /// The value's name.
    fn name(self) -> &'static str;

    /// The value called `name` (exactly: no prefixes, no other case).
    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|v| v.name() == name)
    }

    /// Every name, as `a, b or c`.
    fn names_or() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|v| v.name()).collect();
        match names.split_last() {
            Some((last, [])) => (*last).to_string(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        }
    }

    /// Parses a name, or says which names there are.
    fn parse_name(name: &str) -> Result<Self, String> {
        Self::from_name(name).ok_or_else(|| {
            format!(
                "unknown {} {}; expected {}",
                Self::WHAT,
                crate::echo::Quoted(name),
                Self::names_or()
            )
        })
    }
}

/// Implements [`Named`] for an enum whose inherent `name` gives each value's name.
macro_rules! named {
    ($($t:ident: $what:literal = $all:expr;)*) => {$(
        impl Named for $t {
            const ALL: &'static [Self] = $all;
            const WHAT: &'static str = $what;
            fn name(self) -> &'static str {
                $t::name(self)
            }
        }
    )*};
}

/// Implements `Display` and `FromStr` through [`Named`].
macro_rules! display_and_parse {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(Named::name(*self))
            }
        }

        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                <$t as Named>::parse_name(s)
            }
        }
    )*};
}

/// Which loss to evaluate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LossKind {
    /// Labels are rows shaped like the logits (`softmax_cross_entropy`).
    Dense,
    /// Labels are class ids (`sparse_softmax_cross_entropy`).
    Sparse,
}

impl LossKind {
    /// The name used in every API (and the Open Inference Protocol's model name).
    pub const fn name(self) -> &'static str {
        match self {
            LossKind::Dense => "softmax_cross_entropy",
            LossKind::Sparse => "sparse_softmax_cross_entropy",
        }
    }

    /// The outputs this loss has: class ids have no gradient.
    pub const fn outputs(self) -> &'static [Output] {
        match self {
            LossKind::Dense => &Output::ALL,
            LossKind::Sparse => &[Output::Loss, Output::GradLogits],
        }
    }
}

/// An output a request can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// `loss`.
    Loss,
    /// `grad_logits`.
    GradLogits,
    /// `grad_labels` (dense labels only).
    GradLabels,
}

impl Output {
    /// Every output, in API order.
    pub const ALL: [Output; 3] = [Output::Loss, Output::GradLogits, Output::GradLabels];

    /// The outputs returned when none are asked for.
    pub const DEFAULT: [Output; 2] = [Output::Loss, Output::GradLogits];

    /// The name used in every API.
    pub const fn name(self) -> &'static str {
        match self {
            Output::Loss => "loss",
            Output::GradLogits => "grad_logits",
            Output::GradLabels => "grad_labels",
        }
    }
}

/// A tensor of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Input {
    /// `logits` (or probabilities).
    Logits,
    /// `labels`: dense rows or class ids.
    Labels,
    /// `class_weights`, optional.
    ClassWeights,
    /// `sample_weights`, optional.
    SampleWeights,
    /// `upstream`, optional.
    Upstream,
}

impl Input {
    /// Every input, in API order.
    pub const ALL: [Input; 5] = [
        Input::Logits,
        Input::Labels,
        Input::ClassWeights,
        Input::SampleWeights,
        Input::Upstream,
    ];

    /// The name used in every API.
    pub const fn name(self) -> &'static str {
        match self {
            Input::Logits => "logits",
            Input::Labels => "labels",
            Input::ClassWeights => "class_weights",
            Input::SampleWeights => "sample_weights",
            Input::Upstream => "upstream",
        }
    }
}

/// A scalar option of a request (the fields of [`Options`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OptionName {
    /// `axis`.
    Axis,
    /// `label_smoothing`.
    LabelSmoothing,
    /// `ignore_index`.
    IgnoreIndex,
    /// `from_logits`.
    FromLogits,
    /// `z_loss`.
    ZLoss,
    /// `reduction`.
    Reduction,
}

/// The kind of value an option takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    /// A signed integer.
    Int,
    /// A float.
    Float,
    /// A boolean.
    Bool,
    /// A [`Reduction`], by name.
    Reduction,
}

/// An option's value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptionValue {
    /// Of an [`OptionKind::Int`] option.
    Int(i64),
    /// Of an [`OptionKind::Float`] option.
    Float(f64),
    /// Of an [`OptionKind::Bool`] option.
    Bool(bool),
    /// Of the [`OptionKind::Reduction`] option.
    Reduction(Reduction),
}

impl OptionValue {
    /// The kind of this value.
    pub const fn kind(self) -> OptionKind {
        match self {
            OptionValue::Int(_) => OptionKind::Int,
            OptionValue::Float(_) => OptionKind::Float,
            OptionValue::Bool(_) => OptionKind::Bool,
            OptionValue::Reduction(_) => OptionKind::Reduction,
        }
    }
}

impl OptionName {
    /// Every option, in API order.
    pub const ALL: [OptionName; 6] = [
        OptionName::Axis,
        OptionName::LabelSmoothing,
        OptionName::IgnoreIndex,
        OptionName::FromLogits,
        OptionName::ZLoss,
        OptionName::Reduction,
    ];

    /// The name used in every API.
    pub const fn name(self) -> &'static str {
        match self {
            OptionName::Axis => "axis",
            OptionName::LabelSmoothing => "label_smoothing",
            OptionName::IgnoreIndex => "ignore_index",
            OptionName::FromLogits => "from_logits",
            OptionName::ZLoss => "z_loss",
            OptionName::Reduction => "reduction",
        }
    }

    /// The kind of value it takes.
    pub const fn kind(self) -> OptionKind {
        match self {
            OptionName::Axis | OptionName::IgnoreIndex => OptionKind::Int,
            OptionName::LabelSmoothing | OptionName::ZLoss => OptionKind::Float,
            OptionName::FromLogits => OptionKind::Bool,
            OptionName::Reduction => OptionKind::Reduction,
        }
    }

    /// Its value in `o`; `None` for an option that is not set (`ignore_index`).
    pub fn get(self, o: &Options) -> Option<OptionValue> {
        Some(match self {
            OptionName::Axis => OptionValue::Int(o.axis),
            OptionName::LabelSmoothing => OptionValue::Float(o.label_smoothing),
            OptionName::IgnoreIndex => OptionValue::Int(o.ignore_index?),
            OptionName::FromLogits => OptionValue::Bool(o.from_logits),
            OptionName::ZLoss => OptionValue::Float(o.z_loss),
            OptionName::Reduction => OptionValue::Reduction(o.reduction),
        })
    }

    /// Sets it in `o` to `v`; a value of another kind is refused with the kind it takes.
    pub fn set(self, o: &mut Options, v: OptionValue) -> Result<(), OptionKind> {
        match (self, v) {
            (OptionName::Axis, OptionValue::Int(a)) => o.axis = a,
            (OptionName::LabelSmoothing, OptionValue::Float(e)) => o.label_smoothing = e,
            (OptionName::IgnoreIndex, OptionValue::Int(k)) => o.ignore_index = Some(k),
            (OptionName::FromLogits, OptionValue::Bool(b)) => o.from_logits = b,
            (OptionName::ZLoss, OptionValue::Float(z)) => o.z_loss = z,
            (OptionName::Reduction, OptionValue::Reduction(r)) => o.reduction = r,
            _ => return Err(self.kind()),
        }
        Ok(())
    }
}

named! {
    LossKind: "loss" = &[LossKind::Dense, LossKind::Sparse];
    Output: "output" = &Output::ALL;
    Reduction: "reduction" = &Reduction::ALL;
    Input: "input" = &Input::ALL;
    OptionName: "option" = &OptionName::ALL;
    DType: "dtype" = &[
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::I32,
        DType::I64,
    ];
}

display_and_parse!(LossKind, Output, Input, OptionName);

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DType::parse_name(s)
    }
}

/// The numerical health counts' names in every API (xent.v1's `NumericalHealth` fields, the
/// Open Inference Protocol's response parameters), in the order [`health_counts`] gives them.
pub const HEALTH_NAMES: [&str; 3] = [
    "nonfinite_inputs",
    "unnormalized_label_rows",
    "nonfinite_loss_rows",
];

/// The numerical health counts, each under its name in [`HEALTH_NAMES`].
pub fn health_counts(h: &Health) -> [(&'static str, u64); 3] {
    let counts = [
        h.nonfinite_inputs,
        h.unnormalized_label_rows,
        h.nonfinite_loss_rows,
    ];
    [0, 1, 2].map(|i| (HEALTH_NAMES[i], counts[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_exactly_and_list_themselves() {
        assert_eq!(
            "sparse_softmax_cross_entropy".parse::<LossKind>(),
            Ok(LossKind::Sparse)
        );
        assert!("sparse".parse::<LossKind>().is_err(), "no abbreviations");
        assert!("Loss".parse::<Output>().is_err(), "no other case");
        assert_eq!(
            Reduction::names_or(),
            "none, sum, mean, sum_over_batch_size or sum_by_nonzero_weights"
        );
        assert_eq!(
            "dense".parse::<LossKind>().unwrap_err(),
            "unknown loss \"dense\"; expected softmax_cross_entropy or sparse_softmax_cross_entropy"
        );
    }

    #[test]
    fn every_option_sets_and_gets_its_own_kind() {
        let mut o = Options::default();
        for name in OptionName::ALL {
            let v = match name.kind() {
                OptionKind::Int => OptionValue::Int(3),
                OptionKind::Float => OptionValue::Float(0.25),
                OptionKind::Bool => OptionValue::Bool(false),
                OptionKind::Reduction => OptionValue::Reduction(Reduction::Mean),
            };
            name.set(&mut o, v).unwrap();
            assert_eq!(name.get(&o), Some(v), "{name}");
            assert_eq!(
                name.set(&mut o, OptionValue::Bool(true)).is_err(),
                name.kind() != OptionKind::Bool
            );
        }
        assert_eq!(OptionName::IgnoreIndex.get(&Options::default()), None);
    }
}
