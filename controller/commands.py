"""The CLI's commands against a cluster, as kubectl and argo users expect them: ``submit``,
``list``, ``get``, ``watch``, ``logs``, and the actions on a run (``stop``, ``terminate``,
``suspend``, ``resume``, ``retry``, ``resubmit``, ``delete``), each of which is a field or an
annotation of the Workflow, so that kubectl and GitOps can do the same."""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from controller.agents import label_value
from controller.backends.base import LABEL_AGENT_ID, LABEL_WORKFLOW_UID, AgentHandle
from controller.clock import age_seconds, seconds_between
from controller.cluster import AGENT_POOLS, Cluster, ClusterError, Target
from controller.config import Settings
from controller.errors import AgentainerError, ConfigError, ConflictError, NotFoundError
from controller.manifests import load_run, read_documents
from controller.models import (
    API_GROUP,
    RETRY_ANNOTATION,
    AgentPhase,
    AgentStatus,
    StepStatus,
    WorkflowPhase,
    WorkflowStatus,
)

EXIT_SUCCEEDED = 0
EXIT_FAILED = 1
EXIT_UNUSABLE = 2
EXIT_TIMED_OUT = 124
"""A wait (``--wait``, ``watch``, ``logs -f``) reached its ``--timeout``; the run goes on."""
EXIT_CANCELLED = 130

EXIT_CODES = {
    WorkflowPhase.SUCCEEDED: EXIT_SUCCEEDED,
    WorkflowPhase.FAILED: EXIT_FAILED,
    WorkflowPhase.STOPPED: EXIT_FAILED,
    WorkflowPhase.CANCELLED: EXIT_CANCELLED,
}
KIND_NAME = f"workflow.{API_GROUP}"
FOLLOW_POLL_SECONDS = 1.0


def parse_params(arguments: list[str]) -> dict[str, str]:
    """``-p NAME=VALUE`` arguments; the last of a name wins."""
    params = {}
    for argument in arguments:
        name, equals, value = argument.partition("=")
        if not equals or not name:
            raise ConfigError(f"-p {argument!r}: give NAME=VALUE")
        params[name] = value
    return params


def target(args: argparse.Namespace) -> Target:
    return Target(kubeconfig=args.kubeconfig, context=args.context, namespace=args.namespace,
                  all_namespaces=getattr(args, "all_namespaces", False))


def status_of(body: dict[str, Any]) -> WorkflowStatus:
    """The status a Workflow carries (an empty one when it has none yet, or an unreadable)."""
    try:
        return WorkflowStatus.model_validate(body.get("status") or {})
    except ValueError:
        return WorkflowStatus()


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
"""Characters a terminal acts on (escape sequences, bells): an agent's output is shown with
them made visible, so that what an agent printed cannot redraw the screen of `get`."""


def short(text: str | None, width: int = 60) -> str:
    """``text`` on one line, at most ``width`` characters, its control characters shown as ?."""
    if text is None:
        return ""
    flat = CONTROL.sub("?", " ".join(text.split()))
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def duration(seconds: float | None) -> str:
    """kubectl's way: 45s, 3m12s, 2h5m, 4d3h."""
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60}s" if seconds < 600 else f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600}h"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(cell.ljust(width) for cell, width in
                                 zip(row, widths, strict=True)).rstrip() for row in rows)


def phase_of(body: dict[str, Any]) -> str:
    phase = (body.get("status") or {}).get("phase") or WorkflowPhase.PENDING.value
    suspended = (body.get("spec") or {}).get("suspend") and phase in ("Pending", "Running")
    return f"{phase} (Suspended)" if suspended else phase


def finished(body: dict[str, Any]) -> WorkflowPhase | None:
    phase = (body.get("status") or {}).get("phase")
    try:
        found = WorkflowPhase(phase) if phase else None
    except ValueError:
        return None
    return found if found is not None and found.finished else None


def print_objects(objects: list[dict[str, Any]], output: str, single: bool) -> None:
    """json, yaml or name output of resources, as kubectl prints them (a List when many)."""
    if output == "name":
        for body in objects:
            print(f"{KIND_NAME}/{body['metadata']['name']}")
        return
    document: dict[str, Any] = objects[0] if single else {
        "apiVersion": "v1", "kind": "List", "items": objects}
    if output == "json":
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(yaml.safe_dump(document, sort_keys=False, allow_unicode=True), end="")


# --- submit, resubmit -------------------------------------------------------------------------


