"""Workflow parameters: ``spec.params``, ``{{ params.NAME }}`` in every template, ``agentainer
run -p NAME=VALUE``; unknown and missing ones refused before anything runs, naming them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agents import build_agent_spec
from controller.errors import InvalidSpecError
from controller.manifests import load_run
from controller.models import missing_params, parse_workflow, with_params
from tests.conftest import workflow_doc
from tests.unit.test_engine import with_uid
from tests.unit.test_models import assert_reported, problems_of

PARAMS = [{"name": "topic", "value": "tides", "description": "what to research"},
          {"name": "depth"}]


def document(**spec: Any) -> dict[str, Any]:
    return workflow_doc({"name": "research", "command": ["agent", "--about", "{{ params.topic }}"],
                         "env": [{"name": "DEPTH", "value": "depth {{ params.depth }}"}]},
                        params=PARAMS, env=[{"name": "TOPIC", "value": "{{ params.topic }}"}],
                        **spec)


def test_params_reach_commands_and_env_with_their_values() -> None:
    workflow = with_params(parse_workflow(with_uid(document())), {"depth": "3"})
    spec = build_agent_spec(workflow, "uid", workflow.spec.steps[0], 0, 1, {})
    assert spec.command == ["agent", "--about", "tides"]
    assert spec.env["DEPTH"] == "depth 3" and spec.env["TOPIC"] == "tides"
    # A value is data: a template in it is not rendered again.
    workflow = with_params(workflow, {"topic": "{{ params.depth }} $(reboot)"})
    spec = build_agent_spec(workflow, "uid", workflow.spec.steps[0], 0, 1, {})
    assert spec.command == ["agent", "--about", "{{ params.depth }} $(reboot)"]


def test_a_required_param_without_a_value_is_named() -> None:
    workflow = parse_workflow(document())  # valid: a file may leave it to -p
    assert [(p.path, p.message) for p in missing_params(workflow.spec)] == [
        ("spec.params[1].value", "parameter 'depth' is required and has no value")]


def test_unknown_params_are_refused_naming_them() -> None:
    with pytest.raises(InvalidSpecError) as raised:
        with_params(parse_workflow(document()), {"topik": "x", "depth": "1"})
    assert [(p.path, p.message) for p in raised.value.problems] == [
        ("-p topik", "the workflow has no parameter 'topik' (spec.params: depth, topic)")]


@pytest.mark.parametrize(("doc", "path", "words"), [
    (workflow_doc({"name": "a", "command": ["{{ params.nope }}"]}, params=PARAMS),
     "spec.steps[0].command[0]", "names unknown parameter 'nope' (spec.params: depth, topic)"),
    (workflow_doc({"name": "a"}, params=PARAMS + [{"name": "topic"}]),
     "spec.params[2].name", "duplicate parameter name 'topic'"),
    (workflow_doc({"name": "a"}, params=[{"name": "1st"}]),
     "spec.params[0].name", "match"),
    (workflow_doc({"name": "a"}, env=[{"name": "X", "value": "{{ params.gone }}"}]),
     "spec.env[0].value", "unknown parameter 'gone' (spec.params: none)"),
    (workflow_doc({"name": "a", "command": ["{{ params. }}"]}),
     "spec.steps[0].command[0]", "not a parameter reference"),
], ids=["unknown", "duplicate", "bad-name", "unknown-in-workflow-env", "malformed"])
def test_bad_params_are_refused_at_their_field(doc: dict[str, Any], path: str,
                                               words: str) -> None:
    assert_reported(problems_of(doc), path, (words,))


def test_agentainer_run_files_take_params_and_refuse_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "research.yaml"
    path.write_text(yaml.safe_dump(document()))
    workflow, _ = load_run(path, {"depth": "2"})
    assert {p.name: p.value for p in workflow.spec.params} == {"topic": "tides", "depth": "2"}
    with pytest.raises(InvalidSpecError) as raised:
        load_run(path)
    assert raised.value.source == str(path)
    assert [p.message for p in raised.value.problems] == [
        "parameter 'depth' is required and has no value: give -p NAME=VALUE"]
