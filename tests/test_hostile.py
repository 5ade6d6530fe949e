#!/usr/bin/env python3
"""Hostile-client tests: what an attacker with only a WebSocket client on 127.0.0.1 can do to the
engine (one test per finding of the hardening issue; numbering follows the issue).

Each test starts its own engine(s) (`$III_BIN`, default ./iii), so a crash or a bloated engine
never leaks into the next test. Every wait is bounded; every engine is stopped by pid/pgid.
Memory is read from /proc/PID/status (VmRSS / VmHWM) and the engine's `iii_memory_bytes` gauge
(GET /metrics, live bytes of the engine's allocator).

What the tests assume of the hardened engine (the design these findings are fixed by):
* new iii-worker-manager keys: max_pending_registration_bytes (4 MiB), max_pending_registration_frames
  (10000), max_inflight_per_connection (16384), max_inflight_total, max_triggers_per_function (256),
  max_triggers_per_connection, max_functions_per_connection, max_memory_bytes;
* call-time refusals are invocationresult errors with code `BUSY`; an over-full registration buffer
  closes the connection with 1008; over max_memory_bytes upgrades get HTTP 503;
* engine::register_trigger over a cap fails with `trigger_registration_failed` naming the key;
* function ids with control characters or over 1024 bytes are refused; JSON nesting up to 128 is
  routed, deeper gets `deserialization_error`; a functions::list `search` over the needle cap gets
  `INVALID_ARGUMENTS` (or an answer) quickly;
* warnings are rate-limited per connection with a "suppressed" count; a blocked stderr never
  blocks the loop; max_connections is capped (and logged) to fit the descriptor limit.

Run: python3 tests/test_hostile.py   (III_TEST_ONLY=substring runs a subset)
Output: `ok - NAME`, `not ok - NAME: why`, `skip - NAME: why`; exit status 1 on any failure.
"""
import functools
import json
import os
import random
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import wslib  # noqa: E402
from wslib import WS, Closed, Engine, Suite  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WAIT = 3.0     # bound for a frame that must arrive (generous: 2-core noisy machine, ASan build)
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UUID4_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")
MiB = 1 << 20

suite = Suite()
_open = []      # sockets / engines / processes opened by the running test; closed at its end


class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def tail(s, n=500):
    return s.strip().replace("\n", " | ")[-n:]


def test(fn):
    """Registers fn; afterwards closes its sockets, stops its engines (by pid) and fails the test
    if an engine died or printed a sanitizer report while the test ran."""
    @functools.wraps(fn)
    def run():
        err = None
        try:
            r = fn()
        except Exception as ex:  # noqa: BLE001
            err, r = ex, None
        problems = []
        while _open:
            o = _open.pop()
            if isinstance(o, Engine):
                rc = o.proc.poll()
                rep = o.sanitizer_report()
                o.stop()
                if rc is not None and not getattr(o, "may_die", False):
                    problems.append("ENGINE DIED (status %s): %s" % (rc, rep or tail(o.stderr())))
                elif rep:
                    problems.append("sanitizer report: %s" % rep)
                if err is None and not problems:
                    o.log.close()
                    shutil.rmtree(o.tmp, ignore_errors=True)
            else:
                try:
                    o.close()
                except Exception:  # noqa: BLE001
                    pass
        if problems:
            raise Fail("; ".join(problems) + ((" || test error: %s: %s" % (type(err).__name__, err))
                                             if err else ""))
        if err is not None:
            raise err
        return r
    return suite.test(run)


# --------------------------------------------------------------------------------------------
# engines

def cfg(**kv):
    """A config whose iii-worker-manager entry carries kv (listener settings)."""
    lines = ["workers:", "  - name: iii-worker-manager", "    config:"]
    for k, v in kv.items():
        lines.append("      %s: %s" % (k, v))
    if not kv:
        lines[-1] = "    config: {}"
    return "\n".join(lines) + "\n"


def asan_env(extra=""):
    """ASAN_OPTIONS with a tiny quarantine, so freed memory is not kept resident (RSS tests)."""
    base = os.environ.get("ASAN_OPTIONS", "")
    opts = "quarantine_size_mb=1:thread_local_quarantine_size_kb=64" + (":" + extra if extra else "")
    return {"ASAN_OPTIONS": (base + ":" if base else "") + opts}


def engine(config=None, env=None, grace_ms=None, memory=False):
    e_env = dict(env or {})
    if grace_ms is not None:
        e_env["III_NAMESPACE_GRACE_MS"] = str(grace_ms)
    if memory:
        e_env.update(asan_env())
    e = Engine(config if config is not None else cfg(), env=e_env)
    _open.append(e)
    return e


def proc_kb(pid, key):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise Fail("no %s in /proc/%d/status" % (key, pid))