def command_submit(args: argparse.Namespace) -> int:
    """Create the file's Workflow (with ``-p`` values), and its AgentPools that do not exist
    yet; then, with ``--wait`` or ``--watch``, follow it to its end."""
    params = parse_params(args.param or [])
    load_run(args.file, params)  # refuse what would not run: its problems, with their fields
    cluster = Cluster(target(args))
    workflow: dict[str, Any] | None = None
    for document in read_documents(args.file):
        body = dict(document.body)
        if args.namespace:
            body.setdefault("metadata", {})["namespace"] = args.namespace
        if body.get("kind") == "AgentPool":
            try:
                cluster.create(body, AGENT_POOLS)
                print(f"agentpool.{API_GROUP}/{body['metadata']['name']} created")
            except ConflictError:
                print(f"agentpool.{API_GROUP}/{body['metadata']['name']} exists: left as it is")
        elif body.get("kind") == "Workflow":
            for param in body.get("spec", {}).get("params") or []:
                if param.get("name") in params:
                    param["value"] = params[param["name"]]
            workflow = body
    assert workflow is not None  # load_run found exactly one
    return _created(cluster, cluster.create(workflow), args)


def command_resubmit(args: argparse.Namespace) -> int:
    """A new Workflow with the spec of NAME (its controls reset), named after it."""
    cluster = Cluster(target(args))
    old = cluster.get(args.name)
    metadata = old["metadata"]
    spec = {key: value for key, value in old.get("spec", {}).items()
            if key not in ("suspend", "shutdown")}
    body = {"apiVersion": old["apiVersion"], "kind": old["kind"], "metadata": {
        "generateName": metadata["name"][:57] + "-", "namespace": metadata["namespace"],
        "labels": metadata.get("labels") or {}, "annotations": {
            key: value for key, value in (metadata.get("annotations") or {}).items()
            if not key.startswith(("agentainer.dev/", "workflows.agentainer.dev/",
                                   "kubectl.kubernetes.io/"))}}, "spec": spec}
    return _created(cluster, cluster.create(body), args)


def _created(cluster: Cluster, created: dict[str, Any], args: argparse.Namespace) -> int:
    name = created["metadata"]["name"]
    print(f"{KIND_NAME}/{name} created")
    if args.watch or args.wait:
        return follow(cluster, name, args.timeout, quiet=args.wait)
    return EXIT_SUCCEEDED


# --- list, get ----------------------------------------------------------------------------------


def command_list(args: argparse.Namespace) -> int:
    cluster = Cluster(target(args))
    items = sorted(cluster.all(), key=lambda b: (b["metadata"].get("namespace", ""),
                                                  b["metadata"]["name"]))
    if args.output in ("json", "yaml", "name"):
        print_objects(items, args.output, single=False)
        return EXIT_SUCCEEDED
    if not items:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        print(f"No workflows in {where}.", file=sys.stderr)
        return EXIT_SUCCEEDED
    wide = args.output == "wide"
    rows = [(["NAMESPACE"] if args.all_namespaces else []) + ["NAME", "PHASE", "PROGRESS",
            "AGE"] + (["DURATION", "MESSAGE"] if wide else [])]
    for body in items:
        status = status_of(body)
        took = seconds_between(status.started_at, status.finished_at) if status.finished_at \
            else (age_seconds(status.started_at) if status.started_at else None)
        rows.append(([body["metadata"].get("namespace", "")] if args.all_namespaces else [])
                    + [body["metadata"]["name"], phase_of(body), status.progress,
                       duration(age_seconds(body["metadata"]["creationTimestamp"]))]
                    + ([duration(took), short(status.message)] if wide else []))
    print(table(rows))
    return EXIT_SUCCEEDED


def command_get(args: argparse.Namespace) -> int:
    cluster = Cluster(target(args))
    body = cluster.get(args.name)
    if args.output in ("json", "yaml", "name"):
        print_objects([body], args.output, single=True)
        return EXIT_SUCCEEDED
    status = status_of(body)
    stored = _stored_agents(body, status, args)
    print(describe(body, status, stored, wide=args.output == "wide"))
    return EXIT_SUCCEEDED


