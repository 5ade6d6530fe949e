#!/bin/sh
# tests/flavours.sh [--long]   Portability flavours: the engine and its tests built with other
# toolchains and run on other ABIs (STYLE.md "Tests": musl static, i686, big- and little-endian
# 32- and 64-bit targets under qemu-user, tcc). Each flavour whose toolchain is missing prints
# one "skip" line.
#
#   musl    musl-gcc -static                     (Debian: musl-tools)
#   i686    gcc -m32, else i686-linux-gnu-gcc -static, run natively (qemu-i386 if the kernel
#           cannot)                              (Debian: gcc-multilib or gcc-i686-linux-gnu;
#                                                 gcc-multilib conflicts with every cross gcc,
#                                                 so CI installs gcc-i686-linux-gnu)
#   s390x   s390x-linux-gnu-gcc -static under qemu-s390x: 64-bit big-endian, char unsigned
#                                                (Debian: gcc-s390x-linux-gnu, qemu-user)
#   armhf   arm-linux-gnueabihf-gcc -static under qemu-arm: 32-bit, char unsigned, 8-byte-aligned
#           64-bit fields                        (Debian: gcc-arm-linux-gnueabihf, qemu-user)
#   aarch64 aarch64-linux-gnu-gcc -static under qemu-aarch64: 64-bit, char unsigned
#                                                (Debian: gcc-aarch64-linux-gnu, qemu-user)
#   mips    mips-linux-gnu-gcc -static under qemu-mips: 32-bit big-endian
#                                                (Debian: gcc-mips-linux-gnu, qemu-user)
#   ppc32   powerpc-linux-gnu-gcc -static under qemu-ppc: 32-bit big-endian, char unsigned
#                                                (Debian: gcc-powerpc-linux-gnu, qemu-user)
#   riscv64 riscv64-linux-gnu-gcc -static under qemu-riscv64: 64-bit, char unsigned
#                                                (Debian: gcc-riscv64-linux-gnu, qemu-user)
#   mips-poll  mips with -DIII_USE_POLL: the portable poll() backend (no epoll set) on a
#           big-endian 32-bit target; iii.c and the Python suites only (the unit tests do not
#           reach the loop and ran in "mips")
#   tcc     tcc, native: no __GNUC__, so iii.c builds its poll() backend (glibc's x86_64
#           struct epoll_event is packed only for GNU compilers)     (Debian: tcc)
#
# Per flavour: iii.c built with -Wall -Wextra -Wpedantic (a warning is a failure), tests/unit.c
# (with the JSONTestSuite corpus) and tests/unit_yaml.c run, then the Python suites against that
# engine binary (under qemu-user through a wrapper script; the workers it execs are host shell
# scripts and host python3, which qemu-user runs natively). By default a quick subset of the
# Python suites; --long runs them whole. The subsets: musl, i686 and s390x as listed at the
# bottom; the five newer cross targets, mips-poll and tcc: tests/test_transport.py whole (its 67
# tests take 13-16 s under qemu-user, against 6-9 s to build; the byte-level framing, handshake
# hashing and loop behaviour are what an ABI changes) and nothing more. Measured on a 2-core
# machine: the default run of all ten flavours took 260 s (4.3 minutes), 140 s of it the new ones.
#
# Output: "ok - flavour NAME: WHAT", "not ok - flavour NAME: WHAT: WHY", "skip - flavour NAME:
# TOOL not installed", then "# flavours: N passed, N failed, N skipped". Exit 1 on any not ok.
# Every step is bounded by timeout(1). POSIX sh (dash). Binaries: build/iii-NAME;
# logs and test binaries under build/flavours/.
# Environment: III_JSON_SUITE (corpus dir), III_FLAVOURS (e.g. "musl s390x tcc"; default all).
# shellcheck disable=SC2086 # CC and RUN are word lists, split on purpose
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
LONG=0
[ "${1:-}" = "--long" ] && LONG=1
JSON_SUITE=${III_JSON_SUITE:-$ROOT/../shared/data/JSONTestSuite/test_parsing}
ALL="musl i686 s390x armhf aarch64 mips ppc32 riscv64 mips-poll tcc"
FLAVOURS=${III_FLAVOURS:-$ALL}
L=build/flavours
mkdir -p "$L"
PASS=0
FAIL=0
SKIP=0
T_BUILD=180 # s, one compiler run
T_UNIT=120  # s, one unit test binary
T_SUITE=300 # s, one Python suite run

say() { printf '%s\n' "$*"; }
ok() { say "ok - flavour $1"; PASS=$((PASS + 1)); }
notok() { say "not ok - flavour $1"; FAIL=$((FAIL + 1)); }
skip() { say "skip - flavour $1"; SKIP=$((SKIP + 1)); }
have() { command -v "$1" >/dev/null 2>&1; }
indent() { sed 's/^/#   /'; }

