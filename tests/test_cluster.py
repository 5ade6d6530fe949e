#!/usr/bin/env python3
"""Cluster over NATS: the shared registry view (README "Cluster", docs/CLUSTER.md).

Engines started with a `cluster:` section and one local nats-server (127.0.0.1, a free port):
* a function registered on engine A shows up in engine B's engine::functions::list with
  "node": "a", under the same filters (search, prefix), and in B's functions-available events;
* it leaves B's view when its worker disconnects, at once when A shuts down cleanly (goodbye),
  and within the heartbeat TTL (3 s) when A is SIGKILLed;
* a restarted nats-server: the engines reconnect and resync (what changed meanwhile arrives);
* a second engine under the same node name is reported as an error and not merged;
* malformed cluster traffic (a bogus snapshot published straight to NATS) leaves B serving;
* calls across engines: an official iii-sdk worker on A (tests/interop/workers/worker.mjs) called
  from a raw caller on B and the CLI through C, errors as a local caller sees them; namespaces,
  trace context, _caller_worker_id; SIGKILL or drain mid-call; a 4 MiB payload (chunked past
  nats-server's 1 MiB max_payload) and one over the target's max_message_bytes (a clear error);
* engine::workers::list and workers-available events on B for A's workers ("node": "a");
* one function provided on several engines: providers: many shares calls, providers: one sends
  all to one node, a local provider is preferred;
* a caller on B that disconnects: A's worker gets invocationcancelled/caller_disconnected;
* two nats-servers joined by routes, A on one and B on the other.

Skipped with a message when nats-server is not installed. Every process is started here and
stopped by pid; every wait is bounded.

Run: python3 tests/test_cluster.py     (III_BIN=path/to/iii, III_TEST_ONLY=substring)
"""
import json
import os
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
from wslib import BIN, WS, Closed, Engine, Suite, worker_hello, call  # noqa: E402

