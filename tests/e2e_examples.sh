#!/bin/sh
# End-to-end: every example under examples/ against a real engine.
#
#   sh tests/e2e_examples.sh        ($III_BIN = the engine, default ./iii)
#
# python: examples/python/worker.py registers py::add; the CLI calls it; the worker's own call and
#         its `call` mode work; after an engine restart on the same port it reconnects by itself.
# node:   examples/node/worker.mjs + caller.mjs (skipped without node or examples/node/node_modules).
# browser: examples/browser/index.html served by python3 -m http.server on 127.0.0.1 and loaded in
#         headless Chromium (skipped without chromium); the page's own call shows up in its title
#         (read over the DevTools protocol), and a CLI call to browser::shout reaches the page.
#
# One line per check: ok / not ok / skip. Every wait is bounded; everything started here is
# stopped by pid (Chromium by its process group) on exit.
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
III_BIN=${III_BIN:-./iii}
case $III_BIN in /*) ;; *) III_BIN="$ROOT/$III_BIN" ;; esac
TMP=$(mktemp -d "${TMPDIR:-/tmp}/iii-examples.XXXXXX")
PIDS=""   # plain pids
PGIDS=""  # process groups (chromium)

ok() { printf 'ok - examples: %s\n' "$1"; }
notok() { printf 'not ok - examples: %s\n' "$1"; }
skip() { printf 'skip - examples: %s\n' "$1"; }
have() { command -v "$1" >/dev/null 2>&1; }

STOP_RC=0
stop_pid() { # stop_pid PID: TERM, up to 3 s, then KILL; STOP_RC = its exit status
    STOP_RC=0
    kill -TERM "$1" 2>/dev/null || return 0
    n=0
    while kill -0 "$1" 2>/dev/null && [ $n -lt 30 ]; do sleep 0.1; n=$((n + 1)); done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    STOP_RC=$?
    return 0
}
stop_group() { # stop_group PGID: TERM the group, up to 3 s, then KILL the group
    kill -TERM "-$1" 2>/dev/null || return 0
    n=0
    while kill -0 "-$1" 2>/dev/null && [ $n -lt 30 ]; do sleep 0.1; n=$((n + 1)); done
    kill -KILL "-$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 0
}
cleanup() {
    for g in $PGIDS; do stop_group "$g"; done
    for p in $PIDS; do stop_pid "$p"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP

# start_engine LOG [ARGS...]: starts the engine, sets ENGINE_PID and PORT (0 on failure).
start_engine() {
    log=$1
    shift
    # in an empty directory, so the default ./config.yaml is absent: built-in defaults
    mkdir -p "$TMP/run"
    (cd "$TMP/run" && exec "$III_BIN" "$@") >"$log.out" 2>"$log.err" &
    ENGINE_PID=$!
    PIDS="$PIDS $ENGINE_PID"
    PORT=0
    n=0
    while [ $n -lt 100 ]; do
        PORT=$(sed -n 's|^iii: listening on ws://127\.0\.0\.1:\([0-9][0-9]*\).*|\1|p' "$log.out")
        [ -n "$PORT" ] && return 0
        kill -0 "$ENGINE_PID" 2>/dev/null || break
        sleep 0.1
        n=$((n + 1))
    done
    PORT=0
    return 1
}

# call_until FUNCTION JSON EXPECTED SECONDS: calls FUNCTION with the CLI until it prints EXPECTED
# (a function that is still being registered answers function_not_found meanwhile). Sets GOT.
call_until() {
    end=$(($(date +%s) + $4))
    while :; do
        GOT=$(timeout 10 "$III_BIN" trigger "$1" "$2" --url "ws://127.0.0.1:$PORT" --timeout 3000 2>&1)
        [ "$GOT" = "$3" ] && return 0
        [ "$(date +%s)" -ge "$end" ] && return 1
        sleep 0.2
    done
}

# wait_grep FILE PATTERN SECONDS
wait_grep() {
    end=$(($(date +%s) + $3))
    until grep -q "$2" "$1" 2>/dev/null; do
        [ "$(date +%s)" -ge "$end" ] && return 1
        sleep 0.1
    done
}

if [ ! -x "$III_BIN" ]; then
    notok "engine binary $III_BIN is missing (build it with cc iii.c -o iii)"
    exit 1
fi
if ! start_engine "$TMP/engine" --port 0; then
    notok "engine did not start (see its stderr below)"
    sed 's/^/#   /' "$TMP/engine.err"
    exit 1
fi
URL="ws://127.0.0.1:$PORT"

# ---- python ---------------------------------------------------------------------------------
if have python3; then
    III_URL=$URL III_WORKER_NAME=py-example python3 examples/python/worker.py >"$TMP/py.out" 2>"$TMP/py.err" &
    PY_PID=$!
    PIDS="$PIDS $PY_PID"
    if call_until py::add '{"a":2,"b":3}' '{"sum":5}' 15; then
        ok "python: iii trigger py::add {a:2,b:3} -> {\"sum\":5}"
    else
        notok "python: py::add via the CLI: got '$GOT'; worker stderr: $(tail -n 3 "$TMP/py.err" | tr '\n' ' ')"
    fi
    GOT=$(timeout 10 "$III_BIN" trigger py::add '{"a":"x","b":1}' --url "$URL" --timeout 3000 2>/dev/null)
    case $GOT in
    *'"code":"invocation_failed"'*'wants numbers'*) ok "python: a bad input comes back as the handler's error" ;;
    *) notok "python: bad input: got '$GOT'" ;;
    esac
    if wait_grep "$TMP/py.err" 'self-test: py::add(2, 40) -> {"sum": 42}' 10; then
        ok "python: the worker's own call through the engine returns {\"sum\": 42}"
    else
        notok "python: the worker's self-test call: $(tail -n 3 "$TMP/py.err" | tr '\n' ' ')"
    fi
    GOT=$(III_URL=$URL timeout 10 python3 examples/python/worker.py call py::add '{"a":1.5,"b":2}' 2>&1)
    if [ "$GOT" = '{"sum": 3.5}' ]; then ok "python: worker.py call py::add -> {\"sum\": 3.5}"; else notok "python: worker.py call: got '$GOT'"; fi
    GOT=$(timeout 10 "$III_BIN" list workers --json --url "$URL" 2>&1)
    case $GOT in
    *'"name":"py-example"'*'"runtime":"python"'* | *'"runtime":"python"'*'"name":"py-example"'*) ok "python: engine::workers::list shows py-example (runtime python)" ;;
    *) notok "python: py-example not in the worker list: $GOT" ;;
    esac
    # restart the engine on the same port: the worker must come back by itself (backoff 1 s)
    stop_pid "$ENGINE_PID"
    if start_engine "$TMP/engine2" --port "$PORT" &&
        call_until py::add '{"a":20,"b":22}' '{"sum":42}' 15; then
        ok "python: after an engine restart the worker reconnects and serves py::add again"
    else
        notok "python: no py::add after an engine restart (port $PORT): got '${GOT:-}'; worker: $(tail -n 2 "$TMP/py.err" | tr '\n' ' ')"
        [ "$PORT" = 0 ] && { notok "engine did not restart"; exit 1; }
    fi
    URL="ws://127.0.0.1:$PORT"
    stop_pid "$PY_PID"
else
    skip "python: python3 not installed"
fi

# ---- node -----------------------------------------------------------------------------------
if ! have node; then
    skip "node: node not installed"
elif [ ! -d examples/node/node_modules/iii-sdk ]; then
    skip "node: examples/node/node_modules missing (run: cd examples/node && npm ci)"
else
    III_URL=$URL node examples/node/worker.mjs >"$TMP/node.out" 2>&1 &
    NODE_PID=$!
    PIDS="$PIDS $NODE_PID"
    if call_until node::greet '{"name":"cli"}' '{"greeting":"Hello, cli!"}' 20; then
        ok "node: iii trigger node::greet -> {\"greeting\":\"Hello, cli!\"}"
    else
        notok "node: node::greet via the CLI: got '$GOT'; worker: $(tail -n 3 "$TMP/node.out" | tr '\n' ' ')"
    fi
    GOT=$(III_URL=$URL timeout 30 node examples/node/caller.mjs Ada 2>&1)
    rc=$?
    if [ $rc -eq 0 ] && printf '%s\n' "$GOT" | grep -qx '{"greeting":"Hello, Ada!"}'; then
        ok "node: caller.mjs prints {\"greeting\":\"Hello, Ada!\"}"
    else
        notok "node: caller.mjs (exit $rc): $(printf '%s' "$GOT" | tr '\n' ' ')"
    fi
    stop_pid "$NODE_PID"
fi

# ---- browser --------------------------------------------------------------------------------
CHROME=""
for c in chromium chromium-browser /usr/bin/chromium; do
    if have "$c"; then CHROME=$c; break; fi
done
if [ -z "$CHROME" ]; then
    skip "browser: chromium not installed"
elif ! have python3; then
    skip "browser: python3 (for the static file server) not installed"
elif ! have setsid; then
    skip "browser: setsid not available (needed to stop Chromium's processes as a group)"
else
    python3 -m http.server 0 --bind 127.0.0.1 --directory examples/browser >"$TMP/http.out" 2>&1 &
    HTTP_PID=$!
    PIDS="$PIDS $HTTP_PID"
    wait_grep "$TMP/http.out" 'port [0-9]' 10
    HPORT=$(sed -n 's/.* port \([0-9][0-9]*\).*/\1/p' "$TMP/http.out" | head -n 1)
    PAGE="http://127.0.0.1:$HPORT/index.html?engine=$URL"
    mkdir -p "$TMP/chrome"
    setsid "$CHROME" --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --disable-breakpad --disable-crash-reporter \
        --user-data-dir="$TMP/chrome" \
        --remote-debugging-address=127.0.0.1 --remote-debugging-port=0 "$PAGE" >"$TMP/chrome.log" 2>&1 &
    CHROME_PID=$!
    PGIDS="$PGIDS $CHROME_PID"
    # Chromium writes its DevTools port to DevToolsActivePort; the helper polls document.title.
    cat >"$TMP/title.py" <<'EOF'
