#!/usr/bin/env python3
"""The command-line surface: `iii serve`, the shipped hello example, `iii watch`, payloads from
stdin and files, `iii list` filters, `iii info`, `iii ps` (engine::processes::list), help texts and
exit codes, near-miss suggestions, `iii --check`, config warnings, reload logging and
`on_invalid_reload: keep`, log format (timestamps, JSON), per-function /metrics series.

One test per behaviour; each starts its own engine on 127.0.0.1 with --port 0 (where it can) and
stops every process it started by pid or process group. Every wait is bounded.

Run: python3 tests/test_cli.py     (III_BIN=path/to/iii, III_TEST_ONLY=substring)
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
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wslib  # noqa: E402
from wslib import WS, Suite, Closed  # noqa: E402

BIN = os.path.abspath(wslib.BIN)
ROOT = wslib.ROOT
PY = sys.executable
HAVE_PROC = os.path.isdir("/proc/self/fd")

suite = Suite()
_engines = []   # Eng objects started by the running test
_procs = []     # Popen objects (own session) started by the running test
_groups = set()  # process groups learned by the running test (killed at its end if still alive)
_workers = []   # PyWorker objects
_tmpdirs = []


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


SAN = re.compile(r"AddressSanitizer|LeakSanitizer|runtime error:")


def test(fn):
    @functools.wraps(fn)
    def run():
        try:
            r = fn()
            # the sanitizer build (test.sh): a report from any engine or client this test ran fails it
            logs = [(x.logpath, "engine") for x in _engines] + \
                   [(getattr(x, "errpath", None), "iii %s" % " ".join(map(str, x.args[1:3])))
                    for x in _procs]
            for x in list(_engines):
                x.stop()
            for x in list(_procs):
                stop_proc(x)
            for path, what in logs:
                rep = [l for l in readf(path).splitlines() if SAN.search(l)] if path else []
                check(not rep, "%s sanitizer report: %s" % (what, rep[0] if rep else ""))
            return r
        finally:
            _cleanup()
    return suite.test(run)


def _cleanup():
    while _workers:
        try:
            _workers.pop().close()
        except Exception:  # noqa: BLE001
            pass
    while _procs:
        p = _procs.pop()
        stop_proc(p)
    while _engines:
        e = _engines.pop()
        try:
            e.stop()
        except Exception:  # noqa: BLE001
            pass
    for g in list(_groups):
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    _groups.clear()
    while _tmpdirs:
        shutil.rmtree(_tmpdirs.pop(), ignore_errors=True)


def stop_proc(p, sig=signal.SIGTERM, timeout=3.0):
    """Stops a process started in its own session: sig, then SIGKILL to its group. Returns rc."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(3)
    except subprocess.TimeoutExpired:
        return None
    return p.returncode


def mkdir():
    d = os.path.realpath(tempfile.mkdtemp(prefix="iii-cli-"))
    _tmpdirs.append(d)
    return d


def wait_until(pred, timeout, step=0.03):
    deadline = time.time() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.time() >= deadline:
            return None
        time.sleep(step)


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if HAVE_PROC:
        try:
            with open("/proc/%d/stat" % pid) as f:
                st = f.read().rsplit(")", 1)[1].split()[0]
            return st not in ("Z", "X")
        except OSError:
            return False
    return True


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def clean_env(extra=None):
    e = dict(os.environ)
    for k in ("III_URL", "III_LOG", "III_LOG_FORMAT", "III_NAMESPACE"):
        e.pop(k, None)
    if extra:
        e.update(extra)
    return e


# ---------------------------------------------------------------------------------------------
# engines

class Eng:
    """An engine process (own session). config: YAML text written to DIR/config.yaml (None = no
    file). port_arg: pass --port 0 (else the config decides). Reads `listening on` from stdout."""

    def __init__(self, config=None, args=(), env=None, d=None, port_arg=True, cfg_arg=True,
                 cwd=None, binary=None, start_timeout=10.0, wait_listen=True):
        self.d = d or mkdir()
        self.cfg = os.path.join(self.d, "config.yaml")
        if config is not None:
            with open(self.cfg, "w") as f:
                f.write(config)
        self.logpath = os.path.join(self.d, "engine-%d.log" % len(os.listdir(self.d)))
        self.log = open(self.logpath, "wb")
        argv = [binary or BIN]
        if cfg_arg:
            argv += ["-c", self.cfg]
        if port_arg:
            argv += ["--port", "0"]
        argv += list(args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log,
                                     stdin=subprocess.DEVNULL, env=clean_env(env),
                                     start_new_session=True, cwd=cwd or self.d)
        _engines.append(self)
        self.lines = []
        self.port = None
        self._listen = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if wait_listen:
            self._listen.wait(start_timeout)
            if self.port is None:
                self.stop()
                raise Fail("engine did not report a listening port; stderr: %r" % self.stderr()[-800:])
            self.url = "ws://127.0.0.1:%d" % self.port

    def _drain(self):
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                s = line.decode("utf-8", "replace")
                self.lines.append(s)
                m = re.search(r"listening on ws://127\.0\.0\.1:(\d+)", s)
                if m and self.port is None:
                    self.port = int(m.group(1))
                    self._listen.set()
        self._listen.set()

    def alive(self):
        return self.proc.poll() is None

    def stderr(self):
        try:
            self.log.flush()
        except ValueError:
            pass
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        rc = stop_proc(self.proc, sig, timeout)
        try:
            self.log.close()
        except Exception:  # noqa: BLE001
            pass
        return rc

    def write_config(self, text):
        tmp = self.cfg + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, self.cfg)


def listener(port=None, extra=""):
    s = "workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n"
    if port is not None:
        s += "      port: %d\n" % port
    return s + extra


# ---------------------------------------------------------------------------------------------
# talking to the engine

def rpc(port, fid, data=None, timeout=5.0, namespace=None):
    """One call from a fresh connection; returns the invocationresult frame."""
    ws = WS(port, timeout=timeout)
    try:
        m = ws.recv_json(timeout)
        check(m.get("type") == "workerregistered", "first frame %r" % (m,))
        iid = str(uuid.uuid4())
        msg = {"type": "invokefunction", "invocation_id": iid, "function_id": fid,
               "data": {} if data is None else data}
        if namespace:
            msg["namespace"] = namespace
        ws.send_json(msg)
        r, _ = ws.recv_json_until(lambda x: x.get("type") == "invocationresult"
                                  and x.get("invocation_id") == iid, timeout)
        return r
    finally:
        ws.close()


def result(port, fid, data=None, timeout=5.0, namespace=None):
    r = rpc(port, fid, data, timeout, namespace)
    check("error" not in r, "%s answered an error: %r" % (fid, r.get("error")))
    return r.get("result")


def functions(port, internal=True):
    """[(function_id, namespace), ...] from engine::functions::list."""
    r = result(port, "engine::functions::list", {"include_internal": internal})
    return [(f["function_id"], f.get("namespace", "default")) for f in r["functions"]]


def wait_function(port, fid, namespace="default", timeout=6.0, proc=None):
    """Waits until fid is registered in namespace; gives up early when proc (the process that
    should register it) has exited."""
    def has():
        if proc is not None and proc.poll() is not None:
            return "gone"
        try:
            return (fid, namespace) in functions(port)
        except (OSError, TimeoutError, Closed, Fail):
            return False
    r = wait_until(has, timeout, 0.05)
    check(r is True, "%s (namespace %s) never got registered%s" % (
        fid, namespace, " (its process exited)" if r == "gone" else " within %.0f s" % timeout))


def workers(port):
    return result(port, "engine::workers::list", {})["workers"]


def iii(*args, env=None, timeout=20.0, stdin=None, cwd=None):
    """Runs the CLI; returns (rc, stdout, stderr, seconds). rc None = had to be killed."""
    t0 = time.time()
    p = subprocess.Popen([BIN] + [str(a) for a in args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin is not None
                         else subprocess.DEVNULL, env=clean_env(env), start_new_session=True,
                         cwd=cwd)
    try:
        out, err = p.communicate(stdin.encode() if isinstance(stdin, str) else stdin, timeout)
        rc = p.returncode
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = p.communicate(timeout=5)
        rc = None
    return rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), time.time() - t0


def jparse(s, what):
    try:
        return json.loads(s)
    except ValueError as ex:
        raise Fail("%s is not JSON (%s): %r" % (what, ex, s[:300]))


def http_get(port, path, timeout=5.0):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=timeout) as r:
        return r.status, r.read().decode("utf-8", "replace")


