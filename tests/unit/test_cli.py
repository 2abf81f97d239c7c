"""The ``agentainer`` command on files that are valid, invalid or not manifests at all: exit codes
and the messages users read. Nothing here reaches Docker or Redis."""

from __future__ import annotations

import asyncio
import io
import socket
from pathlib import Path

import pytest

from controller.backends.base import AgentSpec
from controller.cli import Progress, main
from controller.commands import EXIT_UNUSABLE
from controller.config import Settings
from controller.engine import Engine, Event, EventKind
from controller.models import WorkflowPhase, WorkflowStatus, parse_workflow
from controller.store import MemoryStore
from tests.conftest import workflow_doc
from tests.unit.fake_backend import Behaviour, FakeBackend
from tests.unit.test_manifests import ALIAS_BOMB
from tests.unit.test_engine import attempt_of, index_of

REPOSITORY = Path(__file__).resolve().parents[2]

VALID_WORKFLOW = """\
apiVersion: agentainer.dev/v1alpha1
kind: Workflow
metadata: {name: wordcount}
spec:
  steps:
  - name: map
    image: agentainer/busybox:latest
    parallel: {items: ["a b", "c"]}
    command: ["sh", "-c", "echo \\"$AGENTAINER_ITEM\\" | wc -w"]
  - name: reduce
    image: agentainer/busybox:latest
    env: [{name: COUNTS, value: "{{ steps.map.outputs }}"}]
"""

INVALID_WORKFLOW = """\
apiVersion: agentainer.dev/v1alpha1
kind: Workflow
metadata: {name: wordcount}
spec:
  steps:
  - name: map
    image: agentainer/busybox:latest
    parallel: {replicas: 2, maxWorkers: 0}
  - name: Reduce
    image: agentainer/busybox:latest
    colour: blue
"""

INVALID_WORKFLOW_PROBLEMS = [
    "  spec.steps[0].parallel.maxWorkers: Input should be greater than or equal to 1",
    "  spec.steps[1].name: 'Reduce' is not a DNS-1123 label",
    "  spec.steps[1].colour: unknown field",
]

POOL = """\
apiVersion: agentainer.dev/v1alpha1
kind: AgentPool
metadata: {name: busybox-pool}
spec: {image: agentainer/busybox:latest, minSize: 2, maxSize: 4}
"""


