// Many concurrent calls, each result matched to its input.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFunctions, shutdownAllClients, diag,
} from './lib.mjs';

let engine;
let w1;
let w2;
let c;

before(async () => {
  engine = await startEngine();
  w1 = spawnWorker(engine.url, { name: 'conc-1', functions: [{ id: 'conc::inc', kind: 'inc' }, { id: 'conc::relay', kind: 'relay' }] });
  w2 = spawnWorker(engine.url, { name: 'conc-2', functions: [{ id: 'conc2::inc', kind: 'inc' }] });
  c = client(engine.url, { name: 'conc-client' });
  await waitFunctions(c, ['conc::inc', 'conc::relay', 'conc2::inc'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, w1, w2)}`); });
});

after(async () => {
  await shutdownAllClients();
  await Promise.all([w1?.stop(), w2?.stop()]);
  await engine?.stop();
});

test('2,000 concurrent calls to a worker in another process all resolve to their own result', { timeout: 60000 }, async () => {
  const N = 2000;
  const t0 = Date.now();
  const ps = [];
  for (let i = 0; i < N; i++) ps.push(call(c, 'conc::inc', { i, tag: `t${i}` }, 30000));
  const rs = await Promise.allSettled(ps);
  const bad = [];
  rs.forEach((r, i) => {
    if (r.status !== 'fulfilled') bad.push(`#${i}: ${r.reason?.code}: ${r.reason?.message}`);
    else if (r.value?.i !== i || r.value?.twice !== 2 * i || r.value?.tag !== `t${i}`) bad.push(`#${i}: ${JSON.stringify(r.value)}`);
  });
  assert.deepEqual(bad.slice(0, 10), [], `${bad.length} of ${N} calls wrong`);
  const ms = Date.now() - t0;
  assert.ok(ms < 30000, `${N} calls took ${ms} ms`);
});

test('2,000 concurrent calls spread over two callee processes and a nested hop', { timeout: 60000 }, async () => {
  const N = 2000;
  const ps = [];
  for (let i = 0; i < N; i++) {
    if (i % 4 === 0) ps.push(call(c, 'conc::relay', { target: 'conc2::inc', payload: { i, tag: 'r' } }, 30000).then((r) => r.result));
    else if (i % 2) ps.push(call(c, 'conc2::inc', { i, tag: 'b' }, 30000));
    else ps.push(call(c, 'conc::inc', { i, tag: 'a' }, 30000));
  }
  const rs = await Promise.allSettled(ps);
  const bad = [];
  rs.forEach((r, i) => {
    const tag = i % 4 === 0 ? 'r' : i % 2 ? 'b' : 'a';
    if (r.status !== 'fulfilled') bad.push(`#${i}: ${r.reason?.code}: ${r.reason?.message}`);
    else if (r.value?.i !== i || r.value?.twice !== 2 * i || r.value?.tag !== tag) bad.push(`#${i}: ${JSON.stringify(r.value)}`);
  });
  assert.deepEqual(bad.slice(0, 10), [], `${bad.length} of ${N} calls wrong`);
});

test('20 SDK workers in one process, every one calling every other one', { timeout: 60000 }, async () => {
  const N = 20;
  const ws = [];
  for (let k = 0; k < N; k++) {
    const x = client(engine.url, { name: `mesh-${k}` });
    x.registerFunction(`mesh::f${k}`, async (d) => ({ k, from: d.from }));
    ws.push(x);
  }
  await waitFunctions(c, ws.map((_, k) => `mesh::f${k}`), { timeout: 15000 });
  const ps = [];
  for (let a = 0; a < N; a++) for (let b = 0; b < N; b++) ps.push(call(ws[a], `mesh::f${b}`, { from: a }, 20000).then((r) => [a, b, r]));
  const rs = await Promise.all(ps);
  for (const [a, b, r] of rs) assert.deepEqual(r, { k: b, from: a });
  const rows = (await call(c, 'engine::workers::list', { search: 'mesh-' })).workers;
  assert.equal(rows.length, N);
});
