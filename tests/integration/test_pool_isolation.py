"""Pooled agents against hostile tasks, on the real Docker engine with a real Redis.

Every attack of tests/pool_attacks.py, each its own test, on a pool of one agent, in both ways a
runner can run: as root running tasks as another user (``user``, the default), and as the one
non-root user of its agent without capabilities (``shared``, as in pods under the Pod Security
Standard ``restricted``), where it protects itself by being PID 1 and not dumpable.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import docker
import pytest

from controller.backends.base import AgentSpec
from controller.backends.docker import DockerBackend
from controller.config import Settings
from controller.engine import Engine
from controller.models import WorkflowPhase, WorkflowStatus, parse_agent_pool, parse_workflow
from controller.pools import PoolManager
from controller.store import RedisStore
from tests.conftest import sh, workflow_doc
from tests.pool_attacks import ATTACKS, PoolUnderAttack, build_attack_image, pool_under_attack

pytestmark = pytest.mark.integration


class OneUserDockerBackend(DockerBackend):
    """Pool agents as one non-root user without capabilities: the runner may not switch users."""

    def _container_config(self, spec: AgentSpec) -> dict[str, Any]:
        config = super()._container_config(spec)
        if spec.resident:
            uid, gid = spec.task_user
            config.update(user=f"{uid}:{gid}", cap_add=[])
        return config


@pytest.fixture(scope="session")
def attack_image(docker_client: docker.DockerClient) -> str:
    return build_attack_image()


@pytest.fixture(scope="module", params=["user", "shared"])
def attacked(request: pytest.FixtureRequest, redis_url: str,
             attack_image: str) -> Iterator[PoolUnderAttack]:
    settings = Settings.from_env({}, redis_url=redis_url, pool_wait_seconds=0)
    backend = DockerBackend if request.param == "user" else OneUserDockerBackend
    with pool_under_attack(settings, lambda: backend.connect(settings), request.param) as pool:
        yield pool


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_task_leaves_nothing_to_the_next(attacked: PoolUnderAttack, attack: str) -> None:
    ATTACKS[attack](attacked)


def run_pooled(redis_url: str, steps: list[dict[str, Any]], pool_spec: dict[str, Any],
               meanwhile: Callable[[str], None] | None = None) -> WorkflowStatus:
    """Run a workflow of pooled steps through the engine, with a pool "agents" of its own;
    ``meanwhile`` gets the pool's uid in a thread of its own while it runs."""
    settings = Settings.from_env({}, redis_url=redis_url, pool_wait_seconds=0)
    workflow = parse_workflow(workflow_doc(*({"pool": "agents", **step} for step in steps)))
    pool = parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "agents"},
                             "spec": {"image": "agentainer/busybox:latest", **pool_spec}})

    async def scenario() -> WorkflowStatus:
        store = await RedisStore.connect(redis_url)
        backend = await DockerBackend.connect(settings)
        pools = PoolManager(store, settings)
        state = pools.register(pool, str(uuid.uuid4()), backend)
        await pools.reconcile(state)
        helper = threading.Thread(target=meanwhile, args=(state.uid,)) if meanwhile else None
        if helper:
            helper.start()
        try:
            return await asyncio.wait_for(Engine(backend, store, settings, pools).run(workflow),
                                          120)
        finally:
            if helper:
                helper.join()
            await pools.drain(state, timeout=5)
            await backend.close()
            await store.close()

    return asyncio.run(scenario())


def test_pooled_step_past_its_timeout_is_deadline_exceeded_and_keeps_its_clean_agent(
        redis_url: str, docker_client: docker.DockerClient) -> None:
    status = run_pooled(redis_url, [
        {"name": "slow", "timeoutSeconds": 1, "command": sh("echo partial; sleep 30")},
    ], {"minSize": 1, "maxSize": 1})

    assert status.phase is WorkflowPhase.FAILED
    (agent,) = status.step("slow").agents
    assert (agent.reason, agent.exit_code) == ("DeadlineExceeded", 137)
    assert "ran past timeoutSeconds (1)" in (status.step("slow").message or "")


def test_pooled_output_past_the_limit_is_cut_and_marked_truncated(
        redis_url: str, docker_client: docker.DockerClient) -> None:
    status = run_pooled(redis_url, [
        {"name": "loud", "command": sh("yes 0123456789 | head -c 5000000")},
        {"name": "quiet", "command": sh("echo fine")},
    ], {"minSize": 1, "maxSize": 1})

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    loud = status.step("loud")
    assert loud.agents[0].output_truncated is True
    assert len(loud.output or "") == 1 << 20  # the output limit (1 MiB), trimmed of nothing
    assert status.step("quiet").agents[0].output_truncated is None
    assert status.step("quiet").output == "fine"


def test_runner_killed_mid_task_fails_the_attempt_and_the_step_retries_on_a_new_agent(
        redis_url: str, docker_client: docker.DockerClient) -> None:
    """Nothing inside an agent can kill its runner; the engine it runs on can. The task then
    fails as the agent's ("is gone"), the pool replaces the agent, the step retries."""
    def kill_the_busy_agent(uid: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for container in docker_client.containers.list(
                    filters={"label": f"agentainer.dev/pool-uid={uid}"}):
                if "sleep 60" in str(container.top().get("Processes")):
                    container.kill()
                    return
            time.sleep(0.1)

    status = run_pooled(redis_url, [
        {"name": "work", "retries": {"limit": 1, "backoffSeconds": 0},
         "command": sh('[ "$AGENTAINER_ATTEMPT" = 1 ] && sleep 60; echo "done $AGENTAINER_ATTEMPT"')},
    ], {"minSize": 1, "maxSize": 1}, meanwhile=kill_the_busy_agent)

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    step = status.step("work")
    assert step.output == "done 2"
    first, second = step.agents
    assert first.phase == "Failed" and first.reason == "Lost"
    assert first.name != second.name  # the dead agent was not leased again


def test_pool_that_opts_into_root_runs_tasks_as_root_and_still_ends_what_they_leave(
        redis_url: str, attack_image: str) -> None:
    """runAsUser 0: what still holds (processes, scratch places, env); a root task may change
    any file, which docs/pool-isolation.md says."""
    settings = Settings.from_env({}, redis_url=redis_url, pool_wait_seconds=0)
    with pool_under_attack(settings, lambda: DockerBackend.connect(settings), "root",
                           runAsUser=0) as pool:
        first, who = pool.task(sh("id -u; sleep 300 & echo x > /tmp/attack-left; "
                                  "export LEFT=1"), {"ATTACKER": "1"})
        second, after = pool.task(sh("ps -o args | grep -c '[s]leep 300'; ls -A /tmp; "
                                     "echo ${LEFT-unset} ${ATTACKER-unset}"))

    assert who.stdout == "0\n"
    assert first == second and after.stdout == "0\nunset unset\n"
