// Discovery events delivered to an SDK worker subscribed with registerTrigger.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFor, waitFunctions, waitWorker, shutdownAllClients, diag,
} from './lib.mjs';

let engine;
let sub;
const workerEvents = [];
const functionEvents = [];

before(async () => {
  engine = await startEngine();
  sub = client(engine.url, { name: 'disco-subscriber' });
  sub.registerFunction('disco::on_workers', async (data, metadata) => {
    workerEvents.push({ data, metadata, t: Date.now() });
    return null;
  });
  sub.registerFunction('disco::on_functions', async (data, metadata) => {
    functionEvents.push({ data, metadata, t: Date.now() });
    return null;
  });
  sub.registerTrigger({ type: 'engine::workers-available', function_id: 'disco::on_workers', config: {}, metadata: { sub: 'w' } });
  sub.registerTrigger({ type: 'engine::functions-available', function_id: 'disco::on_functions', config: {}, metadata: { sub: 'f' } });
  await waitFor(async () => {
    const r = await call(sub, 'engine::registered-triggers::list', {});
    return (r.registered_triggers || []).length === 2;
  }, { timeout: 8000, what: 'both subscriptions to be live' }).catch((e) => { throw new Error(`${e.message}\n${diag(engine)}`); });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

test('engine::workers-available: worker_connected, worker_metadata_updated, worker_disconnected', { timeout: 30000 }, async () => {
  const from = workerEvents.length;
  const w = spawnWorker(engine.url, { name: 'disco-newcomer', functions: [{ id: 'disco::x', kind: 'echo' }] });
  let id;
  try {
    const row = await waitWorker(sub, 'disco-newcomer', { timeout: 10000 });
    id = row.id;
    const seen = (ev) => workerEvents.slice(from).some((e) => e.data?.event === ev && e.data?.worker_id === id);
    await waitFor(() => seen('worker_connected') && seen('worker_metadata_updated'), { timeout: 3000, what: () => `connected+metadata events for ${id}; got ${JSON.stringify(workerEvents.slice(from).map((e) => e.data))}` });
    const ev = workerEvents.slice(from).find((e) => e.data?.worker_id === id);
    assert.deepEqual(ev.metadata, { sub: 'w' }, 'the binding metadata is the handler\'s second argument');
    const keys = Object.keys(ev.data).filter((k) => k !== '_caller_worker_id').sort();
    assert.deepEqual(keys, ['event', 'worker_id']);
  } finally {
    await w.stop();
  }
  await waitFor(() => workerEvents.slice(from).some((e) => e.data?.event === 'worker_disconnected' && e.data?.worker_id === id),
    { timeout: 3000, what: 'worker_disconnected' });
  const order = workerEvents.slice(from).filter((e) => e.data?.worker_id === id).map((e) => e.data.event);
  assert.equal(order[order.length - 1], 'worker_disconnected', `disconnect is the last event: ${order}`);
});

test('engine::functions-available: functions_changed on register and on leave (immediate, DECISIONS item 1)', { timeout: 30000 }, async () => {
  const from = functionEvents.length;
  const w = spawnWorker(engine.url, { name: 'disco-fn-provider', functions: [{ id: 'disco::fresh', kind: 'echo', options: { description: 'fresh fn' } }] });
  let appearedAt;
  let beforeStop = 0;
  try {
    await waitFunctions(sub, ['disco::fresh'], { timeout: 10000 });
    appearedAt = Date.now();
    const hit = await waitFor(() => functionEvents.slice(from).find((e) => (e.data?.functions || []).some((f) => f.function_id === 'disco::fresh')),
      { timeout: 3000, what: () => `functions_changed listing disco::fresh; got ${JSON.stringify(functionEvents.slice(from).map((e) => e.data?.event))}` });
    assert.equal(hit.data.event, 'functions_changed');
    assert.deepEqual(hit.metadata, { sub: 'f' });
    const row = hit.data.functions.find((f) => f.function_id === 'disco::fresh');
    assert.equal(row.worker_name, 'disco-fn-provider');
    assert.equal(row.description, 'fresh fn');
    assert.ok(hit.data.functions.some((f) => f.function_id === 'engine::functions::list'), 'the event lists the full registry, engine::* included');
  } finally {
    beforeStop = functionEvents.length;
    await w.stop();
  }
  const after1 = beforeStop;
  const gone = await waitFor(() => functionEvents.slice(after1).find((e) => e.data?.event === 'functions_changed'
    && !(e.data.functions || []).some((f) => f.function_id === 'disco::fresh')), { timeout: 3000, what: 'functions_changed without disco::fresh' });
  assert.ok(gone.data.functions.some((f) => f.function_id === 'disco::on_functions'), 'still lists the subscriber\'s functions');
  assert.ok(appearedAt);
});
