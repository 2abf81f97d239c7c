"""What the handlers share, built once at start-up and kept in kopf's ``memo``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import kubernetes

from controller.backends.base import Backend
from controller.backends.docker import DockerBackend
from controller.backends.kubernetes import (
    TRANSPORT_ERRORS,
    ClusterEnv,
    KubernetesBackend,
    api_client,
    load_credentials,
)
from controller.config import Settings
from controller.engine import WorkflowRun
from controller.errors import AgentainerError, TransientError
from controller.metrics import Metrics
from controller.models import API_GROUP, API_VERSION, BackendKind, WorkflowPhase
from controller.pools import PoolManager
from controller.store import Store
from controller.turns import Turns

WRITERS = 16
"""Status patches and deletions of our resources in flight at once, on threads of their own
(and as many connections to the API server): they never wait behind agents' calls, nor behind
the process's default threads (a handful on a small machine)."""


WRITE_TIMEOUT_SECONDS = 30.0
"""How long one status patch or deletion may wait for the API server's answer: one that never
comes (a server gone silent) must not hold a writer, and every write queued behind it, for
good. The write fails as the API server out of reach, and is made again."""


class Urgency(IntEnum):
    """Which write goes first when more wait than there are writers."""

    LAST_WORD = 0
    """A final status (a run's, a refusal's) or one a person asked for (a retry)."""
    FIRST = 1
    """A run's first status: that it runs."""
    PROGRESS = 2
    """A running workflow's status as it goes."""


class UnsupportedBackendError(AgentainerError):
    """A resource asks for a backend this controller does not have."""


class KubernetesError(TransientError):
    """The API server refused or failed a request of ours."""


