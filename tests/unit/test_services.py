"""What the handlers share: the status patch turns every error of the Kubernetes client into
ours (KubernetesError, retried), so that no handler sees a foreign one."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes.client import ApiException

from controller.config import Settings
from controller.handlers.context import KubernetesError, Services
from controller.metrics import Metrics


class FailingCustomObjects:
    """The custom objects API, failing every status patch with ``error``."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def patch_namespaced_custom_object_status(self, *args: Any) -> None:
        raise self.error


def services(error: Exception) -> Services:
    """Services whose status patch fails with ``error``; nothing else of them is used."""
    return Services(settings=Settings(), store=None, metrics=Metrics(),  # type: ignore[arg-type]
                    custom_objects=FailingCustomObjects(error),
                    pools=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [
    pytest.param(urllib3.exceptions.MaxRetryError(None, "/apis"), id="MaxRetryError"),
    pytest.param(urllib3.exceptions.ProtocolError("Connection aborted."), id="ProtocolError"),
    pytest.param(urllib3.exceptions.NewConnectionError(None, "Connection refused"),
                 id="NewConnectionError"),
    pytest.param(ConnectionRefusedError(111, "Connection refused"), id="OSError"),
    pytest.param(ApiException(status=500, reason="Internal Server Error"), id="ApiException"),
])
def test_a_status_patch_that_fails_raises_our_retryable_error(error: Exception) -> None:
    with pytest.raises(KubernetesError, match="patching workflows/wf status") as raised:
        asyncio.run(services(error).patch_status("workflows", "team", "wf", {"phase": "Running"}))

    assert raised.value.retryable
    assert raised.value.__cause__ is error


def test_a_status_patch_of_a_deleted_resource_is_no_error() -> None:
    asyncio.run(services(ApiException(status=404, reason="Not Found")).patch_status(
        "workflows", "team", "wf", {"phase": "Running"}))


def test_status_writes_are_spaced_out_when_many_workflows_run() -> None:
    """Each running workflow is written at most every interval; with more running than the
    API server's share allows, each less often, so that all together stay within it."""
    shared = Services(settings=Settings(status_interval_seconds=1, status_writes_per_second=50),
                      store=None, metrics=Metrics(),  # type: ignore[arg-type]
                      custom_objects=None, pools=None)  # type: ignore[arg-type]
    shared.running = 10
    assert shared.status_interval() == 1
    shared.running = 1000
    assert shared.status_interval() == 20


def test_a_status_writer_counts_among_the_running_until_it_stops_or_lets_go() -> None:
    from controller.handlers.reporting import StatusWriter

    shared = services(ApiException(status=404, reason="Not Found"))

    async def scenario() -> list[int]:
        counts = []
        stopped, abandoned = (StatusWriter(shared, "team", name, name) for name in "ab")
        stopped.start()
        abandoned.start()
        counts.append(shared.running)
        await stopped.stop()
        await stopped.stop()  # a second stop counts nothing twice
        counts.append(shared.running)
        abandoned.abandon()
        counts.append(shared.running)
        return counts

    assert asyncio.run(scenario()) == [2, 1, 0]
