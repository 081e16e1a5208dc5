"""WebSocket peer built on the Python `websockets` library, for observer's tests.

    py_ws.py server PORT [echo|sink]     server on 127.0.0.1:PORT that echoes (default) or
                                         reads and discards
    py_ws.py client URL chatty|silent|stream [COUNT]

Client modes: `chatty` sends a message every 200 ms and reads the echo; `silent` exchanges COUNT
messages (default 3) then stays connected without a byte either way; `stream` sends 64 KiB
messages as fast as the connection takes them and never reads. Heartbeats are off so that only
the test decides what crosses the wire. Prints `ready` once listening or connected, and `quiet`
when a `silent` client has gone quiet.
"""

import asyncio
import sys

import websockets


def say(word):
    print(word, flush=True)


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def sink(ws):
    async for _ in ws:
        pass


async def server(port, mode):
    handler = sink if mode == "sink" else echo
    async with websockets.serve(handler, "127.0.0.1", port, ping_interval=None, max_size=None):
        say("ready")
        await asyncio.Future()


async def client(url, mode, count):
    async with websockets.connect(url, ping_interval=None, max_size=None) as ws:
        say("ready")
        if mode == "chatty":
            while True:
                await ws.send("tick")
                await ws.recv()
                await asyncio.sleep(0.2)
        elif mode == "silent":
            for i in range(count):
                await ws.send(f"message {i}")
                await ws.recv()
            say("quiet")
            await asyncio.Future()
        elif mode == "stream":
            payload = b"x" * 65536
            while True:
                await ws.send(payload)
        else:
            raise SystemExit(f"unknown mode {mode}")


def main():
    role = sys.argv[1]
    if role == "server":
        asyncio.run(server(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "echo"))
    else:
        count = int(sys.argv[4]) if len(sys.argv) > 4 else 3
        asyncio.run(client(sys.argv[2], sys.argv[3], count))


if __name__ == "__main__":
    main()
