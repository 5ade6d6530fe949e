// Large, unicode and numeric payloads relayed unchanged between SDK workers (separate processes).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  startEngine, spawnWorker, client, call, waitFunctions, shutdownAllClients, diag, RawClient, trunc,
} from './lib.mjs';

let engine;
let w;
let c;

before(async () => {
  engine = await startEngine();
  w = spawnWorker(engine.url, {
    name: 'payload-worker',
    functions: [{ id: 'pl::echo', kind: 'echo' }, { id: 'pl::stringify', kind: 'stringify' }],
  });
  c = client(engine.url, { name: 'payload-client', invocationTimeoutMs: 30000 });
  await waitFunctions(c, ['pl::echo', 'pl::stringify'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}`); });
});

after(async () => {
  await shutdownAllClients();
  await w?.stop();
  await engine?.stop();
});

const sha = (s) => createHash('sha256').update(s).digest('hex');

function bigString(n) {
  // deterministic, mixed ASCII with escapes that JSON must carry (quotes, backslashes, controls)
  const alphabet = 'abcdefghijklmnopqrstuvwxyz0123456789 "\\/\t\n{}[]:,';
  let s = '';
  const chunk = [];
  for (let i = 0; i < 4096; i++) chunk.push(alphabet[(i * 7 + 3) % alphabet.length]);
  const block = chunk.join('');
  while (s.length < n) s += block;
  return s.slice(0, n);
}

test('an 8 MiB string payload is relayed unchanged (both directions)', { timeout: 60000 }, async () => {
  const s = bigString(8 * 1024 * 1024);
  const t0 = Date.now();
  const r = await call(c, 'pl::echo', { v: s }, 30000);
  assert.equal(typeof r, 'string');
  assert.equal(r.length, s.length);
  assert.equal(sha(r), sha(s));
  // the same as a bare (non-object) payload
  const r2 = await call(c, 'pl::echo', s, 30000);
  assert.equal(sha(r2), sha(s));
  assert.ok(Date.now() - t0 < 30000);
});

test('16 concurrent 2 MiB calls each get their own payload back (engine write backpressure)', { timeout: 60000 }, async () => {
  const base = bigString(2 * 1024 * 1024 - 16);
  const ps = [];
  for (let i = 0; i < 16; i++) ps.push(call(c, 'pl::echo', { v: `${String(i).padStart(8, '0')}${base}` }, 30000));
  const rs = await Promise.all(ps);
  rs.forEach((r, i) => {
    assert.equal(r.slice(0, 8), String(i).padStart(8, '0'), `result ${i} belongs to call ${i}`);
    assert.equal(r.length, base.length + 8);
    assert.equal(sha(r.slice(8)), sha(base));
  });
});

test('an 8 MiB structured payload (array of objects) round-trips', { timeout: 60000 }, async () => {
  const arr = [];
  let size = 0;
  for (let i = 0; size < 8 * 1024 * 1024; i++) {
    const o = { i, name: `item-${i}`, tags: ['x', 'y'], ok: i % 2 === 0, f: i / 7 };
    arr.push(o);
    size += JSON.stringify(o).length + 1;
  }
  const r = await call(c, 'pl::echo', { v: arr }, 30000);
  assert.equal(r.length, arr.length);
  assert.equal(sha(JSON.stringify(r)), sha(JSON.stringify(arr)));
});

test('unicode payloads are relayed unchanged', { timeout: 30000 }, async () => {
  const v = {
    latin: 'Grüße, café, naïve, ñandú',
    cjk: '漢字かなカナ한국어',
    rtl: 'שלום مرحبا',
    emoji: '🚀👩‍👩‍👧‍👦🏳️‍🌈🇺🇳',
    astral: '𝄞𝕏𠀀',
    combining: 'e\u0301 a\u0308',
    zeroWidth: 'a\u200bb\u200dc\ufeffd',
    controls: '\u0000\u0001\u001f\u007f',
    separators: 'line\u2028para\u2029',
    escapes: 'quote " backslash \\ slash / tab \t nl \n cr \r',
    'ключ 🔑': 'unicode key',
    long: '😀'.repeat(100000),
  };
  const r = await call(c, 'pl::echo', { v });
  assert.deepEqual(r, v);
  const r2 = await call(c, 'pl::stringify', { v });
  assert.equal(r2, JSON.stringify(v), 'the callee parsed exactly what the caller serialized');
});

test('lone surrogates (escaped U+D800..U+DFFF) are relayed as they arrived (DECISIONS item 7)', { timeout: 30000 }, async () => {
  const v = { lone_high: 'a\ud800b', lone_low: '\udc00', reversed: '\udc00\ud800' };
  const r = await call(c, 'pl::echo', { v });
  assert.deepEqual(r, v);
});

test('extreme numbers that survive a JS round trip arrive with the same value', { timeout: 30000 }, async () => {
  const nums = [
    0, -1, 1, Number.MAX_SAFE_INTEGER, Number.MIN_SAFE_INTEGER, 2 ** 53 + 2, -(2 ** 63), 2 ** 64,
    Number.MAX_VALUE, -Number.MAX_VALUE, Number.MIN_VALUE, -Number.MIN_VALUE, 2.2250738585072014e-308,
    0.1, 0.1 + 0.2, 1 / 3, 1e21, 1e-7, 123456789012345680000, 9007199254740993, 1.7976931348623157e308, 5e-324,
    4.35, 100, 1e300, -1e-300,
  ];
  const r = await call(c, 'pl::stringify', { v: nums });
  assert.equal(r, JSON.stringify(nums), 'what the callee parsed, re-serialized, equals what the caller sent');
  const e = await call(c, 'pl::echo', { v: nums });
  assert.deepEqual(e, nums);
  assert.ok(e.every((x, i) => Object.is(x, nums[i])), 'bit-identical values');
});

test('number spellings JS would change are kept verbatim between raw clients (DECISIONS item 7)', { timeout: 30000 }, async () => {
  // raw -> engine -> raw, so no JS parser touches the payload on the path being tested
  const callee = await new RawClient(engine.url).open();
  const caller = await new RawClient(engine.url).open();
  try {
    callee.register('raw-number-callee');
    caller.register('raw-number-caller');
    callee.send({ type: 'registerfunction', id: 'raw::numbers' });
    await waitFunctions(c, ['raw::numbers'], { timeout: 8000 });
    const body = '[-0,1e300,1E400,-1E-400,123456789012345678901234567890,0.10000000000000000000001,1.0,-0.0e0,5e-324]';
    const resP = caller.invoke('raw::numbers', null, { rawData: body, timeout: 5000 });
    const inv = await callee.waitFrame((m) => m.type === 'invokefunction' && m.function_id === 'raw::numbers', 5000, 'invokefunction at the raw callee');
    const m = inv.__raw.match(/"data"\s*:\s*(\[[^\]]*\])/);
    assert.ok(m, `data array in ${trunc(inv.__raw)}`);
    assert.equal(m[1].replace(/\s+/g, ''), body, 'number spellings unchanged');
    callee.send({ type: 'invocationresult', invocation_id: inv.invocation_id, function_id: 'raw::numbers', result: 'seen' });
    const res = await resP;
    assert.equal(res.result, 'seen');
  } finally {
    caller.close();
    callee.close();
  }
});
