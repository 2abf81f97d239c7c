"""What a run writes to the store as it goes, and reads back to resume after a restart: the
mapping between a run's state and the store's records (whose format is the store's own)."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

from controller.models import (
    AgentStatus,
    StepPhase,
    StepStatus,
    Workflow,
    WorkflowPhase,
    WorkflowStatus,
)
from controller.store import AgentRecord, Change, Output, WorkflowRecord, WorkflowStore


@dataclass
class Restored:
    """What an earlier process recorded of a run."""

    workflow: WorkflowRecord
    steps: dict[str, StepStatus]
    agents: dict[str, list[AgentStatus]]
    """Each step's agents, in the order of their index and attempt."""
    outputs: dict[str, dict[int, str]]
    """Each step's outputs so far, by agent index."""


class Journal:
    """The store's view of one run: every write is one atomic change."""

    def __init__(self, store: WorkflowStore, workflow: Workflow, uid: str) -> None:
        self.store = store
        self.workflow = workflow
        self.uid = uid
        self._steps: set[str] | None = None
        """The steps with records, when all are known: those of a run the store had nothing
        of when it began, all written here (its end then need not ask the store for them)."""

    def _whole(self, status: WorkflowStatus, with_spec: bool = True) -> WorkflowRecord:
        """The workflow's record; ``with_spec`` False: without the spec, which a write of
        progress leaves as the run's beginning wrote it (a spec may hold 10,000 items, and a
        step as many agents, each writing its progress)."""
        return WorkflowRecord(
            name=self.workflow.metadata.name, namespace=self.workflow.metadata.namespace,
            phase=status.phase, progress=status.progress, started_at=status.started_at,
            finished_at=status.finished_at, message=status.message,
            spec=self.workflow.spec if with_spec else None,
            generation=status.observed_generation)

    def _agent(self, agent: AgentStatus, container: str) -> AgentRecord:
        return AgentRecord(status=agent, workflow=self.workflow.metadata.name,
                           workflow_uid=self.uid, container=container)

    async def began(self, status: WorkflowStatus) -> None:
        """The run began (or resumed): the workflow, in the index of workflows."""
        await self.store.record(self.uid, Change(workflow=self._whole(status),
                                                 started_at=time.time()))

    def _noted(self, step: StepStatus | None) -> StepStatus | None:
        if step is not None and self._steps is not None:
            self._steps.add(step.name)
        return step

    async def step(self, step: StepStatus) -> None:
        await self.store.record(self.uid, Change(step=self._noted(step)))

    async def agent(self, agent: AgentStatus, container: str = "",
                    step: StepStatus | None = None) -> None:
        await self.store.record(self.uid, Change(agent=self._agent(agent, container),
                                                 step=self._noted(step)))

    async def agent_ended(self, agent: AgentStatus, container: str, step: StepStatus,
                          status: WorkflowStatus, output: str | None, stderr: str) -> None:
        """An agent ended: it, its step, its output and the progress change together, or not
        at all (``output`` None: it did not succeed, and gave none)."""
        await self.store.record(self.uid, Change(
            agent=self._agent(agent, container), step=self._noted(step),
            output=Output(step.name, agent.index, output) if output is not None else None,
            workflow=self._whole(status, with_spec=False) if output is not None else None,
            log=(agent.id, stderr) if stderr else None))

    async def ended(self, status: WorkflowStatus, ttl_seconds: int) -> None:
        """The run ended: its final state, expiring after ``ttl_seconds``."""
        await self.store.record(self.uid, Change(
            workflow=self._whole(status), expire_seconds=max(0, ttl_seconds) or None,
            steps=frozenset(self._steps) if self._steps is not None else None))

    async def reopen(self, last_known: WorkflowStatus | None = None) -> list[str] | None:
        """Make a finished run resumable, for a retry: the steps that did not succeed (and the
        finally steps, which report on the outcome) are Pending again, their agents kept as
        history and their attempts counted afresh; the steps that succeeded keep their outputs,
        and so do the agents of a fan-out that succeeded. Returns the steps to run again
        (None: nothing of the run was recorded)."""
        restored = await self.restore(last_known)
        if restored is None:
            return None
        spec = restored.workflow.spec or self.workflow.spec
        again = []
        for step in spec.all_steps:
            state = restored.steps.get(step.name)
            if state is not None and state.phase is StepPhase.SUCCEEDED and \
                    step not in spec.finally_steps:
                continue
            agents = restored.agents.get(step.name, [])
            # The status too: where the store lost the agents, their names are still taken.
            shown = next((s.agents for s in last_known.steps if s.name == step.name), []) \
                if last_known is not None else []
            base = max((agent.attempt for agent in [*agents, *shown]), default=0)
            if state is not None and state.attempts_before_retry:
                base = max(base, state.attempts_before_retry)
            # A finally step that succeeded runs again: its old output is not its new one.
            await self.store.record(self.uid, Change(
                step=StepStatus(name=step.name, attempts=len(agents),
                                attempts_before_retry=base or None),
                forget_outputs=step.name if state is not None and
                state.phase is StepPhase.SUCCEEDED else None))
            again.append(step.name)
        await self.store.record(self.uid, Change(workflow=dataclasses.replace(
            restored.workflow, phase=WorkflowPhase.RUNNING, finished_at=None, message=None,
            spec=spec)))
        await self.store.reopen(self.uid)
        return again

    async def restore(self, last_known: WorkflowStatus | None = None) -> Restored | None:
        """What an earlier process recorded of this run, for the steps of the spec it started
        with; None when nothing was.

        ``last_known`` is the status the resource carries: where the store lost what it said
        (Redis restarted without its last second, or emptied), the steps that status says
        finished stay finished, with the outputs it shows whole; they are not run again."""
        workflow = await self.store.workflow(self.uid)
        self._steps = set() if workflow is None else None
        if workflow is None:
            if last_known is None or last_known.started_at is None:
                return None
            workflow = WorkflowRecord(  # the store lost it all; the resource remembers
                name=self.workflow.metadata.name, namespace=self.workflow.metadata.namespace,
                phase=WorkflowPhase.RUNNING, progress=last_known.progress,
                started_at=last_known.started_at)
        spec = workflow.spec or self.workflow.spec
        agents: dict[str, list[AgentStatus]] = {step.name: [] for step in spec.all_steps}
        records = await self.store.agents(self.uid)
        for record in sorted(records.values(),
                             key=lambda r: (r.status.index, r.status.attempt)):
            if record.step in agents:
                agents[record.step].append(record.status)
        recorded = {name: state for name, state in (await self.store.steps(self.uid)).items()
                    if name in agents}
        outputs = {name: await self.store.outputs(self.uid, name) for name in recorded}
        # An itemsFrom step's width is its output's: any list it shows whole.
        widths = {step.name: None if step.items_from else step.width
                  for step in spec.all_steps}
        for shown in last_known.steps if last_known is not None else []:
            state = recorded.get(shown.name)
            if shown.name not in widths or shown.phase not in FINISHED_STEPS or \
                    state is not None and state.phase in FINISHED_STEPS:
                continue
            recorded[shown.name] = shown.model_copy(update={"agents": []})
            outputs[shown.name] = outputs.get(shown.name) or _shown_outputs(
                shown, widths[shown.name])
        return Restored(workflow=workflow, steps=recorded, agents=agents, outputs=outputs)


FINISHED_STEPS = (StepPhase.SUCCEEDED, StepPhase.FAILED, StepPhase.SKIPPED, StepPhase.CANCELLED)


def _shown_outputs(step: StepStatus, width: int | None) -> dict[int, str]:
    """A finished step's outputs as its status shows them, when it shows them whole (a fan-out's
    as the JSON list it prints); none when cut or left out."""
    if step.phase is not StepPhase.SUCCEEDED or step.output is None or step.output_truncated:
        return {}
    if width == 1:
        return {0: step.output}
    try:
        shown = json.loads(step.output)
    except ValueError:
        return {}
    if not isinstance(shown, list) or width is not None and len(shown) != width or \
            not all(isinstance(text, str) for text in shown):
        return {}
    return dict(enumerate(shown))
