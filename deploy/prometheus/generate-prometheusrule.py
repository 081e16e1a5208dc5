#!/usr/bin/env python3
"""Writes deploy/kubernetes/prometheusrule.yaml from deploy/prometheus/observer-rules.yml.

The rule file is embedded as the manifest's `spec`, line for line, so both always hold the same
groups. `--check` exits 1 instead of writing when the manifest is out of date.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "observer-rules.yml"
MANIFEST = HERE.parent / "kubernetes" / "prometheusrule.yaml"

HEADER = """\
# Generated from deploy/prometheus/observer-rules.yml by
# deploy/prometheus/generate-prometheusrule.py: edit the rule file, then run the script.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: observer
  namespace: observer
  labels:
    app.kubernetes.io/name: observer
spec:
"""


def render():
    body = []
    for line in RULES.read_text().splitlines():
        if line.startswith("#") and not body:
            continue  # the rule file's own header
        body.append(f"  {line}" if line.strip() else "")
    return HEADER + "\n".join(body).strip("\n") + "\n"


def main():
    text = render()
    if "--check" in sys.argv[1:]:
        if MANIFEST.read_text() != text:
            sys.exit(f"{MANIFEST} is out of date: run {Path(__file__).name}")
        return
    MANIFEST.write_text(text)


if __name__ == "__main__":
    main()
