#!/bin/sh
# bench/run.sh [--quick | --smoke | --verdict]   The iii benchmarks: one command, one table.
#
#   (no flag)  full run (5 to 15 minutes): every scenario against the engine, NATS, the relay
#              floor and the direct WebSocket hop, 3 interleaved repetitions (medians shown),
#              the verdict (below), the engine's profile (perf stat, callgrind), binary sizes.
#   --quick    the same table from 1 repetition of shorter phases, 3 for the verdict.
#   --verdict  only the verdict, with the full run's parameters (bench/build/verdict.md).
#   --smoke    a few thousand calls per scenario, no timing claims: prints "ok - ..." per
#              scenario ("skip - ..." for peers not installed) and exits 0 unless one failed.
#              test.sh runs it; it uses $III_BIN when set (the sanitizer build there).
# The verdict: pipelined 128 B, engine vs NATS vs the floor, unpinned and pinned (every server
# thread on core 1, the generator on core 0), repeated (3 to 7 times, within a time bound) until
# the spread (max - min) / median of engine/NATS calls/s and CPU per call (utime+stime from
# /proc/PID/stat / calls) is under 10 %; a run during which other processes used 20 % of a core
# or more is run again (twice at most) and, if still disturbed, gives no ratio (bench/verdict.awk).
# Environment: CC (default cc); III_BIN (smoke only: the engine binary to drive);
#   III_BENCH_NATS=PATH to a nats-server, or "none" to leave NATS out.
#
# Scenarios (bench/bench.c plays every worker and caller over real sockets on 127.0.0.1):
#   serial     one caller, one echo worker, one call in flight
#   pipelined  4 caller connections x 32 calls in flight, 4 echo workers
#   sweep      payloads of 128 B, 1 KiB, 16 KiB, 64 KiB, 1 MiB (serial, and 2 callers x 8 in flight)
#   conns      10,000 idle worker connections, each registered with one function
#   cleanup    a worker with 200 functions and 1,000 calls in flight to it disconnects
#   startup    exec -> listening line -> first successful call
# Peers: the engine; nats-server (Debian's, bound to 127.0.0.1, installed here when missing
# except in --smoke); the floor (bench/relay.c, a TCP relay forwarding bytes unparsed); the
# direct hop (caller -> echo worker over one WebSocket, no router).
#
# Every process started here is stopped by its pid. Outputs land in bench/build/:
# results.txt (raw "result ..." lines), table.md (the table), logs and profiles.
# POSIX sh.
set -u
B=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$B")
MODE=full
ONLY_VERDICT=0
case ${1:-} in
"") ;;
--quick) MODE=quick ;;
--verdict) ONLY_VERDICT=1 ;;
--smoke) MODE=smoke ;;
-h | --help)
    sed -n '2,33p' "$0"
    exit 0
    ;;
*)
    echo "usage: sh bench/run.sh [--quick | --smoke | --verdict]" >&2
    exit 2
    ;;
esac
CC=${CC:-cc}
# A smoke run (test.sh, CI) works in a private temporary directory, so it never shares files
# with a benchmark run going on at the same time; full and quick runs keep theirs in bench/build.
if [ "$MODE" = smoke ]; then
    W=$(mktemp -d "${TMPDIR:-/tmp}/iii-bench-smoke.XXXXXX") || exit 1
    GEN=$W/bench
else
    W=$B/build
    GEN=$B/bench
    mkdir -p "$W"
fi
RES=$W/results.txt
[ $ONLY_VERDICT -eq 1 ] && RES=$W/verdict-results.txt
: >"$RES"
PIDS=""
FAILS=0
START_TS=$(date +%s)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)

say() { printf '%s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
log() { [ "$MODE" = smoke ] || printf '# %s\n' "$*" >&2; }

# ---- process bookkeeping: everything started is stopped by pid ------------------------------
track() { PIDS="$PIDS $1"; }
untrack() {
    n=""
    for p in $PIDS; do [ "$p" = "$1" ] || n="$n $p"; done
    PIDS=$n
}
# stop_pid PID: SIGTERM, wait up to 10 s, then SIGKILL; sets STOP_RC to its exit status.
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
    [ "$MODE" = smoke ] && [ -n "${W:-}" ] && case $W in */iii-bench-smoke.*) rm -rf "$W" ;; esac
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

