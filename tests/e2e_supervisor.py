#!/usr/bin/env python3
"""End-to-end tests: declared workers (supervisor), hot reload, graceful shutdown, the sentinel,
start-up config errors and the `iii trigger` / `iii list` client.

Binding spec: ../shared/spec/DECISIONS.md items 3, 4, 5, 6, 9 and PROTOCOL.md §8; the exact
behaviour is the engine's "Supervisor", "Configuration and hot reload", "CLI client" and "main"
sections. Workers are the fixtures in tests/fixtures/: sh_worker.sh (POSIX sh, records every
start in DIR/NAME.starts) and pyworker.py (a WebSocket worker on wslib that answers with its
pid, environment and cwd).

Every engine runs on 127.0.0.1 with --port 0; every wait is bounded; every process is stopped by
pid or process group (never by name). Zombies count as dead (they are the reaper's business,
not the engine's).

Run: python3 tests/e2e_supervisor.py     (III_BIN=path/to/iii, III_TEST_ONLY=substring)
Output: `ok - NAME`, `not ok - NAME: why`, `skip - NAME: why`; exit status 1 on any failure.
"""
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wslib  # noqa: E402
from wslib import WS, Engine, Suite, call  # noqa: E402

BIN = os.path.abspath(wslib.BIN)
FIX = os.path.join(HERE, "fixtures")
SHW = os.path.join(FIX, "sh_worker.sh")
PYW = os.path.join(FIX, "pyworker.py")
PY = sys.executable
HAVE_PROC = os.path.isdir("/proc/self/fd")
# the 20000-byte, position-coded line pyworker.py prints with PYW_OUTPUT=1
LONG_LINE = "".join("%05d|" % i for i in range(3334))[:20000]
LONG_LINE2 = "".join("%05d/" % i for i in range(2000))[:12000]
UNSET_VAR = "III_E2E_SURELY_UNSET_VARIABLE_7F3A"

suite = Suite()
_engines = []   # engines a test started: stopped when it ends
_groups = set()  # worker process groups a test learned about: SIGKILLed if still there at the end
_tmpdirs = []


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
            _cleanup()
    return suite.test(run)


