// Calls between SDK workers: cross-process, worker-to-worker, errors, void, null, metadata.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TriggerAction } from 'iii-sdk';
import {
  startEngine, spawnWorker, client, call, callErr, waitFor, waitFunctions, waitWorker, shutdownAllClients, diag, sleep,
} from './lib.mjs';

let engine;
let w1;
let w2;
let c;

const THROW_MSG = 'kaboom: ünïcödé "quoted" \\ back\nslash 🚀';

before(async () => {
  engine = await startEngine();
  w1 = spawnWorker(engine.url, {
    name: 'calls-w1',
    functions: [
      { id: 'calls::echo', kind: 'echo' },
      { id: 'calls::throw', kind: 'throw', message: THROW_MSG },
      { id: 'calls::record', kind: 'record' },
      { id: 'calls::null', kind: 'null' },
      { id: 'calls::relay', kind: 'relay' },
    ],
  });
  w2 = spawnWorker(engine.url, {
    name: 'calls-w2',
    functions: [{ id: 'calls2::tag', kind: 'tag' }],
  });
  c = client(engine.url, { name: 'calls-client' });
  await waitFunctions(c, ['calls::echo', 'calls::throw', 'calls::record', 'calls::null', 'calls::relay', 'calls2::tag'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, w1, w2)}`); });
});

after(async () => {
  await shutdownAllClients();
  await Promise.all([w1?.stop(), w2?.stop()]);
  await engine?.stop();
});

test('call from the test process to a function in another worker process', { timeout: 20000 }, async () => {
  const v = { a: 1, b: [1, 2, 'x'], nested: { t: true, f: false, n: null } };
  const r = await call(c, 'calls::echo', { v });
  assert.deepEqual(r, v);
});

test('worker-to-worker call: a handler in process 1 calls a function in process 2', { timeout: 20000 }, async () => {
  const r = await call(c, 'calls::relay', { target: 'calls2::tag', payload: { v: 42 } });
  assert.deepEqual(r, { via: 'calls-w1', result: { from: 'calls-w2', ns: 'default', got: 42 } });
});

test('two SDK workers in the same process call each other', { timeout: 20000 }, async () => {
  const other = client(engine.url, { name: 'calls-client-2' });
  other.registerFunction('calls::local', async (data) => ({ doubled: data.n * 2 }));
  await waitFunctions(c, ['calls::local']);
  assert.deepEqual(await call(c, 'calls::local', { n: 21 }), { doubled: 42 });
  // and back the other way, from the second client to a function of the first process' worker
  assert.deepEqual(await call(other, 'calls::echo', { v: 'back' }), 'back');
});

test('the callee sees _caller_worker_id = the caller\'s worker id, metadata separately', { timeout: 20000 }, async () => {
  const me = await waitWorker(c, 'calls-client');
  const before = w1.events.length;
  const r = await c.trigger({ function_id: 'calls::record', payload: { x: 1 }, metadata: { m: 'meta', k: [1] }, timeoutMs: 5000 });
  assert.deepEqual(r, { recorded: true });
  const ev = await w1.waitEvent((e, i) => e.ev === 'invoked' && e.data?.x === 1 && w1.events.indexOf(e) >= before, 3000);
  assert.equal(ev.data._caller_worker_id, me.id, 'engine inserts the caller id into object payloads');
  assert.deepEqual(ev.metadata, { m: 'meta', k: [1] });
  assert.equal('m' in ev.data, false, 'metadata is not folded into data');
});

test('unknown function: function_not_found, quickly and with the namespace text', { timeout: 20000 }, async () => {
  const t0 = Date.now();
  const e = await callErr(c, 'calls::nope', { a: 1 }, 5000);
  assert.equal(e.code, 'function_not_found', `got ${e.message}`);
  assert.equal(e.message, 'function_not_found: Function calls::nope not found in namespace default.');
  assert.ok(Date.now() - t0 < 2000, 'answered by the engine, not by the SDK timeout');
});

test('a handler that throws: invocation_failed, the message and stack pass through', { timeout: 20000 }, async () => {
  const e = await callErr(c, 'calls::throw', { a: 1 });
  assert.equal(e.code, 'invocation_failed', `got ${e.message}`);
  assert.equal(e.message, `invocation_failed: ${THROW_MSG}`);
  assert.equal(typeof e.stacktrace, 'string');
  assert.ok(e.stacktrace.includes('kaboom'), `stacktrace passes through: ${e.stacktrace}`);
  assert.equal(e.function_id, 'calls::throw');
});

test('a void call (TriggerAction.Void) reaches the handler; the caller gets nothing back', { timeout: 20000 }, async () => {
  const marker = `void-${Date.now()}`;
  const r = await c.trigger({ function_id: 'calls::record', payload: { v: marker }, action: TriggerAction.Void() });
  assert.equal(r, undefined);
  const ev = await w1.waitEvent((e) => e.ev === 'invoked' && e.data?.v === marker, 3000, 'the void call at the handler');
  assert.equal(ev.data.v, marker);
  // a void call to a missing function is silently dropped: the connection keeps working
  await c.trigger({ function_id: 'calls::missing', payload: {}, action: TriggerAction.Void() });
  await sleep(100);
  assert.deepEqual(await call(c, 'calls::echo', { v: 'still-alive' }), 'still-alive');
});

test('a handler returning null reaches the caller as undefined', { timeout: 20000 }, async () => {
  const r = await call(c, 'calls::null', { a: 1 });
  assert.equal(r, undefined);
});

test('non-object payloads are delivered unchanged (no _caller_worker_id)', { timeout: 20000 }, async () => {
  for (const v of ['plain string', 12345, -1.5, true, false, [1, 'two', { three: 3 }], []]) {
    assert.deepEqual(await call(c, 'calls::echo', v), v, `payload ${JSON.stringify(v)}`);
  }
});

test('engine::log::* calls (made by SDKs) are accepted and return no result', { timeout: 20000 }, async () => {
  for (const lvl of ['info', 'warn', 'error', 'debug', 'trace']) {
    const r = await call(c, `engine::log::${lvl}`, { message: `interop log ${lvl} ✓`, data: { k: 1 } }, 5000);
    assert.equal(r, undefined, `engine::log::${lvl}`);
  }
  await waitFor(() => engine.stderr().includes('interop log info ✓'), { timeout: 2000, what: 'the log line on the engine\'s stderr' });
});
