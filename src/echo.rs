//! Bounded, escaped display of client input, for every error message, `google.rpc.BadRequest`
//! detail and log line that repeats what a client sent.
//!
//! A status travels in HTTP/2 trailers, which standard clients cap (grpc-go and grpc-core at
//! 8 KiB to 16 KiB by default) and refuse beyond as RESOURCE_EXHAUSTED, so an error that echoed
//! a 1 MiB model name in full would hide its own code. A log line that echoed it would cost
//! the operator the same megabyte, and one that echoed a newline would forge a line. So
//! whatever a client chose (a name, a string option, a shape) is shown here and only here:
//! control characters escaped, at most [`MAX_CHARS`] characters or [`MAX_DIMS`] dimensions,
//! then a marker saying how long it was (`…(1048576 bytes)`, `…(1000000 dims)`).
//! [`message`] caps a whole message as a backstop for what no helper wrapped.

use std::fmt::{self, Display, Write as _};

/// Characters of a client string shown before the marker.
pub const MAX_CHARS: usize = 64;

/// Dimensions of a client shape shown before the marker.
pub const MAX_DIMS: usize = 8;

/// Longest message (in bytes) an error carries, whatever it is built from.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// A client string as written in a message, unquoted: for field and input names, which a
/// message starts with. Control characters are escaped (`\n`, `\u{1b}`).
#[derive(Clone, Copy, Debug)]
pub struct Name<'a>(pub &'a str);

/// A caller's id (`request_id`, `id`) as a log field: control characters escaped, at most
/// [`MAX_ID_CHARS`] characters (the longest id accepted is shown whole), then the marker.
#[derive(Clone, Copy, Debug)]
pub struct Id<'a>(pub &'a str);

/// Characters of an id shown before the marker.
pub const MAX_ID_CHARS: usize = 128;

/// A client string in quotes, as `{:?}` writes it (`"avg"`), bounded the same way.
#[derive(Clone, Copy, Debug)]
pub struct Quoted<'a>(pub &'a str);

/// A shape as `{:?}` writes it (`[2, 3]`), bounded to [`MAX_DIMS`] dimensions.
#[derive(Clone, Copy, Debug)]
pub struct Shape<'a, T>(pub &'a [T]);

/// A list of client strings, each quoted (`["a", "b"]`), bounded in count and length.
#[derive(Clone, Copy, Debug)]
pub struct List<'a, S>(pub &'a [S]);

/// Writes the first `max` characters of `s`, escaping control characters (and, when
/// `quoted`, quotes and backslashes), then the length marker if anything was left out.
fn write_bounded(f: &mut fmt::Formatter<'_>, s: &str, quoted: bool, max: usize) -> fmt::Result {
    let mut shown = 0;
    for (n, c) in s.chars().enumerate() {
        if n == max {
            break;
        }
        shown += c.len_utf8();
        if c.is_control() || (quoted && (c == '"' || c == '\\')) {
            write!(f, "{}", c.escape_debug())?;
        } else {
            f.write_char(c)?;
        }
    }
    if quoted {
        f.write_char('"')?;
    }
    if shown < s.len() {
        write!(f, "…({} bytes)", s.len())?;
    }
    Ok(())
}

impl Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bounded(f, self.0, false, MAX_CHARS)
    }
}

impl Display for Id<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_bounded(f, self.0, false, MAX_ID_CHARS)
    }
}

impl Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        write_bounded(f, self.0, true, MAX_CHARS)
    }
}

impl<T: Display> Display for Shape<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (k, d) in self.0.iter().take(MAX_DIMS).enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > MAX_DIMS {
            write!(f, ", …({} dims)", self.0.len())?;
        }
        f.write_char(']')
    }
}

impl<S: AsRef<str>> Display for List<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('[')?;
        for (k, s) in self.0.iter().take(MAX_DIMS).enumerate() {
            if k > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}", Quoted(s.as_ref()))?;
        }
        if self.0.len() > MAX_DIMS {
            write!(f, ", …({} entries)", self.0.len())?;
        }
        f.write_char(']')
    }
}

/// A client string as a field name: escaped and bounded, owned.
pub fn name(s: &str) -> String {
    Name(s).to_string()
}

/// Caps a message at [`MAX_MESSAGE_BYTES`] (on a character boundary) with the length marker,
/// and escapes its control characters: the backstop under every message an error carries.
pub fn message(s: &str) -> String {
    let needs_escape = s.chars().any(char::is_control);
    if s.len() <= MAX_MESSAGE_BYTES && !needs_escape {
        return s.to_owned();
    }
    let mut out = String::with_capacity(MAX_MESSAGE_BYTES + 32);
    let mut taken = 0;
    for c in s.chars() {
        if out.len() + c.len_utf8() > MAX_MESSAGE_BYTES {
            break;
        }
        taken += c.len_utf8();
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if taken < s.len() {
        let _ = write!(out, "…({} bytes)", s.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_shown_as_debug_shows_it() {
        assert_eq!(Quoted("avg").to_string(), format!("{:?}", "avg"));
        assert_eq!(Quoted("a\"b\\c").to_string(), format!("{:?}", "a\"b\\c"));
        assert_eq!(Name("logitz").to_string(), "logitz");
        assert_eq!(Shape(&[2usize, 3]).to_string(), format!("{:?}", [2, 3]));
        assert_eq!(Shape::<i64>(&[]).to_string(), "[]");
        assert_eq!(List(&["a", "b"]).to_string(), format!("{:?}", ["a", "b"]));
        assert_eq!(message("fine"), "fine");
    }

    #[test]
    fn long_input_is_cut_with_its_length() {
        let s = "x".repeat(1 << 20);
        let q = Quoted(&s).to_string();
        assert_eq!(q, format!("\"{}\"…(1048576 bytes)", "x".repeat(MAX_CHARS)));
        assert_eq!(
            Name(&s).to_string().len(),
            MAX_CHARS + "…(1048576 bytes)".len()
        );
        let dims = vec![1i64; 1_000_000];
        assert_eq!(
            Shape(&dims).to_string(),
            "[1, 1, 1, 1, 1, 1, 1, 1, …(1000000 dims)]"
        );
        let m = message(&s);
        assert!(m.len() < MAX_MESSAGE_BYTES + 32, "{}", m.len());
        assert!(m.ends_with("…(1048576 bytes)"));
        // Multi-byte characters are never split.
        let wide = "é".repeat(1000);
        assert!(message(&wide).starts_with("éé"));
        assert_eq!(
            Name(&wide)
                .to_string()
                .chars()
                .filter(|&c| c == 'é')
                .count(),
            64
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(Name("a\nb").to_string(), "a\\nb");
        assert_eq!(Id("req\nINFO forged").to_string(), "req\\nINFO forged");
        assert_eq!(Id(&"i".repeat(128)).to_string(), "i".repeat(128));
        assert_eq!(Name("\u{1b}[31m").to_string(), "\\u{1b}[31m");
        assert_eq!(message("a\r\nb"), "a\\r\\nb");
        assert!(!Quoted("x\ny").to_string().contains('\n'));
    }
}
