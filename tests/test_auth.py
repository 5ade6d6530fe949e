#!/usr/bin/env python3
"""Authentication, sessions (RBAC), middleware, isolation and the Host check, over raw sockets.

The interface under test (listener keys in the `iii-worker-manager` entry's `config:`):
  auth_tokens: [ "FULL", {token, namespaces?, allowed_functions?, forbidden_functions?,
                 allow_function_registration?, allow_trigger_type_registration?,
                 function_registration_prefix?} ]
  allow_unauthenticated, rbac: {auth_function_id, expose_functions, forbidden_functions},
  middleware_function_id, metrics_public, allowed_hosts, worker_token.
A client presents `Authorization: Bearer T` or `?token=T`. Binding texts: PROTOCOL.md §3.9 / §1.2.

Every test starts its own engine (or uses a fixture engine shared by one group, stopped at the
end) on 127.0.0.1 with --port 0. Clients connect to 127.0.0.1 only, even when the listener binds
0.0.0.0. Every wait is bounded; every process is stopped by pid / process group.
Output: `ok - NAME`, `not ok - NAME: why`, `skip - NAME: why`. III_TEST_ONLY=substring: a subset.
"""
import base64
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
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wslib  # noqa: E402
from wslib import WS, Closed, Engine, Suite  # noqa: E402

WAIT = 3.0
QUIET = 0.4
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
BAGGAGE = "tenant=acme,iii.function.id=caller"
UUID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
MISSING = object()

suite = Suite()
_open = []        # sockets opened by the running test
_fixtures = {}    # group name -> dict(engine=..., conns=[...]) shared by the tests of that group


def tok(tag):
    """A distinctive token (alphanumerics only, so it survives a URL unescaped)."""
    return "tk%s%s" % (tag, uuid.uuid4().hex[:16])


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def eq(got, want, what):
    if got != want:
        raise Fail("%s: expected %s, got %s" % (what, show(want), show(got)))


def show(x, n=500):
    try:
        s = json.dumps(x, sort_keys=True)
    except (TypeError, ValueError):
        s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


def tail(s, n=700):
    return s.strip().replace("\n", " | ")[-n:]


def wait_until(fn, timeout=WAIT, what="condition", step=0.05):
    deadline = time.time() + timeout
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.time() > deadline:
            raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(step)


def test(fn):
    @functools.wraps(fn)
    def run():
        try:
            return fn()
        finally:
            while _open:
                try:
                    _open.pop().close()
                except Exception:  # noqa: BLE001
                    pass
    return suite.test(run)


# ---------------------------------------------------------------------------------------------
# configs and engines

def cfg(*lines, head="", extra=""):
    """A config whose iii-worker-manager `config:` block holds `lines` (already YAML)."""
    body = "".join("      %s\n" % l for l in lines)
    return head + "workers:\n  - name: iii-worker-manager\n    config:\n" + body + extra


def y(v):
    """A YAML flow value (JSON is valid YAML flow)."""
    return json.dumps(v)


class engine:
    """A fresh engine for one test; fails the test if it died while the test ran."""

    def __init__(self, config, env=None, args=()):
        self.config, self.env, self.args = config, env, args

    def __enter__(self):
        self.e = Engine(self.config, env=self.env, args=self.args)
        return self.e

    def __exit__(self, et, ev, tb):
        rc = self.e.proc.poll()
        for s in list(_open):
            try:
                s.close()
            except Exception:  # noqa: BLE001
                pass
        self.e.stop()
        rep = self.e.sanitizer_report()
        if rc is not None:
            raise Fail("ENGINE DIED during the test (status %s); stderr: %s" % (rc, tail(self.e.stderr())))
        if rep and et is None:
            raise Fail("engine sanitizer report: %s" % rep)
        if et is None:
            shutil.rmtree(self.e.tmp, ignore_errors=True)
        return False


def run_engine_expect_exit(config, args=(), timeout=5.0, env=None):
    """Runs the engine on a config that must not start. Returns (rc or None, stdout, stderr)."""
    d = tempfile.mkdtemp(prefix="iii-auth-")
    path = os.path.join(d, "config.yaml")
    with open(path, "w") as f:
        f.write(config)
    e = dict(os.environ)
    if env:
        e.update(env)
    out_p, err_p = os.path.join(d, "out"), os.path.join(d, "err")
    with open(out_p, "wb") as o, open(err_p, "wb") as er:
        p = subprocess.Popen([wslib.BIN, "-c", path, "--port", "0"] + list(args), stdout=o, stderr=er,
                             stdin=subprocess.DEVNULL, env=e, start_new_session=True)
    try:
        rc = p.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
    with open(out_p, "rb") as o, open(err_p, "rb") as er:
        out, err = o.read().decode("utf-8", "replace"), er.read().decode("utf-8", "replace")
    shutil.rmtree(d, ignore_errors=True)
    return rc, out, err


