#!/bin/sh
# Interop suite: the official iii-sdk (Node) against the engine at $III_BIN (default ./iii at
# the repository root). III_LONG=1 adds the 70 s idle test.
set -u
orig=$(pwd)
here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 1
if [ ! -d node_modules/iii-sdk ] || [ ! -d node_modules/ws ]; then
  npm ci --no-audit --no-fund 1>&2 || exit 1
fi
if [ -n "${III_BIN:-}" ]; then
  case "$III_BIN" in
    /*) ;;
    *) III_BIN="$orig/$III_BIN" ;;
  esac
  export III_BIN
fi
node --test --test-reporter=tap --test-concurrency=1 "$here"/*.test.mjs
exit $?