# Wall-clock milliseconds (GNU date), else seconds * 1000.
now_ms() {
    t=$(date +%s%N 2>/dev/null)
    case $t in
    *N* | '') echo $(($(date +%s) * 1000)) ;;
    *) echo $((t / 1000000)) ;;
    esac
}
secs() { # secs START_MS -> "1.2s"
    d=$(($(now_ms) - $1))
    echo "$((d / 1000)).$((d % 1000 / 100))s"
}

if ! have timeout; then
    say "not ok - flavours: timeout(1) not installed (coreutils)"
    say "# flavours: 0 passed, 1 failed, 0 skipped"
    exit 1
fi

# Probe: can CC (a word list) build and RUN (a word list, may be empty) run a program that uses
# the headers iii.c uses? 0 yes.
probe() {
    p_cc=$1
    p_run=$2
    printf '%s\n' '#include <errno.h>' '#include <netdb.h>' '#include <poll.h>' \
        '#include <stdio.h>' 'int main(void) { return puts("probe") < 0; }' >"$L/probe.c"
    rm -f "$L/probe"
    timeout 60 $p_cc -std=c99 "$L/probe.c" -o "$L/probe" >"$L/probe.log" 2>&1 &&
        timeout 30 $p_run "$L/probe" >/dev/null 2>&1
}

# build NAME WHAT OUT CC ARGS...: runs CC ARGS -o OUT (log beside), one step. 0 if OUT was built.
build() {
    b_name=$1 b_what=$2 b_out=$3 b_cc=$4
    shift 4
    b_log="$L/$(basename "$b_out").log"
    b_t=$(now_ms)
    rm -f "$b_out"
    timeout $T_BUILD $b_cc "$@" -o "$b_out" >"$b_log" 2>&1
    b_rc=$?
    if [ $b_rc -ne 0 ] || [ ! -f "$b_out" ]; then
        [ $b_rc -eq 124 ] && b_why="timed out after ${T_BUILD}s" || b_why="compiler exited $b_rc"
        notok "$b_name: build $b_what: $b_why (log: $b_log)"
        grep -m 10 -E 'error|undefined' "$b_log" | indent
        return 1
    fi
    ok "$b_name: build $b_what ($(secs "$b_t"))"
    return 0
}

# warnings NAME WHAT LOG: a step of its own: no compiler warning in LOG (iii.c only: the unit
# sources include it and are built with their own looser flags, as in test.sh).
warnings() {
    if grep -q ': warning: ' "$3"; then
        notok "$1: $2: compiler warnings (log: $3)"
        grep -m 10 -A 3 ': warning: ' "$3" | indent
    else
        ok "$1: $2: zero warnings"
    fi
}

# unit NAME WHAT RUN BIN [ARG]: runs a unit test binary, one step.
unit() {
    u_name=$1 u_what=$2 u_run=$3 u_bin=$4
    shift 4
    u_out="$L/$(basename "$u_bin").out"
    u_t=$(now_ms)
    timeout -k 5 $T_UNIT $u_run "$u_bin" "$@" >"$u_out" 2>&1
    u_rc=$?
    u_ok=$(grep -c '^ok ' "$u_out")
    u_bad=$(grep -c '^not ok ' "$u_out")
    if [ $u_rc -eq 0 ] && [ "$u_bad" -eq 0 ] && [ "$u_ok" -gt 0 ]; then
        u_tail=$(grep -m 1 '^# .*passed' "$u_out" | sed 's/^# //')
        ok "$u_name: $u_what (${u_tail:-$u_ok passed}, $(secs "$u_t"))"
        grep '^skip ' "$u_out" | indent
        return 0
    fi
    case $u_rc in
    124 | 137) u_why="timed out after ${T_UNIT}s" ;;
    0) u_why="$u_bad failing" ;;
    1[3-9][0-9]) u_why="killed by signal $((u_rc - 128)), $u_bad failing" ;;
    *) u_why="exit $u_rc, $u_bad failing" ;;
    esac
    notok "$u_name: $u_what: $u_why (output: $u_out)"
    if [ "$u_bad" -gt 0 ]; then
        grep -m 8 '^not ok ' "$u_out" | indent
    else
        tail -n 8 "$u_out" | indent
    fi
    return 1
}

