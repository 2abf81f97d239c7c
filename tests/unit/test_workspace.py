"""A workflow's shared workspace: made before its first step, mounted at /workspace in every
agent (a Docker volume, a PersistentVolumeClaim owned by the workflow, or the user's claim),
removed as the cleanup policy says; pooled steps cannot use it. On the fake backend and the
pure builders; tests/integration and tests/e2e use real volumes and claims."""

from __future__ import annotations

from typing import Any

import pytest

from controller.agents import build_agent_spec, workspace_spec
from controller.backends.pods import build_claim, build_pod
from controller.errors import InvalidSpecError, NotFoundError
from controller.models import StepPhase, WorkflowPhase, parse_workflow
from tests.conftest import workflow_doc
from tests.unit.fake_backend import Behaviour, FakeBackend
from controller.store import MemoryStore
from tests.unit.test_engine import by_step, new_run, run, scenario, with_uid


def shared(cleanup: str = "Always", **workspace: Any) -> dict[str, Any]:
    return with_uid(workflow_doc({"name": "write"}, {"name": "read"}, cleanup=cleanup,
                                 workspace={"size": "2Gi", **workspace}))


@pytest.mark.parametrize(("cleanup", "fails", "kept"), [
    ("Always", False, False), ("OnSuccess", False, False), ("OnSuccess", True, True),
    ("Never", False, True)])
def test_the_workspace_is_made_first_and_removed_as_cleanup_says(cleanup: str, fails: bool,
                                                                  kept: bool) -> None:
    document = shared(cleanup)
    workflow = parse_workflow(document)
    name = workspace_spec(workflow, workflow.metadata.uid or "").name
    status, fake = run(document, by_step({"read": Behaviour(exit_code=1 if fails else 0)}))

    assert status.phase is (WorkflowPhase.FAILED if fails else WorkflowPhase.SUCCEEDED)
    assert {a.spec.workspace for a in fake.started} == {name}
    assert (name in fake.workspaces) == kept


def test_a_workspace_that_cannot_be_had_fails_the_run_before_any_step() -> None:
    fake = FakeBackend()
    fake.hiccups["prepare_workspace"] = [NotFoundError("claim team/data not found")]
    status = scenario(new_run(shared(claimName="data"), fake, MemoryStore()).execute())
    assert status.phase is WorkflowPhase.FAILED
    assert status.message == "the workspace cannot be used: claim team/data not found"
    assert all(step.phase is StepPhase.SKIPPED for step in status.steps)
    assert not fake.started


def test_pods_mount_the_claim_and_the_claim_is_owned_by_the_workflow() -> None:
    workflow = parse_workflow(shared(storageClassName="fast", accessMode="ReadWriteMany"))
    uid = workflow.metadata.uid or ""
    pod = build_pod(build_agent_spec(workflow, uid, workflow.spec.steps[0], 0, 1, {}))
    claim = build_claim(workspace_spec(workflow, uid))

    (volume,) = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert {"name": volume["name"], "mountPath": "/workspace"} in \
        pod["spec"]["containers"][0]["volumeMounts"]
    assert pod["spec"]["securityContext"] == {"fsGroup": 65532}
    assert claim["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "fast",
                             "resources": {"requests": {"storage": "2Gi"}}}
    assert claim["metadata"]["ownerReferences"][0]["uid"] == uid
    users = workspace_spec(parse_workflow(shared(claimName="data")), uid)
    assert users.name == "data" and users.existing


def test_pooled_steps_cannot_share_a_workspace() -> None:
    document = workflow_doc({"name": "a"}, {"name": "b", "pool": "warm", "command": ["x"]},
                            workspace={})
    with pytest.raises(InvalidSpecError) as raised:
        parse_workflow(document)
    assert [(p.path, p.message[:45]) for p in raised.value.problems] == [
        ("spec.steps[1].pool", "a workflow with a workspace cannot lease pool")]
