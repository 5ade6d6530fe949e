#!/bin/sh
# tests/run_fuzz_state.sh [--long]   Stateful protocol fuzzer + allocation-failure sweep.
#
# Prints ok / not ok / skip lines (for test.sh's run_suite). Run from anywhere; builds into
# build/. Short: each reproducer in tests/fuzz_state_repro replayed, ~15 s of libFuzzer over
# tests/fuzz_state_corpus (or the standalone mutation loop without libFuzzer), the sweep.
# --long: 10 minutes of fuzzing on 4 processes. FZ_IGNORE=check,... is passed through (see
# tests/fuzz_state.c).
set -u
cd "$(dirname "$0")/.." || exit 2
LONG=0
[ "${1:-}" = "--long" ] && LONG=1
CC=${CC:-cc}
mkdir -p build build/fuzz_state_corpus
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
have() { command -v "$1" >/dev/null 2>&1; }
SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined"

# ---- the standalone replayer: reproducers of bugs found so far ------------------------------
if $CC -std=c99 -g -O1 $SAN -Wno-unused-function -DFUZZ_STANDALONE tests/fuzz_state.c \
    -o build/fuzz_state_sa 2>build/fuzz_state_sa-cc.log; then
    REPRO_OK=1
    for f in tests/fuzz_state_repro/*; do
        [ -f "$f" ] || continue
        n=$(basename "$f")
        if build/fuzz_state_sa "$f" >build/fuzz_state-repro-$n.log 2>&1; then
            echo "ok - fuzz_state: reproducer $n passes"
        else
            REPRO_OK=0
            echo "not ok - fuzz_state: reproducer $n (build/fuzz_state-repro-$n.log)"
            grep -a -m1 -E 'fz: invariant|ERROR: AddressSanitizer|runtime error' \
                build/fuzz_state-repro-$n.log | cut -c1-300 | sed 's/^/#   /'
        fi
    done
else
    REPRO_OK=0
    echo "not ok - fuzz_state: standalone build failed (build/fuzz_state_sa-cc.log)"
fi

# ---- the fuzzer ------------------------------------------------------------------------------
secs=15
jobs=""
[ $LONG = 1 ] && secs=600 && jobs="-fork=4 -ignore_crashes=0"
# the reproducers join the corpus once they pass (a crashing seed would stop libFuzzer at once)
extra=""
[ $REPRO_OK = 1 ] && extra="tests/fuzz_state_repro"
if have clang && clang -g -O1 -fsanitize=fuzzer,address,undefined -Wno-unused-function \
    tests/fuzz_state.c -o build/fuzz_state 2>build/fuzz_state-cc.log; then
    # shellcheck disable=SC2086
    if build/fuzz_state -max_total_time=$secs -max_len=4096 $jobs \
        -artifact_prefix=build/fuzz_state- build/fuzz_state_corpus tests/fuzz_state_corpus $extra \
        >build/fuzz_state.log 2>&1; then
        runs=$(grep -a -o 'Done [0-9]* runs' build/fuzz_state.log | cut -d' ' -f2)
        echo "ok - fuzz_state: ${runs:-?} stateful sessions in ${secs}s, invariants and routing held"
    else
        echo "not ok - fuzz_state: (build/fuzz_state.log; reproducer build/fuzz_state-crash-*)"
        grep -a -m3 -E 'fz: invariant|ERROR: AddressSanitizer|runtime error|SUMMARY' \
            build/fuzz_state.log | cut -c1-300 | sed 's/^/#   /'
    fi
elif [ -x build/fuzz_state_sa ]; then
    if III_FUZZ_SECS=$secs build/fuzz_state_sa >build/fuzz_state.log 2>&1; then
        tail -n 1 build/fuzz_state.log
    else
        echo "not ok - fuzz_state: standalone loop (build/fuzz_state.log)"
        grep -a -m3 -E 'fz: invariant|ERROR: AddressSanitizer|runtime error' \
            build/fuzz_state.log | cut -c1-300 | sed 's/^/#   /'
    fi
else
    echo "skip - fuzz_state: no compiler for the fuzzer"
fi

# ---- allocation-failure sweep ----------------------------------------------------------------
if $CC -std=c99 -g -O1 $SAN -Wno-unused-function tests/sweep.c -o build/sweep \
    2>build/sweep-cc.log; then
    build/sweep 2>build/sweep.err
else
    echo "not ok - sweep: build failed (build/sweep-cc.log)"
fi
exit 0
