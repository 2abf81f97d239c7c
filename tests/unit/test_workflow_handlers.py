"""The Workflow handlers kopf tells of no change (it keeps no copy of a Workflow's spec): what
they make of an event from the resource, its run, its status and the store; and the diff base
that kopf keeps for AgentPools alone."""

from __future__ import annotations

import asyncio
import copy
import logging
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from controller.handlers import workflow
from controller.handlers.lifecycle import PoolsOnlyDiffBase
from controller.models import RETRY_ANNOTATION, WorkflowPhase, parse_workflow
from controller.errors import StoreUnavailableError
from controller.store.records import WorkflowRecord
from tests.conftest import sh, workflow_doc

UID = "wf-uid"


class Store:
    """The store as far as these handlers read it: the record of one workflow, if kept."""

    def __init__(self, record: WorkflowRecord | None) -> None:
        self.record = record

    async def workflow(self, uid: str) -> WorkflowRecord | None:
        return self.record if uid == UID else None


class Services:
    def __init__(self, record: WorkflowRecord | None) -> None:
        self.store = Store(record)
        self.runs: dict[str, Any] = {}
        self.heeded: dict[str, int | None] = {}
        self.patched: list[dict[str, Any]] = []

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any]) -> None:
        self.patched.append(status)


@pytest.fixture
def warned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(kopf, "warn", lambda body, *, reason, message: events.append(
        (reason, message)))
    return events


def ran() -> dict[str, Any]:
    """The Workflow as its run started: generation 1, finished since."""
    document = workflow_doc({"name": "once", "command": sh("echo first")})
    document["metadata"].update(uid=UID, namespace="team", generation=1)
    return document


def record(document: dict[str, Any]) -> WorkflowRecord:
    return WorkflowRecord(name="wf", namespace="team", phase=WorkflowPhase.SUCCEEDED,
                          progress="1/1", spec=parse_workflow(document).spec, generation=1)


def edited(change: dict[str, Any], generation: int = 2, **status: Any) -> kopf.Body:
    document = copy.deepcopy(ran())
    document["spec"].update(change)
    document["metadata"]["generation"] = generation
    document["status"] = {"phase": "Succeeded", "observedGeneration": 1, **status}
    return kopf.Body(document)


def unheeded(body: kopf.Body, services: Services) -> bool:
    return workflow._unheeded(body=body, status=body.status, memo=SimpleNamespace(
        services=services), type="MODIFIED")


def handled(body: kopf.Body, services: Services) -> None:
    asyncio.run(workflow.spec_changed(body=body, memo=SimpleNamespace(services=services),
                                      logger=logging.getLogger("test")))


def test_a_finished_workflows_change_of_its_controls_alone_is_observed(
        warned: list[tuple[str, str]]) -> None:
    services = Services(record(ran()))
    body = edited({"ttlSecondsAfterFinished": 60, "suspend": True})

    assert unheeded(body, services)
    handled(body, services)

    assert services.patched == [{"observedGeneration": 2}]
    assert warned == []
    assert not unheeded(body, services)  # each generation once
    deleting = copy.deepcopy(dict(edited({}, generation=3)))
    deleting["metadata"]["deletionTimestamp"] = "2026-11-27T08:03:11Z"  # a generation too
    assert not unheeded(kopf.Body(deleting), services)


def test_a_finished_workflows_spec_change_is_said_once_in_an_event_and_a_condition(
        warned: list[tuple[str, str]]) -> None:
    services = Services(record(ran()))
    body = edited({"steps": [{"name": "once", "image": "other:1", "command": sh("echo new")}]})

    handled(body, services)

    assert [reason for reason, _ in warned] == ["SpecChangeIgnored"]
    [patch] = services.patched
    [condition] = patch["conditions"]
    assert condition["type"] == "SpecChangeIgnored"
    assert condition["message"].startswith("spec changed to generation 2 after generation 1")
    # Another process (a restarted controller) sees the condition: nothing to do again.
    recorded = edited({"description": "x"}, conditions=patch["conditions"])
    assert not unheeded(recorded, Services(record(ran())))
    # A later edit is a new generation: said again.
    assert unheeded(edited({"description": "y"}, generation=3,
                           conditions=patch["conditions"]), Services(record(ran())))


