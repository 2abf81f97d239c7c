"""The API: Workflow and AgentPool as pydantic models, parsed from the YAML users give kubectl.

Structure (types, required fields, patterns, ranges) is declared on the models, so that the CRD
schemas can be generated from them. Rules that span fields (the DAG, template references) are
checked by :func:`semantic_problems`. :func:`parse_workflow` runs both and reports every problem
with its field path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from controller import templating
from controller.errors import InvalidSpecError, Problem

API_GROUP = "agentainer.dev"
API_VERSION = "v1alpha1"
RETRY_ANNOTATION = f"workflows.{API_GROUP}/retry"
"""Set to any new value on a finished Workflow that did not succeed: what did not succeed runs
again (each value once)."""
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
ENV_NAME = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
RESERVED_ENV_PREFIX = "AGENTAINER_"
# Kubernetes' own pattern for quantities, so that the API server refuses what we would.
QUANTITY = (r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
            r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")

DnsLabel = Annotated[str, Field(pattern=DNS_LABEL, min_length=1, max_length=63)]
DEFAULT_TASK_USER = 65532
"""Pooled tasks run as this user unless the pool says otherwise: not root, and no user that
owns anything in usual images."""


class BackendKind(StrEnum):
    """Where agents run (the backends themselves are ``controller.backends``)."""

    DOCKER = "docker"
    KUBERNETES = "kubernetes"

    @classmethod
    def of(cls, chosen: str | None, default: str) -> BackendKind:
        """A resource's own choice of backend, else the controller's default setting."""
        return cls(chosen or default)


class CleanupPolicy(StrEnum):
    ALWAYS = "Always"
    ON_SUCCESS = "OnSuccess"
    NEVER = "Never"


class Shutdown(StrEnum):
    STOP = "Stop"
    TERMINATE = "Terminate"


class WorkflowPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    """Its running agents were stopped: ``spec.shutdown: Terminate`` (or the CLI's Ctrl-C)."""
    STOPPED = "Stopped"
    """``spec.shutdown: Stop``: no new step started; those running finished."""

    @property
    def finished(self) -> bool:
        return self in (WorkflowPhase.SUCCEEDED, WorkflowPhase.FAILED, WorkflowPhase.CANCELLED,
                        WorkflowPhase.STOPPED)


class StepPhase(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELLED = "Cancelled"


class AgentPhase(StrEnum):
    CREATED = "Created"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def live(self) -> bool:
        """Created or running: the agent has not ended."""
        return self in (AgentPhase.CREATED, AgentPhase.RUNNING)


class AgentReason(StrEnum):
    """Why an agent stopped, when its exit code alone does not say."""

    COMPLETED = "Completed"
    ERROR = "Error"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    OOM_KILLED = "OOMKilled"
    CANCELLED = "Cancelled"
    BACKEND_ERROR = "BackendError"
    LOST = "Lost"
    """Its container or pod went away before it ended (deleted, evicted, preempted), or the
    task runner of its pool agent died."""
    INTERRUPTED = "Interrupted"
    """The container engine cut it short (it stopped the agent as it shut down, or the
    connection to a pool agent broke): run again, not counted as a retry."""


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionType(StrEnum):
    """The conditions both kinds may carry; each means the same on a Workflow and a pool."""

    COMPLETED = "Completed"
    """A Workflow ended; its reason says how (Succeeded, Failed, DeadlineExceeded, ...)."""
    SUCCEEDED = "Succeeded"
    """A Workflow's outcome, from the start as Tekton has it: Unknown while it runs, then True
    or False (``kubectl wait --for=condition=Succeeded``)."""
    READY = "Ready"
    """An AgentPool has its minSize warm (False: warming up, or why it cannot)."""
    INVALID = "Invalid"
    """The spec can never work as written (a rule the CRD schema cannot check)."""
    SPEC_CHANGE_IGNORED = "SpecChangeIgnored"
    """A Workflow's spec changed after it started; it runs the spec it started with."""
    BACKEND_UNAVAILABLE = "BackendUnavailable"
    """The resource asks for a backend this controller does not have."""
    SUSPENDED = "Suspended"
    """A Workflow's ``spec.suspend`` holds its new agents back (False once resumed)."""


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are mistakes, not ignored.

    Integers, numbers and booleans of the spec are strict (StrictInt, StrictFloat, StrictBool)
    where pydantic would coerce: ``"5"`` and ``true`` are not integers, nor ``"yes"`` or ``1``
    booleans, as the CRD's schema says. (A file's ``5.0`` is read as ``5``, as kubectl sends
    it: :mod:`controller.manifests`.)
    The model as a whole is not strict: that would refuse enums given as their strings.
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# --- spec -------------------------------------------------------------------------------------


class KeyRef(ApiModel):
    """One key of a Secret or ConfigMap in the resource's own namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253,
                      description="Name of the Secret or ConfigMap.")
    key: str = Field(pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="Its key.")
    optional: StrictBool = Field(default=False,
                           description="A missing Secret, ConfigMap or key leaves the variable "
                                       "unset instead of failing the agent.")


class EnvSource(ApiModel):
    """Where a variable's value comes from, as in a pod: exactly one of the two."""

    secret_key_ref: KeyRef | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeyRef | None = Field(default=None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self

    @property
    def kind(self) -> str:
        return "Secret" if self.secret_key_ref is not None else "ConfigMap"

    @property
    def ref(self) -> KeyRef:
        ref = self.secret_key_ref or self.config_map_key_ref
        assert ref is not None
        return ref


AGENT_CAPABILITIES = ("CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "NET_BIND_SERVICE",
                      "SETGID", "SETUID")
"""What a Docker agent may do as root by default: Docker's defaults but NET_RAW (raw sockets:
spoofing, sniffing), MKNOD, SETFCAP, SETPCAP, SYS_CHROOT and AUDIT_WRITE. A pod's agent has
none (it runs as a non-root user), as the Pod Security Standard restricted wants."""
LINUX_CAPABILITIES = frozenset({
    "AUDIT_CONTROL", "AUDIT_READ", "AUDIT_WRITE", "BLOCK_SUSPEND", "BPF", "CHECKPOINT_RESTORE",
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "IPC_LOCK", "IPC_OWNER",
    "KILL", "LEASE", "LINUX_IMMUTABLE", "MAC_ADMIN", "MAC_OVERRIDE", "MKNOD", "NET_ADMIN",
    "NET_BIND_SERVICE", "NET_BROADCAST", "NET_RAW", "PERFMON", "SETFCAP", "SETGID", "SETPCAP",
    "SETUID", "SYS_ADMIN", "SYS_BOOT", "SYS_CHROOT", "SYS_MODULE", "SYS_NICE", "SYS_PACCT",
    "SYS_PTRACE", "SYS_RAWIO", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "SYSLOG",
    "WAKE_ALARM"})


class Capabilities(ApiModel):
    """Linux capabilities the agents get beyond the defaults, where an agent needs one."""

    add: list[str] = Field(
        default_factory=list, max_length=len(LINUX_CAPABILITIES),
        description="Capabilities to add, by name without CAP_ (NET_RAW, SYS_PTRACE...). "
                    "Docker agents have CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, "
                    "NET_BIND_SERVICE, SETGID and SETUID by default; a pod's agent none.")

    @field_validator("add")
    @classmethod
    def _known(cls, names: list[str]) -> list[str]:
        for index, name in enumerate(names):
            if name.upper().removeprefix("CAP_") not in LINUX_CAPABILITIES:
                raise ValueError(f"add[{index}]: {name!r} is not a Linux capability")
        return [name.upper().removeprefix("CAP_") for name in names]


class EnvVar(ApiModel):
    """An environment variable of the agents: a value, or a key of a Secret or ConfigMap."""

    name: str = Field(
        pattern=ENV_NAME,
        max_length=253,
        description="Name of the environment variable.",
    )
    value: str = Field(
        default="",
        description="Value; may hold templates such as {{ steps.NAME.output }}.",
    )
    value_from: EnvSource | None = Field(
        default=None,
        description="Take the value from a Secret or ConfigMap of the resource's namespace "
                    "(agentainer run: from --secret and --config-map) instead; it is never "
                    "stored, shown in status or logged.")

    @model_validator(mode="after")
    def _value_or_source(self) -> EnvVar:
        if self.value and self.value_from is not None:
            raise ValueError("set value or valueFrom, not both")
        return self


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes quantity (``500m``, ``1.5``, ``64Mi``, ``1G``) as an exact number."""
    # Imported here: the kubernetes package is large and only this helper of it is needed.
    from kubernetes.utils.quantity import parse_quantity as kubernetes_parse_quantity

    try:
        value: Decimal = kubernetes_parse_quantity(text)  # type: ignore[no-untyped-call]
    except (ValueError, InvalidOperation, TypeError):
        raise ValueError(
            f"{text!r} is not a Kubernetes quantity (examples: 500m, 1.5, 64Mi, 1G)"
        ) from None
    if value <= 0:
        raise ValueError(f"{text!r} must be greater than zero")
    return value


class Resources(ApiModel):
    """Limits of each agent, as Kubernetes quantities."""

    cpu: str | None = Field(
        default=None,
        description="CPU limit as a Kubernetes quantity: 500m is half a core, 2 is two cores.",
        json_schema_extra={"pattern": QUANTITY},
    )
    memory: str | None = Field(
        default=None,
        description="Memory limit as a Kubernetes quantity: 64Mi, 1Gi, 500M.",
        json_schema_extra={"pattern": QUANTITY},
    )

    @field_validator("cpu", "memory")
    @classmethod
    def _is_quantity(cls, value: str | None) -> str | None:
        if value is not None:
            parse_quantity(value)
        return value

    @cached_property
    def nano_cpus(self) -> int | None:
        """The CPU limit in billionths of a core, as Docker's ``NanoCpus`` takes it."""
        if self.cpu is None:
            return None
        return int((parse_quantity(self.cpu) * 10**9).to_integral_value(rounding="ROUND_CEILING"))

    @cached_property
    def memory_bytes(self) -> int | None:
        """The memory limit in bytes, rounded up like Kubernetes does for fractions of a byte."""
        if self.memory is None:
            return None
        return int(parse_quantity(self.memory).to_integral_value(rounding="ROUND_CEILING"))


class RetryPolicy(ApiModel):
    """How failed agents are run again."""

    limit: StrictInt = Field(
        default=0, ge=0, le=100, description="How many times a failed agent is run again."
    )
    backoff_seconds: StrictFloat = Field(
        default=1.0, ge=0, le=3600, description="Seconds to wait before the first retry."
    )
    backoff_factor: StrictFloat = Field(
        default=2.0, ge=1, le=10, description="Each further wait is the last one times this."
    )

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        return float(self.backoff_seconds * self.backoff_factor ** (retry - 1))


class Parallel(ApiModel):
    """Fan-out: one agent per item, or N replicas."""

    # Not a CEL rule: CEL cannot see `items`, whose elements may be any JSON value.
    model_config = ApiModel.model_config | ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["items"]}, {"required": ["replicas"]},
                  {"required": ["itemsFrom"]}],
    })

    items: list[Any] | None = Field(
        default=None,
        min_length=1,
        description="One agent per item; the agent reads it as {{ item }} and $AGENTAINER_ITEM.",
    )
    items_from: str | None = Field(
        default=None, max_length=256,
        description="One agent per element of the JSON array an upstream step printed: "
                    "{{ steps.NAME.output }} (or .outputs, the list of a fan-out's outputs). "
                    "Elements become items exactly as parallel.items would; not an array, or "
                    "more than AGENTAINER_MAX_ITEMS_FROM of them, fails the step.")
    replicas: StrictInt | None = Field(
        default=None, ge=1, le=10000, description="Run this many identical agents."
    )
    max_workers: StrictInt | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="At most this many agents of the step run at once; default: all of them.",
    )

    @field_validator("items")
    @classmethod
    def _items_not_too_deep(cls, items: list[Any] | None) -> list[Any] | None:
        for index, depth in enumerate(_nestings(items or [])):
            if depth > MAX_ITEM_NESTING:
                raise ValueError(f"items[{index}] is nested more than {MAX_ITEM_NESTING} "
                                 "levels deep")
        return items

    @property
    def width(self) -> int:
        """How many agents the fan-out runs: 0 for ``itemsFrom`` until the run resolves it
        (``with_items``)."""
        if self.items is not None:
            return len(self.items)
        return 0 if self.items_from is not None else (self.replicas or 1)


