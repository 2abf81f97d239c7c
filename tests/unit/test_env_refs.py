"""Env from Secrets and ConfigMaps (``valueFrom``): which variable wins, where each backend
reads the values (a pod's kubelet, the Docker backend at the start, a pooled task just before
it is sent), that they are kept nowhere else, and what `agentainer run` takes instead of a
cluster. The real Secrets, pods and containers: tests/e2e/test_secrets.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from controller.agents import build_agent_spec, build_pool_agent_spec, split_env
from controller.backends.pods import build_pod
from controller.engine import Engine
from controller.errors import AgentSpecError, ConfigError
from controller.local_env import LocalEnv, read_env_file
from controller.models import EnvSource, EnvVar, WorkflowPhase, parse_agent_pool, parse_workflow
from controller.pools import PoolManager
from controller.store import MemoryStore
from tests.conftest import workflow_doc
from tests.unit.fake_backend import FakeBackend
from tests.unit.test_engine import SETTINGS, scenario, with_uid

SECRET = "sk-do-not-leak-4d1f"


def secret(name: str, key: str, **ref: Any) -> dict[str, Any]:
    return {"secretKeyRef": {"name": name, "key": key, **ref}}


def test_a_later_variable_of_a_name_replaces_an_earlier_one_whatever_its_kind() -> None:
    source = EnvSource.model_validate(secret("s", "k"))
    env, refs = split_env([EnvVar(name="A", value="1"), EnvVar(name="B", value_from=source),
                           EnvVar(name="A", value_from=source), EnvVar(name="B", value="2")])
    assert env == {"B": "2"}
    assert refs == {"A": source}


def test_a_step_reads_secrets_by_reference_and_its_spec_never_holds_them() -> None:
    workflow = parse_workflow(with_uid(workflow_doc(
        {"name": "call", "env": [{"name": "KEY", "valueFrom": secret("llm", "api-key")}]},
        env=[{"name": "MODEL", "valueFrom": {"configMapKeyRef": {"name": "llm", "key": "model"}}},
             {"name": "KEY", "value": "replaced by the step's"}])))
    spec = build_agent_spec(workflow, "uid", workflow.spec.steps[0], 0, 1, {})
    assert set(spec.env_refs) == {"KEY", "MODEL"}
    assert "KEY" not in spec.env and "MODEL" not in spec.env
    pod = build_pod(spec)
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert env["KEY"] == {"name": "KEY", "valueFrom": {"secretKeyRef": {
        "name": "llm", "key": "api-key", "optional": False}}}
    assert env["MODEL"]["valueFrom"]["configMapKeyRef"]["key"] == "model"
    assert "env=" not in repr(spec)  # a spec in a log line shows no env at all


def test_a_pods_command_args_and_env_reach_it_verbatim_never_expanded_by_the_kubelet() -> None:
    """The kubelet expands $(NAME) in a container's command, args and env values, and makes
    $$ one $: an output holding "$(KEY)" would read the Secret into the next step's output.
    Every $ is doubled in the pod, which the kubelet makes the text as written again."""
    text = "price $$5, ask $(KEY) $(AGENTAINER_STEP) $"
    workflow = parse_workflow(with_uid(workflow_doc(
        {"name": "call", "command": ["sh", "-c", text], "args": [text],
         "env": [{"name": "TEXT", "value": text},
                 {"name": "KEY", "valueFrom": secret("llm", "api-key")}]})))
    container = build_pod(build_agent_spec(workflow, "uid", workflow.spec.steps[0], 0, 1, {}))[
        "spec"]["containers"][0]
    doubled = text.replace("$", "$$")
    assert container["command"] == ["sh", "-c", doubled] and container["args"] == [doubled]
    assert {"name": "TEXT", "value": doubled} in container["env"]


def test_a_pool_pod_reads_its_own_env_from_secrets_too() -> None:
    pool = parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "warm", "uid": "p"},
                             "spec": {"image": "agent:1", "env": [
                                 {"name": "TOKEN", "valueFrom": secret("t", "token")}]}})
    spec = build_pool_agent_spec(pool, "p")
    env = build_pod(spec, "runner:1")["spec"]["containers"][0]["env"]
    assert {"name": "TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "t", "key": "token", "optional": False}}} in env


def pooled_and_fresh(optional: bool = False, name: str = "llm") -> dict[str, Any]:
    env = [{"name": "KEY", "valueFrom": secret(name, "api-key", optional=optional)}]
    return with_uid(workflow_doc({"name": "fresh", "image": "agent:1", "env": env},
                                 {"name": "pooled", "pool": "warm", "command": ["call"],
                                  "env": env}))


def run_with_pool(document: dict[str, Any], fake: FakeBackend) -> tuple[Any, MemoryStore]:
    store = MemoryStore()
    pools = PoolManager(store, SETTINGS)
    pool = parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "warm"},
                             "spec": {"image": "agent:1", "minSize": 1, "maxSize": 1}})

    async def play() -> Any:
        state = pools.register(pool, "pool-uid", fake)
        await pools.reconcile(state)
        try:
            return await Engine(fake, store, SETTINGS, pools).run(parse_workflow(document))
        finally:
            await pools.drain(state, timeout=1)

    return scenario(play()), store


def test_fresh_agents_and_pooled_tasks_get_the_value_and_the_store_never_sees_it() -> None:
    fake = FakeBackend()
    fake.secrets["llm"] = {"api-key": SECRET}
    status, store = run_with_pool(pooled_and_fresh(), fake)
    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    fresh = next(a for a in fake.started if a.spec.labels.get("agentainer.dev/step") == "fresh")
    assert fresh.spec.env["KEY"] == SECRET
    assert fake.task_envs[-1]["KEY"] == SECRET
    kept = json.dumps([repr(value) for value in vars(store).values()], default=str)
    assert SECRET not in kept
    assert SECRET not in status.model_dump_json()


@pytest.mark.parametrize("optional", [False, True], ids=["required", "optional"])
def test_a_missing_secret_fails_the_step_naming_the_variable_unless_optional(
        optional: bool) -> None:
    fake = FakeBackend()
    status, _ = run_with_pool(pooled_and_fresh(optional, name="absent"), fake)
    if optional:
        assert status.phase is WorkflowPhase.SUCCEEDED, status.message
        assert "KEY" not in fake.task_envs[-1]
        return
    assert status.phase is WorkflowPhase.FAILED
    (step,) = [s for s in status.steps if s.phase.value == "Failed"]
    assert "env KEY: Secret default/absent does not exist" in step.message


def test_env_files_read_as_docker_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "llm.env"
    path.write_text("# the model's key\nexport api-key='sk-1=2'\n\nmodel = \"big\"\nplain=a b\n")
    assert read_env_file(path) == {"api-key": "sk-1=2", "model": "big", "plain": "a b"}
    path.write_text("no equals sign\n")
    with pytest.raises(ConfigError, match="line 1: not KEY=VALUE"):
        read_env_file(path)


def test_agentainer_run_takes_secrets_from_env_files_and_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "llm.env"
    path.write_text(f"api-key={SECRET}\n")
    monkeypatch.setenv("MODEL_NAME", "big")
    env = LocalEnv.parse([f"llm={path}"], ["settings"])
    refs = {"KEY": EnvSource.model_validate(secret("llm", "api-key")),
            "MODEL": EnvSource.model_validate({"configMapKeyRef": {"name": "settings",
                                                                  "key": "MODEL_NAME"}})}
    assert asyncio.run(env.values("default", refs)) == {"KEY": SECRET, "MODEL": "big"}
    unknown = {"KEY": EnvSource.model_validate(secret("other", "api-key"))}
    with pytest.raises(AgentSpecError, match="--secret other=FILE"):
        asyncio.run(env.values("default", unknown))
    with pytest.raises(ConfigError, match="is not a file"):
        LocalEnv.parse([f"llm={tmp_path / 'missing.env'}"], [])
