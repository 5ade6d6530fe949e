#!/bin/sh
# ./test.sh [--long]   Build the engine and run every test suite.
#
# Prints one line per test and ends with "N passed, N failed[, N skipped]"; exits non-zero on
# any failure. POSIX sh (dash, busybox). Suites that need a missing tool are skipped, and say so.
# --long adds the slow runs (SDK idle test, valgrind over the protocol suite, more flavours).
set -u
cd "$(dirname "$0")" || exit 2
ROOT=$(pwd)
LONG=0
[ "${1:-}" = "--long" ] && LONG=1
CC=${CC:-cc}
mkdir -p build
PASS=0
FAIL=0
SKIP=0

say() { printf '%s\n' "$*"; }
ok() { say "ok - $1"; PASS=$((PASS + 1)); }
notok() { say "not ok - $1"; FAIL=$((FAIL + 1)); }
skip() { say "skip - $1"; SKIP=$((SKIP + 1)); }
have() { command -v "$1" >/dev/null 2>&1; }

# run_suite NAME CMD...: runs a suite, echoes its lines, adds its ok / not ok / skip counts.
# A suite that exits non-zero without reporting a failure counts as one failure.
run_suite() {
    name=$1
    shift
    out="build/suite-$name.out"
    err="build/suite-$name.err"
    "$@" >"$out" 2>"$err"
    rc=$?
    cat "$out"
    p=$(grep -c '^ok ' "$out")
    f=$(grep -c '^not ok ' "$out")
    s=$(grep -c '^skip \|^ok .*# [Ss][Kk][Ii][Pp]' "$out")
    p=$((p - s))
    PASS=$((PASS + p))
    FAIL=$((FAIL + f))
    SKIP=$((SKIP + s))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        notok "$name: suite exited $rc (stderr: build/suite-$name.err)"
        tail -n 20 "$err" | sed 's/^/#   /'
    fi
}

# ---- builds ---------------------------------------------------------------------------------
if $CC iii.c -o iii 2>build/cc-plain.log; then ok "build: cc iii.c -o iii (no flags)"; else notok "build: cc iii.c -o iii"; cat build/cc-plain.log; fi
for c in gcc clang; do
    if have $c; then
        if $c -std=c99 -Wall -Wextra -Wpedantic -Werror -O2 -c iii.c -o build/w-$c.o 2>build/w-$c.log; then
            ok "build: $c -std=c99 -Wall -Wextra -Wpedantic: zero warnings"
        else
            notok "build: $c warnings"
            head -n 20 build/w-$c.log
        fi
    else
        skip "build: $c not installed"
    fi
done
# an includer's (or -D) feature macros win: iii.c must not redefine them (a warning here)
if $CC -std=c99 -D_POSIX_C_SOURCE=202405L -D_FILE_OFFSET_BITS=64 -Wall -Werror -c iii.c -o build/fm.o 2>build/fm.log; then
    ok "build: -D_POSIX_C_SOURCE=202405L kept (no redefinition)"
else
    notok "build: -D_POSIX_C_SOURCE=202405L: iii.c redefines it (build/fm.log)"
    head -n 5 build/fm.log
fi
if $CC -std=c99 -O2 -funsigned-char -Wall -c iii.c -o build/uc.o 2>build/uc.log; then ok "build: -funsigned-char"; else notok "build: -funsigned-char"; fi

SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
if $CC -std=c99 -g -O1 $SAN iii.c -o build/iii-asan 2>build/asan.log; then
    ok "build: AddressSanitizer + UBSan engine"
    ENGINE="$ROOT/build/iii-asan"
else
    skip "build: sanitizers not supported by $CC; end-to-end suites use the plain build"
    ENGINE="$ROOT/iii"
    SAN=""
fi
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=66"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export III_BIN="$ENGINE"

# ---- unit tests (the engine's statics, via #include) ----------------------------------------
JSON_SUITE=${III_JSON_SUITE:-$ROOT/../shared/data/JSONTestSuite/test_parsing}
if $CC -std=c99 -g -O1 $SAN -Wall -Wno-unused-function tests/unit.c -o build/unit 2>build/unit-cc.log; then
    run_suite unit build/unit "$JSON_SUITE"
