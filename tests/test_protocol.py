#!/usr/bin/env python3
"""Black-box protocol tests for the iii engine.

Binding spec: ../shared/spec/PROTOCOL.md (§1-§7, checklist §10, pitfalls §11) and
../shared/spec/DECISIONS.md. Frames, field names, error codes and message texts are compared
exactly. Every test starts its own engine (`$III_BIN`, default ./iii) on 127.0.0.1 with --port 0,
so no state leaks between tests, and stops it at the end. Every wait is bounded.

Run: python3 tests/test_protocol.py       (III_TEST_ONLY=substring runs a subset)
Output: `ok - NAME`, `not ok - NAME: why`, `skip - NAME: why`; exit status 1 on any failure.
"""
import functools
import json
import os
import re
import shutil
import struct
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wslib import WS, Closed, Engine, Suite  # noqa: E402

WAIT = 2.0     # bound for a frame that must arrive
QUIET = 0.3    # how long we watch for a frame that must NOT arrive
UUID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
MISSING = object()

INVALID_NS_MSG = ("`namespace` is empty: it was named and left blank. Give it a name, or omit it "
                  "to use `default`.")
STOPPED = {"code": "invocation_stopped", "message": "Invocation stopped"}

suite = Suite()
_open = []  # every socket a test opened; closed when the test ends


def test(fn):
    @functools.wraps(fn)
    def run():
        try:
            return fn()
        finally:
            _close_all()
    return suite.test(run)


def _close_all():
    while _open:
        try:
            _open.pop().close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------
# small assertion helpers

class Fail(AssertionError):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def eq(got, want, what):
    if got != want:
        raise Fail("%s: expected %s, got %s" % (what, _show(want), _show(got)))


def _show(x, n=400):
    if isinstance(x, (bytes, bytearray)):
        s = repr(bytes(x))
    else:
        try:
            s = json.dumps(x, ensure_ascii=False, sort_keys=True)
        except (TypeError, ValueError):
            s = repr(x)
    return s if len(s) <= n else s[:n] + "..."


def new_id():
    return str(uuid.uuid4())


def is_uuid(s):
    return isinstance(s, str) and UUID_RE.match(s) is not None


def is_uuid4(s):
    return is_uuid(s) and s[14] == "4" and s[19] in "89ab"


def wait_until(fn, timeout=WAIT, what="condition", show=None):
    deadline = time.time() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.time() > deadline:
            extra = (" (last state: %s)" % _show(show())) if show else ""
            raise Fail("timed out after %.1fs waiting for %s%s" % (timeout, what, extra))
        time.sleep(0.05)


def tail(s, n=600):
    s = s.strip().replace("\n", " | ")
    return s[-n:]


class engine:
    """Context manager: a fresh engine; fails the test if the engine died while it ran."""

    def __init__(self, grace_ms=None):
        self.env = {"III_NAMESPACE_GRACE_MS": str(grace_ms)} if grace_ms is not None else None

    def __enter__(self):
        self.e = Engine(env=self.env)
        return self.e

    def __exit__(self, et, ev, tb):
        rc = self.e.proc.poll()
        _close_all()
        self.e.stop()
        if et is None and rc is None:
            shutil.rmtree(self.e.tmp, ignore_errors=True)
        if rc is not None:
            msg = "ENGINE DIED during the test (status %s); stderr: %s" % (rc, tail(self.e.stderr()))
            if et is None:
                raise Fail(msg)
            raise Fail(msg + " || test error: %s: %s" % (et.__name__, ev)) from ev
        return False


# ---------------------------------------------------------------------------------------------
# a worker connection with a backlog (frames read while looking for another one are kept)

def is_type(t):
    return lambda m: m.get("type") == t


def is_invoke(fid):
    return lambda m: m.get("type") == "invokefunction" and m.get("function_id") == fid


def is_result(iid):
    return lambda m: m.get("type") == "invocationresult" and m.get("invocation_id") == iid


class Conn:
    def __init__(self, e, name=None, ns=None, pid=True, announce=True, fns=()):
        self.ws = WS(e.port, timeout=5.0)
        _open.append(self.ws)
        check(self.ws.status == 101, "upgrade on / answered HTTP %s" % self.ws.status)
        self.backlog = []  # [(obj, raw bytes, opcode)]
        m, _, op = self._read(time.time() + WAIT)
        check(m.get("type") == "workerregistered",
              "first frame must be workerregistered, got %s" % _show(m))
        self.first = m
        self.wid = m.get("worker_id")
        self.token = m.get("reattach_token")
        self.name = name if name is not None else "w-" + uuid.uuid4().hex[:10]
        self.ns = ns
        if announce:
            self.announce(ns=ns, pid=pid)
        for f in fns:
            self.regfn(f, sync=False)
        if fns:
            self.sync()

    # -- raw I/O
    def _read(self, deadline):
        try:
            op, p = self.ws.recv_msg(max(0.01, deadline - time.time()))
        except Closed as ex:
            raise Fail("connection closed by the engine (%s)" % ex)
        try:
            obj = json.loads(p.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise Fail("engine sent a frame that is not JSON: %r" % p[:300])
        if not isinstance(obj, dict):
            raise Fail("engine sent a non-object frame: %r" % p[:300])
        return obj, p, op

    def send(self, obj):
        self.ws.send_text(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))

    def send_text(self, s):
        self.ws.send_text(s)

    def close(self):
        self.ws.close()

    def recv_full(self, pred, timeout=WAIT, what="frame"):
        for i, it in enumerate(self.backlog):
            if pred(it[0]):
                del self.backlog[i]
                return it
        deadline = time.time() + timeout
        while True:
            try:
                it = self._read(deadline)
            except TimeoutError:
                raise Fail("timed out after %.1fs waiting for %s; other frames seen: %s"
                           % (timeout, what, self._backlog_text()))
            if pred(it[0]):
                return it
            self.backlog.append(it)

    def recv(self, pred=lambda m: True, timeout=WAIT, what="frame"):
        return self.recv_full(pred, timeout, what)[0]

    def next(self, timeout=WAIT, what="frame"):
        """The very next data frame (backlog first)."""
        if self.backlog:
            return self.backlog.pop(0)[0]
        try:
            return self._read(time.time() + timeout)[0]
        except TimeoutError:
            raise Fail("timed out after %.1fs waiting for %s" % (timeout, what))

    def _backlog_text(self):
        return "[" + ", ".join(it[1][:200].decode("utf-8", "replace") for it in self.backlog) + "]"

    def quiet(self, t=QUIET, what=""):
        """Asserts no data frame is pending or arrives within t seconds."""
        if self.backlog:
            raise Fail("unexpected frame(s)%s: %s" % (what, self._backlog_text()))
        try:
            it = self._read(time.time() + t)
        except TimeoutError:
            return
        raise Fail("unexpected frame%s: %s" % (what, it[1][:300].decode("utf-8", "replace")))

    def sync(self, timeout=WAIT):
        """ping -> pong: the engine has processed everything this connection sent before."""
        self.send({"type": "ping"})
        self.recv(is_type("pong"), timeout, "pong")

    def probe(self, label):
        """After a frame that must be ignored: the next frames are exactly pong, then our marker."""
        self.send({"type": "ping"})
        iid = new_id()
        self.send({"type": "invokefunction", "invocation_id": iid, "function_id": "probe::marker",
                   "data": {}})
        m = self.next(what="pong after %s" % label)
        if m != {"type": "pong"}:
            raise Fail("after %s: expected the next frame to be {\"type\":\"pong\"}, got %s"
                       % (label, _show(m)))
        m = self.next(what="probe result after %s" % label)
        if not (m.get("type") == "invocationresult" and m.get("invocation_id") == iid):
            raise Fail("after %s: expected the probe's invocationresult next, got %s"
                       % (label, _show(m)))

    def probe_collect(self, label):
        """Like probe(), but returns a description of unexpected frames (None if clean) and
        resynchronises on the probe marker so the next case starts from a clean state."""
        self.send({"type": "ping"})
        iid = new_id()
        self.send({"type": "invokefunction", "invocation_id": iid, "function_id": "probe::marker",
                   "data": {}})
        extra = []
        pong = False
        deadline = time.time() + WAIT
        while True:
            try:
                m = self.next(max(0.01, deadline - time.time()), "probe after %s" % label)
            except Fail as ex:
                return "%s: %s (extra frames: %s)" % (label, ex, _show(extra, 300))
            if m == {"type": "pong"} and not pong:
                pong = True
                continue
            if m.get("type") == "invocationresult" and m.get("invocation_id") == iid:
                break
            extra.append(m)
        if not pong:
            return "%s: no pong" % label
        if extra:
            return "%s: got %s" % (label, _show(extra, 300))
        return None

    def closed_within(self, t):
        """'close' or 'eof' when the engine ends this connection within t seconds, else None."""
        deadline = time.time() + t
        try:
            while True:
                _, op, _ = self.ws.recv_frame(max(0.01, deadline - time.time()))
                if op == 8:
                    return "close"
        except Closed:
            return "eof"
        except TimeoutError:
            return None
        except OSError:
            return "eof"

    # -- protocol helpers
    def announce(self, name=MISSING, ns=None, pid=True, sync=True, runtime="python"):
        data = {"version": "0", "os": "linux"}
        if runtime is not None:
            data["runtime"] = runtime
        name = self.name if name is MISSING else name
        if name is not None:
            data["name"] = name
        if pid is True:
            data["pid"] = os.getpid()
        elif pid:
            data["pid"] = pid
        if ns is not None:
            data["namespace"] = ns
        self.send({"type": "invokefunction", "function_id": "engine::workers::register",
                   "data": data, "action": {"type": "void"}})
        if sync:
            self.sync()

    def regfn(self, fid, sync=True, **extra):
        m = {"type": "registerfunction", "id": fid}
        m.update(extra)
        self.send(m)
        if sync:
            self.sync()

    def unregfn(self, fid, sync=True):
        self.send({"type": "unregisterfunction", "id": fid})
        if sync:
            self.sync()

    def regtype(self, tid, description="test trigger type", sync=True, **extra):
        m = {"type": "registertriggertype", "id": tid, "description": description}
        m.update(extra)
        self.send(m)
        if sync:
            self.sync()

    def regtrig(self, tid, ttype, fid, config=None, sync=True, **extra):
        m = {"type": "registertrigger", "id": tid, "trigger_type": ttype, "function_id": fid,
             "config": {} if config is None else config}
        m.update(extra)
        self.send(m)
        if sync:
            self.sync()

    def unregtrig(self, tid, ttype=None, sync=True):
        m = {"type": "unregistertrigger", "id": tid}
        if ttype is not None:
            m["trigger_type"] = ttype
        self.send(m)
        if sync:
            self.sync()

    def call(self, fid, data, timeout=WAIT, **extra):
        iid = new_id()
        m = {"type": "invokefunction", "invocation_id": iid, "function_id": fid, "data": data}
        m.update(extra)
        self.send(m)
        r = self.recv(is_result(iid), timeout, "invocationresult for %s" % fid)
        return r

    def ok(self, fid, data=None, timeout=WAIT, **extra):
        r = self.call(fid, {} if data is None else data, timeout, **extra)
        if "error" in r:
            raise Fail("%s(%s) failed: %s" % (fid, _show(data), _show(r["error"])))
        return r.get("result")

    def err(self, fid, data, timeout=WAIT, **extra):
        r = self.call(fid, data, timeout, **extra)
        if "error" not in r:
            raise Fail("%s(%s) should fail, got %s" % (fid, _show(data), _show(r)))
        return r["error"]

    def reply(self, inv, result=MISSING, error=None):
        m = {"type": "invocationresult", "invocation_id": inv["invocation_id"],
             "function_id": inv["function_id"]}
        if result is not MISSING:
            m["result"] = result
        if error is not None:
            m["error"] = error
        self.send(m)

    def serve(self, fid, result=MISSING, error=None, timeout=WAIT):
        inv = self.recv(is_invoke(fid), timeout, "invokefunction for %s" % fid)
        self.reply(inv, result, error)
        return inv


def flist(c, **inp):
    return c.ok("engine::functions::list", inp)["functions"]


def fids(c, **inp):
    return [f["function_id"] for f in flist(c, **inp)]


def frow(c, fid, ns="default", **inp):
    rows = [f for f in flist(c, **inp) if f["function_id"] == fid and f.get("namespace") == ns]
    return rows[0] if rows else None


def rtlist(c, **inp):
    return c.ok("engine::registered-triggers::list", inp)["registered_triggers"]


def rtids(c, **inp):
    return [r["id"] for r in rtlist(c, **inp)]


def wlist(c, **inp):
    return c.ok("engine::workers::list", inp)["workers"]


def err_eq(got, code, message, what):
    eq(got, {"code": code, "message": message}, what)


# =============================================================================================
# §1 connection basics

@test
def connect_workerregistered_first_with_uuid_and_token():
    with engine() as e:
        ws = WS(e.port)
        _open.append(ws)
        eq(ws.status, 101, "upgrade status")
        op, p = ws.recv_msg(WAIT)
        eq(op, 1, "opcode of the first frame (text)")
        m = json.loads(p)
        eq(sorted(m), ["reattach_token", "type", "worker_id"], "keys of workerregistered")
        eq(m["type"], "workerregistered", "type")
        check(is_uuid4(m["worker_id"]), "worker_id is not a lowercase UUIDv4: %r" % m["worker_id"])
        check(is_uuid4(m["reattach_token"]),
              "reattach_token is not a lowercase UUIDv4: %r" % m["reattach_token"])
        check(m["worker_id"] != m["reattach_token"], "worker_id == reattach_token")
        ws2 = WS(e.port)
        _open.append(ws2)
        m2 = json.loads(ws2.recv_msg(WAIT)[1])
        check(m2["worker_id"] != m["worker_id"], "two connections got the same worker_id")
        check(m2["reattach_token"] != m["reattach_token"], "two connections got the same token")


