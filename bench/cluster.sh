#!/bin/sh
# bench/cluster.sh [--smoke]   The cluster benchmarks (README "Cluster", docs/CLUSTER.md).
#
#   (no flag)  full run (about 3 minutes), 3 interleaved repetitions, medians shown.
#   --smoke    small counts, no timing claims: prints "ok - cluster: ..." when every scenario
#              produced non-zero figures ("skip - ..." and exit 0 without nats-server).
#              test.sh runs it; it drives $III_BIN when set (the sanitizer build there).
# Environment: CC (default cc); III_BIN (smoke only); III_BENCH_NATS=PATH to a nats-server.
#
# One nats-server on 127.0.0.1 (free port), engines on free loopback ports joined to it with
#   cluster: { nats: [nats://127.0.0.1:PORT], node: a | b }
# and one engine without a cluster section. bench/bench.c plays every caller and echo worker.
#
# 1. One call, three ways (128 B payloads, the echo is checked byte for byte):
#      local   worker and caller on engine a (a clustered engine; the call stays local)
#      cross   worker on engine a, caller on engine b: the call and its answer travel
#              b -> NATS -> a -> worker -> a -> NATS -> b
#      nats    raw NATS request/reply: PUB with a reply inbox to a queue group of echo responders
#    serial (1 caller, 1 worker, 1 call in flight): latency p50/p99, pinned "same core" (every
#    server, all threads, and the generator on core 0: the path's own cost) and unpinned;
#    pipelined (4 callers x 32 in flight, 4 workers, unpinned): calls/s.
# 2. calls/s with 1 engine vs 2 engines on this box: two generators side by side (their measured
#    seconds aligned with --start-at), each 2 callers x 32 in flight and 2 echo workers with its
#    own function ids; either both on one engine (no cluster), or each on its own engine of the
#    cluster (a and b: local calls stay local, so two single-threaded engines can use two cores).
#    Unpinned, and pinned (1 engine: engine on core 0, generators on core 1; 2 engines: engine a
#    and its generator on core 0, engine b and its generator on core 1).
#
# Every loop is bounded in count and time; every process started here is stopped by its pid.
# Full runs leave bench/build/cluster-results.txt (raw "result" lines) and cluster-table.md.
# POSIX sh.
set -u
B=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$B")
MODE=full
case ${1:-} in
"") ;;
--smoke) MODE=smoke ;;
-h | --help)
    sed -n '2,29p' "$0"
    exit 0
    ;;
*)
    echo "usage: sh bench/cluster.sh [--smoke]" >&2
    exit 2
    ;;
esac
CC=${CC:-cc}
START_TS=$(date +%s)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)

say() { printf '%s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
log() { [ "$MODE" = smoke ] || printf '# %s\n' "$*" >&2; }

NATS=${III_BENCH_NATS:-}
if [ -z "$NATS" ]; then
    for n in nats-server /usr/sbin/nats-server /usr/bin/nats-server; do
        if have "$n"; then
            NATS=$(command -v "$n")
            break
        fi
    done
fi
if [ -z "$NATS" ] || [ ! -x "$NATS" ]; then
    say "skip - cluster: nats-server not installed (Debian: apt-get install nats-server)"
    exit 0
fi

W=$(mktemp -d "${TMPDIR:-/tmp}/iii-bench-cluster.XXXXXX") || exit 1
RES=$W/results.txt
: >"$RES"
PIDS=""
FAILS=0
KEEP=0

# ---- process bookkeeping: everything started is stopped by pid ------------------------------
track() { PIDS="$PIDS $1"; }
untrack() {
    n=""
    for p in $PIDS; do [ "$p" = "$1" ] || n="$n $p"; done
    PIDS=$n
}
# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL; STOP_RC is its exit status.
stop_pid() {
    STOP_RC=0
    kill -TERM "$1" 2>/dev/null
    i=0
    while kill -0 "$1" 2>/dev/null && [ $i -lt 100 ]; do
        sleep 0.1
        i=$((i + 1))
    done
    kill -0 "$1" 2>/dev/null && kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    STOP_RC=$?
    untrack "$1"
}
cleanup_all() {
    if [ -n "$PIDS" ]; then
        for p in $PIDS; do kill -TERM "$p" 2>/dev/null; done
        sleep 0.2
        for p in $PIDS; do kill -KILL "$p" 2>/dev/null; done
    fi
    if [ $KEEP -eq 0 ]; then
        case $W in */iii-bench-cluster.*) rm -rf "$W" ;; esac
    fi
}
trap cleanup_all EXIT
trap 'cleanup_all; exit 130' INT TERM