# ---- limits, builds -------------------------------------------------------------------------
HARD=$(ulimit -Hn)
if [ "$HARD" = unlimited ] || [ "$HARD" -ge 20000 ]; then ulimit -n 20000; else ulimit -n "$HARD"; fi
NOFILE=$(ulimit -n)
NCONNS=10000
[ "$MODE" = smoke ] && NCONNS=200
if [ $((NCONNS * 2 + 200)) -gt "$NOFILE" ] && [ $((NCONNS + 100)) -gt "$NOFILE" ]; then
    NCONNS=$((NOFILE - 100))
fi

GEN_CFLAGS="-std=c99 -O2 -DIII_NO_MAIN -Wall -Wextra -Wno-unused-function"
if ! $CC $GEN_CFLAGS "$B/bench.c" -o "$GEN" 2>"$W/cc-bench.log"; then
    say "not ok - bench: the load generator does not build"
    sed 's/^/#   /' "$W/cc-bench.log" | head -n 20
    exit 1
fi
if ! $CC -std=c99 -O2 -Wall -Wextra "$B/relay.c" -o "$W/relay" 2>"$W/cc-relay.log"; then
    say "not ok - bench: the relay does not build"
    sed 's/^/#   /' "$W/cc-relay.log" | head -n 20
    exit 1
fi
RELAY=$W/relay

ENGINE_CFLAGS="-std=c99 -O2 -Wall -Wextra -Wpedantic" # the Makefile's defaults
# Every engine build of a run (default, static musl, callgrind) comes from one snapshot of the
# sources taken now, so the table describes one version even if iii.c is edited meanwhile.
SRC=$W/src
mkdir -p "$SRC"
cp "$ROOT/iii.c" "$ROOT/iii.h" "$SRC/"
SRC_ID=$( (sha1sum "$SRC/iii.c" 2>/dev/null || cksum "$SRC/iii.c") | cut -c1-12)
GIT_ID=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)
if [ -n "$GIT_ID" ] && ! git -C "$ROOT" diff --quiet HEAD -- iii.c iii.h 2>/dev/null; then GIT_ID="$GIT_ID + uncommitted changes"; fi
if [ "$MODE" = smoke ] && [ -n "${III_BIN:-}" ] && [ -x "${III_BIN:-}" ]; then
    ENGINE=$III_BIN
else
    if ! $CC $ENGINE_CFLAGS "$SRC/iii.c" -o "$W/iii" 2>"$W/cc-iii.log"; then
        say "not ok - bench: the engine does not build ($W/cc-iii.log)"
        exit 1
    fi
    ENGINE=$W/iii
fi

cat >"$W/engine.yaml" <<'EOF'
# The engine under benchmark: loopback only, room for the 10,000-connection scenario, and no
# keep-alive pings during the runs (they would add frames the other peers do not send).
workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
      max_connections: 20000
      ping_interval_ms: 0
      idle_timeout_ms: 0
EOF

# ---- NATS -----------------------------------------------------------------------------------
NATS=""
NATS_NOTE=""
find_nats() {
    for n in nats-server /usr/sbin/nats-server /usr/bin/nats-server; do
        if have "$n"; then
            NATS=$(command -v "$n")
            return 0
        fi
    done
    return 1
}
if [ "${III_BENCH_NATS:-}" = none ]; then
    NATS_NOTE="disabled by III_BENCH_NATS=none"
elif [ -n "${III_BENCH_NATS:-}" ]; then
    NATS=$III_BENCH_NATS
elif ! find_nats; then
    if [ "$MODE" = smoke ]; then
        NATS_NOTE="nats-server not installed (smoke mode does not install it)"
    else
        log "installing nats-server (apt-get)"
        if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server) >"$W/apt-nats.log" 2>&1; then
            find_nats || NATS_NOTE="nats-server not found after apt-get install"
        else
            NATS_NOTE="apt-get install nats-server failed (bench/build/apt-nats.log)"
        fi
    fi