@test
def ping_json_gets_pong():
    with engine() as e:
        c = Conn(e, announce=False)
        c.send({"type": "ping"})
        m, raw, op = c.recv_full(lambda m: True, what="pong")
        eq(m, {"type": "pong"}, "reply to ping")
        eq(op, 1, "pong opcode (text)")
        c.send({"type": "ping", "extra": {"ignored": True}})
        eq(c.next(what="pong"), {"type": "pong"}, "reply to ping with an unknown field")
        # WebSocket-level ping is answered with a pong carrying the same payload
        c.ws.send_frame(9, b"hello-ping")
        deadline = time.time() + WAIT
        while True:
            _, op, p = c.ws.recv_frame(max(0.01, deadline - time.time()))
            if op == 10:
                eq(p, b"hello-ping", "WS pong payload")
                break
            check(op == 9, "unexpected frame opcode %d before the WS pong" % op)
        c.quiet()


@test
def engine_only_frames_are_noops():
    with engine() as e:
        c = Conn(e)
        frames = [
            ("pong", {"type": "pong"}),
            ("workerregistered with token",
             {"type": "workerregistered", "worker_id": new_id(), "reattach_token": new_id()}),
            ("workerregistered without token", {"type": "workerregistered", "worker_id": new_id()}),
            ("registrationrejected (worker)",
             {"type": "registrationrejected", "code": "WORKER_NAMESPACE_CONFLICT",
              "namespace": "default", "worker_name": c.name, "owner_worker_id": new_id()}),
            ("registrationrejected (function)",
             {"type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT",
              "namespace": "default", "function_id": "x::y", "owner_worker_id": ""}),
        ]
        for label, f in frames:
            c.send(f)
            c.probe(label)
        # the connection is fully functional and still the same worker
        rows = [w for w in wlist(c) if w.get("id") == c.wid]
        eq(len(rows), 1, "own row in engine::workers::list after the no-op frames")
        c.quiet()


# =============================================================================================
# §1.5 malformed frames: dropped, no reply, connection stays open

def _malformed_setup(e):
    """C owns m::f and provides trigger type `mal` with binding b1; D is the sender.

    Any of the malformed frames, if wrongly processed, would make C or D receive a frame."""
    c = Conn(e, name="mal-owner", fns=["m::f"])
    c.regtype("mal")
    c.regtrig("b1", "mal", "m::f", {"k": 1})
    c.recv(lambda m: m.get("type") == "registertrigger" and m.get("id") == "b1",
           what="registertrigger b1 to its provider")
    d = Conn(e, name="mal-sender")
    return c, d


def _run_malformed(cases, extra_check=None):
    with engine() as e:
        c, d = _malformed_setup(e)
        bad = []
        for label, text in cases:
            if isinstance(text, bytes):
                d.ws.send_frame(2, text)
            else:
                d.send_text(text)
            why = d.probe_collect(repr(label))
            if why:
                bad.append(why)
            c.backlog.clear()
            try:
                while True:  # frames at C are attributed to the frame just sent
                    got = c._read(time.time() + 0.05)
                    bad.append("%r: reached the owner/provider as %s" % (label, _show(got[0], 200)))
            except TimeoutError:
                pass
        check(not bad, "%d malformed frame(s) were not dropped silently: %s"
              % (len(bad), " || ".join(bad)))
        c.quiet(what=" at the owner/provider after malformed frames")
        d.quiet()
        check(d.closed_within(0.05) is None, "sender connection was closed")
        eq(rtids(d), ["b1"], "registered triggers after malformed frames")
        eq([f["function_id"] for f in flist(d) if f["function_id"].startswith("m::")], ["m::f"],
           "m:: functions after malformed frames")
        if extra_check:
            extra_check(e, c, d)


def _j(obj):
    return json.dumps(obj, separators=(",", ":"))


def _inv(**kw):
    m = {"type": "invokefunction", "invocation_id": new_id(), "function_id": "m::f", "data": {}}
    for k, v in kw.items():
        if v is MISSING:
            m.pop(k, None)
        else:
            m[k] = v
    return _j(m)


def _trig(**kw):
    m = {"type": "registertrigger", "id": "b2", "trigger_type": "mal", "function_id": "m::f",
         "config": {}}
    for k, v in kw.items():
        if v is MISSING:
            m.pop(k, None)
        else:
            m[k] = v
    return _j(m)


@test
def malformed_invalid_json_dropped():
    _run_malformed([
        ("lone brace", "{"),
        ("close brace", "}"),
        ("bare words", "not json"),
        ("truncated", '{"type":"ping"'),
        ("extra brace", '{"type":"ping"}}'),
        ("trailing garbage", '{"type":"ping"} x'),
        ("two objects", '{"type":"ping"}{"type":"ping"}'),
        ("trailing comma", '{"type":"ping",}'),
        ("single quotes", "{'type':'ping'}"),
        ("unquoted key", "{type:\"ping\"}"),
        ("truncated invoke", _inv()[:-5]),
        ("nan", '{"type":"invokefunction","invocation_id":"%s","function_id":"m::f","data":NaN}'
         % new_id()),
        ("bad escape", '{"type":"invokefunction","invocation_id":"%s","function_id":"m::f",'
         '"data":"\\x41"}' % new_id()),
        ("control char in string", '{"type":"invokefunction","invocation_id":"%s",'
         '"function_id":"m::f","data":"a\x01b"}' % new_id()),
        ("leading zero", '{"type":"invokefunction","invocation_id":"%s","function_id":"m::f",'
         '"data":012}' % new_id()),
    ])


@test
def malformed_unknown_type_dropped():
    _run_malformed([
        ("unknown type", '{"type":"bogus"}'),
        ("uppercase PING", '{"type":"PING"}'),
        ("capitalised Ping", '{"type":"Ping"}'),
        ("padded type", '{"type":" ping"}'),
        ("unregistertriggertype (SDK-only message)", '{"type":"unregistertriggertype","id":"mal"}'),
        ("error frame from worker", '{"type":"error","error":{"code":"x","message":"y"}}'),
        ("no type", '{"id":"m::f"}'),
        ("empty object", "{}"),
        ("type null", '{"type":null}'),
        ("type number", '{"type":5}'),
        ("type array", '{"type":["ping"]}'),
        ("array", '[{"type":"ping"}]'),
        ("string", '"ping"'),
        ("number", "42"),
        ("null", "null"),
        ("true", "true"),
    ])


@test
def malformed_missing_required_field_dropped():
    def after(e, c, d):
        # D never became a provider of `mal` (a processed registertriggertype would replay b1)
        rows = [t for t in d.ok("engine::triggers::list", {})["triggers"] if t["id"] == "mal"]
        eq([t.get("worker_name") for t in rows], ["mal-owner"], "provider of `mal`")
    _run_malformed([
        ("invokefunction without data", _inv(data=MISSING)),
        ("invokefunction without function_id", _inv(function_id=MISSING)),
        ("void invokefunction without data", _inv(data=MISSING, invocation_id=MISSING,
                                                  action={"type": "void"})),
        ("registertrigger without config", _trig(config=MISSING)),
        ("registertrigger without trigger_type", _trig(trigger_type=MISSING)),
        ("registertrigger without function_id", _trig(function_id=MISSING)),
        ("registertrigger without id", _trig(id=MISSING)),
        ("registertriggertype without description", '{"type":"registertriggertype","id":"mal"}'),
        ("registertriggertype without id", '{"type":"registertriggertype","description":"x"}'),
        ("registerfunction without id", '{"type":"registerfunction","description":"x"}'),
        ("unregisterfunction without id", '{"type":"unregisterfunction"}'),
        ("unregistertrigger without id", '{"type":"unregistertrigger","trigger_type":"mal"}'),
        ("reattach without previous_worker_id", '{"type":"reattach","reattach_token":"%s"}'
         % new_id()),
        ("invocationresult without invocation_id",
         '{"type":"invocationresult","function_id":"m::f","result":1}'),
    ], after)


@test
def malformed_wrong_field_types_dropped():
    _run_malformed([
        ("function_id number", _inv(function_id=5)),
        ("function_id null", _inv(function_id=None)),
        ("function_id object", _inv(function_id={"id": "m::f"})),
        ("namespace number", _inv(namespace=5)),
        ("namespace array", _inv(namespace=["default"])),
        ("traceparent number", _inv(traceparent=5)),
        ("baggage object", _inv(baggage={"k": "v"})),
        ("action string", _inv(action="void")),
        ("action array", _inv(action=["void"])),
        ("registerfunction id number (would conflict if processed)",
         '{"type":"registerfunction","id":5}'),
        ("registerfunction description number",
         '{"type":"registerfunction","id":"m::f","description":5}'),
        ("registerfunction invocation string",
         '{"type":"registerfunction","id":"m::f","invocation":"http://127.0.0.1:1/"}'),
        ("registertrigger id number", _trig(id=5)),
        ("registertrigger function_id number", _trig(function_id=5)),
        ("registertrigger trigger_type number", _trig(trigger_type=5)),
        ("registertrigger namespace number", _trig(namespace=5)),
        ("registertriggertype description number",
         '{"type":"registertriggertype","id":"mal","description":5}'),
        ("unregistertrigger trigger_type number",
         '{"type":"unregistertrigger","id":"b1","trigger_type":5}'),
        ("unregistertrigger id number", '{"type":"unregistertrigger","id":7}'),
        ("unregisterfunction id number", '{"type":"unregisterfunction","id":["m::f"]}'),
    ])


@test
def malformed_non_uuid_invocation_id_dropped():
    _run_malformed([
        ("not-a-uuid", _inv(invocation_id="not-a-uuid")),
        ("empty string", _inv(invocation_id="")),
        ("short digits", _inv(invocation_id="1234")),
        ("35 chars", _inv(invocation_id="00000000-0000-0000-0000-00000000000")),
        ("37 chars", _inv(invocation_id="00000000-0000-0000-0000-0000000000000")),
        ("non-hex", _inv(invocation_id="g0000000-0000-0000-0000-000000000000")),
        ("misplaced hyphens", _inv(invocation_id="0000000-00000-0000-0000-000000000000")),
        ("number", _inv(invocation_id=12345)),
        ("object", _inv(invocation_id={"id": new_id()})),
        ("bool", _inv(invocation_id=True)),
    ])


@test
def malformed_unknown_action_dropped():
    _run_malformed([
        ("action type bogus", _inv(action={"type": "bogus"})),
        ("action type VOID", _inv(action={"type": "VOID"})),
        ("action without type", _inv(action={})),
        ("action type null", _inv(action={"type": None})),
        ("enqueue without queue", _inv(action={"type": "enqueue"})),
        ("enqueue queue number", _inv(action={"type": "enqueue", "queue": 5})),
        ("void-looking unknown action without id", _inv(invocation_id=MISSING,
                                                        action={"type": "fire"})),
    ])


@test
def malformed_empty_and_whitespace_text_ignored():
    _run_malformed([
        ("empty text", ""),
        ("one space", " "),
        ("whitespace mix", " \t\r\n  "),
        ("newline", "\n"),
    ])


@test
def malformed_invocationresult_does_not_resolve_the_call():
    with engine() as e:
        c = Conn(e, name="res-owner", fns=["m::f"])
        a = Conn(e, name="res-caller")
        bad = [
            ("no invocation_id", lambda x: {"type": "invocationresult", "function_id": "m::f",
                                            "result": 1}),
            ("non-uuid invocation_id", lambda x: {"type": "invocationresult",
                                                  "invocation_id": x[:-1], "function_id": "m::f",
                                                  "result": 1}),
            ("error is a string", lambda x: {"type": "invocationresult", "invocation_id": x,
                                             "function_id": "m::f", "error": "boom"}),
            ("error without message", lambda x: {"type": "invocationresult", "invocation_id": x,
                                                 "function_id": "m::f", "error": {"code": "E"}}),
            ("error without code", lambda x: {"type": "invocationresult", "invocation_id": x,
                                              "function_id": "m::f", "error": {"message": "m"}}),
            ("error code number", lambda x: {"type": "invocationresult", "invocation_id": x,
                                             "function_id": "m::f",
                                             "error": {"code": 5, "message": "m"}}),
            ("stacktrace number", lambda x: {"type": "invocationresult", "invocation_id": x,
                                             "function_id": "m::f",
                                             "error": {"code": "E", "message": "m",
                                                       "stacktrace": 5}}),
            ("no function_id", lambda x: {"type": "invocationresult", "invocation_id": x,
                                          "result": 1}),
        ]
        fails = []
        for label, mk in bad:
            iid = new_id()
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "m::f",
                    "data": {"x": 1}})
            inv = c.recv(is_invoke("m::f"), what="invokefunction at the owner")
            c.send(mk(inv["invocation_id"]))
            why = c.probe_collect(label)
            if why:
                fails.append(why)
            try:
                got = a._read(time.time() + 0.1)
                fails.append("%s: forwarded (caller got error=%s)"
                             % (label, _show(got[0].get("error", MISSING), 60)))
                continue
            except TimeoutError:
                pass
            c.reply(inv, result={"good": True})
            r = a.recv(is_result(iid), what="the real result after %s" % label)
            if r.get("result") != {"good": True} or "error" in r:
                fails.append("%s: real result came back as %s" % (label, _show(r, 200)))
        check(not fails, "malformed invocationresult frames were processed: %s"
              % " || ".join(fails))
        a.quiet(what=" at the caller after malformed results")