def _stored_agents(body: dict[str, Any], status: WorkflowStatus,
                   args: argparse.Namespace) -> dict[str, list[AgentStatus]] | str | None:
    """Every agent of each step from the store, when the status lists only some of them (a
    large fan-out): None when it lists all, a message when the store cannot be read."""
    if not any(step.agents_omitted for step in status.steps):
        return None
    settings = Settings.from_env(store="redis", redis_url=args.redis_url)

    async def read() -> dict[str, list[AgentStatus]]:
        from controller.store import open_store

        store = await open_store(settings)
        try:
            records = await store.agents(body["metadata"]["uid"])
        finally:
            await store.close()
        agents: dict[str, list[AgentStatus]] = {}
        for record in sorted(records.values(), key=lambda r: (r.status.index, r.status.attempt)):
            agents.setdefault(record.step, []).append(record.status)
        return agents

    try:
        return asyncio.run(read())
    except AgentainerError as error:
        return f"the store could not be read ({error})"


def describe(body: dict[str, Any], status: WorkflowStatus,
             stored: dict[str, list[AgentStatus]] | str | None = None, wide: bool = False) -> str:
    """``get``'s text: the workflow, then each step and its agents."""
    metadata = body["metadata"]
    took = seconds_between(status.started_at, status.finished_at)
    lines = [f"Name:        {metadata['name']}", f"Namespace:   {metadata.get('namespace', '')}",
             f"Phase:       {phase_of(body)}", f"Progress:    {status.progress}"]
    if status.started_at:
        lines.append(f"Started:     {status.started_at}")
    if status.finished_at:
        lines.append(f"Finished:    {status.finished_at} ({duration(took)})")
    if status.message:
        lines.append(f"Message:     {CONTROL.sub('?', status.message)}")
    if status.conditions:
        lines.append("Conditions:  " + ", ".join(f"{c.type}={c.status.value} ({c.reason})"
                                                  for c in status.conditions))
    if status.retries:
        lines.append(f"Retried:     {status.retries} time(s)")
    if not status.steps:
        return "\n".join(lines)
    rows = [["STEP", "PHASE", "ATTEMPTS", "DURATION", "OUTPUT / MESSAGE"]]
    agent_rows: dict[str, list[list[str]]] = {}
    for step in status.steps:
        took = seconds_between(step.started_at, step.finished_at)
        rows.append([step.name, step.phase.value, str(step.attempts), duration(took),
                     short(step.output if step.output is not None else step.message,
                           200 if wide else 60)])
        agents = stored.get(step.name, step.agents) if isinstance(stored, dict) else step.agents
        agent_rows[step.name] = [["  AGENT", "NAME", "PHASE", "EXIT", "REASON", "DURATION"]] + [
            [f"  {a.id}", a.name, a.phase.value, "" if a.exit_code is None else str(a.exit_code),
             a.reason.value if a.reason else "",
             duration(seconds_between(a.started_at, a.finished_at))] for a in agents]
    lines += ["", table(rows)]
    for step in status.steps:
        if len(agent_rows[step.name]) > 1:
            lines += ["", f"{step.name}:", table(agent_rows[step.name])]
        if step.agents_omitted and not isinstance(stored, dict):
            why = f": {stored}" if isinstance(stored, str) else ""
            lines.append(f"  ({step.agents_omitted} more agents are in the store, not listed "
                         f"here{why})")
    return "\n".join(lines)


# --- watch, and --wait ----------------------------------------------------------------------


def command_watch(args: argparse.Namespace) -> int:
    return follow(Cluster(target(args)), args.name, args.timeout, quiet=False)


def follow(cluster: Cluster, name: str, timeout: float, quiet: bool) -> int:
    """Print a run's progress as its status changes (``quiet``: only its outcome), until it
    ends or ``timeout`` seconds pass; the exit code says how it ended."""
    seen = Seen()
    last: dict[str, Any] = {}
    for body in cluster.watch(name, timeout):
        last = body
        if not quiet:
            for line in seen.changes(body):
                print(line, flush=True)
        if finished(body) is not None:
            status = status_of(body)
            print(outcome(body, status), flush=True)
            return EXIT_CODES.get(status.phase, EXIT_FAILED)
    print(f"error: {name} had not finished after {timeout:g} s (--timeout); it is "
          f"{phase_of(last)} at {status_of(last).progress}: `agentainer watch {name}` follows "
          "it on", file=sys.stderr)
    return EXIT_TIMED_OUT


def outcome(body: dict[str, Any], status: WorkflowStatus) -> str:
    took = seconds_between(status.started_at, status.finished_at)
    return (f"{body['metadata']['name']}: {status.phase.value}"
            + (f" in {took:.1f}s" if took is not None else "")
            + f" ({status.progress} agents)"
            + (f": {CONTROL.sub('?', status.message)}" if status.message else ""))


