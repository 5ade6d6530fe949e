// Shared helpers for the iii-sdk interop suite.
//
// * startEngine(): runs the engine binary ($III_BIN, default ../../iii relative to this
//   directory) with `-c <tmp config> --port N` and parses the listening line from stdout.
// * spawnWorker(): runs tests/interop/workers/worker.mjs (an SDK worker described by a JSON
//   spec) in its own process group; its events arrive as `EVT {json}` lines on stdout.
// * client(): an in-process SDK worker (OTel off unless asked) for the test itself.
// * RawClient: a hand-rolled protocol client on top of `ws`, only for what the SDK cannot
//   express (namespace on a call, seeing registrationrejected frames).
//
// Every wait is bounded; every process started here is stopped by pid / process group, also
// when the test process exits or is told to stop.

import { spawn } from 'node:child_process';
import http from 'node:http';
import net from 'node:net';
import { mkdtempSync, writeFileSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { registerWorker } from 'iii-sdk';
import { WebSocket } from 'ws';

export const HERE = path.dirname(fileURLToPath(import.meta.url));
export const III_BIN = process.env.III_BIN
  ? path.resolve(process.cwd(), process.env.III_BIN)
  : path.resolve(HERE, '../../iii');
export const WORKER_SCRIPT = path.join(HERE, 'workers', 'worker.mjs');

// ---------------------------------------------------------------------------------------------
// SDK console noise: the SDK prints `[iii] ...` lines with console.debug (worker registered,
// reconnecting ...). Keep them (tests inspect them) but do not print them into the TAP stream.
export const sdkLog = [];
const origDebug = console.debug.bind(console);
console.debug = (...args) => {
  const line = args.map((a) => (typeof a === 'string' ? a : safeJson(a))).join(' ');
  sdkLog.push({ t: Date.now(), line });
  if (process.env.III_TEST_VERBOSE) origDebug(...args);
};
// The OTel helper prints `[OTel] ...` with console.log when OTel is on; same treatment.
const origLog = console.log.bind(console);
console.log = (...args) => {
  if (typeof args[0] === 'string' && args[0].startsWith('[OTel]')) {
    sdkLog.push({ t: Date.now(), line: args.map((a) => (typeof a === 'string' ? a : safeJson(a))).join(' ') });
    if (!process.env.III_TEST_VERBOSE) return;
  }
  origLog(...args);
};
function safeJson(v) {
  try { return JSON.stringify(v); } catch { return String(v); }
}

// ---------------------------------------------------------------------------------------------
// process bookkeeping

const live = new Set(); // { kill(sig) } objects

function killAllSync() {
  for (const p of live) {
    try { p.killNow(); } catch { /* already gone */ }
  }
  live.clear();
}
process.on('exit', killAllSync);
for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP']) {
  process.on(sig, () => { killAllSync(); process.exit(128 + 1); });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Poll `fn` until it returns a truthy value (returned) or `timeout` ms pass (throws). */
export async function waitFor(fn, { timeout = 5000, interval = 50, what = 'condition' } = {}) {
  const deadline = Date.now() + timeout;
  let lastErr;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      lastErr = e;
    }
    if (Date.now() >= deadline) {
      const detail = lastErr ? ` (last error: ${lastErr.message})` : ` (last value: ${trunc(safeJson(last), 400)})`;
      const w = typeof what === 'function' ? what() : what; // a function: described at failure time
      throw new Error(`timed out after ${timeout} ms waiting for ${w}${detail}`);
    }
    await sleep(interval);
  }
}

/** Race a promise against a bound. */
export function within(promise, ms, what = 'operation') {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, rej) => { timer = setTimeout(() => rej(new Error(`${what} did not settle within ${ms} ms`)), ms); }),
  ]).finally(() => clearTimeout(timer));
}

export function trunc(s, n = 300) {
  s = String(s);
  return s.length > n ? `${s.slice(0, n)}…(${s.length} chars)` : s;
}

// ---------------------------------------------------------------------------------------------
// engine

const DEFAULT_CONFIG = `workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
`;

/**
 * Start the engine. Resolves to { url, port, pid, stop(), stderr(), stdout(), exited }.
 * `port` 0 = any free port.
 */