# wait_line FILE PATTERN: up to 20 s for PATTERN to appear in FILE.
wait_line() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        [ $i -gt 200 ] && return 1
        sleep 0.1
    done
    return 0
}
die() {
    say "not ok - cluster: $*"
    KEEP=1
    say "#   logs kept in $W"
    exit 1
}

# ---- builds (from a snapshot of the sources: the run describes one version) ------------------
mkdir -p "$W/src"
cp "$ROOT/iii.c" "$ROOT/iii.h" "$W/src/"
GIT_ID=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)
if [ -n "$GIT_ID" ] && ! git -C "$ROOT" diff --quiet HEAD -- iii.c iii.h 2>/dev/null; then GIT_ID="$GIT_ID + uncommitted changes"; fi
SRC_ID=$( (sha1sum "$W/src/iii.c" 2>/dev/null || cksum "$W/src/iii.c") | cut -c1-12)
GEN=$W/bench
$CC -std=c99 -O2 -DIII_NO_MAIN -Wall -Wextra -Wno-unused-function "$B/bench.c" -o "$GEN" 2>"$W/cc-bench.log" ||
    die "bench/bench.c does not build ($(head -n 3 "$W/cc-bench.log"))"
ENGINE_CFLAGS="-std=c99 -O2"
if [ "$MODE" = smoke ] && [ -n "${III_BIN:-}" ] && [ -x "${III_BIN:-}" ]; then
    ENGINE=$III_BIN
else
    $CC $ENGINE_CFLAGS "$W/src/iii.c" -o "$W/iii" 2>"$W/cc-iii.log" || die "the engine does not build ($W/cc-iii.log)"
    ENGINE=$W/iii
fi