else
    notok "unit: build failed"
    head -n 20 build/unit-cc.log
fi
if [ -f tests/unit_yaml.c ]; then
    if $CC -std=c99 -g -O1 $SAN -Wall -Wno-unused-function tests/unit_yaml.c -o build/unit_yaml 2>build/unit-yaml-cc.log; then
        run_suite unit_yaml build/unit_yaml
    else
        notok "unit_yaml: build failed"
        head -n 20 build/unit-yaml-cc.log
    fi
fi
if have valgrind && $CC -std=c99 -g -O0 -Wall -Wno-unused-function tests/unit.c -o build/unit-vg 2>/dev/null; then
    if valgrind -q --error-exitcode=9 --leak-check=full --errors-for-leak-kinds=definite build/unit-vg "$JSON_SUITE" >build/unit-vg.out 2>&1; then
        ok "unit: valgrind memcheck clean"
    else
        notok "unit: valgrind memcheck"
        tail -n 30 build/unit-vg.out
    fi
else
    skip "unit: valgrind not installed"
fi

# ---- end-to-end: the real binary over real sockets ------------------------------------------
if have python3; then
    for t in tests/test_*.py tests/e2e_*.py; do
        [ -f "$t" ] || continue
        n=$(basename "$t" .py)
        run_suite "$n" python3 "$t"
    done
else
    skip "python suites: python3 not installed"
fi
# the portable poll() backend (the default on Linux is epoll): same transport suite
if $CC -std=c99 -g -O1 $SAN -DIII_USE_POLL iii.c -o build/iii-poll 2>build/poll.log; then
    III_BIN="$ROOT/build/iii-poll" run_suite poll_backend python3 tests/test_transport.py
else
    notok "build: -DIII_USE_POLL"
fi
for t in tests/e2e_*.sh; do
    [ -f "$t" ] || continue
    run_suite "$(basename "$t" .sh)" sh "$t"
done
if [ -f tests/interop/run.sh ]; then
    if have node && have npm; then
        III_LONG=$LONG run_suite interop sh tests/interop/run.sh
    else
        skip "interop: node/npm not installed"
    fi
fi
if [ -f tests/flavours.sh ]; then
    if [ "$LONG" = 1 ]; then run_suite flavours sh tests/flavours.sh --long; else run_suite flavours sh tests/flavours.sh; fi
fi
if have clang && clang -g -O1 -fsanitize=fuzzer,address,undefined -Wno-unused-function tests/fuzz_engine.c -o build/fuzz_engine 2>build/fuzz-cc.log; then
    secs=10
    [ "$LONG" = 1 ] && secs=120
    mkdir -p build/fuzz-corpus
    if build/fuzz_engine -max_total_time=$secs build/fuzz-corpus >build/fuzz.log 2>&1; then
        ok "fuzz: engine parsers and worker protocol, $(grep -o 'Done [0-9]* runs' build/fuzz.log | cut -d' ' -f2) libFuzzer runs, no crash or leak"
    else
        notok "fuzz: engine parsers (build/fuzz.log; reproducer in the working directory)"
        grep -m5 'ERROR\|SUMMARY\|abort' build/fuzz.log
    fi
else
    skip "fuzz: clang with libFuzzer not available"
fi
# the stateful protocol fuzzer (registry invariants and routing oracles after every step) and
# the allocation-failure sweep over a scripted worker session
if [ -f tests/run_fuzz_state.sh ]; then
    if [ "$LONG" = 1 ]; then run_suite fuzz_state sh tests/run_fuzz_state.sh --long; else run_suite fuzz_state sh tests/run_fuzz_state.sh; fi
fi
if [ -f bench/run.sh ]; then
    run_suite bench_smoke sh bench/run.sh --smoke
fi
if [ -f bench/replicas.sh ] && have python3; then
    III_BIN="$ROOT/iii" run_suite replicas_bench sh bench/replicas.sh --smoke
fi
if [ -f bench/cluster.sh ]; then run_suite cluster_bench sh bench/cluster.sh --smoke; fi # skips without nats-server

say "$PASS passed, $FAIL failed, $SKIP skipped"
[ "$FAIL" -eq 0 ]