fi

# ---- servers under test ---------------------------------------------------------------------
EPID=""
EPORT=""
# start_engine TAG [PREFIX...]: starts the engine (optionally under PREFIX, e.g. valgrind).
start_engine() {
    tag=$1
    shift
    : >"$W/engine-$tag.out"
    "$@" "$ENGINE" -c "$W/engine.yaml" --port 0 >"$W/engine-$tag.out" 2>"$W/engine-$tag.err" &
    EPID=$!
    track $EPID
    if ! wait_line "$W/engine-$tag.out" 'listening on ws://'; then
        say "not ok - bench: the engine did not start ($W/engine-$tag.err)"
        tail -n 5 "$W/engine-$tag.err" | sed 's/^/#   /'
        stop_pid $EPID
        exit 1
    fi
    EPORT=$(sed -n 's/.*listening on ws:\/\/127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/engine-$tag.out" | head -n 1)
}
stop_engine() {
    stop_pid "$EPID"
    ENGINE_RC=$STOP_RC
    if [ "$ENGINE_RC" -ne 0 ]; then
        say "not ok - bench: engine ($1) exited $ENGINE_RC after SIGTERM ($W/engine-$1.err)"
        tail -n 20 "$W/engine-$1.err" | sed 's/^/#   /'
        FAILS=$((FAILS + 1))
    elif [ "$MODE" = smoke ]; then
        say "ok - bench: engine ($1) exited 0 after SIGTERM"
    fi
}
NPID=""
NPORT=""
start_nats() {
    # emptied first: a restart must not read the previous server's "ready" line and port
    : >"$W/nats.log"
    "$NATS" -a 127.0.0.1 -p -1 >"$W/nats.log" 2>&1 &
    NPID=$!
    track $NPID
    if ! wait_line "$W/nats.log" 'Server is ready'; then
        NATS_NOTE="nats-server did not start (bench/build/nats.log)"
        stop_pid $NPID
        NPID=""
        return 1
    fi
    NPORT=$(sed -n 's/.*Listening for client connections on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$W/nats.log" | head -n 1)
}

# quiet_wait: before a measured run (not in smoke mode), waits until the machine has been
# idle for half a second (under 10 % of one core busy, from /proc/stat), at most QUIET_N half
# seconds (30 s; 5 s in the verdict, whose repetitions have their own time bound). The
# machine may be shared (a test suite running next to us); the generator reports what else
# used the CPU during each run anyway (other_cpu_pct), and the table flags those cells.
TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat 2>/dev/null; }
QUIET_N=60
quiet_wait() {
    [ "$MODE" = smoke ] && return 0
    [ -r /proc/stat ] || return 0
    i=0
    while [ $i -lt $QUIET_N ]; do
        a=$(busy_ticks)
        sleep 0.5
        b=$(busy_ticks)
        [ $((b - a)) -le $((TCK / 20)) ] && return 0
        i=$((i + 1))
    done
    log "the machine is still busy after $((QUIET_N / 2)) s; measuring anyway"
}

# gen LABEL ARGS...: runs the generator; its "result" line goes to results.txt. Outside smoke
# mode a run during which other processes used DISTURB (20) % of a core or more is run again
# (twice at most); the last attempt is kept, and the table flags it if it was still disturbed.
# GEN_TAG (e.g. " rep=2"), when set, is appended to the line with tries=N (attempts made).
DISTURB=20
GEN_TAG=""
gen() {
    label=$1
    shift
    try=0
    while :; do
        quiet_wait
        out=$($GENPFX "$GEN" "$@" 2>&1)
        rc=$?
        line=$(printf '%s\n' "$out" | grep '^result ' | tail -n 1)
        [ "$MODE" = smoke ] || [ $rc -ne 0 ] || [ $try -ge 2 ] && break
        other=$(printf '%s\n' "$line" | sed -n 's/.* other_cpu_pct=\([0-9]*\).*/\1/p')
        [ -n "$other" ] && [ "$other" -ge $DISTURB ] || break
        log "$label: other processes used $other % of a core meanwhile; running it again"
        try=$((try + 1))
    done
    if [ $rc -eq 0 ] && [ -n "$line" ]; then
        if [ -n "$GEN_TAG" ]; then line="$line$GEN_TAG tries=$((try + 1))"; fi
        printf '%s\n' "$line" >>"$RES"
        if [ "$MODE" = smoke ]; then
            say "ok - bench: $label"
        else
            log "$label: $(printf '%s' "$line" | tr ' ' '\n' | grep -E '^(cps|p50_us|p99_us|secs|srv_stat_cpu_us_call|other_cpu_pct|stop_ms_p50|listen_ms_p50|first_call_ms_p50|rss_per_conn_b)=' | tr '\n' ' ')"
        fi
        return 0
    fi
    say "not ok - bench: $label (generator exit $rc)"
    printf '%s\n' "$out" | tail -n 5 | sed 's/^/#   /'
    FAILS=$((FAILS + 1))
    return 1
}

# ---- parameters per mode --------------------------------------------------------------------
SIZES="128 1024 16384 65536 1048576"
case $MODE in
full)
    REPS=3 S_SECS=3 S_CALLS=400000 P_SECS=4 P_CALLS=4000000 W_SECS=2 W_CALLS=400000
    CL_ROUNDS=7 ST_ROUNDS=15
    V_MIN=3 V_MAX=7 V_BUDGET=240 V_SECS=4 V_CALLS=4000000
    ;;