MAX_ITEM_NESTING = 64
"""How deep an item of a fan-out may nest lists and objects: far more than any data an agent
reads, and far from where encoding it would run out of stack."""


def nesting(value: Any) -> int:
    """How deep ``value`` nests lists and objects (a scalar: 0; deeper than MAX_ITEM_NESTING:
    MAX_ITEM_NESTING + 1), counted without recursion."""
    return next(_nestings([value]))


def _nestings(values: list[Any]) -> Iterator[int]:
    """The nesting of each of ``values``, as :func:`nesting` says it, in work linear in the
    distinct lists and objects they hold: one that recurs (YAML aliases share them) is looked
    into once, not once for each place it is in, and one that contains itself is too deep."""
    known: dict[int, int] = {}  # by id: the nesting of each list or object looked into
    for value in values:
        yield _nesting(value, known) if isinstance(value, (dict, list)) else 0


def _nesting(value: dict[Any, Any] | list[Any], known: dict[int, int]) -> int:
    too_deep = MAX_ITEM_NESTING + 1
    # From value down to the list or object being looked into, each with its children not yet
    # looked at and the deepest nesting of those that were.
    path: list[tuple[Any, Iterator[Any], list[int]]] = []

    def enter(container: dict[Any, Any] | list[Any]) -> None:
        children = container.values() if isinstance(container, dict) else container
        path.append((container, iter(children), [0]))

    enter(value)
    while path:
        container, children, deepest = path[-1]
        for child in children:
            if not isinstance(child, (dict, list)):
                continue
            if id(child) in known:
                deepest[0] = max(deepest[0], known[id(child)])
                continue
            if len(path) == MAX_ITEM_NESTING or any(child is c for c, _, _ in path):
                return too_deep  # deeper than the limit, or it contains itself
            enter(child)
            break
        else:
            path.pop()
            known[id(container)] = min(deepest[0] + 1, too_deep)
            if path:
                path[-1][2][0] = max(path[-1][2][0], known[id(container)])
    return known[id(value)]