def http_get(port, path, timeout=5.0):
    w = WS(port, timeout=timeout, handshake=False)
    try:
        w.send_raw(("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)).encode())
        return w.read_http(timeout)
    finally:
        w.close()


def metric(e, name):
    st, _, body = http_get(e.port, "/metrics")
    check(st == 200, "/metrics answered %s" % st)
    m = re.search(r"^%s (\d+)" % re.escape(name), body.decode(), re.M)
    check(m, "no %s in /metrics" % name)
    return int(m.group(1))


def health_ok(e, timeout=5.0):
    try:
        st, _, _ = http_get(e.port, "/health", timeout)
        return st == 200
    except Exception:  # noqa: BLE001
        return False


def wait_until(fn, timeout=WAIT, what="condition"):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(0.05)


def fast_frames(payloads, opcode=1):
    """Client frames with an all-zero masking key (legal; the payload goes out unchanged): cheap
    to build in bulk."""
    out = []
    for p in payloads:
        if isinstance(p, str):
            p = p.encode()
        n = len(p)
        if n < 126:
            h = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            h = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            h = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        out.append(h + b"\0\0\0\0" + p)
    return b"".join(out)


def jdump(o):
    return json.dumps(o, separators=(",", ":"))


def upgrade(port, rcvbuf=None, timeout=5.0):
    """A WS client; rcvbuf shrinks the socket's receive buffer before connecting (a slow reader
    that the kernel cannot hide)."""
    if rcvbuf is None:
        return WS(port, timeout=timeout)
    import base64
    import hashlib
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    w = WS.__new__(WS)
    w.sock, w.rbuf, w.status, w.resp_headers = s, b"", None, {}
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\nConnection: Upgrade"
               "\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % (port, key))
              .encode())
    w.status, w.resp_headers, _ = w.read_http(timeout)
    want = base64.b64encode(hashlib.sha1(key.encode() + wslib.GUID).digest()).decode()
    check(w.status == 101 and w.resp_headers.get("sec-websocket-accept") == want,
          "upgrade answered %s" % w.status)
    return w


# --------------------------------------------------------------------------------------------
# a worker connection with a backlog

def is_type(t):
    return lambda m: m.get("type") == t


def is_invoke(fid):
    return lambda m: m.get("type") == "invokefunction" and m.get("function_id") == fid


def is_result(iid):
    return lambda m: m.get("type") == "invocationresult" and m.get("invocation_id") == iid


class Conn:
    def __init__(self, e, name=None, announce=True, rcvbuf=None, fns=(), read_first=True):
        self.e = e
        self.ws = upgrade(e.port, rcvbuf)
        _open.append(self.ws)
        check(self.ws.status == 101, "upgrade answered HTTP %s" % self.ws.status)
        self.backlog = []
        self.name = name or "w-" + uuid.uuid4().hex[:8]
        self.wid = None
        if read_first:
            m = self.recv(is_type("workerregistered"), what="workerregistered")
            self.wid, self.token = m["worker_id"], m.get("reattach_token")
        if announce:
            self.announce()
        if fns:
            self.send_many({"type": "registerfunction", "id": f} for f in fns)
            self.sync()

    def read(self, deadline):
        """(obj, raw) of the next data frame; raises Fail on a non-JSON frame, Closed, Timeout."""
        op, p = self.ws.recv_msg(max(0.01, deadline - time.time()))
        try:
            return json.loads(p.decode("utf-8")), p
        except (UnicodeDecodeError, ValueError):
            raise Fail("engine sent a frame that is not UTF-8 JSON: %r" % p[:300])

    def recv_full(self, pred, timeout=WAIT, what="frame"):
        for i, it in enumerate(self.backlog):
            if pred(it[0]):
                del self.backlog[i]
                return it
        deadline = time.time() + timeout
        while True:
            try:
                it = self.read(deadline)
            except TimeoutError:
                raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))
            except Closed as ex:
                raise Fail("connection closed by the engine while waiting for %s (%s)" % (what, ex))
            if pred(it[0]):
                return it
            self.backlog.append(it)

    def recv(self, pred=lambda m: True, timeout=WAIT, what="frame"):
        return self.recv_full(pred, timeout, what)[0]

    def send(self, obj):
        self.ws.send_text(jdump(obj))

    def send_many(self, objs, opcode=1):
        self.ws.send_raw(fast_frames([jdump(o) for o in objs], opcode))

    def sync(self, timeout=WAIT):
        self.send({"type": "ping"})
        self.recv(is_type("pong"), timeout, "pong")

    def announce(self, name=True, sync=True, **extra):
        data = {"runtime": "python", "version": "0", "os": "linux", "pid": os.getpid()}
        if name is True:
            data["name"] = self.name
        elif name is not None:
            data["name"] = name
        data.update(extra)
        self.send({"type": "invokefunction", "function_id": "engine::workers::register",
                   "data": data, "action": {"type": "void"}})
        if sync:
            self.sync()

    def call(self, fid, data, timeout=WAIT, **extra):
        iid = str(uuid.uuid4())
        m = {"type": "invokefunction", "invocation_id": iid, "function_id": fid, "data": data}
        m.update(extra)
        self.send(m)
        return self.recv(is_result(iid), timeout, "invocationresult for %s" % fid)

    def ok(self, fid, data=None, timeout=WAIT):
        r = self.call(fid, {} if data is None else data, timeout)
        check("error" not in r, "%s failed: %s" % (fid, str(r.get("error"))[:300]))
        return r.get("result")

    def close(self):
        self.ws.close()


def fn_ids(c, **inp):
    inp.setdefault("include_internal", True)
    return [f["function_id"] for f in c.ok("engine::functions::list", inp)["functions"]]


def register_bulk(e, ids, per_conn=5000, prefix="bulk", timeout=60):
    """Registers ids over announced connections of at most per_conn functions each (a cap on
    functions per connection must not decide these tests). Returns the connections."""
    conns = []
    deadline = time.time() + timeout
    for i in range(0, len(ids), per_conn):
        c = Conn(e, name="%s-%d" % (prefix, i // per_conn))
        c.ws.send_raw(fast_frames(['{"type":"registerfunction","id":%s}' % json.dumps(x)
                                   for x in ids[i:i + per_conn]]))
        conns.append(c)
    for c in conns:
        c.sync(timeout=max(0.5, deadline - time.time()))
    return conns


# ============================================================================================
# 1. name lease use-after-free

@test
def f01_name_lease_after_nameless_reannounce():
    e = engine()
    obs = Conn(e, name="observer")
    a = Conn(e, name="n1")
    a.announce(name=None)            # re-announce without a name
    a.close()
    wait_until(lambda: a.wid not in [w["id"] for w in obs.ok("engine::workers::list")["workers"]],
               what="worker A gone from engine::workers::list")
    for _ in range(4):                 # plain builds: let A's freed connection be reused
        Conn(e, announce=False)
    b = Conn(e, announce=False)
    iid = str(uuid.uuid4())
    b.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::workers::register",
            "data": {"runtime": "python", "name": "n1", "pid": os.getpid()}})
    m = b.recv(lambda m: is_result(iid)(m) or m.get("type") == "registrationrejected",
               what="reply to B's announce of n1")
    check(m.get("type") == "invocationresult" and m.get("result") == {"success": True},
          "B announcing the released name n1 got %s" % jdump(m)[:300])


