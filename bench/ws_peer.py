"""WebSocket peer on the Python `websockets` library, for the detection rounds of `cargo xtask bench`.

    ws_peer.py server HOST PORT             server that reads and discards every message
    ws_peer.py client URL stream|silent

`stream` sends 64 KiB messages as fast as the connection takes them; `silent` exchanges nothing
after the handshake. Heartbeats are off so that only the benchmark decides what crosses the wire.
Prints `ready` once listening or connected.
"""

import asyncio
import sys

import websockets


async def sink(ws):
    async for _ in ws:
        pass


async def server(host, port):
    async with websockets.serve(sink, host, port, ping_interval=None, max_size=None):
        print("ready", flush=True)
        await asyncio.Future()


async def client(url, mode):
    async with websockets.connect(url, ping_interval=None, max_size=None) as ws:
        print("ready", flush=True)
        if mode == "stream":
            payload = b"x" * 65536
            while True:
                await ws.send(payload)
        await asyncio.Future()


def main():
    if sys.argv[1] == "server":
        asyncio.run(server(sys.argv[2], int(sys.argv[3])))
    else:
        asyncio.run(client(sys.argv[2], sys.argv[3]))


if __name__ == "__main__":
    main()
