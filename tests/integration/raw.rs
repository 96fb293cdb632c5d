//! HTTP/2 driven by hand (the h2 crate), for tests that need frames at moments of their
//! choosing: an upload half sent, a window never opened, a stream never read.

use std::net::SocketAddr;

use bytes::{Buf as _, Bytes};
use tonic::Code;

/// A gRPC message: its 5-byte prefix and its encoding.
pub fn grpc_frame(msg: &impl prost::Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// An HTTP/2 connection driven by hand.
pub struct Raw {
    pub send: h2::client::SendRequest<Bytes>,
    pub addr: SocketAddr,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        let (raw, conn) = Raw::unpolled(addr).await;
        tokio::spawn(conn);
        raw
    }

    /// A connection whose frames go out, and come in, only once its driver is spawned: what
    /// is opened before goes out in its first flight.
    pub async fn unpolled(
        addr: SocketAddr,
    ) -> (Raw, h2::client::Connection<tokio::net::TcpStream, Bytes>) {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) = h2::client::handshake(tcp).await.expect("handshake");
        (Raw { send, addr }, conn)
    }

    /// Opens a call of `path`, its request body left open.
    pub async fn open(
        &mut self,
        path: &str,
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        self.open_with(path, &[]).await
    }

    /// Opens a call of `path` with `metadata` besides gRPC's own headers.
    pub async fn open_with(
        &mut self,
        path: &str,
        metadata: &[(&str, &str)],
    ) -> Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error> {
        let mut req = http::Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        for (k, v) in metadata {
            req = req.header(*k, *v);
        }
        let req = req.body(()).unwrap();
        let mut send = self.send.clone().ready().await?;
        send.send_request(req, false)
    }
}

/// The messages and the final status of a response read to its end.
pub struct Answer {
    pub messages: Vec<Bytes>,
    pub status: Code,
    pub message: String,
}

/// Reads the next gRPC message of `body` into `buf`'s front, or None at the end of its data.
pub async fn next_message(body: &mut h2::RecvStream, buf: &mut Vec<u8>) -> Option<Bytes> {
    loop {
        if buf.len() >= 5 {
            let len = u32::from_be_bytes(buf[1..5].try_into().unwrap()) as usize;
            if buf.len() >= 5 + len {
                let msg = Bytes::copy_from_slice(&buf[5..5 + len]);
                buf.drain(..5 + len);
                return Some(msg);
            }
        }
        let chunk = body
            .data()
            .await?
            .expect("no stream of the server is reset");
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(chunk.chunk());
    }
}

/// Reads a whole response.
pub async fn answer(resp: h2::client::ResponseFuture) -> Answer {
    let resp = resp.await.expect("the server answers the stream");
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut messages = Vec::new();
    let mut buf = Vec::new();
    while let Some(m) = next_message(&mut body, &mut buf).await {
        messages.push(m);
    }
    assert!(buf.is_empty(), "no partial message at the end");
    let trailers = body
        .trailers()
        .await
        .expect("no stream of the server is reset")
        .unwrap_or(headers);
    let status = trailers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
        .expect("a grpc-status");
    let message = trailers
        .get("grpc-message")
        .map(|v| percent_decode(v.to_str().unwrap_or_default()))
        .unwrap_or_default();
    Answer {
        messages,
        status: Code::from(status),
        message,
    }
}

pub fn percent_decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
