// A network blip: the SDK loses its socket while the engine still holds the old connection.
// The SDK reconnects and sends `reattach` with the previous worker id and token; the engine must
// retire the old connection so that the same worker name and function ids can be claimed again.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFor, waitFunctions, waitWorker, shutdownAllClients, diag, startTcpProxy,
} from './lib.mjs';

let engine;
let proxy;
let w;
let c;

before(async () => {
  engine = await startEngine();
  proxy = await startTcpProxy(engine.port);
  c = client(engine.url, { name: 'blip-observer' });
});

after(async () => {
  await shutdownAllClients();
  await w?.stop();
  await proxy?.stop();
  await engine?.stop();
});

test('after a blip the SDK reattaches: same name and functions, new connection, old one retired', { timeout: 40000 }, async () => {
  w = spawnWorker(proxy.url, { name: 'blip-w', functions: [{ id: 'blip::echo', kind: 'echo' }] });
  await waitFunctions(c, ['blip::echo'], { timeout: 10000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}`); });
  assert.equal(await call(c, 'blip::echo', { v: 1 }), 1);
  const old = await waitWorker(c, 'blip-w');

  const kept = proxy.cutClients(); // the engine still sees the old sockets (worker + nothing else)
  assert.ok(kept.length >= 1, 'an engine-side socket stays open');

  // the SDK reconnects after ~1 s (backoff 1 s +-30 %) through the proxy
  const row = await waitFor(async () => {
    const rows = (await call(c, 'engine::workers::list', {}, 3000)).workers.filter((r) => r.name === 'blip-w');
    return rows.length === 1 && rows[0].id !== old.id ? rows[0] : false;
  }, { timeout: 10000, what: 'one blip-w row with a new worker id' }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}\nworker stdout: ${w.output().slice(-1500)}`); });
  assert.notEqual(row.id, old.id);
  assert.ok(/Reconnecting in/.test(w.output()), 'the SDK did reconnect');

  const fns = (await call(c, 'engine::functions::list', { prefix: 'blip::' })).functions;
  assert.deepEqual(fns.map((f) => [f.function_id, f.worker_name]), [['blip::echo', 'blip-w']]);
  const info = await call(c, 'engine::workers::info', { name: 'blip-w' });
  assert.equal(info.worker.id, row.id, 'the function belongs to the new connection');
  assert.deepEqual(info.functions.map((f) => f.function_id), ['blip::echo']);
  assert.equal(await call(c, 'blip::echo', { v: 2 }), 2);
  // the old engine-side socket is closed by the engine (the evicted connection is dropped)
  await waitFor(() => kept.every((p) => p.upClosed), { timeout: 6000, what: 'the engine to drop the evicted connection' });
  assert.ok(!/registrationrejected|WORKER_NAMESPACE_CONFLICT/.test(w.output() + w.errors()));
});
