//! TLS, mutual TLS, the client allow-list and bearer tokens, with real handshakes: every
//! certificate is made here with rcgen, the server is xentd's own (in this process, or the
//! binary for SIGHUP), and the client is xent's Rust client on tonic's rustls.
//!
//! The cases: the right CA; a wrong CA; an expired certificate; a certificate for another
//! name; mutual TLS with no client certificate, and with one; a client outside the
//! allow-list, and one inside; a token missing, malformed, wrong, right, and replaced by a
//! reloaded file; a certificate rotated under load, losing no call; plaintext against the TLS
//! port; the plaintext health-only listener; a SIGHUP reload of the binary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ndarray::array;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType,
    date_time_ymd,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use xent::client::{Client, ClientConfig, ClientError, ClientTls, EvalRequest, Token};
use xent::config::{SecuritySettings, Settings};
use xent::server::tls::TlsFiles;

use crate::common::{TestServer, free_port};

/// A certificate authority that signs what the tests need.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// A leaf for `names` (DNS names, and 127.0.0.1), with common name `cn`; expired if asked.
    fn leaf(&self, cn: &str, names: &[&str], expired: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, cn);
        if expired {
            params.not_before = date_time_ymd(2020, 1, 1);
            params.not_after = date_time_ymd(2021, 1, 1);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }
}

