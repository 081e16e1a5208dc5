"""The agent never becomes the problem: it detaches when it stops however it stops, survives
being frozen, and says clearly what it lacks when it lacks privileges."""

import json
import signal
import subprocess
import time

from conftest import OBSERVER, Agent, free_port, wait_for, watches_a_websocket

FLAGS = ("--refresh", "250ms")


def observer_programs():
    """IDs of the observer programs loaded in the kernel, by any agent.

    IDs, not a count: the kernel frees a program some time after its last reference goes, so a
    previous test's agent may still show up here while this test runs."""
    out = subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True, check=True)
    return {p["id"] for p in json.loads(out.stdout) if p.get("name", "").startswith("observer_")}


def wait_until_unloaded(programs):
    wait_for("programs gone", lambda: not programs & observer_programs(), timeout=10)


def test_sigterm_detaches_and_logs_a_last_line(tmp_path):
    before = observer_programs()
    agent = Agent(FLAGS, tmp_path / "agent.log")
    ours = observer_programs() - before
    assert ours
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=10) == 0
    agent.stop()
    assert "stopping; kernel programs detach" in agent.read_log()
    wait_until_unloaded(ours)


def test_sigkill_leaves_no_program_attached(tmp_path):
    before = observer_programs()
    agent = Agent(FLAGS, tmp_path / "agent.log")
    ours = observer_programs() - before
    assert ours
    agent.proc.kill()
    agent.proc.wait(timeout=10)
    agent.stop()
    # Links belong to the process: the kernel detaches them when it dies.
    wait_until_unloaded(ours)


def test_a_frozen_agent_loses_no_connection(netns, agent_factory):
    agent = agent_factory(*FLAGS)
    kept, closed, opened, brief = 8995, 8996, 8997, 8998
    for port in (kept, closed, opened, brief):
        netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{kept}/", "chatty")
    leaving = netns.python_peer("client", f"ws://127.0.0.1:{closed}/", "chatty")
    wait_for("both connections", lambda: len(agent.connections(kept)) == len(agent.connections(closed)) == 2, 5)
    cookies = {c["cookie"] for c in agent.connections(kept)}

    agent.proc.send_signal(signal.SIGSTOP)
    try:
        leaving.kill()
        netns.python_peer("client", f"ws://127.0.0.1:{opened}/", "chatty")
        # Whole connections that open, talk and close while the agent is stopped.
        for _ in range(3):
            netns.python_peer("client", f"ws://127.0.0.1:{brief}/", "close", ready="done")
        time.sleep(3)  # The fault itself: seconds more without the agent running.
    finally:
        agent.proc.send_signal(signal.SIGCONT)

    wait_for("the closed one gone", lambda: agent.connections(closed) == [], timeout=3)
    wait_for("the new one found", lambda: len(agent.connections(opened)) == 2, timeout=3)
    assert {c["cookie"] for c in agent.connections(kept)} == cookies
    assert all(c["state"] == "active" for c in agent.connections(kept))

    def brief_ones_counted():
        return all(
            agent.metric("websocket_connections_total", port=brief, role=role, result=result) == 3
            for role in ("server", "client") for result in ("accept", "close")
        )

    wait_for("the three brief connections counted at both ends", brief_ones_counted, timeout=3)
    assert agent.metric("websocket_handshake_duration_seconds_count", port=brief) == 6
    assert agent.metric("observer_events_unmatched_total") == 0


def test_only_the_documented_capabilities_are_needed(netns, tmp_path):
    # Root, but with every capability gone but the four the README names.
    only = ["setpriv", "--bounding-set", "-all,+bpf,+perfmon,+net_admin,+sys_admin",
            "--inh-caps", "-all", "--"]
    agent = Agent(FLAGS, tmp_path / "agent.log", prefix=only)
    try:
        watches_a_websocket(agent, netns, 8998)
    finally:
        agent.stop()


def test_without_privileges_the_error_names_what_is_missing():
    port = free_port()
    argv = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
            "--inh-caps", "-all", "--bounding-set", "-all", "--", OBSERVER,
            "--metrics-addr", f"127.0.0.1:{port}"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result
    message = result.stderr.strip().splitlines()[-1]
    assert "CAP_BPF" in message and "run as root" in message, message


def test_a_restarted_agent_finds_the_same_connections_and_verdicts(netns, agent_factory, tmp_path):
    # Off the watched ports: the frozen pair moves no frame, so only the state file can tell
    # the second agent that it is a WebSocket.
    chatty, frozen = 8993, 8994
    state = tmp_path / "state.json"
    flags = ("--idle-after", "3s", "--stall-after", "2s", "--state-file", state, *FLAGS)

    def verdicts(agent):
        ends = agent.connections(chatty) + agent.connections(frozen)
        return {(c["local_addr"], c["remote_addr"]): c["state"] for c in ends}

    def settled(agent):
        v = verdicts(agent)
        states = sorted(v.values())
        return len(v) == 4 and states == ["active", "active", "backpressured", "not_reading"] and v

    first = agent_factory(*flags)
    netns.python_peer("server", chatty)
    netns.python_peer("client", f"ws://127.0.0.1:{chatty}/", "chatty")
    stuck = netns.python_peer("server", frozen, "sink")
    netns.python_peer("client", f"ws://127.0.0.1:{frozen}/", "stream")
    stuck.send_signal(signal.SIGSTOP)
    before = wait_for("the first agent's verdicts", lambda: settled(first), timeout=10)
    saved = lambda: state.exists() and len(json.loads(state.read_text())["websockets"]) == 4
    wait_for("the four ends in the state file", saved, timeout=5)
    first.stop()

    # The second agent finds them in the kernel's socket table, frozen ones included.
    second = agent_factory(*flags)
    after = wait_for("the same verdicts after the restart", lambda: settled(second), timeout=10)
    assert after == before
    assert all(c["websocket"] and c["path"] == "/" for c in second.connections(frozen))