def cli(*args, env=None, timeout=20.0):
    """Runs `iii ARGS` (the client commands); returns (rc, stdout, stderr)."""
    e = dict(os.environ)
    e.pop("III_URL", None)
    e.pop("III_TOKEN", None)
    if env:
        e.update(env)
    p = subprocess.run([wslib.BIN] + list(args), capture_output=True, text=True, env=e,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


# ---------------------------------------------------------------------------------------------
# HTTP on the engine port

def http(port, path, headers=None, host_header=MISSING, timeout=4.0):
    """One plain HTTP GET; returns (status, headers, body, closed_after)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        req = "GET %s HTTP/1.1\r\n" % path
        if host_header is MISSING:
            req += "Host: 127.0.0.1:%d\r\n" % port
        elif host_header is not None:
            req += "Host: %s\r\n" % host_header
        for k, v in (headers or {}).items():
            req += "%s: %s\r\n" % (k, v)
        s.sendall((req + "\r\n").encode())
        buf = b""
        deadline = time.time() + timeout
        closed = False
        while time.time() < deadline:
            s.settimeout(max(0.01, deadline - time.time()))
            try:
                d = s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not d:
                closed = True
                break
            buf += d
        if b"\r\n\r\n" not in buf:
            raise Fail("GET %s: no complete HTTP answer (got %r)" % (path, buf[:200]))
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        st = int(lines[0].split()[1])
        hd = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hd[k.strip().lower()] = v.strip()
        return st, hd, body, closed
    finally:
        s.close()


def upgrade(port, path="/", headers=None, host_header=MISSING, timeout=4.0):
    """A WebSocket upgrade by hand (full control of Host). Returns (status, headers, sock, rest)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    req = "GET %s HTTP/1.1\r\n" % path
    if host_header is MISSING:
        req += "Host: 127.0.0.1:%d\r\n" % port
    elif host_header is not None:
        req += "Host: %s\r\n" % host_header
    req += ("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
            "Sec-WebSocket-Version: 13\r\n" % key)
    for k, v in (headers or {}).items():
        req += "%s: %s\r\n" % (k, v)
    s.sendall((req + "\r\n").encode())
    buf = b""
    deadline = time.time() + timeout
    while b"\r\n\r\n" not in buf and time.time() < deadline:
        s.settimeout(max(0.01, deadline - time.time()))
        try:
            d = s.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            break
        if not d:
            break
        buf += d
    _open.append(s)
    if b"\r\n\r\n" not in buf:
        raise Fail("upgrade %s: no HTTP answer (got %r)" % (path, buf[:200]))
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    hd = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        hd[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), hd, s, rest


def expect_refused(port, path="/", headers=None, status=401, what="", host_header=MISSING):
    """The upgrade is answered `status` (never 101), with Content-Length, and then closed."""
    st, hd, s, rest = upgrade(port, path, headers, host_header)
    eq(st, status, "upgrade %s %s: status" % (path, what))
    check("content-length" in hd, "the %d answer has no Content-Length: %r" % (status, hd))
    # nothing else: the body, then EOF (no frames, no workerregistered)
    n = int(hd.get("content-length") or 0)
    deadline = time.time() + WAIT
    data = rest
    while time.time() < deadline:
        s.settimeout(max(0.01, deadline - time.time()))
        try:
            d = s.recv(65536)
        except socket.timeout:
            raise Fail("upgrade %s %s: socket still open %.0fs after the %d" % (path, what, WAIT, status))
        except ConnectionResetError:
            break
        if not d:
            break
        data += d
    eq(len(data), n, "bytes after the %d head (%r)" % (status, data[:120]))
    check(b"workerregistered" not in data, "a refused upgrade got workerregistered")


def expect_101(port, path="/", headers=None, what=""):
    ws = WS(port, path=path, headers=headers)
    _open.append(ws)
    eq(ws.status, 101, "upgrade %s %s: status" % (path, what))
    if path.split("?")[0] == "/":
        m = ws.recv_json(WAIT)
        eq(m.get("type"), "workerregistered", "first frame after 101 %s" % what)
    return ws


# ---------------------------------------------------------------------------------------------
# a worker connection with a backlog

def is_type(t):
    return lambda m: m.get("type") == t


def is_invoke(fid):
    return lambda m: m.get("type") == "invokefunction" and m.get("function_id") == fid


def is_result(iid):
    return lambda m: m.get("type") == "invocationresult" and m.get("invocation_id") == iid


class Conn:
    def __init__(self, port, token=None, name=None, ns=None, announce=True, query="", headers=None,
                 keep=None):
        h = dict(headers or {})
        if token:
            h["Authorization"] = "Bearer " + token
        self.ws = WS(port, path="/" + query, headers=h)
        (keep if keep is not None else _open).append(self.ws)
        check(self.ws.status == 101, "upgrade answered %r, want 101 (token %r)" % (self.ws.status, token))
        self.backlog = []
        m = self.recv(is_type("workerregistered"), what="workerregistered")
        self.wid = m["worker_id"]
        self.name = name or "w-" + uuid.uuid4().hex[:6]
        if announce:
            self.announce(ns)

    def send(self, obj):
        self.ws.send_json(obj)

    def announce(self, ns=None):
        data = {"runtime": "python", "version": "0", "name": self.name, "os": "linux", "pid": os.getpid()}
        if ns is not None:
            data["namespace"] = ns
        self.send({"type": "invokefunction", "function_id": "engine::workers::register", "data": data,
                   "action": {"type": "void"}})

    def recv(self, pred=lambda m: True, timeout=WAIT, what="frame"):
        for i, m in enumerate(self.backlog):
            if pred(m):
                return self.backlog.pop(i)
        deadline = time.time() + timeout
        while True:
            left = deadline - time.time()
            if left <= 0:
                raise Fail("no %s within %.1fs; backlog: %s" % (what, timeout, show(self.backlog, 900)))
            try:
                m = self.ws.recv_json(left)
            except TimeoutError:
                continue
            if pred(m):
                return m
            self.backlog.append(m)

    def quiet(self, pred, t=QUIET, what="frame"):
        """Fails if a frame matching pred arrives within t."""
        try:
            m = self.recv(pred, t)
        except Fail:
            return
        raise Fail("unexpected %s: %s" % (what, show(m)))

    def call(self, fid, data=None, timeout=WAIT, **extra):
        iid = str(uuid.uuid4())
        msg = {"type": "invokefunction", "invocation_id": iid, "function_id": fid,
               "data": {} if data is None else data}
        msg.update(extra)
        self.send(msg)
        return self.recv(is_result(iid), timeout, "result of %s" % fid)

    def ok(self, fid, data=None, **extra):
        r = self.call(fid, data, **extra)
        check("error" not in r, "%s failed: %s" % (fid, show(r.get("error"))))
        return r.get("result")

    def regfn(self, fid, **extra):
        m = {"type": "registerfunction", "id": fid}
        m.update(extra)
        self.send(m)

    def regtype(self, tid):
        self.send({"type": "registertriggertype", "id": tid, "description": "type " + tid})

    def regtrig(self, tid, ttype, fid, config=None, **extra):
        m = {"type": "registertrigger", "id": tid, "trigger_type": ttype, "function_id": fid,
             "config": {} if config is None else config}
        m.update(extra)
        self.send(m)

    def sync(self):
        """A round trip: every frame sent before is applied (engine::workers::list is served in order)."""
        self.call("engine::log::debug", {"message": "sync"})

    def serve(self, fid, result, timeout=WAIT):
        inv = self.recv(is_invoke(fid), timeout, "invokefunction for %s" % fid)
        if inv.get("invocation_id"):
            self.send({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                       "function_id": fid, "result": result})
        return inv

    def close(self):
        self.ws.close()


def forbidden(fid, remove=False):
    return {"code": "FORBIDDEN", "message": "function '%s' not allowed (%s)"
            % (fid, "remove from rbac.forbidden_functions" if remove else "add to rbac.expose_functions")}


def err_is(r, want, what):
    e = r.get("error")
    check(e is not None, "%s: expected error %s, got result %s" % (what, show(want), show(r.get("result"))))
    eq({"code": e.get("code"), "message": e.get("message")}, want, what)


def fn_ids(c, **inp):
    return [f["function_id"] for f in c.ok("engine::functions::list", inp)["functions"]]


def wait_fn(c, fid, ns="default", present=True, timeout=WAIT):
    def look():
        rows = c.ok("engine::functions::list", {"include_internal": True})["functions"]
        hit = any(r["function_id"] == fid and r.get("namespace", "default") == ns for r in rows)
        return hit == present
    wait_until(look, timeout, "%s in %s to be %s" % (fid, ns, "listed" if present else "gone"))


def log_lacks(e, secrets):
    err = e.stderr()
    for s in secrets:
        if s in err:
            line = [l for l in err.splitlines() if s in l][0]
            raise Fail("the engine log contains a token (%s...): %s" % (s[:6], tail(line, 300)))


def fixture(name, build):
    """A group's shared engine: built once; a failed build is remembered (and cleaned up)."""
    v = _fixtures.get(name)
    if isinstance(v, Exception):
        raise Fail("the %s fixture failed earlier: %s" % (name, v))
    if v is not None:
        return v
    fx = {"keep": []}
    try:
        build(fx)
    except Exception as ex:  # noqa: BLE001
        _stop_fixture(fx)
        _fixtures[name] = Fail(("%s: %s" % (type(ex).__name__, ex))[:400])
        raise
    _fixtures[name] = fx
    return fx


def _stop_fixture(fx):
    """Closes the group's sockets, stops its engine; returns a problem description or None."""
    for s in fx.get("keep", []):
        try:
            s.close()
        except Exception:  # noqa: BLE001
            pass
    e = fx.get("e")
    if not e:
        return None
    st = e.stop()
    rep = e.sanitizer_report()
    if rep:
        return "sanitizer report: %s" % rep
    if st not in (0, None):
        return "exit status %r: %s" % (st, tail(e.stderr()))
    shutil.rmtree(e.tmp, ignore_errors=True)
    return None


# =============================================================================================
# the token gate

TOK_FULL_ENV = "III_TEST_AUTH_TOKEN"


def gate_fixture():
    return fixture("gate", _gate)


def _gate(fx):
    full = tok("full")
    obj = tok("obj")
    os.environ[TOK_FULL_ENV] = full
    conf = cfg("auth_tokens:",
               '  - "${%s}"' % TOK_FULL_ENV,
               "  - %s" % y({"token": obj, "namespaces": {"default": ["*"]}}))
    fx.update(full=full, obj=obj, wrong=tok("wrong"))
    fx["e"] = Engine(conf, env={"III_LOG": "debug"})


@test
def auth_upgrade_without_token_is_401():
    fx = gate_fixture()
    p = fx["e"].port
    expect_refused(p, "/", what="(no token)")
    expect_refused(p, "/otel", what="(no token)")
    expect_refused(p, "/?foo=bar", what="(query without token)")


@test
def auth_wrong_token_is_401():
    fx = gate_fixture()
    p = fx["e"].port
    expect_refused(p, "/", {"Authorization": "Bearer " + fx["wrong"]}, what="(wrong bearer)")
    expect_refused(p, "/?token=" + fx["wrong"], what="(wrong ?token=)")
    expect_refused(p, "/", {"Authorization": "Bearer "}, what="(empty bearer)")
    expect_refused(p, "/", {"Authorization": "Basic " + fx["full"]}, what="(right token, Basic scheme)")
    expect_refused(p, "/", {"Authorization": "Bearer " + fx["full"][:-1]}, what="(token prefix)")
    expect_refused(p, "/", {"Authorization": "Bearer " + fx["full"] + "x"}, what="(token + 1 char)")
    expect_refused(p, "/otel?token=" + fx["wrong"], what="(wrong ?token= on /otel)")
    # the literal, unexpanded config text is not a token
    expect_refused(p, "/", {"Authorization": "Bearer ${%s}" % TOK_FULL_ENV}, what="(literal ${VAR})")


@test
def auth_bearer_and_query_token_accepted():
    fx = gate_fixture()
    p = fx["e"].port
    expect_101(p, "/", {"Authorization": "Bearer " + fx["full"]}, "(Bearer, token from ${VAR})")
    expect_101(p, "/?token=" + fx["full"], what="(?token=)")
    expect_101(p, "/?a=1&token=%s&b=2" % fx["full"], what="(?token= among other parameters)")
    expect_101(p, "/", {"Authorization": "Bearer " + fx["obj"]}, "(an object entry's token)")
    expect_101(p, "/otel?token=" + fx["full"], what="(/otel ?token=)")
    expect_101(p, "/otel", {"Authorization": "Bearer " + fx["full"]}, "(/otel Bearer)")
    # an authorised connection works as usual
    c = Conn(p, token=fx["full"])
    check("functions" in c.ok("engine::functions::list", {}), "engine::functions::list failed")


@test
def auth_log_names_peer_never_token():
    full, obj, wrong = tok("full"), tok("obj"), tok("wrong")
    conf = cfg("auth_tokens:", "  - %s" % y(full), "  - %s" % y({"token": obj, "namespaces": {"default": ["*"]}}))
    with engine(conf, env={"III_LOG": "debug"}) as e:   # debug: no level may show a token
        before = len(e.stderr().splitlines())
        expect_refused(e.port, "/", {"Authorization": "Bearer " + wrong}, what="(wrong bearer)")
        wait_until(lambda: any("127.0.0.1" in l for l in e.stderr().splitlines()[before:]), 2.0,
                   "a log line naming the peer address 127.0.0.1 after a refused upgrade")
        expect_refused(e.port, "/?token=" + wrong, what="(wrong ?token=)")
        eq(http(e.port, "/metrics?token=" + wrong)[0], 401, "/metrics with a wrong ?token=")
        expect_101(e.port, "/?token=" + full)
        expect_101(e.port, "/", {"Authorization": "Bearer " + obj})
        eq(http(e.port, "/metrics?token=" + full)[0], 200, "/metrics ?token=")
        time.sleep(0.2)
        log_lacks(e, [full, obj, wrong])


@test
def auth_health_open_metrics_needs_token():
    fx = gate_fixture()
    p = fx["e"].port
    st, hd, body, _ = http(p, "/health")
    eq(st, 200, "/health without a token")
    check(json.loads(body.decode()).get("status") == "ok", "/health body %r" % body[:200])
    st, hd, body, closed = http(p, "/metrics")
    eq(st, 401, "/metrics without a token")
    check(b"iii_" not in body, "the 401 body carries metrics")
    check("content-length" in hd and closed, "401 without Content-Length or not closed")
    eq(http(p, "/metrics", {"Authorization": "Bearer " + fx["wrong"]})[0], 401, "/metrics wrong token")
    st, _, body, _ = http(p, "/metrics", {"Authorization": "Bearer " + fx["full"]})
    eq(st, 200, "/metrics with Bearer")
    check(b"iii_connections_active" in body, "/metrics body lacks iii_connections_active")
    eq(http(p, "/metrics?token=" + fx["full"])[0], 200, "/metrics with ?token=")


@test
def auth_metrics_public():
    t = tok("m")
    with engine(cfg("auth_tokens: [%s]" % y(t), "metrics_public: true")) as e:
        st, _, body, _ = http(e.port, "/metrics")
        eq(st, 200, "/metrics with metrics_public: true and no token")
        check(b"iii_" in body, "no metrics in the body")
        expect_refused(e.port, "/", what="(metrics_public does not open the worker route)")


# =============================================================================================
# protected by default

REFUSE_WORDS = ("auth_tokens", "allow_unauthenticated")


def _refuses(config, args=(), what=""):
    rc, out, err = run_engine_expect_exit(config, args)
    check(rc is not None, "%s: the engine still ran after 5 s; stderr: %s" % (what, tail(err)))
    eq(rc, 1, "%s: exit status (stderr: %s)" % (what, tail(err, 300)))
    check("listening on" not in out, "%s: it printed a listening line: %r" % (what, out))
    for w in REFUSE_WORDS:
        check(w in err, "%s: the refusal does not name `%s`: %s" % (what, w, tail(err)))


@test
def public_host_without_auth_refuses_to_start():
    _refuses(cfg("host: 0.0.0.0"), what="host 0.0.0.0")
    _refuses(cfg('host: "::"'), what="host ::")


@test
def public_host_from_cli_flag_without_auth_refuses():
    _refuses(cfg("max_connections: 100"), args=("--host", "0.0.0.0"), what="--host 0.0.0.0")


@test
def public_host_allow_unauthenticated_starts():
    with engine(cfg("host: 0.0.0.0", "allow_unauthenticated: true")) as e:
        c = Conn(e.port)  # no token
        check("functions" in c.ok("engine::functions::list", {}), "no answer")


@test
def public_host_with_auth_tokens_starts():
    t = tok("pub")
    with engine(cfg("host: 0.0.0.0", "auth_tokens: [%s]" % y(t))) as e:
        expect_refused(e.port, "/", what="(public listener, no token)")
        Conn(e.port, token=t).ok("engine::functions::list", {})


@test
def loopback_hosts_without_auth_start():
    for h in ("localhost", "127.0.0.2"):
        with engine(cfg("host: %s" % h)) as e:
            check(e.alive(), "host %s: not running" % h)
    # the default (no host) and 127.0.0.1 are covered by every other suite


def _reload_to_public_keep():
    head = "on_invalid_reload: keep\n"
    with engine(cfg("host: 127.0.0.1", head=head)) as e:
        Conn(e.port).ok("engine::functions::list", {})
        with open(e.cfg, "w") as f:
            f.write(cfg("host: 0.0.0.0", head=head))
        e.proc.send_signal(signal.SIGHUP)
        err = wait_until(lambda: "auth_tokens" in e.stderr() and e.stderr(), 5.0,
                         "a log line naming auth_tokens after the refused reload")
        check("allow_unauthenticated" in err, "the refusal does not name allow_unauthenticated")
        time.sleep(0.3)
        check(e.alive(), "on_invalid_reload: keep, but the engine exited")
        # still on the old listener (127.0.0.1, same port)
        eq(http(e.port, "/health")[0], 200, "/health on the old listener after the refused reload")
        Conn(e.port).ok("engine::functions::list", {})


@test
def reload_to_public_without_auth_exits():
    # not inside `engine` (the exit is expected)
    head = ""
    e = Engine(cfg("host: 127.0.0.1", head=head))
    try:
        Conn(e.port).ok("engine::functions::list", {})
        with open(e.cfg, "w") as f:
            f.write(cfg("host: 0.0.0.0", head=head))
        e.proc.send_signal(signal.SIGHUP)
        try:
            rc = e.proc.wait(5)
        except subprocess.TimeoutExpired:
            rc = None
        err = e.stderr()
        check(rc is not None, "the engine still runs 5 s after a reload to a public host without "
              "auth (on_invalid_reload default: exit); stderr: %s" % tail(err))
        eq(rc, 1, "exit status after the refused reload")
        lines = [l for l in err.splitlines() if "auth_tokens" in l]
        check(lines, "no log line naming auth_tokens: %s" % tail(err))
        check(any("allow_unauthenticated" in l for l in lines),
              "the refusal does not name allow_unauthenticated: %s" % lines)
        rep = e.sanitizer_report()
        check(rep is None, "sanitizer: %s" % rep)
    finally:
        e.stop()


@test
def reload_to_public_without_auth_keep():
    _reload_to_public_keep()


@test
def public_host_rbac_only_starts_and_auth_error():
    # rbac alone protects the listener; its auth function is missing, so every upgrade fails auth
    with engine(cfg("host: 0.0.0.0", "rbac: %s" % y({"auth_function_id": "auth::nobody"}))) as e:
        ws = WS(e.port)
        _open.append(ws)
        eq(ws.status, 101, "upgrade status (auth runs after the upgrade, §1.2)")
        op, p = ws.recv_msg(WAIT)
        eq(op, 1, "first frame opcode")
        m = json.loads(p.decode())
        eq(m.get("type"), "error", "first frame type (%s)" % show(m))
        eq(m.get("error", {}).get("code"), "AUTH_ERROR", "error code")
        check(isinstance(m["error"].get("message"), str), "no message: %s" % show(m))
        code = ws.expect_close(WAIT)
        check(code is not None, "the Close frame has no code")
        check(ws.expect_eof(WAIT), "the TCP connection stays open after the AUTH_ERROR close")


# =============================================================================================
# sessions (token objects): decision order, denial replies, registration rules

def session_fixture():
    return fixture("sess", _sess)


def _sess(fx):
    T = {k: tok(k) for k in ("full", "lim", "noreg", "pfx", "tt", "bare")}
    entries = [
        T["full"],
        {"token": T["lim"],
         "namespaces": {"default": ["pub::*", "exact::one"], "team": ['match("team::*")']},
         "allowed_functions": ["allowed::fn"],
         "forbidden_functions": ["pub::secret"]},
        {"token": T["noreg"], "allow_function_registration": False,
         "namespaces": {"default": ["*"]}},
        {"token": T["pfx"], "function_registration_prefix": "tenant1",
         "namespaces": {"default": ["*"]}},
        {"token": T["tt"], "allow_trigger_type_registration": True,
         "namespaces": {"default": ["*"]}},
        {"token": T["bare"]},
    ]
    conf = cfg("auth_tokens:", *["  - %s" % y(x) for x in entries])
    e = fx["e"] = Engine(conf)
    keep = fx["keep"]
    fx["T"] = T
    # a full-access worker serving the targets in default, another in team
    srv = Conn(e.port, token=T["full"], name="srv", keep=keep)
    for f in ("pub::a", "pub::secret", "exact::one", "exact::two", "allowed::fn", "other::fn"):
        srv.regfn(f)
    team = Conn(e.port, token=T["full"], name="teamsrv", ns="team", keep=keep)
    for f in ("team::x", "allowed::fn"):
        team.regfn(f)
    obs = Conn(e.port, token=T["full"], name="obs", keep=keep)
    for f in ("pub::a", "other::fn"):
        wait_fn(obs, f)
    wait_fn(obs, "team::x", "team")
    wait_fn(obs, "allowed::fn", "team")
    fx.update(srv=srv, team=team, obs=obs)


def _allowed(c, srv, fid, ns=None, what=""):
    extra = {"namespace": ns} if ns else {}
    iid = str(uuid.uuid4())
    msg = {"type": "invokefunction", "invocation_id": iid, "function_id": fid, "data": {"v": 1}}
    msg.update(extra)
    c.send(msg)
    srv.serve(fid, {"served": fid})
    r = c.recv(is_result(iid), what="result of %s" % fid)
    check("error" not in r, "%s %s: error %s" % (fid, what, show(r.get("error"))))
    eq(r.get("result"), {"served": fid}, "%s %s: result" % (fid, what))


@test
def session_decision_order():
    fx = session_fixture()
    srv, team = fx["srv"], fx["team"]
    lim = Conn(fx["e"].port, token=fx["T"]["lim"], name="lim")
    _allowed(lim, srv, "pub::a", what="(grant pub::* in default)")
    err_is(lim.call("pub::secret"), forbidden("pub::secret", remove=True),
           "pub::secret (forbidden_functions wins over the grant pub::*)")
    _allowed(lim, srv, "exact::one", what="(exact grant)")
    err_is(lim.call("exact::two"), forbidden("exact::two"), "exact::two (not granted)")
    _allowed(lim, srv, "allowed::fn", what="(allowed_functions in default)")
    err_is(lim.call("allowed::fn", namespace="team"), forbidden("allowed::fn"),
           "allowed::fn in team (allowed_functions applies to default only)")
    _allowed(lim, team, "team::x", ns="team", what='(match("team::*") in team)')
    err_is(lim.call("team::x"), forbidden("team::x"), "team::x in default (grant is for team)")
    err_is(lim.call("other::fn"), forbidden("other::fn"), "other::fn")
    # a denied call never reaches the worker
    srv.quiet(is_invoke("other::fn"), what="invoke of a denied function at its worker")
    srv.quiet(is_invoke("pub::secret"), what="invoke of a forbidden function at its worker")


@test
def session_without_grants_allows_when_no_rbac():
    """A token object that names no namespaces and no functions restricts nothing but its
    forbidden list: with no rbac block, §3.9 step 6 allows (a token table is a static auth
    function, and an auth function's session behaves so)."""
    fx = session_fixture()
    bare = Conn(fx["e"].port, token=fx["T"]["bare"], name="bare")
    srv = fx["srv"]
    _allowed(bare, srv, "pub::a", what="pub::a from a session with no grants and no rbac")
    r = bare.call("engine::functions::list")
    check("error" not in r, "engine::functions::list from a bare session: %r" % r)


@test
def session_denial_reply_void_and_trace():
    fx = session_fixture()
    lim = Conn(fx["e"].port, token=fx["T"]["lim"], name="lim2")
    # void: a reply anyway, with a minted id
    lim.send({"type": "invokefunction", "function_id": "other::fn", "data": {"v": 1},
              "action": {"type": "void"}, "traceparent": TP, "baggage": BAGGAGE})
    r = lim.recv(lambda m: m.get("type") == "invocationresult" and m.get("function_id") == "other::fn",
                 what="the FORBIDDEN reply to a void call")
    err_is(r, forbidden("other::fn"), "void call denial")
    check(isinstance(r.get("invocation_id"), str) and UUID_RE.match(r["invocation_id"]),
          "void denial: invocation_id %r is not a minted UUID" % r.get("invocation_id"))
    eq(r.get("traceparent"), TP, "void denial: traceparent")
    eq(r.get("baggage"), BAGGAGE, "void denial: baggage")
    # a call without invocation_id and without action (fire-and-forget) too
    lim.send({"type": "invokefunction", "function_id": "exact::two", "data": {}})
    r = lim.recv(lambda m: m.get("type") == "invocationresult" and m.get("function_id") == "exact::two",
                 what="the FORBIDDEN reply to a call without invocation_id")
    err_is(r, forbidden("exact::two"), "no-id call denial")
    # sync: the caller's id, function id, traceparent and baggage
    r = lim.call("pub::secret", {}, traceparent=TP, baggage=BAGGAGE)
    err_is(r, forbidden("pub::secret", remove=True), "sync denial")
    eq(r.get("function_id"), "pub::secret", "sync denial: function_id")
    eq(r.get("traceparent"), TP, "sync denial: traceparent")
    eq(r.get("baggage"), BAGGAGE, "sync denial: baggage")
    fx["srv"].quiet(lambda m: m.get("type") == "invokefunction"
                    and m.get("function_id") in ("other::fn", "exact::two", "pub::secret"),
                    what="invoke of a denied function at its worker")


@test
def session_infrastructure_allowed():
    fx = session_fixture()
    bare = Conn(fx["e"].port, token=fx["T"]["bare"], name="bare-infra")
    for fid, data in (("engine::log::info", {"message": "from a bare session"}),
                      ("engine::log::debug", {"message": "x"}),
                      ("engine::channels::create", {}),
                      ("engine::workers::register", {"name": "bare-infra", "pid": os.getpid()}),
                      ("engine::baggage::get", {"key": "k"}),
                      ("engine::baggage::get_all", {})):
        r = bare.call(fid, data)
        e = r.get("error") or {}
        check(e.get("code") != "FORBIDDEN", "%s is infrastructure, but: %s" % (fid, show(e)))
    r = bare.call("engine::channels::create", {})
    check("error" not in r and "writer" in (r.get("result") or {}),
          "engine::channels::create from a bare session: %s" % show(r))


@test
def session_full_token_allows_everything():
    fx = session_fixture()
    full = Conn(fx["e"].port, token=fx["T"]["full"], name="full2")
    _allowed(full, fx["srv"], "other::fn")
    _allowed(full, fx["srv"], "pub::secret")
    _allowed(full, fx["team"], "team::x", ns="team")
    check("workers" in full.ok("engine::workers::list", {}), "engine::workers::list")


@test
def session_register_outside_namespaces_forbidden():
    fx = session_fixture()
    lim = Conn(fx["e"].port, token=fx["T"]["lim"], name="lim-ns", announce=False)
    r = lim.call("engine::workers::register", {"name": "lim-ns", "pid": os.getpid(), "namespace": "other"})
    err_is(r, {"code": "FORBIDDEN",
               "message": "namespace 'other' not allowed for this session (permitted: default, team)"},
           "engine::workers::register into namespace other")
    r = lim.call("engine::workers::register", {"name": "lim-ns", "pid": os.getpid(), "namespace": "team"})
    check("error" not in r, "register into a permitted namespace failed: %s" % show(r.get("error")))


@test
def session_function_registration_disabled():
    fx = session_fixture()
    nr = Conn(fx["e"].port, token=fx["T"]["noreg"], name="noreg")
    nr.regfn("noreg::fn")
    nr.sync()
    time.sleep(0.2)
    obs = fx["obs"]
    rows = obs.ok("engine::functions::list", {"include_internal": True})["functions"]
    check(not [r for r in rows if "noreg::fn" in r["function_id"]],
          "noreg::fn was registered: %s" % show([r for r in rows if "noreg" in r["function_id"]]))
    nr.quiet(lambda m: m.get("type") == "registrationrejected", what="frame (dropped silently)")
    r = obs.call("noreg::fn", {})
    eq((r.get("error") or {}).get("code"), "function_not_found", "calling the dropped function")


@test
def session_function_registration_prefix():
    fx = session_fixture()
    p = Conn(fx["e"].port, token=fx["T"]["pfx"], name="pfx")
    p.regfn("x::f", description="prefixed")
    obs = fx["obs"]
    wait_fn(obs, "tenant1::x::f")
    rows = obs.ok("engine::functions::list", {"include_internal": True})["functions"]
    check(not [r for r in rows if r["function_id"] == "x::f"], "x::f is listed without the prefix")
    iid = str(uuid.uuid4())
    obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "tenant1::x::f", "data": {"k": 1}})
    inv = p.recv(lambda m: m.get("type") == "invokefunction", what="the call of tenant1::x::f at pfx")
    p.send({"type": "invocationresult", "invocation_id": inv["invocation_id"],
            "function_id": inv["function_id"], "result": {"pfx": True}})
    r = obs.recv(is_result(iid))
    eq(r.get("result"), {"pfx": True}, "result of tenant1::x::f")


