#!/usr/bin/env python3
"""A complete iii worker in one file, Python standard library only (no pip).

    python3 worker.py                    # serve py::add until stopped (Ctrl-C)
    python3 worker.py call ID [JSON]     # call any function once, print the JSON result

The engine address is $III_URL (default ws://127.0.0.1:49134). The worker:

  * connects, waits for `workerregistered`, registers `py::add`, then announces itself with
    `engine::workers::register` (void call) so the engine applies the registration at once;
  * answers every `invokefunction` for `py::add` with an `invocationresult`;
  * calls its own `py::add` once through the engine, to show the calling side as well;
  * answers WebSocket pings, and reconnects with backoff (1 s doubling to 30 s) when the
    connection ends: close code 1012 (engine restart), any other close it did not ask for, EOF.

The WebSocket client below (RFC 6455: handshake, masking, text frames, fragments, ping/pong,
close) is deliberately small; it is enough for the iii protocol, which uses one JSON object per
text frame.
"""

import base64
import hashlib
import json
import os
import random
import socket
import struct
import sys
import time
import uuid
from urllib.parse import urlsplit

URL = os.environ.get("III_URL", "ws://127.0.0.1:49134")
NAME = os.environ.get("III_WORKER_NAME", "py-example")
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def log(*a):
    print("[py-worker]", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# A minimal WebSocket client


class Closed(Exception):
    """The connection ended. code is the peer's close code (None: EOF or socket error)."""

    def __init__(self, code=None, reason=""):
        super().__init__(f"closed code={code} reason={reason!r}")
        self.code = code


class WebSocket:
    def __init__(self, url, timeout=10.0):
        u = urlsplit(url)
        if u.scheme != "ws":
            raise ValueError("only ws:// URLs are supported by this example")
        host, port = u.hostname or "127.0.0.1", u.port or 80
        path = (u.path or "/") + (("?" + u.query) if u.query else "")
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        key = base64.b64encode(os.urandom(16)).decode()
        hosthdr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        req = (f"GET {path} HTTP/1.1\r\nHost: {hosthdr}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            raise ConnectionError(f"upgrade refused: {lines[0]}")
        headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
        want = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            raise ConnectionError("bad Sec-WebSocket-Accept")
        self.sock.settimeout(None)
        self.closing = False

    def _fill(self):
        try:
            chunk = self.sock.recv(65536)
        except (OSError, socket.timeout):
            chunk = b""
        if not chunk:
            raise Closed(None, "EOF")
        self.buf += chunk

    def _take(self, n):
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send_frame(self, opcode, payload):
        # Client-to-server frames are always masked with a fresh 4-byte key.
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        try:
            self.sock.sendall(head + mask + masked)
        except OSError:
            raise Closed(None, "send failed")

    def send_json(self, obj):
        self._send_frame(0x1, json.dumps(obj, separators=(",", ":")).encode())

    def recv_json(self):
        """Next text (or binary) message parsed as JSON; control frames are handled here."""
        parts, first_op = [], None
        while True:
            b0, b1 = self._take(2)
            fin, op, n = b0 & 0x80, b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8))
            mask = self._take(4) if b1 & 0x80 else None  # servers never mask, but be lenient
            data = self._take(n)
            if mask:
                data = bytes(b ^ mask[i & 3] for i, b in enumerate(data))
            if op == 0x9:  # ping -> pong with the same payload
                self._send_frame(0xA, data)
            elif op == 0xA:  # pong
                pass
            elif op == 0x8:  # close: answer it (once), then report it
                code = struct.unpack("!H", data[:2])[0] if len(data) >= 2 else None
                if not self.closing:
                    self.closing = True
                    try:
                        self._send_frame(0x8, data[:2])
                    except Closed:
                        pass
                self.sock.close()
                raise Closed(code, data[2:].decode("utf-8", "replace"))
            else:  # 0x1 text, 0x2 binary, 0x0 continuation
                if op != 0:
                    first_op = op
                parts.append(data)
                if fin:
                    msg = b"".join(parts)
                    parts = []
                    if first_op in (0x1, 0x2) and msg.strip():
                        return json.loads(msg)

    def close(self, code=1000):
        if not self.closing:
            self.closing = True
            try:
                self._send_frame(0x8, struct.pack("!H", code))
            except Closed:
                pass
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------------------------
# The worker


def add(data):
    """The function this worker provides: {"a": x, "b": y} -> {"sum": x + y}."""
    a, b = data.get("a"), data.get("b")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
        raise ValueError("py::add wants numbers a and b")
    return {"sum": a + b}