class PyWorker:
    """An SDK-like worker on a thread: registers functions, then announces (name, runtime python,
    pid, namespace). handler(fid, data) returns ("result", v) or ("error", {...}) or None (no
    answer). Default: {"fid":fid,"data":data}."""

    def __init__(self, port, name, fids=(), namespace=None, handler=None, descriptions=None,
                 announce=True):
        self.ws = WS(port, timeout=10)
        m = self.ws.recv_json(5)
        check(m.get("type") == "workerregistered", "first frame %r" % (m,))
        self.worker_id = m["worker_id"]
        self.name = name
        self.handler = handler or (lambda fid, data: ("result", {"fid": fid, "data": data}))
        self.lock = threading.Lock()
        for fid in fids:
            fr = {"type": "registerfunction", "id": fid}
            if descriptions and fid in descriptions:
                fr["description"] = descriptions[fid]
            self.send(fr)
        if announce:
            data = {"runtime": "python", "version": "0", "name": name, "os": "linux",
                    "pid": os.getpid()}
            if namespace:
                data["namespace"] = namespace
            self.send({"type": "invokefunction", "function_id": "engine::workers::register",
                       "data": data, "action": {"type": "void"}})
        self.halt = False
        self.t = threading.Thread(target=self._loop, daemon=True)
        self.t.start()
        _workers.append(self)

    def send(self, obj):
        with self.lock:
            self.ws.send_json(obj)

    def _loop(self):
        while not self.halt:
            try:
                msg = self.ws.recv_json(0.5)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - closed or torn down
                return
            if msg.get("type") != "invokefunction" or not msg.get("invocation_id"):
                continue
            fid = msg.get("function_id")
            r = self.handler(fid, msg.get("data"))
            if r is None:
                continue
            reply = {"type": "invocationresult", "invocation_id": msg["invocation_id"],
                     "function_id": fid, r[0]: r[1]}
            try:
                self.send(reply)
            except OSError:
                return

    def close(self):
        self.halt = True
        try:
            with self.lock:
                self.ws.send_frame(8, b"\x03\xe8")
        except OSError:
            pass
        self.t.join(2)
        self.ws.close()


def spawn(argv, env=None, cwd=None, out=None):
    """Starts argv in its own session; stdout/stderr to files in a temp dir. Tracked."""
    d = mkdir()
    so = open(os.path.join(d, "stdout"), "wb")
    se = open(os.path.join(d, "stderr"), "wb")
    p = subprocess.Popen([str(a) for a in argv], stdout=out or so, stderr=se,
                         stdin=subprocess.DEVNULL, env=clean_env(env), cwd=cwd,
                         start_new_session=True)
    so.close()
    se.close()
    p.outpath = os.path.join(d, "stdout")
    p.errpath = os.path.join(d, "stderr")
    _procs.append(p)
    return p


def readf(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def serve(eng, fid, cmd, opts=(), url=None, wait=True, namespace="default"):
    """`iii serve FID OPTS --url URL -- CMD...` against eng; waits until FID is registered."""
    p = spawn([BIN, "serve", fid] + list(opts) + ["--url", url or eng.url, "--"] + list(cmd))
    if wait:
        try:
            wait_function(eng.port, fid, namespace, 6.0, p)
        except Fail as ex:
            raise Fail("%s; serve exit %r, serve stderr %r" % (ex, p.poll(), readf(p.errpath)[-500:]))
    return p


def sh(script):
    return ["sh", "-c", script]


def calls(port, fid, datas, timeout=10.0, namespace=None):
    """Pipelines one call per element of datas on one connection; returns the results in order
    and the elapsed seconds."""
    ws = WS(port, timeout=timeout)
    try:
        m = ws.recv_json(5)
        check(m.get("type") == "workerregistered", "first frame %r" % (m,))
        ids = [str(uuid.uuid4()) for _ in datas]
        t0 = time.time()
        for iid, d in zip(ids, datas):
            msg = {"type": "invokefunction", "invocation_id": iid, "function_id": fid, "data": d}
            if namespace:
                msg["namespace"] = namespace
            ws.send_json(msg)
        got = {}
        deadline = time.time() + timeout
        while len(got) < len(ids):
            r = ws.recv_json(max(0.01, deadline - time.time()))
            if r.get("type") == "invocationresult" and r.get("invocation_id") in ids:
                got[r["invocation_id"]] = r
        return [got[i] for i in ids], time.time() - t0
    finally:
        ws.close()


# =============================================================================================
# 1. iii serve

@test
def serve_stdout_json_result():
    e = Eng(listener())
    serve(e, "t::echo", ["cat"])
    r = rpc(e.port, "t::echo", [1, "two", {"three": 3}])
    check(r.get("result") == [1, "two", {"three": 3}], "stdin did not come back as the result: %r" % r)
    # an object payload: the data value (with the engine's _caller_worker_id) is what stdin gets
    r = rpc(e.port, "t::echo", {"a": {"b": [True, None]}})
    res = r.get("result")
    check(isinstance(res, dict) and res.get("a") == {"b": [True, None]},
          "object payload came back as %r" % r)
    # the CLI prints the raw result JSON
    rc, out, err, _ = iii("trigger", "t::echo", "[1,2]", "--url", e.url)
    check(rc == 0 and out == "[1,2]\n", "iii trigger: rc %r out %r err %r" % (rc, out, err))


@test
def serve_stdout_trailing_whitespace_trimmed():
    e = Eng(listener())
    serve(e, "t::ws", sh("printf '{\"a\": 1}  \\n\\n\\t '"))
    r = rpc(e.port, "t::ws", {})
    check(r.get("result") == {"a": 1}, "JSON with trailing white space: %r" % r)


@test
def serve_non_json_stdout_is_string():
    e = Eng(listener())
    serve(e, "t::txt", sh("printf 'hello world\\n'"))
    serve(e, "t::txt2", sh("printf 'not json {\\n'"))
    serve(e, "t::txt3", sh("printf 'two\\nlines\\n'"))
    r = rpc(e.port, "t::txt", {})
    check(r.get("result") == "hello world", "plain text: %r" % r)
    r = rpc(e.port, "t::txt2", {})
    check(r.get("result") == "not json {", "invalid JSON text: %r" % r)
    r = rpc(e.port, "t::txt3", {})
    check(r.get("result") == "two\nlines", "two lines: %r" % r)


@test
def serve_env_function_and_invocation_id():
    e = Eng(listener())
    serve(e, "t::env", sh('printf "%s|%s" "$III_FUNCTION_ID" "$III_INVOCATION_ID"'))
    ws = WS(e.port)
    try:
        ws.recv_json(5)
        iid = str(uuid.uuid4())
        ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": "t::env",
                      "data": {}})
        r, _ = ws.recv_json_until(lambda x: x.get("invocation_id") == iid, 10)
    finally:
        ws.close()
    check(r.get("result") == "t::env|" + iid,
          "want \"t::env|<the call's invocation_id>\", got %r" % (r,))


@test
def serve_error_stderr_message():
    e = Eng(listener())
    serve(e, "t::fail", sh("echo some output; echo '  oops: it broke  ' >&2; echo >&2; exit 3"))
    r = rpc(e.port, "t::fail", {})
    check(r.get("error") == {"code": "invocation_failed", "message": "oops: it broke"},
          "want invocation_failed with the trimmed stderr, got %r" % (r,))
    rc, out, err, _ = iii("trigger", "t::fail", "--url", e.url)
    check(rc == 1 and "invocation_failed" in err and "oops: it broke" in err,
          "iii trigger: rc %r err %r" % (rc, err))


@test
def serve_error_exit_status_message():
    e = Eng(listener())
    serve(e, "t::exit7", sh("echo out only; exit 7"))
    r = rpc(e.port, "t::exit7", {})
    check(r.get("error") == {"code": "invocation_failed", "message": "exited with status 7"},
          "want invocation_failed / exited with status 7, got %r" % (r,))


@test
def serve_namespace_option():
    e = Eng(listener())
    serve(e, "t::nsf", sh("printf ns-ok"), ["--namespace", "ns1"], namespace="ns1")
    check(("t::nsf", "default") not in functions(e.port), "t::nsf is registered in default too")
    r = rpc(e.port, "t::nsf", {}, namespace="ns1")
    check(r.get("result") == "ns-ok", "call in ns1: %r" % r)
    ws = [w for w in workers(e.port) if w.get("name") == "serve:t::nsf"]
    check(ws and ws[0].get("namespace") == "ns1", "serve worker not listed in ns1: %r" % ws)