quick)
    REPS=1 S_SECS=2 S_CALLS=200000 P_SECS=2 P_CALLS=2000000 W_SECS=1 W_CALLS=200000
    CL_ROUNDS=3 ST_ROUNDS=5
    V_MIN=3 V_MAX=3 V_BUDGET=90 V_SECS=2 V_CALLS=2000000
    ;;
smoke)
    REPS=1 S_SECS=20 S_CALLS=2000 P_SECS=20 P_CALLS=4000 W_SECS=20 W_CALLS=200
    CL_ROUNDS=1 ST_ROUNDS=1
    # one repetition per placement, enough calls for a few clock ticks of router CPU
    V_MIN=1 V_MAX=1 V_BUDGET=60 V_SECS=20 V_CALLS=100000
    ;;
esac
# the verdict's rules (bench/verdict.awk): a ratio is steady when its spread over at least V_MIN
# undisturbed repetitions is under V_SPREAD %
V_SPREAD=10
PEERS="engine floor direct"
if [ -n "$NATS" ]; then PEERS="engine nats floor direct"; fi

# CPU placement. On this kind of machine (a VM) a wake-up across cores costs far more than the
# routing itself, and the scheduler puts the router and the generator on one core or on two
# from run to run, so unpinned one-call-in-flight latencies jump between two modes. Latency runs
# are therefore pinned, both ways, for every peer alike:
#   same   router and generator on core 0 (the router's own cost per hop)
#   cross  generator on core 0, router on core 1 (adds the cross-core wake-ups)
#   free   no pinning (throughput runs: everyone may use every core)
# Without taskset (or with one core) everything runs free, and the table says so.
CORES=$(nproc 2>/dev/null || echo 1)
PIN=0
if have taskset && [ "$CORES" -ge 2 ]; then PIN=1; fi
printf '#!/bin/sh\nexec taskset -c 1 "%s" "$@"\n' "$RELAY" >"$W/relay-core1"
chmod +x "$W/relay-core1"
PLACE=free
GENPFX=""
# place free|same|cross: pins the running servers (all their threads) and sets the generator's.
place() {
    PLACE=$1
    [ $PIN -eq 1 ] || {
        PLACE=free
        return 0
    }
    case $1 in
    free) cpus=0-$((CORES - 1)) GENPFX="" ;;
    same) cpus=0 GENPFX="taskset -c 0" ;;
    cross) cpus=1 GENPFX="taskset -c 0" ;;
    esac
    for sp in $EPID $NPID; do taskset -a -pc "$cpus" "$sp" >/dev/null 2>&1; done
}

