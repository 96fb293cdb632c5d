//! Slow float64 oracle (being written).
