// Many idle WebSocket connections on the Node `ws` library, for `cargo xtask bench`.
//
//   node idle.js server HOST PORT
//       server that accepts and keeps every connection; prints `ready` once listening.
//   node idle.js client URL COUNT
//       opens COUNT connections, at most 200 handshakes at a time, then keeps them open without
//       a byte either way (no pings); prints `ready` once all are open.
'use strict';

const WebSocket = require('ws');

const [role, ...args] = process.argv.slice(2);

if (role === 'server') {
  const [host, port] = args;
  const server = new WebSocket.Server({
    host, port: Number(port), perMessageDeflate: false, backlog: 4096,
  });
  server.on('connection', (ws) => ws.on('error', () => {}));
  server.on('listening', () => console.log('ready'));
} else if (role === 'client') {
  const [url, countArg] = args;
  const count = Number(countArg);
  const held = [];
  let started = 0;
  let open = 0;
  const next = () => {
    if (started >= count) return;
    started += 1;
    const ws = new WebSocket(url, { perMessageDeflate: false });
    held.push(ws);
    ws.on('open', () => {
      open += 1;
      if (open === count) console.log('ready');
      next();
    });
    ws.on('error', (error) => {
      console.error(`connection ${started}: ${error.message}`);
      process.exit(1);
    });
  };
  for (let i = 0; i < Math.min(200, count); i += 1) next();
} else {
  console.error('usage: idle.js server HOST PORT | client URL COUNT');
  process.exit(2);
}