# run_peer PEER LABEL ARGS...: one "bench run" against PEER, placed as set by place().
run_peer() {
    p=$1
    label=$2
    shift 2
    relay=$RELAY
    [ "$PLACE" = cross ] && relay=$W/relay-core1
    # the servers not under test are idle, but their CPU is the benchmark's, not other load
    case $p in
    engine) gen "$label" run --peer engine --port "$EPORT" --pid "$EPID" ${NPID:+--pids "$NPID"} "$@" ;;
    nats) gen "$label" run --peer nats --port "$NPORT" --pid "$NPID" --pids "$EPID" "$@" ;;
    floor) gen "$label" run --peer floor --relay-exe "$relay" --pids "$EPID${NPID:+,$NPID}" "$@" ;;
    direct) gen "$label" run --peer direct --pids "$EPID${NPID:+,$NPID}" "$@" ;;
    esac
}

log "mode $MODE; engine $ENGINE; peers: $PEERS${NATS_NOTE:+ (NATS: $NATS_NOTE)}"
[ -n "$NATS_NOTE" ] && say "skip - bench: NATS peer: $NATS_NOTE"

start_engine main
if [ -n "$NATS" ]; then start_nats || { say "skip - bench: NATS peer: $NATS_NOTE"; PEERS="engine floor direct"; }; fi

# the verdict: pipelined 128 B, engine vs NATS vs the floor (interleaved in every repetition),
# in placement free (scen=pipelined) or cross (scen=pipelined-pinned: every server thread on
# core 1, the generator on core 0). Repetitions go on until bench/verdict.awk finds both
# engine/base ratios (calls/s, CPU per call) steady over V_MIN undisturbed repetitions, or V_MAX
# repetitions were made, or V_BUDGET seconds have passed; a "verdict" line says which.
VPEERS="engine floor"
case " $PEERS " in *" nats "*) VPEERS="engine nats floor" ;; esac
verdict_phase() {
    vplace=$1 vscen=$2
    place "$vplace"
    if [ "$vplace" = cross ] && [ "$PLACE" != cross ]; then
        log "verdict: no pinned comparison (taskset missing or one core)"
        return 0
    fi
    vt0=$(date +%s)
    vr=1
    stop=reps
    QUIET_N=10
    while [ $vr -le $V_MAX ]; do
        GEN_TAG=" rep=$vr"
        for p in $VPEERS; do
            run_peer "$p" "verdict $vscen $p (rep $vr)" --scen "$vscen" --size 128 --callers 4 --workers 4 --depth 32 \
                --calls $V_CALLS --secs $V_SECS --warmup 20000
        done
        GEN_TAG=""
        if [ "$MODE" = smoke ]; then
            stop=smoke
            break
        fi
        if [ $vr -ge $V_MIN ] && awk -v mode=check -v scen="$vscen" -v disturb=$DISTURB -v minreps=$V_MIN \
            -v maxspread=$V_SPREAD -f "$B/verdict.awk" "$RES"; then
            stop=steady
            break
        fi
        if [ $(($(date +%s) - vt0)) -ge $V_BUDGET ] && [ $vr -lt $V_MAX ]; then
            stop=time
            break
        fi
        vr=$((vr + 1))
    done
    [ $vr -gt $V_MAX ] && vr=$V_MAX
    QUIET_N=60
    printf 'verdict scen=%s reps=%s stop=%s secs=%s\n' "$vscen" "$vr" "$stop" $(($(date +%s) - vt0)) >>"$RES"
    log "verdict $vscen: $vr repetitions, stopped: $stop"
    place free
}
verdict_table() {
    awk -v mode="$1" -v disturb=$DISTURB -v minreps=$V_MIN -v maxspread=$V_SPREAD -f "$B/verdict.awk" "$RES"
}

