"""The agents to start, as pure functions of the resources: names, labels, specs, owners.

Names and labels are deterministic, so that a restarted controller finds its agents again by
them; nothing here talks to a backend or the store.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controller import templating
from controller.backends.base import (
    LABEL_AGENT_ID,
    LABEL_ATTEMPT,
    LABEL_INDEX,
    LABEL_MANAGED_BY,
    LABEL_POOL,
    LABEL_POOL_UID,
    LABEL_STEP,
    LABEL_WORKFLOW,
    LABEL_WORKFLOW_UID,
    MANAGED_BY,
    AgentSpec,
    WorkspaceSpec,
)
from controller.errors import AgentSpecError
from controller.models import (
    AgentPool,
    CleanupPolicy,
    EnvSource,
    EnvVar,
    Step,
    Workflow,
    dns_safe,
)

UID_SUFFIX_LENGTH = 5

MAX_ARG_BYTES = 32 * 4096
"""The longest argument or environment variable (``NAME=value``, its closing NUL counted) Linux
starts a program with (``MAX_ARG_STRLEN``): a longer one fails the agent's start with
"argument list too long", whatever the backend."""


def owner_reference(resource: Workflow | AgentPool, uid: str | None) -> dict[str, Any] | None:
    """The ownerReference that makes an agent die with its resource (through the garbage
    collector); None for a resource that is not in a cluster (``agentainer run``)."""
    if not uid:
        return None
    return {"apiVersion": resource.api_version, "kind": resource.kind,
            "name": resource.metadata.name, "uid": uid, "controller": True,
            "blockOwnerDeletion": False}


def agent_id(step: str, index: int, attempt: int) -> str:
    """An agent's id within its workflow: ``step.index.attempt`` (a step name has no dots)."""
    return f"{step}.{index}.{attempt}"


def agent_name(workflow: str, uid: str, step: Step, index: int, attempt: int) -> str:
    """``<workflow>-<step>[-<index>][-r<retry>]-<uid prefix>``, DNS-safe and at most 63 long."""
    base = f"{workflow}-{step.name}"
    if step.fans_out:
        base += f"-{index}"
    if attempt > 1:
        base += f"-r{attempt - 1}"
    suffix = re.sub(r"[^a-z0-9]", "", uid.lower())[:UID_SUFFIX_LENGTH] or "x"
    room = 63 - len(suffix) - 1
    safe = dns_safe(base, max_length=10_000)
    if len(safe) > room:
        digest = hashlib.sha1(safe.encode()).hexdigest()[:6]
        safe = safe[: room - 7].rstrip("-") + "-" + digest
    return f"{safe}-{suffix}"


def label_value(text: str) -> str:
    """``text`` as a Kubernetes label value (at most 63 characters, alphanumeric at both ends);
    a long one is cut and ends in a hash of the whole, so distinct texts stay distinct."""
    if len(text) <= 63:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    return text[:54].rstrip("-._") + "-" + digest


def agent_labels(workflow: Workflow, uid: str, step: Step, index: int, attempt: int) -> dict[str, str]:
    """The labels by which agents are found again after a restart."""
    return {
        LABEL_WORKFLOW: label_value(workflow.metadata.name),
        LABEL_WORKFLOW_UID: uid,
        LABEL_STEP: step.name,
        LABEL_INDEX: str(index),
        LABEL_ATTEMPT: str(attempt),
        LABEL_AGENT_ID: label_value(agent_id(step.name, index, attempt)),
        LABEL_MANAGED_BY: MANAGED_BY,
    }


def build_agent_spec(
    workflow: Workflow,
    uid: str,
    step: Step,
    index: int,
    attempt: int,
    outputs: dict[str, list[str]],
    shared: templating.Context | None = None,
) -> AgentSpec:
    """The agent to start for one attempt of one unit of a step, templates rendered."""
    item: str | None = None
    if step.parallel is not None and step.parallel.items is not None:
        item = templating.item_text(step.parallel.items[index])
    # ``shared``: what the run knows (phases, the outcome for finally steps); else the spec's.
    context = replace(shared, item=item) if shared is not None else templating.Context(
        workflow_name=workflow.metadata.name, workflow_uid=uid, item=item, outputs=outputs,
        params={p.name: p.value for p in workflow.spec.params if p.value is not None},
    )
    env, env_refs = split_env([*workflow.spec.env, *step.env],
                              lambda value: templating.render(value, context))
    env.update(
        AGENTAINER_WORKFLOW=workflow.metadata.name,
        AGENTAINER_WORKFLOW_UID=uid,
        AGENTAINER_STEP=step.name,
        AGENTAINER_AGENT_ID=agent_id(step.name, index, attempt),
        AGENTAINER_ATTEMPT=str(attempt),
    )
    if step.parallel is not None:
        env["AGENTAINER_ITEM_INDEX"] = str(index)
        if item is not None:
            env["AGENTAINER_ITEM"] = item
    resources = step.resources
    return AgentSpec(
        name=agent_name(workflow.metadata.name, uid, step, index, attempt),
        image=step.image or "",
        command=[templating.render(c, context) for c in step.command] if step.command else None,
        args=[templating.render(a, context) for a in step.args] if step.args else None,
        env=env,
        labels=agent_labels(workflow, uid, step, index, attempt),
        nano_cpus=resources.nano_cpus if resources else None,
        memory_bytes=resources.memory_bytes if resources else None,
        namespace=workflow.metadata.namespace,
        owner=owner_reference(workflow, workflow.metadata.uid),
        timeout_seconds=step.timeout_seconds,
        pod=step.pod,
        workspace=workspace_spec(workflow, uid).name if workflow.spec.workspace else None,
        capabilities=tuple(workflow.spec.capabilities.add) if workflow.spec.capabilities else (),
        env_refs=env_refs,
    )


