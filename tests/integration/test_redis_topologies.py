"""The store on each Redis a user may run: one server, a primary watched by Sentinel (followed
through a failover), and a Redis Cluster of three primaries, all real redis-servers. The same
rules hold on each: a workflow's parts are written together, no two holders get one pool agent,
lapsed leases are reclaimed. Keys written in the older layout are moved, and still read."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from controller.config import Settings
from controller.engine import Engine
from controller.errors import StoreUnavailableError
from controller.models import AgentStatus, StepStatus, WorkflowPhase, WorkflowStatus, parse_workflow
from controller.store import Change, Keys, Output, PoolAgent, RedisStore
from controller.store.records import AgentRecord, WorkflowRecord
from tests.conftest import ROOT, free_port, start_redis, workflow_doc
from tests.unit.fake_backend import FakeBackend

pytestmark = pytest.mark.integration


def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(scenario(), 60))


def wait_until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout:.0f}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Three primaries on loopback ports, the slots split between them by redis-cli."""
    processes, ports = [], []
    try:
        for _ in range(3):
            process, port = start_redis(tmp_path_factory.mktemp("cluster-node"),
                                        "--cluster-enabled", "yes",
                                        "--cluster-port", str(free_port()),
                                        "--cluster-node-timeout", "2000")
            processes.append(process)
            ports.append(port)
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{port}" for port in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        nodes = [redis.Redis(port=port, decode_responses=True) for port in ports]
        wait_until(lambda: all(node.cluster("info")["cluster_state"] == "ok" for node in nodes),
                   "the cluster's slots being served")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    finally:
        for process in processes:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A primary, its replica, and one Sentinel (quorum 1) that fails over in about a second."""
    primary, primary_port = start_redis(tmp_path_factory.mktemp("primary"))
    replica, replica_port = start_redis(tmp_path_factory.mktemp("replica"),
                                        "--replicaof", "127.0.0.1", str(primary_port))
    directory = tmp_path_factory.mktemp("sentinel")
    (directory / "sentinel.conf").write_text(
        f"sentinel monitor agentainer 127.0.0.1 {primary_port} 1\n"
        "sentinel down-after-milliseconds agentainer 500\n"
        "sentinel failover-timeout agentainer 3000\n")
    sentinel_port = free_port()
    watcher = subprocess.Popen(
        ["redis-server", str(directory / "sentinel.conf"), "--sentinel", "--port",
         str(sentinel_port), "--bind", "127.0.0.1", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        replica_client = redis.Redis(port=replica_port, decode_responses=True)
        wait_until(lambda: replica_client.info("replication")["master_link_status"] == "up",
                   "the replica following the primary")
        watching = redis.Redis(port=sentinel_port, decode_responses=True)
        wait_until(lambda: _answers(watching) and
                   watching.sentinel_master("agentainer")["flags"] == "master",
                   "the Sentinel seeing the primary")
        yield {"url": f"redis+sentinel://127.0.0.1:{sentinel_port}/agentainer",
               "primary": primary, "replica_port": replica_port, "sentinel": watching}
    finally:
        for process in (watcher, replica, primary):
            process.kill()
            process.wait(timeout=10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


@pytest.fixture(params=["one server", "cluster"])
def url(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "cluster":
        return str(request.getfixturevalue("cluster_url"))
    return redis_url


SOME = WorkflowRecord(name="", namespace="", phase=WorkflowPhase.PENDING, progress="")


def agent(uid: str, step: str, index: int) -> AgentRecord:
    status = AgentStatus(id=f"{step}.{index}.1", name=f"c-{index}", index=index, attempt=1,
                         phase="Succeeded", exitCode=0)
    return AgentRecord(status=status, workflow="w", workflow_uid=uid)


async def record_a_workflow(store: RedisStore, uid: str) -> None:
    await store.record(uid, Change(started_at=time.time(),
                                   workflow=WorkflowRecord(name="w", namespace="n",
                                                           phase=WorkflowPhase.RUNNING, progress="0/1")))
    for index in range(3):
        await store.record(uid, Change(agent=agent(uid, "map", index),
                                       output=Output("map", index, f"out {index}"),
                                       log=(f"map.{index}.1", f"err {index}")))
    await store.record(uid, Change(step=StepStatus(name="map", phase="Succeeded")))


def test_a_workflow_is_kept_read_expired_and_forgotten(url: str) -> None:
    uid = str(uuid.uuid4())

    async def scenario() -> None:
        store = await RedisStore.connect(url)
        try:
            await record_a_workflow(store, uid)
            assert uid in await store.uids()
            assert (await store.workflow(uid) or SOME).phase == "Running"
            assert (await store.steps(uid))["map"].phase == "Succeeded"
            assert await store.outputs(uid, "map") == {0: "out 0", 1: "out 1", 2: "out 2"}
            assert sorted(await store.agents(uid)) == ["map.0.1", "map.1.1", "map.2.1"]
            assert (await store.logs(uid))["map.2.1"] == "err 2"
            await store.record(uid, Change(expire_seconds=600))  # it finished
            await store.reopen(uid)
            await store.delete(uid)
            assert await store.workflow(uid) is None
            assert uid not in await store.uids()
            assert await store.outputs(uid, "map") == {}
        finally:
            await store.close()

    run(scenario)


def test_every_key_of_a_finished_workflow_expires_its_steps_listed_or_told(url: str) -> None:
    """A run that wrote all its records tells its end which steps it has (one round trip
    fewer); one that resumed does not, and the store lists them: every key expires either way."""
    async def scenario() -> None:
        store = await RedisStore.connect(url)
        try:
            for told in (frozenset({"map"}), None):
                uid = str(uuid.uuid4())
                await record_a_workflow(store, uid)
                await store.record(uid, Change(step=StepStatus(name="reduce", phase="Running"),
                                               expire_seconds=600, steps=told))
                for key in Keys.workflow_keys(uid, ["map", "reduce"]):  # -2: not written
                    assert await store._client.ttl(key) in (-2, *range(1, 601)), (key, told)
                assert 0 < await store._client.ttl(Keys.outputs(uid, "map")) <= 600
        finally:
            await store.close()

    run(scenario)


def test_a_one_step_workflow_costs_eight_round_trips_to_redis(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a one-step workflow of one agent sends Redis, counted where the client sends it:
    a read (anything an earlier process did?), its beginning with its index entry, its step
    and its agent as each starts, the agent's end with its output, the step's end, and the
    run's end with the expiry of every key (the steps known, not listed)."""
    sent: list[int] = []
    send = redis.asyncio.connection.AbstractConnection.send_packed_command

    async def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(1)
        await send(self, command, check_health)

    async def scenario() -> WorkflowStatus:
        store = await RedisStore.connect(redis_url)
        try:
            await store.record(str(uuid.uuid4()), Change(expire_seconds=60))  # trims the index
            settings = Settings.from_env({}, redis_url=redis_url)
            run = Engine(FakeBackend(), store, settings).prepare(parse_workflow(
                workflow_doc({"name": "one", "command": ["echo", "hi"]})))
            monkeypatch.setattr(redis.asyncio.connection.AbstractConnection,
                                "send_packed_command", counted)
            return await run.execute()
        finally:
            monkeypatch.undo()
            await store.close()

    status = run(scenario)
    assert status.phase is WorkflowPhase.SUCCEEDED
    assert len(sent) == 8