class Toleration(ApiModel):
    """A Kubernetes toleration, as in a pod spec."""

    key: str | None = Field(default=None, description="Taint key; empty with Exists: all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, description="Taint value, with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty: all.")
    toleration_seconds: StrictInt | None = Field(
        default=None, description="With NoExecute: how long the pod may stay.")


class PodOptions(ApiModel):
    """How agents run as pods (backend kubernetes); ignored by the docker backend."""

    service_account_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Service account of the agent pods; none (no API token) when not set.")
    node_selector: dict[str, str] = Field(default_factory=dict,
                                          description="Node labels the pods must match.")
    tolerations: list[Toleration] = Field(default_factory=list,
                                          description="Taints the pods tolerate.")
    image_pull_secrets: list[str] = Field(default_factory=list,
                                          description="Names of Secrets to pull images with.")
    run_as_non_root: StrictBool | None = Field(
        default=None,
        description="Refuse to start agents whose user is root. Unset with runAsUser unset, "
                    "an agent's pod runs as user 65532 and passes the Pod Security Standard "
                    "restricted; false runs the image's own user, root included.")
    run_as_user: StrictInt | None = Field(default=None, ge=0,
                                    description="User id the agent runs as; 0 (root) only "
                                                "when asked for.")
    runtime_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="RuntimeClass of the pods, for a sandbox stronger than the node's default "
                    "runtime (gVisor, Kata), where the cluster has one.")


class ContinueOn(ApiModel):
    """What a step's end does not stop."""

    failed: StrictBool = Field(default=False,
                         description="Its failure does not fail the workflow: the steps after "
                                     "it run, and read {{ steps.NAME.phase }}.")


class When(ApiModel):
    """A condition of a step, in Tekton's shape: the step runs only if ``input`` (a template,
    rendered) is ``in`` (or ``notin``) ``values``. No expression language: nothing runs."""

    input: str = Field(max_length=1024,
                       description="A template, such as {{ steps.review.output }}.")
    operator: Literal["in", "notin"] = Field(description="in or notin.")
    values: list[str] = Field(min_length=1, max_length=100,
                              description="Strings compared with the rendered input, whole.")


class Step(ApiModel):
    """One step: one agent, a fan-out of agents, or agents leased from a pool."""

    model_config = ApiModel.model_config | ConfigDict(json_schema_extra={
        "x-kubernetes-validations": [{
            "rule": "has(self.image) != has(self.pool)",
            "message": "set exactly one of image or pool",
        }],
    })

    name: DnsLabel = Field(description="Step name, a DNS-1123 label unique in the workflow.")
    image: str | None = Field(
        default=None,
        min_length=1,
        description="Agent image. Required unless the step leases agents from a pool.",
    )
    pool: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description="Name of an AgentPool to lease agents from instead of starting new ones.",
    )
    command: list[str] | None = Field(
        default=None, description="Entrypoint, as in a pod; the image's own when not set."
    )
    args: list[str] | None = Field(
        default=None, description="Arguments to the entrypoint; the image's own when not set."
    )
    env: list[EnvVar] = Field(default_factory=list, description="Environment of this step.")
    parallel: Parallel | None = Field(
        default=None, description="Fan out: one agent per item, or N replicas."
    )
    resources: Resources | None = Field(default=None, description="Limits of each agent.")
    retries: RetryPolicy | None = Field(default=None, description="Retries of failed agents.")
    timeout_seconds: StrictInt | None = Field(
        default=None,
        ge=1,
        description="An agent running longer than this is killed; each attempt has its own.",
    )
    continue_on: ContinueOn | None = Field(
        default=None, description="Let the workflow go on when this step fails.")
    when: list[When] = Field(
        default_factory=list, max_length=20,
        description="Conditions that must all hold for the step to run; otherwise it is "
                    "Skipped, saying which did not. A step that depends on a skipped one still "
                    "runs, unless it reads that step's output.")
    depends_on: list[DnsLabel] | None = Field(
        default=None,
        description="Steps that must succeed first. Default: the step before; [] for a root.",
    )
    pod: PodOptions | None = Field(default=None,
                                   description="Pod settings, for backend kubernetes.")

    @property
    def width(self) -> int:
        return self.parallel.width if self.parallel else 1

    @property
    def items_from(self) -> str | None:
        return self.parallel.items_from if self.parallel else None

    @property
    def fans_out(self) -> bool:
        """Its output is the JSON list of its agents' outputs, whatever their number."""
        return self.items_from is not None or self.width > 1

    def with_items(self, items: list[Any]) -> Step:
        """This ``itemsFrom`` step with the items its run resolved."""
        assert self.parallel is not None
        return self.model_copy(update={"parallel": self.parallel.model_copy(
            update={"items": items})})

    def inputs(self) -> set[str]:
        """The steps whose outputs this step reads through its templates."""
        kinds = (templating.ReferenceKind.STEP_OUTPUT, templating.ReferenceKind.STEP_OUTPUTS)
        texts = [env.value for env in self.env] + (self.command or []) + (self.args or [])
        texts += [self.items_from] if self.items_from else []
        texts += [text for when in self.when for text in (when.input, *when.values)]
        return {ref.step for text in texts for ref in templating.references(text)
                if ref.kind in kinds and ref.step}

    @property
    def max_workers(self) -> int:
        if self.parallel and self.parallel.max_workers:
            return min(self.parallel.max_workers, self.width)
        return self.width


