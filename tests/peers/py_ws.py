"""WebSocket peer built on the Python `websockets` library, for observer's tests.

    py_ws.py server PORT [MODE [HOST]]   server on HOST:PORT (default 127.0.0.1; `dual` is a
                                         dual-stack [::] socket that also takes IPv4)
    py_ws.py client URL chatty|silent|stream [COUNT]

Server modes: `echo` (default) echoes; `sink` reads and discards; `ping` echoes and pings every
second, never closing for a missing pong; `stream` sends 64 KiB messages as fast as the
connection takes them; `noread` never reads but sends a message every second; `close` closes
each connection after a second (code 1000), waits 3 s for the close reply, then ends TCP;
`reject` answers every upgrade with 426 Upgrade Required; `big101` echoes, with a 101 of over
2 KiB (a padding header added by the library's `process_response` hook).

Client modes: `chatty` sends a message every 200 ms and reads the echo; `silent` exchanges COUNT
messages (default 3) then stays connected without a byte either way; `stream` sends 64 KiB
messages as fast as the connection takes them and never reads; `pinger` sends nothing but the
library's keepalive pings, every 500 ms, and never gives up on a missing pong; `pinger-strict`
pings the same way but gives a pong 1 s, then fails the connection with code 1011 as the library
does, and prints `closed CODE` with the code it sent once TCP is gone; `lengths` sends
one uncompressed binary message of each size in COUNT (comma-separated) and prints `sent N` for
each; `close` exchanges one message and closes with code 1001; `drain` reads everything and sends
nothing; `once` tries to connect and prints `accepted` or `rejected STATUS`, then stays. Outside the pinger modes, heartbeats are
off so that only the test decides what crosses the wire. Prints `ready` once listening or
connected, `quiet` when a `silent` client has gone quiet, and `done` when a client is done.
"""

import asyncio
import socket
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


async def stream(ws):
    payload = b"s" * 65536
    while True:
        await ws.send(payload)


async def noread(ws):
    while True:
        await ws.send("still here")
        await asyncio.sleep(1)


async def close_after_a_second(ws):
    await asyncio.sleep(1)
    await ws.close()


def refuse(connection, request):
    return connection.respond(426, "WebSocket not served here\n")


def pad_101(connection, request, response):
    response.headers["X-Padding"] = "p" * 2048


async def server(port, mode, host):
    handlers = {"sink": sink, "stream": stream, "noread": noread, "close": close_after_a_second}
    handler = handlers.get(mode, echo)
    options = {"ping_interval": None, "max_size": None}
    if mode == "reject":
        options.update(process_request=refuse)
    if mode == "big101":
        options.update(process_response=pad_101)
    if mode == "close":
        options.update(close_timeout=3)
    if mode == "ping":
        options.update(ping_interval=1, ping_timeout=None)
    if host == "dual":
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        options["sock"] = sock
    else:
        options.update(host=host, port=port)
    async with websockets.serve(handler, **options):
        say("ready")
        await asyncio.Future()


async def client(url, mode, count):
    options = {"ping_interval": None, "max_size": None}
    if mode == "once":
        try:
            async with websockets.connect(url, **options):
                say("accepted")
                await asyncio.Future()
        except websockets.exceptions.InvalidStatus as refused:
            say(f"rejected {refused.response.status_code}")
            await asyncio.Future()
    if mode == "pinger":
        options.update(ping_interval=0.5, ping_timeout=None)
    if mode == "pinger-strict":
        options.update(ping_interval=0.5, ping_timeout=1)
    if mode == "lengths":
        options.update(compression=None)
    async with websockets.connect(url, **options) as ws:
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
        elif mode == "pinger":
            await asyncio.Future()
        elif mode == "pinger-strict":
            await ws.wait_closed()
            say(f"closed {ws.protocol.close_sent.code if ws.protocol.close_sent else None}")
            await asyncio.Future()
        elif mode == "lengths":
            for size in count:
                await ws.send(b"\x5a" * size)
                say(f"sent {size}")
            say("done")
            await asyncio.Future()
        elif mode == "drain":
            async for _ in ws:
                pass
        elif mode == "close":
            await ws.send("bye")
            await ws.recv()
            await ws.close(code=1001)
            say("done")
            await asyncio.Future()
        else:
            raise SystemExit(f"unknown mode {mode}")


def main():
    role = sys.argv[1]
    if role == "server":
        mode = sys.argv[3] if len(sys.argv) > 3 else "echo"
        host = sys.argv[4] if len(sys.argv) > 4 else "127.0.0.1"
        asyncio.run(server(int(sys.argv[2]), mode, host))
    else:
        mode = sys.argv[3]
        arg = sys.argv[4] if len(sys.argv) > 4 else "3"
        count = [int(n) for n in arg.split(",")] if mode == "lengths" else int(arg)
        asyncio.run(client(sys.argv[2], mode, count))


if __name__ == "__main__":
    main()