@test
def binary_json_message_processed_like_text():
    with engine() as e:
        c = Conn(e, name="bin", fns=["bin::f"])
        c.ws.send_frame(2, b'{"type":"ping"}')
        m, raw, op = c.recv_full(lambda m: True, what="pong to a binary ping")
        eq(m, {"type": "pong"}, "reply to a binary ping")
        iid = new_id()
        c.ws.send_frame(2, _j({"type": "invokefunction", "invocation_id": iid,
                               "function_id": "engine::functions::list", "data": {}}).encode())
        r = c.recv(is_result(iid), what="result of a binary invoke")
        check("bin::f" in [f["function_id"] for f in r["result"]["functions"]],
              "binary invoke result does not list bin::f: %s" % _show(r))
        c.ws.send_frame(2, b'{"type":"registerfunction","id":"bin::g"}')
        c.sync()
        check("bin::g" in fids(c), "binary registerfunction was not applied")
        c.ws.send_frame(2, b"{")
        c.probe("binary invalid JSON")
        c.ws.send_frame(2, b'OTLP{"resourceSpans":[]}')
        c.probe("binary OTLP frame on /")
        c.ws.send_frame(2, b"")
        c.probe("empty binary frame")
        c.quiet()


# =============================================================================================
# §3 invocation routing

@test
def route_call_to_owner_and_result_back():
    with engine() as e:
        b = Conn(e, name="adder", fns=["math::add"])
        a = Conn(e, name="caller")
        iid = new_id()
        meta = {"team": "x", "n": [1, 2]}
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "math::add",
                "data": {"a": 1, "b": 2}, "metadata": meta, "traceparent": TP,
                "baggage": "user=alice,k=v"})
        inv = b.recv(is_invoke("math::add"), what="invokefunction at the owner")
        eq(inv.get("invocation_id"), iid, "target receives the caller's invocation_id")
        eq(inv.get("data"), {"a": 1, "b": 2, "_caller_worker_id": a.wid},
           "data with _caller_worker_id")
        eq(inv.get("metadata"), meta, "metadata passed through (not folded into data)")
        eq(inv.get("traceparent"), TP, "traceparent passed through")
        bag = [x.strip() for x in str(inv.get("baggage", "")).split(",") if x.strip()]
        check("user=alice" in bag and "k=v" in bag,
              "baggage entries not passed through: %r" % inv.get("baggage"))
        check(all(x in ("user=alice", "k=v") or x.startswith("iii.function.id=") for x in bag),
              "unexpected baggage entries: %r" % inv.get("baggage"))
        check("action" not in inv and "namespace" not in inv,
              "action/namespace must never be sent to the target: %s" % _show(inv))
        eq(sorted(inv), sorted(["type", "invocation_id", "function_id", "data", "metadata",
                                "traceparent", "baggage"]), "keys of the target's frame")
        b.reply(inv, result={"c": 3})
        r = a.recv(is_result(iid), what="invocationresult at the caller")
        eq(r.get("function_id"), "math::add", "function_id in the result")
        eq(r.get("result"), {"c": 3}, "result")
        check("error" not in r, "error key in a success result: %s" % _show(r))
        eq(sorted(set(r) - {"traceparent", "baggage"}),
           sorted(["type", "invocation_id", "function_id", "result"]), "keys of the result")
        # a plain call: absent optionals are omitted in the target's frame (§10 item 8)
        iid2 = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid2, "function_id": "math::add",
                "data": {"a": 5}})
        inv2 = b.recv(is_invoke("math::add"))
        eq(sorted(inv2), ["data", "function_id", "invocation_id", "type"],
           "keys of the target's frame for a call without optionals")
        b.reply(inv2, result=5)
        r2 = a.recv(is_result(iid2))
        eq(r2.get("result"), 5, "number result")
        a.quiet()
        b.quiet()


@test
def route_caller_worker_id_overwrites_spoof_and_skips_non_objects():
    with engine() as e:
        b = Conn(e, name="tgt", fns=["t::f"])
        a = Conn(e, name="src")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "t::f",
                "data": {"_caller_worker_id": "spoofed", "x": 1}})
        inv, raw, _ = b.recv_full(is_invoke("t::f"))
        eq(inv["data"].get("_caller_worker_id"), a.wid, "_caller_worker_id overwritten")
        eq(raw.count(b"_caller_worker_id"), 1, "occurrences of _caller_worker_id in the frame")
        check(b"spoofed" not in raw, "spoofed value still in the frame: %r" % raw[:300])
        eq(inv["data"].get("x"), 1, "other data kept")
        b.reply(inv, result=None)
        a.recv(is_result(iid))
        # the overwrite path keeps every other member byte-for-byte, and nested keys untouched
        pairs = [("n", "1E400"), ("inner", '{"_caller_worker_id":"keep","x":-0}'),
                 ("s", '"_caller_worker_id"'), ("z", "-0"), ("dup", "1"), ("dup", "2"),
                 ("u", r'"\u0000\ud83d\ude00"')]
        text = ('{"_caller_worker_id":"spoof1",' + ",".join('"%s":%s' % kv for kv in pairs)
                + ',"_caller_worker_id":"spoof2"}')
        iid = new_id()
        a.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"t::f",'
                    '"data":%s}' % (iid, text))
        inv, raw, _ = b.recv_full(is_invoke("t::f"))
        missing = [k + ":" + v for k, v in pairs if ('"%s":%s' % (k, v)).encode() not in raw]
        check(not missing, "members changed while overwriting _caller_worker_id: %s; frame %s"
              % (missing, raw[:500].decode("utf-8", "replace")))
        check(b"spoof" not in raw, "caller-supplied _caller_worker_id kept: %r" % raw[:500])
        eq(inv["data"].get("_caller_worker_id"), a.wid, "_caller_worker_id after overwrite")
        eq(inv["data"]["inner"], {"_caller_worker_id": "keep", "x": 0}, "nested key untouched")
        b.reply(inv, result=None)
        a.recv(is_result(iid))
        for data in ([1, 2, 3], 42, "text", None, True, [], {"nested": {"k": 1}}):
            iid = new_id()
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "t::f",
                    "data": data})
            inv, raw, _ = b.recv_full(is_invoke("t::f"))
            want = dict(data, _caller_worker_id=a.wid) if isinstance(data, dict) else data
            eq(inv.get("data", MISSING), want, "data %s at the target" % _show(data))
            if not isinstance(data, dict):
                check(b"_caller_worker_id" not in raw,
                      "_caller_worker_id added to non-object data: %r" % raw[:300])
            b.reply(inv, result=data)
            r = a.recv(is_result(iid))
            if data is None:
                check("result" not in r, "null result must be omitted: %s" % _show(r))
            else:
                eq(r.get("result"), data, "result echo")


@test
def route_null_or_absent_result_is_omitted_and_falsy_kept():
    with engine() as e:
        b = Conn(e, name="nul", fns=["n::f"])
        a = Conn(e, name="nulc")
        for label, res in (("result null", None), ("result absent", MISSING)):
            iid = new_id()
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "n::f",
                    "data": {}})
            inv = b.recv(is_invoke("n::f"))
            b.reply(inv, result=res)
            r = a.recv(is_result(iid))
            check("result" not in r and "error" not in r,
                  "%s: caller frame must have neither result nor error: %s" % (label, _show(r)))
            eq(r.get("function_id"), "n::f", "function_id")
        for val in (False, 0, "", [], {}):
            iid = new_id()
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "n::f",
                    "data": {}})
            inv = b.recv(is_invoke("n::f"))
            b.reply(inv, result=val)
            r = a.recv(is_result(iid))
            eq(r.get("result", MISSING), val, "falsy result %s kept" % _show(val))


@test
def route_error_passed_through_unchanged():
    with engine() as e:
        b = Conn(e, name="errw", fns=["e::f"])
        a = Conn(e, name="errc")
        errors = [
            {"code": "invocation_failed", "message": "boom",
             "stacktrace": "Error: boom\n    at h (w.js:1:2)"},
            {"code": "E_CUSTOM", "message": "custom \u2603 message"},
            {"code": "", "message": ""},
        ]
        for er in errors:
            iid = new_id()
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "e::f",
                    "data": {}})
            inv = b.recv(is_invoke("e::f"))
            b.reply(inv, result={"ignored": True}, error=er)
            r = a.recv(is_result(iid))
            eq(r.get("error"), er, "error passed through")
            check("result" not in r, "result must be dropped when error is present: %s" % _show(r))
            eq(r.get("function_id"), "e::f", "function_id")


@test
def route_out_of_order_results_and_unknown_result_ignored():
    with engine() as e:
        b = Conn(e, name="ooo", fns=["o::f"])
        a = Conn(e, name="oooc")
        ids = [new_id() for _ in range(3)]
        for i, iid in enumerate(ids):
            a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "o::f",
                    "data": {"i": i}})
        invs = [b.recv(is_invoke("o::f")) for _ in ids]
        eq([v["invocation_id"] for v in invs], ids, "invocations delivered in order")
        for v in reversed(invs):
            b.reply(v, result=v["data"]["i"])
        for i, iid in enumerate(ids):
            eq(a.recv(is_result(iid)).get("result"), i, "result of call %d" % i)
        # a result for an unknown id, and a duplicate result for a finished call: ignored
        b.send({"type": "invocationresult", "invocation_id": new_id(), "function_id": "o::f",
                "result": 1})
        b.probe("result for an unknown invocation id")
        b.reply(invs[0], result="again")
        b.probe("duplicate result")
        a.quiet(what=" at the caller")


@test
def route_function_not_found_exact_text_and_hint():
    with engine() as e:
        a = Conn(e, name="nf")
        r = a.call("nope", {}, traceparent=TP)
        eq(r.get("error"), {"code": "function_not_found",
                            "message": "Function nope not found in namespace default."},
           "unknown function")
        eq(r.get("function_id"), "nope", "function_id echoed")
        check("result" not in r, "result in an error frame")
        err_eq(a.err("nope", {}, namespace="zzz"), "function_not_found",
               "Function nope not found in namespace zzz.", "unknown function in namespace zzz")
        Conn(e, name="in-b", ns="b", fns=["dup::f"])
        Conn(e, name="in-a", ns="a", fns=["dup::f"])
        err_eq(a.err("dup::f", {}), "function_not_found",
               "Function dup::f not found in namespace default. It is registered in "
               "namespace(s): a, b.", "hint when the id exists elsewhere")
        err_eq(a.err("dup::f", {}, namespace="c"), "function_not_found",
               "Function dup::f not found in namespace c. It is registered in namespace(s): a, b.",
               "hint with an explicit namespace")
        Conn(e, name="in-def", fns=["dup::f"])
        err_eq(a.err("dup::f", {}, namespace="zz"), "function_not_found",
               "Function dup::f not found in namespace zz. It is registered in namespace(s): a, b, "
               "default.", "hint including default")
        # namespace null reads as absent (§11 item 10)
        r = a.call("nope", {}, namespace=None)
        eq(r.get("error"), {"code": "function_not_found",
                            "message": "Function nope not found in namespace default."},
           "namespace null")


@test
def route_blank_namespace_is_invalid_namespace():
    with engine() as e:
        b = Conn(e, name="bl", fns=["bl::f"])
        a = Conn(e, name="blc")
        for ns in ("", "   ", "\t"):
            r = a.call("bl::f", {}, namespace=ns, traceparent=TP)
            eq(r.get("error"), {"code": "INVALID_NAMESPACE", "message": INVALID_NS_MSG},
               "blank namespace %r" % ns)
            check("traceparent" not in r, "INVALID_NAMESPACE reply must carry no traceparent: %s"
                  % _show(r))
            check("result" not in r, "result in an error frame")
        # without an invocation id: dropped, nothing routed
        a.send({"type": "invokefunction", "function_id": "bl::f", "data": {}, "namespace": " "})
        a.send({"type": "invokefunction", "function_id": "bl::f", "data": {}, "namespace": "",
                "action": {"type": "void"}})
        a.probe("blank-namespace fire-and-forget")
        b.quiet(what=" at the target (blank namespace must not be routed)")


@test
def route_void_call_target_gets_fresh_id_caller_nothing():
    with engine() as e:
        b = Conn(e, name="vo", fns=["v::f"])
        a = Conn(e, name="voc")
        x = new_id()
        a.send({"type": "invokefunction", "invocation_id": x, "function_id": "v::f",
                "data": {"a": 1}, "action": {"type": "void"}})
        inv = b.recv(is_invoke("v::f"), what="void invoke at the target")
        y = inv.get("invocation_id")
        check(is_uuid(y), "target of a void call must get an invocation_id, got %s" % _show(inv))
        check(y != x, "void call: the caller's id must be ignored (target got the caller's id)")
        eq(inv.get("data"), {"a": 1, "_caller_worker_id": a.wid}, "void data")
        check("action" not in inv, "action sent to the target: %s" % _show(inv))
        b.reply(inv, result={"discarded": True})
        # void without invocation_id; void with an error reply
        a.send({"type": "invokefunction", "function_id": "v::f", "data": {},
                "action": {"type": "void"}})
        inv2 = b.recv(is_invoke("v::f"))
        check(is_uuid(inv2.get("invocation_id")) and inv2["invocation_id"] != y,
              "second void call needs its own fresh id: %s" % _show(inv2))
        b.reply(inv2, error={"code": "E", "message": "ignored"})
        # void to an unknown function: no reply at all
        a.send({"type": "invokefunction", "invocation_id": new_id(), "function_id": "nope::v",
                "data": {}, "action": {"type": "void"}})
        a.probe("void calls")
        a.quiet(what=" at a void caller")
        b.quiet()


