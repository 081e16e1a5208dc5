// WebSocket peer built on the Node `ws` library, for observer's tests.
//
//   node ws_peer.js server PORT [echo|sink|nopong|broadcast]
//   node ws_peer.js client URL chatty|silent|stream|fragmented|unmasked [COUNT]
//
// Same modes as tests/peers/py_ws.py, plus: a `broadcast` server sends 10 KiB every 5 ms to each
// client without looking at backpressure (its buffer grows in user space); a `nopong` server echoes but never answers pings
// (`autoPong: false`); a `fragmented` client sends one text message in three fragments with a
// ping between the first two, logs each frame it sent as `frame OPCODE FIN`, then `done`; an
// `unmasked` client sends one text frame without the mask RFC 6455 requires of clients.
// Prints `ready` once listening or connected, and `quiet` when a `silent` client has gone quiet.
'use strict';

const WebSocket = require('ws');

const [role, target, mode, countArg] = process.argv.slice(2);

if (role === 'server') {
  const server = new WebSocket.Server({
    host: '127.0.0.1',
    port: Number(target),
    autoPong: mode !== 'nopong',
  });
  const sink = mode === 'sink';
  server.on('connection', (ws) => {
    ws.on('message', (data, isBinary) => {
      if (!sink) ws.send(data, { binary: isBinary });
    });
    if (mode === 'broadcast') {
      const payload = Buffer.alloc(10240, 98);
      const timer = setInterval(() => ws.send(payload), 5);
      ws.on('close', () => clearInterval(timer));
    }
  });
  server.on('listening', () => console.log('ready'));
} else {
  // Fragments are compared by their size on the wire: no compression for them.
  const ws = new WebSocket(target, { perMessageDeflate: mode !== 'fragmented' });
  const count = Number(countArg || 3);
  ws.on('open', () => {
    console.log('ready');
    if (mode === 'chatty') {
      ws.on('message', () => setTimeout(() => ws.send('tick'), 200));
      ws.send('tick');
    } else if (mode === 'silent') {
      let received = 0;
      ws.on('message', () => {
        received += 1;
        if (received === count) console.log('quiet');
        else ws.send(`message ${received}`);
      });
      ws.send('message 0');
    } else if (mode === 'fragmented') {
      const log = (opcode, fin) => console.log(`frame ${opcode} ${fin ? 1 : 0}`);
      ws.send('one ', { fin: false });
      log('text', false);
      ws.ping('mid');
      log('ping', true);
      ws.send('two ', { fin: false });
      log('continuation', false);
      ws.send('three', { fin: true });
      log('continuation', true);
      console.log('done');
    } else if (mode === 'unmasked') {
      ws.send('not masked', { mask: false });
      console.log('done');
    } else if (mode === 'stream') {
      const payload = Buffer.alloc(65536, 120);
      const pump = () => {
        while (ws.bufferedAmount < 4 * 65536) ws.send(payload);
        setTimeout(pump, 5);
      };
      ws.pause && ws.pause();
      pump();
    } else {
      console.error(`unknown mode ${mode}`);
      process.exit(2);
    }
  });
}