# ============================================================================================
# 2. invalid UTF-8 split by an escape, in a binary frame

BAD = b"\xf0\x9b\\\\\xbf\xbf"          # F0 9B, the escape \\ , BF BF


@test
def f02_binary_frame_escape_splits_utf8():
    e = engine()
    c = Conn(e)
    c.ws.send_frame(2, b'{"type":"registerfunction","id":"ok::bin"}')      # control: binary works
    c.ws.send_frame(2, b'{"type":"registerfunction","id":"' + BAD + b'"}')
    c.ws.send_frame(2, b'{"type":"registerfunction","id":"x::' + BAD + b'","description":"d'
                    + BAD + b'"}')
    c.sync()
    iid = str(uuid.uuid4())
    c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::functions::list",
            "data": {"include_internal": True}})
    m, raw = c.recv_full(is_result(iid))        # recv_full fails on a frame that is not UTF-8
    ids = [f["function_id"] for f in m["result"]["functions"]]
    check("ok::bin" in ids, "control: binary registerfunction ok::bin not listed: %s" % ids)
    bad = [i for i in ids if not i.startswith("engine::") and i != "ok::bin"]
    check(not bad, "functions registered from invalid UTF-8: %r" % bad)


# ============================================================================================
# 3. sanitize() over-read: worker name ending in a truncated multi-byte sequence

@test
def f03_worker_name_truncated_utf8():
    e = engine()
    obs = Conn(e, name="observer")
    names = [b"n\xf0\x9b\\\\", b"m\xe2\\\\", b"k\xf0\\\\", b"j\xf0\x9b\\\\\xbf\xbf"]
    conns = []
    for nm in names:
        c = Conn(e, announce=False)
        c.ws.send_frame(2, b'{"type":"invokefunction","function_id":"engine::workers::register",'
                           b'"action":{"type":"void"},"data":{"runtime":"python","pid":1,"name":"'
                        + nm + b'","description":"' + nm + b'"}}')
        c.sync()
        conns.append(c)
    iid = str(uuid.uuid4())
    obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::workers::list",
              "data": {}})
    m, raw = obs.recv_full(is_result(iid))      # must be valid UTF-8 JSON
    allowed = set("nmkj\\")
    ids = {c.wid for c in conns}
    for w in m["result"]["workers"]:
        if w.get("id") in ids:
            for fld in ("name", "description"):
                v = w.get(fld)
                check(v is None or set(v) <= allowed,
                      "worker %s contains foreign characters: %r" % (fld, v))
    check(e.alive(), "engine died")


# ============================================================================================
# 4. scratch buffer reused across a nested call

@test
def f04_nested_call_scratch_buffer():
    e = engine()
    x = Conn(e, name="x", fns=["x::h"])
    x.send({"type": "registertrigger", "id": "t-x", "trigger_type": "engine::workers-available",
            "function_id": "x::h", "config": {}, "metadata": {"secret": "s3cr3t"}})
    x.sync()
    y = Conn(e, announce=False)
    iid = str(uuid.uuid4())
    y.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::workers::register",
            "traceparent": TP, "data": {"runtime": "python", "name": "y", "pid": os.getpid()}})
    deadline = time.time() + WAIT
    while True:
        try:
            op, p = y.ws.recv_msg(max(0.01, deadline - time.time()))
        except TimeoutError:
            raise Fail("no invocationresult for Y's engine::workers::register")
        if iid.encode() in p:
            break
    check(b"s3cr3t" not in p, "Y's reply carries X's trigger metadata: %r" % p[:300])
    try:
        m = json.loads(p.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise Fail("Y's reply is not valid JSON: %r" % p[:300])
    check(m.get("type") == "invocationresult" and m.get("invocation_id") == iid,
          "unexpected reply %r" % p[:300])
    check(m.get("result") == {"success": True}, "reply %r" % p[:300])
    check(m.get("traceparent") == TP, "reply does not echo Y's traceparent: %r" % p[:300])


# ============================================================================================
# 6. a worker must not take over the engine's own trigger types

@test
def f06_hijack_engine_trigger_type():
    e = engine()
    s = Conn(e, name="sub", fns=["s::h"])
    s.send({"type": "registertrigger", "id": "t-s", "trigger_type": "engine::workers-available",
            "function_id": "s::h", "config": {}})
    s.sync()
    h = Conn(e, name="hijacker")
    h.send({"type": "registertriggertype", "id": "engine::workers-available",
            "description": "mine now"})
    h.sync()
    h.close()
    time.sleep(0.5)
    s.backlog.clear()
    n = Conn(e, announce=False)
    s.recv(lambda m: is_invoke("s::h")(m) and m.get("data", {}).get("worker_id") == n.wid
           and m["data"].get("event") == "worker_connected", timeout=WAIT,
           what="worker_connected for a new worker after the hijacker left")
    rows = s.ok("engine::triggers::list", {"include_internal": True})["triggers"]
    row = [r for r in rows if r.get("id") == "engine::workers-available"]
    check(row and row[0].get("worker_name") == "iii-engine-functions",
          "engine::workers-available is now %r" % row)


# ============================================================================================
# 7a/7b/7c. identifier spoofing

@test
def f07a_invocation_id_case():
    e = engine()
    t = Conn(e, name="target", fns=["t::f"])
    c = Conn(e, name="caller")
    iid = str(uuid.uuid4()).upper()
    c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "t::f", "data": {}})
    inv = t.recv(is_invoke("t::f"), what="invokefunction at the target")
    t.send({"type": "invocationresult", "invocation_id": inv["invocation_id"].lower(),
            "function_id": "t::f", "result": {"v": 1}})
    m = c.recv(lambda m: m.get("type") == "invocationresult"
               and str(m.get("invocation_id")).lower() == iid.lower(),
               what="the caller's result (target answered the lowercase id)")
    check(m.get("result") == {"v": 1}, "result %r" % m)
    check(m.get("invocation_id") == iid, "reply uses %r, not the caller's spelling %r"
          % (m.get("invocation_id"), iid))