@test
def route_null_or_absent_invocation_id_is_fire_and_forget():
    with engine() as e:
        b = Conn(e, name="ff", fns=["ff::f"])
        a = Conn(e, name="ffc")
        seen = set()
        for label, msg in (
                ("invocation_id null", {"type": "invokefunction", "invocation_id": None,
                                        "function_id": "ff::f", "data": {"k": 1}}),
                ("invocation_id absent", {"type": "invokefunction", "function_id": "ff::f",
                                          "data": {"k": 2}})):
            a.send(msg)
            inv = b.recv(is_invoke("ff::f"), what="invoke (%s)" % label)
            check(is_uuid(inv.get("invocation_id")) and inv["invocation_id"] not in seen,
                  "%s: target needs a fresh invocation_id: %s" % (label, _show(inv)))
            seen.add(inv["invocation_id"])
            b.reply(inv, result=1)
        a.send({"type": "invokefunction", "invocation_id": None, "function_id": "nope::ff",
                "data": {}})
        a.probe("fire-and-forget")
        a.quiet(what=" at a fire-and-forget caller")


@test
def route_self_invocation_and_service_and_http_ref_without_module():
    with engine() as e:
        a = Conn(e, name="selfw", fns=["self::f"])
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "self::f",
                "data": {"n": 1}})
        inv = a.recv(is_invoke("self::f"), what="invoke of its own function")
        eq(inv.get("invocation_id"), iid, "caller's id")
        eq(inv.get("data"), {"n": 1, "_caller_worker_id": a.wid}, "data")
        a.reply(inv, result="me")
        eq(a.recv(is_result(iid)).get("result"), "me", "self call result")
        # registerservice: accepted silently
        a.send({"type": "registerservice", "id": "svc", "name": "Svc", "description": "d"})
        a.probe("registerservice")
        # an HTTP-invoked function without the http module: no reply, nothing registered
        a.regfn("http::f", sync=False, invocation={"url": "http://127.0.0.1:9/x",
                                                   "method": "POST"})
        a.probe("registerfunction with an HTTP invocation ref")
        check("http::f" not in fids(a, include_internal=True),
              "HTTP-invoked function registered without the http module")
        a.quiet()


RAW_PAIRS = [
    ("big", "1e300"), ("negz", "-0"), ("prec", "9007199254740993"), ("huge", "1E400"),
    ("long", "123456789012345678901234567890"), ("tiny", "-1.50E-0310"), ("plusexp", "2e+5"),
    ("dup", "1"), ("dup", '"two"'), ("nul", r'"a\u0000b"'),
    ("esc", r'"\ud83d\ude00\u00e9\/\"\\"'), ("uni", '"h\u00e9llo \u2603 \U0001F600"'),
    ("ctl", r'"tab\tnl\ncr\r"'), ("arr", "[1.0,2.50,-0.0,1e-7,1E400]"),
    ("nested", '{"x":1E+2,"x":0.10,"y":-0}'), ("zero", "0.000"),
]


@test
def route_payload_bytes_relayed_unchanged():
    with engine() as e:
        b = Conn(e, name="raw", fns=["raw::f"])
        a = Conn(e, name="rawc")
        data = "{" + ",".join('"%s":%s' % kv for kv in RAW_PAIRS) + "}"
        meta = '{"m":1E400,"m":-0,"s":"\\u0000"}'
        iid = new_id()
        a.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"raw::f",'
                    '"data":%s,"metadata":%s}' % (iid, data, meta))
        inv, raw, _ = b.recv_full(is_invoke("raw::f"), what="invoke with exotic numbers")
        bad = []
        for k, v in RAW_PAIRS:
            frag = ('"%s":%s' % (k, v)).encode()
            if frag not in raw:
                bad.append(frag.decode())
        check(not bad, "values not relayed byte-for-byte: %s; target frame: %s"
              % (bad, raw[:700].decode("utf-8", "replace")))
        check(meta.encode() in raw, "metadata not relayed byte-for-byte: %r" % raw[:700])
        eq(inv["data"].get("_caller_worker_id"), a.wid, "_caller_worker_id still added")
        # non-object data is untouched as a whole
        arr = '[1e300,-0,9007199254740993,1E400,123456789012345678901234567890,"a\\u0000b",' \
              '"\u2603",{"d":1,"d":2}]'
        iid2 = new_id()
        a.send_text('{"type":"invokefunction","invocation_id":"%s","function_id":"raw::f",'
                    '"data":%s}' % (iid2, arr))
        inv2, raw2, _ = b.recv_full(is_invoke("raw::f"))
        check(arr.encode() in raw2, "array data not relayed byte-for-byte: %r" % raw2[:500])
        # the result direction
        res = '{"r":1E400,"s":-0,"t":"\\ud83d\\ude00","dup":1,"dup":2,"u":"\u2603","n":1.10}'
        b.send_text('{"type":"invocationresult","invocation_id":"%s","function_id":"raw::f",'
                    '"result":%s}' % (iid, res))
        r, rraw, _ = a.recv_full(is_result(iid))
        check(res.encode() in rraw, "result not relayed byte-for-byte: %r" % rraw[:500])
        res2 = "-0.0e-0"
        b.send_text('{"type":"invocationresult","invocation_id":"%s","function_id":"raw::f",'
                    '"result":%s}' % (iid2, res2))
        _, rraw2, _ = a.recv_full(is_result(iid2))
        check(b'"result":-0.0e-0' in rraw2, "number result not relayed byte-for-byte: %r" % rraw2)


# =============================================================================================
# namespaces (§1.4, §2.1, §3.1, §5.9, §10 items 11-28)

@test
def ns_registration_buffered_until_announce():
    with engine() as e:
        obs = Conn(e, name="obs")
        c = Conn(e, name="ordw", announce=False)
        c.regfn("ord::f", description="orders fn")
        # DECISIONS.md item 10: a call behind the connection's own buffered registrations waits
        # in that queue and runs after them, in the namespace the announce settles
        lid = new_id()
        c.send({"type": "invokefunction", "invocation_id": lid,
                "function_id": "engine::functions::list", "data": {}})
        check(frow(obs, "ord::f", "orders") is None and frow(obs, "ord::f") is None,
              "a registration before engine::workers::register must be buffered")
        c.quiet(0.3, " (a call behind buffered registrations must wait for the announce)")
        c.announce(ns="orders")
        mine = c.recv(is_result(lid), what="the queued call's result").get("result") or {}
        check(any(f.get("function_id") == "ord::f" and f.get("namespace") == "orders"
                  for f in mine.get("functions", [])),
              "the queued call must see its own registration (read-your-own-writes)")
        row = wait_until(lambda: frow(obs, "ord::f", "orders"), what="ord::f in orders",
                         show=lambda: flist(obs))
        eq(row.get("worker_name"), "ordw", "worker_name of the buffered function")
        check(frow(obs, "ord::f") is None, "ord::f must not be in default")
        err_eq(obs.err("ord::f", {}), "function_not_found",
               "Function ord::f not found in namespace default. It is registered in "
               "namespace(s): orders.", "invoke without namespace")
        iid = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "ord::f",
                  "data": {"q": 1}, "namespace": "orders"})
        inv = c.recv(is_invoke("ord::f"), what="invoke in orders")
        check("namespace" not in inv, "namespace must not be sent to the target")
        c.reply(inv, result="from-orders")
        eq(obs.recv(is_result(iid)).get("result"), "from-orders", "result")
        # registrations after the resolution apply directly, in the fixed namespace
        c.regfn("ord::g")
        check(frow(obs, "ord::g", "orders"), "post-resolution registerfunction not in orders")
        rows = [w for w in wlist(obs) if w["id"] == c.wid]
        eq([w.get("namespace") for w in rows], ["orders"], "namespace in engine::workers::list")


@test
def ns_grace_expiry_lands_in_default():
    with engine(grace_ms=400) as e:
        obs = Conn(e, name="gobs")
        t0 = time.time()
        c = Conn(e, name="gw", announce=False)
        c.regfn("g::f")
        check(frow(obs, "g::f") is None, "registration applied before the grace period ended")
        wait_until(lambda: frow(obs, "g::f"), timeout=3.0, what="g::f in default after the grace")
        dt = time.time() - t0
        check(dt >= 0.3, "function appeared after %.2fs, before the 400 ms grace period" % dt)
        # first resolution wins: a late announce with another namespace moves nothing
        c.announce(ns="late", pid=True)
        c.sync()
        check(frow(obs, "g::f") is not None and frow(obs, "g::f", "late") is None,
              "late announce must not move g::f: %s" % _show(flist(obs)))
        c.regfn("g::h")
        check(frow(obs, "g::h") is not None, "registration after resolution must apply directly "
              "in default: %s" % _show(flist(obs)))
        rows = [w for w in wlist(obs) if w["id"] == c.wid]
        eq([(w.get("name"), w.get("namespace")) for w in rows], [("gw", "default")],
           "late announce is stored under the fixed namespace")


@test
def ns_buffer_drains_in_order():
    with engine() as e:
        obs = Conn(e, name="dobs")
        p = Conn(e, name="dprov")
        p.regtype("dt")
        c = Conn(e, name="dw", announce=False)
        c.regfn("do::a", sync=False)
        c.regfn("do::b", sync=False)
        c.unregfn("do::a", sync=False)
        c.regtrig("dtr", "dt", "do::b", sync=False)
        c.unregtrig("dtr", sync=False)
        c.sync()
        c.announce(ns="dns")
        wait_until(lambda: frow(obs, "do::b", "dns"), what="do::b in dns")
        eq(sorted((f["function_id"], f["namespace"]) for f in flist(obs)
                  if f["function_id"].startswith("do::")), [("do::b", "dns")],
           "functions after register A, register B, unregister A")
        check("dtr" not in rtids(obs), "buffered register+unregister left a live binding")
        eq(obs.ok("engine::unregister_trigger", {"id": "dtr"}), {"removed": False},
           "buffered register+unregister must leave no pending binding either")


@test
def ns_function_conflict_refused_connection_stays_open():
    with engine() as e:
        w1 = Conn(e, name="inc")
        w1.regfn("c::f", description="first")
        w2 = Conn(e, name="chal")
        w2.regfn("c::f", description="second", sync=False)
        rej = w2.recv(is_type("registrationrejected"), what="registrationrejected")
        eq(rej, {"type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT",
                 "namespace": "default", "function_id": "c::f", "owner_worker_id": w1.wid},
           "FUNCTION_NAMESPACE_CONFLICT frame")
        w2.sync()
        w2.unregfn("c::f")  # not the owner: nothing happens
        w2.regfn("c::g")
        w1.regfn("c::f", description="first")  # idempotent re-register by the owner
        w1.quiet(what=" at the owner after its own re-register")
        obs = Conn(e, name="cobs")
        eq(frow(obs, "c::f").get("description"), "first", "incumbent description kept")
        iid = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "c::f",
                  "data": {}})
        w1.serve("c::f", result="w1")
        eq(obs.recv(is_result(iid)).get("result"), "w1", "call reaches the incumbent")
        iid = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "c::g",
                  "data": {}})
        w2.serve("c::g", result="w2")
        eq(obs.recv(is_result(iid)).get("result"), "w2", "refused worker keeps serving others")
        w1.close()
        wait_until(lambda: frow(obs, "c::f") is None, what="c::f gone after the owner left")
        err_eq(obs.err("c::f", {}), "function_not_found",
               "Function c::f not found in namespace default.", "refused worker not promoted")
        w2.quiet()


@test
def ns_engine_prefix_refused_outside_default():
    with engine() as e:
        x = Conn(e, name="xw", ns="xns")
        x.regfn("engine::mine", sync=False)
        rej = x.recv(is_type("registrationrejected"))
        eq(rej, {"type": "registrationrejected", "code": "FUNCTION_NAMESPACE_CONFLICT",
                 "namespace": "xns", "function_id": "engine::mine", "owner_worker_id": ""},
           "reserved prefix refusal")
        x.sync()
        obs = Conn(e, name="pobs")
        check("engine::mine" not in fids(obs, include_internal=True), "engine::mine registered")
        y = Conn(e, name="yw")
        y.regfn("engine::mine2")
        y.quiet(what=" (engine:: ids are allowed in default)")
        check("engine::mine2" in fids(obs, include_internal=True), "engine::mine2 not registered")
        check("engine::mine2" not in fids(obs), "engine::mine2 must be hidden by default")
        iid = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "engine::mine2",
                  "data": {}})
        y.serve("engine::mine2", result="y")
        eq(obs.recv(is_result(iid)).get("result"), "y", "engine::mine2 routed to its worker")


@test
def ns_worker_name_conflict_closes_loser():
    with engine() as e:
        w1 = Conn(e, name="dn")
        w2 = Conn(e, name="dn", announce=False)
        w2.regfn("dn::x", sync=False)
        w2.announce(sync=False)
        rej = w2.recv(is_type("registrationrejected"), what="WORKER_NAMESPACE_CONFLICT")
        eq(rej, {"type": "registrationrejected", "code": "WORKER_NAMESPACE_CONFLICT",
                 "namespace": "default", "worker_name": "dn", "owner_worker_id": w1.wid},
           "WORKER_NAMESPACE_CONFLICT frame")
        how = w2.closed_within(WAIT)
        check(how is not None, "the loser's connection was not closed")
        w1.sync()
        obs = Conn(e, name="dnobs")
        check(frow(obs, "dn::x") is None, "the loser's buffered registrations were applied")
        eq([w["id"] for w in wlist(obs) if w.get("name") == "dn"], [w1.wid],
           "workers named dn")


@test
def ns_same_name_other_namespace_and_reclaim():
    with engine() as e:
        w1 = Conn(e, name="sn")
        w2 = Conn(e, name="sn", ns="o2")
        w2.quiet(what=" (same name, different namespace must be accepted)")
        check(w2.closed_within(0.05) is None, "w2 closed")
        w1.sync()
        obs = Conn(e, name="snobs")
        eq(sorted((w["namespace"], w["id"]) for w in wlist(obs) if w.get("name") == "sn"),
           sorted([("default", w1.wid), ("o2", w2.wid)]), "both workers listed")
        # a name can be claimed again once its owner is gone
        w1.close()
        wait_until(lambda: all(w["id"] != w1.wid for w in wlist(obs)), what="w1 reaped")
        w3 = Conn(e, name="sn")
        w3.quiet(what=" (name must be claimable after the owner left)")
        eq(sorted(w["id"] for w in wlist(obs) if w.get("name") == "sn"
                  and w.get("namespace") == "default"), [w3.wid], "new owner of sn")


@test
def ns_same_function_id_in_two_namespaces():
    with engine() as e:
        w1 = Conn(e, name="s1", ns="n1", fns=["s::f"])
        w2 = Conn(e, name="s2", ns="n2", fns=["s::f"])
        w1.quiet()
        w2.quiet()
        obs = Conn(e, name="sobs")
        eq(sorted((f["namespace"], f["worker_name"]) for f in flist(obs)
                  if f["function_id"] == "s::f"), [("n1", "s1"), ("n2", "s2")], "rows of s::f")
        for ns, w, tag in (("n1", w1, "one"), ("n2", w2, "two")):
            iid = new_id()
            obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "s::f",
                      "data": {}, "namespace": ns})
            w.serve("s::f", result=tag)
            eq(obs.recv(is_result(iid)).get("result"), tag, "call in %s" % ns)
        w1.close()
        wait_until(lambda: frow(obs, "s::f", "n1") is None, what="n1 row gone")
        check(frow(obs, "s::f", "n2") is not None, "dropping n1's owner removed n2's entry")


@test
def ns_invoke_without_namespace_resolves_in_default():
    with engine() as e:
        d = Conn(e, name="an-def", fns=["an::f"])
        n = Conn(e, name="an-ns", ns="analytics", fns=["an::f"])
        c = Conn(e, name="an-caller", ns="analytics")
        iid = new_id()
        c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "an::f",
                "data": {}})
        d.serve("an::f", result="default")
        eq(c.recv(is_result(iid)).get("result"), "default", "no namespace -> default")
        n.quiet(what=" at the analytics owner")
        iid = new_id()
        c.send({"type": "invokefunction", "invocation_id": iid, "function_id": "an::f",
                "data": {}, "namespace": "analytics"})
        n.serve("an::f", result="analytics")
        eq(c.recv(is_result(iid)).get("result"), "analytics", "explicit namespace")
        d.quiet()
        # an analytics-only id is not found from an analytics caller without namespace
        n.regfn("an::only")
        err_eq(c.err("an::only", {}), "function_not_found",
               "Function an::only not found in namespace default. It is registered in "
               "namespace(s): analytics.", "no fallback to the caller's namespace")


@test
def register_sync_reply_and_blank_namespace():
    with engine() as e:
        c = Conn(e, name="syncw", announce=False)
        res = c.ok("engine::workers::register",
                   {"runtime": "python", "name": "syncw", "pid": os.getpid(), "namespace": "first"})
        eq(res, {"success": True}, "result of a synchronous engine::workers::register")
        res = c.ok("engine::workers::register", {"name": "syncw", "pid": os.getpid(),
                                                 "namespace": "second"})
        eq(res, {"success": True}, "re-register by the same connection")
        rows = [w for w in wlist(c) if w["id"] == c.wid]
        eq([(w["name"], w["namespace"]) for w in rows], [("syncw", "first")],
           "second announce must not move the worker")
        b = Conn(e, name="bn", announce=False)
        er = b.err("engine::workers::register", {"name": "bn", "pid": os.getpid(),
                                                 "namespace": "  "})
        err_eq(er, "INVALID_NAMESPACE",
               "namespace is empty: worker 'bn' declared \"  \". Give it a name, or omit the "
               "field to register in 'default'.", "blank namespace on register")
        check(all(w["id"] != b.wid for w in wlist(c)), "worker with a blank namespace is listed")
        # runtime missing -> "unknown"
        r = Conn(e, name="rtless", announce=False)
        r.announce(runtime=None)
        rows = [w for w in wlist(c) if w["id"] == r.wid]
        eq([w.get("runtime") for w in rows], ["unknown"], "runtime default")


@test
def register_name_sanitized():
    with engine() as e:
        obs = Conn(e, name="sanobs")
        a = Conn(e, name="  na\u0007me\u202e\u2028x  ")
        b = Conn(e, name="y" * 300)
        c = Conn(e, name="   ")
        rows = {w["id"]: w for w in wlist(obs)}
        eq(rows.get(a.wid, {}).get("name"), "namex", "control/bidi/line-separator chars dropped")
        eq(rows.get(b.wid, {}).get("name"), "y" * 280, "name cut to 280 characters")
        check(c.wid in rows and rows[c.wid].get("name") is None,
              "a blank name must become null: %s" % _show(rows.get(c.wid)))
        d = Conn(e, name="   ")
        d.quiet(what=" (a null name takes no lease)")


# =============================================================================================
# §1.7 reattach

@test
def reattach_with_token_evicts_old_connection():
    with engine() as e:
        old = Conn(e, name="ra", fns=["ra::f"])
        obs = Conn(e, name="raobs")
        new = Conn(e, name="ra", announce=False)
        new.send({"type": "reattach", "previous_worker_id": old.wid,
                  "reattach_token": old.token})
        new.probe("reattach (no reply frame expected)")
        check(old.closed_within(3.0) is not None, "the evicted connection was not closed")
        check(frow(obs, "ra::f") is None, "evicted worker's function still registered")
        check(all(w["id"] != old.wid for w in wlist(obs)), "evicted worker still listed")
        new.announce()
        new.regfn("ra::f")
        new.quiet(what=" (same name and function id must be free after reattach)")
        eq(new.wid != old.wid, True, "new connection keeps its own id")
        iid = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid, "function_id": "ra::f",
                  "data": {}})
        new.serve("ra::f", result="new")
        eq(obs.recv(is_result(iid)).get("result"), "new", "call reaches the new connection")


@test
def reattach_invalid_is_noop():
    with engine() as e:
        old = Conn(e, name="rb", fns=["rb::f"])
        new = Conn(e, name="rb-new")
        cases = [
            ("wrong token", {"previous_worker_id": old.wid, "reattach_token": new_id()}),
            ("missing token", {"previous_worker_id": old.wid}),
            ("null token", {"previous_worker_id": old.wid, "reattach_token": None}),
            ("token = worker id", {"previous_worker_id": old.wid, "reattach_token": old.wid}),
            ("other connection's token", {"previous_worker_id": old.wid,
                                          "reattach_token": new.token}),
            ("own id", {"previous_worker_id": new.wid, "reattach_token": new.token}),
            ("garbage id", {"previous_worker_id": "garbage", "reattach_token": old.token}),
            ("unknown id", {"previous_worker_id": new_id(), "reattach_token": old.token}),
            ("garbage token", {"previous_worker_id": old.wid, "reattach_token": "garbage"}),
        ]
        for label, body in cases:
            m = {"type": "reattach"}
            m.update(body)
            new.send(m)
            new.probe("reattach with " + label)
        old.sync()
        check(old.closed_within(0.1) is None, "old connection was closed by an invalid reattach")
        check(frow(new, "rb::f") is not None, "old connection's function removed")
        check(any(w["id"] == old.wid for w in wlist(new)), "old connection no longer listed")
        # the old connection still holds the name lease
        w3 = Conn(e, name="rb", announce=False)
        w3.announce(sync=False)
        rej = w3.recv(is_type("registrationrejected"))
        eq(rej.get("owner_worker_id"), old.wid, "name lease still held by the old connection")


# =============================================================================================
# §7 disconnect cleanup

@test
def disconnect_target_stops_invocation():
    with engine() as e:
        b = Conn(e, name="dct", fns=["dc::f", "dc::g"])
        a = Conn(e, name="dcc")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "dc::f",
                "data": {}})
        b.recv(is_invoke("dc::f"))
        # a void call in flight too: its caller must get nothing
        a.send({"type": "invokefunction", "function_id": "dc::g", "data": {},
                "action": {"type": "void"}})
        b.recv(is_invoke("dc::g"))
        t0 = time.time()
        b.ws.sock.close()  # abrupt: no Close frame
        r = a.recv(is_result(iid), timeout=1.0, what="invocation_stopped within 1 s")
        eq(r.get("error"), STOPPED, "error after the target disconnected (%.2fs)"
           % (time.time() - t0))
        eq(r.get("function_id"), "dc::f", "function_id")
        check("result" not in r, "result key in an invocation_stopped frame")
        wait_until(lambda: not [f for f in fids(a) if f.startswith("dc::")], timeout=1.0,
                   what="dc:: functions gone", show=lambda: fids(a))
        a.quiet(what=" (void caller must get nothing)")


@test
def disconnect_caller_then_late_result_dropped():
    with engine() as e:
        b = Conn(e, name="lr", fns=["lr::f"])
        a = Conn(e, name="lrc")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "lr::f",
                "data": {}})
        inv = b.recv(is_invoke("lr::f"))
        a.close()
        obs = Conn(e, name="lrobs")
        wait_until(lambda: all(w["id"] != a.wid for w in wlist(obs)), what="caller reaped")
        b.reply(inv, result="late")
        b.probe("late result for a gone caller")
        b.reply(inv, result="later")
        b.probe("second late result")
        iid2 = new_id()
        obs.send({"type": "invokefunction", "invocation_id": iid2, "function_id": "lr::f",
                  "data": {}})
        b.serve("lr::f", result="fine")
        eq(obs.recv(is_result(iid2)).get("result"), "fine", "engine still routes")


@test
def inflight_counts_in_workers_list():
    with engine() as e:
        b = Conn(e, name="ift", fns=["if::f"])
        a = Conn(e, name="ifc")
        obs = Conn(e, name="ifobs")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "if::f",
                "data": {}})
        inv = b.recv(is_invoke("if::f"))
        rows = {w["id"]: w for w in wlist(obs)}
        eq(rows[a.wid].get("active_invocations"), 1, "caller's active_invocations during a call")
        eq(rows[b.wid].get("active_invocations"), 1, "target's active_invocations during a call")
        b.reply(inv, result=1)
        a.recv(is_result(iid))
        rows = {w["id"]: w for w in wlist(obs)}
        eq((rows[a.wid].get("active_invocations"), rows[b.wid].get("active_invocations")), (0, 0),
           "active_invocations after the call")


# =============================================================================================
# §4 triggers

def _is_regtrig(tid):
    return lambda m: m.get("type") == "registertrigger" and m.get("id") == tid


def _is_unregtrig(tid):
    return lambda m: m.get("type") == "unregistertrigger" and m.get("id") == tid


@test
def trigger_registration_forwarded_to_provider():
    with engine() as e:
        p = Conn(e, name="prov")
        p.regtype("tt", description="test type")
        o = Conn(e, name="own")
        o.regtrig("t1", "tt", "o::h", {"x": 1})
        eq(p.recv(_is_regtrig("t1"), what="registertrigger t1 at the provider"),
           {"type": "registertrigger", "id": "t1", "trigger_type": "tt", "function_id": "o::h",
            "config": {"x": 1}}, "frame to the provider (default namespaces omitted)")
        o.regtrig("t2", "tt", "o::h", {"y": [1]}, metadata={"team": "x"})
        eq(p.recv(_is_regtrig("t2")),
           {"type": "registertrigger", "id": "t2", "trigger_type": "tt", "function_id": "o::h",
            "config": {"y": [1]}, "metadata": {"team": "x"}}, "frame with metadata")
        o.regtrig("t3", "tt", "o::h", {}, namespace="orders")
        eq(p.recv(_is_regtrig("t3")),
           {"type": "registertrigger", "id": "t3", "trigger_type": "tt", "function_id": "o::h",
            "config": {}, "namespace": "orders"}, "frame for a target in orders")
        o.quiet(what=" at the owner (no ack for registertrigger)")
        rows = {r["id"]: r for r in rtlist(o)}
        check({"t1", "t2", "t3"} <= set(rows), "bindings not listed: %s" % _show(list(rows)))
        r1 = rows["t1"]
        eq((r1.get("trigger_type"), r1.get("function_id"), r1.get("config"),
            r1.get("config_summary")), ("tt", "o::h", {"x": 1}, '{"x":1}'), "t1 row")
        # provider in namespace pns: strict trigger_namespace, and home-namespace resolution
        p2 = Conn(e, name="prov-ns", ns="pns")
        p2.regtype("tns")
        o.regtrig("t4", "tns", "o::h", {}, trigger_namespace="pns")
        eq(p2.recv(_is_regtrig("t4")),
           {"type": "registertrigger", "id": "t4", "trigger_type": "tns", "function_id": "o::h",
            "config": {}, "trigger_namespace": "pns"}, "frame with trigger_namespace")
        o.regtrig("t5", "tns", "o::h", {})  # home default has no `tns` -> parked
        o3 = Conn(e, name="own-ns", ns="pns")
        o3.regtrig("t6", "tns", "o::h", {})
        eq(p2.recv(_is_regtrig("t6")),
           {"type": "registertrigger", "id": "t6", "trigger_type": "tns", "function_id": "o::h",
            "config": {}, "trigger_namespace": "pns"}, "home-namespace provider")
        p2.quiet(what=" (t5 must be parked: no default provider of tns)")
        check("t5" not in rtids(o), "t5 must be parked, not listed")
        p.quiet()


