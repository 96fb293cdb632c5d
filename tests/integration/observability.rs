//! Metrics as an operator sees them: the real xentd binary scraped by a real Prometheus
//! (Debian's `prometheus` package, which `.ci/run` installs), whose query API must count
//! exactly the calls made; `promtool check metrics` accepts the exposition as it is; and the
//! rules of deploy/prometheus and every query of the Grafana dashboard run on that Prometheus
//! without error.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use xent::api::tensor::encode;
use xent::proto::{EvaluateRequest, LossKind, NumericalHealth, evaluate_stream_response};

use crate::common::{Client, free_port, http_get as get};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/deploy/grafana/xent-dashboard.json"
);

/// How long Prometheus gets to show what was done.
const PATIENCE: Duration = Duration::from_secs(60);

/// `name` on PATH or in /usr/bin; a missing tool fails the test, never skips it.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{name}` is not on PATH nor in /usr/bin: this test needs a real Prometheus \
                 and promtool, from Debian's prometheus package (`.ci/run` installs it: \
                 apt-get install -y prometheus)"
            )
        })
}

/// A child process killed when dropped, so a failed assertion leaves nothing running.
struct Running(Child);

impl Running {
    /// SIGTERM, then its exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "SIGTERM delivered");
        self.0.wait().expect("wait")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The end of a log file, for failure messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The `data` of a successful Prometheus API answer.
fn api(prom: SocketAddr, path: &str) -> Value {
    let (status, body) = get(prom, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let v: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: {status} {body:?} is not JSON: {e}"));
    assert!(
        status == 200 && v["status"] == "success",
        "GET {path}: {status} {body}"
    );
    v["data"].clone()
}

/// The series an instant query returns.
fn query(prom: SocketAddr, q: &str) -> Vec<Value> {
    let data = api(prom, &format!("/api/v1/query?query={}", urlencode(q)));
    data["result"].as_array().cloned().unwrap_or_default()
}

/// The value of a query returning at most one series (`None` when it returns none).
fn scalar(prom: SocketAddr, q: &str) -> Option<f64> {
    let series = query(prom, q);
    assert!(series.len() <= 1, "{q} returned several series: {series:?}");
    series.first().map(|s| {
        s["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{q}: no value in {s}"))
    })
}

/// A sparse request of 2 rows and 3 classes; a class id of 3 or more makes it invalid.
fn request(id: &str, labels: [i64; 2]) -> EvaluateRequest {
    EvaluateRequest {
        request_id: id.into(),
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[2, 3], vec![1.0f32, 2.0, 0.5, 0.2, 0.8, 1.5], true)),
        labels: Some(encode(&[2], labels.to_vec(), true)),
        ..Default::default()
    }
}