suite = Suite()
NATS = shutil.which("nats-server")


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Nats:
    """One nats-server on 127.0.0.1 (optionally with a fixed port, to restart it in place);
    args: extra nats-server flags (cluster routes, monitoring port)."""

    def __init__(self, port=None, args=()):
        self.port = port or free_port()
        self.args = list(args)
        self.tmp = tempfile.mkdtemp(prefix="iii-nats-")
        self.start()

    def start(self):
        self.proc = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(self.port)] + self.args,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.tmp, "nats.log"), "wb"),
                                     start_new_session=True)
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise Fail("nats-server did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def publish(self, subject, payload):
        """A raw PUB from a plain NATS client (what a foreign or broken node could send)."""
        s = socket.create_connection(("127.0.0.1", self.port), 3)
        s.recv(4096)  # INFO
        s.sendall(b'CONNECT {"verbose":false}\r\nPUB %s %d\r\n%s\r\nPING\r\n'
                  % (subject.encode(), len(payload), payload))
        data = b""
        deadline = time.time() + 3
        while b"PONG" not in data and time.time() < deadline:
            data += s.recv(4096)
        s.close()


def cfg(nats_port, node, listener="", top=""):
    """listener: extra lines for the iii-worker-manager config block (6-space indent);
    top: extra top-level YAML (routing: ...)."""
    return ("workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n" + listener +
            "cluster:\n  nats: [nats://127.0.0.1:%d]\n  node: %s\n" % (nats_port, node) + top)


def engine(nats_port, node, listener="", top=""):
    e = Engine(config=cfg(nats_port, node, listener, top))
    _started.append(e)
    return e


_started = []
_procs = []  # SdkWorker processes, stopped by pid after each test


def wait_until(fn, timeout, what):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() >= deadline:
            raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(0.05)


class Client:
    """A raw worker connection that can register functions and call."""

    def __init__(self, e, name="c"):
        self.ws = WS(e.port)
        worker_hello(self.ws, name)

    def register(self, fid, **kw):
        m = {"type": "registerfunction", "id": fid}
        m.update(kw)
        self.ws.send_json(m)
        self.ws.send_json({"type": "ping"})
        self.ws.recv_json_until(lambda x: x.get("type") == "pong", 3)

    def flist(self, **inp):
        r = call(self.ws, "engine::functions::list", inp, 5)
        check("result" in r, "functions::list failed: %s" % r)
        return r["result"]["functions"]

    def close(self):
        self.ws.close()


def rows(c, fid, **inp):
    return [f for f in c.flist(**inp) if f.get("function_id") == fid]


def remote(c, fid, node):
    return [f for f in rows(c, fid) if f.get("node") == node]


def _check_engines():
    for e in list(_started):
        rep = e.sanitizer_report()
        check(not rep, "engine sanitizer report: %s" % rep)
        check(e.alive() or getattr(e, "expect_exit", False),
              "an engine died: %s" % e.stderr()[-400:])


def _stop_all():
    while _procs:
        _procs.pop().stop()
    while _started:
        _started.pop().stop()


def with_cluster(fn):
    """Runs fn(nats, a, b) with two engines a and b on one nats-server; stops all after."""
    def run():
        if not NATS:
            return "skip nats-server not installed (apt install nats-server)"
        n = Nats()
        try:
            a, b = engine(n.port, "a"), engine(n.port, "b")
            fn(n, a, b)
            _check_engines()
        finally:
            _stop_all()
            n.stop()
    run.__name__ = fn.__name__
    return suite.test(run)


def with_nats(fn):
    """Runs fn(nats) with one nats-server; the test starts its own engines (engine(...))."""
    def run():
        if not NATS:
            return "skip nats-server not installed (apt install nats-server)"
        n = Nats()
        try:
            fn(n)
            _check_engines()
        finally:
            _stop_all()
            n.stop()
    run.__name__ = fn.__name__
    return suite.test(run)


@with_cluster
def remote_function_listed_with_node_and_filters(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    fid = "clu::add-" + uuid.uuid4().hex[:6]
    wa.register(fid, description="adds numbers", metadata={"team": "x"})
    r = wait_until(lambda: remote(cb, fid, "a"), 5, "%s listed on b with node a" % fid)[0]
    check(r.get("namespace") == "default" and r.get("worker_name") == "wa",
          "remote row fields: %s" % r)
    check(r.get("description") == "adds numbers" and r.get("metadata") == {"team": "x"},
          "description / metadata travel: %s" % r)
    check([f for f in cb.flist(search="clu::add") if f["function_id"] == fid], "search finds it")
    check(not [f for f in cb.flist(search="zzz-nothing") if f["function_id"] == fid],
          "a search that does not match leaves it out")
    check([f for f in cb.flist(prefix="clu::") if f["function_id"] == fid], "prefix finds it")
    # the local row on a has no node field (a single engine's listing is unchanged)
    ca = Client(a, "ca")
    loc = rows(ca, fid)
    check(len(loc) == 1 and "node" not in loc[0], "a lists its own function without node: %s" % loc)
    # b's own functions do not carry node either
    cb.register("local::b")
    check([f for f in rows(cb, "local::b") if "node" not in f], "local rows carry no node")
    wa.close()
    wait_until(lambda: not remote(cb, fid, "a"), 5, "%s gone from b after its worker left" % fid)


@with_cluster
def discovery_event_on_b_carries_remote_function(n, a, b):
    cb = Client(b, "watcher")
    cb.register("watch::sink")
    cb.ws.send_json({"type": "registertrigger", "id": "t1", "trigger_type": "engine::functions-available",
                     "function_id": "watch::sink", "config": {}})
    fid = "ev::f-" + uuid.uuid4().hex[:6]
    wa = Client(a, "wa")
    wa.register(fid)
    deadline = time.time() + 6
    while time.time() < deadline:
        m = cb.ws.recv_json(max(0.1, deadline - time.time()))
        if m.get("type") != "invokefunction" or m.get("function_id") != "watch::sink":
            continue
        fs = (m.get("data") or {}).get("functions") or []
        hit = [f for f in fs if f.get("function_id") == fid]
        if hit:
            check(hit[0].get("node") == "a", "event row carries node a: %s" % hit[0])
            return
    raise Fail("no functions_changed event on b listing %s" % fid)


@with_cluster
def clean_shutdown_leaves_at_once(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("bye::f")
    wait_until(lambda: remote(cb, "bye::f", "a"), 5, "bye::f on b")
    t = time.time()
    a.expect_exit = True
    a.stop()
    wait_until(lambda: not remote(cb, "bye::f", "a"), 1.5, "bye::f gone from b at once")
    check(time.time() - t < 1.5, "left within 1.5 s of SIGTERM")
    check("node a left (shut down)" in b.stderr(), "b logs the clean leave")


@with_cluster
def sigkill_leaves_within_ttl(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("dead::f")
    wait_until(lambda: remote(cb, "dead::f", "a"), 5, "dead::f on b")
    t = time.time()
    a.expect_exit = True
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(5)
    wait_until(lambda: not remote(cb, "dead::f", "a"), 5, "dead::f gone from b after SIGKILL of a")
    took = time.time() - t
    check(took <= 4.5, "gone within the 3 s TTL (+ a tick), took %.2fs" % took)
    check(took >= 1.0, "not before the TTL could run out (took %.2fs): a heartbeat kept it" % took)


@with_cluster
def nats_restart_reconnects_and_resyncs(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("before::f")
    wait_until(lambda: remote(cb, "before::f", "a"), 5, "before::f on b")
    n.stop()
    time.sleep(0.3)
    wa.register("during::f")  # registered while the link is down
    n.start()
    wait_until(lambda: remote(cb, "during::f", "a"), 10, "during::f on b after nats came back")
    check(remote(cb, "before::f", "a"), "before::f still listed after the resync")
    check(b.stderr().count("cluster: node b connected") >= 2, "b logged its reconnect")


@with_cluster
def duplicate_node_name_reported(n, a, b):
    wa = Client(a, "wa")
    wa.register("dup::f")
    a2 = engine(n.port, "a")
    cb = Client(b, "cb")
    wait_until(lambda: "another engine also calls itself node a" in a2.stderr()
               or "another engine also calls itself node a" in a.stderr(), 5,
               "the duplicate name reported")
    del cb, a2


@with_cluster
def malformed_cluster_traffic_is_ignored(n, a, b):
    cb = Client(b, "cb")
    bad = [
        b"not json",
        b'{"node":"x","iid":"1","v":1,"functions":[1,"s",{"no_id":1},{"function_id":""}]}',
        b'{"node":"","iid":"1","v":1,"functions":[]}',
        b'{"node":"y","iid":"1","v":-5,"functions":[]}',
        b'{"node":"z","iid":"1","v":1,"functions":[{"function_id":"ok::z","namespace":"default","worker_name":"w"}]}',
        b'[' * 200,
    ]
    for p in bad:
        n.publish("iii.node.x.snap", p)
    n.publish("iii.node.x.hb", b'{"node":1}')
    n.publish("iii.node.x.bye", b'{"node":"nobody"}')
    wait_until(lambda: remote(cb, "ok::z", "z"), 5, "the one well-formed snapshot listed")
    fs = cb.flist()
    check(all(f.get("function_id") for f in fs), "no empty rows listed: %s" % fs)
    check("malformed rows" in b.stderr(), "b warns about the malformed rows")
    # z never heartbeats: it leaves after the TTL
    wait_until(lambda: not remote(cb, "ok::z", "z"), 6, "silent node z expired")


# ---------------------------------------------------------------------------------------------
# calls across engines

def send_call(ws, fid, data, **extra):
    iid = str(uuid.uuid4())
    m = {"type": "invokefunction", "invocation_id": iid, "function_id": fid, "data": data}
    m.update(extra)
    ws.send_json(m)
    return iid


def recv_result(ws, iid, timeout=5):
    m, _ = ws.recv_json_until(lambda x: x.get("type") == "invocationresult"
                              and x.get("invocation_id") == iid, timeout)
    return m


def recv_invoke(ws, fid, timeout=5):
    m, _ = ws.recv_json_until(lambda x: x.get("type") == "invokefunction"
                              and x.get("function_id") == fid, timeout)
    return m


@with_cluster
def call_through_b_reaches_worker_on_a(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("x::echo")
    wait_until(lambda: remote(cb, "x::echo", "a"), 5, "x::echo on b")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    iid = send_call(cb.ws, "x::echo", {"v": [1, "two", {"3": None}]}, traceparent=tp,
                    baggage="k=v", metadata={"m": 1})
    inv = recv_invoke(wa.ws, "x::echo")
    check(inv["data"].get("v") == [1, "two", {"3": None}], "data arrives: %s" % inv)
    check(inv.get("traceparent") == tp and inv.get("baggage") == "k=v", "trace context: %s" % inv)
    check(inv.get("metadata") == {"m": 1}, "metadata arrives: %s" % inv)
    wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                     "function_id": "x::echo", "result": {"ok": True, "n": 42}})
    r = recv_result(cb.ws, iid)
    check(r.get("result") == {"ok": True, "n": 42}, "result arrives under the caller's id: %s" % r)
    check(r.get("traceparent") == tp, "traceparent echoed: %s" % r)
    # an error from the worker arrives as it was sent
    iid = send_call(cb.ws, "x::echo", {})
    inv = recv_invoke(wa.ws, "x::echo")
    err = {"code": "E_TEAPOT", "message": "short and stout", "stacktrace": "at pot"}
    wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                     "function_id": "x::echo", "error": err})
    r = recv_result(cb.ws, iid)
    check(r.get("error") == err, "error passes through unchanged: %s" % r)
    # a void call reaches the worker and nothing comes back
    cb.ws.send_json({"type": "invokefunction", "function_id": "x::echo", "data": {"void": 1},
                     "action": {"type": "void"}})
    inv = recv_invoke(wa.ws, "x::echo")
    check(inv["data"].get("void") == 1, "void call arrives: %s" % inv)


@with_cluster
def caller_worker_id_is_the_remote_callers(n, a, b):
    wa = Client(a, "wa")
    wa.register("x::who")
    ws = WS(b.port)
    wid = worker_hello(ws, "cb")
    cb = Client(b, "lister")
    wait_until(lambda: remote(cb, "x::who", "a"), 5, "x::who on b")
    send_call(ws, "x::who", {})
    inv = recv_invoke(wa.ws, "x::who")
    check(inv["data"].get("_caller_worker_id") == wid,
          "_caller_worker_id is the caller's id on b (%s): %s" % (wid, inv))
    ws.close()


@with_cluster
def namespaces_pass_through(n, a, b):
    ws = WS(a.port)
    worker_hello(ws, "nsw", namespace="team1")
    ws.send_json({"type": "registerfunction", "id": "ns::f"})
    cb = Client(b, "cb")
    wait_until(lambda: [f for f in rows(cb, "ns::f") if f.get("namespace") == "team1"], 5,
               "ns::f in team1 listed on b")
    r = call(cb.ws, "ns::f", {}, 5)  # default namespace: not there
    check((r.get("error") or {}).get("code") == "function_not_found", "default ns misses: %s" % r)
    iid = send_call(cb.ws, "ns::f", {"q": 1}, namespace="team1")
    inv = recv_invoke(ws, "ns::f")
    ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                  "function_id": "ns::f", "result": "in team1"})
    r = recv_result(cb.ws, iid)
    check(r.get("result") == "in team1", "the namespaced call: %s" % r)
    ws.close()


