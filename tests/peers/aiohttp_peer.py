"""WebSocket server built on aiohttp, for observer's tests.

    aiohttp_peer.py server PORT

Listens on 127.0.0.1:PORT and upgrades a request on any path, then echoes every text and binary
message. Heartbeats are off (aiohttp still answers pings). Prints `ready` once listening.
"""

import asyncio
import sys

from aiohttp import WSMsgType, web


async def echo(request):
    ws = web.WebSocketResponse(heartbeat=None)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def server(port):
    app = web.Application()
    app.router.add_get("/{path:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("ready", flush=True)
    await asyncio.Future()


def main():
    role, port = sys.argv[1], int(sys.argv[2])
    if role != "server":
        raise SystemExit(f"unknown role {role}")
    asyncio.run(server(port))


if __name__ == "__main__":
    main()
