"""Agent pools on the real Docker engine with a real Redis: leases, resets, recycling."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from controller.backends.docker import DockerBackend
from controller.config import Settings
from controller.errors import AgentLostError, PoolUnavailableError
from controller.models import parse_agent_pool
from controller.pools import PoolManager, PoolState
from controller.store import RedisStore
from tests.conftest import IMAGE, ROOT, sh

pytestmark = pytest.mark.integration

Scenario = Callable[[PoolManager, PoolState], Awaitable[Any]]


def pool_doc(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
            "metadata": {"name": f"p-{uuid.uuid4().hex[:6]}"},
            "spec": {"image": IMAGE, **spec}}


class Pools:
    """Runs a scenario against a fresh pool, and drains it afterwards whatever happened."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, scenario: Scenario, uid: str | None = None,
            backend_class: type[DockerBackend] = DockerBackend, **spec: Any) -> Any:
        async def go() -> Any:
            store = await RedisStore.connect(self.settings.redis_url)
            backend = await backend_class.connect(self.settings)
            manager = PoolManager(store, self.settings)
            state = manager.register(parse_agent_pool(pool_doc(**spec)), uid or str(uuid.uuid4()),
                                     backend)
            try:
                await manager.reconcile(state)
                return await scenario(manager, state)
            finally:
                await manager.drain(state, timeout=5)
                await backend.close()
                await store.close()

        return asyncio.run(go())


@pytest.fixture
def pools(settings: Settings, docker_client: docker.DockerClient) -> Pools:
    return Pools(settings)


async def task(manager: PoolManager, state: PoolState, script: str,
               env: dict[str, str] | None = None, timeout: float | None = 30) -> Any:
    lease = await manager.lease(state)
    result = await manager.run(lease, sh(script), env or {}, timeout)
    return lease.agent.name, result


