"""Connection churn against bounded maps: whatever is lost is counted, and afterwards the agent's
live set is the kernel's, with no phantom or stuck connection.

Each run holds watched connections open (the ones that must stay reported), holds many silent
plain TCP connections (the ones worth evicting), and opens and resets a few thousand connections
a second on a watched port for 30 s."""

import re
import signal
import sys
import time

from conftest import PEERS, wait_for

CHURN_SECONDS = 30
CHURN_RATE = 2000
WATCHED, PLAIN, CHURNED = 8961, 8962, 8963
HELD_WATCHED, HELD_PLAIN = 20, 150
REFRESH = 0.25


def churn_peer(netns, *args, **kw):
    return netns.spawn(sys.executable, PEERS / "churn.py", *args, **kw)


def established(netns, port):
    """`(local, remote)` of the established sockets on `port`, both ends, per `ss`."""
    return set(netns.ss_queues(port))


def reported(agent, port):
    return {(c["local_addr"], c["remote_addr"]) for c in agent.connections(port)}


def run_churn(netns, agent, stall_agent):
    """Holds connections, churns, and returns how many connections the churn made."""
    for port, mode in ((WATCHED, "hold-server"), (PLAIN, "hold-server"), (CHURNED, "server")):
        churn_peer(netns, mode, port)
    churn_peer(netns, "hold", WATCHED, HELD_WATCHED)
    wait_for("the held watched connections", lambda: len(reported(agent, WATCHED)) == 2 * HELD_WATCHED, 5)
    churn_peer(netns, "hold", PLAIN, HELD_PLAIN)
    churner = churn_peer(netns, "churn", CHURNED, CHURN_RATE, CHURN_SECONDS)
    if stall_agent:
        time.sleep(CHURN_SECONDS / 3)  # The fault, mid-churn: the agent stops draining its ring.
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(2)
        finally:
            agent.proc.send_signal(signal.SIGCONT)
    netns.expect(churner, "done", timeout=CHURN_SECONDS + 30)
    # Printed on a line before `done`, so it is whole by now.
    made = int(re.search(rb"made=(\d+)", churner.seen).group(1))
    print(f"churn made {made} connections in {CHURN_SECONDS} s")
    return made


def assert_live_set_is_the_kernels(netns, agent):
    """Within a few refreshes, the agent reports exactly the established sockets `ss` lists."""
    for port in (WATCHED, CHURNED):
        wait_for(
            f"the live set on port {port} equal to ss",
            lambda: reported(agent, port) == established(netns, port),
            timeout=10,
        )
    assert len(reported(agent, WATCHED)) == 2 * HELD_WATCHED
    assert reported(agent, CHURNED) == set()
    # The maps were read in batches, not key by key.
    assert "batch map reads refused" not in agent.read_log()


def test_churn_with_tiny_maps_counts_its_losses_and_resyncs(netns, agent_factory):
    agent = agent_factory(
        "--refresh", f"{REFRESH}s", "--port", WATCHED, "--port", CHURNED,
        "--max-connections", 256, "--max-websockets", 256, "--event-buffer", "16KiB",
    )
    made = run_churn(netns, agent, stall_agent=True)
    assert made > 0
    assert_live_set_is_the_kernels(netns, agent)

    # 40 watched and 300 plain held ends do not fit 256 entries: plain ones were evicted, and
    # the watched ones, reported as WebSocket, never were.
    assert agent.metric("observer_map_evictions_total", map="conns") > 0
    assert agent.metric("observer_events_lost_total") > 0
    assert agent.metric("observer_map_capacity", map="conns") == 256
    assert "events lost; adopting from the socket table" in agent.read_log()


def test_churn_with_normal_maps_loses_nothing(netns, agent_factory):
    agent = agent_factory("--refresh", f"{REFRESH}s", "--port", WATCHED, "--port", CHURNED)
    made = run_churn(netns, agent, stall_agent=False)
    assert made > 0
    assert_live_set_is_the_kernels(netns, agent)
    for name in ("observer_map_evictions_total", "observer_map_insert_failures_total"):
        for map_name in ("conns", "frames"):
            assert agent.metric(name, map=map_name) == 0, (name, map_name)
    assert agent.metric("observer_events_lost_total") == 0
