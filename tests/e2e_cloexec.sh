#!/bin/sh
# tests/e2e_cloexec.sh   Descriptors the engine inherits do not leak into its workers.
#
# Whoever starts the engine may leave descriptors open (a shell's `exec 7>log`, a supervisor's
# pipe). The engine marks every descriptor >= 3 it finds at start-up close-on-exec, so a
# declared worker sees only 0, 1 and 2 from it. Here the engine starts with fd 7 (a file open
# for writing), fd 9 (a file open for reading) and, with python3, a high fd (1500, or the
# descriptor limit - 1 if lower: past the first 1024, up to the top of the range) open, and a
# declared worker (restart: never) reports through its stdout, which the engine prints as
# "[fdcheck] ..." lines, whether /proc/self/fd/N exists for each. A control run of the same
# command from this shell, with the same descriptors open, must report them open (the probe can
# see a leak).
#
# Run: sh tests/e2e_cloexec.sh   (III_BIN=path/to/iii; default ./iii). Output: "ok - X",
# "not ok - X: why", "skip - X: why"; exit 1 on any failure. Needs /proc (else skips). Every
# process started here is bounded by timeout(1) and stopped by its pid. POSIX sh (dash).
set -u
cd "$(dirname "$0")/.." || exit 2
BIN=${III_BIN:-$(pwd)/iii}
FAIL=0
say() { printf '%s\n' "$*"; }
ok() { say "ok - cloexec: $1"; }
notok() { say "not ok - cloexec: $1"; FAIL=1; }
have() { command -v "$1" >/dev/null 2>&1; }

if [ ! -d /proc/self/fd ]; then
    say "skip - cloexec: no /proc/self/fd to look at a worker's descriptors"
    exit 0
fi
if ! have timeout; then
    say "not ok - cloexec: timeout(1) not installed (coreutils)"
    exit 1
fi
if [ ! -x "$BIN" ]; then
    say "not ok - cloexec: no engine binary at $BIN (build it: cc iii.c -o iii)"
    exit 1
fi

D=$(mktemp -d "${TMPDIR:-/tmp}/iii-cloexec.XXXXXX") || exit 2
ENG=""
WPID=""
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
    [ -n "$ENG" ] && kill -KILL "$ENG" 2>/dev/null
    [ -n "$WPID" ] && kill -KILL "$WPID" 2>/dev/null
    rm -rf "$D"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# the high descriptor: 1500, below the soft limit
HI=1500
# shellcheck disable=SC3045 # ulimit -n: dash, bash and busybox have it; without it, 1500
LIM=$(ulimit -n 2>/dev/null)
case $LIM in
'' | *[!0-9]*) ;;
*) [ "$LIM" -le "$HI" ] && HI=$((LIM - 1)) ;;
esac
FDS="7 9"
have python3 && FDS="$FDS $HI"

# the worker: one line per descriptor, then its pid, then it waits to be stopped
PROBE="for f in $FDS; do if [ -e /proc/self/fd/\$f ]; then echo \"fd \$f open\"; else echo \"fd \$f closed\"; fi; done; echo \"pid \$\$\"; exec sleep 300"
# python3 -c DUP FD FILE CMD...: FILE opened for writing as descriptor FD (inheritable), then exec
DUP='import os, sys
fd = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT, 0o600)
os.dup2(fd, int(sys.argv[1]))
os.close(fd)
os.execvp(sys.argv[3], sys.argv[3:])'
: >"$D/r9"

# control: the same probe from here, with the same descriptors open
if have python3; then
    timeout 30 python3 -c "$DUP" "$HI" "$D/hi" sh -c "$PROBE" >"$D/control" 2>&1 7>"$D/w7" 9<"$D/r9" &
else
    timeout 30 sh -c "$PROBE" >"$D/control" 2>&1 7>"$D/w7" 9<"$D/r9" &
fi
CPID=$!
n=0
while ! grep -q '^pid ' "$D/control" 2>/dev/null && [ $n -lt 100 ]; do
    sleep 0.1
    n=$((n + 1))
done
kill -KILL "$(sed -n 's/^pid //p' "$D/control")" 2>/dev/null
wait "$CPID" 2>/dev/null
bad=""
for f in $FDS; do grep -qx "fd $f open" "$D/control" || bad="$bad $f"; done
if [ -z "$bad" ]; then
    ok "control: the probe run from this shell sees fds $FDS open"
else
    notok "control: the probe run from this shell does not see fd$bad open: $(tr '\n' '|' <"$D/control")"
fi

cat >"$D/config.yaml" <<EOF
workers:
  - name: fdcheck
    command: ["sh", "-c", "$(printf '%s' "$PROBE" | sed 's/\\/\\\\/g; s/"/\\"/g')"]
    restart: never
EOF

# the engine, bounded by timeout (which forwards our SIGTERM to it), with the extra descriptors
if have python3; then
    timeout -k 5 60 python3 -c "$DUP" "$HI" "$D/hi" "$BIN" -c "$D/config.yaml" --host 127.0.0.1 \
        --port 0 >"$D/out" 2>"$D/err" 7>"$D/w7" 9<"$D/r9" &
else
    timeout -k 5 60 "$BIN" -c "$D/config.yaml" --host 127.0.0.1 --port 0 >"$D/out" 2>"$D/err" \
        7>"$D/w7" 9<"$D/r9" &
fi
ENG=$!
n=0
while ! grep -q '^\[fdcheck\] pid ' "$D/out" 2>/dev/null && [ $n -lt 150 ]; do
    kill -0 "$ENG" 2>/dev/null || break
    sleep 0.1
    n=$((n + 1))
done
WPID=$(sed -n 's/^\[fdcheck\] pid //p' "$D/out")
if [ -z "$WPID" ]; then
    notok "the declared worker never reported (15 s); engine stdout: $(tr '\n' '|' <"$D/out" | cut -c 1-300); stderr: $(tr '\n' '|' <"$D/err" | cut -c 1-300)"
else
    for f in $FDS; do
        case $f in
        7) what="fd 7 (a file open for writing)" ;;
        9) what="fd 9 (a file open for reading)" ;;
        *) what="fd $f (high, a file open for writing)" ;;
        esac
        if grep -qx "\[fdcheck\] fd $f closed" "$D/out"; then
            ok "$what inherited by the engine is not open in its worker"
        else
            notok "$what inherited by the engine leaked into its worker: $(grep "^\[fdcheck\] fd $f " "$D/out")"
        fi
    done
fi
kill -TERM "$ENG" 2>/dev/null
wait "$ENG"
rc=$?
ENG=""
# SIGTERM: a clean stop (0); anything else is reported (a sanitizer finding, a crash)
if [ $rc -eq 0 ]; then
    ok "engine stopped cleanly on SIGTERM"
else
    notok "engine exit status $rc after SIGTERM; stderr: $(tail -n 5 "$D/err" | tr '\n' '|')"
fi
if [ -n "$WPID" ] && kill -0 "$WPID" 2>/dev/null; then
    notok "worker pid $WPID still running after the engine stopped"
else
    WPID="" # gone: nothing for the EXIT trap to stop
fi
exit $FAIL
