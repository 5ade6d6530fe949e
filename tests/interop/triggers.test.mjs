// Trigger types provided by one SDK worker, bound by another (separate processes).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFor, waitFunctions, shutdownAllClients, diag, sleep,
} from './lib.mjs';

let engine;
let c;

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'tt-observer' });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

async function bindings(type) {
  const r = await call(c, 'engine::registered-triggers::list', { trigger_type: type });
  return r.registered_triggers || [];
}

async function waitTypeListed(id, present = true) {
  return waitFor(async () => {
    const r = await call(c, 'engine::triggers::list', {});
    const hit = (r.triggers || []).some((t) => t.id === id);
    return present ? hit : !hit;
  }, { timeout: 8000, what: `trigger type ${id} ${present ? 'listed' : 'gone'}` });
}

test('provider and binder in two processes: delivered, fired, unbound when the binder leaves', { timeout: 40000 }, async () => {
  const provider = spawnWorker(engine.url, { name: 'tt-provider', triggerTypes: [{ id: 'demo::tick', description: 'ticks' }] });
  let binder;
  try {
    await waitTypeListed('demo::tick');
    binder = spawnWorker(engine.url, {
      name: 'tt-binder',
      functions: [{ id: 'binder::on_tick', kind: 'record', result: { handled: true } }],
      triggers: [{ type: 'demo::tick', function_id: 'binder::on_tick', config: { interval: 5 }, metadata: { m: 1 } }],
    });
    const reg = await provider.waitEvent((e) => e.ev === 'trigger_registered' && e.function_id === 'binder::on_tick', 10000, 'registertrigger at the provider');
    assert.deepEqual(reg.config, { interval: 5 });
    assert.deepEqual(reg.metadata, { m: 1 });
    await waitFunctions(c, ['binder::on_tick']);
    const listed = await bindings('demo::tick');
    assert.deepEqual(listed.map((b) => b.id), [reg.id], 'the binding is live under the SDK-generated id');
    assert.equal(listed[0].function_id, 'binder::on_tick');

    const fired = await call(c, 'demo::tick::fire', { event: 'e1' });
    assert.deepEqual(fired, { fired: [{ id: reg.id, function_id: 'binder::on_tick', ok: true, result: { handled: true } }] });
    const inv = await binder.waitEvent((e) => e.ev === 'invoked' && e.data?.event === 'e1', 3000);
    assert.equal(inv.data.binding, reg.id);

    await binder.stop();
    const un = await provider.waitEvent((e) => e.ev === 'trigger_unregistered' && e.id === reg.id, 3000, 'unregistertrigger at the provider');
    assert.equal(un.type, 'demo::tick');
    assert.deepEqual(await bindings('demo::tick'), []);
  } finally {
    await Promise.all([provider.stop(), binder?.stop()]);
  }
});

test('a binding made before its type exists is parked, then delivered when a provider appears', { timeout: 40000 }, async () => {
  const early = spawnWorker(engine.url, {
    name: 'tt-early-binder',
    functions: [{ id: 'early::on_tick', kind: 'record', result: 'early-ok' }],
    triggers: [{ type: 'demo::later', function_id: 'early::on_tick', config: { c: 2 } }],
  });
  let p1;
  let p2;
  try {
    await waitFunctions(c, ['early::on_tick'], { timeout: 10000 });
    await sleep(300);
    assert.deepEqual(await bindings('demo::later'), [], 'a parked binding is not listed');
    assert.ok(!/Trigger registration failed/.test(early.errors()), 'parking is not an error for the binder');

    p1 = spawnWorker(engine.url, { name: 'tt-late-provider', triggerTypes: [{ id: 'demo::later', description: 'arrives late' }] });
    const reg = await p1.waitEvent((e) => e.ev === 'trigger_registered' && e.function_id === 'early::on_tick', 10000, 'the parked binding at the new provider');
    assert.deepEqual(reg.config, { c: 2 });
    await waitFunctions(c, ['demo::later::fire']);
    await waitFor(async () => (await bindings('demo::later')).length === 1, { timeout: 3000, what: 'the binding to be live' });
    const fired = await call(c, 'demo::later::fire', { event: 'late-1' });
    assert.deepEqual(fired.fired.map((f) => [f.id, f.ok, f.result]), [[reg.id, true, 'early-ok']]);
    await early.waitEvent((e) => e.ev === 'invoked' && e.data?.event === 'late-1', 3000);

    // the provider leaves: the binding is parked again (not listed), a new provider gets it replayed
    await p1.stop();
    await waitTypeListed('demo::later', false);
    assert.deepEqual(await bindings('demo::later'), []);
    p2 = spawnWorker(engine.url, { name: 'tt-late-provider-2', triggerTypes: [{ id: 'demo::later', description: 'again' }] });
    const reg2 = await p2.waitEvent((e) => e.ev === 'trigger_registered' && e.function_id === 'early::on_tick', 10000, 'replay to the second provider');
    assert.equal(reg2.id, reg.id, 'same binding id after the replay');
    await waitFunctions(c, ['demo::later::fire']);
    const fired2 = await call(c, 'demo::later::fire', { event: 'late-2' });
    assert.deepEqual(fired2.fired.map((f) => [f.id, f.ok]), [[reg.id, true]]);
    await early.waitEvent((e) => e.ev === 'invoked' && e.data?.event === 'late-2', 3000);
  } finally {
    await Promise.all([early.stop(), p1?.stop(), p2?.stop()]);
  }
});

test('a provider that refuses a binding: the error reaches the binder and the binding is not live', { timeout: 40000 }, async () => {
  const picky = spawnWorker(engine.url, { name: 'tt-picky', triggerTypes: [{ id: 'demo::picky', description: 'refuses', reject: true }] });
  let binder;
  try {
    await waitTypeListed('demo::picky');
    binder = spawnWorker(engine.url, {
      name: 'tt-refused',
      functions: [{ id: 'refused::fn', kind: 'record' }],
      triggers: [{ type: 'demo::picky', function_id: 'refused::fn', config: {} }],
    });
    const reg = await picky.waitEvent((e) => e.ev === 'trigger_registered', 10000, 'registertrigger at the picky provider');
    // the SDK logs a forwarded error result with console.error
    await waitFor(() => binder.errors().includes(`Trigger registration failed for "${reg.id}" (demo::picky): provider refuses ${reg.id}`),
      { timeout: 3000, what: () => `the forwarded triggerregistrationresult at the binder (stderr: ${binder.errors().slice(-500)})` });
    assert.deepEqual(await bindings('demo::picky'), [], 'a refused binding is parked, not listed');
  } catch (e) {
    e.message += `\n${diag(engine, picky, binder)}`;
    throw e;
  } finally {
    await Promise.all([picky.stop(), binder?.stop()]);
  }
});
