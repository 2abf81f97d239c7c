"""The Helm chart and the plain manifests rendered from it: lint, templates, and what the real
API server says of them (server-side dry runs, client-side and server-side apply)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import ROOT
from tests.e2e.conftest import Kubectl

pytestmark = pytest.mark.e2e

CHART = ROOT / "helm" / "agentainer"
KUBE_VERSION = "1.34.4"


def template(helm: str, *values: str) -> list[dict[str, Any]]:
    result = subprocess.run([helm, "template", "agentainer", str(CHART), "--namespace",
                             "agentainer-system", "--kube-version", KUBE_VERSION, *values],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(documents: list[dict[str, Any]], kind: str, name: str = "") -> dict[str, Any]:
    return next(d for d in documents
                if d["kind"] == kind and (not name or d["metadata"]["name"] == name))


def test_chart_lints_clean(helm: str) -> None:
    result = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def test_controller_is_hardened_and_probed(helm: str) -> None:
    deployment = find(template(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENTAINER_REDIS_URL"] == "redis://agentainer-redis:6379/0"
    assert env["AGENTAINER_DEFAULT_BACKEND"] == "kubernetes"
    assert pod["serviceAccountName"] == "agentainer"


def test_several_replicas_elect_one_through_kopf_peering(helm: str) -> None:
    documents = template(helm, "--set", "replicaCount=2")
    container = find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--peering=agentainer" in container["args"]
    assert find(documents, "ClusterKopfPeering", "agentainer")
    rules = find(documents, "ClusterRole")["rules"]
    assert any("kopf.dev" in rule["apiGroups"] for rule in rules)


def test_external_redis_takes_its_password_from_a_secret(helm: str) -> None:
    documents = template(helm, "--set", "redis.enabled=false",
                         "--set", "externalRedis.url=redis://cache.example:6379/2",
                         "--set", "externalRedis.existingSecret=redis-auth")
    container = find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-auth"
    assert env["AGENTAINER_REDIS_URL"]["value"] == "redis://:$(REDIS_PASSWORD)@cache.example:6379/2"
    assert not [d for d in documents if d["kind"] == "StatefulSet"]


def test_service_monitor_is_optional(helm: str) -> None:
    assert not [d for d in template(helm) if d["kind"] == "ServiceMonitor"]
    monitor = find(template(helm, "--set", "metrics.serviceMonitor.enabled=true"),
                   "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("values", [
    ["--set", "replicaCount=0"],
    ["--set", "defaultBackend=podman"],
    ["--set", "image.pullPolicy=Sometimes"],
    ["--set", "unknownValue=1"],
])
def test_values_schema_refuses_bad_values(helm: str, values: list[str]) -> None:
    result = subprocess.run([helm, "template", "agentainer", str(CHART), "--kube-version",
                             KUBE_VERSION, *values], capture_output=True, text=True)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr


def test_plain_manifests_are_the_chart_rendered(helm: str, tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "render-manifests.sh"), str(tmp_path)], check=True,
                   env={"HELM": helm, "PATH": "/usr/bin:/bin"})
    for name in ("install.yaml", "rbac.yaml", "kustomization.yaml"):
        assert (tmp_path / name).read_text() == (ROOT / "manifests" / name).read_text(), (
            f"manifests/{name} is stale: run `make manifests`")


@pytest.mark.parametrize("mode", [[], ["--server-side"]], ids=["client-side", "server-side"])
def test_plain_manifests_pass_the_api_servers_dry_run(kubectl: Kubectl, mode: list[str]) -> None:
    kubectl("create", "namespace", "agentainer-system", check=False)
    result = kubectl("apply", "--dry-run=server", *mode, "-f",
                     str(ROOT / "manifests" / "install.yaml"), check=False)
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/agentainer" in result.stdout
