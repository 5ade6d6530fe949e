// Channels: createChannel (iii-sdk/helpers) + the SDK's ChannelReader/ChannelWriter, with the
// other end in another worker process (the ref travels inside a call payload).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createChannel } from 'iii-sdk/helpers';
import {
  startEngine, spawnWorker, client, call, waitFunctions, shutdownAllClients, diag, within,
} from './lib.mjs';

let engine;
let w;
let c;

before(async () => {
  engine = await startEngine();
  w = spawnWorker(engine.url, {
    name: 'chan-worker',
    functions: [{ id: 'ch::consume', kind: 'consume_channel' }, { id: 'ch::produce', kind: 'produce_channel' }],
  });
  c = client(engine.url, { name: 'chan-client' });
  await waitFunctions(c, ['ch::consume', 'ch::produce'], { timeout: 10000 })
    .catch((e) => { throw new Error(`${e.message}\n${diag(engine, w)}`); });
});

after(async () => {
  await shutdownAllClients();
  await w?.stop();
  await engine?.stop();
});

const sha = (b) => createHash('sha256').update(b).digest('hex');

test('engine::channels::create returns a matching writer/reader ref pair', { timeout: 20000 }, async () => {
  const r = await call(c, 'engine::channels::create', { buffer_size: 8 });
  assert.equal(r.writer.direction, 'write');
  assert.equal(r.reader.direction, 'read');
  assert.equal(r.writer.channel_id, r.reader.channel_id);
  assert.equal(r.writer.access_key, r.reader.access_key);
  assert.match(r.writer.channel_id, /^[0-9a-f-]{36}$/);
});

test('a channel relays text and binary data from this process to a worker process', { timeout: 40000 }, async () => {
  const ch = await createChannel(c, 16);
  const data = Buffer.alloc(1024 * 1024 + 123);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13 + 5) & 0xff;
  const pending = call(c, 'ch::consume', { reader: ch.readerRef }, 30000);
  ch.writer.sendMessage('hello-text ✓');
  await new Promise((resolve, reject) => ch.writer.stream.write(data, (e) => (e ? reject(e) : resolve())));
  await new Promise((resolve) => ch.writer.stream.end(resolve));
  const r = await pending;
  assert.equal(r.len, data.length);
  assert.equal(r.sha256, sha(data));
  assert.deepEqual(r.texts, ['hello-text ✓']);
});

test('a channel relays data from a worker process back to this process', { timeout: 40000 }, async () => {
  const ch = await createChannel(c, 4);
  const texts = [];
  ch.reader.onMessage((m) => texts.push(m));
  const reading = ch.reader.readAll();
  const r = await call(c, 'ch::produce', { writer: ch.writerRef, len: 300000, text: 'from-worker' }, 30000);
  const got = await within(reading, 10000, 'reader to reach end of stream');
  assert.equal(got.length, r.len);
  assert.equal(sha(got), r.sha256);
  assert.deepEqual(texts, ['from-worker']);
});

test('a channel with buffer_size 1 carries 8 MiB in order to another process (backpressure)', { timeout: 60000 }, async () => {
  const ch = await createChannel(c, 1);
  const data = Buffer.alloc(8 * 1024 * 1024);
  for (let i = 0; i < data.length; i += 4) data.writeUInt32LE(i >>> 2, i); // position-dependent: reordering shows
  const pending = call(c, 'ch::consume', { reader: ch.readerRef }, 45000);
  await new Promise((resolve, reject) => ch.writer.stream.write(data, (e) => (e ? reject(e) : resolve())));
  await new Promise((resolve) => ch.writer.stream.end(resolve));
  const r = await pending;
  assert.equal(r.len, data.length);
  assert.equal(r.sha256, sha(data));
});