WORKSPACE_PATH = "/workspace"
"""Where every agent of a workflow with a workspace finds it."""


class Workspace(ApiModel):
    """A directory every agent of the workflow shares, at /workspace."""

    size: str = Field(default="1Gi", json_schema_extra={"pattern": QUANTITY},
                      description="Its size, a Kubernetes quantity: the claim's request on "
                                  "Kubernetes (Docker's local volumes are not limited).")
    claim_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="An existing PersistentVolumeClaim to use (backend kubernetes), kept "
                    "after the run; default: a claim created for the workflow and owned by it.")
    storage_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253,
        description="Storage class of the claim created for the workflow; default: the "
                    "cluster's. Agents of a fan-out may run on several nodes: pick one that "
                    "allows ReadWriteMany there, or keep them on one node.")
    access_mode: Literal["ReadWriteOnce", "ReadWriteMany"] = Field(
        default="ReadWriteOnce", description="Access mode of the claim created.")

    @field_validator("size")
    @classmethod
    def _is_quantity(cls, value: str) -> str:
        parse_quantity(value)
        return value


class Param(ApiModel):
    """An input of the workflow: ``{{ params.NAME }}`` in templates."""

    name: str = Field(pattern=rf"^{templating.PARAM_NAME}$", max_length=63,
                      description="Name, as templates write it: {{ params.NAME }}.")
    value: str | None = Field(
        default=None, max_length=65536,
        description="Its value, and the default `agentainer run -p NAME=VALUE` replaces; a "
                    "parameter without one is required. Data: never evaluated.")
    description: str | None = Field(default=None, max_length=1024,
                                    description="What it is for, for people.")


class WorkflowSpec(ApiModel):
    """The steps to run and how."""

    model_config = ApiModel.model_config | ConfigDict(json_schema_extra={
        "x-kubernetes-validations": [{
            "rule": "self.steps.all(s, self.steps.exists_one(t, t.name == s.name))",
            "message": "step names must be unique",
        }, {
            "rule": "!has(self.params) || "
                    "self.params.all(p, self.params.exists_one(q, q.name == p.name))",
            "message": "parameter names must be unique",
        }],
    })

    description: str | None = Field(
        default=None, max_length=1024, description="What this workflow does, for people."
    )
    backend: BackendKind | None = Field(
        default=None,
        description="Where agents run: docker or kubernetes. Default: the controller's setting.",
    )
    cleanup: CleanupPolicy = Field(
        default=CleanupPolicy.ON_SUCCESS,
        description=(
            "Which agents are removed once they stop: Always, OnSuccess (agents that failed "
            "are kept to debug), or Never."
        ),
    )
    timeout_seconds: StrictInt | None = Field(
        default=None, ge=1, description="The whole workflow fails past this many seconds."
    )
    params: list[Param] = Field(default_factory=list, max_length=100,
                                description="Inputs of the workflow, read as {{ params.NAME }}.")
    env: list[EnvVar] = Field(default_factory=list, description="Environment of every agent.")
    capabilities: Capabilities | None = Field(
        default=None, description="Linux capabilities every agent gets beyond the defaults.")
    ttl_seconds_after_finished: StrictInt | None = Field(
        default=None, ge=0,
        description="Delete the Workflow (and what it left: kept agents, its workspace, its "
                    "state) this many seconds after it finished; default: the controller's "
                    "AGENTAINER_WORKFLOW_TTL_SECONDS (0: kept).")
    workspace: Workspace | None = Field(
        default=None,
        description="A directory every agent shares at /workspace: on Docker a volume made "
                    "for the workflow, on Kubernetes a PersistentVolumeClaim it owns (or "
                    "claimName's); removed with the workflow as cleanup says. Pooled steps "
                    "cannot use it (pool agents serve other workflows too).")
    suspend: StrictBool = Field(
        default=False,
        description="While true, no new agent starts (running ones finish); false resumes. "
                    "The workflow's timeout keeps counting.")
    shutdown: Shutdown | None = Field(
        default=None,
        description="End the run early: Stop (no new step starts, running agents finish, "
                    "finally steps run; phase Stopped) or Terminate (running agents are "
                    "stopped now, finally steps run; phase Cancelled). Stop may be turned into "
                    "Terminate, not back.")
    steps: list[Step] = Field(min_length=1, max_length=200, description="The steps to run.")
    finally_steps: list[Step] = Field(
        default_factory=list, alias="finally", max_length=50,
        description="Steps run once every other step has ended, whatever the outcome (after "
                    "a cancellation or the timeout too, within AGENTAINER_FINALLY_GRACE_SECONDS"
                    "); they read {{ workflow.status }} and {{ workflow.failures }}, and may "
                    "depend only on each other (default: on none). They change the workflow's "
                    "phase only if they fail.")

    def running_part(self) -> WorkflowSpec:
        """The spec without its controls (SPEC_CONTROLS): what a run runs."""
        return self.model_copy(update={name: WorkflowSpec.model_fields[name].default
                                       for name in SPEC_CONTROLS})

    def dependencies(self, index: int) -> list[str]:
        """The steps that step ``index`` waits for, the default applied."""
        step = self.steps[index]
        if step.depends_on is not None:
            return list(step.depends_on)
        return [self.steps[index - 1].name] if index > 0 else []

    def dependency_map(self) -> dict[str, list[str]]:
        dependencies = {step.name: self.dependencies(i) for i, step in enumerate(self.steps)}
        dependencies.update({step.name: list(step.depends_on or [])
                             for step in self.finally_steps})
        return dependencies

    @property
    def all_steps(self) -> list[Step]:
        """The steps, then the finally steps."""
        return [*self.steps, *self.finally_steps]

    def placed(self) -> list[tuple[str, Step]]:
        """Every step with its field path: ``spec.steps[i]`` or ``spec.finally[i]``."""
        return [(f"spec.steps[{i}]", step) for i, step in enumerate(self.steps)] + [
            (f"spec.finally[{i}]", step) for i, step in enumerate(self.finally_steps)]


