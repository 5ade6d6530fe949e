// A worker that provides node::greet, using the official SDK (iii-sdk 0.22.1).
//
//   node worker.mjs            # engine at $III_URL, default ws://127.0.0.1:49134
//
// The SDK connects, registers the function, announces the worker (engine::workers::register)
// and reconnects on its own if the engine restarts. Stop it with Ctrl-C.
import { registerWorker } from 'iii-sdk';

const url = process.env.III_URL || 'ws://127.0.0.1:49134';
const iii = registerWorker(url, {
  workerName: process.env.III_WORKER_NAME || 'node-example',
  // OpenTelemetry export is on by default in the SDK; this example keeps the wire quiet.
  otel: { enabled: false },
  enableMetricsReporting: false,
});

iii.registerFunction('node::greet', async (data) => {
  const name = typeof data?.name === 'string' && data.name ? data.name : 'world';
  return { greeting: `Hello, ${name}!` };
}, { description: 'Greet someone: {name} -> {greeting}' });

console.log(`node worker: serving node::greet via ${url}`);

const stop = async () => {
  await iii.shutdown();
  process.exit(0);
};
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
