"""observer is read-only on traffic and never exports what crosses it.

Random binary messages are echoed byte-for-byte under load with the agent attached; cookies,
authorization headers, query-string tokens and marked payloads never appear in `/metrics`,
`/connections` or the agent's log.
"""

import sys
import textwrap

from conftest import wait_for

FLAGS = ("--refresh", "250ms")


def test_echoes_are_byte_identical_with_the_agent_attached(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8990
    netns.python_peer("server", port)
    check = textwrap.dedent(
        f"""
        import asyncio, hashlib, os, random, websockets
        async def one(n):
            async with websockets.connect("ws://127.0.0.1:{port}/", max_size=None) as ws:
                for i in range(60):
                    data = os.urandom(random.choice([1, 125, 126, 4000, 65536, 200000]))
                    await ws.send(data)
                    back = await ws.recv()
                    assert back == data, f"connection {{n}} message {{i}} differs"
        async def main():
            await asyncio.gather(*(one(n) for n in range(8)))
            print("identical", flush=True)
        asyncio.run(main())
        """
    )
    netns.spawn(sys.executable, "-c", check, ready="identical", timeout=120)
    # And every frame was still counted.
    wait_for(
        "480 binary frames counted",
        lambda: agent.metric(
            "websocket_messages_total", port=port, role="server", direction="in", opcode="binary"
        )
        == 480,
        timeout=3,
    )


def test_secrets_and_payloads_never_leave(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8991
    netns.python_peer("server", port)
    secrets = ["c00kie-s3cret", "Bearer-t0ken-XYZ", "qu3ry-t0ken", "payl0ad-marker"]
    send = textwrap.dedent(
        f"""
        import asyncio, websockets
        async def main():
            headers = {{"Cookie": "session={secrets[0]}", "Authorization": "{secrets[1]}"}}
            url = "ws://127.0.0.1:{port}/private?token={secrets[2]}"
            async with websockets.connect(url, additional_headers=headers, compression=None) as ws:
                await ws.send("{secrets[3]}")
                await ws.recv()
                print("ready", flush=True)
                await asyncio.Future()
        asyncio.run(main())
        """
    )
    netns.spawn(sys.executable, "-c", send)
    wait_for("the connection reported", lambda: len(agent.connections(port)) == 2, timeout=5)
    exported = agent.get("/metrics") + agent.get("/connections") + agent.read_log()
    for secret in secrets:
        assert secret not in exported, f"{secret} leaked"
    # The path is kept, without its query string.
    assert {c["path"] for c in agent.connections(port)} == {"/private"}
