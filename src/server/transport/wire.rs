//! The byte stream under one HTTP/2 connection, closed the way a drain needs.
//!
//! Closing a TCP socket that still has unread bytes makes the kernel answer with a reset, and
//! a reset can destroy data the peer has received but not yet read: the last answer of a
//! drained connection, lost because the client's WINDOW_UPDATE or the tail of an upload arrived
//! just after the server hung up. So when h2 shuts the connection down (its last frames, a
//! GOAWAY among them, already flushed), [`Wire`] reads and discards whatever the peer still
//! sends until the peer closes, and only then lets the socket be closed.
//!
//! It waits for the peer to close first ([`PEER_FIRST`]): an HTTP/2 client closes a connection
//! that has sent it GOAWAY as soon as it has no stream left, and the side that closes first is
//! the one that keeps the connection in TIME_WAIT. On the server, TIME_WAIT would pile up on
//! the listening port, and a client that reconnects from the same port finds it there: with no
//! listener (a drain) the kernel answers its SYN with a bare ACK and the client's connect
//! stalls a second before it learns it was refused. A peer that does not close in that time
//! gets the server's FIN, and then [`LINGER`] more to close.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest a closing connection waits for its peer to close before sending its own FIN.
pub const PEER_FIRST: Duration = Duration::from_secs(1);
/// The longest a closing connection waits for its peer to close after the server's FIN.
pub const LINGER: Duration = Duration::from_secs(2);

/// An I/O stream with a lingering close.
#[derive(Debug)]
pub struct Wire<T> {
    inner: T,
    close: Close,
}

#[derive(Debug)]
enum Close {
    Open,
    /// Reading until the peer's FIN, or the deadline, before sending ours.
    PeerFirst(Pin<Box<tokio::time::Sleep>>),
    /// Ready to send FIN (the peer has closed, or would not).
    Fin {
        peer_closed: bool,
    },
    /// FIN sent; reading until the peer's FIN or the deadline.
    Lingering(Pin<Box<tokio::time::Sleep>>),
    Closed,
}

/// What reading a closing connection found.
enum Drained {
    /// The peer closed (or failed).
    PeerClosed,
    /// The deadline passed first.
    TimedOut,
}

impl<T> Wire<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Wire<T> {
        Wire {
            inner,
            close: Close::Open,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Wire<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Wire<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            this.close = match &mut this.close {
                Close::Open => {
                    // What h2 wrote must be out before the wait.
                    ready!(Pin::new(&mut this.inner).poll_flush(cx))?;
                    Close::PeerFirst(Box::pin(tokio::time::sleep(PEER_FIRST)))
                }
                Close::PeerFirst(deadline) => {
                    match ready!(discard(&mut this.inner, deadline, cx)) {
                        Drained::PeerClosed => Close::Fin { peer_closed: true },
                        Drained::TimedOut => Close::Fin { peer_closed: false },
                    }
                }
                Close::Fin { peer_closed } => {
                    let peer_closed = *peer_closed;
                    // A peer that is already gone makes the FIN fail: nothing left to wait for.
                    if ready!(Pin::new(&mut this.inner).poll_shutdown(cx)).is_err() || peer_closed {
                        Close::Closed
                    } else {
                        Close::Lingering(Box::pin(tokio::time::sleep(LINGER)))
                    }
                }
                Close::Lingering(deadline) => {
                    ready!(discard(&mut this.inner, deadline, cx));
                    Close::Closed
                }
                Close::Closed => return Poll::Ready(Ok(())),
            };
        }
    }
}

/// Reads and drops what the peer sends until it closes or `deadline` passes.
fn discard<T: AsyncRead + Unpin>(
    inner: &mut T,
    deadline: &mut Pin<Box<tokio::time::Sleep>>,
    cx: &mut Context<'_>,
) -> Poll<Drained> {
    loop {
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Drained::TimedOut);
        }
        let mut scratch = [0u8; 4096];
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *inner).poll_read(cx, &mut buf) {
            // More from the peer: drop it and read on.
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
            // The peer's FIN, or an error: the peer is done.
            Poll::Ready(_) => return Poll::Ready(Drained::PeerClosed),
            Poll::Pending => return Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_close_waits_for_the_peer_to_close_first_reading_what_it_still_sends() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut s = Wire::new(server);
        s.write_all(b"answer").await.unwrap();
        let closing = tokio::spawn(async move {
            s.shutdown().await.unwrap();
        });
        // The peer is still writing (more than the pipe holds) when the server closes.
        client.write_all(&[0u8; 1000]).await.unwrap();
        let mut got = [0u8; 6];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
        // The server waits for the client to close first.
        tokio::task::yield_now().await;
        assert!(!closing.is_finished());
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        tokio::time::timeout(Duration::from_secs(1), closing)
            .await
            .expect("the close ends when the peer closes")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_does_not_close_gets_a_fin_then_is_left_after_the_linger() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut s = Wire::new(server);
        let started = tokio::time::Instant::now();
        let closing = tokio::spawn(async move {
            s.shutdown().await.unwrap();
            started.elapsed()
        });
        // The server's FIN comes after PEER_FIRST.
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!(started.elapsed(), PEER_FIRST);
        assert_eq!(closing.await.unwrap(), PEER_FIRST + LINGER);
    }
}