@test
def session_trigger_type_registration():
    fx = session_fixture()
    obs = fx["obs"]
    pf = Conn(fx["e"].port, token=fx["T"]["pfx"], name="tt-no")    # default: false
    pf.regtype("tt-denied")
    tt = Conn(fx["e"].port, token=fx["T"]["tt"], name="tt-yes")    # true
    tt.regtype("tt-allowed")
    full = Conn(fx["e"].port, token=fx["T"]["full"], name="tt-full")  # full access
    full.regtype("tt-full")
    for c in (pf, tt, full):
        c.sync()

    def ids():
        return {t["id"] for t in obs.ok("engine::triggers::list", {})["triggers"]}
    wait_until(lambda: {"tt-allowed", "tt-full"} <= ids(), what="tt-allowed and tt-full listed")
    check("tt-denied" not in ids(), "a session without allow_trigger_type_registration registered a type")
    pf.quiet(lambda m: m.get("type") in ("registrationrejected", "error"), what="frame (dropped silently)")


# =============================================================================================
# middleware

def _mw_engine():
    return engine(cfg("middleware_function_id: mw::fn"))


def _mw_setup(e):
    mw = Conn(e.port, name="mw")
    mw.regfn("mw::fn")
    biz = Conn(e.port, name="biz")
    biz.regfn("biz::fn")
    obs = Conn(e.port, name="mwobs")
    wait_fn(obs, "mw::fn")     # engine::* goes straight to the builtin (else this times out)
    wait_fn(obs, "biz::fn")
    return mw, biz, Conn(e.port, name="caller")


