"""The Grafana dashboard queries only metrics the controller really exports."""

from __future__ import annotations

import json
import re

from controller.metrics import Metrics
from tests.conftest import ROOT

SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}


def exported_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        for suffix in SUFFIXES.get(family.type, [""]):
            names.add(family.name + suffix)
    return names


def queried_names() -> set[str]:
    dashboard = json.loads((ROOT / "dashboards" / "agentainer.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"]
                   for target in panel.get("targets", [])]
    assert expressions
    return {name for expr in expressions for name in re.findall(r"\bagentainer_[a-z_]+", expr)}


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    assert queried_names() <= exported_names(), queried_names() - exported_names()


def test_the_dashboard_covers_what_operators_watch() -> None:
    queried = queried_names()
    for needed in ("agentainer_workflows", "agentainer_step_duration_seconds_bucket",
                   "agentainer_agents_running", "agentainer_pool_agents",
                   "agentainer_pool_lease_wait_seconds_bucket",
                   "agentainer_reconcile_errors_total"):
        assert needed in queried
