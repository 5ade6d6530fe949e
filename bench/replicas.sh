#!/bin/sh
# bench/replicas.sh [--smoke]   Routing benchmarks (README "Routing"):
#   1. throughput of one function served by 1 provider vs 4 providers (providers: many,
#      least-inflight), pipelined 4 callers x 32 in flight, 128 B: the balancing cost per call;
#   2. the failover gap: two `iii serve` providers of one function, a caller calling serially,
#      SIGKILL of the provider in use; counted: calls failed, and the time from the kill to the
#      first success. For balance: first (active/standby) and for many/least-inflight.
# Prints "result ..." lines and a small table. Every process is stopped by pid; loopback only.
# Uses bench/bench (built here from bench/bench.c) and the engine at $III_BIN (default ./iii).
set -u
B=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$B")
export ROOT
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
III_BIN=${III_BIN:-$ROOT/iii}
CC=${CC:-cc}
W=$(mktemp -d "${TMPDIR:-/tmp}/iii-bench-replicas.XXXXXX") || exit 1
PIDS=""
cleanup() {
    for p in $PIDS; do kill -KILL "$p" 2>/dev/null; done
    rm -rf "$W"
}
trap cleanup EXIT INT TERM
$CC -O2 -Wno-unused-function "$B/bench.c" -o "$W/bench" 2>"$W/cc.log" || {
    echo "not ok - replicas: bench.c does not build"
    exit 1
}
# start_engine CONFIG: the engine on a free port; sets PORT and EPID
start_engine() {
    (cd "$W" && exec "$III_BIN" -c "$1" --port 0) >"$W/eng.out" 2>"$W/eng.err" &
    EPID=$!
    PIDS="$PIDS $EPID"
    n=0
    while [ $n -lt 100 ]; do
        PORT=$(sed -n 's|^iii: listening on ws://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$W/eng.out")
        [ -n "$PORT" ] && return 0
        sleep 0.1
        n=$((n + 1))
    done
    echo "not ok - replicas: the engine did not start"
    exit 1
}
stop_engine() {
    kill -TERM "$EPID" 2>/dev/null
    wait "$EPID" 2>/dev/null
}
SECS=3
CALLS=200000
[ $SMOKE = 1 ] && SECS=0.5 && CALLS=5000
printf 'routing:\n  - match: "bench::*"\n    providers: many\n' >"$W/many.yaml"
# 1. throughput: 1 vs 4 providers of the same function
for w in 1 4; do
    start_engine "$W/many.yaml"
    out=$("$W/bench" run --peer engine --port "$PORT" --pid "$EPID" --size 128 --callers 4 \
        --workers $w --depth 32 --calls $CALLS --warmup 2000 --secs $SECS --shared 1 --scen "providers$w" 2>&1)
    stop_engine
    echo "$out" | grep '^result' || {
        echo "not ok - replicas: $w providers: $out"
        exit 1
    }
    eval "T$w=$(echo "$out" | sed -n 's/.* cps=\([0-9.]*\).*/\1/p')"
done
echo "ok - replicas: throughput with 1 provider ${T1} calls/s, with 4 providers ${T4} calls/s"
# 2. failover gap, with iii serve providers (real processes, killed with SIGKILL)
for bal in first least-inflight; do
    printf 'routing:\n  - match: "gap::*"\n    providers: many\n    balance: %s\n' "$bal" >"$W/gap.yaml"
    start_engine "$W/gap.yaml"
    "$III_BIN" serve gap::f --url "ws://127.0.0.1:$PORT" --name p1 -- sh -c 'echo 1' 2>/dev/null &
    P1=$!
    sleep 0.3
    "$III_BIN" serve gap::f --url "ws://127.0.0.1:$PORT" --name p2 -- sh -c 'echo 2' 2>/dev/null &
    P2=$!
    PIDS="$PIDS $P1 $P2"
    sleep 0.5
    python3 - "$PORT" "$P1" "$SMOKE" >"$W/gap.out" 2>&1 <<'PY'
import os, signal, sys, time, json, uuid
sys.path.insert(0, os.path.join(os.environ.get("ROOT", "."), "tests"))
from wslib import WS
port, victim, smoke = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
ws = WS(port)
ws.recv_json()
def call():
    iid = str(uuid.uuid4())
    ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": "gap::f", "data": {}})
    while True:
        m = ws.recv_json(5.0)
        if m.get("invocation_id") == iid:
            return "error" not in m
n = 50 if smoke else 300
for _ in range(n):
    call()
t_kill = time.time()
os.kill(victim, signal.SIGKILL)
failed, first_ok = 0, None
deadline = time.time() + 5
while time.time() < deadline:
    if call():
        first_ok = time.time()
        break
    failed += 1
for _ in range(n):
    if not call():
        failed += 1
gap = (first_ok - t_kill) * 1000 if first_ok else -1
print("result failover_failed=%d first_success_ms=%.2f" % (failed, gap))
PY
    r=$(grep '^result' "$W/gap.out")
    kill -KILL "$P2" 2>/dev/null
    stop_engine
    if [ -z "$r" ]; then
        echo "not ok - replicas: failover ($bal): $(tail -3 "$W/gap.out")"
        exit 1
    fi
    echo "ok - replicas: failover ($bal): $(echo "$r" | sed 's/^result //')"
done
