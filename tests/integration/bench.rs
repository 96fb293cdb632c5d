//! `xent bench` against a real server: the counts add up, nothing fails, answers verify,
//! `--json` is one parsable object, `--plot` writes an SVG chart, and `--protocol oip` goes
//! through ModelInfer.

use std::process::Command;

use crate::common::TestServer;

/// Runs `xent bench` off the async runtime (the in-process server needs it).
async fn bench(args: Vec<String>) -> std::process::Output {
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_xent"))
            .arg("bench")
            .args(&args)
            .env_remove("XENT_ADDRESS")
            .output()
            .expect("run xent bench")
    })
    .await
    .expect("join")
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn json(out: &std::process::Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xent bench failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.trim_end().lines().count(),
        1,
        "one JSON line: {stdout}"
    );
    serde_json::from_str(&stdout).expect("--json prints JSON")
}

fn check_counts(report: &serde_json::Value) {
    let requests = report["requests"].as_u64().unwrap();
    let ok = report["ok"].as_u64().unwrap();
    let errors: u64 = report["errors"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(requests, ok + errors, "{report}");
    assert_eq!(errors, 0, "{report}");
    assert!(ok > 0, "{report}");
    let latency = &report["latency_ms"];
    let p50 = latency["p50"].as_f64().unwrap();
    let p99 = latency["p99"].as_f64().unwrap();
    let max = latency["max"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{report}");
    assert!(report["requests_per_s"].as_f64().unwrap() > 0.0);
}

#[tokio::test]
async fn closed_loop_counts_add_up_verifies_and_plots() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("latency.svg");
    let out = bench(strings(&[
        "--address",
        &server.endpoint(),
        "--concurrency",
        "4",
        "--duration",
        "1",
        "--rows",
        "8",
        "--classes",
        "32",
        "--verify",
        "0.5",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]))
    .await;
    let report = json(&out);
    check_counts(&report);
    assert_eq!(report["mode"], "closed");
    assert_eq!(report["logits_bytes"], 8 * 32 * 4);
    let verify = &report["verify"];
    assert!(verify["checked"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(verify["mismatches"], 0, "{report}");
    let chart = std::fs::read_to_string(&svg).expect("--plot writes the chart");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    assert!(chart.contains("<polyline"), "{chart}");
}

#[tokio::test]
async fn open_loop_over_two_addresses_with_options() {
    let server = TestServer::start().await;
    let out = bench(strings(&[
        "--address",
        &format!("{},{}", server.endpoint(), server.addr),
        "--rate",
        "100",
        "--duration",
        "1",
        "--rows",
        "4",
        "--classes",
        "10",
        "--loss",
        "softmax_cross_entropy",
        "--dtype",
        "bfloat16",
        "--reduction",
        "mean",
        "--label-smoothing",
        "0.1",
        "--outputs",
        "loss,grad_labels",
        "--verify",
        "1",
        "--json",
    ]))
    .await;
    let report = json(&out);
    check_counts(&report);
    assert_eq!(report["mode"], "open");
    assert_eq!(report["addresses"].as_array().unwrap().len(), 2);
    // 100 req/s for 1 s: every scheduled call is made and answered.
    assert_eq!(report["requests"], 100, "{report}");
    assert_eq!(report["verify"]["checked"], 100);
    assert_eq!(report["verify"]["mismatches"], 0, "{report}");
}

#[tokio::test]
async fn errors_are_counted_by_code() {
    let server = TestServer::start().await;
    // Label smoothing outside [0, 1]: every call is INVALID_ARGUMENT.
    let out = bench(strings(&[
        "--address",
        &server.endpoint(),
        "--concurrency",
        "2",
        "--duration",
        "0.3",
        "--rows",
        "2",
        "--classes",
        "3",
        "--label-smoothing",
        "2",
        "--json",
    ]))
    .await;
    let report = json(&out);
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests > 0);
    assert_eq!(report["ok"], 0);
    assert_eq!(
        report["errors"]["INVALID_ARGUMENT"].as_u64().unwrap(),
        requests,
        "{report}"
    );
}

/// `GET /metrics` of a metrics listener.
fn scrape(addr: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to /metrics");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read /metrics");
    body
}

/// The value of `xent_calls_total` for `method` and `code` (0 when there is no series).
fn calls(metrics: &str, method: &str, code: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("xent_calls_total{"))
        .filter(|l| l.contains(&format!("method=\"{method}\"")))
        .filter(|l| l.contains(&format!("code=\"{code}\"")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

#[tokio::test]
async fn the_oip_protocol_loads_model_infer_and_verifies() {
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (child, endpoint) =
        crate::common::spawn_xentd(&["--metrics-listen", &metrics], std::process::Stdio::null());
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _xentd = Kill(child);
    let common = |extra: &[&str]| {
        let mut args = strings(&[
            "--address",
            &endpoint,
            "--protocol",
            "oip",
            "--rows",
            "8",
            "--classes",
            "16",
            "--json",
        ]);
        args.extend(strings(extra));
        args
    };
    // Open loop: exactly 50 calls, every answer checked against the float64 reference.
    let out = bench(common(&[
        "--rate",
        "50",
        "--duration",
        "1",
        "--loss",
        "softmax_cross_entropy",
        "--dtype",
        "float16",
        "--reduction",
        "mean",
        "--outputs",
        "loss,grad_logits,grad_labels",
        "--verify",
        "1",
    ]))
    .await;
    let report = json(&out);
    check_counts(&report);
    assert_eq!(report["protocol"], "oip");
    assert_eq!(report["requests"], 50, "{report}");
    assert_eq!(report["verify"]["checked"], 50, "{report}");
    assert_eq!(report["verify"]["mismatches"], 0, "{report}");
    // Invalid options are refused through ModelInfer too.
    let out = bench(common(&[
        "--concurrency",
        "2",
        "--duration",
        "0.3",
        "--label-smoothing",
        "2",
    ]))
    .await;
    let refused = json(&out);
    let invalid = refused["errors"]["INVALID_ARGUMENT"].as_u64().unwrap();
    assert!(invalid > 0 && refused["ok"] == 0, "{refused}");

    let m = scrape(&metrics);
    assert_eq!(calls(&m, "ModelInfer", "OK"), 50, "{m}");
    assert_eq!(calls(&m, "ModelInfer", "INVALID_ARGUMENT"), invalid, "{m}");
    assert_eq!(
        calls(&m, "Evaluate", "OK"),
        0,
        "nothing went through xent.v1"
    );
}
