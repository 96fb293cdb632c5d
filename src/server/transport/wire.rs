//! The byte stream under one HTTP/2 connection, closed the way a drain needs.
//!
//! Closing a TCP socket that still has unread bytes makes the kernel answer with a reset, and
//! a reset can destroy data the peer has received but not yet read: the last answer of a
//! drained connection, lost because the client's WINDOW_UPDATE or the tail of an upload arrived
//! just after the server hung up. So when h2 shuts the connection down, [`Wire`] first sends
//! FIN (shutdown of the write side), then reads and discards whatever the peer still sends
//! until the peer closes too, or until [`LINGER`] has passed, and only then lets the socket be
//! closed.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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
    /// FIN sent; reading until the peer's FIN or the deadline.
    Lingering(Pin<Box<tokio::time::Sleep>>),
    Closed,
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
        loop {
            match &mut self.close {
                Close::Open => {
                    // A peer that is already gone makes the FIN fail: nothing left to wait for.
                    if ready!(Pin::new(&mut self.inner).poll_shutdown(cx)).is_err() {
                        self.close = Close::Closed;
                        continue;
                    }
                    self.close = Close::Lingering(Box::pin(tokio::time::sleep(LINGER)));
                }
                Close::Lingering(deadline) => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        self.close = Close::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 4096];
                    let mut buf = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                        // More from the peer: discard it and read on.
                        Poll::Ready(Ok(())) if !buf.filled().is_empty() => {}
                        // The peer's FIN, or an error: the peer is done.
                        Poll::Ready(_) => self.close = Close::Closed,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                Close::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test]
    async fn a_close_reads_what_the_peer_still_sends_until_it_closes() {
        let (server, mut client) = tokio::io::duplex(64);
        let mut s = Wire::new(server);
        s.write_all(b"answer").await.unwrap();
        let closing = tokio::spawn(async move {
            s.shutdown().await.unwrap();
        });
        // The peer is still writing (more than the pipe holds) when the server closes.
        client.write_all(&[0u8; 1000]).await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer");
        // The server's side stays open (reading) until the client closes too.
        tokio::task::yield_now().await;
        assert!(!closing.is_finished());
        drop(client);
        tokio::time::timeout(Duration::from_secs(1), closing)
            .await
            .expect("the close ends when the peer closes")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_left_after_the_linger() {
        let (server, _client) = tokio::io::duplex(64);
        let mut s = Wire::new(server);
        let started = tokio::time::Instant::now();
        s.shutdown().await.unwrap();
        assert_eq!(started.elapsed(), LINGER);
    }
}
