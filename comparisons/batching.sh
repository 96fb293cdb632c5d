#!/usr/bin/env bash
# Load runs of xentd over loopback, with the `xent bench` load generator:
#   1. 64 closed-loop clients of 1x1000 float32 rows, batching on vs off (and one client, to
#      show batching costs nothing at low load);
#   2. 8 closed-loop clients of 256x1000, batching on vs off;
#   3. an open-loop run offered 10x the throughput measured in 1, reporting what was shed and
#      xentd's peak resident memory.
# Beside 1, the same load against examples/echo_server.rs: the same tonic stack answering with
# the bytes of a real answer and computing nothing (no kernel, no batcher, no spans, no
# metrics). Its CPU per call is the transport's own cost, which no batching can remove, so
# (CPU per call, batching off) / (CPU per call, echo) bounds what batching could ever gain.
# Each configuration runs against a fresh release xentd; results are JSON lines in $OUT, each
# with xentd's own CPU time and context switches per call (from /proc), which say what a call
# costs the server whatever else the machine is doing.
#
# With PIN=1 (the default where taskset exists and there are at least 2 cores) xentd runs on
# the last core and the load generator on the others, so the generator's own work does not
# compete with the server's and the comparison measures the server. REPEAT=N runs the
# small-request comparison N times, on and off interleaved (the machine may be shared: compare
# the runs of one round).
#   comparisons/batching.sh            # DUR=10 seconds per run by default
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-10}
OUT=${OUT:-target/bench-batching.jsonl}
REPEAT=${REPEAT:-1}
cores=$(nproc)
if [[ -z ${PIN:-} ]]; then
  if command -v taskset > /dev/null && ((cores >= 2)); then PIN=1; else PIN=0; fi
fi
SERVER_ON=() CLIENT_ON=()
if [[ $PIN == 1 ]]; then
  SERVER_ON=(taskset -c $((cores - 1)))
  CLIENT_ON=(taskset -c "0-$((cores - 2))")
fi
cargo build --release --bins --example echo_server -q
: > "$OUT"

# Starts a server on the server core and waits until it prints its address.
start_server() { # command...
  local log; log=$(mktemp)
  "${SERVER_ON[@]}" "$@" > "$log" 2>/dev/null &
  XENTD_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.05; done
  ADDR=$(sed -n 's/^listening on //p' "$log")
}
start_xentd() { # extra xentd flags...
  start_server target/release/xentd --listen 127.0.0.1:0 --metrics-listen off "$@"
  for _ in $(seq 100); do target/release/xent --address "$ADDR" health >/dev/null 2>&1 && break; sleep 0.05; done
}
stop_xentd() { kill -TERM "$XENTD_PID"; wait "$XENTD_PID" || true; }
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$XENTD_PID/status"; }
# CPU ticks (user + system, every thread) and context switches of xentd so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$XENTD_PID/stat"; }
switches() { cat /proc/"$XENTD_PID"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }

# Adds the label and xentd's CPU time and context switches per call to a bench JSON report.
annotate='
import json, sys
label, hz, t0, t1, s0, s1, pin = sys.argv[1], *map(int, sys.argv[2:8])
r = json.load(sys.stdin)
n = max(r["requests"], 1)
r.update(label=label, pinned=bool(pin),
         server_cpu_us_per_call=(t1 - t0) / hz * 1e6 / n,
         server_switches_per_call=(s1 - s0) / n)
print(json.dumps(r))
'
bench() { # label, bench flags...
  local label=$1; shift
  local t0 s0 t1 s1 json
  t0=$(cpu_ticks); s0=$(switches)
  json=$("${CLIENT_ON[@]}" target/release/xent --address "$ADDR" bench --duration "$DUR" --json "$@")
  t1=$(cpu_ticks); s1=$(switches)
  python3 -c "$annotate" "$label" "$(getconf CLK_TCK)" "$t0" "$t1" "$s0" "$s1" "$PIN" <<< "$json" >> "$OUT"
}

for round in $(seq "$REPEAT"); do
  for batching in true false; do
    start_xentd --batching "$batching"
    bench "small batching=$batching" --concurrency 64 --rows 1 --classes 1000
    stop_xentd
  done
  start_server target/release/examples/echo_server 127.0.0.1:0
  bench "small echo (transport)" --concurrency 64 --rows 1 --classes 1000
  stop_xentd
done
for batching in true false; do
  start_xentd --batching "$batching"
  bench "one client batching=$batching" --concurrency 1 --rows 1 --classes 1000
  bench "large batching=$batching" --concurrency 8 --rows 256 --classes 1000
  stop_xentd
done

# Capacity with batching on (from the first small run), then ten times that, open loop.
capacity=$(python3 -c "import json; print([json.loads(l) for l in open('$OUT') if 'small batching=true' in l][0]['requests_per_s'])")
start_xentd --batching true
bench "overload 10x" --rate "$(python3 -c "print(round(10 * $capacity))")" --max-in-flight 4096 --rows 1 --classes 1000 --timeout 5
echo "{\"label\": \"overload 10x xentd peak RSS\", \"peak_rss_kib\": $(peak_rss_kib)}" >> "$OUT"
stop_xentd

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
for r in rows:
    if "requests_per_s" in r:
        lat = r["latency_ms"]
        print(f"{r['label']:<28} {r['requests_per_s']:>9.0f} req/s {r['rows_per_s']:>10.0f} rows/s "
              f"p50 {lat['p50']:>8.3f} ms  p99 {lat['p99']:>8.3f} ms  "
              f"xentd {r['server_cpu_us_per_call']:>6.1f} us CPU {r['server_switches_per_call']:>5.2f} switches /call  "
              f"errors {r['errors']}")
    else:
        print(f"{r['label']:<28} {r['peak_rss_kib'] / 1024:.0f} MiB")
# Per round of the small-request runs: what batching gained, and the most it could gain.
small = [r for r in rows if r["label"].startswith("small")]
for i in range(0, len(small) - 2, 3):
    on, off, echo = (r["server_cpu_us_per_call"] for r in small[i:i + 3])
    print(f"round {i // 3 + 1}: CPU per call on {on:.1f} us, off {off:.1f} us, echo {echo:.1f} us: "
          f"batching gains {off / on:.2f}x of capacity; the bound (off / echo) is {off / echo:.2f}x")
PY
