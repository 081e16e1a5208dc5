"""A host that lacks something observer needs: the agent names what is missing and the fix, and
exits with the documented code; a missing optional hook is logged and exported, and the agent
goes on.

Each fault is made real in a private mount namespace for the agent alone: the kernel's BTF
hidden or edited so that a tracepoint is not found, the cgroup v2 hierarchy or bpffs hidden."""

import socket
import subprocess
from pathlib import Path

from conftest import OBSERVER, Agent, free_port, watches_a_websocket

VMLINUX = Path("/sys/kernel/btf/vmlinux")
FLAGS = ("--refresh", "250ms")


def in_private_mounts(*setup):
    """A command prefix running `setup` (shell commands) in a new mount namespace, then the
    command that follows."""
    script = " && ".join([*setup, 'exec "$0" "$@"'])
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def btf_without(tmp_path, tracepoint):
    """The kernel's BTF with the type of `tracepoint` renamed, as on a kernel without it."""
    name = f"btf_trace_{tracepoint}".encode()
    btf = VMLINUX.read_bytes()
    assert btf.count(name + b"\0") == 1
    edited = tmp_path / "vmlinux"
    edited.write_bytes(btf.replace(name + b"\0", name[:-1] + b"_\0"))
    return edited


def run_to_exit(prefix, *args):
    argv = [*prefix, OBSERVER, "--metrics-addr", f"127.0.0.1:{free_port()}", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return result.returncode, result.stderr.strip().splitlines()[-1]


def test_without_btf_the_error_names_the_kernel_option(tmp_path):
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    code, message = run_to_exit(in_private_mounts(f"mount --bind {empty} {VMLINUX}"))
    assert code == 3, message
    assert "BTF" in message and "CONFIG_DEBUG_INFO_BTF=y" in message, message


def test_a_missing_required_tracepoint_is_named_with_the_fix(tmp_path):
    edited = btf_without(tmp_path, "sock_send_length")
    code, message = run_to_exit(in_private_mounts(f"mount --bind {edited} {VMLINUX}"))
    assert code == 3, message
    assert "observer_send" in message and "tp_btf/sock_send_length" in message, message
    assert "Linux 6.3" in message, message


def test_a_missing_optional_tracepoint_is_logged_exported_and_survived(tmp_path, netns):
    edited = btf_without(tmp_path, "tcp_receive_reset")
    prefix = in_private_mounts(f"mount --bind {edited} {VMLINUX}")
    agent = Agent((*FLAGS, "--port", 8971), tmp_path / "agent.log", prefix=prefix)
    try:
        log = agent.read_log()
        assert "optional hook not attached" in log and "observer_rst_in" in log, log
        assert "resets received are not told apart" in log, log
        assert agent.metric("observer_hook_attached", program="observer_rst_in") == 0
        assert agent.metric("observer_hook_attached", program="observer_rst_out") == 1
        watches_a_websocket(agent, netns, 8971)
    finally:
        agent.stop()


def test_without_cgroup2_the_error_says_what_to_mount(tmp_path):
    # Over every cgroup2 mount the agent could find.
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if line.split()[2] == "cgroup2"]
    assert points
    code, message = run_to_exit(in_private_mounts(*(f"umount -l {p}" for p in points)))
    assert code == 3, message
    assert "no cgroup v2 hierarchy" in message and "mount -t cgroup2" in message, message


def test_without_bpffs_the_agent_mounts_it_and_works(tmp_path, netns):
    # The programs need no bpffs (nothing is pinned); the agent mounts it for tools like bpftool.
    prefix = in_private_mounts("(umount -l /sys/fs/bpf 2>/dev/null || true)")
    agent = Agent((*FLAGS, "--port", 8972), tmp_path / "agent.log", prefix=prefix)
    try:
        assert "mounted missing filesystem" in agent.read_log()
        watches_a_websocket(agent, netns, 8972)
    finally:
        agent.stop()


def test_a_busy_metrics_port_is_named_and_nothing_is_loaded():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = [OBSERVER, "--metrics-addr", f"127.0.0.1:{port}"]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    message = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 4, message
    assert f"127.0.0.1:{port}" in message and "Address already in use" in message, message
    # The fix: who holds the port, and the flag that moves the agent elsewhere.
    assert f"ss -ltnp 'sport = :{port}'" in message and "--metrics-addr" in message, message
