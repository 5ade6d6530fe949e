#!/bin/sh
# tests/e2e_small.sh   The embedded profile (`make small`: -Os -DIII_SMALL, iii.h's smaller read
# buffer and limits): it builds with -Wall -Wextra -Wpedantic and no warning, and the protocol
# suite (tests/test_protocol.py) passes against it.
#
# Output: "ok - small: WHAT", "not ok - small: WHAT: WHY", "skip - small: WHY"; the protocol
# suite's own lines come through prefixed with "small: ". Exit 1 on any not ok. POSIX sh.
# Binary: build/iii-small (the Makefile's ./iii-small is left alone). Environment: CC (default cc).
# shellcheck disable=SC2086 # CC, SMALL and W are word lists, split on purpose
set -u
cd "$(dirname "$0")/.." || exit 2
CC=${CC:-cc}
mkdir -p build
FAIL=0
say() { printf '%s\n' "$*"; }
have() { command -v "$1" >/dev/null 2>&1; }
# bounded runs: timeout(1) when there is one
bounded() {
    secs=$1
    shift
    if have timeout; then timeout "$secs" "$@"; else "$@"; fi
}

SMALL="-std=c99 -Os -DIII_SMALL"
W="-Wall -Wextra -Wpedantic"
if bounded 180 $CC $SMALL $W iii.c -o build/iii-small >build/small-cc.log 2>&1; then
    if [ -s build/small-cc.log ]; then
        say "not ok - small: $CC $SMALL $W: $(grep -c 'warning' build/small-cc.log) warning(s) (build/small-cc.log)"
        head -n 10 build/small-cc.log | sed 's/^/#   /'
        FAIL=1
    else
        say "ok - small: $CC $SMALL $W builds with zero warnings"
    fi
else
    say "not ok - small: $CC $SMALL $W does not build (build/small-cc.log)"
    head -n 10 build/small-cc.log | sed 's/^/#   /'
    exit 1
fi
# the other compiler, when there is one, must agree
for c in gcc clang; do
    have $c || continue
    [ "$(command -v $c)" = "$(command -v "$CC" 2>/dev/null)" ] && continue
    if $c $SMALL $W -Werror -c iii.c -o build/small-$c.o 2>build/small-$c.log; then
        say "ok - small: $c $SMALL $W: zero warnings"
    else
        say "not ok - small: $c $SMALL $W: warnings (build/small-$c.log)"
        head -n 10 build/small-$c.log | sed 's/^/#   /'
        FAIL=1
    fi
done

v=$(bounded 10 build/iii-small --version 2>&1)
case $v in
'') say "not ok - small: --version printed nothing"; FAIL=1 ;;
*) say "ok - small: --version: $v" ;;
esac

if have python3; then
    III_BIN="$(pwd)/build/iii-small" bounded 300 python3 tests/test_protocol.py >build/small-protocol.out 2>build/small-protocol.err
    rc=$?
    sed -e 's/^ok - /ok - small: /' -e 's/^not ok - /not ok - small: /' -e 's/^skip - /skip - small: /' \
        build/small-protocol.out
    if grep -q '^not ok ' build/small-protocol.out; then
        FAIL=1
    elif [ "$rc" -ne 0 ]; then
        say "not ok - small: tests/test_protocol.py exited $rc (build/small-protocol.err)"
        tail -n 10 build/small-protocol.err | sed 's/^/#   /'
        FAIL=1
    elif ! grep -q '^ok ' build/small-protocol.out; then
        say "not ok - small: tests/test_protocol.py reported no test"
        FAIL=1
    fi
else
    say "skip - small: python3 not installed (protocol suite)"
fi
[ "$FAIL" -eq 0 ]
