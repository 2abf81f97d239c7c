"""The Docker engine restarted under running workflows (live-restore): agents that end while it
is down keep their output and exit code, and none is started twice."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from controller.backends.base import AgentResult
from controller.backends.docker import DockerBackend
from controller.engine import Engine
from controller.models import AgentReason, WorkflowStatus, parse_agent_pool, parse_workflow
from controller.store import RedisStore
from tests.conftest import IMAGE, restart_dockerd, sh, workflow_doc
from tests.integration.conftest import Runner

pytestmark = pytest.mark.integration


def test_agents_that_end_while_the_engine_is_down_keep_their_output_and_exit_code(
        runner: Runner, live_restore: None) -> None:
    passing = workflow_doc({"name": "fan", "parallel": {"replicas": 3},
                            "command": sh('sleep 2; echo "kept $AGENTAINER_ITEM_INDEX"; '
                                          'echo "noise" >&2')})
    failing = workflow_doc({"name": "bad",
                            "command": sh("sleep 2; echo partial; echo 'why: disk full' >&2; "
                                          "exit 3")})

    async def scenario() -> list[WorkflowStatus]:
        runs = [await runner.start(document) for document in (passing, failing)]
        executions = [asyncio.ensure_future(run.execute()) for run, _, _ in runs]
        await asyncio.sleep(1)  # every agent started, none ended
        await asyncio.to_thread(restart_dockerd, 4)  # they all end while it is down
        try:
            return list(await asyncio.wait_for(asyncio.gather(*executions), 120))
        finally:
            for _, store, backend in runs:
                await backend.close()
                await store.close()

    ok, bad = asyncio.run(scenario())

    assert ok.phase == "Succeeded", ok.message
    fan = ok.step("fan")
    assert fan.outputs == ["kept 0", "kept 1", "kept 2"]
    assert [agent.attempt for agent in fan.agents] == [1, 1, 1]  # none started again
    assert bad.phase == "Failed"
    step = bad.step("bad")
    assert [(agent.attempt, agent.exit_code) for agent in step.agents] == [(1, 3)]
    assert "why: disk full" in (step.message or "")
    for run_uid in runner.uids:
        assert len(runner.containers(run_uid)) <= 1  # one agent per unit, whatever the policy


def test_an_agent_stopped_from_outside_is_told_apart_from_one_that_ended_by_itself(
        runner: Runner) -> None:
    """The runner keeps the signal that stopped the agent from outside: read by a process that
    did not watch the agent throughout (one restarted, or one that saw the engine away), a
    stop it did not ask for is the engine's (as it shuts down), not the agent's failure."""
    from controller.backends.base import LABEL_MANAGED_BY, MANAGED_BY, AgentSpec

    def spec(name: str, script: str) -> AgentSpec:
        return AgentSpec(name=f"outage-{name}-{uuid.uuid4().hex[:6]}", image=IMAGE,
                         command=["sh", "-c"], args=[script], env={},
                         labels={LABEL_MANAGED_BY: MANAGED_BY})

    async def scenario() -> dict[str, AgentResult]:
        first = await DockerBackend.connect(runner.settings)
        handles = {"stopped from outside": await first.start(spec("outside", "sleep 30")),
                   "killed without a word": await first.start(spec("lost", "sleep 30")),
                   "stopped by its controller": await first.start(spec("ours", "sleep 30")),
                   "killed itself": await first.start(spec("self", "sleep 0.5; kill $$"))}
        await asyncio.sleep(1)
        runner.docker.api.stop(handles["stopped from outside"].id, timeout=5)
        # Its runner dies with it, as when the engine loses a container while it restarts.
        runner.docker.api.kill(handles["killed without a word"].id, "SIGKILL")
        later = await DockerBackend.connect(runner.settings)  # a restarted controller
        await later.stop(handles["stopped by its controller"], 5)
        try:
            return {what: await later.wait(handle) for what, handle in handles.items()}
        finally:
            for handle in handles.values():
                await later.remove(handle)
            await first.close()
            await later.close()

    results = asyncio.run(scenario())

    assert {what: (r.exit_code, r.interrupted) for what, r in results.items()} == {
        "stopped from outside": (143, True), "killed without a word": (137, True),
        "stopped by its controller": (143, False), "killed itself": (143, False)}


def test_a_pooled_task_whose_connection_the_engine_broke_runs_again_without_a_retry(
        runner: Runner, live_restore: None) -> None:
    """dockerd restarting cuts the attach connection of every pool agent (which runs on): the
    task is run again, not counted as one of the step's retries (it has none here)."""
    from controller.pools import PoolManager

    name = f"outage-{uuid.uuid4().hex[:6]}"
    pool = {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": name}, "spec": {"image": IMAGE, "minSize": 2, "maxSize": 2}}
    document = workflow_doc({"name": "task", "pool": name,
                             "command": sh("sleep 3; echo done")})
    workflow, agent_pools = parse_workflow(document), [parse_agent_pool(pool)]

    async def scenario() -> WorkflowStatus:
        store = await RedisStore.connect(runner.settings.redis_url)
        backend = await DockerBackend.connect(runner.settings)
        pools = PoolManager(store, runner.settings)
        (state,) = [pools.register(p, str(uuid.uuid4()), backend) for p in agent_pools]
        try:
            await pools.reconcile(state)
            run = Engine(backend, store, runner.settings, pools).prepare(workflow)
            runner.uids.append(run.uid)
            execution = asyncio.ensure_future(run.execute())
            await asyncio.sleep(1.5)  # the task runs
            await asyncio.to_thread(restart_dockerd, 0)
            return await asyncio.wait_for(execution, 120)
        finally:
            await pools.drain(state)
            await backend.close()
            await store.close()

    status = asyncio.run(scenario())

    assert status.phase == "Succeeded", status.message
    agents = status.step("task").agents
    assert [a.reason for a in agents] == [AgentReason.INTERRUPTED, AgentReason.COMPLETED]
    assert status.step("task").output == "done"