export async function startEngine({ port = 0, config = DEFAULT_CONFIG, env = {}, timeout = 10000 } = {}) {
  if (!existsSync(III_BIN)) {
    throw new Error(`engine binary not found: ${III_BIN} (build it, or set III_BIN)`);
  }
  const dir = mkdtempSync(path.join(tmpdir(), 'iii-interop-'));
  const cfg = path.join(dir, 'config.yaml');
  writeFileSync(cfg, config);
  const child = spawn(III_BIN, ['-c', cfg, '--port', String(port)], {
    cwd: dir,
    env: { ...process.env, III_LOG: process.env.III_LOG || 'info', ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (d) => { out += d; if (out.length > 1e6) out = out.slice(-5e5); });
  child.stderr.on('data', (d) => { err += d; if (err.length > 1e6) err = err.slice(-5e5); });
  let exitInfo = null;
  const exited = new Promise((resolve) => {
    child.on('exit', (code, signal) => resolve({ code, signal }));
    child.on('error', (e) => resolve({ code: null, signal: null, error: e.message })); // e.g. ENOENT
  });
  exited.then((x) => { exitInfo = x; });
  const handle = {
    pid: child.pid,
    child,
    exited,
    stdout: () => out,
    stderr: () => err,
    killNow: () => { if (!exitInfo) process.kill(child.pid, 'SIGKILL'); },
    async stop(graceMs = 3000) {
      if (!exitInfo) {
        try { process.kill(child.pid, 'SIGTERM'); } catch { /* gone */ }
        const t = setTimeout(() => { try { process.kill(child.pid, 'SIGKILL'); } catch { /* gone */ } }, graceMs);
        await exited;
        clearTimeout(t);
      }
      live.delete(handle);
      try { rmSync(dir, { recursive: true, force: true }); } catch { /* ignore */ }
      if (process.env.III_ENGINE_LOG_DIR) { // keep the engine's stderr for later inspection
        try {
          writeFileSync(path.join(process.env.III_ENGINE_LOG_DIR, `engine-${process.pid}-${child.pid}.log`), err);
        } catch { /* ignore */ }
      }
      return exitInfo;
    },
  };
  live.add(handle);
  child.on('error', (e) => { err += `\nspawn error: ${e.message}`; });
  const m = await new Promise((resolve, reject) => {
    const re = /^iii: listening on (ws:\/\/(?:127\.0\.0\.1|\[::1\]):(\d+))\s*$/m;
    const timer = setTimeout(() => {
      reject(new Error(`engine did not print its listening line within ${timeout} ms; stdout=${trunc(out)} stderr=${trunc(err, 2000)}`));
    }, timeout);
    const check = () => {
      const mm = out.match(re);
      if (mm) { clearTimeout(timer); resolve(mm); }
    };
    child.stdout.on('data', check);
    exited.then(({ code, signal, error }) => {
      clearTimeout(timer);
      reject(new Error(`engine ${III_BIN} exited (code ${code}, signal ${signal}${error ? `, ${error}` : ''}) before listening; stderr=${trunc(err, 2000)}`));
    });
    check();
  }).catch(async (e) => { await handle.stop(500); throw e; });
  handle.url = m[1];
  handle.port = Number(m[2]);
  return handle;
}

// ---------------------------------------------------------------------------------------------
// worker processes

/**
 * Spawn an SDK worker process (workers/worker.mjs) described by `spec`:
 * {
 *   name, description, otel (bool, default false), namespace (string, sets it through an
 *   early engine::workers::register call, see worker.mjs),
 *   functions: [{ id, kind: 'echo'|'throw'|'sleep'|'record'|'stringify'|'relay'|'null'|'consume_channel'|'inc', ...opts, options? }],
 *   triggerTypes: [{ id, description }],
 *   triggers: [{ type, function_id, config, metadata }],
 * }
 * Returns { pid, events, waitEvent(pred, timeout), output(), kill(sig), stop(), exited }.
 */
export function spawnWorker(url, spec, { env = {} } = {}) {
  const child = spawn(process.execPath, [WORKER_SCRIPT], {
    cwd: HERE,
    detached: true, // own process group: killed as a group
    env: {
      ...process.env,
      III_URL: url,
      OTEL_ENABLED: spec.otel ? 'true' : 'false',
      WORKER_SPEC: JSON.stringify(spec),
      ...env,
    },
    stdio: ['pipe', 'pipe', 'pipe'], // stdin: the worker exits when it closes (test process died)
  });
  const events = [];
  const waiters = [];
  let out = '';
  let errOut = '';
  let buf = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  child.stdout.on('data', (d) => {
    out += d;
    if (out.length > 2e6) out = out.slice(-1e6);
    buf += d;
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, i);
      buf = buf.slice(i + 1);
      if (line.startsWith('EVT ')) {
        let ev;
        try { ev = JSON.parse(line.slice(4)); } catch { continue; }
        ev.t = Date.now();
        events.push(ev);
        for (const w of [...waiters]) {
          if (w.pred(ev)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(ev); }
        }
      }
    }
  });
  child.stderr.on('data', (d) => { errOut += d; if (errOut.length > 2e6) errOut = errOut.slice(-1e6); });
  let exitInfo = null;
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => { exitInfo = { code, signal }; resolve(exitInfo); }));
  const handle = {
    pid: child.pid,
    name: spec.name,
    child,
    events,
    exited,
    output: () => out,
    errors: () => errOut,
    /** Wait for an event (already seen or future) matching pred. */
    waitEvent(pred, timeout = 5000, what = 'worker event') {
      const seen = events.find(pred);
      if (seen) return Promise.resolve(seen);
      return new Promise((resolve, reject) => {
        const w = { pred, resolve };
        waiters.push(w);
        setTimeout(() => {
          const i = waiters.indexOf(w);
          if (i >= 0) {
            waiters.splice(i, 1);
            reject(new Error(`${spec.name}: timed out after ${timeout} ms waiting for ${what}; events=${trunc(safeJson(events), 1500)} stderr=${trunc(errOut, 1500)}`));
          }
        }, timeout);
      });
    },
    kill(sig = 'SIGKILL') {
      if (exitInfo) return;
      try { process.kill(-child.pid, sig); } catch { /* gone */ }
    },
    killNow() { handle.kill('SIGKILL'); },
    async stop(graceMs = 3000) {
      if (!exitInfo) {
        handle.kill('SIGTERM');
        const t = setTimeout(() => handle.kill('SIGKILL'), graceMs);
        await exited;
        clearTimeout(t);
      }
      live.delete(handle);
      return exitInfo;
    },
  };
  live.add(handle);
  return handle;
}

