"""deploy/ checked offline with the real tools: Kubernetes schemas, promtool, and the files' own
promises (least privilege, identical rule sets, a dashboard row per port).

These tests need no root and no agent.
"""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import NODE, ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
RULES = DEPLOY / "prometheus" / "observer-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests"
DASHBOARD = DEPLOY / "grafana" / "observer.json"
CRD_KINDS = {"PodMonitor", "PrometheusRule"}
KUBERNETES_VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def manifests():
    """(file, document) of every manifest in deploy/kubernetes."""
    return [(f, d) for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def kubernetes_validate(*paths):
    return subprocess.run(
        [KUBERNETES_VALIDATE, "--strict", "--no-warn", *map(str, paths)],
        capture_output=True, text=True,
    )


def validate_crds(docs):
    return subprocess.run(
        ["node", NODE / "validate_crds.mjs"], input=json.dumps(docs), capture_output=True, text=True,
    )


def daemonset():
    return next(d for _, d in manifests() if d["kind"] == "DaemonSet")


def test_core_manifests_pass_strict_schema_validation():
    files = sorted({f for f, d in manifests() if d["kind"] not in CRD_KINDS})
    assert {d["kind"] for _, d in manifests()} >= {
        "Namespace", "ServiceAccount", "DaemonSet", "Service", "PodMonitor", "PrometheusRule",
    }
    result = kubernetes_validate(*files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


def test_strict_validation_rejects_a_misspelt_field(tmp_path):
    broken = copy.deepcopy(daemonset())
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    result = kubernetes_validate(path)
    assert result.returncode != 0 and "livenessProbes" in result.stdout + result.stderr


def test_operator_resources_match_the_operator_schemas():
    docs = [d for _, d in manifests() if d["kind"] in CRD_KINDS]
    assert {d["kind"] for d in docs} == CRD_KINDS
    result = validate_crds(docs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == len(docs)

    # The same check refuses a wrong type and a missing expression.
    monitor = copy.deepcopy(next(d for d in docs if d["kind"] == "PodMonitor"))
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = 10
    rule = copy.deepcopy(next(d for d in docs if d["kind"] == "PrometheusRule"))
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    result = validate_crds([monitor, rule])
    assert result.returncode == 1 and result.stdout.count("ERROR") == 2, result.stdout


def test_prometheusrule_carries_exactly_the_rule_file():
    check = subprocess.run(
        [sys.executable, DEPLOY / "prometheus" / "generate-prometheusrule.py", "--check"],
        capture_output=True, text=True,
    )
    assert check.returncode == 0, check.stderr
    rule = next(d for _, d in manifests() if d["kind"] == "PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_promtool_accepts_the_rules():
    result = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_pass():
    tests = sorted(RULE_TESTS.glob("*.yml"))
    assert tests
    result = subprocess.run(["promtool", "test", "rules", *tests], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # Every alert is exercised, firing at least once.
    alerts = set(re.findall(r"^\s+- alert: (\w+)", RULES.read_text(), re.M))
    text = "\n".join(t.read_text() for t in tests)
    for alert in alerts:
        assert re.search(rf"alertname: {alert}\n\s+exp_alerts:\n\s+- exp_labels", text), alert


@pytest.mark.parametrize(
    "change",
    [
        ("> 0.01", "> 0.05"),  # pong-miss threshold
        ("0.5 * sum", "0.2 * sum"),  # halving
        ("for: 30s", "for: 5m"),  # verdict alerts
        ("> 30\n", "> 600\n"),  # staleness
        ('absent(up{job="observer"})', "absent(up)"),
    ],
)
def test_promtool_unit_tests_catch_a_changed_rule(tmp_path, change):
    """The unit tests are tight enough to fail when a threshold or duration moves."""
    text = RULES.read_text()
    assert change[0] in text
    (tmp_path / "observer-rules.yml").write_text(text.replace(change[0], change[1]))
    (tmp_path / "tests").mkdir()
    for test in RULE_TESTS.glob("*.yml"):
        shutil.copy(test, tmp_path / "tests" / test.name)
    result = subprocess.run(
        ["promtool", "test", "rules", *sorted((tmp_path / "tests").glob("*.yml"))],
        capture_output=True, text=True,
    )
    assert result.returncode != 0, result.stdout


def test_daemonset_has_least_privilege():
    pod = daemonset()["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"}
    assert pod["hostPID"] is True and not pod.get("hostNetwork")
    assert pod["automountServiceAccountToken"] is False

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]}
    assert set(host_paths.values()) == {
        "/sys/fs/cgroup", "/sys/kernel/btf", "/var/log/pods", "/run/observer",
    }
    assert set(mounts) == set(host_paths)
    # Everything read-only but the agent's own state directory.
    writable = {name for name, m in mounts.items() if not m.get("readOnly")}
    assert writable == {"state"} and host_paths["state"] == "/run/observer"

    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["OBSERVER_POD_LABELS"] == "true"
    assert env["OBSERVER_CGROUP"] == mounts["cgroup"]["mountPath"]
    assert env["OBSERVER_POD_LOG_DIR"] == mounts["pod-logs"]["mountPath"]
    state_file = env.get("OBSERVER_STATE_FILE", "/run/observer/state.json")
    assert state_file.startswith(mounts["state"]["mountPath"] + "/")
    assert env["OBSERVER_METRICS_ADDR"].endswith(":9464")
    assert container["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_every_privilege_is_explained():
    lines = (K8S / "daemonset.yaml").read_text().splitlines()
    comment_before = lambda wanted: lines[[l.strip() for l in lines].index(wanted) - 1].strip()
    for line in ("- BPF", "- PERFMON", "- NET_ADMIN", "- SYS_ADMIN", "- SYS_PTRACE", "hostPID: true",
                 "hostNetwork: false"):
        assert comment_before(line).startswith("#"), line
    for left_out in ("SYS_RESOURCE",):
        assert any(l.strip().startswith(f"# - {left_out}:") for l in lines), left_out


def test_pod_monitor_scrapes_the_agents_as_job_observer():
    monitor = next(d for _, d in manifests() if d["kind"] == "PodMonitor")
    pod_labels = daemonset()["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["jobLabel"] in pod_labels
    assert pod_labels[monitor["spec"]["jobLabel"]] == "observer"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"


def dashboard_exprs():
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_has_a_row_per_port_a_panel_per_metric_and_health():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["port"]["type"] == "query" and variables["port"]["multi"]
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert [r for r in rows if r.get("repeat") == "port"], "no row repeated by port"
    assert any("observer" in r["title"] for r in rows), "no observer self-health row"
    health = [p for p in dashboard["panels"] if p["title"] == "Service health"]
    assert len(health) == 1 and health[0]["type"] == "stat"

    # Inside the repeated row, one panel per seed metric, each filtered on the row's port.
    start = dashboard["panels"].index(next(r for r in rows if r.get("repeat") == "port"))
    row_panels = []
    for panel in dashboard["panels"][start + 1:]:
        if panel["type"] == "row":
            break
        row_panels.append(panel)
    for metric in (
        "websocket_connections_active", "websocket_connections_by_state",
        "websocket_connections_total", "websocket_buffered_amount_bytes",
        "websocket_receive_queue_bytes", "websocket_pong_missed_total", "websocket_messages_total",
        "websocket_handshake_duration_seconds_bucket", "websocket_pong_latency_seconds_bucket",
        "websocket_message_size_bytes_bucket", "websocket_close_total",
    ):
        panels = [p for p in row_panels if any(metric in t["expr"] for t in p["targets"])]
        assert panels, metric
        assert all('port="$port"' in t["expr"] for p in panels for t in p["targets"]), metric
    # The health stat combines every seed signal.
    health_expr = health[0]["targets"][0]["expr"]
    for metric in ("pong_missed", "handshake_duration", "connections_active", "buffered_amount",
                   "connections_by_state"):
        assert metric in health_expr, metric
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
