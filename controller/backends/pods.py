"""What the API server is asked to create for an agent: its pod, a pure function of its spec
(tested directly). A pool agent's pod runs the task runner, installed by an init container."""

from __future__ import annotations

from typing import Any

from controller.backends import runner
from controller.backends.base import (
    LABEL_MANAGED_BY,
    LABEL_RUNNER,
    MANAGED_BY,
    AgentSpec,
    WorkspaceSpec,
)
from controller.models import DEFAULT_TASK_USER, WORKSPACE_PATH, PodOptions

CONTAINER = "agent"
WORKSPACE_VOLUME = "agentainer-workspace"
RUNNER_INSTALLER = "runner-install"
RUNNER_VOLUME, TASKS_VOLUME = "agentainer-runner", "agentainer-tasks"


def _millicores(nano_cpus: int) -> str:
    return f"{-(-nano_cpus // 1_000_000)}m"


def shares_one_user(options: PodOptions) -> bool:
    """A pool pod asked to run as one non-root user (as the Pod Security Standard
    ``restricted`` requires): its runner may not switch users, and runs its tasks as itself."""
    return bool(options.run_as_non_root) or bool(options.run_as_user)


def agent_user(options: PodOptions) -> dict[str, Any]:
    """Who an agent of its own runs as: by default a non-root user of no image's (the pod
    passes the Pod Security Standard ``restricted``); root, or the image's own user, only when
    the step asks (``runAsUser: 0``, ``runAsNonRoot: false``)."""
    if options.run_as_user is not None:
        return {"runAsUser": options.run_as_user} | (
            {"runAsNonRoot": True} if options.run_as_user else {})
    if options.run_as_non_root is None:
        return {"runAsNonRoot": True, "runAsUser": DEFAULT_TASK_USER,
                "runAsGroup": DEFAULT_TASK_USER}
    return {"runAsNonRoot": True} if options.run_as_non_root else {}


def _literal(text: str) -> str:
    """``text`` as the kubelet will pass it: it expands ``$(NAME)`` in a container's command,
    args and env values (and makes ``$$`` one ``$``), which would read any variable of the
    agent (a Secret's too) into an output that has one, and change data. Every ``$`` doubled is
    one ``$`` again, so the agent gets the text exactly, as on Docker."""
    return text.replace("$", "$$")


