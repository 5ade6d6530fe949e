#!/usr/bin/env python3
"""Black-box transport tests: HTTP handshake, plain HTTP endpoints, RFC 6455 framing, UTF-8,
close handshake, liveness (server pings / idle timeout), handshake deadline, size limits,
many connections, /otel, command line (port/host), robustness and shutdown.

Run: python3 tests/test_transport.py        (III_BIN=/path/to/iii to pick the binary,
     III_TEST_ONLY=substring to run a subset). Standard library only.

Contract: tests/CONTRACT.md. Spec: ../shared/spec/PROTOCOL.md §1, DECISIONS.md items 2,5,6,7,8.
"""
import base64
import contextlib
import functools
import hashlib
import json
import os
import random
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wslib import BIN, GUID, Closed, Engine, Suite, WS  # noqa: E402

suite = Suite()
STACK = contextlib.ExitStack()
_ENGINES = {}

UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

# --------------------------------------------------------------------------- configs

def manager_config(**kv):
    lines = ["workers:", "  - name: iii-worker-manager", "    config:"]
    for k, v in kv.items():
        lines.append("      %s: %s" % (k, v))
    return "\n".join(lines) + "\n"


ENGINE_SPECS = {
    # default settings (missing config file) + the /echo route
    "echo": dict(config=None, args=["--echo"]),
    # small message limit
    "limits": dict(config=manager_config(max_message_bytes=65536), args=["--echo"]),
    # small frame limit, default message limit
    "framelimit": dict(config=manager_config(max_frame_bytes=4096), args=["--echo"]),
    # fast server pings / idle timeout
    "idle": dict(config=manager_config(ping_interval_ms=300, idle_timeout_ms=1500), args=[]),
    # short handshake deadline
    "hsdeadline": dict(config=manager_config(handshake_timeout_ms=500), args=[]),
    # plain engine without --echo
    "plain": dict(config=None, args=[]),
}


def shared(name):
    """A shared engine for a group of cheap tests; restarted if a previous test killed it."""
    e = _ENGINES.get(name)
    if e is not None and e.alive():
        return e
    spec = ENGINE_SPECS[name]
    e = STACK.enter_context(Engine(spec["config"], args=spec["args"]))
    _ENGINES[name] = e
    return e


def stderr_tail(e, n=600):
    s = e.stderr()
    return s[-n:]


def uses(name):
    """Decorator: the test gets the shared engine `name`; afterwards the engine must still be
    alive and answer /health (a crash or hang caused by the test fails the test)."""
    def deco(fn):
        @functools.wraps(fn)
        def run():
            e = shared(name)
            r = fn(e)
            time.sleep(0.02)
            if not e.alive():
                raise AssertionError("engine died during the test (exit %r); stderr: %s"
                                     % (e.proc.returncode, stderr_tail(e)))
            try:
                st, _, _ = http_get(e.port, "/health", timeout=3.0)
            except Exception as ex:  # noqa: BLE001
                raise AssertionError("engine no longer answers /health after the test: %r" % ex)
            if st != 200:
                raise AssertionError("/health answered %r after the test" % st)
            return r
        return run
    return deco


# --------------------------------------------------------------------------- HTTP helpers

def accept_for(key):
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def upgrade_request(port, path="/", key=None, version="13", upgrade="websocket",
                    connection="Upgrade", extra=(), method="GET", host_header=None):
    """Builds an upgrade request; None omits Upgrade/Connection/Version, key=False omits the
    key (key=None picks a random valid one). Returns (bytes, key)."""
    if key is None:
        key = base64.b64encode(os.urandom(16)).decode()
    lines = ["%s %s HTTP/1.1" % (method, path),
             "Host: %s" % (host_header or "127.0.0.1:%d" % port)]
    if upgrade is not None:
        lines.append("Upgrade: %s" % upgrade)
    if connection is not None:
        lines.append("Connection: %s" % connection)
    if key is not False:
        lines.append("Sec-WebSocket-Key: %s" % key)
    if version is not None:
        lines.append("Sec-WebSocket-Version: %s" % version)
    for k, v in extra:
        lines.append("%s: %s" % (k, v))
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), key


def raw_conn(port, host="127.0.0.1", timeout=5.0):
    """A WS object with no handshake done (raw socket + buffered reader)."""
    return WS(port, host=host, timeout=timeout, handshake=False)