@test
def f07b_escaped_caller_worker_id_key():
    e = engine()
    t = Conn(e, name="target", fns=["t::f"])
    c = Conn(e, name="caller")
    iid = str(uuid.uuid4())
    c.ws.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"t::f",'
                   '"data":{"_caller_worker_i\\u0064":"spoof","k":1}}' % iid)
    inv, raw = t.recv_full(is_invoke("t::f"), what="invokefunction at the target")
    doc = json.loads(raw.decode(), object_pairs_hook=lambda pairs: pairs)
    data = dict(doc)["data"]
    got = [v for k, v in data if k == "_caller_worker_id"]
    check(got == [c.wid], "target's data has _caller_worker_id members %r (caller is %s): %r"
          % (got, c.wid, raw[:300]))
    t.send({"type": "invocationresult", "invocation_id": inv["invocation_id"], "function_id": "t::f",
            "result": 1})
    c.recv(is_result(iid))


@test
def f07c_control_chars_in_function_id():
    e = engine()
    c = Conn(e, name="w")
    bad = ["a\u0000b", "engine::functions::list\u0000", "x\u0001y", "x\ny", "tab\there"]
    problems = []
    for fid in bad:
        c.send({"type": "registerfunction", "id": fid})
        try:
            m = c.recv(is_type("registrationrejected"), timeout=WAIT, what="registrationrejected")
        except Fail as ex:
            problems.append("%r: %s" % (fid, ex))
            continue
        if m.get("code") != "FUNCTION_NAMESPACE_CONFLICT" or not m.get("message"):
            problems.append("%r: %s" % (fid, jdump(m)))
    ids = fn_ids(c)
    listed = [i for i in bad if i in ids]
    check(not listed, "listed: %r" % listed)
    check(not problems, "; ".join(problems))
    c.ok("engine::functions::list", {})        # the builtin still answers


# ============================================================================================
# 8. outbound cap on engine-originated frames (pong flood, never read)

