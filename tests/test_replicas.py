#!/usr/bin/env python3
"""Replicas, routing rules, deadlines, cancellation, back-pressure, drain and rolling reload.

The interface (from the issue; this engine's extension, not in the reference):
* top-level `routing:` list, first match wins, hot-reloadable; a rule has `match` (glob over
  function ids), `namespace` (optional), `providers: one|many`, `balance:
  least-inflight|round-robin|first`, `timeout_ms`, `max_inflight`, `max_queue`,
  `retry_on_disconnect`;
* `invokefunction.timeout_ms`; `invocation_timeout` to the caller, `invocationcancelled` with
  `reason` `timeout` / `caller_disconnected` to the target;
* a worker entry's `instances: N` (III_WORKER_NAME=name.k, III_INSTANCE=k), rolling reload;
* listener `drain_timeout_ms` (engine_draining for new calls on SIGTERM);
* `providers` in engine::functions::list/info, per-provider in-flight and queue depth in /metrics.
Without `routing:` a second owner is refused exactly as PROTOCOL.md §2.1.

Raw sockets throughout (wslib); declared workers run tests/fixtures/replica_worker.py. Every
engine runs on 127.0.0.1 with --port 0; every wait is bounded; processes are stopped by pid /
process group.

Run: python3 tests/test_replicas.py     (III_BIN=path/to/iii, III_TEST_ONLY=substring)
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
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import wslib  # noqa: E402
from wslib import WS, Closed, Engine, Suite  # noqa: E402

REPW = os.path.join(HERE, "fixtures", "replica_worker.py")
PY = sys.executable
WAIT = 3.0

suite = Suite()
_open = []     # Peers a test opened
_engines = []  # engines a test started


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def eq(got, want, what):
    if got != want:
        raise Fail("%s: expected %s, got %s" % (what, _show(want), _show(got)))


def _show(x, n=500):
    try:
        s = json.dumps(x, sort_keys=True)
    except (TypeError, ValueError):
        s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


def new_id():
    return str(uuid.uuid4())


def wait_until(fn, timeout=WAIT, what="condition", interval=0.02):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def test(fn):
    @functools.wraps(fn)
    def run():
        try:
            return fn()
        finally:
            _cleanup()
    return suite.test(run)


def _cleanup():
    while _open:
        try:
            _open.pop().close()
        except Exception:  # noqa: BLE001
            pass
    while _engines:
        e = _engines.pop()
        try:
            e.stop()
            _kill_groups(e)
        except Exception:  # noqa: BLE001
            pass


def _kill_groups(e):
    for g in getattr(e, "groups", ()):
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# configuration

LISTENER = "workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n"


def rule(match, **kw):
    """One routing rule as YAML list item lines."""
    s = '  - match: "%s"\n' % match
    for k, v in kw.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        s += "    %s: %s\n" % (k, v)
    return s


def cfg(*rules, listener="", extra=""):
    s = LISTENER + "".join("      %s\n" % l for l in listener.splitlines() if l) + extra
    if rules:
        s += "routing:\n" + "".join(rules)
    return s


class eng:
    """A fresh engine for the test; fails the test if it died while the test ran."""

    def __init__(self, config=None, env=None):
        self.config = config
        self.env = env

    def __enter__(self):
        try:
            self.e = Engine(config=self.config, env=self.env)
        except RuntimeError as ex:
            raise Fail("engine did not start with the test's config: %s"
                       % str(ex).replace("\n", " | ")[-600:])
        self.e.groups = set()
        _engines.append(self.e)
        return self.e

    def __exit__(self, et, ev, tb):
        rc = self.e.proc.poll()
        while _open:
            try:
                _open.pop().close()
            except Exception:  # noqa: BLE001
                pass
        if rc is not None and not getattr(self.e, "expect_exit", False):
            msg = "ENGINE DIED during the test (status %s); stderr: %s" % (
                rc, self.e.stderr()[-600:].replace("\n", " | "))
            if et is None:
                raise Fail(msg)
            raise Fail(msg + " || test error: %s: %s" % (et.__name__, ev)) from ev
        self.e.stop()
        _kill_groups(self.e)
        rep = self.e.sanitizer_report()
        if rep and et is None:
            raise Fail("engine sanitizer report: " + rep)
        if et is None:
            shutil.rmtree(self.e.tmp, ignore_errors=True)
        return False


# ---------------------------------------------------------------------------------------------
# a raw peer: worker and/or caller, with a reader thread

class Peer:
    """A raw worker connection. It announces `name`, registers `fns` and (auto=True) answers
    every call to them after `delay` seconds with {"from": name, "data": data}; hang=True
    records calls and never answers. Every frame is recorded with its arrival time."""

    def __init__(self, e, name=None, fns=(), ns=None, delay=0.0, hang=False, announce=True):
        self.e = e
        self.ws = WS(e.port, timeout=5.0)
        _open.append(self)
        check(self.ws.status == 101, "upgrade answered %s" % self.ws.status)
        m = self.ws.recv_json(WAIT)
        check(m.get("type") == "workerregistered", "first frame %s" % _show(m))
        self.wid = m["worker_id"]
        self.name = name or "p-" + uuid.uuid4().hex[:8]
        self.fns = set(fns)
        self.delay = delay
        self.hang = hang
        self.cv = threading.Condition()
        self.frames = []     # (t, msg)
        self.invokes = []    # (t, msg) invokefunction frames for our fns
        self.cancels = []    # (t, msg) invocationcancelled frames
        self.results = {}    # iid -> [(t, msg), ...] (a list: duplicates are an error)
        self.sent = {}       # iid -> t
        self.pongs = 0
        self.closed = False
        self.eof = False
        self.wlock = threading.Lock()
        self.th = threading.Thread(target=self._reader, daemon=True)
        self.th.start()
        if announce:
            data = {"runtime": "python", "version": "0", "name": self.name, "os": "linux",
                    "pid": os.getpid()}
            if ns is not None:
                data["namespace"] = ns
            self.send({"type": "invokefunction", "function_id": "engine::workers::register",
                       "data": data, "action": {"type": "void"}})
        for f in fns:
            self.send({"type": "registerfunction", "id": f})
        self.sync()

    # -- I/O
    def send(self, obj):
        data = self.ws.frame(1, json.dumps(obj, separators=(",", ":")))
        with self.wlock:
            self.ws.send_raw(data)

    def _reader(self):
        while not self.closed:
            try:
                op, p = self.ws.recv_msg(0.2)
            except TimeoutError:
                continue
            except (Closed, OSError, ValueError, AssertionError):
                break
            try:
                m = json.loads(p.decode())
            except ValueError:
                continue
            t = time.time()
            with self.cv:
                self.frames.append((t, m))
                ty = m.get("type")
                if ty == "pong":
                    self.pongs += 1
                elif ty == "invocationcancelled":
                    self.cancels.append((t, m))
                elif ty == "invocationresult":
                    self.results.setdefault(m.get("invocation_id"), []).append((t, m))
                elif ty == "invokefunction" and m.get("function_id") in self.fns:
                    self.invokes.append((t, m))
                    if not self.hang and m.get("invocation_id"):
                        self._answer_later(m)
                self.cv.notify_all()
        with self.cv:
            self.eof = True
            self.cv.notify_all()

    def _answer_later(self, m):
        reply = {"type": "invocationresult", "invocation_id": m["invocation_id"],
                 "function_id": m["function_id"], "result": {"from": self.name, "data": m.get("data")}}
        if self.delay > 0:
            threading.Timer(self.delay, self._safe_send, (reply,)).start()
        else:
            self._safe_send(reply)

    def _safe_send(self, obj):
        if self.closed:
            return
        try:
            self.send(obj)
        except OSError:
            pass

    def wait(self, pred, timeout=WAIT, what="condition"):
        deadline = time.time() + timeout
        with self.cv:
            while True:
                v = pred()
                if v:
                    return v
                left = deadline - time.time()
                if left <= 0:
                    raise Fail("%s: timed out after %.1fs waiting for %s" % (self.name, timeout, what))
                self.cv.wait(min(left, 0.1))

    def sync(self, timeout=WAIT):
        with self.cv:
            n = self.pongs
        self.send({"type": "ping"})
        self.wait(lambda: self.pongs > n, timeout, "pong")

    def frames_of(self, ty):
        with self.cv:
            return [m for _, m in self.frames if m.get("type") == ty]

    # -- calls
    def call_async(self, fid, data=None, **extra):
        iid = new_id()
        msg = {"type": "invokefunction", "invocation_id": iid, "function_id": fid,
               "data": {} if data is None else data}
        msg.update(extra)
        with self.cv:
            self.sent[iid] = time.time()
        self.send(msg)
        return iid

    def result(self, iid, timeout=WAIT):
        return self.wait(lambda: self.results.get(iid), timeout, "result of %s" % iid)[0][1]

    def call(self, fid, data=None, timeout=WAIT, **extra):
        return self.result(self.call_async(fid, data, **extra), timeout)

    def ok(self, fid, data=None, timeout=WAIT, **extra):
        r = self.call(fid, data, timeout, **extra)
        check("error" not in r, "call %s failed: %s" % (fid, _show(r)))
        return r.get("result")

    def answer(self, iid, result=None, fid=None):
        self.send({"type": "invocationresult", "invocation_id": iid, "function_id": fid or "x",
                   "result": result if result is not None else {"from": self.name}})

    def invoked_ids(self):
        with self.cv:
            return [m["invocation_id"] for _, m in self.invokes]

    def close(self, abrupt=True):
        """abrupt: the TCP connection just ends (what SIGKILL of the process looks like)."""
        if self.closed:
            return
        self.closed = True
        try:
            if abrupt:
                self.ws.sock.shutdown(socket.SHUT_RDWR)
            else:
                self.ws.send_frame(8, b"\x03\xe8")
        except OSError:
            pass
        self.ws.close()


def flist(p, **inp):
    r = p.call("engine::functions::list", dict({"include_internal": True}, **inp))
    check("error" not in r, "functions::list failed: %s" % _show(r))
    return r["result"]["functions"]


def frows(p, fid):
    return [f for f in flist(p) if f.get("function_id") == fid]


def rejections(p):
    return p.frames_of("registrationrejected")


def http_get(port, path, timeout=3.0):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)).encode())
        data = b""
        deadline = time.time() + timeout
        while time.time() < deadline:
            d = s.recv(65536)
            if not d:
                break
            data += d
    finally:
        s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode("utf-8", "replace")


class Load:
    """n threads, each doing sequential synchronous calls on one caller Peer until stop() or
    `total` calls were issued. Records every call: (issued_at, done_at, frame or None)."""

    def __init__(self, caller, fid, threads=4, total=None, rate=None, timeout=10.0, data=None):
        self.caller, self.fid, self.total, self.rate = caller, fid, total, rate
        self.timeout = timeout
        self.data = data
        self.lock = threading.Lock()
        self.issued = 0
        self.records = []
        self.stopping = False
        self.ths = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.t0 = time.time()
        for t in self.ths:
            t.start()

    def _next(self):
        with self.lock:
            if self.stopping or (self.total is not None and self.issued >= self.total):
                return None
            k = self.issued
            self.issued += 1
        if self.rate:  # pace: call k is issued no earlier than t0 + k / rate
            d = self.t0 + k / float(self.rate) - time.time()
            if d > 0:
                time.sleep(d)
        return k

    def _run(self):
        while True:
            k = self._next()
            if k is None:
                return
            t = time.time()
            try:
                iid = self.caller.call_async(self.fid, dict({"k": k}, **(self.data or {})))
                r = self.caller.result(iid, self.timeout)
            except Fail as ex:
                r = {"error": {"code": "test_no_result", "message": str(ex)[:200]}}
            except OSError as ex:
                r = {"error": {"code": "test_send_failed", "message": str(ex)}}
            with self.lock:
                self.records.append((t, time.time(), r))

    def stop(self, timeout=15.0):
        with self.lock:
            self.stopping = True
        for t in self.ths:
            t.join(timeout)

    def join(self, timeout=30.0):
        deadline = time.time() + timeout
        for t in self.ths:
            t.join(max(0.01, deadline - time.time()))
        check(not any(t.is_alive() for t in self.ths), "load did not finish within %.0fs" % timeout)

    def failures(self, since=0.0):
        return [r for t, _, r in self.records if t >= since and "error" in r]

    def by_from(self):
        out = {}
        for _, _, r in self.records:
            f = (r.get("result") or {}).get("from") if isinstance(r.get("result"), dict) else None
            out[f] = out.get(f, 0) + 1
        return out


def summary(fails, n=3):
    codes = {}
    for r in fails:
        c = r["error"].get("code")
        codes[c] = codes.get(c, 0) + 1
    return "%d failed %s; e.g. %s" % (len(fails), _show(codes), _show([r["error"] for r in fails[:n]]))


# =============================================================================================
# default configuration: unchanged (PROTOCOL.md §2.1)

@test
def default_config_second_owner_refused():
    with eng(cfg()) as e:
        a = Peer(e, "own-a", ["dup::f"])
        b = Peer(e, "own-b", ["dup::f"])
        m = b.wait(lambda: rejections(b), WAIT, "registrationrejected")[0]
        eq(m, {"type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT",
               "namespace": "default", "function_id": "dup::f", "owner_worker_id": a.wid},
           "rejection frame")
        for _ in range(5):
            eq(a.ok("dup::f", {"v": 1}).get("from"), "own-a", "every call goes to the owner")
        check(not b.invokes, "the refused worker got calls")


@test
def rule_not_matching_keeps_single_owner():
    with eng(cfg(rule("orders::*", providers="many"))) as e:
        a = Peer(e, "nm-a", ["billing::x", "orders::x"])
        b = Peer(e, "nm-b", ["billing::x", "orders::x"])
        b.sync()
        rj = rejections(b)
        eq([(m.get("code"), m.get("function_id"), m.get("owner_worker_id")) for m in rj],
           [("FUNCTION_NAMESPACE_CONFLICT", "billing::x", a.wid)],
           "only the id outside the rule is refused")


@test
def rule_namespace_scoped():
    with eng(cfg(rule("orders::*", namespace="shop", providers="many", balance="round-robin"))) as e:
        d1 = Peer(e, "nsd-1", ["orders::x"])
        d2 = Peer(e, "nsd-2", ["orders::x"])
        s1 = Peer(e, "nss-1", ["orders::x"], ns="shop")
        s2 = Peer(e, "nss-2", ["orders::x"], ns="shop")
        d2.sync(), s2.sync()
        eq([(m.get("code"), m.get("namespace"), m.get("owner_worker_id")) for m in rejections(d2)],
           [("FUNCTION_NAMESPACE_CONFLICT", "default", d1.wid)], "default namespace: refused")
        eq(rejections(s2), [], "namespace shop: the second provider joins")
        seen = set()
        for _ in range(40):
            seen.add(d1.ok("orders::x", namespace="shop").get("from"))
        eq(sorted(seen), ["nss-1", "nss-2"], "calls in shop reach both providers")
        check(not d2.invokes, "the refused worker in default got calls")
        eq(sorted(d1.ok("orders::x").get("from") for _ in range(5)), ["nsd-1"] * 5,
           "default keeps its single owner")


@test
def first_matching_rule_wins():
    with eng(cfg(rule("orders::legacy", providers="one"), rule("orders::*", providers="many"))) as e:
        a = Peer(e, "fm-a", ["orders::legacy", "orders::new"])
        b = Peer(e, "fm-b", ["orders::legacy", "orders::new"])
        b.sync()
        eq([(m.get("code"), m.get("function_id"), m.get("owner_worker_id")) for m in rejections(b)],
           [("FUNCTION_NAMESPACE_CONFLICT", "orders::legacy", a.wid)],
           "orders::legacy matches `providers: one` first")


@test
def routing_hot_reload_enables_many():
    with eng(cfg()) as e:
        a = Peer(e, "hr-a", ["hot::f"])
        b = Peer(e, "hr-b", ["hot::f"])
        b.wait(lambda: rejections(b), WAIT, "the refusal under the default config")
        b.close()
        with open(e.cfg, "w") as f:
            f.write(cfg(rule("hot::*", providers="many", balance="round-robin")))
        os.kill(e.proc.pid, signal.SIGHUP)

        def joined():
            c = Peer(e, "hr-c-" + uuid.uuid4().hex[:4], ["hot::f"])
            c.sync()
            if rejections(c):
                c.close()
                time.sleep(0.2)
                return None
            return c
        c = wait_until(joined, 5.0, "a second provider to be accepted after the reload")
        seen = set()
        for _ in range(40):
            seen.add(a.ok("hot::f").get("from"))
        eq(sorted(seen), sorted(["hr-a", c.name]), "calls reach both providers after the reload")


# =============================================================================================
# providers: many

@test
def many_providers_listed():
    with eng(cfg(rule("orders::*", providers="many"))) as e:
        ps = [Peer(e, "lst-%d" % i, ["orders::get"]) for i in range(3)]
        for p in ps:
            eq(rejections(p), [], "%s was refused" % p.name)
        rows = frows(ps[0], "orders::get")
        eq(len(rows), 1, "one row per (namespace, id) in engine::functions::list")
        r = rows[0]
        for k in ("function_id", "namespace", "worker_name"):
            check(k in r, "functions::list row lost %r: %s" % (k, _show(r)))
        eq(r["namespace"], "default", "namespace")
        prov = r.get("providers")
        check(isinstance(prov, list), "functions::list row has no `providers` array: %s" % _show(r))
        flat = json.dumps(prov)
        for p in ps:
            check(p.wid in flat, "providers %s lacks worker id %s" % (_show(prov), p.wid))
        info = ps[0].call("engine::functions::info", {"function_id": "orders::get"})
        check("error" not in info, "functions::info failed: %s" % _show(info))
        ir = info["result"]
        for k in ("function_id", "namespace", "worker_name", "registered_triggers"):
            check(k in ir, "functions::info lost %r: %s" % (k, _show(ir)))
        iprov = ir.get("providers")
        check(isinstance(iprov, list), "functions::info has no `providers` array: %s" % _show(ir))
        for p in ps:
            check(p.wid in json.dumps(iprov), "info providers %s lacks %s" % (_show(iprov), p.wid))
        ps[1].close()
        wait_until(lambda: ps[1].wid not in json.dumps(frows(ps[0], "orders::get")[0].get("providers")),
                   WAIT, "the closed provider to leave `providers`")
        left = json.dumps(frows(ps[0], "orders::get")[0].get("providers"))
        check(ps[0].wid in left and ps[2].wid in left, "remaining providers: %s" % left)


@test
def providers_listed_for_single_provider_under_rule():
    # the issue: list/info "add providers"; a function under a `providers: many` rule with one
    # provider left is still a provider set (it can grow at any time), so it shows the one
    with eng(cfg(rule("one::*", providers="many"))) as e:
        a = Peer(e, "one-a", ["one::f"])
        r = frows(a, "one::f")[0]
        check(a.wid in json.dumps(r.get("providers")), "functions::list row: %s" % _show(r))
        i = a.call("engine::functions::info", {"function_id": "one::f"}).get("result")
        check(a.wid in json.dumps((i or {}).get("providers")), "functions::info: %s" % _show(i))


def _spread(balance, total=1000, threads=1):
    rules = [rule("spread::*", providers="many", **({"balance": balance} if balance else {}))]
    with eng(cfg(*rules)) as e:
        ps = [Peer(e, "sp-%d" % i, ["spread::f"]) for i in range(4)]
        c = Peer(e, "sp-caller")
        ld = Load(c, "spread::f", threads=threads, total=total)
        ld.join(60)
        fails = ld.failures()
        check(not fails, summary(fails))
        got = ld.by_from()
        for p in ps:
            n = got.get(p.name, 0)
            check(n >= 0.15 * total, "%s served %d of %d calls (< 15 %%); spread %s"
                  % (p.name, n, total, _show(got)))
        return got


@test
def round_robin_four_replicas_share_1000_calls():
    got = _spread("round-robin", 1000, threads=1)
    # sequential calls under round-robin: an exact rotation
    check(max(got.values()) - min(got.values()) <= 1, "round-robin is not a rotation: %s" % _show(got))


@test
def least_inflight_four_replicas_share_1000_calls():
    _spread(None, 1000, threads=8)


@test
def least_inflight_sequential_calls_still_spread():
    # every provider is idle at every call: ties must not all go to the same provider
    _spread("least-inflight", 400, threads=1)


@test
def least_inflight_steers_around_slow_replica():
    with eng(cfg(rule("lb::*", providers="many", balance="least-inflight"))) as e:
        slow = Peer(e, "lb-slow", ["lb::f"], delay=0.5)
        fast = [Peer(e, "lb-fast-%d" % i, ["lb::f"], delay=0.005) for i in range(2)]
        c = Peer(e, "lb-caller")
        ld = Load(c, "lb::f", threads=4, total=300)
        ld.join(30)
        fails = ld.failures()
        check(not fails, summary(fails))
        got = ld.by_from()
        n = got.get("lb-slow", 0)
        check(n <= 0.10 * 300, "the slow replica served %d of 300 calls (> 10 %%): %s" % (n, _show(got)))
        for f in fast:
            check(got.get(f.name, 0) >= 0.3 * 300, "fast replica %s underused: %s" % (f.name, _show(got)))


# =============================================================================================
# failover

@test
def first_is_active_standby_and_fails_over():
    with eng(cfg(rule("as::*", providers="many", balance="first"))) as e:
        a = Peer(e, "as-a", ["as::f"])
        b = Peer(e, "as-b", ["as::f"])
        d = Peer(e, "as-d", ["as::f"])
        c = Peer(e, "as-caller")
        for _ in range(30):
            eq(c.ok("as::f").get("from"), "as-a", "balance first: the earliest provider serves")
        check(not b.invokes and not d.invokes, "the standbys got calls")
        ld = Load(c, "as::f", threads=3)
        time.sleep(0.3)
        t_kill = time.time()
        a.close()  # abrupt, like SIGKILL

        def a_gone():
            r = c.call("engine::workers::list", {})
            return a.wid not in json.dumps(r.get("result"))
        wait_until(a_gone, WAIT, "the engine to notice the lost provider")
        t_gone = time.time()
        time.sleep(0.5)
        ld.stop()
        nf = [r for _, _, r in ld.records if (r.get("error") or {}).get("code") == "function_not_found"]
        check(not nf, "function_not_found during the failover: %s" % summary(nf))
        late = ld.failures(since=t_gone)
        check(not late, "calls after the engine saw the loss failed: " + summary(late))
        early = [r for r in ld.failures() if r["error"].get("code") != "invocation_stopped"]
        check(not early, "calls around the loss failed other than invocation_stopped: " + summary(early))
        after = [r["result"]["from"] for t, _, r in ld.records if t >= t_gone and "result" in r]
        check(after and set(after) == {"as-b"}, "after the loss the next provider (as-b) serves: %s"
              % _show(sorted(set(after))))
        before = [r["result"]["from"] for _, done, r in ld.records if done < t_kill and "result" in r]
        check(set(before) <= {"as-a"}, "before the loss only as-a served: %s" % _show(set(before)))


@test
def failover_no_gap_no_functions_changed_and_stopped():
    with eng(cfg(rule("fo::*", providers="many"))) as e:
        sub = Peer(e, "fo-sub", ["fosub::on_fns"], hang=False)
        sub.send({"type": "registertrigger", "id": "fo-watch", "trigger_type": "engine::functions-available",
                  "function_id": "fosub::on_fns", "config": {}})
        a = Peer(e, "fo-a", ["fo::f"], hang=True)
        b = Peer(e, "fo-b", ["fo::f"], delay=0.002)
        c = Peer(e, "fo-caller")
        time.sleep(0.5)  # events about the registrations above are delivered by now
        with sub.cv:
            base = len(sub.invokes)
        # calls in flight on a (which never answers)
        hung = []
        for _ in range(20):
            hung.append(c.call_async("fo::f"))
            if len(a.invokes) >= 3:
                break
        wait_until(lambda: len(a.invokes) >= 1, WAIT, "a call in flight on fo-a")
        on_a = set(a.invoked_ids())
        ld = Load(c, "fo::f", threads=2)
        time.sleep(0.2)
        a.close()
        time.sleep(0.8)
        ld.stop()
        for iid in on_a:
            r = c.result(iid, WAIT)
            eq(r.get("error"), {"code": "invocation_stopped", "message": "Invocation stopped"},
               "a call in flight on the lost provider")
        bad = [r for r in ld.failures() if r["error"].get("code") != "invocation_stopped"]
        check(not bad, "calls failed during the failover: " + summary(bad))
        nf = ld.failures()
        check(len(nf) <= 1, "more than the one racing call failed: " + summary(nf))
        with sub.cv:
            evs = [m.get("data") for _, m in sub.invokes[base:]]
        check(not evs, "functions_changed fired while a provider remained: %s" % _show(evs))
        b.close()
        sub.wait(lambda: len(sub.invokes) > base, WAIT,
                 "functions_changed once the last provider is gone (the subscription works)")


@test
def retry_on_disconnect_exactly_once():
    with eng(cfg(rule("idem::*", providers="many", retry_on_disconnect=True))) as e:
        a = Peer(e, "rt-a", ["idem::f"], delay=0.05)
        b = Peer(e, "rt-b", ["idem::f"], delay=0.05)
        c = Peer(e, "rt-caller")
        total = 300
        ld = Load(c, "idem::f", threads=20, total=total)
        wait_until(lambda: len(a.invokes) >= 40, 10, "fo-a to take calls")
        a.close()  # its unanswered calls are re-dispatched
        ld.join(30)
        time.sleep(0.3)
        fails = ld.failures()
        check(not fails, "retry_on_disconnect: " + summary(fails))
        eq(len(ld.records), total, "every call has an outcome")
        with c.cv:
            dup = {k: len(v) for k, v in c.results.items() if len(v) != 1}
            n = len(c.results)
        check(not dup, "a call was answered more than once: %s" % _show(dup))
        eq(n, total, "distinct results at the caller")
        # the ones a never answered reached b
        ra = [r for _, _, r in ld.records if r.get("result", {}).get("from") == "rt-a"]
        rb = [r for _, _, r in ld.records if r.get("result", {}).get("from") == "rt-b"]
        check(rb and len(ra) + len(rb) == total, "results from a %d, b %d" % (len(ra), len(rb)))
        redone = set(a.invoked_ids()) & set(b.invoked_ids())
        check(redone, "no call was in flight on rt-a when it went away (nothing was re-dispatched)")
        with b.cv:
            ids_b = [m["invocation_id"] for _, m in b.invokes]
        check(len(ids_b) == len(set(ids_b)), "rt-b got a call twice")


# =============================================================================================
# deadlines and cancellation

def _timeout_err(ms):
    return {"code": "invocation_timeout", "message": "Invocation timed out after %d ms" % ms}


@test
def deadline_timeout_ms_on_the_call():
    with eng(cfg()) as e:
        t = Peer(e, "dl-t", ["dl::hang"], hang=True)
        c = Peer(e, "dl-c")
        iid = c.call_async("dl::hang", {"x": 1}, timeout_ms=300)
        r = c.result(iid, 3)
        dt = (c.results[iid][0][0] - c.sent[iid]) * 1000
        eq(r.get("error"), _timeout_err(300), "error")
        eq(r.get("function_id"), "dl::hang", "function_id")
        check(295 <= dt <= 400, "invocation_timeout %.0f ms after the call (timeout_ms 300, +100 allowed)" % dt)
        m = t.wait(lambda: t.cancels, WAIT, "invocationcancelled")[0][1]
        eq(m, {"type": "invocationcancelled", "invocation_id": iid, "reason": "timeout"}, "cancel frame")
        # a late answer is dropped: no second result
        t.answer(iid, {"late": True}, "dl::hang")
        time.sleep(0.3)
        eq(len(c.results[iid]), 1, "results for the timed-out call")
        # a call that finishes in time is untouched, and its target is not told anything
        t.hang = False
        r2 = c.call("dl::hang", {}, timeout_ms=2000)
        check("result" in r2, "a call within its deadline: %s" % _show(r2))
        time.sleep(0.2)
        eq(len(t.cancels), 1, "cancels after a call that finished in time")


@test
def deadline_from_routing_rule():
    with eng(cfg(rule("slow::*", timeout_ms=300))) as e:
        t = Peer(e, "rd-t", ["slow::f", "other::f"], hang=True)
        c = Peer(e, "rd-c")
        iid = c.call_async("slow::f", {})
        r = c.result(iid, 3)
        dt = (c.results[iid][0][0] - c.sent[iid]) * 1000
        eq(r.get("error"), _timeout_err(300), "rule deadline")
        check(295 <= dt <= 400, "rule timeout_ms 300 fired after %.0f ms" % dt)
        _, m = t.wait(lambda: [x for x in t.cancels if x[1].get("invocation_id") == iid], WAIT,
                      "invocationcancelled for the rule-timed call")[0]
        eq(m.get("reason"), "timeout", "cancel reason")
        # the call's own timeout_ms wins over the rule's
        iid2 = c.call_async("slow::f", {}, timeout_ms=120)
        eq(c.result(iid2, 3).get("error"), _timeout_err(120), "the call's own deadline")
        # an id outside the rule has no deadline
        iid3 = c.call_async("other::f", {})
        time.sleep(0.6)
        check(iid3 not in c.results, "a call outside every rule timed out: %s" % _show(c.results.get(iid3)))


@test
def deadline_applies_to_trigger_fired_calls():
    with eng(cfg(rule("tsub::*", timeout_ms=300))) as e:
        s = Peer(e, "tf-sub", ["tsub::on_fns"], hang=True)
        s.send({"type": "registertrigger", "id": "tf-watch", "trigger_type": "engine::functions-available",
                "function_id": "tsub::on_fns", "config": {}})
        s.sync()
        time.sleep(0.3)
        with s.cv:
            base = len(s.invokes)
        Peer(e, "tf-x", ["tfx::new"])
        s.wait(lambda: len(s.invokes) > base, WAIT, "the functions_changed fire")
        t0, inv = s.invokes[base]
        iid = inv.get("invocation_id")
        check(iid, "the fire carries an invocation_id: %s" % _show(inv))
        t1, m = s.wait(lambda: [x for x in s.cancels if x[1].get("invocation_id") == iid], 2.0,
                       "invocationcancelled for the fired call")[0]
        eq(m, {"type": "invocationcancelled", "invocation_id": iid, "reason": "timeout"}, "cancel frame")
        dt = (t1 - t0) * 1000
        check(250 <= dt <= 450, "the fired call was cancelled %.0f ms after it arrived (rule 300)" % dt)


@test
def caller_disconnect_cancels_call_with_deadline():
    with eng(cfg()) as e:
        t = Peer(e, "cd-t", ["cd::hang"], hang=True)
        c = Peer(e, "cd-c")
        iid = c.call_async("cd::hang", {}, timeout_ms=10000)
        t.wait(lambda: t.invokes, WAIT, "the call at the target")
        t0 = time.time()
        c.close()
        _, m = t.wait(lambda: t.cancels, WAIT, "invocationcancelled")[0]
        eq(m, {"type": "invocationcancelled", "invocation_id": iid, "reason": "caller_disconnected"},
           "cancel frame")
        check(time.time() - t0 < 1.0, "cancel took %.2fs" % (time.time() - t0))


@test
def caller_disconnect_cancels_routed_call():
    with eng(cfg(rule("rc::*", providers="many"))) as e:
        t = Peer(e, "rc-t", ["rc::hang", "plain::hang"], hang=True)
        c = Peer(e, "rc-c")
        iid = c.call_async("rc::hang", {})
        iid2 = c.call_async("plain::hang", {})
        t.wait(lambda: len(t.invokes) >= 2, WAIT, "both calls at the target")
        c.close()
        _, m = t.wait(lambda: t.cancels, WAIT, "invocationcancelled")[0]
        eq(m, {"type": "invocationcancelled", "invocation_id": iid, "reason": "caller_disconnected"},
           "cancel frame (a call under a routing rule, no deadline)")
        time.sleep(0.3)
        others = [x for _, x in t.cancels if x.get("invocation_id") == iid2]
        eq(others, [], "a call with no deadline and no rule: no invocationcancelled (as the reference)")


@test
def busy_when_queue_full():
    with eng(cfg(rule("bq::*", providers="many", max_inflight=1, max_queue=2))) as e:
        t = Peer(e, "bq-t", ["bq::f"], hang=True)
        c = Peer(e, "bq-c")
        ids = [c.call_async("bq::f", {"n": i}) for i in range(3)]
        t.wait(lambda: t.invokes, WAIT, "the first call at the target")
        time.sleep(0.3)
        eq(len(t.invokes), 1, "max_inflight 1: calls dispatched while one is in flight")
        check(not any(i in c.results for i in ids), "a queued call was answered: %s" % _show(c.results))
        t0 = time.time()
        iid4 = c.call_async("bq::f", {"n": 3})
        r4 = c.result(iid4, 2)
        eq((r4.get("error") or {}).get("code"), "BUSY", "a call beyond max_queue: %s" % _show(r4))
        check(time.time() - t0 < 1.0, "BUSY is immediate")
        check(isinstance(r4["error"].get("message"), str) and r4["error"]["message"], "BUSY has a message")
        # answering drains the queue in order
        for k in range(3):
            t.wait(lambda: len(t.invokes) > k, WAIT, "queued call %d dispatched" % k)
            inv = t.invokes[k][1]
            eq(inv["invocation_id"], ids[k], "dispatch order")
            t.answer(inv["invocation_id"], {"n": k}, "bq::f")
            r = c.result(ids[k], WAIT)
            eq(r.get("result"), {"n": k}, "result %d" % k)


def metric_lines(port, name):
    st, body = http_get(port, "/metrics")
    eq(st, 200, "/metrics status")
    return [l for l in body.splitlines() if l.startswith(name + "{") or l.startswith(name + " ")]


def metric_value(line):
    return float(line.rsplit(" ", 1)[1])


@test
def metrics_per_provider_inflight_and_queue_depth():
    with eng(cfg(rule("mq::*", providers="many", max_inflight=1, max_queue=5))) as e:
        ps = [Peer(e, "mq-%d" % i, ["mq::f"], hang=True) for i in range(2)]
        c = Peer(e, "mq-c")
        for i in range(4):
            c.call_async("mq::f", {"n": i})
        for p in ps:
            p.wait(lambda: p.invokes, WAIT, "a call at %s" % p.name)
        time.sleep(0.2)
        lines = metric_lines(e.port, "iii_provider_inflight")
        for p in ps:
            mine = [l for l in lines if p.wid in l and 'function="mq::f"' in l]
            check(mine and metric_value(mine[0]) == 1,
                  "iii_provider_inflight for %s: %s (all: %s)" % (p.name, _show(mine), _show(lines)))
        q = [l for l in metric_lines(e.port, "iii_function_queue_depth") if 'function="mq::f"' in l]
        check(q and metric_value(q[0]) == 2, "iii_function_queue_depth of mq::f: %s" % _show(q))


@test
def metrics_single_provider_under_rule_listed():
    # a function under a `providers: many` rule that has one provider right now is still routed
    # by the rule (bounds, queue): its provider's in-flight is reported too
    with eng(cfg(rule("m1::*", providers="many", max_inflight=1, max_queue=5))) as e:
        p = Peer(e, "m1-p", ["m1::f"], hang=True)
        c = Peer(e, "m1-c")
        for i in range(3):
            c.call_async("m1::f", {"n": i})
        p.wait(lambda: p.invokes, WAIT, "a call at the provider")
        time.sleep(0.2)
        lines = [l for l in metric_lines(e.port, "iii_provider_inflight") if p.wid in l]
        check(lines and metric_value(lines[0]) == 1, "iii_provider_inflight for the only provider: %s"
              % _show(lines))
        q = [l for l in metric_lines(e.port, "iii_function_queue_depth") if 'function="m1::f"' in l]
        check(q and metric_value(q[0]) == 2, "iii_function_queue_depth of m1::f: %s" % _show(q))


@test
def busy_queued_call_honours_deadline():
    with eng(cfg(rule("bqd::*", providers="many", max_inflight=1, max_queue=5, timeout_ms=400))) as e:
        t = Peer(e, "bqd-t", ["bqd::f"], hang=True)
        c = Peer(e, "bqd-c")
        a = c.call_async("bqd::f", timeout_ms=1500)  # holds the only slot past b's deadline
        t.wait(lambda: t.invokes, WAIT, "first call")
        b = c.call_async("bqd::f")  # waits in the queue past its deadline
        rb = c.result(b, 2)
        eq(rb.get("error"), _timeout_err(400), "a queued call times out")
        ra = c.result(a, 3)
        eq(ra.get("error"), _timeout_err(1500), "the in-flight call times out")
        time.sleep(0.2)
        eq([m["invocation_id"] for _, m in t.invokes], [a], "the queued call was never dispatched")


# =============================================================================================
# drain on SIGTERM

@test
def drain_finishes_inflight_and_refuses_new():
    with eng(cfg(listener="drain_timeout_ms: 5000")) as e:
        t = Peer(e, "dr-t", ["dr::slow", "dr::fast"], delay=2.0)
        c = Peer(e, "dr-c")
        iid = c.call_async("dr::slow", {})
        t.wait(lambda: t.invokes, WAIT, "the 2 s call at the target")
        t0 = time.time()
        e.expect_exit = True
        e.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        r = c.call("dr::fast", {}, timeout=2)
        eq((r.get("error") or {}).get("code"), "engine_draining", "a new call while draining: %s" % _show(r))
        refused = False
        try:
            w = WS(e.port, timeout=1.0)
            refused = w.status != 101
            w.close()
        except (OSError, TimeoutError, Closed):
            refused = True
        check(refused, "a new connection was accepted while draining")
        r = c.result(iid, 4)
        check("result" in r and "error" not in r, "the 2 s call did not finish: %s" % _show(r))
        rc = e.proc.wait(5)
        eq(rc, 0, "exit status")
        took = time.time() - t0
        check(1.5 <= took <= 4.0, "the engine exited %.2fs after SIGTERM (the call needed ~1.7 s)" % took)


@test
def drain_timeout_stops_the_rest():
    # both connection orders: whichever of caller and target the shutdown reaches first, the
    # caller is told invocation_stopped
    for order in ("target-first", "caller-first"):
        with eng(cfg(listener="drain_timeout_ms: 500")) as e:
            if order == "caller-first":
                c = Peer(e, "dt-c")
                Peer(e, "dt-t", ["dt::hang"], hang=True)
            else:
                Peer(e, "dt-t", ["dt::hang"], hang=True)
                c = Peer(e, "dt-c")
            iid = c.call_async("dt::hang", {})
            time.sleep(0.2)
            t0 = time.time()
            e.expect_exit = True
            e.proc.send_signal(signal.SIGTERM)
            try:
                r = c.result(iid, 3)
            except Fail:
                raise Fail("%s: no invocationresult for the call in flight when drain_timeout_ms "
                           "passed (frames: %s)" % (order, _show([m for _, m in c.frames])))
            dt = time.time() - t0
            eq(r.get("error"), {"code": "invocation_stopped", "message": "Invocation stopped"},
               "%s: error" % order)
            check(0.4 <= dt <= 1.5, "%s: stopped %.2fs after SIGTERM (drain_timeout_ms 500)" % (order, dt))
            eq(e.proc.wait(5), 0, "exit status")


# =============================================================================================
# instances and rolling reload (declared workers: tests/fixtures/replica_worker.py)

def rep_entry(name, instances, v="1", delay_ms=0, extra=""):
    return ("  - name: %s\n    command: [%s, %s]\n    instances: %d\n"
            "    env: { V: \"%s\", REPLICA_FNS: \"rep::echo\", REPLICA_DELAY_MS: \"%d\" }\n%s"
            % (name, json.dumps(PY), json.dumps(REPW), instances, v, delay_ms, extra))


def rep_cfg(instances, v="1", delay_ms=0):
    # round-robin: sequential probes reach every instance (least-inflight's ties are tested above)
    return cfg(rule("rep::*", providers="many", balance="round-robin"),
               extra=rep_entry("rep", instances, v, delay_ms))


def served_by(c, n=60):
    """{instance name: (pid, env_v)} of who answers n calls."""
    out = {}
    for _ in range(n):
        r = c.call("rep::echo", {}, timeout=3)
        if "result" in r:
            x = r["result"]
            out[x["name"]] = (x["pid"], x.get("env_v"), x.get("instance"))
    return out


def provider_count(c):
    rows = frows(c, "rep::echo")
    if not rows:
        return 0
    # `providers` is listed once a function has several (a single provider may omit it)
    return len(rows[0].get("providers") or [None])


def track_groups(e, pids):
    for p in pids:
        try:
            e.groups.add(os.getpgid(p))
        except (ProcessLookupError, PermissionError):
            pass


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return True


@test
def instances_spawn_and_resize():
    with eng(rep_cfg(3)) as e:
        c = Peer(e, "in-c")
        wait_until(lambda: provider_count(c) == 3, 8, "3 providers of rep::echo")
        s = wait_until(lambda: (lambda x: x if len(x) == 3 else None)(served_by(c, 60)), 5,
                       "calls served by 3 instances")
        eq(sorted(s), ["rep.1", "rep.2", "rep.3"], "III_WORKER_NAME of the instances")
        eq(sorted(v[2] for v in s.values()), ["1", "2", "3"], "III_INSTANCE")
        track_groups(e, [v[0] for v in s.values()])
        # 3 -> 2: only rep.3 stops
        with open(e.cfg, "w") as f:
            f.write(rep_cfg(2))
        os.kill(e.proc.pid, signal.SIGHUP)
        wait_until(lambda: not pid_alive(s["rep.3"][0]), 5, "rep.3 to stop")
        wait_until(lambda: provider_count(c) == 2, 3, "2 providers")
        check(pid_alive(s["rep.1"][0]) and pid_alive(s["rep.2"][0]), "rep.1 / rep.2 were stopped")
        # 2 -> 4: rep.3 and rep.4 start, rep.1 and rep.2 keep their processes
        with open(e.cfg, "w") as f:
            f.write(rep_cfg(4))
        os.kill(e.proc.pid, signal.SIGHUP)
        wait_until(lambda: provider_count(c) == 4, 8, "4 providers")
        s2 = wait_until(lambda: (lambda x: x if len(x) == 4 else None)(served_by(c, 80)), 5,
                        "calls served by 4 instances")
        track_groups(e, [v[0] for v in s2.values()])
        eq(sorted(s2), ["rep.1", "rep.2", "rep.3", "rep.4"], "instances after growing")
        eq((s2["rep.1"][0], s2["rep.2"][0]), (s["rep.1"][0], s["rep.2"][0]),
           "growing restarted rep.1 / rep.2")


@test
def rolling_reload_under_load_zero_failures():
    with eng(rep_cfg(3, v="1", delay_ms=5)) as e:
        c = Peer(e, "rr-c")
        wait_until(lambda: provider_count(c) == 3, 8, "3 providers of rep::echo")
        old = wait_until(lambda: (lambda x: x if len(x) == 3 else None)(served_by(c, 60)), 5,
                         "calls served by 3 instances")
        track_groups(e, [v[0] for v in old.values()])
        ld = Load(c, "rep::echo", threads=8, rate=200)
        time.sleep(1.0)
        t_reload = time.time()
        with open(e.cfg, "w") as f:
            f.write(rep_cfg(3, v="2", delay_ms=5))
        os.kill(e.proc.pid, signal.SIGHUP)

        def replaced():
            with ld.lock:
                recs = list(ld.records[-200:])
            news = {r["result"]["name"]: r["result"]["pid"] for t, _, r in recs
                    if "result" in r and r["result"].get("env_v") == "2"}
            return news if len(news) == 3 else None
        try:
            news = wait_until(replaced, 25, "all 3 instances to be replaced (V=2)", interval=0.1)
            track_groups(e, news.values())
            time.sleep(1.0)
        finally:
            ld.stop()
        fails = ld.failures()
        n = len(ld.records)
        rate = n / max(0.1, time.time() - ld.t0)
        check(not fails, "calls failed across the rolling reload (%d calls): %s" % (n, summary(fails)))
        check(rate >= 120, "the load ran at %.0f calls/s (wanted ~200)" % rate)
        for name, (pid, _, _) in old.items():
            check(not pid_alive(pid), "old instance %s (pid %d) still runs" % (name, pid))
        # one at a time: while the reload ran, every 0.5 s window of calls reached at least 2
        # processes (a stop-all-then-start reload leaves windows with none or one)
        recs = sorted((t, r["result"]["pid"]) for t, _, r in ld.records if "result" in r and t >= t_reload)
        check(recs, "no calls after the reload")
        w = t_reload
        while w + 0.5 <= recs[-1][0]:
            pids = {p for t, p in recs if w <= t < w + 0.5}
            check(len(pids) >= 2, "calls in [%.1f, %.1f) s after the reload reached %d process(es)"
                  % (w - t_reload, w + 0.5 - t_reload, len(pids)))
            w += 0.5
        eq(sorted(news), ["rep.1", "rep.2", "rep.3"], "instances after the reload")



@test
def rolling_reload_waits_for_slow_calls():
    # every call takes 400 ms: an old instance must be drained (its calls answered) before it
    # is stopped, or its in-flight calls end with invocation_stopped
    with eng(rep_cfg(2, v="1", delay_ms=400)) as e:
        c = Peer(e, "rs-c")
        wait_until(lambda: provider_count(c) == 2, 8, "2 providers of rep::echo")
        old = wait_until(lambda: (lambda x: x if len(x) == 2 else None)(served_by(c, 4)), 5,
                         "calls served by 2 instances")
        track_groups(e, [v[0] for v in old.values()])
        ld = Load(c, "rep::echo", threads=10)
        time.sleep(0.6)
        with open(e.cfg, "w") as f:
            f.write(rep_cfg(2, v="2", delay_ms=400))
        os.kill(e.proc.pid, signal.SIGHUP)

        def replaced():
            with ld.lock:
                recs = list(ld.records[-40:])
            news = {r["result"]["name"]: r["result"]["pid"] for t, _, r in recs
                    if "result" in r and r["result"].get("env_v") == "2"}
            return news if len(news) == 2 else None
        try:
            news = wait_until(replaced, 20, "both instances to be replaced (V=2)", interval=0.1)
            track_groups(e, news.values())
            time.sleep(0.5)
        finally:
            ld.stop()
        fails = ld.failures()
        check(not fails, "calls failed across the rolling reload (%d calls): %s"
              % (len(ld.records), summary(fails)))
        for name, (pid, _, _) in old.items():
            wait_until(lambda: not pid_alive(pid), 5, "old instance %s (pid %d) to stop" % (name, pid))


def _start_fails(config, words):
    d = wslib.tempfile.mkdtemp(prefix="iii-test-")
    path = os.path.join(d, "config.yaml")
    with open(path, "w") as f:
        f.write(config)
    try:
        p = subprocess.run([wslib.BIN, "-c", path, "--port", "0"], cwd=d, capture_output=True,
                           timeout=10, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise Fail("the engine started with an invalid routing config: %r" % config[-120:])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    err = p.stderr.decode("utf-8", "replace")
    check(p.returncode != 0, "exit status 0 for %r" % config[-120:])
    for w in words:
        check(w in err, "the error does not mention %r: %s" % (w, err[-300:]))


@test
def routing_invalid_values_refused():
    _start_fails(cfg(rule("a::*", balance="random")), ["balance"])
    _start_fails(cfg(rule("a::*", providers="two")), ["providers"])
    _start_fails(cfg(rule("a::*", timeout_ms=-1)), ["timeout_ms"])
    _start_fails(LISTENER + "routing:\n  - providers: many\n", ["match"])


if __name__ == "__main__":
    sys.exit(suite.run())
