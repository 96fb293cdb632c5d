//! Reloading the files the server was started with (TLS certificates and keys, bearer
//! tokens) without a restart: on SIGHUP, and when a file's modification time changes, which is
//! how a Kubernetes Secret mounted as a volume is updated (looked at every
//! [`POLL`]). A reload that fails keeps what was in use and logs why.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio_util::sync::CancellationToken;

use super::auth::Tokens;
use super::tls::Tls;

/// How often the files' modification times are looked at.
pub const POLL: Duration = Duration::from_secs(1);

/// The modification times of a set of files, as last seen.
#[derive(Debug)]
pub struct Stamp(Mutex<Vec<Option<SystemTime>>>);

impl Stamp {
    /// The times of `files` now.
    pub fn of(files: &[PathBuf]) -> Stamp {
        Stamp(Mutex::new(times(files)))
    }

    /// Whether any of `files` changed since the last look; notes the new times.
    pub fn changed(&self, files: &[PathBuf]) -> bool {
        let now = times(files);
        let mut seen = self.0.lock().expect("stamp");
        if *seen == now {
            return false;
        }
        *seen = now;
        true
    }
}

fn times(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// What can be reloaded.
#[derive(Clone, Debug, Default)]
pub struct Reloadable {
    /// The gRPC listener's TLS.
    pub tls: Option<Arc<Tls>>,
    /// The bearer tokens.
    pub tokens: Option<Arc<Tokens>>,
}

impl Reloadable {
    /// Reloads what changed, or everything when `all`.
    fn reload(&self, all: bool) {
        if let Some(tls) = &self.tls
            && (tls.changed() || all)
        {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate and key reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use")
                }
            }
        }
        if let Some(tokens) = &self.tokens
            && (tokens.changed() || all)
        {
            match tokens.reload() {
                Ok(n) => tracing::info!(tokens = n, "bearer tokens reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "token reload failed; the previous tokens stay in use")
                }
            }
        }
    }

    /// Reloads on SIGHUP and on file changes until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        if self.tls.is_none() && self.tokens.is_none() {
            return;
        }
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match &mut hup {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            tokio::select! {
                () = stop.cancelled() => return,
                () = hangup => {
                    tracing::info!("SIGHUP: reloading certificates and tokens");
                    self.reload(true);
                }
                () = tokio::time::sleep(POLL) => self.reload(false),
            }
        }
    }
}
