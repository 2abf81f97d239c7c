"""What a pool agent is made of, on each backend: the task runner as its first process, the user
its tasks run as, and the pool's validation rules. Pure builders, tested directly."""

from __future__ import annotations

from typing import Any

import pytest

from controller.agents import build_pool_agent_spec
from controller.backends.base import AgentSpec
from controller.backends.containers import container_config
from controller.backends.pods import build_pod
from controller.errors import InvalidSpecError
from controller.models import DEFAULT_TASK_USER, parse_agent_pool

RUNNER_IMAGE = "agentainer/runner:9.9.9"


def pool(**spec: Any) -> Any:
    return parse_agent_pool({"apiVersion": "agentainer.dev/v1alpha1", "kind": "AgentPool",
                             "metadata": {"name": "agents", "namespace": "team", "uid": "p-1"},
                             "spec": {"image": "agent:1", **spec}})


def agent(**spec: Any) -> AgentSpec:
    return build_pool_agent_spec(pool(**spec), "p-1")


def test_tasks_run_as_a_non_root_user_of_their_own_by_default() -> None:
    assert agent().task_user == (DEFAULT_TASK_USER, DEFAULT_TASK_USER)
    assert DEFAULT_TASK_USER != 0


def test_task_user_and_group_come_from_the_pool() -> None:
    assert agent(runAsUser=1000).task_user == (1000, 1000)
    assert agent(runAsUser=1000, runAsGroup=2000).task_user == (1000, 2000)
    assert agent(runAsUser=0).task_user == (0, 0)  # root, by the pool's choice
    assert agent(pod={"runAsUser": 4242}).task_user == (4242, 4242)


@pytest.mark.parametrize(("spec", "path", "reason"), [
    ({"runAsUser": 1000, "pod": {"runAsUser": 2000}}, "spec.pod.runAsUser",
     "is not runAsUser 1000"),
    ({"runAsUser": 0, "pod": {"runAsNonRoot": True}}, "spec.runAsUser",
     "contradicts pod.runAsNonRoot"),
    ({"runAsUser": -1}, "spec.runAsUser", "greater than or equal to 0"),
    ({"pod": {"runtimeClassName": "Not_A_Name"}}, "spec.pod.runtimeClassName",
     "is not a DNS-1123 name"),
])
def test_pool_users_that_cannot_work_are_refused_naming_the_field(
        spec: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidSpecError) as error:
        pool(**spec)
    assert any(p.path == path and reason in p.message for p in error.value.problems), \
        error.value.problems


def test_docker_pool_agent_runs_the_runner_as_pid_1_as_root_with_few_capabilities() -> None:
    config = container_config(agent(runAsUser=1000, runAsGroup=1001), "none", pids_limit=512)

    assert config["entrypoint"] == ["/agentainer/bin/runner", "serve", "--uid", "1000",
                                    "--gid", "1001"]
    assert config["command"] == []
    assert config["init"] is False  # the runner is PID 1, so that it can end every process
    assert config["stdin_open"] is True
    assert config["user"] == "0:0"
    assert config["cap_drop"] == ["ALL"]
    assert sorted(config["cap_add"]) == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID",
                                         "SETUID"]
    assert config["security_opt"] == ["no-new-privileges:true"]
    assert config["pids_limit"] == 512
    assert config["labels"]["agentainer.dev/runner"] == "1"
    assert config["tmpfs"] == {"/agentainer/tasks": "mode=1777"}


def test_pool_pod_installs_the_runner_from_an_init_container_into_a_read_only_volume() -> None:
    pod = build_pod(agent(runAsUser=1000), RUNNER_IMAGE)
    spec = pod["spec"]
    (init,) = spec["initContainers"]
    (container,) = spec["containers"]

    assert init["image"] == RUNNER_IMAGE
    assert init["command"] == ["/runner", "install", "/agentainer/bin/runner"]
    assert container["command"] == ["/agentainer/bin/runner", "serve", "--uid", "1000",
                                    "--gid", "1000"]
    assert container["stdin"] is True and container["tty"] is False
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/agentainer/bin"]["readOnly"] is True
    assert "readOnly" not in mounts["/agentainer/tasks"]
    assert {v["name"] for v in spec["volumes"]} == {m["name"] for m in container["volumeMounts"]}
    assert pod["metadata"]["labels"]["agentainer.dev/runner"] == "1"
    assert "activeDeadlineSeconds" not in spec


