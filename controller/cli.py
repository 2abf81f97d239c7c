"""The ``agentainer`` command: run a Workflow file on Docker, validate manifests."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, TextIO

from controller import __version__
from controller.agents import workspace_spec
from controller.backends.base import LABEL_WORKFLOW_UID
from controller import commands as commands_module
from controller.commands import (
    EXIT_CANCELLED,
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_SUCCEEDED,
    EXIT_UNUSABLE,
    kept_text,
    log_header,
    parse_params,
    short,
    step_line,
)
from controller.config import Settings
from controller.clock import seconds_between
from controller.engine import Engine, Event, EventKind, WorkflowRun
from controller.errors import AgentainerError, ConfigError, InvalidSpecError, NotFoundError
from controller.local_env import LocalEnv
from controller.manifests import load_run, manifest_files, ours, parse, read_documents
from controller.models import (
    AgentPool,
    AgentStatus,
    BackendKind,
    StepStatus,
    Workflow,
    WorkflowStatus,
)
from controller.pools import PoolManager


@dataclass
class Tally:
    """A step's agents as :class:`Progress` counts them, kept up as the list grows: each
    agent's end costs the agents new since the last, not all of them (a fan-out of 10,000
    would be counted 10,000 times)."""

    agents: list[AgentStatus]
    seen: int = 0
    items: set[int] = field(default_factory=set)
    live: dict[str, AgentStatus] = field(default_factory=dict)
    ends: int = 0
    """Ends told since the live agents were last looked over."""

    def counts(self, ended: AgentStatus) -> tuple[int, int]:
        """The agents created or running once ``ended`` has, and the items started."""
        for agent in self.agents[self.seen:]:
            self.items.add(agent.index)
            if agent.phase.live:
                self.live[agent.id] = agent
        self.seen = len(self.agents)
        self.live.pop(ended.id, None)
        self.ends += 1
        if self.ends >= len(self.live):  # any that ended untold (a run stopping): now and then
            self.ends = 0
            self.live = {key: agent for key, agent in self.live.items() if agent.phase.live}
        return len(self.live), len(self.items)


class Progress:
    """Prints a run's progress as it goes, one line per event."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._tallies: dict[str, Tally] = {}

    def _tally(self, step: StepStatus) -> Tally:
        tally = self._tallies.get(step.name)
        if tally is None or tally.agents is not step.agents or tally.seen > len(step.agents):
            tally = self._tallies[step.name] = Tally(step.agents)
        return tally

    def __call__(self, event: Event, status: WorkflowStatus) -> None:
        step = event.step
        line: str | None = None
        match event.kind:
            case EventKind.STEP_STARTED if step:
                line = f"  start  {step.name}: {event.message.split(': ', 1)[1]}"
            case EventKind.AGENT_FINISHED if step and event.agent:
                agent = event.agent
                running, total = self._tally(step).counts(agent)
                took = seconds_between(agent.started_at, agent.finished_at)
                line = (f"         {step.name}: agent {agent.id} {agent.phase.value.lower()}"
                        f" exit={agent.exit_code if agent.exit_code is not None else '-'}"
                        + (f" in {took:.2f}s" if took is not None else "")
                        + f" ({running} running, {total} started, progress {status.progress})")
            case EventKind.AGENT_RETRYING if step:
                line = f"  retry  {step.name}: {event.message}"
            case EventKind.OUTPUTS_CUT if step:
                line = f"  cut    {step.name}: {event.message}"
            case EventKind.STEP_FINISHED if step:
                line = step_line(step)
        if line is not None:
            print(line, file=self.out, flush=True)


def summary(workflow: Workflow, status: WorkflowStatus) -> str:
    took = seconds_between(status.started_at, status.finished_at)
    lines = [f"{workflow.metadata.name}: {status.phase.value}"
             + (f" in {took:.2f}s" if took is not None else "")
             + f" ({status.progress} agents)" + (f": {status.message}" if status.message else "")]
    width = max(len(step.name) for step in status.steps)
    for step in status.steps:
        took = seconds_between(step.started_at, step.finished_at)
        lines.append(f"  {step.name:<{width}}  {step.phase.value:<9}  "
                     + (f"{took:6.2f}s" if took is not None else "       ")
                     + f"  attempts={step.attempts:<2} "
                     + short(step.output if step.output is not None else step.message))
    return "\n".join(lines)


