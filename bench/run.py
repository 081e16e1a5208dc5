"""The benchmark driver behind `cargo xtask bench`: what observer costs and how fast it detects.

Runs as root with the release agent (OBSERVER_BIN), real Node `ws` and Python `websockets` peers,
each set in network namespaces named `bench-*` and on ports 9000-9999. Phases:

- throughput: a WebSocket echo load, alternately without and with the agent (ABBA order);
- hooks:      the same load with `kernel.bpf_stats_enabled=1`, run time per program invocation;
- idle10k:    10 000 idle WebSocket connections, the agent's CPU and memory;
- scale:      100 000 established TCP connections on watched ports: agent memory, refresh and
              scrape times, and `ss` over the same sockets;
- detection:  time from a fault to the verdict, with default and short thresholds.

Every figure is the median of several rounds, with min and max. Writes target/bench/summary.json
and prints a table. Everything it starts (namespaces, processes, the sysctl) is undone on exit,
including Ctrl-C; it also records the pids it starts in target/bench/pids so that `cargo xtask
bench` can finish the job if this process itself is killed.
"""

import argparse
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
OUT = ROOT / "target" / "bench"
LOGS = OUT / "logs"
PIDS = OUT / "pids"
OBSERVER = os.environ.get("OBSERVER_BIN", str(ROOT / "target" / "release" / "observer"))
NODE_ENV = {**os.environ, "NODE_PATH": str(ROOT / "tests" / "node" / "node_modules")}
PROGRAMS = ["observer_send", "observer_recv", "observer_ingress", "observer_egress", "observer_sock_ops"]
# The programs that run for every application read or write, or for every segment.
DATA_PATH_PROGRAMS = PROGRAMS[:4]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SHORT_FLAGS = ["--idle-after", "2s", "--stall-after", "2s", "--refresh", "250ms"]


