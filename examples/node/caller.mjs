// Calls node::greet once and prints the result as JSON.
//
//   node caller.mjs [NAME]     # engine at $III_URL, default ws://127.0.0.1:49134
import { registerWorker } from 'iii-sdk';

const url = process.env.III_URL || 'ws://127.0.0.1:49134';
const iii = registerWorker(url, {
  workerName: 'node-example-caller',
  otel: { enabled: false },
  enableMetricsReporting: false,
});

let code = 0;
try {
  const result = await iii.trigger({
    function_id: 'node::greet',
    payload: { name: process.argv[2] || 'iii' },
    timeoutMs: 5000,
  });
  console.log(JSON.stringify(result));
} catch (err) {
  console.error(`call failed: ${err.code || ''} ${err.message}`);
  code = 1;
}
await iii.shutdown();
process.exit(code);
