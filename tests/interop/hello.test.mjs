// The iii-sdk README's Hello World, verbatim, against the engine (DECISIONS.md item 10).
//
// The snippet registers `hello::greet`, binds an `http` trigger (no worker provides `http`, so the
// binding parks), then calls `hello::greet` at once. The SDK sends the registrations, then the
// call, then its `engine::workers::register` announce last (PROTOCOL.md §1.3), so the call
// arrives while its own connection still holds buffered registrations: it must wait behind them
// and succeed (with plain §1.4 buffering it gets function_not_found every time).
//
// The snippet is read from node_modules/iii-sdk/README.md at test time and run as a worker script
// with one change: its URL literal `ws://localhost:49134` becomes the test engine's URL. One line
// is appended to report the result. The SDK's defaults (OTel on) are kept.
//
// Namespaced variants (iii-sdk 0.22.1 has no namespace option; see namespaces.test.mjs):
// * an SDK that announces its namespace in its own, last, register call and puts it on its calls
//   (what PROTOCOL.md §3.1 says later SDKs do) is emulated by a preloaded module that adds
//   `namespace` to those outgoing frames; the snippet itself is unchanged. The call must wait
//   behind the buffered registrations and run in that namespace.
// * the namespaces.test.mjs way (an early announce queued before the snippet's registrations):
//   the registrations settle in the namespace before the call, and the call, which names no
//   namespace, resolves strictly in `default` (§3.1): function_not_found with the hint.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import path from 'node:path';
import {
  HERE, startEngine, client, call, waitFor, within, shutdownAllClients, trunc,
} from './lib.mjs';

const README = path.join(HERE, 'node_modules', 'iii-sdk', 'README.md');
const URL_LITERAL = "'ws://localhost:49134'";
const RESULT_TAG = 'HELLO_RESULT ';

let engine;
let c;
const dirs = [];
const procs = new Set();

