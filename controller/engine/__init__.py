"""The workflow engine: runs a Workflow's steps as a DAG of agents on a backend.

The same code runs a Workflow for the kopf controller and for ``agentainer run``; it imports no
kopf. Its parts call no one back: ``run`` schedules the DAG and each step's fan-out and
retries, ``attempts`` runs one attempt on an agent of its own or a pool's, ``journal`` maps the
run's state to the store and back, ``events`` tells observers.
"""

from controller.engine.events import Event, EventKind, Observer
from controller.engine.run import Engine, WorkflowRun

__all__ = ["Engine", "Event", "EventKind", "Observer", "WorkflowRun"]