# ---- servers --------------------------------------------------------------------------------
"$NATS" -a 127.0.0.1 -p -1 >"$W/nats.log" 2>&1 &
NPID=$!
track $NPID
wait_line "$W/nats.log" 'Server is ready' || die "nats-server did not start ($(tail -n 2 "$W/nats.log"))"
NPORT=$(sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/nats.log" | head -n 1)
[ -n "$NPORT" ] || die "no port in nats-server's log"

# engine_conf NAME [NODE]: a loopback engine without keep-alive pings (they would add frames
# the NATS peer does not send), joined to the cluster as NODE when given.
engine_conf() {
    {
        echo "workers:"
        echo "  - name: iii-worker-manager"
        echo "    config:"
        echo "      host: 127.0.0.1"
        echo "      ping_interval_ms: 0"
        echo "      idle_timeout_ms: 0"
        if [ -n "${2:-}" ]; then
            echo "cluster:"
            echo "  nats: [nats://127.0.0.1:$NPORT]"
            echo "  node: $2"
        fi
    } >"$W/$1.yaml"
}
# start_engine NAME: sets PID_<NAME> and PORT_<NAME>
start_engine() {
    "$ENGINE" -c "$W/$1.yaml" --port 0 >"$W/engine-$1.out" 2>"$W/engine-$1.err" &
    pid=$!
    track $pid
    wait_line "$W/engine-$1.out" 'listening on ws://' || die "engine $1 did not start ($(tail -n 3 "$W/engine-$1.err"))"
    port=$(sed -n 's/.*listening on ws:\/\/127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/engine-$1.out" | head -n 1)
    eval "PID_$1=$pid PORT_$1=$port"
}
engine_conf a a
engine_conf b b
engine_conf solo
start_engine a
start_engine b
start_engine solo
# both nodes connected, and each has heard from the other
wait_line "$W/engine-a.err" 'node b joined' || die "engine a did not see node b join ($W/engine-a.err)"
wait_line "$W/engine-b.err" 'node a joined' || die "engine b did not see node a join ($W/engine-b.err)"
SERVERS="$PID_a $PID_b $PID_solo $NPID"

# ---- parameters -----------------------------------------------------------------------------
if [ "$MODE" = smoke ]; then
    REPS=1 S_CALLS=500 S_SECS=20 P_CALLS=4000 P_SECS=20 X_CALLS=4000 X_SECS=20 WARM_S=100 WARM_P=500
else
    REPS=3 S_CALLS=400000 S_SECS=1.5 P_CALLS=4000000 P_SECS=2 X_CALLS=4000000 X_SECS=2.5 WARM_S=2000 WARM_P=20000
fi
CORES=$(nproc 2>/dev/null || echo 1)
PIN=0
if [ "$MODE" = full ] && have taskset && [ "$CORES" -ge 2 ]; then PIN=1; fi

# pin CPUS PID...: every thread of each PID on CPUS (no-op without pinning)
pin() {
    [ $PIN -eq 1 ] || return 0
    c=$1
    shift
    for sp in "$@"; do taskset -a -pc "$c" "$sp" >/dev/null 2>&1; done
}
unpin_all() { pin "0-$((CORES - 1))" $SERVERS; }

# quiet_wait: (full mode) up to 5 s for the machine to be idle (under 10 % of one core busy
# over half a second, from /proc/stat); the generator reports what else ran during each run
# (other_cpu_pct) and the table flags disturbed cells.
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat 2>/dev/null; }
quiet_wait() {
    [ "$MODE" = smoke ] && return 0
    [ -r /proc/stat ] || return 0
    i=0
    while [ $i -lt 10 ]; do
        a=$(busy_ticks)
        sleep 0.5
        b=$(busy_ticks)
        [ $((b - a)) -le $((TCK / 20)) ] && return 0
        i=$((i + 1))
    done
    log "the machine is still busy after 5 s; measuring anyway"
}

# gen LABEL REP PREFIX ARGS...: one generator run (PREFIX: "" or a taskset command); its result
# line goes to results.txt with rep=REP. In full mode a run during which other processes used
# 20 % of a core or more is run again, once; the second attempt is kept (and flagged if still
# disturbed).
gen() {
    label=$1 rep=$2 pfx=$3
    shift 3
    try=0
    while :; do
        out=$($pfx "$GEN" "$@" 2>&1)
        rc=$?
        line=$(printf '%s\n' "$out" | grep '^result ' | tail -n 1)
        [ "$MODE" = smoke ] || [ $rc -ne 0 ] || [ $try -ge 1 ] && break
        other=$(printf '%s\n' "$line" | sed -n 's/.* other_cpu_pct=\([0-9]*\).*/\1/p')
        [ -n "$other" ] && [ "$other" -ge 20 ] || break
        log "$label: other processes used $other % of a core meanwhile; running it again"
        try=$((try + 1))
    done
    if [ $rc -eq 0 ] && [ -n "$line" ]; then
        printf '%s rep=%s\n' "$line" "$rep" >>"$RES"
        log "$label: $(printf '%s' "$line" | tr ' ' '\n' | grep -E '^(cps|p50_us|p99_us|other_cpu_pct)=' | tr '\n' ' ')"
        return 0
    fi
    say "not ok - cluster: $label (generator exit $rc)"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
    FAILS=$((FAILS + 1))
    return 1
}

# one PEER SCEN REP PREFIX ARGS...: a run of scenario SCEN against local | cross | nats; every
# server's CPU is counted (--pid the one that routes, --pids the others) so that other_cpu_pct
# is what ran besides them.
one() {
    p=$1 sc=$2 rep=$3 pfx=$4
    shift 4
    case $p in
    local) gen "$sc $p (rep $rep)" "$rep" "$pfx" run --peer engine --scen "$sc-local" --port "$PORT_a" --pid "$PID_a" \
        --pids "$PID_b,$NPID,$PID_solo" "$@" ;;
    cross) gen "$sc $p (rep $rep)" "$rep" "$pfx" run --peer engine --scen "$sc-cross" --port "$PORT_a" --pid "$PID_a" \
        --pids "$PID_b,$NPID,$PID_solo" --caller-port "$PORT_b" --wait-route 10 "$@" ;;
    nats) gen "$sc $p (rep $rep)" "$rep" "$pfx" run --peer nats --scen "$sc-nats" --port "$NPORT" --pid "$NPID" \
        --pids "$PID_a,$PID_b,$PID_solo" "$@" ;;
    esac
}

