#!/usr/bin/env bash
# Service throughput over loopback against two baselines, in one run (issue: performance):
#   - xentd (release);
#   - the echo service (examples/echo_server.rs): the same tonic stack and message sizes with
#     no computation, the transport ceiling;
#   - comparisons/python_server.py: a plain grpcio + numpy server doing the same work.
# Shapes 256x1000 and 16x128256, float32, dense labels, loss and logits gradient, 8 closed-loop
# clients of `xent bench`, DUR seconds each. Prints one line per run and the ratios.
#   comparisons/service.sh                # DUR=8; needs .venv (scripts/test makes it)
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${DUR:-8}
PY=${PY:-.venv/bin/python}
cargo build --quiet --release --bins --example echo_server
xent=target/release/xent
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
target/release/xentd --listen 127.0.0.1:50061 --metrics-listen off >/dev/null 2>&1 & pids+=($!)
target/release/examples/echo_server 127.0.0.1:50062 >/dev/null 2>&1 & pids+=($!)
"$PY" comparisons/python_server.py --address 127.0.0.1:50063 >/dev/null 2>&1 & pids+=($!)
sleep 3
declare -A rate
for shape in 256x1000 16x128256; do
  rows=${shape%x*} classes=${shape#*x}
  for target in xentd:50061 echo:50062 python:50063; do
    name=${target%:*} port=${target#*:}
    json=$("$xent" --address "127.0.0.1:$port" --timeout 60 bench --duration "$DUR" --concurrency 8 \
      --rows "$rows" --classes "$classes" --loss softmax_cross_entropy --outputs loss,grad_logits --json)
    read -r rps p50 p99 < <("$PY" -c 'import json,sys; r=json.load(sys.stdin); l=r["latency_ms"]; print(r["requests_per_s"], l["p50"], l["p99"])' <<<"$json")
    rate[$shape.$name]=$rps
    printf '%-10s %-7s %9.1f req/s  p50 %8.2f ms  p99 %8.2f ms\n' "$shape" "$name" "$rps" "$p50" "$p99"
  done
  awk -v x="${rate[$shape.xentd]}" -v e="${rate[$shape.echo]}" -v p="${rate[$shape.python]}" -v s="$shape" \
    'BEGIN { printf "%-10s xentd / echo = %.2f   xentd / python = %.2f\n", s, x / e, x / p }'
done