@test
def serve_worker_listed_name_runtime_pid():
    e = Eng(listener())
    p1 = serve(e, "t::a", sh("printf a"))
    p2 = serve(e, "t::b", sh("printf b"), ["--name", "my-serve", "--description", "says b"])
    ws = {w.get("name"): w for w in workers(e.port)}
    check("serve:t::a" in ws, "default name serve:t::a not in workers::list: %r" % sorted(map(str, ws)))
    check("my-serve" in ws, "--name my-serve not in workers::list: %r" % sorted(map(str, ws)))
    for name, p in (("serve:t::a", p1), ("my-serve", p2)):
        w = ws[name]
        check(w.get("runtime") == "iii-serve", "%s runtime %r" % (name, w.get("runtime")))
        info = result(e.port, "engine::workers::info", {"name": name})["worker"]
        check(info.get("pid") == p.pid, "%s pid %r, serve pid is %d" % (name, info.get("pid"), p.pid))
    fl = result(e.port, "engine::functions::list", {})["functions"]
    fb = [f for f in fl if f["function_id"] == "t::b"]
    check(fb and fb[0].get("worker_name") == "my-serve", "t::b row %r" % fb)
    check(fb[0].get("description") == "says b", "--description not the function's description: %r" % fb)
    rc, out, err, _ = iii("list", "workers", "--url", e.url)
    rows = [l.split("\t") for l in out.splitlines()]
    check(any(r[0] == "serve:t::a" and "iii-serve" in r for r in rows),
          "`iii list workers` has no serve:t::a row: %r" % out)


@test
def serve_concurrency_limit():
    e = Eng(listener())
    serve(e, "t::c2", sh("sleep 0.5; printf done"), ["--concurrency", "2"])
    res, took = calls(e.port, "t::c2", [{}] * 6)
    check(all(r.get("result") == "done" for r in res), "results %r" % res)
    # 6 calls, 2 at a time, 0.5 s each: three waves (1.5 s); 3 at a time would be 1.0 s
    check(1.4 <= took < 2.8, "6 calls with --concurrency 2 took %.2f s (want ~1.5)" % took)


@test
def serve_concurrency_default_4():
    e = Eng(listener())
    serve(e, "t::c4", sh("sleep 0.5; printf done"))
    res, took = calls(e.port, "t::c4", [{}] * 4)
    check(all(r.get("result") == "done" for r in res), "results %r" % res)
    check(took < 0.95, "4 calls with the default concurrency took %.2f s (not all at once)" % took)
    res, took = calls(e.port, "t::c4", [{}] * 5)
    check(all(r.get("result") == "done" for r in res), "results %r" % res)
    check(took >= 0.95, "5 calls with the default concurrency took %.2f s (more than 4 at once)" % took)


@test
def serve_busy_after_1000_waiting():
    e = Eng(listener())
    d = mkdir()
    serve(e, "t::slow", sh("echo $$ >> %s/pids; exec sleep 6" % d), ["--concurrency", "1", "--timeout", "0"])
    ws = WS(e.port, timeout=10)
    try:
        ws.recv_json(5)
        first = str(uuid.uuid4())
        ws.send_json({"type": "invokefunction", "invocation_id": first, "function_id": "t::slow",
                      "data": {}})
        check(wait_until(lambda: readf(d + "/pids").strip(), 5), "the first call never started")
        for pid in readf(d + "/pids").split():
            _groups.add(int(pid))
        ids = [str(uuid.uuid4()) for _ in range(1003)]
        for iid in ids:
            ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": "t::slow",
                          "data": {}})
        busy, other = [], []
        deadline = time.time() + 2.0
        while time.time() < deadline:
            try:
                r = ws.recv_json(max(0.01, deadline - time.time()))
            except TimeoutError:
                break
            if r.get("type") != "invocationresult":
                continue
            if (r.get("error") or {}).get("code") == "BUSY":
                busy.append(r["invocation_id"])
            else:
                other.append(r)
        # 1 running + 1000 waiting: the last 3 of 1003 more get BUSY, at once
        check(len(busy) == 3, "%d BUSY answers (want 3: 1 running, 1000 waiting); other answers %r"
              % (len(busy), other[:3]))
        check(set(busy) == set(ids[-3:]), "BUSY went to other calls than the last three")
        check(not other, "unexpected answers while the first call runs: %r" % other[:3])
    finally:
        ws.close()
        for pid in readf(d + "/pids").split():
            _groups.add(int(pid))


@test
def serve_timeout_kills_process_group():
    e = Eng(listener())
    d = mkdir()
    serve(e, "t::hang", sh("echo $$ > %s/pid; sleep 30 & echo $! > %s/child; wait" % (d, d)),
          ["--timeout", "300"])
    t0 = time.time()
    r = rpc(e.port, "t::hang", {}, timeout=10)
    took = time.time() - t0
    pid, child = readf(d + "/pid").strip(), readf(d + "/child").strip()
    for x in (pid, child):
        if x:
            _groups.add(int(x))
    check(r.get("error") == {"code": "invocation_timeout",
                             "message": "Invocation timed out after 300 ms"},
          "want invocation_timeout, got %r" % (r,))
    check(0.25 <= took < 3.0, "the timeout answered after %.2f s (--timeout 300)" % took)
    check(pid and child, "the command did not record its pids")
    gone = wait_until(lambda: not alive(int(pid)) and not alive(int(child)), 3.0)
    check(gone, "after the timeout still alive: sh %s %s, background sleep %s %s"
          % (pid, alive(int(pid)), child, alive(int(child))))


@test
def serve_reconnects_after_engine_restart():
    e = Eng(listener())
    port = e.port
    p = serve(e, "t::rc", sh("printf back"))
    check(rpc(port, "t::rc", {}).get("result") == "back", "first call failed")
    check(e.stop() == 0, "engine did not stop cleanly")
    time.sleep(0.3)
    check(p.poll() is None, "iii serve exited when the engine went away (rc %r, stderr %r)"
          % (p.poll(), readf(p.errpath)[-300:]))
    e2 = Eng(listener(), args=["--port", str(port)], port_arg=False)
    check(e2.port == port, "restarted engine on port %r, want %d" % (e2.port, port))
    wait_function(port, "t::rc", "default", 12.0)
    r = rpc(port, "t::rc", {})
    check(r.get("result") == "back", "after reconnect: %r" % r)
    check(any(w.get("name") == "serve:t::rc" for w in workers(port)), "not re-announced")


@test
def serve_sigterm_sigint_exit_0():
    e = Eng(listener())
    for sig in (signal.SIGTERM, signal.SIGINT):
        p = serve(e, "t::sig%d" % sig, sh("printf x"))
        p.send_signal(sig)
        try:
            rc = p.wait(5)
        except subprocess.TimeoutExpired:
            rc = "still running after 5 s"
        check(rc == 0, "iii serve after signal %d: exit %r" % (sig, rc))


@test
def serve_help():
    rc, out, err, _ = iii("serve", "--help", timeout=5)
    check(rc == 0, "iii serve --help: exit %r stderr %r" % (rc, err))
    for w in ("serve", "--namespace", "--url", "--name", "--description", "--concurrency",
              "--timeout", "--"):
        check(w in out, "iii serve --help does not mention %r: %r" % (w, out[:500]))


# =============================================================================================
# 2. the shipped config.yaml and examples/shell

NO_RUNTIMES = re.compile(r"^(python.*|pip.*|pydoc.*|node.*|nodejs|npm|npx|corepack|deno|bun)$")


def runtime_free_path(d):
    """A directory of symlinks to /usr/bin and /bin minus python and node (and friends)."""
    b = os.path.join(d, "bin")
    os.mkdir(b)
    for src in ("/usr/local/bin", "/usr/bin", "/bin"):
        if not os.path.isdir(src):
            continue
        for n in os.listdir(src):
            if NO_RUNTIMES.match(n) or os.path.lexists(os.path.join(b, n)):
                continue
            os.symlink(os.path.join(src, n), os.path.join(b, n))
    return b


