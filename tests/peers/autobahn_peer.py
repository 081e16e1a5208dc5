"""Autobahn|Python client that splits every frame into one-byte writes, for observer's tests.

    autobahn_peer.py URL COUNT

Sends COUNT text frames of growing size with `sendFrame(..., chopsize=1)` on a TCP_NODELAY
socket, so each byte leaves in its own write (Autobahn paces those writes with timers, so they
keep leaving after `done`), then a ping the same way. Logs `frame OPCODE LENGTH` for each frame
it queued, then `done`, and stays connected.
"""

import asyncio
import sys

import txaio

from autobahn.asyncio.websocket import WebSocketClientFactory, WebSocketClientProtocol


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


def main():
    url, count = sys.argv[1], int(sys.argv[2])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    txaio.use_asyncio()
    txaio.config.loop = loop
    factory = WebSocketClientFactory(url, loop=loop)
    factory.protocol = Chopper
    factory.count = count
    factory.setProtocolOptions(tcpNoDelay=True, autoPingInterval=0)
    host, port = url.split("//")[1].split("/")[0].split(":")
    loop.run_until_complete(loop.create_connection(factory, host, int(port)))
    print("ready", flush=True)
    loop.run_forever()


if __name__ == "__main__":
    main()
