"""Field cases: failures seen in real WebSocket fleets, replayed against the agent.

Each test reproduces one case of the fleet catalogue (shared docs, CASES.md) with the libraries
those fleets ran, and checks that the agent reports what a correct observer must:

- C06: pings that are never answered, by a server that does not pong at all (Autobahn|Python
  with an `onPing` that does nothing), and the keepalive close that follows them when the pinging
  library gives up (Python `websockets`, code 1011), and by a tokio-tungstenite server that never
  polls its stream, whose unread pings also make it `not_reading`;
- C09: a closing handshake the peer never answers (Python `websockets` server with a 3 s close
  timeout, a raw client that reads nothing after the 101);
- C22: reads that block for seconds in 64 threads at once, each counted when it returns;
- C12: an upgrade request split across writes, with an 8 KiB cookie and the first frame in the
  same write as its last bytes, against an aiohttp server; an upgrade refused with 426, and a
  101 of over 2 KiB (Python `websockets` hooks).

Peers run in a network namespace of their own; every wait has a deadline.
"""

import signal
import sys

from conftest import PEERS, TUNGSTENITE_PEER, Netns, wait_for

FLAGS = ("--idle-after", "2s", "--stall-after", "2s", "--refresh", "250ms", "--pong-timeout", "1s")
STALL = 2.0
REFRESH = 0.25
PONG_TIMEOUT = 1.0
PING_INTERVAL = 0.5  # the Python clients' keepalive
SLACK = 1.0


def end(agent, port, role):
    return next((c for c in agent.connections(port) if c["role"] == role), None)


def ends(agent, port):
    by_role = {c["role"]: c for c in agent.connections(port)}
    return by_role if len(by_role) == 2 else None


def messages(agent, port, role, direction, opcode):
    return agent.metric("websocket_messages_total", port=port, role=role, direction=direction, opcode=opcode) or 0


def results(agent, port, role):
    """{result: count} of websocket_connections_total for one end."""
    out = {}
    for (name, labels), value in agent.metrics().items():
        labels = dict(labels)
        if name == "websocket_connections_total" and labels.get("port") == str(port) and labels.get("role") == role:
            out[labels["result"]] = int(value)
    return out


def test_c06_autobahn_server_that_never_pongs(netns, agent_factory):
    """A server whose ping handler does nothing: the client's pings are missed, TCP is fine."""
    agent = agent_factory(*FLAGS)
    port = 7601
    netns.spawn(sys.executable, PEERS / "autobahn_peer.py", "server", port, "nopong")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger")

    client = wait_for(
        "a missed pong at the client",
        lambda: (c := end(agent, port, "client")) and c["pong_missed"] >= 1 and c,
        timeout=PING_INTERVAL + PONG_TIMEOUT + REFRESH + SLACK,
    )
    assert client["pings"] >= 1 and client["pongs"] == 0
    assert client["last_pong_latency_seconds"] is None
    assert "ping unanswered" in client["detail"], client["detail"]
    # The heartbeat failed, not the transport: everything sent was acknowledged.
    assert client["tcp_state"] == "ESTABLISHED"
    assert client["send_queue_bytes"] == 0 and client["retransmits"] == 0
    assert agent.metric("websocket_pong_missed_total", port=port, role="client") >= 1
    # The server read the pings and never wrote a pong.
    server = end(agent, port, "server")
    assert server["pings"] >= 1 and server["pongs"] == 0
    assert messages(agent, port, "server", "in", "ping") >= 1
    assert messages(agent, port, "server", "out", "pong") == 0
    assert agent.metric("websocket_pong_latency_seconds_count", port=port, role="client") in (None, 0)


def test_c06_keepalive_timeout_closes_with_1011(netns, agent_factory):
    """The pinging client gives up on the missing pong and closes with 1011; the server echoes
    the close and ends TCP: a closing handshake, recorded at both ends with who started it."""
    agent = agent_factory(*FLAGS)
    port = 7602
    netns.node_peer("server", port, "nopong")
    client = netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger-strict")
    wait_for("both ends reported", lambda: ends(agent, port), timeout=2)

    # First ping after 500 ms, given 1 s for its pong, then the close.
    Netns.expect(client, "closed", timeout=PING_INTERVAL + PONG_TIMEOUT + SLACK + 2)
    assert "closed 1011" in client.seen.decode()

    def close_total(role, initiator):
        return agent.metric("websocket_close_total", port=port, role=role, code=1011, initiator=initiator)

    wait_for("the client's 1011 as its own", lambda: close_total("client", "local") == 1, REFRESH + SLACK)
    wait_for("the server's 1011 from its peer", lambda: close_total("server", "peer") == 1, REFRESH + SLACK)
    assert close_total("client", "peer") is None and close_total("server", "local") is None
    wait_for("both ends gone", lambda: agent.connections(port) == [], REFRESH + SLACK)
    # Close frames crossed both ways before TCP ended: `close`, not `abort`.
    for role in ("client", "server"):
        assert results(agent, port, role) == {"accept": 1, "close": 1}, role
    # Nothing unread and no reset at either end, whichever closed TCP first.
    for role in ("client", "server"):
        assert agent.metric("websocket_connections_closed_total", port=port, role=role, reason="clean") == 1, role
    assert agent.metric("websocket_connections_active", port=port, role="client") in (None, 0)
    # The agent's pong timeout is the client's: the ping is missed at both ends even though the
    # client closes the moment it is overdue, before a refresh can see it so.
    for role in ("client", "server"):
        assert agent.metric("websocket_pong_missed_total", port=port, role=role) == 1, role


