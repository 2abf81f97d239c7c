"""Leader election against the real API server's Lease (its compare-and-swap, its MicroTime
fields), with short timings; tests/e2e/test_helm_install.py runs two controller replicas."""

from __future__ import annotations

import asyncio
import time

import pytest

from controller.leader import LeaderElection, Timing
from tests.e2e.conftest import Kubectl

pytestmark = pytest.mark.e2e

TIMING = Timing(duration=3, renew_deadline=2, retry_period=0.5)


def test_one_replica_leads_a_standby_takes_over_when_it_goes(
        kubectl: Kubectl, monkeypatch: pytest.MonkeyPatch) -> None:
    import kubernetes

    monkeypatch.setattr(kubernetes.config.kube_config, "KUBE_CONFIG_DEFAULT_LOCATION",
                        kubectl.kubeconfig)
    name = f"leader-{time.monotonic_ns() % 100000}"

    async def scenario() -> dict[str, object]:
        first = LeaderElection.connect("default", name, "first", TIMING)
        second = LeaderElection.connect("default", name, "second", TIMING)
        never = asyncio.Event()
        seen: dict[str, object] = {}
        seen["first took it"] = await asyncio.wait_for(first.acquire(never), 10)
        seen["second took it meanwhile"] = await second._try()
        seen["holder"] = kubectl.get("lease", name)["spec"]["holderIdentity"]
        # Released on a clean stop: the standby takes it at its next try.
        await first.release()
        began = time.monotonic()
        seen["second took it after release"] = await asyncio.wait_for(second.acquire(never), 10)
        seen["after release, s"] = time.monotonic() - began
        # The leader dies without a word: taken over once its lease has lapsed.
        began = time.monotonic()
        seen["first took it back"] = await asyncio.wait_for(first.acquire(never), 20)
        seen["after a silent death, s"] = time.monotonic() - began
        # A leader whose lease another replica holds now finds out within its renew deadline.
        began = time.monotonic()
        await asyncio.wait_for(second.hold(), 10)
        seen["second saw it lost, s"] = time.monotonic() - began
        seen["transitions"] = kubectl.get("lease", name)["spec"]["leaseTransitions"]
        return seen

    try:
        seen = asyncio.run(scenario())
    finally:
        kubectl("delete", "lease", name, check=False)
    print(f"\nleader election on the API server: {seen}")
    assert seen["first took it"] is True
    assert seen["second took it meanwhile"] is False
    assert seen["holder"] == "first"
    assert seen["second took it after release"] is True
    assert seen["after release, s"] < TIMING.retry_period * 1.2 + 1  # type: ignore[operator]
    assert seen["first took it back"] is True
    assert seen["after a silent death, s"] >= TIMING.duration - 0.5  # type: ignore[operator]
    assert seen["second saw it lost, s"] <= TIMING.renew_deadline + 1  # type: ignore[operator]
    assert seen["transitions"] == 2
