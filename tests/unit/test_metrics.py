"""Metrics: names, bounded labels, and what engine and pool events turn into."""

from __future__ import annotations

from prometheus_client import generate_latest

from controller.engine import Event, EventKind
from controller.metrics import Metrics, PoolMetrics, WorkflowMetrics
from controller.models import (
    AgentPhase,
    AgentReason,
    AgentStatus,
    StepPhase,
    StepStatus,
    WorkflowPhase,
    WorkflowStatus,
)
from controller.pools import PoolEvent, PoolEventKind


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


def test_every_metric_is_prefixed_and_carries_no_uid() -> None:
    text = generate_latest(Metrics().registry).decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert names and all(name.startswith("agentainer_") for name in names)
    assert "uid" not in text


def test_engine_events_become_counts_and_durations() -> None:
    metrics = Metrics()
    observe = WorkflowMetrics(metrics, "docker")
    status = WorkflowStatus(phase=WorkflowPhase.FAILED, started_at="2026-01-01T00:00:00.000Z",
                            finished_at="2026-01-01T00:00:04.000Z")
    agent = AgentStatus(id="a.0.1", name="w-a", index=0, attempt=1, phase=AgentPhase.RUNNING,
                        started_at="2026-01-01T00:00:01.000Z")
    observe(Event(EventKind.AGENT_STARTED, "", agent=agent), status)
    assert sample(metrics, "agentainer_agents_running", backend="docker") == 1
    agent.phase, agent.reason = AgentPhase.FAILED, AgentReason.OOM_KILLED
    agent.finished_at = "2026-01-01T00:00:03.000Z"
    observe(Event(EventKind.AGENT_FINISHED, "", agent=agent), status)
    step = StepStatus(name="a", phase=StepPhase.FAILED, started_at="2026-01-01T00:00:00.500Z",
                      finished_at="2026-01-01T00:00:03.500Z")
    observe(Event(EventKind.STEP_FINISHED, "", step=step), status)
    observe(Event(EventKind.WORKFLOW_FINISHED, ""), status)

    assert sample(metrics, "agentainer_agents_running", backend="docker") == 0
    assert sample(metrics, "agentainer_agents_started_total", backend="docker") == 1
    assert sample(metrics, "agentainer_agents_failed_total", backend="docker",
                  reason="OOMKilled") == 1
    assert sample(metrics, "agentainer_agent_duration_seconds_sum", backend="docker",
                  phase="Failed") == 2.0
    assert sample(metrics, "agentainer_step_duration_seconds_sum", phase="Failed") == 3.0
    assert sample(metrics, "agentainer_workflows_finished_total", phase="Failed") == 1
    assert sample(metrics, "agentainer_workflow_duration_seconds_sum", phase="Failed") == 4.0


def test_pool_events_become_lease_and_task_latencies_and_replacements() -> None:
    metrics = Metrics()
    observe = PoolMetrics(metrics)
    observe(PoolEvent(PoolEventKind.LEASED, "warm", 0.002))
    observe(PoolEvent(PoolEventKind.TASK_DONE, "warm", 0.004))
    observe(PoolEvent(PoolEventKind.RECYCLED, "warm"))
    observe(PoolEvent(PoolEventKind.REPLACED, "warm"))

    assert sample(metrics, "agentainer_pool_lease_wait_seconds_count", pool="warm") == 1
    assert sample(metrics, "agentainer_pool_task_seconds_sum", pool="warm") == 0.004
    assert sample(metrics, "agentainer_pool_agents_recycled_total", pool="warm") == 1
    assert sample(metrics, "agentainer_pool_agents_replaced_total", pool="warm") == 1


def test_workflows_by_phase_gauge_counts_each_workflow_once() -> None:
    """Noted again and again (on every event, and by kopf's indexer), moved, and gone: each
    workflow is counted once, in its phase of now."""
    from controller.handlers.context import Services

    metrics = Metrics()
    services = Services(settings=None, store=None, metrics=metrics,  # type: ignore[arg-type]
                        custom_objects=None, pools=None)  # type: ignore[arg-type]
    for uid, phases in {"u1": [WorkflowPhase.RUNNING] * 3,
                        "u2": [WorkflowPhase.RUNNING, WorkflowPhase.FAILED,
                               WorkflowPhase.RUNNING],
                        "u3": [WorkflowPhase.RUNNING, WorkflowPhase.SUCCEEDED,
                               WorkflowPhase.SUCCEEDED],
                        "u4": [WorkflowPhase.RUNNING, WorkflowPhase.SUCCEEDED, None]}.items():
        for phase in phases:
            services.workflow_phase(uid, phase)
    services.workflow_phase("never-known", None)

    assert sample(metrics, "agentainer_workflows", phase="Running") == 2
    assert sample(metrics, "agentainer_workflows", phase="Succeeded") == 1
    assert sample(metrics, "agentainer_workflows", phase="Failed") == 0
