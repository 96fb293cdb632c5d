//! Call deadlines from the `grpc-timeout` header, with the server's default when absent.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// How much earlier than the client's own deadline the server gives up. tonic enforces
/// `grpc-timeout` itself, outside every service, and answers CANCELLED; its timer starts just
/// before ours and polls the call first, so ending a little earlier makes the answer the
/// DEADLINE_EXCEEDED the gRPC spec asks for.
const AHEAD_OF_TRANSPORT: Duration = Duration::from_millis(2);

/// When a call that `arrived` must be answered: just before its `grpc-timeout` runs out, or
/// `default` later when the client sets none (or one that is malformed, which the gRPC spec
/// allows ignoring).
pub fn deadline(metadata: &MetadataMap, arrived: Instant, default: Duration) -> Instant {
    let client = metadata
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_timeout);
    match client {
        Some(t) => arrived + t.saturating_sub(AHEAD_OF_TRANSPORT),
        None => arrived + default,
    }
}

/// Parses a `grpc-timeout` value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 || !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_per_the_grpc_spec() {
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "123456789S", "12x", "-1S", "1.5S"] {
            assert_eq!(parse_timeout(bad), None, "{bad}");
        }
    }
}
