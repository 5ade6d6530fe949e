// Authentication with the official SDK: an rbac auth function served by an SDK worker that itself
// connects with a token from auth_tokens (passed as `headers`, which iii-sdk 0.22.1 hands to the
// `ws` constructor: SDK-NODE.md §1), SDK clients authenticated by that function, and the
// AUTH_ERROR answer (PROTOCOL.md §1.2 step 1, §3.9).
//
// Listener config under test:
//   auth_tokens: [WORKER_TOKEN]
//   rbac: { auth_function_id: auth::check, expose_functions: [match("pub::*")],
//           forbidden_functions: [greet::admin] }
// auth::check allows `x-user: alice` with {namespaces: {default: ["greet::*"]},
// allowed_functions: ["misc::ok"]}, returns null for `x-user: empty`, a wrongly shaped object for
// `x-user: shape`, and throws otherwise.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { WebSocket } from 'ws';
import {
  startEngine, client, call, callErr, waitFor, waitFunctions, shutdownAllClients, shutdownClient, diag, sdkLog, within,
} from './lib.mjs';

const WORKER_TOKEN = `tkw${randomBytes(12).toString('hex')}`;
const CONFIG = `workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
      auth_tokens: ["${WORKER_TOKEN}"]
      rbac:
        auth_function_id: auth::check
        expose_functions: ['match("pub::*")']
        forbidden_functions: [greet::admin]
`;

let engine;
let authsvc;
let backend;
const authCalls = [];

function header(input, name) {
  const h = (input && input.headers) || {};
  for (const [k, v] of Object.entries(h)) if (k.toLowerCase() === name) return v;
  return undefined;
}

