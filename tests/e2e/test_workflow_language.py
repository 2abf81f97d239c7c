"""The workflow language through the operator, on pods and on Docker: parameters, a fan-out
over what a planner printed, conditions, finally steps; what the API server's schema can
check it refuses, and `kubectl explain` documents the new fields."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.store import Keys
from tests.conftest import ROOT, sh, workflow_doc
from tests.e2e.conftest import Controller, Kubectl
from tests.e2e.test_operator import finished

pytestmark = pytest.mark.e2e


def example(backend: str, name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(
        (ROOT / "examples" / "planner-workers-reviewer.yaml").read_text())
    document["metadata"]["name"] = name
    document["spec"]["backend"] = backend
    document["spec"]["params"][0]["value"] = "x, y, z, w"
    return document


def node_claim(kubectl: Kubectl, name: str, folder: Path) -> None:
    """A claim bound to a folder of the node: the local cluster has no provisioner."""
    folder.mkdir()
    folder.chmod(0o1777)  # a hostPath volume takes no fsGroup
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                  "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                  "claimRef": {"namespace": "default", "name": name},
                  "hostPath": {"path": str(folder), "type": "Directory"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                  "resources": {"requests": {"storage": "1Gi"}}}}]))


def remove_claim(kubectl: Kubectl, name: str) -> None:
    kubectl("delete", "pvc", name, "--wait=false", check=False)
    kubectl("delete", "pv", name, "--wait=false", check=False)


@pytest.mark.parametrize("backend", ["kubernetes", "docker"])
def test_planner_workers_reviewer_runs_through_the_operator(
        kubectl: Kubectl, controller: Controller, backend: str, tmp_path: Path) -> None:
    name = f"pwr-{backend[:4]}-{uuid.uuid4().hex[:4]}"
    document = example(backend, name)
    if backend == "kubernetes":
        node_claim(kubectl, name, tmp_path / "workspace")
        document["spec"]["workspace"] = {"claimName": name}
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
        status = kubectl.wait_for("workflow", name, finished, timeout=240)["status"]
    finally:
        if backend == "kubernetes":
            kubectl("delete", "workflow", name, "--wait=true", "--timeout=60s", check=False)
            remove_claim(kubectl, name)

    assert status["phase"] == "Succeeded", status
    steps = {step["name"]: step for step in status["steps"]}
    assert json.loads(steps["plan"]["output"]) == ["x", "y", "z", "w"]
    assert json.loads(steps["work"]["output"]) == ["done: x", "done: y", "done: z", "done: w"]
    assert steps["fix"]["phase"] == "Skipped"
    assert "when[0]" in steps["fix"]["message"]
    assert steps["publish"]["output"] == "published 4 parts"
    assert steps["report"]["output"] == "workflow Succeeded; failed steps: []"
    assert status["progress"] == "8/8"
    kubectl("delete", "workflow", name, "--wait=true", "--timeout=60s", check=False)


def test_a_workflow_missing_a_required_param_is_invalid(kubectl: Kubectl,
                                                        controller: Controller) -> None:
    document = example("docker", f"noparam-{uuid.uuid4().hex[:4]}")
    document["spec"]["params"] = [{"name": "job", "description": "no default"}]
    kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    status = kubectl.wait_for("workflow", document["metadata"]["name"], finished)["status"]

    assert status["phase"] == "Failed"
    conditions = {c["type"]: c for c in status["conditions"]}
    assert sorted(conditions) == ["Completed", "Invalid", "Succeeded"]
    assert "spec.params[0].value: parameter 'job' is required" in \
        conditions["Invalid"]["message"]


@pytest.mark.parametrize(("step", "named"), [
    ({"parallel": {"replicas": 2, "itemsFrom": "{{ steps.a.output }}"}}, "parallel"),
    ({"when": [{"input": "x", "operator": "equals", "values": ["x"]}]}, "operator"),
    ({"when": [{"input": "x", "operator": "in", "values": []}]}, "values"),
], ids=["items-from-and-replicas", "operator", "no-values"])
def test_the_api_server_refuses_what_the_schema_can_tell(kubectl: Kubectl, step: dict[str, Any],
                                                          named: str) -> None:
    document = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "Workflow",
                "metadata": {"name": f"bad-{uuid.uuid4().hex[:6]}"},
                "spec": {"steps": [{"name": "a", "image": "agentainer/busybox:latest"},
                                   {"name": "b", "image": "agentainer/busybox:latest", **step}]}}
    result = kubectl("apply", "-f", "-", input=yaml.safe_dump(document), check=False)
    assert result.returncode != 0 and named in result.stderr, result.stderr


def test_kubectl_explain_documents_the_new_fields(kubectl: Kubectl) -> None:
    for field, words in [("workflow.spec.finally", "whatever the outcome"),
                         ("workflow.spec.params", "Inputs of the workflow"),
                         ("workflow.spec.steps.when", "Conditions"),
                         ("workflow.spec.steps.parallel.itemsFrom", "JSON array")]:
        assert words in kubectl("explain", field).stdout, field


def test_pods_share_a_workspace_claim(kubectl: Kubectl, controller: Controller,
                                      tmp_path: Path) -> None:
    """The user's claim (bound here to a folder of the node: the local cluster has no
    provisioner) mounted at /workspace in every pod of the workflow, writable by their user."""
    name = f"ws-{uuid.uuid4().hex[:6]}"
    node_claim(kubectl, name, tmp_path / "workspace")
    workflow = workflow_doc(
        {"name": "plan", "command": sh("echo plan > /workspace/notes")},
        {"name": "work", "parallel": {"replicas": 2},
         "command": sh('echo "work $AGENTAINER_ITEM_INDEX" > /workspace/part-$AGENTAINER_ITEM_INDEX')},
        {"name": "review", "command": sh("cat /workspace/notes /workspace/part-*")},
        name=name, backend="kubernetes", workspace={"claimName": name})
    try:
        kubectl("apply", "-f", "-", input=yaml.safe_dump(workflow))
        status = kubectl.wait_for("workflow", name, finished, timeout=180)["status"]
        assert status["phase"] == "Succeeded", status
        assert status["steps"][-1]["output"] == "plan\nwork 0\nwork 1"
        kubectl("delete", "workflow", name, "--wait=true", "--timeout=60s")
        assert kubectl.get("pvc", name)["status"]["phase"] == "Bound"  # the user's: kept
    finally:
        remove_claim(kubectl, name)


def test_a_workspace_claim_made_for_a_workflow_is_owned_by_it_and_goes_with_it(
        kubectl: Kubectl, controller: Controller) -> None:
    name = f"wsown-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(workflow_doc(
        {"name": "only", "command": sh("true")}, name=name, backend="kubernetes",
        workspace={"size": "16Mi", "storageClassName": "none-here"})))
    uid = kubectl.get("workflow", name)["metadata"]["uid"]
    claim_name = f"{name}-workspace-{uid[:8]}"
    deadline = time.monotonic() + 60
    while kubectl("get", "pvc", claim_name, check=False).returncode != 0:
        assert time.monotonic() < deadline, "the workspace claim was not made"
        time.sleep(0.5)
    claim = kubectl.get("pvc", claim_name)
    assert claim["metadata"]["ownerReferences"][0]["uid"] == uid
    assert claim["spec"]["resources"]["requests"]["storage"] == "16Mi"
    kubectl("delete", "workflow", name, "--wait=true", "--timeout=60s")
    deadline = time.monotonic() + 60
    while kubectl("get", "pvc", claim_name, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the workspace claim outlived its workflow"
        time.sleep(0.5)


def test_a_step_allowed_to_fail_lets_the_workflow_succeed(kubectl: Kubectl,
                                                          controller: Controller) -> None:
    document = yaml.safe_load((ROOT / "examples" / "continue-on.yaml").read_text())
    name = document["metadata"]["name"] = f"lint-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(document))
    # The outcome is a condition from the start, as Tekton's: kubectl can wait for it.
    waited = kubectl("wait", "--for=condition=Succeeded", "--timeout=120s",
                     f"workflows.agentainer.dev/{name}", check=False)
    assert waited.returncode == 0, waited.stderr
    status = kubectl.get("workflow", name)["status"]
    assert [c["type"] for c in status["conditions"]] == ["Completed", "Succeeded"]
    assert status["phase"] == "Succeeded", status
    assert [step["phase"] for step in status["steps"]] == ["Failed", "Succeeded", "Succeeded"]
    assert status["steps"][-1]["output"] == "lint Failed, fix Succeeded"
    kubectl("delete", "workflow", name, "--wait=true", "--timeout=60s")


def test_a_finished_workflow_goes_with_all_it_left_after_its_time_to_live(
        kubectl: Kubectl, controller: Controller, redis_url: str) -> None:
    import subprocess

    name = f"ttl-{uuid.uuid4().hex[:6]}"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(workflow_doc(
        {"name": "only", "command": sh("echo kept")}, name=name, cleanup="Never",
        ttlSecondsAfterFinished=3)))
    body = kubectl.wait_for("workflow", name, finished, timeout=120)
    uid = body["metadata"]["uid"]
    deadline = time.monotonic() + 60
    while kubectl("get", "workflow", name, check=False).returncode == 0:
        assert time.monotonic() < deadline, "the workflow outlived its time to live"
        time.sleep(0.5)
    left = subprocess.run(["docker", "ps", "-aq", "--filter",
                           f"label=agentainer.dev/workflow-uid={uid}"],
                          capture_output=True, text=True, check=True).stdout.split()
    assert left == [], "its kept agent outlived it"
    keys = subprocess.run(["redis-cli", "-u", redis_url, "--scan", "--pattern",
                           Keys.workflow(uid) + "*"], capture_output=True, text=True,
                          check=True).stdout.split()
    assert keys == [], keys