FUNCTIONS = {"py::add": (add, "Add two numbers: {a, b} -> {sum}")}


def announce(ws):
    """Register functions, then tell the engine who we are (this ends registration buffering)."""
    for fid, (_, desc) in FUNCTIONS.items():
        ws.send_json({"type": "registerfunction", "id": fid, "description": desc})
    ws.send_json({
        "type": "invokefunction",
        "function_id": "engine::workers::register",
        "action": {"type": "void"},
        "data": {"runtime": "python", "version": "0.1.0", "name": NAME, "pid": os.getpid(),
                 "os": sys.platform, "description": "stdlib-only example worker"},
    })


def handle_invoke(ws, msg):
    fid, iid = msg.get("function_id"), msg.get("invocation_id")
    reply = {"type": "invocationresult", "invocation_id": iid, "function_id": fid}
    entry = FUNCTIONS.get(fid)
    if entry is None:
        reply["error"] = {"code": "function_not_found", "message": f"{fid} is not served here"}
    else:
        try:
            reply["result"] = entry[0](msg.get("data"))
        except Exception as e:  # the handler's failure goes back to the caller
            reply["error"] = {"code": "invocation_failed", "message": str(e)}
    if iid:  # the engine always sends one; a reply without it would be dropped
        ws.send_json(reply)


def serve():
    backoff, prev, self_test_done = 1.0, None, False
    while True:
        try:
            ws = WebSocket(URL)
        except (OSError, ConnectionError) as e:
            log(f"cannot connect to {URL}: {e}; retrying in {backoff:.0f}s")
            time.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 30.0)
            continue
        connected_at = time.monotonic()
        pending = {}  # invocation_id -> what to do with the result
        try:
            first = ws.recv_json()
            if first.get("type") != "workerregistered":
                raise ConnectionError(f"unexpected first frame {first}")
            log(f"connected to {URL} as worker {first['worker_id']}")
            if prev:  # after a network blip the old connection may still linger: take it over
                ws.send_json({"type": "reattach", "previous_worker_id": prev[0], "reattach_token": prev[1]})
            prev = (first["worker_id"], first.get("reattach_token"))
            announce(ws)
            if not self_test_done:
                iid = str(uuid.uuid4())
                pending[iid] = "self-test"
                ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": "py::add",
                              "data": {"a": 2, "b": 40}})
            while True:
                msg = ws.recv_json()
                t = msg.get("type")
                if t == "invokefunction":
                    handle_invoke(ws, msg)
                elif t == "invocationresult" and msg.get("invocation_id") in pending:
                    pending.pop(msg["invocation_id"])
                    self_test_done = True
                    log("self-test: py::add(2, 40) ->", json.dumps(msg.get("error") or msg.get("result")))
                elif t == "ping":
                    ws.send_json({"type": "pong"})
                elif t == "registrationrejected":
                    log("registration rejected:", json.dumps(msg))
                    if msg.get("code") == "WORKER_NAMESPACE_CONFLICT":
                        ws.close()
                        return 1
        except (Closed, ConnectionError, ValueError) as e:  # ValueError: a frame that is not JSON
            ws.close()
            if time.monotonic() - connected_at > 60:
                backoff = 1.0
            code = getattr(e, "code", None)
            why = "engine restarting" if code == 1012 else f"close code {code}" if code else f"connection lost: {e}"
            log(f"disconnected ({why}); reconnecting in {backoff:.0f}s")
            time.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 30.0)
        except KeyboardInterrupt:
            ws.close(1000)
            return 0


def call(function_id, data, timeout=10.0):
    """One call through the engine: connect, invoke, print the result, close."""
    ws = WebSocket(URL)
    ws.sock.settimeout(timeout)
    try:
        ws.recv_json()  # workerregistered
        iid = str(uuid.uuid4())
        ws.send_json({"type": "invokefunction", "invocation_id": iid, "function_id": function_id, "data": data})
        while True:
            msg = ws.recv_json()
            if msg.get("type") == "invocationresult" and msg.get("invocation_id") == iid:
                if "error" in msg:
                    print(json.dumps({"error": msg["error"]}))
                    return 1
                print(json.dumps(msg.get("result")))
                return 0
    except Closed as e:
        log(f"no answer: {e}")
        return 3
    finally:
        ws.close()


def main(argv):
    if len(argv) >= 2 and argv[0] == "call":
        return call(argv[1], json.loads(argv[2]) if len(argv) > 2 else {})
    if argv:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    try:
        return serve()
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sys.exit(main(sys.argv[1:]))