async def _run(workflow: Workflow, agent_pools: list[AgentPool], settings: Settings,
               output: str, env: LocalEnv) -> int:
    backend_name = BackendKind.of(workflow.spec.backend, settings.default_backend)
    if backend_name is not BackendKind.DOCKER:
        print(f"agentainer run: spec.backend is {backend_name.value}; `agentainer run` uses the "
              "docker backend (the kubernetes backend runs under the controller)",
              file=sys.stderr)
        return EXIT_UNUSABLE
    # Imported here so that `agentainer validate` needs neither docker nor redis installed.
    from controller.backends.docker import DockerBackend
    from controller.store import open_store

    progress_out = sys.stdout if output == "text" else sys.stderr
    store = await open_store(settings)
    try:
        backend = await DockerBackend.connect(settings, env)
    except AgentainerError:
        await store.close()
        raise
    pools = PoolManager(store, settings)
    try:
        states = [pools.register(pool, str(uuid.uuid4()), backend) for pool in agent_pools]
        for state in states:  # warm up before the first step asks
            await pools.reconcile(state)
        # The summary shows the head of each output; the JSON status every output whole.
        kept = None if output == "json" else settings.status_output_limit + 1
        run = Engine(backend, store, settings, pools, output_kept=kept).prepare(
            workflow, Progress(progress_out))
        run.steer(False, workflow.spec.shutdown)
        title = workflow.spec.description or workflow.metadata.name
        steps = workflow.spec.all_steps
        print(f"{title}: {len(steps)} steps, {run.units_total} agents, uid {run.uid}, "
              f"state in {settings.store}", file=progress_out, flush=True)
        _cancel_on_signals(run, progress_out)
        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
            # Ctrl-C before the handlers above were in place (asyncio's own cancels this
            # task), and a call since let it pass unraised: nothing has started yet.
            raise asyncio.CancelledError
        try:
            status = await run.execute()
        except AgentainerError:
            # Nobody will resume a run of this process: take its agents down with it.
            for agent in await backend.list_agents(workflow.metadata.namespace,
                                                   {LABEL_WORKFLOW_UID: run.uid}):
                await backend.stop(agent, settings.stop_grace_seconds)
                await backend.remove(agent)
            if workflow.spec.workspace is not None:
                await backend.remove_workspace(workspace_spec(workflow, run.uid))
            raise
    finally:
        for state in list(pools.pools.values()):
            await pools.drain(state)
        await backend.close()
        await store.close()
    if output == "json":
        print(json.dumps(status.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(summary(workflow, status))
    return EXIT_CODES.get(status.phase, EXIT_FAILED)


def _cancel_on_signals(run: WorkflowRun, out: TextIO) -> None:
    loop = asyncio.get_running_loop()

    def cancel(name: str) -> None:
        print(f"\n{name}: cancelling, stopping running agents "
              "(press Ctrl-C again to quit at once, leaving them behind)", file=out, flush=True)
        run.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel, sig.name)


def command_run(args: argparse.Namespace) -> int:
    # Every pool of a file run is in the file: a missing one will not turn up later.
    settings = Settings.from_env(store=args.store, redis_url=args.redis_url, pool_wait_seconds=0)
    env = LocalEnv.parse(args.secret or [], args.config_map or [])
    workflow, agent_pools = load_run(args.file, parse_params(args.param or []))
    if workflow.spec.suspend:
        raise ConfigError(f"{args.file}: spec.suspend is true: nothing would start, and a local "
                          "run cannot be resumed (it is for Workflows in a cluster)")
    return asyncio.run(_run(workflow, agent_pools, settings, args.output, env))


def command_validate(args: argparse.Namespace) -> int:
    """Every manifest of the files (folders: their YAML files; ``-``: stdin), each problem with
    its field; documents of other kinds are skipped, as ``argo lint`` does."""
    results: list[dict[str, Any]] = []
    try:
        paths = manifest_files(args.files)
    except AgentainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_FAILED
    for path in paths:
        try:
            documents = read_documents(path)
        except AgentainerError as error:
            results.append({"source": path, "valid": False, "error": str(error)})
            continue
        if not any(ours(document) for document in documents):
            kinds = ", ".join(sorted({str(d.body.get("kind")) for d in documents}))
            results.append({"source": path, "valid": False,
                            "error": f"{path}: no Workflow or AgentPool in it ({kinds})"})
            continue
        for document in documents:
            if not ours(document):
                results.append({"source": document.source, "skipped": True})
                continue
            try:
                model = parse(document)
            except InvalidSpecError as error:
                results.append({"source": document.source, "valid": False, "problems": [
                    {"path": p.path, "message": p.message} for p in error.problems]})
            except AgentainerError as error:
                results.append({"source": document.source, "valid": False, "error": str(error)})
            else:
                results.append({"source": document.source, "valid": True,
                                "kind": model.kind, "name": model.metadata.name})
    if args.output == "json":
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            if result.get("skipped"):
                continue
            if result["valid"]:
                print(f"{result['source']}: {result['kind']} {result['name']} is valid")
            elif "error" in result:
                print(f"error: {result['error']}", file=sys.stderr)
            else:
                print(f"{result['source']}: invalid", file=sys.stderr)
                for problem in result["problems"]:
                    print(f"  {problem['path']}: {problem['message']}", file=sys.stderr)
    failed = any(not r.get("skipped") and not r["valid"] for r in results)
    return EXIT_FAILED if failed else EXIT_SUCCEEDED


def command_logs(args: argparse.Namespace) -> int:
    """What a run's agents printed: of a Workflow in the cluster, live from its agents while
    they run; else (a local run, by name or uid) from the store, which keeps it after their
    containers are gone."""
    settings = Settings.from_env(store=args.store, redis_url=args.redis_url)
    unasked: AgentainerError | None = None  # the cluster, when it could not be asked
    if args.store != "memory":
        try:
            found = commands_module.cluster_workflow(args)
        except AgentainerError as error:
            found, unasked = None, error
        if found is not None:
            return commands_module.command_cluster_logs(*found, args, settings)
    if args.follow:
        raise ConfigError(f"--follow: {args.workflow} is not a Workflow of the cluster "
                          "(a local run's logs are read once it has ended)"
                          + (f"; the cluster could not be asked: {unasked}" if unasked else ""))
    try:
        return asyncio.run(_logs(args.workflow, args.step, args.agent, settings))
    except NotFoundError as error:
        if unasked is None:
            raise
        raise NotFoundError(f"{error}; the cluster could not be asked either: {unasked}"
                            ) from None


async def _logs(wanted: str, step: str | None, agent: str | None, settings: Settings) -> int:
    from controller.store import open_store

    store = await open_store(settings)
    try:
        uid = await _find_run(store, wanted)
        record = await store.workflow(uid)
        order = {s.name: n for n, s in enumerate(record.spec.all_steps)} \
            if record is not None and record.spec is not None else {}
        agents = sorted((await store.agents(uid)).values(), key=lambda a: (
            order.get(a.step, len(order)), a.step, a.status.index, a.status.attempt))
        logs = await store.logs(uid)
        outputs: dict[str, dict[int, str]] = {}
        shown = 0
        for found in agents:
            status = found.status
            if step is not None and found.step != step or agent is not None and \
                    agent not in (status.id, status.name):
                continue
            if found.step not in outputs:
                outputs[found.step] = await store.outputs(uid, found.step)
            print(log_header(status))
            print(kept_text(status, outputs[found.step], logs.get(status.id)), end="")
            shown += 1
        if not shown:
            print(f"no agent of {wanted} matches", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_SUCCEEDED
    finally:
        await store.close()


async def _find_run(store: Any, wanted: str) -> str:
    """The uid of the latest run named ``wanted`` (or with that uid)."""
    for uid in await store.uids():
        record = await store.workflow(uid)
        if uid == wanted or record is not None and record.name == wanted:
            return str(uid)
    raise NotFoundError(f"no workflow named {wanted!r} (or with that uid) in the store; "
                        "runs are kept for AGENTAINER_STATE_TTL_SECONDS")


def command_completion(args: argparse.Namespace) -> int:
    """A bash completion script for these commands and their options, from the parser itself
    (``source <(agentainer completion bash)``; zsh takes it after ``bashcompinit``)."""
    top = parser()
    commands: dict[str, list[str]] = {}
    for action in top._actions:  # argparse keeps its subcommands here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[name] = [flag for a in sub._actions for flag in a.option_strings]
    cases = "\n".join(f'        {name}) words="{" ".join(flags)}" ;;'
                       for name, flags in commands.items())
    print(f"""_agentainer() {{
    local current=${{COMP_WORDS[COMP_CWORD]}} command=${{COMP_WORDS[1]}} words
    if [ "$COMP_CWORD" -eq 1 ]; then
        words="{' '.join(commands)} --help --version -v"
    else
        case $command in
{cases}
        esac
        if [[ $current != -* ]]; then COMPREPLY=($(compgen -f -- "$current")); return; fi
    fi
    COMPREPLY=($(compgen -W "$words" -- "$current"))
}}
complete -o filenames -F _agentainer agentainer""")
    return EXIT_SUCCEEDED


def command_controller(args: argparse.Namespace) -> int:
    """The operator: kopf's, with our handlers, elected among replicas on a Lease."""
    from controller import operator  # the CLI's other commands do without kopf

    settings = Settings.from_env()  # refuse bad settings before connecting anywhere
    options = operator.Options(namespaces=args.namespace or [], lease=args.leader_election,
                               lease_namespace=args.leader_election_namespace)
    return asyncio.run(operator.run(options, settings))


def _target_arguments(command: argparse.ArgumentParser, all_namespaces: bool = False) -> None:
    """Which cluster and namespace, as kubectl's flags say them."""
    command.add_argument("--kubeconfig", default=None, metavar="FILE",
                         help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
    command.add_argument("--context", default=None, help="kubeconfig context to use")
    command.add_argument("-n", "--namespace", default=None, metavar="NS",
                         help="namespace (default: the context's, else default)")
    if all_namespaces:
        command.add_argument("-A", "--all-namespaces", action="store_true",
                             help="workflows of every namespace")


def _waiting_arguments(command: argparse.ArgumentParser) -> None:
    follow = command.add_mutually_exclusive_group()
    follow.add_argument("--wait", action="store_true",
                        help="wait until it ends; exit 0 if it succeeded, 1 if it failed or "
                             "was stopped, 130 if cancelled, 124 past --timeout")
    follow.add_argument("--watch", action="store_true",
                        help="print its progress until it ends (exit codes as --wait)")
    command.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                         help="how long --wait and --watch wait (default 3600)")


def _cluster_parsers(commands: Any) -> list[argparse.ArgumentParser]:
    """The commands on Workflows in a cluster."""
    submit = commands.add_parser("submit", help="create a Workflow in the cluster from a file")
    submit.add_argument("file", help="YAML file with one Workflow (and AgentPools it uses)")
    submit.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                        help="set the workflow's parameter NAME (repeatable)")
    _waiting_arguments(submit)
    submit.set_defaults(handler=commands_module.command_submit)
    listing = commands.add_parser("list", help="list the Workflows of a namespace")
    listing.add_argument("-o", "--output", choices=["wide", "json", "yaml", "name"],
                         default=None, help="wide: duration and message too")
    _target_arguments(listing, all_namespaces=True)
    listing.set_defaults(handler=commands_module.command_list)
    get = commands.add_parser("get", help="a Workflow's steps and agents")
    get.add_argument("name", metavar="NAME")
    get.add_argument("-o", "--output", choices=["wide", "json", "yaml", "name"], default=None,
                     help="wide: longer outputs; json, yaml: the whole resource")
    get.add_argument("--redis-url", default=None,
                     help="the store, for the agents a large workflow's status does not list "
                          "(default: $AGENTAINER_REDIS_URL)")
    get.set_defaults(handler=commands_module.command_get)
    watch = commands.add_parser("watch", help="print a Workflow's progress until it ends")
    watch.add_argument("name", metavar="NAME")
    watch.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                       help="stop watching after this long (default 3600; exit 124)")
    watch.set_defaults(handler=commands_module.command_watch)
    made = [submit, listing, get, watch]
    for name, text in [("stop", "no new step starts; running agents finish; finally runs"),
                       ("terminate", "stop its running agents now; finally runs"),
                       ("suspend", "start no new agent until resumed"),
                       ("resume", "let a suspended Workflow go on"),
                       ("retry", "run again the steps of a finished Workflow that did not "
                                 "succeed, keeping the outputs of those that did")]:
        action = commands.add_parser(name, help=text)
        action.add_argument("name", metavar="NAME")
        if name == "retry":
            _waiting_arguments(action)
        action.set_defaults(handler=commands_module.command_action)
        made.append(action)
    resubmit = commands.add_parser("resubmit", help="a new Workflow with the spec of NAME")
    resubmit.add_argument("name", metavar="NAME")
    _waiting_arguments(resubmit)
    resubmit.set_defaults(handler=commands_module.command_resubmit)
    delete = commands.add_parser("delete", help="delete Workflows (and what they left)")
    delete.add_argument("names", nargs="+", metavar="NAME")
    delete.set_defaults(handler=commands_module.command_delete)
    made += [resubmit, delete]
    for command in made:
        if command is not listing:
            _target_arguments(command)
    return made


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="agentainer", description="Run workflows of agent containers."
    )
    top.add_argument("--version", action="version", version=f"agentainer {__version__}")
    top.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a Workflow file on the local Docker engine")
    run.add_argument("file", help="YAML file with one Workflow")
    run.add_argument("-o", "--output", choices=["text", "json"], default="text",
                     help="text: progress and a summary; json: the final status (progress "
                          "goes to stderr)")
    run.add_argument("--store", choices=["redis", "memory"], default=None,
                     help="where state goes (default: $AGENTAINER_STORE or redis)")
    run.add_argument("--redis-url", default=None,
                     help="Redis URL (default: $AGENTAINER_REDIS_URL or redis://localhost:6379/0)")
    run.add_argument("-p", "--param", action="append", metavar="NAME=VALUE",
                     help="set the workflow's parameter NAME (spec.params; repeatable)")
    run.add_argument("--secret", action="append", metavar="NAME[=FILE]",
                     help="the Secret NAME that env valueFrom.secretKeyRef names: an env file "
                          "of KEY=VALUE lines, or without =FILE each key from the environment "
                          "variable of its name (repeatable); never written anywhere")
    run.add_argument("--config-map", action="append", metavar="NAME[=FILE]",
                     help="the ConfigMap NAME that configMapKeyRef names, the same way")
    run.set_defaults(handler=command_run)

    operator = commands.add_parser(
        "controller", help="run the Kubernetes operator")
    operator.add_argument("-n", "--namespace", action="append", metavar="NS",
                          help="watch only this namespace (repeatable; default: all)")
    operator.add_argument("--leader-election", metavar="LEASE", default=None,
                          help="run as one of several replicas: only the holder of the "
                               "coordination.k8s.io Lease LEASE works, the others stand by")
    operator.add_argument("--leader-election-namespace", metavar="NS", default=None,
                          help="namespace of that Lease (default: $POD_NAMESPACE, else the "
                               "service account's)")
    operator.set_defaults(handler=command_controller)

    validate = commands.add_parser("validate", help="check Workflow and AgentPool manifests")
    validate.add_argument("files", nargs="+", metavar="FILE",
                          help="a manifest file, a folder of them, or - for stdin")
    validate.add_argument("-o", "--output", choices=["text", "json"], default="text",
                          help="json: every document's result, problems with their fields")
    validate.set_defaults(handler=command_validate)
    cluster_commands = _cluster_parsers(commands)
    logs = commands.add_parser(
        "logs", help="what a workflow's agents printed: live from their pods or containers, "
                     "kept in the store after they are gone")
    logs.add_argument("workflow", metavar="NAME",
                      help="a Workflow of the cluster, else a local run's name (its latest "
                           "run) or uid")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="follow the logs of running agents, and of new ones, until the "
                           "workflow ends")
    logs.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                      help="stop following after this long (default 3600)")
    _target_arguments(logs)
    logs.add_argument("--step", default=None, help="only the agents of this step")
    logs.add_argument("--agent", default=None, metavar="ID",
                      help="only this agent (its id, step.index.attempt, or its name)")
    logs.add_argument("--store", choices=["redis", "memory"], default=None,
                      help="where state is (default: $AGENTAINER_STORE or redis)")
    logs.add_argument("--redis-url", default=None, help="Redis URL of the store (default: "
                      "$AGENTAINER_REDIS_URL or redis://localhost:6379/0; password: "
                      "$AGENTAINER_REDIS_PASSWORD)")
    logs.set_defaults(handler=command_logs)
    completion = commands.add_parser("completion", help="print a shell completion script")
    completion.add_argument("shell", choices=["bash", "zsh"],
                            help="bash, or zsh (with bashcompinit)")
    completion.set_defaults(handler=command_completion)
    for command in (run, operator, validate, logs, *cluster_commands):  # -v after it too
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="log what the engine does")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The controller reports what it does (as operators do); the CLI's own output is its report.
    quiet = logging.INFO if args.command == "controller" else logging.WARNING
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else quiet,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        code: int = args.handler(args)
    except InvalidSpecError as error:
        print(f"error: {error.source or 'manifest'} is invalid:", file=sys.stderr)
        for problem in error.problems:
            print(f"  {problem}", file=sys.stderr)
        return EXIT_UNUSABLE
    except AgentainerError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_UNUSABLE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    return code


if __name__ == "__main__":
    sys.exit(main())
