"""observer on real WebSocket peers: verdicts, queues, discovery and metrics.

Every test runs unmodified third-party peers (Python `websockets`, Node `ws`) in its own network
namespace, and an agent with short thresholds; it asserts on `/connections` and `/metrics`.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import OBSERVER, PEERS, wait_for

IDLE = 2.0
STALL = 2.0
REFRESH = 0.25
FLAGS = ("--idle-after", "2s", "--stall-after", "2s", "--refresh", "250ms")
# Scheduling slack on a loaded 2-core CI machine, on top of what the rules allow.
SLACK = 1.0


def peer(ns, impl, *args, **kw):
    return ns.python_peer(*args, **kw) if impl == "python" else ns.node_peer(*args, **kw)


def ends(agent, port):
    """The reported ends of the connections on `port`, by role, once both are there."""
    by_role = {c["role"]: c for c in agent.connections(port)}
    return by_role if len(by_role) == 2 else None


@pytest.mark.parametrize("server,client", [("python", "node"), ("node", "python")])
def test_chatty_connection_is_active_on_both_ends(netns, agent_factory, server, client):
    agent = agent_factory(*FLAGS)
    port = 8765
    srv = peer(netns, server, "server", port)
    cli = peer(netns, client, "client", f"ws://127.0.0.1:{port}/chat", "chatty")

    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    s, c = both["server"], both["client"]
    assert s["websocket"] and c["websocket"]
    assert (s["pid"], c["pid"]) == (srv.pid, cli.pid)
    assert s["local_addr"] == c["remote_addr"] == f"127.0.0.1:{port}"
    assert s["remote_addr"] == c["local_addr"]
    assert s["tcp_state"] == c["tcp_state"] == "ESTABLISHED"

    # Watch it for longer than the idle threshold: it must stay active all along.
    deadline = time.monotonic() + IDLE + 4 * REFRESH
    while time.monotonic() < deadline:
        states = {e["role"]: e["state"] for e in agent.connections(port)}
        assert states == {"server": "active", "client": "active"}
        time.sleep(REFRESH)
    final = ends(agent, port)
    assert final["server"]["bytes_received"] > s["bytes_received"]
    assert final["client"]["bytes_sent"] > c["bytes_sent"]
    assert agent.metric("websocket_connections_active", port=port, role="server") == 1
    assert agent.metric("websocket_connections_by_state", port=port, role="client", state="active") == 1


@pytest.mark.parametrize("server,client", [("node", "python"), ("python", "node")])
def test_silent_connection_becomes_idle_within_threshold(netns, agent_factory, server, client):
    agent = agent_factory(*FLAGS)
    port = 8766
    peer(netns, server, "server", port)
    cli = peer(netns, client, "client", f"ws://127.0.0.1:{port}/", "silent", ready="quiet")
    quiet_at = time.monotonic()

    first_idle = {}

    def both_idle():
        now = time.monotonic()
        for e in agent.connections(port):
            if e["state"] == "idle":
                first_idle.setdefault(e["role"], now)
        return len(first_idle) == 2

    wait_for("both ends idle", both_idle, timeout=IDLE + REFRESH + SLACK + 1, interval=0.05)
    for role, at in first_idle.items():
        waited = at - quiet_at
        assert IDLE - REFRESH - 0.2 <= waited <= IDLE + REFRESH + SLACK, (role, waited)
    assert cli.poll() is None, "the client is still connected"
    assert agent.metric("websocket_connections_by_state", port=port, role="server", state="idle") == 1


@pytest.mark.parametrize("server", ["python", "node"])
def test_stopped_server_is_not_reading_and_its_queue_matches_ss(netns, agent_factory, server):
    agent = agent_factory(*FLAGS)
    port = 8767
    srv = peer(netns, server, "server", port, "sink")
    peer(netns, "python", "client", f"ws://127.0.0.1:{port}/", "stream")
    wait_for("both ends reported", lambda: ends(agent, port), timeout=5)

    os.kill(srv.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()

    def server_end():
        return ends(agent, port)["server"]

    wait_for(
        "server end not_reading",
        lambda: server_end()["state"] == "not_reading",
        timeout=STALL + REFRESH + SLACK + 1,
    )
    assert time.monotonic() - stopped_at <= STALL + REFRESH + SLACK + 1

    def queue_matches_ss():
        s = server_end()
        ss = netns.ss_queues(port)[(s["local_addr"], s["remote_addr"])]
        return s["recv_queue_bytes"] > 0 and s["recv_queue_bytes"] == ss[0] and (s, ss)

    s, ss = wait_for("recv_queue_bytes equal to ss Recv-Q", queue_matches_ss, timeout=5)
    assert ends(agent, port)["client"]["state"] != "not_reading", "the writer is not to blame"
    assert agent.metric("websocket_receive_queue_bytes", port=port, role="server") >= s["recv_queue_bytes"]
    assert agent.metric("websocket_connections_by_state", port=port, role="server", state="not_reading") == 1

    os.kill(srv.pid, signal.SIGCONT)
    wait_for(
        "server end reading again",
        lambda: server_end()["state"] == "active",
        timeout=REFRESH + SLACK + 1,
    )


def test_websocket_on_an_unlisted_port_is_found_by_its_handshake(netns, agent_factory):
    agent = agent_factory(*FLAGS, "--port", "7001")
    port = 8768
    peer(netns, "python", "server", port)
    peer(netns, "node", "client", f"ws://127.0.0.1:{port}/found", "chatty")
    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    assert both["server"]["websocket"] and both["client"]["websocket"]
    assert agent.metric("websocket_connections_active", port=port, role="client") == 1
    assert agent.metric("websocket_connections_total", port=port, role="server", result="accept") == 1


def test_ports_past_the_label_limit_are_counted_as_other(netns, agent_factory):
    agent = agent_factory(*FLAGS, "--port", "7003", "--max-port-labels", "0")
    port = 8769
    peer(netns, "python", "server", port)
    peer(netns, "node", "client", f"ws://127.0.0.1:{port}/", "chatty")
    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    # /connections names the port; the metrics count it under `other`, never under its number.
    assert both["server"]["port"] == port
    wait_for(
        "both ends counted under port=other",
        lambda: (agent.metric("websocket_connections_active", port="other", role="server") or 0) >= 1
        and (agent.metric("websocket_connections_active", port="other", role="client") or 0) >= 1,
        timeout=2,
    )
    assert f'port="{port}"' not in agent.get("/metrics")


def test_watched_port_is_reported_without_a_handshake(netns, agent_factory):
    port = 7002
    agent = agent_factory(*FLAGS, "--port", port)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "echo-server", port)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "chat-client", port)
    both = wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    assert not both["server"]["websocket"] and not both["client"]["websocket"]
    assert both["server"]["state"] == "active"


def test_plain_http_and_tcp_connections_are_not_reported(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    http_port, tcp_port, ws_port = 8080, 7003, 8769
    netns.spawn(
        sys.executable, "-m", "http.server", "--bind", "127.0.0.1", http_port,
        ready=None,
    )
    wait_for("http server", lambda: "LISTEN" in netns.run("ss", "-tlnH", f"( sport = :{http_port} )") or None, 10)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "http-client", http_port)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "echo-server", tcp_port)
    netns.spawn(sys.executable, PEERS / "tcp_peer.py", "chat-client", tcp_port)
    # A WebSocket beside them proves the agent sees this namespace.
    peer(netns, "python", "server", ws_port)
    peer(netns, "python", "client", f"ws://127.0.0.1:{ws_port}/", "chatty")
    wait_for("the WebSocket reported", lambda: ends(agent, ws_port), timeout=5)

    deadline = time.monotonic() + 4 * REFRESH
    while time.monotonic() < deadline:
        ports = {c["port"] for c in agent.connections()}
        assert http_port not in ports and tcp_port not in ports, ports
        time.sleep(REFRESH / 2)
    text = agent.get("/metrics")
    assert f'port="{http_port}"' not in text and f'port="{tcp_port}"' not in text


def test_closed_connection_leaves_and_is_counted(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    port = 8770
    peer(netns, "node", "server", port)
    cli = peer(netns, "python", "client", f"ws://127.0.0.1:{port}/", "silent", ready="quiet")
    wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    cli.kill()
    wait_for("both ends gone", lambda: agent.connections(port) == [], timeout=REFRESH + SLACK + 1)
    for role in ("server", "client"):
        assert agent.metric("websocket_connections_total", port=port, role=role, result="accept") == 1
        # Killed without a closing handshake.
        assert agent.metric("websocket_connections_total", port=port, role=role, result="abort") == 1
        assert agent.metric("websocket_connections_active", port=port, role=role) == 0


def test_observer_list_shows_the_worst_first_as_a_table_and_as_json(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    chatty, frozen = 8771, 8772
    peer(netns, "python", "server", chatty)
    peer(netns, "node", "client", f"ws://127.0.0.1:{chatty}/", "chatty")
    srv = peer(netns, "python", "server", frozen, "sink")
    peer(netns, "python", "client", f"ws://127.0.0.1:{frozen}/", "stream")
    wait_for("both connections reported", lambda: ends(agent, chatty) and ends(agent, frozen), timeout=5)
    os.kill(srv.pid, signal.SIGSTOP)
    try:
        wait_for(
            "the frozen server not_reading",
            lambda: ends(agent, frozen)["server"]["state"] == "not_reading",
            timeout=STALL + REFRESH + SLACK + 1,
        )

        def listed(*flags):
            result = subprocess.run(
                [OBSERVER, "list", "--addr", agent.base, *flags],
                capture_output=True, text=True, timeout=10,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        rows = [line.split() for line in listed().splitlines()]
        assert rows[0][:3] == ["STATE", "ROLE", "LOCAL"], rows[0]
        mine = [r for r in rows[1:] if any(a.endswith((f":{chatty}", f":{frozen}")) for a in r[2:4])]
        assert len(mine) == 4, rows
        # The frozen server's end comes before every healthy one.
        assert mine[0][:3] == ["not_reading", "server", f"127.0.0.1:{frozen}"], mine
        assert {r[0] for r in mine[1:]} <= {"backpressured", "active", "idle"}, mine

        as_json = [c for c in json.loads(listed("--json")) if c["port"] in (chatty, frozen)]
        assert len(as_json) == 4 and as_json[0]["state"] == "not_reading", as_json
        assert [c["state"] for c in as_json if c["port"] == chatty] == ["active", "active"], as_json
    finally:
        os.kill(srv.pid, signal.SIGCONT)
