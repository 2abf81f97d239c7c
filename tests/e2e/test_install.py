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
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["memory"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENTAINER_REDIS_URL"] == "redis://agentainer-redis:6379/0"
    assert env["AGENTAINER_DEFAULT_BACKEND"] == "kubernetes"
    assert pod["serviceAccountName"] == "agentainer"


def test_one_replica_is_replaced_not_rolled_and_elects_itself_on_a_lease(helm: str) -> None:
    documents = template(helm)
    deployment = find(documents, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert "--leader-election=agentainer" in container["args"]
    lease_rules = find(documents, "Role", "agentainer-leader-election")["rules"]
    assert {"get", "update"} <= set(lease_rules[1]["verbs"])
    assert lease_rules[1]["resourceNames"] == ["agentainer"]
    assert "strategy" not in find(template(helm, "--set", "replicaCount=2"),
                                  "Deployment")["spec"]


def test_watching_namespaces_grants_rights_in_those_namespaces_only(helm: str) -> None:
    documents = template(helm, "--set", "watchNamespaces={team-a,team-b}")
    cluster_rules = find(documents, "ClusterRole")["rules"]
    assert not any("pods" in rule["resources"] for rule in cluster_rules), cluster_rules
    roles = {d["metadata"]["namespace"]: d for d in documents
             if d["kind"] == "Role" and d["metadata"]["name"] == "agentainer"}
    assert set(roles) == {"team-a", "team-b"}
    assert any("pods/attach" in rule["resources"] for rule in roles["team-a"]["rules"])
    secrets = next(r for r in roles["team-a"]["rules"] if "secrets" in r["resources"])
    assert secrets["verbs"] == ["get"]  # read one by name, never list them all
    bindings = {d["metadata"]["namespace"] for d in documents if d["kind"] == "RoleBinding"
                and d["roleRef"]["name"] == "agentainer"}
    assert bindings == {"team-a", "team-b"}
    everywhere = find(template(helm), "ClusterRole")["rules"]
    assert any("pods/attach" in rule["resources"] for rule in everywhere)
    assert not any("pods/exec" in rule["resources"] for rule in everywhere + cluster_rules)


def test_bundled_redis_wants_a_password_and_only_the_controller_may_reach_it(helm: str) -> None:
    documents = template(helm)
    secret = find(documents, "Secret", "agentainer-redis")
    assert len(secret["data"]["password"]) >= 40  # 32 characters, base64
    redis = find(documents, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "requirepass $REDIS_PASSWORD" in redis["command"][-1]
    assert "protected-mode" not in " ".join(redis["command"])
    assert "--maxmemory-policy noeviction" in redis["command"][-1]
    container = find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AGENTAINER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "agentainer-redis", "key": "password"}
    policy = find(documents, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    (allowed,) = policy["ingress"]
    assert allowed["from"][0]["podSelector"]["matchLabels"][
        "app.kubernetes.io/component"] == "controller"
    mine = template(helm, "--set", "redis.auth.existingSecret=mine")
    assert not [d for d in mine if d["kind"] == "Secret"]


@pytest.mark.parametrize("url", ["redis://cache.example:6379/2", "rediss://cache.example:6380/0"])
def test_external_redis_takes_its_password_from_a_secret(helm: str, url: str) -> None:
    documents = template(helm, "--set", "redis.enabled=false", "--set", f"externalRedis.url={url}",
                         "--set", "externalRedis.existingSecret=redis-auth")
    container = find(documents, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["AGENTAINER_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-auth"
    assert env["AGENTAINER_REDIS_URL"]["value"] == url  # the password goes apart, unescaped
    assert not [d for d in documents if d["kind"] in ("StatefulSet", "NetworkPolicy", "Secret")]


def test_usual_values_are_taken_and_helm_template_needs_no_kube_version(helm: str) -> None:
    result = subprocess.run(
        [helm, "template", "agentainer", str(CHART), "--set", "fullnameOverride=agents",
         "--set", "imagePullSecrets[0].name=regcred", "--set", "serviceAccount.create=false",
         "--set", "serviceAccount.name=existing"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    documents = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    pod = find(documents, "Deployment", "agents")["spec"]["template"]["spec"]
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "existing"
    assert not [d for d in documents if d["kind"] == "ServiceAccount"]


def test_a_status_interval_of_a_fraction_of_a_second_reaches_the_controller_as_given(
        helm: str, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text("settings:\n  statusIntervalSeconds: 0.5\n")
    container = find(template(helm, "-f", str(values)),
                     "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AGENTAINER_STATUS_INTERVAL_SECONDS"] == "0.5"  # not cut to 0


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
