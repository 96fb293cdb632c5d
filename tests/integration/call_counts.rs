//! The load generator and xentd agree on how many calls were made: the real xentd binary,
//! loaded by the real `xent bench` (successes, then calls every one of which is refused),
//! must show in `xent_calls_total` exactly the counts by gRPC code that the `--json` reports
//! give, no more and no fewer. A call the server forgets, counts twice or files under another
//! code, and a call the generator forgets to report, both fail it.
//! (clients/python/tests/test_call_counts.py holds the same check for the Python client.)

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::common::{free_port, http_get, spawn_xentd};

/// xentd, killed when dropped so a failed assertion leaves nothing running.
struct Xentd(Child);

impl Drop for Xentd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_serving(endpoint: &str) {
    for _ in 0..500 {
        if let Ok(channel) = Channel::from_shared(endpoint.to_string())
            .unwrap()
            .connect()
            .await
        {
            let status = HealthClient::new(channel)
                .check(HealthCheckRequest::default())
                .await
                .map(|r| r.into_inner().status());
            if status.is_ok_and(|s| s == ServingStatus::Serving) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("xentd at {endpoint} never became SERVING");
}

/// The body of `GET /metrics` (HTTP/1.0: the body ends when the server closes).
fn scrape(addr: SocketAddr) -> String {
    let mut last_error = None;
    for _ in 0..100 {
        let attempt = match http_get(addr, "/metrics") {
            Ok((200, body)) => Ok(body),
            Ok((status, _)) => Err(std::io::Error::other(format!("answered {status}"))),
            Err(e) => Err(e),
        };
        match attempt {
            Ok(body) => return body,
            Err(e) => last_error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("GET http://{addr}/metrics: {last_error:?}");
}

/// The samples of `xent_calls_total` in an exposition, by (method, code); zeros left out.
fn calls_by_method_and_code(exposition: &str) -> BTreeMap<(String, String), u64> {
    let mut calls = BTreeMap::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix(xent::metrics::CALLS) else {
            continue;
        };
        let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.split_once("} ")) else {
            panic!("unexpected sample line {line:?}");
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or_else(|| panic!("no {name} label in {line:?}"))
                .to_string()
        };
        let n: f64 = value.trim().parse().expect("a sample value");
        if n != 0.0 {
            calls.insert((label("method"), label("code")), n as u64);
        }
    }
    calls
}

/// `xent bench --json` against `endpoint` with `args` (split at spaces), and its report.
async fn bench(endpoint: &str, args: &str) -> Value {
    let all: Vec<String> = ["bench", "--address", endpoint, "--json"]
        .into_iter()
        .chain(args.split_whitespace())
        .map(String::from)
        .collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_xent"))
            .args(&all)
            .env_remove("XENT_ADDRESS")
            .output()
            .expect("run xent bench")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "xent bench {args:?} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("--json prints one JSON object")
}

/// Adds a report's calls, by code, to `into` (all of them are `Evaluate`).
fn add_report(into: &mut BTreeMap<(String, String), u64>, report: &Value) {
    let mut by_code: Vec<(String, u64)> = vec![("OK".into(), report["ok"].as_u64().unwrap())];
    for (code, n) in report["errors"].as_object().expect("errors by code") {
        by_code.push((code.clone(), n.as_u64().unwrap()));
    }
    let total: u64 = by_code.iter().map(|(_, n)| n).sum();
    assert_eq!(report["requests"].as_u64(), Some(total), "{report}");
    for (code, n) in by_code.into_iter().filter(|(_, n)| *n > 0) {
        *into.entry(("Evaluate".into(), code)).or_default() += n;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xentd_counts_exactly_the_calls_the_load_generator_reports() {
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (child, endpoint) = spawn_xentd(&["--metrics-listen", &metrics.to_string()], Stdio::null());
    let _xentd = Xentd(child);
    wait_serving(&endpoint).await;
    assert_eq!(
        calls_by_method_and_code(&scrape(metrics)),
        BTreeMap::new(),
        "no call counted before the first one (health checks and the warm-up are not calls)"
    );

    let mut expected = BTreeMap::new();
    // Open loop: exactly 40 scheduled calls, every one answered.
    let open = bench(&endpoint, "--rate 40 --duration 1 --rows 4 --classes 10").await;
    assert_eq!(open["requests"], 40, "{open}");
    add_report(&mut expected, &open);
    // Closed loop: as many calls as 3 callers make in half a second, a count only the
    // generator knows.
    let closed = bench(
        &endpoint,
        "--concurrency 3 --duration 0.5 --rows 8 --classes 32 --loss softmax_cross_entropy",
    )
    .await;
    add_report(&mut expected, &closed);
    // Label smoothing outside [0, 1]: every call is INVALID_ARGUMENT.
    let refused = bench(
        &endpoint,
        "--concurrency 2 --duration 0.3 --rows 2 --classes 3 --label-smoothing 2",
    )
    .await;
    assert_eq!(refused["ok"], 0, "{refused}");
    add_report(&mut expected, &refused);
    assert_eq!(
        expected.keys().map(|(_, c)| c.as_str()).collect::<Vec<_>>(),
        ["INVALID_ARGUMENT", "OK"],
        "both codes were exercised: {expected:?}"
    );

    assert_eq!(
        calls_by_method_and_code(&scrape(metrics)),
        expected,
        "xent_calls_total by (method, code) against the load generator's reports"
    );
}
