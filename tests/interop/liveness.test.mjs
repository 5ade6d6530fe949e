// Engine-side liveness (DECISIONS item 2) with short settings: the engine pings quiet
// connections and closes ones that stay silent. Live SDK workers answer the pings on their own
// (the ws client auto-pongs); a frozen (SIGSTOP) worker is reaped like a disconnect.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFunctions, waitWorker, shutdownAllClients, diag, sdkLog, sleep,
} from './lib.mjs';

const PING_MS = 300;
const IDLE_MS = 1200;
let engine;
let c;

before(async () => {
  engine = await startEngine({
    config: `workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
      ping_interval_ms: ${PING_MS}
      idle_timeout_ms: ${IDLE_MS}
`,
  });
  c = client(engine.url, { name: 'live-observer' });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

test('idle but live SDK workers survive many ping intervals without reconnecting', { timeout: 30000 }, async () => {
  const w = spawnWorker(engine.url, { name: 'live-idle', functions: [{ id: 'live::echo', kind: 'echo' }] });
  try {
    await waitFunctions(c, ['live::echo'], { timeout: 10000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}`); });
    const a = await waitWorker(c, 'live-idle');
    const b = await waitWorker(c, 'live-observer');
    const mark = sdkLog.length;
    await sleep(IDLE_MS * 4); // nothing sent by anyone but the engine's pings and the pongs
    const rows = (await call(c, 'engine::workers::list', {})).workers;
    assert.equal(rows.find((r) => r.name === 'live-idle')?.id, a.id, 'worker process kept its connection');
    assert.equal(rows.find((r) => r.name === 'live-observer')?.id, b.id, 'in-process client kept its connection');
    assert.ok(!/Reconnecting in/.test(w.output()), 'the worker never reconnected');
    assert.ok(!sdkLog.slice(mark).some((l) => /Reconnecting in/.test(l.line)), 'the client never reconnected');
    assert.equal(await call(c, 'live::echo', { v: 'ok' }), 'ok');
  } finally {
    await w.stop();
  }
});

test('a frozen worker (SIGSTOP) is reaped: in-flight callers get invocation_stopped; after SIGCONT it comes back', { timeout: 40000 }, async () => {
  const w = spawnWorker(engine.url, { name: 'live-frozen', functions: [{ id: 'frozen::slow', kind: 'sleep' }, { id: 'frozen::echo', kind: 'echo' }] });
  try {
    await waitFunctions(c, ['frozen::slow', 'frozen::echo'], { timeout: 10000 });
    const old = await waitWorker(c, 'live-frozen');
    const p = c.trigger({ function_id: 'frozen::slow', payload: { ms: 60000 }, timeoutMs: 15000 }).then((r) => ({ r }), (e) => ({ e, t: Date.now() }));
    await w.waitEvent((e) => e.ev === 'invoked', 5000, 'the call at the handler');
    const frozenAt = Date.now();
    w.kill('SIGSTOP');
    const res = await p;
    assert.ok(res.e, `the call must fail, got ${JSON.stringify(res.r)}`);
    assert.equal(res.e.code, 'invocation_stopped', `got ${res.e.message}`);
    const after = res.t - frozenAt;
    assert.ok(after < IDLE_MS + PING_MS + 2000, `reaped ${after} ms after the freeze (idle ${IDLE_MS} ms)`);
    await waitWorker(c, 'live-frozen', { present: false, timeout: 3000 });
    await waitFunctions(c, ['frozen::echo'], { present: false, timeout: 3000 });

    w.kill('SIGCONT'); // the SDK finds its socket dead and reconnects (backoff ~1 s)
    await waitFunctions(c, ['frozen::echo'], { timeout: 15000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}\n${w.output().slice(-1500)}`); });
    const back = await waitWorker(c, 'live-frozen');
    assert.notEqual(back.id, old.id);
    assert.equal(await call(c, 'frozen::echo', { v: 'thawed' }), 'thawed');
  } finally {
    w.kill('SIGCONT');
    await w.stop();
  }
});
