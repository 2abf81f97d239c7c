"""Every Redis key of the project, under ``agentainer:``; the one place that knows the layout.

For a workflow with uid ``U``:

- ``agentainer:workflows``: sorted set of workflow uids, scored by start time (seconds);
- ``agentainer:workflow:U``: hash of the workflow (name, namespace, phase, times, message);
- ``agentainer:workflow:U:steps``: hash, step name -> JSON step state (phase, attempts, times);
- ``agentainer:workflow:U:agents``: hash, agent id -> JSON agent record (workflow, step,
  index, attempt, container, phase, exit code, reason, created/started/finished times);
- ``agentainer:workflow:U:outputs:STEP``: hash, agent index -> full output (trimmed stdout);
- ``agentainer:workflow:U:logs``: hash, agent id -> the agent's stderr (the last 64 KiB).

For a pool with uid ``P``: ``agentainer:pool:P:agents`` (hash: agent -> record),
``agentainer:pool:P:idle`` (sorted set: agent -> idle since), ``agentainer:pool:P:uses``
(hash), ``agentainer:pool:P:lease:AGENT`` (string: holder, with a TTL).
"""

from __future__ import annotations

PREFIX = "agentainer:"


class Keys:
    """Every Redis key of the project."""

    workflows = PREFIX + "workflows"

    @staticmethod
    def workflow(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}"

    @staticmethod
    def steps(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:steps"

    @staticmethod
    def agents(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:agents"

    @staticmethod
    def outputs(uid: str, step: str) -> str:
        return f"{PREFIX}workflow:{uid}:outputs:{step}"

    @staticmethod
    def logs(uid: str) -> str:
        return f"{PREFIX}workflow:{uid}:logs"

    @staticmethod
    def workflow_keys(uid: str, steps: list[str]) -> list[str]:
        """Every key of one workflow, given the names of its steps."""
        return [Keys.workflow(uid), Keys.steps(uid), Keys.agents(uid), Keys.logs(uid),
                *(Keys.outputs(uid, step) for step in steps)]

    @staticmethod
    def pool_agents(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:agents"

    @staticmethod
    def pool_idle(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:idle"

    @staticmethod
    def pool_uses(uid: str) -> str:
        return f"{PREFIX}pool:{uid}:uses"

    @staticmethod
    def pool_lease(uid: str, agent: str) -> str:
        return f"{PREFIX}pool:{uid}:lease:{agent}"