# others_than PID...: the servers' pids other than those given, comma-separated (for --pids)
others_than() {
    l=""
    for sp in $SERVERS; do
        case " $* " in *" $sp "*) ;; *) l="$l${l:+,}$sp" ;; esac
    done
    printf '%s' "$l"
}
# pair SCEN REP PFX1 PFX2 PORT1 PID1 PORT2 PID2: two generators side by side, each 2 callers x 32
# in flight and 2 workers, measuring the same seconds (--start-at). Each generator counts every
# server's CPU, so what else ran is its other_cpu_pct minus the other generator's CPU; a pair
# disturbed by 20 % of a core or more is run again, once (full mode).
pair() {
    sc=$1 rep=$2 pf1=$3 pf2=$4
    try=0
    while :; do
        t=$(($(date +%s) + 2))
        [ "$MODE" = smoke ] && t=0
        common="run --peer engine --size 128 --callers 2 --workers 2 --depth 32 --calls $X_CALLS --secs $X_SECS --warmup $WARM_P --start-at $t"
        # shellcheck disable=SC2086
        $pf1 "$GEN" $common --scen "$sc-g1" --port "$5" --pid "$6" --pids "$(others_than "$6")" --fn-prefix bench::g1. \
            >"$W/pair1.out" 2>&1 &
        g1=$!
        track $g1
        # shellcheck disable=SC2086
        $pf2 "$GEN" $common --scen "$sc-g2" --port "$7" --pid "$8" --pids "$(others_than "$8")" --fn-prefix bench::g2. \
            >"$W/pair2.out" 2>&1 &
        g2=$!
        track $g2
        wait $g1
        r1=$?
        untrack $g1
        wait $g2
        r2=$?
        untrack $g2
        [ "$MODE" = smoke ] || [ $r1 -ne 0 ] || [ $r2 -ne 0 ] || [ $try -ge 1 ] && break
        other=$(cat "$W/pair1.out" "$W/pair2.out" | awk -f "$B/cluster.awk" -v mode=pair-other)
        [ -n "$other" ] && [ "$other" -ge 20 ] || break
        log "$sc (rep $rep): other processes used $other % of a core meanwhile; running it again"
        try=$((try + 1))
    done
    for k in 1 2; do
        line=$(grep '^result ' "$W/pair$k.out" | tail -n 1)
        eval "rc=\$r$k"
        if [ "$rc" -eq 0 ] && [ -n "$line" ]; then
            printf '%s rep=%s\n' "$line" "$rep" >>"$RES"
        else
            say "not ok - cluster: $sc generator $k (exit $rc)"
            tail -n 5 "$W/pair$k.out" | sed 's/^/#   /'
            FAILS=$((FAILS + 1))
        fi
    done
    log "$sc (rep $rep): $(grep -h '^result ' "$W/pair1.out" "$W/pair2.out" | sed 's/.* cps=\([0-9]*\).*/\1/' | tr '\n' '+') calls/s"
}

