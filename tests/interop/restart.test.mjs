// The engine is stopped and a new one started on the same port: SDK workers reconnect by
// themselves (backoff starts at 1 s) and are callable again.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFunctions, waitWorker, shutdownAllClients, diag, sdkLog,
} from './lib.mjs';

let engine1;
let engine2;
let w;

after(async () => {
  await shutdownAllClients();
  await w?.stop();
  await engine1?.stop();
  await engine2?.stop();
});

test('engine restart on the same port: SDK workers reconnect and are callable again', { timeout: 60000 }, async () => {
  engine1 = await startEngine({ port: 0 });
  const port = engine1.port;
  // OTel on for the worker process: its /otel socket reconnects too and must not become a worker
  w = spawnWorker(engine1.url, { name: 'restart-w', otel: true, functions: [{ id: 'rs::echo', kind: 'echo' }] });
  const c = client(engine1.url, { name: 'restart-client' });
  await waitFunctions(c, ['rs::echo'], { timeout: 10000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine1, w)}`); });
  assert.equal(await call(c, 'rs::echo', { v: 'before' }), 'before');
  const oldRow = await waitWorker(c, 'restart-w');

  const t0 = Date.now();
  const st = await engine1.stop(5000);
  const took = Date.now() - t0;
  assert.deepEqual(st, { code: 0, signal: null }, 'SIGTERM is a graceful shutdown with exit 0');
  assert.ok(took < 2000, `exited ${took} ms after SIGTERM with workers connected (limit 2000)`);
  const downAt = Date.now();
  // a call made while the engine is down is queued by the SDK and answered after the reconnect
  const queued = call(c, 'engine::workers::list', {}, 20000);

  engine2 = await startEngine({ port });
  assert.equal(engine2.port, port, 'the new engine listens on the old port');
  assert.equal(engine2.url, engine1.url);

  await waitFunctions(c, ['rs::echo'], { timeout: 15000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine2, w)}`); });
  const back = Date.now() - downAt;
  assert.equal(await call(c, 'rs::echo', { v: 'after' }), 'after');
  const q = await queued;
  assert.ok(Array.isArray(q.workers), 'the queued call was answered');

  const all = (await call(c, 'engine::workers::list', {})).workers.filter((r) => r.runtime !== 'engine');
  assert.deepEqual(all.map((r) => r.name).sort(), ['restart-client', 'restart-w'], `only the two SDK workers: ${JSON.stringify(all)}`);
  const rows = all.filter((r) => r.name === 'restart-w');
  assert.notEqual(rows[0].id, oldRow.id, 'a new engine hands out a new worker id');
  const info = await call(c, 'engine::workers::info', { name: 'restart-w' });
  assert.equal(info.worker.pid, w.pid);
  assert.ok(/\[iii\] Reconnecting in \d+ms/.test(w.output()), 'the worker process went through the SDK reconnect loop');
  assert.ok(sdkLog.some((l) => /Reconnecting in/.test(l.line)), 'the in-process client reconnected too');
  assert.ok(back < 15000, `back after ${back} ms`);
});