def repo_copy(d):
    """The repository's tracked files (working-tree contents) copied to d/repo."""
    dst = os.path.join(d, "repo")
    os.mkdir(dst)
    try:
        names = subprocess.run(["git", "-C", ROOT, "ls-files", "-z"], capture_output=True,
                               timeout=20, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        names = None
    if not names or names == [""]:
        ign = shutil.ignore_patterns("build", ".git", "node_modules", "iii", "iii-small")
        shutil.rmtree(dst)
        shutil.copytree(ROOT, dst, ignore=ign, symlinks=True)
        return dst
    for n in names:
        if not n:
            continue
        s = os.path.join(ROOT, n)
        if not os.path.lexists(s) or os.path.isdir(s):
            continue
        t = os.path.join(dst, n)
        os.makedirs(os.path.dirname(t), exist_ok=True)
        shutil.copy2(s, t, follow_symlinks=False)
    return dst


@test
def shipped_hello_example():
    for f in ("config.yaml", "examples/shell/greet.sh", "Makefile"):
        check(os.path.isfile(os.path.join(ROOT, f)), "%s missing from the repository" % f)
    check([n for n in os.listdir(os.path.join(ROOT, "examples/shell")) if n.lower().startswith("readme")],
          "examples/shell has no README")
    d = mkdir()
    src = repo_copy(d)
    env = {"PATH": runtime_free_path(d)}
    for k in ("CC", "CFLAGS", "MAKEFLAGS", "MFLAGS"):
        env[k] = ""
    e2 = clean_env(env)
    for k in ("CC", "CFLAGS", "MAKEFLAGS", "MFLAGS", "PYTHONPATH"):
        e2.pop(k, None)
    r = subprocess.run(["make"], cwd=src, env=e2, capture_output=True, timeout=120)
    check(r.returncode == 0, "make failed: %r" % (r.stderr.decode(errors="replace")[-800:]))
    binary = os.path.join(src, "iii")
    check(os.access(binary, os.X_OK), "make did not produce ./iii")
    # ./iii with the shipped ./config.yaml (no -c), on a free port
    e = Eng(None, d=src, cfg_arg=False, binary=binary, env={"PATH": e2["PATH"]})
    out = err = ""
    rc = None
    deadline = time.time() + 6.0
    while time.time() < deadline:
        p = subprocess.run(["./iii", "trigger", "hello::greet", '{"name":"you"}', "--url", e.url],
                           cwd=src, env=e2, capture_output=True, timeout=10)
        rc, out, err = p.returncode, p.stdout.decode(), p.stderr.decode()
        if rc == 0:
            break
        time.sleep(0.2)
    check(rc == 0 and out == '{"message":"Hello, you!"}\n',
          "./iii trigger hello::greet: rc %r stdout %r stderr %r; engine stderr %r"
          % (rc, out, err, e.stderr()[-800:]))
    check(e.alive(), "engine died")


# =============================================================================================
# 3. iii watch

class LineReader:
    """Reads a process's stdout pipe on a thread; lines() is what has arrived so far."""

    def __init__(self, p):
        self.p = p
        self._lines = []
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        fd = self.p.stdout.fileno()
        buf = b""
        while True:
            try:
                c = os.read(fd, 65536)
            except OSError:
                return
            if not c:
                return
            buf += c
            while b"\n" in buf:
                l, buf = buf.split(b"\n", 1)
                self._lines.append(l.decode("utf-8", "replace"))

    def lines(self):
        return list(self._lines)

    def wait_line(self, pred, timeout):
        return wait_until(lambda: next((l for l in self.lines() if pred(l)), None), timeout, 0.02)


def start_watch(e, args=()):
    d = mkdir()
    se = open(os.path.join(d, "stderr"), "wb")
    p = subprocess.Popen([BIN, "watch", "--url", e.url] + list(args), stdout=subprocess.PIPE,
                         stderr=se, stdin=subprocess.DEVNULL, env=clean_env(),
                         start_new_session=True)
    se.close()
    p.errpath = os.path.join(d, "stderr")
    _procs.append(p)
    # bound once both discovery bindings exist (bindings of internal functions: include_internal)
    def bound():
        if p.poll() is not None:
            return True
        try:
            rows = result(e.port, "engine::registered-triggers::list",
                          {"include_internal": True})["registered_triggers"]
        except (OSError, TimeoutError, Closed, Fail):
            return False
        types = {r.get("trigger_type") for r in rows}
        return {"engine::workers-available", "engine::functions-available"} <= types
    ok = wait_until(bound, 5.0, 0.05)
    check(ok and p.poll() is None, "iii watch never bound both discovery events (rc %r, stderr %r)"
          % (p.poll(), readf(p.errpath)[-300:]))
    return p, LineReader(p)


FC = re.compile(r"^functions_changed((?: [+-]\S+)+) \((\d+) functions\)$")


def watch_scenario():
    """iii watch (text) while worker wa (default, wx::a) and wb (nsq, wx::b) connect, then wa
    disconnects. Returns (watch process, LineReader, wa's id, wb's id) once the last expected line
    came (or 5 s passed)."""
    e = Eng(listener())
    p, rd = start_watch(e)
    w1 = PyWorker(e.port, "wa", ["wx::a"])
    rd.wait_line(lambda l: FC.match(l) and "+wx::a" in l.split(), 5)
    w2 = PyWorker(e.port, "wb", ["wx::b"], namespace="nsq")
    rd.wait_line(lambda l: FC.match(l) and "+wx::b@nsq" in l.split(), 5)
    w1.close()
    _workers.remove(w1)
    rd.wait_line(lambda l: FC.match(l) and "-wx::a" in l.split(), 5)
    rd.wait_line(lambda l: l.startswith("worker_disconnected " + w1.worker_id), 2)
    return p, rd, w1.worker_id, w2.worker_id


@test
def watch_worker_event_lines():
    p, rd, id1, id2 = watch_scenario()
    ls = rd.lines()
    for want in ("worker_connected " + id1, "worker_metadata_updated %s wa" % id1,
                 "worker_connected " + id2, "worker_metadata_updated %s wb" % id2,
                 "worker_disconnected " + id1):
        check(want in ls, "no line %r in %r" % (want, [l[:100] for l in ls]))
    check(ls.index("worker_connected " + id1) < ls.index("worker_metadata_updated %s wa" % id1)
          < ls.index("worker_disconnected " + id1), "order: %r" % ls)
    check("worker_disconnected " + id2 not in ls, "wb reported as disconnected")
    bad = [l for l in ls if not (re.match(r"^worker_(connected|disconnected) \S+$", l)
                                 or re.match(r"^worker_metadata_updated \S+ \S.*$", l)
                                 or FC.match(l))]
    check(not bad, "lines in no documented format: %r" % [l[:100] for l in bad])
    check(p.poll() is None, "iii watch exited (rc %r)" % p.poll())


@test
def watch_functions_changed_diff():
    p, rd, id1, id2 = watch_scenario()
    ls = rd.lines()
    la = next((l for l in ls if FC.match(l) and "+wx::a" in l.split()), None)
    lb = next((l for l in ls if FC.match(l) and "+wx::b@nsq" in l.split()), None)
    lc = next((l for l in ls if FC.match(l) and "-wx::a" in l.split()), None)
    check(la and lb and lc, "want lines with +wx::a, +wx::b@nsq and -wx::a: %r" % [l[:100] for l in ls])
    ma, mb, mc = FC.match(la), FC.match(lb), FC.match(lc)
    check(ma.group(1).split() == ["+wx::a"], "the line for wx::a is not exactly its diff: %r" % la[:200])
    check(mb.group(1).split() == ["+wx::b@nsq"], "the line for wx::b is not exactly its diff: %r" % lb[:200])
    check(mc.group(1).split() == ["-wx::a"], "the removal line is not exactly its diff: %r" % lc[:200])
    na, nb, nc = int(ma.group(2)), int(mb.group(2)), int(mc.group(2))
    check(nb == na + 1 and nc == nb - 1, "function counts %d, %d, %d" % (na, nb, nc))


@test
def watch_functions_baseline():
    p, rd, id1, id2 = watch_scenario()
    stale = [l for l in rd.lines() if FC.match(l) and "+engine::functions::list" in l.split()]
    check(not stale, "a functions_changed line lists functions that existed before the watcher "
          "started (no baseline to diff against): %r" % [l[:160] for l in stale])


@test
def watch_json_lines():
    e = Eng(listener())
    p, rd = start_watch(e, ["--json"])
    w = PyWorker(e.port, "wj", ["wj::f"])

    def ev(pred):
        def f(l):
            try:
                v = json.loads(l)
            except ValueError:
                return False
            return isinstance(v, dict) and pred(v)
        return f
    check(rd.wait_line(ev(lambda v: v == {"event": "worker_connected", "worker_id": w.worker_id}), 5),
          "no worker_connected JSON line: %r" % rd.lines())
    check(rd.wait_line(ev(lambda v: v == {"event": "worker_metadata_updated",
                                          "worker_id": w.worker_id}), 5),
          "no worker_metadata_updated JSON line: %r" % rd.lines())
    check(rd.wait_line(ev(lambda v: v.get("event") == "functions_changed" and any(
        f.get("function_id") == "wj::f" for f in v.get("functions", []))), 5),
        "no functions_changed JSON line with wj::f: %r" % [l[:120] for l in rd.lines()])
    nonjson = [l for l in rd.lines() if not ev(lambda v: "event" in v)(l)]
    check(not nonjson, "--json lines that are not event objects: %r" % nonjson[:3])


@test
def watch_not_listed():
    e = Eng(listener())
    ws0 = sorted(w.get("id") for w in workers(e.port))
    f0 = sorted(functions(e.port, internal=False))
    p, rd = start_watch(e)
    ws1 = sorted(w.get("id") for w in workers(e.port))
    f1 = sorted(functions(e.port, internal=False))
    check(ws0 == ws1, "iii watch shows in engine::workers::list: %r -> %r" % (ws0, ws1))
    check(f0 == f1, "iii watch's function shows in engine::functions::list: %r" % (set(f1) - set(f0)))
    rc, out, err, _ = iii("list", "functions", "--json", "--url", e.url)
    check(rc == 0 and sorted((f["function_id"], f["namespace"]) for f in jparse(out, "list")["functions"]) == f0,
          "iii list functions shows the watcher: %r" % out[:300])


# =============================================================================================
# 4. payload from stdin and files

def echo_engine():
    e = Eng(listener())
    PyWorker(e.port, "echo", ["echo::x"], handler=lambda fid, data: ("result", {"got": data}))
    wait_function(e.port, "echo::x")
    return e


@test
def trigger_payload_stdin():
    e = echo_engine()
    rc, out, err, _ = iii("trigger", "echo::x", "-", "--url", e.url, stdin='[1, "two", {"x": null}]\n')
    check(rc == 0, "exit %r stderr %r" % (rc, err))
    check(jparse(out, "stdout") == {"got": [1, "two", {"x": None}]}, "stdout %r" % out)
    rc, out, err, _ = iii("trigger", "echo::x", "-", "--url", e.url, stdin='{"k": "v\u00e9"}')
    got = jparse(out, "stdout").get("got") if rc == 0 else None
    check(rc == 0 and isinstance(got, dict) and got.get("k") == "v\u00e9",
          "object from stdin: rc %r out %r err %r" % (rc, out, err))


@test
def trigger_payload_file():
    e = echo_engine()
    d = mkdir()
    f = os.path.join(d, "payload.json")
    with open(f, "w") as fh:
        fh.write('{\n  "list": [1, 2, 3],\n  "s": "from a file"\n}\n')
    rc, out, err, _ = iii("trigger", "echo::x", "@" + f, "--url", e.url)
    check(rc == 0, "exit %r stderr %r" % (rc, err))
    got = jparse(out, "stdout").get("got")
    check(isinstance(got, dict) and got.get("list") == [1, 2, 3] and got.get("s") == "from a file",
          "payload from @file arrived as %r" % got)
    # relative to the working directory
    rc, out, err, _ = iii("trigger", "echo::x", "@payload.json", "--url", e.url, cwd=d)
    check(rc == 0 and jparse(out, "stdout").get("got", {}).get("s") == "from a file",
          "@payload.json (relative): rc %r out %r err %r" % (rc, out, err))


@test
def trigger_payload_invalid_exit_2():
    url = "ws://127.0.0.1:%d" % free_port()  # exit 2 comes before any connection attempt
    d = mkdir()
    f = os.path.join(d, "bad.json")
    with open(f, "w") as fh:
        fh.write('{"a": 1,,}')
    for args, stdin, what in ((["-"], "{bad json", "stdin"), (["-"], "", "empty stdin"),
                              (["@" + f], None, "file with invalid JSON")):
        rc, out, err, _ = iii("trigger", "echo::x", *args, "--url", url, stdin=stdin)
        check(rc == 2, "%s: exit %r, want 2 (stderr %r)" % (what, rc, err))
        check(err.strip() != "", "%s: no message on stderr" % what)
    missing = os.path.join(d, "no-such-payload.json")
    rc, out, err, _ = iii("trigger", "echo::x", "@" + missing, "--url", url)
    check(rc not in (0, 3, None) and "no-such-payload.json" in err,
          "@missing file: exit %r stderr %r (want an error naming the file)" % (rc, err))


# =============================================================================================
# 5. iii list filters

def listing_engine():
    e = Eng(listener())
    PyWorker(e.port, "lister-one", ["srch::alpha", "srch::beta", "other::x"],
             descriptions={"srch::beta": "The Beta Thing", "other::x": "unrelated"})
    PyWorker(e.port, "lister-two", ["nsf::a"], namespace="ns1")
    for fid, ns in (("srch::alpha", "default"), ("other::x", "default"), ("nsf::a", "ns1")):
        wait_function(e.port, fid, ns)
    return e


def list_json(e, kind, *args):
    rc, out, err, _ = iii("list", kind, "--json", "--url", e.url, *args)
    check(rc == 0, "list %s %r: exit %r stderr %r" % (kind, args, rc, err))
    key = {"registered-triggers": "registered_triggers"}.get(kind, kind)
    v = jparse(out, "list %s --json" % kind)
    check(isinstance(v.get(key), list), "no %r list: %r" % (key, out[:200]))
    return v[key]


@test
def list_search():
    e = listing_engine()
    ids = [f["function_id"] for f in list_json(e, "functions", "--search", "ALPHA")]
    check(ids == ["srch::alpha"], "--search ALPHA: %r" % ids)
    ids = [f["function_id"] for f in list_json(e, "functions", "--search", "beta thing")]
    check(ids == ["srch::beta"], "--search on the description: %r" % ids)
    ids = sorted(f["function_id"] for f in list_json(e, "functions", "--search", "srch"))
    check(ids == ["srch::alpha", "srch::beta"], "--search srch: %r" % ids)
    names = [w.get("name") for w in list_json(e, "workers", "--search", "TWO")]
    check(names == ["lister-two"], "workers --search TWO: %r" % names)
    rc, out, err, _ = iii("list", "functions", "--search", "alpha", "--url", e.url)
    rows = [l.split("\t") for l in out.splitlines()]
    check(rc == 0 and len(rows) == 2 and rows[1][0] == "srch::alpha", "table with --search: %r" % out)


@test
def list_namespace():
    e = listing_engine()
    problems = []
    rc, out, err, _ = iii("list", "functions", "--namespace", "ns1", "--url", e.url)
    rows = [l.split("\t") for l in out.splitlines()]
    if not (rc == 0 and len(rows) == 2 and rows[1][:2] == ["nsf::a", "ns1"]):
        problems.append("table with --namespace ns1: rc %r %r" % (rc, out))
    rows = list_json(e, "functions", "--namespace", "ns1")
    if [(f["function_id"], f["namespace"]) for f in rows] != [("nsf::a", "ns1")]:
        problems.append("functions --namespace ns1 --json: %r" % [(f["function_id"], f["namespace"]) for f in rows])
    rows = list_json(e, "functions", "--namespace", "default")
    if not (rows and all(f["namespace"] == "default" for f in rows)
            and "srch::alpha" in [f["function_id"] for f in rows]):
        problems.append("functions --namespace default --json: %r" % [(f["function_id"], f["namespace"]) for f in rows])
    ws = list_json(e, "workers", "--namespace", "ns1")
    if [w.get("name") for w in ws] != ["lister-two"]:
        problems.append("workers --namespace ns1 --json: %r" % [w.get("name") for w in ws])
    rc, out, err, _ = iii("list", "workers", "--namespace", "ns1", "--url", e.url)
    rows = [l.split("\t") for l in out.splitlines()]
    if not (rc == 0 and len(rows) == 2 and rows[1][0] == "lister-two"):
        problems.append("workers table with --namespace ns1: rc %r %r" % (rc, out))
    check(not problems, "; ".join(problems))


@test
def list_internal():
    e = listing_engine()
    ids = [f["function_id"] for f in list_json(e, "functions")]
    check("engine::functions::list" not in ids, "engine::* listed without --internal")
    ids = [f["function_id"] for f in list_json(e, "functions", "--internal")]
    check("engine::functions::list" in ids and "srch::alpha" in ids, "--internal: %r" % ids)
    ids = [t["id"] for t in list_json(e, "triggers", "--internal")]
    check("engine::workers-available" in ids, "triggers --internal: %r" % ids)
    ids = [t["id"] for t in list_json(e, "triggers")]
    check("engine::workers-available" not in ids, "triggers without --internal: %r" % ids)
    ids = [f["function_id"] for f in list_json(e, "functions", "--internal", "--search", "functions::l")]
    check(ids == ["engine::functions::list"], "--internal --search: %r" % ids)


# =============================================================================================
# 6. iii info

@test
def info_function():
    e = listing_engine()
    rc, out, err, _ = iii("info", "function", "srch::beta", "--json", "--url", e.url)
    check(rc == 0, "exit %r stderr %r" % (rc, err))
    check(out.count("\n") == 1, "--json is not one line: %r" % out[:300])
    v = jparse(out, "info function --json")
    want = result(e.port, "engine::functions::info", {"function_id": "srch::beta"})
    check(v == want, "info function: %r, engine::functions::info says %r" % (v, want))
    check(v.get("function_id") == "srch::beta" and v.get("description") == "The Beta Thing"
          and v.get("registered_triggers") == [], "detail %r" % v)
    rc, out, err, _ = iii("info", "function", "srch::beta", "--url", e.url)
    check(rc == 0 and jparse(out, "info function (pretty)") == want, "pretty: rc %r out %r" % (rc, out))
    rc, out, err, _ = iii("info", "function", "nsf::a", "--namespace", "ns1", "--json", "--url", e.url)
    check(rc == 0 and jparse(out, "info --namespace").get("namespace") == "ns1", "ns1: rc %r out %r err %r"
          % (rc, out, err))
    rc, out, err, _ = iii("info", "function", "nsf::a", "--namespace", "ns2", "--url", e.url)
    check(rc == 1 and "nsf::a" in err, "wrong namespace: rc %r err %r" % (rc, err))
    rc, out, err, _ = iii("info", "function", "nope::x", "--url", e.url)
    check(rc == 1, "not found: exit %r" % rc)
    check("Function 'nope::x' is not registered." in err, "not found: stderr %r" % err)


@test
def info_worker():
    e = listing_engine()
    rc, out, err, _ = iii("info", "worker", "lister-one", "--json", "--url", e.url)
    check(rc == 0 and out.count("\n") == 1, "exit %r stderr %r out %r" % (rc, err, out[:200]))
    v = jparse(out, "info worker --json")
    check(v.get("worker", {}).get("name") == "lister-one", "worker %r" % v.get("worker"))
    fids = [f.get("function_id") for f in v.get("functions", [])]
    check(fids == ["other::x", "srch::alpha", "srch::beta"], "functions %r" % fids)
    rc, out, err, _ = iii("info", "worker", "lister-two", "--namespace", "ns1", "--url", e.url)
    v = jparse(out, "info worker (pretty)") if rc == 0 else {}
    check(rc == 0 and v.get("worker", {}).get("namespace") == "ns1", "ns1: rc %r out %r err %r"
          % (rc, out, err))
    rc, out, err, _ = iii("info", "worker", "nobody", "--url", e.url)
    check(rc == 1 and "Worker 'nobody' is not connected." in err, "not found: rc %r err %r" % (rc, err))


# =============================================================================================
# 9. near-miss suggestions

@test
def trigger_did_you_mean():
    e = Eng(listener())
    PyWorker(e.port, "hello", ["hello::greet", "other::thing"])
    wait_function(e.port, "hello::greet")
    rc, out, err, _ = iii("trigger", "hello::gret", "--url", e.url)
    check(rc == 1, "exit %r, want 1" % rc)
    check("did you mean" in err and "hello::greet" in err, "stderr %r" % err)
    check("other::thing" not in err, "suggests an unrelated id: %r" % err)
    rc, out, err, _ = iii("trigger", "zzzzqqqq::xxxxyyyy", "--url", e.url)
    check(rc == 1 and "did you mean" not in err, "a far miss: rc %r stderr %r" % (rc, err))


# =============================================================================================
# 7. iii ps / engine::processes::list

@test
def ps_states():
    cfg = listener(extra=(
        "  - name: runner\n    command: [\"sleep\", \"30\"]\n"
        "  - name: failer\n    command: [\"sh\", \"-c\", \"exit 1\"]\n    restart: never\n"
        "  - name: crasher\n    command: [\"sh\", \"-c\", \"exit 2\"]\n    restart: always\n"))
    e = Eng(cfg)

    def procs():
        r = rpc(e.port, "engine::processes::list", {})
        check("error" not in r, "engine::processes::list: %r" % r.get("error"))
        return {p.get("name"): p for p in r["result"]["processes"]}

    def settled():
        ps = procs()
        f, c, r = ps.get("failer", {}), ps.get("crasher", {}), ps.get("runner", {})
        return (f.get("state") == "failed" and (c.get("restarts") or 0) >= 1
                and r.get("state") == "running") and ps
    ps = wait_until(settled, 6.0, 0.1) or procs()
    check(set(ps) == {"runner", "failer", "crasher"}, "processes %r" % sorted(map(str, ps)))
    r = ps["runner"]
    check(r.get("state") == "running" and isinstance(r.get("pid"), int) and alive(r["pid"]),
          "runner %r" % r)
    _groups.add(r["pid"])
    check(isinstance(r.get("uptime_ms"), int) and r["uptime_ms"] >= 0, "runner uptime_ms %r" % r)
    check(r.get("last_exit") is None and r.get("restarts") == 0, "runner %r" % r)
    check(r.get("command") == ["sleep", "30"], "runner command %r" % r.get("command"))
    f = ps["failer"]
    check(f.get("state") == "failed" and f.get("pid") is None and f.get("uptime_ms") is None,
          "failer %r" % f)
    le = f.get("last_exit")
    check(isinstance(le, dict) and le.get("code") == 1 and "signal" not in le, "failer last_exit %r" % le)
    check(isinstance(le.get("at_ms"), int) or isinstance(f.get("at_ms"), int), "no at_ms: %r" % f)
    c = ps["crasher"]
    check(c.get("restarts", 0) >= 1 and c.get("state") in ("backoff", "running"), "crasher %r" % c)
    check(c.get("command") == ["sh", "-c", "exit 2"], "crasher command %r" % c.get("command"))
    # the CLI: table and --json
    rc, out, err, _ = iii("ps", "--json", env={"III_URL": e.url})
    check(rc == 0, "iii ps --json: exit %r stderr %r" % (rc, err))
    v = jparse(out, "iii ps --json")
    check(sorted(p["name"] for p in v.get("processes", [])) == ["crasher", "failer", "runner"],
          "iii ps --json %r" % out[:300])
    rc, out, err, _ = iii("ps", env={"III_URL": e.url})
    check(rc == 0, "iii ps: exit %r stderr %r" % (rc, err))
    lines = out.splitlines()
    check(lines and lines[0].split() == ["NAME", "PID", "STATE", "RESTARTS", "UPTIME", "LAST_EXIT"],
          "header %r" % lines[:1])
    rows = {l.split()[0]: l.split() for l in lines[1:] if l.split()}
    check(set(rows) == {"runner", "failer", "crasher"}, "rows %r" % lines)
    check(rows["runner"][1] == str(r["pid"]) and rows["runner"][2] == "running", "runner row %r" % rows["runner"])
    check(rows["failer"][2] == "failed" and "1" in " ".join(rows["failer"][5:]), "failer row %r" % rows["failer"])
    check(rows["crasher"][2] in ("backoff", "running"), "crasher row %r" % rows["crasher"])


# =============================================================================================
# 8. help texts, exit codes, every documented flag accepted

SUBCOMMANDS = ("serve", "trigger", "list", "info", "watch", "ps")


@test
def help_top_level():
    rc, out, err, _ = iii("--help", timeout=5)
    check(rc == 0, "iii --help: exit %r" % rc)
    for w in SUBCOMMANDS + ("--check", "III_URL", "III_LOG", "III_LOG_FORMAT",
                            "III_NAMESPACE_GRACE_MS", "III_ALLOW_WEAK_RANDOM"):
        check(re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(w), out), "iii --help does not mention %s" % w)
    low = out.lower()
    for code, words in (("0", ("ok", "success")), ("1", ("error", "invalid")), ("2", ("usage",)),
                        ("3", ("reach", "connect"))):
        check(re.search(r"(?m)^.*(?<![\w.-])%s(?![\w.-]).*(%s)" % (code, "|".join(words)), low),
              "iii --help does not document exit code %s (%s)" % (code, "/".join(words)))