def test_pool_leases_hold_lapse_and_are_reclaimed(url: str) -> None:
    pool = str(uuid.uuid4())

    async def scenario() -> None:
        store = await RedisStore.connect(url)
        try:
            assert await store.pool_reserve(pool, "place", max_size=3, holder="me", ttl_ms=60_000)
            assert await store.pool_add(pool, PoolAgent("a1", id="c1"), replaces="place")
            assert await store.pool_add(pool, PoolAgent("a2", id="c2"))
            assert await store.pool_counts(pool) == (2, 2)
            assert not await store.pool_reserve(pool, "p2", max_size=2, holder="me",
                                                ttl_ms=60_000)
            leased = await store.pool_acquire(pool, "holder-1", ttl_ms=60_000)
            assert leased == "a2"  # the most recently returned
            assert await store.pool_renew(pool, leased, "holder-1", 60_000)
            assert not await store.pool_renew(pool, leased, "someone-else", 60_000)
            assert await store.pool_release(pool, leased, "someone-else", True, 10) == -1
            assert await store.pool_release(pool, leased, "holder-1", True, 10) == 1
            # A holder that dies: its lease lapses, and the agent is reclaimed, once.
            dying = await store.pool_acquire(pool, "dies", ttl_ms=200)
            assert await store.pool_reclaim(pool) == []
            await asyncio.sleep(0.4)
            assert await store.pool_reclaim(pool) == [dying]
            assert await store.pool_release(pool, dying, "dies", True, 10) == -1
            assert sorted(await store.pool_agents(pool)) == sorted({"a1", "a2"} - {dying})
            # Recycled after its uses: held while its holder removes it.
            last = await store.pool_acquire(pool, "h", ttl_ms=60_000)
            assert last is not None
            assert await store.pool_release(pool, last, "h", True, max_uses=1) == 0
            assert await store.pool_reclaim(pool) == []
            await store.pool_remove(pool, last)
            assert await store.pool_agents(pool) == {}
            # An agent its starter takes for itself joins leased to it, never idle.
            assert await store.pool_reserve(pool, "p3", max_size=1, holder="me", ttl_ms=60_000)
            assert await store.pool_add(pool, PoolAgent("a3", id="c3"), replaces="p3",
                                        holder="starter", ttl_ms=60_000)
            assert await store.pool_acquire(pool, "other", ttl_ms=60_000) is None
            assert await store.pool_renew(pool, "a3", "starter", 60_000)
            assert await store.pool_release(pool, "a3", "starter", True, 10) == 1
            assert await store.pool_acquire(pool, "other", ttl_ms=60_000) == "a3"
            await store.pool_delete(pool)
        finally:
            await store.close()

    run(scenario)