SPEC_CONTROLS = frozenset({"suspend", "shutdown", "ttl_seconds_after_finished"})
"""Fields of a Workflow's spec that steer its run rather than say what it runs: changing them
is not a change of the spec the run started with."""


class ObjectMeta(BaseModel):
    """The parts of Kubernetes metadata the project reads; the rest is kept but not used."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(pattern=DNS_SUBDOMAIN, max_length=253)
    namespace: str = "default"
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Workflow(ApiModel):
    api_version: Literal["agentainer.dev/v1alpha1"]
    kind: Literal["Workflow"]
    metadata: ObjectMeta
    spec: WorkflowSpec
    status: dict[str, Any] | None = None


class AgentPoolSpec(ApiModel):
    """Warm agents of one image, leased by pooled steps."""

    model_config = ApiModel.model_config | ConfigDict(json_schema_extra={
        "x-kubernetes-validations": [{
            "rule": "self.minSize <= self.maxSize",
            "message": "minSize must not be above maxSize",
        }, {
            "rule": "!has(self.runAsUser) || !has(self.pod) || !has(self.pod.runAsUser) || "
                    "self.pod.runAsUser == 0 || self.pod.runAsUser == self.runAsUser",
            "message": "pod.runAsUser and runAsUser must be the same: a pod of one user runs "
                       "its tasks as that user",
        }],
    })

    backend: BackendKind | None = Field(default=None, description="Where the pool's agents run.")
    image: str = Field(min_length=1, description="Image of every agent in the pool.")
    min_size: StrictInt = Field(default=1, ge=0, le=1000, description="Warm agents kept at least.")
    max_size: StrictInt = Field(default=10, ge=1, le=1000, description="Agents the pool grows to.")
    warm_up: StrictBool = Field(default=True, description="Start minSize agents before any step asks.")
    idle_timeout_seconds: StrictInt = Field(
        default=300, ge=0, description="Seconds an idle agent above minSize is kept."
    )
    max_uses: StrictInt = Field(
        default=100, ge=1, description="An agent is replaced after this many tasks."
    )
    reset_command: list[str] | None = Field(
        default=None,
        description="An extra hook run as the task user after each task (the agent is cleaned "
                    "without it); an agent whose reset fails is replaced.",
    )
    run_as_user: StrictInt | None = Field(
        default=None, ge=0, le=2147483647,
        description=f"User id that tasks run as, never the task runner's own. Default "
                    f"{DEFAULT_TASK_USER} (or pod.runAsUser); 0 runs tasks as root, which gives "
                    "up the guarantees on files between tasks.")
    run_as_group: StrictInt | None = Field(
        default=None, ge=0, le=2147483647,
        description="Group id that tasks run as; default: the user id.")
    lease_timeout_seconds: StrictInt = Field(
        default=60, ge=0, le=3600,
        description="How long a task waits for an agent when all maxSize agents are busy.",
    )
    env: list[EnvVar] = Field(default_factory=list, description="Environment of every agent.")
    capabilities: Capabilities | None = Field(
        default=None, description="Linux capabilities the agents (and tasks run as root) get "
                                  "beyond the defaults.")
    resources: Resources | None = Field(default=None, description="Limits of each agent.")
    pod: PodOptions | None = Field(default=None,
                                   description="Pod settings, for backend kubernetes.")


    @property
    def task_user(self) -> tuple[int, int]:
        """The user and group tasks run as, defaults applied."""
        uid = self.run_as_user
        if uid is None:
            uid = (self.pod.run_as_user if self.pod and self.pod.run_as_user
                   else DEFAULT_TASK_USER)
        return uid, self.run_as_group if self.run_as_group is not None else uid


class AgentPool(ApiModel):
    api_version: Literal["agentainer.dev/v1alpha1"]
    kind: Literal["AgentPool"]
    metadata: ObjectMeta
    spec: AgentPoolSpec
    status: dict[str, Any] | None = None


# --- status -----------------------------------------------------------------------------------


class StatusModel(BaseModel):
    """Status objects are built up by the engine, so they are mutable."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Condition(StatusModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Completed, Invalid, SpecChangeIgnored, Ready, ...")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word saying why.")
    message: str = Field(default="", description="Details for people.")
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")


class AgentStatus(StatusModel):
    """One agent (one attempt of one item of a step)."""

    id: str = Field(description="step.index.attempt, unique in the workflow.")
    name: str = Field(description="Container or pod name.")
    index: int = Field(description="Item or replica index in the step.")
    attempt: int = Field(description="1 for the first run, 2 for the first retry, ...")
    phase: AgentPhase = Field(description="Created, Running, Succeeded or Failed.")
    exit_code: int | None = Field(default=None, description="Exit code, once stopped.")
    reason: AgentReason | None = Field(default=None, description="Why it stopped.")
    output_truncated: bool | None = Field(
        default=None, description="It printed more than the output limit; the rest was dropped.")
    created_at: str | None = Field(default=None, description="When it was created.")
    started_at: str | None = Field(default=None, description="When it started.")
    finished_at: str | None = Field(default=None, description="When it stopped.")