# suite NAME ENGINE FILE [ONLY]: a Python suite against ENGINE (III_BIN), III_TEST_ONLY=ONLY.
suite() {
    s_name=$1 s_bin=$2 s_file=$3 s_only=${4:-}
    [ $LONG -eq 1 ] && s_only=""
    s_base=$(basename "$s_file" .py)
    s_out="$L/$s_name-$s_base.out"
    s_t=$(now_ms)
    # SIGINT first: the suites stop their engines in a finally on KeyboardInterrupt
    III_BIN="$s_bin" III_TEST_ONLY="$s_only" \
        timeout -s INT -k 15 $T_SUITE python3 "$s_file" >"$s_out" 2>"$s_out.err"
    s_rc=$?
    s_ok=$(grep -c '^ok ' "$s_out")
    s_bad=$(grep -c '^not ok ' "$s_out")
    s_sk=$(grep -c '^skip ' "$s_out")
    s_what="$s_base.py${s_only:+ [$s_only*]}"
    if [ $s_rc -eq 0 ] && [ "$s_bad" -eq 0 ] && [ "$s_ok" -gt 0 ]; then
        ok "$s_name: $s_what ($s_ok passed, $s_sk skipped, $(secs "$s_t"))"
        return 0
    fi
    case $s_rc in
    124 | 137) s_why="timed out after ${T_SUITE}s" ;;
    0) s_why="no test ran" ;;
    *) s_why="exit $s_rc, $s_bad failing of $((s_ok + s_bad))" ;;
    esac
    notok "$s_name: $s_what: $s_why (output: $s_out)"
    if [ "$s_bad" -gt 0 ]; then
        grep -m 8 '^not ok ' "$s_out" | cut -c 1-400 | indent
    else
        tail -n 8 "$s_out.err" | indent
    fi
    return 1
}

# flavour NAME CC RUN SUITES: the whole flavour. CC and RUN are word lists (RUN may be empty:
# native). SUITES: "file:subset ..." for the default run (subset "" = the whole file).
flavour() {
    f_name=$1 f_cc=$2 f_run=$3 f_suites=$4 f_units=${5:-unit}
    f_t=$(now_ms)
    f_bin="build/iii-$f_name"
    W="-std=c99 -Wall -Wextra -Wpedantic"
    f_obj="$L/iii-$f_name.o"
    rm -f "$f_bin"
    if build "$f_name" "iii.c ($f_cc -O2)" "$f_obj" "$f_cc" $W -O2 -c iii.c; then
        warnings "$f_name" "iii.c ($f_cc -O2)" "$L/$(basename "$f_obj").log"
        # linked apart: static glibc's linker notes (getaddrinfo) are not compiler warnings
            if ! timeout $T_BUILD $f_cc "$f_obj" -o "$f_bin" >"$L/link-$f_name.log" 2>&1; then
            notok "$f_name: link $f_bin (log: $L/link-$f_name.log)"
            head -n 10 "$L/link-$f_name.log" | indent
        fi
    fi
    U="-std=c99 -O1 -Wall -Wno-unused-function -DIII_NO_MAIN"
    if [ "$f_units" = unit ]; then
        if build "$f_name" "tests/unit.c" "$L/unit-$f_name" "$f_cc" $U tests/unit.c; then
            unit "$f_name" "tests/unit.c" "$f_run" "$L/unit-$f_name" "$JSON_SUITE"
        fi
        if build "$f_name" "tests/unit_yaml.c" "$L/unit_yaml-$f_name" "$f_cc" $U tests/unit_yaml.c; then
            unit "$f_name" "tests/unit_yaml.c" "$f_run" "$L/unit_yaml-$f_name"
        fi
    fi
    f_build=$(secs "$f_t")
    f_t2=$(now_ms)
    if [ ! -x "$f_bin" ]; then
        : # the build failure was reported
    elif ! have python3; then
        skip "$f_name: python suites: python3 not installed"
    else
        f_eng="$ROOT/$f_bin"
        if [ -n "$f_run" ]; then # the suites exec III_BIN directly: a wrapper keeps the pid
            f_eng="$ROOT/$L/iii-$f_name.sh"
            printf '#!/bin/sh\nexec %s "%s" "$@"\n' "$f_run" "$ROOT/$f_bin" >"$f_eng"
            chmod +x "$f_eng"
        fi
        if [ $LONG -eq 1 ]; then
            f_suites="tests/test_transport.py: tests/test_protocol.py: tests/e2e_supervisor.py:"
        fi
        for f_s in $f_suites; do
            suite "$f_name" "$f_eng" "${f_s%%:*}" "${f_s#*:}"
        done
    fi
    say "# flavour $f_name: builds and unit runs $f_build, python suites $(secs "$f_t2")"
    if have size && size "$f_bin" >/dev/null 2>&1; then
        size "$f_bin" | tail -n 1 | awk -v f="$f_bin" '{print "# size " f ": text " $1 ", data " $2 ", bss " $3}'
    fi
    [ -f "$f_bin" ] && say "# size $f_bin: $(wc -c <"$f_bin" | tr -d ' ') bytes on disk"
}

