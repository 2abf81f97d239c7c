"""Prometheus metrics of the controller; every name starts with ``agentainer_``.

Labels are bounded: phases, reasons, backends, pool names; never a workflow uid or agent id.
The engine knows nothing of this module: :class:`WorkflowMetrics` observes its events.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller.clock import seconds_between
from controller.engine import Event, EventKind
from controller.models import AgentPhase, StepPhase, WorkflowPhase, WorkflowStatus
from controller.pools import PoolEvent, PoolEventKind

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Every metric, in one registry of its own (no global state between tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.workflows = Gauge("agentainer_workflows", "Workflows known to the controller, "
                               "by phase", ["phase"], registry=r)
        self.workflows_finished = Counter("agentainer_workflows_finished_total",
                                          "Workflows that ended, by phase", ["phase"], registry=r)
        self.workflow_duration = Histogram("agentainer_workflow_duration_seconds",
                                           "Wall time of finished workflows", ["phase"],
                                           buckets=DURATION_BUCKETS, registry=r)
        self.step_duration = Histogram("agentainer_step_duration_seconds",
                                       "Wall time of finished steps", ["phase"],
                                       buckets=DURATION_BUCKETS, registry=r)
        self.agent_duration = Histogram("agentainer_agent_duration_seconds",
                                        "Run time of agents, start to stop", ["backend", "phase"],
                                        buckets=DURATION_BUCKETS, registry=r)
        self.agents_started = Counter("agentainer_agents_started_total",
                                      "Agents started (or adopted after a restart)",
                                      ["backend"], registry=r)
        self.agents_failed = Counter("agentainer_agents_failed_total",
                                     "Agents that stopped without success, by reason",
                                     ["backend", "reason"], registry=r)
        self.agents_running = Gauge("agentainer_agents_running", "Agents running now",
                                    ["backend"], registry=r)
        self.agent_retries = Counter("agentainer_agent_retries_total",
                                     "Failed agents run again", ["backend"], registry=r)
        self.leading = Gauge("agentainer_leading", "1 while this replica runs the operator (it "
                             "leads, or runs unelected), 0 while it stands by", registry=r)
        self.reconcile_errors = Counter("agentainer_reconcile_errors_total",
                                        "Reconciliations that raised, by kind and error",
                                        ["kind", "error"], registry=r)
        self.pool_agents = Gauge("agentainer_pool_agents", "Agents of each pool, by state",
                                 ["pool", "state"], registry=r)
        self.lease_wait = Histogram("agentainer_pool_lease_wait_seconds",
                                    "Time from asking a pool for an agent to getting one",
                                    ["pool"], buckets=LATENCY_BUCKETS, registry=r)
        self.pool_task = Histogram("agentainer_pool_task_seconds",
                                   "Time a task took on a pooled agent", ["pool"],
                                   buckets=LATENCY_BUCKETS + (5, 10, 30, 60, 300), registry=r)
        self.pool_recycled = Counter("agentainer_pool_agents_recycled_total",
                                     "Pool agents replaced after serving maxUses tasks",
                                     ["pool"], registry=r)
        self.pool_replaced = Counter("agentainer_pool_agents_replaced_total",
                                     "Pool agents replaced because they died, timed out, "
                                     "failed their reset or were reclaimed", ["pool"], registry=r)

    def workflow_moved(self, before: WorkflowPhase | None, after: WorkflowPhase | None) -> None:
        """One workflow left phase ``before`` for ``after`` (None: it was not known, or is
        gone) in the gauge of workflows by phase."""
        if before is not None:
            self.workflows.labels(phase=before.value).dec()
        if after is not None:
            self.workflows.labels(phase=after.value).inc()


class WorkflowMetrics:
    """An engine observer that turns a run's events into metrics."""

    def __init__(self, metrics: Metrics, backend: str) -> None:
        self.metrics = metrics
        self.backend = backend

    def __call__(self, event: Event, status: WorkflowStatus) -> None:
        m = self.metrics
        agent, step = event.agent, event.step
        match event.kind:
            case EventKind.AGENT_STARTED:
                m.agents_started.labels(self.backend).inc()
                m.agents_running.labels(self.backend).inc()
            case EventKind.AGENT_FINISHED if agent is not None:
                if agent.started_at is not None:
                    m.agents_running.labels(self.backend).dec()
                took = seconds_between(agent.started_at, agent.finished_at)
                if took is not None:
                    m.agent_duration.labels(self.backend, agent.phase.value).observe(took)
                if agent.phase is AgentPhase.FAILED:
                    reason = agent.reason.value if agent.reason else "Unknown"
                    m.agents_failed.labels(self.backend, reason).inc()
            case EventKind.AGENT_RETRYING:
                m.agent_retries.labels(self.backend).inc()
            case EventKind.STEP_FINISHED if step is not None and step.phase in (
                    StepPhase.SUCCEEDED, StepPhase.FAILED, StepPhase.CANCELLED):
                took = seconds_between(step.started_at, step.finished_at)
                if took is not None:
                    m.step_duration.labels(step.phase.value).observe(took)
            case EventKind.WORKFLOW_FINISHED:
                m.workflows_finished.labels(status.phase.value).inc()
                took = seconds_between(status.started_at, status.finished_at)
                if took is not None:
                    m.workflow_duration.labels(status.phase.value).observe(took)


class PoolMetrics:
    """A pool observer that turns lease and task events into metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def __call__(self, event: PoolEvent) -> None:
        m = self.metrics
        match event.kind:
            case PoolEventKind.LEASED:
                m.lease_wait.labels(event.pool).observe(event.value)
            case PoolEventKind.TASK_DONE:
                m.pool_task.labels(event.pool).observe(event.value)
            case PoolEventKind.RECYCLED:
                m.pool_recycled.labels(event.pool).inc()
            case PoolEventKind.REPLACED:
                m.pool_replaced.labels(event.pool).inc()