@test
def middleware_routes_invokes():
    with _mw_engine() as e:
        mw, biz, caller = _mw_setup(e)
        r = caller.call("engine::functions::list", {})
        check("functions" in (r.get("result") or {}), "engine::functions::list via middleware? %s" % show(r))
        mw.quiet(is_invoke("mw::fn"), what="middleware call for an engine::* builtin")
        # a sync call: the middleware gets {function_id, payload, action, context, namespace}
        iid = str(uuid.uuid4())
        caller.send({"type": "invokefunction", "invocation_id": iid, "function_id": "biz::fn",
                     "data": {"x": 1}, "traceparent": TP})
        inv = mw.recv(is_invoke("mw::fn"), what="the middleware call")
        d = inv.get("data") or {}
        eq(d.get("function_id"), "biz::fn", "middleware input function_id")
        check(isinstance(d.get("payload"), dict) and d["payload"].get("x") == 1,
              "middleware input payload: %s" % show(d))
        eq(d.get("namespace"), "default", "middleware input namespace")
        mw.send({"type": "invocationresult", "invocation_id": inv["invocation_id"], "function_id": "mw::fn",
                 "result": {"via": "mw"}})
        r = caller.recv(is_result(iid), what="the reply through the middleware")
        eq(r.get("function_id"), "biz::fn", "reply function_id")
        eq(r.get("result"), {"via": "mw"}, "reply result")
        biz.quiet(is_invoke("biz::fn"), what="direct call of biz::fn (the middleware answered)")
        # the middleware's error becomes the caller's error
        iid = str(uuid.uuid4())
        caller.send({"type": "invokefunction", "invocation_id": iid, "function_id": "biz::fn", "data": {"x": 2}})
        inv = mw.recv(is_invoke("mw::fn"), what="the second middleware call")
        mw.send({"type": "invocationresult", "invocation_id": inv["invocation_id"], "function_id": "mw::fn",
                 "error": {"code": "DENIED", "message": "no entry"}})
        r = caller.recv(is_result(iid))
        eq(r.get("error"), {"code": "DENIED", "message": "no entry"}, "middleware error as the reply")
        eq(r.get("function_id"), "biz::fn", "error reply function_id")
        # an unknown function goes to the middleware too (it decides)
        iid = str(uuid.uuid4())
        caller.send({"type": "invokefunction", "invocation_id": iid, "function_id": "nope::fn", "data": {}})
        inv = mw.recv(is_invoke("mw::fn"), what="the middleware call for an unregistered id")
        eq(inv["data"].get("function_id"), "nope::fn", "middleware input for an unregistered id")
        mw.send({"type": "invocationresult", "invocation_id": inv["invocation_id"], "function_id": "mw::fn",
                 "result": 7})
        eq(caller.recv(is_result(iid)).get("result"), 7, "reply for an unregistered id")