def check_exec_limits(spec: AgentSpec) -> None:
    """Refuse an agent whose rendered command, args or env hold a string Linux would not start
    it with, naming it, before any backend tries (which would say only "argument list too
    long" or "invalid argument", and whose retries would fail the same way): one longer than
    ``MAX_ARG_BYTES``, or one with a NUL character, which ends a C string."""
    def check(what: str, text: str, size: int) -> None:
        if size > MAX_ARG_BYTES:
            raise AgentSpecError(
                f"agent {spec.name}: {what} is {size:,} bytes once its templates are rendered, "
                f"over the {MAX_ARG_BYTES:,} Linux starts a program with in one argument or "
                "variable; hand data this large over through the workflow's workspace")
        if "\0" in text:
            raise AgentSpecError(
                f"agent {spec.name}: {what} holds a NUL character once its templates are "
                f"rendered (at {text.index(chr(0))}), which no program can be given in an "
                "argument or variable; have the step that prints it encode it (base64)")

    for name, value in spec.env.items():
        check(f"env {name}", value, len(name.encode()) + len(value.encode()) + 2)
    for field, words in (("command", spec.command), ("args", spec.args)):
        for position, word in enumerate(words or ()):
            check(f"{field}[{position}]", word, len(word.encode()) + 1)


def workspace_spec(workflow: Workflow, uid: str) -> WorkspaceSpec:
    """The workflow's shared workspace: its claim, or one named after it and owned by it."""
    workspace = workflow.spec.workspace
    assert workspace is not None
    name = workspace.claim_name or f"{dns_safe(workflow.metadata.name, 40)}-workspace-{uid[:8]}"
    return WorkspaceSpec(
        name=name, namespace=workflow.metadata.namespace, size=workspace.size,
        labels={LABEL_WORKFLOW_UID: uid, LABEL_MANAGED_BY: MANAGED_BY},
        owner=owner_reference(workflow, workflow.metadata.uid),
        storage_class=workspace.storage_class_name, access_mode=workspace.access_mode,
        existing=workspace.claim_name is not None)


def split_env(variables: list[EnvVar], render: Callable[[str], str] = str
              ) -> tuple[dict[str, str], dict[str, EnvSource]]:
    """Variables in order (a later one of a name replaces an earlier one): those with a value,
    rendered, and those whose value comes from a Secret or ConfigMap."""
    env: dict[str, str] = {}
    refs: dict[str, EnvSource] = {}
    for variable in variables:
        env.pop(variable.name, None)
        refs.pop(variable.name, None)
        if variable.value_from is not None:
            refs[variable.name] = variable.value_from
        else:
            env[variable.name] = render(variable.value)
    return env, refs


def should_remove(policy: CleanupPolicy, succeeded: bool) -> bool:
    if policy is CleanupPolicy.ALWAYS:
        return True
    if policy is CleanupPolicy.ON_SUCCESS:
        return succeeded
    return False


def pool_labels(pool: AgentPool, uid: str) -> dict[str, str]:
    return {LABEL_POOL: dns_safe(pool.metadata.name), LABEL_POOL_UID: uid,
            LABEL_MANAGED_BY: MANAGED_BY}


def build_pool_agent_spec(pool: AgentPool, uid: str) -> AgentSpec:
    """A warm agent of the pool: the pool's image, env and limits, idling until leased."""
    resources = pool.spec.resources
    env, env_refs = split_env(pool.spec.env)
    return AgentSpec(
        name=f"pool-{dns_safe(pool.metadata.name, 48)}-{secrets.token_hex(3)}",
        image=pool.spec.image,
        command=None,
        args=None,
        env=env | {"AGENTAINER_POOL": pool.metadata.name},
        labels=pool_labels(pool, uid),
        nano_cpus=resources.nano_cpus if resources else None,
        memory_bytes=resources.memory_bytes if resources else None,
        resident=True,
        task_user=pool.spec.task_user,
        namespace=pool.metadata.namespace,
        owner=owner_reference(pool, uid if pool.metadata.uid else None),
        pod=pool.spec.pod,
        capabilities=tuple(pool.spec.capabilities.add) if pool.spec.capabilities else (),
        env_refs=env_refs,
    )