@with_cluster
def sigkill_mid_call_stops_the_call_on_b(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("x::hang")
    wait_until(lambda: remote(cb, "x::hang", "a"), 5, "x::hang on b")
    iid = send_call(cb.ws, "x::hang", {})
    recv_invoke(wa.ws, "x::hang")  # it is running on a
    t = time.time()
    a.expect_exit = True
    os.kill(a.proc.pid, signal.SIGKILL)
    r = recv_result(cb.ws, iid, 6)
    took = time.time() - t
    check((r.get("error") or {}).get("code") == "invocation_stopped", "stopped: %s" % r)
    check(took <= 4.5, "within the heartbeat timeout: %.2fs" % took)
    wait_until(lambda: not remote(cb, "x::hang", "a"), 2, "a's functions gone from b")


@with_cluster
def clean_shutdown_mid_call_stops_the_call(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("x::hang2")
    wait_until(lambda: remote(cb, "x::hang2", "a"), 5, "x::hang2 on b")
    iid = send_call(cb.ws, "x::hang2", {})
    recv_invoke(wa.ws, "x::hang2")
    a.expect_exit = True
    t = time.time()
    a.proc.send_signal(signal.SIGTERM)
    # a drains first (drain_timeout_ms, 5 s by default): a call still running then is stopped
    r = recv_result(cb.ws, iid, 9)
    check((r.get("error") or {}).get("code") == "invocation_stopped", "stopped: %s" % r)
    check(time.time() - t >= 4.0, "not before a's drain timeout ran out")


@with_cluster
def call_answered_during_drain_reaches_b(n, a, b):
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("x::slow")
    wait_until(lambda: remote(cb, "x::slow", "a"), 5, "x::slow on b")
    iid = send_call(cb.ws, "x::slow", {})
    inv = recv_invoke(wa.ws, "x::slow")
    a.expect_exit = True
    a.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                     "function_id": "x::slow", "result": "finished while draining"})
    r = recv_result(cb.ws, iid, 5)
    check(r.get("result") == "finished while draining", "the answer crosses engines: %s" % r)


@with_cluster
def three_engines_cli_through_c(n, a, b):
    c = engine(n.port, "c")
    wa = Client(a, "wa")
    wa.register("x::cli")
    cc = Client(c, "cc")
    wait_until(lambda: remote(cc, "x::cli", "a"), 5, "x::cli on c")
    import threading
    out = {}

    def run_cli():
        p = subprocess.run([BIN, "trigger",
                            "x::cli", '{"from":"cli"}', "--url", "ws://127.0.0.1:%d" % c.port,
                            "--timeout", "5000", "--json"], capture_output=True, timeout=10)
        out["p"] = p
    th = threading.Thread(target=run_cli)
    th.start()
    inv = recv_invoke(wa.ws, "x::cli")
    check(inv["data"].get("from") == "cli", "the CLI's payload: %s" % inv)
    wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                     "function_id": "x::cli", "result": {"via": "c"}})
    th.join(10)
    p = out.get("p")
    check(p is not None and p.returncode == 0, "CLI exit status: %r" % ((p.returncode, p.stdout, p.stderr) if p else None,))
    check(json.loads(p.stdout.decode()) == {"via": "c"}, "CLI output: %r" % p.stdout)
    # and a caller on b in the same cluster reaches a as well
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, "x::cli", "a"), 5, "x::cli on b")



