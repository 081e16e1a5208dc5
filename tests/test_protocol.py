"""WebSocket protocol seen from the kernel: handshakes, frames, ping/pong and close.

Each test drives real peers (Python `websockets`, Node `ws`, websocat, Autobahn|Python, and
hand-written clients for what libraries never send) and compares what the agent reports with
what the sender logged it sent.
"""

import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import PEERS, ROOT, wait_for

FLAGS = ("--idle-after", "2s", "--stall-after", "2s", "--refresh", "250ms", "--pong-timeout", "1s")
REFRESH = 0.25
SLACK = 1.0
WEBSOCAT = str(Path(sys.executable).parent / "websocat")


def ends(agent, port):
    by_role = {c["role"]: c for c in agent.connections(port)}
    return by_role if len(by_role) == 2 else None


def end(agent, port, role):
    return next((c for c in agent.connections(port) if c["role"] == role), None)


def messages(agent, port, role, direction):
    """{opcode: count} of websocket_messages_total for one end and direction."""
    out = Counter()
    for (name, labels), value in agent.metrics().items():
        labels = dict(labels)
        if (
            name == "websocket_messages_total"
            and labels.get("port") == str(port)
            and labels.get("role") == role
            and labels.get("direction") == direction
        ):
            out[labels["opcode"]] = int(value)
    return out


def sender_log(proc, word="done", timeout=15):
    """The `frame ...` lines a peer printed, once it printed `word`."""
    from conftest import Netns

    Netns.expect(proc, word, timeout)
    return [line.split()[1:] for line in proc.seen.decode().splitlines() if line.startswith("frame ")]


