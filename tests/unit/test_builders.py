"""The pure builders: agent names and labels, agent specs, Docker container configs, cleanup
decisions, the compact status, and settings read from the environment."""

from __future__ import annotations

import re
from dataclasses import fields, replace
from typing import Any

import pytest

from controller.backends.base import AgentSpec
from controller.backends.containers import container_config
from controller.config import Settings
from controller.agents import (
    MAX_ARG_BYTES,
    agent_labels,
    agent_name,
    build_agent_spec,
    check_exec_limits,
    should_remove,
)
from controller.errors import AgentSpecError, ConfigError, InvalidSpecError
from controller.handlers.reporting import compact_status
from controller.models import (
    CleanupPolicy,
    Step,
    StepStatus,
    Workflow,
    WorkflowStatus,
    parse_workflow,
)

UID = "123e4567-e89b-12d3-a456-426614174000"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Kubernetes label values: at most 63, alphanumeric at both ends, '-', '_', '.' inside.
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def make_workflow(*steps: dict[str, Any], name: str = "wordcount",
                  env: list[dict[str, str]] | None = None) -> Workflow:
    return parse_workflow({
        "apiVersion": "agentainer.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name, "uid": UID},
        "spec": {"env": env or [], "steps": list(steps)},
    })


def make_step(name: str, **fields: Any) -> Step:
    return Step.model_validate({"name": name, "image": "agentainer/busybox:latest", **fields})


def assert_dns_label(name: str) -> None:
    assert len(name) <= 63, f"{name!r} is {len(name)} long"
    assert DNS_LABEL.match(name), f"{name!r} is not a DNS-1123 label"


# --- agent names --------------------------------------------------------------------------------


def test_single_agent_is_named_workflow_step_uid_prefix() -> None:
    assert agent_name("wordcount", UID, make_step("reduce"), 0, 1) == "wordcount-reduce-123e4"


def test_fan_out_agent_name_includes_its_index() -> None:
    fan_out = make_step("map", parallel={"replicas": 5})
    assert agent_name("wordcount", UID, fan_out, 3, 1) == "wordcount-map-3-123e4"


def test_retried_agent_name_carries_the_retry_number() -> None:
    assert agent_name("wordcount", UID, make_step("reduce"), 0, 2) == "wordcount-reduce-r1-123e4"
    fan_out = make_step("map", parallel={"items": ["a", "b"]})
    assert agent_name("wordcount", UID, fan_out, 1, 3) == "wordcount-map-1-r2-123e4"


@pytest.mark.parametrize(("workflow", "step", "index", "attempt"), [
    ("wordcount", make_step("map"), 0, 1),
    ("Word.Count_v2", make_step("map"), 0, 1),
    ("w" * 253, make_step("s" * 63), 0, 1),
    ("a." * 100 + "b", make_step("s" * 63, parallel={"replicas": 10000}), 9999, 101),
    ("x", make_step("s" * 63, parallel={"replicas": 2}), 1, 2),
])
def test_agent_name_is_a_dns_label_of_at_most_63_characters(
    workflow: str, step: Step, index: int, attempt: int
) -> None:
    name = agent_name(workflow, UID, step, index, attempt)
    assert_dns_label(name)
    assert name.endswith("-123e4")


def test_long_agent_names_are_hashed_and_stay_unique() -> None:
    workflow = "w" * 253
    fan_out = make_step("s" * 63, parallel={"replicas": 100})
    names = {agent_name(workflow, UID, fan_out, index, attempt)
             for index in range(100) for attempt in (1, 2, 3)}
    assert len(names) == 300
    for name in names:
        assert_dns_label(name)


def test_long_step_names_differing_only_at_the_end_get_different_agent_names() -> None:
    first = agent_name("w" * 40, UID, make_step("s" * 62 + "a"), 0, 1)
    second = agent_name("w" * 40, UID, make_step("s" * 62 + "b"), 0, 1)
    assert first != second


def test_step_named_like_another_steps_agents_is_refused_so_agent_names_never_clash() -> None:
    # Agent 1 of fan-out "map" and the agent of a step "map-1" would both be named
    # "wordcount-map-1-<uid>"; the workflow is refused before any agent exists.
    with pytest.raises(InvalidSpecError) as refused:
        make_workflow({"name": "map", "image": "busybox", "parallel": {"replicas": 3}},
                      {"name": "map-1", "image": "busybox"})
    assert [str(p) for p in refused.value.problems] == [
        "spec.steps[1].name: 'map-1' is also the name of an agent of step 'map' (agents are "
        "named <workflow>-<step>[-<index>][-r<retry>]); rename it"]


