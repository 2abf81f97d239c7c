"""A Redis that wants a password, over plain TCP and over TLS (``rediss://``), as the chart's
bundled Redis and managed ones do: the password goes apart from the URL, whatever it holds,
and a missing or wrong one is refused with a message that says where it goes."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.config import Settings
from controller.errors import StoreUnavailableError
from controller.store import open_store
from tests.conftest import free_port, start_redis

# Characters a URL would need escaped: the password never goes through one.
PASSWORD = "p@ss:w/rd#1?"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(directory / "key.pem"), "-out", str(directory / "cert.pem")],
                   check=True, capture_output=True)
    return directory


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tls_files: Path) -> Iterator[dict[str, str]]:
    tls_port = free_port()
    process, plain = start_redis(
        tmp_path_factory.mktemp("redis-auth"), "--requirepass", PASSWORD,
        "--tls-port", str(tls_port), "--tls-cert-file", str(tls_files / "cert.pem"),
        "--tls-key-file", str(tls_files / "key.pem"), "--tls-auth-clients", "no",
        tls_port=tls_port)
    yield {"redis": f"redis://127.0.0.1:{plain}/0",
           "rediss": f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={tls_files / 'cert.pem'}"}
    process.terminate()
    process.wait(timeout=10)


def connect(url: str, password: str) -> None:
    async def attempt() -> None:
        store = await open_store(Settings(redis_url=url, redis_password=password))
        try:
            await store.pool_counts("nothing")
        finally:
            await store.close()

    asyncio.run(asyncio.wait_for(attempt(), 20))


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_password_reaches_redis_over_plain_tcp_and_tls(servers: dict[str, str],
                                                           scheme: str) -> None:
    connect(servers[scheme], PASSWORD)


@pytest.mark.parametrize("password", ["", "wrong"], ids=["missing", "wrong"])
def test_redis_refuses_a_missing_or_wrong_password_and_says_where_it_goes(
        servers: dict[str, str], password: str) -> None:
    with pytest.raises(StoreUnavailableError, match="AGENTAINER_REDIS_PASSWORD") as raised:
        connect(servers["rediss"], password)
    assert PASSWORD not in str(raised.value)


def test_settings_never_show_the_password() -> None:
    settings = Settings.from_env({"AGENTAINER_REDIS_PASSWORD": PASSWORD})
    assert settings.redis_password == PASSWORD
    assert PASSWORD not in repr(settings)