@test
def help_subcommands():
    for s in SUBCOMMANDS:
        rc, out, err, _ = iii(s, "--help", timeout=5)
        check(rc == 0, "iii %s --help: exit %r stderr %r" % (s, rc, err[:200]))
        check(("iii " + s) in out, "iii %s --help does not print its usage on stdout: %r" % (s, out[:300]))


FLAG = re.compile(r"(?<![\w-])(--?[A-Za-z][\w-]*)(?:[ =]([A-Z][A-Z_]*(?!\w)|\"[^\"]*\"|'[^']*'))?")
VALUES = {"MS": "1000", "N": "2", "NS": "ns1", "NAME": "x", "TEXT": "t", "S": "x", "ID": "x"}


def flag_value(flag, meta, url):
    if meta is None:
        return None
    if meta in ("URL",):
        return url
    if meta in VALUES:
        return VALUES[meta]
    if "MS" in meta or "TIMEOUT" in meta:
        return "1000"
    if meta in ("PORT",):
        return "0"
    return "x"


@test
def help_flags_accepted():
    url = "ws://127.0.0.1:%d" % free_port()  # nothing listens: a real run ends with exit 3
    bases = {"serve": ["serve", "t::f"], "trigger": ["trigger", "t::f", "{}"],
             "list": ["list", "functions"], "info": ["info", "function", "t::f"],
             "watch": ["watch"], "ps": ["ps"]}
    tails = {"serve": ["--", "true"]}
    problems = []
    running = []
    tried = 0
    for s in SUBCOMMANDS:
        rc, out, err, _ = iii(s, "--help", timeout=5)
        text = out + err
        flags = {}
        for m in FLAG.finditer(text):
            f = m.group(1)
            if f in ("--",) or f.startswith("-") and not f.startswith("--") and len(f) > 2:
                continue
            if f not in flags or (flags[f] is None and m.group(2)):
                flags[f] = m.group(2)
        if not flags:
            problems.append("%s: no flags in its help text" % s)
            continue
        for f, meta in sorted(flags.items()):
            if f in ("--help", "-h"):
                continue
            argv = list(bases[s])
            v = flag_value(f, meta, url)
            argv += [f] if v is None else [f, v]
            if f != "--url":
                argv += ["--url", url] if s != "ps" else []
            argv += tails.get(s, [])
            tried += 1
            running.append((argv, subprocess.Popen([BIN] + argv, stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                                   env=clean_env({"III_URL": url}),
                                                   start_new_session=True)))
    # serve / watch retry against a missing engine: still running after 1.5 s is not a usage error
    deadline = time.time() + 1.5
    for argv, p in running:
        try:
            p.wait(max(0.01, deadline - time.time()))
        except subprocess.TimeoutExpired:
            pass
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        p.wait(5)
        er = p.stderr.read().decode("utf-8", "replace")
        p.stderr.close()
        if p.returncode == 2:
            problems.append("`iii %s` -> usage error: %s" % (" ".join(argv), er.strip()[:120]))
    check(tried >= 10, "only %d flags found in the help texts" % tried)
    check(not problems, "; ".join(problems))