@pytest.fixture(autouse=True)
def no_agentainer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs here must not depend on the settings of whoever runs the tests."""
    import os

    for name in list(os.environ):
        if name.startswith("AGENTAINER_"):
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str, name: str = "workflow.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def assert_no_traceback(out: str, err: str) -> None:
    assert "Traceback" not in out + err


# --- validate -----------------------------------------------------------------------------------


def test_validate_accepts_a_valid_workflow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, VALID_WORKFLOW)
    assert main(["validate", path]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{path}: Workflow wordcount is valid\n"
    assert captured.err == ""


def test_validate_accepts_the_mapreduce_example(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(REPOSITORY / "examples" / "mapreduce.yaml")
    assert main(["validate", path]) == 0
    assert "Workflow mapreduce-wordcount is valid" in capsys.readouterr().out


def test_validate_reports_each_document_of_a_multi_document_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, POOL + "---\n" + VALID_WORKFLOW)
    assert main(["validate", path]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{path} (document 1): AgentPool busybox-pool is valid",
        f"{path} (document 2): Workflow wordcount is valid",
    ]


def test_validate_prints_every_problem_with_its_field_path_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, INVALID_WORKFLOW)
    assert main(["validate", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert lines[0] == f"{path}: invalid"
    for problem in INVALID_WORKFLOW_PROBLEMS:
        assert any(line.startswith(problem) for line in lines[1:]), (problem, lines)
    assert_no_traceback(captured.out, captured.err)


def test_validate_reports_semantic_problems_of_a_workflow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID_WORKFLOW.replace("{{ steps.map.outputs }}",
                                                  "{{ steps.map.output }}"))
    assert main(["validate", path]) == 1
    assert ("  spec.steps[1].env[0].value: {{ steps.map.output }}: 'map' runs several agents"
            in capsys.readouterr().err)


def test_validate_reports_an_invalid_pool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, POOL.replace("minSize: 2", "minSize: 9"), "pool.yaml")
    assert main(["validate", path]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: invalid",
        "  spec.minSize: 9 is above maxSize 4",
    ]


def test_validate_checks_every_file_and_fails_if_any_is_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invalid = write(tmp_path, INVALID_WORKFLOW, "invalid.yaml")
    valid = write(tmp_path, VALID_WORKFLOW, "valid.yaml")
    missing = str(tmp_path / "missing.yaml")
    assert main(["validate", invalid, missing, valid]) == 1
    captured = capsys.readouterr()
    assert f"{valid}: Workflow wordcount is valid" in captured.out
    assert f"{invalid}: invalid" in captured.err
    assert f"error: {missing}: no such file" in captured.err


@pytest.mark.parametrize(("command", "first_line", "code"), [
    ("validate", "{path}: invalid", 1), ("run", "error: {path} is invalid:", 2)])
def test_integers_and_booleans_not_written_as_such_are_refused_not_coerced(
    command: str, first_line: str, code: int, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(tmp_path, VALID_WORKFLOW.replace(
        "  - name: reduce\n", "    timeoutSeconds: true\n    retries: {limit: false}\n"
        "  - name: reduce\n    timeoutSeconds: 5.5\n    continueOn: {failed: \"yes\"}\n"))
    assert main([command, path]) == code
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert captured.err.splitlines() == [
        first_line.format(path=path),
        "  spec.steps[0].retries.limit: must be an integer, not false",
        "  spec.steps[0].timeoutSeconds: must be an integer, not true",
        "  spec.steps[1].timeoutSeconds: must be an integer, not 5.5",
        '  spec.steps[1].continueOn.failed: must be a boolean, not "yes"',
    ]


# --- files that are not manifests: one line, no traceback ---------------------------------------

UNUSABLE = [
    pytest.param(None, "no such file", id="missing-file"),
    pytest.param("apiVersion: agentainer.dev/v1alpha1\nkind: [Workflow\n", "not valid YAML (line",
                 id="malformed-yaml"),
    pytest.param("metadata: {name: x\n  spec: 1\n", "not valid YAML", id="unclosed-mapping"),
    pytest.param("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
                 "kind is 'Pod'; expected Workflow or AgentPool", id="wrong-kind"),
    pytest.param("apiVersion: v1\nmetadata: {name: x}\n", "kind is None", id="no-kind"),
    pytest.param("- kind: Workflow\n- kind: AgentPool\n", "a manifest is a mapping, not a list",
                 id="list-instead-of-mapping"),
    pytest.param("just some text\n", "a manifest is a mapping, not a str", id="plain-text"),
    pytest.param("# nothing but a comment\n", "no manifest in it", id="empty-file"),
    pytest.param(ALIAS_BOMB, "not valid YAML (line 9, column 311): excessive aliasing",
                 id="alias-bomb"),
    pytest.param(VALID_WORKFLOW.replace('{items: ["a b", "c"]}', "{items: &r [a, *r]}"),
                 "not valid YAML (line 8, column 30): the alias *r is inside the node &r",
                 id="recursive-alias"),
    pytest.param(VALID_WORKFLOW.replace("  - name: reduce\n", "  - name: reduce\n    name: sum\n"),
                 "not valid YAML (line 11, column 5): mapping key 'name' already defined at "
                 "line 10", id="duplicate-key"),
]


def unusable_path(tmp_path: Path, content: str | None) -> str:
    if content is None:
        return str(tmp_path / "missing.yaml")
    return write(tmp_path, content)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("command", "code"), [("validate", 1), ("run", 2)])
@pytest.mark.parametrize(("content", "words"), UNUSABLE)
def test_a_file_that_is_not_a_manifest_gets_one_line_and_a_failing_exit_code(
    command: str, code: int, content: str | None, words: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = unusable_path(tmp_path, content)
    assert main([command, path]) == code
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert captured.out == ""
    assert captured.err.splitlines() == [captured.err.strip()]
    assert captured.err.startswith(f"error: {path}")
    if command == "validate" and words.startswith("kind is 'Pod'"):
        words = "no Workflow or AgentPool in it (Pod)"  # other kinds are skipped, as argo lint
    assert words in captured.err


@pytest.mark.parametrize("command", ["validate", "run"])
def test_directory_instead_of_a_file_is_a_one_line_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, str(tmp_path)]) in (1, 2)
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    # validate reads a folder's manifests; run wants one file
    assert captured.err == (f"error: {tmp_path}: no .yaml, .yml or .json file in it\n"
                            if command == "validate" else
                            f"error: {tmp_path}: is a directory, not a manifest file\n")


@pytest.mark.parametrize("command", ["validate", "run"])
def test_kind_that_is_not_a_string_is_a_one_line_error(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "apiVersion: agentainer.dev/v1alpha1\nkind: [Workflow]\n")
    assert main([command, path]) in (1, 2)
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert captured.err.startswith(f"error: {path}: kind is ['Workflow']")


# --- run: refused before any agent starts -------------------------------------------------------


def test_run_on_an_invalid_workflow_prints_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, INVALID_WORKFLOW)
    assert main(["run", path]) == 2
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    lines = captured.err.splitlines()
    assert lines[0] == f"error: {path} is invalid:"
    for problem in INVALID_WORKFLOW_PROBLEMS:
        assert any(line.startswith(problem) for line in lines[1:]), (problem, lines)


def test_run_on_a_file_without_a_workflow_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, POOL)
    assert main(["run", path]) == 2
    assert capsys.readouterr().err == f"error: {path}: expected exactly one Workflow, found 0\n"


def test_run_refuses_a_kubernetes_workflow_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, VALID_WORKFLOW.replace("spec:\n", "spec:\n  backend: kubernetes\n", 1))
    assert main(["run", path]) == 2
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert len(captured.err.splitlines()) == 1
    assert "spec.backend is kubernetes" in captured.err
    assert "docker backend" in captured.err


def test_run_with_an_unusable_setting_names_the_variable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTAINER_STORE", "sqlite")
    path = write(tmp_path, VALID_WORKFLOW)
    assert main(["run", path]) == 2
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert captured.err == (
        "error: AGENTAINER_STORE='sqlite': must be one of redis, memory\n"
    )


def test_validate_reads_stdin_and_folders_skips_other_kinds_and_says_it_all_in_json(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import json

    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "bad.yml").write_text(
        "apiVersion: agentainer.dev/v1alpha1\nkind: Workflow\nmetadata: {name: x}\n"
        "spec: {steps: [{name: A, image: i}]}\n")
    (tmp_path / "notes.txt").write_text("not a manifest")
    monkeypatch.setattr("sys.stdin", io.StringIO(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
        "apiVersion: agentainer.dev/v1alpha1\nkind: AgentPool\nmetadata: {name: p}\n"
        "spec: {image: i}\n"))
    assert main(["validate", "-", str(tmp_path), "-o", "json", "-v"]) == 1
    results = json.loads(capsys.readouterr().out)
    assert [r.get("skipped", r.get("valid")) for r in results] == [True, True, False]
    assert results[1] == {"source": "stdin (document 2)", "valid": True, "kind": "AgentPool",
                          "name": "p"}
    assert results[2]["source"] == str(tmp_path / "deep" / "bad.yml")
    assert results[2]["problems"][0]["path"] == "spec.steps[0].name"


def test_bash_completes_commands_and_their_options(capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    import subprocess

    assert main(["completion", "bash"]) == 0
    script = tmp_path / "completion.bash"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(f"'{w}'" for w in words)
        result = subprocess.run(
            ["bash", "-c", f'source {script}; COMP_WORDS=(agentainer {line}); '
                           f'COMP_CWORD={len(words)}; _agentainer; echo "${{COMPREPLY[@]}}"'],
            capture_output=True, text=True, check=True)
        return result.stdout.split()

    assert complete("va") == ["validate"]
    assert complete("run", "--se") == ["--secret"]
    assert "--leader-election" in complete("controller", "--le")


def test_logs_of_a_run_the_store_does_not_know_is_one_line_and_exit_2(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["logs", "nowhere", "--store", "memory", "--step", "x"]) == 2
    captured = capsys.readouterr()
    assert_no_traceback(captured.out, captured.err)
    assert captured.err.startswith("error: no workflow named 'nowhere'")


def test_a_controller_whose_metrics_port_is_taken_says_so_and_exits(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Another controller (or anything) on the port: a message naming the address and the
    settings, not a traceback, before the controller connects anywhere."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("AGENTAINER_METRICS_HOST", "127.0.0.1")
        monkeypatch.setenv("AGENTAINER_METRICS_PORT", str(port))

        assert main(["controller"]) == EXIT_UNUSABLE

    error = capsys.readouterr().err
    assert error.startswith(f"error: cannot serve metrics and health checks on 127.0.0.1:{port} ")
    assert "AGENTAINER_METRICS_PORT" in error and "in use" in error
    assert "Traceback" not in error


def test_run_progress_counts_running_and_started_agents_as_a_look_at_all_of_them_would() -> None:
    """The counts on each agent's line, kept up as agents come and go (a fan-out of 40, at
    most 7 at once, a third failing once and retried), are those of a look over all the
    step's agents at that moment."""
    expected: list[str] = []
    printed = io.StringIO()
    progress = Progress(printed)

    def observe(event: Event, status: WorkflowStatus) -> None:
        if event.kind is EventKind.AGENT_FINISHED and event.step is not None:
            agents = event.step.agents
            running = sum(1 for a in agents if a.phase.live)
            expected.append(f"({running} running, {len({a.index for a in agents})} started")
        progress(event, status)

    def script(spec: AgentSpec) -> Behaviour:
        index = index_of(spec)
        return Behaviour(0.001 * (index % 5), exit_code=1 if index % 3 == 0 and
                         attempt_of(spec) == 1 else 0)

    workflow = parse_workflow(workflow_doc(
        {"name": "fan", "parallel": {"replicas": 40, "maxWorkers": 7},
         "retries": {"limit": 1, "backoffSeconds": 0}, "command": ["true"]}))
    run = Engine(FakeBackend(script), MemoryStore(), Settings.from_env({})).prepare(
        workflow, observe)
    status = asyncio.run(asyncio.wait_for(run.execute(), 30))

    assert status.phase is WorkflowPhase.SUCCEEDED
    shown = [line[line.index("("):line.index(" started") + len(" started")]
             for line in printed.getvalue().splitlines() if " started, progress " in line]
    assert len(shown) == 40 + 14 and shown == expected
    assert shown[-1] == "(0 running, 40 started"