@dataclass
class Services:
    """Clients and shared state of one controller process."""

    settings: Settings
    store: Store
    metrics: Metrics
    custom_objects: Any
    pools: PoolManager
    phases: dict[str, WorkflowPhase] = field(default_factory=dict)
    runs: dict[str, WorkflowRun] = field(default_factory=dict)
    """The runs of this process, by workflow uid: for handlers that steer them."""
    heeded: dict[str, int | None] = field(default_factory=dict)
    """The generation of each Workflow's spec this process has acted on, by uid: a run here
    steered by its controls, or a change after its end recorded."""
    _docker: DockerBackend | None = None
    _kubernetes: KubernetesBackend | None = None
    _backend_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _writers: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        WRITERS, thread_name_prefix="status-writer"))
    _turns: Turns = field(default_factory=lambda: Turns(WRITERS, reserved=WRITERS // 8))
    running: int = 0
    """Workflows whose status this process writes as they run."""

    def status_interval(self) -> float:
        """Seconds between two writes of a running workflow's status: the configured interval,
        longer when so many run that their writes would pass the API server's share."""
        return max(self.settings.status_interval_seconds,
                   self.running / self.settings.status_writes_per_second)

    async def _write(self, call: Callable[[Any], None], body: Any,
                     urgency: Urgency = Urgency.LAST_WORD) -> None:
        """``call(body)`` on a writer thread, in its turn. A callable ``body`` is made only
        then (in the loop): a write that waited says what is true when it is sent, or nothing
        (None: it is not sent)."""
        async with self._turns.turn(urgency):
            if callable(body):
                body = body()
                if body is None:
                    return
            await asyncio.get_running_loop().run_in_executor(self._writers, call, body)

    def backend_kind(self, chosen: str | None) -> BackendKind:
        """A resource's own backend, else the controller's default."""
        try:
            return BackendKind.of(chosen, self.settings.default_backend)
        except ValueError:
            raise UnsupportedBackendError(
                f"backend {chosen!r} does not exist (docker, kubernetes)") from None

    async def backend(self, kind: BackendKind) -> Backend:
        """The backend of that kind, connected on first use (so the controller starts even
        when an engine it may never need is down)."""
        async with self._backend_lock:
            if kind is BackendKind.DOCKER:
                if self._docker is None:
                    # Docker agents' valueFrom variables: read from the cluster, as a pod's.
                    self._docker = await DockerBackend.connect(
                        self.settings, ClusterEnv(kubernetes.client.CoreV1Api(api_client())))
                return self._docker
            if self._kubernetes is None:
                self._kubernetes = await KubernetesBackend.connect(self.settings)
            return self._kubernetes

    def workflow_phase(self, uid: str, phase: WorkflowPhase | None) -> None:
        """Note a workflow's phase (None: it is gone); called on every engine event, so the
        gauge of workflows by phase moves only when a phase changes, by one."""
        before = self.phases.get(uid)
        if before is phase:
            return
        if phase is None:
            self.phases.pop(uid, None)
        else:
            self.phases[uid] = phase
        self.metrics.workflow_moved(before, phase)

    async def patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any] | Callable[[], dict[str, Any] | None],
                           urgency: Urgency = Urgency.LAST_WORD) -> None:
        """Merge-patch the status subresource of one of our resources; a callable ``status``
        is made when the write's turn comes (None then: nothing is written)."""

        def patch(status: dict[str, Any]) -> None:
            self.custom_objects.merge_patch_status(plural, namespace, name, status)

        try:
            await self._write(patch, status, urgency)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return  # deleted meanwhile: nothing to report to
            raise KubernetesError(f"patching {plural}/{name} status: {error.reason}") from error
        except TRANSPORT_ERRORS as error:
            raise KubernetesError(f"patching {plural}/{name} status: cannot reach the API "
                                  f"server: {error}") from error

    async def delete_resource(self, plural: str, namespace: str, name: str) -> None:
        """Delete one of our resources (its finalizer's handler then cleans up after it)."""

        def delete(_: None) -> None:
            self.custom_objects.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, plural, name,
                _request_timeout=WRITE_TIMEOUT_SECONDS)

        try:
            await self._write(delete, None)
        except kubernetes.client.ApiException as error:
            if error.status == 404:
                return
            raise KubernetesError(f"deleting {plural}/{name}: {error.reason}") from error
        except TRANSPORT_ERRORS as error:
            raise KubernetesError(f"deleting {plural}/{name}: cannot reach the API server: "
                                  f"{error}") from error

    async def close(self) -> None:
        await self.store.close()
        for backend in (self._docker, self._kubernetes):
            if backend is not None:
                await backend.close()
        self._writers.shutdown(wait=False, cancel_futures=True)


class CustomObjects(kubernetes.client.CustomObjectsApi):
    """The client's API of custom resources, and a status write as lean as it can be."""

    STATUS = "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status"

    def merge_patch_status(self, plural: str, namespace: str, name: str,
                           status: dict[str, Any]) -> None:
        """Merge-patch the status of one of our resources: the request the client's generated
        method makes, without what that method adds on every call and a status write does
        not need (a check of its arguments' types, the patched object read back into a
        dict), a third of the controller's time per write under load."""
        api = self.api_client
        request = api.param_serialize(
            method="PATCH", resource_path=self.STATUS,
            path_params={"group": API_GROUP, "version": API_VERSION, "namespace": namespace,
                         "plural": plural, "name": name},
            header_params={"Content-Type": "application/merge-patch+json",
                           "Accept": "application/json"},
            body={"status": status}, auth_settings=["BearerToken"])
        answer = api.call_api(*request, _request_timeout=WRITE_TIMEOUT_SECONDS)
        answer.read()
        if not 200 <= answer.status <= 299:
            kubernetes.client.ApiException.from_response(http_resp=answer, body=None, data=None)


def kubernetes_client() -> CustomObjects:
    """A client for the API server, with the same credentials as the Kubernetes backend."""
    load_credentials()
    configuration = kubernetes.client.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = WRITERS
    return CustomObjects(api_client(configuration))