if [ $ONLY_VERDICT -eq 1 ]; then
    verdict_phase free pipelined
    verdict_phase cross pipelined-pinned
    stop_engine main
    [ -n "$NPID" ] && stop_pid "$NPID"
    {
        echo "## iii engine vs NATS verdict (\`sh bench/run.sh --verdict\`, took $(($(date +%s) - START_TS)) s)"
        echo
        echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); machine: $CORES cores ($(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo 2>/dev/null | head -n 1)), $(uname -sr); load average before / after: $LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
        echo "- engine: source git ${GIT_ID:-?}, iii.c sha1 $SRC_ID; ${NATS:+$("$NATS" --version 2>/dev/null | head -n 1)}"
        echo
        verdict_table table
    } >"$W/verdict.md"
    cat "$W/verdict.md"
    [ $FAILS -eq 0 ]
    exit
fi

# serial: the peers interleaved, REPS times (the machine's noise hits all alike); the direct
# hop's pipelined runs (the other peers' are the verdict's, below)
r=1
while [ $r -le $REPS ]; do
    place same
    for p in $PEERS; do
        run_peer "$p" "serial $p, same core (rep $r)" --scen serial --size 128 --calls $S_CALLS --secs $S_SECS --warmup 2000
    done
    if [ $PIN -eq 1 ] && [ "$MODE" != smoke ]; then
        place cross
        for p in $PEERS; do
            run_peer "$p" "serial $p, cross core (rep $r)" --scen serial-cross --size 128 --calls $S_CALLS --secs $S_SECS --warmup 2000
        done
    fi
    place free
    run_peer direct "pipelined direct (rep $r)" --scen pipelined --size 128 --callers 4 --workers 4 --depth 32 \
        --calls $P_CALLS --secs $P_SECS --warmup 20000
    r=$((r + 1))
done
verdict_phase free pipelined
verdict_phase cross pipelined-pinned
if [ "$MODE" = smoke ]; then
    vout=$(verdict_table smoke)
    printf '%s\n' "$vout"
    FAILS=$((FAILS + $(printf '%s\n' "$vout" | grep -c '^not ok')))
fi
# payload sweep: serial pinned to one core, pipelined free
for s in $SIZES; do
    wc=$W_CALLS
    wu=500
    if [ "$s" -ge 1048576 ]; then
        wu=20
        [ "$MODE" = smoke ] && wc=20
    fi
    for p in $PEERS; do
        place same
        run_peer "$p" "sweep serial $s B $p" --scen sweep-serial --size "$s" --calls "$wc" --secs $W_SECS --warmup $wu
        place free
        run_peer "$p" "sweep pipelined $s B $p" --scen sweep-pipe --size "$s" --callers 2 --workers 2 --depth 8 \
            --calls "$wc" --secs $W_SECS --warmup $wu
    done
done
place free

# the engine's own profile, in separate runs (tracing slows it; the table's runs are untraced)
if [ "$MODE" != smoke ] && have perf; then
    for sc in serial pipelined; do
        ev="task-clock,context-switches,cpu-migrations,page-faults,raw_syscalls:sys_enter"
        perf stat -e "$ev" -p "$EPID" -o "$W/perf-$sc.txt" >/dev/null 2>&1 &
        PP=$!
        sleep 0.3
        if ! kill -0 $PP 2>/dev/null; then
            ev="task-clock,context-switches,cpu-migrations,page-faults"
            perf stat -e "$ev" -p "$EPID" -o "$W/perf-$sc.txt" >/dev/null 2>&1 &
            PP=$!
            sleep 0.3
        fi
        track $PP
        # run once, never repeated: perf counts everything from attach to detach
        if [ $sc = serial ]; then
            place same
            $GENPFX "$GEN" run --peer engine --port "$EPORT" --pid "$EPID" --scen perf-serial --calls 100000 --secs 3 \
                --warmup 0 2>&1 | grep '^result ' >>"$RES"
        else
            "$GEN" run --peer engine --port "$EPORT" --pid "$EPID" --scen perf-pipelined --callers 4 --workers 4 --depth 32 \
                --calls 500000 --secs 3 --warmup 0 2>&1 | grep '^result ' >>"$RES"
        fi
        place free
        kill -INT $PP 2>/dev/null
        wait $PP 2>/dev/null
        untrack $PP
        # the perf figures are per routed call; the calls are those of this run
        calls=$(grep "scen=perf-$sc " "$RES" | tail -n 1 | sed 's/.* calls=\([0-9]*\).*/\1/')
        awk -v sc="$sc" -v calls="$calls" '
            { gsub(",", "", $1) }
            $2 == "context-switches" { printf "perf peer=engine scen=perf-%s cs_call=%.2f\n", sc, $1 / calls }
            $2 == "raw_syscalls:sys_enter" { printf "perf peer=engine scen=perf-%s syscalls_call=%.2f\n", sc, $1 / calls }
            $2 == "page-faults" { printf "perf peer=engine scen=perf-%s faults_call=%.4f\n", sc, $1 / calls }
        ' "$W/perf-$sc.txt" >>"$RES"
    done