def test_step_named_like_another_step_plus_a_number_is_fine_when_no_agent_is_named_so() -> None:
    workflow = make_workflow({"name": "build", "image": "busybox"},
                             {"name": "build-2", "image": "busybox"},
                             {"name": "fan", "image": "busybox", "parallel": {"replicas": 2}},
                             {"name": "fan-5", "image": "busybox"})
    names = {agent_name("wordcount", UID, step, index, 1)
             for step in workflow.spec.steps for index in range(step.width)}
    assert len(names) == 5


def test_agent_name_is_a_dns_label_for_any_uid() -> None:
    assert_dns_label(agent_name("wordcount", "1234-5678", make_step("map"), 0, 1))


# --- labels -------------------------------------------------------------------------------------


def test_agent_labels_find_the_agent_again() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox", "parallel": {"replicas": 3}})
    labels = agent_labels(workflow, UID, workflow.spec.steps[0], 2, 1)
    assert labels == {
        "agentainer.dev/workflow": "wordcount",
        "agentainer.dev/workflow-uid": UID,
        "agentainer.dev/step": "map",
        "agentainer.dev/index": "2",
        "agentainer.dev/attempt": "1",
        "agentainer.dev/agent-id": "map.2.1",
        "app.kubernetes.io/managed-by": "agentainer",
    }


def test_workflow_label_of_a_long_dotted_name_is_a_valid_label_value() -> None:
    name = "team.data." + "w" * 200
    workflow = make_workflow({"name": "map", "image": "busybox"}, name=name)
    labels = agent_labels(workflow, UID, workflow.spec.steps[0], 0, 1)
    value = labels["agentainer.dev/workflow"]
    assert len(value) <= 63
    assert LABEL_VALUE.match(value)


def test_agent_id_label_is_valid_and_distinct_for_the_longest_step_names() -> None:
    for length in (61, 62, 63):
        workflow = make_workflow({"name": "s" * length, "image": "busybox",
                                  "parallel": {"replicas": 2}})
        step = workflow.spec.steps[0]
        ids = {agent_labels(workflow, UID, step, index, attempt)["agentainer.dev/agent-id"]
               for index in (0, 1) for attempt in (1, 2)}
        assert len(ids) == 4
        for value in ids:
            assert len(value) <= 63 and LABEL_VALUE.match(value), value


# --- agent specs --------------------------------------------------------------------------------


def test_step_env_overrides_workflow_env_and_both_reach_the_agent() -> None:
    workflow = make_workflow(
        {"name": "map", "image": "busybox", "env": [{"name": "LANG", "value": "en_GB.UTF-8"}]},
        env=[{"name": "LANG", "value": "C"}, {"name": "TZ", "value": "UTC"}],
    )
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 1, {})
    assert spec.env["LANG"] == "en_GB.UTF-8"
    assert spec.env["TZ"] == "UTC"


def test_every_agent_gets_agentainer_variables_and_a_single_agent_no_item() -> None:
    workflow = make_workflow({"name": "init", "image": "busybox"})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 2, {})
    assert {k: v for k, v in spec.env.items() if k.startswith("AGENTAINER_")} == {
        "AGENTAINER_WORKFLOW": "wordcount",
        "AGENTAINER_WORKFLOW_UID": UID,
        "AGENTAINER_STEP": "init",
        "AGENTAINER_AGENT_ID": "init.0.2",
        "AGENTAINER_ATTEMPT": "2",
    }


def test_items_fan_out_agent_gets_its_item_and_index() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox",
                              "parallel": {"items": ["first chunk", {"words": 3}]}})
    step = workflow.spec.steps[0]
    first = build_agent_spec(workflow, UID, step, 0, 1, {})
    second = build_agent_spec(workflow, UID, step, 1, 1, {})
    assert (first.env["AGENTAINER_ITEM"], first.env["AGENTAINER_ITEM_INDEX"]) == ("first chunk", "0")
    assert (second.env["AGENTAINER_ITEM"], second.env["AGENTAINER_ITEM_INDEX"]) == ('{"words": 3}', "1")


def test_replicas_fan_out_agent_gets_an_index_but_no_item() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox", "parallel": {"replicas": 3}})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 2, 1, {})
    assert spec.env["AGENTAINER_ITEM_INDEX"] == "2"
    assert "AGENTAINER_ITEM" not in spec.env