@with_cluster
def payload_over_max_payload_travels_in_chunks(n, a, b):
    """nats-server's max_payload is 1 MiB: a 1.2 MiB call and its 1.2 MiB answer each travel
    in chunks and arrive whole (a void call too)."""
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.register("x::big")
    wait_until(lambda: remote(cb, "x::big", "a"), 5, "x::big on b")
    blob = "".join(chr(48 + (i * 7) % 43) for i in range(1200 * 1024))
    iid = send_call(cb.ws, "x::big", {"blob": blob})
    inv = recv_invoke(wa.ws, "x::big", 10)
    check(inv["data"].get("blob") == blob, "the 1.2 MiB argument arrives whole")
    wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                     "function_id": "x::big", "result": {"back": blob[::-1]}})
    r = recv_result(cb.ws, iid, 10)
    check((r.get("result") or {}).get("back") == blob[::-1],
          "the 1.2 MiB answer arrives whole: %s" % str(r)[:200])
    cb.ws.send_json({"type": "invokefunction", "function_id": "x::big", "data": {"v": blob},
                     "action": {"type": "void"}})
    inv = recv_invoke(wa.ws, "x::big", 10)
    check(inv["data"].get("v") == blob, "a chunked void call arrives whole")


# ---------------------------------------------------------------------------------------------
# helpers for the tests below: official-SDK workers, answering raw workers, the CLI

INTEROP = os.path.join(HERE, "interop")
NODE = shutil.which("node")
SDK_WORKER = os.path.join(INTEROP, "workers", "worker.mjs")


def sdk_missing():
    if not NODE:
        return "node not installed"
    if not os.path.isdir(os.path.join(INTEROP, "node_modules", "iii-sdk")):
        return "tests/interop/node_modules/iii-sdk missing (cd tests/interop && npm ci)"
    return None


