#!/usr/bin/env bash
# `make run`: the main job on the embedded default stack. Starts a broker, Redis and Triton on loopback, publishes
# the sample images (twice, so the second copies are answered from the dedupe cache), runs the worker,
# prints every verdict and dead letter, then stops everything. The detectors run on Triton, as in production.
set -euo pipefail
sg="${VENV:-.venv}/bin/streamguard"
samples="${1:-.cache/demo}"
workdir=.cache/dev

cleanup() {
    [ -n "${worker_pid:-}" ] && kill -TERM "$worker_pid" 2>/dev/null && wait "$worker_pid" || true
    "$sg" dev down --workdir "$workdir" >/dev/null
}
trap cleanup EXIT

eval "$("$sg" dev up --workdir "$workdir")"
export STREAMGUARD_DETECTORS__BACKEND=triton
# Every CLIP detector on two CPU cores is slow next to a GPU: give requests time rather than fail them.
export STREAMGUARD_TRITON__REQUEST_TIMEOUT_S=120 STREAMGUARD_DETECTORS__TIMEOUT_S=300
# One worker on a local broker: Tansu holds a new group's first join for half the session timeout (5 s at the
# worker's default 10 s), which is most of what this demo would wait for.
export STREAMGUARD_WORKER__SESSION_TIMEOUT_MS=3000 STREAMGUARD_WORKER__HEARTBEAT_INTERVAL_MS=1000
export STREAMGUARD_WORKER__HEALTH_PORT=0 STREAMGUARD_WORKER__HEALTH_HOST=127.0.0.1 STREAMGUARD_LOG__FORMAT=json
first=$("$sg" produce "$samples")
second=$("$sg" produce "$samples")
sent=$(python3 -c 'import json,sys; print(sum(json.loads(l)["sent"] for l in sys.argv[1:]))' "$first" "$second")
echo "published $sent events from $samples"

"$sg" worker 2>"$workdir/worker.log" &
worker_pid=$!
"$sg" tail --count "$sent" --timeout 120
kill -TERM "$worker_pid" && wait "$worker_pid"
worker_pid=
echo "worker drained and stopped (log: $workdir/worker.log)"
