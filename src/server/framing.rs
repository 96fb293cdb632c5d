//! Where a byte stream of gRPC messages stands: in a message's 5-byte prefix (a compression
//! flag and a big-endian u32 length), in its body, or between two messages.
//!
//! Two readers of request bodies need it, each without buffering a message: the size check,
//! which refuses a message from its prefix before the body is read (`message_size`), and the
//! transport, which must know where messages end to stop a client-streaming call at a message
//! boundary and to tell a stalled message from a quiet stream (`transport::stream`).

/// Length of the gRPC message prefix.
pub const PREFIX: usize = 5;

/// The state of the scan; fed the body's bytes in whatever pieces they come.
#[derive(Debug, Default)]
pub struct Framing {
    prefix: [u8; PREFIX],
    /// Bytes of the current prefix seen so far (0 while inside a message's body).
    have: usize,
    /// Bytes of the current message's body still to come.
    remaining: u64,
}

impl Framing {
    /// Reads the start of `data` up to the first of: a prefix completed (its announced length
    /// is returned), the end of a message's body, the end of `data`. Returns how many bytes it
    /// read.
    pub fn step(&mut self, data: &[u8]) -> (usize, Option<u64>) {
        if self.remaining > 0 {
            let skip = self.remaining.min(data.len() as u64);
            self.remaining -= skip;
            return (skip as usize, None);
        }
        let take = (PREFIX - self.have).min(data.len());
        self.prefix[self.have..self.have + take].copy_from_slice(&data[..take]);
        self.have += take;
        if self.have < PREFIX {
            return (take, None);
        }
        self.have = 0;
        let len = u64::from(u32::from_be_bytes(
            self.prefix[1..].try_into().expect("four bytes"),
        ));
        self.remaining = len;
        (take, Some(len))
    }

    /// Reads all of `data`.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let (n, _) = self.step(data);
            data = &data[n..];
        }
    }

    /// Reads `data` up to the end of the current message (or of `data`); returns how much.
    pub fn feed_to_boundary(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        while at < data.len() {
            at += self.step(&data[at..]).0;
            if self.at_boundary() {
                break;
            }
        }
        at
    }

    /// Between two messages: nothing of a next one has arrived.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u32) -> Vec<u8> {
        let mut m = vec![0];
        m.extend_from_slice(&n.to_be_bytes());
        m.extend(std::iter::repeat_n(7u8, n as usize));
        m
    }

    #[test]
    fn framing_knows_when_it_is_between_messages() {
        let mut bytes = msg(3);
        bytes.extend(msg(0));
        bytes.extend(msg(10));
        // Boundaries after 8, 13 and 28 bytes, whatever the pieces.
        for chunk in [1, 2, 3, 7, 28] {
            let mut f = Framing::default();
            assert!(f.at_boundary());
            let mut at = 0;
            for piece in bytes.chunks(chunk) {
                f.feed(piece);
                at += piece.len();
                assert_eq!(
                    f.at_boundary(),
                    [0, 8, 13, 28].contains(&at),
                    "{chunk} {at}"
                );
            }
        }
    }

    #[test]
    fn feeding_to_a_boundary_stops_at_each_message_end() {
        let mut bytes = msg(3);
        bytes.extend(msg(0));
        bytes.extend(msg(10));
        let mut f = Framing::default();
        assert_eq!(f.feed_to_boundary(&bytes), 8);
        assert_eq!(f.feed_to_boundary(&bytes[8..]), 5);
        assert_eq!(f.feed_to_boundary(&bytes[13..20]), 7);
        assert!(!f.at_boundary());
        assert_eq!(f.feed_to_boundary(&bytes[20..]), 8);
        assert!(f.at_boundary());
    }

    #[test]
    fn each_prefix_is_reported_once_with_its_length() {
        let mut bytes = msg(3);
        bytes.extend(msg(300));
        for chunk in [1, 4, 5, 6, 400] {
            let mut f = Framing::default();
            let mut lens = Vec::new();
            for piece in bytes.chunks(chunk) {
                let mut at = 0;
                while at < piece.len() {
                    let (n, len) = f.step(&piece[at..]);
                    lens.extend(len);
                    at += n;
                }
            }
            assert_eq!(lens, [3, 300], "{chunk}");
        }
    }
}