def test_a_lease_not_written_by_the_store_holds_nothing(url: str) -> None:
    """A lease value the scripts did not write (no expiry, garbage) is no lease: its agent is
    reclaimed, and no script fails on it."""
    pool = str(uuid.uuid4())

    async def scenario() -> list[str]:
        store = await RedisStore.connect(url)
        try:
            await store.pool_add(pool, PoolAgent("a1", id="c1"))
            assert await store.pool_acquire(pool, "h", 60_000) == "a1"
            await store._client.hset(Keys.pool_leases(pool), "a1", "garbage")
            assert not await store.pool_renew(pool, "a1", "h", 60_000)
            return await store.pool_reclaim(pool)
        finally:
            await store.pool_delete(pool)
            await store.close()

    assert run(scenario) == ["a1"]


def test_many_holders_at_once_never_share_an_agent(url: str) -> None:
    pool = str(uuid.uuid4())

    async def scenario() -> None:
        store = await RedisStore.connect(url)
        try:
            for index in range(20):
                await store.pool_add(pool, PoolAgent(f"a{index}", id=f"c{index}"))
            leased = await asyncio.gather(*(store.pool_acquire(pool, f"h{n}", 60_000)
                                            for n in range(50)))
            got = [agent for agent in leased if agent is not None]
            assert len(got) == 20 and len(set(got)) == 20
            returned = await asyncio.gather(*(
                store.pool_release(pool, agent, f"h{leased.index(agent)}", True, 10)
                for agent in got))
            assert returned == [1] * 20
            assert await store.pool_counts(pool) == (20, 20)
            await store.pool_delete(pool)
        finally:
            await store.close()

    run(scenario)


def test_every_key_of_a_workflow_or_a_pool_is_in_one_cluster_slot(cluster_url: str) -> None:
    node = redis.Redis(port=int(cluster_url.rsplit(":", 1)[1]), decode_responses=True)
    uid = str(uuid.uuid4())
    slots = {node.cluster("keyslot", key)
             for key in Keys.workflow_keys(uid, ["map", "reduce"])}
    assert len(slots) == 1
    assert len({node.cluster("keyslot", key) for key in Keys.pool_keys(uid)}) == 1


def test_a_workflow_runs_on_a_redis_cluster(cluster_url: str, tmp_path: Path) -> None:
    """`agentainer run` of the MapReduce example, its state in the cluster."""
    result = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "agentainer"), "run", "examples/mapreduce.yaml"],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
             "AGENTAINER_REDIS_URL": cluster_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "total words" in result.stdout or "Succeeded" in result.stdout


def test_the_store_follows_a_sentinel_failover(sentinel: dict[str, Any]) -> None:
    """One store, kept open while the primary dies and the Sentinel promotes its replica: what
    was written is read from the new primary, and writes go on there (a command that meets the
    dead primary fails as the store being unavailable, which the engine retries)."""
    uid = str(uuid.uuid4())
    replica = redis.Redis(port=sentinel["replica_port"], decode_responses=True)

    async def scenario() -> None:
        store = await RedisStore.connect(sentinel["url"])
        try:
            await record_a_workflow(store, uid)
            await asyncio.to_thread(wait_until, lambda: replica.info("replication")[
                "master_repl_offset"] == replica.info("replication")["slave_repl_offset"],
                "the replica catching up")
            sentinel["primary"].kill()
            await asyncio.to_thread(wait_until,
                                    lambda: replica.info("replication")["role"] == "master",
                                    "the Sentinel promoting the replica")
            deadline = time.monotonic() + 20
            while True:
                try:
                    outputs = await store.outputs(uid, "map")
                    break
                except StoreUnavailableError:
                    assert time.monotonic() < deadline, "the store never reached the new primary"
                    await asyncio.sleep(0.2)
            assert outputs == {0: "out 0", 1: "out 1", 2: "out 2"}
            await store.record(uid, Change(step=StepStatus(name="reduce", phase="Running")))
            assert (await store.steps(uid))["reduce"].phase == "Running"
            assert replica.hexists(Keys.steps(uid), "reduce")
        finally:
            await store.close()

    run(scenario)


