"""The pods of agents as one watch per namespace sees them, shared by every waiter of the
process: a list, then a watch from its version (again after each watch ends, a new list when
the version is too old), in a thread of its own per namespace. A pod's change wakes those who
wait for that pod; nothing polls, so an agent costs the API server the same few requests
however long it runs."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import ApiException, CoreV1Api

from controller.backends.following import LoopFollower
from controller.errors import AgentainerError, BackendError, NotFoundError

logger = logging.getLogger(__name__)

WATCH_SECONDS = 300
"""How long one watch request lasts before it is made again (from the version it reached)."""
ABSENT_SECONDS = 2.0
"""How long a pod asked for and not seen yet may take to show up in the watch before a single
read says whether it exists at all."""
UNWATCHED_SECONDS = 5.0
"""How often a pod the watch does not show is read again while someone waits for it."""
QUICK_SECONDS = 1.0
"""A watch that ended sooner than this is made again only this long after it began."""
BACKOFF_SECONDS = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Pauses between attempts to list again after the API server failed a list or a watch."""
FAILING_SECONDS = 30.0
"""How long lists and watches may keep failing before the waiters hear why. An API server that
restarts refuses for a while (unreachable, then 403 until its authorizer has caught up): the
waiters wait through that, and the list that lands at last tells them what they missed."""

Convert = Callable[[str, BaseException], AgentainerError | None]
"""The project's error for what the client raised (None: not one of the client's errors)."""