def test_templates_are_rendered_into_env_command_and_args() -> None:
    workflow = make_workflow(
        {"name": "map", "image": "busybox", "parallel": {"items": ["a b c", "d e"]}},
        {"name": "reduce", "image": "busybox",
         "env": [{"name": "COUNTS", "value": "{{ steps.map.outputs }}"}],
         "command": ["sh", "-c", "echo {{ workflow.name }}"],
         "args": ["{{ steps.map.outputs }}", "{{ workflow.uid }}"]},
        env=[{"name": "RUN", "value": "{{ workflow.name }}-{{ workflow.uid }}"}],
    )
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[1], 0, 1, {"map": ["3", "2"]})
    assert spec.env["COUNTS"] == '["3", "2"]'
    assert spec.env["RUN"] == f"wordcount-{UID}"
    assert spec.command == ["sh", "-c", "echo wordcount"]
    assert spec.args == ['["3", "2"]', UID]


def test_item_is_rendered_into_the_command_verbatim() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox",
                              "parallel": {"items": ["$(touch /tmp/pwned) {{ item }}"]},
                              "command": ["echo", "{{ item }}"]})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 1, {})
    assert spec.command == ["echo", "$(touch /tmp/pwned) {{ item }}"]
    assert spec.env["AGENTAINER_ITEM"] == "$(touch /tmp/pwned) {{ item }}"


def test_step_without_command_or_args_keeps_the_images_own() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox"})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 1, {})
    assert (spec.command, spec.args) == (None, None)


def test_agent_spec_carries_image_name_labels_and_converted_limits() -> None:
    workflow = make_workflow({"name": "map", "image": "agentainer/busybox:latest",
                              "resources": {"cpu": "500m", "memory": "64Mi"}})
    step = workflow.spec.steps[0]
    spec = build_agent_spec(workflow, UID, step, 0, 1, {})
    assert spec.image == "agentainer/busybox:latest"
    assert spec.name == "wordcount-map-123e4"
    assert spec.labels == agent_labels(workflow, UID, step, 0, 1)
    assert (spec.nano_cpus, spec.memory_bytes) == (500_000_000, 64 * 1024 * 1024)


def test_agent_spec_without_resources_has_no_limits() -> None:
    workflow = make_workflow({"name": "map", "image": "busybox"})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 1, {})
    assert (spec.nano_cpus, spec.memory_bytes) == (None, None)


# --- Docker container config --------------------------------------------------------------------


def agent_spec(**fields: Any) -> AgentSpec:
    defaults: dict[str, Any] = {
        "name": "wordcount-map-123e4",
        "image": "agentainer/busybox:latest",
        "command": None,
        "args": None,
        "env": {"LANG": "C"},
        "labels": {"agentainer.dev/step": "map"},
    }
    return AgentSpec(**{**defaults, **fields})


def test_container_gets_name_image_env_labels_and_network_mode() -> None:
    config = container_config(agent_spec(), "none")
    assert config["name"] == "wordcount-map-123e4"
    assert config["image"] == "agentainer/busybox:latest"
    assert config["environment"] == {"LANG": "C"}
    assert config["labels"] == {"agentainer.dev/step": "map"}
    assert config["network_mode"] == "none"


def test_container_is_unprivileged_and_cannot_gain_privileges() -> None:
    config = container_config(agent_spec(), "bridge")
    assert config["privileged"] is False
    assert "no-new-privileges:true" in config["security_opt"]


def test_container_limits_are_nano_cpus_and_memory_without_swap() -> None:
    config = container_config(agent_spec(nano_cpus=500_000_000, memory_bytes=64 * 1024 * 1024),
                              "bridge")
    assert config["nano_cpus"] == 500_000_000
    assert config["mem_limit"] == 64 * 1024 * 1024
    assert config["memswap_limit"] == config["mem_limit"]


def test_container_without_limits_sets_none() -> None:
    config = container_config(agent_spec(), "bridge")
    assert not {"nano_cpus", "mem_limit", "memswap_limit"} & config.keys()


@pytest.mark.parametrize(("command", "args", "expected"), [
    pytest.param(None, None, {}, id="neither: the image's entrypoint and cmd"),
    pytest.param(["sh", "-c"], ["echo hi"], {"entrypoint": ["sh", "-c"], "command": ["echo hi"]},
                 id="both"),
    pytest.param(["echo", "hi"], None, {"entrypoint": ["echo", "hi"], "command": []},
                 id="command only: the image's cmd is dropped"),
    pytest.param(None, ["--verbose"], {"command": ["--verbose"]},
                 id="args only: the image's entrypoint is kept"),
])
def test_command_and_args_map_to_entrypoint_and_cmd_as_in_a_pod(
    command: list[str] | None, args: list[str] | None, expected: dict[str, list[str]]
) -> None:
    config = container_config(agent_spec(command=command, args=args), "bridge")
    assert {key: config[key] for key in ("entrypoint", "command") if key in config} == expected