@test
def middleware_void_call_still_answered():
    """PROTOCOL.md §3.9: with middleware, a reply is always sent, with a minted id if none was given."""
    with _mw_engine() as e:
        mw, biz, caller = _mw_setup(e)
        caller.send({"type": "invokefunction", "function_id": "biz::fn", "data": {"x": 3},
                     "action": {"type": "void"}})
        inv = mw.recv(is_invoke("mw::fn"), what="the middleware call for a void invoke")
        mw.send({"type": "invocationresult", "invocation_id": inv["invocation_id"], "function_id": "mw::fn",
                 "result": {"void": True}})
        r = caller.recv(lambda m: m.get("type") == "invocationresult" and m.get("function_id") == "biz::fn",
                        what="the reply to a void call through the middleware (PROTOCOL.md §3.9)")
        check(UUID_RE.match(r.get("invocation_id") or ""), "minted id %r" % r.get("invocation_id"))


# =============================================================================================
# isolation: a session limited to namespace `team`

ISO_ALLOWED = ["engine::functions::list", "engine::functions::info", "engine::workers::list",
               "engine::workers::info", "engine::triggers::list", "engine::triggers::info",
               "engine::registered-triggers::list", "engine::registered-triggers::info",
               "engine::register_trigger", "engine::unregister_trigger"]