def test_c06_tungstenite_server_that_never_polls_its_stream(netns, agent_factory):
    """A tokio-tungstenite handler that never polls its stream: tungstenite answers pings only
    while reading, so the pings are missed at the client while their bytes, acknowledged by the
    server's kernel, wait unread in its receive queue."""
    agent = agent_factory(*FLAGS)
    port = 7607
    server_proc = netns.spawn(TUNGSTENITE_PEER, port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger")
    Netns.expect(server_proc, "upgraded", timeout=5)

    client = wait_for(
        "a missed pong at the client",
        lambda: (c := end(agent, port, "client")) and c["pong_missed"] >= 1 and c,
        timeout=PING_INTERVAL + PONG_TIMEOUT + REFRESH + SLACK,
    )
    assert client["pongs"] == 0 and "ping unanswered" in client["detail"], client["detail"]
    # The transport is healthy: every ping was acknowledged.
    assert client["send_queue_bytes"] == 0 and client["retransmits"] == 0
    # The server side: the pings' bytes sit unread, and the end is named for it.
    server = wait_for(
        "the server end not reading",
        lambda: (e := end(agent, port, "server")) and e["state"] == "not_reading" and e,
        timeout=STALL + REFRESH + SLACK,
    )
    assert "unread" in server["detail"], server["detail"]
    recv_q, _ = netns.ss_queues(port)[(server["local_addr"], server["remote_addr"])]
    # A ping (10 bytes) may arrive between the agent's refresh and `ss`.
    assert 0 < server["recv_queue_bytes"] <= recv_q <= server["recv_queue_bytes"] + 64
    assert server["pings"] >= 1 and messages(agent, port, "server", "out", "pong") == 0


def test_c12_split_upgrade_with_big_cookie_and_pipelined_frame_to_aiohttp(netns, agent_factory):
    """`G`, 300 ms, the rest in three writes carrying an 8 KiB cookie, the last one also
    carrying the first frame: one handshake per end, timed from the `G`, and the frame counted."""
    agent = agent_factory(*FLAGS)
    port = 7603
    netns.spawn(sys.executable, PEERS / "aiohttp_peer.py", "server", port)
    # Prints `ready` once the echo of the pipelined frame is back.
    netns.spawn(sys.executable, PEERS / "raw_ws.py", "split-handshake", port)

    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=REFRESH + SLACK)
    for role in ("client", "server"):
        assert both[role]["websocket"] and both[role]["protocol"] == "websocket"
        assert both[role]["path"] == "/split"
        assert results(agent, port, role) == {"accept": 1}, role
    assert agent.metric("websocket_handshake_duration_seconds_count", port=port) == 2
    # Each end's handshake starts at the `G`, 300 ms before the rest of the request.
    assert agent.metric("websocket_handshake_duration_seconds_sum", port=port) >= 0.6
    below = [
        (float(dict(labels)["le"]), value)
        for (name, labels), value in agent.metrics().items()
        if name == "websocket_handshake_duration_seconds_bucket"
        and dict(labels)["port"] == str(port)
        and dict(labels)["le"] != "+Inf"
        and float(dict(labels)["le"]) < 0.3
    ]
    assert below and all(value == 0 for _, value in below), below

    def pipelined_frame_counted():
        return messages(agent, port, "server", "in", "text") == 1

    wait_for("the pipelined frame counted at the server", pipelined_frame_counted, timeout=REFRESH + SLACK)
    assert messages(agent, port, "client", "out", "text") == 1
    assert messages(agent, port, "server", "out", "text") == 1
    assert messages(agent, port, "client", "in", "text") == 1
    assert agent.metric("websocket_protocol_violations_total", port=port, role="server") is None
    assert all(c["frames_tracked"] for c in agent.connections(port))
    # No header value leaves the agent.
    text = agent.get("/metrics") + agent.get("/connections")
    assert "cccccccc" not in text and "session" not in text