class AgentCounts(StatusModel):
    """How many of a step's agents are in each phase (a phase none is in is left out)."""

    created: int | None = Field(default=None, alias="Created", description="Not started yet.")
    running: int | None = Field(default=None, alias="Running", description="Running.")
    succeeded: int | None = Field(default=None, alias="Succeeded", description="Succeeded.")
    failed: int | None = Field(default=None, alias="Failed",
                               description="Failed, stopped or timed out.")


class StepStatus(StatusModel):
    """What became of one step."""

    name: str = Field(description="The step's name.")
    phase: StepPhase = Field(default=StepPhase.PENDING,
                             description="Pending, Running, Succeeded, Failed, Skipped, Cancelled.")
    agents: list[AgentStatus] = Field(
        default_factory=list,
        description="Its agents. On the resource, when a workflow has many, only those worth "
                    "showing: the running, the failed and the last (agentsOmitted says how "
                    "many are not); every agent is in the store.")
    agent_counts: AgentCounts | None = Field(
        default=None, description="All its agents by phase, listed or not (resource only).")
    agents_omitted: int | None = Field(
        default=None, description="Agents not listed in agents, to keep the resource small.")
    attempts: int = Field(default=0, description="Agent runs, retries included.")
    attempts_before_retry: int | None = Field(
        default=None, description="Set when the step was run again by a retry of the "
                                  "workflow: attempts up to this number were before it.")
    output: str | None = Field(
        default=None,
        description="Output (trimmed stdout); a JSON list for a fan-out. Truncated here; "
                    "full in the store.",
    )
    outputs: list[str] | None = Field(
        default=None, description="Every agent's output (CLI only; not kept in the resource)."
    )
    output_truncated: bool | None = Field(default=None, description="Output was cut here.")
    started_at: str | None = Field(default=None, description="When it started.")
    finished_at: str | None = Field(default=None, description="When it ended.")
    message: str | None = Field(
        default=None, description="Why it failed or was skipped; while it runs, what its "
                                  "agents that have not begun to run wait for (a node).")


class WorkflowStatus(StatusModel):
    """What the controller observed of a Workflow."""

    phase: WorkflowPhase = Field(
        default=WorkflowPhase.PENDING,
        description="Pending, Running, Succeeded, Failed, Cancelled or Stopped.")
    started_at: str | None = Field(default=None, description="When it started.")
    finished_at: str | None = Field(default=None, description="When it ended.")
    retried: str | None = Field(
        default=None, description="The last value of the workflows.agentainer.dev/retry "
                                  "annotation the controller acted on (each value once).")
    retries: int | None = Field(default=None, description="How many times it was retried.")
    observed_generation: int | None = Field(default=None,
                                            description="The generation of spec being run.")
    progress: str = Field(default="0/0", description="Agents succeeded / agents in all.")
    message: str | None = Field(default=None, description="Why it failed, for people.")
    steps: list[StepStatus] = Field(default_factory=list, description="Each step.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Standard conditions.")

    def step(self, name: str) -> StepStatus:
        for step in self.steps:
            if step.name == name:
                return step
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class AgentPoolStatus(StatusModel):
    """What the controller observed of an AgentPool."""

    ready: int = Field(default=0, description="Warm agents waiting for a task.")
    busy: int = Field(default=0, description="Agents running a task.")
    total: int = Field(default=0, description="All agents of the pool.")
    observed_generation: int | None = Field(default=None, description="Generation seen.")
    conditions: list[Condition] = Field(default_factory=list,
                                        description="Standard conditions.")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --- semantic checks ----------------------------------------------------------------------------


