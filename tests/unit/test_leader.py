"""Leader election on a Lease, against an in-memory Lease API with the API server's
compare-and-swap (a replace with a stale resourceVersion is refused with 409); the local
cluster's own API server runs it in tests/e2e/test_leader.py."""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Callable, Coroutine
from datetime import datetime
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes.client import ApiException

from controller.leader import LeaderElection, Timing
from controller.metrics import Metrics

TIMING = Timing(duration=15, renew_deadline=10, retry_period=2)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Leases:
    """coordination.k8s.io/v1 Leases as the API server keeps them."""

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.version = 0
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise OSError("connection refused")

    def read_namespaced_lease(self, name: str, namespace: str, **_: Any) -> Any:
        self._check()
        if name not in self.stored:
            raise ApiException(status=404, reason="Not Found")
        body = self.stored[name]
        spec = dict(body["spec"])
        for key in ("acquireTime", "renewTime"):
            if spec.get(key):
                spec[key] = datetime.fromisoformat(spec[key].replace("Z", "+00:00"))
        return SimpleNamespace(
            metadata=SimpleNamespace(resource_version=body["metadata"]["resourceVersion"]),
            spec=SimpleNamespace(holder_identity=spec.get("holderIdentity"),
                                 lease_duration_seconds=spec.get("leaseDurationSeconds"),
                                 acquire_time=spec.get("acquireTime"),
                                 renew_time=spec.get("renewTime"),
                                 lease_transitions=spec.get("leaseTransitions")))

    def create_namespaced_lease(self, namespace: str, body: dict[str, Any], **_: Any) -> None:
        self._check()
        name = body["metadata"]["name"]
        if name in self.stored:
            raise ApiException(status=409, reason="AlreadyExists")
        self._store(name, body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: dict[str, Any],
                                 **_: Any) -> None:
        self._check()
        if self.stored[name]["metadata"]["resourceVersion"] != \
                body["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")
        self._store(name, body)

    def _store(self, name: str, body: dict[str, Any]) -> None:
        self.version += 1
        body = copy.deepcopy(body)
        body["metadata"]["resourceVersion"] = str(self.version)
        self.stored[name] = body

    def holder(self) -> str | None:
        return self.stored["agentainer"]["spec"].get("holderIdentity")


def synchronous(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(test(*args, **kwargs), 10))

    return run


def replica(leases: Leases, identity: str, clock: Clock) -> LeaderElection:
    return LeaderElection(leases, "agentainer-system", "agentainer", identity, TIMING, clock)


@synchronous
async def test_the_first_takes_the_lease_and_the_second_waits_until_it_expires() -> None:
    leases, clock = Leases(), Clock()
    first, second = replica(leases, "a", clock), replica(leases, "b", clock)
    assert await first._try()
    assert leases.holder() == "a"
    assert not await second._try()
    clock.now += 14  # not renewed, but not expired either, as the second sees it
    assert not await second._try()
    clock.now += 2
    assert await second._try()
    assert leases.holder() == "b"
    assert leases.stored["agentainer"]["spec"]["leaseTransitions"] == 1
    assert not await first._try()


@synchronous
async def test_a_renewing_holder_keeps_the_lease_whatever_the_clocks_say() -> None:
    leases, clock = Leases(), Clock()
    first, second = replica(leases, "a", clock), replica(leases, "b", clock)
    assert await first._try()
    assert not await second._try()
    for _ in range(20):
        clock.now += 2
        assert await first._try()
        # The second counts from when it saw the record change, not from renewTime.
        assert not await second._try()
    assert leases.stored["agentainer"]["spec"]["leaseTransitions"] == 0


@synchronous
async def test_a_released_lease_is_taken_at_the_next_try() -> None:
    leases, clock = Leases(), Clock()
    first, second = replica(leases, "a", clock), replica(leases, "b", clock)
    assert await first._try()
    assert not await second._try()
    await first.release()
    assert not first.leading
    assert leases.holder() is None
    assert await second._try()


@synchronous
async def test_two_replicas_racing_for_the_lease_get_one_holder() -> None:
    leases, clock = Leases(), Clock()
    replicas = [replica(leases, str(n), clock) for n in range(5)]
    taken = await asyncio.gather(*(r._try() for r in replicas))
    assert taken.count(True) == 1
    assert leases.holder() == str(taken.index(True))


@pytest.mark.parametrize("how", ["taken over", "unreachable"])
@synchronous
async def test_hold_returns_when_the_lease_is_lost(how: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    leases, clock = Leases(), Clock()
    first = replica(leases, "a", clock)

    async def tick(seconds: float) -> None:
        clock.now += seconds

    monkeypatch.setattr(first, "_pause", tick)
    assert await first._try()
    if how == "taken over":
        body = copy.deepcopy(leases.stored["agentainer"])
        body["spec"]["holderIdentity"] = "b"
        leases.replace_namespaced_lease("agentainer", "agentainer-system", body)
    else:
        leases.down = True
    await asyncio.wait_for(first.hold(), 5)
    assert not first.leading
    if how == "unreachable":
        # Lost once no renewal went through for the renew deadline, before the lease expired.
        assert TIMING.renew_deadline <= clock.now - 1000 < TIMING.duration


@synchronous
async def test_acquire_waits_and_stops_when_asked() -> None:
    leases, clock = Leases(), Clock()
    assert await replica(leases, "a", clock)._try()
    stopping = asyncio.Event()
    waiting = asyncio.create_task(replica(leases, "b", clock).acquire(stopping))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    stopping.set()
    assert await asyncio.wait_for(waiting, 5) is False


def test_timing_refuses_a_renew_deadline_past_the_lease() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        Timing(duration=10, renew_deadline=10, retry_period=2)


class Election:
    """A LeaderElection stand-in that loses the lease when told."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()
        self.released = False

    async def hold(self) -> None:
        await self.lost.wait()

    async def release(self) -> None:
        self.released = True


@pytest.mark.parametrize("how", ["lease lost", "stopped"])
@synchronous
async def test_a_leader_stops_its_operator_at_once_when_the_lease_is_lost(
        how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller import operator

    stopped_by: list[str] = []

    async def kopf_operator(*, stop_flag: asyncio.Event, **_: Any) -> None:
        await stop_flag.wait()  # kopf's stop flag: set by a signal, or by a lost lease
        stopped_by.append("flag")

    monkeypatch.setattr(operator.kopf, "operator", kopf_operator)
    election = Election()
    stopping = asyncio.Event()
    metrics = Metrics()
    assert metrics.registry.get_sample_value("agentainer_leading") == 0  # standing by
    leading = asyncio.create_task(operator._lead(
        election, operator.Options(), metrics, operator.Health(None),  # type: ignore[arg-type]
        stopping))
    await asyncio.sleep(0.05)
    assert not leading.done()
    assert metrics.registry.get_sample_value("agentainer_leading") == 1
    if how == "lease lost":
        election.lost.set()
    else:
        stopping.set()  # SIGTERM
    code = await asyncio.wait_for(leading, 5)
    assert stopped_by == ["flag"]
    assert metrics.registry.get_sample_value("agentainer_leading") == 0
    if how == "lease lost":
        assert code == operator.EXIT_LOST_LEASE
        assert not election.released  # it is another's now
    else:
        assert code == 0
        assert election.released  # a standby takes over at its next try