def test_task_returns_exact_stdout_stderr_and_exit_status(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        return await task(manager, state, "printf 'a\\n\\nb'; printf 'oops' >&2; exit 7")

    _, result = pools.run(scenario, minSize=1, maxSize=1)

    assert (result.exit_code, result.stdout, result.stderr) == (7, "a\n\nb", "oops")


def test_argv_words_reach_the_task_as_data(pools: Pools) -> None:
    hostile = ["$(touch /tmp/pwned)", "it's \"quoted\"", "a;b && c", "line\nbreak", "*"]

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        printed = await manager.run(lease, ["printf", "%s|", *hostile], {}, 30)
        lease = await manager.lease(state)
        pwned = await manager.run(lease, sh("ls /tmp/pwned 2>/dev/null || echo clean"), {}, 30)
        return printed, pwned

    printed, pwned = pools.run(scenario, minSize=1, maxSize=1)

    assert printed.stdout == "".join(f"{word}|" for word in hostile)
    assert pwned.stdout.strip() == "clean"


def test_more_tasks_than_agents_never_share_an_agent(pools: Pools, settings: Settings) -> None:
    """Two managers (two controllers) share one pool through Redis; each lease interval is
    recorded, and no agent ever has two at once."""
    intervals: list[tuple[str, float, float]] = []

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        other = PoolManager(manager.store, settings)
        other_state = other.register(state.pool, state.uid, state.backend)

        async def one(chosen: PoolManager, chosen_state: PoolState) -> None:
            lease = await chosen.lease(chosen_state)
            began = time.monotonic()
            await chosen_state.backend.run_task(lease.agent, sh("sleep 0.05"), {}, 30)
            intervals.append((lease.agent.name, began, time.monotonic()))
            await chosen.release(lease, keep=True)

        await asyncio.gather(*(one(*((manager, state) if i % 2 else (other, other_state)))
                               for i in range(24)))
        return await manager.status(state)

    status = pools.run(scenario, minSize=1, maxSize=3)

    assert len(intervals) == 24
    assert status.total <= 3
    for agent in {name for name, _, _ in intervals}:
        mine = sorted((start, end) for name, start, end in intervals if name == agent)
        for (_, end), (start, _) in zip(mine, mine[1:], strict=False):
            assert start >= end, f"agent {agent} was leased twice at once"
    assert len({name for name, _, _ in intervals}) == 3  # it grew to maxSize under load


def test_reset_removes_what_a_task_left_and_env_never_leaks(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        first = await task(manager, state, "echo secret > /tmp/left; echo w > /work/w; "
                           "export LEAK=1; echo $TOKEN", env={"TOKEN": "t-123"})
        second = await task(manager, state, "ls -A /tmp /work; echo token=${TOKEN-unset} "
                            "leak=${LEAK-unset}")
        return first, second

    (agent1, first), (agent2, second) = pools.run(
        scenario, minSize=1, maxSize=1, resetCommand=sh("rm -rf /tmp/* /work/*"))

    assert agent1 == agent2  # the same warm agent served both
    assert first.stdout.strip() == "t-123"
    assert second.stdout.split() == ["/tmp:", "/work:", "token=unset", "leak=unset"]


def test_agent_is_recycled_after_max_uses(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        return [(await task(manager, state, "hostname"))[1].stdout.strip() for _ in range(5)]

    hosts = pools.run(scenario, minSize=1, maxSize=1, maxUses=2)

    assert hosts[0] == hosts[1] != hosts[2] == hosts[3] != hosts[4]


def test_killed_agent_fails_its_task_and_is_replaced(pools: Pools) -> None:
    client = docker.from_env()

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        running = asyncio.create_task(manager.run(lease, sh("sleep 30"), {}, 60))
        await asyncio.sleep(0.5)
        client.containers.get(lease.agent.id).kill()
        with pytest.raises(AgentLostError, match="is gone"):
            await running
        after = await manager.reconcile(state)
        name, result = await task(manager, state, "echo alive")
        return lease.agent.name, after, name, result

    dead, after, name, result = pools.run(scenario, minSize=1, maxSize=1)

    assert after.total == 1 and after.ready == 1
    assert name != dead
    assert result.stdout.strip() == "alive"


class SlowToStart(DockerBackend):
    """Holds each started agent back from its starter until told: a pod takes seconds to run,
    and a reconcile may come in between."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.started = asyncio.Event()
        self.proceed = asyncio.Event()

    async def start(self, spec: Any) -> Any:
        handle = await super().start(spec)
        self.started.set()
        await self.proceed.wait()
        return handle


def test_reconcile_leaves_an_agent_being_started_to_its_starter(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        backend = state.backend
        assert isinstance(backend, SlowToStart)
        leasing = asyncio.create_task(manager.lease(state))
        await asyncio.wait_for(backend.started.wait(), 60)
        during = await manager.reconcile(state)
        backend.proceed.set()
        lease = await leasing
        result = await manager.run(lease, sh("echo up"), {}, 30)
        return during, result, await manager.reconcile(state)

    during, result, after = pools.run(scenario, backend_class=SlowToStart, minSize=0,
                                      maxSize=1)

    assert result.exit_code == 0 and result.stdout.strip() == "up", result
    assert after.total == 1 and after.ready == 1
    assert during.total == 0  # not adopted from under its starter


def test_task_past_its_timeout_is_ended_and_its_agent_cleaned_for_the_next(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        late = await manager.run(lease, sh("echo started; sleep 30 & sleep 30"), {}, 0.5)
        return lease.agent.name, late, await task(manager, state,
                                                  "echo next; ps -o args | grep -c '[s]leep 30'")

    agent, late, (name, result) = pools.run(scenario, minSize=1, maxSize=1)

    assert late.timed_out and late.exit_code == 137 and late.stdout == "started\n"
    assert name == agent  # the runner ended the task and proved the agent clean: it is kept
    assert result.stdout.split() == ["next", "0"]  # nothing of the late task left


def test_busy_pool_makes_a_task_wait_then_says_so(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        with pytest.raises(PoolUnavailableError, match="stayed busy for leaseTimeoutSeconds"):
            await manager.lease(state)
        await manager.release(lease, keep=True)

    pools.run(scenario, minSize=1, maxSize=1, leaseTimeoutSeconds=1)


LEASE_AND_DIE = """
import asyncio, os, sys
from controller.backends.docker import DockerBackend
from controller.config import Settings
from controller.models import parse_agent_pool
from controller.pools import PoolManager
from controller.store import RedisStore
import json

async def main():
    settings = Settings.from_env({}, redis_url=sys.argv[1], lease_ttl_seconds=2)
    store = await RedisStore.connect(settings.redis_url)
    backend = await DockerBackend.connect(settings)
    manager = PoolManager(store, settings)
    state = manager.register(parse_agent_pool(json.loads(sys.argv[3])), sys.argv[2], backend)
    lease = await manager.lease(state)
    print(lease.agent.name, flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_lease_of_a_process_that_died_is_reclaimed_after_its_ttl(pools: Pools,
                                                                 redis_url: str) -> None:
    uid = str(uuid.uuid4())
    spec = {"minSize": 1, "maxSize": 1, "leaseTimeoutSeconds": 10}

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        import json
        holder = subprocess.Popen(
            [sys.executable, "-c", LEASE_AND_DIE, redis_url, uid, json.dumps(
                {**pool_doc(**spec), "metadata": {"name": state.name}})],
            cwd=ROOT, stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None
        held = await asyncio.to_thread(holder.stdout.readline)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        busy = await manager.reconcile(state)  # the lease is still live
        await asyncio.sleep(2.5)
        reclaimed = await manager.reconcile(state)
        name, result = await task(manager, state, "echo mine")
        return held.strip(), busy, reclaimed, name, result

    held, busy, reclaimed, name, result = pools.run(scenario, uid=uid, **spec)

    assert busy.busy == 1 and busy.ready == 0
    assert reclaimed.ready == 1 and reclaimed.total == 1
    assert name != held  # a reclaimed agent is replaced: its last task may have left a mess
    assert result.stdout.strip() == "mine"


def test_idle_agents_above_min_size_are_removed_after_the_idle_timeout(pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        await asyncio.gather(*(task(manager, state, "sleep 0.3") for _ in range(3)))
        grown = await manager.status(state)
        await asyncio.sleep(1.5)
        return grown, await manager.reconcile(state)

    grown, shrunk = pools.run(scenario, minSize=1, maxSize=3, idleTimeoutSeconds=1)

    assert grown.total == 3
    assert shrunk.total == 1 and shrunk.ready == 1


def test_image_without_a_shell_runs_tasks_the_same_way(pools: Pools, tmp_path: Path) -> None:
    client = docker.from_env()
    (tmp_path / "busybox").write_bytes(Path("/bin/busybox").read_bytes())
    (tmp_path / "busybox").chmod(0o755)
    (tmp_path / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nCMD ["/bin/busybox", "sleep", "3600"]\n')
    client.images.build(path=str(tmp_path), tag="agentainer/noshell:test", rm=True)

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        return await manager.run(
            lease, ["/bin/busybox", "printf", "%s|%s", "$(no shell)", "$X"], {"X": "1"}, 30)

    result = pools.run(scenario, minSize=1, maxSize=1, image="agentainer/noshell:test")

    assert (result.exit_code, result.stdout, result.stderr) == (0, "$(no shell)|$X", "")


def test_reconcile_never_retires_an_agent_that_is_leased_or_just_returned(pools: Pools) -> None:
    """Reconcile runs without a pause while 200 tasks lease and return three agents: an agent
    returned between two reads of an older reconcile looked abandoned and was replaced, once
    from under the task that had just leased it ("agent ... is gone")."""
    from controller.pools import PoolEvent, PoolEventKind

    replaced: list[PoolEvent] = []

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        manager.observer = lambda event: replaced.append(event) \
            if event.kind is PoolEventKind.REPLACED else None
        stop = asyncio.Event()

        async def reconciling() -> int:
            passes = 0
            while not stop.is_set():
                await manager.reconcile(state)
                passes += 1
            return passes

        looping = asyncio.create_task(reconciling())
        try:
            results = await asyncio.gather(*(task(manager, state, "echo ok")
                                             for _ in range(200)))
        finally:
            stop.set()
        return results, await looping

    results, passes = pools.run(scenario, minSize=3, maxSize=3)

    assert [result.stdout for _, result in results] == ["ok\n"] * 200
    assert replaced == [], f"{len(replaced)} agents replaced in {passes} reconciles"
    assert passes > 10


def test_a_place_whose_starter_died_lapses_and_its_agent_is_adopted(
        settings: Settings, docker_client: docker.DockerClient) -> None:
    """A controller killed while starting an agent (or a store that lost the moment it was
    recorded) left a placeholder: it lapses like a lease, and the agent it stood for joins the
    pool, instead of its place blocking a full pool for minutes."""
    from controller.agents import build_pool_agent_spec
    from controller.pools import PENDING

    fast = Settings.from_env({}, redis_url=settings.redis_url, lease_ttl_seconds=1)
    pools = Pools(fast)

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        spec = build_pool_agent_spec(state.pool, state.uid)
        assert await manager.store.pool_reserve(state.uid, PENDING + spec.name, 1, "dead", 1000)
        await state.backend.start(spec)  # ... and its starter died before recording it
        stuck = await manager.reconcile(state)
        await asyncio.sleep(1.5)
        adopted = await manager.reconcile(state)
        name, result = await task(manager, state, "echo adopted")
        return spec.name, stuck, adopted, name, result

    started, stuck, adopted, name, result = pools.run(scenario, minSize=0, maxSize=1)

    assert stuck.total == 0  # while its starter may still be at it, it is left alone
    assert adopted.total == 1 and adopted.ready == 1
    assert name == started and result.stdout == "adopted\n"


def test_agent_of_an_older_runner_is_replaced_not_adopted(pools: Pools) -> None:
    """A pool agent started by an earlier version (a shell on its stdin, no runner label) is
    never handed a task: reconcile replaces it."""
    client = docker.from_env()

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        old = client.containers.run(IMAGE, ["sh"], detach=True, stdin_open=True,
                                    labels={"agentainer.dev/pool-uid": state.uid,
                                            "agentainer.dev/channel": "shell"})
        await manager.reconcile(state)
        name, result = await task(manager, state, "echo from the runner")
        return old.name, name, result

    old, name, result = pools.run(scenario, minSize=1, maxSize=2)

    assert name != old and result.stdout == "from the runner\n"
    assert not client.containers.list(all=True, filters={"name": old})


def test_draining_lets_the_running_task_finish_then_removes_the_agents(pools: Pools) -> None:
    client = docker.from_env()

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        lease = await manager.lease(state)
        running = asyncio.create_task(manager.run(lease, sh("sleep 1; echo finished"), {}, 30))
        await asyncio.sleep(0.2)
        removed = await manager.drain(state)
        return removed, await running, state.uid

    removed, result, uid = pools.run(scenario, minSize=2, maxSize=2)

    assert result.stdout.strip() == "finished"
    assert removed == 2
    assert client.containers.list(all=True, filters={"label": f"agentainer.dev/pool-uid={uid}"}) == []


def test_a_store_record_naming_a_container_not_of_the_pool_is_never_leased(
        pools: Pools, settings: Settings, docker_client: docker.DockerClient) -> None:
    """Whoever can write to Redis must not steer a task (its argv and env) into a container
    of their choice: a process that did not start an agent checks it against what the engine
    lists as the pool's, and drops a record that names anything else."""
    from controller.store import PoolAgent

    victim = docker_client.containers.run(IMAGE, ["sleep", "300"], detach=True,
                                          name=f"victim-{uuid.uuid4().hex[:6]}")

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        held = await manager.lease(state)  # the real agent is busy: the forged one is next
        await manager.store.pool_add(state.uid, PoolAgent(name=victim.name, id=victim.id))
        other = PoolManager(manager.store, settings)  # another controller, which knows nothing
        other_state = other.register(state.pool, state.uid, state.backend)
        lease = await other.lease(other_state)
        result = await other.run(lease, sh("hostname"), {"SECRET": "for the pool only"}, 30)
        records = await manager.store.pool_agents(state.uid)
        await manager.release(held, keep=True)
        return lease.agent.name, result, records

    try:
        name, result, records = pools.run(scenario, minSize=1, maxSize=2)
    finally:
        victim.remove(force=True)

    assert name != victim.name and name.startswith("pool-")
    assert result.stdout.strip() != victim.id[:12]
    assert victim.name not in records


def queue_waiters(manager: PoolManager, state: PoolState, count: int,
                  served: list[int]) -> list[asyncio.Task[None]]:
    """``count`` tasks that each lease an agent, note their number in ``served`` and give the
    agent back; created in order, each queues (at its first step) before the next runs."""
    async def waiter(index: int) -> None:
        lease = await manager.lease(state)
        served.append(index)
        await manager.release(lease, keep=True)

    return [asyncio.create_task(waiter(index)) for index in range(count)]


def test_waiting_tasks_cost_the_store_what_one_does_and_are_served_in_turn(
        pools: Pools) -> None:
    """200 tasks wait for the one agent of a pool, held for a second: the store is asked
    about as often as by one waiter (not 200 times as often), and the agent (replaced after
    every 30 tasks, by whichever task finds its place free) goes to the waiters in the order
    they came."""
    calls: list[str] = []

    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        held = await manager.lease(state)
        store = manager.store
        acquire, reserve = store.pool_acquire, store.pool_reserve

        async def counted_acquire(*args: Any, **kwargs: Any) -> Any:
            calls.append("acquire")
            return await acquire(*args, **kwargs)

        async def counted_reserve(*args: Any, **kwargs: Any) -> Any:
            calls.append("reserve")
            return await reserve(*args, **kwargs)

        store.pool_acquire, store.pool_reserve = counted_acquire, counted_reserve  # type: ignore[method-assign]
        served: list[int] = []
        waiters = queue_waiters(manager, state, 200, served)
        await asyncio.sleep(1.0)
        asked_while_held = len(calls)
        await manager.release(held, keep=True)
        async with asyncio.timeout(60):
            await asyncio.gather(*waiters)
        return asked_while_held, served

    asked_while_held, served = pools.run(scenario, minSize=1, maxSize=1, maxUses=30)

    assert asked_while_held <= 100, f"the store was asked {asked_while_held} times in 1 s"
    assert served == list(range(200))


def test_a_task_that_starts_an_agent_is_served_by_it_in_its_turn(pools: Pools) -> None:
    """Tasks come to an empty pool of one: the first finds room and starts the agent, the
    others wait their turn meanwhile; the new agent goes to the task that started it, not to
    whichever task is looking when it comes up."""
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        served: list[int] = []
        waiters = queue_waiters(manager, state, 5, served)
        async with asyncio.timeout(60):
            await asyncio.gather(*waiters)
        return served

    assert pools.run(scenario, minSize=0, maxSize=1) == [0, 1, 2, 3, 4]


def test_a_task_queued_behind_others_still_gives_up_at_its_lease_timeout(
        pools: Pools) -> None:
    async def scenario(manager: PoolManager, state: PoolState) -> Any:
        held = await manager.lease(state)
        began = time.monotonic()
        outcomes = await asyncio.gather(*(manager.lease(state) for _ in range(20)),
                                        return_exceptions=True)
        waited = time.monotonic() - began
        await manager.release(held, keep=True)
        return outcomes, waited

    outcomes, waited = pools.run(scenario, minSize=1, maxSize=1, leaseTimeoutSeconds=1)

    assert all(isinstance(outcome, PoolUnavailableError) and
               "stayed busy for leaseTimeoutSeconds (1s)" in str(outcome)
               for outcome in outcomes), outcomes
    assert waited < 5
