"""What the store keeps, as types, and the one place that writes and reads their format.

Records are JSON with camelCase fields (the same names as the resource's status), so that
``redis-cli`` shows what ``kubectl get -o yaml`` would. What is read back is checked: a record
that is not ours raises StoreDataError naming what it is, never a traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from controller.errors import StoreDataError
from controller.models import AgentStatus, StepStatus, WorkflowPhase, WorkflowSpec

LOG_LIMIT_BYTES = 64 * 1024
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class WorkflowRecord:
    """A workflow as a whole: the hash ``agentainer:workflow:UID``, with the spec its run
    started with (a run goes on with that spec after a restart, whatever the resource says
    now) and that spec's generation."""

    name: str
    namespace: str
    phase: WorkflowPhase
    progress: str
    started_at: str | None = None
    finished_at: str | None = None
    message: str | None = None
    spec: WorkflowSpec | None = None
    generation: int | None = None

    def fields(self) -> dict[str, str]:
        fields = {"name": self.name, "namespace": self.namespace, "phase": self.phase.value,
                  "progress": self.progress, "startedAt": self.started_at or "",
                  "finishedAt": self.finished_at or "", "message": self.message or ""}
        if self.spec is not None:
            fields["spec"] = self.spec.model_dump_json(by_alias=True, exclude_none=True)
        if self.generation is not None:
            fields["generation"] = str(self.generation)
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> WorkflowRecord | None:
        if not fields:
            return None
        try:
            phase = WorkflowPhase(fields.get("phase") or WorkflowPhase.PENDING)
        except ValueError:
            raise StoreDataError(f"a workflow record has phase {fields.get('phase')!r}") from None
        generation = fields.get("generation", "")
        return cls(name=fields.get("name", ""), namespace=fields.get("namespace", ""),
                   phase=phase, progress=fields.get("progress", ""),
                   started_at=fields.get("startedAt") or None,
                   finished_at=fields.get("finishedAt") or None,
                   message=fields.get("message") or None,
                   spec=_validated(WorkflowSpec, fields["spec"], "a workflow's spec")
                   if fields.get("spec") else None,
                   generation=int(generation) if generation.isdigit() else None)


@dataclass(frozen=True)
class AgentRecord:
    """One agent of a workflow: its status, and the container or pod it ran in."""

    status: AgentStatus
    workflow: str
    workflow_uid: str
    container: str = ""

    @property
    def step(self) -> str:
        return self.status.id.split(".")[0]


@dataclass(frozen=True)
class PoolAgent:
    """One agent of a pool; a placeholder (``pending_since``) while it is being started."""

    name: str
    id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    pending_since: float | None = None


@dataclass(frozen=True)
class Output:
    """The full output of one agent of a step."""

    step: str
    index: int
    text: str


@dataclass
class Change:
    """One atomic change: every part that is set is written together, or none is."""

    workflow: WorkflowRecord | None = None
    step: StepStatus | None = None
    agent: AgentRecord | None = None
    output: Output | None = None
    log: tuple[str, str] | None = None
    """An agent's id and its stderr (the last ``LOG_LIMIT_BYTES`` are kept)."""
    started_at: float | None = None
    """Puts the workflow in the index, at this start time (seconds since the epoch)."""
    forget_outputs: str | None = None
    """A step whose outputs are dropped (before ``output`` is written): it runs again."""
    expire_seconds: int | None = None
    """The workflow finished: all its keys expire this many seconds from now (with the rest
    of the change)."""
    steps: frozenset[str] | None = None
    """With ``expire_seconds``: every step the workflow has records of, when the writer knows
    them all (None: the store lists them)."""


def encode_step(step: StepStatus) -> str:
    """A step's state without its agents and outputs, which are kept apart."""
    return json.dumps(step.model_dump(mode="json", by_alias=True, exclude_none=True,
                                      exclude={"agents", "outputs", "output"}))


def decode_step(text: str) -> StepStatus:
    return _validated(StepStatus, text, "a step record")


def encode_agent(record: AgentRecord) -> str:
    fields = record.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    fields.update(workflow=record.workflow, workflowUid=record.workflow_uid, step=record.step,
                  container=record.container)
    return json.dumps(fields)


def decode_agent(text: str) -> AgentRecord:
    fields = _json(text, "an agent record")
    return AgentRecord(status=_validated(AgentStatus, fields, "an agent record"),
                       workflow=str(fields.get("workflow", "")),
                       workflow_uid=str(fields.get("workflowUid", "")),
                       container=str(fields.get("container", "")))


def encode_pool_agent(agent: PoolAgent) -> str:
    if agent.pending_since is not None:
        return json.dumps({"pending": agent.pending_since})
    return json.dumps({"id": agent.id, "name": agent.name, "labels": agent.labels})


def decode_pool_agent(name: str, text: str) -> PoolAgent:
    fields = _json(text, f"pool agent {name}")
    if "pending" in fields:
        return PoolAgent(name=name, pending_since=float(fields["pending"]))
    labels = fields.get("labels")
    return PoolAgent(name=name, id=str(fields.get("id", "")),
                     labels={str(k): str(v) for k, v in labels.items()}
                     if isinstance(labels, dict) else {})


def tail(text: str, limit: int = LOG_LIMIT_BYTES) -> str:
    """The last ``limit`` bytes of ``text``, cut at a character."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= limit:
        return text
    return data[-limit:].decode("utf-8", errors="ignore")


def _json(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise StoreDataError(f"{what} in the store is not JSON: {text[:80]!r}") from None
    if not isinstance(value, dict):
        raise StoreDataError(f"{what} in the store is not an object: {text[:80]!r}")
    return value


def _validated(model: type[M], value: str | dict[str, Any], what: str) -> M:
    fields = _json(value, what) if isinstance(value, str) else value
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise StoreDataError(f"{what} in the store is not one of ours: {error}") from None
