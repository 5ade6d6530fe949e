// Same function id in two namespaces; a conflicting second registration in one namespace.
//
// iii-sdk 0.22.1 has no namespace option (no `namespace` in InitOptions, III_NAMESPACE is not
// read) and trigger() cannot name a namespace. The workers therefore declare their namespace with
// an early engine::workers::register call (see workers/worker.mjs), and calls into a namespace are
// made with a raw protocol client (lib.mjs RawClient).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, callErr, waitFor, waitFunctions, waitWorker, shutdownAllClients, diag, RawClient, sleep,
} from './lib.mjs';

let engine;
let c;
let raw;
let nsA;
let nsB;

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'ns-observer' });
  raw = await new RawClient(engine.url).open();
  raw.register('ns-raw');
  nsA = spawnWorker(engine.url, { name: 'ns-worker-a', namespace: 'ns-a', functions: [{ id: 'shared::fn', kind: 'tag' }] });
  nsB = spawnWorker(engine.url, { name: 'ns-worker-b', namespace: 'ns-b', functions: [{ id: 'shared::fn', kind: 'tag' }] });
  await waitFunctions(c, ['shared::fn'], { filter: (f) => f.namespace === 'ns-a', timeout: 10000 })
    .then(() => waitFunctions(c, ['shared::fn'], { filter: (f) => f.namespace === 'ns-b', timeout: 10000 }))
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, nsA, nsB)}`); });
});

after(async () => {
  raw?.close();
  await shutdownAllClients();
  await Promise.all([nsA?.stop(), nsB?.stop()]);
  await engine?.stop();
});

test('the same function id lives in two namespaces, each owned by its own worker', { timeout: 20000 }, async () => {
  const rows = (await call(c, 'engine::functions::list', { prefix: 'shared::' })).functions;
  const pairs = rows.map((r) => [r.namespace, r.worker_name]).sort();
  assert.deepEqual(pairs, [['ns-a', 'ns-worker-a'], ['ns-b', 'ns-worker-b']]);
  const ws = (await call(c, 'engine::workers::list', {})).workers;
  assert.equal(ws.find((w) => w.name === 'ns-worker-a')?.namespace, 'ns-a');
  assert.equal(ws.find((w) => w.name === 'ns-worker-b')?.namespace, 'ns-b');

  const ra = await raw.invoke('shared::fn', { v: 'to-a' }, { namespace: 'ns-a' });
  assert.equal(ra.error, undefined, JSON.stringify(ra.error));
  assert.deepEqual(ra.result, { from: 'ns-worker-a', ns: 'ns-a', got: 'to-a' });
  const rb = await raw.invoke('shared::fn', { v: 'to-b' }, { namespace: 'ns-b' });
  assert.deepEqual(rb.result, { from: 'ns-worker-b', ns: 'ns-b', got: 'to-b' });

  // an SDK call carries no namespace: strict default, with the hint
  const e = await callErr(c, 'shared::fn', { v: 1 }, 5000);
  assert.equal(e.code, 'function_not_found');
  assert.equal(e.message, 'function_not_found: Function shared::fn not found in namespace default. It is registered in namespace(s): ns-a, ns-b.');

  const amb = await callErr(c, 'engine::functions::info', { function_id: 'shared::fn' });
  assert.equal(amb.code, 'NOT_FOUND');
  assert.equal(amb.message, "NOT_FOUND: Function 'shared::fn' is ambiguous: it is registered in namespace(s): ns-a, ns-b. Pass `namespace` to select one.");
  const infoB = await call(c, 'engine::functions::info', { function_id: 'shared::fn', namespace: 'ns-b' });
  assert.equal(infoB.worker_name, 'ns-worker-b');
  assert.equal(infoB.namespace, 'ns-b');
});

test('a second worker registering the same id in ns-a is refused; the first keeps serving', { timeout: 30000 }, async () => {
  const a2 = spawnWorker(engine.url, {
    name: 'ns-worker-a2',
    namespace: 'ns-a',
    functions: [{ id: 'shared::fn', kind: 'tag' }, { id: 'a2::own', kind: 'tag' }],
  });
  try {
    await waitFunctions(c, ['a2::own'], { filter: (f) => f.namespace === 'ns-a', timeout: 10000 });
    await sleep(200);
    const rows = (await call(c, 'engine::functions::list', { prefix: 'shared::' })).functions;
    const inA = rows.filter((r) => r.namespace === 'ns-a');
    assert.deepEqual(inA.map((r) => r.worker_name), ['ns-worker-a'], 'the incumbent keeps the id');
    for (let i = 0; i < 5; i++) {
      const r = await raw.invoke('shared::fn', { v: i }, { namespace: 'ns-a' });
      assert.deepEqual(r.result, { from: 'ns-worker-a', ns: 'ns-a', got: i });
    }
    const own = await raw.invoke('a2::own', { v: 'x' }, { namespace: 'ns-a' });
    assert.deepEqual(own.result, { from: 'ns-worker-a2', ns: 'ns-a', got: 'x' }, 'the refused worker stays connected and serves its other functions');
    await waitWorker(c, 'ns-worker-a2');
  } finally {
    await a2.stop();
  }
});

test('conflict in default: registrationrejected names the owner; the refused worker is not promoted', { timeout: 30000 }, async () => {
  const first = spawnWorker(engine.url, { name: 'dup-first', functions: [{ id: 'dup::fn', kind: 'tag' }] });
  const second = spawnWorker(engine.url, { name: 'dup-second', functions: [{ id: 'dup::fn', kind: 'tag' }, { id: 'dup2::other', kind: 'tag' }] });
  try {
    await waitFunctions(c, ['dup::fn'], { timeout: 10000 });
    const firstRow = await waitWorker(c, 'dup-first');
    await waitFunctions(c, ['dup2::other'], { timeout: 10000 });
    // which SDK worker won depends on which registered first; find the owner
    const owner = (await call(c, 'engine::functions::list', { prefix: 'dup::' })).functions;
    assert.equal(owner.length, 1, `one owner: ${JSON.stringify(owner)}`);
    const ownerName = owner[0].worker_name;
    for (let i = 0; i < 5; i++) assert.equal((await call(c, 'dup::fn', { v: i })).from, ownerName);

    // a raw registration of the same id is refused with the owner's id
    const ownerRow = await waitWorker(c, ownerName);
    raw.send({ type: 'registerfunction', id: 'dup::fn', description: 'intruder' });
    const rej = await raw.waitFrame((m) => m.type === 'registrationrejected' && m.function_id === 'dup::fn', 3000, 'registrationrejected');
    assert.equal(rej.code, 'FUNCTION_NAMESPACE_CONFLICT');
    assert.equal(rej.namespace, 'default');
    assert.equal(rej.owner_worker_id, ownerRow.id);
    assert.equal('worker_name' in rej, false);
    assert.equal((await call(c, 'dup::fn', { v: 'after' })).from, ownerName, 'the owner keeps serving');
    const d = await call(c, 'engine::functions::info', { function_id: 'dup::fn' });
    assert.equal(d.worker_name, ownerName);

    // the owner leaves: the id disappears, nobody is promoted
    const loser = ownerName === 'dup-first' ? 'dup-second' : 'dup-first';
    await (ownerName === 'dup-first' ? first : second).stop();
    await waitFunctions(c, ['dup::fn'], { present: false, timeout: 3000 });
    const e = await callErr(c, 'dup::fn', { v: 1 }, 5000);
    assert.equal(e.code, 'function_not_found');
    await waitWorker(c, loser);
    assert.ok(firstRow.id);
  } finally {
    await Promise.all([first.stop(), second.stop()]);
  }
});

test('the same worker name twice in one namespace: the second is refused, the first undisturbed', { timeout: 30000 }, async () => {
  const first = spawnWorker(engine.url, { name: 'twin', functions: [{ id: 'twin1::fn', kind: 'tag' }] });
  let second;
  try {
    await waitFunctions(c, ['twin1::fn'], { timeout: 10000 });
    const row = await waitWorker(c, 'twin');
    // same name; iii-sdk 0.22.1 ignores registrationrejected and keeps reconnecting after the
    // engine closes it, which must not disturb the incumbent
    second = spawnWorker(engine.url, { name: 'twin', functions: [{ id: 'twin2::fn', kind: 'tag' }] });
    await second.waitEvent((e) => e.ev === 'started', 5000);
    await sleep(2500);
    const rows = (await call(c, 'engine::workers::list', {})).workers.filter((w) => w.name === 'twin');
    assert.deepEqual(rows.map((w) => w.id), [row.id], 'one twin row, the first one');
    const info = await call(c, 'engine::workers::info', { name: 'twin' });
    assert.equal(info.worker.pid, first.pid);
    const fl = (await call(c, 'engine::functions::list', { include_internal: true })).functions.map((f) => f.function_id);
    assert.ok(!fl.includes('twin2::fn'), 'the refused worker\'s buffered registrations are never applied');
    assert.deepEqual(await call(c, 'twin1::fn', { v: 1 }), { from: 'twin', ns: 'default', got: 1 });
  } finally {
    await Promise.all([first.stop(), second?.stop()]);
  }
});
