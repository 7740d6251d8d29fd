#!/usr/bin/env bash
# The server under load, as issue 6 asks: while SmolLM2-135M trains on every core,
#   1. GET /v1/fine_tuning/jobs/{id} at 200 requests/s for 20 s (scripts/load-test.py):
#      latency percentiles;
#   2. SSE_SUBSCRIBERS (1000) concurrent SSE streams of the job's events for SSE_SECONDS
#      (60: a dev build makes a step every few seconds): each metrics event's delivery
#      latency to each subscriber, and any missed event (scripts/load-test.py --phase sse);
#   3. a 1 GiB upload from loopback: throughput, and the server's RSS growth during it.
# Prints all three; numbers go to BENCHMARKS.md. Not a test: timing belongs here, not in CI.
#
#   scripts/load-test.sh path/to/loraforge [OUTDIR]
# Needs models/SmolLM2-135M-Instruct.Q4_1.gguf (scripts/fetch-models.sh) and curl.
set -euo pipefail
BIN=${1:?usage: $0 path/to/loraforge [OUTDIR]}
OUT=${2:-$(mktemp -d)}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$HERE/..
RPS=${RPS:-200}
SECONDS_=${LOAD_SECONDS:-20}
SUBS=${SSE_SUBSCRIBERS:-1000}
SSE_SECONDS=${SSE_SECONDS:-60}
PORT=${PORT:-18181}
mkdir -p "$OUT/models" "$OUT/data"
ln -sf "$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf" "$OUT/models/"
"$BIN" serve --port "$PORT" --data-dir "$OUT/data" --models-dir "$OUT/models" \
  --train-threads "$(nproc)" --max-upload-bytes 1200000000 >"$OUT/server.out" 2>"$OUT/server.log" &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
BASE=http://127.0.0.1:$PORT
for _ in $(seq 1 100); do curl -sf "$BASE/readyz" >/dev/null && break; sleep 0.2; done

FILE=$(curl -sf "$BASE/v1/files?filename=chat.jsonl&purpose=fine-tune" -H 'content-type: application/jsonl' \
  --data-binary @"$ROOT/tests/data/chat-small.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
JOB=$(curl -sf "$BASE/v1/fine_tuning/jobs" -H 'content-type: application/json' \
  -d "{\"model\":\"SmolLM2-135M-Instruct.Q4_1.gguf\",\"training_file\":\"$FILE\",\"hyperparameters\":{\"max_steps\":2000,\"batch_size\":4}}" \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "== job $JOB; waiting for its first step"
for _ in $(seq 1 600); do
  step=$(curl -sf "$BASE/v1/fine_tuning/jobs/$JOB" | python3 -c 'import json,sys; print((json.load(sys.stdin).get("progress") or {}).get("step") or 0)')
  [ "$step" -ge 1 ] && break
  sleep 0.5
done

echo "== GET /v1/fine_tuning/jobs/{id} at $RPS/s for ${SECONDS_}s while it trains"
python3 "$HERE/load-test.py" --base "$BASE" --job "$JOB" --rps "$RPS" --seconds "$SECONDS_" | tee "$OUT/get.txt"

echo "== $SUBS SSE subscribers of its events for ${SSE_SECONDS}s while it trains"
python3 "$HERE/load-test.py" --phase sse --base "$BASE" --job "$JOB" --subscribers "$SUBS" \
  --seconds "$SSE_SECONDS" | tee "$OUT/sse.txt"

echo "== a 1 GiB upload while it trains"
python3 - "$OUT/big.jsonl" <<'PY'
import sys
line = '{"messages":[{"role":"user","content":"question"},{"role":"assistant","content":"answer ' + "x" * 900 + '"}]}\n'
n = (1 << 30) // len(line) + 1
with open(sys.argv[1], "w") as f:
    for _ in range(n):
        f.write(line)
PY
rss() { awk '/VmRSS/ {print $2}' "/proc/$PID/status"; }
before=$(rss); peak=$before
( while kill -0 $PID 2>/dev/null; do r=$(rss); echo "$r"; sleep 0.02; done ) >"$OUT/rss.txt" &
SAMPLER=$!
t0=$(date +%s.%N)
# -T streams the file (--data-binary @file would read it all into curl's memory first).
curl -sf -X POST -T "$OUT/big.jsonl" "$BASE/v1/files?filename=big.jsonl&purpose=fine-tune" \
  -H 'content-type: application/jsonl' -o "$OUT/big.json"
t1=$(date +%s.%N)
kill $SAMPLER 2>/dev/null || true
peak=$(sort -n "$OUT/rss.txt" | tail -1)
python3 - "$OUT/big.jsonl" "$t0" "$t1" "$before" "$peak" "$OUT/big.json" <<'PY'
import json, os, sys
size = os.path.getsize(sys.argv[1]); dt = float(sys.argv[3]) - float(sys.argv[2])
f = json.load(open(sys.argv[6]))
print(f"upload: {size / 2**20:.0f} MiB in {dt:.2f} s = {size / dt / 1e6:.0f} MB/s; status {f['status']}, "
      f"{f['examples']} examples; server RSS {int(sys.argv[4]) // 1024} MiB before, peak {int(sys.argv[5]) // 1024} MiB "
      f"(+{(int(sys.argv[5]) - int(sys.argv[4])) / 1024:.1f} MiB)")
PY
curl -sf -X POST "$BASE/v1/fine_tuning/jobs/$JOB/cancel" >/dev/null
rm -f "$OUT/big.jsonl"
