"""Leader election on a ``coordination.k8s.io/v1`` Lease, as client-go and controller-runtime
do it: every replica tries to take the Lease; the holder renews it every ``retry_period``
seconds and works; the others stand by and take it over once it has not been renewed for
``duration`` seconds, as they see it on their own clocks (so that clocks that disagree do not
matter). A holder that cannot renew within ``renew_deadline`` seconds has lost it and must stop
at once: the others may take over ``duration`` seconds after its last renewal. A holder that
stops of its own accord gives the Lease up, so that a standby takes over at its next try.

``kubectl get lease -n <namespace> <name>`` shows the holder.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kubernetes
from kubernetes.client import ApiException

from controller.backends.kubernetes import TRANSPORT_ERRORS, api_client, load_credentials
from controller.errors import AgentainerError

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT_SECONDS = 5.0
"""How long one request to the API server may take: less than the renew deadline."""


class LeaseError(AgentainerError):
    """The API server refused or failed a request on the Lease."""


@dataclass(frozen=True)
class Timing:
    """client-go's defaults: a standby takes over at most ``duration + retry_period`` seconds
    after the holder's last renewal."""

    duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < "
                             f"lease duration, not {self}")


MICRO_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"
"""How the Lease's times are written (Kubernetes' MicroTime)."""


def _now_text() -> str:
    return datetime.now(UTC).strftime(MICRO_TIME)


class LeaderElection:
    """One replica's side of the election on the Lease ``namespace/name``."""

    def __init__(self, api: Any, namespace: str, name: str, identity: str,
                 timing: Timing = Timing(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self._clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self.renewed_at: float | None = None
        """When this replica last took or renewed the Lease (its clock); None: not holding."""

    @classmethod
    def connect(cls, namespace: str, name: str, identity: str,
                timing: Timing = Timing()) -> LeaderElection:
        load_credentials()
        return cls(kubernetes.client.CoordinationV1Api(api_client()), namespace, name, identity, timing)

    @property
    def leading(self) -> bool:
        return self.renewed_at is not None

    async def acquire(self, stopping: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or ``stopping`` is set (False)."""
        logger.info("waiting to lead: lease %s/%s, identity %s", self.namespace, self.name,
                    self.identity)
        while not stopping.is_set():
            if await self._try():
                logger.info("leading: took lease %s/%s", self.namespace, self.name)
                return True
            # A little jitter, as client-go has, so that standbys do not try in step.
            pause = self.timing.retry_period * (1 + 0.2 * random.random())
            try:
                async with asyncio.timeout(pause):
                    await stopping.wait()
            except TimeoutError:
                pass
        return False

    async def hold(self) -> None:
        """Renew the Lease until it is lost: returns once another replica holds it, or no
        renewal went through for ``renew_deadline`` seconds. Never returns while leading."""
        while True:
            await self._pause(self.timing.retry_period)
            if await self._try():
                continue
            assert self.renewed_at is not None
            since = self._clock() - self.renewed_at
            if self._observed is not None and self._observed[0] not in (None, "",
                                                                         self.identity):
                logger.error("lost lease %s/%s: %s holds it now", self.namespace, self.name,
                             self._observed[0])
            elif since < self.timing.renew_deadline:
                continue
            else:
                logger.error("lost lease %s/%s: not renewed for %.1f s", self.namespace,
                             self.name, since)
            self.renewed_at = None
            return

    @staticmethod
    async def _pause(seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def release(self) -> None:
        """Give the Lease up (when stopping of one's own accord), so that a standby takes over
        at its next try rather than after the lease duration."""
        if self.renewed_at is None:
            return
        self.renewed_at = None
        try:
            lease = await self._request(self._api.read_namespaced_lease, self.name,
                                        self.namespace)
            if lease.spec.holder_identity != self.identity:
                return
            now = _now_text()
            await self._replace(lease, {"holderIdentity": None, "leaseDurationSeconds": 1,
                                        "renewTime": now})
            logger.info("released lease %s/%s", self.namespace, self.name)
        except LeaseError as error:
            logger.warning("could not release lease %s/%s (it expires on its own): %s",
                           self.namespace, self.name, error)

    async def _try(self) -> bool:
        """One attempt to take or renew the Lease: whether this replica holds it now."""
        try:
            return await self._take_or_renew()
        except LeaseError as error:
            logger.warning("lease %s/%s: %s", self.namespace, self.name, error)
            return False

    async def _take_or_renew(self) -> bool:
        now_text = _now_text()
        try:
            lease = await self._request(self._api.read_namespaced_lease, self.name,
                                        self.namespace)
        except _Missing:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": self._holding(now_text, now_text, transitions=0)}
            try:
                await self._request(self._api.create_namespaced_lease, self.namespace, body)
            except _Conflict:
                return False  # another replica created it first
            self._held()
            return True
        spec = lease.spec
        now = self._clock()
        record = (spec.holder_identity, spec.renew_time, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, now
        holder = spec.holder_identity
        duration = spec.lease_duration_seconds or self.timing.duration
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False
        transitions = spec.lease_transitions or 0
        if holder == self.identity:
            acquired = spec.acquire_time.strftime(MICRO_TIME) \
                if spec.acquire_time else now_text
        else:
            acquired, transitions = now_text, transitions + 1
        try:
            await self._replace(lease, self._holding(acquired, now_text, transitions))
        except _Conflict:
            return False  # changed since it was read: another replica got there first
        self._held()
        return True

    def _holding(self, acquired: str, renewed: str, transitions: int) -> dict[str, Any]:
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": round(self.timing.duration),
                "acquireTime": acquired, "renewTime": renewed,
                "leaseTransitions": transitions}

    def _held(self) -> None:
        self.renewed_at = self._observed_at = self._clock()
        self._observed = None  # read afresh next time

    async def _replace(self, lease: Any, spec: dict[str, Any]) -> None:
        # The read's resourceVersion makes this a compare-and-swap: 409 if anyone wrote since.
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version},
                "spec": spec}
        await self._request(self._api.replace_namespaced_lease, self.name, self.namespace,
                            body)

    async def _request(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS + 1):
                return await asyncio.to_thread(
                    function, *args, _request_timeout=REQUEST_TIMEOUT_SECONDS)
        except ApiException as error:
            if error.status == 404:
                raise _Missing from error
            if error.status == 409:
                raise _Conflict from error
            raise LeaseError(f"the API server refused a request on the lease: {error.status} "
                             f"{error.reason}") from error
        except TRANSPORT_ERRORS as error:
            raise LeaseError(f"cannot reach the API server: {error}") from error
        except TimeoutError as error:
            raise LeaseError(f"no answer from the API server in "
                             f"{REQUEST_TIMEOUT_SECONDS + 1:.0f} s") from error


class _Missing(Exception):
    """The Lease does not exist yet."""


class _Conflict(Exception):
    """Someone else wrote the Lease first."""
