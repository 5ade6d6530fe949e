// Long test (III_LONG=1): SDK workers stay connected and idle for 70 s without reconnecting.
// The SDK pings every 20 s and gives up on a socket after 60 s without inbound data, so this
// proves the engine answers WebSocket pings (and does not reap a quiet but live worker itself).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startEngine, spawnWorker, client, call, waitFunctions, waitWorker, shutdownAllClients, diag, sdkLog, sleep,
} from './lib.mjs';

const LONG = process.env.III_LONG === '1';
const IDLE_MS = 70000;

let engine;
let w;

after(async () => {
  await shutdownAllClients();
  await w?.stop();
  await engine?.stop();
});

if (!LONG) {
  // node:test's skip option carries the reason into the TAP line (`# SKIP <reason>`)
  test('idle SDK workers stay connected for 70 s without reconnecting', { skip: 'long test: set III_LONG=1 to run (70 s idle)' }, () => {});
} else {
  test('idle SDK workers stay connected for 70 s without reconnecting', { timeout: IDLE_MS + 30000 }, async () => {
    engine = await startEngine();
    w = spawnWorker(engine.url, { name: 'idle-w', functions: [{ id: 'idle::echo', kind: 'echo' }] });
    const c = client(engine.url, { name: 'idle-client' });
    await waitFunctions(c, ['idle::echo'], { timeout: 10000 }).catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}`); });
    const wRow = await waitWorker(c, 'idle-w');
    const cRow = await waitWorker(c, 'idle-client');
    const logMark = sdkLog.length;

    await sleep(IDLE_MS); // nobody sends anything but the SDK's own pings

    const rows = (await call(c, 'engine::workers::list', {})).workers;
    assert.equal(rows.find((r) => r.name === 'idle-w')?.id, wRow.id, 'worker process kept its worker id');
    assert.equal(rows.find((r) => r.name === 'idle-client')?.id, cRow.id, 'in-process client kept its worker id');
    assert.ok(!/Reconnecting in|No inbound data/.test(w.output() + w.errors()), `worker never reconnected:\n${w.output().slice(-2000)}${w.errors().slice(-2000)}`);
    const mine = sdkLog.slice(logMark).filter((l) => /Reconnecting in|No inbound data/.test(l.line));
    assert.deepEqual(mine, [], 'in-process client never reconnected');
    assert.equal(await call(c, 'idle::echo', { v: 'awake' }), 'awake');
  });
}