class SdkWorker:
    """An iii-sdk worker process (tests/interop/workers/worker.mjs, driven by a JSON spec) in its
    own process group; stopped by pid (SIGTERM, then SIGKILL of its group)."""

    def __init__(self, e, spec):
        self.log = tempfile.NamedTemporaryFile(prefix="iii-sdkw-", suffix=".log", delete=False)
        env = dict(os.environ, III_URL="ws://127.0.0.1:%d" % e.port, WORKER_SPEC=json.dumps(spec),
                   OTEL_ENABLED="false")
        self.proc = subprocess.Popen([NODE, SDK_WORKER], cwd=INTEROP, env=env, stdin=subprocess.PIPE,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        _procs.append(self)

    def output(self):
        with open(self.log.name, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(4)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if self in _procs:
            _procs.remove(self)
        try:
            self.proc.stdin.close()
            os.unlink(self.log.name)
        except OSError:
            pass


class Responder(threading.Thread):
    """A raw worker on engine e providing fid: a thread reads its calls and (unless hang) answers
    each with {"by": name, "echo": data.s or None}. Counts and keeps the calls it got."""

    def __init__(self, e, fid, name, hang=False, namespace=None, mult=1):
        super().__init__(daemon=True)
        self.mult = mult  # the echo is data.s repeated mult times
        self.ws = WS(e.port)
        self.wid = worker_hello(self.ws, name, namespace=namespace)
        self.fid, self.name, self.hang = fid, name, hang
        self.got = []
        self.extra = []  # other frames (invocationcancelled ...)
        self.done = threading.Event()
        self.ws.send_json({"type": "registerfunction", "id": fid})
        self.ws.send_json({"type": "ping"})
        self.ws.recv_json_until(lambda x: x.get("type") == "pong", 3)
        self.start()

    def run(self):
        while not self.done.is_set():
            try:
                m = self.ws.recv_json(0.2)
            except TimeoutError:
                continue
            except (Closed, OSError, ValueError):
                return
            if m.get("type") == "invokefunction" and m.get("function_id") == self.fid:
                self.got.append(m)
                if self.hang or not m.get("invocation_id"):
                    continue
                d = m.get("data") if isinstance(m.get("data"), dict) else {}
                try:
                    self.ws.send_json({"type": "invocationresult", "invocation_id": m["invocation_id"],
                                       "function_id": self.fid,
                                       "result": {"by": self.name,
                                                  "echo": d.get("s") if self.mult == 1
                                                  else d.get("s", "") * self.mult}})
                except OSError:
                    return
            else:
                self.extra.append(m)

    def close(self):
        self.done.set()
        self.join(2)
        self.ws.close()


def cli(e, *args, timeout=15):
    return subprocess.run([BIN] + list(args) + ["--url", "ws://127.0.0.1:%d" % e.port],
                          capture_output=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# 1. an official-SDK worker on A, callers on B (raw) and C (the CLI)

@with_nats
def sdk_worker_on_a_called_from_b_raw_and_from_c_cli(n):
    why = sdk_missing()
    if why:
        return "skip " + why
    a, b, c = engine(n.port, "a"), engine(n.port, "b"), engine(n.port, "c")
    sdk = SdkWorker(a, {"name": "sdk-a", "functions": [
        {"id": "sdk::echo", "kind": "echo"},
        {"id": "sdk::throw", "kind": "throw", "message": "kaboom from the sdk"}]})
    # the SDK (0.22.1) has no namespace option: worker.mjs puts a worker into one with an early
    # engine::workers::register {namespace}
    sdk_ns = SdkWorker(a, {"name": "sdk-ns", "namespace": "team-sdk",
                           "functions": [{"id": "sdk::tag", "kind": "tag"}]})
    cb, ca = Client(b, "cb"), Client(a, "ca")
    wait_until(lambda: remote(cb, "sdk::echo", "a") and remote(cb, "sdk::throw", "a")
               and [f for f in remote(cb, "sdk::tag", "a") if f.get("namespace") == "team-sdk"],
               10, "the SDK workers' functions listed on b with node a (sdk-a log: %s)"
               % sdk.output()[-300:])
    r = remote(cb, "sdk::echo", "a")[0]
    check(r.get("worker_name") == "sdk-a", "remote row names the SDK worker: %s" % r)
    # a raw caller on b
    v = {"nested": [1, 2.5, "three", None, True], "u": "\u00e9\u4e2d"}
    r = call(cb.ws, "sdk::echo", {"v": v}, 5)
    check(r.get("result") == v and "error" not in r, "b's call of the SDK function: %s" % r)
    r = call(cb.ws, "sdk::tag", {"v": "ns-call"}, 5, namespace="team-sdk")
    check(r.get("result") == {"from": "sdk-ns", "ns": "team-sdk", "got": "ns-call"},
          "b's namespaced call: %s" % r)
    r = call(cb.ws, "sdk::tag", {"v": 1}, 5)
    check((r.get("error") or {}).get("code") == "function_not_found",
          "sdk::tag is not in default: %s" % r)
    # the error thrown by the function: b sees what a local caller on a sees
    loc = call(ca.ws, "sdk::throw", {}, 5)
    rem = call(cb.ws, "sdk::throw", {}, 5)
    le, re_ = loc.get("error") or {}, rem.get("error") or {}
    check(le.get("code") and "kaboom from the sdk" in le.get("message", ""),
          "the local caller's error: %s" % loc)
    check((re_.get("code"), re_.get("message")) == (le.get("code"), le.get("message")),
          "b's error %s equals a's local one %s" % (re_, le))
    check(("stacktrace" in re_) == ("stacktrace" in le), "stacktrace travels as locally: %s / %s"
          % (re_, le))
    # the CLI through c
    p = cli(c, "trigger", "sdk::echo", json.dumps({"v": {"via": "cli"}}), "--timeout", "5000")
    check(p.returncode == 0 and json.loads(p.stdout.decode()) == {"via": "cli"},
          "iii trigger through c: %r" % ((p.returncode, p.stdout, p.stderr),))
    p = cli(c, "trigger", "sdk::tag", '{"v":"cli-ns"}', "--namespace", "team-sdk", "--timeout", "5000")
    check(p.returncode == 0 and json.loads(p.stdout.decode()) ==
          {"from": "sdk-ns", "ns": "team-sdk", "got": "cli-ns"},
          "iii trigger --namespace through c: %r" % ((p.returncode, p.stdout, p.stderr),))
    p = cli(c, "trigger", "sdk::throw", "{}", "--timeout", "5000")
    err = p.stderr.decode()
    check(p.returncode == 1 and ("iii: error: %s: " % le.get("code")) in err
          and "kaboom from the sdk" in err,
          "iii trigger of the throwing function through c: %r" % ((p.returncode, p.stdout, p.stderr),))
    sdk.stop()
    sdk_ns.stop()


# ---------------------------------------------------------------------------------------------
# 5. a NATS cluster of two servers (routes): A on server 1, B on server 2

def routes_up(mport):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/routez" % mport, timeout=1) as r:
            return json.loads(r.read().decode()).get("num_routes", 0) >= 1
    except (OSError, ValueError):
        return False


def nats_pair():
    """Two nats-servers joined by routes; returns them once each reports its route up."""
    c1, c2, m1, m2 = free_port(), free_port(), free_port(), free_port()
    name = "iii-test-" + uuid.uuid4().hex[:6]
    n1 = Nats(args=["--cluster_name", name, "--cluster", "nats://127.0.0.1:%d" % c1,
                    "--routes", "nats://127.0.0.1:%d" % c2, "-m", str(m1)])
    try:
        n2 = Nats(args=["--cluster_name", name, "--cluster", "nats://127.0.0.1:%d" % c2,
                        "--routes", "nats://127.0.0.1:%d" % c1, "-m", str(m2)])
    except Exception:
        n1.stop()
        raise
    n1.mport, n2.mport = m1, m2
    try:
        wait_until(lambda: routes_up(m1) and routes_up(m2), 10, "the route between the two nats-servers")
    except Fail:
        n1.stop(), n2.stop()
        raise
    return n1, n2


@suite.test
def nats_cluster_of_two_servers():
    if not NATS:
        return "skip nats-server not installed (apt install nats-server)"
    n1, n2 = nats_pair()
    try:
        a, b = engine(n1.port, "a"), engine(n2.port, "b")
        wa, cb = Client(a, "wa"), Client(b, "cb")
        wa.register("routes::f", description="across the route")
        r = wait_until(lambda: remote(cb, "routes::f", "a"), 8, "routes::f listed on b with node a")[0]
        check(r.get("worker_name") == "wa" and r.get("description") == "across the route",
              "the remote row: %s" % r)
        iid = send_call(cb.ws, "routes::f", {"k": 1})
        inv = recv_invoke(wa.ws, "routes::f")
        check(inv["data"].get("k") == 1, "the call reaches a: %s" % inv)
        wa.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                         "function_id": "routes::f", "result": "over two servers"})
        r = recv_result(cb.ws, iid)
        check(r.get("result") == "over two servers", "the answer reaches b: %s" % r)
        # and the other way round
        wb = Client(b, "wb")
        wb.register("routes::g")
        ca = Client(a, "ca")
        wait_until(lambda: remote(ca, "routes::g", "b"), 8, "routes::g listed on a with node b")
        iid = send_call(ca.ws, "routes::g", {})
        inv = recv_invoke(wb.ws, "routes::g")
        wb.ws.send_json({"type": "invocationresult", "invocation_id": inv["invocation_id"],
                         "function_id": "routes::g", "result": 7})
        check(recv_result(ca.ws, iid).get("result") == 7, "a calls b's function")
        _check_engines()
    finally:
        _stop_all()
        n1.stop()
        n2.stop()



# ---------------------------------------------------------------------------------------------
# 2. engine::workers::list and engine::workers-available across engines

def wlist(c, **inp):
    r = call(c.ws, "engine::workers::list", inp, 5)
    check("result" in r, "workers::list failed: %s" % r)
    return r["result"]["workers"]


def wrows(c, node, **inp):
    return [w for w in wlist(c, **inp) if w.get("node") == node]


@with_cluster
def remote_workers_listed_with_node(n, a, b):
    why = sdk_missing()
    if why:
        return "skip " + why
    sdk = SdkWorker(a, {"name": "sdk-wl", "functions": [{"id": "wl::f", "kind": "echo"}]})
    ra = Client(a, "raw-wl")
    ra.register("wl::g")
    ca, cb = Client(a, "ca"), Client(b, "cb")
    wait_until(lambda: [w for w in wlist(ca) if w.get("name") == "sdk-wl"], 10,
               "sdk-wl announced on a (log: %s)" % sdk.output()[-300:])
    names = lambda ws: sorted(w.get("name") for w in ws)  # noqa: E731
    wait_until(lambda: {"sdk-wl", "raw-wl"} <= set(names(wrows(cb, "a"))), 5,
               "a's workers listed on b with node a")
    seen = {}

    def same_rows():
        # b's view converges with the next snapshot: compare until it has (bounded)
        mine = {w["id"]: w for w in wlist(ca) if w.get("name") in ("sdk-wl", "raw-wl")}
        theirs = {w["id"]: w for w in wrows(cb, "a") if w.get("name") in ("sdk-wl", "raw-wl")}
        seen["a"], seen["b"] = mine, theirs
        return len(mine) == 2 and sorted(mine) == sorted(theirs) and all(
            {k: v for k, v in theirs[i].items() if k != "node"} == mine[i] for i in mine)
    try:
        wait_until(same_rows, 3, "b's rows of a's workers equal to a's own")
    except Fail as e:
        raise Fail("%s:\n b: %s\n a: %s" % (e, seen.get("b"), seen.get("a")))
    theirs = seen["b"]
    for w in theirs.values():
        check(list(w)[0] == "node", "node is the row's first member: %s" % list(w))
    check(theirs[[k for k in theirs if theirs[k]["name"] == "sdk-wl"][0]].get("runtime") == "node",
          "the SDK worker's runtime: %s" % theirs)
    # local rows carry no node; a's view does not list its own workers again as remote rows
    # (it does list b's: cb, with node b)
    own = [w for w in wlist(ca) if w.get("name") in ("sdk-wl", "raw-wl", "ca")]
    check(len(own) == 3 and all("node" not in w for w in own), "a's own rows carry no node: %s" % own)
    check(sorted(w.get("name") for w in wlist(ca) if w.get("node") == "b") == ["cb"],
          "a lists b's worker cb with node b, and none of its own through b: %s"
          % [w for w in wlist(ca) if w.get("node")])
    # filters apply to remote rows
    check(names(wrows(cb, "a", runtime="node")) == ["sdk-wl"], "runtime=node on b: %s"
          % wrows(cb, "a", runtime="node"))
    check(names(wrows(cb, "a", runtime="python")) == ["ca", "raw-wl"], "runtime=python on b: %s"
          % wrows(cb, "a", runtime="python"))
    check(names(wrows(cb, "a", search="SDK-W")) == ["sdk-wl"], "search (case-insensitive) on b: %s"
          % wrows(cb, "a", search="SDK-W"))
    check(wrows(cb, "a", search="zzz-nothing") == [], "a search that matches nothing")
    # the SDK worker leaves: gone from b's listing
    sdk.stop()
    wait_until(lambda: "sdk-wl" not in names(wrows(cb, "a")), 5, "sdk-wl gone from b")
    check("raw-wl" in names(wrows(cb, "a")), "raw-wl still listed")
    # a is killed: all its workers leave within the TTL
    t = time.time()
    a.expect_exit = True
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(5)
    wait_until(lambda: not wrows(cb, "a"), 5, "a's workers gone from b after SIGKILL of a")
    check(time.time() - t <= 4.5, "within the 3 s TTL (+ a tick): %.2fs" % (time.time() - t))


def worker_events(ws, fid, timeout):
    """The data of every call of fid that arrives within timeout."""
    out = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            m = ws.recv_json(max(0.05, deadline - time.time()))
        except TimeoutError:
            break
        if m.get("type") == "invokefunction" and m.get("function_id") == fid:
            out.append(m.get("data") or {})
    return out


@with_cluster
def worker_events_on_b_for_workers_on_a(n, a, b):
    cb = Client(b, "watcher")
    cb.register("wev::sink")
    cb.ws.send_json({"type": "registertrigger", "id": "tw", "trigger_type": "engine::workers-available",
                     "function_id": "wev::sink", "config": {}})
    cb.ws.send_json({"type": "ping"})
    cb.ws.recv_json_until(lambda x: x.get("type") == "pong", 3)
    strip = lambda d: {k: v for k, v in d.items() if k != "_caller_worker_id"}  # noqa: E731

    def got(want, timeout=5):
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            for d in worker_events(cb.ws, "wev::sink", 0.3):
                seen.append(d)
                if strip(d) == want:
                    return
        raise Fail("b's sink got no %s; it saw %s" % (want, seen))
    # the harness, locally first: a worker connecting to b itself (no node member)
    lw = WS(b.port)
    lid = worker_hello(lw, "local-ev")
    got({"event": "worker_connected", "worker_id": lid})
    lw.close()
    got({"event": "worker_disconnected", "worker_id": lid})
    # a worker on a: the same events on b, with node a
    wa = WS(a.port)
    wid = worker_hello(wa, "evw")
    got({"event": "worker_connected", "worker_id": wid, "node": "a"})
    wa.close()
    got({"event": "worker_disconnected", "worker_id": wid, "node": "a"})



# ---------------------------------------------------------------------------------------------
# 3. one function provided on several engines

MANY = 'routing:\n  - match: "share::*"\n    providers: many\n'


def call_many(ws, fid, count, timeout=20, data=None, **extra):
    """Sends count calls at once (data: {"i": i} plus data), then reads every answer, in any
    order; returns the result frames in the order of the calls."""
    ids = [send_call(ws, fid, dict(data or {}, i=i), **extra) for i in range(count)]
    want, got = set(ids), {}
    deadline = time.time() + timeout
    while want - set(got):
        try:
            m = ws.recv_json(max(0.01, deadline - time.time()))
        except TimeoutError:
            raise Fail("%d of %d calls of %s answered within %ds" % (len(got), count, fid, timeout))
        if m.get("type") == "invocationresult" and m.get("invocation_id") in want:
            got[m["invocation_id"]] = m
    return [got[i] for i in ids]


def three_with_x(n, fid, b_top="", on_b=False, hang=False):
    """Engines a, b (its top-level YAML b_top), c; raw providers of fid on a and c (and on b
    when on_b); returns (a, b, c, caller on b, {node: Responder}) once b lists a's and c's."""
    a, b, c = engine(n.port, "a"), engine(n.port, "b", top=b_top), engine(n.port, "c")
    prov = {"a": Responder(a, fid, "pa", hang=hang), "c": Responder(c, fid, "pc", hang=hang)}
    if on_b:
        prov["b"] = Responder(b, fid, "pb", hang=hang)
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, fid, "a") and remote(cb, fid, "c"), 5,
               "%s listed on b from a and from c" % fid)
    return a, b, c, cb, prov