/// Files in a temporary directory.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new() -> Files {
        Files {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        // Written whole under another name, then renamed: a reload never reads half a file.
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

/// A server with TLS from `files` (server.pem, server.key, and client-ca.pem when `mtls`).
async fn tls_server(
    files: &Files,
    mtls: bool,
    allow: &[&str],
    tokens: Option<&Path>,
) -> TestServer {
    let security = SecuritySettings {
        tls: Some(TlsFiles {
            cert: files.dir.path().join("server.pem"),
            key: files.dir.path().join("server.key"),
            client_ca: mtls.then(|| files.dir.path().join("client-ca.pem")),
            client_allow: allow.iter().map(|s| s.to_string()).collect(),
        }),
        auth_token_file: tokens.map(Path::to_path_buf),
        ..Settings::default().security
    };
    TestServer::with_security(Settings {
        compute_threads: 2,
        security,
        ..Settings::default()
    })
    .await
}

fn client_tls(ca: &Path) -> ClientTls {
    ClientTls {
        ca: ca.to_path_buf(),
        cert: None,
        key: None,
        domain: Some("localhost".into()),
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    tls: ClientTls,
    token: Option<&str>,
) -> Result<Client, ClientError> {
    Client::connect_with(
        format!("127.0.0.1:{}", addr.port()),
        ClientConfig {
            tls: Some(tls),
            token: token.map(|t| Token(t.into())),
            timeout: Some(Duration::from_secs(10)),
            connect_timeout: Some(Duration::from_secs(5)),
            ..ClientConfig::default()
        },
    )
    .await
}

/// One Evaluate, answered right.
async fn evaluate(client: &mut Client) -> Result<(), tonic::Code> {
    let logits = array![[1.0f32, 2.0, 0.5]].into_dyn();
    let labels = array![1i64].into_dyn();
    match client
        .evaluate(EvalRequest::sparse(logits.view(), labels.view()))
        .await
    {
        Ok(out) => {
            assert_eq!(out.loss.map(|l| l.len()), Some(1));
            Ok(())
        }
        Err(ClientError::Status(s)) => Err(s.code()),
        Err(e) => panic!("{e}"),
    }
}

/// Files for a server signed by `ca` for localhost.
fn server_files(files: &Files, ca: &Ca) {
    let (cert, key) = ca.leaf("xentd", &["localhost"], false);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    files.write("ca.pem", &ca.pem());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_certificate_is_checked_by_the_client() {
    let (ca, other) = (Ca::new("xent test CA"), Ca::new("another CA"));
    let files = Files::new();
    server_files(&files, &ca);
    let other_ca = files.write("other-ca.pem", &other.pem());
    let server = tls_server(&files, false, &[], None).await;
    let ca_pem = files.dir.path().join("ca.pem");

    // The right CA.
    let mut client = connect(server.addr, client_tls(&ca_pem), None)
        .await
        .unwrap();
    assert_eq!(client.health("").await.unwrap(), ServingStatus::Serving);
    evaluate(&mut client).await.unwrap();

    // A wrong CA.
    assert!(
        connect(server.addr, client_tls(&other_ca), None)
            .await
            .is_err()
    );

    // Another name.
    let mut tls = client_tls(&ca_pem);
    tls.domain = Some("elsewhere.example".into());
    assert!(connect(server.addr, tls, None).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused() {
    let ca = Ca::new("xent test CA");
    let files = Files::new();
    let (cert, key) = ca.leaf("xentd", &["localhost"], true);
    files.write("server.pem", &cert);
    files.write("server.key", &key);
    let ca_pem = files.write("ca.pem", &ca.pem());
    let server = tls_server(&files, false, &[], None).await;
    let err = connect(server.addr, client_tls(&ca_pem), None)
        .await
        .expect_err("an expired certificate is refused");
    assert!(err.to_string().to_lowercase().contains("expired"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_clients_without_a_certificate_from_the_ca_or_outside_the_list() {
    let (ca, clients_ca, stranger_ca) = (Ca::new("server CA"), Ca::new("client CA"), Ca::new("x"));
    let files = Files::new();
    server_files(&files, &ca);
    files.write("client-ca.pem", &clients_ca.pem());
    let leaf = |ca: &Ca, cn: &str, stem: &str| {
        let (cert, key) = ca.leaf(cn, &[], false);
        (
            files.write(&format!("{stem}.pem"), &cert),
            files.write(&format!("{stem}.key"), &key),
        )
    };
    let a = leaf(&clients_ca, "trainer-a", "a");
    let b = leaf(&clients_ca, "trainer-b", "b");
    let s = leaf(&stranger_ca, "trainer-a", "s");
    let server = tls_server(&files, true, &["trainer-a"], None).await;
    let ca_pem = files.dir.path().join("ca.pem");
    let with = |(cert, key): &(PathBuf, PathBuf)| ClientTls {
        cert: Some(cert.clone()),
        key: Some(key.clone()),
        ..client_tls(&ca_pem)
    };

    // In the list, from the CA.
    let mut client = connect(server.addr, with(&a), None).await.unwrap();
    evaluate(&mut client).await.unwrap();
    // No certificate: refused in the handshake (the client learns at its first call at the
    // latest, since TLS 1.3 servers check the client's certificate after their Finished).
    for tls in [client_tls(&ca_pem), with(&b), with(&s)] {
        let refused = match connect(server.addr, tls, None).await {
            Err(_) => true,
            Ok(mut c) => c.health("").await.is_err(),
        };
        assert!(refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_need_a_token_from_the_file_and_a_reloaded_file_takes_over() {
    let ca = Ca::new("xent test CA");
    let files = Files::new();
    server_files(&files, &ca);
    let tokens = files.write("tokens", "# trainers\nalpha\nbeta\n");
    let server = tls_server(&files, false, &[], Some(&tokens)).await;
    let ca_pem = files.dir.path().join("ca.pem");

    let mut none = connect(server.addr, client_tls(&ca_pem), None)
        .await
        .unwrap();
    assert_eq!(evaluate(&mut none).await, Err(Code::Unauthenticated));
    // Health needs no token: probes and balancers have none.
    assert_eq!(none.health("").await.unwrap(), ServingStatus::Serving);
    let mut wrong = connect(server.addr, client_tls(&ca_pem), Some("alphaa"))
        .await
        .unwrap();
    assert_eq!(evaluate(&mut wrong).await, Err(Code::Unauthenticated));
    let mut beta = connect(server.addr, client_tls(&ca_pem), Some("beta"))
        .await
        .unwrap();
    evaluate(&mut beta).await.unwrap();

    // The file changes: beta goes, gamma comes, on the connections already open too.
    files.write("tokens", "gamma\n");
    let mut gamma = connect(server.addr, client_tls(&ca_pem), Some("gamma"))
        .await
        .unwrap();
    let start = Instant::now();
    while evaluate(&mut gamma).await.is_err() {
        assert!(start.elapsed() < Duration::from_secs(5), "never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(evaluate(&mut beta).await, Err(Code::Unauthenticated));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_rotated_under_load_loses_no_call() {
    let (old, new) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new();
    server_files(&files, &old);
    let old_ca = files.dir.path().join("ca.pem");
    let new_ca = files.write("new-ca.pem", &new.pem());
    let server = tls_server(&files, false, &[], None).await;

    // Four callers on connections made before the rotation, calling all along.
    let ok = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let mut client = connect(server.addr, client_tls(&old_ca), None)
            .await
            .unwrap();
        let (ok, stop) = (ok.clone(), stop.clone());
        callers.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                evaluate(&mut client).await.expect("no call is lost");
                ok.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cert, key) = new.leaf("xentd", &["localhost"], false);
    files.write("server.key", &key);
    files.write("server.pem", &cert);
    // New connections get the new certificate once the change is seen.
    let start = Instant::now();
    loop {
        if let Ok(mut c) = connect(server.addr, client_tls(&new_ca), None).await
            && c.health("").await.is_ok()
        {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never rotated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        connect(server.addr, client_tls(&old_ca), None)
            .await
            .is_err()
    );
    let before = ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in callers {
        c.await.unwrap();
    }
    assert!(
        ok.load(Ordering::SeqCst) > before,
        "the old connections go on"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_against_the_tls_port_fails_fast_and_the_health_listener_serves_probes() {
    let ca = Ca::new("xent test CA");
    let files = Files::new();
    server_files(&files, &ca);
    let health_port = free_port();
    let security = SecuritySettings {
        tls: Some(TlsFiles {
            cert: files.dir.path().join("server.pem"),
            key: files.dir.path().join("server.key"),
            client_ca: None,
            client_allow: vec![],
        }),
        health_listen: Some(format!("127.0.0.1:{health_port}").parse().unwrap()),
        ..Settings::default().security
    };
    let server = TestServer::with_security(Settings {
        compute_threads: 2,
        security,
        ..Settings::default()
    })
    .await;
    let start = Instant::now();
    let plain = Client::connect_with(
        format!("127.0.0.1:{}", server.addr.port()),
        ClientConfig {
            timeout: Some(Duration::from_secs(5)),
            ..ClientConfig::default()
        },
    )
    .await;
    let failed = match plain {
        Err(_) => true,
        Ok(mut c) => c.health("").await.is_err(),
    };
    assert!(failed, "plaintext is not served on the TLS port");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );

    // The health-only listener: plaintext, health and nothing else.
    let mut probe = Client::connect(format!("127.0.0.1:{health_port}"))
        .await
        .unwrap();
    assert_eq!(probe.health("").await.unwrap(), ServingStatus::Serving);
    assert_eq!(evaluate(&mut probe).await, Err(Code::Unimplemented));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_its_certificate_on_sighup_and_lives_on() {
    let (old, new) = (Ca::new("old CA"), Ca::new("new CA"));
    let files = Files::new();
    server_files(&files, &old);
    let new_ca = files.write("new-ca.pem", &new.pem());
    let dir = files.dir.path();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key"));
    let (mut child, endpoint) = crate::common::spawn_xentd(
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        std::process::Stdio::null(),
    );
    let addr: std::net::SocketAddr = endpoint.trim_start_matches("http://").parse().unwrap();
    let (c, k) = new.leaf("xentd", &["localhost"], false);
    files.write("server.key", &k);
    files.write("server.pem", &c);
    // SIGHUP's default action ends a process: xentd must take it as "reload".
    let pid = child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = Instant::now();
    loop {
        let last = match connect(addr, client_tls(&new_ca), None).await {
            Ok(mut c) => match c.health("").await {
                Ok(_) => break,
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never reloaded: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(child.try_wait().unwrap().is_none(), "xentd lives on");
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bad_certificate_file_stops_xentd_with_a_message_naming_its_flag() {
    let files = Files::new();
    let cert = files.write("server.pem", "not a certificate\n");
    let key = files.write("server.key", "not a key\n");
    let out = std::process::Command::new(crate::common::xentd_bin())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .args(["--tls-cert", cert.to_str().unwrap()])
        .args(["--tls-key", key.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--tls-cert"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_gzip_can_be_turned_off() {
    use crate::raw::{Raw, answer, grpc_frame};
    let server = TestServer::with_settings(Settings {
        compute_threads: 2,
        security: SecuritySettings {
            reflection: false,
            gzip: false,
            ..Settings::default().security
        },
        ..Settings::default()
    })
    .await;
    let mut raw = Raw::connect(server.addr).await;
    let (resp, mut body) = raw
        .open("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        .await
        .unwrap();
    let _ = body.send_data(
        grpc_frame(&tonic_health::pb::HealthCheckRequest::default()),
        true,
    );
    assert_eq!(answer(resp).await.status, Code::Unimplemented);
    // A gzip request: refused, since the server does not accept gzip.
    let mut client = server
        .client()
        .await
        .send_compressed(tonic::codec::CompressionEncoding::Gzip);
    let err = client
        .evaluate(crate::drain::request(1, 10, "gz"))
        .await
        .expect_err("gzip is off");
    assert_eq!(err.code(), Code::Unimplemented, "{err}");
    // Uncompressed, served.
    let mut client = server.client().await;
    client
        .evaluate(crate::drain::request(1, 10, "plain"))
        .await
        .unwrap();
}
