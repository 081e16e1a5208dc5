"""Connections older than the agent: found in the kernel's socket table at start and adopted
with their current queues, owners and verdicts; WebSocket ones off the watched ports are
recognised by their frames."""

import os
import signal
import sys
import time

from conftest import PEERS, wait_for

FLAGS = ("--idle-after", "3s", "--stall-after", "2s", "--refresh", "250ms")
STALL, REFRESH, SLACK = 2.0, 0.25, 1.0


def end(agent, port, role):
    return next((c for c in agent.connections(port) if c["role"] == role), None)


def test_connections_open_before_the_agent_are_adopted(netns, agent_factory):
    ws_port, watched, frozen = 8950, 8951, 8952
    server = netns.python_peer("server", ws_port)
    client = netns.node_peer("client", f"ws://127.0.0.1:{ws_port}/", "chatty")
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "echo-server", watched)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "chat-client", watched)
    stuck = netns.python_peer("server", frozen, "sink")
    netns.python_peer("client", f"ws://127.0.0.1:{frozen}/", "stream")
    os.kill(stuck.pid, signal.SIGSTOP)

    def queue_full():
        q = netns.ss_queues(frozen)
        return any(recv > 0 for recv, _ in q.values()) and q

    wait_for("the frozen server's queue filling", queue_full, timeout=5)

    # A connection that moves no frame cannot be recognised by them: its port is watched.
    agent = agent_factory(*FLAGS, "--port", watched, "--port", frozen)

    # A watched port is WebSocket from the start.
    both = wait_for(
        "watched ends adopted",
        lambda: (s := end(agent, watched, "server")) and end(agent, watched, "client") and s,
        timeout=REFRESH + SLACK + 2,
    )
    # Reported at once; `websocket` waits for frames (this one carries lines, not frames).
    assert both["adopted"] and not both["websocket"] and both["state"] == "active"

    # Elsewhere, frames make it WebSocket: the chatty pair is recognised mid-stream.
    def recognised():
        s, c = end(agent, ws_port, "server"), end(agent, ws_port, "client")
        return s and c and s["websocket"] and c["websocket"] and (s, c)

    s, c = wait_for("the chatty pair recognised by its frames", recognised, timeout=3)
    assert s["adopted"] and s["protocol"] == "websocket" and s["state"] == "active"
    assert (s["pid"], c["pid"]) == (server.pid, client.pid)
    assert s["remote_addr"] == c["local_addr"]
    assert s["frames_tracked"] or c["frames_tracked"], "tracking found a frame boundary"

    # The frozen server keeps its verdict, with the queue ss shows.
    stalled = wait_for(
        "the frozen server not_reading",
        lambda: (e := end(agent, frozen, "server")) and e["state"] == "not_reading" and e,
        timeout=STALL + REFRESH + SLACK + 3,
    )
    ss = netns.ss_queues(frozen)[(stalled["local_addr"], stalled["remote_addr"])]
    assert stalled["recv_queue_bytes"] == ss[0]
    assert stalled["pid"] == stuck.pid

    # Closing an adopted connection is seen too.
    client.kill()
    wait_for("the adopted pair gone", lambda: agent.connections(ws_port) == [], REFRESH + SLACK + 1)
    os.kill(stuck.pid, signal.SIGCONT)


def test_a_connection_adopted_mid_stream_keeps_no_phantom_bytes(netns, agent_factory):
    # The server reads as fast as the client streams, so it reads while its entry is being
    # made; those reads are never counted, and would stay as unread bytes for good.
    port = 8953
    netns.python_peer("server", port, "sink")
    streamer = netns.python_peer("client", f"ws://127.0.0.1:{port}/", "stream")
    agent = agent_factory(*FLAGS)
    wait_for("the streaming pair adopted", lambda: end(agent, port, "server"), timeout=REFRESH + SLACK + 2)

    # The stream stops; the server drains what is left and has nothing more to read.
    os.kill(streamer.pid, signal.SIGSTOP)
    try:
        def drained():
            e = end(agent, port, "server")
            ss = netns.ss_queues(port)[(e["local_addr"], e["remote_addr"])]
            return e["recv_queue_bytes"] == ss[0] == 0 and e

        wait_for("the server's receive queue as ss has it: empty", drained, timeout=STALL + SLACK + 2)
        # Nothing unread, so no verdict of a reader that stopped, however long it stays quiet.
        time.sleep(STALL + REFRESH)  # the fault itself: a quiet server past the stall threshold
        server = end(agent, port, "server")
        assert server["recv_queue_bytes"] == 0 and server["state"] != "not_reading", server
    finally:
        os.kill(streamer.pid, signal.SIGCONT)
