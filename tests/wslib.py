"""Shared helpers for the black-box tests: start/stop the engine, a raw RFC 6455 client.

Standard library only. Every wait is bounded; every process started is stopped by pid/pgid.
Output convention for suites (read by test.sh): one line per test, `ok - NAME`, `not ok - NAME: why`
or `skip - NAME: why`.
"""
import base64
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("III_BIN", os.path.join(ROOT, "iii"))
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Engine:
    """One engine process on 127.0.0.1 with --port 0; `port` is read from the listening line.

    config: YAML text written to a temp file (None = no config file, i.e. built-in defaults).
    """

    def __init__(self, config=None, args=(), env=None, start_timeout=10.0):
        self.tmp = tempfile.mkdtemp(prefix="iii-test-")
        self.cfg = os.path.join(self.tmp, "config.yaml")
        if config is not None:
            with open(self.cfg, "w") as f:
                f.write(config)
        e = dict(os.environ)
        if env:
            e.update(env)
        self.logpath = os.path.join(self.tmp, "engine.log")
        self.log = open(self.logpath, "wb")
        # no config: no -c (a named config file must exist), and the engine runs in the empty
        # temp dir, so the default ./config.yaml is absent and built-in defaults apply
        argv = [BIN] + (["-c", self.cfg] if config is not None else []) + ["--port", "0"] + list(args)
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, env=e,
                                     start_new_session=True, cwd=self.tmp)
        self.port = None
        self.lines = []
        deadline = time.time() + start_timeout
        buf = b""
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.time() < deadline and self.port is None:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
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
            raise RuntimeError("engine did not report a listening port; log:\n" + self.stderr())
        # keep draining stdout so the engine never blocks on a full pipe
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def _drain_stdout(self):
        fd = self.proc.stdout.fileno()
        os.set_blocking(fd, True)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._outbuf += chunk
            while b"\n" in self._outbuf:
                line, self._outbuf = self._outbuf.split(b"\n", 1)
                self.lines.append(line.decode("utf-8", "replace"))

    def alive(self):
        return self.proc.poll() is None

    def stderr(self):
        self.log.flush()
        with open(self.logpath, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def sanitizer_report(self):
        """The first sanitizer/leak report line in the engine's stderr, or None."""
        for l in self.stderr().splitlines():
            if "AddressSanitizer" in l or "LeakSanitizer" in l or "runtime error:" in l:
                return l
        return None

    def stop(self, sig=signal.SIGTERM, timeout=5.0):
        """Stop the engine; returns its exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
                return None
        return self.proc.returncode

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *a):
        self.stop()
        rep = self.sanitizer_report()
        if rep and exc_type is None:
            raise AssertionError("engine sanitizer report: " + rep)
        if exc_type is None:
            import shutil
            self.log.close()
            shutil.rmtree(self.tmp, ignore_errors=True)


class Closed(Exception):
    pass


class WS:
    """A raw, blocking RFC 6455 client with full control over what goes on the wire."""

    def __init__(self, port, path="/", host="127.0.0.1", headers=None, timeout=5.0,
                 handshake=True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.rbuf = b""
        self.status = None
        self.resp_headers = {}
        if handshake:
            key = base64.b64encode(os.urandom(16)).decode()
            req = "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" \
                  "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n" % (path, host, port, key)
            for k, v in (headers or {}).items():
                req += "%s: %s\r\n" % (k, v)
            req += "\r\n"
            self.sock.sendall(req.encode())
            self.status, self.resp_headers, _ = self.read_http()
            if self.status == 101:
                want = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
                got = self.resp_headers.get("sec-websocket-accept")
                if got != want:
                    raise AssertionError("bad Sec-WebSocket-Accept %r != %r" % (got, want))

    def read_http(self, timeout=5.0):
        """Reads one HTTP response head (+ body if Content-Length). Returns (status, headers, body)."""
        deadline = time.time() + timeout
        while b"\r\n\r\n" not in self.rbuf:
            self._fill(deadline)
        head, self.rbuf = self.rbuf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for l in lines[1:]:
            k, _, v = l.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        body = b""
        n = int(hdrs.get("content-length", "0") or 0)
        while len(self.rbuf) < n:
            self._fill(deadline)
        body, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return status, hdrs, body

    def _fill(self, deadline):
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError("timed out")
        self.sock.settimeout(left)
        try:
            d = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("timed out")
        except (ConnectionResetError, BrokenPipeError):
            d = b""
        if not d:
            raise Closed("connection closed by peer")
        self.rbuf += d

    def send_raw(self, data):
        self.sock.sendall(data)

    @staticmethod
    def frame(opcode, payload=b"", fin=True, mask=True, rsv=0, length=None):
        if isinstance(payload, str):
            payload = payload.encode()
        b0 = (0x80 if fin else 0) | (rsv << 4) | opcode
        n = len(payload) if length is None else length
        m = 0x80 if mask else 0
        if n < 126:
            hdr = struct.pack("!BB", b0, m | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", b0, m | 126, n)
        else:
            hdr = struct.pack("!BBQ", b0, m | 127, n)
        if mask:
            key = os.urandom(4)
            body = bytes(b ^ key[i & 3] for i, b in enumerate(payload)) if len(payload) < 4096 \
                else _xor(payload, key)
            return hdr + key + body
        return hdr + payload

    def send_frame(self, opcode, payload=b"", **kw):
        self.sock.sendall(self.frame(opcode, payload, **kw))

    def send_text(self, s):
        self.send_frame(1, s)

    def send_json(self, obj):
        self.send_frame(1, json.dumps(obj, separators=(",", ":")))

    def recv_frame(self, timeout=5.0):
        """Returns (fin, opcode, payload). Raises Closed on EOF, TimeoutError on timeout."""
        deadline = time.time() + timeout
        while True:
            if len(self.rbuf) >= 2:
                b0, b1 = self.rbuf[0], self.rbuf[1]
                n = b1 & 0x7F
                off = 2
                if n == 126:
                    if len(self.rbuf) < 4:
                        self._fill(deadline)
                        continue
                    n = struct.unpack("!H", self.rbuf[2:4])[0]
                    off = 4
                elif n == 127:
                    if len(self.rbuf) < 10:
                        self._fill(deadline)
                        continue
                    n = struct.unpack("!Q", self.rbuf[2:10])[0]
                    off = 10
                if b1 & 0x80:
                    raise AssertionError("server frame is masked")
                if len(self.rbuf) >= off + n:
                    payload = self.rbuf[off:off + n]
                    self.rbuf = self.rbuf[off + n:]
                    return bool(b0 & 0x80), b0 & 0x0F, payload
            self._fill(deadline)

    def recv_msg(self, timeout=5.0):
        """Next data message (opcode, payload), answering nothing; pings/pongs are skipped."""
        deadline = time.time() + timeout
        while True:
            fin, op, p = self.recv_frame(max(0.01, deadline - time.time()))
            if op in (9, 10):
                continue
            if op == 8:
                raise Closed("close frame %r" % (p,))
            return op, p

    def recv_json(self, timeout=5.0):
        op, p = self.recv_msg(timeout)
        return json.loads(p.decode())

    def recv_json_until(self, pred, timeout=5.0):
        """Reads JSON frames until pred(msg) is true; returns (msg, skipped)."""
        deadline = time.time() + timeout
        skipped = []
        while True:
            m = self.recv_json(max(0.01, deadline - time.time()))
            if pred(m):
                return m, skipped
            skipped.append(m)

    def expect_close(self, timeout=5.0):
        """Reads until a Close frame; returns its code (None if empty). Raises on timeout."""
        deadline = time.time() + timeout
        while True:
            fin, op, p = self.recv_frame(max(0.01, deadline - time.time()))
            if op == 8:
                return struct.unpack("!H", p[:2])[0] if len(p) >= 2 else None

    def expect_eof(self, timeout=5.0):
        """True when the peer closes the TCP connection within timeout (frames are discarded)."""
        deadline = time.time() + timeout
        try:
            while True:
                self._fill(deadline)
                self.rbuf = b""
        except Closed:
            return True
        except TimeoutError:
            return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def _xor(data, key):
    k = (key * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(k, "big")).to_bytes(len(data), "big")


class Suite:
    """Minimal runner: @suite.test registers; run() prints ok/not ok lines and returns exit code."""

    def __init__(self):
        self.tests = []

    def test(self, fn):
        self.tests.append(fn)
        return fn

    def run(self):
        only = os.environ.get("III_TEST_ONLY")
        failed = 0
        for fn in self.tests:
            name = fn.__name__
            if only and only not in name:
                continue
            t0 = time.time()
            try:
                r = fn()
                if isinstance(r, str) and r.startswith("skip"):
                    print("skip - %s: %s" % (name, r[5:]), flush=True)
                    continue
                print("ok - %s (%.2fs)" % (name, time.time() - t0), flush=True)
            except Exception as e:  # noqa: BLE001 - report every failure as a line
                failed += 1
                msg = ("%s: %s" % (type(e).__name__, e)).replace("\n", " | ")[:600]
                print("not ok - %s: %s" % (name, msg), flush=True)
        return 1 if failed else 0


def worker_hello(ws, name="w", namespace=None, pid=None, timeout=5.0):
    """Reads workerregistered and sends engine::workers::register like the SDK. Returns worker_id."""
    m = ws.recv_json(timeout)
    assert m["type"] == "workerregistered", m
    data = {"runtime": "python", "version": "0", "name": name, "os": "linux",
            "pid": pid if pid is not None else os.getpid()}
    if namespace is not None:
        data["namespace"] = namespace
    ws.send_json({"type": "invokefunction", "function_id": "engine::workers::register",
                  "data": data, "action": {"type": "void"}})
    return m["worker_id"]


def call(ws, function_id, data, timeout=5.0, **extra):
    """Synchronous invoke; returns the invocationresult frame for this call."""
    import uuid
    iid = str(uuid.uuid4())
    msg = {"type": "invokefunction", "invocation_id": iid, "function_id": function_id, "data": data}
    msg.update(extra)
    ws.send_json(msg)
    m, _ = ws.recv_json_until(lambda x: x.get("type") == "invocationresult"
                              and x.get("invocation_id") == iid, timeout)
    return m
