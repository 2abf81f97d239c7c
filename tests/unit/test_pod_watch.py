"""The pod watch on a scripted API client: waiters wake on the watch's events, a pod deleted
or never made is said to be gone, an expired version is listed afresh, a failing list reaches
the waiters as the API server's error; and no request is made per wait or per second."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import urllib3.exceptions
from kubernetes.client import ApiException

from controller.backends import podwatch
from controller.backends.kubernetes import api_error
from controller.backends.podwatch import PodWatch
from controller.errors import BackendUnavailableError, NotFoundError

LIMIT_SECONDS = 5


def pod(name: str, phase: str = "Running") -> Any:
    return SimpleNamespace(metadata=SimpleNamespace(name=name, resource_version="1"),
                           status=SimpleNamespace(phase=phase))


class ScriptedCore:
    """A CoreV1Api whose lists answer from ``listings`` (an exception is raised) and whose
    watches yield what the test puts in ``events`` (an ApiException ends one, as the API server
    ends a watch whose version expired)."""

    def __init__(self, *listings: Any) -> None:
        self.listings = list(listings)
        self.events: queue.Queue[Any] = queue.Queue()
        self.lists = self.reads = 0
        self.closed = threading.Event()
        self.unselected: list[Any] = []
        """What reads of a pod the watch does not select give, in turn."""

    def list_namespaced_pod(self, namespace: str, **kwargs: Any) -> Any:
        self.lists += 1
        answer = self.listings.pop(0) if len(self.listings) > 1 else self.listings[0]
        if isinstance(answer, BaseException):
            raise answer
        return SimpleNamespace(metadata=SimpleNamespace(resource_version="1"), items=answer)

    def read_namespaced_pod(self, name: str, namespace: str) -> Any:
        self.reads += 1
        if self.unselected:
            return self.unselected.pop(0) if len(self.unselected) > 1 else self.unselected[0]
        raise ApiException(status=404, reason="Not Found")

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[dict[str, Any]]:
        while not self.closed.is_set():
            try:
                event = self.events.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(event, BaseException):
                raise event
            yield event


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedCore]:
    scripted = ScriptedCore([])
    monkeypatch.setattr(podwatch.kubernetes.watch.Watch, "stream",
                        lambda self, *a, **k: scripted.stream(*a, **k))
    monkeypatch.setattr(podwatch, "ABSENT_SECONDS", 0.05)
    monkeypatch.setattr(podwatch, "BACKOFF_SECONDS", (0.0, 0.02))
    monkeypatch.setattr(podwatch, "UNWATCHED_SECONDS", 0.05)
    monkeypatch.setattr(podwatch, "FAILING_SECONDS", 0.0)
    yield scripted
    scripted.closed.set()


def play(core: ScriptedCore, scenario: Any) -> Any:
    async def go() -> Any:
        watch = PodWatch(core, "a=b", api_error)  # type: ignore[arg-type]
        try:
            return await asyncio.wait_for(scenario(watch), LIMIT_SECONDS)
        finally:
            watch.close()
    return asyncio.run(go())


def ended(found: Any) -> bool:
    return bool(found.status.phase in ("Succeeded", "Failed"))


def test_a_waiter_wakes_when_the_watch_shows_its_pod_ended_without_a_read(
        core: ScriptedCore) -> None:
    core.listings = [[pod("a"), pod("b")]]

    async def scenario(watch: PodWatch) -> Any:
        waiting = asyncio.create_task(watch.until("team", "a", ended))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        bookmark = {"metadata": {"resourceVersion": "9"}}  # the client leaves it a dict
        core.events.put({"type": "BOOKMARK", "object": bookmark, "raw_object": bookmark})
        core.events.put({"type": "MODIFIED", "object": pod("b", "Succeeded")})
        core.events.put({"type": "MODIFIED", "object": pod("a", "Succeeded")})
        return await waiting, await watch.until("team", "b", ended)

    (a, b) = play(core, scenario)
    assert (a.metadata.name, b.metadata.name) == ("a", "b")
    assert (core.lists, core.reads) == (1, 0)  # one list for both, whatever the time


def test_a_pod_deleted_while_waited_for_is_gone(core: ScriptedCore) -> None:
    core.listings = [[pod("a")]]

    async def scenario(watch: PodWatch) -> None:
        waiting = asyncio.create_task(watch.until("team", "a", ended))
        await asyncio.sleep(0.1)
        core.events.put({"type": "DELETED", "object": pod("a")})
        await waiting

    with pytest.raises(NotFoundError, match="pod a: it was deleted"):
        play(core, scenario)


def test_a_pod_the_watch_never_shows_is_read_once_and_said_to_be_gone(
        core: ScriptedCore) -> None:
    with pytest.raises(NotFoundError, match="reading pod nowhere"):
        play(core, lambda watch: watch.until("team", "nowhere", ended))
    assert core.reads == 1


def test_a_version_too_old_is_listed_afresh_and_what_the_new_list_shows_is_seen(
        core: ScriptedCore) -> None:
    core.listings = [[pod("a")], [pod("a", "Failed")]]

    async def scenario(watch: PodWatch) -> Any:
        waiting = asyncio.create_task(watch.until("team", "a", ended))
        await asyncio.sleep(0.1)
        core.events.put(ApiException(status=410, reason="Gone"))
        return await waiting

    assert play(core, scenario).status.phase == "Failed"
    assert core.lists == 2


def test_a_failing_list_reaches_the_waiters_and_a_later_list_lets_them_go_on(
        core: ScriptedCore) -> None:
    down = urllib3.exceptions.NewConnectionError(None, "Connection refused")
    core.listings = [down, down, [pod("a", "Succeeded")]]

    async def scenario(watch: PodWatch) -> tuple[BaseException, Any]:
        with pytest.raises(BackendUnavailableError, match="cannot reach the API server") as \
                raised:
            await watch.until("team", "a", ended)
        await asyncio.sleep(0.15)  # the engine retries after a pause; the watch lists again
        return raised.value, await watch.until("team", "a", ended)

    error, found = play(core, scenario)
    assert error.__cause__ is down and error.retryable
    assert found.status.phase == "Succeeded"


def test_a_list_refused_for_a_while_is_waited_through(
        core: ScriptedCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API server just restarted refuses (403) until its authorizer has caught up: the
    waiters hear nothing of it and get the pod from the list that lands at last."""
    monkeypatch.setattr(podwatch, "FAILING_SECONDS", 30.0)
    refused = ApiException(status=403, reason="Forbidden")
    core.listings = [refused, refused, refused, [pod("a", "Succeeded")]]

    async def scenario(watch: PodWatch) -> Any:
        return await watch.until("team", "a", ended)

    assert play(core, scenario).status.phase == "Succeeded"
    assert core.lists == 4


def test_a_pod_the_watch_does_not_select_is_read_again_until_it_ends(
        core: ScriptedCore) -> None:
    core.unselected = [pod("stray", "Pending"), pod("stray", "Running"),
                       pod("stray", "Succeeded")]

    async def scenario(watch: PodWatch) -> Any:
        found = await watch.until("team", "stray", ended)
        core.events.put(ApiException(status=410, reason="Gone"))  # a relist keeps it too
        return found

    assert play(core, scenario).status.phase == "Succeeded"
    assert core.reads == 3
