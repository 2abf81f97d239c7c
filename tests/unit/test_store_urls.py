"""Which Redis a store URL names, and the reason a URL none can use is refused (no server is
contacted: the clients connect on their first command)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio

from controller.config import Settings
from controller.errors import StoreUnavailableError
from controller.store import open_store
from controller.store.redis import client_for


@pytest.mark.parametrize(("url", "kind"), [
    ("redis://localhost:6379/0", redis.asyncio.Redis),
    ("unix:///run/redis.sock", redis.asyncio.Redis),
    ("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", redis.asyncio.RedisCluster),
    ("rediss+cluster://:secret@10.0.0.1:7000", redis.asyncio.RedisCluster),
    ("redis+sentinel://10.0.0.1:26379,[::1]:26380/mymaster/2", redis.asyncio.Redis),
])
def test_each_url_gets_the_client_of_its_topology(url: str, kind: type) -> None:
    client = client_for(url, connections=5, password=None)
    assert isinstance(client, kind)


def test_a_sentinel_url_names_its_sentinels_service_and_database() -> None:
    client = client_for("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380/mymaster/2", 5, None)
    pool = client.connection_pool
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "pw"
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"],
             s.connection_pool.connection_kwargs["port"]) for s in sentinels] == [
        ("10.0.0.1", 26379), ("::1", 26380)]


@pytest.mark.parametrize(("url", "problem"), [
    ("redis+sentinel://127.0.0.1:26379", "name the Sentinels' service"),
    ("redis+sentinel://127.0.0.1:26379/svc/x", "database 'x' is not a number"),
    ("redis+cluster://127.0.0.1:7000/1", "a Redis Cluster has only database 0"),
    ("redis+cluster://127.0.0.1", "'127.0.0.1' is not HOST:PORT"),
    ("redis+cluster://:pw@127.0.0.1:70x0", "'127.0.0.1:70x0' is not HOST:PORT"),
])
def test_a_url_no_topology_can_use_is_refused_saying_why(url: str, problem: str) -> None:
    with pytest.raises(StoreUnavailableError, match="AGENTAINER_REDIS_URL") as raised:
        asyncio.run(open_store(Settings(redis_url=url)))
    assert problem in str(raised.value)
    assert ":pw@" not in str(raised.value)
