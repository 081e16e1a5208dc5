"""Fixtures for observer's privileged tests.

Each test gets its own network namespace (loopback up) for its peers, and its own agent, the
real release binary with its kernel programs, started with short thresholds and stopped (with
its log shown on failure) at the end. Everything waits on conditions with deadlines.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "tests" / "peers"
NODE = ROOT / "tests" / "node"
OBSERVER = os.environ.get("OBSERVER_BIN", str(ROOT / "target" / "release" / "observer"))
# Built by `cargo xtask test` from tests/peers/tungstenite.
TUNGSTENITE_PEER = os.environ.get("TUNGSTENITE_PEER", str(ROOT / "target" / "release" / "tungstenite-peer"))


def wait_for(what, predicate, timeout, interval=0.1):
    """Polls `predicate` until it returns something truthy; fails naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            last = predicate()
        except (OSError, ValueError) as error:  # agent not up yet, half-written JSON
            last = error
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Netns:
    """A network namespace with loopback up, and the processes started in it."""

    def __init__(self):
        self.name = f"obs-{uuid.uuid4().hex[:8]}"
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        self.run("ip", "link", "set", "lo", "up")
        self.procs = []

    def cmd(self, *argv):
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, *argv):
        return subprocess.run(self.cmd(*argv), check=True, capture_output=True, text=True).stdout

    def spawn(self, *argv, ready="ready", timeout=15):
        """Starts a peer and waits until it prints `ready`."""
        proc = subprocess.Popen(self.cmd(*argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.seen = b""
        self.procs.append(proc)
        if ready:
            self.expect(proc, ready, timeout)
        return proc

    @staticmethod
    def expect(proc, word, timeout=15):
        """Waits until the peer prints `word` on a line of its own."""
        deadline = time.monotonic() + timeout
        fd = proc.stdout.fileno()
        while word.encode() not in proc.seen.split():
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"peer never printed {word!r}; stdout so far: {proc.seen!r}")
            readable, _, _ = select.select([fd], [], [], min(left, 0.2))
            if readable:
                chunk = os.read(fd, 4096)
                proc.seen += chunk
                if not chunk:
                    proc.wait()
                    err = proc.stderr.read().decode(errors="replace")
                    raise AssertionError(f"peer exited ({proc.returncode}): {err}")

    def python_peer(self, *args, **kw):
        return self.spawn(sys.executable, PEERS / "py_ws.py", *args, **kw)

    def node_peer(self, *args, **kw):
        return self.spawn("node", NODE / "ws_peer.js", *args, **kw)

    def ss_queues(self, port):
        """{(local, remote): (recv_q, send_q)} of established sockets on `port`, per `ss`."""
        out = self.run("ss", "-tnH", "state", "established", f"( sport = :{port} or dport = :{port} )")
        queues = {}
        for line in out.splitlines():
            recv_q, send_q, local, remote = line.split()[:4]
            queues[(local, remote)] = (int(recv_q), int(send_q))
        return queues

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def watches_a_websocket(agent, netns, port):
    """Starts a chatty WebSocket pair on `port` in `netns` and waits until `agent` reports both
    of its ends."""
    netns.python_peer("server", port)
    netns.python_peer("client", f"ws://127.0.0.1:{port}/", "chatty")
    wait_for("both ends of a WebSocket reported", lambda: len(agent.connections(port)) == 2, 5)


class Agent:
    """A running observer, queried over its HTTP endpoint."""

    def __init__(self, args, log_path, prefix=()):
        """Starts the agent with `args`, behind the command `prefix` (e.g. `setpriv ...`)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        argv = [*prefix, OBSERVER, "run", "--metrics-addr", f"127.0.0.1:{self.port}"]
        if "--state-file" not in args:  # one per agent, beside its log
            argv += ["--state-file", f"{log_path}.state.json"]
        argv += list(map(str, args))
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for("the agent's /healthz", self._healthy, timeout=30)

    def _healthy(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.read_log()}")
        return self.get("/healthz") == "ok\n"

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=5) as response:
            return response.read().decode()

    def connections(self, port=None):
        conns = json.loads(self.get("/connections"))
        return [c for c in conns if port is None or c["port"] == port]

    def metrics(self):
        """{(name, frozenset(labels)): value} of every sample."""
        samples = {}
        for line in self.get("/metrics").splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            if "{" in name_labels:
                name, labels = name_labels.split("{", 1)
                pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",")]
                labels = frozenset((k, v.strip('"')) for k, v in pairs)
            else:
                name, labels = name_labels, frozenset()
            samples[(name, labels)] = float(value)
        return samples

    def metric(self, name, **labels):
        return self.metrics().get((name, frozenset((k, str(v)) for k, v in labels.items())))

    def read_log(self):
        if not self.log.closed:  # also read after stop(), when a failed test's log is shown
            self.log.flush()
        return Path(self.log_path).read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture
def netns():
    ns = Netns()
    yield ns
    ns.close()


@pytest.fixture
def agent_factory(tmp_path, request):
    agents = []

    def start(*args):
        agent = Agent(args, tmp_path / f"agent{len(agents)}.log")
        agents.append(agent)
        return agent

    yield start
    for agent in agents:
        agent.stop()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            sys.stderr.write(f"--- agent log {agent.log_path} ---\n{agent.read_log()}\n")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