// ---------------------------------------------------------------------------------------------
// in-process SDK clients

const clients = new Set();

/** An SDK worker inside the test process. OTel is off unless `otel: true`. */
export function client(url, { name = `test-client-${process.pid}`, otel = false, ...opts } = {}) {
  const c = registerWorker(url, {
    workerName: name,
    otel: otel ? undefined : { enabled: false },
    enableMetricsReporting: otel, // metrics need OTel; off avoids a console warning
    invocationTimeoutMs: 15000,
    ...opts,
  });
  clients.add(c);
  return c;
}

export async function shutdownClient(c) {
  clients.delete(c);
  try { await within(c.shutdown(), 3000, 'sdk shutdown'); } catch { /* ignore */ }
}

export async function shutdownAllClients() {
  for (const c of [...clients]) await shutdownClient(c);
}

/** trigger() with a bounded timeout; returns the result or throws the SDK error. */
export function call(c, function_id, payload, timeoutMs = 10000, extra = {}) {
  return c.trigger({ function_id, payload, timeoutMs, ...extra });
}

/** Call and return the error (fails if the call resolves). */
export async function callErr(c, function_id, payload, timeoutMs = 10000) {
  try {
    const r = await call(c, function_id, payload, timeoutMs);
    throw new Error(`expected ${function_id} to fail, it returned ${trunc(safeJson(r))}`);
  } catch (e) {
    if (e.message.startsWith(`expected ${function_id} to fail`)) throw e;
    return e;
  }
}

/** Wait until engine::functions::list shows every id in `ids` (all namespaces). */
export async function waitFunctions(c, ids, { timeout = 8000, present = true, filter } = {}) {
  return waitFor(async () => {
    const r = await call(c, 'engine::functions::list', { include_internal: true }, 3000);
    const rows = (r && r.functions) || [];
    const ok = ids.every((id) => {
      const hit = rows.some((f) => f.function_id === id && (!filter || filter(f)));
      return present ? hit : !hit;
    });
    return ok ? rows : false;
  }, { timeout, interval: 100, what: `functions ${ids.join(', ')} to be ${present ? 'listed' : 'gone'}` });
}

/** Wait until engine::workers::list shows a worker with this name; returns its row. */
export async function waitWorker(c, name, { timeout = 8000, present = true } = {}) {
  return waitFor(async () => {
    const r = await call(c, 'engine::workers::list', {}, 3000);
    const row = ((r && r.workers) || []).find((w) => w.name === name);
    if (present) return row || false;
    return row ? false : { gone: true };
  }, { timeout, interval: 100, what: `worker ${name} to be ${present ? 'listed' : 'gone'}` });
}

// ---------------------------------------------------------------------------------------------
// raw protocol client (only where the SDK cannot express something)

export class RawClient {
  constructor(url) {
    this.url = url;
    this.frames = [];
    this.waiters = [];
    this.pending = new Map();
  }

  async open(timeout = 5000) {
    this.ws = new WebSocket(this.url, { perMessageDeflate: false, handshakeTimeout: timeout });
    this.closed = new Promise((resolve) => this.ws.once('close', (code, reason) => resolve({ code, reason: String(reason) })));
    // listen before 'open' settles: the first frame can arrive in the same read as the 101
    this.ws.on('message', (data) => {
      const text = data.toString();
      let msg;
      try { msg = JSON.parse(text); } catch { return; }
      msg.__raw = text;
      this.frames.push(msg);
      if (msg.type === 'workerregistered') this.workerId = msg.worker_id;
      if (msg.type === 'invocationresult' && this.pending.has(msg.invocation_id)) {
        this.pending.get(msg.invocation_id)(msg);
        this.pending.delete(msg.invocation_id);
      }
      for (const w of [...this.waiters]) {
        if (w.pred(msg)) { this.waiters.splice(this.waiters.indexOf(w), 1); w.resolve(msg); }
      }
    });
    await new Promise((resolve, reject) => {
      this.ws.once('open', resolve);
      this.ws.once('error', reject);
    });
    await this.waitFrame((m) => m.type === 'workerregistered', timeout);
    return this;
  }

  sendRaw(text) { this.ws.send(text); }
  send(obj) { this.ws.send(JSON.stringify(obj)); }

  waitFrame(pred, timeout = 5000, what = 'frame') {
    const seen = this.frames.find(pred);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const w = { pred, resolve };
      this.waiters.push(w);
      setTimeout(() => {
        const i = this.waiters.indexOf(w);
        if (i >= 0) {
          this.waiters.splice(i, 1);
          reject(new Error(`raw client: no ${what} within ${timeout} ms; got ${trunc(safeJson(this.frames.map((f) => f.__raw)), 1500)}`));
        }
      }, timeout);
    });
  }

  /** Announce like the SDK does (void engine::workers::register). */
  register(name, extra = {}) {
    this.send({
      type: 'invokefunction',
      function_id: 'engine::workers::register',
      data: { runtime: 'raw', version: '0', name, pid: process.pid, ...extra },
      action: { type: 'void' },
    });
  }

  /** Synchronous call; resolves with the invocationresult frame. */
  invoke(function_id, data, { namespace, timeout = 5000, rawData } = {}) {
    const invocation_id = crypto.randomUUID();
    const p = new Promise((resolve, reject) => {
      const t = setTimeout(() => { this.pending.delete(invocation_id); reject(new Error(`raw invoke ${function_id}: no result within ${timeout} ms`)); }, timeout);
      this.pending.set(invocation_id, (m) => { clearTimeout(t); resolve(m); });
    });
    if (rawData !== undefined) {
      const ns = namespace !== undefined ? `,"namespace":${JSON.stringify(namespace)}` : '';
      this.sendRaw(`{"type":"invokefunction","invocation_id":"${invocation_id}","function_id":${JSON.stringify(function_id)},"data":${rawData}${ns}}`);
    } else {
      const f = { type: 'invokefunction', invocation_id, function_id, data };
      if (namespace !== undefined) f.namespace = namespace;
      this.send(f);
    }
    return p;
  }

  close() {
    try { this.ws.terminate(); } catch { /* ignore */ }
  }
}

/** Compose a diagnostic for assertion messages. */
export function diag(engine, ...workers) {
  const parts = [];
  if (engine) parts.push(`engine stderr (tail): ${engine.stderr().slice(-3000)}`);
  for (const w of workers) if (w) parts.push(`${w.name} stderr (tail): ${w.errors().slice(-1500)}`);
  return parts.join('\n');
}

/** Plain HTTP GET on the engine port; resolves { status, headers, body }. */
export function httpGet(port, path, timeout = 3000) {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, timeout }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { body += d; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${path}: no answer within ${timeout} ms`)));
    req.on('error', reject);
  });
}

/**
 * A TCP proxy on 127.0.0.1 in front of the engine, to simulate a network blip:
 * cutClients() destroys the client-facing sockets but leaves the engine-facing ones open, so
 * the engine still believes the old connections are alive when the SDK reconnects.
 */
export async function startTcpProxy(targetPort) {
  const pairs = [];
  const server = net.createServer((down) => {
    const up = net.connect(targetPort, '127.0.0.1');
    const pair = { down, up, upClosed: false };
    pairs.push(pair);
    down.pipe(up);
    up.pipe(down);
    up.on('close', () => { pair.upClosed = true; down.destroy(); });
    down.on('close', () => { if (!pair.cut) up.destroy(); });
    up.on('error', () => {});
    down.on('error', () => {});
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  const port = server.address().port;
  const handle = {
    port,
    url: `ws://127.0.0.1:${port}`,
    pairs,
    /** Drop the client sides; return the engine-side sockets that stay open. */
    cutClients() {
      const kept = [];
      for (const p of pairs) {
        if (p.cut || p.upClosed) continue;
        p.cut = true;
        p.down.unpipe(p.up);
        p.up.unpipe(p.down);
        p.down.destroy();
        kept.push(p);
      }
      return kept;
    },
    killNow() { for (const p of pairs) { p.up.destroy(); p.down.destroy(); } server.close(); },
    async stop() { handle.killNow(); live.delete(handle); },
  };
  live.add(handle);
  return handle;
}