log "mode $MODE; engine $ENGINE; nats-server $NATS on port $NPORT; engines a:$PORT_a b:$PORT_b solo:$PORT_solo"
r=1
while [ $r -le $REPS ]; do
    quiet_wait
    # 1. one call, three ways (interleaved, so the machine's noise hits all alike)
    if [ $PIN -eq 1 ]; then
        pin 0 $SERVERS
        for p in local cross nats; do
            one $p serial-same $r "taskset -c 0" --size 128 --calls $S_CALLS --secs $S_SECS --warmup $WARM_S
        done
        unpin_all
    fi
    for p in local cross nats; do
        one $p serial $r "" --size 128 --calls $S_CALLS --secs $S_SECS --warmup $WARM_S
    done
    for p in local cross nats; do
        one $p pipelined $r "" --size 128 --callers 4 --workers 4 --depth 32 --calls $P_CALLS --secs $P_SECS --warmup $WARM_P
    done
    # 2. 1 engine vs 2 engines
    quiet_wait
    pair scale1 $r "" "" "$PORT_solo" "$PID_solo" "$PORT_solo" "$PID_solo"
    pair scale2 $r "" "" "$PORT_a" "$PID_a" "$PORT_b" "$PID_b"
    if [ $PIN -eq 1 ]; then
        pin 0 "$PID_solo"
        pair scale1-pinned $r "taskset -c 1" "taskset -c 1" "$PORT_solo" "$PID_solo" "$PORT_solo" "$PID_solo"
        pin 0 "$PID_a"
        pin 1 "$PID_b"
        pair scale2-pinned $r "taskset -c 0" "taskset -c 1" "$PORT_a" "$PID_a" "$PORT_b" "$PID_b"
        unpin_all
    fi
    r=$((r + 1))
done

# ---- the engines stop cleanly ---------------------------------------------------------------
for e in b a solo; do
    eval "pid=\$PID_$e"
    stop_pid "$pid"
    if [ "$STOP_RC" -ne 0 ]; then
        say "not ok - cluster: engine $e exited $STOP_RC after SIGTERM ($W/engine-$e.err)"
        tail -n 10 "$W/engine-$e.err" | sed 's/^/#   /'
        FAILS=$((FAILS + 1))
    elif [ "$MODE" = smoke ]; then
        say "ok - cluster: engine $e exited 0 after SIGTERM"
    fi
done
stop_pid "$NPID"

# ---- smoke: every scenario produced non-zero figures ----------------------------------------
fig() { grep " scen=$1 " "$RES" | tail -n 1 | tr ' ' '\n' | sed -n "s/^$2=//p"; }
if [ "$MODE" = smoke ]; then
    for sc in serial-local serial-cross serial-nats pipelined-local pipelined-cross pipelined-nats \
        scale1-g1 scale1-g2 scale2-g1 scale2-g2; do
        cps=$(fig "$sc" cps)
        p50=$(fig "$sc" p50_us)
        if [ -n "$cps" ] && [ -n "$p50" ] && awk -v c="$cps" -v l="$p50" 'BEGIN { exit !(c > 0 && l > 0) }'; then
            say "ok - cluster: $sc: $cps calls/s, p50 $p50 us"
        else
            say "not ok - cluster: $sc: no figures"
            FAILS=$((FAILS + 1))
        fi
    done
    if [ $FAILS -ne 0 ]; then
        KEEP=1
        say "#   logs kept in $W"
    fi
    [ $FAILS -eq 0 ]
    exit
fi

# ---- the table ------------------------------------------------------------------------------
CPU=$(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo 2>/dev/null | head -n 1)
ELAPSED=$(($(date +%s) - START_TS))
mkdir -p "$B/build"
cp "$RES" "$B/build/cluster-results.txt"
{
    echo "## iii cluster benchmarks"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); command: \`sh bench/cluster.sh\` (took ${ELAPSED} s)"
    echo "- machine: $CORES cores ($CPU), $(uname -sr); load average before / after: $LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    echo "- engine: \`$CC $ENGINE_CFLAGS iii.c\` ($("$ENGINE" --version 2>/dev/null); git ${GIT_ID:-?}, iii.c sha1 $SRC_ID); $("$NATS" --version 2>/dev/null | head -n 1)"
    echo "- medians of $REPS interleaved repetitions; 128 B payloads; a run during which other processes used 20 % of a core or more (from /proc/stat, minus every process of the benchmark) is run once more; ⚠ = most repetitions of that cell were still disturbed"
    echo
    awk -v pin=$PIN -f "$B/cluster.awk" "$RES"
} >"$W/table.md"
cp "$W/table.md" "$B/build/cluster-table.md"
cat "$W/table.md"
if [ $FAILS -ne 0 ]; then
    KEEP=1
    say "#   logs kept in $W"
fi
[ $FAILS -eq 0 ]