fi

# connections, cleanup (fresh engine: the RSS baseline is that of an engine that served nothing)
stop_engine main
start_engine conns
PROBE=1
[ $PIN -eq 1 ] && PROBE=2
gen "conns engine: $NCONNS idle registered workers" conns --peer engine --port "$EPORT" --pid "$EPID" --n "$NCONNS" --conc 256 --secs 120 \
    --probe $PROBE --calls 3000
gen "cleanup engine: 200 functions, 1000 calls in flight" cleanup --port "$EPORT" --pid "$EPID" --functions 200 --calls 1000 \
    --callers 10 --rounds $CL_ROUNDS
stop_engine conns
if [ -n "$NPID" ]; then
    stop_pid "$NPID"
    start_nats && gen "conns nats: $NCONNS idle subscribed connections" conns --peer nats --port "$NPORT" --pid "$NPID" --n "$NCONNS" \
        --conc 256 --secs 120 --probe $PROBE --calls 3000
    [ -n "$NPID" ] && stop_pid "$NPID"
fi

# startup: exec -> listening line -> first call
gen "startup engine" startup --peer engine --rounds $ST_ROUNDS -- "$ENGINE" -c "$W/engine.yaml" --port 0
[ -n "$NATS" ] && gen "startup nats" startup --peer nats --rounds $ST_ROUNDS -- "$NATS" -a 127.0.0.1 -p -1
gen "startup floor" startup --peer floor --rounds $ST_ROUNDS --relay-exe "$RELAY"

# ---- smoke mode ends here ---------------------------------------------------------------------
if [ "$MODE" = smoke ]; then
    [ $FAILS -eq 0 ] || exit 1
    exit 0
fi

# ---- binary sizes, static musl build, callgrind ---------------------------------------------
cp "$W/iii" "$W/iii-stripped" && strip "$W/iii-stripped"
printf 'size peer=engine scen=size kind=default bytes=%s\n' "$(wc -c <"$W/iii-stripped" | tr -d ' ')" >>"$RES"
if ! have musl-gcc; then
    log "installing musl-tools (apt-get)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools) >"$W/apt-musl.log" 2>&1
fi
MUSL_NOTE=""
if have musl-gcc; then
    if musl-gcc -static $ENGINE_CFLAGS "$SRC/iii.c" -o "$W/iii-musl" 2>"$W/cc-musl.log"; then
        cp "$W/iii-musl" "$W/iii-musl-stripped" && strip "$W/iii-musl-stripped"
        printf 'size peer=engine scen=size kind=musl bytes=%s\n' "$(wc -c <"$W/iii-musl-stripped" | tr -d ' ')" >>"$RES"
        gen "startup engine (static musl)" startup --peer engine --scen startup-musl --rounds $ST_ROUNDS -- \
            "$W/iii-musl-stripped" -c "$W/engine.yaml" --port 0
    else
        MUSL_NOTE="musl-gcc -static failed (bench/build/cc-musl.log)"
    fi
else
    MUSL_NOTE="musl-gcc not available"
fi

