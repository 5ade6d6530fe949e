// engine::{functions,workers,triggers,registered-triggers}::{list,info} seen through the SDK,
// while a worker is connected and after it left.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, callErr, waitFunctions, waitWorker, waitFor, shutdownAllClients, diag,
} from './lib.mjs';

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

let engine;
let subject; // worker process: functions + a trigger type + its own binding
let keeper; // in-process client: binds to the subject's type and to engine::workers-available
let keeperBindingTt; // id of keeper's reg::tt binding
let keeperBindingWa; // id of keeper's engine::workers-available binding
let subjectBinding; // id of subject's own reg::tt binding

const ALPHA_REQ = { type: 'object', properties: { v: { type: 'string' } } };
const ALPHA_RES = { type: 'string' };

before(async () => {
  engine = await startEngine();
  subject = spawnWorker(engine.url, {
    name: 'reg-subject',
    description: 'Registry subject worker',
    functions: [
      { id: 'reg::alpha', kind: 'echo', options: { description: 'Alpha function', request_format: ALPHA_REQ, response_format: ALPHA_RES, metadata: { team: 'blue' } } },
      { id: 'reg::beta', kind: 'echo', options: { description: 'Beta function' } },
      { id: 'reg::hidden', kind: 'echo', options: { metadata: { internal: true } } },
    ],
    triggerTypes: [{ id: 'reg::tt', description: 'Registry test type' }],
    triggers: [{ type: 'reg::tt', function_id: 'reg::beta', config: { every: '1s' } }],
  });
  keeper = client(engine.url, { name: 'reg-keeper' });
  keeper.registerFunction('keep::on', async () => ({ ok: true }), { description: 'keeper handler' });
  keeper.registerTrigger({ type: 'engine::workers-available', function_id: 'keep::on', config: {} });
  await waitFunctions(keeper, ['reg::alpha', 'reg::beta', 'reg::hidden', 'reg::tt::fire', 'keep::on'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, subject)}`); });
  // keeper binds to the subject's type only once the type exists, so this one is delivered at once
  keeper.registerTrigger({ type: 'reg::tt', function_id: 'reg::alpha', config: { k: 1 }, metadata: { who: 'keeper' } });
  const rows = await waitFor(async () => {
    const r = await call(keeper, 'engine::registered-triggers::list', {});
    const rs = r.registered_triggers || [];
    return rs.length >= 3 ? rs : false;
  }, { timeout: 5000, what: '3 registered triggers' });
  keeperBindingTt = rows.find((r) => r.trigger_type === 'reg::tt' && r.function_id === 'reg::alpha')?.id;
  subjectBinding = rows.find((r) => r.trigger_type === 'reg::tt' && r.function_id === 'reg::beta')?.id;
  keeperBindingWa = rows.find((r) => r.trigger_type === 'engine::workers-available')?.id;
  assert.ok(keeperBindingTt && subjectBinding && keeperBindingWa, `bindings listed: ${JSON.stringify(rows)}`);
});

after(async () => {
  await shutdownAllClients();
  await subject?.stop();
  await engine?.stop();
});

const ids = (rows, key = 'function_id') => rows.map((r) => r[key]);
const sorted = (a) => [...a].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));

test('engine::functions::list with the worker connected (fields, hiding, filters, order)', { timeout: 20000 }, async () => {
  const all = (await call(keeper, 'engine::functions::list', {})).functions;
  const got = ids(all);
  assert.deepEqual(got, sorted(got), 'sorted by function_id');
  for (const id of ['reg::alpha', 'reg::beta', 'reg::tt::fire', 'keep::on']) assert.ok(got.includes(id), `${id} listed: ${got}`);
  assert.ok(!got.includes('reg::hidden'), 'metadata.internal hidden by default');
  assert.ok(!got.some((id) => id.startsWith('engine::') && !id.startsWith('engine::queue::')), `engine::* hidden: ${got}`);
  const alpha = all.find((f) => f.function_id === 'reg::alpha');
  assert.equal(alpha.namespace, 'default');
  assert.equal(alpha.worker_name, 'reg-subject');
  assert.equal(alpha.description, 'Alpha function');
  assert.deepEqual(alpha.metadata, { team: 'blue' });
  assert.equal(all.find((f) => f.function_id === 'keep::on').worker_name, 'reg-keeper');

  const internal = ids((await call(keeper, 'engine::functions::list', { include_internal: true })).functions);
  assert.ok(internal.includes('reg::hidden'), 'include_internal shows metadata.internal');
  assert.ok(internal.includes('engine::functions::list'), 'include_internal shows engine::*');

  assert.deepEqual(ids((await call(keeper, 'engine::functions::list', { prefix: 'reg::' })).functions), ['reg::alpha', 'reg::beta', 'reg::tt::fire']);
  assert.deepEqual(ids((await call(keeper, 'engine::functions::list', { worker: 'reg-keeper' })).functions), ['keep::on']);
  assert.deepEqual(ids((await call(keeper, 'engine::functions::list', { search: 'ALPHA' })).functions), ['reg::alpha']);
  assert.deepEqual(ids((await call(keeper, 'engine::functions::list', { search: 'keeper handler' })).functions), ['keep::on'], 'search matches descriptions');
});

test('engine::functions::info with the worker connected (single, batch, errors)', { timeout: 20000 }, async () => {
  const d = await call(keeper, 'engine::functions::info', { function_id: 'reg::alpha' });
  assert.equal(d.function_id, 'reg::alpha');
  assert.equal(d.namespace, 'default');
  assert.equal(d.worker_name, 'reg-subject');
  assert.equal(d.description, 'Alpha function');
  assert.deepEqual(d.request_schema, ALPHA_REQ);
  assert.deepEqual(d.response_schema, ALPHA_RES);
  assert.deepEqual(d.metadata, { team: 'blue' });
  assert.deepEqual(d.registered_triggers, [{ id: keeperBindingTt, trigger_type: 'reg::tt', config: { k: 1 } }]);

  const b = await call(keeper, 'engine::functions::info', { function_ids: ['reg::beta', 'reg::zzz'] });
  assert.equal(b.functions.length, 2);
  assert.equal(b.functions[0].function_id, 'reg::beta');
  assert.equal(b.functions[0].worker_name, 'reg-subject');
  assert.deepEqual(b.functions[1], { function_id: 'reg::zzz', error: 'not_found' });

  const e = await callErr(keeper, 'engine::functions::info', { function_id: 'reg::zzz' });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.message, "NOT_FOUND: Function 'reg::zzz' is not registered.");
  const e2 = await callErr(keeper, 'engine::functions::info', {});
  assert.equal(e2.code, 'INVALID_ARGUMENTS');
});

let subjectRow;
test('engine::workers::list with the worker connected', { timeout: 20000 }, async () => {
  const rows = (await call(keeper, 'engine::workers::list', {})).workers;
  subjectRow = rows.find((w) => w.name === 'reg-subject');
  assert.ok(subjectRow, `reg-subject listed: ${JSON.stringify(rows)}`);
  assert.match(subjectRow.id, UUID);
  assert.equal(subjectRow.description, 'Registry subject worker');
  assert.equal(subjectRow.version, '0.22.1');
  assert.equal(subjectRow.runtime, 'node');
  assert.equal(subjectRow.namespace, 'default');
  assert.equal(subjectRow.status, 'connected');
  assert.equal(subjectRow.function_count, 4, 'alpha, beta, hidden, reg::tt::fire');
  assert.equal(typeof subjectRow.os, 'string');
  assert.equal(typeof subjectRow.connected_at_ms, 'number');
  assert.ok(Math.abs(Date.now() - subjectRow.connected_at_ms) < 120000, `connected_at_ms is epoch ms: ${subjectRow.connected_at_ms}`);
  assert.equal(typeof subjectRow.active_invocations, 'number');
  assert.ok('isolation' in subjectRow && 'ip_address' in subjectRow, 'isolation and ip_address present');
  assert.equal('pid' in subjectRow, false, 'list rows carry no pid');
  assert.ok(rows.find((w) => w.name === 'reg-keeper'), 'the keeper is listed');
  assert.ok(rows.some((w) => w.runtime === 'engine'), 'in-process modules are listed with runtime engine');
  const names = rows.map((w) => w.name ?? w.id);
  assert.deepEqual(names, sorted(names), 'sorted by name');
  const filtered = (await call(keeper, 'engine::workers::list', { search: 'reg-sub' })).workers;
  assert.deepEqual(filtered.map((w) => w.name), ['reg-subject']);
  const node = (await call(keeper, 'engine::workers::list', { runtime: 'node' })).workers;
  assert.deepEqual(sorted(node.map((w) => w.name)), ['reg-keeper', 'reg-subject']);
});

test('engine::workers::info with the worker connected', { timeout: 20000 }, async () => {
  const r = await call(keeper, 'engine::workers::info', { name: 'reg-subject' });
  assert.equal(r.worker.name, 'reg-subject');
  assert.equal(r.worker.id, subjectRow.id);
  assert.equal(r.worker.pid, subject.pid, 'pid reported by the SDK is in ::info');
  assert.equal(r.worker.internal, false);
  assert.deepEqual(ids(r.functions), ['reg::alpha', 'reg::beta', 'reg::hidden', 'reg::tt::fire']);
  assert.deepEqual(ids(r.trigger_types, 'id'), ['reg::tt']);
  assert.deepEqual(sorted(ids(r.registered_triggers, 'id')), sorted([keeperBindingTt, subjectBinding]));
  const e = await callErr(keeper, 'engine::workers::info', { name: 'nobody-here' });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.message, "NOT_FOUND: Worker 'nobody-here' is not connected.");
});

test('engine::triggers::list / ::info with the provider connected', { timeout: 20000 }, async () => {
  const rows = (await call(keeper, 'engine::triggers::list', {})).triggers;
  const tt = rows.find((t) => t.id === 'reg::tt');
  assert.deepEqual(
    { id: tt?.id, namespace: tt?.namespace, worker_name: tt?.worker_name, description: tt?.description },
    { id: 'reg::tt', namespace: 'default', worker_name: 'reg-subject', description: 'Registry test type' },
  );
  assert.ok(!rows.some((t) => t.id.startsWith('engine::')), 'engine::* hidden by default');
  const internal = (await call(keeper, 'engine::triggers::list', { include_internal: true })).triggers.map((t) => t.id);
  assert.ok(internal.includes('engine::workers-available') && internal.includes('engine::functions-available'), `internal: ${internal}`);
  const info = await call(keeper, 'engine::triggers::info', { id: 'reg::tt' });
  assert.equal(info.id, 'reg::tt');
  assert.equal(info.worker_name, 'reg-subject');
  assert.equal(info.description, 'Registry test type');
  assert.equal(info.instance_count, 2);
  const e = await callErr(keeper, 'engine::triggers::info', { id: 'reg::none' });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.message, "NOT_FOUND: Trigger type 'reg::none' is not registered in namespace 'default'.");
});

test('engine::registered-triggers::list / ::info with the worker connected', { timeout: 20000 }, async () => {
  const rows = (await call(keeper, 'engine::registered-triggers::list', {})).registered_triggers;
  assert.deepEqual(ids(rows, 'id'), sorted([keeperBindingTt, subjectBinding, keeperBindingWa]), 'sorted by id, live bindings only');
  const k = rows.find((r) => r.id === keeperBindingTt);
  assert.match(k.id, UUID, 'the SDK-generated trigger id is kept');
  assert.equal(k.trigger_type, 'reg::tt');
  assert.equal(k.function_id, 'reg::alpha');
  assert.equal(k.worker_name, 'reg-subject', "worker_name is the target function's owner");
  assert.deepEqual(k.config, { k: 1 });
  assert.equal(k.config_summary, '{"k":1}');
  assert.equal(rows.find((r) => r.id === keeperBindingWa).worker_name, 'reg-keeper');
  const byType = (await call(keeper, 'engine::registered-triggers::list', { trigger_type: 'reg::tt' })).registered_triggers;
  assert.deepEqual(sorted(ids(byType, 'id')), sorted([keeperBindingTt, subjectBinding]));
  const byFn = (await call(keeper, 'engine::registered-triggers::list', { function_id: 'reg::beta' })).registered_triggers;
  assert.deepEqual(ids(byFn, 'id'), [subjectBinding]);

  const info = await call(keeper, 'engine::registered-triggers::info', { id: keeperBindingTt });
  assert.equal(info.id, keeperBindingTt);
  assert.equal(info.trigger_type, 'reg::tt');
  assert.equal(info.function_id, 'reg::alpha');
  assert.deepEqual(info.config, { k: 1 });
  assert.deepEqual(info.metadata, { who: 'keeper' });
  assert.equal(info.trigger?.id, 'reg::tt');
  assert.equal(info.function?.function_id, 'reg::alpha');
  assert.equal(info.function?.worker_name, 'reg-subject');
  const e = await callErr(keeper, 'engine::registered-triggers::info', { id: 'no-such-binding' });
  assert.equal(e.code, 'NOT_FOUND');
  assert.equal(e.message, "NOT_FOUND: Registered trigger 'no-such-binding' was not found.");
  // the provider got both bindings, with config and metadata
  const ev = await subject.waitEvent((x) => x.ev === 'trigger_registered' && x.id === keeperBindingTt, 3000);
  assert.deepEqual({ f: ev.function_id, c: ev.config, m: ev.metadata }, { f: 'reg::alpha', c: { k: 1 }, m: { who: 'keeper' } });
});

test('after the worker leaves: every list and info forgets it', { timeout: 30000 }, async () => {
  const st = await subject.stop();
  assert.equal(st.code, 0, 'worker exited cleanly');
  await waitWorker(keeper, 'reg-subject', { present: false, timeout: 5000 });

  const fl = ids((await call(keeper, 'engine::functions::list', { include_internal: true })).functions);
  assert.ok(!fl.some((id) => id.startsWith('reg::')), `reg::* gone: ${fl}`);
  assert.ok(fl.includes('keep::on'), 'other workers keep their functions');
  const e1 = await callErr(keeper, 'engine::functions::info', { function_id: 'reg::alpha' });
  assert.equal(e1.code, 'NOT_FOUND');
  const e1b = await callErr(keeper, 'reg::alpha', { v: 1 }, 5000);
  assert.equal(e1b.code, 'function_not_found');

  const wl = (await call(keeper, 'engine::workers::list', {})).workers;
  assert.ok(!wl.some((w) => w.name === 'reg-subject' || w.id === subjectRow.id), 'worker row gone');
  assert.ok(wl.some((w) => w.name === 'reg-keeper'), 'keeper still listed');
  const e2 = await callErr(keeper, 'engine::workers::info', { name: 'reg-subject' });
  assert.equal(e2.code, 'NOT_FOUND');
  assert.equal(e2.message, "NOT_FOUND: Worker 'reg-subject' is not connected.");

  const tl = (await call(keeper, 'engine::triggers::list', { include_internal: true })).triggers.map((t) => t.id);
  assert.ok(!tl.includes('reg::tt'), `trigger type gone: ${tl}`);
  const e3 = await callErr(keeper, 'engine::triggers::info', { id: 'reg::tt' });
  assert.equal(e3.code, 'NOT_FOUND');

  const rl = ids((await call(keeper, 'engine::registered-triggers::list', { include_internal: true })).registered_triggers, 'id');
  assert.deepEqual(rl, [keeperBindingWa], 'own binding removed, keeper binding parked (not listed), keeper subscription kept');
  const e4 = await callErr(keeper, 'engine::registered-triggers::info', { id: subjectBinding });
  assert.equal(e4.code, 'NOT_FOUND');
});

test('worker name and description from the SDK are sanitized (controls, bidi dropped; 280 chars; trimmed)', { timeout: 20000 }, async () => {
  const odd = client(engine.url, { name: '  ctl\u0007na\u202eme\u2028  ', workerDescription: `${'d'.repeat(400)}` });
  try {
    const row = await waitWorker(keeper, 'ctlname', { timeout: 5000 });
    assert.equal(row.description, 'd'.repeat(280));
    const info = await call(keeper, 'engine::workers::info', { name: 'ctlname' });
    assert.equal(info.worker.pid, process.pid);
  } finally {
    await odd.shutdown();
  }
});