def _cleanup():
    while _engines:
        e = _engines.pop()
        try:
            e.stop()
        except Exception:  # noqa: BLE001
            pass
    shared = {h["e"].proc.pid for h in (_env_eng, _cli_eng, _rl) if h.get("e") and h["e"].alive()}
    for g in list(_groups):
        st = _stat(g) if HAVE_PROC else None
        if st and st[1] in shared:
            continue  # a worker of a shared engine: stopped with that engine
        if group_members(g):
            try:
                os.killpg(g, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    _groups.clear()
    while _tmpdirs:
        shutil.rmtree(_tmpdirs.pop(), ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# processes

def _stat(pid):
    """(state, ppid, pgrp, session) from /proc, or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            s = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    rest = s.rsplit(")", 1)[1].split()
    return rest[0], int(rest[1]), int(rest[2]), int(rest[3])


def alive(pid):
    """True when pid is a running (non-zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if HAVE_PROC:
        st = _stat(pid)
        return st is not None and st[0] not in ("Z", "X")
    return True


def group_members(pgid):
    """Live (non-zombie) members of process group pgid."""
    if not HAVE_PROC:
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        st = _stat(int(d))
        if st and st[2] == pgid and st[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def children_of(pid):
    """Live processes whose parent is pid (needs /proc; [] without it)."""
    out = []
    if not HAVE_PROC:
        return out
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st and st[1] == pid and st[0] not in ("Z", "X"):
                out.append(int(d))
    return out


def wait_until(pred, timeout, step=0.02):
    """Polls pred until it returns something truthy (returned) or timeout (returns None)."""
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() >= deadline:
            return None
        time.sleep(step)


def track(pid):
    """Remembers a worker's process group (= its pid) for the end-of-test safety net."""
    _groups.add(pid)
    return pid


def groups_gone(pgids, timeout):
    """Waits until none of pgids has a live member; returns the survivors {pgid: [pids]}."""
    left = {}

    def gone():
        left.clear()
        for g in pgids:
            m = group_members(g)
            if m:
                left[g] = m
        return not left
    wait_until(gone, timeout, 0.05)
    return dict(left)


# ---------------------------------------------------------------------------------------------
# engines, configs, fixtures

class SupEngine(Engine):
    """wslib.Engine with a config file in a directory chosen by the test (for `cwd`)."""

    def __init__(self, d, config, env=None, start_timeout=10.0):  # noqa: super not called
        self.tmp = d
        self.cfg = os.path.join(d, "config.yaml")
        if config is not None:
            with open(self.cfg, "w") as f:
                f.write(config)
        e = dict(os.environ)
        e.pop("III_URL", None)
        if env:
            e.update(env)
        self.logpath = os.path.join(d, "engine.log")
        self.log = open(self.logpath, "wb")
        argv = [BIN] + (["-c", self.cfg] if config is not None else []) + ["--port", "0"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE,
                                     stderr=self.log, env=e, start_new_session=True,
                                     stdin=subprocess.DEVNULL, cwd=d)
        self.port = None
        self.lines = []
        self._outbuf = b""
        _engines.append(self)
        deadline = time.time() + start_timeout
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, False)
        buf = b""
        while time.time() < deadline and self.port is None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                chunk = None
            if chunk == b"":
                break
            if chunk:
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.lines.append(line.decode("utf-8", "replace"))
                    if "listening on ws://" in self.lines[-1]:
                        self.port = int(self.lines[-1].rsplit(":", 1)[1].strip().rstrip("/"))
            else:
                time.sleep(0.01)
        self._outbuf = buf
        if self.port is None:
            self.stop()
            raise RuntimeError("engine did not report a listening port; stderr:\n" + self.stderr())
        self.url = "ws://127.0.0.1:%d" % self.port
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def write_config(self, text, rename=False):
        if rename:
            tmp = self.cfg + ".tmp-save"
            with open(tmp, "w") as f:
                f.write(text)
            os.rename(tmp, self.cfg)
        else:
            with open(self.cfg, "w") as f:
                f.write(text)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stdout_lines(self):
        return list(self.lines)


def mkdir():
    d = os.path.realpath(tempfile.mkdtemp(prefix="iii-sup-"))
    _tmpdirs.append(d)
    return d


def flow(items):
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def sh_w(name, mode, d, v=None, extra=()):
    """A config entry running tests/fixtures/sh_worker.sh MODE D."""
    lines = ["  - name: %s" % name, "    command: %s" % flow(["sh", SHW, mode, d])]
    if v is not None:
        lines.append('    env: { V: "%s" }' % v)
    lines += ["    " + x for x in extra]
    return "\n".join(lines) + "\n"


def py_w(name, extra=()):
    """A config entry running tests/fixtures/pyworker.py."""
    lines = ["  - name: %s" % name, "    command: %s" % flow([PY, PYW])]
    lines += ["    " + x for x in extra]
    return "\n".join(lines) + "\n"


def grand_w(name, d, extra=()):
    """A shell-string command whose background grandchild records its pid in D/NAME.child."""
    cmd = "echo $$ >> %s/%s.starts; sleep 300 & echo $! > %s/%s.child; wait" % (d, name, d, name)
    lines = ["  - name: %s" % name, "    command: %s" % json.dumps(cmd)] + ["    " + x for x in extra]
    return "\n".join(lines) + "\n"


def config(*entries, head=""):
    return head + "workers:\n" + "".join(entries)


def starts(d, name):
    """[(pid, V), ...] for each start sh_worker.sh recorded for instance NAME."""
    try:
        with open(os.path.join(d, name + ".starts")) as f:
            out = []
            for l in f.read().splitlines():
                p = l.split(" ", 1)
                if p and p[0].isdigit():
                    out.append((int(p[0]), p[1] if len(p) > 1 else ""))
            return out
    except FileNotFoundError:
        return []


def wait_starts(d, name, n, timeout):
    """Waits until NAME has started at least n times; returns the list (maybe shorter)."""
    wait_until(lambda: len(starts(d, name)) >= n, timeout)
    s = starts(d, name)
    for pid, _ in s:
        track(pid)
    return s


def read_file(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


class StartClock(threading.Thread):
    """Polls D/*.starts every 10 ms and timestamps every new start line: {name: [(pid, t)]}."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d = d
        self.seen = {}
        self.lock = threading.Lock()
        self.halt = False
        self.start()

    def run(self):
        while not self.halt:
            try:
                names = [f[:-7] for f in os.listdir(self.d) if f.endswith(".starts")]
            except OSError:
                names = []
            now = time.time()
            for n in names:
                s = starts(self.d, n)
                with self.lock:
                    have = self.seen.setdefault(n, [])
                    for pid, _ in s[len(have):]:
                        have.append((pid, now))
                        _groups.add(pid)
            time.sleep(0.01)

    def get(self, name):
        with self.lock:
            return list(self.seen.get(name, []))

    def stop(self):
        self.halt = True


# ---------------------------------------------------------------------------------------------
# talking to the engine

def rpc(port, fid, data=None, timeout=5.0, namespace=None):
    """One call from a fresh (unregistered) connection; returns the invocationresult frame."""
    ws = WS(port, timeout=timeout)
    try:
        m = ws.recv_json(timeout)
        check(m.get("type") == "workerregistered", "first frame %r" % (m,))
        extra = {"namespace": namespace} if namespace else {}
        return call(ws, fid, {} if data is None else data, timeout, **extra)
    finally:
        ws.close()


def result(port, fid, data=None, timeout=5.0):
    r = rpc(port, fid, data, timeout)
    check("error" not in r, "%s answered an error: %r" % (fid, r.get("error")))
    return r.get("result")


def wait_fn(port, fid, timeout, pred=None):
    """Calls fid until it succeeds (and pred(result) holds); returns the result or None."""
    def attempt():
        try:
            r = rpc(port, fid, {}, 2.0)
        except (OSError, TimeoutError, wslib.Closed):
            return None
        if "error" in r:
            return None
        res = r.get("result")
        if pred and not pred(res):
            return None
        return {"r": res}
    got = wait_until(attempt, timeout, 0.05)
    return got["r"] if got else None


def function_ids(port):
    return {f["function_id"] for f in result(port, "engine::functions::list", {})["functions"]}


def worker_pid(port, name, timeout=6.0):
    """Pid that pyworker NAME reports (waits until it answers)."""
    r = wait_fn(port, "w::" + name, timeout)
    check(r is not None, "worker %s never answered w::%s within %.0f s" % (name, name, timeout))
    return track(r["pid"])


def iii(*args, env=None, timeout=20.0):
    """Runs the CLI client; returns (rc, stdout, stderr, seconds)."""
    e = dict(os.environ)
    e.pop("III_URL", None)
    if env:
        e.update(env)
    t0 = time.time()
    p = subprocess.run([BIN] + list(args), capture_output=True, text=True, env=e, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr, time.time() - t0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def no_sanitizer(eng):
    rep = eng.sanitizer_report()
    check(rep is None, "engine sanitizer report: %s" % rep)


# =============================================================================================
# declared workers: start, registration, environment, cwd, output

_env_eng = {}


def env_engine():
    """One engine for the start/env/output tests (started once, stopped at the end)."""
    if "e" in _env_eng:
        return _env_eng["e"], _env_eng["d"]
    d = mkdir()
    os.mkdir(os.path.join(d, "sub"))
    cfgtext = config(
        py_w("envw", ['env: { CUSTOM_A: "hello world", NUM: 42, PYW_ECHO_ENV: "CUSTOM_A,NUM,HOME" }',
                      "cwd: sub"]),
        py_w("plain"),
        py_w("plain"),                       # duplicate name: instance plain#1
        py_w("out", ['env: { PYW_OUTPUT: "1" }']),
        sh_w("part", "partial", d, extra=["restart: never"]),
        sh_w("lister", "list", d, extra=['env: { III_BIN: %s }' % json.dumps(BIN)]),
        "  - name: leaver\n    command: %s\n    restart: never\n"
        % json.dumps("sleep 300 & echo $! > %s/leaver.child; exit 3" % d))
    _tmpdirs.remove(d)  # kept until the shared engine stops
    e = SupEngine(d, cfgtext)
    _engines.remove(e)
    _env_eng.update(e=e, d=d)
    return e, d


def stop_shared():
    for holder in (_env_eng, _cli_eng, _rl):
        e = holder.get("e")
        if e:
            e.stop()
            for g in holder.get("groups", ()):
                if group_members(g):
                    os.killpg(g, signal.SIGKILL)
        if holder.get("d"):
            shutil.rmtree(holder["d"], ignore_errors=True)
        holder.clear()


@test
def declared_worker_starts_and_registers():
    e, d = env_engine()
    r = wait_fn(e.port, "w::envw", 8.0)
    check(r is not None, "w::envw never became callable; stderr: %s" % e.stderr()[-600:])
    track(r["pid"])
    check(r["name"] == "envw", "name %r" % r["name"])
    check(r["ppid"] == e.proc.pid, "worker's parent is %r, not the engine %d" % (r["ppid"], e.proc.pid))
    check(r["pgid"] == r["pid"], "worker is not the leader of its own process group: pgid %r pid %r"
          % (r["pgid"], r["pid"]))
    check(r["pgid"] != os.getpgid(e.proc.pid), "worker shares the engine's process group")
    want = ("envw", "out", "plain", "plain#1")

    def names():
        ws = json.loads(iii("list", "workers", "--json", "--url", e.url)[1])["workers"]
        return sorted(w.get("name") for w in ws if w.get("runtime") == "python")
    wait_until(lambda: all(n in names() for n in want), 8.0, 0.1)
    got = names()
    for n in want:
        check(n in got, "engine::workers::list has no worker %r (python workers: %r)" % (n, got))
    check(len(got) == len(set(got)), "a worker is listed twice: %r" % got)


@test
def worker_env_and_default_env():
    e, d = env_engine()
    r = wait_fn(e.port, "w::envw", 8.0)
    check(r is not None, "w::envw never answered")
    env = r["env"]
    want = {"III_URL": e.url, "III_ENGINE_URL": e.url, "III_WORKER_NAME": "envw",
            "III_ENGINE_PID": str(e.proc.pid), "CUSTOM_A": "hello world", "NUM": "42",
            "HOME": os.environ.get("HOME")}
    for k, v in want.items():
        check(env.get(k) == v, "env %s = %r, want %r" % (k, env.get(k), v))


@test
def worker_cwd_relative_and_default():
    e, d = env_engine()
    r = wait_fn(e.port, "w::envw", 8.0)
    check(r is not None, "w::envw never answered")
    check(os.path.realpath(r["cwd"]) == os.path.join(d, "sub"),
          "cwd: sub (relative to the config dir) gave %r, want %r" % (r["cwd"], os.path.join(d, "sub")))
    r = wait_fn(e.port, "w::plain", 8.0)
    check(r is not None, "w::plain never answered")
    check(os.path.realpath(r["cwd"]) == d, "default cwd %r, want the config's directory %r" % (r["cwd"], d))


@test
def duplicate_entry_gets_instance_name():
    e, d = env_engine()
    r1 = wait_fn(e.port, "w::plain#1", 8.0)
    r0 = wait_fn(e.port, "w::plain", 8.0)
    check(r1 is not None and r0 is not None, "plain / plain#1 not both callable")
    check(r1["env"]["III_WORKER_NAME"] == "plain#1", "III_WORKER_NAME %r" % r1["env"]["III_WORKER_NAME"])
    check(r1["pid"] != r0["pid"], "the two instances are one process")


@test
def worker_descriptors_stdin_and_no_leaks():
    if not HAVE_PROC:
        return "skip /proc not available"
    e, d = env_engine()
    r = wait_fn(e.port, "w::envw", 8.0)
    check(r is not None, "w::envw never answered")
    fds = r["fds"]
    check(fds.get("0") == "/dev/null", "stdin is %r, want /dev/null" % fds.get("0"))
    check(fds.get("1", "").startswith("pipe:") and fds.get("2", "").startswith("pipe:"),
          "stdout/stderr are not pipes: %r %r" % (fds.get("1"), fds.get("2")))
    extra = {k: v for k, v in fds.items() if k not in ("0", "1", "2") and "/fd" not in v}
    check(not extra, "engine descriptors leaked into the worker: %r" % extra)


def _wait_line(e, pred, timeout):
    return wait_until(lambda: [l for l in e.stdout_lines() if pred(l)], timeout)


@test
def worker_stdout_stderr_prefixed():
    e, d = env_engine()
    got = _wait_line(e, lambda l: l == "[out] hello from out on stdout", 8.0)
    check(got, "no '[out] hello from out on stdout' line in the engine's stdout: %r"
          % [l[:80] for l in e.stdout_lines()][:20])
    got = wait_until(lambda: "[out] hello from out on stderr" in e.stderr().splitlines(), 3.0)
    check(got, "no '[out] hello from out on stderr' line in the engine's stderr")
    lines = e.stdout_lines()
    check(lines and lines[0].startswith("iii: listening on ws://127.0.0.1:"),
          "first stdout line is not the listening line: %r" % (lines[:1],))
    check(sum(1 for l in lines if "listening on" in l) == 1, "more than one listening line")


def _pieces(e, first, after, want, what):
    """The [out] lines between `first` and `after`, checked to rejoin into `want`, each <= 8 KiB."""
    got = _wait_line(e, lambda l: l == after, 8.0)
    check(got, "the line after the %s never arrived" % what)
    lines = e.stdout_lines()
    i = lines.index(first)
    j = lines.index(after)
    pieces = [l for l in lines[i + 1:j] if l.startswith("[out] ")]
    others = [l[:60] for l in lines[i + 1:j] if not l.startswith("[") and not l.startswith("iii:")]
    check(not others, "unprefixed output between the lines: %r" % others)
    joined = "".join(p[len("[out] "):] for p in pieces)
    check(joined == want, "the %s came out as %d piece(s) totalling %d bytes (first diff at %s)"
          % (what, len(pieces), len(joined),
             next((k for k in range(min(len(joined), len(want))) if joined[k] != want[k]),
                  min(len(joined), len(want)))))
    check(all(len(p) - len("[out] ") <= 8192 for p in pieces),
          "the %s was not split at 8 KiB (README: a line over 8 KiB is split): piece sizes %r"
          % (what, [len(p) - len("[out] ") for p in pieces]))


@test
def worker_long_line_split_not_lost():
    e, d = env_engine()
    _pieces(e, "[out] hello from out on stdout", "[out] after the long line", LONG_LINE,
            "20000-byte line")


@test
def worker_long_line_in_two_writes_split():
    e, d = env_engine()
    _pieces(e, "[out] after the long line", "[out] after the second long line", LONG_LINE2,
            "12000-byte line written in two parts")


@test
def worker_partial_last_line_flushed():
    e, d = env_engine()
    got = _wait_line(e, lambda l: l == "[part] no newline at end", 8.0)
    check(got, "the final line without a newline was lost: %r" %
          [l for l in e.stdout_lines() if l.startswith("[part]")])
    check("[part] line one" in e.stdout_lines(), "'[part] line one' missing")
    time.sleep(1.2)  # restart: never => it must not run (and print) again
    n = len(starts(d, "part"))
    check(n == 1, "restart: never worker that exited 0 was started %d times" % n)


@test
def many_workers_output_all_read():
    """40 declared workers each print a line every 50 ms: every one is heard (the poll set must
    hold every worker's pipes, not a fixed handful) and all stop cleanly on SIGTERM."""
    d = mkdir()
    n = 40
    entries = "".join(
        "  - name: m%d\n    command: %s\n" % (i, json.dumps("while :; do echo tick-%d; sleep 0.05; done" % i))
        for i in range(n))
    e = SupEngine(d, config(entries))
    try:
        want = set("[m%d] tick-%d" % (i, i) for i in range(n))
        got = wait_until(lambda: want <= set(e.stdout_lines()), 10.0)
        missing = sorted(want - set(e.stdout_lines()))
        check(got, "%d of %d workers never heard: %r" % (len(missing), n, missing[:5]))
    finally:
        rc = e.stop()
    check(rc == 0, "engine exit status %r after SIGTERM" % rc)


@test
def worker_gets_iii_url_for_cli():
    e, d = env_engine()
    got = wait_until(lambda: read_file(os.path.join(d, "lister.list")), 8.0)
    check(got is not None, "the sh worker's `iii list functions --json` never finished; rc=%r err=%r"
          % (read_file(os.path.join(d, "lister.list.rc")), read_file(os.path.join(d, "lister.list.err"))))
    rc = read_file(os.path.join(d, "lister.list.rc")).strip()
    check(rc == "0", "`iii list functions --json` inside a worker (III_URL from the engine) exited %s: %s"
          % (rc, read_file(os.path.join(d, "lister.list.err"))))
    check("functions" in json.loads(got), "not a functions list: %r" % got[:200])


@test
def worker_exit_kills_rest_of_its_group():
    e, d = env_engine()
    child = wait_until(lambda: (read_file(os.path.join(d, "leaver.child")) or "").strip(), 8.0)
    check(child, "the leaver worker never ran")
    child = track(int(child))
    check(wait_until(lambda: not alive(child), 2.0),
          "the background child %s of a worker that exited still runs" % child)


# =============================================================================================
# restart policy and backoff

@test
def restart_backoff_and_policies():
    d = mkdir()
    clock = StartClock(d)
    try:
        e = SupEngine(d, config(
            sh_w("crash", "crash", d),
            sh_w("never1", "crash", d, extra=["restart: never"]),
            sh_w("onf0", "exit0", d, extra=["restart: on-failure"]),
            sh_w("onf1", "crash", d, extra=["restart: on-failure"]),
            sh_w("alw0", "exit0", d, extra=["restart: always"])))
        wait_until(lambda: len(clock.get("crash")) >= 3, 6.0)
        time.sleep(0.3)
        c = clock.get("crash")
        check(len(c) >= 3, "crash (restart: always, exit 1) started %d time(s) in 6 s, want 3" % len(c))
        g1, g2 = c[1][1] - c[0][1], c[2][1] - c[1][1]
        check(0.85 <= g1 <= 1.6, "first restart after %.2f s, want ~1 s" % g1)
        check(1.8 <= g2 <= 2.7, "second restart after %.2f s, want ~2 s (doubling)" % g2)
        check(len(c) == 3, "crash started %d times within %.1f s: backoff not honoured"
              % (len(c), time.time() - c[0][1]))
        check(len(set(p for p, _ in c)) == 3, "restarts reused a pid? %r" % c)
        n = {k: len(clock.get(k)) for k in ("never1", "onf0", "onf1", "alw0")}
        check(n["never1"] == 1, "restart: never, exit 1: started %d times, want 1" % n["never1"])
        check(n["onf0"] == 1, "restart: on-failure, exit 0: started %d times, want 1" % n["onf0"])
        check(n["onf1"] >= 3, "restart: on-failure, exit 1: started %d times in ~3.3 s, want 3" % n["onf1"])
        check(n["alw0"] >= 3, "restart: always, exit 0: started %d times in ~3.3 s, want 3" % n["alw0"])
        check(e.alive(), "engine died")
        check("[crash] crashing now" in e.stdout_lines(), "the crashing worker's output was not copied")
        check(e.stop() == 0, "SIGTERM exit status %r" % e.proc.returncode)
        no_sanitizer(e)
    finally:
        clock.stop()


@test
def killed_worker_restarts_and_reregisters():
    d = mkdir()
    e = SupEngine(d, config(py_w("pyr")))
    pid1 = worker_pid(e.port, "pyr", 8.0)
    os.kill(pid1, signal.SIGKILL)
    t0 = time.time()
    r = wait_fn(e.port, "w::pyr", 6.0, lambda res: res["pid"] != pid1)
    check(r is not None, "w::pyr never answered from a new process after SIGKILL of %d" % pid1)
    took = time.time() - t0
    track(r["pid"])
    check(0.8 <= took <= 4.0, "restart took %.2f s, want ~1 s backoff" % took)
    check(not alive(pid1), "the killed worker is still alive")
    ws = json.loads(iii("list", "workers", "--json", "--url", e.url)[1])["workers"]
    n = [w for w in ws if w.get("name") == "pyr"]
    check(len(n) == 1, "engine::workers::list shows %d workers named pyr (a ghost?)" % len(n))
    check(e.stop() == 0, "SIGTERM exit status %r" % e.proc.returncode)
    no_sanitizer(e)


# =============================================================================================
# hot reload (one engine; each test writes a complete config, so a failure does not cascade)

_rl = {}


def rl_engine():
    if "e" in _rl:
        return _rl["e"], _rl["d"]
    d = mkdir()
    _tmpdirs.remove(d)
    e = SupEngine(d, rl_config(d, {}))
    _engines.remove(e)
    _rl.update(e=e, d=d, groups=set())
    for n in ("a", "b"):
        s = wait_starts(d, n, 1, 5.0)
        check(s, "worker %s never started" % n)
    pid = worker_pid(e.port, "p", 8.0)
    _rl["groups"].update([pid] + [p for n in ("a", "b") for p, _ in starts(d, n)])
    return e, d


def rl_config(d, o):
    """The reload engine's config; o overrides: va, vb (V of a, b), reorder, comment, p (bool),
    extra (list of entries appended)."""
    if o.get("reorder"):
        a = ("  - command: %s\n    env: { W: \"x\", V: \"%s\" }\n    name: a\n"
             % (flow(["sh", SHW, "sleep", d]), o.get("va", "1")))
    else:
        a = ("  - name: a\n    command: %s\n    env: { V: \"%s\", W: \"x\" }\n"
             % (flow(["sh", SHW, "sleep", d]), o.get("va", "1")))
    b = sh_w("b", "sleep", d, o.get("vb", "1"))
    parts = [a, b]
    if o.get("p", True):
        parts.append(py_w("p"))
    parts += o.get("extra", [])
    text = config(*parts)
    if o.get("comment"):
        text = "# a comment added by the test\n\n" + text.replace("  - name: b\n", "  # about b\n  - name: b\n") \
            + "# trailing comment\n"
    return text


def rl_write(o, rename=False):
    e, d = rl_engine()
    e.write_config(rl_config(d, o), rename=rename)


def rl_snapshot():
    e, d = _rl["e"], _rl["d"]
    snap = {n: starts(d, n) for n in ("a", "b")}
    r = wait_fn(e.port, "w::p", 0.5)
    snap["p"] = r["pid"] if r else None
    return snap


def rl_alive():
    e = _rl["e"]
    check(e.alive(), "engine exited (status %r); stderr tail: %s" % (e.proc.returncode, e.stderr()[-400:]))


@test
def reload_edit_restarts_only_that_worker():
    e, d = rl_engine()
    rl_write({})
    time.sleep(1.0)
    before = rl_snapshot()
    rl_write({"va": "2"})
    s = wait_until(lambda: [x for x in starts(d, "a") if x[1] == "2"], 3.0)
    check(s, "editing a's env did not restart a within 3 s (starts %r)" % starts(d, "a"))
    _rl["groups"].add(track(s[0][0]))
    rl_alive()
    old = before["a"][-1][0]
    check(not groups_gone([old], 2.0) and not alive(old), "a's old process %d still runs" % old)
    check(starts(d, "b") == before["b"], "b was restarted: %r -> %r" % (before["b"], starts(d, "b")))
    time.sleep(0.3)
    after = rl_snapshot()
    check(after["p"] == before["p"], "p was restarted: pid %r -> %r" % (before["p"], after["p"]))
    check(len(starts(d, "a")) == len(before["a"]) + 1, "a restarted more than once: %r" % starts(d, "a"))


@test
def reload_key_order_no_restart_and_add():
    e, d = rl_engine()
    rl_write({"va": "2"})
    time.sleep(1.0)
    before = rl_snapshot()
    rl_write({"va": "2", "reorder": True, "extra": [sh_w("d", "sleep", d)]})
    s = wait_starts(d, "d", 1, 3.0)
    check(s, "an added entry d did not start within 3 s")
    _rl["groups"].add(s[0][0])
    time.sleep(0.5)
    rl_alive()
    after = rl_snapshot()
    check(after == before, "a key-order-only change restarted workers: %r -> %r" % (before, after))


@test
def reload_comment_only_no_restart():
    e, d = rl_engine()
    rl_write({"va": "2", "extra": [sh_w("d", "sleep", d)]})
    time.sleep(1.0)
    before = rl_snapshot()
    nd = len(starts(d, "d"))
    rl_write({"va": "2", "comment": True, "extra": [sh_w("d", "sleep", d)]})
    time.sleep(1.5)
    rl_alive()
    after = rl_snapshot()
    check(after == before and len(starts(d, "d")) == nd,
          "a comment-only edit restarted workers: %r -> %r" % (before, after))


@test
def reload_remove_entries():
    e, d = rl_engine()
    rl_write({"va": "2", "extra": [sh_w("d", "sleep", d)]})
    time.sleep(1.0)
    before = rl_snapshot()
    ppid = before["p"]
    check(ppid, "p is not running before the test")
    dpid = wait_starts(d, "d", 1, 3.0)
    check(dpid, "d is not running before the test")
    dpid = dpid[-1][0]
    rl_write({"va": "2", "p": False})
    left = groups_gone([ppid, dpid], 3.0)
    check(not left, "removed workers still run: %r" % left)
    gone = wait_until(lambda: "w::p" not in function_ids(e.port), 2.0)
    check(gone, "w::p is still registered after its entry was removed")
    rl_alive()
    after = rl_snapshot()
    check(after["a"] == before["a"] and after["b"] == before["b"],
          "removing p and d touched a or b: %r -> %r" % (before, after))
    time.sleep(1.2)
    check(len(starts(d, "d")) == 1 and wait_fn(e.port, "w::p", 0.3) is None,
          "a removed worker came back (restart after removal)")


@test
def reload_rename_style_save():
    e, d = rl_engine()
    rl_write({"va": "2", "p": False})
    time.sleep(1.0)
    before = {n: starts(d, n) for n in ("a", "b")}
    rl_write({"va": "2", "vb": "3", "p": False}, rename=True)
    s = wait_until(lambda: [x for x in starts(d, "b") if x[1] == "3"], 3.0)
    check(s, "a write-temp-then-rename save was not picked up within 3 s")
    _rl["groups"].add(track(s[0][0]))
    rl_alive()
    check(starts(d, "a") == before["a"], "a was restarted by a change to b")


@test
def reload_duplicate_instance_only_that_one():
    e, d = rl_engine()
    dup = [sh_w("dup", "sleep", d, "1"), sh_w("dup", "sleep", d, "1")]
    rl_write({"va": "2", "vb": "3", "p": False, "extra": dup})
    s0 = wait_starts(d, "dup", 1, 3.0)
    s1 = wait_starts(d, "dup#1", 1, 3.0)
    check(s0 and s1, "duplicate entries did not start as dup and dup#1: %r %r" % (s0, s1))
    _rl["groups"].update([s0[0][0], s1[0][0]])
    time.sleep(0.3)
    dup[1] = sh_w("dup", "sleep", d, "2")
    rl_write({"va": "2", "vb": "3", "p": False, "extra": dup})
    s = wait_until(lambda: [x for x in starts(d, "dup#1") if x[1] == "2"], 3.0)
    check(s, "changing the second `dup` entry did not restart dup#1: %r" % starts(d, "dup#1"))
    _rl["groups"].add(track(s[0][0]))
    time.sleep(0.3)
    check(starts(d, "dup") == s0, "dup (the first instance) was restarted too: %r" % starts(d, "dup"))


@test
def reload_on_sighup():
    e, d = rl_engine()
    base = {"va": "2", "vb": "3", "p": False}
    rl_write(base)
    time.sleep(1.0)
    before = {n: starts(d, n) for n in ("a", "b")}
    rl_write(dict(base, extra=[sh_w("hup", "sleep", d)]))
    t0 = time.time()
    e.proc.send_signal(signal.SIGHUP)
    s = wait_starts(d, "hup", 1, 3.0)
    took = time.time() - t0
    check(s, "SIGHUP + edit: the added worker never started")
    _rl["groups"].add(s[0][0])
    check(took < 0.45, "the added worker started %.2f s after SIGHUP: no faster than the file watcher "
          "(poll 250 ms + debounce 500 ms), so SIGHUP did not reload" % took)
    time.sleep(1.0)
    rl_alive()
    mid = {n: starts(d, n) for n in ("a", "b", "hup")}
    check(mid["a"] == before["a"] and mid["b"] == before["b"], "SIGHUP reload restarted a or b")
    e.proc.send_signal(signal.SIGHUP)  # nothing changed: nothing restarts
    time.sleep(0.6)
    rl_alive()
    check({n: starts(d, n) for n in ("a", "b", "hup")} == mid, "a SIGHUP without changes restarted workers")


@test
def reload_revives_stopped_never_worker():
    e, d = rl_engine()
    base = {"va": "2", "vb": "3", "p": False,
            "extra": [sh_w("once", "exit0", d, extra=["restart: never"])]}
    rl_write(base)
    check(wait_starts(d, "once", 1, 3.0), "the added restart: never worker did not start")
    time.sleep(1.3)
    check(len(starts(d, "once")) == 1, "restart: never worker restarted on its own")
    rl_write(dict(base, comment=True))
    s = wait_starts(d, "once", 2, 3.0)
    check(len(s) == 2, "a reload did not start the stopped restart: never worker again (README: it "
          "counts as changed); starts %r" % s)


@test
def reload_changed_worker_starts_after_old_group_is_gone():
    e, d = rl_engine()
    slow = lambda v: sh_w("slow", "stubborn", d, v, extra=["stop_timeout_ms: 600"])  # noqa: E731
    base = {"va": "2", "vb": "3", "p": False}
    rl_write(dict(base, extra=[slow("1")]))
    s = wait_starts(d, "slow", 1, 3.0)
    check(s, "slow did not start")
    old = s[-1][0]
    _rl["groups"].add(old)
    time.sleep(0.3)
    t0 = time.time()
    rl_write(dict(base, extra=[slow("2")]))
    new = wait_until(lambda: [x for x in starts(d, "slow") if x[1] == "2"], 4.0, 0.01)
    took = time.time() - t0
    still = group_members(old)
    check(new, "the changed worker was not started again within 4 s")
    _rl["groups"].add(track(new[0][0]))
    check(read_file(os.path.join(d, "slow.term")), "the old process did not get SIGTERM")
    check(not still, "the new process started while the old group still ran: %r" % still)
    check(took >= 1.0, "restarted %.2f s after the edit: SIGTERM-ignoring old process (stop_timeout_ms "
          "600) cannot be gone that early" % took)


# ---- invalid reloads: fatal, workers stopped, nothing left behind ---------------------------

def _invalid_reload(mutate, want_in_msg=None):
    d = mkdir()
    good = config(sh_w("t", "trap", d), grand_w("g", d), py_w("p"))
    e = SupEngine(d, good)
    t = wait_starts(d, "t", 1, 5.0)
    g = wait_starts(d, "g", 1, 5.0)
    ppid = worker_pid(e.port, "p", 8.0)
    child = wait_until(lambda: (read_file(os.path.join(d, "g.child")) or "").strip(), 3.0)
    check(t and g and child, "workers did not start: t=%r g=%r child=%r" % (t, g, child))
    child = int(child)
    kids = children_of(e.proc.pid)  # the workers and the sentinel
    time.sleep(0.3)
    t0 = time.time()
    mutate(e, d, good)
    rc = e.wait_exit(4.0)
    took = time.time() - t0
    check(rc is not None, "the engine still runs 4 s after an invalid config was written")
    check(rc != 0, "invalid reload: exit status 0, want non-zero")
    check(took <= 3.0, "the engine took %.2f s to exit (want <= ~3 s)" % took)
    err = e.stderr()
    lines = [l for l in err.splitlines() if " iii: error: reload: " in l]
    check(lines, "no stderr line with 'iii: error: reload: '; stderr tail: %r" % err[-400:])
    if want_in_msg:
        check(any(want_in_msg in l for l in lines), "reload message %r lacks %r" % (lines, want_in_msg))
    check(read_file(os.path.join(d, "t.term")), "worker t did not get SIGTERM")
    left = groups_gone([t[0][0], g[0][0], ppid], 1.5)
    check(not left, "worker process groups survive the failed reload: %r" % left)
    check(wait_until(lambda: not alive(child), 1.5), "the shell worker's grandchild %d survives" % child)
    left = wait_until(lambda: not [k for k in kids if alive(k)], 2.0)
    check(left, "processes the engine started survive it: %r" % [k for k in kids if alive(k)])
    no_sanitizer(e)
    return lines


@test
def reload_invalid_yaml_is_fatal():
    _invalid_reload(lambda e, d, good: e.write_config(good + "this: is: not: [valid yaml\n"),
                    "parse failed")


@test
def reload_unknown_top_level_key_is_fatal():
    _invalid_reload(lambda e, d, good: e.write_config(good + "bogus_key: 1\n"), "bogus_key")


@test
def reload_worker_without_command_is_fatal():
    _invalid_reload(lambda e, d, good: e.write_config(good + "  - name: nocmd\n    env: { A: \"1\" }\n"),
                    "command")


@test
def reload_unset_variable_is_fatal():
    os.environ.pop(UNSET_VAR, None)
    _invalid_reload(lambda e, d, good: e.write_config(
        good + "  - name: v\n    command: [\"sh\", \"-c\", \"sleep 300\"]\n    env: { X: \"${%s}\" }\n"
        % UNSET_VAR), UNSET_VAR)


@test
def reload_config_file_removed_is_fatal():
    _invalid_reload(lambda e, d, good: os.unlink(e.cfg))


@test
def reload_invalid_via_sighup_is_fatal():
    def mutate(e, d, good):
        e.write_config(good.replace("workers:", "workers: [", 1))
        e.proc.send_signal(signal.SIGHUP)
    _invalid_reload(mutate)


# =============================================================================================
# shutdown and the sentinel

@test
def sigterm_graceful_stops_every_worker():
    d = mkdir()
    e = SupEngine(d, config(
        sh_w("t", "trap", d),
        sh_w("s", "stubborn", d, extra=["stop_timeout_ms: 700"]),
        grand_w("g", d),
        py_w("p")))
    t = wait_starts(d, "t", 1, 5.0)
    s = wait_starts(d, "s", 1, 5.0)
    g = wait_starts(d, "g", 1, 5.0)
    ppid = worker_pid(e.port, "p", 8.0)
    child = wait_until(lambda: (read_file(os.path.join(d, "g.child")) or "").strip(), 3.0)
    check(t and s and g and child, "workers did not start")
    child = int(child)
    kids = children_of(e.proc.pid)
    time.sleep(0.2)
    t0 = time.time()
    e.proc.send_signal(signal.SIGTERM)
    rc = e.wait_exit(6.0)
    took = time.time() - t0
    check(rc == 0, "SIGTERM: exit status %r, want 0" % rc)
    check(read_file(os.path.join(d, "t.term")), "worker t did not get SIGTERM")
    check(read_file(os.path.join(d, "s.term")), "worker s did not get SIGTERM")
    check(took >= 0.6, "the engine exited %.2f s after SIGTERM although worker s ignores SIGTERM "
          "and has stop_timeout_ms: 700 (not waited for)" % took)
    check(took <= 3.0, "shutdown took %.2f s (stop_timeout_ms 700)" % took)
    left = groups_gone([t[0][0], s[0][0], g[0][0], ppid], 1.5)
    check(not left, "worker process groups survive SIGTERM: %r" % left)
    check(wait_until(lambda: not alive(child), 1.5), "the shell-string worker's grandchild %d survives" % child)
    check(wait_until(lambda: not [k for k in kids if alive(k)], 2.0),
          "processes the engine started survive it: %r" % [k for k in kids if alive(k)])
    no_sanitizer(e)


@test
def sigterm_quick_when_workers_exit():
    d = mkdir()
    e = SupEngine(d, config(sh_w("t", "trap", d), sh_w("z", "sleep", d)))
    check(wait_starts(d, "t", 1, 5.0) and wait_starts(d, "z", 1, 5.0), "workers did not start")
    time.sleep(0.2)
    t0 = time.time()
    e.proc.send_signal(signal.SIGTERM)
    rc = e.wait_exit(5.0)
    took = time.time() - t0
    check(rc == 0, "exit status %r" % rc)
    check(took < 1.0, "shutdown took %.2f s although every worker exits on SIGTERM at once" % took)


@test
def sigkill_engine_sentinel_kills_workers():
    d = mkdir()
    e = SupEngine(d, config(
        sh_w("a", "sleep", d),
        sh_w("i", "ignore", d),
        grand_w("g", d),
        py_w("p")))
    a = wait_starts(d, "a", 1, 5.0)
    i = wait_starts(d, "i", 1, 5.0)
    g = wait_starts(d, "g", 1, 5.0)
    ppid = worker_pid(e.port, "p", 8.0)
    child = wait_until(lambda: (read_file(os.path.join(d, "g.child")) or "").strip(), 3.0)
    check(a and i and g and child, "workers did not start")
    child = int(child)
    kids = children_of(e.proc.pid)
    time.sleep(0.2)
    t0 = time.time()
    os.kill(e.proc.pid, signal.SIGKILL)
    e.wait_exit(3.0)
    fast = groups_gone([a[0][0], g[0][0], ppid], 1.0)
    left = groups_gone([a[0][0], i[0][0], g[0][0], ppid], max(0.1, 2.5 - (time.time() - t0)))
    check(not fast, "workers that exit on SIGTERM still run 1 s after the engine was SIGKILLed: %r" % fast)
    check(not left, "worker groups still alive %.1f s after the engine was SIGKILLed: %r"
          % (time.time() - t0, left))
    check(not alive(child), "the grandchild %d survives" % child)
    check(wait_until(lambda: not [k for k in kids if alive(k)], 1.0),
          "processes the engine started survive it (the sentinel?): %r" % [k for k in kids if alive(k)])


# =============================================================================================
# start-up

@test
def startup_missing_config_uses_defaults():
    d = mkdir()
    e = SupEngine(d, None)
    check(re.search(r"built-in defaults", e.stderr()), "stderr does not mention built-in defaults: %r"
          % e.stderr()[:300])
    check("functions" in result(e.port, "engine::functions::list", {}), "engine does not serve")
    check(not os.path.exists(e.cfg), "the engine wrote a config file")
    with open(e.cfg, "w") as f:  # README: an engine started without a config file does not watch
        f.write(config(sh_w("late", "sleep", d)))
    time.sleep(1.3)
    check(not starts(d, "late"), "a config file created after start-up was loaded")
    check(e.stop() == 0, "exit status %r" % e.proc.returncode)
    no_sanitizer(e)


def _run_engine(args, timeout=5.0, env=None):
    en = dict(os.environ)
    if env:
        en.update(env)
    p = subprocess.Popen([BIN] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=en,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGTERM)
        out, err = p.communicate(5)
        return None, out.decode(), err.decode()
    return p.returncode, out.decode(), err.decode()


@test
def startup_invalid_config_exits_with_position():
    d = mkdir()
    cases = [
        (config(sh_w("a", "sleep", d)) + "bogus: 1\n", r"config\.yaml:4:1: .*bogus"),
        (config(sh_w("a", "sleep", d), "  - name: nocmd\n    env: { A: \"1\" }\n"),
         r"config\.yaml:4:5: .*command"),
        (config(sh_w("a", "sleep", d)) + "  - name: [x\n", r"config\.yaml:\d+:\d+: "),
        (config(sh_w("a", "sleep", d), "  - name: v\n    command: \"${%s}\"\n" % UNSET_VAR),
         r"config\.yaml:\d+:\d+: .*%s" % UNSET_VAR),
        (config(sh_w("a", "sleep", d), "  - name: r\n    command: x\n    restart: sometimes\n"),
         r"config\.yaml:6:\d+: .*restart"),
    ]
    path = os.path.join(d, "config.yaml")
    for text, pat in cases:
        with open(path, "w") as f:
            f.write(text)
        rc, out, err = _run_engine(["-c", path, "--port", "0"])
        check(rc == 1, "invalid config %r: exit status %r, want 1 (stderr %r)" % (text[-40:], rc, err))
        check(re.search(pat, err), "stderr %r does not match %r" % (err, pat))
        check("listening" not in out, "the engine listened with an invalid config")
        check(not starts(d, "a"), "a worker was started from an invalid config")


@test
def startup_port_in_use_exits():
    d = mkdir()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    try:
        with open(os.path.join(d, "config.yaml"), "w") as f:
            f.write(config(sh_w("a", "sleep", d)))
        rc, out, err = _run_engine(["-c", os.path.join(d, "config.yaml"), "--port", str(port)])
        check(rc == 1, "port in use: exit status %r, want 1 (stderr %r)" % (rc, err))
        check(str(port) in err or "in use" in err, "the message does not say what failed: %r" % err)
        time.sleep(0.2)
        check(not starts(d, "a"), "a worker was started although the engine could not listen")
    finally:
        s.close()


# =============================================================================================
# the CLI client

_cli_eng = {}


def cli_engine():
    if "e" in _cli_eng:
        return _cli_eng["e"]
    d = mkdir()
    _tmpdirs.remove(d)
    e = SupEngine(d, config(py_w("cli"), py_w("nsw", ['env: { PYW_NAMESPACE: "ns1" }'])))
    _engines.remove(e)
    _cli_eng.update(e=e, d=d, groups=set())
    _cli_eng["groups"].add(worker_pid(e.port, "cli", 8.0))
    r = wait_until(lambda: iii("trigger", "w::nsw", "--namespace", "ns1", "--url", e.url)[0] == 0, 8.0, 0.1)
    check(r, "worker nsw never became callable in namespace ns1")
    return e


def jparse(s, what):
    try:
        return json.loads(s)
    except ValueError as ex:
        raise Fail("%s is not JSON (%s): %r" % (what, ex, s[:300]))


@test
def cli_trigger_success():
    e = cli_engine()
    payload = {"x": [1, {"y": "z"}], "n": -0.5, "s": "é\u2603"}
    rc, out, err, _ = iii("trigger", "w::cli", json.dumps(payload), "--url", e.url)
    check(rc == 0, "exit %r, stderr %r" % (rc, err))
    check(out.endswith("\n") and out.count("\n") == 1, "stdout is not one line: %r" % out[:200])
    r = jparse(out, "stdout")
    data = dict(r["data"])
    data.pop("_caller_worker_id", None)
    check(data == payload, "payload arrived as %r" % r["data"])
    check(r["name"] == "cli", "answer from %r" % r["name"])
    rc, out, err, _ = iii("trigger", "w::cli", "--url", e.url)
    check(rc == 0, "no payload: exit %r, stderr %r" % (rc, err))
    data = jparse(out, "stdout")["data"]
    check(isinstance(data, dict) and set(data) <= {"_caller_worker_id"}, "default payload arrived as %r" % data)
    rc, out, err, _ = iii("trigger", "engine::functions::list", "{}", "--url", e.url)
    check(rc == 0, "engine::functions::list: exit %r" % rc)
    ids = [f["function_id"] for f in jparse(out, "stdout")["functions"]]
    check("w::cli" in ids, "w::cli not listed: %r" % ids)
    rc, out, err, _ = iii("trigger", "w::cli", "[1,2,3]", "--url", e.url)
    check(rc == 0 and jparse(out, "stdout")["data"] == [1, 2, 3], "array payload: rc %r out %r" % (rc, out))


@test
def cli_trigger_function_not_found():
    e = cli_engine()
    rc, out, err, _ = iii("trigger", "no::such::fn", "{}", "--url", e.url)
    check(rc == 1, "exit %r, want 1" % rc)
    check(err.startswith("iii: error: function_not_found: "), "stderr %r" % err)
    # README: the error is also printed as {"error":...} on stdout for `trigger`
    check(jparse(out, "stdout").get("error", {}).get("code") == "function_not_found", "stdout %r" % out)
    rc, out, err, _ = iii("trigger", "no::such::fn", "--json", "--url", e.url)
    check(rc == 1, "--json: exit %r" % rc)
    check(jparse(out, "--json stdout").get("error", {}).get("code") == "function_not_found", "stdout %r" % out)


@test
def cli_trigger_worker_error():
    e = cli_engine()
    rc, out, err, _ = iii("trigger", "w::cli::fail", "--url", e.url)
    check(rc == 1, "exit %r, want 1" % rc)
    check(err == "iii: error: boom_code: boom message\n", "stderr %r" % err)


@test
def cli_trigger_unreachable_exit_3():
    port = free_port()
    rc, out, err, took = iii("trigger", "w::cli", "{}", "--url", "ws://127.0.0.1:%d" % port)
    check(rc == 3, "unreachable engine: exit %r, want 3 (stderr %r)" % (rc, err))
    check(err.startswith("iii: error: "), "stderr %r" % err)
    check(took < 5.0, "took %.1f s" % took)
    rc, out, err, _ = iii("list", "functions", "--url", "ws://127.0.0.1:%d" % port)
    check(rc == 3, "list against an unreachable engine: exit %r, want 3" % rc)


@test
def cli_bad_payload_and_usage_exit_2():
    url = "ws://127.0.0.1:%d" % free_port()  # exit 2 must come before any connection attempt
    for args in (["trigger", "w::cli", "{bad json", "--url", url],
                 ["trigger", "w::cli", "{\"a\":1} trailing", "--url", url],
                 ["trigger", "w::cli", "", "--url", url]):
        rc, out, err, _ = iii(*args)
        check(rc == 2, "%r: exit %r, want 2 (stderr %r)" % (args[2], rc, err))
        check("JSON" in err or "json" in err, "%r: stderr does not name the problem: %r" % (args[2], err))
    for args in (["trigger"], ["trigger", "a", "{}", "extra"], ["list"], ["list", "bogus"],
                 ["list", "functions", "extra"], ["trigger", "x", "--timeout", "abc"],
                 ["trigger", "x", "--timeout", "0"], ["trigger", "x", "--no-such-flag"]):
        rc, out, err, _ = iii(*(args + ["--url", url]))
        check(rc == 2, "%r: exit %r, want 2 (stderr %r)" % (args, rc, err))


@test
def cli_list_tables():
    e = cli_engine()
    rc, out, err, _ = iii("list", "functions", "--url", e.url)
    check(rc == 0, "exit %r stderr %r" % (rc, err))
    rows = [l.split("\t") for l in out.splitlines()]
    check(rows and rows[0] == ["FUNCTION_ID", "NAMESPACE", "WORKER_NAME", "DESCRIPTION"], "header %r" % rows[:1])
    check(["w::cli", "default", "cli", "test w::cli"] in rows, "no row for w::cli: %r" % rows)
    check(["w::nsw", "ns1", "nsw", "test w::nsw"] in rows, "no row for w::nsw in ns1: %r" % rows)
    check(all(len(r) == 4 for r in rows), "ragged rows: %r" % rows)
    rc, out, err, _ = iii("list", "workers", "--url", e.url)
    check(rc == 0, "workers: exit %r" % rc)
    rows = [l.split("\t") for l in out.splitlines()]
    check(rows[0] == ["NAME", "ID", "NAMESPACE", "RUNTIME", "FUNCTION_COUNT", "STATUS"], "header %r" % rows[:1])
    cli = [r for r in rows if r[0] == "cli"]
    check(len(cli) == 1 and cli[0][2:] == ["default", "python", "3", "connected"], "cli row %r" % cli)
    nsw = [r for r in rows if r[0] == "nsw"]
    check(len(nsw) == 1 and nsw[0][2] == "ns1", "nsw row %r" % nsw)
    for kind, head in (("triggers", ["ID", "NAMESPACE", "WORKER_NAME", "DESCRIPTION"]),
                       ("registered-triggers", ["ID", "TRIGGER_TYPE", "FUNCTION_ID", "WORKER_NAME",
                                                "CONFIG_SUMMARY"])):
        rc, out, err, _ = iii("list", kind, "--url", e.url)
        check(rc == 0, "%s: exit %r stderr %r" % (kind, rc, err))
        check(out.splitlines()[0].split("\t") == head, "%s header %r" % (kind, out.splitlines()[:1]))


@test
def cli_list_json():
    e = cli_engine()
    for kind, key in (("functions", "functions"), ("workers", "workers"), ("triggers", "triggers"),
                      ("registered-triggers", "registered_triggers")):
        rc, out, err, _ = iii("list", kind, "--json", "--url", e.url)
        check(rc == 0, "%s --json: exit %r stderr %r" % (kind, rc, err))
        v = jparse(out, kind + " --json")
        check(isinstance(v.get(key), list), "%s --json: no %r list: %r" % (kind, key, out[:200]))
    ws = jparse(iii("list", "workers", "--json", "--url", e.url)[1], "workers")["workers"]
    names = [w.get("name") for w in ws]
    check("cli" in names and "nsw" in names, "workers %r" % names)


@test
def cli_iii_url_env_default():
    e = cli_engine()
    rc, out, err, _ = iii("list", "functions", "--json", env={"III_URL": e.url})
    check(rc == 0, "III_URL only: exit %r stderr %r" % (rc, err))
    check("w::cli" in [f["function_id"] for f in jparse(out, "stdout")["functions"]], "w::cli missing")
    rc, out, err, _ = iii("trigger", "w::cli", env={"III_URL": e.url})
    check(rc == 0, "trigger with III_URL only: exit %r stderr %r" % (rc, err))
    bad = "ws://127.0.0.1:%d" % free_port()
    rc, out, err, _ = iii("trigger", "w::cli", "--url", e.url, env={"III_URL": bad})
    check(rc == 0, "--url does not win over III_URL: exit %r stderr %r" % (rc, err))


@test
def cli_timeout_bounds_call():
    e = cli_engine()
    rc, out, err, took = iii("trigger", "w::cli::hang", "{}", "--timeout", "500", "--url", e.url, timeout=10)
    check(rc == 3, "a call that never answers: exit %r, want 3 (did not answer in time); stderr %r"
          % (rc, err))
    check(0.4 <= took <= 2.5, "--timeout 500 returned after %.2f s" % took)
    check(err.startswith("iii: error: ") and "timed out" in err, "stderr %r" % err)
    # the engine and the worker are fine afterwards
    rc, out, err, _ = iii("trigger", "w::cli", "--url", e.url)
    check(rc == 0, "the engine no longer answers after a timed-out CLI call: %r" % err)


@test
def cli_namespace_option():
    e = cli_engine()
    rc, out, err, _ = iii("trigger", "w::nsw", "--namespace", "ns1", "--url", e.url)
    check(rc == 0 and jparse(out, "stdout")["name"] == "nsw", "ns1: exit %r out %r err %r" % (rc, out, err))
    rc, out, err, _ = iii("trigger", "w::nsw", "--namespace", "ns2", "--url", e.url)
    check(rc == 1 and err.startswith("iii: error: function_not_found: "), "ns2: exit %r err %r" % (rc, err))
    rc, out, err, _ = iii("trigger", "w::nsw", "--url", e.url)
    check(rc == 1 and "function_not_found" in err, "no --namespace (= default): exit %r err %r" % (rc, err))


@test
def cli_client_not_listed_as_worker():
    e = cli_engine()
    ws = jparse(iii("list", "workers", "--json", "--url", e.url)[1], "workers")["workers"]
    check(all(w.get("runtime") != "python" or w.get("name") in ("cli", "nsw") for w in ws),
          "unexpected workers %r" % [w.get("name") for w in ws])
    check(not [w for w in ws if w.get("runtime") not in ("python", "engine")],
          "the CLI client shows up in the worker registry: %r" % ws)


def main():
    if not os.path.exists(BIN):
        print("skip - e2e_supervisor: engine binary %s not found (set III_BIN)" % BIN)
        return 0
    t0 = time.time()
    try:
        rc = suite.run()
    finally:
        stop_shared()
        _cleanup()
    sys.stderr.write("e2e_supervisor: %.1f s\n" % (time.time() - t0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