def test_pool_pod_runner_is_root_with_only_the_capabilities_to_switch_users() -> None:
    security = build_pod(agent(), RUNNER_IMAGE)["spec"]["containers"][0]["securityContext"]

    assert security["runAsUser"] == 0
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert sorted(security["capabilities"]["add"]) == ["CHOWN", "DAC_OVERRIDE", "FOWNER",
                                                       "KILL", "SETGID", "SETUID"]
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("pod_options", [{"runAsNonRoot": True}, {"runAsUser": 1000}])
def test_pool_pod_of_one_non_root_user_passes_the_restricted_standard(
        pod_options: dict[str, Any]) -> None:
    pod = build_pod(agent(runAsUser=1000, pod=pod_options), RUNNER_IMAGE)

    for container in (*pod["spec"]["initContainers"], *pod["spec"]["containers"]):
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == 1000
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["spec"]["containers"][0]["command"][-4:] == ["--uid", "1000", "--gid", "1000"]


def test_runtime_class_reaches_the_pod() -> None:
    pod = build_pod(agent(pod={"runtimeClassName": "gvisor"}), RUNNER_IMAGE)

    assert pod["spec"]["runtimeClassName"] == "gvisor"


def test_fresh_agent_pod_has_no_runner() -> None:
    spec = AgentSpec(name="one", image="agent:1", command=["sh"], args=["-c", "true"], env={},
                     labels={}, timeout_seconds=5)
    pod = build_pod(spec, RUNNER_IMAGE)

    assert "initContainers" not in pod["spec"] and "volumes" not in pod["spec"]
    assert pod["spec"]["containers"][0]["command"] == ["sh"]
    assert pod["spec"]["activeDeadlineSeconds"] == 5


@pytest.mark.parametrize(("options", "user"), [
    ({}, {"runAsNonRoot": True, "runAsUser": DEFAULT_TASK_USER, "runAsGroup": DEFAULT_TASK_USER}),
    ({"runAsUser": 1000}, {"runAsNonRoot": True, "runAsUser": 1000}),
    ({"runAsNonRoot": True}, {"runAsNonRoot": True}),       # the image's user, checked
    ({"runAsUser": 0}, {"runAsUser": 0}),                     # root, asked for
    ({"runAsNonRoot": False}, {}),                            # the image's user, whoever
], ids=["default", "a-user", "image-user-non-root", "root", "image-user"])
def test_a_fresh_pod_passes_restricted_unless_its_step_asks_otherwise(
        options: dict[str, Any], user: dict[str, Any]) -> None:
    from controller.models import PodOptions

    spec = AgentSpec(name="one", image="agent:1", command=None, args=None, env={}, labels={},
                     pod=PodOptions.model_validate(options))
    security = build_pod(spec)["spec"]["containers"][0]["securityContext"]
    assert {k: v for k, v in security.items() if k.startswith("runAs")} == user
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}


# --- agents of their own, run through the runner (Docker) ------------------------------------


@pytest.mark.parametrize(("command", "args", "argv"), [
    (None, None, ["/entry", "--serve", "default"]),      # the image's, whole
    (None, ["--other"], ["/entry", "--other"]),          # its entrypoint, our args
    (["sh", "-c"], None, ["sh", "-c"]),                  # as in a pod: no image cmd
    (["sh", "-c"], ["echo hi"], ["sh", "-c", "echo hi"]),
])
def test_an_agents_whole_command_is_made_as_docker_and_a_pod_make_it(
        command: list[str] | None, args: list[str] | None, argv: list[str]) -> None:
    from controller.backends.containers import agent_argv

    spec = AgentSpec(name="a", image="i", command=command, args=args, env={}, labels={})

    assert agent_argv(spec, ["/entry"], ["--serve", "default"]) == argv


def test_an_agent_of_its_own_runs_through_the_runner_which_keeps_its_output() -> None:
    from controller.backends import runner

    spec = AgentSpec(name="a", image="i", command=["sh", "-c"], args=["echo hi"], env={},
                     labels={})
    through = runner.Exec(["sh", "-c", "echo hi"], 4096, user="app:staff", set_home=True)
    config = container_config(spec, "none", through=through)

    assert config["entrypoint"] == ["/agentainer/bin/runner", "exec", "--out", "/agentainer/out",
                                    "--limit", "4096", "--user", "app:staff", "--set-home",
                                    "--", "sh", "-c", "echo hi"]
    assert config["command"] == [] and config["user"] == "0:0"  # it drops to app:staff itself
    assert config["init"] is True


def test_a_pods_pid_1_is_never_a_command_that_would_ignore_sigterm() -> None:
    """PID 1 ignores a signal it has no handler for: a fresh pod's command (sleep, sh) would
    outlive its timeout's SIGTERM until the grace period's SIGKILL. Its pod's pause process is
    PID 1 instead, as the runner is a pool pod's."""
    fresh = AgentSpec(name="wf-step-abcde", image="agent:1", command=["sleep", "300"],
                      args=None, env={}, labels={}, namespace="team", timeout_seconds=3)

    assert build_pod(fresh, RUNNER_IMAGE)["spec"]["shareProcessNamespace"] is True
    assert "shareProcessNamespace" not in build_pod(agent(), RUNNER_IMAGE)["spec"]
