"""observer as a fleet runs it: scraped by a real Prometheus that evaluates deploy/'s rules, its
connections attributed to pods, and every metric that deploy/ relies on exported by the agent.

Each test runs real peers in its own network namespace and a real agent; Prometheus listens on
loopback with a temporary data directory and scrapes every second.
"""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import PEERS, ROOT, wait_for

FLAGS = ("--idle-after", "2s", "--stall-after", "2s", "--refresh", "250ms")
RULES = ROOT / "deploy" / "prometheus" / "observer-rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "observer.json"


def free_port_in(first, last):
    for port in range(first, last + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free port in {first}-{last}")


class Prometheus:
    """A Prometheus server scraping one agent as job="observer", with deploy/'s rules loaded."""

    def __init__(self, agent, workdir):
        self.port = free_port_in(8850, 8899)
        self.base = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {"job_name": "observer", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        wait_for("Prometheus ready", self._ready, timeout=30)

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n{self.read_log()}")
        with urllib.request.urlopen(self.base + "/-/ready", timeout=5) as response:
            return response.status == 200

    def api(self, path, **params):
        url = f"{self.base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path} {params}: {error.read().decode()}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr):
        """The instant vector of `expr`, as {frozenset(labels): value}."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return {frozenset(): float(data["result"][1])}
        return {frozenset(s["metric"].items()): float(s["value"][1]) for s in data["result"]}

    def alerts(self):
        return self.api("alerts")["alerts"]

    def read_log(self):
        self.log.flush()
        return self.log_path.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def prometheus_factory(tmp_path, request):
    servers = []

    def start(agent):
        workdir = tmp_path / f"prometheus{len(servers)}"
        workdir.mkdir()
        server = Prometheus(agent, workdir)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(f"--- prometheus log ---\n{server.read_log()[-4000:]}\n")


def ends(agent, port):
    by_role = {c["role"]: c for c in agent.connections(port)}
    return by_role if len(by_role) == 2 else None


def dashboard_exprs(port):
    """Every query of the dashboard, with its variables set as Grafana would for `port`."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    return [e.replace("$port", str(port)).replace("$__rate_interval", "1m") for e in exprs]


def health_expr(port):
    dashboard = json.loads(DASHBOARD.read_text())
    (panel,) = [p for p in dashboard["panels"] if p["title"] == "Service health"]
    return panel["targets"][0]["expr"].replace("$port", str(port))


def test_prometheus_scrapes_live_agent_and_evaluates_rules(netns, agent_factory, prometheus_factory):
    agent = agent_factory(*FLAGS)
    prom = prometheus_factory(agent)
    port = 8801
    netns.python_peer("server", port)
    netns.node_peer("client", f"ws://127.0.0.1:{port}/fleet", "chatty")
    wait_for("both ends reported by the agent", lambda: ends(agent, port), timeout=5)

    def active_in_prometheus():
        series = prom.query(f'websocket_connections_active{{job="observer",port="{port}"}}')
        return {dict(k)["role"]: v for k, v in series.items()} == {"server": 1.0, "client": 1.0}

    wait_for("websocket_connections_active in Prometheus", active_in_prometheus, timeout=20)
    assert list(prom.query('up{job="observer"}').values()) == [1.0]
    (age,) = prom.query("time() - observer_last_refresh_timestamp_seconds").values()
    assert age < 5

    # The rules run against the live agent: the watchdog fires, the dead-man alerts do not.
    def firing():
        return {a["labels"]["alertname"] for a in prom.alerts() if a["state"] == "firing"}

    wait_for("the Watchdog firing", lambda: "Watchdog" in firing(), timeout=20)
    # ObserverAbsent may be pending from the evaluations before the first scrape; it must clear.
    dead_man = {"ObserverAbsent", "ObserverRefreshStale", "WebSocketNotReading"}
    wait_for(
        "no dead-man alert pending or firing",
        lambda: not {a["labels"]["alertname"] for a in prom.alerts()} & dead_man,
        timeout=10,
    )
    rules = prom.api("rules")["groups"]
    assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules

    # Every dashboard query is valid PromQL that Prometheus runs; a healthy port is healthy.
    for expr in dashboard_exprs(port):
        prom.query(expr)
    assert list(prom.query(health_expr(port)).values()) == [0.0]


def test_not_reading_server_raises_the_alert_and_the_health_stat(netns, agent_factory, prometheus_factory):
    agent = agent_factory(*FLAGS)
    prom = prometheus_factory(agent)
    port = 8802
    server = netns.python_peer("server", port, "sink")
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "stream")
    wait_for("both ends reported", lambda: ends(agent, port), timeout=5)
    wait_for("agent scraped", lambda: prom.query(f'websocket_connections_active{{port="{port}"}}'), timeout=20)

    os.kill(server.pid, signal.SIGSTOP)

    def alert():
        for a in prom.alerts():
            labels = a["labels"]
            if labels["alertname"] == "WebSocketNotReading" and labels.get("port") == str(port):
                return a

    found = wait_for("WebSocketNotReading pending in Prometheus", alert, timeout=20)
    assert found["labels"]["role"] == "server" and found["state"] in ("pending", "firing")
    assert found["annotations"]["summary"] == f"WebSocket server ends on port {port} are not reading"
    (failing,) = prom.query(health_expr(port)).values()
    assert failing >= 1
    os.kill(server.pid, signal.SIGCONT)


def used_metric_names():
    """Every observer metric name that the rules and the dashboard query."""
    text = RULES.read_text() + "\n".join(dashboard_exprs(0))
    return set(re.findall(r"\b((?:websocket|observer)_[a-z0-9_]+)\b", text))


def test_every_metric_deploy_uses_is_exported_by_the_agent(agent_factory):
    agent = agent_factory(*FLAGS)
    types = dict(
        line.split()[2:4] for line in agent.get("/metrics").splitlines() if line.startswith("# TYPE ")
    )

    def exported(name):
        if name in types:
            return True
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        return base != name and types.get(base) in ("histogram", "summary")

    used = used_metric_names()
    assert {"websocket_connections_active", "observer_last_refresh_timestamp_seconds"} <= used
    missing = sorted(n for n in used if not exported(n))
    assert not missing, f"used by deploy/ but not exported by the agent: {missing}; exported: {sorted(types)}"


def cgroup2_root():
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, fstype = line.split()[:3]
        if fstype == "cgroup2":
            return Path(point)
    pytest.skip("needs a cgroup v2 hierarchy")


@pytest.fixture
def fake_containers():
    """Makes cgroups shaped like the kubelet's under the real cgroup v2 root; removes them after,
    moving any process left in them back to the root."""
    root = cgroup2_root()
    made = []

    def make(relative):
        path = root
        for part in Path(relative).parts:
            path = path / part
            if not path.exists():
                path.mkdir()
                made.append(path)
        return path / "cgroup.procs"

    yield make
    for path in reversed(made):
        for pid in (path / "cgroup.procs").read_text().split():
            try:
                (root / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # exited meanwhile
        wait_for(f"{path} empty", lambda: not (path / "cgroup.procs").read_text().strip(), timeout=5)
        path.rmdir()


def spawn_in(netns, procs, *argv):
    """Starts a peer in `netns` that joins the cgroup `procs` before it runs, so it never runs
    elsewhere. (It joins before entering the namespace: `ip netns exec` mounts a fresh /sys.)"""
    join = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(procs)]
    proc = subprocess.Popen([*join, *netns.cmd(*argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.seen = b""
    netns.procs.append(proc)
    netns.expect(proc, "ready")
    return proc


def test_connections_are_attributed_to_their_pods(netns, agent_factory, fake_containers, tmp_path):
    port = 8803
    server_uid, client_uid = str(uuid.uuid4()), str(uuid.uuid4())
    server_id, client_id = secrets.token_hex(32), secrets.token_hex(32)
    # containerd with the systemd cgroup driver, and any runtime with the cgroupfs driver.
    server_cgroup = fake_containers(
        "kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{server_uid.replace('-', '_')}.slice/cri-containerd-{server_id}.scope"
    )
    client_cgroup = fake_containers(f"kubepods/besteffort/pod{client_uid}/{client_id}")
    pods = tmp_path / "pods"
    (pods / f"shop_cart-5f7d8_{server_uid}" / "app").mkdir(parents=True)
    (pods / f"chat_gateway-0_{client_uid}" / "app").mkdir(parents=True)

    labelled = agent_factory(*FLAGS, "--port", port, "--pod-labels", "--pod-log-dir", pods)
    plain = agent_factory(*FLAGS, "--port", port, "--pod-log-dir", pods)
    spawn_in(netns, server_cgroup, sys.executable, PEERS / "py_ws.py", "server", port)
    spawn_in(netns, client_cgroup, sys.executable, PEERS / "py_ws.py", "client", f"ws://127.0.0.1:{port}/", "chatty")

    expected = {
        "server": {"namespace": "shop", "pod": "cart-5f7d8", "container": server_id},
        "client": {"namespace": "chat", "pod": "gateway-0", "container": client_id},
    }

    def attributed(agent):
        both = ends(agent, port)
        got = both and {r: {k: e[k] for k in ("namespace", "pod", "container")} for r, e in both.items()}
        return got == expected or None

    for agent in (labelled, plain):
        wait_for("both ends attributed to their pods", lambda: attributed(agent), timeout=10)

    def labelled_series():
        return (
            labelled.metric("websocket_connections_active", port=port, role="server", namespace="shop", pod="cart-5f7d8") == 1
            and labelled.metric("websocket_connections_active", port=port, role="client", namespace="chat", pod="gateway-0") == 1
        )

    wait_for("pod-labelled series", labelled_series, timeout=5)
    text = labelled.get("/metrics")
    assert f'websocket_connections_active{{port="{port}",role="server"}}' not in text
    assert server_id not in text and client_id not in text, "container IDs are never labels"
    # Without --pod-labels the series stay per port and role.
    assert plain.metric("websocket_connections_active", port=port, role="server") == 1
    assert "pod=" not in plain.get("/metrics")


def test_promtool_finds_nothing_to_lint_in_live_metrics(netns, agent_factory):
    """`/metrics` with every family populated by real traffic passes `promtool check metrics`."""
    agent = agent_factory(*FLAGS)
    port = 8803
    netns.python_peer("server", port, "ping")
    netns.node_peer("client", f"ws://127.0.0.1:{port}/lint", "chatty")
    netns.python_peer("server", port + 1, "close")
    netns.python_peer("client", f"ws://127.0.0.1:{port + 1}/", "close")

    def populated():
        text = agent.get("/metrics")
        wanted = (
            f'websocket_pong_latency_seconds_count{{port="{port}"',
            f'websocket_close_total{{port="{port + 1}"',
            f'websocket_message_size_bytes_count{{port="{port}"',
        )
        return all(w in text for w in wanted) and text

    text = wait_for("pongs, closes and messages in /metrics", populated, timeout=10)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )
