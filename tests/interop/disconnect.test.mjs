// A worker process dies (SIGKILL) while calls to it are in flight.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, callErr, waitFunctions, waitWorker, shutdownAllClients, diag,
} from './lib.mjs';

let engine;
let c;

before(async () => {
  engine = await startEngine();
  c = client(engine.url, { name: 'disc-caller' });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

test('SIGKILL of the callee mid-call: the caller gets invocation_stopped within 1 s', { timeout: 30000 }, async () => {
  const victim = spawnWorker(engine.url, {
    name: 'victim',
    functions: [{ id: 'victim::slow', kind: 'sleep' }, { id: 'victim::echo', kind: 'echo' }],
  });
  try {
    await waitFunctions(c, ['victim::slow', 'victim::echo'], { timeout: 10000 });
    assert.equal(await call(c, 'victim::echo', { v: 'alive' }), 'alive');
    // two concurrent calls in flight, one through a second SDK worker in the same process
    const c2 = client(engine.url, { name: 'disc-caller-2' });
    await waitWorker(c, 'disc-caller-2');
    const p1 = c.trigger({ function_id: 'victim::slow', payload: { ms: 20000, n: 1 }, timeoutMs: 15000 }).then(
      (r) => ({ ok: r }), (e) => ({ err: e, t: Date.now() }));
    const p2 = c2.trigger({ function_id: 'victim::slow', payload: { ms: 20000, n: 2 }, timeoutMs: 15000 }).then(
      (r) => ({ ok: r }), (e) => ({ err: e, t: Date.now() }));
    await victim.waitEvent((e) => e.ev === 'invoked' && e.data?.n === 1, 5000, 'call 1 at the handler');
    await victim.waitEvent((e) => e.ev === 'invoked' && e.data?.n === 2, 5000, 'call 2 at the handler');
    const killedAt = Date.now();
    victim.kill('SIGKILL');
    const [r1, r2] = await Promise.all([p1, p2]);
    for (const [i, r] of [[1, r1], [2, r2]]) {
      assert.ok(r.err, `call ${i} must fail, it resolved with ${JSON.stringify(r.ok)}`);
      assert.equal(r.err.code, 'invocation_stopped', `call ${i}: got ${r.err.message}\n${diag(engine)}`);
      assert.equal(r.err.message, 'invocation_stopped: Invocation stopped');
      assert.ok(r.t - killedAt < 1000, `call ${i} failed ${r.t - killedAt} ms after the kill (limit 1000)`);
    }
    // the dead worker's functions are gone and calling them fails fast
    await waitFunctions(c, ['victim::slow', 'victim::echo'], { present: false, timeout: 3000 });
    const e = await callErr(c, 'victim::echo', { v: 1 }, 5000);
    assert.equal(e.code, 'function_not_found');
    await waitWorker(c, 'victim', { present: false, timeout: 3000 });
    // the callers are unaffected
    assert.ok((await call(c2, 'engine::functions::list', {})).functions);
  } finally {
    await victim.stop();
  }
});

test('a caller that dies mid-call does not disturb the callee or other callers', { timeout: 30000 }, async () => {
  const callee = spawnWorker(engine.url, { name: 'callee', functions: [{ id: 'callee::slow', kind: 'sleep' }, { id: 'callee::echo', kind: 'echo' }] });
  const caller = spawnWorker(engine.url, { name: 'doomed-caller', functions: [{ id: 'doomed::relay', kind: 'relay' }] });
  try {
    await waitFunctions(c, ['callee::slow', 'callee::echo', 'doomed::relay'], { timeout: 10000 });
    // doomed-caller's handler calls callee::slow; we call it void so nothing waits on doomed-caller
    await c.trigger({ function_id: 'doomed::relay', payload: { target: 'callee::slow', payload: { ms: 1500, n: 'from-doomed' } }, action: { type: 'void' } });
    await callee.waitEvent((e) => e.ev === 'invoked' && e.data?.n === 'from-doomed', 5000, 'the relayed call at the callee');
    caller.kill('SIGKILL');
    await waitWorker(c, 'doomed-caller', { present: false, timeout: 3000 });
    // the callee finishes its handler (its late result is dropped by the engine) and keeps serving
    await callee.waitEvent((e) => e.ev === 'finished', 5000, 'the callee handler to finish');
    assert.equal(await call(c, 'callee::echo', { v: 'ok' }), 'ok');
    const row = await waitWorker(c, 'callee');
    assert.equal(row.active_invocations, 0, 'no invocation left in flight on the callee');
  } finally {
    await Promise.all([callee.stop(), caller.stop()]);
  }
});