@test
def trigger_blank_namespace_rejected():
    with engine() as e:
        p = Conn(e, name="bprov")
        p.regtype("bt")
        o = Conn(e, name="bown")
        o.regtrig("tb1", "bt", "o::h", {}, namespace=" ", sync=False)
        r = o.recv(is_type("triggerregistrationresult"))
        eq({k: r.get(k) for k in ("id", "trigger_type", "function_id")},
           {"id": "tb1", "trigger_type": "bt", "function_id": "o::h"}, "identity fields")
        eq(r.get("error", {}).get("code"), "INVALID_NAMESPACE", "error code")
        check(str(r["error"].get("message", "")).startswith("`namespace` is empty"),
              "message must name the field: %r" % r["error"].get("message"))
        o.regtrig("tb2", "bt", "o::h", {}, trigger_namespace="", sync=False)
        r = o.recv(is_type("triggerregistrationresult"))
        eq(r.get("error", {}).get("code"), "INVALID_NAMESPACE", "error code (trigger_namespace)")
        check(str(r["error"].get("message", "")).startswith("`trigger_namespace` is empty"),
              "message must name trigger_namespace: %r" % r["error"].get("message"))
        p.quiet(what=" at the provider (blank namespace must not be forwarded)")
        check(not {"tb1", "tb2"} & set(rtids(o)), "blank-namespace bindings listed")
        # blank namespace on a trigger type: nothing registered
        p.regtype("blankty", namespace="  ")
        check(all(t["id"] != "blankty" for t in o.ok("engine::triggers::list", {})["triggers"]),
              "trigger type with a blank namespace was registered")


@test
def trigger_parked_until_type_registered():
    with engine() as e:
        o = Conn(e, name="pown")
        o.regtrig("pk1", "tp", "o::h", {"a": [1, 2]}, metadata={"m": True})
        o.quiet(what=" (parking is not an error: no frame)")
        check("pk1" not in rtids(o), "parked binding must not be listed")
        o.regtrig("pk2", "tp", "o::h", {})
        o.unregtrig("pk2")  # unregistering a parked id drops it for good
        p = Conn(e, name="pprov")
        p.regtype("tp")
        eq(p.recv(_is_regtrig("pk1"), what="replay of the parked binding"),
           {"type": "registertrigger", "id": "pk1", "trigger_type": "tp", "function_id": "o::h",
            "config": {"a": [1, 2]}, "metadata": {"m": True}}, "replayed frame")
        p.quiet(what=" (pk2 was unregistered while parked)")
        eq([i for i in rtids(o) if i.startswith("pk")], ["pk1"], "live bindings after replay")
        o.quiet()


@test
def trigger_provider_error_forwarded_and_binding_parked():
    with engine() as e:
        p = Conn(e, name="eprov")
        p.regtype("tt")
        o = Conn(e, name="eown")
        o.regtrig("te1", "tt", "o::h", {"c": 1})
        p.recv(_is_regtrig("te1"))
        er = {"code": "trigger_registration_failed", "message": "bad config", "stacktrace": "st"}
        p.send({"type": "triggerregistrationresult", "id": "te1", "trigger_type": "tt",
                "function_id": "spoofed::fn", "error": er})
        fw = o.recv(is_type("triggerregistrationresult"), what="forwarded provider error")
        eq(fw, {"type": "triggerregistrationresult", "id": "te1", "trigger_type": "tt",
                "function_id": "o::h", "error": er}, "forwarded frame (stored type/function)")
        p.sync()
        check("te1" not in rtids(o), "binding must be parked after the provider's error")
        # retried when the type registers again
        p.regtype("tt")
        eq(p.recv(_is_regtrig("te1"), what="replay after re-registering the type"),
           {"type": "registertrigger", "id": "te1", "trigger_type": "tt", "function_id": "o::h",
            "config": {"c": 1}}, "replayed frame")
        check("te1" in rtids(o), "binding live again after the replay")
        o.quiet()


@test
def trigger_result_from_non_provider_or_success_is_ignored():
    with engine() as e:
        p = Conn(e, name="sprov")
        p.regtype("tt")
        o = Conn(e, name="sown")
        o.regtrig("ts1", "tt", "o::h", {})
        p.recv(_is_regtrig("ts1"))
        x = Conn(e, name="spoofer")
        x.send({"type": "triggerregistrationresult", "id": "ts1", "trigger_type": "tt",
                "function_id": "o::h", "error": {"code": "trigger_registration_failed",
                                                 "message": "spoof"}})
        x.probe("result from a non-provider")
        p.send({"type": "triggerregistrationresult", "id": "ts1", "trigger_type": "tt",
                "function_id": "o::h"})
        p.probe("success result from the provider")
        p.send({"type": "triggerregistrationresult", "id": "unknown-id", "trigger_type": "tt",
                "function_id": "o::h", "error": {"code": "x", "message": "y"}})
        p.probe("result for an unknown id")
        o.quiet(what=" at the owner")
        check("ts1" in rtids(o), "binding removed by an ignored result")


@test
def trigger_unregister_notifies_provider():
    with engine() as e:
        p = Conn(e, name="uprov")
        p.regtype("tt")
        o = Conn(e, name="uown")
        o.regtrig("u1", "tt", "o::h", {})
        o.regtrig("u2", "tt", "o::h", {})
        p.recv(_is_regtrig("u1"))
        p.recv(_is_regtrig("u2"))
        o.unregtrig("u1")  # without trigger_type
        eq(p.recv(_is_unregtrig("u1"), what="unregistertrigger at the provider"),
           {"type": "unregistertrigger", "id": "u1", "trigger_type": "tt"},
           "unregistertrigger frame")
        check("u1" not in rtids(o), "u1 still listed")
        x = Conn(e, name="uother")  # no ownership check
        x.unregtrig("u2", "wrong-type-is-ignored")
        eq(p.recv(_is_unregtrig("u2")), {"type": "unregistertrigger", "id": "u2",
                                         "trigger_type": "tt"}, "unregister by another worker")
        x.unregtrig("never-existed")
        p.quiet()
        o.quiet()
        x.quiet()


@test
def trigger_owner_disconnect_unregisters_and_drops_parked():
    with engine() as e:
        p = Conn(e, name="odprov")
        p.regtype("tt")
        o = Conn(e, name="odown")
        o.regtrig("od1", "tt", "o::h", {})
        o.regtrig("od-parked", "later", "o::h", {})
        p.recv(_is_regtrig("od1"))
        o.close()
        eq(p.recv(_is_unregtrig("od1"), what="unregistertrigger after the owner left"),
           {"type": "unregistertrigger", "id": "od1", "trigger_type": "tt"}, "frame")
        obs = Conn(e, name="odobs")
        check("od1" not in rtids(obs), "binding still listed")
        wait_until(lambda: all(w["id"] != o.wid for w in wlist(obs)), what="owner reaped")
        p.regtype("later")
        p.quiet(what=" (the gone owner's parked binding must be dropped)")


@test
def trigger_provider_disconnect_parks_and_new_provider_gets_replay():
    with engine() as e:
        p = Conn(e, name="pdprov")
        p.regtype("tt")
        o = Conn(e, name="pdown")
        o.regtrig("pd1", "tt", "o::h", {"z": 1})
        p.recv(_is_regtrig("pd1"))
        p.close()
        wait_until(lambda: "pd1" not in rtids(o), what="binding parked after provider left")
        check(all(t["id"] != "tt" for t in o.ok("engine::triggers::list", {})["triggers"]),
              "trigger type still listed after its provider left")
        p2 = Conn(e, name="pdprov2")
        p2.regtype("tt")
        eq(p2.recv(_is_regtrig("pd1"), what="replay to the new provider"),
           {"type": "registertrigger", "id": "pd1", "trigger_type": "tt", "function_id": "o::h",
            "config": {"z": 1}}, "replayed frame")
        check("pd1" in rtids(o), "binding live again")
        o.quiet()


@test
def trigger_type_reregistration_replaces_provider():
    with engine() as e:
        p1 = Conn(e, name="rp1")
        p1.regtype("tt")
        o = Conn(e, name="rpown")
        o.regtrig("rp1", "tt", "o::h", {})
        p1.recv(_is_regtrig("rp1"))
        p2 = Conn(e, name="rp2")
        p2.regtype("tt")
        eq(p2.recv(_is_regtrig("rp1"), what="replay to the replacing provider"),
           {"type": "registertrigger", "id": "rp1", "trigger_type": "tt", "function_id": "o::h",
            "config": {}}, "replayed frame")
        rows = [t for t in o.ok("engine::triggers::list", {})["triggers"] if t["id"] == "tt"]
        eq([t.get("worker_name") for t in rows], ["rp2"], "provider after replacement")
        p1.close()
        wait_until(lambda: all(w["id"] != p1.wid for w in wlist(o)), what="old provider reaped")
        check("rp1" in rtids(o), "binding lost when the replaced provider left")
        p2.quiet(what=" (the replaced provider leaving must not touch the binding)")
        info = o.ok("engine::registered-triggers::info", {"id": "rp1"})
        eq((info.get("trigger") or {}).get("worker_name"), "rp2", "info.trigger.worker_name")


@test
def trigger_fallback_rehoming_and_target_owner_disconnect():
    with engine() as e:
        pd = Conn(e, name="fb-def")
        pd.regtype("fb")
        pn = Conn(e, name="fb-ns", ns="h")
        pn.regtype("fb")
        o = Conn(e, name="fb-own", ns="h")
        o.regtrig("fb1", "fb", "f::x", {})
        eq(pn.recv(_is_regtrig("fb1"), what="home-namespace provider first"),
           {"type": "registertrigger", "id": "fb1", "trigger_type": "fb", "function_id": "f::x",
            "config": {}, "trigger_namespace": "h"}, "frame to the home provider")
        pd.quiet(what=" at the default provider")
        pn.close()  # fallback to the default provider, binding stays live
        eq(pd.recv(_is_regtrig("fb1"), what="replay to the default provider"),
           {"type": "registertrigger", "id": "fb1", "trigger_type": "fb", "function_id": "f::x",
            "config": {}}, "fallback frame")
        check("fb1" in rtids(o), "binding must stay live on fallback")
        # re-homing: a provider appearing in the home namespace takes the binding back
        pn2 = Conn(e, name="fb-ns2", ns="h")
        pn2.regtype("fb")
        eq(pn2.recv(_is_regtrig("fb1"), what="re-homed registertrigger"),
           {"type": "registertrigger", "id": "fb1", "trigger_type": "fb", "function_id": "f::x",
            "config": {}, "trigger_namespace": "h"}, "re-homed frame")
        eq(pd.recv(_is_unregtrig("fb1"), what="unregistertrigger to the old provider"),
           {"type": "unregistertrigger", "id": "fb1", "trigger_type": "fb"}, "re-homing unregister")
        # an explicit trigger_namespace is never re-homed or fallen back
        o.regtrig("fb2", "fb", "f::x", {}, trigger_namespace="default")
        pd.recv(_is_regtrig("fb2"))
        pn2.quiet(what=" (explicit trigger_namespace default must not go to the h provider)")
        # the target function's owner leaving does not touch bindings (§4.5)
        f = Conn(e, name="fb-target", ns="h", fns=["f::x"])
        f.close()
        wait_until(lambda: all(w["id"] != f.wid for w in wlist(o)), what="target reaped")
        eq(sorted(i for i in rtids(o) if i.startswith("fb")), ["fb1", "fb2"],
           "bindings after the target's owner left")


# =============================================================================================
# §5 engine::* functions

@test
def engine_functions_list_filters_and_order():
    with engine() as e:
        w1 = Conn(e, name="calcw")
        w1.regfn("calc::add", description="Adds", metadata={"team": "x"}, sync=False)
        for f in ("x::calc", "y::calculator", "engine::queue::custom"):
            w1.regfn(f, sync=False)
        w1.regfn("aaa::z", description="uses CALC inside", sync=False)
        w1.regfn("hid::den", metadata={"internal": True})
        w2 = Conn(e, name="otherw", fns=["zeta::f", "b::one"])
        Conn(e, name="nsw", ns="nsx", fns=["calc::add"])
        c = Conn(e, name="flobs")
        rows = flist(c)
        ids = [r["function_id"] for r in rows]
        eq(ids, sorted(ids), "default listing sorted by function_id")
        eq(sorted(ids), sorted(["aaa::z", "b::one", "calc::add", "calc::add",
                                "engine::queue::custom", "x::calc", "y::calculator", "zeta::f"]),
           "default listing (engine::* and metadata.internal hidden, engine::queue::* shown)")
        r = [x for x in rows if x["function_id"] == "calc::add" and x["namespace"] == "default"]
        eq(len(r), 1, "calc::add rows in default")
        eq({k: r[0].get(k) for k in ("function_id", "namespace", "worker_name", "description",
                                     "metadata")},
           {"function_id": "calc::add", "namespace": "default", "worker_name": "calcw",
            "description": "Adds", "metadata": {"team": "x"}}, "calc::add row")
        r = [x for x in rows if x["function_id"] == "calc::add" and x["namespace"] == "nsx"]
        eq([x.get("worker_name") for x in r], ["nsw"], "calc::add row in nsx")
        check(r[0].get("description") is None, "description of an undescribed function")
        internal = fids(c, include_internal=True)
        for f in ("engine::functions::list", "engine::functions::info", "engine::workers::list",
                  "engine::workers::info", "engine::workers::register", "engine::triggers::list",
                  "engine::triggers::info", "engine::registered-triggers::list",
                  "engine::registered-triggers::info", "engine::register_trigger",
                  "engine::unregister_trigger", "engine::channels::create", "engine::log::info",
                  "hid::den"):
            check(f in internal, "%s missing with include_internal" % f)
        eq(internal, sorted(internal), "include_internal listing sorted")
        eq(fids(c, prefix="calc::"), ["calc::add", "calc::add"], "prefix filter")
        want = ["calc::add", "calc::add", "x::calc", "y::calculator", "aaa::z"]
        eq(fids(c, search="calc"), want, "search ranked (prefix/segment, contains, description)")
        eq(fids(c, search="CALC"), want, "search is case-insensitive")
        eq(fids(c, worker="otherw"), ["b::one", "zeta::f"], "worker filter")
        eq(fids(c, workers=["otherw", "nsw"]), ["b::one", "calc::add", "zeta::f"], "workers filter")
        eq(fids(c, worker="otherw", workers=["nsw"]), ["b::one", "calc::add", "zeta::f"],
           "worker OR workers")
        eq(fids(c, worker="nobody"), [], "unknown worker")
        w2.quiet()