def test_keys_of_the_older_layout_are_moved_and_read(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(Keys.layout)
    uid, pool = str(uuid.uuid4()), str(uuid.uuid4())
    old = f"agentainer:workflow:{uid}"
    client.hset(old, mapping={"name": "w", "namespace": "n", "phase": "Running"})
    client.hset(f"{old}:steps", "map", json.dumps({"name": "map", "phase": "Succeeded"}))
    client.hset(f"{old}:outputs:map", "0", "kept")
    client.expire(f"{old}:outputs:map", 500)
    client.hset(f"agentainer:pool:{pool}:agents",
                mapping={"a1": json.dumps({"id": "c1", "name": "a1"}),
                         "a2": json.dumps({"id": "c2", "name": "a2"})})
    client.zadd(f"agentainer:pool:{pool}:idle", {"a2": time.time()})
    client.set(f"agentainer:pool:{pool}:lease:a1", "holder", px=60_000)

    async def scenario() -> None:
        store = await RedisStore.connect(redis_url)
        try:
            assert (await store.workflow(uid) or SOME).name == "w"
            assert (await store.steps(uid))["map"].phase == "Succeeded"
            assert await store.outputs(uid, "map") == {0: "kept"}
            assert await store.pool_counts(pool) == (2, 1)
            assert await store.pool_renew(pool, "a1", "holder", 60_000)  # still held
            assert await store.pool_reclaim(pool) == []
            assert await store.pool_acquire(pool, "next", 60_000) == "a2"
        finally:
            await store.close()

    run(scenario)
    assert not client.exists(old, f"{old}:outputs:map", f"agentainer:pool:{pool}:lease:a1")
    assert 0 < client.ttl(Keys.outputs(uid, "map")) <= 500
    assert client.get(Keys.layout) == "2"


def test_a_store_call_cancelled_at_any_moment_ends_cancelled(redis_url: str) -> None:
    """Cancelled after any number of turns of the event loop (taking its turn, writing the
    command, reading the reply), a call ends cancelled and does not go on: the client bounds
    its writes with ``asyncio.wait_for``, which in Python 3.11 drops a cancellation that comes
    as the write completes; Ctrl-C of ``agentainer run`` was lost so."""
    async def cancelled_after(moment: int) -> bool | None:
        """Whether the call ended cancelled (None: it had ended before)."""
        store = await RedisStore.connect(redis_url)
        try:
            task = asyncio.create_task(store.workflow(str(uuid.uuid4())))
            for _ in range(moment):
                await asyncio.sleep(0)
            if not task.cancel():
                return None
            await asyncio.wait({task})
            return task.cancelled()
        finally:
            await store.close()

    outcomes: list[bool] = []
    while (outcome := run(lambda: cancelled_after(len(outcomes)))) is not None:
        outcomes.append(outcome)
    assert len(outcomes) >= 3 and all(outcomes), outcomes


def test_the_first_call_after_redis_restarted_does_not_fail(tmp_path: Path) -> None:
    """Every pooled connection of the store is to the server that went away: the next call
    is sent again on a new one, rather than failing (a run letting go, a daemon backing off)."""
    server, port = start_redis(tmp_path)

    async def scenario() -> list[Any]:
        store = await RedisStore.connect(f"redis://127.0.0.1:{port}/0")
        try:
            await asyncio.gather(*(store.workflow(str(uuid.uuid4())) for _ in range(8)))
            server.terminate()
            server.wait(timeout=10)
            again = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
                                     stdout=subprocess.DEVNULL)
            try:
                wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"],
                                                  capture_output=True).returncode == 0,
                           "Redis back")
                return await asyncio.gather(*(store.workflow(str(uuid.uuid4()))
                                              for _ in range(8)), return_exceptions=True)
            finally:
                again.kill()
        finally:
            await store.close()

    assert run(scenario) == [None] * 8