@test
def f08_pong_flood_bounded():
    e = engine(cfg(max_outbound_bytes=1048576), memory=True)
    c = Conn(e, name="flooder", rcvbuf=4096)
    time.sleep(0.2)
    base = proc_kb(e.proc.pid, "VmHWM")
    chunk = fast_frames([b"p" * 100] * 4000, opcode=9) + \
        fast_frames(['{"type":"ping"}'] * 1000)              # ~0.45 MB, ~0.5 MB of replies
    sent, dropped = 0, False
    c.ws.sock.settimeout(5.0)
    deadline = time.time() + 40
    while sent < 200 * MiB and time.time() < deadline:
        try:
            c.ws.sock.sendall(chunk)
        except socket.timeout:
            break                   # the engine stopped reading: it must still drop us (below)
        except OSError:
            dropped = True
            break
        sent += len(chunk)
    grow = proc_kb(e.proc.pid, "VmHWM") - base
    check(grow < 64 * 1024, "engine VmHWM grew by %d MiB while the client sent %d MiB of pings "
          "and read nothing" % (grow // 1024, sent // MiB))
    if not dropped:
        dropped = c.ws.expect_eof(5.0)
    check(dropped, "connection not dropped after %d MiB of unread pongs" % (sent // MiB))
    check(health_ok(e), "engine does not answer /health")


def close_code(ws, timeout=5.0):
    """The code of the engine's Close frame, or a description of what happened instead."""
    try:
        return ws.expect_close(timeout)
    except TimeoutError:
        return "no close frame within %.0fs" % timeout
    except (Closed, OSError) as ex:
        return "connection ended without a close frame (%s)" % ex


# ============================================================================================
# 9. registration buffer of a connection that never announces

@test
def f09_pending_registration_flood_defaults():
    e = engine(grace_ms=60000, memory=True)
    other = Conn(e, name="other")
    f = Conn(e, announce=False)
    base = proc_kb(e.proc.pid, "VmHWM")
    frames = fast_frames(['{"type":"registerfunction","id":"flood::%06d","description":"%s"}'
                          % (i, "d" * 60) for i in range(12000)])           # > 10000 frames
    done = {}

    def flood():
        try:
            f.ws.sock.settimeout(10)
            f.ws.sock.sendall(frames)
        except OSError as ex:
            done["err"] = ex
    th = threading.Thread(target=flood, daemon=True)
    th.start()
    t0 = time.time()
    other.ok("engine::functions::list", {})
    lat = time.time() - t0
    th.join(15)
    code = close_code(f.ws)
    grow = proc_kb(e.proc.pid, "VmHWM") - base
    check(lat < 1.0, "a call from another connection took %.2fs during the flood" % lat)
    check(code == 1008, "flooding connection: expected close 1008, got %r" % (code,))
    check(grow < 64 * 1024, "VmHWM grew by %d MiB" % (grow // 1024))


@test
def f09b_pending_registration_bytes_cap():
    e = engine(cfg(max_pending_registration_bytes=65536, max_pending_registration_frames=100),
               grace_ms=60000)
    f = Conn(e, announce=False)
    f.ws.send_raw(fast_frames(['{"type":"registerfunction","id":"big::%d","description":"%s"}'
                               % (i, "d" * 10000) for i in range(10)]))
    code = close_code(f.ws)
    check(code == 1008, "expected close 1008 over max_pending_registration_bytes, got %r" % code)
    g = Conn(e, announce=False)
    g.send_many({"type": "registerfunction", "id": "small::%d" % i} for i in range(150))
    code = close_code(g.ws)
    check(code == 1008, "expected close 1008 over max_pending_registration_frames, got %r" % code)


# ============================================================================================
# 10. in-flight bound

def busy_results(c, n, timeout):
    """Counts invocationresult frames with error code BUSY among the next results (n at most)."""
    busy = 0
    deadline = time.time() + timeout
    while busy < n:
        try:
            m = c.recv(is_type("invocationresult"), max(0.05, deadline - time.time()))
        except Fail:
            break
        if (m.get("error") or {}).get("code") == "BUSY":
            busy += 1
    return busy


@test
def f10_inflight_bound():
    e = engine(cfg(max_inflight_per_connection=100, max_inflight_total=150))
    t = Conn(e, name="target", fns=["t::slow"])
    obs = Conn(e, name="observer")
    c1 = Conn(e, name="caller1")
    c1.send_many({"type": "invokefunction", "invocation_id": str(uuid.uuid4()),
                  "function_id": "t::slow", "data": {}} for _ in range(130))
    b1 = busy_results(c1, 30, WAIT)
    check(b1 >= 25, "per-connection cap 100: only %d of 130 calls got BUSY" % b1)
    c2 = Conn(e, name="caller2")
    c2.send_many({"type": "invokefunction", "invocation_id": str(uuid.uuid4()),
                  "function_id": "t::slow", "data": {}} for _ in range(80))
    b2 = busy_results(c2, 30, WAIT)
    check(b2 >= 25, "global cap 150: only %d of caller2's 80 calls got BUSY" % b2)

    def active():
        ws = obs.ok("engine::workers::list")["workers"]
        return [w.get("active_invocations") for w in ws if w.get("id") == t.wid]
    check(active() and active()[0] >= 100, "target's active_invocations %r" % active())
    c1.close()
    c2.close()
    wait_until(lambda: active() == [0], timeout=5, what="target's active_invocations back to 0")


# ============================================================================================
# 11. durable bindings cannot amplify

@test
def f11_durable_trigger_caps():
    e = engine(cfg(max_triggers_per_function=4, max_triggers_per_connection=6))
    v = Conn(e, name="victim", fns=["v::f%d" % i for i in range(4)])
    a = Conn(e, name="attacker")
    res = [a.call("engine::register_trigger", {"trigger_type": "engine::workers-available",
                                               "function_id": "v::f0", "config": {}})
           for _ in range(6)]
    oks = [r for r in res if "error" not in r]
    errs = [r["error"] for r in res if "error" in r]
    check(len(oks) == 4, "max_triggers_per_function 4: %d of 6 bindings accepted" % len(oks))
    check(all(x.get("code") == "trigger_registration_failed"
              and "max_triggers_per_function" in x.get("message", "") for x in errs),
          "refusals: %r" % errs)
    v.backlog.clear()
    n = Conn(e, announce=False)
    n.close()
    time.sleep(1.0)
    fires = 0
    try:
        while True:
            m = v.recv(is_invoke("v::f0"), timeout=0.5)
            if m.get("data", {}).get("worker_id") == n.wid:
                fires += 1
    except Fail:
        pass
    check(fires <= 2 * 4, "one connect/disconnect sent %d fires to the victim" % fires)
    r = [a.call("engine::register_trigger", {"trigger_type": "engine::workers-available",
                                             "function_id": "v::f%d" % i, "config": {}})
         for i in (1, 2, 3)]
    check("error" not in r[0] and "error" not in r[1], "bindings 5 and 6 of the connection: %r"
          % r[:2])
    x = r[2].get("error") or {}
    check(x.get("code") == "trigger_registration_failed"
          and "max_triggers_per_connection" in x.get("message", ""),
          "7th binding of one connection: %r" % r[2])


# ============================================================================================
# 12. slow reader and the global memory bound

@test
def f12a_slow_reader_memory():
    cap = 8 * MiB
    e = engine(cfg(max_outbound_bytes=cap), memory=True)
    r = Conn(e, name="reader", rcvbuf=4096, fns=["sink::f"])
    w = Conn(e, name="writer")
    time.sleep(0.2)
    base_hwm = proc_kb(e.proc.pid, "VmHWM")
    base_live = metric(e, "iii_memory_bytes")
    base_rss = proc_kb(e.proc.pid, "VmRSS")
    payload = '{"type":"invokefunction","function_id":"sink::f","action":{"type":"void"},' \
              '"data":{"blob":"%s"}}' % ("z" * 65536)
    chunk = fast_frames([payload] * 16)          # 1 MiB per send
    w.ws.sock.settimeout(5)
    sent = 0
    while sent < 100 * MiB:
        try:
            w.ws.sock.sendall(chunk)
        except OSError:
            break
        sent += len(chunk)
    w.sync(timeout=10)
    grow = (proc_kb(e.proc.pid, "VmHWM") - base_hwm) * 1024
    check(grow < 3 * cap + 8 * MiB, "VmHWM grew by %d MiB (cap %d MiB) while %d MiB went to a "
          "reader that never reads" % (grow // MiB, cap // MiB, sent // MiB))
    r.close()
    w.sync()
    wait_until(lambda: metric(e, "iii_memory_bytes") < base_live + 4 * MiB, timeout=5,
               what="live bytes (iii_memory_bytes) back near baseline")
    rss = proc_kb(e.proc.pid, "VmRSS") - base_rss
    check(rss < 16 * 1024, "VmRSS stays %d MiB above baseline after the reader is dropped"
          % (rss // 1024))


@test
def f12b_max_memory_bytes():
    """Over max_memory_bytes (the engine's live bytes, gauge iii_memory_bytes, at or above the
    limit) new calls get BUSY and new upgrades HTTP 503; dropping the memory hog recovers."""
    limit = 24 * MiB
    e = engine(cfg(max_memory_bytes=limit, max_outbound_bytes=256 * MiB), memory=True)
    r = Conn(e, name="reader", rcvbuf=4096, fns=["sink::f"])   # never reads: its queue grows
    w = Conn(e, name="writer")
    c = Conn(e, name="caller")
    blob = '{"type":"invokefunction","function_id":"sink::f","action":{"type":"void"},' \
           '"data":{"blob":"%s"}}' % ("z" * MiB)
    deadline = time.time() + 15
    last = -1
    while time.time() < deadline:
        live = metric(e, "iii_memory_bytes")
        if live >= limit or live <= last:       # over, or the engine stopped admitting blobs
            break
        last = live
        w.ws.send_raw(fast_frames([blob] * 2))
        try:
            w.sync(timeout=10)
        except Fail:
            break
    pings = fast_frames([b"q" * 125] * 8000, opcode=9)       # fallback: unread pongs
    while metric(e, "iii_memory_bytes") < limit and time.time() < deadline:
        r.ws.sock.settimeout(5)
        r.ws.sock.sendall(pings)
        time.sleep(0.05)
    live = metric(e, "iii_memory_bytes")
    check(live >= limit, "could not push the engine's live bytes over max_memory_bytes (%d MiB)"
          % (live // MiB))
    r_ = c.call("sink::f", {"blob": "y" * (2 * MiB)})
    check((r_.get("error") or {}).get("code") == "BUSY",
          "a new call over max_memory_bytes got %s" % jdump(r_)[:200])
    u = WS(e.port, timeout=5)
    _open.append(u)
    check(u.status == 503, "a new upgrade over max_memory_bytes answered %s" % u.status)
    r.close()
    wait_until(lambda: metric(e, "iii_memory_bytes") < limit // 2, timeout=10,
               what="memory released after the reader is dropped")
    c.ok("engine::functions::list", {})
    u2 = WS(e.port, timeout=5)
    _open.append(u2)
    check(u2.status == 101, "upgrade after recovery answered %s" % u2.status)


# ============================================================================================
# 13. descriptors and ids

@test
def f13a_fd_exhaustion_sighup():
    if not os.path.exists("/bin/sh"):
        return "skip /bin/sh missing"
    tmp = tempfile.mkdtemp(prefix="iii-ulimit-")
    wrap = os.path.join(tmp, "iii-ulimit")
    with open(wrap, "w") as f:
        f.write('#!/bin/sh\nulimit -n 128 || exit 99\nexec "%s" "$@"\n' % wslib.BIN)
    os.chmod(wrap, 0o755)
    saved = wslib.BIN
    wslib.BIN = wrap                     # Engine reads the module global; exec keeps the pid
    try:
        e = engine(cfg(handshake_timeout_ms=30000))
    finally:
        wslib.BIN = saved
        shutil.rmtree(tmp, ignore_errors=True)
    socks = []
    try:
        for _ in range(200):
            try:
                s = socket.create_connection(("127.0.0.1", e.port), timeout=1)
                socks.append(s)
            except OSError:
                break
        time.sleep(0.5)
        os.kill(e.proc.pid, signal.SIGHUP)
        time.sleep(1.5)
        check(e.alive(), "engine exited (status %s) on SIGHUP with descriptors exhausted: %s"
              % (e.proc.returncode, tail(e.stderr(), 300)))
    finally:
        for s in socks:
            s.close()
    ok = wait_until(lambda: health_ok(e, 2.0), timeout=10, what="/health after sockets closed")
    check(ok, "/health")
    log = e.stderr()
    check(re.search(r"max_connections.*cap|cap.*max_connections", log),
          "log does not say max_connections was capped to the descriptor limit: %s"
          % tail(log, 300))


@test
def f13b_reattach_tokens_uuid4():
    e = engine()
    toks, wids = set(), set()
    for _ in range(64):
        c = Conn(e, announce=False)
        check(UUID4_RE.match(c.token or "") and UUID4_RE.match(c.wid or ""),
              "not UUIDv4: %r %r" % (c.wid, c.token))
        toks.add(c.token)
        wids.add(c.wid)
        c.close()
    check(len(toks) == 64 and len(wids) == 64 and not toks & wids, "ids repeat")


@test
def f13c_unpredictable_ids():
    return "skip id unpredictability (no xorshift) is not testable black-box; f13b is the weak check"


# ============================================================================================
# 14. logging cannot amplify, and a stderr nobody reads never blocks the loop

@test
def f14a_log_rate_limited():
    e = engine()
    c = Conn(e, name="noisy")
    time.sleep(0.2)
    before = os.path.getsize(e.logpath)
    c.ws.send_raw(fast_frames(['{"type":'] * 20000))
    c.sync(timeout=20)
    time.sleep(1.5)                     # a later warning (or the close) reports what was dropped
    c.ws.send_text('{"type":')
    c.sync()
    c.close()
    try:
        wait_until(lambda: "suppressed" in e.stderr(), timeout=3, what="suppressed")
    except Fail:
        pass
    grew = os.path.getsize(e.logpath) - before
    check(grew < 200 * 1024, "20,000 malformed frames grew the engine log by %d KiB" % (grew // 1024))
    check("suppressed" in e.stderr(), "no 'suppressed' count in the log")


@test
def f14b_unread_stderr_never_blocks():
    tmp = tempfile.mkdtemp(prefix="iii-stderr-")
    path = os.path.join(tmp, "config.yaml")
    with open(path, "w") as f:
        f.write(cfg())
    rfd, wfd = os.pipe()
    p = subprocess.Popen([wslib.BIN, "-c", path, "--port", "0"], stdout=subprocess.PIPE,
                         stderr=wfd, start_new_session=True)
    os.close(wfd)

    class Proc:                       # stopped by pgid at the end of the test
        def close(self):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(5)
            p.stdout.close()
            os.close(rfd)
            shutil.rmtree(tmp, ignore_errors=True)
    _open.append(Proc())
    port = None
    deadline = time.time() + 10
    line = b""
    os.set_blocking(p.stdout.fileno(), False)
    while port is None and time.time() < deadline:
        try:
            line += os.read(p.stdout.fileno(), 4096) or b""
        except BlockingIOError:
            time.sleep(0.02)
        m = re.search(rb"listening on ws://127\.0\.0\.1:(\d+)", line)
        if m:
            port = int(m.group(1))
    check(port, "engine did not start")
    w = WS(port, timeout=5)
    _open.append(w)
    w.send_raw(fast_frames(['{"type":'] * 20000 + ['{"nope":1}'] * 5000))
    time.sleep(1.0)
    t0 = time.time()
    try:
        u = WS(port, timeout=2.0)
        _open.append(u)
        st = u.status
    except (OSError, TimeoutError, Closed) as ex:
        st = repr(ex)
    check(st == 101 and time.time() - t0 < 2.0,
          "with a full, unread stderr pipe a new upgrade got %s after %.1fs" % (st, time.time() - t0))


# ============================================================================================
# 15. nesting deeper than the parser's cap gets an error, not silence

@test
def f15_deep_nesting():
    e = engine()
    t = Conn(e, name="target", fns=["t::deep"])
    c = Conn(e, name="caller")
    iid = str(uuid.uuid4())
    c.ws.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"t::deep","data":%s%s}'
                   % (iid, "[" * 200, "]" * 200))
    m = c.recv(is_result(iid), what="error reply to a frame nested 201 deep")
    check((m.get("error") or {}).get("code") == "deserialization_error", "reply %s" % jdump(m)[:200])
    iid = str(uuid.uuid4())            # frame depth 128: the object + 127 arrays
    c.ws.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"t::deep","data":%s%s}'
                   % (iid, "[" * 127, "]" * 127))
    inv = t.recv(is_invoke("t::deep"), what="the depth-128 call routed to the target")
    t.send({"type": "invocationresult", "invocation_id": inv["invocation_id"],
            "function_id": "t::deep", "result": 1})
    m = c.recv(is_result(iid))
    check(m.get("result") == 1, "reply %s" % jdump(m)[:200])


# ============================================================================================
# 16. engine::functions::list search cost; id length cap

@test
def f16a_huge_search_needle():
    e = engine()
    conns = []
    for k in range(2):                 # 2000 functions: ids of ~1 KB, descriptions of 5 KB
        c = Conn(e, name="long-%d" % k)
        c.ws.send_raw(fast_frames([jdump({"type": "registerfunction",
                                          "id": "long::%05d::%s" % (i, "a" * 1000),
                                          "description": "a" * 5000})
                                   for i in range(k * 1000, k * 1000 + 1000)]))
        conns.append(c)
    for c in conns:
        c.sync(timeout=30)
    c = conns[0]
    iid = str(uuid.uuid4())
    t0 = time.time()
    c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::functions::list",
            "data": {"search": "a" * 600000 + "b"}})
    m = c.recv(is_result(iid), timeout=5, what="answer to a 600 KB search")
    dt = time.time() - t0
    check(dt < 1.0, "engine::functions::list with a 600 KB search took %.1fs" % dt)
    if "error" in m:
        check(m["error"].get("code") == "INVALID_ARGUMENTS", "error %r" % m["error"])
    t1 = time.time()
    c.ok("engine::functions::list", {"search": "long::00001"})
    check(time.time() - t1 < 1.0, "an ordinary search took %.1fs" % (time.time() - t1))


@test
def f16c_search_needle_within_cap():
    """Beyond the stated design: a needle that fits the cap (256 bytes) over ~10 MB of
    descriptions. A naive O(hay x needle) case-insensitive search costs ~1.5 s (plain build) /
    ~20 s (ASan) here; the answer must still come within 1 s (linear-time search, or a bound on
    the bytes one search may scan)."""
    e = engine()
    conns = []
    for k in range(2):
        c = Conn(e, name="desc-%d" % k)
        c.ws.send_raw(fast_frames([jdump({"type": "registerfunction", "id": "d::%05d" % i,
                                          "description": "a" * 5000})
                                   for i in range(k * 1000, k * 1000 + 1000)]))
        conns.append(c)
    for c in conns:
        c.sync(timeout=30)
    iid = str(uuid.uuid4())
    t0 = time.time()
    c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::functions::list",
            "data": {"search": "a" * 255 + "b"}})
    c.recv(is_result(iid), timeout=5, what="answer to a 256-byte adversarial search")
    dt = time.time() - t0
    check(dt < 1.0, "a 256-byte search over 2000 x 5 KB descriptions took %.1fs" % dt)


@test
def f16b_function_id_length_cap():
    e = engine()
    c = Conn(e, name="w")
    long_id = "l::" + "x" * 4096
    c.send({"type": "registerfunction", "id": long_id})
    c.sync()
    check(long_id not in fn_ids(c), "a 4 KB function id was registered")


# ============================================================================================
# 17. hash flooding: function ids that all collide under 32-bit FNV-1a of "default\0<id>"

def fnv1a32(data, h=2166136261):
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def colliding_ids(n):
    """n distinct ids with one FNV-1a hash, from tests/fixtures/fnv1a_blocks.json (generated by
    tests/fixtures/gen_fnv1a_blocks.py): block pairs that map one state to one state."""
    with open(os.path.join(HERE, "fixtures", "fnv1a_blocks.json")) as f:
        fx = json.load(f)
    prefix, pairs = fx["prefix"], fx["pairs"]
    k = len(pairs)
    check(n <= (1 << k), "fixture too small")
    out = []
    for i in range(n):
        out.append(prefix + "".join(pairs[j][(i >> j) & 1] for j in range(k)))
    return out, fx["key_prefix"]


@test
def f17_fnv_collisions():
    ids, key_prefix = colliding_ids(22000)
    hs = {fnv1a32((key_prefix + x).encode()) for x in ids[:50]}
    check(len(hs) == 1, "fixture ids do not collide")
    reg, miss = ids[:20000], ids[20000:22000]
    L = len(ids[0])
    rnd = ["hf::" + "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789")
                            for _ in range(L - 4)) for _ in range(22000)]
    times = {}
    for label, keys in (("random", rnd), ("colliding", ids)):
        e = engine()
        t0 = time.time()
        limit = 60 if label == "random" else max(10, 4 * times["random"][0])
        try:
            conns = register_bulk(e, keys[:20000], prefix=label, timeout=limit)
        except Fail:
            raise Fail("registering 20,000 colliding ids took over %.0fs (random ids: %.2fs)"
                       % (limit, times["random"][0]))
        t_reg = time.time() - t0
        c = conns[0]
        frames = []
        iids = []
        for x in keys[20000:22000]:
            iid = str(uuid.uuid4())
            iids.append(iid)
            frames.append(jdump({"type": "invokefunction", "invocation_id": iid, "function_id": x,
                                 "data": {}}))
        t0 = time.time()
        c.ws.send_raw(fast_frames(frames))
        c.recv(is_result(iids[-1]), timeout=max(10, 4 * times.get("random", (0, 15))[1]),
               what="the last of 2000 misses")
        t_call = time.time() - t0
        times[label] = (t_reg, t_call)
        _open.remove(e)
        e.stop()
        shutil.rmtree(e.tmp, ignore_errors=True)
    (rr, rc), (cr, cc) = times["random"], times["colliding"]
    check(cr < 3 * max(rr, 0.5) and cc < 3 * max(rc, 0.5),
          "colliding ids: registration %.2fs vs %.2fs random, 2000 misses %.2fs vs %.2fs random"
          % (cr, rr, cc, rc))


# ============================================================================================
# 18. O(N*M) from one message

@test
def f18a_functions_list_many_workers():
    e = engine()
    conns = register_bulk(e, ["fl::%05d" % i for i in range(20000)], prefix="wk")
    c = conns[0]
    names = ["nobody-%05d" % i for i in range(60000)] + ["wk-1"]
    iid = str(uuid.uuid4())
    t0 = time.time()
    c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::functions::list",
            "data": {"workers": names}})
    m = c.recv(is_result(iid), timeout=5, what="engine::functions::list with 60,000 workers")
    dt = time.time() - t0
    check(dt < 1.0, "engine::functions::list with 60,000 worker names took %.1fs" % dt)
    check("error" in m or len(m["result"]["functions"]) == 5000, "unexpected answer")


@test
def f18b_function_not_found_with_many_functions():
    e = engine()
    conns = register_bulk(e, ["nf::%06d" % i for i in range(100000)], prefix="nf")
    c = conns[0]
    iids = [str(uuid.uuid4()) for _ in range(1000)]
    frames = fast_frames([jdump({"type": "invokefunction", "invocation_id": i,
                                 "function_id": "missing::%d" % k, "data": {}})
                          for k, i in enumerate(iids)])
    t0 = time.time()
    c.ws.send_raw(frames)
    m = c.recv(is_result(iids[-1]), timeout=5, what="the 1000th miss")
    dt = time.time() - t0
    check((m.get("error") or {}).get("code") == "function_not_found", "reply %s" % jdump(m)[:200])
    check(dt < 1.0, "1000 function_not_found with 100,000 functions registered took %.1fs" % dt)


@test
def f18c_functions_changed_amplification():
    e = engine()
    register_bulk(e, ["fc::%05d" % i for i in range(20000)], prefix="fc")
    s = Conn(e, name="sub", fns=["s::h"])
    s.send({"type": "registertrigger", "id": "t-fc", "trigger_type": "engine::functions-available",
            "function_id": "s::h", "config": {}})
    s.sync()
    stats = {"bytes": 0, "saw": False, "stop": False}

    def count():                       # raw byte counter: reads as fast as it can, parses nothing
        sock = s.ws.sock
        sock.settimeout(0.2)
        last = b""
        while not stats["stop"]:
            try:
                d = sock.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                return
            if not d:
                return
            stats["bytes"] += len(d)
            if b"tog::x" in last[-16:] + d:
                stats["saw"] = True
            last = d
    th = threading.Thread(target=count, daemon=True)
    th.start()
    t = Conn(e, name="toggler")
    reg = fast_frames(['{"type":"registerfunction","id":"tog::x"}'])
    unreg = fast_frames(['{"type":"unregisterfunction","id":"tog::x"}'])
    t0 = time.time()
    for i in range(2001):              # odd: tog::x ends registered, so one event is due
        t.ws.send_raw(reg if i % 2 == 0 else unreg)
        time.sleep(0.002)
        if time.time() - t0 > 12:
            break
    try:
        t.sync(timeout=10)
    except Fail:
        pass
    try:                               # a paced engine may send the final state a little later
        wait_until(lambda: stats["saw"], timeout=8, what="final state")
    except Fail:
        pass
    time.sleep(1.0)
    stats["stop"] = True
    th.join(2)
    check(stats["bytes"] < 50 * MiB, "the subscriber received %d MiB of functions_changed for %d "
          "toggles" % (stats["bytes"] // MiB, i + 1))
    check(stats["saw"], "the subscriber never received the final state (tog::x registered)")


@test
def f05_allocation_failure_teardown():
    return "skip covered by the C allocation-failure sweep, not black-box"


if __name__ == "__main__":
    sys.exit(suite.run())