def build_pod(spec: AgentSpec, runner_image: str = "") -> dict[str, Any]:
    """The pod of one agent: restrictive by default, limits as requests and limits, the
    workflow as owner (so that the garbage collector removes it with the workflow).

    A pool agent's pod runs the task runner: an init container copies it from its image into a
    volume that the agent's container mounts read-only. The runner runs as root with the few
    capabilities it needs to run each task as the task user, unless the pool asks for one
    non-root user (then the pod passes ``restricted``, and the runner runs as that user too)."""
    options = spec.pod or PodOptions()
    security: dict[str, Any] = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]} | (
            {"add": list(spec.capabilities)} if spec.capabilities else {}),
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if not spec.resident:
        security.update(agent_user(options))
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": spec.image,
        # Agent images are often built locally and tagged latest: never pull what is there.
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": name, "value": _literal(value)} for name, value in spec.env.items()]
        # Secrets and ConfigMaps: the kubelet reads them; the pod spec holds only where.
        + [{"name": name, "valueFrom": source.model_dump(by_alias=True, exclude_none=True)}
           for name, source in spec.env_refs.items()],
        "securityContext": security,
    }
    # Every pod of ours says so: the backend's watch of pods selects them by it.
    labels = {**spec.labels, LABEL_MANAGED_BY: MANAGED_BY}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": [container],
        "enableServiceLinks": False,
        "automountServiceAccountToken": options.service_account_name is not None,
        "terminationGracePeriodSeconds": 5,
    }
    if spec.resident:
        uid, gid = spec.task_user
        if shares_one_user(options):
            uid = options.run_as_user or uid
            security.update(runAsNonRoot=True, runAsUser=uid, runAsGroup=gid)
        else:
            security.update(runAsUser=0, runAsGroup=0,
                            capabilities={"drop": ["ALL"], "add": sorted(
                                {*runner.RUNNER_CAPABILITIES, *spec.capabilities})})
        labels[LABEL_RUNNER] = runner.VERSION_LABEL_VALUE
        container.update(
            command=runner.serve_command(uid, gid), stdin=True, stdinOnce=False, tty=False,
            volumeMounts=[
                {"name": RUNNER_VOLUME, "mountPath": runner.RUNNER_BIN_DIR, "readOnly": True},
                {"name": TASKS_VOLUME, "mountPath": runner.TASKS_DIR}])
        installer_security = {key: value for key, value in security.items()
                              if key != "capabilities"} | {"capabilities": {"drop": ["ALL"]}}
        pod_spec["initContainers"] = [{
            "name": RUNNER_INSTALLER,
            "image": runner_image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["/runner", "install", runner.RUNNER_PATH],
            "volumeMounts": [{"name": RUNNER_VOLUME, "mountPath": runner.RUNNER_BIN_DIR}],
            "securityContext": installer_security,
        }]
        pod_spec["volumes"] = [{"name": RUNNER_VOLUME, "emptyDir": {}},
                               {"name": TASKS_VOLUME, "emptyDir": {}}]
    else:
        if spec.command is not None:
            container["command"] = [_literal(word) for word in spec.command]
        if spec.args is not None:
            container["args"] = [_literal(word) for word in spec.args]
        # The pod's pause process is its PID 1, as the runner is a Docker agent's: the command
        # is not, so a SIGTERM (its timeout, a stop) ends it as it would anywhere else rather
        # than being ignored until the grace period's SIGKILL, and its orphans are reaped.
        pod_spec["shareProcessNamespace"] = True
    limits: dict[str, str] = {}
    if spec.nano_cpus is not None:
        limits["cpu"] = _millicores(spec.nano_cpus)
    if spec.memory_bytes is not None:
        limits["memory"] = str(spec.memory_bytes)
    if limits:
        container["resources"] = {"limits": limits, "requests": dict(limits)}
    metadata: dict[str, Any] = {"name": spec.name, "namespace": spec.namespace, "labels": labels}
    if spec.owner is not None:
        metadata["ownerReferences"] = [dict(spec.owner)]
    if spec.timeout_seconds and not spec.resident:
        pod_spec["activeDeadlineSeconds"] = spec.timeout_seconds
    if options.service_account_name:
        pod_spec["serviceAccountName"] = options.service_account_name
    if options.runtime_class_name:
        pod_spec["runtimeClassName"] = options.runtime_class_name
    if options.node_selector:
        pod_spec["nodeSelector"] = dict(options.node_selector)
    if options.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True)
                                   for t in options.tolerations]
    if options.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": n} for n in options.image_pull_secrets]
    if spec.workspace:
        pod_spec.setdefault("volumes", []).append(
            {"name": WORKSPACE_VOLUME, "persistentVolumeClaim": {"claimName": spec.workspace}})
        container.setdefault("volumeMounts", []).append(
            {"name": WORKSPACE_VOLUME, "mountPath": WORKSPACE_PATH})
        # Writable by the agents' group where the volume lets the kubelet set its owner.
        pod_spec["securityContext"] = {"fsGroup": DEFAULT_TASK_USER}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def build_claim(workspace: WorkspaceSpec) -> dict[str, Any]:
    """The PersistentVolumeClaim of a workflow's workspace, owned by the workflow."""
    metadata: dict[str, Any] = {"name": workspace.name, "namespace": workspace.namespace,
                                "labels": dict(workspace.labels)}
    if workspace.owner is not None:
        metadata["ownerReferences"] = [dict(workspace.owner)]
    spec: dict[str, Any] = {"accessModes": [workspace.access_mode],
                            "resources": {"requests": {"storage": workspace.size}}}
    if workspace.storage_class:
        spec["storageClassName"] = workspace.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata,
            "spec": spec}
