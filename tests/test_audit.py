"""`observer audit` against real peers: short audits with thresholds scaled down by flags.

Each test starts an audit, waits until its kernel programs are attached, drives real peers
(Python `websockets`, Node `ws`) in its own network namespace, and reads the findings and their
figures from the JSON report. Every agent on the host sees every namespace, so each test looks
only at its own port.
"""

import json
import signal
import subprocess
import sys

import pytest

from conftest import OBSERVER, wait_for

# Time scaled down: 2 s proxy timeout, 3 s NAT timeout, dead after 1 s.
FLAGS = {
    "--refresh": "250ms", "--stall-after": "1s", "--idle-after": "2s", "--pong-timeout": "1s",
    "--proxy-timeout": "2s", "--nat-timeout": "3s", "--dead-after": "1s",
}


class Audit:
    """A running `observer audit`, its log, and its report once it ended."""

    def __init__(self, tmp_path, *args, duration="6s", fmt="json", flags=None):
        self.output = tmp_path / f"report.{fmt}"
        self.log_path = tmp_path / "audit.log"
        self.log = open(self.log_path, "w")
        thresholds = {**FLAGS, **(flags or {})}
        argv = [OBSERVER, "audit", "--duration", duration, "--format", fmt,
                "--output", self.output, *[x for kv in thresholds.items() for x in kv], *args]
        self.proc = subprocess.Popen(list(map(str, argv)), stdout=subprocess.DEVNULL, stderr=self.log)
        wait_for("the audit to attach its programs", lambda: self.logged("auditing WebSocket"), timeout=30)

    def logged(self, text):
        if self.proc.poll() is not None and self.proc.returncode != 0:
            raise AssertionError(f"audit exited with {self.proc.returncode}:\n{self.read_log()}")
        return text in self.read_log()

    def read_log(self):
        self.log.flush()
        return self.log_path.read_text()

    def wait(self, timeout=30):
        """Waits for the report and returns its text."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"audit did not end:\n{self.read_log()}")
        assert code == 0, f"audit exited with {code}:\n{self.read_log()}"
        return self.output.read_text()

    def report(self, timeout=30):
        return json.loads(self.wait(timeout))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def audit(tmp_path, request):
    audits = []

    def start(*args, **kw):
        a = Audit(tmp_path, *args, **kw)
        audits.append(a)
        return a

    yield start
    for a in audits:
        a.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(f"--- audit log ---\n{a.read_log()}\n")


def service(report, port, role):
    found = [s for s in report["services"] if s["port"] == port and s["role"] == role]
    assert len(found) == 1, f"one {role} service on :{port} expected: {report['services']}"
    return found[0]


def findings(report, port, role):
    return {f["kind"]: f for f in report["findings"]
            if f["service"]["port"] == port and f["service"]["role"] == role}


@pytest.mark.parametrize(
    "timeouts, slow",
    [({}, False), ({"--proxy-timeout": "600ms", "--nat-timeout": "800ms"}, True)],
    ids=["timeouts-above-the-interval", "timeouts-below-the-interval"],
)
def test_server_pinging_every_second(netns, audit, timeouts, slow):
    port = 7401 if slow else 7402
    run = audit("--port", port, flags=timeouts)
    netns.python_peer("server", port, "ping")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "silent")
    report = run.report()

    server = service(report, port, "server")
    beat = server["heartbeat"]
    assert beat["who_pings"] == "server"
    assert beat["from_client"]["pings"] == 0
    assert beat["from_server"]["pings"] >= 3
    assert 0.8 <= beat["from_server"]["interval_median_seconds"] <= 1.3
    assert server["pongs"]["answered"] >= 3 and server["pongs"]["missed"] == 0
    assert 0 < server["pongs"]["latency_p99_seconds"] < 0.5
    assert server["handshakes"]["count"] == 1 and server["handshakes"]["rejects"] == 0
    assert 0 < server["handshakes"]["p50_seconds"] < 1
    # Pings every second keep every silence under about a second.
    assert server["longest_silence_seconds"] < 1.6
    assert server["dead"] == []
    # The client end names the same pings from its side.
    assert service(report, port, "client")["heartbeat"]["who_pings"] == "server"

    found = findings(report, port, "server")
    assert "no_heartbeat" not in found and "pongs_missing" not in found
    if slow:
        assert "slow_heartbeat" in found, report["findings"]
        assert found["slow_heartbeat"]["summary"].startswith("pings every 1 s: longer than")
    else:
        assert found == {}


def test_no_heartbeat_in_either_direction(netns, audit):
    port = 7403
    run = audit("--port", port, duration="7s")
    netns.python_peer("server", port)
    client = netns.node_peer("client", f"ws://127.0.0.1:{port}/chat?token=hunter2", "silent")
    netns.expect(client, "quiet")
    raw = run.wait()
    report = json.loads(raw)

    for role in ("server", "client"):
        s = service(report, port, role)
        assert s["heartbeat"]["who_pings"] == "nobody"
        assert s["connections"] == 1 and s["open_at_end"] == 1
        # Quiet from a moment after the start to the end: well past both scaled timeouts.
        assert 3.0 <= s["longest_silence_seconds"] <= 7.5
        assert {p["timeout_seconds"]: p["connections"] for p in s["idle_past"]} == {2.0: 1, 3.0: 1}
        assert s["dead"] == []
        finding = findings(report, port, role)["no_heartbeat"]
        assert finding["severity"] == "critical"
        assert "add a ping every 1 s" in finding["recommendation"]
    assert service(report, port, "client")["process"] == "node"
    # Neither the path nor its query string without --show-paths.
    assert "/chat" not in raw and "hunter2" not in raw and "paths" not in service(report, port, "server")


def test_pongs_never_answered(netns, audit):
    port = 7404
    run = audit("--port", port)
    netns.node_peer("server", port, "nopong")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "pinger")
    report = run.report()

    client = service(report, port, "client")
    beat = client["heartbeat"]
    assert beat["who_pings"] == "client"
    pings = beat["from_client"]["pings"]
    assert pings >= 6
    assert 0.4 <= beat["from_client"]["interval_median_seconds"] <= 0.7
    pongs = client["pongs"]
    assert pongs["answered"] == 0
    # Every ping older than the 1 s pong timeout is missed.
    assert pings - 3 <= pongs["missed"] <= pings
    assert pongs["miss_ratio"] == pytest.approx(pongs["missed"] / pings, abs=1e-3)
    finding = findings(report, port, "client")["pongs_missing"]
    assert f"{pongs['missed']} of {pings} pings" in finding["evidence"]


def test_frozen_server_is_found_dead_with_its_process(netns, audit):
    port = 7405
    run = audit("--port", port, duration="8s")
    server = netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "stream")
    wait_for("the stream to start", lambda: any(q[0] > 0 or q[1] > 0 for q in netns.ss_queues(port).values()), timeout=5)
    server.send_signal(signal.SIGSTOP)
    report = run.report()
    server.send_signal(signal.SIGCONT)

    dead = service(report, port, "server")["dead"]
    assert [d["verdict"] for d in dead] == ["not_reading"], dead
    assert dead[0]["pid"] == server.pid and dead[0]["comm"].startswith("python")
    assert dead[0]["for_seconds"] >= 1.0
    assert "frozen" in dead[0]["detail"]
    finding = findings(report, port, "server")["dead_connections"]
    assert finding["severity"] == "critical"
    assert f"pid {server.pid}" in finding["summary"]
    # The streaming client sees its peer stop reading: backpressured, not dead by silence.
    client_dead = service(report, port, "client")["dead"]
    assert [d["verdict"] for d in client_dead] == ["backpressured"], client_dead


def test_sigterm_ends_early_and_still_writes_the_text_report(netns, audit):
    port = 7406
    run = audit("--port", port, "--show-paths", duration="5m", fmt="text")
    netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/feed?token=hunter2", "silent")
    wait_for("the audit to see the connection", lambda: run.logged(f"local=127.0.0.1:{port}"), timeout=5)
    run.proc.send_signal(signal.SIGTERM)
    text = run.wait(timeout=10)
    assert "(ended early)" in text
    assert f"PORT {port} SERVER PYTHON" in text.upper()
    assert "/feed" in text and "hunter2" not in text
    assert "THRESHOLDS" in text and "--proxy-timeout" in text