def iso_fixture():
    return fixture("iso", _iso)


def _iso(fx):
    T = {k: tok(k) for k in ("full", "iso")}
    conf = cfg("auth_tokens:", "  - %s" % y(T["full"]),
               "  - %s" % y({"token": T["iso"], "namespaces": {"team": ["team::*"]},
                             "allowed_functions": ISO_ALLOWED}))
    e = fx["e"] = Engine(conf)
    keep = fx["keep"]
    fx["T"] = T
    d = Conn(e.port, token=T["full"], name="def-worker", keep=keep)
    d.regfn("def::secret", description="HIDDEN-DESCRIPTION")
    d.regtype("def-evt")
    d.regtrig("b-def", "def-evt", "def::secret", {"secret": "DEFCFG"})
    t = Conn(e.port, token=T["full"], name="team-worker", ns="team", keep=keep)
    t.regfn("team::fn", description="team function")
    t.regtype("team-evt")
    t.regtrig("b-team", "team-evt", "team::fn", {"k": "TEAMCFG"}, namespace="team")
    # a binding through a type the session can see, to a function it cannot call
    t.regtrig("b-cross", "team-evt", "def::secret", {"secret": "CROSSCFG"})
    obs = Conn(e.port, token=T["full"], name="iso-obs", keep=keep)
    wait_fn(obs, "def::secret")
    wait_fn(obs, "team::fn", "team")

    def rts():
        return {r["id"] for r in obs.ok("engine::registered-triggers::list", {})["registered_triggers"]}
    wait_until(lambda: {"b-def", "b-team", "b-cross"} <= rts(), what="the three bindings live")
    iso = Conn(e.port, token=T["iso"], name="iso-client", ns="team", keep=keep)
    iso.regfn("team::on_fns")
    wait_fn(obs, "team::on_fns", "team")
    fx.update(d=d, t=t, obs=obs, iso=iso, rts=rts)


def raw_call(c, fid, data):
    """The result frame's raw text as well (to check that nothing leaks anywhere in it)."""
    r = c.call(fid, data)
    return r, json.dumps(r)


def no_leak(text, what):
    for s in ("DEFCFG", "CROSSCFG", "HIDDEN-DESCRIPTION", "def::secret", "def-worker"):
        check(s not in text, "%s shows %r to the team session: %s" % (what, s, text[:600]))


@test
def iso_functions_list_and_info():
    fx = iso_fixture()
    iso = fx["iso"]
    r, text = raw_call(iso, "engine::functions::list", {})
    no_leak(text, "engine::functions::list")
    ids = sorted(f["function_id"] for f in r["result"]["functions"])
    eq(ids, ["team::fn", "team::on_fns"], "functions listed to the team session")
    r, text = raw_call(iso, "engine::functions::list", {"include_internal": True})
    no_leak(text, "engine::functions::list include_internal")
    info = iso.ok("engine::functions::info", {"function_id": "team::fn", "namespace": "team"})
    eq(info.get("namespace"), "team", "team::fn info namespace")
    rt = {x["id"]: x.get("config") for x in info.get("registered_triggers", [])}
    eq(rt.get("b-team"), {"k": "TEAMCFG"}, "b-team config in team::fn info (the session may call it)")
    # the full-access observer sees everything
    ids = fn_ids(fx["obs"])
    check("def::secret" in ids and "team::fn" in ids, "observer list %s" % ids)
    # last (the one check where the text is a choice): PROTOCOL.md §5.2 names the refusal
    r, text = raw_call(iso, "engine::functions::info", {"function_id": "def::secret"})
    check("HIDDEN-DESCRIPTION" not in text and "DEFCFG" not in text, "info leaks: %s" % text[:400])
    err_is(r, {"code": "FORBIDDEN", "message": "Function 'def::secret' is not visible to this session."},
           "engine::functions::info of an invisible function (PROTOCOL.md §5.2)")