@test
def engine_functions_info_single_batch_errors():
    with engine() as e:
        w = Conn(e, name="fiw")
        w.regfn("fi::a", description="A", request_format={"type": "object"},
                response_format={"type": "number"}, metadata={"k": 1})
        w.regfn("fi::b")
        w.regtype("fit")
        w.regtrig("fib", "fit", "fi::a", {"c": 1})
        w.recv(_is_regtrig("fib"))
        Conn(e, name="amba", ns="a", fns=["amb::f", "one::f"])
        Conn(e, name="ambb", ns="b", fns=["amb::f"])
        c = Conn(e, name="fiobs")
        d = c.ok("engine::functions::info", {"function_id": "fi::a"})
        eq({k: d.get(k) for k in ("function_id", "namespace", "worker_name", "description",
                                  "request_schema", "response_schema", "metadata",
                                  "registered_triggers")},
           {"function_id": "fi::a", "namespace": "default", "worker_name": "fiw",
            "description": "A", "request_schema": {"type": "object"},
            "response_schema": {"type": "number"}, "metadata": {"k": 1},
            "registered_triggers": [{"id": "fib", "trigger_type": "fit", "config": {"c": 1}}]},
           "single FunctionDetail")
        b = c.ok("engine::functions::info",
                 {"function_ids": ["fi::a", "missing::x", "fi::b", "fi::a"]})
        fs = b.get("functions")
        eq([(x.get("function_id"), x.get("error")) for x in fs],
           [("fi::a", None), ("missing::x", "not_found"), ("fi::b", None)],
           "batch (de-duplicated, in order)")
        eq(fs[1], {"function_id": "missing::x", "error": "not_found"}, "not_found marker")
        eq(fs[2].get("registered_triggers"), [], "fi::b has no triggers")
        err_eq(c.err("engine::functions::info", {"function_id": "fi::a", "function_ids": ["fi::b"]}),
               "INVALID_ARGUMENTS", "pass either `function_id` or `function_ids`, not both", "both")
        err_eq(c.err("engine::functions::info", {}), "INVALID_ARGUMENTS",
               "missing field `function_id` (or `function_ids` for a batch)", "neither")
        err_eq(c.err("engine::functions::info", {"function_ids": []}), "INVALID_ARGUMENTS",
               "`function_ids` must be a non-empty array of function ids", "empty batch")
        err_eq(c.err("engine::functions::info",
                     {"function_ids": ["f%d::x" % i for i in range(33)]}),
               "INVALID_ARGUMENTS", "too many function_ids (max 32)", "33 ids")
        err_eq(c.err("engine::functions::info", {"function_id": "nope::x"}), "NOT_FOUND",
               "Function 'nope::x' is not registered.", "unknown id")
        err_eq(c.err("engine::functions::info", {"function_id": "amb::f"}), "NOT_FOUND",
               "Function 'amb::f' is ambiguous: it is registered in namespace(s): a, b. Pass "
               "`namespace` to select one.", "ambiguous id")
        d = c.ok("engine::functions::info", {"function_id": "amb::f", "namespace": "b"})
        eq((d.get("namespace"), d.get("worker_name")), ("b", "ambb"), "explicit namespace")
        d = c.ok("engine::functions::info", {"function_id": "one::f"})
        eq((d.get("namespace"), d.get("worker_name")), ("a", "amba"), "single non-default ns")
        er = c.err("engine::functions::info", {"function_id": "amb::f", "namespace": "zz"})
        eq(er.get("code"), "NOT_FOUND", "strict namespace miss code")
        check("a, b" in er.get("message", ""), "strict miss must name where the id exists: %r"
              % er.get("message"))


@test
def engine_workers_list_fields_and_hiding():
    with engine() as e:
        w = Conn(e, name="wl", ns="wns", fns=["wl::a", "wl::b"])
        nopid = Conn(e, name="nopid", pid=False)
        bare = Conn(e, announce=False)
        c = Conn(e, name="wlobs")
        rows = wlist(c)
        ids = [r.get("id") for r in rows]
        check(nopid.wid not in ids, "a worker without pid must be hidden")
        check(bare.wid not in ids, "a never-registered connection must be hidden")
        mine = [r for r in rows if r.get("id") == w.wid]
        eq(len(mine), 1, "rows for the worker")
        r = mine[0]
        keys = ["name", "description", "version", "id", "namespace", "runtime", "os", "status",
                "function_count", "connected_at_ms", "active_invocations", "isolation",
                "ip_address"]
        missing = [k for k in keys if k not in r]
        check(not missing, "fields missing in the workers::list row: %s (row %s)"
              % (missing, _show(r)))
        eq({k: r[k] for k in ("name", "namespace", "runtime", "os", "version", "status",
                              "function_count", "active_invocations")},
           {"name": "wl", "namespace": "wns", "runtime": "python", "os": "linux", "version": "0",
            "status": "connected", "function_count": 2, "active_invocations": 0}, "row values")
        check(isinstance(r["connected_at_ms"], int) and r["connected_at_ms"] > 0,
              "connected_at_ms: %r" % r["connected_at_ms"])
        check("127.0.0.1" in str(r["ip_address"]), "ip_address: %r" % r["ip_address"])
        eng = [x for x in rows if x.get("runtime") == "engine"]
        check(eng, "in-process modules must be listed (runtime engine)")
        for x in eng:
            eq((x.get("status"), x.get("isolation"), x.get("namespace")),
               ("available", "in-process", "default"), "in-process row %s" % x.get("id"))
        keyf = [(x.get("name") if x.get("name") is not None else x.get("id"), x.get("id"))
                for x in rows]
        eq(keyf, sorted(keyf), "sorted by name then id")
        s = wlist(c, search="wl")
        check(s and all("wl" in (x.get("name") or "") for x in s), "search filter: %s" % _show(s))
        check(w.wid in [x["id"] for x in s], "search filter lost the worker")
        rt = wlist(c, runtime="python")
        check(rt and all(x.get("runtime") == "python" for x in rt), "runtime filter")


@test
def engine_workers_info():
    with engine() as e:
        w = Conn(e, name="wi", fns=["wi::b", "wi::a"])
        w.regtype("wit")
        o = Conn(e, name="wiown")
        o.regtrig("wib", "wit", "wi::a", {})
        w.recv(_is_regtrig("wib"))
        Conn(e, name="amw", ns="a")
        amb = Conn(e, name="amw", ns="b")
        c = Conn(e, name="wiobs")
        info = c.ok("engine::workers::info", {"name": "wi"})
        wk = info.get("worker", {})
        eq((wk.get("id"), wk.get("name"), wk.get("namespace"), wk.get("pid"), wk.get("internal"),
            wk.get("status")), (w.wid, "wi", "default", os.getpid(), False, "connected"),
           "worker block")
        eq([f.get("function_id") for f in info.get("functions", [])], ["wi::a", "wi::b"],
           "functions (sorted)")
        eq([t.get("id") for t in info.get("trigger_types", [])], ["wit"], "trigger_types")
        eq([t.get("id") for t in info.get("registered_triggers", [])], ["wib"],
           "registered_triggers targeting the worker")
        err_eq(c.err("engine::workers::info", {"name": "ghost"}), "NOT_FOUND",
               "Worker 'ghost' is not connected.", "unknown worker")
        err_eq(c.err("engine::workers::info", {"name": "amw"}), "NOT_FOUND",
               "Worker 'amw' is ambiguous: it is connected in namespace(s): a, b. Pass "
               "`namespace` to disambiguate.", "ambiguous worker")
        eq(c.ok("engine::workers::info", {"name": "amw", "namespace": "b"})["worker"]["id"],
           amb.wid, "explicit namespace")
        er = c.err("engine::workers::info", {"name": "wi", "namespace": "zz"})
        eq(er.get("code"), "NOT_FOUND", "strict namespace miss")
        check("it is connected in namespace(s): default" in er.get("message", ""),
              "miss must name where the worker is: %r" % er.get("message"))


@test
def engine_triggers_list_and_info():
    with engine() as e:
        p = Conn(e, name="tlp")
        p.regtype("tl::ty", description="Demo type",
                  trigger_request_format={"type": "object"}, call_request_format={"type": "null"})
        p.regtype("nsy", description="ns type", namespace="tns")
        o = Conn(e, name="tlo")
        o.regtrig("tl1", "tl::ty", "o::a", {})
        o.regtrig("tl2", "tl::ty", "o::b", {}, namespace="elsewhere")
        c = Conn(e, name="tlobs")
        rows = c.ok("engine::triggers::list", {})["triggers"]
        ids = [r["id"] for r in rows]
        eq(ids, sorted(ids), "sorted by id")
        check(not any(i.startswith("engine::") for i in ids), "engine::* types shown by default")
        r = [x for x in rows if x["id"] == "tl::ty"]
        eq(r, [{"id": "tl::ty", "namespace": "default", "worker_name": "tlp",
                "description": "Demo type"}], "row of tl::ty (no schemas)")
        r = [x for x in rows if x["id"] == "nsy"]
        eq([x.get("namespace") for x in r], ["tns"], "namespace of a namespaced type")
        allr = [x["id"] for x in c.ok("engine::triggers::list",
                                      {"include_internal": True})["triggers"]]
        for t in ("engine::workers-available", "engine::functions-available"):
            check(t in allr, "%s missing with include_internal" % t)
        eq([x["id"] for x in c.ok("engine::triggers::list", {"prefix": "tl::"})["triggers"]],
           ["tl::ty"], "prefix filter")
        eq([x["id"] for x in c.ok("engine::triggers::list", {"search": "DEMO"})["triggers"]],
           ["tl::ty"], "search on description")
        info = c.ok("engine::triggers::info", {"id": "tl::ty"})
        eq((info.get("id"), info.get("namespace"), info.get("worker_name"),
            info.get("description"), info.get("instance_count")),
           ("tl::ty", "default", "tlp", "Demo type", 2), "triggers::info")
        err_eq(c.err("engine::triggers::info", {"id": "nope"}), "NOT_FOUND",
               "Trigger type 'nope' is not registered in namespace 'default'.", "unknown type")
        err_eq(c.err("engine::triggers::info", {"id": "nsy"}), "NOT_FOUND",
               "Trigger type 'nsy' is not registered in namespace 'default'.", "type elsewhere")
        eq(c.ok("engine::triggers::info", {"id": "nsy", "namespace": "tns"}).get("instance_count"),
           0, "instance_count of an unused type")


@test
def engine_registered_triggers_list_and_info():
    with engine() as e:
        w = Conn(e, name="rtw", fns=["rt::h"])
        w.regtype("rtt")
        w.regtrig("rt1", "rtt", "rt::h", {"x": 1}, metadata={"m": 1})
        long_cfg = {"s": "a" * 200}
        w.regtrig("rt2", "rtt", "rt::h", long_cfg)
        w.regtrig("rt3", "rtt", "engine::log::info", {})
        w.regtrig("rt4", "rtt", "ghost::fn", {})
        c = Conn(e, name="rtobs")
        rows = {r["id"]: r for r in rtlist(c)}
        eq(sorted(rows), ["rt1", "rt2", "rt4"], "default listing (engine::* targets hidden)")
        eq(list(rows), sorted(rows), "sorted by id")
        eq(rows["rt1"], {"id": "rt1", "trigger_type": "rtt", "function_id": "rt::h",
                         "worker_name": "rtw", "config": {"x": 1}, "config_summary": '{"x":1}'},
           "rt1 row")
        summ = rows["rt2"].get("config_summary", "")
        compact = json.dumps(long_cfg, separators=(",", ":"))
        check(summ.endswith("\u2026") and compact.startswith(summ[:-1])
              and 77 <= len(summ[:-1]) <= 80,
              "config_summary must be the compact JSON cut to 80 chars + \u2026: %r" % summ)
        check("rt3" in rtids(c, include_internal=True), "include_internal shows rt3")
        eq(rtids(c, function_id="ghost::fn"), ["rt4"], "function_id filter")
        eq(rtids(c, trigger_type="rtt"), ["rt1", "rt2", "rt4"], "trigger_type filter")
        eq(rtids(c, search="ghost"), ["rt4"], "search filter")
        info = c.ok("engine::registered-triggers::info", {"id": "rt1"})
        eq({k: info.get(k) for k in ("id", "trigger_type", "function_id", "worker_name", "config",
                                     "metadata")},
           {"id": "rt1", "trigger_type": "rtt", "function_id": "rt::h", "worker_name": "rtw",
            "config": {"x": 1}, "metadata": {"m": 1}}, "info fields")
        eq((info.get("trigger") or {}).get("id"), "rtt", "info.trigger")
        eq((info.get("function") or {}).get("function_id"), "rt::h", "info.function")
        info4 = c.ok("engine::registered-triggers::info", {"id": "rt4"})
        check("function" in info4 and info4["function"] is None,
              "dangling function must be null: %s" % _show(info4))
        err_eq(c.err("engine::registered-triggers::info", {"id": "nope"}), "NOT_FOUND",
               "Registered trigger 'nope' was not found.", "unknown binding")