@dataclass
class Seen:
    """What ``watch`` printed so far, to print only what changed."""

    phase: str = ""
    steps: dict[str, str] = field(default_factory=dict)
    agents: dict[str, str] = field(default_factory=dict)

    def changes(self, body: dict[str, Any]) -> Iterator[str]:
        status = status_of(body)
        steps, agents = self.steps, self.agents
        phase = phase_of(body)
        if phase != self.phase:
            yield f"{body['metadata']['name']}: {phase}" + (
                f" ({short(status.message, 200)})" if status.message and not finished(body) else "")
            self.phase = phase
        for step in status.steps:
            for agent in step.agents:
                if agents.get(agent.id) != agent.phase.value and \
                        agent.phase not in (AgentPhase.CREATED,):
                    yield _agent_line(step, agent, status)
                agents[agent.id] = agent.phase.value
            if steps.get(step.name) != step.phase.value and step.phase.value != "Pending":
                yield step_line(step)
            steps[step.name] = step.phase.value


def step_line(step: StepStatus) -> str:
    """A step's line in a run's progress: how it is now, how long it took, its output or why."""
    word = {"Running": "start", "Succeeded": "done", "Failed": "FAILED", "Skipped": "skip",
            "Cancelled": "cancel"}.get(step.phase.value, step.phase.value)
    took = seconds_between(step.started_at, step.finished_at)
    detail = (f"output {short(step.output)!r}" if step.phase.value == "Succeeded"
              else short(step.message, 200))
    return f"  {word:<6} {step.name}" + (f" in {took:.2f}s" if took is not None else "") + \
        (f": {detail}" if detail else "")


def _agent_line(step: StepStatus, agent: AgentStatus, status: WorkflowStatus) -> str:
    exit_code = f" exit={agent.exit_code}" if agent.exit_code is not None else ""
    return (f"         {step.name}: agent {agent.id} {agent.phase.value.lower()}{exit_code}"
            f" (progress {status.progress})")


# --- the actions: fields and annotations of the Workflow ----------------------------------------


@dataclass(frozen=True)
class Action:
    patch: Callable[[], dict[str, Any]]
    done: str
    needs_running: bool = True


ACTIONS = {
    "stop": Action(lambda: {"spec": {"shutdown": "Stop"}},
                   "stopping: no new step starts; running agents finish, then finally steps"),
    "terminate": Action(lambda: {"spec": {"shutdown": "Terminate"}},
                        "terminating: its running agents are stopped now, then finally steps"),
    "suspend": Action(lambda: {"spec": {"suspend": True}},
                      "suspended: no new agent starts until `agentainer resume`"),
    "resume": Action(lambda: {"spec": {"suspend": False}}, "resumed"),
    # A stop or terminate that ended the run would stop the retry at once: it goes with it.
    "retry": Action(lambda: {"metadata": {"annotations": {
        RETRY_ANNOTATION: f"{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(3)}"}},
        "spec": {"shutdown": None}},
        "retrying: the steps that did not succeed run again", needs_running=False),
}


def command_action(args: argparse.Namespace) -> int:
    cluster = Cluster(target(args))
    action = ACTIONS[args.command]
    body = cluster.get(args.name)
    ended = finished(body)
    if action.needs_running and ended is not None:
        print(f"error: {args.name} has already finished ({ended.value})", file=sys.stderr)
        return EXIT_FAILED
    if not action.needs_running and ended in (None, WorkflowPhase.SUCCEEDED):
        why = "it has not finished" if ended is None else "it succeeded (resubmit runs it anew)"
        print(f"error: {args.name} cannot be retried: {why}", file=sys.stderr)
        return EXIT_FAILED
    cluster.patch(args.name, action.patch())
    print(f"{KIND_NAME}/{args.name} {action.done}")
    if getattr(args, "wait", False) or getattr(args, "watch", False):
        if not action.needs_running:  # the controller takes it up: wait until it has
            _until(cluster, args.name, lambda b: finished(b) is None, args.timeout)
        return follow(cluster, args.name, args.timeout, quiet=args.wait)
    return EXIT_SUCCEEDED


def _until(cluster: Cluster, name: str, check: Callable[[dict[str, Any]], bool],
           timeout: float) -> None:
    for body in cluster.watch(name, timeout):
        if check(body):
            return
    raise ClusterError(f"{name}: the controller did not take the request up within "
                       f"{timeout:g} s (is it running?)")


