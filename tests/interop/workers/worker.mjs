// A configurable iii-sdk worker process for the interop tests.
//
// Env: III_URL (engine), WORKER_SPEC (JSON, see lib.mjs spawnWorker), OTEL_ENABLED.
// Prints one `EVT {json}` line per observable event on stdout. Exits when stdin closes (the
// test process went away) or on SIGTERM (after sdk.shutdown()).

import { registerWorker, TriggerAction } from 'iii-sdk';
import { createHash } from 'node:crypto';

const spec = JSON.parse(process.env.WORKER_SPEC || '{}');
const url = process.env.III_URL;

function emit(ev) {
  process.stdout.write(`EVT ${JSON.stringify(ev)}\n`);
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const opts = {
  workerName: spec.name,
  workerDescription: spec.description,
  invocationTimeoutMs: spec.invocationTimeoutMs ?? 15000,
};
if (!spec.otel) {
  opts.otel = { enabled: false };
  opts.enableMetricsReporting = false; // metrics need OTel; off avoids a console warning
}

const iii = registerWorker(url, opts);

// The SDK (0.22.1) has no namespace option. To put this worker into a namespace we queue our own
// engine::workers::register (void) before the socket opens: the SDK sends queued frames right
// after its replayed registrations and before its own (namespace-less) register call, so the
// engine resolves the connection's namespace from this one (first resolution wins, PROTOCOL §1.4).
if (spec.namespace) {
  iii.trigger({
    function_id: 'engine::workers::register',
    payload: {
      runtime: 'node',
      version: '0.22.1',
      name: spec.name,
      description: spec.description,
      pid: process.pid,
      isolation: null,
      namespace: spec.namespace,
    },
    action: TriggerAction.Void(),
  });
}

// Trigger bindings handed to us as a provider: id -> {function_id, config, metadata}
const bindings = new Map();

for (const tt of spec.triggerTypes || []) {
  iii.registerTriggerType({ id: tt.id, description: tt.description ?? `type ${tt.id}` }, {
    async registerTrigger(t) {
      bindings.set(t.id, t);
      emit({ ev: 'trigger_registered', type: tt.id, id: t.id, function_id: t.function_id, config: t.config, metadata: t.metadata });
      if (tt.reject) throw new Error(`provider refuses ${t.id}`);
    },
    async unregisterTrigger(t) {
      bindings.delete(t.id);
      emit({ ev: 'trigger_unregistered', type: tt.id, id: t.id });
    },
  });
  // `<type>::fire` calls every bound function with the given payload and reports the outcomes.
  iii.registerFunction(`${tt.id}::fire`, async (data) => {
    const out = [];
    for (const [id, t] of bindings) {
      try {
        const r = await iii.trigger({ function_id: t.function_id, payload: { binding: id, event: data.event }, timeoutMs: 5000 });
        out.push({ id, function_id: t.function_id, ok: true, result: r ?? null });
      } catch (e) {
        out.push({ id, function_id: t.function_id, ok: false, code: e.code, message: e.message });
      }
    }
    return { fired: out };
  });
}

for (const f of spec.functions || []) {
  let handler;
  switch (f.kind) {
    case 'echo': // returns data.v (the payload object gets _caller_worker_id from the engine) or data itself
      handler = async (data) => (data && typeof data === 'object' && !Array.isArray(data) && 'v' in data ? data.v : data);
      break;
    case 'tag': // who answered
      handler = async (data) => ({ from: spec.name, ns: spec.namespace ?? 'default', got: data?.v ?? null });
      break;
    case 'throw':
      handler = async (data) => { throw new Error(f.message ?? data?.message ?? 'boom'); };
      break;
    case 'sleep':
      handler = async (data, metadata) => {
        emit({ ev: 'invoked', id: f.id, data, metadata });
        await sleep(data?.ms ?? 10000);
        emit({ ev: 'finished', id: f.id });
        return { slept: data?.ms ?? 10000 };
      };
      break;
    case 'record':
      handler = async (data, metadata) => {
        emit({ ev: 'invoked', id: f.id, data, metadata });
        return f.result ?? { recorded: true };
      };
      break;
    case 'null':
      handler = async () => null;
      break;
    case 'stringify': // what JS saw after parsing the frame
      handler = async (data) => JSON.stringify(data.v);
      break;
    case 'inc':
      handler = async (data) => ({ i: data.i, twice: data.i * 2, tag: data.tag });
      break;
    case 'relay': // call another function from inside a handler
      handler = async (data) => {
        const r = await iii.trigger({ function_id: data.target, payload: data.payload, timeoutMs: 5000 });
        return { via: spec.name, result: r ?? null };
      };
      break;
    case 'consume_channel': // data.reader is resolved by the SDK into a ChannelReader
      handler = async (data) => {
        const texts = [];
        data.reader.onMessage((m) => texts.push(m));
        const bytes = await data.reader.readAll();
        return { len: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex'), texts };
      };
      break;
    case 'produce_channel': // data.writer is resolved into a ChannelWriter
      handler = async (data) => {
        const buf = Buffer.alloc(data.len);
        for (let i = 0; i < buf.length; i++) buf[i] = (i * 31 + 7) & 0xff;
        if (data.text) data.writer.sendMessage(data.text);
        await new Promise((resolve, reject) => {
          data.writer.stream.write(buf, (err) => (err ? reject(err) : resolve()));
        });
        await new Promise((resolve) => data.writer.stream.end(resolve));
        return { len: buf.length, sha256: createHash('sha256').update(buf).digest('hex') };
      };
      break;
    default:
      throw new Error(`unknown function kind ${f.kind}`);
  }
  iii.registerFunction(f.id, handler, f.options);
}

for (const t of spec.triggers || []) {
  iii.registerTrigger({ type: t.type, function_id: t.function_id, config: t.config ?? {}, metadata: t.metadata });
}

emit({ ev: 'started', pid: process.pid });

let stopping = false;
async function stop(code) {
  if (stopping) return;
  stopping = true;
  const t = setTimeout(() => process.exit(code), 2000);
  try { await iii.shutdown(); } catch { /* ignore */ }
  clearTimeout(t);
  process.exit(code);
}
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
process.stdin.on('end', () => stop(0));
process.stdin.on('error', () => stop(0));
process.stdin.resume();
