//! TLS on the gRPC listener, with rustls: the server's certificate, and with a client CA,
//! mutual TLS with an optional allow-list of client names.
//!
//! The files are read at start, where a bad one stops the server with a message that names
//! its flag, and again on every reload (`reload`: SIGHUP, or a change of a file's
//! modification time). A reload builds a whole new rustls configuration and swaps it in for
//! the handshakes that follow; connections already open keep the session they have, so a
//! certificate rotation drops nothing. A reload that fails (a key that does not match its
//! certificate, a file half written) keeps the configuration in use and says why in the log.
//!
//! The allow-list is checked inside the handshake, by a client-certificate verifier that
//! wraps the CA's: a client whose certificate chains to the CA but names none of the allowed
//! subjects is refused with a TLS alert, like one with no certificate at all.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::RootCertStore;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_rustls::TlsAcceptor;

use super::reload::Stamp;
use crate::error::Error;

/// The files TLS is made of (flags `--tls-cert`, `--tls-key`, `--tls-client-ca`,
/// `--tls-client-allow`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// Its private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to: mutual TLS.
    pub client_ca: Option<PathBuf>,
    /// With a client CA, the only client subject names accepted (a common name or a DNS, URI
    /// or e-mail subject alternative name); empty accepts any the CA signed.
    pub client_allow: Vec<String>,
}

/// The TLS configuration of a listener, reloadable.
#[derive(Debug)]
pub struct Tls {
    files: TlsFiles,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
    stamp: Stamp,
}

impl Tls {
    /// Reads `files`; `alpn` lists the protocols the listener speaks (`h2` for gRPC).
    pub fn load(files: TlsFiles, alpn: &[&[u8]]) -> Result<Arc<Tls>, Error> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = build(&files, &alpn)?;
        let stamp = Stamp::of(&files_of(&files));
        Ok(Arc::new(Tls {
            files,
            alpn,
            current: RwLock::new(Arc::new(config)),
            stamp,
        }))
    }

    /// The acceptor for the next handshake.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().expect("tls config").clone())
    }

    /// Reads the files again and, if they make a valid configuration, uses it from the next
    /// handshake on.
    pub fn reload(&self) -> Result<(), Error> {
        let config = build(&self.files, &self.alpn)?;
        *self.current.write().expect("tls config") = Arc::new(config);
        Ok(())
    }

    /// Whether a file changed since the last look (and notes the new times).
    pub fn changed(&self) -> bool {
        self.stamp.changed(&files_of(&self.files))
    }
}

fn files_of(files: &TlsFiles) -> Vec<PathBuf> {
    let mut all = vec![files.cert.clone(), files.key.clone()];
    all.extend(files.client_ca.clone());
    all
}

/// A rustls server configuration from `files`.
fn build(files: &TlsFiles, alpn: &[Vec<u8>]) -> Result<ServerConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("--tls-cert", &files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| bad("--tls-key", &files.key, &format!("no PEM private key: {e}")))?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Startup(format!("TLS: {e}")))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--tls-client-ca", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| bad("--tls-client-ca", ca, &e.to_string()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| bad("--tls-client-ca", ca, &e.to_string()))?;
            if files.client_allow.is_empty() {
                builder.with_client_cert_verifier(verifier)
            } else {
                builder.with_client_cert_verifier(Arc::new(AllowList {
                    inner: verifier,
                    names: files.client_allow.clone(),
                }))
            }
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        bad(
            "--tls-key",
            &files.key,
            &format!("does not go with --tls-cert: {e}"),
        )
    })?;
    config.alpn_protocols = alpn.to_vec();
    Ok(config)
}

fn read_certs(flag: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(flag, path, &e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(flag, path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(flag, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn bad(flag: &str, path: &Path, why: &str) -> Error {
    Error::Startup(format!("{flag} {}: {why}", path.display()))
}

/// The subject names of a certificate: its common names and its DNS, URI and e-mail
/// alternative names.
pub fn subject_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    names.push((*s).to_owned());
                }
                _ => {}
            }
        }
    }
    names
}

/// The CA's verifier, and then the allow-list.
#[derive(Debug)]
struct AllowList {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<String>,
}

impl ClientCertVerifier for AllowList {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if subject_names(end_entity)
            .iter()
            .any(|n| self.names.contains(n))
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