def tally(results):
    by = {}
    for r in results:
        check("result" in r, "every call answered with a result: %s" % r)
        by[r["result"]["by"]] = by.get(r["result"]["by"], 0) + 1
    return by


@with_nats
def many_providers_on_two_engines_share_calls(n):
    a, b, c, cb, prov = three_with_x(n, "share::x", b_top=MANY)
    by = tally(call_many(cb.ws, "share::x", 200))
    check(sum(by.values()) == 200, "all 200 answered: %s" % by)
    check(by.get("pa", 0) > 0 and by.get("pc", 0) > 0,
          "with providers: many on b, both a's and c's worker take calls: %s" % by)
    check(len(prov["a"].got) + len(prov["c"].got) == 200,
          "each call ran once: a %d, c %d" % (len(prov["a"].got), len(prov["c"].got)))
    for p in prov.values():
        p.close()


@with_nats
def many_providers_share_chunked_calls_too(n):
    # calls over max_payload cannot use the queue group (all chunks must reach one node): with
    # providers: many they still go to the nodes in turn, and arrive whole
    a, b, c, cb, prov = three_with_x(n, "share::x", b_top=MANY)
    s = "".join(chr(48 + (i * 7) % 43) for i in range(3 << 19))  # 1.5 MiB
    results = call_many(cb.ws, "share::x", 6, 15, data={"s": s})
    for r in results:
        check((r.get("result") or {}).get("echo") == s,
              "a chunked call's answer arrives whole: %s" % str(r)[:200])
    by = tally(results)
    check(by.get("pa", 0) > 0 and by.get("pc", 0) > 0, "both nodes take chunked calls: %s" % by)
    for p in prov.values():
        p.close()


