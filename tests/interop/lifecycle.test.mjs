// Dynamic unregistration through the SDK refs, and the enqueue action.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { TriggerAction } from 'iii-sdk';
import {
  startEngine, spawnWorker, client, call, callErr, waitFor, waitFunctions, shutdownAllClients, diag, sdkLog, sleep,
} from './lib.mjs';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
let engine;
let c;

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'life-client' });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

test('function ref.unregister() removes the function; calls then get function_not_found', { timeout: 20000 }, async () => {
  const ref = c.registerFunction('life::temp', async () => 'here');
  await waitFunctions(c, ['life::temp']).catch((e) => { throw new Error(`${e.message}\n${diag(engine)}`); });
  assert.equal(await call(c, 'life::temp', {}), 'here');
  ref.unregister();
  await waitFunctions(c, ['life::temp'], { present: false, timeout: 3000 });
  const e = await callErr(c, 'life::temp', {}, 5000);
  assert.equal(e.code, 'function_not_found');
  // and it can be registered again by the same worker
  c.registerFunction('life::temp', async () => 'again');
  await waitFunctions(c, ['life::temp'], { timeout: 3000 });
  assert.equal(await call(c, 'life::temp', {}), 'again');
});

test('trigger.unregister() reaches the provider; unregistertriggertype (unknown to the engine) does not break the connection', { timeout: 30000 }, async () => {
  const seen = [];
  const tt = c.registerTriggerType({ id: 'life::tt', description: 'lifecycle type' }, {
    async registerTrigger(t) { seen.push(['reg', t.id, t.function_id]); },
    async unregisterTrigger(t) { seen.push(['unreg', t.id]); },
  });
  c.registerFunction('life::target', async () => null);
  const trig = c.registerTrigger({ type: 'life::tt', function_id: 'life::target', config: { a: 1 } });
  await waitFor(() => seen.some((s) => s[0] === 'reg' && s[2] === 'life::target'), { timeout: 5000, what: 'registertrigger at the in-process provider' });
  const id = seen.find((s) => s[0] === 'reg')[1];
  assert.deepEqual((await call(c, 'engine::registered-triggers::list', { trigger_type: 'life::tt' })).registered_triggers.map((r) => r.id), [id]);
  trig.unregister();
  await waitFor(() => seen.some((s) => s[0] === 'unreg' && s[1] === id), { timeout: 3000, what: 'unregistertrigger at the provider' });
  assert.deepEqual((await call(c, 'engine::registered-triggers::list', { trigger_type: 'life::tt' })).registered_triggers, []);
  const mark = sdkLog.length;
  tt.unregister(); // sends {"type":"unregistertriggertype",...}: the engine drops it, connection stays
  await sleep(1500);
  assert.ok(!sdkLog.slice(mark).some((l) => /Reconnecting/.test(l.line)), 'no reconnect after an unknown message type');
  assert.equal(await call(c, 'life::temp', {}), 'again');
});

test('enqueue without a queue worker: enqueue_error naming engine::queue::enqueue', { timeout: 20000 }, async () => {
  const e = await c.trigger({ function_id: 'life::temp', payload: { a: 1 }, action: TriggerAction.Enqueue({ queue: 'jobs' }), timeoutMs: 5000 })
    .then((r) => { throw new Error(`expected enqueue_error, got ${JSON.stringify(r)}`); }, (x) => x);
  assert.equal(e.code, 'enqueue_error', e.message);
  assert.ok(e.message.includes('engine::queue::enqueue'), e.message);
  assert.ok(e.message.includes('iii worker add queue'), e.message);
});

test('enqueue with a queue worker (another process provides engine::queue::enqueue)', { timeout: 30000 }, async () => {
  const q = spawnWorker(engine.url, { name: 'queue-provider', functions: [{ id: 'engine::queue::enqueue', kind: 'record', result: { provider: 'receipt-ignored' } }] });
  try {
    await waitFunctions(c, ['engine::queue::enqueue'], { timeout: 10000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, q)}`); });
    const r = await c.trigger({ function_id: 'life::temp', payload: { job: 7, s: 'ü' }, action: TriggerAction.Enqueue({ queue: 'jobs' }), timeoutMs: 5000 });
    assert.match(r?.messageReceiptId ?? '', UUID, `result ${JSON.stringify(r)}`);
    assert.deepEqual(Object.keys(r), ['messageReceiptId']);
    const ev = await q.waitEvent((x) => x.ev === 'invoked', 3000, 'the enqueue at the queue worker');
    assert.equal(ev.data.queue, 'jobs');
    assert.equal(ev.data.function_id, 'life::temp');
    assert.deepEqual(ev.data.data, { job: 7, s: 'ü' }, 'the payload is untouched (no _caller_worker_id)');
    assert.equal(ev.data.messageReceiptId, r.messageReceiptId, 'the caller gets the engine\'s receipt id');
    assert.equal('namespace' in ev.data, false, 'no namespace key for default');
  } finally {
    await q.stop();
  }
});