if [ "$MODE" = full ] && have valgrind && have callgrind_control && have callgrind_annotate; then
    rm -f "$W"/callgrind.out*
    start_engine callgrind valgrind --tool=callgrind --callgrind-out-file="$W/callgrind.out"
    "$GEN" run --peer engine --port "$EPORT" --calls 2000 --secs 30 --warmup 0 >/dev/null 2>&1
    callgrind_control -z $EPID >/dev/null 2>&1
    place same
    # run once, never repeated: the counters were zeroed for exactly these calls
    $GENPFX "$GEN" run --peer engine --port "$EPORT" --pid "$EPID" --scen callgrind-serial --calls 20000 --secs 120 \
        --warmup 0 2>&1 | grep '^result ' >>"$RES"
    callgrind_control -d $EPID >/dev/null 2>&1
    place free
    stop_engine callgrind
    CG=$(ls "$W"/callgrind.out.* 2>/dev/null | head -n 1)
    if [ -n "$CG" ]; then
        callgrind_annotate --inclusive=no --threshold=100 "$CG" >"$W/callgrind-top.txt" 2>/dev/null
        total=$(sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' "$W/callgrind-top.txt" | tr -d ,)
        calls=$(grep 'scen=callgrind-serial ' "$RES" | tail -n 1 | sed 's/.* calls=\([0-9]*\).*/\1/')
        [ -n "$total" ] && [ -n "$calls" ] && printf 'cg peer=engine scen=callgrind ir_call=%s\n' $((total / calls)) >>"$RES"
    fi
fi

# ---- the table ------------------------------------------------------------------------------
CORES=$(nproc 2>/dev/null || echo '?')
CPU=$(sed -n 's/^model name[^:]*: *//p' /proc/cpuinfo 2>/dev/null | head -n 1)
KERNEL=$(uname -sr)
COMPILER=$($CC --version 2>/dev/null | head -n 1)
MEM=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo 2>/dev/null)
NATSV=""
[ -n "$NATS" ] && NATSV=$("$NATS" --version 2>/dev/null | head -n 1)
ELAPSED=$(($(date +%s) - START_TS))
{
    echo "## iii engine benchmarks ($MODE run)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); command: \`sh bench/run.sh$([ "$MODE" = quick ] && echo ' --quick')\` (took ${ELAPSED} s)"
    echo "- machine: $CORES cores ($CPU), $MEM, $KERNEL; compiler: $COMPILER; load average before / after the run: $LOAD0 / $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
    echo "- engine: \`$CC $ENGINE_CFLAGS iii.c\` ($("$W/iii" --version 2>/dev/null); source: git ${GIT_ID:-?}, iii.c sha1 $SRC_ID); peers: ${NATSV:-NATS not run${NATS_NOTE:+ ($NATS_NOTE)}}; floor: bench/relay.c; generator: bench/bench.c (one thread, poll(), same for every peer)"
    if [ $PIN -eq 1 ]; then
        echo "- placement: one-call-in-flight runs pinned with taskset (\"same core\": router and generator on core 0; \"cross core\": router on core 1), throughput runs unpinned, the verdict's pipelined runs both unpinned and pinned (router on core 1, generator on core 0); see the comment in bench/run.sh"
    else
        echo "- placement: nothing pinned (taskset missing or one core): one-call-in-flight latencies are noisy"
    fi
    echo "- a run disturbed by other processes (20 % of a core or more, measured from /proc/stat) is run again, twice at most; medians of $REPS interleaved repetitions for serial (and the direct hop's pipelined runs); the other pipelined figures come from the verdict's repetitions; every figure is the median over undisturbed runs, ⚠ marks a cell whose runs were all disturbed (no ratio from it); ratio = engine / peer (calls/s: above 1 is better for the engine; latency, CPU, memory, time: below 1 is better)"
    echo
    awk -f "$B/table.awk" "$RES"
    [ -n "$MUSL_NOTE" ] && echo "- static musl build: $MUSL_NOTE"
    echo
    verdict_table table
} >"$W/table.md"
cat "$W/table.md"
[ $FAILS -eq 0 ]