@test
def iso_workers_list_and_info():
    fx = iso_fixture()
    iso = fx["iso"]
    r, text = raw_call(iso, "engine::workers::list", {})
    no_leak(text, "engine::workers::list")
    names = {w.get("name") for w in r["result"]["workers"]}
    check("team-worker" in names, "team-worker not listed to the team session: %s" % sorted(map(str, names)))
    r, text = raw_call(iso, "engine::workers::info", {"name": "def-worker"})
    check("error" in r, "engine::workers::info of a default worker answered: %s" % text[:300])
    check("def::secret" not in text and "DEFCFG" not in text, "workers::info leaks: %s" % text[:400])
    info = iso.ok("engine::workers::info", {"name": "team-worker"})
    eq([f.get("function_id") for f in info.get("functions", [])], ["team::fn"], "team-worker functions")
    no_leak(json.dumps(info), "engine::workers::info team-worker")


@test
def iso_trigger_types():
    fx = iso_fixture()
    iso = fx["iso"]
    r, text = raw_call(iso, "engine::triggers::list", {})
    ids = {t["id"] for t in r["result"]["triggers"]}
    check("team-evt" in ids, "team-evt not listed to the team session: %s" % sorted(ids))
    check("def-evt" not in ids, "def-evt (namespace default, the session has no grant there) listed: %s"
          % sorted(ids))
    r, text = raw_call(iso, "engine::triggers::info", {"id": "team-evt", "namespace": "team"})
    check("error" not in r, "triggers::info team-evt: %s" % text[:300])
    no_leak(text, "engine::triggers::info team-evt")


@test
def iso_registered_triggers_hide_config():
    fx = iso_fixture()
    iso = fx["iso"]
    r, text = raw_call(iso, "engine::registered-triggers::list", {})
    no_leak(text, "engine::registered-triggers::list")
    rows = {x["id"]: x for x in r["result"]["registered_triggers"]}
    check("b-team" in rows, "b-team not listed to the team session: %s" % sorted(rows))
    eq(rows["b-team"].get("config"), {"k": "TEAMCFG"}, "b-team config")
    check("b-def" not in rows, "b-def (default type, default target) listed to the team session")
    for bid in ("b-def", "b-cross"):
        r, text = raw_call(iso, "engine::registered-triggers::info", {"id": bid})
        no_leak(text, "engine::registered-triggers::info %s" % bid)
    r, text = raw_call(iso, "engine::registered-triggers::info", {"id": "b-team"})
    check("error" not in r and r["result"].get("config") == {"k": "TEAMCFG"},
          "registered-triggers::info b-team: %s" % text[:400])
    # the observer sees the secrets
    full = json.dumps(fx["obs"].ok("engine::registered-triggers::list", {}))
    check("DEFCFG" in full and "CROSSCFG" in full, "the full-access observer lost the configs")


@test
def iso_discovery_event_filtered():
    fx = iso_fixture()
    iso, obs, d, t = fx["iso"], fx["obs"], fx["d"], fx["t"]
    iso.regtrig("iso-sub", "engine::functions-available", "team::on_fns", {}, namespace="team")
    obs.regfn("obs::on_fns")
    obs.regtrig("obs-sub", "engine::functions-available", "obs::on_fns", {})
    wait_until(lambda: {"iso-sub", "obs-sub"} <= fx["rts"](), what="both subscriptions live")
    time.sleep(0.3)
    d.regfn("def::new")
    t.regfn("team::new")
    got = []

    def drain():
        try:
            m = iso.recv(is_invoke("team::on_fns"), 0.2)
        except Fail:
            return False
        if m.get("invocation_id"):
            iso.send({"type": "invocationresult", "invocation_id": m["invocation_id"], "function_id": "team::on_fns"})
        got.append(m)
        return any("team::new" in json.dumps(x.get("data")) for x in got)
    wait_until(drain, 5.0, "a functions_changed event naming team::new at the team session")
    for m in got:
        text = json.dumps(m.get("data"))
        for s in ("def::new", "def::secret"):
            check(s not in text, "the team session's functions_changed lists %s: %s" % (s, text[:500]))
    # the full observer's event does list def::new

    def seen_full():
        m = obs.recv(is_invoke("obs::on_fns"), 0.2)
        if m.get("invocation_id"):
            obs.send({"type": "invocationresult", "invocation_id": m["invocation_id"], "function_id": "obs::on_fns"})
        return "def::new" in json.dumps(m.get("data"))

    def try_full():
        try:
            return seen_full()
        except Fail:
            return False
    wait_until(try_full, 5.0, "the full observer's event naming def::new")


@test
def iso_unregister_only_own_bindings():
    fx = iso_fixture()
    iso, obs, t = fx["iso"], fx["obs"], fx["t"]
    # someone else's live binding: unregistertrigger and engine::unregister_trigger leave it
    iso.send({"type": "unregistertrigger", "id": "b-team", "trigger_type": "team-evt"})
    iso.sync()
    iso.call("engine::unregister_trigger", {"id": "b-team"})
    time.sleep(0.2)
    check("b-team" in fx["rts"](), "the team session removed team-worker's binding b-team")
    t.quiet(lambda m: m.get("type") == "unregistertrigger" and m.get("id") == "b-team",
            what="unregistertrigger at the provider")
    # a durable binding made by another connection
    # (the provider, a raw socket, must acknowledge: the engine waits for it, §5.11)
    iid = str(uuid.uuid4())
    obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::register_trigger",
              "data": {"trigger_type": "def-evt", "function_id": "def::secret", "config": {"d": 1}}})
    rt = fx["d"].recv(lambda m: m.get("type") == "registertrigger" and m.get("config") == {"d": 1},
                      what="the durable binding at its provider")
    fx["d"].send({"type": "triggerregistrationresult", "id": rt["id"], "trigger_type": "def-evt",
                  "function_id": "def::secret"})
    r = obs.recv(is_result(iid), what="result of engine::register_trigger")
    check("error" not in r, "engine::register_trigger: %s" % show(r.get("error")))
    dur = r["result"]["id"]
    wait_until(lambda: dur in fx["rts"](), what="the durable binding live")
    iso.call("engine::unregister_trigger", {"id": dur})
    iso.send({"type": "unregistertrigger", "id": dur, "trigger_type": "def-evt"})
    iso.sync()
    time.sleep(0.2)
    check(dur in fx["rts"](), "the team session removed a durable binding another connection created")
    # its own bindings it can remove
    iso.regtrig("iso-own", "team-evt", "team::fn", {}, namespace="team")
    wait_until(lambda: "iso-own" in fx["rts"](), what="iso-own live")
    iso.send({"type": "unregistertrigger", "id": "iso-own", "trigger_type": "team-evt"})
    wait_until(lambda: "iso-own" not in fx["rts"](), what="iso-own removed by its owner")
    # and the creator removes its durable binding
    eq(obs.ok("engine::unregister_trigger", {"id": dur}), {"removed": True}, "creator's unregister")


# =============================================================================================
# Host header (DNS rebinding)

@test
def host_header_checked_on_loopback_listener():
    with engine(cfg("host: 127.0.0.1")) as e:
        p = e.port
        for h in ("evil.example.com", "evil.example.com:%d" % p, "localhost.evil.example.com",
                  "127.0.0.1.evil.example.com", "10.0.0.1:%d" % p):
            eq(http(p, "/health", host_header=h)[0], 403, "/health with Host: %s" % h)
        expect_refused(p, "/", status=403, host_header="evil.example.com", what="(Host: evil.example.com)")
        expect_refused(p, "/otel", status=403, host_header="evil.example.com", what="(Host: evil.example.com)")
        for h in ("localhost", "localhost:%d" % p, "127.0.0.1", "127.0.0.1:%d" % p, "127.1.2.3:80",
                  "[::1]", "[::1]:%d" % p):
            eq(http(p, "/health", host_header=h)[0], 200, "/health with Host: %s" % h)
        st, _, s, _ = upgrade(p, "/", host_header="localhost:%d" % p)
        eq(st, 101, "upgrade with Host: localhost:PORT")


