"""Secrets on the real cluster, through the controller: a Secret-backed env var reaches a fresh
pod (its kubelet reads it), a pooled pod's task and a Docker agent (the controller reads it,
with a get in that namespace), in a namespace that enforces the Pod Security Standard
restricted; then the value is looked for in the workflows' status, the namespace's Events,
every Redis key, the pods' specs and the controller's log, and is nowhere."""

from __future__ import annotations

import hashlib
import json
import subprocess

import pytest
import yaml

from tests.conftest import sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl
from tests.e2e.test_operator import finished

pytestmark = pytest.mark.e2e

NAMESPACE = "restricted-team"
SECRET = "sk-cluster-7e6d5c4b3a2918"
DIGEST = 'printf %s "$KEY" | sha256sum | cut -c1-16'


def redis_dump(url: str) -> str:
    from tests.integration.test_cli_run import redis_dump as dump

    return dump(url)


@pytest.mark.timeout(600)
def test_a_secret_reaches_pods_pooled_tasks_and_docker_agents_and_is_kept_nowhere(
        kubectl: Kubectl, controller: Controller, redis_url: str) -> None:
    kubectl("create", "namespace", NAMESPACE, check=False)
    kubectl("label", "--overwrite", "namespace", NAMESPACE,
            "pod-security.kubernetes.io/enforce=restricted")
    kubectl("create", "secret", "generic", "llm", "-n", NAMESPACE,
            f"--from-literal=api-key={SECRET}", check=False)
    env = [{"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "llm", "key": "api-key"}}}]
    pool = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": "warm", "namespace": NAMESPACE},
            "spec": {"image": "agentainer/busybox:latest", "backend": "kubernetes",
                     "minSize": 1, "maxSize": 1, "pod": {"runAsNonRoot": True}}}
    # An output that asks for $(KEY) is handed on as text: the kubelet, which expands it in a
    # pod's command, args and env, must not read the Secret into the next step's output.
    asking = {"name": "asking", "command": sh('D=$(printf "\\x24"); echo "${D}(KEY) ${D}${D}5"')}
    handed = {"name": "handed", "command": ["echo", "{{ steps.asking.output }}"], "env": env}
    on_pods = workflow_doc({"name": "fresh", "command": sh(DIGEST), "env": env},
                           {"name": "pooled", "pool": "warm", "command": sh(DIGEST),
                            "env": env}, asking, handed, name="secret-pods",
                           backend="kubernetes", cleanup="Never")
    on_docker = workflow_doc({"name": "docker", "command": sh(DIGEST), "env": env},
                             name="secret-docker", backend="docker", cleanup="Always")
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
            pool, *({**w, "metadata": {**w["metadata"], "namespace": NAMESPACE}}
                    for w in (on_pods, on_docker))]))
        bodies = [kubectl.wait_for("workflow", name, finished, timeout=240, namespace=NAMESPACE)
                  for name in ("secret-pods", "secret-docker")]
        expected = hashlib.sha256(SECRET.encode()).hexdigest()[:16]
        for body in bodies:
            assert body["status"]["phase"] == "Succeeded", body["status"]
            for step in body["status"]["steps"]:
                assert step["output"] == ("$(KEY) $$5" if step["name"] in ("asking", "handed")
                                          else expected), step
        pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "json").stdout
        fresh = [p for p in json.loads(pods)["items"]
                 if p["metadata"]["labels"].get("agentainer.dev/step") == "fresh"]
        (container,) = fresh[0]["spec"]["containers"]
        assert container["securityContext"]["runAsNonRoot"] is True  # restricted by default

        places = {
            "status": json.dumps([body["status"] for body in bodies]),
            "events": kubectl("get", "events", "-n", NAMESPACE, "-o", "json").stdout,
            "redis": redis_dump(redis_url),
            "pod specs": pods,
            "workflows": kubectl("get", "workflows", "-n", NAMESPACE, "-o", "yaml").stdout,
            "controller log": controller.log.read_text(),
        }
        print("\nlooked for the secret in: " + ", ".join(
            f"{where} ({len(text)} characters)" for where, text in places.items()))
        assert [where for where, text in places.items() if SECRET in text] == []
    finally:
        subprocess.run(["kubectl", "--kubeconfig", kubectl.kubeconfig, "delete", "namespace",
                        NAMESPACE, "--wait=true", "--timeout=120s"], capture_output=True)
