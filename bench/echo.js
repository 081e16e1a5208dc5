// WebSocket echo load on the Node `ws` library, for `cargo xtask bench`.
//
//   node echo.js server HOST PORT
//       echo server; prints `ready` once listening.
//   node echo.js client URL CONNECTIONS SIZE WARMUP_S MEASURE_S
//       opens CONNECTIONS connections; each keeps one SIZE-byte binary message in flight
//       (send, wait for the echo, send again). After WARMUP_S seconds it counts the echoes
//       received during MEASURE_S seconds, then prints one JSON line
//       {"connections", "size", "messages", "seconds", "rate"} and exits.
//
// Compression is off on both sides, so every message is one small write and one small read on
// each end: the case where per-call costs in the kernel weigh the most.
'use strict';

const WebSocket = require('ws');

const [role, ...args] = process.argv.slice(2);

if (role === 'server') {
  const [host, port] = args;
  const server = new WebSocket.Server({ host, port: Number(port), perMessageDeflate: false });
  server.on('connection', (ws) => ws.on('message', (data) => ws.send(data, { binary: true })));
  server.on('listening', () => console.log('ready'));
} else if (role === 'client') {
  const [url, connArg, sizeArg, warmupArg, measureArg] = args;
  const connections = Number(connArg);
  const payload = Buffer.alloc(Number(sizeArg), 120);
  const warmupMs = Number(warmupArg) * 1000;
  const measureMs = Number(measureArg) * 1000;
  let counting = false;
  let messages = 0;
  let open = 0;
  let startedAt = 0n;

  const start = () => {
    setTimeout(() => {
      counting = true;
      startedAt = process.hrtime.bigint();
      setTimeout(() => {
        const seconds = Number(process.hrtime.bigint() - startedAt) / 1e9;
        console.log(JSON.stringify({
          connections, size: payload.length, messages, seconds, rate: messages / seconds,
        }));
        process.exit(0);
      }, measureMs);
    }, warmupMs);
  };

  for (let i = 0; i < connections; i += 1) {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    ws.on('open', () => {
      open += 1;
      ws.send(payload);
      if (open === connections) start();
    });
    ws.on('message', () => {
      if (counting) messages += 1;
      ws.send(payload);
    });
    ws.on('error', (error) => {
      console.error(`connection ${i}: ${error.message}`);
      process.exit(1);
    });
  }
} else {
  console.error('usage: echo.js server HOST PORT | client URL CONNECTIONS SIZE WARMUP_S MEASURE_S');
  process.exit(2);
}
