"""The project's own errors: what went wrong, in words a user can act on, and whether to retry."""

from __future__ import annotations

from dataclasses import dataclass


class AgentainerError(Exception):
    """Base of every error the project raises on purpose.

    ``retryable`` tells callers (the engine's retries, the operator's handlers) whether the same
    call may succeed later; ``delay`` is a hint in seconds for when to try again.
    """

    retryable: bool = False
    delay: float = 0.0


class TransientError(AgentainerError):
    """Something outside the project failed for now (engine busy, connection reset)."""

    retryable = True
    delay = 5.0


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where (``spec.steps[1].name``) and why."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidSpecError(AgentainerError):
    """A manifest that can never run as written; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__(prefix + "; ".join(str(p) for p in problems))


class ConfigError(AgentainerError):
    """A setting (environment variable or flag) that cannot work."""


class ManifestError(AgentainerError):
    """A file that cannot be read as a manifest at all (missing, not YAML, wrong kind)."""


class BackendUnavailableError(TransientError):
    """The container engine or cluster cannot be reached."""


class ImageNotFoundError(AgentainerError):
    """The agent image is neither present on the engine nor pullable."""


class AgentSpecError(AgentainerError):
    """The engine refused to create an agent from this spec (bad limit, bad option)."""


class AgentUnschedulableError(AgentainerError):
    """No node took the agent's pod in time: none had room for what it asks, or none was one
    it may run on. Not retried: the cluster, not the agent, has to change."""


class NotFoundError(AgentainerError):
    """What a request named does not exist, or no longer does (a container, a pod)."""


class ConflictError(AgentainerError):
    """The request clashes with the state of the thing it names: a name in use, a removal
    already in progress."""


class ForbiddenError(AgentainerError):
    """The engine or the API server does not allow this request (RBAC, an admission policy)."""


class NotAuthorizedError(ForbiddenError):
    """RBAC refused the request: the controller lacks a permission, or an API server that has
    just started has not yet loaded who may do what (it refuses everyone for a few seconds).
    Retried like an API server out of reach, so that the second heals by itself; the first
    ends the run's patience with this message."""

    retryable = True


class BackendError(TransientError):
    """The engine failed a request it should have served; worth retrying."""


class AgentLostError(AgentainerError):
    """The agent went away before it ended: its container or pod was deleted, evicted or
    preempted, or its task runner died. Its attempt failed; a new one may succeed."""

    retryable = True


class AgentInterruptedError(AgentLostError):
    """The container engine, not the agent, cut its run short: it stopped the agent as it shut
    down, or the connection to a pool agent's runner broke while the agent ran on. Its attempt
    is run again without counting as one of the step's retries."""


class StoreUnavailableError(TransientError):
    """Redis cannot be reached or refused the operation."""


class StoreDataError(AgentainerError):
    """What the store holds cannot be read as ours (written by something else, or damaged)."""


class PoolUnavailableError(AgentainerError):
    """A pooled step names an AgentPool that this runner does not have."""
