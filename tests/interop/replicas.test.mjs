// Replicas with the official SDK: several SDK worker processes register the same function id
// under a `providers: many` routing rule (the engine's extension, see tests/test_replicas.py for
// the raw-socket suite): round-robin shares the load evenly, least-inflight uses every provider, and `balance: first` fails over on SIGKILL.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFor, shutdownAllClients, diag, sleep,
} from './lib.mjs';

const CONFIG = `workers:
  - name: iii-worker-manager
    config:
      host: 127.0.0.1
routing:
  - match: "share::*"
    providers: many
    balance: round-robin
  - match: "least::*"
    providers: many
  - match: "standby::*"
    providers: many
    balance: first
`;

let engine;
let c;

before(async () => {
  engine = await startEngine({ config: CONFIG });
  c = client(engine.url, { name: 'replicas-caller' });
});

after(async () => {
  await shutdownAllClients();
  await engine?.stop();
});

/** Wait until engine::functions::list shows `id` with `n` providers; returns the row. */
async function waitProviders(id, n, timeout = 10000) {
  return waitFor(async () => {
    const r = await call(c, 'engine::functions::list', { include_internal: true }, 3000);
    const row = (r.functions || []).find((f) => f.function_id === id);
    if (!row) return false;
    // `providers` is listed once there are several (a single provider may omit it)
    const have = Array.isArray(row.providers) ? row.providers.length : 1;
    return have === n ? row : false;
  }, { timeout, interval: 100, what: `${id} with ${n} providers` });
}

/** 1,000 calls to `id`, 16 in flight at a time as a busy caller would; returns {counts, errors}. */
async function load(id) {
  const counts = {};
  const errors = [];
  let next = 0;
  await Promise.all(Array.from({ length: 16 }, async () => {
    while (next < 1000) {
      const k = next++;
      try {
        const r = await call(c, id, { v: k }, 10000);
        counts[r.from] = (counts[r.from] || 0) + 1;
      } catch (e) {
        errors.push(`${e.code}: ${e.message}`);
      }
    }
  }));
  return { counts, errors };
}

// round-robin is exact whatever the machine's load: every provider serves 250 +- a few
test('4 SDK replicas share 1,000 calls round-robin (each 20-30 %)', { timeout: 60000 }, async () => {
  const ws = [0, 1, 2, 3].map((i) => spawnWorker(engine.url, {
    name: `share-${i}`, functions: [{ id: 'share::tag', kind: 'tag' }],
  }));
  try {
    await waitProviders('share::tag', 4);
    const { counts, errors } = await load('share::tag');
    assert.deepEqual(errors, [], `failed calls\n${diag(engine)}`);
    for (const w of ws) {
      const n = counts[w.name] || 0;
      assert.ok(n >= 200 && n <= 300, `${w.name} served ${n} of 1000: ${JSON.stringify(counts)}`);
    }
  } finally {
    await Promise.all(ws.map((w) => w.stop()));
  }
});

// least-inflight follows the providers' speed (a process the OS starves gets less), so the
// claim is only that every provider takes part and nothing fails
test('4 SDK replicas under least-inflight all serve, nothing fails', { timeout: 60000 }, async () => {
  const ws = [0, 1, 2, 3].map((i) => spawnWorker(engine.url, {
    name: `least-${i}`, functions: [{ id: 'least::tag', kind: 'tag' }],
  }));
  try {
    await waitProviders('least::tag', 4);
    const { counts, errors } = await load('least::tag');
    assert.deepEqual(errors, [], `failed calls\n${diag(engine)}`);
    assert.equal(Object.values(counts).reduce((a, b) => a + b, 0), 1000);
    for (const w of ws) {
      assert.ok((counts[w.name] || 0) >= 20, `${w.name} served ${counts[w.name] || 0} of 1000: ${JSON.stringify(counts)}`);
    }
  } finally {
    await Promise.all(ws.map((w) => w.stop()));
  }
});

test('balance first: SIGKILL of the active provider fails over with zero failed calls after the kill', { timeout: 60000 }, async () => {
  const a = spawnWorker(engine.url, { name: 'standby-a', functions: [{ id: 'standby::tag', kind: 'tag' }] });
  await waitProviders('standby::tag', 1);
  const b = spawnWorker(engine.url, { name: 'standby-b', functions: [{ id: 'standby::tag', kind: 'tag' }] });
  try {
    await waitProviders('standby::tag', 2);
    for (let i = 0; i < 20; i++) {
      assert.equal((await call(c, 'standby::tag', { v: i })).from, 'standby-a', 'the earliest provider serves everything');
    }
    // continuous load from 4 concurrent loops
    const recs = [];
    let stop = false;
    const loops = Array.from({ length: 4 }, async () => {
      while (!stop) {
        const t = Date.now();
        try {
          const r = await call(c, 'standby::tag', {}, 5000);
          recs.push({ t, from: r.from });
        } catch (e) {
          recs.push({ t, code: e.code, message: e.message });
        }
      }
    });
    await sleep(300);
    const tKill = Date.now();
    a.kill('SIGKILL');
    await a.exited;
    const tDead = Date.now(); // the process is gone: its socket is closed
    await sleep(1000);
    stop = true;
    await Promise.all(loops);
    const nf = recs.filter((r) => r.code === 'function_not_found');
    assert.equal(nf.length, 0, `function_not_found during the failover: ${nf.length}`);
    const late = recs.filter((r) => r.t >= tDead && r.code);
    assert.deepEqual(late.map((r) => `${r.code}: ${r.message}`), [], `calls issued after the kill failed\n${diag(engine)}`);
    const racing = recs.filter((r) => r.code && r.t < tDead && r.code !== 'invocation_stopped');
    assert.deepEqual(racing.map((r) => r.code), [], 'calls in flight at the kill fail only with invocation_stopped');
    const after = new Set(recs.filter((r) => r.t >= tDead && r.from).map((r) => r.from));
    assert.deepEqual([...after], ['standby-b'], 'after the kill the standby serves');
    assert.ok(recs.filter((r) => r.t >= tDead).length >= 20, 'the load kept running after the kill');
    const before = new Set(recs.filter((r) => r.t < tKill && r.from).map((r) => r.from));
    assert.deepEqual([...before], ['standby-a'], 'before the kill only the active provider served');
    await waitProviders('standby::tag', 1, 3000);
  } finally {
    await Promise.all([a.stop(), b.stop()]);
  }
});