def command_delete(args: argparse.Namespace) -> int:
    cluster = Cluster(target(args))
    for name in args.names:
        cluster.delete(name)
        print(f"{KIND_NAME}/{name} deleted")
    return EXIT_SUCCEEDED


# --- logs ---------------------------------------------------------------------------------------


def cluster_workflow(args: argparse.Namespace) -> tuple[Cluster, dict[str, Any]] | None:
    """The Workflow NAME in the cluster, if there is a cluster to ask and it has one."""
    try:
        cluster = Cluster(target(args))
        return cluster, cluster.get(args.workflow)
    except (NotFoundError, ConfigError):
        return None


@dataclass
class AgentLog:
    """Where one agent's log is: its pod or container while it is there, else the store."""

    step: str
    status: AgentStatus
    lines: Callable[[bool], Iterator[str]] | None = None
    """Its live log (follow or not), while its pod or container is there."""


def command_cluster_logs(cluster: Cluster, body: dict[str, Any], args: argparse.Namespace,
                         settings: Settings) -> int:
    """The logs of a cluster's Workflow: live from each agent's pod or container while it is
    there, else what the store kept (its output and the tail of its stderr)."""
    containers = Containers(body["metadata"]["uid"], settings)
    try:
        return _print_logs(cluster, body, args, settings, containers)
    finally:
        containers.close()