def test_memory_limit_under_6mi_is_refused_naming_the_minimum() -> None:
    with pytest.raises(AgentSpecError, match="below Docker's minimum of 6Mi"):
        container_config(agent_spec(memory_bytes=6 * 1024 * 1024 - 1), "bridge")


def test_memory_limit_of_exactly_6mi_is_accepted() -> None:
    config = container_config(agent_spec(memory_bytes=6 * 1024 * 1024), "bridge")
    assert config["mem_limit"] == 6 * 1024 * 1024


# --- cleanup ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("policy", "succeeded", "removed"), [
    (CleanupPolicy.ALWAYS, True, True),
    (CleanupPolicy.ALWAYS, False, True),
    (CleanupPolicy.ON_SUCCESS, True, True),
    (CleanupPolicy.ON_SUCCESS, False, False),
    (CleanupPolicy.NEVER, True, False),
    (CleanupPolicy.NEVER, False, False),
])
def test_cleanup_policy_decides_which_stopped_agents_are_removed(
    policy: CleanupPolicy, succeeded: bool, removed: bool
) -> None:
    assert should_remove(policy, succeeded) is removed


# --- compact status -----------------------------------------------------------------------------


def status_with_outputs() -> WorkflowStatus:
    return WorkflowStatus(steps=[
        StepStatus(name="map", output='["1", "2", "3"]', outputs=["1", "2", "3"]),
        StepStatus(name="reduce", output="x" * 5000, outputs=["x" * 5000]),
        StepStatus(name="report", output="exactly10!", outputs=["exactly10!"]),
    ])


def test_compact_status_truncates_long_outputs_and_marks_them() -> None:
    compact = compact_status(status_with_outputs(), output_limit=10, agent_limit=100)
    reduce = compact["steps"][1]
    assert reduce["output"] == "x" * 10
    assert reduce["outputTruncated"] is True


def test_compact_status_keeps_outputs_within_the_limit_unmarked() -> None:
    compact = compact_status(status_with_outputs(), output_limit=15, agent_limit=100)
    assert compact["steps"][0]["output"] == '["1", "2", "3"]'
    assert compact["steps"][2]["output"] == "exactly10!"
    assert "outputTruncated" not in compact["steps"][0]
    assert "outputTruncated" not in compact["steps"][2]


def test_compact_status_leaves_out_full_output_lists() -> None:
    compact = compact_status(status_with_outputs(), output_limit=1024, agent_limit=100)
    assert all("outputs" not in step for step in compact["steps"])


def test_compact_status_leaves_the_full_status_untouched() -> None:
    status = status_with_outputs()
    compact_status(status, output_limit=10, agent_limit=100)
    assert status.step("reduce").output == "x" * 5000
    assert status.step("reduce").outputs == ["x" * 5000]
    assert status.step("reduce").output_truncated is None


# --- settings -----------------------------------------------------------------------------------


def test_settings_default_when_no_variable_is_set() -> None:
    assert Settings.from_env({}) == Settings()


def test_settings_read_agentainer_variables_with_whole_numbers_parsed() -> None:
    settings = Settings.from_env({
        "AGENTAINER_REDIS_URL": "redis://redis:6380/2",
        "AGENTAINER_STORE": "memory",
        "AGENTAINER_DEFAULT_BACKEND": "kubernetes",
        "AGENTAINER_DOCKER_NETWORK": "none",
        "AGENTAINER_IMAGE_PULL_POLICY": "Never",
        "AGENTAINER_DOCKER_THREADS": "8",
        "AGENTAINER_STATE_TTL_SECONDS": "0",
        "AGENTAINER_STATUS_OUTPUT_LIMIT": "256",
        "AGENTAINER_STATUS_INTERVAL_SECONDS": "0.5",
    })
    assert settings == Settings(
        redis_url="redis://redis:6380/2", store="memory", default_backend="kubernetes",
        docker_network="none", image_pull_policy="Never", docker_threads=8,
        state_ttl_seconds=0, status_output_limit=256, status_interval_seconds=0.5,
    )


def test_every_setting_can_be_read_from_its_variable() -> None:
    """Each setting's type is one the environment can give (the chart sets many of them):
    a value of every setting, as text, reads back as itself."""
    environ = {f"AGENTAINER_{f.name.upper()}": str(getattr(Settings(), f.name))
               for f in fields(Settings)}
    assert Settings.from_env(environ) == Settings()