def http_exchange(port, data, timeout=5.0, host="127.0.0.1"):
    """Sends raw request bytes; returns (status, headers, body, closed_after) where closed_after
    tells whether the server closed the TCP connection within 2 s after its answer."""
    c = raw_conn(port, host, timeout)
    try:
        try:
            c.send_raw(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything
        st, hdrs, body = c.read_http(timeout)
        closed = c.expect_eof(2.0)
        return st, hdrs, body, closed
    finally:
        c.close()


def http_get(port, path, timeout=5.0, host="127.0.0.1"):
    st, hdrs, body, _ = http_exchange(
        port, ("GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path, port)).encode(),
        timeout, host)
    return st, hdrs, body


def health(port):
    st, hdrs, body = http_get(port, "/health", 3.0)
    assert st == 200, "/health status %r" % st
    return json.loads(body.decode())


def wait_health(port, pred, timeout=3.0):
    """Polls /health until pred(doc) holds; returns the last doc (asserting pred)."""
    deadline = time.time() + timeout
    doc = health(port)
    while not pred(doc) and time.time() < deadline:
        time.sleep(0.05)
        doc = health(port)
    assert pred(doc), "condition on /health never held; last: %r" % doc
    return doc


def metric(port, name):
    """Value of an unlabelled Prometheus sample from /metrics (AssertionError if absent)."""
    st, h, body = http_get(port, "/metrics", 3.0)
    assert st == 200, "/metrics status %r" % st
    m = re.search(r"^%s(?:\{[^}]*\})? ([0-9.eE+-]+)$" % re.escape(name), body.decode(), re.M)
    assert m, "metric %s missing" % name
    return float(m.group(1))


def wait_connections_drained(port, timeout=5.0):
    """iii_connections_active falls to <= 1 (the /metrics request itself may count)."""
    deadline = time.time() + timeout
    v = metric(port, "iii_connections_active")
    while v > 1 and time.time() < deadline:
        time.sleep(0.05)
        v = metric(port, "iii_connections_active")
    assert v <= 1, "iii_connections_active still %r %.0fs after every client closed" % (v, timeout)


def open_ws(port, path="/", headers=None, host="127.0.0.1", timeout=5.0):
    """Opens a WebSocket; asserts 101 + correct accept; returns the WS."""
    ws = WS(port, path=path, headers=headers, host=host, timeout=timeout)
    if ws.status != 101:
        ws.close()
        raise AssertionError("upgrade to %s answered %r, want 101" % (path, ws.status))
    return ws


def open_worker(port):
    """Opens `/` and consumes workerregistered."""
    ws = open_ws(port, "/")
    m = ws.recv_json(5.0)
    assert m.get("type") == "workerregistered", "first message %r" % m
    return ws


# --------------------------------------------------------------------------- frame helpers

def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
    return WS.frame(opcode, payload, fin=fin, mask=mask, rsv=rsv, length=length)


def close_payload(code=None, reason=b""):
    if code is None:
        return b""
    if isinstance(reason, str):
        reason = reason.encode()
    return struct.pack("!H", code) + reason


def read_frame_strict(ws, timeout=5.0):
    """Reads one server frame and checks it is well formed (unmasked, RSV=0, minimal length
    encoding, control frames <=125 bytes and unfragmented). Returns (fin, opcode, payload)."""
    deadline = time.time() + timeout
    while True:
        if len(ws.rbuf) >= 2:
            b0, b1 = ws.rbuf[0], ws.rbuf[1]
            n = b1 & 0x7F
            off = 2
            ok = True
            if n == 126:
                if len(ws.rbuf) < 4:
                    ok = False
                else:
                    n = struct.unpack("!H", ws.rbuf[2:4])[0]
                    off = 4
                    assert n >= 126, "server used a 16-bit length for %d bytes" % n
            elif n == 127:
                if len(ws.rbuf) < 10:
                    ok = False
                else:
                    n = struct.unpack("!Q", ws.rbuf[2:10])[0]
                    off = 10
                    assert n >= 65536, "server used a 64-bit length for %d bytes" % n
            if ok:
                assert not (b1 & 0x80), "server frame is masked"
                assert not (b0 & 0x70), "server frame has RSV bits 0x%02x" % b0
                op = b0 & 0x0F
                assert op in (0, 1, 2, 8, 9, 10), "server sent reserved opcode %d" % op
                if op >= 8:
                    assert n <= 125, "server control frame with %d bytes" % n
                    assert b0 & 0x80, "server sent a fragmented control frame"
                if len(ws.rbuf) >= off + n:
                    p = ws.rbuf[off:off + n]
                    ws.rbuf = ws.rbuf[off + n:]
                    return bool(b0 & 0x80), op, p
        ws._fill(deadline)


def recv_data(ws, timeout=5.0, answer_pings=True):
    """Next complete data message (opcode, payload, nframes); skips pongs, answers pings.
    Raises Closed (with the code) on a Close frame."""
    deadline = time.time() + timeout
    parts, op0, nframes = [], None, 0
    while True:
        fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
        if op == 9:
            if answer_pings:
                ws.send_frame(10, p)
            continue
        if op == 10:
            continue
        if op == 8:
            raise Closed("unexpected close frame %r" % (p,))
        if op0 is None:
            assert op in (1, 2), "message starts with opcode %d" % op
            op0 = op
        else:
            assert op == 0, "opcode %d inside a fragmented message" % op
        parts.append(p)
        nframes += 1
        if fin:
            return op0, b"".join(parts), nframes


def expect_server_close(ws, timeout=3.0, allow_data=False, reply=True):
    """Reads until the server's Close frame; returns its code (None if no payload).
    Data frames before it fail unless allow_data. EOF without a Close frame fails.
    Then (reply) answers the close and requires the server to close TCP within 2 s."""
    deadline = time.time() + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            raise AssertionError("no Close frame within %.1fs" % timeout)
        try:
            fin, op, p = read_frame_strict(ws, left)
        except Closed:
            raise AssertionError("TCP closed without a Close frame")
        except TimeoutError:
            raise AssertionError("no Close frame within %.1fs" % timeout)
        if op == 8:
            assert len(p) != 1, "server Close frame with a 1-byte payload"
            code = struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None
            if reply:
                try:
                    ws.send_frame(8, p[:2])
                except OSError:
                    pass
            assert ws.expect_eof(2.0), "server did not close TCP within 2s after Close"
            return code
        if op in (9, 10):
            continue
        if not allow_data:
            raise AssertionError("got a data frame (op %d, %r) instead of Close" % (op, p[:60]))


def assert_close_code(ws, want, timeout=3.0, allow_data=False):
    code = expect_server_close(ws, timeout, allow_data=allow_data)
    if isinstance(want, (tuple, list, set)):
        assert code in want, "close code %r, want one of %r" % (code, sorted(want))
    else:
        assert code == want, "close code %r, want %r" % (code, want)


def send_quiet(ws, data):
    """sendall that tolerates the peer having already closed."""
    try:
        ws.send_raw(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def assert_silent(ws, seconds):
    """Nothing at all (no frame, no EOF) arrives within `seconds`."""
    try:
        fin, op, p = read_frame_strict(ws, seconds)
    except TimeoutError:
        return
    except Closed:
        raise AssertionError("connection closed unexpectedly")
    raise AssertionError("unexpected frame op=%d payload=%r" % (op, p[:80]))


def ping_roundtrip(ws, payload=b"alive?", timeout=2.0):
    """Sends a WS ping and waits for the matching pong (answers server pings, skips data)."""
    ws.send_frame(9, payload)
    deadline = time.time() + timeout
    while True:
        fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
        if op == 10 and p == payload:
            return
        if op == 9:
            ws.send_frame(10, p)
        if op == 8:
            raise AssertionError("Close frame %r instead of pong" % (p,))


def json_ping(ws, timeout=2.0):
    ws.send_json({"type": "ping"})
    deadline = time.time() + timeout
    while True:
        op, p, _ = recv_data(ws, max(0.01, deadline - time.time()))
        try:
            m = json.loads(p.decode())
        except ValueError:
            continue
        if m.get("type") == "pong":
            assert m == {"type": "pong"}, "pong frame has extra content: %r" % m
            return


def echo_roundtrip(ws, opcode, payload, timeout=10.0):
    ws.send_frame(opcode, payload)
    op, p, n = recv_data(ws, timeout)
    assert op == opcode, "echo opcode %d, want %d" % (op, opcode)
    assert n == 1, "echo came back in %d frames, want 1" % n
    assert p == payload, "echo payload differs (%d bytes back, %d sent)" % (len(p), len(payload))


# =========================================================================== 1. handshake

@suite.test
@uses("echo")
def handshake_accept_no_extensions_no_subprotocol(e):
    ws = WS(e.port, "/", headers={
        "Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits",
        "Sec-WebSocket-Protocol": "chat, superchat",
        "User-Agent": "iii-test"})  # WS checks Sec-WebSocket-Accept itself
    try:
        assert ws.status == 101, "status %r" % ws.status
        h = ws.resp_headers
        assert "sec-websocket-extensions" not in h, "extensions negotiated: %r" % h
        assert "sec-websocket-protocol" not in h, "subprotocol negotiated: %r" % h
        assert h.get("upgrade", "").lower() == "websocket", "Upgrade header %r" % h.get("upgrade")
        assert "upgrade" in [t.strip().lower() for t in h.get("connection", "").split(",")], \
            "Connection header %r" % h.get("connection")
        fin, op, p = read_frame_strict(ws, 5.0)
        assert fin and op == 1, "first frame fin=%r opcode=%d, want a text frame" % (fin, op)
        m = json.loads(p.decode())
        assert m.get("type") == "workerregistered", m
        assert set(m) == {"type", "worker_id", "reattach_token"}, "keys %r" % sorted(m)
        assert UUID4_RE.match(m["worker_id"]), "worker_id %r not a UUIDv4" % m["worker_id"]
        assert UUID4_RE.match(m["reattach_token"]), "token %r not a UUIDv4" % m["reattach_token"]
        assert m["worker_id"] != m["reattach_token"]
        ws2 = open_ws(e.port, "/")
        try:
            m2 = ws2.recv_json(5.0)
            assert m2["worker_id"] != m["worker_id"], "two connections got the same worker_id"
            assert m2["reattach_token"] != m["reattach_token"], "reattach_token reused"
        finally:
            ws2.close()
        json_ping(ws)  # compression was not negotiated: uncompressed frames work
    finally:
        ws.close()


@suite.test
@uses("echo")
def handshake_query_string_accepted(e):
    ws = open_ws(e.port, "/?foo=bar&x=1&namespace=zzz")
    try:
        m = ws.recv_json(5.0)
        assert m["type"] == "workerregistered", m
    finally:
        ws.close()
    ws = open_ws(e.port, "/echo?x=1")
    try:
        echo_roundtrip(ws, 1, b"q")
    finally:
        ws.close()
    ws = open_ws(e.port, "/otel?service=t")
    ws.close()


@suite.test
@uses("echo")
def handshake_header_case_and_token_list(e):
    # Firefox style: "Connection: keep-alive, Upgrade", mixed-case values and header names
    req, key = upgrade_request(e.port, "/", upgrade="WebSocket", connection="keep-alive, Upgrade")
    req = req.replace(b"Sec-WebSocket-Key", b"sec-websocket-key").replace(b"Upgrade:", b"UPGRADE:")
    c = raw_conn(e.port)
    try:
        c.send_raw(req)
        st, h, _ = c.read_http()
        assert st == 101, "status %r" % st
        assert h.get("sec-websocket-accept") == accept_for(key), "accept %r" % h
        m = json.loads(recv_data(c)[1].decode())
        assert m["type"] == "workerregistered"
    finally:
        c.close()


@suite.test
@uses("echo")
def handshake_version_12_gets_426(e):
    req, _ = upgrade_request(e.port, "/", version="12")
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 426, "status %r" % st
    versions = [v.strip() for v in h.get("sec-websocket-version", "").split(",")]
    assert "13" in versions, "Sec-WebSocket-Version header %r" % h.get("sec-websocket-version")
    assert closed, "socket not closed after the 426"


@suite.test
@uses("echo")
def handshake_bad_requests_get_400(e):
    cases = {
        "missing key": upgrade_request(e.port, "/", key=False)[0],
        "empty key": upgrade_request(e.port, "/", key="")[0],
        "key of 15 bytes": upgrade_request(e.port, "/", key=base64.b64encode(b"\1" * 15).decode())[0],
        "key of 17 bytes": upgrade_request(e.port, "/", key=base64.b64encode(b"\1" * 17).decode())[0],
        "key not base64": upgrade_request(e.port, "/", key="!!!!!!!!!!!!!!!!!!!!!!==")[0],
        "missing Upgrade": upgrade_request(e.port, "/", upgrade=None)[0],
        "Upgrade: h2c": upgrade_request(e.port, "/", upgrade="h2c")[0],
        "missing Connection": upgrade_request(e.port, "/", connection=None)[0],
        "Connection: keep-alive only": upgrade_request(e.port, "/", connection="keep-alive")[0],
        "plain GET /": ("GET / HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % e.port).encode(),
    }
    bad = []
    for name, req in cases.items():
        st, h, body, closed = http_exchange(e.port, req)
        if st != 400:
            bad.append("%s -> %r" % (name, st))
        elif "content-length" not in h or not closed:
            bad.append("%s: no Content-Length or socket not closed (%r)" % (name, h))
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def handshake_post_405_unknown_path_404(e):
    req, _ = upgrade_request(e.port, "/", method="POST", extra=[("Content-Length", "0")])
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 405, "POST / -> %r, want 405" % st
    assert closed, "socket not closed after 405"
    for path in ("/nope", "/ws", "//", "/echo/x", "/otel/x", "/health/x"):
        req, _ = upgrade_request(e.port, path)
        st, h, body, closed = http_exchange(e.port, req)
        assert st == 404, "upgrade to %s -> %r, want 404" % (path, st)
    st, h, body = http_get(e.port, "/definitely-not-here")
    assert st == 404, "GET /definitely-not-here -> %r" % st


@suite.test
@uses("plain")
def handshake_echo_route_absent_without_flag(e):
    req, _ = upgrade_request(e.port, "/echo")
    st, _, _, _ = http_exchange(e.port, req)
    assert st == 404, "/echo without --echo -> %r, want 404" % st


@suite.test
@uses("echo")
def handshake_huge_header_431(e):
    req, _ = upgrade_request(e.port, "/", extra=[("X-Big", "a" * 17000)])
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 431, "17 KB header -> %r, want 431" % st
    # many medium headers adding up to > 16 KiB
    req, _ = upgrade_request(e.port, "/", extra=[("X-H%d" % i, "b" * 400) for i in range(45)])
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 431, "45 x 400 B headers -> %r, want 431" % st


@suite.test
@uses("echo")
def handshake_large_header_under_limit_ok(e):
    # the whole request head stays below 16384 bytes, whatever exactly is counted
    base_len = len(upgrade_request(e.port, "/", extra=[("X-Pad", "")])[0])
    ws = open_ws(e.port, "/", headers={"X-Pad": "p" * (16300 - base_len)})
    try:
        assert ws.recv_json()["type"] == "workerregistered"
    finally:
        ws.close()


@suite.test
@uses("echo")
def handshake_origin_policy(e):
    req, _ = upgrade_request(e.port, "/", extra=[("Origin", "http://evil.example")])
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 403, "Origin http://evil.example -> %r, want 403" % st
    req, _ = upgrade_request(e.port, "/", extra=[("Origin", "http://localhost.evil.example")])
    st, h, body, closed = http_exchange(e.port, req)
    assert st == 403, "Origin http://localhost.evil.example -> %r, want 403" % st
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "http://localhost"):
        ws = WS(e.port, "/", headers={"Origin": origin})
        try:
            assert ws.status == 101, "Origin %s -> %r, want 101" % (origin, ws.status)
            assert ws.recv_json()["type"] == "workerregistered"
        finally:
            ws.close()
    ws = open_ws(e.port, "/")  # no Origin at all
    try:
        assert ws.recv_json()["type"] == "workerregistered"
    finally:
        ws.close()


@suite.test
@uses("echo")
def handshake_malformed_requests_4xx(e):
    cases = {
        "garbage line": b"GARBAGE\r\n\r\n",
        "no HTTP version": b"GET /\r\n\r\n",
        "empty head": b"\r\n\r\n",
        "header without colon": b"GET / HTTP/1.1\r\nHost: x\r\nNoColonHere\r\n\r\n",
        "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "20 KB request line": b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    bad = []
    for name, req in cases.items():
        try:
            st, h, body, closed = http_exchange(e.port, req, timeout=3.0)
        except Exception as ex:  # noqa: BLE001
            bad.append("%s: no HTTP answer (%s: %s)" % (name, type(ex).__name__, ex))
            continue
        if not (400 <= st < 500):
            bad.append("%s -> %r" % (name, st))
        elif not closed:
            bad.append("%s: socket not closed after %d" % (name, st))
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def handshake_split_across_tiny_writes(e):
    req, key = upgrade_request(e.port, "/", extra=[("User-Agent", "tiny-writes")])
    c = raw_conn(e.port)
    try:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, len(req), 3):
            c.send_raw(req[i:i + 3])
            time.sleep(0.002)
        st, h, _ = c.read_http()
        assert st == 101, "status %r" % st
        assert h.get("sec-websocket-accept") == accept_for(key)
        m = json.loads(recv_data(c)[1].decode())
        assert m["type"] == "workerregistered", m
        json_ping(c)
    finally:
        c.close()


# =========================================================================== 2. plain HTTP

@suite.test
@uses("echo")
def http_health(e):
    st, h, body, closed = http_exchange(
        e.port, ("GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % e.port).encode())
    assert st == 200, "status %r" % st
    assert h.get("content-type", "").split(";")[0].strip() == "application/json", \
        "Content-Type %r" % h.get("content-type")
    assert int(h.get("content-length", "-1")) == len(body), "Content-Length %r" % h
    assert h.get("connection", "").lower() == "close", "Connection %r" % h.get("connection")
    assert closed, "socket not closed after the answer"
    doc = json.loads(body.decode())
    assert doc.get("status") == "ok", doc
    for k in ("workers", "functions", "uptime_ms"):
        assert type(doc.get(k)) is int and doc[k] >= 0, "%s=%r" % (k, doc.get(k))
    time.sleep(0.12)
    doc2 = health(e.port)
    assert doc2["uptime_ms"] >= doc["uptime_ms"] + 80, "uptime_ms %r -> %r after 120 ms" % (
        doc["uptime_ms"], doc2["uptime_ms"])
    # a registered worker is counted
    wait_connections_drained(e.port)
    base = health(e.port)["workers"]
    ws = open_worker(e.port)
    try:
        ws.send_json({"type": "invokefunction", "function_id": "engine::workers::register",
                      "data": {"runtime": "python", "version": "0", "name": "health-probe",
                               "os": "linux", "pid": os.getpid()}, "action": {"type": "void"}})
        wait_health(e.port, lambda d: d["workers"] == base + 1)
    finally:
        ws.close()
    wait_health(e.port, lambda d: d["workers"] == base)


@suite.test
@uses("echo")
def http_metrics(e):
    a = open_worker(e.port)
    b = open_ws(e.port, "/echo")
    try:
        st, h, body, closed = http_exchange(
            e.port, ("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % e.port).encode())
        assert st == 200, "status %r" % st
        assert h.get("content-type", "").startswith("text/plain"), "Content-Type %r" % h
        assert int(h.get("content-length", "-1")) == len(body), "Content-Length %r" % h
        assert closed, "socket not closed"
        text = body.decode()
        missing = [n for n in ("iii_invocations_total", "iii_invocation_errors_total",
                               "iii_workers_active", "iii_workers_spawns_total",
                               "iii_workers_deaths_total", "iii_connections_active")
                   if not re.search(r"^%s(\{[^}]*\})? [0-9.eE+-]+$" % n, text, re.M)]
        assert not missing, "metrics missing (as 'name value' lines): %r" % missing
        v = float(re.search(r"^iii_connections_active(?:\{[^}]*\})? ([0-9.eE+-]+)$", text,
                            re.M).group(1))
        assert v >= 2, "iii_connections_active=%r with 2 open WebSockets" % v
    finally:
        a.close()
        b.close()


# =========================================================================== 3. framing

@suite.test
@uses("echo")
def frame_unmasked_client_frame_1002(e):
    for path in ("/echo", "/"):
        ws = open_ws(e.port, path)
        try:
            ws.send_raw(frame(1, b'{"type":"ping"}', mask=False))
            assert_close_code(ws, 1002, allow_data=(path == "/"))
        finally:
            ws.close()


@suite.test
@uses("echo")
def frame_rsv_bits_1002(e):
    for rsv in (1, 2, 4, 7):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(1, b"hi", rsv=rsv))
            assert_close_code(ws, 1002)
        except AssertionError as ex:
            raise AssertionError("rsv=%d: %s" % (rsv, ex))
        finally:
            ws.close()
    ws = open_ws(e.port, "/echo")  # RSV on a ping
    try:
        ws.send_raw(frame(9, b"p", rsv=4))
        assert_close_code(ws, 1002)
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_reserved_opcodes_1002(e):
    bad = []
    for op in (3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(op, b"xy"))
            assert_close_code(ws, 1002)
        except AssertionError as ex:
            bad.append("opcode %d: %s" % (op, ex))
        finally:
            ws.close()
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def frame_continuation_without_start_1002(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(0, b"orphan"))
        assert_close_code(ws, 1002)
    finally:
        ws.close()
    ws = open_ws(e.port, "/echo")  # after a complete message
    try:
        echo_roundtrip(ws, 1, b"done")
        ws.send_raw(frame(0, b"late", fin=False))
        assert_close_code(ws, 1002)
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_new_data_frame_inside_fragmented_1002(e):
    for second in (1, 2):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(1, b"a", fin=False) + frame(second, b"b"))
            assert_close_code(ws, 1002)
        except AssertionError as ex:
            raise AssertionError("second opcode %d: %s" % (second, ex))
        finally:
            ws.close()


@suite.test
@uses("echo")
def frame_control_payload_126_1002(e):
    for op in (9, 10, 8):
        ws = open_ws(e.port, "/echo")
        try:
            payload = close_payload(1000, b"r" * 124) if op == 8 else b"x" * 126
            ws.send_raw(frame(op, payload))
            assert_close_code(ws, 1002)
        except AssertionError as ex:
            raise AssertionError("opcode %d with 126 bytes: %s" % (op, ex))
        finally:
            ws.close()


@suite.test
@uses("echo")
def frame_fragmented_control_1002(e):
    for op in (9, 10):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(op, b"x", fin=False))
            assert_close_code(ws, 1002)
        except AssertionError as ex:
            raise AssertionError("opcode %d FIN=0: %s" % (op, ex))
        finally:
            ws.close()


@suite.test
@uses("echo")
def frame_ping_gets_identical_pong(e):
    for path in ("/echo", "/"):
        ws = open_ws(e.port, path)
        try:
            for payload in (b"", b"hello", bytes(range(125)), b"\xff\x00\xfe"):
                ws.send_frame(9, payload)
                deadline = time.time() + 2
                while True:
                    fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
                    if op == 10:
                        assert p == payload, "pong %r for ping %r" % (p[:20], payload[:20])
                        break
                    assert op == 1 and path == "/", "unexpected frame op %d" % op
            # unsolicited pong is ignored
            ws.send_frame(10, b"unsolicited")
            if path == "/echo":
                echo_roundtrip(ws, 1, b"after-pong")
            else:
                json_ping(ws)
        finally:
            ws.close()


@suite.test
@uses("echo")
def frame_worker_path_binary_json_and_junk_text(e):
    ws = open_worker(e.port)
    try:
        # junk is dropped without a reply and without closing (PROTOCOL.md 1.5)
        for junk in (b"", b"   ", b"\n\t", b"not json", b'{"type":"nope"}', b"[1,2]", b'{"type":'):
            ws.send_frame(1, junk)
        ws.send_frame(2, b'{"type":"ping"}')  # binary is parsed as JSON like text
        op, p, n = recv_data(ws, 3.0)
        assert json.loads(p.decode()) == {"type": "pong"}, "first reply %r" % p
        json_ping(ws)
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_pipelined_1000_messages_in_order(e):
    ws = open_ws(e.port, "/echo")
    try:
        msgs = [("m%04d" % i).encode() * (1 + i % 7) for i in range(1000)]
        ws.send_raw(b"".join(frame(1 + (i & 1), m) for i, m in enumerate(msgs)))
        for i, m in enumerate(msgs):
            op, p, n = recv_data(ws, 5.0)
            assert (op, p) == (1 + (i & 1), m), "message %d: got %r, want %r" % (i, p[:40], m[:40])
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_fragment_state_is_per_connection(e):
    a = open_ws(e.port, "/echo")
    b = open_ws(e.port, "/echo")
    try:
        a.send_raw(frame(1, b"A1", fin=False))
        b.send_raw(frame(2, b"B1", fin=False))
        a.send_raw(frame(0, b"A2", fin=False))
        b.send_raw(frame(0, b"B2", fin=True))
        a.send_raw(frame(0, b"A3", fin=True))
        assert recv_data(a)[:2] == (1, b"A1A2A3")
        assert recv_data(b)[:2] == (2, b"B1B2")
    finally:
        a.close()
        b.close()


@suite.test
@uses("echo")
def frame_ping_between_fragments(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(1, b"hel", fin=False) + frame(9, b"mid") + frame(0, b"l", fin=False)
                    + frame(10, b"unsolicited") + frame(0, b"o", fin=True))
        got_pong = False
        deadline = time.time() + 3
        while True:
            fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
            if op == 10:
                assert p == b"mid", "pong payload %r" % p
                got_pong = True
                continue
            assert op == 1 and fin, "frame op=%d fin=%r" % (op, fin)
            assert p == b"hello", "reassembled %r" % p
            break
        assert got_pong, "the pong came after the echo, or never (ping was sent before the end)"
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_echo_sizes(e):
    rng = random.Random(7)
    ws = open_ws(e.port, "/echo")
    try:
        for n in (0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 8 << 20):
            text = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ") for _ in range(min(n, 4096)))
            text = (text * (n // max(1, len(text)) + 1))[:n]
            try:
                echo_roundtrip(ws, 1, text, timeout=20.0)
                echo_roundtrip(ws, 2, rng.randbytes(n), timeout=20.0)
            except AssertionError as ex:
                raise AssertionError("size %d: %s" % (n, ex))
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_fragmented_messages_reassembled(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(1, b"frag", fin=False) + frame(0, b"", fin=False) +
                    frame(0, b"men", fin=False) + frame(0, b"ted", fin=True))
        op, p, n = recv_data(ws)
        assert (op, p, n) == (1, b"fragmented", 1), (op, p, n)
        blob = os.urandom(200000)
        data = frame(2, blob[:1], fin=False)
        for i in range(1, len(blob), 70000):
            data += frame(0, blob[i:i + 70000], fin=(i + 70000 >= len(blob)))
        ws.send_raw(data)
        op, p, n = recv_data(ws)
        assert op == 2 and p == blob and n == 1, "binary reassembly wrong (%d bytes, %d frames)" % (len(p), n)
        ws.send_raw(frame(1, b"", fin=False) + frame(0, b"", fin=True))  # empty fragmented
        op, p, n = recv_data(ws)
        assert (op, p) == (1, b""), (op, p)
        # 300 one-byte fragments
        msg = bytes(random.Random(3).choice(b"xyz") for _ in range(300))
        data = frame(1, msg[:1], fin=False) + b"".join(
            frame(0, msg[i:i + 1], fin=(i == 299)) for i in range(1, 300))
        ws.send_raw(data)
        op, p, n = recv_data(ws)
        assert (op, p) == (1, msg), "300-fragment message wrong"
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_64bit_length_top_bit_rejected_without_reading(e):
    ws = open_ws(e.port, "/echo")
    try:
        # 64-bit length with the most significant bit set; only the header + mask is sent
        ws.send_raw(b"\x82\xff" + struct.pack("!Q", (1 << 63) | 5) + b"\x01\x02\x03\x04")
        t0 = time.time()
        code = expect_server_close(ws, 2.0)
        # RFC 6455 5.2: MSB must be 0 -> protocol error; the brief asks for 1009 (too big)
        assert code in (1009, 1002), "close code %r, want 1009 (or 1002)" % code
        assert time.time() - t0 < 2.0
    finally:
        ws.close()


@suite.test
@uses("echo")
def frame_length_over_limit_1009_without_reading(e):
    for n in ((64 << 20) + 1, 1 << 33, (1 << 63) - 1):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(b"\x82\xff" + struct.pack("!Q", n) + b"\x01\x02\x03\x04" + b"\x00" * 10)
            assert_close_code(ws, 1009, timeout=2.0)
        except AssertionError as ex:
            raise AssertionError("declared length %d: %s" % (n, ex))
        finally:
            ws.close()


@suite.test
@uses("echo")
def close_normal_with_reason_echoed(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_frame(8, close_payload(1000, "bye"))
        code = expect_server_close(ws, 3.0, reply=False)
        assert code == 1000, "close code %r" % code
    finally:
        ws.close()
    ws = open_worker(e.port)
    try:
        ws.send_frame(8, close_payload(1000, "bye \u00fc\u20ac"))
        code = expect_server_close(ws, 3.0, reply=False)
        assert code == 1000, "close code on / %r" % code
    finally:
        ws.close()


@suite.test
@uses("echo")
def close_inside_fragmented_message(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(1, b"unfinished", fin=False) + frame(8, close_payload(1000)))
        code = expect_server_close(ws, 3.0, reply=False)
        assert code == 1000, "close code %r (a Close may interleave with fragments)" % code
    finally:
        ws.close()


@suite.test
@uses("echo")
def close_valid_codes_echoed(e):
    bad = []
    for c in (1001, 1003, 1007, 1008, 1011, 3000, 3999, 4000, 4999):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_frame(8, close_payload(c, "r"))
            code = expect_server_close(ws, 3.0, reply=False)
            if code != c:
                bad.append("%d -> %r" % (c, code))
        except AssertionError as ex:
            bad.append("%d: %s" % (c, ex))
        finally:
            ws.close()
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def close_invalid_codes_1002(e):
    bad = []
    for c in (0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_frame(8, close_payload(c))
            code = expect_server_close(ws, 3.0, reply=False)
            if code != 1002:
                bad.append("%d -> %r" % (c, code))
        except AssertionError as ex:
            bad.append("%d: %s" % (c, ex))
        finally:
            ws.close()
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def close_one_byte_payload_1002(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_frame(8, b"\x03")
        code = expect_server_close(ws, 3.0, reply=False)
        assert code == 1002, "close code %r" % code
    finally:
        ws.close()


@suite.test
@uses("echo")
def close_reason_invalid_utf8_1007(e):
    for reason in (b"\xff\xfe", b"ok\xc0\x80", b"\xed\xa0\x80", b"abc\xe2\x82"):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_frame(8, close_payload(1000, reason))
            code = expect_server_close(ws, 3.0, reply=False)
            assert code == 1007, "close reason %r -> code %r, want 1007" % (reason, code)
        finally:
            ws.close()


@suite.test
@uses("echo")
def close_empty_payload(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_frame(8, b"")
        code = expect_server_close(ws, 3.0, reply=False)
        assert code in (None, 1000), "close code %r, want none or 1000" % code
    finally:
        ws.close()


@suite.test
@uses("echo")
def close_max_reason_and_nothing_after_close(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(1, b"before") + frame(8, close_payload(1000, b"z" * 123))
                    + frame(1, b"after-close"))
        op, p, n = recv_data(ws)
        assert (op, p) == (1, b"before"), (op, p)
        code = expect_server_close(ws, 3.0, reply=False)  # a data frame here would fail
        assert code == 1000, "close code %r" % code
    finally:
        ws.close()


# =========================================================================== 4. UTF-8

@suite.test
@uses("echo")
def utf8_valid_text_echoed_exactly(e):
    ws = open_ws(e.port, "/echo")
    try:
        for s in ("h\u00e9llo w\u00f6rld \u20ac\U0001d11e \U0001f600 \u65e5\u672c\u8a9e",
                  "\U0001f468\u200d\U0001f469\u200d\U0001f467",
                  "\ud7ff\ue000\ufffd\uffff\ufdd0\U0010ffff\U00010000\u0080\u07ff\u0800",
                  "\x00\x7f"):
            echo_roundtrip(ws, 1, s.encode("utf-8"))
    finally:
        ws.close()


INVALID_UTF8 = [
    b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xf0\x80\x80\x80",
    b"\xf0\x8f\xbf\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xff", b"\xfe", b"\x80", b"a\xbfb",
    b"ab\xe2\x82", b"ab\xf0\x9f\x98", b"a\xffb", b"\xe2\x28\xa1", b"\xce\xba\xe1\xbd",
]


@suite.test
@uses("echo")
def utf8_invalid_text_1007(e):
    bad = []
    for bs in INVALID_UTF8:
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_frame(1, bs)
            code = expect_server_close(ws, 3.0)
            if code != 1007:
                bad.append("%r -> %r" % (bs, code))
        except AssertionError as ex:
            bad.append("%r: %s" % (bs, ex))
        finally:
            ws.close()
    assert not bad, "; ".join(bad)


@suite.test
@uses("echo")
def utf8_invalid_text_on_worker_path_1007(e):
    ws = open_worker(e.port)
    try:
        ws.send_frame(1, b'{"type":"ping","x":"\xff"}')
        assert_close_code(ws, 1007)
    finally:
        ws.close()


@suite.test
@uses("echo")
def utf8_invalid_in_fragmented_message_1007(e):
    ws = open_ws(e.port, "/echo")
    try:
        ws.send_raw(frame(1, b"valid ", fin=False) + frame(0, b"\xed\xa0\x80", fin=False)
                    + frame(0, b"end", fin=True))
        assert_close_code(ws, 1007)
    finally:
        ws.close()
    # a sequence left incomplete by the last fragment
    for last in (b"\xe2\x82", b"\xf0\x9f\x98", b"\xc3"):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(1, b"ab", fin=False) + frame(0, last, fin=True))
            assert_close_code(ws, 1007)
        except AssertionError as ex:
            raise AssertionError("message ending in %r (fragmented): %s" % (last, ex))
        finally:
            ws.close()
    ws = open_ws(e.port, "/echo")  # started in fragment 1, truncated by a final empty fragment
    try:
        ws.send_raw(frame(1, b"ab\xe2", fin=False) + frame(0, b"\x82", fin=False)
                    + frame(0, b"", fin=True))
        assert_close_code(ws, 1007)
    finally:
        ws.close()


@suite.test
@uses("echo")
def utf8_code_point_split_across_fragments(e):
    ws = open_ws(e.port, "/echo")
    try:
        euro = "\u20ac".encode()
        ws.send_raw(frame(1, b"a" + euro[:2], fin=False) + frame(0, euro[2:] + b"b", fin=True))
        op, p, n = recv_data(ws)
        assert (op, p) == (1, b"a" + euro + b"b"), (op, p)
        emoji = "\U0001f600".encode()
        ws.send_raw(frame(1, emoji[:1], fin=False) + frame(0, emoji[1:2], fin=False)
                    + frame(0, emoji[2:3], fin=False) + frame(0, emoji[3:], fin=True))
        op, p, n = recv_data(ws)
        assert (op, p) == (1, emoji), (op, p)
    finally:
        ws.close()


@suite.test
@uses("echo")
def utf8_fail_fast_on_first_fragment(e):
    for first in (b"ab\xff", "\u03ba\u1f79\u03c3\u03bc\u03b5".encode() + b"\xf4\x90\x80\x80",
                  b"ok\xed\xa0"):
        ws = open_ws(e.port, "/echo")
        try:
            ws.send_raw(frame(1, first, fin=False))  # the message never completes
            t0 = time.time()
            code = expect_server_close(ws, 2.0)
            assert code == 1007, "code %r" % code
            assert time.time() - t0 < 2.0
        except AssertionError as ex:
            raise AssertionError("first fragment %r: %s" % (first, ex))
        finally:
            ws.close()


@suite.test
@uses("echo")
def utf8_binary_not_validated(e):
    ws = open_ws(e.port, "/echo")
    try:
        for b in (b"\xff\xfe\xc0\x80", b"\xed\xa0\x80", b"ab\xe2\x82"):
            echo_roundtrip(ws, 2, b)
        ws.send_raw(frame(2, b"\xe2", fin=False) + frame(0, b"\xff", fin=True))
        op, p, n = recv_data(ws)
        assert (op, p) == (2, b"\xe2\xff"), (op, p)
    finally:
        ws.close()


# =========================================================================== 5. liveness

@suite.test
@uses("idle")
def liveness_server_pings_idle_client(e):
    ws = open_worker(e.port)
    try:
        t0 = time.time()
        deadline = t0 + 1.5
        while True:
            try:
                fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
            except TimeoutError:
                raise AssertionError("no WS ping within 1.5s (ping_interval_ms=300)")
            if op == 9:
                break
            assert op != 8, "closed instead of pinging"
        ws.send_frame(10, p)
        json_ping(ws)
    finally:
        ws.close()


@suite.test
@uses("idle")
def liveness_idle_timeout_closes_silent_keeps_active(e):
    res = {}

    def silent():
        ws = open_worker(e.port)
        t0 = time.time()
        pings = 0
        try:
            deadline = t0 + 4.0
            while time.time() < deadline:
                try:
                    fin, op, p = read_frame_strict(ws, max(0.01, deadline - time.time()))
                except Closed:
                    res["silent"] = ("eof", time.time() - t0, pings)
                    return
                except TimeoutError:
                    break
                if op == 9:
                    pings += 1
                if op == 8:
                    res["silent_close"] = p
            res["silent"] = ("open", time.time() - t0, pings)
        except Exception as ex:  # noqa: BLE001
            res["silent"] = ("error %r" % ex, time.time() - t0, pings)
        finally:
            ws.close()

    def ponger():  # answers pings only
        ws = open_worker(e.port)
        try:
            end = time.time() + 2.5
            while time.time() < end:
                try:
                    fin, op, p = read_frame_strict(ws, max(0.01, end - time.time()))
                except TimeoutError:
                    break
                if op == 9:
                    ws.send_frame(10, p)
                assert op != 8, "closed: %r" % p
            ping_roundtrip(ws, b"ponger-still-here")
            res["ponger"] = "ok"
        except Exception as ex:  # noqa: BLE001
            res["ponger"] = "%s: %s" % (type(ex).__name__, ex)
        finally:
            ws.close()

    def talker():  # never answers pings, but sends a JSON ping every 400 ms
        ws = open_worker(e.port)
        try:
            end = time.time() + 2.5
            while time.time() < end:
                ws.send_json({"type": "ping"})
                t = time.time() + 0.4
                while time.time() < t:
                    try:
                        fin, op, p = read_frame_strict(ws, max(0.01, t - time.time()))
                    except TimeoutError:
                        break
                    assert op != 8, "closed: %r" % p
            json_ping(ws)
            res["talker"] = "ok"
        except Exception as ex:  # noqa: BLE001
            res["talker"] = "%s: %s" % (type(ex).__name__, ex)
        finally:
            ws.close()

    ts = [threading.Thread(target=f, daemon=True) for f in (silent, ponger, talker)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(8)
    problems = []
    s = res.get("silent")
    if not s or s[0] != "eof":
        problems.append("silent client not closed within 4s: %r" % (s,))
    elif not (1.2 <= s[1] <= 3.5):
        problems.append("silent client closed after %.2fs, want ~1.5s (1.2..3.5)" % s[1])
    elif s[2] < 1:
        problems.append("silent client got no ping before being closed")
    for k in ("ponger", "talker"):
        if res.get(k) != "ok":
            problems.append("%s: %r" % (k, res.get(k)))
    assert not problems, "; ".join(problems)


# =========================================================================== 6. handshake deadline

@suite.test
@uses("hsdeadline")
def handshake_deadline_closes_stalled_sockets(e):
    res = {}
    silent = socket.create_connection(("127.0.0.1", e.port), timeout=5)
    partial = socket.create_connection(("127.0.0.1", e.port), timeout=5)
    partial.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
    t0 = time.time()
    stop = threading.Event()

    def trickle():  # slowloris: one byte every 100 ms of an otherwise valid request
        req, _ = upgrade_request(e.port, "/")
        s = socket.create_connection(("127.0.0.1", e.port), timeout=5)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = time.time()
        try:
            for b in req:
                if stop.is_set():
                    break
                s.sendall(bytes([b]))
                time.sleep(0.1)
            res["trickle"] = ("completed", time.time() - t)
        except OSError:
            res["trickle"] = ("closed", time.time() - t)
        finally:
            s.close()

    th = threading.Thread(target=trickle, daemon=True)
    th.start()
    try:
        ws = open_ws(e.port, "/")  # a normal client meanwhile
        try:
            m = ws.recv_json(2.0)
            assert m["type"] == "workerregistered", m
        finally:
            ws.close()

        def wait_eof(s, limit):
            s.settimeout(0.1)
            while time.time() < limit:
                try:
                    d = s.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    return time.time() - t0
                if not d:
                    return time.time() - t0
            return None

        for name, s in (("silent", silent), ("partial header", partial)):
            dt = wait_eof(s, t0 + 2.5)
            assert dt is not None, "%s socket still open after 2.5s (handshake_timeout_ms=500)" % name
            assert 0.3 <= dt <= 2.0, "%s socket closed after %.2fs, want ~0.5s" % (name, dt)
        th.join(3)
        stop.set()
        tr = res.get("trickle")
        assert tr and tr[0] == "closed" and tr[1] <= 2.5, \
            "slowloris socket (1 byte/100 ms) not closed by the deadline: %r" % (tr,)
    finally:
        stop.set()
        silent.close()
        partial.close()
        th.join(3)


@suite.test
@uses("hsdeadline")
def handshake_deadline_spares_established_sessions(e):
    ws = open_worker(e.port)
    ws2 = open_ws(e.port, "/otel")
    try:
        time.sleep(1.5)
        ping_roundtrip(ws, b"still-here")
        json_ping(ws)
        ping_roundtrip(ws2, b"otel-here")
    finally:
        ws.close()
        ws2.close()


# =========================================================================== 7. oversize

@suite.test
@uses("limits")
def oversize_frame_1009_other_client_unaffected(e):
    a = open_worker(e.port)
    b = open_worker(e.port)
    try:
        send_quiet(a, frame(1, b"x" * 70000))
        assert_close_code(a, 1009)
        json_ping(b)
        c = open_worker(e.port)
        try:
            json_ping(c)
        finally:
            c.close()
    finally:
        a.close()
        b.close()


@suite.test
@uses("limits")
def oversize_message_limit_boundary(e):
    ws = open_ws(e.port, "/echo")
    try:
        echo_roundtrip(ws, 2, os.urandom(65536))
        data = os.urandom(65536)
        ws.send_raw(frame(2, data[:30000], fin=False) + frame(0, data[30000:], fin=True))
        op, p, n = recv_data(ws)
        assert p == data, "fragmented 65536-byte message not echoed"
        send_quiet(ws, frame(2, os.urandom(65537)))
        assert_close_code(ws, 1009)
    finally:
        ws.close()


@suite.test
@uses("limits")
def oversize_many_small_fragments_1009(e):
    ws = open_ws(e.port, "/echo")
    try:
        ok = send_quiet(ws, frame(1, b"a" * 1000, fin=False))
        for i in range(99):
            if not ok:
                break
            ok = send_quiet(ws, frame(0, b"b" * 1000, fin=(i == 98)))
        assert_close_code(ws, 1009)
    finally:
        ws.close()


@suite.test
@uses("framelimit")
def oversize_frame_limit_separate_from_message_limit(e):
    ws = open_ws(e.port, "/echo")
    try:
        data = os.urandom(12000)
        ws.send_raw(frame(2, data[:4000], fin=False) + frame(0, data[4000:8000], fin=False)
                    + frame(0, data[8000:], fin=True))
        op, p, n = recv_data(ws)
        assert p == data, "3 x 4000-byte fragments (max_frame_bytes 4096) not echoed"
        send_quiet(ws, frame(2, os.urandom(5000)))
        assert_close_code(ws, 1009)
    finally:
        ws.close()


# =========================================================================== 8. many connections

@suite.test
def many_connections_1000():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 4096
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            return "skip RLIMIT_NOFILE hard limit %d < %d" % (hard, want)
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    N = 1000
    t_start = time.time()
    with Engine(None) as e:
        base = health(e.port)["workers"]
        socks = []
        try:
            keys = []
            for start in range(0, N, 50):
                batch = []
                for i in range(start, min(N, start + 50)):
                    s = socket.create_connection(("127.0.0.1", e.port), timeout=10)
                    req, key = upgrade_request(e.port, "/?n=%d" % i)
                    s.sendall(req)
                    batch.append((s, key))
                for s, key in batch:
                    c = WS.__new__(WS)
                    c.sock, c.rbuf, c.status, c.resp_headers = s, b"", None, {}
                    st, h, _ = c.read_http(10.0)
                    assert st == 101, "connection %d: status %r" % (len(socks), st)
                    assert h.get("sec-websocket-accept") == accept_for(key)
                    socks.append(c)
                assert time.time() - t_start < 15, "too slow: %d connected after 15s" % len(socks)
            ids = set()
            for c in socks:
                m = c.recv_json(5.0)
                assert m["type"] == "workerregistered", m
                ids.add(m["worker_id"])
            assert len(ids) == N, "only %d distinct worker ids for %d connections" % (len(ids), N)
            for c in socks[::20]:
                json_ping(c)
            health(e.port)
            v = metric(e.port, "iii_connections_active")
            assert v >= N, "iii_connections_active=%r with %d clients connected" % (v, N)
        finally:
            for i, c in enumerate(socks):
                if i % 2 == 0:
                    try:
                        c.send_frame(8, close_payload(1000))
                    except OSError:
                        pass
                c.close()
        assert e.alive(), "engine died; stderr: %s" % stderr_tail(e)
        wait_health(e.port, lambda d: d["workers"] == base, timeout=5.0)
        wait_connections_drained(e.port)
        ws = open_worker(e.port)
        try:
            json_ping(ws)
        finally:
            ws.close()


# =========================================================================== 9. /otel

@suite.test
@uses("echo")
def otel_accepted_never_a_worker(e):
    wait_connections_drained(e.port)  # sockets of earlier tests are gone: a stable baseline
    base = health(e.port)["workers"]
    o = open_ws(e.port, "/otel")
    try:
        assert_silent(o, 0.3)  # no workerregistered, nothing
        o.send_frame(2, b'OTLP{"resourceSpans":[]}')
        o.send_frame(2, b'MTRC{"resourceMetrics":[]}')
        o.send_frame(2, b'LOGS{"resourceLogs":[]}')
        o.send_frame(2, b"OTLP\xff\xfe not utf-8")  # dropped with a warning, not a close
        o.send_frame(1, b"text frames are ignored")
        o.send_frame(2, b'{"type":"ping"}')  # no JSON pong on /otel
        assert_silent(o, 0.3)
        big = b"OTLP" + b'{"resourceSpans":[' + b"1," * (17 * 1024 * 1024 // 2) + b"1]}"
        o.send_frame(2, big)  # > 16 MiB frame is within the default 64 MiB limit
        ping_roundtrip(o, b"otel-ping", timeout=10.0)
        assert_silent(o, 0.2)
        assert health(e.port)["workers"] == base, "/otel connection counted as a worker"
        w = open_worker(e.port)
        try:
            w.send_json({"type": "invokefunction", "function_id": "engine::workers::register",
                         "data": {"runtime": "python", "version": "0", "name": "otel-control",
                                  "os": "linux", "pid": os.getpid()}, "action": {"type": "void"}})
            wait_health(e.port, lambda d: d["workers"] == base + 1)
        finally:
            w.close()
        ping_roundtrip(o, b"still-open")
    finally:
        o.close()


# =========================================================================== 10. command line

@suite.test
def cli_port_zero_listening_line():
    with Engine(None) as e:
        assert e.port != 0, "port 0 reported"
        time.sleep(0.2)
        lines = list(e.lines)
        pat = re.compile(r"^iii: listening on ws://127\.0\.0\.1:(\d+)$")
        matches = [l for l in lines if pat.match(l)]
        assert len(matches) == 1, "listening lines on stdout: %r" % lines
        assert int(pat.match(matches[0]).group(1)) == e.port
        assert lines == matches, "stdout has other lines besides the listening line: %r" % lines
        ws = open_worker(e.port)
        ws.close()


@suite.test
def cli_port_in_use_exits_nonzero():
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    tmp = tempfile.TemporaryDirectory(prefix="iii-test-")
    p = subprocess.Popen([BIN, "--port", str(port)], cwd=tmp.name,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        try:
            out, err = p.communicate(timeout=3.0)
        except subprocess.TimeoutExpired:
            raise AssertionError("engine still running 3s after failing to bind port %d" % port)
        assert p.returncode != 0, "exit code 0 on a port in use"
        assert p.returncode > 0, "killed by signal %d" % -p.returncode
        text = err.decode("utf-8", "replace")
        assert re.search(r"%d|bind|in use|address" % port, text, re.I), \
            "stderr does not mention the bind failure: %r" % text[-400:]
        assert b"listening on" not in out, "printed a listening line: %r" % out
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)
        blocker.close()
        tmp.cleanup()


@suite.test
def cli_host_ipv6():
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
    except OSError as ex:
        return "skip no ::1 on this machine (%s)" % ex
    with Engine(None, args=["--host", "::1"]) as e:
        line = [l for l in e.lines if "listening on" in l]
        assert line and line[0] == "iii: listening on ws://[::1]:%d" % e.port, \
            "listening line %r" % line
        c = raw_conn(e.port, host="::1")
        try:
            req, key = upgrade_request(e.port, "/", host_header="[::1]:%d" % e.port)
            c.send_raw(req)
            st, h, _ = c.read_http()
            assert st == 101, "status %r over IPv6" % st
            assert h.get("sec-websocket-accept") == accept_for(key)
            assert json.loads(recv_data(c)[1].decode())["type"] == "workerregistered"
            json_ping(c)
        finally:
            c.close()
        try:
            s4 = socket.create_connection(("127.0.0.1", e.port), timeout=1)
            s4.close()
            raise AssertionError("--host ::1 also accepts on 127.0.0.1")
        except (ConnectionRefusedError, socket.timeout):
            pass


# =========================================================================== 11. parser robustness

def _session_bytes(port):
    req, key = upgrade_request(port, "/echo")
    frames = (frame(1, b"one") + frame(2, b"\x00\x01\x02") + frame(9, b"pp")
              + frame(1, b"fr", fin=False) + frame(0, b"ag", fin=True)
              + frame(1, "\u20ac\U0001f600".encode()) + frame(2, os.urandom(300))
              + frame(8, close_payload(1000, "done")))
    return req, key, frames


def _check_session(c, key, frames):
    st, h, _ = c.read_http()
    assert st == 101, "status %r" % st
    assert h.get("sec-websocket-accept") == accept_for(key)
    got = []
    deadline = time.time() + 5
    while True:
        fin, op, p = read_frame_strict(c, max(0.01, deadline - time.time()))
        got.append((op, p))
        if op == 8:
            break
    ops = [g[0] for g in got]
    assert ops == [1, 2, 10, 1, 1, 2, 8], "frame sequence %r" % ops
    assert got[0][1] == b"one" and got[1][1] == b"\x00\x01\x02" and got[2][1] == b"pp"
    assert got[3][1] == b"frag" and got[4][1] == "\u20ac\U0001f600".encode()
    assert struct.unpack("!H", got[6][1][:2])[0] == 1000
    assert c.expect_eof(2.0), "TCP not closed after close handshake"


@suite.test
@uses("echo")
def robust_whole_session_in_one_write(e):
    req, key, frames = _session_bytes(e.port)
    c = raw_conn(e.port)
    try:
        c.send_raw(req + frames)
        _check_session(c, key, frames)
    finally:
        c.close()
    # worker path: upgrade + JSON ping in one write -> workerregistered first, then pong
    req, key = upgrade_request(e.port, "/")
    c = raw_conn(e.port)
    try:
        c.send_raw(req + frame(1, b'{"type":"ping"}'))
        st, h, _ = c.read_http()
        assert st == 101
        m1 = json.loads(recv_data(c)[1].decode())
        assert m1["type"] == "workerregistered", "first message %r" % m1
        m2 = json.loads(recv_data(c)[1].decode())
        assert m2 == {"type": "pong"}, "second message %r" % m2
    finally:
        c.close()


@suite.test
@uses("echo")
def robust_one_byte_per_write(e):
    req, key, frames = _session_bytes(e.port)
    c = raw_conn(e.port)
    try:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = req + frames
        for i in range(len(data)):
            c.sock.sendall(data[i:i + 1])
            time.sleep(0)
            if i % 16 == 0:
                time.sleep(0.0005)
        _check_session(c, key, frames)
    finally:
        c.close()


@suite.test
@uses("echo")
def robust_peer_vanishes_mid_echo(e):
    # the engine must survive writes to a socket the peer has reset (EPIPE / SIGPIPE)
    for _ in range(5):
        ws = open_ws(e.port, "/echo")
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        ws.sock.settimeout(2.0)
        try:
            for _ in range(4):
                ws.send_frame(2, os.urandom(1 << 20))
        except (socket.timeout, OSError):
            pass  # an engine applying backpressure may stop reading: fine
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws.close()  # RST
    time.sleep(0.3)
    ws = open_ws(e.port, "/echo")
    try:
        echo_roundtrip(ws, 1, b"survived")
    finally:
        ws.close()


# =========================================================================== 12. shutdown

@suite.test
def shutdown_sigterm_closes_1012_exit_0():
    with Engine(None, args=["--echo"]) as e:
        w = open_worker(e.port)
        x = open_ws(e.port, "/echo")
        o = open_ws(e.port, "/otel")
        try:
            t0 = time.time()
            e.proc.send_signal(signal.SIGTERM)
            problems = []
            for name, c in (("/", w), ("/echo", x), ("/otel", o)):
                try:
                    code = expect_server_close(c, max(0.2, t0 + 2.0 - time.time()))
                    if code != 1012:
                        problems.append("%s got close code %r, want 1012" % (name, code))
                except AssertionError as ex:
                    problems.append("%s: %s" % (name, ex))
                c.close()
            try:
                rc = e.proc.wait(max(0.1, t0 + 2.0 - time.time()))
            except subprocess.TimeoutExpired:
                rc = "still running after 2s"
            if rc != 0:
                problems.append("exit status %r, want 0" % (rc,))
            assert not problems, "; ".join(problems)
        finally:
            for c in (w, x, o):
                c.close()


@suite.test
def shutdown_sigint_unresponsive_client_bounded():
    """SIGINT with a client that never answers the Close: exit 0 within 3.5 s (the close
    flush may wait for the peer a little), and the client still got a Close 1012."""
    with Engine(None) as e:
        w = open_worker(e.port)
        try:
            t0 = time.time()
            e.proc.send_signal(signal.SIGINT)
            try:
                rc = e.proc.wait(3.5)
            except subprocess.TimeoutExpired:
                raise AssertionError("still running 3.5s after SIGINT")
            assert rc == 0, "exit status %r after SIGINT" % rc
            try:
                code = w.expect_close(1.0)
            except (Closed, TimeoutError) as ex:
                raise AssertionError("no Close frame before the engine exited (%s)" % ex)
            assert code == 1012, "close code %r, want 1012" % code
        finally:
            w.close()


# =========================================================================== 13. fuzz

def _fuzz_blob(rng, i):
    kind = i % 5
    if kind == 0:  # pure noise
        return rng.randbytes(rng.randint(1, 600))
    if kind == 1:  # random header bits, mostly masked, random short payload
        b0 = rng.randrange(256)
        n = rng.choice([rng.randint(0, 125), 126, 127])
        hdr = bytes([b0, (0x80 if rng.random() < 0.8 else 0) | n])
        if n == 126:
            hdr += struct.pack("!H", rng.randrange(65536))
        elif n == 127:
            hdr += struct.pack("!Q", rng.randrange(1 << 64))
        return hdr + rng.randbytes(4) + rng.randbytes(rng.randint(0, 300))
    if kind == 2:  # several well-formed frames with random opcodes / FIN
        out = b""
        for _ in range(rng.randint(1, 6)):
            out += frame(rng.randrange(16), rng.randbytes(rng.randint(0, 130)),
                         fin=rng.random() < 0.7)
        return out
    if kind == 3:  # JSON-ish garbage in valid text frames
        parts = ['{"type":', '"invokefunction"', '"registerfunction"', '"id":', '[', ']', '{',
                 '}', 'null', '1e999', '"\\ud800"', ',', '"function_id":"engine::', '"data":']
        s = "".join(rng.choice(parts) for _ in range(rng.randint(1, 30)))
        return frame(1, s.encode()) + frame(2, s.encode())
    # valid frame prefix then truncated / noise
    f = frame(rng.choice([1, 2, 9]), rng.randbytes(rng.randint(0, 200)))
    return f[:rng.randint(1, len(f))] + rng.randbytes(rng.randint(0, 50))


@suite.test
def fuzz_random_blobs_after_handshake():
    rng = random.Random(0x1111)
    with Engine(None) as e:
        base = health(e.port)["workers"]
        for i in range(200):
            blob = _fuzz_blob(rng, i)
            ws = open_ws(e.port, "/")
            try:
                send_quiet(ws, blob)
                if i % 10 == 0:  # sometimes wait for the engine's reaction
                    ws.expect_eof(0.1)
            finally:
                ws.close()
            if i % 50 == 49:
                assert e.alive(), "engine died at blob %d (%r); stderr: %s" % (
                    i, blob[:80], stderr_tail(e))
                health(e.port)
        assert e.alive(), "engine died; stderr: %s" % stderr_tail(e)
        wait_health(e.port, lambda d: d["workers"] == base, timeout=5.0)
        wait_connections_drained(e.port)
        ws = open_worker(e.port)
        try:
            json_ping(ws)
        finally:
            ws.close()


def _hello_within(port, timeout):
    """A TCP connect + upgrade; True when workerregistered arrives within timeout."""
    w = WS(port, handshake=False)
    key = base64.b64encode(os.urandom(16)).decode()
    w.send_raw(("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n" % key).encode())
    try:
        st, _, _ = w.read_http(timeout)
        return w, st == 101 and json.loads(w.recv_msg(timeout)[1])["type"] == "workerregistered"
    except (TimeoutError, Closed):
        return w, False


@suite.test
def max_connections_pauses_accept_then_resumes():
    cfg = "workers:\n  - name: iii-worker-manager\n    config: { max_connections: 4 }\n"
    with Engine(config=cfg) as e:
        conns = [WS(e.port) for _ in range(4)]
        for c in conns:
            assert c.recv_json()["type"] == "workerregistered"
        extra, got = _hello_within(e.port, 0.7)
        assert not got, "a 5th connection was served above max_connections: 4"
        conns[0].close()
        # the waiting peer is accepted from the backlog once a slot frees up
        try:
            st, _, _ = extra.read_http(3.0)
            ok = st == 101 and json.loads(extra.recv_msg(3.0)[1])["type"] == "workerregistered"
        except (TimeoutError, Closed) as ex:
            ok = False
        assert ok, "the 5th connection was not served after one closed"
        for c in conns[1:] + [extra]:
            c.close()


@suite.test
def fd_exhaustion_backs_off_and_recovers():
    """Engine started with RLIMIT_NOFILE 24: connecting 40 peers exhausts its descriptors
    (EMFILE); it must neither spin nor die, and serves again once peers leave."""
    import wslib
    d = tempfile.mkdtemp(prefix="iii-emfile-")
    wrap = os.path.join(d, "iii-lowfd")
    with open(wrap, "w") as f:
        f.write("#!/bin/sh\nulimit -n 24 || exit 99\nexec %s \"$@\"\n" % BIN)
    os.chmod(wrap, 0o755)
    saved = wslib.BIN
    wslib.BIN = wrap
    try:
        with Engine() as e:
            peers = []
            for _ in range(40):
                try:
                    peers.append(socket.create_connection(("127.0.0.1", e.port), timeout=2))
                except OSError:
                    break
            time.sleep(1.0)
            # busy-looping on EMFILE would burn a core: the engine's CPU time must stay low
            with open("/proc/%d/stat" % e.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            assert e.alive(), "engine died on descriptor exhaustion"
            assert cpu < 0.6, "engine used %.2fs CPU in ~1s of EMFILE: accept is spinning" % cpu
            for p in peers:
                p.close()
            time.sleep(0.3)
            w, got = _hello_within(e.port, 3.0)
            w.close()
            assert got, "engine did not serve a new worker after descriptors were freed"
    finally:
        wslib.BIN = saved
        import shutil
        shutil.rmtree(d, ignore_errors=True)


@suite.test
def shared_engines_exit_cleanly():
    """Every shared engine, stopped with SIGTERM, exits 0 (under ASan: no leak/error report)."""
    if not _ENGINES:
        return "skip no shared engine was started"
    bad = []
    for name, e in list(_ENGINES.items()):
        rc = e.stop(timeout=5.0)
        err = e.stderr()
        if rc != 0:
            bad.append("%s: exit status %r; stderr tail: %s" % (name, rc, err[-300:]))
        elif "ERROR: AddressSanitizer" in err or "runtime error:" in err:
            bad.append("%s: sanitizer report: %s" % (name, err[-300:]))
        del _ENGINES[name]
    assert not bad, "; ".join(bad)


# ===========================================================================

def main():
    if not (os.path.isfile(BIN) and os.access(BIN, os.X_OK)):
        print("not ok - engine_binary_present: %s is not an executable (set III_BIN)" % BIN,
              flush=True)
        return 1
    try:
        return suite.run()
    finally:
        STACK.close()


if __name__ == "__main__":
    sys.exit(main())
