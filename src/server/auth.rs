//! Bearer tokens: every call but health's must carry `authorization: Bearer TOKEN` with a
//! token from `--auth-token-file`.
//!
//! The file holds one token per line; blank lines and lines starting with `#` are ignored. It
//! is reloaded like the TLS files (`reload`). Tokens are kept only as SHA-256 digests and a
//! presented token is compared, digest against digest, with every token in constant time, so
//! neither the time of a refusal nor a memory dump tells a token. Health is left open because
//! probes and balancers check it without credentials and it tells nothing but the serving
//! status. A refusal is UNAUTHENTICATED, counted in `xent_auth_refused_total` by reason; no
//! token, right or wrong, is ever logged or echoed.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use ring::digest::{SHA256, digest};
use tonic::body::Body;

use super::reload::Stamp;
use crate::error::Error;

/// The tokens of `--auth-token-file`.
#[derive(Debug)]
pub struct Tokens {
    path: PathBuf,
    digests: RwLock<Arc<Vec<[u8; 32]>>>,
    stamp: Stamp,
}

/// Why a call was refused (the `reason` label of `xent_auth_refused_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `authorization` metadata.
    Missing,
    /// Not `Bearer TOKEN`.
    Malformed,
    /// A token that is not in the file.
    Wrong,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::Wrong => "wrong",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Refusal::Missing => {
                "this server needs a bearer token: send `authorization: Bearer TOKEN` metadata"
            }
            Refusal::Malformed => "the authorization metadata is not `Bearer TOKEN`",
            Refusal::Wrong => "the bearer token is not one this server accepts",
        }
    }
}

impl Tokens {
    /// Reads the token file.
    pub fn load(path: PathBuf) -> Result<Arc<Tokens>, Error> {
        let digests = read(&path)?;
        let stamp = Stamp::of(std::slice::from_ref(&path));
        Ok(Arc::new(Tokens {
            path,
            digests: RwLock::new(Arc::new(digests)),
            stamp,
        }))
    }

    /// Reads the file again; returns how many tokens it holds.
    pub fn reload(&self) -> Result<usize, Error> {
        let digests = read(&self.path)?;
        let n = digests.len();
        *self.digests.write().expect("tokens") = Arc::new(digests);
        Ok(n)
    }

    /// Whether the file changed since the last look.
    pub fn changed(&self) -> bool {
        self.stamp.changed(std::slice::from_ref(&self.path))
    }

    /// Checks a call's `authorization` value.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), Refusal> {
        let value = authorization.ok_or(Refusal::Missing)?;
        let token = value
            .strip_prefix(b"Bearer ")
            .or_else(|| value.strip_prefix(b"bearer "))
            .ok_or(Refusal::Malformed)?;
        let presented = digest(&SHA256, token);
        let presented = presented.as_ref();
        let digests = self.digests.read().expect("tokens").clone();
        // Every token is compared, and every byte of each: no early exit.
        let mut found = 0u8;
        for d in digests.iter() {
            let diff = d
                .iter()
                .zip(presented)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            found |= u8::from(diff == 0);
        }
        if found == 1 {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

/// The tokens of a token file's text: one a line, blank lines and `#` comments left out.
pub fn tokens_in(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// The digests of the tokens in `path`.
fn read(path: &PathBuf) -> Result<Vec<[u8; 32]>, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Startup(format!("--auth-token-file {}: {e}", path.display())))?;
    let digests: Vec<[u8; 32]> = tokens_in(&text)
        .map(|t| {
            let d = digest(&SHA256, t.as_bytes());
            let mut out = [0u8; 32];
            out.copy_from_slice(d.as_ref());
            out
        })
        .collect();
    if digests.is_empty() {
        return Err(Error::Startup(format!(
            "--auth-token-file {}: holds no token (one per line; # starts a comment)",
            path.display()
        )));
    }
    Ok(digests)
}

/// Refuses calls without a valid token.
#[derive(Clone, Debug)]
pub struct AuthLayer(pub Option<Arc<Tokens>>);

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.0.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<Tokens>>,
}

impl<S> tower::Service<http::Request<Body>> for Auth<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if let Some(tokens) = &self.tokens
            && !req.uri().path().starts_with(super::HEALTH_PATHS)
        {
            let value = req.headers().get(http::header::AUTHORIZATION);
            if let Err(refusal) = tokens.check(value.map(|v| v.as_bytes())) {
                metrics::counter!(crate::metrics::AUTH_REFUSED, "reason" => refusal.label())
                    .increment(1);
                tracing::debug!(
                    reason = refusal.label(),
                    path = req.uri().path(),
                    "call refused: bearer token"
                );
                let status = Error::Unauthenticated(refusal.message().into()).into_status();
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_one_per_line_and_checked_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# fleet A\nalpha\n\n  beta  \n#gamma\n").unwrap();
        let tokens = Tokens::load(path.clone()).unwrap();
        assert_eq!(tokens.check(Some(b"Bearer alpha")), Ok(()));
        assert_eq!(tokens.check(Some(b"Bearer beta")), Ok(()));
        assert_eq!(tokens.check(Some(b"Bearer gamma")), Err(Refusal::Wrong));
        assert_eq!(tokens.check(Some(b"Bearer alph")), Err(Refusal::Wrong));
        assert_eq!(tokens.check(Some(b"Bearer alphaa")), Err(Refusal::Wrong));
        assert_eq!(tokens.check(Some(b"alpha")), Err(Refusal::Malformed));
        assert_eq!(tokens.check(None), Err(Refusal::Missing));
        std::fs::write(&path, "gamma\n").unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert_eq!(tokens.check(Some(b"Bearer gamma")), Ok(()));
        assert_eq!(tokens.check(Some(b"Bearer alpha")), Err(Refusal::Wrong));
        std::fs::write(&path, "# none\n").unwrap();
        assert!(tokens.reload().is_err(), "an empty file is refused");
        assert_eq!(
            tokens.check(Some(b"Bearer gamma")),
            Ok(()),
            "and the old tokens stay"
        );
    }
}
