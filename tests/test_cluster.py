#!/usr/bin/env python3
"""Cluster over NATS: the shared registry view (README "Cluster", docs/CLUSTER.md).

Engines started with a `cluster:` section and one local nats-server (127.0.0.1, a free port):
* a function registered on engine A shows up in engine B's engine::functions::list with
  "node": "a", under the same filters (search, prefix), and in B's functions-available events;
* it leaves B's view when its worker disconnects, at once when A shuts down cleanly (goodbye),
  and within the heartbeat TTL (3 s) when A is SIGKILLed;
* a restarted nats-server: the engines reconnect and resync (what changed meanwhile arrives);
* a second engine under the same node name is reported as an error and not merged;
* malformed cluster traffic (a bogus snapshot published straight to NATS) leaves B serving.

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
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from wslib import BIN, WS, Engine, Suite, worker_hello, call  # noqa: E402

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
    """One nats-server on 127.0.0.1 (optionally with a fixed port, to restart it in place)."""

    def __init__(self, port=None):
        self.port = port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="iii-nats-")
        self.start()

    def start(self):
        self.proc = subprocess.Popen([NATS, "-a", "127.0.0.1", "-p", str(self.port)],
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


def cfg(nats_port, node):
    return ("workers:\n  - name: iii-worker-manager\n    config:\n      host: 127.0.0.1\n"
            "cluster:\n  nats: [nats://127.0.0.1:%d]\n  node: %s\n" % (nats_port, node))


def engine(nats_port, node):
    e = Engine(config=cfg(nats_port, node))
    _started.append(e)
    return e


_started = []


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


def with_cluster(fn):
    """Runs fn(nats, a, b) with two engines a and b on one nats-server; stops all after."""
    def run():
        if not NATS:
            return "skip nats-server not installed (apt install nats-server)"
        n = Nats()
        try:
            a, b = engine(n.port, "a"), engine(n.port, "b")
            fn(n, a, b)
            for e in list(_started):
                rep = e.sanitizer_report()
                check(not rep, "engine sanitizer report: %s" % rep)
                check(e.alive() or getattr(e, "expect_exit", False),
                      "an engine died: %s" % e.stderr()[-400:])
        finally:
            while _started:
                _started.pop().stop()
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


if __name__ == "__main__":
    sys.exit(suite.run())
