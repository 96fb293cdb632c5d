#!/usr/bin/env bash
# Load runs of xentd over loopback, with the `xent bench` load generator:
#   1. 64 closed-loop clients of 1x1000 float32 rows, batching on vs off;
#   2. 8 closed-loop clients of 256x1000, batching on vs off;
#   3. an open-loop run offered 10x the throughput measured in 1, reporting what was shed and
#      xentd's peak resident memory.
# Each configuration runs against a fresh release xentd; results are JSON lines in $OUT.
#   bench/batching.sh            # DUR=10 seconds per run by default
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-10}
OUT=${OUT:-target/bench-batching.jsonl}
cargo build --release --bins -q
: > "$OUT"

start_xentd() { # extra xentd flags...
  local log; log=$(mktemp)
  target/release/xentd --listen 127.0.0.1:0 --metrics-listen off "$@" > "$log" 2>/dev/null &
  XENTD_PID=$!
  for _ in $(seq 100); do grep -q "listening on" "$log" && break; sleep 0.05; done
  ADDR=$(sed -n 's/^listening on //p' "$log")
  for _ in $(seq 100); do target/release/xent --address "$ADDR" health >/dev/null 2>&1 && break; sleep 0.05; done
}
stop_xentd() { kill -TERM "$XENTD_PID"; wait "$XENTD_PID" || true; }
peak_rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$XENTD_PID/status"; }

bench() { # label, bench flags...
  local label=$1; shift
  target/release/xent --address "$ADDR" bench --duration "$DUR" --json "$@" \
    | python3 -c "import json,sys; r=json.load(sys.stdin); r['label']='$label'; print(json.dumps(r))" >> "$OUT"
}

for batching in true false; do
  start_xentd --batching "$batching"
  bench "small batching=$batching" --concurrency 64 --rows 1 --classes 1000
  bench "large batching=$batching" --concurrency 8 --rows 256 --classes 1000
  stop_xentd
done

# Capacity with batching on (from the small run), then ten times that, open loop.
capacity=$(python3 -c "import json; print([json.loads(l) for l in open('$OUT') if 'small batching=true' in l][0]['requests_per_s'])")
start_xentd --batching true
bench "overload 10x" --rate "$(python3 -c "print(round(10 * $capacity))")" --max-in-flight 4096 --rows 1 --classes 1000 --timeout 5
echo "{\"label\": \"overload 10x xentd peak RSS\", \"peak_rss_kib\": $(peak_rss_kib)}" >> "$OUT"
stop_xentd

python3 - "$OUT" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if "requests_per_s" in r:
        lat = r["latency_ms"]
        print(f"{r['label']:<26} {r['requests_per_s']:>9.0f} req/s {r['rows_per_s']:>10.0f} rows/s "
              f"p50 {lat['p50']:>8.3f} ms  p99 {lat['p99']:>8.3f} ms  errors {r['errors']}")
    else:
        print(f"{r['label']:<26} {r['peak_rss_kib'] / 1024:.0f} MiB")
PY
