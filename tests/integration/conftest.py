"""Fixtures on the real Docker engine and a real Redis: run workflows, inspect what is left."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import docker
import pytest

from controller.backends.base import LABEL_WORKFLOW_UID
from controller.backends.docker import DockerBackend
from controller.config import Settings
from controller.engine import Engine, WorkflowRun
from controller.models import Workflow, WorkflowStatus, parse_workflow
from controller.store import RedisStore
from tests.conftest import IMAGE


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{IMAGE} is not built: run `make image` (make test does)")
    except docker.errors.DockerException as error:
        pytest.fail(f"the Docker engine is not reachable ({error}): run `make docker`")
    yield client
    client.close()


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings.from_env({}, redis_url=redis_url, stop_grace_seconds=1, pool_wait_seconds=0)


@dataclass
class Runner:
    """Runs workflows through the real engine, and knows which containers they left behind."""

    settings: Settings
    docker: docker.DockerClient
    uids: list[str]

    def containers(self, uid: str) -> list[Any]:
        return list(self.docker.containers.list(  # one removed meanwhile: gone, no error
            all=True, filters={"label": f"{LABEL_WORKFLOW_UID}={uid}"}, ignore_removed=True))

    async def start(self, document: dict[str, Any]) -> tuple[WorkflowRun, RedisStore,
                                                              DockerBackend]:
        workflow = parse_workflow(document)
        store = await RedisStore.connect(self.settings.redis_url)
        backend = await DockerBackend.connect(self.settings)
        run = Engine(backend, store, self.settings).prepare(workflow)
        self.uids.append(run.uid)
        return run, store, backend

    def run(self, document: dict[str, Any]) -> tuple[WorkflowStatus, WorkflowRun]:
        async def go() -> tuple[WorkflowStatus, WorkflowRun]:
            run, store, backend = await self.start(document)
            try:
                return await run.execute(), run
            finally:
                await backend.close()
                await store.close()

        return asyncio.run(go())


@pytest.fixture
def runner(settings: Settings, docker_client: docker.DockerClient) -> Iterator[Runner]:
    runner = Runner(settings, docker_client, [])
    yield runner
    for uid in runner.uids:  # leave the engine as we found it, whatever a test kept
        for container in runner.containers(uid):
            container.remove(force=True)


def load(path: str) -> Workflow:
    from controller.manifests import load_workflow
    return load_workflow(path)
