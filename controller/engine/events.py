"""What a run tells its observers (progress displays, Kubernetes Events, metrics) as it goes."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from controller.models import AgentStatus, StepStatus, WorkflowStatus

logger = logging.getLogger(__name__)


class EventKind(StrEnum):
    WORKFLOW_STARTED = "WorkflowStarted"
    STEP_STARTED = "StepStarted"
    AGENT_STARTED = "AgentStarted"
    AGENT_FINISHED = "AgentFinished"
    AGENT_WAITING = "AgentWaiting"
    """An agent that has not begun to run waits for something outside it (a pod no node has
    room for): its step's message says what, and is cleared once none of its agents waits."""
    AGENT_RETRYING = "AgentRetrying"
    STEP_FINISHED = "StepFinished"
    WORKFLOW_SUSPENDED = "WorkflowSuspended"
    WORKFLOW_RESUMED = "WorkflowResumed"
    WORKFLOW_STOPPING = "WorkflowStopping"
    """Asked to stop or terminate: its message says which."""
    WORKFLOW_FINISHED = "WorkflowFinished"
    OUTPUTS_CUT = "OutputsCut"
    """The workflow's outputs filled their limit: later ones are kept cut (said once a run)."""


@dataclass(frozen=True)
class Event:
    """Something that happened in a run, for progress displays and Kubernetes Events."""

    kind: EventKind
    message: str
    step: StepStatus | None = None
    agent: AgentStatus | None = None


Observer = Callable[[Event, WorkflowStatus], None]


class Emitter:
    """Hands a run's events, with its status as it is now, to the run's observer."""

    def __init__(self, workflow: str, status: WorkflowStatus,
                 observer: Observer | None = None) -> None:
        self.workflow = workflow
        self.status = status
        self.observer = observer

    def __call__(self, kind: EventKind, message: str, step: StepStatus | None = None,
                 agent: AgentStatus | None = None) -> None:
        logger.debug("%s: %s", self.workflow, message)
        if self.observer is not None:
            self.observer(Event(kind, message, step, agent), self.status)
