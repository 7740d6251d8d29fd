#!/usr/bin/env bash
# Runs the official `openai` Python client against a real `loraforge serve`, then fuzzes
# that server against openapi.yaml with schemathesis.
#
#   scripts/openai-client-test.sh path/to/loraforge
#
# Makes (or reuses) a virtualenv at ${VENV:-.venv} with `openai` installed, starts
# the given binary on a free port with a temporary data directory, runs
# scripts/openai_client_test.py against it, and stops the server. Exits non-zero
# if anything fails.
set -euo pipefail

BIN=${1:?usage: $0 path/to/loraforge}
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check openai schemathesis

WORK=$(mktemp -d)
PID=
cleanup() {
    if [ -n "$PID" ] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID" 2>/dev/null || true
        wait "$PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# The tiny fixture models, for the fine-tuning and transcription parts.
mkdir -p "$WORK/models"
cp -r "$HERE/../tests/fixtures/tiny-llama" "$WORK/models/"
cp -r "$HERE/../tests/fixtures/tiny-whisper-asr" "$WORK/models/"
# The real SmolLM2 too when scripts/fetch-models.sh has put it in models/ (CI requires it).
SMOL="$HERE/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$SMOL" ]; then
    ln -s "$(cd "$(dirname "$SMOL")" && pwd)/$(basename "$SMOL")" "$WORK/models/"
    export LORAFORGE_SMOLLM2=SmolLM2-135M-Instruct.Q4_1.gguf
elif [ "${LORAFORGE_REQUIRE_REAL_MODELS:-}" = 1 ]; then
    echo "models/SmolLM2-135M-Instruct.Q4_1.gguf is missing: run scripts/fetch-models.sh" >&2
    exit 1
fi

# Port 0: the server picks a free port and prints the address on stdout. The file exists
# before the server starts: the background job opens it only when it gets to run.
: >"$WORK/stdout"
env -u LORAFORGE_DATABASE_URL -u LORAFORGE_API_KEY -u LORAFORGE_STORAGE_URL \
    "$BIN" serve --host 127.0.0.1 --port 0 \
    --data-dir "$WORK/data" --models-dir "$WORK/models" --train-threads 2 \
    >"$WORK/stdout" 2>"$WORK/server.log" &
PID=$!

BASE=
for _ in $(seq 1 300); do
    BASE=$(sed -n 's/^loraforge listening on //p' "$WORK/stdout")
    [ -n "$BASE" ] && break
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "loraforge exited before listening:" >&2
        cat "$WORK/server.log" >&2
        exit 1
    fi
    sleep 0.1
done
if [ -z "$BASE" ]; then
    echo "loraforge did not start within 30 s:" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi

if ! "$VENV/bin/python" "$HERE/openai_client_test.py" "$BASE"; then
    echo "--- server log ---" >&2
    cat "$WORK/server.log" >&2
    exit 1
fi

# Then fuzz the same server against openapi.yaml: no 5xx and no response outside the
# schema, over a bounded number of generated requests per operation. A completion on
# SmolLM2 can take longer than schemathesis' default 10 s client timeout on this CPU.
if ! "$VENV/bin/schemathesis" run "$BASE/openapi.yaml" --max-examples "${FUZZ_EXAMPLES:-30}" \
        --checks not_a_server_error,response_schema_conformance --workers 2 \
        --request-timeout 120 >"$WORK/fuzz.log" 2>&1; then
    cat "$WORK/fuzz.log" >&2
    echo "--- server log ---" >&2
    tail -n 50 "$WORK/server.log" >&2
    exit 1
fi
tail -n 4 "$WORK/fuzz.log"

kill -TERM "$PID"
wait "$PID"
PID=