# cross NAME GCC PACKAGE QEMU SUITES [CFLAG...]: a cross-compiled static flavour run under
# qemu-user (QEMU, else QEMU-static); one skip line when the compiler or qemu is missing. With
# CFLAGs (a build variant of a target another flavour covers) the unit tests are not rerun.
cross() {
    x_name=$1 x_cc=$2 x_pkg=$3 x_q=$4 x_suites=$5
    shift 5
    x_run=""
    for q in $x_q $x_q-static; do have $q && x_run=$q && break; done
    if ! have $x_cc; then
        skip "$x_name: $x_cc not installed (Debian: $x_pkg)"
    elif [ -z "$x_run" ]; then
        skip "$x_name: $x_q not installed (Debian: qemu-user)"
    elif ! probe "$x_cc -static" "$x_run"; then
        notok "$x_name: $x_cc -static under $x_run cannot build and run a program (log: $L/probe.log)"
        head -n 5 "$L/probe.log" | indent
    elif [ $# -gt 0 ]; then
        flavour "$x_name" "$x_cc -static $*" "$x_run" "$x_suites" nounit
    else
        flavour "$x_name" "$x_cc -static" "$x_run" "$x_suites"
    fi
}

QUICK="tests/test_transport.py:"
T0=$(now_ms)
for F in $FLAVOURS; do
    case $F in
    musl)
        if ! have musl-gcc; then
            skip "musl: musl-gcc not installed (Debian: musl-tools)"
        elif ! probe "musl-gcc -static" ""; then
            notok "musl: musl-gcc -static cannot build a program (log: $L/probe.log)"
            head -n 5 "$L/probe.log" | indent
        else
            # musl: its own libc (stdio, getaddrinfo, posix_spawn/fork paths), so the workers too
            flavour musl "musl-gcc -static" "" \
                "tests/test_transport.py: tests/e2e_supervisor.py:worker_"
        fi
        ;;
    i686)
        CC32="" RUN32=""
        for c in "gcc -m32" "i686-linux-gnu-gcc -static"; do
            have "${c%% *}" || continue
            if probe "$c" ""; then
                CC32=$c
                break
            elif have qemu-i386 && probe "$c -static" "qemu-i386"; then
                CC32="$c -static" RUN32=qemu-i386 # the kernel cannot run 32-bit binaries
                break
            fi
        done
        if [ -z "$CC32" ]; then
            skip "i686: gcc -m32 (gcc-multilib) or i686-linux-gnu-gcc (gcc-i686-linux-gnu) not installed"
        else
            flavour i686 "$CC32" "$RUN32" "tests/test_transport.py: tests/test_protocol.py:route_"
        fi
        ;;
    s390x)
        cross s390x s390x-linux-gnu-gcc gcc-s390x-linux-gnu qemu-s390x \
            "tests/test_transport.py: tests/test_protocol.py:route_ tests/e2e_supervisor.py:worker_"
        ;;
    armhf) cross armhf arm-linux-gnueabihf-gcc gcc-arm-linux-gnueabihf qemu-arm "$QUICK" ;;
    aarch64) cross aarch64 aarch64-linux-gnu-gcc gcc-aarch64-linux-gnu qemu-aarch64 "$QUICK" ;;
    mips) cross mips mips-linux-gnu-gcc gcc-mips-linux-gnu qemu-mips "$QUICK" ;;
    ppc32) cross ppc32 powerpc-linux-gnu-gcc gcc-powerpc-linux-gnu qemu-ppc "$QUICK" ;;
    riscv64) cross riscv64 riscv64-linux-gnu-gcc gcc-riscv64-linux-gnu qemu-riscv64 "$QUICK" ;;
    mips-poll)
        # the portable poll() backend (every connection a poll() entry), big-endian 32-bit; the
        # unit tests do not touch the loop, so they are not run again
        cross mips-poll mips-linux-gnu-gcc gcc-mips-linux-gnu qemu-mips "$QUICK" -DIII_USE_POLL
        ;;
    tcc)
        # tcc: no __GNUC__, so glibc's packed struct epoll_event is not packed for it and iii.c
        # builds the poll() backend (see its epoll include); the transport suite is the proof
        if ! have tcc; then
            skip "tcc: tcc not installed (Debian: tcc)"
        elif ! probe tcc ""; then
            notok "tcc: tcc cannot build and run a program (log: $L/probe.log)"
            head -n 5 "$L/probe.log" | indent
        else
            flavour tcc tcc "" "tests/test_transport.py:"
        fi
        ;;
    *)
        notok "$F: unknown flavour (known: $ALL)"
        ;;
    esac
done
say "# flavours: $PASS passed, $FAIL failed, $SKIP skipped ($(secs "$T0"))"
[ "$FAIL" -eq 0 ]