@with_nats
def without_rule_calls_go_to_one_node(n):
    a, b, c, cb, prov = three_with_x(n, "share::x")
    by = tally(call_many(cb.ws, "share::x", 200))
    check(sorted(by.values()) == [200], "providers: one (default): all 200 to one node: %s" % by)
    for p in prov.values():
        p.close()


@with_nats
def local_provider_preferred_over_remote_ones(n):
    a, b, c, cb, prov = three_with_x(n, "share::x", b_top=MANY, on_b=True)
    by = tally(call_many(cb.ws, "share::x", 200))
    check(by == {"pb": 200}, "b's own provider takes every call from b: %s" % by)
    check(not prov["a"].got and not prov["c"].got, "nothing reached a or c")
    for p in prov.values():
        p.close()


@with_nats
def sigkill_of_engine_running_a_many_routed_call(n):
    a, b, c, cb, prov = three_with_x(n, "share::x", b_top=MANY, hang=True)
    engines = {"a": a, "c": c}
    iid = send_call(cb.ws, "share::x", {"i": 0})
    node = wait_until(lambda: [k for k, p in prov.items() if p.got], 5,
                      "the call reaching a's or c's worker")[0]
    e = engines[node]
    t = time.time()
    e.expect_exit = True
    os.kill(e.proc.pid, signal.SIGKILL)
    e.proc.wait(5)
    r = recv_result(cb.ws, iid, 6)
    took = time.time() - t
    check((r.get("error") or {}).get("code") == "invocation_stopped",
          "the call on the killed node %s ends with invocation_stopped: %s" % (node, r))
    check(took <= 5.0, "within ~5 s: %.2fs" % took)
    for p in prov.values():
        p.close()



# ---------------------------------------------------------------------------------------------
# 4. payloads over the NATS server's max_payload (1 MiB by default)

def send_call_utf8(ws, fid, data):
    """send_call with the JSON text as raw UTF-8 (json.dumps would escape it to ASCII)."""
    iid = str(uuid.uuid4())
    ws.send_text(json.dumps({"type": "invokefunction", "invocation_id": iid, "function_id": fid,
                             "data": data}, ensure_ascii=False, separators=(",", ":")))
    return iid


@with_cluster
def four_mib_payload_crosses_engines(n, a, b):
    wa = Responder(a, "big::echo", "pa")
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, "big::echo", "a"), 5, "big::echo on b")
    # random hex with multi-byte UTF-8 sequences throughout, so a chunk boundary falls inside
    # some of them; 4 MiB of UTF-8 in all
    unit = os.urandom(4096).hex() + "\u00e9\u4e2d\U0001F600"
    s = unit * ((4 << 20) // len(unit.encode()) + 1)
    iid = send_call_utf8(cb.ws, "big::echo", {"s": s})
    r = recv_result(cb.ws, iid, 20)
    check("error" not in r, "the 4 MiB call: %s" % str(r)[:300])
    got = (r.get("result") or {}).get("echo")
    check(got == s, "the 4 MiB string comes back intact (%s chars sent, %s back)"
          % (len(s), len(got) if isinstance(got, str) else got))
    check(len(wa.got) == 1 and wa.got[0]["data"].get("s") == s, "a's worker got it intact, once")
    # and the link still carries small calls
    r = call(cb.ws, "big::echo", {"s": "small"}, 5)
    check((r.get("result") or {}).get("echo") == "small", "a small call after: %s" % r)
    wa.close()


@with_nats
def payload_over_max_message_size_is_refused_across_engines(n):
    # a takes messages up to 5 MiB, b up to its default 64 MiB: b accepts the caller's 6 MiB
    a = engine(n.port, "a", listener="      max_message_bytes: 5242880\n")
    b = engine(n.port, "b")
    wa = Responder(a, "big::echo", "pa")
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, "big::echo", "a"), 5, "big::echo on b")
    t = time.time()
    iid = send_call(cb.ws, "big::echo", {"s": "x" * (6 << 20)})
    try:
        r = recv_result(cb.ws, iid, 10)
    except TimeoutError:
        raise Fail("no answer within 10 s to a call larger than a's max_message_bytes (a hang); "
                   "a's log: %s" % [l for l in a.stderr().splitlines() if "cluster" in l][-3:])
    err = r.get("error") or {}
    check(err.get("code") == "invocation_failed" and "max_message_bytes" in err.get("message", ""),
          "a clear error for a call larger than the target engine's max message size: %s"
          % str(r)[:300])
    check(time.time() - t < 10, "answered in %.1fs" % (time.time() - t))
    check(not wa.got, "a's worker never got it")
    check(a.alive() and b.alive(), "both engines still serve")
    r = call(cb.ws, "big::echo", {"s": "small"}, 5)
    check((r.get("result") or {}).get("echo") == "small", "a small call after: %s" % r)
    wa.close()


@with_nats
def call_over_own_max_message_size_is_closed_1009(n):
    # a call larger than the caller's own engine's max_message_bytes never reaches the cluster:
    # the WebSocket reader refuses it with close 1009, and the cluster keeps serving
    a = engine(n.port, "a")
    b = engine(n.port, "b", listener="      max_message_bytes: 5242880\n")
    wa = Responder(a, "big::echo", "pa")
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, "big::echo", "a"), 5, "big::echo on b")
    big = WS(b.port)
    worker_hello(big, "big")
    send_call(big, "big::echo", {"s": "z" * (6 << 20)})
    try:
        code = big.expect_close(10)
    except (TimeoutError, Closed) as e:
        raise Fail("no close 1009 for a 6 MiB call over b's 5 MiB max_message_bytes: %r" % e)
    check(code == 1009, "close code %s" % code)
    check(not wa.got, "a's worker never got it")
    r = call(cb.ws, "big::echo", {"s": "small"}, 5)
    check((r.get("result") or {}).get("echo") == "small", "a small call after: %s" % r)
    wa.close()