def test_a_change_after_the_store_let_the_run_go_is_left_unsaid(
        warned: list[tuple[str, str]]) -> None:
    """The spec the run ran is no longer kept (its state's time to live passed): whether the
    change was of its controls alone cannot be told, so nothing is said."""
    services = Services(None)
    body = edited({"description": "changed"})

    handled(body, services)

    assert services.patched == [] and warned == []
    assert not unheeded(body, services)


def test_a_running_workflow_is_steered_by_each_new_generation_and_warned_of_a_change(
        warned: list[tuple[str, str]]) -> None:
    services = Services(record(ran()))
    steered: list[tuple[bool, Any]] = []
    services.runs[UID] = SimpleNamespace(
        uid=UID, workflow=parse_workflow(ran()),
        status=SimpleNamespace(observed_generation=1),
        steer=lambda suspend, shutdown: steered.append((suspend, shutdown)))
    services.heeded[UID] = 1  # as its daemon steered it at its start
    suspended = edited({"suspend": True}, phase="Running")
    changed = edited({"suspend": True, "description": "new"}, generation=3, phase="Running")

    assert not unheeded(kopf.Body(ran()), services)
    for body in (suspended, changed):
        assert unheeded(body, services)
        handled(body, services)
        assert not unheeded(body, services)

    assert steered == [(True, None), (True, None)]
    assert [reason for reason, _ in warned] == ["SpecChangeIgnored"]  # the second alone
    assert services.patched == []  # its status writer writes the condition


def test_a_retry_is_asked_for_by_a_value_of_the_annotation_not_yet_acted_on() -> None:
    def asked(value: str | None, retried: str | None) -> bool:
        document = ran()
        if value is not None:
            document["metadata"]["annotations"] = {RETRY_ANNOTATION: value}
        document["status"] = {"phase": "Failed", **({"retried": retried} if retried else {})}
        body = kopf.Body(document)
        return workflow._retry_asked(body=body, status=body.status)

    assert asked("r1", None) and asked("r2", "r1")
    assert not asked("r1", "r1") and not asked(None, None) and not asked("", None)


def test_kopf_keeps_a_copy_of_the_spec_of_agent_pools_but_not_of_workflows() -> None:
    storage = PoolsOnlyDiffBase(prefix="agentainer.dev", key="last-handled-configuration")
    pool = kopf.Body({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                      "metadata": {"name": "warm"}, "spec": {"image": "agent:1"}})
    flow = kopf.Body(ran())

    for body in (pool, flow):
        patch = kopf.Patch()
        storage.store(body=body, patch=patch, essence=storage.build(body=body))
        annotations = dict(patch.get("metadata", {}).get("annotations", {}))
        if body is pool:
            assert "agentainer.dev/last-handled-configuration" in annotations
        else:
            assert annotations == {}
            assert storage.fetch(body=body) is None and storage.build(body=body) == {}


def test_a_store_away_leaves_the_generation_to_the_next_event(
        caplog: pytest.LogCaptureFixture, warned: list[tuple[str, str]]) -> None:
    services = Services(record(ran()))

    async def away(uid: str) -> WorkflowRecord | None:
        raise StoreUnavailableError("Redis at 127.0.0.1:6379 failed while connecting")

    services.store.workflow = away  # type: ignore[method-assign]
    body = edited({"description": "changed"})
    asyncio.run(workflow.spec_changed(body=body, memo=SimpleNamespace(services=services),
                                      logger=logging.getLogger("test")))

    assert "generation 2 of the spec not compared with what ran: Redis" in caplog.text
    assert unheeded(body, services)  # tried again on its next event