def test_empty_variable_means_the_default() -> None:
    assert Settings.from_env({"AGENTAINER_DOCKER_THREADS": ""}).docker_threads == 64


def test_explicit_overrides_win_over_the_environment_unless_none() -> None:
    environ = {"AGENTAINER_STORE": "redis", "AGENTAINER_REDIS_URL": "redis://env:6379/0"}
    settings = Settings.from_env(environ, store="memory", redis_url=None)
    assert settings.store == "memory"
    assert settings.redis_url == "redis://env:6379/0"


@pytest.mark.parametrize(("environ", "words"), [
    ({"AGENTAINER_DOCKER_THREADS": "many"},
     ("AGENTAINER_DOCKER_THREADS='many'", "whole number")),
    ({"AGENTAINER_STATE_TTL_SECONDS": "1.5"},
     ("AGENTAINER_STATE_TTL_SECONDS='1.5'", "whole number")),
    ({"AGENTAINER_STORE": "sqlite"}, ("AGENTAINER_STORE='sqlite'", "redis, memory")),
    ({"AGENTAINER_DEFAULT_BACKEND": "nomad"},
     ("AGENTAINER_DEFAULT_BACKEND='nomad'", "docker, kubernetes")),
    ({"AGENTAINER_IMAGE_PULL_POLICY": "Always"},
     ("AGENTAINER_IMAGE_PULL_POLICY='Always'", "IfNotPresent, Never")),
    ({"AGENTAINER_DOCKER_THREADS": "0"}, ("AGENTAINER_DOCKER_THREADS", "at least 1")),
    ({"AGENTAINER_STATUS_INTERVAL_SECONDS": "soon"},
     ("AGENTAINER_STATUS_INTERVAL_SECONDS='soon'", "not a number")),
    ({"AGENTAINER_STATUS_INTERVAL_SECONDS": "nan"},
     ("AGENTAINER_STATUS_INTERVAL_SECONDS='nan'", "not a number")),
    ({"AGENTAINER_STATUS_INTERVAL_SECONDS": "-1"},
     ("AGENTAINER_STATUS_INTERVAL_SECONDS", "at least 0")),
])
def test_setting_that_cannot_work_is_refused_naming_the_variable(
    environ: dict[str, str], words: tuple[str, ...]
) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(environ)
    for word in words:
        assert word in str(caught.value)


@pytest.mark.parametrize("cut", [
    "ChunkedEncodingError", "ReadTimeout", "ConnectionError"])
def test_a_connection_to_the_docker_engine_cut_even_mid_answer_is_the_engine_away(cut: str) -> None:
    """A log stream cut short when the engine restarts must be retried, never a step's
    internal error."""
    import requests.exceptions

    from controller.backends.docker import docker_errors
    from controller.errors import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="cannot reach the Docker engine"):
        with docker_errors("waiting for agent a"):
            raise getattr(requests.exceptions, cut)("Response ended prematurely")


@pytest.mark.parametrize("where", ["env", "command", "args"])
def test_a_string_linux_would_not_exec_is_refused_naming_it(where: str) -> None:
    """Longer than Linux takes, counted in bytes with the closing NUL (``é`` is two), or with a
    NUL inside."""
    room = MAX_ARG_BYTES - 1 - (len("HUGE=") if where == "env" else 0)
    workflow = make_workflow({"name": "s", "image": "busybox", "command": ["sh", "-c", "true"]})
    spec = build_agent_spec(workflow, UID, workflow.spec.steps[0], 0, 1, {})

    def with_text(text: str) -> AgentSpec:
        if where == "env":
            return replace(spec, env={**spec.env, "HUGE": text})
        return replace(spec, **{where: ["sh", "-c", text] if where == "command" else [text]})

    check_exec_limits(with_text("x" * room))  # the longest there is room for
    check_exec_limits(with_text("é" * (room // 2)))
    for text in ("x" * (room + 1), "é" * (room // 2 + 1)):
        with pytest.raises(AgentSpecError) as refused:
            check_exec_limits(with_text(text))
        what = {"env": "env HUGE", "command": "command[2]", "args": "args[0]"}[where]
        assert f"agent {spec.name}: {what} is " in str(refused.value)
        assert f"over the {MAX_ARG_BYTES:,}" in str(refused.value)
    with pytest.raises(AgentSpecError, match=f"{re.escape(what)} holds a NUL character .*at 3"):
        check_exec_limits(with_text("abc\0def"))  # ends a C string: "invalid argument"