def log(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


def spread(values):
    """Median, min and max of a figure measured in several rounds."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def wait_for(what, predicate, timeout, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


# --- Everything started here, and how it is undone -------------------------------------------


class Resources:
    def __init__(self):
        self.procs = []
        self.agents = []
        self.namespaces = []
        self.sysctls = {}

    def remember_pid(self, pid):
        try:
            start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return
        with open(PIDS, "a") as f:
            f.write(f"{pid} {start}\n")

    def set_sysctl(self, key, value):
        path = Path("/proc/sys") / key.replace(".", "/")
        if key not in self.sysctls:
            self.sysctls[key] = path.read_text().strip()
        path.write_text(f"{value}\n")

    def restore_sysctl(self, key):
        if key in self.sysctls:
            (Path("/proc/sys") / key.replace(".", "/")).write_text(self.sysctls.pop(key) + "\n")

    def cleanup(self):
        for agent in list(self.agents):
            agent.stop()
        for proc in self.procs:
            kill(proc)
        self.procs.clear()
        for name in list(self.namespaces):
            delete_netns(name)
        for key in list(self.sysctls):
            self.restore_sysctl(key)


RES = Resources()


def kill(proc):
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class Proc:
    """A peer process whose stdout is read for readiness words."""

    def __init__(self, argv, name, env=None, ns=None):
        self.name = name
        self.err = open(LOGS / f"{name}.err", "w")
        self.popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.err, env=env)
        self.seen = b""
        self.popen.netns = ns
        RES.procs.append(self.popen)
        RES.remember_pid(self.popen.pid)

    @property
    def pid(self):
        return self.popen.pid

    def expect(self, word, timeout):
        deadline = time.monotonic() + timeout
        fd = self.popen.stdout.fileno()
        while word.encode() not in self.seen.split():
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{self.name} never printed {word!r} in {timeout}s")
            readable, _, _ = select.select([fd], [], [], min(left, 0.2))
            if readable:
                chunk = os.read(fd, 65536)
                self.seen += chunk
                if not chunk:
                    self.popen.wait()
                    err = (LOGS / f"{self.name}.err").read_text()[-2000:]
                    raise RuntimeError(f"{self.name} exited ({self.popen.returncode}): {err}")
        return time.monotonic()

    def finish(self, timeout):
        out, _ = self.popen.communicate(timeout=timeout)
        self.seen += out
        if self.popen.returncode != 0:
            err = (LOGS / f"{self.name}.err").read_text()[-2000:]
            raise RuntimeError(f"{self.name} failed ({self.popen.returncode}): {err}")
        return self.seen.decode()

    def stop(self):
        kill(self.popen)
        if self.popen in RES.procs:
            RES.procs.remove(self.popen)


def add_netns(name):
    subprocess.run(["ip", "netns", "add", name], check=True)
    RES.namespaces.append(name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)


def netns_sysctl(name, key, value):
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-q", "-w", f"{key}={value}"], check=True)


def delete_netns(name):
    for proc in [p for p in RES.procs if getattr(p, "netns", None) == name]:
        kill(proc)
        RES.procs.remove(proc)
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGCONT)
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if name in RES.namespaces:
        RES.namespaces.remove(name)


def in_ns(ns, *argv):
    return ["ip", "netns", "exec", ns, *map(str, argv)]


def node(ns, script, *args, name):
    return Proc(in_ns(ns, "node", BENCH / script, *args), name, env=NODE_ENV, ns=ns)


def python(ns, script, *args, name):
    return Proc(in_ns(ns, sys.executable, BENCH / script, *args), name, ns=ns)


# --- The agent ----------------------------------------------------------------------------------


class Agent:
    def __init__(self, name, port, *args):
        self.name = name
        self.base = f"http://127.0.0.1:{port}"
        self.log = open(LOGS / f"agent-{name}.log", "w")
        argv = [OBSERVER, "run", "--metrics-addr", f"127.0.0.1:{port}", *map(str, args)]
        # Its own state file, beside its log: never the host's /run/observer.
        argv += ["--state-file", str(LOGS / f"agent-{name}.state.json")]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        RES.agents.append(self)
        RES.remember_pid(self.proc.pid)
        wait_for(f"agent {name} healthy", self._healthy, timeout=30)

    @property
    def pid(self):
        return self.proc.pid

    def _healthy(self):
        if self.proc.poll() is not None:
            tail = (LOGS / f"agent-{self.name}.log").read_text()[-2000:]
            raise RuntimeError(f"agent {self.name} exited ({self.proc.returncode}): {tail}")
        try:
            return self.get("/healthz") == "ok\n"
        except OSError:
            return False

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            return response.read().decode()

    def metrics(self):
        samples = {}
        for line in self.get("/metrics").splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, value = line.rsplit(" ", 1)
            name, _, labels = name_labels.partition("{")
            pairs = [p.split("=", 1) for p in labels.rstrip("}").split(",") if p]
            samples[(name, frozenset((k, v.strip('"')) for k, v in pairs))] = float(value)
        return samples

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        if self in RES.agents:
            RES.agents.remove(self)


def metric_sum(samples, name, ports):
    ports = {str(p) for p in ports}
    return sum(v for (n, labels), v in samples.items() if n == name and dict(labels).get("port") in ports)


def cpu_seconds(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


def fdinfo_values(pid, key):
    """The `key:` values in the fdinfo of every descriptor of `pid` (bpf programs, links, maps)."""
    values = []
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(key + ":"):
                values.append(line.split(":", 1)[1].strip())
    return values


def kernel_map_mib(pid):
    """Memory the kernel charges for the maps the agent holds (`memlock` of each map)."""
    seen, total = set(), 0
    for entry in Path(f"/proc/{pid}/fdinfo").iterdir():
        try:
            info = dict(line.split(":", 1) for line in entry.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if "map_id" in info and "memlock" in info and info["map_id"] not in seen:
            seen.add(info["map_id"])
            total += int(info["memlock"])
    return total / 2**20


def foreign_agents(mine):
    """Other observer agents running on the host: their programs also run on every socket."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            if (entry / "comm").read_text().strip() == "observer":
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def note_foreign(summary, phase, mine):
    summary["loadavg_at_start"][phase] = float(Path("/proc/loadavg").read_text().split()[0])
    others = foreign_agents(mine)
    if others:
        log(f"{phase}: {len(others)} other observer agent(s) running (pids {others}); figures include them")
    summary["foreign_agents_seen"][phase] = max(summary["foreign_agents_seen"].get(phase, 0), len(others))


# --- Phase 1: throughput without and with the agent ----------------------------------------------


def echo_round(ns, url, args, index):
    client = node(ns, "echo.js", "client", url, args.echo_connections, args.echo_size, 1, args.echo_seconds,
                  name=f"echo-client-{index}")
    return client, lambda: json.loads(client.finish(timeout=args.echo_seconds + 60).strip().splitlines()[-1])


def host_cpu_seconds():
    """(busy, steal) CPU seconds on all CPUs since boot. Busy is user, nice, system, irq and
    softirq: interrupt time is included because, with tick-based accounting, it is also charged
    to the task it hit. Steal is time the hypervisor gave to other guests."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(fields[i] for i in (0, 1, 2, 5, 6)) / CLK_TCK, fields[7] / CLK_TCK


def phase_throughput(args, summary):
    ns, port = "bench-echo", 9100
    add_netns(ns)
    server = node(ns, "echo.js", "server", "127.0.0.1", port, name="echo-server")
    server.expect("ready", 15)
    url = f"ws://127.0.0.1:{port}/"
    order = "ABBA" * args.echo_pairs
    rounds = []
    waited = 0.0
    for i, kind in enumerate(order):
        # Another agent's programs would run on this load too: give it a moment to go away.
        w0 = time.monotonic()
        while foreign_agents(set()) and waited + time.monotonic() - w0 < args.quiet_wait:
            time.sleep(0.5)
        waited += time.monotonic() - w0
        agent = Agent(f"echo-{i}", 9464) if kind == "B" else None
        mine = {agent.pid} if agent else set()
        note_foreign(summary, "throughput", mine)
        client, result = echo_round(ns, url, args, i)
        ours = [server.pid, client.pid, *mine]
        # Inside the measured window: how much CPU went to anything but this load and agent.
        time.sleep(2)
        c0, (h0, s0), t0 = sum(map(cpu_seconds, ours)), host_cpu_seconds(), time.monotonic()
        foreign = len(foreign_agents(mine))
        tracked = None
        if agent:
            # The connections are tracked: both ends of each, found by their handshake.
            conns = json.loads(agent.get("/connections"))
            tracked = sum(1 for c in conns if c["port"] == port and c["websocket"])
        time.sleep(max(0.5, args.echo_seconds - 2))
        c1, (h1, s1), t1 = sum(map(cpu_seconds, ours)), host_cpu_seconds(), time.monotonic()
        other = 100 * ((h1 - h0) - (c1 - c0)) / (t1 - t0)
        steal = 100 * (s1 - s0) / (t1 - t0)
        rate = result()["rate"]
        if agent:
            agent.stop()
        # Another agent that stays for the whole phase weighs on both kinds of rounds alike; CPU
        # taken by other work comes and goes, so a round with much of it is left out.
        clean = other <= args.other_cpu_limit
        rounds.append({"kind": kind, "rate": rate, "other_cpu_percent": round(other, 1),
                       "steal_percent": round(steal, 1), "foreign_agents": foreign,
                       "tracked_ends": tracked, "clean": clean})
        log(f"throughput round {i + 1}/{len(order)} {'with' if kind == 'B' else 'without'} agent: "
            f"{rate:,.0f} msg/s (other CPU {other:.0f}% of a core, steal {steal:.0f}%"
            f"{', another agent running' if foreign else ''})")
        time.sleep(0.5)
    usable = [r for r in rounds if r["clean"]]
    enough = sum(r["kind"] == "A" for r in usable) >= 2 and sum(r["kind"] == "B" for r in usable) >= 2
    if not enough:
        log("throughput: fewer than 2 quiet rounds of each kind; using every round")
        usable = rounds
    rates = {k: [r["rate"] for r in usable if r["kind"] == k] for k in "AB"}
    pairs = []
    for j in range(0, len(rounds), 2):
        block = rounds[j:j + 2]
        if all(r in usable for r in block):
            a, b = sorted(block, key=lambda r: r["kind"])
            pairs.append(b["rate"] / a["rate"])
    without, with_agent = spread(rates["A"]), spread(rates["B"])
    summary["throughput_msgs_per_s_without_agent"] = without["median"]
    summary["throughput_msgs_per_s_with_agent"] = with_agent["median"]
    summary["throughput_ratio"] = with_agent["median"] / without["median"]
    summary["spread"]["throughput_msgs_per_s_without_agent"] = without
    summary["spread"]["throughput_msgs_per_s_with_agent"] = with_agent
    summary["spread"]["throughput_ratio"] = spread(pairs)
    summary["method"]["throughput"] = {
        "connections": args.echo_connections,
        "message_bytes": args.echo_size,
        "measure_seconds": args.echo_seconds,
        "order": order,
        "rounds_used": "quiet rounds only" if enough else "all rounds (the host was busy)",
        "other_cpu_limit_percent": args.other_cpu_limit,
        "seconds_waited_for_other_agents": round(waited, 1),
        "rounds": rounds,
    }
    delete_netns(ns)


# --- Phase 2: run time per program invocation ---------------------------------------------------


def prog_stats(agent):
    ids = {int(v) for v in fdinfo_values(agent.pid, "prog_id")}
    out = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True, check=True).stdout
    stats = {}
    for prog in json.loads(out):
        if prog["id"] in ids and prog.get("name", "").startswith("observer_"):
            name = next((p for p in PROGRAMS if p.startswith(prog["name"])), prog["name"])
            stats[name] = (prog.get("run_time_ns", 0), prog.get("run_cnt", 0))
    return stats


def phase_hooks(args, summary):
    ns, port = "bench-hooks", 9101
    add_netns(ns)
    node(ns, "echo.js", "server", "127.0.0.1", port, name="hooks-server").expect("ready", 15)
    url = f"ws://127.0.0.1:{port}/"
    RES.set_sysctl("kernel.bpf_stats_enabled", 1)
    per_prog = {p: [] for p in PROGRAMS}
    calls = {p: [] for p in PROGRAMS}
    try:
        agent = Agent("hooks", 9464)
        note_foreign(summary, "hooks", {agent.pid})
        for i in range(args.hook_rounds):
            whole_before = prog_stats(agent)
            client, result = echo_round(ns, url, args, f"hooks-{i}")
            time.sleep(2)
            before, t0 = prog_stats(agent), time.monotonic()
            time.sleep(args.echo_seconds - 2.5)
            after, t1 = prog_stats(agent), time.monotonic()
            rate = result()["rate"]
            time.sleep(0.5)
            whole_after = prog_stats(agent)
            # sock_ops runs when connections open and close, outside the steady window.
            before["observer_sock_ops"] = whole_before.get("observer_sock_ops", (0, 0))
            after["observer_sock_ops"] = whole_after.get("observer_sock_ops", (0, 0))
            for name in PROGRAMS:
                if name in before and name in after:
                    dt = after[name][0] - before[name][0]
                    dn = after[name][1] - before[name][1]
                    if dn > 0:
                        per_prog[name].append(dt / dn)
                        calls[name].append(dn / (t1 - t0))
            shown = ", ".join(f"{n} {v[-1]:.0f} ns" for n, v in per_prog.items() if v)
            log(f"hooks round {i + 1}/{args.hook_rounds} ({rate:,.0f} msg/s): {shown}")
        agent.stop()
    finally:
        RES.restore_sysctl("kernel.bpf_stats_enabled")
    summary["hook_ns_mean"] = {}
    for name in PROGRAMS:
        s = spread(per_prog[name])
        if s:
            summary["hook_ns_mean"][name] = s["median"]
            summary["spread"][f"hook_ns_mean.{name}"] = s
            summary["spread"][f"hook_calls_per_s.{name}"] = spread(calls[name])
    data_path = [summary["hook_ns_mean"][n] for n in DATA_PATH_PROGRAMS if n in summary["hook_ns_mean"]]
    summary["hook_ns_mean_max"] = max(summary["hook_ns_mean"].values(), default=None)
    summary["hook_ns_mean_max_data_path"] = max(data_path, default=None)
    delete_netns(ns)


# --- Phase 3a: 10 000 idle WebSocket connections --------------------------------------------------


def measure_agent(agent, windows, seconds):
    """CPU % of one core over each window, and VmRSS at the end of each."""
    cpu, rss = [], []
    for _ in range(windows):
        c0, t0 = cpu_seconds(agent.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_seconds(agent.pid), time.monotonic()
        cpu.append(100 * (c1 - c0) / (t1 - t0))
        rss.append(rss_mib(agent.pid))
    return cpu, rss


def phase_idle10k(args, summary):
    ns, port, count = "bench-idle", 9200, args.idle_connections
    add_netns(ns)
    netns_sysctl(ns, "net.core.somaxconn", 65535)
    agent = Agent("idle", 9465)
    note_foreign(summary, "idle10k", {agent.pid})
    node(ns, "idle.js", "server", "127.0.0.1", port, name="idle-server").expect("ready", 15)
    t0 = time.monotonic()
    node(ns, "idle.js", "client", f"ws://127.0.0.1:{port}/", count, name="idle-client").expect("ready", 180)
    log(f"idle10k: {count} WebSocket connections open in {time.monotonic() - t0:.1f}s")
    try:
        wait_for(
            f"{2 * count} ends reported",
            lambda: metric_sum(agent.metrics(), "websocket_connections_active", [port]) >= 2 * count,
            timeout=30,
        )
    except RuntimeError:
        # Handshakes whose bytes were lost in a burst are never recognised; the ends stay in the
        # kernel map (and cost a refresh each) without being reported.
        log("idle10k: not every end was reported; measuring with those that were")
    time.sleep(2)
    samples = agent.metrics()
    seen = metric_sum(samples, "websocket_connections_active", [port])
    lost = samples.get(("observer_events_lost_total", frozenset()))
    log(f"idle10k: {seen:.0f} of {2 * count} ends reported, {lost:.0f} kernel events lost")
    cpu, rss = measure_agent(agent, args.idle_windows, args.idle_window_seconds)
    log(f"idle10k: agent CPU {['%.3f' % c for c in cpu]} %, RSS {['%.1f' % r for r in rss]} MiB")
    summary["agent_cpu_percent_10k"] = statistics.median(cpu)
    summary["agent_rss_mib_10k"] = statistics.median(rss)
    summary["spread"]["agent_cpu_percent_10k"] = spread(cpu)
    summary["spread"]["agent_rss_mib_10k"] = spread(rss)
    summary["method"]["idle10k"] = {
        "connections": count,
        "ends_reported": seen,
        "events_lost": lost,
        "window_seconds": args.idle_window_seconds,
        "windows": args.idle_windows,
        "agent_flags": "defaults (refresh 1s)",
    }
    agent.stop()
    delete_netns(ns)


# --- Phase 3b and 4: 100 000 established TCP connections, and ss over them ------------------------


def timed(argv):
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - t0


def phase_scale(args, summary):
    ns = "bench-scale"
    total, per = args.scale_connections, args.scale_per_process
    ports = [9300 + i for i in range((total + per - 1) // per)]
    add_netns(ns)
    netns_sysctl(ns, "net.core.somaxconn", 65535)
    netns_sysctl(ns, "net.ipv4.ip_local_port_range", "10000 60999")
    max_conns = max(262144, 2 * total + 16384)
    port_flags = [f for p in ports for f in ("--port", p)]
    agent = Agent("scale", 9466, "--max-connections", max_conns, *port_flags)
    note_foreign(summary, "scale", {agent.pid})
    t0 = time.monotonic()
    counts = [min(per, total - i * per) for i in range(len(ports))]
    servers = [python(ns, "hold.py", "server", "127.0.0.1", p, n, name=f"hold-server-{p}") for p, n in zip(ports, counts)]
    for s in servers:
        s.expect("listening", 15)
    clients = [python(ns, "hold.py", "client", "127.0.0.1", p, n, name=f"hold-client-{p}") for p, n in zip(ports, counts)]
    for proc in clients + servers:
        proc.expect("ready", 300)
    setup = time.monotonic() - t0
    established = subprocess.run(in_ns(ns, "ss", "-tnH", "state", "established"), capture_output=True, text=True,
                                 check=True).stdout.count("\n")
    log(f"scale: {total} connections ({established} established sockets) in {setup:.1f}s")

    def all_tracked():
        n = metric_sum(agent.metrics(), "websocket_connections_active", ports)
        return n >= 2 * total and n

    t1 = time.monotonic()
    try:
        tracked = wait_for(f"{2 * total} ends reported", all_tracked, timeout=120, interval=1)
    except RuntimeError as error:
        log(f"scale: {error}")
        tracked = metric_sum(agent.metrics(), "websocket_connections_active", ports)
    settle = time.monotonic() - t1

    refresh, scrape, rss = [], [], []
    c0, w0 = cpu_seconds(agent.pid), time.monotonic()
    for _ in range(args.scale_samples):
        time.sleep(1.1)
        s0 = time.monotonic()
        body = agent.get("/metrics")
        scrape.append(time.monotonic() - s0)
        for line in body.splitlines():
            if line.startswith("observer_refresh_duration_seconds "):
                refresh.append(float(line.split()[1]))
        rss.append(rss_mib(agent.pid))
    cpu = 100 * (cpu_seconds(agent.pid) - c0) / (time.monotonic() - w0)
    samples = agent.metrics()
    lost = samples.get(("observer_events_lost_total", frozenset()))
    untracked = samples.get(("observer_untracked_connections_total", frozenset()))
    maps = kernel_map_mib(agent.pid)
    log(f"scale: refresh {['%.3f' % r for r in refresh]} s, scrape {['%.4f' % s for s in scrape]} s, "
        f"RSS {rss[-1]:.1f} MiB, CPU {cpu:.1f} %")
    agent.stop()

    ss_info = [timed(in_ns(ns, "ss", "-tinH")) for _ in range(args.ss_rounds)]
    ss_plain = [timed(in_ns(ns, "ss", "-tnH")) for _ in range(args.ss_rounds)]
    log(f"scale: ss -tinH {['%.3f' % s for s in ss_info]} s, ss -tnH {['%.3f' % s for s in ss_plain]} s")

    suffix = "100k" if total == 100_000 else f"{total // 1000}k"
    figures = {
        f"agent_rss_mib_{suffix}": rss,
        f"refresh_seconds_{suffix}": refresh,
        f"metrics_render_seconds_{suffix}": scrape,
        f"ss_dump_seconds_{suffix}": ss_info,
        f"sock_diag_dump_seconds_{suffix}": ss_plain,
    }
    for key, values in figures.items():
        s = spread(values)
        summary[key] = s["median"] if s else None
        summary["spread"][key] = s
    summary[f"agent_cpu_percent_{suffix}"] = cpu
    summary[f"agent_kernel_maps_mib_{suffix}"] = maps
    summary["method"]["scale"] = {
        "connections": total,
        "established_sockets": established,
        "ends_reported": tracked,
        "seconds_until_all_reported": settle,
        "setup_seconds": setup,
        "processes": 2 * len(ports),
        "ports": ports,
        "max_connections": max_conns,
        "events_lost": lost,
        "untracked_connections": untracked,
        "agent_flags": "--port per server port, --max-connections, refresh 1s",
    }
    for proc in clients + servers:
        proc.stop()
    t2 = time.monotonic()
    delete_netns(ns)
    log(f"scale: namespace removed in {time.monotonic() - t2:.1f}s")


# --- Phase 5: detection time from fault to verdict ------------------------------------------------


class Poller(threading.Thread):
    """Polls an agent's /connections and records, per (port, role), when each state was seen."""

    def __init__(self, agent, ports, interval):
        super().__init__(daemon=True)
        self.agent, self.ports, self.interval = agent, set(ports), interval
        self.seen = {}  # (port, role) -> [(monotonic, state)]
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            try:
                conns = json.loads(self.agent.get("/connections", timeout=5))
            except (OSError, ValueError):
                conns = []
            now = time.monotonic()
            for c in conns:
                if c["port"] in self.ports:
                    history = self.seen.setdefault((c["port"], c["role"]), [])
                    if not history or history[-1][1] != c["state"]:
                        history.append((now, c["state"]))
            self.stopping.wait(self.interval)

    def both_ends(self, port):
        return all((port, role) in self.seen for role in ("server", "client"))

    def first(self, port, role, after, states=None, not_state=None):
        for at, state in self.seen.get((port, role), []):
            if at >= after and ((states and state in states) or (not_state and state != not_state)):
                return at, state
        return None


def phase_detection(args, summary):
    n = args.detection_rounds
    frozen = [9400 + i for i in range(n)]
    cut = [9410 + i for i in range(n)]
    silent = [9420 + i for i in range(n)]
    agents = {
        "default": Agent("detect-default", 9467),
        "short": Agent("detect-short", 9468, *SHORT_FLAGS),
    }
    note_foreign(summary, "detection", {a.pid for a in agents.values()})
    pollers = {k: Poller(a, frozen + cut + silent, 0.05) for k, a in agents.items()}
    for p in pollers.values():
        p.start()

    streams = []
    for i, port in enumerate(frozen):
        ns = f"bench-frz{i}"
        add_netns(ns)
        srv = python(ns, "ws_peer.py", "server", "127.0.0.1", port, name=f"frozen-server-{i}")
        srv.expect("ready", 15)
        streams.append((srv, python(ns, "ws_peer.py", "client", f"ws://127.0.0.1:{port}/", "stream",
                                    name=f"frozen-client-{i}")))
    for i, port in enumerate(cut):
        s_ns, c_ns = f"bench-cut{i}s", f"bench-cut{i}c"
        add_netns(s_ns)
        add_netns(c_ns)
        subprocess.run(["ip", "link", "add", f"bench-v{i}s", "netns", s_ns, "type", "veth", "peer", "name",
                        f"bench-v{i}c", "netns", c_ns], check=True)
        for ns, dev, addr in ((s_ns, f"bench-v{i}s", "198.18.0.1/30"), (c_ns, f"bench-v{i}c", "198.18.0.2/30")):
            subprocess.run(["ip", "-n", ns, "addr", "add", addr, "dev", dev], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        python(s_ns, "ws_peer.py", "server", "198.18.0.1", port, name=f"cut-server-{i}").expect("ready", 15)
        streams.append((None, python(c_ns, "ws_peer.py", "client", f"ws://198.18.0.1:{port}/", "stream",
                                     name=f"cut-client-{i}")))
    for _, client in streams:
        client.expect("ready", 15)
    wait_for("streaming connections reported by both agents",
             lambda: all(p.both_ends(port) for p in pollers.values() for port in frozen + cut), timeout=15)

    faults = {}
    for i, port in enumerate(silent):
        ns = f"bench-sil{i}"
        add_netns(ns)
        python(ns, "ws_peer.py", "server", "127.0.0.1", port, name=f"silent-server-{i}").expect("ready", 15)
        faults[port] = python(ns, "ws_peer.py", "client", f"ws://127.0.0.1:{port}/", "silent",
                              name=f"silent-client-{i}").expect("ready", 15)
        time.sleep(0.37)
    # Faults of one kind are spread over the refresh interval, so that the rounds do not all
    # land at the same point of the agents' refresh cycle.
    for i, port in enumerate(frozen):
        time.sleep(0.37 * (i > 0))
        os.kill(streams[i][0].pid, signal.SIGSTOP)
        faults[port] = time.monotonic()
    for i, port in enumerate(cut):
        time.sleep(0.37 * (i > 0))
        subprocess.run(["ip", "-n", f"bench-cut{i}c", "link", "set", f"bench-v{i}c", "down"], check=True)
        faults[port] = time.monotonic()
    log("detection: faults injected; waiting for verdicts (the default idle threshold is 60 s)")

    # What each scenario waits for: (ports, end, verdicts awaited or None for "anything but active").
    scenarios = {
        "frozen_server": (frozen, "server", {"not_reading"}),
        "link_cut_sender": (cut, "client", None),
        "link_cut_receiver": (cut, "server", None),
        "silent": (silent, "server", {"idle"}),
    }

    def outcome(kind, ports, role, states):
        poller = pollers[kind]
        found = [poller.first(p, role, faults[p], states=states, not_state=None if states else "active")
                 for p in ports]
        return found if all(found) else None

    deadline = max(faults.values()) + 60 + 1 + args.detection_slack
    while time.monotonic() < deadline:
        if all(outcome(k, *s) for k in agents for s in scenarios.values()):
            break
        time.sleep(0.5)
    for p in pollers.values():
        p.stopping.set()
    summary["detection_seconds"] = {}
    for scenario, (ports, role, states) in scenarios.items():
        entry = {}
        for kind in agents:
            found = [pollers[kind].first(p, role, faults[p], states=states, not_state=None if states else "active")
                     for p in ports]
            times = [f[0] - faults[p] for f, p in zip(found, ports) if f]
            verdicts = sorted({f[1] for f in found if f})
            entry[kind] = spread(times)
            summary["spread"][f"detection_seconds.{scenario}.{kind}"] = {
                **(spread(times) or {}), "end": role, "verdicts": verdicts, "undetected": sum(1 for f in found if not f),
            }
            shown = f"{statistics.median(times):.2f}s ({'/'.join(verdicts)})" if times else "not detected"
            log(f"detection: {scenario} [{kind}] {role} end: {shown}")
        summary["detection_seconds"][scenario] = {k: (v["median"] if v else None) for k, v in entry.items()}
    summary["method"]["detection"] = {
        "rounds": n,
        "poll_interval_seconds": 0.05,
        "default_flags": "--idle-after 60s --stall-after 10s --refresh 1s",
        "short_flags": " ".join(SHORT_FLAGS),
    }
    for agent in agents.values():
        agent.stop()
    for proc in list(RES.procs):
        kill(proc)
    RES.procs.clear()
    for ns in [ns for ns in RES.namespaces if ns.startswith(("bench-frz", "bench-cut", "bench-sil"))]:
        delete_netns(ns)


# --- Report ---------------------------------------------------------------------------------------


def machine():
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    node_v = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    import websockets  # noqa: PLC0415 - only its version is wanted here

    ws_v = json.loads((ROOT / "tests/node/node_modules/ws/package.json").read_text())["version"]
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "cpu_model": cpu,
        "mem_gib": round(int(mem) / 2**20, 1),
        "node": node_v,
        "node_ws": ws_v,
        "python": platform.python_version(),
        "python_websockets": websockets.__version__,
    }


GOALS = [
    ("throughput_ratio", ">=", 0.98),
    ("hook_ns_mean_max_data_path", "<=", 100),
    ("agent_cpu_percent_10k", "<=", 1.0),
    ("agent_rss_mib_100k", "<=", 64),
    ("refresh_seconds_100k", "<=", 0.05),
]


def goals(summary):
    result = {}
    for key, op, limit in GOALS:
        value = summary.get(key)
        if value is not None:
            result[key] = {"goal": f"{op} {limit}", "met": value >= limit if op == ">=" else value <= limit}
    return result


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def table(summary):
    rows = [("figure", "median", "min", "max", "goal")]
    spreads = summary["spread"]
    for key, value in summary.items():
        if key in ("spread", "method", "goals", "machine", "foreign_agents_seen", "loadavg_at_start",
                   "elapsed_seconds", "errors"):
            continue
        if isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, dict):
                    for kind, x in v.items():
                        s = spreads.get(f"{key}.{sub}.{kind}") or {}
                        rows.append((f"{key}.{sub}.{kind}", fmt(x), fmt(s.get("min")), fmt(s.get("max")), ""))
                else:
                    s = spreads.get(f"{key}.{sub}") or {}
                    rows.append((f"{key}.{sub}", fmt(v), fmt(s.get("min")), fmt(s.get("max")), ""))
            continue
        s = spreads.get(key) or {}
        goal = summary["goals"].get(key)
        shown = f"{goal['goal']} {'met' if goal['met'] else 'MISSED'}" if goal else ""
        rows.append((key, fmt(value), fmt(s.get("min")), fmt(s.get("max")), shown))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for r in rows:
        lines.append("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


PHASES = {
    "throughput": phase_throughput,
    "hooks": phase_hooks,
    "idle10k": phase_idle10k,
    "scale": phase_scale,
    "detection": phase_detection,
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset of " + ",".join(PHASES))
    p.add_argument("--echo-connections", type=int, default=256)
    p.add_argument("--echo-size", type=int, default=128, help="message bytes")
    p.add_argument("--echo-seconds", type=float, default=6, help="measured seconds per round")
    p.add_argument("--echo-pairs", type=int, default=3, help="ABBA blocks (each two rounds of each)")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="seconds in all to wait for other observer agents to stop before rounds")
    p.add_argument("--other-cpu-limit", type=float, default=10,
                   help="%% of a core used by other processes above which a round is left out")
    p.add_argument("--hook-rounds", type=int, default=3)
    p.add_argument("--idle-connections", type=int, default=10_000)
    p.add_argument("--idle-windows", type=int, default=3)
    p.add_argument("--idle-window-seconds", type=float, default=20)
    p.add_argument("--scale-connections", type=int, default=100_000)
    p.add_argument("--scale-per-process", type=int, default=10_000, help="sockets per holding process")
    p.add_argument("--scale-samples", type=int, default=7)
    p.add_argument("--ss-rounds", type=int, default=3)
    p.add_argument("--detection-rounds", type=int, default=3)
    p.add_argument("--detection-slack", type=float, default=10)
    return p.parse_args()


def ignore_signals():
    """Cleaning up is not to be interrupted by a second Ctrl-C."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def on_terminate(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main():
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it loads kernel programs and creates namespaces)")
    LOGS.mkdir(parents=True, exist_ok=True)
    PIDS.write_text("")
    signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGHUP, on_terminate)
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"bench: unknown phase(s) {sorted(unknown)}")
    summary = {"machine": machine(), "foreign_agents_seen": {}, "loadavg_at_start": {}, "spread": {}, "method": {}}
    started = time.monotonic()
    try:
        for phase in phases:
            log(f"--- {phase} ---")
            t0 = time.monotonic()
            try:
                PHASES[phase](args, summary)
            except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as error:
                # One failed phase costs its figures, not the others'.
                log(f"{phase} failed: {error!r}; cleaning up its processes and namespaces")
                summary.setdefault("errors", {})[phase] = repr(error)
                RES.cleanup()
            log(f"{phase} took {time.monotonic() - t0:.0f}s")
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        ignore_signals()
        RES.cleanup()
        sys.exit(130)
    finally:
        ignore_signals()
        RES.cleanup()
    summary["elapsed_seconds"] = time.monotonic() - started
    summary["goals"] = goals(summary)
    # Figures first, context after.
    context = ("errors", "goals", "machine", "foreign_agents_seen", "loadavg_at_start", "method", "spread")
    order = [k for k in summary if k not in context]
    ordered = {k: summary[k] for k in order}
    for k in context:
        if k in summary:
            ordered[k] = summary[k]
    (OUT / "summary.json").write_text(json.dumps(ordered, indent=2) + "\n")
    print(table(ordered))
    print(f"\nwrote {OUT / 'summary.json'} ({ordered['elapsed_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
