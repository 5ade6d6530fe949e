#!/usr/bin/env python3
"""Real clients work unchanged: what a worker, an operator or a log collector sees.

Binding spec: ../shared/spec/PROTOCOL.md §5.7 (workers::list `search`), §5.10 (refusals) and
../shared/spec/DECISIONS.md items 3 (III_URL), 11 (close code 1012 on shutdown) and 12 (captured
worker output keeps whole lines, backpressure instead of loss). The Node SDK's Hello World
(item 10) is in tests/interop/hello.test.mjs; the embedded build in tests/e2e_small.sh.

Every engine runs on loopback with --port 0 (the restart test reuses the port it got); every wait
is bounded; every process is stopped by pid or process group. Declared workers are small Python
scripts written into the test's temporary directory; they use tests/wslib.py.

Run: python3 tests/test_clients.py     (III_BIN=path/to/iii, III_TEST_ONLY=substring)
Output: `ok - NAME`, `not ok - NAME: why`, `skip - NAME: why`; exit status 1 on any failure.
"""
import functools
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wslib  # noqa: E402
from wslib import WS, Closed, Engine, Suite, call, worker_hello  # noqa: E402

BIN = os.path.abspath(wslib.BIN)
PY = sys.executable
NLINES = 50000  # lines per stream the chatty workers write

suite = Suite()
_cleanups = []  # callables run when a test ends (engines, sockets, process groups, temp dirs)


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def test(fn):
    @functools.wraps(fn)
    def run():
        try:
            return fn()
        finally:
            while _cleanups:
                try:
                    _cleanups.pop()()
                except Exception:  # noqa: BLE001
                    pass
    return suite.test(run)


def wait_until(pred, timeout, step=0.02):
    """Polls pred until it returns something truthy (returned) or timeout passes (None)."""
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() >= deadline:
            return None
        time.sleep(step)


def tmpdir():
    d = os.path.realpath(tempfile.mkdtemp(prefix="iii-clients-"))
    _cleanups.append(lambda: shutil.rmtree(d, ignore_errors=True))
    return d


def engine(config=None, args=(), env=None):
    """wslib.Engine (stdout read by a thread into .lines, stderr to a file), stopped at the end."""
    e = Engine(config=config, args=args, env=env)
    _cleanups.append(lambda: _stop_engine(e))
    return e


def _stop_engine(e):
    e.stop()
    e.log.close()


def ws(port, host="127.0.0.1", **kw):
    s = WS(port, host=host, **kw)
    _cleanups.append(s.close)
    return s


def killpg_later(pid):
    def k():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _cleanups.append(k)


def write_script(d, name, text):
    p = os.path.join(d, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def sanitizer_clean(e):
    rep = e.sanitizer_report()
    check(rep is None, "engine sanitizer report: %s" % rep)


# A declared worker's common start: wslib on the path, the engine URL parsed, a bounded idle loop
# that ends when the engine (our parent) is gone.
WORKER_HEAD = r'''
import json, os, sys, time, uuid
sys.path.insert(0, os.environ["WSLIB_DIR"])
from wslib import WS, Closed, call, worker_hello

def hostport(url):
    hp = url.split("://", 1)[1].split("/", 1)[0]
    h, p = hp.rsplit(":", 1)
    return h.strip("[]"), int(p)

def idle(limit=60):
    ppid = os.getppid()
    end = time.time() + limit
    while time.time() < end and os.getppid() == ppid:
        time.sleep(0.1)
'''


class Server(threading.Thread):
    """A raw worker connection serving functions from a thread: `id` answers {"echo": data}."""

    def __init__(self, port, name, fids, host="127.0.0.1"):
        super().__init__(daemon=True)
        self.ws = ws(port, host=host)
        self.wid = worker_hello(self.ws, name=name)
        for f in fids:
            self.ws.send_json({"type": "registerfunction", "id": f})
        self.stop = False
        self.error = None
        _cleanups.append(self._end)
        self.start()

    def _end(self):
        self.stop = True
        self.join(3)

    def run(self):
        try:
            while not self.stop:
                try:
                    fin, op, p = self.ws.recv_frame(0.2)
                except TimeoutError:
                    continue
                if op == 9:
                    self.ws.send_frame(10, p)
                if op != 1:
                    continue
                m = json.loads(p.decode())
                if m.get("type") == "invokefunction" and m.get("invocation_id"):
                    data = m.get("data")
                    if isinstance(data, dict):
                        data.pop("_caller_worker_id", None)
                    self.ws.send_json({"type": "invocationresult",
                                       "invocation_id": m["invocation_id"],
                                       "function_id": m["function_id"],
                                       "result": {"echo": data}})
        except Exception as ex:  # noqa: BLE001
            if not self.stop:
                self.error = ex


def wait_fn(obs, fid, timeout=5.0):
    """Waits until fid answers through the observer connection; returns the result frame."""
    last = [None]

    def ok():
        r = call(obs, fid, {"probe": 1}, timeout=2)
        last[0] = r
        return r if "error" not in r else None
    r = wait_until(ok, timeout, 0.1)
    check(r is not None, "%s never answered; last result %r" % (fid, last[0]))
    return r


# ---------------------------------------------------------------------------------------------
# 2. engine::workers::list search: case-insensitive substring of the name; empty = no filter

@test
def workers_list_search_is_case_insensitive_and_empty_is_no_filter():
    e = engine()
    a = ws(e.port)
    aid = worker_hello(a, name="MixedCase-Worker")
    b = ws(e.port)
    bid = worker_hello(b, name="plain-helper")
    # a worker that reports a pid but no name (listed: only pid-less connections are hidden)
    c = ws(e.port)
    m = c.recv_json()
    cid = m["worker_id"]
    c.send_json({"type": "invokefunction", "function_id": "engine::workers::register",
                 "data": {"runtime": "python", "pid": os.getpid()}, "action": {"type": "void"}})
    obs = ws(e.port)
    worker_hello(obs, name="observer")

    def listing(data):
        r = call(obs, "engine::workers::list", data)
        check("error" not in r, "workers::list %r failed: %r" % (data, r))
        return r["result"]["workers"]

    def ids(rows):
        return {w["id"] for w in rows}

    check(wait_until(lambda: {aid, bid, cid} <= ids(listing({})), 3),
          "the three workers never appeared in workers::list: %r" % listing({}))
    for s in ("mixedcase", "WORKER", "case-w", "MIXEDCASE-WORKER"):
        rows = listing({"search": s})
        check(aid in ids(rows), "search %r does not find MixedCase-Worker: %r" % (s, rows))
        check(bid not in ids(rows) and cid not in ids(rows),
              "search %r lists a worker whose name does not contain it: %r" % (s, rows))
        for w in rows:
            check(s.lower() in (w.get("name") or "").lower(),
                  "search %r lists %r" % (s, w.get("name")))
    rows = listing({"search": "HELPER"})
    check(ids(rows) & {aid, bid, cid} == {bid}, "search HELPER: %r" % rows)
    check(listing({"search": "no-such-name-at-all"}) == [], "search with no match is not empty")
    everyone = listing({})
    empty = listing({"search": ""})
    check({aid, bid, cid} <= ids(empty),
          "empty search filters: %r" % empty)
    check(ids(empty) == ids(everyone),
          "empty search differs from no search: %r vs %r" % (ids(empty), ids(everyone)))
    nameless = [w for w in empty if w["id"] == cid]
    check(len(nameless) == 1 and nameless[0].get("name") is None,
          "the nameless worker is not listed with name null: %r" % nameless)
    sanitizer_clean(e)


# ---------------------------------------------------------------------------------------------
# 3. captured output keeps whole lines; backpressure instead of loss

CHATTY = WORKER_HEAD + r'''
N = int(os.environ["CHATTY_LINES"])
go, done = os.environ["CHATTY_GO"], os.environ.get("CHATTY_DONE")
end = time.time() + 30
while not os.path.exists(go) and time.time() < end:
    time.sleep(0.01)
PAD = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3

def line(s, i):
    return "%s %06d %s |%s-end-%06d\n" % (s, i, PAD[:(i * 37) % 150], s, i)

def write_all(fd, data):
    while data:
        n = os.write(fd, data)
        data = data[n:]

# big writes that end mid-line: the engine has to join the pieces
CH = 377
for start in range(0, N, CH):
    stop = min(N, start + CH)
    write_all(1, "".join(line("out", i) for i in range(start, stop)).encode())
    write_all(2, "".join(line("err", i) for i in range(start, stop)).encode())
write_all(1, b"out-done\n")
write_all(2, b"err-done\n")
if done:
    open(done, "w").close()
'''

PAD = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3
LINE_RE = re.compile(r"\A(out|err) (\d{6}) ")


def chatty_line(s, i):
    return "%s %06d %s |%s-end-%06d" % (s, i, PAD[:(i * 37) % 150], s, i)


def audit(lines, name, streams, n):
    """Checks that every line of worker `name` for `streams` appears exactly once, whole, after
    the `[name] ` prefix, and that no other line carries a piece of one. Returns problems."""
    pre = "[%s] " % name
    seen = {s: bytearray(n) for s in streams}
    bad = []
    done = set()
    for ln in lines:
        if not ln.startswith(pre):
            if ("-end-" in ln or pre.strip() in ln) and len(bad) < 5:
                bad.append("stray piece of a worker line: %r" % ln[:200])
            continue
        body = ln[len(pre):]
        if body in ("out-done", "err-done"):
            done.add(body[:3])
            continue
        m = LINE_RE.match(body)
        if not m or m.group(1) not in streams or int(m.group(2)) >= n or \
                body != chatty_line(m.group(1), int(m.group(2))):
            if len(bad) < 5:
                bad.append("cut or joined line: %r" % body[:200])
            continue
        seen[m.group(1)][int(m.group(2))] += 1
    for s in streams:
        miss = [i for i in range(n) if seen[s][i] == 0]
        dup = [i for i in range(n) if seen[s][i] > 1]
        if miss:
            bad.append("%s: %d of %d lines missing (first %s)" % (s, len(miss), n, miss[:5]))
        if dup:
            bad.append("%s: %d lines more than once (first %s)" % (s, len(dup), dup[:5]))
        if s not in done:
            bad.append("%s: final line %s-done missing" % (s, s))
    return bad


def chatty_config(d, name, go, done=None):
    script = write_script(d, "chatty.py", CHATTY)
    env = {"WSLIB_DIR": HERE, "CHATTY_LINES": str(NLINES), "CHATTY_GO": go}
    if done:
        env["CHATTY_DONE"] = done
    return ("workers:\n  - name: %s\n    command: %s\n    restart: never\n    env: %s\n"
            % (name, json.dumps([PY, script]), json.dumps(env)))


def start_raw_engine(cfg_text, d, stdout, stderr):
    """The engine with stdout/stderr as given (files or pipes); returns (proc, port).
    The listening line is looked for in the file at `stdout` when it is a path."""
    cfg = os.path.join(d, "config.yaml")
    with open(cfg, "w") as f:
        f.write(cfg_text)
    return subprocess.Popen([BIN, "-c", cfg, "--port", "0"], stdout=stdout, stderr=stderr,
                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=d)


def stop_proc(p, timeout=5):
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
    return p.returncode


def timed_calls(obs, fid, until, limit_s, cap_s):
    """Calls fid until until() is true (at most cap_s); every call must answer within limit_s.
    Returns (number of calls, slowest)."""
    n, slowest = 0, 0.0
    end = time.time() + cap_s
    while not until() and time.time() < end:
        t0 = time.time()
        try:
            r = call(obs, fid, {"n": n}, timeout=limit_s)
        except TimeoutError:
            raise Fail("call %d to %s took over %.1fs while the worker floods its output"
                       % (n, fid, limit_s))
        dt = time.time() - t0
        check(r.get("result") == {"echo": {"n": n}}, "call %d answered %r" % (n, r))
        slowest = max(slowest, dt)
        n += 1
    return n, slowest


@test
def output_of_a_flooding_worker_keeps_whole_lines_in_one_file():
    d = tmpdir()
    go = os.path.join(d, "go")
    log = os.path.join(d, "engine.log")
    f = open(log, "wb")
    _cleanups.append(f.close)
    # `engine > log 2>&1`: stdout and stderr are one open file description
    p = start_raw_engine(chatty_config(d, "chatty", go), d, f, f)
    _cleanups.append(lambda: stop_proc(p))
    killpg_later(p.pid)

    def text():
        with open(log, "rb") as g:
            return g.read().decode("utf-8", "replace")
    m = wait_until(lambda: re.search(r"listening on ws://127\.0\.0\.1:(\d+)", text()), 10)
    check(m, "no listening line in the log: %r" % text()[-500:])
    port = int(m.group(1))
    Server(port, "svc", ["svc::echo"])
    obs = ws(port)
    worker_hello(obs, name="caller")
    wait_fn(obs, "svc::echo")
    open(go, "w").close()
    t0 = time.time()
    both_done = lambda: "[chatty] out-done\n" in text() and "[chatty] err-done\n" in text()  # noqa
    n, slowest = timed_calls(obs, "svc::echo", both_done, 2.0, 60)
    took = time.time() - t0
    check(wait_until(both_done, 5), "the worker's output did not finish within 65 s")
    check(n >= 1, "no call completed while the worker wrote")
    check(p.poll() is None, "the engine exited (%r)" % p.returncode)
    check(stop_proc(p) == 0, "engine exit status %r" % p.returncode)
    lines = text().split("\n")
    check(lines[-1] == "", "the file does not end with a newline: %r" % lines[-1][-100:])
    bad = audit(lines[:-1], "chatty", ("out", "err"), NLINES)
    for ln in lines[:-1]:
        # the engine's lines: "iii: listening ..." and timestamped "TS iii: LEVEL: ..."
        if not (ln.startswith("[chatty] ") or ln.startswith("iii") or
                re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z iii: ", ln)):
            bad.append("a line that is neither the engine's nor the worker's: %r" % ln[:200])
            break
    check(not bad, "; ".join(bad[:6]))
    check("AddressSanitizer" not in text() and "runtime error:" not in text(),
          "sanitizer report in the log")
    print("# %d lines per stream in %.1fs; %d calls meanwhile, slowest %.3fs"
          % (NLINES, took, n, slowest), flush=True)


@test
def a_slow_reader_of_the_engine_stdout_delays_worker_lines_but_loses_none():
    d = tmpdir()
    go = os.path.join(d, "go")
    done = os.path.join(d, "done")
    errlog = os.path.join(d, "stderr.log")
    ef = open(errlog, "wb")
    _cleanups.append(ef.close)
    p = start_raw_engine(chatty_config(d, "chatty", go, done), d, subprocess.PIPE, ef)
    _cleanups.append(lambda: stop_proc(p))
    killpg_later(p.pid)
    fd = p.stdout.fileno()
    _cleanups.append(p.stdout.close)
    os.set_blocking(fd, False)
    got = bytearray()

    def read_some(maxbytes=1 << 20):
        try:
            c = os.read(fd, maxbytes)
        except BlockingIOError:
            return None
        if c:
            got.extend(c)
        return c

    deadline = time.time() + 10
    while b"\n" not in got and time.time() < deadline:
        if read_some(4096) is None:
            time.sleep(0.01)
    m = re.match(rb"iii: listening on ws://127\.0\.0\.1:(\d+)\n", bytes(got))
    check(m, "no listening line on stdout: %r" % bytes(got[:200]))
    port = int(m.group(1))
    Server(port, "svc", ["svc::echo"])
    obs = ws(port)
    worker_hello(obs, name="caller")
    wait_fn(obs, "svc::echo")
    # stdout is now not read for 2 s: the engine stops reading the worker's pipes, so the worker
    # blocks on its write (it cannot finish), while the engine keeps serving calls
    open(go, "w").close()
    stall_end = time.time() + 2.0
    n, slowest = timed_calls(obs, "svc::echo", lambda: time.time() >= stall_end, 2.0, 3)
    check(n >= 3, "only %d calls completed in 2 s while stdout was not read" % n)
    check(not os.path.exists(done),
          "the worker finished writing %d lines although nobody read the engine's stdout: "
          "its output was not held back (dropped, or buffered without bound)" % (2 * NLINES))
    check(p.poll() is None, "the engine exited while its stdout was full (%r)" % p.returncode)
    # a slow reader for a second: 16 KiB every 20 ms
    slow_end = time.time() + 1.0
    while time.time() < slow_end:
        read_some(16384)
        time.sleep(0.02)
    check(not os.path.exists(done), "the worker finished during the slow read")
    # then read at full speed until the worker's last line has come through
    deadline = time.time() + 60
    while b"[chatty] out-done\n" not in got[-200:] and time.time() < deadline:
        if not read_some():
            time.sleep(0.005)
    check(b"[chatty] out-done\n" in got[-200:], "the worker's stdout did not finish in 60 s")
    check(wait_until(lambda: os.path.exists(done), 10), "the worker never finished")
    r = call(obs, "svc::echo", {"after": 1}, timeout=2)
    check(r.get("result") == {"echo": {"after": 1}}, "call after the flood: %r" % r)
    check(stop_proc(p) == 0, "engine exit status %r" % p.returncode)
    while read_some():
        pass
    out_lines = bytes(got).decode("utf-8", "replace").split("\n")
    check(out_lines[-1] == "", "stdout does not end with a newline")
    bad = audit(out_lines[:-1], "chatty", ("out",), NLINES)
    with open(errlog, "rb") as g:
        err_text = g.read().decode("utf-8", "replace")
    bad += audit(err_text.split("\n")[:-1], "chatty", ("err",), NLINES)
    check(not bad, "; ".join(bad[:6]))
    check("AddressSanitizer" not in err_text and "runtime error:" not in err_text,
          "sanitizer report in stderr")


# ---------------------------------------------------------------------------------------------
# 4. III_URL for declared workers comes from the address actually bound

URLW = WORKER_HEAD + r'''
url = os.environ["III_URL"]
print("III_URL=" + url, flush=True)
h, p = hostport(url)
w = WS(p, host=h)
wid = worker_hello(w, name=os.environ["III_WORKER_NAME"])
r = call(w, "engine::workers::list", {"search": os.environ["III_WORKER_NAME"]})
assert any(x["id"] == wid for x in r["result"]["workers"]), r
print("CONNECTED " + wid, flush=True)
idle()
'''


def have_v6_loopback():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.bind(("::1", 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


def have_addr(a):
    try:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((a, 0))
        finally:
            s.close()
        return True
    except OSError:
        return False


def url_case(host, want_host, connect_host):
    d = tmpdir()
    script = write_script(d, "urlw.py", URLW)
    # a wildcard bind is beyond loopback: protected by default, so the test opts out
    cfg = ("workers:\n  - name: iii-worker-manager\n    config:\n      host: \"%s\"\n"
           "      allow_unauthenticated: true\n"
           "  - name: urlw\n    command: %s\n    restart: never\n    env: { WSLIB_DIR: %s }\n"
           % (host, json.dumps([PY, script]), json.dumps(HERE)))
    e = engine(cfg)
    want = "ws://%s:%d" % (want_host, e.port)
    line = wait_until(lambda: [l for l in e.lines if l.startswith("[urlw] CONNECTED ")], 10)
    urls = [l for l in e.lines if l.startswith("[urlw] III_URL=")]
    check(urls, "the worker printed no III_URL; stdout %r stderr %r"
          % (e.lines[-5:], e.stderr()[-800:]))
    check(urls[0] == "[urlw] III_URL=" + want, "III_URL: expected %r, got %r"
          % (want, urls[0][len("[urlw] III_URL="):]))
    check(line, "the worker did not connect to %s; stdout %r stderr %r"
          % (want, e.lines[-5:], e.stderr()[-800:]))
    wid = line[0].split()[-1]
    obs = ws(e.port, host=connect_host)
    worker_hello(obs, name="observer")
    r = call(obs, "engine::workers::info", {"name": "urlw"})
    check(r.get("result", {}).get("worker", {}).get("id") == wid, "workers::info urlw: %r" % r)
    sanitizer_clean(e)


@test
def iii_url_from_bound_address_ipv6_loopback():
    if not have_v6_loopback():
        return "skip IPv6 loopback (::1) unavailable"
    url_case("::1", "[::1]", "::1")


@test
def iii_url_from_bound_address_ipv6_any_is_ipv6_loopback():
    if not have_v6_loopback():
        return "skip IPv6 loopback (::1) unavailable"
    url_case("::", "[::1]", "::1")


@test
def iii_url_from_bound_address_127_0_0_2():
    if not have_addr("127.0.0.2"):
        return "skip 127.0.0.2 cannot be bound here"
    url_case("127.0.0.2", "127.0.0.2", "127.0.0.2")


@test
def iii_url_from_bound_address_any_is_loopback():
    url_case("0.0.0.0", "127.0.0.1", "127.0.0.1")


# ---------------------------------------------------------------------------------------------
# 5. refusals are logged (rate-limited per connection) and shown by workers::info

def refusal_lines(e, wid):
    return [l for l in e.stderr().splitlines()
            if "warn" in l and wid in l and "FUNCTION_NAMESPACE_CONFLICT" in l]


def expect_rejected(w, fid, owner, timeout=3):
    m, _ = w.recv_json_until(lambda x: x.get("type") == "registrationrejected", timeout)
    check(m.get("code") == "FUNCTION_NAMESPACE_CONFLICT" and m.get("function_id") == fid
          and m.get("owner_worker_id") == owner, "registrationrejected: %r" % m)
    return m


@test
def a_refused_registration_is_logged_once_and_shown_by_workers_info():
    e = engine()
    holder = ws(e.port)
    hid = worker_hello(holder, name="holder")
    holder.send_json({"type": "registerfunction", "id": "dup::fn"})
    obs = ws(e.port)
    worker_hello(obs, name="observer")
    check(wait_until(lambda: "dup::fn" in [f["function_id"] for f in call(
        obs, "engine::functions::list", {})["result"]["functions"]], 3), "dup::fn never listed")
    b = ws(e.port)
    bid = worker_hello(b, name="refused-w")
    b.send_json({"type": "registerfunction", "id": "dup::fn"})
    expect_rejected(b, "dup::fn", hid)
    lines = wait_until(lambda: refusal_lines(e, bid), 3)
    check(lines, "no warn line names the refused worker %s; stderr %r" % (bid, e.stderr()[-800:]))
    time.sleep(0.2)
    lines = refusal_lines(e, bid)
    check(len(lines) == 1, "expected one warn line for one refusal, got %r" % lines)
    check(hid in lines[0], "the warn line does not name the holding worker %s: %r" % (hid, lines[0]))
    check("dup::fn" in lines[0], "the warn line does not name the function: %r" % lines[0])
    r = call(obs, "engine::workers::info", {"name": "refused-w"})
    check("error" not in r, "workers::info refused-w: %r" % r)
    lr = r["result"]["worker"].get("last_refusal")
    check(isinstance(lr, dict) and lr.get("code") == "FUNCTION_NAMESPACE_CONFLICT"
          and lr.get("function_id") == "dup::fn", "last_refusal: %r" % lr)
    check(lr.get("owner_worker_id") == hid, "last_refusal.owner_worker_id: %r" % lr)
    r = call(obs, "engine::workers::info", {"name": "holder"})
    check("last_refusal" not in r["result"]["worker"], "the holder has a last_refusal: %r" % r)
    # the refused worker keeps its connection; a JSON ping still gets a pong
    b.send_json({"type": "ping"})
    b.recv_json_until(lambda x: x.get("type") == "pong", 2)
    sanitizer_clean(e)


@test
def refusals_of_a_reconnecting_client_are_each_logged():
    e = engine()
    holder = ws(e.port)
    hid = worker_hello(holder, name="holder")
    holder.send_json({"type": "registerfunction", "id": "dup::fn"})
    time.sleep(0.1)
    wids = []
    for i in range(100):
        w = WS(e.port)
        w.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle delay per retry
        try:
            wid = worker_hello(w, name="retrier")
            w.send_json({"type": "registerfunction", "id": "dup::fn"})
            expect_rejected(w, "dup::fn", hid)
            wids.append(wid)
        finally:
            w.close()

    def all_seen():
        text = e.stderr()
        return all(w in text for w in wids)
    wait_until(all_seen, 5)
    per = {w: len(refusal_lines(e, w)) for w in wids}
    missing = [w for w, n in per.items() if n == 0]
    check(not missing, "%d of 100 refusals are not in the log (first %s)" % (len(missing), missing[:3]))
    extra = {w: n for w, n in per.items() if n > 1}
    check(not extra, "more than one line per refusal: %r" % list(extra.items())[:3])
    check(all(hid in l for w in wids for l in refusal_lines(e, w)),
          "a refusal line does not name the holder")
    sanitizer_clean(e)


@test
def one_connection_refused_1000_times_logs_a_burst_then_a_suppressed_count():
    e = engine()
    holder = ws(e.port)
    hid = worker_hello(holder, name="holder")
    holder.send_json({"type": "registerfunction", "id": "dup::fn"})
    time.sleep(0.1)
    b = ws(e.port)
    bid = worker_hello(b, name="spammer")
    batch = b"".join(WS.frame(1, json.dumps({"type": "registerfunction", "id": "dup::fn"}))
                     for _ in range(1000))
    b.send_raw(batch)
    n = 0
    deadline = time.time() + 15
    while n < 1000 and time.time() < deadline:
        m = b.recv_json(max(0.01, deadline - time.time()))
        if m.get("type") == "registrationrejected":
            n += 1
    check(n == 1000, "only %d of 1000 registrationrejected frames arrived" % n)
    time.sleep(0.3)
    logged = refusal_lines(e, bid)
    check(1 <= len(logged) <= 15, "%d warn lines for 1000 refusals of one connection" % len(logged))
    check(all(hid in l for l in logged), "a refusal line does not name the holder: %r" % logged[:2])
    b.close()
    pat = re.compile(r"connection %s: (\d+) more log lines about it were suppressed" % re.escape(bid))
    sup = wait_until(lambda: pat.findall(e.stderr()), 5)
    check(sup, "no 'suppressed' line for %s after it closed; stderr tail %r"
          % (bid, e.stderr()[-600:]))
    total = len(logged) + sum(int(x) for x in sup)
    check(total >= 1000, "%d logged + %s suppressed < 1000 refusals" % (len(logged), sup))
    sanitizer_clean(e)


DECLARED_DUP = WORKER_HEAD + r'''
go = os.environ["DUP_GO"]
end = time.time() + 20
while not os.path.exists(go) and time.time() < end:
    time.sleep(0.02)
h, p = hostport(os.environ["III_URL"])
name = os.environ["III_WORKER_NAME"]
w = WS(p, host=h)
worker_hello(w, name=name)
w.send_json({"type": "registerfunction", "id": "dup::fn"})
m, _ = w.recv_json_until(lambda x: x.get("type") == "registrationrejected", 5)
print("REFUSED " + m["code"], flush=True)
w.close()
# a new connection of the same process: the refusal is remembered for the process
w = WS(p, host=h)
wid = worker_hello(w, name=name)
w.send_json({"type": "registerfunction", "id": "declared::ok"})
time.sleep(0.2)
print("RECONNECTED " + wid, flush=True)
idle()
'''


@test
def a_declared_worker_that_is_refused_shows_last_refusal_after_reconnecting():
    d = tmpdir()
    go = os.path.join(d, "go")
    script = write_script(d, "dup.py", DECLARED_DUP)
    cfg = ("workers:\n  - name: declared-dup\n    command: %s\n    restart: never\n"
           "    env: %s\n" % (json.dumps([PY, script]), json.dumps({"WSLIB_DIR": HERE, "DUP_GO": go})))
    e = engine(cfg)
    holder = ws(e.port)
    hid = worker_hello(holder, name="holder")
    holder.send_json({"type": "registerfunction", "id": "dup::fn"})
    obs = ws(e.port)
    worker_hello(obs, name="observer")
    check(wait_until(lambda: "dup::fn" in [f["function_id"] for f in call(
        obs, "engine::functions::list", {})["result"]["functions"]], 3), "dup::fn never listed")
    open(go, "w").close()
    line = wait_until(lambda: [l for l in e.lines if l.startswith("[declared-dup] RECONNECTED ")], 10)
    check(line, "the declared worker did not get refused and reconnect; stdout %r stderr %r"
          % (e.lines[-5:], e.stderr()[-800:]))
    check("[declared-dup] REFUSED FUNCTION_NAMESPACE_CONFLICT" in e.lines,
          "the declared worker's refusal: %r" % e.lines[-5:])
    wid = line[0].split()[-1]
    r = call(obs, "engine::workers::info", {"name": "declared-dup"})
    check("error" not in r, "workers::info declared-dup: %r" % r)
    wk = r["result"]["worker"]
    check(wk.get("id") == wid, "workers::info shows connection %r, not the new one %r"
          % (wk.get("id"), wid))
    lr = wk.get("last_refusal")
    check(isinstance(lr, dict) and lr.get("code") == "FUNCTION_NAMESPACE_CONFLICT"
          and lr.get("function_id") == "dup::fn" and lr.get("owner_worker_id") == hid,
          "last_refusal of the declared worker: %r" % lr)
    sanitizer_clean(e)


# ---------------------------------------------------------------------------------------------
# 6. a client with Python `websockets`-style reconnect logic comes back after a restart

class ReconnectingWorker(threading.Thread):
    """Connects, announces, registers FID and serves it; when the connection ends it reconnects
    (backoff 0.1 s, up to `give_up` s without success) unless the Close code is 1000 or 1001,
    which `websockets` treats as a final, clean close (ConnectionClosedOK)."""

    def __init__(self, port, fid, give_up=15):
        super().__init__(daemon=True)
        self.port, self.fid, self.give_up = port, fid, give_up
        self.codes = []       # Close codes received, in order (None = no Close frame, EOF)
        self.connects = 0
        self.final = None     # why the loop ended
        self.stop = False
        self.cur = None
        _cleanups.append(self._end)
        self.start()

    def _end(self):
        self.stop = True
        if self.cur:
            self.cur.close()
        self.join(3)

    def run(self):
        last_ok = time.time()
        while not self.stop:
            try:
                w = WS(self.port, timeout=2)
                if w.status != 101:
                    raise OSError("status %r" % w.status)
            except (OSError, TimeoutError, Closed):
                if time.time() - last_ok > self.give_up:
                    self.final = "gave up"
                    return
                time.sleep(0.1)
                continue
            self.cur = w
            self.connects += 1
            last_ok = time.time()
            code = self._serve(w)
            w.close()
            self.codes.append(code)
            if code in (1000, 1001):
                self.final = "clean close %d: not reconnecting" % code
                return
            time.sleep(0.1)

    def _serve(self, w):
        try:
            worker_hello(w, name="reconnector")
            w.send_json({"type": "registerfunction", "id": self.fid})
            while not self.stop:
                try:
                    fin, op, p = w.recv_frame(0.2)
                except TimeoutError:
                    continue
                if op == 8:
                    code = struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None
                    try:
                        w.send_frame(8, p[:2])
                    except OSError:
                        pass
                    return code
                if op == 9:
                    w.send_frame(10, p)
                if op != 1:
                    continue
                m = json.loads(p.decode())
                if m.get("type") == "invokefunction" and m.get("invocation_id"):
                    w.send_json({"type": "invocationresult", "invocation_id": m["invocation_id"],
                                 "function_id": m["function_id"],
                                 "result": {"connection": self.connects}})
        except (Closed, OSError, ValueError):
            return None
        return None


@test
def a_websockets_style_client_reconnects_after_an_engine_restart():
    e1 = Engine()
    _cleanups.append(lambda: _stop_engine(e1))
    port = e1.port
    w = ReconnectingWorker(port, "rc::who")
    obs = ws(port)
    worker_hello(obs, name="observer1")
    r = wait_fn(obs, "rc::who")
    check(r["result"] == {"connection": 1}, "first call: %r" % r)
    obs.close()
    t0 = time.time()
    check(e1.stop() == 0, "engine exit status on SIGTERM: %r" % e1.proc.returncode)
    check(wait_until(lambda: w.codes, 3), "the client saw no end of its connection")
    check(w.codes[0] == 1012, "Close code on shutdown: %r (1000/1001 stop websockets clients)"
          % w.codes)
    sanitizer_clean(e1)
    e2 = engine(args=["--port", str(port)])
    check(e2.port == port, "the restarted engine listens on %r, not %r" % (e2.port, port))
    obs2 = ws(port)
    worker_hello(obs2, name="observer2")
    r = wait_fn(obs2, "rc::who", timeout=10)
    check(r["result"] == {"connection": 2}, "call after the restart: %r" % r)
    check(w.final is None and w.connects == 2, "client state: connects=%d final=%r codes=%r"
          % (w.connects, w.final, w.codes))
    print("# back %.2fs after the SIGTERM" % (time.time() - t0), flush=True)
    sanitizer_clean(e2)


if __name__ == "__main__":
    sys.exit(suite.run())