@test
def engine_register_trigger_durable_and_unregister():
    with engine() as e:
        p = Conn(e, name="drp")
        p.regtype("drt")
        a = Conn(e, name="dra")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id":
                "engine::register_trigger", "data": {"trigger_type": "drt", "function_id": "d::h",
                                                     "config": {"q": 1}, "metadata": {"m": 2}}})
        rt = p.recv(is_type("registertrigger"), what="registertrigger for a durable binding")
        check(is_uuid(rt.get("id")), "durable binding id must be a UUID: %s" % _show(rt))
        eq({k: v for k, v in rt.items() if k != "id"},
           {"type": "registertrigger", "trigger_type": "drt", "function_id": "d::h",
            "config": {"q": 1}, "metadata": {"m": 2}}, "frame to the provider")
        p.send({"type": "triggerregistrationresult", "id": rt["id"], "trigger_type": "drt",
                "function_id": "d::h"})
        r = a.recv(is_result(iid), timeout=5.0)
        eq(r.get("result"), {"id": rt["id"]}, "engine::register_trigger result")
        a.close()  # durable: survives its creator
        b = Conn(e, name="drb")
        wait_until(lambda: all(w["id"] != a.wid for w in wlist(b)), what="creator reaped")
        check(rt["id"] in rtids(b), "durable binding must survive its creator")
        p.quiet(what=" (a durable binding is not unregistered when its creator leaves)")
        eq(b.ok("engine::unregister_trigger", {"id": rt["id"]}), {"removed": True}, "first removal")
        eq(p.recv(_is_unregtrig(rt["id"])),
           {"type": "unregistertrigger", "id": rt["id"], "trigger_type": "drt"}, "provider told")
        check(rt["id"] not in rtids(b), "binding still listed after removal")
        eq(b.ok("engine::unregister_trigger", {"id": rt["id"]}), {"removed": False},
           "second removal")
        # unknown type: parked, the call still succeeds, replayed later; a parked id counts
        res = b.ok("engine::register_trigger", {"trigger_type": "later", "function_id": "d::h"})
        check(is_uuid(res.get("id")), "result for a parked durable binding: %s" % _show(res))
        check(res["id"] not in rtids(b), "parked durable binding listed")
        p.regtype("later")
        got = p.recv(_is_regtrig(res["id"]), what="replay of the parked durable binding")
        eq((got.get("trigger_type"), got.get("function_id")), ("later", "d::h"), "replayed frame")
        res2 = b.ok("engine::register_trigger", {"trigger_type": "later2", "function_id": "d::h"})
        eq(b.ok("engine::unregister_trigger", {"id": res2["id"]}), {"removed": True},
           "removing a parked durable binding")
        p.regtype("later2")
        p.quiet(what=" (an unregistered parked binding must not be replayed)")


@test
def engine_register_trigger_waits_for_provider_ack():
    with engine() as e:
        p = Conn(e, name="wap")
        p.regtype("drt")
        b = Conn(e, name="wab")
        iid = new_id()
        b.send({"type": "invokefunction", "invocation_id": iid, "function_id":
                "engine::register_trigger", "data": {"trigger_type": "drt", "function_id": "d::h"}})
        rt = p.recv(is_type("registertrigger"))
        b.quiet(what=" before the provider's triggerregistrationresult (§5.11: the engine waits "
                "up to 10 s for it)")
        p.send({"type": "triggerregistrationresult", "id": rt["id"], "trigger_type": "drt",
                "function_id": "d::h", "error": {"code": "bad_config", "message": "nope"}})
        r = b.recv(is_result(iid), timeout=5.0)
        eq(r.get("error"), {"code": "trigger_registration_failed", "message": "bad_config: nope"},
           "provider error fails the call")
        p.quiet(what=" (the provider's error must not be forwarded as a frame)")


@test
def engine_log_and_non_object_input():
    with engine() as e:
        c = Conn(e, name="logw")
        for lvl in ("info", "warn", "error", "debug", "trace"):
            r = c.call("engine::log::" + lvl, {"message": "hello from the protocol test",
                                                "data": {"k": 1}})
            check("result" not in r and "error" not in r,
                  "engine::log::%s must succeed with no result: %s" % (lvl, _show(r)))
        for data in (None, 5, "x", [1]):
            er = c.err("engine::functions::list", data)
            eq(er.get("code"), "deserialization_error", "code for data %s" % _show(data))
            check(str(er.get("message", "")).startswith(
                "Failed to deserialize input for engine::functions::list: "),
                "message for data %s: %r" % (_show(data), er.get("message")))


@test
def enqueue_routed_to_queue_provider():
    with engine() as e:
        a = Conn(e, name="enqc")
        er = a.err("tgt::f", {"k": 1}, action={"type": "enqueue", "queue": "q1"})
        eq(er.get("code"), "enqueue_error", "no queue provider")
        msg = er.get("message", "")
        check("engine::queue::enqueue" in msg and "iii worker add queue" in msg,
              "enqueue_error message: %r" % msg)
        q = Conn(e, name="queue", fns=["engine::queue::enqueue"])
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "tgt::f",
                "data": {"k": 1}, "action": {"type": "enqueue", "queue": "q1"}})
        inv = q.recv(is_invoke("engine::queue::enqueue"))
        d = inv.get("data", {})
        check(set(d) <= {"queue", "function_id", "data", "messageReceiptId", "traceparent",
                         "baggage"}, "unexpected keys in the enqueue input: %s" % _show(d))
        eq((d.get("queue"), d.get("function_id"), d.get("data")), ("q1", "tgt::f", {"k": 1}),
           "enqueue input (payload untouched)")
        check(is_uuid4(d.get("messageReceiptId")), "messageReceiptId: %r" % d.get("messageReceiptId"))
        check("iii.function.id=tgt::f" in str(d.get("baggage")),
              "baggage must carry iii.function.id=tgt::f: %r" % d.get("baggage"))
        q.reply(inv, result={"messageReceiptId": "provider-id"})
        r = a.recv(is_result(iid))
        eq(r.get("result"), {"messageReceiptId": d["messageReceiptId"]}, "engine's receipt id")
        iid = new_id()
        a.send({"type": "invokefunction", "invocation_id": iid, "function_id": "tgt::f",
                "data": [1], "namespace": "ons", "action": {"type": "enqueue", "queue": "q2"}})
        d = q.recv(is_invoke("engine::queue::enqueue")).get("data", {})
        eq((d.get("namespace"), d.get("data")), ("ons", [1]), "namespace key for non-default")


# =============================================================================================
# §6 discovery

def _serve_events(c, fid, pred, timeout=WAIT, what="event"):
    """Answers every invoke of fid; returns the first whose data satisfies pred."""
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise Fail("timed out waiting for %s; other frames: %s" % (what, c._backlog_text()))
        inv = c.recv(is_invoke(fid), left, what)
        c.reply(inv, result=None)
        if pred(inv.get("data")):
            return inv


@test
def discovery_workers_available_events():
    with engine() as e:
        s = Conn(e, name="wsub", fns=["sub::on_workers"])
        s.regtrig("sub-w", "engine::workers-available", "sub::on_workers", {},
                  metadata={"tag": "m1"})
        x = Conn(e, name="xw", announce=False)

        def ev(kind):
            return lambda d: isinstance(d, dict) and d.get("event") == kind \
                and d.get("worker_id") == x.wid
        inv = _serve_events(s, "sub::on_workers", ev("worker_connected"), what="worker_connected")
        check(is_uuid(inv.get("invocation_id")), "event invoke needs an invocation_id")
        eq(inv.get("data"), {"event": "worker_connected", "worker_id": x.wid}, "event data")
        eq(inv.get("metadata"), {"tag": "m1"}, "binding metadata delivered")
        check("action" not in inv and "namespace" not in inv, "action/namespace in event frame")
        x.announce()
        inv = _serve_events(s, "sub::on_workers", ev("worker_metadata_updated"),
                            what="worker_metadata_updated")
        eq(inv.get("data"), {"event": "worker_metadata_updated", "worker_id": x.wid}, "event data")
        x.close()
        inv = _serve_events(s, "sub::on_workers", ev("worker_disconnected"),
                            what="worker_disconnected")
        eq(inv.get("data"), {"event": "worker_disconnected", "worker_id": x.wid}, "event data")
        s.sync()
        check(s.closed_within(0.05) is None, "subscriber closed")


@test
def discovery_functions_available_immediate():
    with engine() as e:
        s = Conn(e, name="fsub", fns=["fsub::on_fns"])
        s.regtrig("sub-f", "engine::functions-available", "fsub::on_fns", {})
        x = Conn(e, name="fx")
        t0 = time.time()
        x.regfn("fx::new", sync=False)

        def has(fid):
            return lambda d: isinstance(d, dict) and any(
                isinstance(f, dict) and f.get("function_id") == fid for f in d.get("functions", []))
        inv = _serve_events(s, "fsub::on_fns", has("fx::new"), timeout=1.5,
                            what="functions_changed with fx::new")
        dt = time.time() - t0
        check(dt < 1.0, "functions_changed took %.2fs (must be immediate, < 1 s)" % dt)
        d = inv["data"]
        eq(sorted(d), ["event", "functions"], "event keys")
        eq(d["event"], "functions_changed", "event name")
        row = [f for f in d["functions"] if f.get("function_id") == "fx::new"][0]
        eq((row.get("namespace"), row.get("worker_name")), ("default", "fx"), "row of fx::new")
        check(any(str(f.get("function_id", "")).startswith("engine::") for f in d["functions"]),
              "the event must carry the full, unfiltered list (engine::* included)")
        t0 = time.time()
        x.unregfn("fx::new", sync=False)
        _serve_events(s, "fsub::on_fns", lambda d: isinstance(d, dict) and not has("fx::new")(d),
                      timeout=1.5, what="functions_changed without fx::new")
        check(time.time() - t0 < 1.0, "removal event not immediate")


@test
def discovery_fires_in_binding_namespace_and_durable_metadata():
    with engine() as e:
        sd = Conn(e, name="sub-def", fns=["sub::h"])
        so = Conn(e, name="sub-ord", announce=False)
        so.regfn("sub::h", sync=False)  # buffered before the announce
        so.regtrig("evo", "engine::workers-available", "sub::h", {}, namespace="orders",
                   sync=False)
        so.announce(ns="orders")
        dur = Conn(e, name="sub-dur", fns=["dur::h"])
        res = dur.ok("engine::register_trigger",
                     {"trigger_type": "engine::workers-available", "function_id": "dur::h",
                      "config": {}, "metadata": {"durable": 1}})
        check(is_uuid(res.get("id")), "engine::register_trigger result: %s" % _show(res))
        x = Conn(e, name="evx")

        def conn_ev(d):
            return isinstance(d, dict) and d.get("event") == "worker_connected" \
                and d.get("worker_id") == x.wid
        inv = _serve_events(so, "sub::h", conn_ev, what="event in orders")
        check("namespace" not in inv, "namespace sent to the target")
        inv = _serve_events(dur, "dur::h", conn_ev, what="event through a durable binding")
        eq(inv.get("metadata"), {"durable": 1}, "durable binding metadata")
        eq(inv.get("data"), {"event": "worker_connected", "worker_id": x.wid}, "payload unchanged")
        sd.quiet(what=" at the default worker with the same function id")


# =============================================================================================
# §5.13 channels

def _channel(c):
    res = c.ok("engine::channels::create", {})
    w, r = res.get("writer", {}), res.get("reader", {})
    eq(sorted(w), ["access_key", "channel_id", "direction"], "writer ref keys")
    eq((w.get("direction"), r.get("direction")), ("write", "read"), "directions")
    eq((w.get("channel_id"), w.get("access_key")), (r.get("channel_id"), r.get("access_key")),
       "writer and reader share channel id and key")
    check(is_uuid(w.get("channel_id")) and is_uuid(w.get("access_key")), "ids must be UUIDs")
    return w["channel_id"], w["access_key"]


def _chws(e, cid, key, d):
    ws = WS(e.port, path="/ws/channels/%s?key=%s&dir=%s" % (cid, key, d))
    _open.append(ws)
    return ws


@test
def channels_relay_in_order_then_close():
    with engine() as e:
        c = Conn(e, name="chw")
        cid, key = _channel(c)
        rd = _chws(e, cid, key, "read")
        eq(rd.status, 101, "reader upgrade")
        wr = _chws(e, cid, key, "write")
        eq(wr.status, 101, "writer upgrade")
        msgs = [(1, b"hello"), (2, b"\x00\x01\xff\xfe"), (1, "w\u00f6rld \u2603".encode()),
                (2, bytes(range(256)) * 40)]
        for op, p in msgs:
            wr.send_frame(op, p)
        for i, (op, p) in enumerate(msgs):
            got = rd.recv_msg(WAIT)
            eq(got, (op, p), "message %d at the reader" % i)
        wr.send_frame(8, struct.pack("!H", 1000))
        try:
            code = rd.expect_close(WAIT)
        except Closed:
            raise Fail("reader saw EOF without a Close frame after the writer closed")
        check(code in (None, 1000), "reader close code %r" % code)


@test
def channels_wrong_key_404_and_second_side_closed():
    with engine() as e:
        c = Conn(e, name="chx")
        cid, key = _channel(c)
        eq(_chws(e, cid, new_id(), "read").status, 404, "wrong key")
        eq(_chws(e, new_id(), key, "write").status, 404, "unknown channel id")
        rd = _chws(e, cid, key, "read")
        eq(rd.status, 101, "first reader")
        rd2 = _chws(e, cid, key, "read")
        eq(rd2.status, 101, "second reader upgrade")
        deadline = time.time() + WAIT
        got = None
        try:
            while got is None:
                _, op, _ = rd2.recv_frame(max(0.01, deadline - time.time()))
                if op == 8:
                    got = "close"
                else:
                    raise Fail("second reader got a data frame (opcode %d) instead of Close" % op)
        except Closed:
            got = "eof"
        except TimeoutError:
            raise Fail("second reader was not closed")
        eq(got, "close", "second reader must get a Close frame")
        # the first reader still works
        wr = _chws(e, cid, key, "write")
        eq(wr.status, 101, "writer upgrade")
        wr.send_frame(1, b"still-there")
        eq(rd.recv_msg(WAIT), (1, b"still-there"), "first reader unaffected")


if __name__ == "__main__":
    sys.exit(suite.run())