# =============================================================================================
# 10. iii --check and -c FILE

@test
def check_prints_plan():
    d = mkdir()
    port = free_port()
    cfg = os.path.join(d, "config.yaml")
    with open(cfg, "w") as f:
        f.write(listener(port, "  - name: alpha\n    command: [\"sleep\", \"31\"]\n"
                               "  - name: beta\n    command: \"touch %s/ran\"\n" % d))
    rc, out, err, _ = iii("--check", "-c", cfg, timeout=5)
    check(rc == 0, "--check on a valid config: exit %r stderr %r" % (rc, err))
    check("127.0.0.1:%d" % port in out, "listener address not printed: %r" % out)
    la = [l for l in out.splitlines() if "alpha" in l]
    check(la and "sleep" in la[0] and "31" in la[0], "worker alpha and its command: %r" % out)
    lb = [l for l in out.splitlines() if "beta" in l]
    check(lb and "touch" in lb[0], "worker beta and its command: %r" % out)
    time.sleep(0.2)
    check(not os.path.exists(os.path.join(d, "ran")), "--check ran a worker")
    with socket.socket() as s:  # and bound nothing
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    # no -c: ./config.yaml may be absent
    empty = mkdir()
    rc, out, err, _ = iii("--check", cwd=empty, timeout=5)
    check(rc == 0, "--check without a config file: exit %r stderr %r" % (rc, err))