import json, sys, time, urllib.request
sys.path.insert(0, "tests")
from wslib import WS
udd, want, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline, last = time.time() + timeout, "(no answer)"
while time.time() < deadline:
    try:
        port = int(open(udd + "/DevToolsActivePort").read().split()[0])
        pages = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=2))
        page = next(p for p in pages if p.get("type") == "page")
        ws = WS(port, path="/devtools/page/" + page["id"])
        ws.send_json({"id": 1, "method": "Runtime.evaluate", "params": {
            "expression": "document.title + '\\n' + document.getElementById('result').textContent",
            "returnByValue": True}})
        m, _ = ws.recv_json_until(lambda m: m.get("id") == 1, timeout=3)
        ws.close()
        last = m["result"]["result"]["value"]
        if last.split("\n")[0] == want:
            print(last.replace("\n", " | "))
            sys.exit(0)
    except Exception as e:
        last = "%s: %s" % (type(e).__name__, e)
    time.sleep(0.2)
print(last.replace("\n", " | "))
sys.exit(1)
EOF
    if GOT=$(timeout 30 python3 "$TMP/title.py" "$TMP/chrome" "iii: HELLO FROM THE BROWSER" 20); then
        ok "browser: the page's own call to browser::shout shows up on the page ($GOT)"
    else
        notok "browser: page title/result: $GOT; chromium: $(grep -v dbus "$TMP/chrome.log" | tail -n 2 | tr '\n' ' ')"
    fi
    if call_until browser::shout '{"text":"make some noise"}' '{"text":"MAKE SOME NOISE"}' 15; then
        ok "browser: iii trigger browser::shout reaches the open page -> {\"text\":\"MAKE SOME NOISE\"}"
    else
        notok "browser: browser::shout via the CLI: got '$GOT'"
    fi
    # the Origin policy: the same page from an origin that is not allowed must not connect
    GOT=$(timeout 10 python3 -c '
import sys; sys.path.insert(0, "tests")
from wslib import WS
print(WS(int(sys.argv[1]), headers={"Origin": "http://evil.example"}).status)' "$PORT" 2>&1)
    if [ "$GOT" = 403 ]; then ok "browser: an upgrade from a foreign Origin is refused (403)"; else notok "browser: foreign Origin got '$GOT', want 403"; fi
    stop_group "$CHROME_PID"
    stop_pid "$HTTP_PID"
fi

# ---- the engine itself (a sanitizer build reports on exit) --------------------------------------
stop_pid "$ENGINE_PID"
if [ "$STOP_RC" -ne 0 ]; then
    notok "engine: exit status $STOP_RC after SIGTERM (want 0); stderr: $(tail -n 3 "$TMP/engine2.err" "$TMP/engine.err" 2>/dev/null | tr '\n' ' ')"
elif grep -q 'ERROR: AddressSanitizer\|ERROR: LeakSanitizer\|runtime error:' "$TMP"/engine*.err 2>/dev/null; then
    notok "engine: sanitizer report while serving the examples"
    grep -h -A5 'ERROR: \|runtime error:' "$TMP"/engine*.err | head -n 20 | sed 's/^/#   /'
else
    ok "engine: served every example without a sanitizer report, and exited 0 on SIGTERM"
fi
exit 0
