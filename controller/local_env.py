"""Secrets and ConfigMaps for ``agentainer run``, which has no cluster: ``--secret NAME=FILE``
(an env file: ``KEY=VALUE`` lines) or ``--secret NAME`` (each key from the environment
variable of that name), and ``--config-map`` alike. Nothing is read until an agent needs it,
and values are kept nowhere but the agent's environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from controller.backends.base import missing
from controller.errors import ConfigError
from controller.models import EnvSource

ENVIRONMENT = None
"""The source of a Secret or ConfigMap given by name alone: the process's environment."""


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``export`` before, quotes around the value, ``#`` comments and blank
    lines allowed), as docker's and compose's env files."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read: {error}") from None
    values = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, equals, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not equals or not key:
            raise ConfigError(f"{path} line {number}: not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


class LocalEnv:
    """Named Secrets and ConfigMaps, each an env file or the environment."""

    def __init__(self, secrets: Mapping[str, Path | None],
                 config_maps: Mapping[str, Path | None]) -> None:
        self._given = {"Secret": dict(secrets), "ConfigMap": dict(config_maps)}

    @classmethod
    def parse(cls, secrets: list[str], config_maps: list[str]) -> LocalEnv:
        """From ``NAME=FILE`` and ``NAME`` arguments, checked now (a file that is missing is
        an error before anything runs)."""
        def sources(arguments: list[str], flag: str) -> dict[str, Path | None]:
            found: dict[str, Path | None] = {}
            for argument in arguments:
                name, equals, path = argument.partition("=")
                if not name or (equals and not path):
                    raise ConfigError(f"{flag} {argument!r}: give NAME=FILE or NAME")
                found[name] = Path(path) if equals else ENVIRONMENT
                if equals and not Path(path).is_file():
                    raise ConfigError(f"{flag} {argument!r}: {path} is not a file")
            return found

        return cls(sources(secrets, "--secret"), sources(config_maps, "--config-map"))

    async def values(self, namespace: str, refs: Mapping[str, EnvSource]) -> dict[str, str]:
        values = {}
        for name, source in refs.items():
            given = self._given[source.kind]
            if source.ref.name not in given:
                if source.ref.optional:
                    continue
                flag = "--secret" if source.kind == "Secret" else "--config-map"
                raise missing(name, source, namespace, "was not given",
                              f"give {flag} {source.ref.name}=FILE (an env file), or "
                              f"{flag} {source.ref.name} to read the environment")
            path = given[source.ref.name]
            data = dict(os.environ) if path is ENVIRONMENT else read_env_file(path)
            if source.ref.key not in data:
                if source.ref.optional:
                    continue
                where = "the environment" if path is ENVIRONMENT else str(path)
                raise missing(name, source, namespace, f"has no such key in {where}",
                              "add it, or mark the reference optional")
            values[name] = data[source.ref.key]
        return values