@test
def check_invalid_config():
    d = mkdir()
    cfg = os.path.join(d, "config.yaml")
    with open(cfg, "w") as f:
        f.write(listener(None, "  - name: noc\n    restart: always\n") + "bogus_top_key: 1\n")
    rc, out, err, _ = iii("--check", "-c", cfg, timeout=5)
    check(rc == 1, "--check on an invalid config: exit %r" % rc)
    check("bogus_top_key" in err, "the error does not name the problem: %r" % err)


@test
def explicit_missing_config_is_error():
    d = mkdir()
    missing = os.path.join(d, "nope-config.yaml")
    rc, out, err, _ = iii("--check", "-c", missing, timeout=5)
    check(rc == 1 and "nope-config.yaml" in err, "--check -c missing: exit %r stderr %r" % (rc, err))
    p = subprocess.run([BIN, "-c", missing, "--port", "0"], capture_output=True, timeout=10,
                       env=clean_env(), stdin=subprocess.DEVNULL)
    er = p.stderr.decode(errors="replace")
    check(p.returncode == 1 and "nope-config.yaml" in er,
          "engine -c missing: exit %r stderr %r" % (p.returncode, er[-300:]))
    # the default ./config.yaml may be absent
    e = Eng(None, cfg_arg=False, d=mkdir())
    check(e.alive(), "engine without ./config.yaml did not serve")


# =============================================================================================
# 11. unknown keys in a worker entry

@test
def unknown_worker_key_warning():
    d = mkdir()
    e = Eng(listener(None, "  - name: typo\n    command: [\"sleep\", \"30\"]\n    evn: { A: b }\n"), d=d)
    wait_until(lambda: "evn" in e.stderr(), 3.0)
    err = e.stderr()
    lines = [l for l in err.splitlines() if "evn" in l]
    check(lines, "no warning naming `evn`: %r" % err[-600:])
    check(any("did you mean" in l and re.search(r"(?<!\w)env(?!\w)", l) for l in lines),
          "the warning has no `did you mean ... env`: %r" % lines)
    check(any("warn" in l.lower() for l in lines), "not a warning: %r" % lines)
    check(e.alive(), "the engine refused the config")
    rc, out, er, _ = iii("--check", "-c", e.cfg, timeout=5)
    check(rc == 0 and "evn" in er, "--check: exit %r, stderr %r" % (rc, er))


# =============================================================================================
# 12. reload logging, on_invalid_reload: keep

@test
def reload_log_names_path_and_rebind():
    p1 = free_port()
    d = mkdir()
    e = Eng(listener(p1), d=d, port_arg=False)
    check(e.port == p1, "listening on %r, config says %d" % (e.port, p1))
    mark = len(e.stderr())
    e.write_config(listener(p1, "  - name: added\n    command: [\"sleep\", \"30\"]\n"))
    os.kill(e.proc.pid, signal.SIGHUP)
    check(wait_until(lambda: APPLIED.search(e.stderr()[mark:]) or not e.alive(), 5.0),
          "no reload within 5 s: %r" % e.stderr()[mark:])
    new = e.stderr()[mark:]
    rl = [l for l in new.splitlines() if "reload" in l]
    check(any(e.cfg in l for l in rl), "the reload log does not name %s: %r" % (e.cfg, rl))
    check(not re.search(r"rebound|rebind", new), "says rebound without a listener change: %r" % new)
    p2 = free_port()
    mark = len(e.stderr())
    e.write_config(listener(p2, "  - name: added\n    command: [\"sleep\", \"30\"]\n"))
    os.kill(e.proc.pid, signal.SIGHUP)
    check(wait_until(lambda: APPLIED.search(e.stderr()[mark:]) or not e.alive(), 5.0),
          "no second reload within 5 s: %r" % e.stderr()[mark:])
    new = e.stderr()[mark:]
    check(any(re.search(r"rebound|rebind", l) and str(p2) in l for l in new.splitlines()),
          "no log line says the listener was rebound to port %d: %r" % (p2, new))
    check(rpc(p2, "engine::functions::list", {}).get("result") is not None, "nothing answers on the new port")


@test
def reload_invalid_keep():
    d = mkdir()
    good = listener(None) + "on_invalid_reload: keep\n"
    e = Eng(good, d=d)
    check(e.alive(), "on_invalid_reload: keep refused at start-up: %r" % e.stderr()[-300:])
    w = PyWorker(e.port, "keeper", ["keep::f"], handler=lambda f, x: ("result", "still here"))
    wait_function(e.port, "keep::f")
    mark = len(e.stderr())
    e.write_config(good + "bogus_top_key: [\n")
    os.kill(e.proc.pid, signal.SIGHUP)
    check(wait_until(lambda: re.search(r"(?i)error", e.stderr()[mark:]), 5.0),
          "no error logged for the invalid reload: %r" % e.stderr()[mark:])
    time.sleep(0.5)
    check(e.alive(), "the engine exited on an invalid reload with on_invalid_reload: keep (rc %r)"
          % e.proc.poll())
    r = rpc(e.port, "keep::f", {})
    check(r.get("result") == "still here", "call after the failed reload: %r" % r)
    check(w.t.is_alive(), "the worker lost its connection")
    # a valid config afterwards is applied again
    mark = len(e.stderr())
    e.write_config(good + "# edited\n")
    os.kill(e.proc.pid, signal.SIGHUP)
    check(wait_until(lambda: APPLIED.search(e.stderr()[mark:]), 5.0),
          "a valid config after the failed reload was not applied: %r" % e.stderr()[mark:])


@test
def reload_invalid_default_exits_1():
    e = Eng(listener(None))
    e.write_config(listener(None) + "bogus_top_key: 1\n")
    os.kill(e.proc.pid, signal.SIGHUP)
    rc = e.wait_exit(5.0)
    check(rc == 1, "invalid reload without on_invalid_reload: exit %r, want 1" % rc)


# =============================================================================================
# 13. logs

APPLIED = re.compile(r"reload\b.*\bapplied")
TS_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) iii: (error|warn|info|debug|trace): \S")