def _print_logs(cluster: Cluster, body: dict[str, Any], args: argparse.Namespace,
                settings: Settings, containers: Containers) -> int:
    name, uid = body["metadata"]["name"], body["metadata"]["uid"]
    stored, store_problem = asyncio.run(_stored_logs(uid, settings))
    printed: set[str] = set()
    deadline = time.monotonic() + args.timeout
    lines: queue.Queue[str] = queue.Queue()
    streams: dict[str, threading.Thread] = {}
    live_containers = containers.lines()
    while True:
        agents = _agent_logs(cluster, body, args, stored, live_containers)
        if any(agent.status.id not in printed and agent.status.id not in stored and
               agent.lines is None and not agent.status.phase.live
               for agent in agents):  # an agent that ended and is gone: the store has it now
            stored, store_problem = asyncio.run(_stored_logs(uid, settings))
            agents = _agent_logs(cluster, body, args, stored, live_containers)
        for agent in agents:
            key = agent.status.id
            if key in printed or key in streams:
                continue
            if args.follow and agent.lines is not None and \
                    agent.status.phase.live:
                streams[key] = _stream(agent, lines)
                continue
            if args.follow and agent.status.phase.live:
                continue  # not up yet: taken when it is
            printed.add(key)
            print(log_header(agent.status), flush=True)
            if agent.lines is not None:
                for line in agent.lines(False):
                    print(line)
            elif agent.status.id in stored:
                print(stored[agent.status.id][2] or "(it printed nothing)\n", end="")
            else:
                print("(its container is gone, and "
                      + (f"the store could not be read: {store_problem})" if store_problem
                         else "the store kept nothing of it)"))
        if not args.follow:
            break
        _drain(lines)
        if finished(body) is not None and not any(t.is_alive() for t in streams.values()):
            break
        if time.monotonic() >= deadline:
            print(f"error: stopped following {name} after {args.timeout:g} s (--timeout)",
                  file=sys.stderr)
            return EXIT_TIMED_OUT
        time.sleep(FOLLOW_POLL_SECONDS)
        body = cluster.get(name)
        live_containers = containers.lines()
    _drain(lines)
    if not printed and not streams:
        print(f"no agent of {name} matches" if args.step or args.agent
              else f"{name} has no agents yet", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_SUCCEEDED


def _stream(agent: AgentLog, lines: queue.Queue[str]) -> threading.Thread:
    assert agent.lines is not None
    source = agent.lines

    def pump() -> None:
        try:
            for line in source(True):
                lines.put(f"[{agent.status.id}] {line}")
        except AgentainerError as error:
            lines.put(f"[{agent.status.id}] (its log ended: {error})")

    thread = threading.Thread(target=pump, name=f"log-{agent.status.id}", daemon=True)
    thread.start()
    return thread


def _drain(lines: queue.Queue[str]) -> None:
    """Print the lines the log streams have read so far."""
    while True:
        try:
            print(lines.get_nowait(), flush=True)
        except queue.Empty:
            return


def _agent_logs(cluster: Cluster, body: dict[str, Any], args: argparse.Namespace,
                stored: dict[str, tuple[str, AgentStatus, str]],
                docker_agents: dict[str, Callable[[bool], Iterator[str]]]) -> list[AgentLog]:
    """The agents of the workflow the filters choose, in the order of its steps: those its
    status lists and those only the store knows (a large fan-out's), each with its live log
    where its pod (or else its container) is there."""
    status = status_of(body)
    live = dict(docker_agents)
    try:
        for pod in cluster.pods({LABEL_WORKFLOW_UID: body["metadata"]["uid"]}):
            agent_id = (pod.metadata.labels or {}).get(LABEL_AGENT_ID)
            if agent_id:
                live[agent_id] = _pod_lines(cluster, pod.metadata.name)
    except AgentainerError:
        pass  # pods cannot be listed here: their logs then come from the store
    found = []
    for step in status.steps:
        if args.step is not None and step.name != args.step:
            continue
        agents = {agent.id: agent for agent in step.agents}
        agents.update({agent.id: agent for step_name, agent, _ in stored.values()
                       if step_name == step.name and agent.id not in agents})
        for agent in sorted(agents.values(), key=lambda a: (a.index, a.attempt)):
            if args.agent is not None and args.agent not in (agent.id, agent.name):
                continue
            found.append(AgentLog(step.name, agent, live.get(label_value(agent.id))))
    return found


def _pod_lines(cluster: Cluster, pod: str) -> Callable[[bool], Iterator[str]]:
    def lines(follow: bool) -> Iterator[str]:
        if follow:
            return cluster.follow_pod_log(pod)
        return iter(cluster.pod_log(pod).splitlines())
    return lines


class Containers:
    """The containers of a workflow's agents on the Docker engine this machine reaches (a
    controller with the docker backend runs them on the engine it reaches): connected once,
    listed again as the logs are followed; nothing when no engine answers."""

    def __init__(self, uid: str, settings: Settings) -> None:
        from controller.backends.docker import DockerBackend

        self.uid = uid
        self.backend: DockerBackend | None
        try:
            self.backend = asyncio.run(DockerBackend.connect(settings))
        except AgentainerError:
            self.backend = None

    def lines(self) -> dict[str, Callable[[bool], Iterator[str]]]:
        """Each container's log, by its agent's id label."""
        backend = self.backend
        if backend is None:
            return {}
        try:
            handles = asyncio.run(backend.list_agents("", {LABEL_WORKFLOW_UID: self.uid}))
        except AgentainerError:
            return {}

        def lines(handle: AgentHandle) -> Callable[[bool], Iterator[str]]:
            return lambda follow: backend.log_lines(handle, follow)

        return {handle.labels.get(LABEL_AGENT_ID, ""): lines(handle) for handle in handles}

    def close(self) -> None:
        if self.backend is not None:
            asyncio.run(self.backend.close())


async def _stored_logs(uid: str, settings: Settings
                       ) -> tuple[dict[str, tuple[str, AgentStatus, str]], str | None]:
    """Each agent the store knows, by id: its step, its record and what the store kept of it
    (its output, then its stderr); or why the store could not be read."""
    from controller.store import open_store

    try:
        store = await open_store(settings)
    except AgentainerError as error:
        return {}, str(error)
    try:
        agents = await store.agents(uid)
        logs = await store.logs(uid)
        outputs = {step: await store.outputs(uid, step)
                   for step in {record.step for record in agents.values()}}
    except AgentainerError as error:
        return {}, str(error)
    finally:
        await store.close()
    return {record.status.id: (record.step, record.status, kept_text(
        record.status, outputs[record.step], logs.get(record.status.id)))
        for record in agents.values()}, None


def log_header(agent: AgentStatus) -> str:
    """The line before what one agent printed, as ``tail`` heads each file."""
    exit_code = "" if agent.exit_code is None else f" exit {agent.exit_code}"
    return f"==> {agent.id} {agent.name} {agent.phase.value}{exit_code} <=="


def kept_text(agent: AgentStatus, outputs: dict[int, str], stderr: str | None) -> str:
    """What the store kept of one agent: its output, if it succeeded, then the end of its
    stderr."""
    text = ""
    if agent.phase is AgentPhase.SUCCEEDED and agent.index in outputs:
        text += outputs[agent.index].rstrip("\n") + "\n"
    if stderr:
        text += f"--- stderr ---\n{stderr.rstrip()}\n"
    return text