@test
def allowed_hosts_on_public_listener():
    t = tok("ah")
    with engine(cfg("host: 0.0.0.0", "auth_tokens: [%s]" % y(t),
                    "allowed_hosts: [\"api.example.com\"]")) as e:
        p = e.port
        eq(http(p, "/health", host_header="api.example.com")[0], 200, "/health Host: api.example.com")
        eq(http(p, "/health", host_header="api.example.com:%d" % p)[0], 200, "/health Host: api.example.com:PORT")
        eq(http(p, "/health", host_header="evil.example.com")[0], 403, "/health Host: evil.example.com")
        expect_refused(p, "/", {"Authorization": "Bearer " + t}, status=403, host_header="evil.example.com",
                       what="(valid token, Host not allowed)")
        st, _, _, _ = upgrade(p, "/", {"Authorization": "Bearer " + t}, host_header="api.example.com")
        eq(st, 101, "upgrade with an allowed Host and a token")
    with engine(cfg("host: 0.0.0.0", "allow_unauthenticated: true")) as e:
        eq(http(e.port, "/health", host_header="evil.example.com")[0], 200,
           "public listener without allowed_hosts: any Host")


# =============================================================================================
# the engine's own parts: declared workers and the CLI

def _sh(cmd):
    return y(["sh", "-c", cmd])


@test
def declared_serve_worker_and_trigger_token():
    t = tok("cli")
    extra = ("  - name: greeter\n    command: %s\n"
             % y([os.path.abspath(wslib.BIN), "serve", "auth::greet", "--", "sh", "-c", "echo '{\"greet\":\"hi\"}'"]))
    with engine(cfg("auth_tokens: [%s]" % y(t), extra=extra)) as e:
        url = "ws://127.0.0.1:%d" % e.port
        obs = Conn(e.port, token=t)
        wait_fn(obs, "auth::greet", timeout=10.0)
        eq(obs.ok("auth::greet", {}), {"greet": "hi"}, "the declared serve worker's function")
        rc, out, err = cli("trigger", "auth::greet", "{}", "--url", url, "--token", t)
        eq(rc, 0, "iii trigger --token: exit status (stderr %s)" % tail(err, 300))
        eq(json.loads(out), {"greet": "hi"}, "iii trigger --token output")
        rc, out, err = cli("trigger", "auth::greet", "{}", "--url", url, env={"III_TOKEN": t})
        eq(rc, 0, "iii trigger with $III_TOKEN: exit status (stderr %s)" % tail(err, 300))
        eq(json.loads(out), {"greet": "hi"}, "iii trigger $III_TOKEN output")
        rc, out, err = cli("trigger", "auth::greet", "{}", "--url", url, timeout=20)
        check(rc in (1, 3), "iii trigger without a token: exit status %r, want 3 (or 1)" % rc)
        check("401" in err, "iii trigger without a token: stderr does not mention 401: %s" % tail(err, 300))
        rc, out, err = cli("trigger", "auth::greet", "{}", "--url", url, "--token", "wrong" + t)
        check(rc in (1, 3) and "401" in err, "iii trigger with a wrong token: rc %r, stderr %s" % (rc, tail(err, 200)))
        log_lacks(e, [t])


@test
def declared_worker_gets_generated_token():
    t = tok("gen")
    d = tempfile.mkdtemp(prefix="iii-auth-tok-")
    f = os.path.join(d, "tok")
    try:
        extra = ("  - name: tokdump\n    command: %s\n"
                 % _sh('printf %%s "$III_TOKEN" > %s.tmp && mv %s.tmp %s; exec sleep 60' % (f, f, f)))
        with engine(cfg("auth_tokens: [%s]" % y(t), extra=extra)) as e:
            got = wait_until(lambda: os.path.exists(f) and open(f).read(), 6.0, "the worker's $III_TOKEN")
            check(got != t, "III_TOKEN is one of the configured auth_tokens; want a generated token")
            check(len(got) >= 16, "generated token %d chars, too short" % len(got))
            Conn(e.port, token=got).ok("engine::functions::list", {})     # full access
            log_lacks(e, [got, t])
    finally:
        shutil.rmtree(d, ignore_errors=True)


@test
def declared_worker_gets_configured_worker_token():
    t = tok("at")
    wt = tok("wt")
    d = tempfile.mkdtemp(prefix="iii-auth-tok-")
    f = os.path.join(d, "tok")
    try:
        extra = ("  - name: tokdump\n    command: %s\n"
                 % _sh('printf %%s "$III_TOKEN" > %s.tmp && mv %s.tmp %s; exec sleep 60' % (f, f, f)))
        conf = cfg("auth_tokens: [%s]" % y(t), 'worker_token: "${III_TEST_WORKER_TOKEN}"', extra=extra)
        with engine(conf, env={"III_TEST_WORKER_TOKEN": wt}) as e:
            got = wait_until(lambda: os.path.exists(f) and open(f).read(), 6.0, "the worker's $III_TOKEN")
            eq(got, wt, "III_TOKEN with worker_token configured")
            Conn(e.port, token=wt).ok("engine::functions::list", {})
            log_lacks(e, [wt, t])
    finally:
        shutil.rmtree(d, ignore_errors=True)


@test
def cli_list_serve_watch_take_token():
    t = tok("cl")
    with engine(cfg("auth_tokens: [%s]" % y(t))) as e:
        url = "ws://127.0.0.1:%d" % e.port
        rc, out, err = cli("list", "functions", "--url", url, "--token", t, "--json")
        eq(rc, 0, "iii list --token (stderr %s)" % tail(err, 300))
        check("functions" in json.loads(out), "iii list output %r" % out[:200])
        rc, out, err = cli("list", "workers", "--url", url, "--json", env={"III_TOKEN": t})
        eq(rc, 0, "iii list with $III_TOKEN (stderr %s)" % tail(err, 300))
        rc, out, err = cli("list", "functions", "--url", url)
        check(rc in (1, 3) and "401" in err, "iii list without a token: rc %r, stderr %s" % (rc, tail(err, 200)))
        procs = []
        try:
            env = dict(os.environ, III_TOKEN=t)
            env.pop("III_URL", None)
            watch = subprocess.Popen([wslib.BIN, "watch", "--url", url], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
            procs.append(watch)
            os.set_blocking(watch.stdout.fileno(), False)
            time.sleep(0.5)
            serve = subprocess.Popen([wslib.BIN, "serve", "cli::fn", "--url", url, "--token", t, "--",
                                      "sh", "-c", "echo 5"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, start_new_session=True)
            procs.append(serve)
            obs = Conn(e.port, token=t)
            wait_fn(obs, "cli::fn", timeout=8.0)
            eq(obs.ok("cli::fn", {}), 5, "iii serve --token function")
            seen = [b""]

            def watched():
                try:
                    seen[0] += watch.stdout.read() or b""
                except (BlockingIOError, TypeError):
                    pass
                return b"cli::fn" in seen[0]
            wait_until(watched, 4.0, "`iii watch` ($III_TOKEN) to print the new function cli::fn")
        finally:
            for p in procs:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            for p in procs:
                try:
                    p.wait(3)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(3)


# ---------------------------------------------------------------------------------------------

def main():
    rc = 1
    try:
        rc = suite.run()
    finally:
        for name, fx in _fixtures.items():
            if isinstance(fx, dict):
                why = _stop_fixture(fx)
                if why:
                    print("not ok - %s fixture engine: %s" % (name, why), flush=True)
                    rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