def _problems_from_validation_error(error: ValidationError) -> list[Problem]:
    problems = []
    for detail in error.errors():
        path = ""
        for part in detail["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            elif not (part.startswith("function-") or part in ("str", "list[any]")):
                path += f".{part}" if path else str(part)
        message = detail["msg"]
        if detail["type"] == "extra_forbidden":
            message = "unknown field"
        elif detail["type"] == "string_pattern_mismatch":
            message = f"{detail['input']!r} {_pattern_reason(detail['ctx']['pattern'])}"
        elif detail["type"] == "literal_error":
            message = f"must be {detail['ctx']['expected']}, not {detail['input']!r}"
        elif detail["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif detail["type"] in EXPECTED_TYPES:
            message = f"must be {EXPECTED_TYPES[detail['type']]}, not {_as_written(detail['input'])}"
        problems.append(Problem(path, message))
    return problems


EXPECTED_TYPES = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean",
                  "string_type": "a string"}


def _as_written(value: Any) -> str:
    """A value refused for its type, as a YAML or JSON file writes it: "5" (a string), 5.0."""
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    scalar = isinstance(value, (str, int, float, bool, type(None)))
    text = json.dumps(value, ensure_ascii=False) if scalar else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _pattern_reason(pattern: str) -> str:
    if pattern == DNS_LABEL:
        return (
            "is not a DNS-1123 label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    if pattern == DNS_SUBDOMAIN:
        return (
            "is not a DNS-1123 name: lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit"
        )
    if pattern == ENV_NAME:
        return "is not a valid environment variable name: letters, digits, '-', '.', '_'"
    return f"does not match {pattern}"


def _find_cycle(dependencies: dict[str, list[str]]) -> list[str] | None:
    """A cycle of step names (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in dependencies.get(name, []):
            if dep not in dependencies or dep == name:
                continue  # unknown and self dependencies have messages of their own
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[name] = 2
        return None

    for name in dependencies:
        if name not in state and (cycle := visit(name)):
            return cycle
    return None


def ancestors(dependencies: dict[str, list[str]], name: str) -> set[str]:
    """Every step that ``name`` waits for, directly or through others."""
    seen: set[str] = set()
    stack = list(dependencies.get(name, []))
    while stack:
        dep = stack.pop()
        if dep not in seen and dep in dependencies:
            seen.add(dep)
            stack.extend(dependencies[dep])
    return seen


def _one_step_reference(text: str) -> bool:
    try:
        refs = templating.references(text)
    except templating.TemplateError:
        return True  # said where its templates are checked
    kinds = (templating.ReferenceKind.STEP_OUTPUT, templating.ReferenceKind.STEP_OUTPUTS)
    return (len(refs) == 1 and refs[0].kind in kinds
            and templating.TEMPLATE.fullmatch(text.strip()) is not None)


def _template_fields(step: Step, path: str) -> list[tuple[str, str]]:
    fields = [(f"{path}.env[{i}].value", env.value) for i, env in enumerate(step.env)]
    fields += [(f"{path}.parallel.itemsFrom", step.items_from)] if step.items_from else []
    for i, when in enumerate(step.when):
        fields.append((f"{path}.when[{i}].input", when.input))
        fields += [(f"{path}.when[{i}].values[{j}]", text) for j, text in enumerate(when.values)]
    fields += [(f"{path}.command[{i}]", text) for i, text in enumerate(step.command or [])]
    fields += [(f"{path}.args[{i}]", text) for i, text in enumerate(step.args or [])]
    return fields


def semantic_problems(spec: WorkflowSpec) -> list[Problem]:
    """Rules that span fields: unique names, the DAG, template references, env, image or pool."""
    problems: list[Problem] = []
    params: set[str] = set()
    for i, param in enumerate(spec.params):
        if param.name in params:
            problems.append(Problem(f"spec.params[{i}].name",
                                    f"duplicate parameter name '{param.name}'"))
        params.add(param.name)
    steps_by_name: dict[str, Step] = {}
    regular = {step.name for step in spec.steps}
    for path, step in spec.placed():
        if step.name in steps_by_name:
            problems.append(Problem(f"{path}.name", f"duplicate step name '{step.name}'"))
        steps_by_name.setdefault(step.name, step)
        if step.image is None and step.pool is None:
            problems.append(Problem(f"{path}.image", "required unless the step sets pool"))
        if step.pool is not None and spec.workspace is not None:
            problems.append(Problem(
                f"{path}.pool", "a workflow with a workspace cannot lease pool agents: they "
                "serve other workflows too, which must not see its files; give the step an "
                "image"))
        if step.pool is not None and not step.command:
            problems.append(Problem(f"{path}.command",
                                    "required for a pooled step: the task to run in the agent"))
        if step.image is not None and step.pool is not None:
            problems.append(
                Problem(f"{path}.pool", "set image or pool, not both: a pool has its own image")
            )
        if step.parallel is not None:
            given = [step.parallel.items is not None, step.parallel.replicas is not None,
                     step.parallel.items_from is not None]
            if sum(given) != 1:
                problems.append(
                    Problem(f"{path}.parallel", "set exactly one of items, replicas or itemsFrom")
                )
        if step.items_from is not None and not _one_step_reference(step.items_from):
            problems.append(Problem(
                f"{path}.parallel.itemsFrom", "must be one step reference and nothing else: "
                "{{ steps.NAME.output }} or {{ steps.NAME.outputs }}"))
        for j, env in enumerate(step.env):
            if env.name.startswith(RESERVED_ENV_PREFIX):
                problems.append(
                    Problem(f"{path}.env[{j}].name", f"names starting with "
                            f"{RESERVED_ENV_PREFIX} are set by agentainer")
                )
        if step.pod and step.pod.run_as_non_root and step.pod.run_as_user == 0:
            problems.append(Problem(f"{path}.pod.runAsUser",
                                    "0 (root) contradicts pod.runAsNonRoot"))
        for j, dep in enumerate(step.depends_on or []):
            if dep == step.name:
                problems.append(Problem(f"{path}.dependsOn[{j}]", "a step cannot depend on itself"))
            elif path.startswith("spec.finally") and dep in regular:
                problems.append(Problem(
                    f"{path}.dependsOn[{j}]", f"a finally step runs after every step: it may "
                    f"depend only on other finally steps, not on '{dep}'"))
            elif path.startswith("spec.steps") and dep not in regular and dep in {
                    s.name for s in spec.finally_steps}:
                problems.append(Problem(f"{path}.dependsOn[{j}]",
                                        f"'{dep}' is a finally step: it runs after this one"))

    for j, env in enumerate(spec.env):
        if env.name.startswith(RESERVED_ENV_PREFIX):
            problems.append(
                Problem(f"spec.env[{j}].name",
                        f"names starting with {RESERVED_ENV_PREFIX} are set by agentainer")
            )
        try:
            for ref in templating.references(env.value):
                if ref.kind is templating.ReferenceKind.PARAM:
                    problems.extend(_param_problems(ref, params, f"spec.env[{j}].value"))
                elif ref.kind not in (templating.ReferenceKind.WORKFLOW_NAME,
                                      templating.ReferenceKind.WORKFLOW_UID,
                                      templating.ReferenceKind.LITERAL):
                    problems.append(Problem(
                        f"spec.env[{j}].value",
                        "workflow-wide env may only use {{ workflow.* }} and {{ params.* }}; "
                        "put step references in a step's env",
                    ))
        except templating.TemplateError as error:
            problems.append(Problem(f"spec.env[{j}].value", str(error)))

    dependencies = spec.dependency_map()
    for path, step in spec.placed():
        for j, dep in enumerate(dependencies[step.name]):
            if dep not in steps_by_name:
                problems.append(Problem(f"{path}.dependsOn[{j}]", f"unknown step '{dep}'"))
    duplicates = len(steps_by_name) < len(spec.all_steps)
    cycle = None if duplicates else _find_cycle(dependencies)  # names must be unique first
    if cycle:
        where = next(path for path, s in spec.placed() if s.name == cycle[0])
        problems.append(
            Problem(f"{where}.dependsOn", "dependency cycle: " + " -> ".join(cycle))
        )

    problems.extend(_agent_name_clashes(spec))
    for path, step in spec.placed():
        in_finally = path.startswith("spec.finally")
        # A finally step runs after every step: it may read any of them.
        upstream = ancestors(dependencies, step.name) | (regular if in_finally else set())
        for where, text in _template_fields(step, path):
            try:
                refs = templating.references(text)
            except templating.TemplateError as error:
                problems.append(Problem(where, str(error)))
                continue
            for ref in refs:
                problems.extend(_reference_problems(ref, step, steps_by_name, upstream, where))
                problems.extend(_param_problems(ref, params, where))
                if ref.kind in OUTCOME_REFERENCES and not in_finally:
                    problems.append(Problem(where, f"{{{{ {ref.kind.value} }}}} is only set in "
                                                   "a finally step"))
    return problems


OUTCOME_REFERENCES = (templating.ReferenceKind.WORKFLOW_STATUS,
                      templating.ReferenceKind.WORKFLOW_FAILURES)


def _agent_name_clashes(spec: WorkflowSpec) -> list[Problem]:
    """Agents are named ``<workflow>-<step>[-<index>][-r<retry>]``, so a step called ``map-1``
    would share agent names with agent 1 of a fan-out step ``map``; refuse such pairs."""
    problems = []
    for path, step in spec.placed():
        for other in spec.all_steps:
            match = re.fullmatch(re.escape(other.name) + r"(?:-([0-9]+))?(?:-r([0-9]+))?",
                                 step.name)
            if other is step or match is None or match.group(0) == other.name:
                continue
            index, retry = match.group(1), match.group(2)
            index_clash = index is None or (other.fans_out and (
                other.items_from is not None or int(index) < other.width))
            retry_clash = retry is None or (other.retries is not None
                                            and 1 <= int(retry) <= other.retries.limit)
            if index_clash and retry_clash:
                problems.append(Problem(
                    f"{path}.name",
                    f"'{step.name}' is also the name of an agent of step '{other.name}' "
                    f"(agents are named <workflow>-<step>[-<index>][-r<retry>]); rename it",
                ))
    return problems


def _param_problems(ref: templating.Reference, params: set[str], where: str) -> list[Problem]:
    if ref.kind is not templating.ReferenceKind.PARAM or ref.param in params:
        return []
    known = ", ".join(sorted(params)) or "none"
    return [Problem(where, f"{{{{ params.{ref.param} }}}} names unknown parameter "
                           f"'{ref.param}' (spec.params: {known})")]


def missing_params(spec: WorkflowSpec) -> list[Problem]:
    """Parameters that have no value: a run cannot start without them."""
    return [Problem(f"spec.params[{i}].value",
                    f"parameter '{param.name}' is required and has no value")
            for i, param in enumerate(spec.params) if param.value is None]


def with_params(workflow: Workflow, values: dict[str, str]) -> Workflow:
    """The workflow with these parameter values (``agentainer run -p``), or InvalidSpecError
    naming each unknown one."""
    known = {param.name for param in workflow.spec.params}
    unknown = [Problem(f"-p {name}", f"the workflow has no parameter '{name}' (spec.params: "
                                     f"{', '.join(sorted(known)) or 'none'})")
               for name in values if name not in known]
    if unknown:
        raise InvalidSpecError(unknown)
    params = [param.model_copy(update={"value": values.get(param.name, param.value)})
              for param in workflow.spec.params]
    return workflow.model_copy(update={"spec": workflow.spec.model_copy(
        update={"params": params})})


def _reference_problems(
    ref: templating.Reference,
    step: Step,
    steps_by_name: dict[str, Step],
    upstream: set[str],
    where: str,
) -> list[Problem]:
    kind = templating.ReferenceKind
    if ref.kind is kind.ITEM and step.items_from is None and (
            step.parallel is None or step.parallel.items is None):
        return [Problem(where, "{{ item }} is only set in a step with parallel.items or "
                               "parallel.itemsFrom")]
    if ref.kind not in (kind.STEP_OUTPUT, kind.STEP_OUTPUTS, kind.STEP_PHASE):
        return []
    template = f"{{{{ steps.{ref.step}.{ref.kind.value} }}}}"
    if ref.step not in steps_by_name:
        return [Problem(where, f"{template} names unknown step '{ref.step}'")]
    if ref.step == step.name:
        return [Problem(where, f"{template}: a step cannot read its own "
                               f"{ref.kind.value}, which exists only once it has ended")]
    if ref.step not in upstream:
        return [Problem(
            where,
            f"{template}: step '{step.name}' does not depend on '{ref.step}' "
            f"(add it to dependsOn, directly or through another step)",
        )]
    if ref.kind is kind.STEP_OUTPUT and steps_by_name[ref.step].fans_out:
        return [Problem(
            where,
            f"{template}: '{ref.step}' runs several agents; use "
            f"{{{{ steps.{ref.step}.outputs }}}} (a JSON list)",
        )]
    return []


# --- parsing ------------------------------------------------------------------------------------


def parse_workflow(document: Any, source: str = "") -> Workflow:
    """A Workflow from a parsed YAML/JSON document, or InvalidSpecError with every problem."""
    try:
        workflow = Workflow.model_validate(document)
    except ValidationError as error:
        raise InvalidSpecError(_problems_from_validation_error(error), source) from None
    problems = semantic_problems(workflow.spec)
    if problems:
        raise InvalidSpecError(problems, source)
    return workflow


def parse_agent_pool(document: Any, source: str = "") -> AgentPool:
    """An AgentPool from a parsed document, or InvalidSpecError with every problem."""
    try:
        pool = AgentPool.model_validate(document)
    except ValidationError as error:
        raise InvalidSpecError(_problems_from_validation_error(error), source) from None
    problems = pool_problems(pool.spec)
    if problems:
        raise InvalidSpecError(problems, source)
    return pool


def pool_problems(spec: AgentPoolSpec) -> list[Problem]:
    """Rules of an AgentPool that span fields."""
    problems = []
    if spec.min_size > spec.max_size:
        problems.append(Problem("spec.minSize",
                                f"{spec.min_size} is above maxSize {spec.max_size}"))
    pod = spec.pod
    if pod and pod.run_as_user and spec.run_as_user is not None and \
            pod.run_as_user != spec.run_as_user:
        problems.append(Problem(
            "spec.pod.runAsUser", f"{pod.run_as_user} is not runAsUser {spec.run_as_user}: a "
            "pod of one user runs its tasks as that user; set one of the two"))
    if pod and pod.run_as_non_root and spec.task_user[0] == 0:
        problems.append(Problem(
            "spec.runAsUser", "0 (root) contradicts pod.runAsNonRoot: a pod of one non-root "
            "user runs its tasks as that user"))
    return problems


KINDS: dict[str, Callable[[Any, str], Workflow | AgentPool]] = {
    "Workflow": parse_workflow,
    "AgentPool": parse_agent_pool,
}


def dns_safe(text: str, max_length: int = 63) -> str:
    """``text`` as a DNS-1123 label: lowercase, other characters turned into '-', trimmed."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:max_length].rstrip("-") or "x"