@with_nats
def answer_over_callers_max_message_size_is_an_error(n):
    # the other direction: b (the caller's engine) takes messages up to 5 MiB; a's worker answers
    # a 3 MiB call with 6 MiB
    a = engine(n.port, "a")
    b = engine(n.port, "b", listener="      max_message_bytes: 5242880\n")
    wa = Responder(a, "big::twice", "pa", mult=2)
    cb = Client(b, "cb")
    wait_until(lambda: remote(cb, "big::twice", "a"), 5, "big::twice on b")
    iid = send_call(cb.ws, "big::twice", {"s": "y" * (3 << 20)})
    try:
        r = recv_result(cb.ws, iid, 10)
    except TimeoutError:
        raise Fail("no answer within 10 s when the 6 MiB answer exceeds b's max_message_bytes "
                   "(a hang); b's log: %s" % [l for l in b.stderr().splitlines() if "cluster" in l][-3:])
    err = r.get("error") or {}
    check(err.get("code") == "invocation_failed" and "max_message_bytes" in err.get("message", ""),
          "a clear error when the answer is larger than the caller engine's max message size: %s"
          % str(r)[:300])
    check(len(wa.got) == 1, "a's worker ran it once")
    r = call(cb.ws, "big::twice", {"s": "ab"}, 5)
    check((r.get("result") or {}).get("echo") == "abab", "a small call after: %s" % r)
    wa.close()


# ---------------------------------------------------------------------------------------------
# 6. the caller goes away while its call runs on another engine

def cancelled(p, iid, timeout=3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        for m in list(p.extra):
            if m.get("type") == "invocationcancelled" and m.get("invocation_id") == iid:
                return m
        time.sleep(0.05)
    return None


@with_cluster
def caller_disconnect_cancels_call_on_other_engine(n, a, b):
    wa = Responder(a, "slow::f", "pa", hang=True)
    # locally first: a caller on a closes its socket while a's worker holds its call (a call with
    # a deadline: its target hears how it ended)
    ca = WS(a.port)
    worker_hello(ca, "ca")
    send_call(ca, "slow::f", {"i": 1}, timeout_ms=30000)
    inv = wait_until(lambda: wa.got and wa.got[-1], 5, "the local call reaching a's worker")
    ca.close()
    m = cancelled(wa, inv["invocation_id"])
    check(m == {"type": "invocationcancelled", "invocation_id": inv["invocation_id"],
                "reason": "caller_disconnected"}, "the local caller's disconnect: %s (other frames: %s)"
          % (m, wa.extra))
    # the same call from a caller on b
    lb = Client(b, "lister")
    wait_until(lambda: remote(lb, "slow::f", "a"), 5, "slow::f on b")
    cbw = WS(b.port)
    worker_hello(cbw, "cb")
    send_call(cbw, "slow::f", {"i": 2}, timeout_ms=30000)
    inv = wait_until(lambda: len(wa.got) == 2 and wa.got[-1], 5, "b's call reaching a's worker")
    check(inv["data"].get("i") == 2, "b's call: %s" % inv)
    cbw.close()
    m = cancelled(wa, inv["invocation_id"])
    check(m == {"type": "invocationcancelled", "invocation_id": inv["invocation_id"],
                "reason": "caller_disconnected"},
          "a's worker hears that the caller on b went away: %s (other frames: %s)" % (m, wa.extra))
    wa.close()



@with_nats
def caller_disconnect_cancels_a_many_routed_call(n):
    # the same through a queue group: the node NATS picked hears that the caller went away
    a, b, c, cb, prov = three_with_x(n, "share::x", b_top=MANY, hang=True)
    ws = WS(b.port)
    worker_hello(ws, "leaver")
    send_call(ws, "share::x", {"i": 1}, timeout_ms=30000)
    node = wait_until(lambda: [k for k, p in prov.items() if p.got], 5,
                      "the call reaching a's or c's worker")[0]
    p = prov[node]
    ws.close()
    m = cancelled(p, p.got[0]["invocation_id"])
    check(m == {"type": "invocationcancelled", "invocation_id": p.got[0]["invocation_id"],
                "reason": "caller_disconnected"},
          "%s's worker hears that the caller on b went away: %s (other frames: %s)"
          % (node, m, p.extra))
    for q in prov.values():
        q.close()


@with_cluster
def remote_trigger_types_listed_with_node(n, a, b):
    """A trigger type a worker on A provides shows in B's engine::triggers::list with node
    "a" (its own fields as A lists it; prefix/worker/search apply) and leaves with its worker."""
    wa, cb = Client(a, "wa"), Client(b, "cb")
    wa.ws.send_json({"type": "registertriggertype", "id": "x::tick", "description": "ticks"})
    wa.ws.send_json({"type": "ping"})
    wa.ws.recv_json_until(lambda x: x.get("type") == "pong", 3)

    def tts(c, **inp):
        r = call(c.ws, "engine::triggers::list", inp, 5)
        check("result" in r, "triggers::list failed: %s" % r)
        return [t for t in r["result"]["triggers"] if t.get("id") == "x::tick"]

    rows_b = wait_until(lambda: [t for t in tts(cb) if t.get("node") == "a"], 5, "x::tick on b")
    own = tts(wa)
    check(len(own) == 1 and "node" not in own[0], "a lists its own type without node: %s" % own)
    row = rows_b[0]
    check(list(row)[0] == "node", "node is the first member: %s" % row)
    check({k: v for k, v in row.items() if k != "node"} == own[0],
          "b's row is a's row plus node: %s vs %s" % (row, own[0]))
    check(tts(cb, prefix="x::"), "prefix filter keeps it")
    check(not tts(cb, prefix="y::"), "prefix filter drops it")
    check(tts(cb, search="tic"), "search on the id finds it")
    check(not tts(cb, search="zzz"), "search drops it")
    wa.close()
    wait_until(lambda: not [t for t in tts(cb) if t.get("node") == "a"], 5, "x::tick gone from b")


if __name__ == "__main__":
    sys.exit(suite.run())