class PodWatch(LoopFollower):
    """Pods with one label selector, by namespace and name, kept current by a watch."""

    def __init__(self, core: CoreV1Api, selector: str, convert: Convert) -> None:
        self._core = core
        self._selector = selector
        self._convert = convert
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pods: dict[str, dict[str, Any]] = {}
        self._listed: dict[str, int] = {}
        """How many lists of each namespace have landed (0: none yet)."""
        self._errors: dict[str, AgentainerError] = {}
        """Why the last list or watch of a namespace failed, until a list lands again."""
        self._gone: set[tuple[str, str]] = set()
        self._unwatched: set[tuple[str, str]] = set()
        """Pods known from a read of their own, which the watch has not shown since."""
        self._waiters: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        self.requests = 0
        """Lists, watches and reads made so far (for the benchmarks)."""

    def cached(self, namespace: str, name: str) -> Any | None:
        """The pod as the watch last showed it (None: not shown)."""
        return self._pods.get(namespace, {}).get(name)

    async def until(self, namespace: str, name: str, done: Callable[[Any], bool],
                    recheck: Callable[[], float | None] = lambda: None) -> Any:
        """The pod, once ``done(pod)`` holds (``done`` may raise, to give up); NotFoundError
        once the pod is gone, or found not to exist; the error of the API server when its list
        or watch fails (the caller retries, as after any call that failed). ``done`` is asked
        again on each change of the pod, and also ``recheck()`` seconds after it was last
        asked, when that says a number (for a wait whose end comes with time, not news)."""
        self._start(namespace)
        key = (namespace, name)
        absent_since: float | None = None
        try:
            while True:
                pod = self._pods.get(namespace, {}).get(name)
                if pod is not None and done(pod):
                    return pod
                if key in self._gone:
                    raise NotFoundError(f"reading pod {name}: it was deleted")
                if (error := self._errors.get(namespace)) is not None:
                    raise error
                timeout = None
                if key in self._unwatched:  # read, but not among what the watch selects
                    timeout = UNWATCHED_SECONDS
                elif pod is None and self._listed.get(namespace):
                    absent_since = absent_since or time.monotonic()
                    timeout = absent_since + ABSENT_SECONDS - time.monotonic()
                    if timeout <= 0:
                        await self._read_once(namespace, name)
                        absent_since, timeout = None, None
                        continue
                if (again := recheck()) is not None:
                    timeout = again if timeout is None else min(timeout, again)
                if not await self._change(key, timeout) and key in self._unwatched:
                    await self._read_once(namespace, name)
        finally:
            if not self._waiters.get(key):
                self._gone.discard(key)
                self._unwatched.discard(key)

    async def _change(self, key: tuple[str, str], timeout: float | None) -> bool:
        """Wait for news of the pod, for up to ``timeout``: whether there was any."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, set()).add(future)
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            waiters = self._waiters.get(key, set())
            waiters.discard(future)
            if not waiters:
                self._waiters.pop(key, None)

    async def _read_once(self, namespace: str, name: str) -> None:
        """A pod the watch has not shown: read it once (it may have been made before the watch
        began and be listed soon, or never have existed, or be gone)."""
        self.requests += 1
        try:
            pod = await asyncio.to_thread(self._core.read_namespaced_pod, name, namespace)
        except BaseException as error:  # noqa: BLE001 - the client's errors, converted
            converted = self._convert(f"reading pod {name}", error)
            if converted is None:
                raise
            raise converted from error
        if (namespace, name) in self._unwatched or \
                name not in self._pods.setdefault(namespace, {}):
            # The watch has not shown it: should it never (a pod made without our label),
            # it is read again now and then rather than waited for in vain.
            self._pods[namespace][name] = pod
            self._unwatched.add((namespace, name))

    def _start(self, namespace: str) -> None:
        self._loop = self._loop or asyncio.get_running_loop()
        thread = self._threads.get(namespace)
        if thread is not None and thread.is_alive():
            return
        thread = threading.Thread(target=self._run, args=(namespace,), daemon=True,
                                  name=f"pod-watch-{namespace}")
        self._threads[namespace] = thread
        thread.start()

    # --- the watch's thread -------------------------------------------------------------------

    def _run(self, namespace: str) -> None:
        failures = 0
        failing_since = 0.0
        version: str | None = None
        while not self._stopping.is_set() and self._listening():
            try:
                if version is None:
                    self.requests += 1
                    listed: Any = self._core.list_namespaced_pod(
                        namespace, label_selector=self._selector, _request_timeout=60)
                    version = listed.metadata.resource_version
                    self._post(self._replace, namespace, listed.items)
                began = time.monotonic()
                version = self._watch(namespace, version)
                failures = 0
                if time.monotonic() - began < QUICK_SECONDS:  # a server that ends watches at
                    self._stopping.wait(QUICK_SECONDS)       # once is not asked in a loop
            except Exception as error:  # noqa: BLE001 - whatever broke, list again
                if isinstance(error, ApiException) and error.status == 410:
                    version = None  # the version is too old: list afresh
                    continue
                failing_since = failing_since if failures else time.monotonic()
                self._failed(namespace, error, failures, time.monotonic() - failing_since)
                failures += 1
                version = None

    def _watch(self, namespace: str, version: str) -> str | None:
        """Follow the namespace's pods from ``version``; the version reached (None: list
        again)."""
        self.requests += 1
        stream = kubernetes.watch.Watch()  # type: ignore[no-untyped-call]
        try:
            for event in stream.stream(  # type: ignore[no-untyped-call]
                    self._core.list_namespaced_pod, namespace, label_selector=self._selector,
                    resource_version=version, timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True, _request_timeout=WATCH_SECONDS + 30):
                if self._stopping.is_set() or not self._listening():
                    return None
                if event["type"] == "ERROR":
                    return None
                if event["type"] == "BOOKMARK":  # the client leaves these undecoded
                    version = (event.get("raw_object") or {}).get("metadata", {}).get(
                        "resourceVersion") or version
                    continue
                pod = event["object"]
                version = pod.metadata.resource_version or version
                self._post(self._apply, namespace, event["type"], pod)
        finally:
            stream.stop()  # type: ignore[no-untyped-call]
        return version

    def _failed(self, namespace: str, error: BaseException, failures: int,
                failing: float) -> None:
        """Pause before listing again; after ``FAILING_SECONDS`` of failures, tell the
        waiters why."""
        converted = self._convert(f"watching the pods of {namespace}", error) or \
            BackendError(f"watching the pods of {namespace}: {error!r}")
        converted.__cause__ = error
        logger.warning("%s; listing again", converted)
        if failing >= FAILING_SECONDS:
            self._post(self._fail, namespace, converted)
        self._stopping.wait(BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)])

    # --- on the event loop --------------------------------------------------------------------

    def _replace(self, namespace: str, pods: list[Any]) -> None:
        before = self._pods.get(namespace, {})
        now = {name: pod for name, pod in before.items() if (namespace, name) in self._unwatched}
        now.update((pod.metadata.name, pod) for pod in pods)
        self._pods[namespace] = now
        self._listed[namespace] = self._listed.get(namespace, 0) + 1
        self._errors.pop(namespace, None)
        for name in set(before) - set(now):
            self._gone_now((namespace, name))
        for key in [key for key in self._waiters if key[0] == namespace]:
            self._wake(key)

    def _apply(self, namespace: str, kind: str, pod: Any) -> None:
        name = pod.metadata.name
        key = (namespace, name)
        if kind == "DELETED":
            self._pods.get(namespace, {}).pop(name, None)
            self._gone_now(key)
        else:
            self._pods.setdefault(namespace, {})[name] = pod
            self._unwatched.discard(key)
            self._wake(key)

    def _gone_now(self, key: tuple[str, str]) -> None:
        if key in self._waiters:
            self._gone.add(key)
            self._wake(key)

    def _fail(self, namespace: str, error: AgentainerError) -> None:
        self._errors[namespace] = error
        for key in [key for key in self._waiters if key[0] == namespace]:
            self._wake(key)

    def _wake(self, key: tuple[str, str]) -> None:
        for future in self._waiters.get(key, ()):
            if not future.done():
                future.set_result(None)

    def close(self) -> None:
        self._stopping.set()