before(async () => {
  engine = await startEngine({ config: CONFIG });
  const bearer = { Authorization: `Bearer ${WORKER_TOKEN}` };
  authsvc = client(engine.url, { name: 'authsvc', headers: bearer });
  authsvc.registerFunction('auth::check', async (input) => {
    authCalls.push(input);
    const user = header(input, 'x-user');
    if (user === 'alice') {
      return { namespaces: { default: ['greet::*'] }, allowed_functions: ['misc::ok'], context: { user: 'alice' } };
    }
    if (user === 'empty') return null;
    if (user === 'shape') return { namespaces: 'not-a-map', allowed_functions: 7 };
    throw new Error(`unknown user ${user}`);
  });
  backend = client(engine.url, { name: 'backend', headers: bearer });
  for (const id of ['greet::hello', 'greet::admin', 'misc::ok', 'secret::fn', 'pub::hello']) {
    backend.registerFunction(id, async (data) => ({ id, got: data?.v ?? null }));
  }
  await waitFunctions(backend, ['auth::check', 'greet::hello', 'greet::admin', 'misc::ok', 'secret::fn', 'pub::hello'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine)}`); });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

/** A raw upgrade with headers: resolves {status, frames, close} once the socket is done or `settle` ms passed. */
function rawConnect(url, headers, { settle = 1500 } = {}) {
  return new Promise((resolve) => {
    const out = { status: null, frames: [], close: null, error: null };
    const ws = new WebSocket(url, { headers, perMessageDeflate: false, handshakeTimeout: 5000 });
    const done = () => { clearTimeout(timer); try { ws.terminate(); } catch { /* gone */ } resolve(out); };
    const timer = setTimeout(done, settle);
    ws.on('upgrade', (res) => { out.status = res.statusCode; });
    ws.on('unexpected-response', (req, res) => { out.status = res.statusCode; done(); });
    ws.on('message', (d, isBinary) => { out.frames.push({ text: d.toString(), isBinary }); });
    ws.on('close', (code) => { out.close = code; done(); });
    ws.on('error', (e) => { out.error = e.message; });
  });
}

test('a worker with a token from auth_tokens serves the auth function; the token skips auth::check', { timeout: 20000 }, async () => {
  // the two token workers connected without a call to auth::check
  assert.equal(authCalls.length, 0, `auth::check was called for token connections: ${JSON.stringify(authCalls)}`);
  const r = await rawConnect(engine.url, { Authorization: `Bearer ${WORKER_TOKEN}` }, { settle: 800 });
  assert.equal(r.status, 101);
  assert.equal(JSON.parse(r.frames[0]?.text ?? '{}').type, 'workerregistered', JSON.stringify(r.frames));
  assert.equal(authCalls.length, 0, 'a valid token skips the auth function');
});

test('an SDK client authenticated by auth::check gets its session (grants, allowed, exposed, forbidden)', { timeout: 30000 }, async () => {
  const before = authCalls.length;
  const alice = client(`${engine.url}/?team=blue&team=red`, { name: 'alice', headers: { 'x-user': 'alice' } });
  try {
    assert.deepEqual(await call(alice, 'greet::hello', { v: 1 }), { id: 'greet::hello', got: 1 }, 'grant greet::* in default');
    assert.deepEqual(await call(alice, 'misc::ok', { v: 2 }), { id: 'misc::ok', got: 2 }, 'allowed_functions');
    assert.deepEqual(await call(alice, 'pub::hello', { v: 3 }), { id: 'pub::hello', got: 3 }, 'rbac.expose_functions match("pub::*")');
    const e1 = await callErr(alice, 'secret::fn', { v: 4 });
    assert.equal(e1.code, 'FORBIDDEN');
    assert.equal(e1.message, "FORBIDDEN: function 'secret::fn' not allowed (add to rbac.expose_functions)");
    const e2 = await callErr(alice, 'greet::admin', { v: 5 });
    assert.equal(e2.code, 'FORBIDDEN');
    assert.equal(e2.message, "FORBIDDEN: function 'greet::admin' not allowed (remove from rbac.forbidden_functions)");
    // infrastructure: the SDK's own announce went through (the worker is listed under its name)
    const rows = (await call(backend, 'engine::workers::list', {})).workers;
    assert.ok(rows.some((w) => w.name === 'alice'), `alice not listed: ${JSON.stringify(rows.map((w) => w.name))}`);

    // auth::check ran once for alice's one upgrade, with headers, query_params and ip_address
    const mine = authCalls.slice(before).filter((c) => header(c, 'x-user') === 'alice');
    assert.equal(mine.length, 1, `auth::check calls for alice: ${JSON.stringify(mine)}`);
    const input = mine[0];
    assert.equal(typeof input.headers, 'object');
    for (const v of Object.values(input.headers)) assert.equal(typeof v, 'string', `header values are strings: ${JSON.stringify(input.headers)}`);
    assert.deepEqual(input.query_params, { team: ['blue', 'red'] });
    assert.equal(input.ip_address, '127.0.0.1');
  } finally {
    await shutdownClient(alice);
  }
});

for (const [who, why] of [['bob', 'the auth function throws'], ['empty', 'an empty (null) result'], ['shape', 'a wrongly shaped session'], [null, 'no x-user header (throws)']]) {
  test(`AUTH_ERROR and a close when ${why}`, { timeout: 15000 }, async () => {
    const before = authCalls.length;
    const r = await rawConnect(engine.url, who ? { 'x-user': who } : {}, { settle: 4000 });
    assert.equal(r.status, 101, `upgrade status (auth runs after the upgrade): ${JSON.stringify(r)}`);
    assert.equal(r.frames.length, 1, `exactly one frame before the close: ${JSON.stringify(r.frames)}`);
    assert.equal(r.frames[0].isBinary, false, 'a text frame');
    const m = JSON.parse(r.frames[0].text);
    assert.equal(m.type, 'error');
    assert.equal(m.error?.code, 'AUTH_ERROR');
    assert.equal(typeof m.error?.message, 'string');
    assert.notEqual(r.close, null, 'the engine closes the connection after AUTH_ERROR');
    assert.equal(authCalls.length - before, 1, 'auth::check called once for the upgrade');
  });
}

test('an SDK client refused by the auth function never gets a session', { timeout: 15000 }, async () => {
  const bob = client(engine.url, { name: 'bob-sdk', headers: { 'x-user': 'bob' } });
  try {
    await assert.rejects(within(call(bob, 'greet::hello', { v: 1 }, 2500), 4000, 'call'), 'bob\'s call must not succeed');
    const rows = (await call(backend, 'engine::workers::list', {})).workers;
    assert.ok(!rows.some((w) => w.name === 'bob-sdk'), 'bob is listed as a worker');
  } finally {
    await shutdownClient(bob);
  }
});

test('a bearer token not in auth_tokens goes to the auth function, which sees the Authorization header', { timeout: 15000 }, async () => {
  const before = authCalls.length;
  const r = await rawConnect(engine.url, { Authorization: 'Bearer user-jwt-123', 'x-user': 'alice' }, { settle: 800 });
  assert.equal(r.status, 101, `status ${r.status}`);
  assert.equal(JSON.parse(r.frames[0]?.text ?? '{}').type, 'workerregistered', JSON.stringify(r.frames));
  const mine = authCalls.slice(before);
  assert.equal(mine.length, 1);
  assert.equal(header(mine[0], 'authorization'), 'Bearer user-jwt-123');
});

test('?token= in the URL authorises an SDK worker and its /otel telemetry socket', { timeout: 20000 }, async () => {
  const mark = sdkLog.length;
  const w = client(`${engine.url}/?token=${WORKER_TOKEN}`, { name: 'otel-token', otel: true });
  try {
    w.registerFunction('otok::fn', async () => 'tok');
    await waitFunctions(backend, ['otok::fn'], { timeout: 8000 });
    assert.equal(await call(backend, 'otok::fn', {}), 'tok');
    await waitFor(() => sdkLog.slice(mark).some((l) => l.line.includes('[OTel] Connected to engine')), {
      timeout: 8000, what: () => `the SDK's /otel socket to connect (log: ${JSON.stringify(sdkLog.slice(mark).map((l) => l.line)).slice(0, 800)})`,
    });
    const logged = engine.stderr();
    assert.ok(!logged.includes(WORKER_TOKEN), 'the engine log contains the token');
  } finally {
    await shutdownClient(w);
  }
});