def worker_session(e):
    """An SDK-like worker: 2 functions, announce (name logw, runtime python, namespace lns),
    then a normal close. Returns its worker_id."""
    w = PyWorker(e.port, "logw", ["log::one", "log::two"], namespace="lns")
    wait_function(e.port, "log::two", "lns")
    w.close()
    _workers.remove(w)
    wait_until(lambda: ("log::two", "lns") not in functions(e.port), 3.0)
    time.sleep(0.1)
    return w.worker_id


@test
def log_timestamps_and_worker_lines():
    e = Eng(listener(None), env={"III_LOG": "info"})
    wid = worker_session(e)
    err = e.stderr()
    lines = [l for l in err.splitlines() if l.strip()]
    check(lines, "no log lines")
    bad = [l for l in lines if not TS_LINE.match(l)]
    check(not bad, "log lines without an RFC 3339 UTC millisecond timestamp: %r" % bad[:3])
    ts = time.mktime(time.strptime(TS_LINE.match(lines[-1]).group(1)[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    check(abs(ts - time.time()) < 120, "timestamp %r is not UTC now" % lines[-1][:24])
    mine = [l for l in lines if wid in l or "logw" in l]
    conn = [l for l in mine if re.search(r"(?<!dis)connect", l) and "disconnect" not in l]
    check(conn, "no connect line for the worker (its id %s): %r" % (wid, lines[-8:]))
    ann = [l for l in mine if "logw" in l and "python" in l and "lns" in l and "disconnect" not in l]
    check(ann, "no announce line with name, runtime and namespace: %r" % mine)
    disc = [l for l in mine if "disconnect" in l]
    check(len(disc) == 1, "want one disconnect line: %r" % mine)
    dl = disc[0]
    check("logw" in dl and "python" in dl and "lns" in dl and re.search(r"(?<![\w.])2(?![\w.])", dl),
          "disconnect line lacks name / runtime / namespace / function count 2: %r" % dl)
    check(re.search(r"(?i)reason|close|1000|eof|peer", dl), "disconnect line gives no reason: %r" % dl)
    check(mine.index(conn[0]) < mine.index(ann[0]) < mine.index(dl), "order: %r" % mine)


@test
def log_json_format():
    e = Eng(listener(None), env={"III_LOG_FORMAT": "json", "III_LOG": "info"})
    worker_session(e)
    e.write_config(listener(None) + "# touched\n")
    os.kill(e.proc.pid, signal.SIGHUP)
    wait_until(lambda: "reload" in e.stderr(), 3.0)
    lines = [l for l in e.stderr().splitlines() if l.strip()]
    check(len(lines) >= 3, "too few log lines: %r" % lines)
    for l in lines:
        try:
            v = json.loads(l)
        except ValueError:
            raise Fail("not a JSON log line: %r" % l)
        check(isinstance(v, dict) and isinstance(v.get("ts"), str) and isinstance(v.get("msg"), str)
              and v.get("level") in ("error", "warn", "info", "debug", "trace"), "log object %r" % v)
        check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", v["ts"]), "ts %r" % v["ts"])
    check(any("logw" in json.loads(l)["msg"] for l in lines), "no worker line: %r" % lines)


# =============================================================================================
# 14. per-function /metrics series

def parse_metrics(text):
    """{(name, frozenset(labels.items())): value} for every sample line."""
    out = {}
    for l in text.splitlines():
        if not l or l.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$', l)
        if not m:
            raise Fail("unparsable metrics line %r" % l)
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def sample(ms, name, **labels):
    return ms.get((name, frozenset(labels.items())))


def metrics_engine():
    e = Eng(listener(None))

    def h(fid, data):
        if fid == "mf::bad":
            return ("error", {"code": "nope", "message": "always fails"})
        return ("result", 1)
    PyWorker(e.port, "metw", ["mf::ok", "mf::bad"], handler=h)
    wait_function(e.port, "mf::bad")
    calls(e.port, "mf::ok", [{}] * 3)
    calls(e.port, "mf::bad", [{}] * 2)
    return e


@test
def metrics_per_function():
    e = metrics_engine()
    st, text = http_get(e.port, "/metrics")
    ms = parse_metrics(text)
    for fid, n, errs in (("mf::ok", 3, 0), ("mf::bad", 2, 2)):
        lab = {"function": fid, "namespace": "default"}
        check(sample(ms, "iii_function_calls_total", **lab) == n,
              "iii_function_calls_total %r = %r, want %d" % (lab, sample(ms, "iii_function_calls_total", **lab), n))
        ev = sample(ms, "iii_function_errors_total", **lab)
        check(ev == errs or (errs == 0 and ev is None), "iii_function_errors_total %r = %r, want %d"
              % (lab, ev, errs))
        check(sample(ms, "iii_function_inflight", **lab) == 0, "iii_function_inflight %r = %r"
              % (lab, sample(ms, "iii_function_inflight", **lab)))
        check(sample(ms, "iii_function_duration_seconds_count", **lab) == n, "_count %r = %r"
              % (lab, sample(ms, "iii_function_duration_seconds_count", **lab)))
        s = sample(ms, "iii_function_duration_seconds_sum", **lab)
        check(s is not None and 0 <= s < 10, "_sum %r = %r" % (lab, s))
        buckets = sorted((float(dict(k[1])["le"]), v) for k, v in ms.items()
                         if k[0] == "iii_function_duration_seconds_bucket"
                         and dict(k[1]).get("function") == fid and dict(k[1]).get("namespace") == "default")
        check(len(buckets) >= 2 and buckets[-1][0] == float("inf") and buckets[-1][1] == n,
              "buckets of %s: %r" % (fid, buckets))
        check(all(a[1] <= b[1] for a, b in zip(buckets, buckets[1:])), "buckets not cumulative %r" % buckets)


@test
def metrics_inflight_counts_running_call():
    e = Eng(listener(None))
    PyWorker(e.port, "hangw", ["mf::hang"], handler=lambda f, d: None)
    wait_function(e.port, "mf::hang")
    ws = WS(e.port)
    try:
        ws.recv_json(5)
        ws.send_json({"type": "invokefunction", "invocation_id": str(uuid.uuid4()),
                      "function_id": "mf::hang", "data": {}})
        lab = {"function": "mf::hang", "namespace": "default"}
        got = wait_until(lambda: sample(parse_metrics(http_get(e.port, "/metrics")[1]),
                                        "iii_function_inflight", **lab) == 1, 3.0, 0.05)
        check(got, "iii_function_inflight %r never showed the running call" % lab)
    finally:
        ws.close()


@test
def metrics_promtool_check():
    pt = shutil.which("promtool")
    if not pt:
        return "skip promtool not installed (Debian package prometheus)"
    e = metrics_engine()
    st, text = http_get(e.port, "/metrics")
    r = subprocess.run([pt, "check", "metrics"], input=text.encode(), capture_output=True, timeout=20)
    msg = (r.stdout + r.stderr).decode(errors="replace").strip()
    check(r.returncode == 0 and not msg, "promtool check metrics: rc %d: %s" % (r.returncode, msg[:500]))
    check("iii_function_calls_total" in text, "no per-function series to check")


@test
def metrics_cardinality_bounded():
    e = Eng(listener(None))
    n = 1010
    fids = ["card::%04d" % i for i in range(n)]
    w = PyWorker(e.port, "cardw", fids, handler=lambda f, d: ("result", 1))
    wait_function(e.port, fids[-1], "default", 10.0)
    ws = WS(e.port, timeout=10)
    try:
        ws.recv_json(5)
        ids = set()
        for f in fids:
            iid = str(uuid.uuid4())
            ids.add(iid)
            ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": f, "data": 0})
        deadline = time.time() + 20
        while ids and time.time() < deadline:
            r = ws.recv_json(max(0.01, deadline - time.time()))
            ids.discard(r.get("invocation_id"))
        check(not ids, "%d calls unanswered" % len(ids))
    finally:
        ws.close()
    ms = parse_metrics(http_get(e.port, "/metrics")[1])
    series = {dict(k[1]).get("function"): v for k, v in ms.items() if k[0] == "iii_function_calls_total"}
    check(len(series) <= 1001, "%d function series (bounded at 1000 + _other)" % len(series))
    check("_other" in series, "no function=\"_other\" series with %d functions" % n)
    tracked = sum(v for f, v in series.items() if f and f.startswith("card::"))
    check(tracked + series["_other"] >= n, "calls counted: %d tracked + %d _other < %d"
          % (tracked, series["_other"], n))
    readme = readf(os.path.join(ROOT, "README.md"))
    check("_other" in readme and "1000" in readme, "README does not document the 1000-function bound")
    del w


def main():
    if not os.path.exists(BIN):
        print("skip - test_cli: engine binary %s not found (set III_BIN)" % BIN)
        return 0
    t0 = time.time()
    try:
        rc = suite.run()
    finally:
        _cleanup()
    sys.stderr.write("test_cli: %.1f s\n" % (time.time() - t0))
    return rc


if __name__ == "__main__":
    sys.exit(main())