def test_c09_close_frame_never_answered_until_the_close_timeout(netns, agent_factory):
    """The server starts the closing handshake; the client never answers or closes. The server
    end shows the half-done handshake and its age until the server's 3 s close timeout ends TCP,
    which counts as an abort."""
    agent = agent_factory(*FLAGS)
    port = 7604
    netns.python_peer("server", port, "close")
    netns.spawn(sys.executable, PEERS / "raw_ws.py", "deaf-client", port)

    def closing(role, words):
        e = end(agent, port, role)
        return e and words in e["detail"] and e

    server = wait_for(
        "the unanswered close at the server",
        lambda: closing("server", "closing: close frame sent"),
        timeout=1 + REFRESH + SLACK,
    )
    assert "no close reply" in server["detail"] and server["close_code"] == 1000
    assert closing("client", "closing: close frame received")
    assert agent.metric("websocket_close_total", port=port, role="server", code=1000, initiator="local") == 1

    # The close timeout (3 s after the close frame) ends the server's TCP: an abort there.
    wait_for("the server end gone", lambda: end(agent, port, "server") is None, timeout=3 + REFRESH + SLACK)
    assert results(agent, port, "server") == {"accept": 1, "abort": 1}
    assert 'closing_handshake="never answered"' in agent.read_log()
    # The client keeps its end open after the server's FIN.
    assert end(agent, port, "client")["tcp_state"] == "CLOSE_WAIT"


def test_c22_reads_that_block_long_are_all_counted(netns, agent_factory):
    """64 threads block in recv() for seconds, each on its own connection, while another
    connection carries traffic; when the bytes come, every read is counted."""
    port, busy, n = 7605, 7606, 64
    agent = agent_factory(*FLAGS, "--port", port)
    server = netns.spawn(sys.executable, PEERS / "blocked_readers.py", "server", port, n, ready=None)
    wait_for("the server listening", lambda: f":{port}" in netns.run("ss", "-tlnH"), timeout=10)
    clients = netns.spawn(sys.executable, PEERS / "blocked_readers.py", "clients", port, n)
    Netns.expect(server, "ready")
    wait_for("every end reported", lambda: len(agent.connections(port)) == 2 * n, timeout=5)

    # Other traffic while the reads block.
    netns.python_peer("server", busy)
    netns.python_peer("client", f"ws://127.0.0.1:{busy}/", "chatty")
    # Ten messages at one per 200 ms: the reads have blocked for two seconds at least.
    wait_for("ten busy messages", lambda: messages(agent, busy, "client", "out", "text") >= 10, timeout=10)
    server.send_signal(signal.SIGUSR1)
    Netns.expect(clients, "done", timeout=10)

    def all_read():
        readers = [c for c in agent.connections(port) if c["role"] == "client"]
        return len(readers) == n and all(
            c["bytes_received"] == 1000 and c["recv_queue_bytes"] == 0 for c in readers
        ) and readers

    readers = wait_for("every reader's 1000 bytes counted as read", all_read, timeout=REFRESH + SLACK)
    assert all(c["last_read_age_seconds"] is not None for c in readers)
    assert all(recv == 0 for recv, _ in netns.ss_queues(port).values())


def test_c12_refused_upgrade_is_a_reject_at_both_ends(netns, agent_factory):
    """A server that answers the upgrade with 426: a `reject` at each end, never an accept, and
    the connection never reported as a WebSocket."""
    agent = agent_factory(*FLAGS)
    port = 7604
    netns.python_peer("server", port, "reject")
    client = netns.python_peer("client", f"ws://127.0.0.1:{port}/", "once", ready="rejected")
    assert b"426" in client.seen

    def rejected():
        return results(agent, port, "server") == {"reject": 1} and results(agent, port, "client") == {"reject": 1}

    wait_for("a reject at each end", rejected, timeout=REFRESH + SLACK + 1)
    assert agent.connections(port) == []
    assert agent.metric("websocket_handshake_duration_seconds_count", port=port) is None


def test_c12_a_101_over_two_kib_is_an_accept(netns, agent_factory):
    """A 101 padded past 2 KiB, which reaches the agent in several 512-byte chunks: one accept
    per end, the frames after it tracked, and the padding never shown."""
    agent = agent_factory(*FLAGS)
    port = 7605
    netns.python_peer("server", port, "big101")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/big", "chatty")

    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=REFRESH + SLACK)
    for role in ("client", "server"):
        assert both[role]["websocket"] and both[role]["path"] == "/big"
        assert results(agent, port, role) == {"accept": 1}, role
    wait_for(
        "echoes counted after the long 101",
        lambda: messages(agent, port, "client", "in", "text") >= 2 and messages(agent, port, "server", "in", "text") >= 2,
        timeout=REFRESH + SLACK + 1,
    )
    assert all(c["frames_tracked"] for c in agent.connections(port))
    assert "ppppppppp" not in agent.get("/connections") + agent.get("/metrics")
