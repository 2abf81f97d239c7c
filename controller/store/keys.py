"""Every Redis key of the project, under ``agentainer:``; the one place that knows the layout.

Each workflow's keys and each pool's keys share a hash tag (the uid in braces), so that on Redis
Cluster they live in one slot and every transaction and script touches one slot only.

For a workflow with uid ``U``:

- ``agentainer:workflows``: sorted set of workflow uids, scored by start time (seconds); written
  on its own, never in a workflow's transaction;
- ``agentainer:workflow:{U}``: hash of the workflow (name, namespace, phase, times, message);
- ``agentainer:workflow:{U}:steps``: hash, step name -> JSON step state (phase, attempts, times);
- ``agentainer:workflow:{U}:agents``: hash, agent id -> JSON agent record (workflow, step,
  index, attempt, container, phase, exit code, reason, created/started/finished times);
- ``agentainer:workflow:{U}:outputs:STEP``: hash, agent index -> full output (trimmed stdout);
- ``agentainer:workflow:{U}:logs``: hash, agent id -> the agent's stderr (the last 64 KiB).

For a pool with uid ``P``: ``agentainer:pool:{P}:agents`` (hash: agent -> record),
``agentainer:pool:{P}:idle`` (sorted set: agent -> idle since), ``agentainer:pool:{P}:uses``
(hash: agent -> tasks served), ``agentainer:pool:{P}:leases`` (hash: agent ->
``EXPIRY_MS:HOLDER``, the expiry in Redis's own clock).

``agentainer:layout`` says which layout the keys follow (:data:`LAYOUT`); keys of an older
layout are moved by :mod:`controller.store.migrate`.
"""

from __future__ import annotations

PREFIX = "agentainer:"
LAYOUT = 2
"""1: no hash tags, a string key per pool lease; 2: hash tags, a pool's leases in one hash."""


class Keys:
    """Every Redis key of the project."""

    workflows = PREFIX + "workflows"
    layout = PREFIX + "layout"

    @staticmethod
    def workflow(uid: str) -> str:
        return f"{PREFIX}workflow:{{{uid}}}"

    @staticmethod
    def steps(uid: str) -> str:
        return f"{Keys.workflow(uid)}:steps"

    @staticmethod
    def agents(uid: str) -> str:
        return f"{Keys.workflow(uid)}:agents"

    @staticmethod
    def outputs(uid: str, step: str) -> str:
        return f"{Keys.workflow(uid)}:outputs:{step}"

    @staticmethod
    def logs(uid: str) -> str:
        return f"{Keys.workflow(uid)}:logs"

    @staticmethod
    def workflow_keys(uid: str, steps: list[str]) -> list[str]:
        """Every key of one workflow, given the names of its steps (one slot)."""
        return [Keys.workflow(uid), Keys.steps(uid), Keys.agents(uid), Keys.logs(uid),
                *(Keys.outputs(uid, step) for step in steps)]

    @staticmethod
    def pool(uid: str) -> str:
        return f"{PREFIX}pool:{{{uid}}}"

    @staticmethod
    def pool_agents(uid: str) -> str:
        return f"{Keys.pool(uid)}:agents"

    @staticmethod
    def pool_idle(uid: str) -> str:
        return f"{Keys.pool(uid)}:idle"

    @staticmethod
    def pool_uses(uid: str) -> str:
        return f"{Keys.pool(uid)}:uses"

    @staticmethod
    def pool_leases(uid: str) -> str:
        return f"{Keys.pool(uid)}:leases"

    @staticmethod
    def pool_keys(uid: str) -> list[str]:
        """Every key of one pool (one slot)."""
        return [Keys.pool_agents(uid), Keys.pool_idle(uid), Keys.pool_uses(uid),
                Keys.pool_leases(uid)]