/** The ```javascript block under "## Hello World" in the SDK's README. */
function helloSnippet() {
  const md = readFileSync(README, 'utf8');
  const m = md.match(/^## Hello World\s*\n+```javascript\n([\s\S]*?)\n```/m);
  assert.ok(m, `no Hello World javascript block in ${README}`);
  const code = m[1];
  // what this test relies on: if the README changes, look at the new snippet
  assert.equal(code.split(URL_LITERAL).length - 1, 1, `the snippet's URL literal ${URL_LITERAL}`);
  assert.match(code, /registerFunction\('hello::greet'/);
  assert.match(code, /registerTrigger\(\{\s*type: 'http'/);
  assert.match(code, /const result = await iii\.trigger\(\{ function_id: 'hello::greet', payload: \{ name: 'world' \} \}\)/);
  return code;
}

// A preloaded module: an SDK with a namespace option, on the wire. Adds `namespace` to the SDK's
// own engine::workers::register data and to its calls of non-engine functions.
const NS_SHIM = `import { WebSocket } from 'ws';
const NS = process.env.HELLO_NAMESPACE;
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data, ...rest) {
  if (typeof data === 'string') {
    try {
      const m = JSON.parse(data);
      if (m.type === 'invokefunction') {
        if (m.function_id === 'engine::workers::register') m.data = { ...m.data, namespace: NS };
        else if (!m.function_id.startsWith('engine::') && m.namespace === undefined) m.namespace = NS;
        data = JSON.stringify(m);
      }
    } catch { /* not JSON: as is */ }
  }
  return send.call(this, data, ...rest);
};
`;

/**
 * Runs `code` (the snippet, URL adapted) as a worker script from a directory under this one (so
 * that `iii-sdk` resolves). Resolves { result, error, ms, out, err, stop } once the script
 * printed its result or exited, within `timeout` ms.
 */
async function runScript(code, { shim = false, env = {}, timeout = 15000 } = {}) {
  const dir = mkdtempSync(path.join(HERE, '.hello-'));
  dirs.push(dir);
  const file = path.join(dir, 'hello.mjs');
  writeFileSync(file, `${code}\nconsole.log(${JSON.stringify(RESULT_TAG)} + JSON.stringify(result))\n`);
  const args = [];
  if (shim) {
    writeFileSync(path.join(dir, 'ns-shim.mjs'), NS_SHIM);
    args.push('--import', path.join(dir, 'ns-shim.mjs'));
  }
  const environ = { ...process.env, ...env };
  delete environ.III_URL;
  const t0 = Date.now();
  const child = spawn(process.execPath, [...args, file], {
    cwd: dir, detached: true, env: environ, stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8');
  child.stderr.setEncoding('utf8');
  const exited = new Promise((resolve) => child.on('exit', (code2, signal) => resolve({ code: code2, signal })));
  let gone = false;
  exited.then(() => { gone = true; });
  const handle = {
    pid: child.pid,
    out: () => out,
    err: () => err,
    killNow() { if (!gone) try { process.kill(-child.pid, 'SIGKILL'); } catch { /* gone */ } },
    async stop() {
      if (!gone) {
        try { process.kill(-child.pid, 'SIGTERM'); } catch { /* gone */ }
        const t = setTimeout(() => handle.killNow(), 2000);
        await exited;
        clearTimeout(t);
      }
      procs.delete(handle);
    },
  };
  procs.add(handle);
  const done = new Promise((resolve) => {
    child.stdout.on('data', (d) => {
      out += d;
      const i = out.indexOf(RESULT_TAG);
      if (i >= 0 && out.indexOf('\n', i) > 0) {
        const line = out.slice(i + RESULT_TAG.length, out.indexOf('\n', i));
        resolve({ result: JSON.parse(line), ms: Date.now() - t0 });
      }
    });
    child.stderr.on('data', (d) => { err += d; });
    exited.then((x) => resolve({ exit: x, ms: Date.now() - t0 }));
  });
  const r = await within(done, timeout, 'the Hello World script').catch((e) => ({ timeout: e.message }));
  return { ...r, handle };
}

function fnRows(rows, id) {
  return rows.filter((f) => f.function_id === id).map((f) => [f.namespace, f.worker_name]);
}

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'hello-observer' });
});

after(async () => {
  for (const p of [...procs]) await p.stop();
  await shutdownAllClients();
  await engine?.stop();
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

process.on('exit', () => { for (const p of procs) p.killNow(); });

test('the README Hello World, verbatim: registers, binds http (parked), calls its own function at once', { timeout: 30000 }, async () => {
  const code = helloSnippet().replace(URL_LITERAL, `'${engine.url}'`);
  const r = await runScript(code);
  try {
    assert.ok(r.result, `the script did not print its result: ${trunc(JSON.stringify({ exit: r.exit, timeout: r.timeout }))}\nscript stderr: ${trunc(r.handle.err(), 1500)}\nengine stderr: ${trunc(engine.stderr().slice(-1500), 1500)}`);
    assert.deepEqual(r.result, { message: 'Hello, world!' });
    // the call waited only behind its own registrations, not for the 5 s grace timer
    assert.ok(r.ms < 10000, `took ${r.ms} ms`);
    assert.equal(r.handle.err().includes('function_not_found'), false);
    // the registrations stand: hello::greet in default, the http binding parked (no provider)
    const rows = (await call(c, 'engine::functions::list', {})).functions;
    assert.deepEqual(fnRows(rows, 'hello::greet').map(([ns]) => ns), ['default']);
    await waitFor(() => /no provider for trigger type 'http'/.test(engine.stderr()), { timeout: 3000, what: 'the parked http binding in the log' });
    // and the function answers other callers too
    assert.deepEqual(await call(c, 'hello::greet', { name: 'again' }), { message: 'Hello, again!' });
  } finally {
    await r.handle.stop();
  }
  await waitFor(async () => fnRows((await call(c, 'engine::functions::list', {})).functions, 'hello::greet').length === 0,
    { timeout: 5000, what: 'hello::greet to go with its worker' });
});

test('the README Hello World in a namespace (an SDK that announces it last and names it on calls)', { timeout: 30000 }, async () => {
  const code = helloSnippet().replace(URL_LITERAL, `'${engine.url}'`);
  const r = await runScript(code, { shim: true, env: { HELLO_NAMESPACE: 'ns-hello', III_WORKER_NAME: 'hello-ns-last' } });
  try {
    assert.ok(r.result, `the script did not print its result: ${trunc(JSON.stringify({ exit: r.exit, timeout: r.timeout }))}\nscript stderr: ${trunc(r.handle.err(), 1500)}`);
    assert.deepEqual(r.result, { message: 'Hello, world!' });
    assert.ok(r.ms < 10000, `took ${r.ms} ms`);
    const rows = (await call(c, 'engine::functions::list', {})).functions;
    assert.deepEqual(fnRows(rows, 'hello::greet'), [['ns-hello', 'hello-ns-last']], 'registered in the announced namespace only');
    const ws = (await call(c, 'engine::workers::list', { search: 'hello-ns-last' })).workers;
    assert.deepEqual(ws.map((w) => w.namespace), ['ns-hello']);
  } finally {
    await r.handle.stop();
  }
});

test('the README Hello World with an early namespace announce (namespaces.test.mjs style): the un-namespaced call is strict', { timeout: 30000 }, async () => {
  // the announce is queued right after registerWorker(), before the snippet's registrations
  const announce = "iii.trigger({ function_id: 'engine::workers::register', payload: { runtime: 'node', name: 'hello-ns-early', pid: process.pid, namespace: 'ns-early' }, action: { type: 'void' } })";
  const code = helloSnippet().replace(URL_LITERAL, `'${engine.url}'`)
    .replace(/^(const iii = registerWorker\(.*\))$/m, `$1\n${announce}`);
  assert.ok(code.includes(announce));
  const r = await runScript(code);
  try {
    assert.equal(r.result, undefined, `the call resolved in default: ${JSON.stringify(r.result)}`);
    assert.ok(r.exit && r.exit.code !== 0, `the script did not fail: ${JSON.stringify(r)}`);
    assert.match(r.handle.err(), /function_not_found: Function hello::greet not found in namespace default\. It is registered in namespace\(s\): ns-early\./);
  } finally {
    await r.handle.stop();
  }
});
