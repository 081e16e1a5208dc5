"""Autobahn|Python peers (asyncio flavour), for observer's tests.

    autobahn_peer.py URL COUNT
    autobahn_peer.py server PORT nopong

The client sends COUNT text frames of growing size with `sendFrame(..., chopsize=1)` on a
TCP_NODELAY socket, so each byte leaves in its own write (Autobahn paces those writes with timers,
so they keep leaving after `done`), then a ping the same way. Logs `frame OPCODE LENGTH` for each
frame it queued, then `done`, and stays connected.

The `nopong` server listens on 127.0.0.1:PORT, echoes messages and overrides `onPing` to do
nothing, so no ping is ever answered; it never pings itself. Prints `ready` once listening.
"""

import asyncio
import sys

import txaio

from autobahn.asyncio.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)


class Chopper(WebSocketClientProtocol):
    def onOpen(self):
        count = self.factory.count
        for i in range(count):
            payload = b"x" * (i * 40)
            self.sendFrame(opcode=1, payload=payload, fin=True, chopsize=1)
            print(f"frame text {len(payload)}", flush=True)
        self.sendFrame(opcode=9, payload=b"hi", fin=True, chopsize=1)
        print("frame ping 2", flush=True)
        print("done", flush=True)


class NoPong(WebSocketServerProtocol):
    def onMessage(self, payload, isBinary):
        self.sendMessage(payload, isBinary)

    def onPing(self, payload):
        pass  # The default would answer with a pong.


def new_loop():
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    txaio.use_asyncio()
    txaio.config.loop = loop
    return loop


def client(url, count):
    loop = new_loop()
    factory = WebSocketClientFactory(url, loop=loop)
    factory.protocol = Chopper
    factory.count = count
    factory.setProtocolOptions(tcpNoDelay=True, autoPingInterval=0)
    host, port = url.split("//")[1].split("/")[0].split(":")
    loop.run_until_complete(loop.create_connection(factory, host, int(port)))
    print("ready", flush=True)
    loop.run_forever()


def server(port, mode):
    if mode != "nopong":
        raise SystemExit(f"unknown mode {mode}")
    loop = new_loop()
    factory = WebSocketServerFactory(f"ws://127.0.0.1:{port}", loop=loop)
    factory.protocol = NoPong
    factory.setProtocolOptions(autoPingInterval=0)
    loop.run_until_complete(loop.create_server(factory, "127.0.0.1", port))
    print("ready", flush=True)
    loop.run_forever()


def main():
    if sys.argv[1] == "server":
        server(int(sys.argv[2]), sys.argv[3])
    else:
        client(sys.argv[1], int(sys.argv[2]))


if __name__ == "__main__":
    main()