def test_pings_pair_with_pongs(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8771
    netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger")

    client = wait_for(
        "three pings answered",
        lambda: (c := end(agent, port, "client")) and c["pongs"] >= 3 and c,
        timeout=5,
    )
    assert client["pong_missed"] == 0
    assert 0 < client["last_pong_latency_seconds"] < 0.5
    assert client["frames_tracked"]
    assert client["last_frame_age_seconds"] < 1.0
    sent = messages(agent, port, "client", "out")
    assert sent["ping"] >= 3 and sent["text"] == 0
    assert messages(agent, port, "server", "out")["pong"] >= 3
    count = agent.metric("websocket_pong_latency_seconds_count", port=port, role="client")
    assert count >= 3
    # Only heartbeats cross: alive, but idle for the application.
    wait_for("client end idle", lambda: end(agent, port, "client")["state"] == "idle", timeout=2 + SLACK + 1)


@pytest.mark.parametrize("server", ["websocat", "node"])
def test_unanswered_pings_are_counted_missed_once_each(netns, agent_factory, server):
    agent = agent_factory(*FLAGS)
    port = 8772
    if server == "websocat":
        netns.spawn(WEBSOCAT, "-q", "--inhibit-pongs", "0", f"ws-l:127.0.0.1:{port}", "mirror:", ready=None)
        wait_for("websocat listening", lambda: f":{port}" in netns.run("ss", "-tlnH"), timeout=10)
    else:
        netns.node_peer("server", port, "nopong")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger")

    client = wait_for(
        "a missed pong",
        lambda: (c := end(agent, port, "client")) and c["pong_missed"] >= 1 and c,
        timeout=0.5 + 1 + REFRESH + SLACK + 1,
    )
    assert client["pongs"] == 0 and client["pings"] >= 1
    assert client["tcp_state"] == "ESTABLISHED" and client["send_queue_bytes"] == 0
    assert agent.metric("websocket_pong_missed_total", port=port, role="client") >= 1
    # Every ping (one each 500 ms) stays unanswered: each is missed once, after the 1 s pong
    # timeout, never once per refresh. At most the pings of the last 1.5 s are not missed yet.
    def each_missed_once():
        c = end(agent, port, "client")
        assert c["pong_missed"] <= c["pings"], c
        return c["pings"] >= 6 and c["pong_missed"] >= c["pings"] - 4 and c

    wait_for("every overdue ping missed", each_missed_once, timeout=10)
    for _ in range(4):
        each_missed_once()
        time.sleep(REFRESH)


def test_fragmented_message_with_a_ping_inside_counts_as_one_message(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8773
    netns.python_peer("server", port, "sink")
    client = netns.node_peer("client", f"ws://127.0.0.1:{port}/", "fragmented")
    log = sender_log(client)
    expected = Counter(opcode for opcode, _fin in log)

    def counted():
        got = messages(agent, port, "client", "out")
        return got == expected and got

    wait_for(f"the sender's frames {dict(expected)}", counted, timeout=3)
    assert messages(agent, port, "server", "in") == expected
    sizes = agent.metric("websocket_message_size_bytes_count", port=port, direction="out")
    assert sizes == 1, "three fragments make one message"
    assert agent.metric("websocket_message_size_bytes_sum", port=port, direction="out") == len("one two three")
    assert agent.metric("websocket_protocol_violations_total", port=port, role="server") is None


def test_every_length_encoding_is_exact(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8774
    sizes = [0, 1, 125, 126, 127, 65535, 65536, 1 << 20, 16 << 20]
    netns.python_peer("server", port, "sink")
    client = netns.python_peer("client", f"ws://127.0.0.1:{port}/", "lengths", ",".join(map(str, sizes)))
    netns.expect(client, "done", timeout=30)

    def all_counted():
        n = agent.metric("websocket_message_size_bytes_count", port=port, direction="out")
        return n == len(sizes)

    wait_for("every message counted", all_counted, timeout=5)
    assert agent.metric("websocket_message_size_bytes_sum", port=port, direction="out") == sum(sizes)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in agent.metrics().items()
        if name == "websocket_message_size_bytes_bucket" and dict(labels).get("direction") == "out"
    }
    assert buckets["64"] == 2  # 0 and 1
    assert buckets["256"] == 5  # 125, 126, 127
    assert buckets["65536"] == 7  # 65535, 65536
    assert buckets["1048576"] == 8
    assert buckets["16777216"] == 9
    assert messages(agent, port, "client", "out")["binary"] == len(sizes)
    # Tracking never lost its place on this connection (the counter is host-wide).
    assert all(e["frames_tracked"] for e in agent.connections(port))


@pytest.mark.parametrize("server", ["python", "node"])
def test_split_handshake_with_big_cookie_and_pipelined_frame(netns, agent_factory, server):
    agent = agent_factory(*FLAGS)
    port = 8775
    if server == "python":
        netns.python_peer("server", port)
    else:
        netns.node_peer("server", port)
    netns.spawn(sys.executable, PEERS / "raw_ws.py", "split-handshake", port)

    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    assert both["server"]["websocket"] and both["server"]["path"] == "/split"
    assert agent.metric("websocket_handshake_duration_seconds_count", port=port) == 2
    # The request's first byte left 300 ms before the rest.
    assert agent.metric("websocket_handshake_duration_seconds_sum", port=port) >= 0.6
    wait_for(
        "the pipelined frame counted",
        lambda: messages(agent, port, "server", "in")["text"] == 1,
        timeout=2,
    )
    assert messages(agent, port, "server", "out")["text"] == 1
    assert agent.metric("websocket_connections_total", port=port, role="server", result="accept") == 1
    text = agent.get("/metrics") + agent.get("/connections")
    assert "cccccccc" not in text and "session" not in text


def test_frames_written_one_byte_at_a_time_are_all_counted(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8776
    netns.python_peer("server", port, "sink")
    client = netns.spawn(sys.executable, PEERS / "autobahn_peer.py", f"ws://127.0.0.1:{port}/", 8)
    log = sender_log(client)
    expected = Counter(opcode for opcode, _length in log)
    assert expected == {"text": 8, "ping": 1}

    def counted():
        got = messages(agent, port, "client", "out")
        return got == expected and got

    # Autobahn paces its one-byte writes with timers: about 1200 writes to wait for.
    wait_for(f"the sender's frames {dict(expected)}", counted, timeout=20)
    assert messages(agent, port, "server", "in") == expected
    total = sum(int(length) for opcode, length in log if opcode == "text")
    assert agent.metric("websocket_message_size_bytes_sum", port=port, direction="out") == total
    assert all(e["frames_tracked"] for e in agent.connections(port))


def test_clean_close_and_abort_are_told_apart(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    clean, killed = 8777, 8778
    netns.python_peer("server", clean)
    netns.python_peer("server", killed)
    netns.python_peer("client", f"ws://127.0.0.1:{clean}/", "close", ready="done")
    victim = netns.python_peer("client", f"ws://127.0.0.1:{killed}/", "silent", ready="quiet")
    victim.kill()

    def outcome(port, role, result):
        return agent.metric("websocket_connections_total", port=port, role=role, result=result)

    wait_for("the clean close counted", lambda: outcome(clean, "server", "close") == 1, timeout=10)
    assert outcome(clean, "client", "close") == 1
    assert agent.metric("websocket_close_total", port=clean, role="client", code=1001, initiator="local") == 1
    assert agent.metric("websocket_close_total", port=clean, role="server", code=1001, initiator="peer") == 1
    wait_for("the kill counted as abort", lambda: outcome(killed, "server", "abort") == 1, timeout=10)
    assert outcome(killed, "server", "close") is None


@pytest.mark.parametrize("protocol", ["tls", "h2"])
def test_tls_and_http2_on_a_watched_port_are_named_not_parsed(netns, agent_factory, protocol):
    port = 8779
    agent = agent_factory(*FLAGS, "--port", port)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "echo-server", port)
    netns.spawn(sys.executable, PEERS / "raw_ws.py", protocol, port)
    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    wait_for(
        f"labelled {protocol}",
        lambda: {c["protocol"] for c in agent.connections(port)} == {protocol},
        timeout=2,
    )
    assert not both["server"]["websocket"]
    assert not both["server"]["frames_tracked"]
    assert agent.metric("websocket_messages_total", port=port, role="server", direction="in", opcode="text") is None


def test_unmasked_client_frame_is_a_protocol_violation(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8780
    netns.python_peer("server", port)
    netns.node_peer("client", f"ws://127.0.0.1:{port}/", "unmasked", ready="done")

    def violation():
        return agent.metric("websocket_protocol_violations_total", port=port, role="server")

    wait_for("the unmasked frame counted as a violation", lambda: (violation() or 0) >= 1, 3)
    # The server refuses it with 1002 (protocol error), and the agent says who closed.
    wait_for(
        "the server's 1002",
        lambda: agent.metric("websocket_close_total", port=port, role="server", code=1002, initiator="local") == 1,
        timeout=3,
    )


def test_fragmented_ping_is_a_violation_and_tracking_goes_on(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8783
    netns.python_peer("server", port)
    netns.spawn(sys.executable, PEERS / "raw_ws.py", "fragmented-ping", port, ready="done")

    def violations(role):
        return agent.metric("websocket_protocol_violations_total", port=port, role=role) or 0

    wait_for("the fragmented ping counted at the server", lambda: violations("server") >= 1, 3)
    # The client end wrote it: the same frame is counted where it left.
    wait_for("the fragmented ping counted at the client", lambda: violations("client") >= 1, 3)
    # Frames are still tracked after it: the server's close (1002) is read at both ends.
    for role, initiator in (("server", "local"), ("client", "peer")):
        wait_for(
            f"the 1002 at the {role} end",
            lambda: agent.metric("websocket_close_total", port=port, role=role, code=1002, initiator=initiator) == 1,
            timeout=3,
        )


def test_permessage_deflate_is_recognised_and_its_frames_decoded(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8781
    netns.python_peer("server", port)
    script = textwrap.dedent(
        f"""
        import asyncio, json, websockets
        async def main():
            async with websockets.connect("ws://127.0.0.1:{port}/", max_size=None) as ws:
                message = json.dumps([{{"key": "value", "n": 1}}] * 3000)  # about 64 KiB
                for _ in range(10):
                    await ws.send(message)
                    await ws.recv()
                await ws.ping()
                print(f"sent {{10 * len(message)}}", flush=True)
                print("done", flush=True)
                await asyncio.Future()
        asyncio.run(main())
        """
    )
    client = netns.spawn(sys.executable, "-c", script, ready="done")
    sent = int(client.seen.decode().split("sent ")[1].split()[0])

    def counted():
        got = messages(agent, port, "client", "out")
        return got["text"] == 10 and got["ping"] == 1 and got

    wait_for("ten compressed messages and a ping", counted, timeout=3)
    client_end = end(agent, port, "client")
    assert "permessage-deflate" in (client_end["extensions"] or "")
    wire = agent.metric("websocket_message_size_bytes_sum", port=port, direction="out")
    assert 0 < wire < sent / 10, (wire, sent)
    # RSV1 is expected here: not a violation.
    assert agent.metric("websocket_protocol_violations_total", port=port, role="server") is None


def test_watched_port_still_parses_the_handshake_and_heartbeats_stay_idle(netns, agent_factory):
    port = 8782
    agent = agent_factory(*FLAGS, "--port", port)
    netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/watched?k=v", "pinger")
    client = wait_for(
        "the upgrade parsed on a watched port",
        lambda: (c := end(agent, port, "client")) and c["websocket"] and c["frames_tracked"] and c,
        timeout=3,
    )
    assert client["path"] == "/watched" and client["protocol"] == "websocket"
    assert agent.metric("websocket_handshake_duration_seconds_count", port=port) == 2
    # Only pings and pongs cross: idle, like anywhere else.
    wait_for("idle on a watched port", lambda: end(agent, port, "client")["state"] == "idle", 2 + SLACK + 1)
