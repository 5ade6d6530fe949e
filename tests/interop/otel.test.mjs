// OpenTelemetry left ON (the SDK default): every SDK worker also opens <url>/otel and streams
// OTLP/MTRC/LOGS binary frames there. Those sockets must never become workers.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFor, waitFunctions, shutdownAllClients, diag, sdkLog, sleep, httpGet,
} from './lib.mjs';

let engine;
let w1;
let w2;
let c;
let health0;
const connected = []; // worker_connected events seen after the baseline

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'otel-client', otel: true });
  c.registerFunction('otel::on_workers', async (data) => {
    if (data?.event === 'worker_connected') connected.push(data.worker_id);
    return null;
  });
  c.registerTrigger({ type: 'engine::workers-available', function_id: 'otel::on_workers', config: {} });
  await waitFor(async () => (await call(c, 'engine::registered-triggers::list', {})).registered_triggers?.length === 1,
    { timeout: 8000, what: 'the workers-available subscription' }).catch((e) => { throw new Error(`${e.message}\n${diag(engine)}`); });
  await waitFor(() => sdkLog.some((l) => l.line.includes('[OTel] Connected to engine')), { timeout: 10000, what: 'this process\' /otel socket' });
  health0 = JSON.parse((await httpGet(engine.port, '/health')).body);
  connected.length = 0;

  w1 = spawnWorker(engine.url, { name: 'otel-w1', otel: true, functions: [{ id: 'otel::echo', kind: 'echo' }] });
  w2 = spawnWorker(engine.url, { name: 'otel-w2', otel: true, functions: [{ id: 'otel::throw', kind: 'throw', message: 'traced failure' }] });
  await waitFunctions(c, ['otel::echo', 'otel::throw'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, w1, w2)}`); });
  await waitFor(() => /\[OTel\] Connected to engine/.test(w1.output()) && /\[OTel\] Connected to engine/.test(w2.output()),
    { timeout: 10000, what: 'the worker processes\' /otel sockets' });
  await sleep(300);
});

after(async () => {
  await shutdownAllClients();
  await Promise.all([w1?.stop(), w2?.stop()]);
  await engine?.stop();
});

async function nodeWorkers() {
  return (await call(c, 'engine::workers::list', {})).workers.filter((w) => w.runtime !== 'engine');
}

test('with OTel on, engine::workers::list counts exactly the SDK workers (no /otel ghosts)', { timeout: 30000 }, async () => {
  const rows = await nodeWorkers();
  assert.deepEqual(rows.map((r) => r.name).sort(), ['otel-client', 'otel-w1', 'otel-w2'], JSON.stringify(rows));
  assert.equal(new Set(rows.map((r) => r.id)).size, 3);
  for (const [name, pid] of [['otel-w1', w1.pid], ['otel-w2', w2.pid], ['otel-client', process.pid]]) {
    const info = await call(c, 'engine::workers::info', { name });
    assert.equal(info.worker.pid, pid, `${name} pid`);
  }
  // two processes = two worker connections; their /otel sockets fire no worker_connected ...
  const ids = rows.filter((r) => r.name !== 'otel-client').map((r) => r.id).sort();
  assert.deepEqual([...new Set(connected)].sort(), ids, 'worker_connected only for the two worker sockets');
  // ... and do not count as workers in /health
  const health = JSON.parse((await httpGet(engine.port, '/health')).body);
  assert.equal(health.workers - health0.workers, 2, `/health workers went ${health0.workers} -> ${health.workers}`);
});

test('traced calls (spans with payloads go to /otel) keep working; nothing reconnects', { timeout: 60000 }, async () => {
  const before = (await nodeWorkers()).map((r) => r.id).sort();
  for (let i = 0; i < 20; i++) assert.equal(await call(c, 'otel::echo', { v: `span-${i}` }), `span-${i}`);
  const e = await call(c, 'otel::throw', {}).then(() => null, (x) => x);
  assert.equal(e?.code, 'invocation_failed');
  // an 8 MiB echo makes a ~17 MiB OTLP frame (input and output payloads in span events) on
  // the callee's /otel socket and on this process' one: above a 16 MiB frame limit
  const big = 'o'.repeat(8 * 1024 * 1024);
  assert.equal((await call(c, 'otel::echo', { v: big }, 30000)).length, big.length);
  await sleep(2500); // let the 100 ms span/log batches flush (and a big frame cross)
  assert.equal(await call(c, 'otel::echo', { v: 'still' }), 'still');
  const after = (await nodeWorkers()).map((r) => r.id).sort();
  assert.deepEqual(after, before, 'same three workers, same ids');
  for (const w of [w1, w2]) {
    assert.ok(!/Reconnecting in/.test(w.output()), `${w.name} did not reconnect`);
    assert.ok(!/\[OTel\] Disconnected/.test(w.output()), `${w.name}'s /otel socket stayed up`);
  }
  assert.ok(!sdkLog.some((l) => /Reconnecting in|\[OTel\] Disconnected/.test(l.line)), 'the in-process client stayed connected');
});