const VALID: [i64; 2] = [1, 2];
const INVALID: [i64; 2] = [1, 7];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_every_call_and_runs_the_rules_and_dashboard() {
    let (prometheus, promtool) = (tool("prometheus"), tool("promtool"));
    let dir = tempfile::tempdir().expect("tempdir");

    // xentd, with its metrics on a port of its own.
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let xentd_log = dir.path().join("xentd.log");
    let mut child = Command::new(crate::common::xentd_bin())
        .args(["--listen", "127.0.0.1:0", "--metrics-listen"])
        .arg(metrics.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(File::create(&xentd_log).unwrap())
        .spawn()
        .expect("xentd starts");
    let stdout = child.stdout.take().unwrap();
    let xentd = Running(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let Some(addr) = line.trim().strip_prefix("listening on ") else {
        panic!("xentd printed {line:?}; log:\n{}", tail(&xentd_log))
    };

    // Prometheus, scraping it every second and evaluating the project's rules.
    let web: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {RULES}\n\
             scrape_configs:\n  - job_name: xentd\n    static_configs:\n      - targets: [\"{metrics}\"]\n"
        ),
    )
    .unwrap();
    let prom_log = dir.path().join("prometheus.log");
    let log_file = File::create(&prom_log).unwrap();
    let prom = Running(
        Command::new(&prometheus)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", prometheus.display())),
    );

    // The calls: 7 valid and 3 invalid Evaluate calls, and a stream of 3 valid requests and
    // 1 invalid one (each answered in the stream with its own code). The first call is seen by
    // a scrape before the others are made: a counter's increase before its first sample is
    // invisible to rate(), which the recording rules use.
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to xentd");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let mut serving = false;
    for _ in 0..500 {
        serving = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving);
        if serving {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(serving, "xentd never SERVING; log:\n{}", tail(&xentd_log));
    let mut client: Client = xent::proto::xent_client::XentClient::new(channel);
    client
        .evaluate(request("ok-0", VALID))
        .await
        .expect("a valid request is answered");
    let log = prom_log.clone();
    tokio::task::spawn_blocking(move || {
        wait_until(web, r#"up{job="xentd"}"#, 1.0, &log);
        wait_until(
            web,
            r#"xent_calls_total{method="Evaluate",code="OK"}"#,
            1.0,
            &log,
        );
    })
    .await
    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    for i in 1..5 {
        client
            .evaluate(request(&format!("ok-{i}"), VALID))
            .await
            .expect("a valid request is answered");
    }
    // Two valid calls whose numbers are not healthy: a NaN logit (its row's loss is NaN) and
    // a -inf one at a class that is not the target; then a dense row summing to 0.5.
    let mut sick = request("ok-nan", VALID);
    sick.logits = Some(encode(
        &[2, 3],
        vec![1.0f32, f32::NAN, 0.5, 0.2, f32::NEG_INFINITY, 1.5],
        true,
    ));
    let health = client
        .evaluate(sick)
        .await
        .expect("answered")
        .into_inner()
        .health;
    assert_eq!(
        health,
        Some(NumericalHealth {
            nonfinite_inputs: 2,
            unnormalized_label_rows: 0,
            nonfinite_loss_rows: 1,
        })
    );
    let mut unnormalized = request("ok-dense", VALID);
    unnormalized.loss = LossKind::SoftmaxCrossEntropy as i32;
    unnormalized.labels = Some(encode(&[2, 3], vec![0.5f32, 0.0, 0.0, 0.0, 0.0, 1.0], true));
    let health = client
        .evaluate(unnormalized)
        .await
        .expect("answered")
        .into_inner()
        .health;
    assert_eq!(
        health,
        Some(NumericalHealth {
            nonfinite_inputs: 0,
            unnormalized_label_rows: 1,
            nonfinite_loss_rows: 0,
        })
    );
    for i in 0..3 {
        let err = client
            .evaluate(request(&format!("bad-{i}"), INVALID))
            .await
            .expect_err("a class id out of range is refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    }
    let stream = ["s-0", "s-1", "s-bad", "s-3"]
        .map(|id| request(id, if id.ends_with("bad") { INVALID } else { VALID }));
    let mut answers = client
        .evaluate_stream(futures::stream::iter(stream))
        .await
        .expect("stream opens")
        .into_inner();
    let mut codes = Vec::new();
    while let Some(a) = answers.message().await.expect("stream answer") {
        codes.push(match a.result.expect("a result") {
            evaluate_stream_response::Result::Response(_) => Code::Ok,
            evaluate_stream_response::Result::Error(e) => Code::from(e.code),
        });
    }
    assert_eq!(
        codes,
        [Code::Ok, Code::Ok, Code::InvalidArgument, Code::Ok],
        "stream answers"
    );

    let checks = tokio::task::spawn_blocking(move || {
        check_prometheus(web, metrics, &promtool, &prom_log);
    });
    if let Err(e) = checks.await {
        let e = e.into_panic();
        let why = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        panic!("{why}\nxentd log:\n{}", tail(&xentd_log));
    }

    let status = tokio::task::spawn_blocking(move || xentd.terminate())
        .await
        .unwrap();
    assert!(
        status.success(),
        "xentd exits 0 on SIGTERM: {status:?}; log:\n{}",
        tail(&xentd_log)
    );
    let status = tokio::task::spawn_blocking(move || prom.terminate())
        .await
        .unwrap();
    assert!(
        status.success(),
        "prometheus exits 0 on SIGTERM: {status:?}"
    );
}

/// Waits until Prometheus is ready and `q` has the value `want` (blocking).
fn wait_until(web: SocketAddr, q: &str, want: f64, prom_log: &Path) {
    let deadline = Instant::now() + PATIENCE;
    while !matches!(get(web, "/-/ready"), Ok((200, _))) {
        assert!(
            Instant::now() < deadline,
            "Prometheus never ready; its log:\n{}",
            tail(prom_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    loop {
        let got = scalar(web, q);
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{q}: want {want}, got {got:?}; Prometheus log:\n{}",
            tail(prom_log)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Everything asked of Prometheus and promtool once the calls are made (blocking).
fn check_prometheus(web: SocketAddr, metrics: SocketAddr, promtool: &Path, prom_log: &Path) {
    let deadline = Instant::now() + PATIENCE;
    // The counts, once a scrape after the last call has landed. Only valid requests reach
    // the batcher: 10 of them, 2 rows and 6 logits each.
    let want: &[(&str, f64)] = &[
        (r#"up{job="xentd"}"#, 1.0),
        (r#"xent_calls_total{method="Evaluate",code="OK"}"#, 7.0),
        (
            r#"xent_calls_total{method="Evaluate",code="INVALID_ARGUMENT"}"#,
            3.0,
        ),
        (
            r#"xent_calls_total{method="EvaluateStream",code="OK"}"#,
            3.0,
        ),
        (
            r#"xent_calls_total{method="EvaluateStream",code="INVALID_ARGUMENT"}"#,
            1.0,
        ),
        ("sum(xent_calls_total)", 14.0),
        (
            r#"xent_call_duration_seconds_count{method="Evaluate"}"#,
            10.0,
        ),
        (
            r#"xent_call_duration_seconds_count{method="EvaluateStream"}"#,
            4.0,
        ),
        ("xent_request_rows_count", 10.0),
        ("xent_request_rows_sum", 20.0),
        ("xent_batch_requests_sum", 10.0),
        ("xent_batch_rows_sum", 20.0),
        (
            "sum(xent_batches_total) - sum(xent_batch_requests_count)",
            0.0,
        ),
        ("xent_queue_wait_seconds_count", 10.0),
        ("xent_compute_seconds_count", 10.0),
        ("xent_elements_computed_total", 60.0),
        ("xent_nonfinite_inputs_total", 2.0),
        ("xent_unnormalized_label_rows_total", 1.0),
        ("xent_nonfinite_loss_rows_total", 1.0),
        ("xent_calls_in_flight", 0.0),
        ("xent_queue_requests", 0.0),
        ("xent_queue_bytes", 0.0),
        // The process metrics, scraped like any other.
        (
            r#"process_resident_memory_bytes{job="xentd"} > bool 1e6"#,
            1.0,
        ),
        (r#"process_open_fds{job="xentd"} > bool 0"#, 1.0),
        (
            r#"time() - process_start_time_seconds{job="xentd"} < bool 600"#,
            1.0,
        ),
        (
            &format!(
                r#"xent_build_info{{version="{}",features=~".+"}}"#,
                env!("CARGO_PKG_VERSION")
            ),
            1.0,
        ),
        // The recording rules see the calls too.
        (
            r#"instance_method_code:xent_calls:rate5m{method="Evaluate",code="OK"} > bool 0"#,
            1.0,
        ),
        (r#"job:xent_call_errors:ratio_rate5m{job="xentd"}"#, 0.0),
    ];
    loop {
        let got: Vec<Option<f64>> = want.iter().map(|(q, _)| scalar(web, q)).collect();
        let wrong: Vec<String> = want
            .iter()
            .zip(&got)
            .filter(|((_, w), g)| **g != Some(*w))
            .map(|((q, w), g)| format!("{q}: want {w}, got {g:?}"))
            .collect();
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never showed the calls made:\n{}\nits log:\n{}",
            wrong.join("\n"),
            tail(prom_log)
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        query(web, "xent_batches_total")
            .iter()
            .all(|s| s["metric"]["reason"].is_string()),
        "every batch counted with its close reason"
    );

    // Every rule of deploy/prometheus/alerts.yml evaluates without error on real series, and
    // none fires on this healthy replica.
    loop {
        let groups = api(web, "/api/v1/rules")["groups"].clone();
        let rules: Vec<Value> = groups
            .as_array()
            .expect("rule groups")
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(rules.len() >= 10, "the rules are loaded: {groups}");
        let broken: Vec<&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
        assert!(broken.is_empty(), "rules fail to evaluate: {broken:?}");
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules never evaluated: {rules:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // The one NaN loss row puts the non-finite-loss alert in pending (it fires after 15
    // minutes of them); nothing else is wrong.
    // Rules run every second: poll until an evaluation after the last scrape has been seen.
    loop {
        let alerts = api(web, "/api/v1/alerts")["alerts"].clone();
        let names: Vec<(String, String)> = alerts
            .as_array()
            .expect("alerts")
            .iter()
            .map(|a| {
                let s = |v: &Value| v.as_str().unwrap_or("").to_string();
                (s(&a["labels"]["alertname"]), s(&a["state"]))
            })
            .collect();
        let want = [("XentNonFiniteLossRows".to_string(), "pending".to_string())];
        if names == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "want only the non-finite loss alert, pending; got {alerts}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Every query of the dashboard, with its variables filled in, is valid PromQL.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).expect("dashboard")).unwrap();
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() >= 20, "dashboard queries: {exprs:?}");
    for expr in &exprs {
        let q = expr
            .replace("$job", "xentd")
            .replace("$instance", ".*")
            .replace("$__rate_interval", "1m");
        query(web, &q);
    }
    // The calls panel through the recording rule: one series per method and code, once each
    // has two samples.
    let panel = r#"sum by (method, code) (instance_method_code:xent_calls:rate5m{job=~"xentd",instance=~".*"})"#;
    loop {
        let series = query(web, panel);
        if series.len() == 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the calls panel never showed 4 series: {series:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // promtool accepts the exposition exactly as served, lint included.
    let (status, body) = get(metrics, "/metrics").expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {:?}\n{said}\non:\n{body}",
        out.status
    );
}

/// The `expr` of every panel target.
fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The samples of an exposition, by series (name and labels as written).
fn samples(body: &str) -> std::collections::HashMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// `Name: value` of `/proc/<pid>/status`, read by the test itself.
fn proc_status(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_listener_serves_process_metrics_and_404_elsewhere() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let (child, endpoint) = crate::common::spawn_xentd(
        &[
            "--metrics-listen",
            &metrics.to_string(),
            "--io-threads",
            "2",
            "--compute-threads",
            "2",
        ],
        Stdio::null(),
    );
    let pid = child.id();
    let xentd = Running(child);
    let mut client: Client = xent::proto::xent_client::XentClient::connect(endpoint)
        .await
        .expect("connect");
    for i in 0..20 {
        client
            .evaluate(request(&format!("p-{i}"), VALID))
            .await
            .expect("answered");
    }

    let scrape = move || {
        let (status, body) = get(metrics, "/metrics").expect("GET /metrics");
        assert_eq!(status, 200, "{body}");
        body
    };
    let (body, threads_seen) = tokio::task::spawn_blocking(move || {
        let body = scrape();
        (body, proc_status(pid, "Threads"))
    })
    .await
    .unwrap();
    let s = samples(&body);
    let v = |name: &str| {
        *s.get(name)
            .unwrap_or_else(|| panic!("{name} in the exposition:\n{body}"))
    };
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
        ("process_threads", "gauge"),
    ] {
        assert!(
            body.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} typed {kind}:\n{body}"
        );
    }
    let rss = v("process_resident_memory_bytes");
    assert!((1e6..8e9).contains(&rss), "resident {rss}");
    assert!(v("process_virtual_memory_bytes") >= rss);
    let kib = proc_status(pid, "VmRSS") * 1024.0;
    assert!(
        (rss - kib).abs() < 0.5 * kib,
        "resident {rss} bytes, /proc says {kib}"
    );
    let (open, max) = (v("process_open_fds"), v("process_max_fds"));
    assert!(open >= 5.0 && open < max, "open fds {open} of {max}");
    let cpu = v("process_cpu_seconds_total");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let start = v("process_start_time_seconds");
    // The kernel's boot time is in whole seconds, the start in 10 ms ticks after it.
    assert!(
        start >= started - 2.0 && start <= now + 1.0,
        "started at {start}, between {started} and {now}"
    );
    assert!(
        cpu >= 0.0 && cpu <= (now - start + 1.0) * 64.0,
        "cpu seconds {cpu} after {} s",
        now - start
    );
    // Two I/O threads, two compute threads, the main thread; the test's own count, read
    // right after the scrape, agrees (give or take a blocking-pool thread coming or going).
    let threads = v("process_threads");
    assert!(threads >= 5.0, "threads {threads}");
    assert!(
        (threads - threads_seen).abs() <= 2.0,
        "threads {threads}: /proc/{pid}/status says {threads_seen}"
    );
    // xent's own metrics are still there.
    assert_eq!(
        s.get(r#"xent_calls_total{method="Evaluate",code="OK"}"#),
        Some(&20.0),
        "{body}"
    );

    // CPU time grows with work (it is counted in 10 ms ticks: a few calls may not show).
    let big = EvaluateRequest {
        request_id: "big".into(),
        loss: LossKind::SparseSoftmaxCrossEntropy as i32,
        logits: Some(encode(&[64, 4096], vec![0.5f32; 64 * 4096], true)),
        labels: Some(encode(&[64], vec![1i64; 64], true)),
        ..Default::default()
    };
    let deadline = Instant::now() + PATIENCE;
    loop {
        for _ in 0..20 {
            client.evaluate(big.clone()).await.expect("answered");
        }
        let later =
            tokio::task::spawn_blocking(move || samples(&scrape())["process_cpu_seconds_total"])
                .await
                .unwrap();
        if later > cpu {
            break;
        }
        assert!(
            later == cpu && Instant::now() < deadline,
            "cpu seconds went from {cpu} to {later}"
        );
    }

    let checks = tokio::task::spawn_blocking(move || {
        assert_eq!(
            get(metrics, "/health").expect("GET /health"),
            (200, "OK".into())
        );
        for path in ["/", "/other", "/metrics/extra", "/metricsx"] {
            let (status, _) = get(metrics, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
            assert_eq!(status, 404, "GET {path}");
        }
    });
    checks
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
    let status = tokio::task::spawn_blocking(move || xentd.terminate())
        .await
        .unwrap();
    assert!(status.success(), "xentd exits 0: {status:?}");
}
