"""Validation of Workflow and AgentPool manifests: each rule, with the field path and words users see."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from controller.errors import InvalidSpecError
from controller.models import (
    MAX_ITEM_NESTING,
    AgentPoolSpec,
    Resources,
    WorkflowSpec,
    nesting,
    parse_agent_pool,
    parse_workflow,
)

IMAGE = "agentainer/busybox:latest"


def step(name: str, **fields: Any) -> dict[str, Any]:
    """A step document with an image, as users write it (camelCase keys)."""
    return {"name": name, "image": IMAGE, **fields}


def workflow(*steps: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentainer.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "wordcount"},
        "spec": {"steps": list(steps), **spec},
    }


def pool(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "agentainer.dev/v1alpha1",
        "kind": "AgentPool",
        "metadata": {"name": "busybox-pool"},
        "spec": {"image": IMAGE, **spec},
    }


def problems_of(document: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (field path, message) that parse_workflow reports for ``document``."""
    with pytest.raises(InvalidSpecError) as caught:
        parse_workflow(document)
    return [(problem.path, problem.message) for problem in caught.value.problems]


def assert_reported(problems: list[tuple[str, str]], path: str, words: tuple[str, ...]) -> None:
    messages = [message for where, message in problems if where == path]
    assert messages, f"nothing reported at {path}; reported: {problems}"
    assert any(all(word in message for word in words) for message in messages), (
        f"no message at {path} has all of {words}; reported: {messages}"
    )


# --- one table row per rule: the document, where the problem is, words of the message ---------

REFUSED = [
    pytest.param(
        workflow(step("Bad_Name")), "spec.steps[0].name", ("'Bad_Name'", "DNS-1123 label"),
        id="step-name-with-capitals-and-underscore",
    ),
    pytest.param(
        workflow(step("-map")), "spec.steps[0].name", ("'-map'", "DNS-1123 label"),
        id="step-name-starting-with-dash",
    ),
    pytest.param(
        workflow(step("map-")), "spec.steps[0].name", ("'map-'", "DNS-1123 label"),
        id="step-name-ending-with-dash",
    ),
    pytest.param(
        workflow(step("a" * 64)), "spec.steps[0].name", ("at most 63 characters",),
        id="step-name-longer-than-63",
    ),
    pytest.param(
        workflow(step("map"), step("map")), "spec.steps[1].name",
        ("duplicate step name 'map'",),
        id="duplicate-step-name",
    ),
    pytest.param(
        workflow(step("map"), step("reduce", dependsOn=["mapp"])),
        "spec.steps[1].dependsOn[0]", ("unknown step 'mapp'",),
        id="depends-on-unknown-step",
    ),
    pytest.param(
        workflow(step("map", dependsOn=["map"])), "spec.steps[0].dependsOn[0]",
        ("cannot depend on itself",),
        id="depends-on-itself",
    ),
    pytest.param(
        workflow(step("map", parallel={"items": ["x"], "replicas": 2})),
        "spec.steps[0].parallel", ("exactly one of items, replicas or itemsFrom",),
        id="parallel-with-items-and-replicas",
    ),
    pytest.param(
        workflow(step("map", parallel={"maxWorkers": 2})),
        "spec.steps[0].parallel", ("exactly one of items, replicas or itemsFrom",),
        id="parallel-with-neither-items-nor-replicas",
    ),
    pytest.param(
        workflow(step("map", parallel={"items": []})),
        "spec.steps[0].parallel.items", ("at least 1 item",),
        id="parallel-with-empty-items",
    ),
    pytest.param(
        workflow(step("map", parallel={"replicas": 3, "maxWorkers": 0})),
        "spec.steps[0].parallel.maxWorkers", ("greater than or equal to 1",),
        id="max-workers-zero",
    ),
    pytest.param(
        workflow(step("map", parallel={"replicas": 0})),
        "spec.steps[0].parallel.replicas", ("greater than or equal to 1",),
        id="replicas-zero",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "value": "{{ steps.reduce.output }}"}]),
                 step("reduce")),
        "spec.steps[0].env[0].value",
        ("{{ steps.reduce.output }}", "does not depend on 'reduce'", "dependsOn"),
        id="template-reads-a-later-step",
    ),
    pytest.param(
        workflow(step("init"), step("map", dependsOn=[]),
                 step("reduce", command=["echo", "{{ steps.init.output }}"])),
        "spec.steps[2].command[1]", ("step 'reduce' does not depend on 'init'",),
        id="template-reads-a-step-outside-its-ancestors",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "value": "{{ steps.map.output }}"}])),
        "spec.steps[0].env[0].value",
        ("{{ steps.map.output }}", "a step cannot read its own output"),
        id="template-reads-its-own-step",
    ),
    pytest.param(
        workflow(step("map"), step("reduce", args=["{{ steps.mapp.outputs }}"])),
        "spec.steps[1].args[0]", ("{{ steps.mapp.outputs }}", "unknown step 'mapp'"),
        id="template-names-unknown-step",
    ),
    pytest.param(
        workflow(step("map", parallel={"replicas": 3}),
                 step("reduce", env=[{"name": "COUNTS", "value": "{{ steps.map.output }}"}])),
        "spec.steps[1].env[0].value",
        ("'map' runs several agents", "{{ steps.map.outputs }}"),
        id="single-output-of-a-fan-out",
    ),
    pytest.param(
        workflow(step("map", command=["echo", "{{ item }}"])),
        "spec.steps[0].command[1]", ("{{ item }}", "parallel.items"),
        id="item-in-a-sequential-step",
    ),
    pytest.param(
        workflow(step("map", parallel={"replicas": 2}, args=["{{ item }}"])),
        "spec.steps[0].args[0]", ("{{ item }}", "parallel.items"),
        id="item-in-a-replicas-step",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "value": "{{ env.HOME }}"}])),
        "spec.steps[0].env[0].value", ("unknown template '{{ env.HOME }}'", "{{ item }}"),
        id="unknown-template",
    ),
    pytest.param(
        workflow(step("map"), step("reduce", args=["{{ steps.Map.output }}"])),
        "spec.steps[1].args[0]", ("is not a step reference", "steps.NAME.output"),
        id="step-template-with-invalid-name",
    ),
    pytest.param(
        workflow(step("map", command=["sh", "-c", "echo {{ workflow.name"])),
        "spec.steps[0].command[2]", ("'{{' is not closed", '{{ "{{" }}'),
        id="unclosed-template",
    ),
    pytest.param(
        workflow({"name": "report", "pool": "Busybox_Pool"}), "spec.steps[0].pool",
        ("'Busybox_Pool'", "DNS-1123 name"),
        id="pool-name-invalid",
    ),
    pytest.param(
        workflow({"name": "report", "command": ["true"]}), "spec.steps[0].image",
        ("required unless the step sets pool",),
        id="neither-image-nor-pool",
    ),
    pytest.param(
        workflow(step("report", pool="busybox-pool")), "spec.steps[0].pool",
        ("image or pool, not both",),
        id="both-image-and-pool",
    ),
    pytest.param(
        workflow({"name": "report", "pool": "busybox-pool"}), "spec.steps[0].command",
        ("required for a pooled step",),
        id="pooled-step-without-command",
    ),
    pytest.param(
        workflow(step("map", image="")), "spec.steps[0].image", ("at least 1 character",),
        id="empty-image",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "AGENTAINER_ITEM", "value": "x"}])),
        "spec.steps[0].env[0].name", ("AGENTAINER_", "set by agentainer"),
        id="reserved-env-name-in-a-step",
    ),
    pytest.param(
        workflow(step("map"), env=[{"name": "AGENTAINER_STEP", "value": "x"}]),
        "spec.env[0].name", ("AGENTAINER_", "set by agentainer"),
        id="reserved-env-name-workflow-wide",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "1ST", "value": "x"}])),
        "spec.steps[0].env[0].name", ("'1ST'", "not a valid environment variable name"),
        id="env-name-starting-with-a-digit",
    ),
    pytest.param(
        workflow(step("map"), env=[{"name": "OUT", "value": "{{ steps.map.output }}"}]),
        "spec.env[0].value", ("workflow-wide env", "{{ workflow.* }}", "{{ params.* }}", "step's env"),
        id="workflow-env-reads-a-step",
    ),
    pytest.param(
        workflow(step("map", parallel={"items": ["a"]}), env=[{"name": "I", "value": "{{ item }}"}]),
        "spec.env[0].value", ("workflow-wide env",),
        id="workflow-env-reads-item",
    ),
    pytest.param(
        workflow(step("map"), env=[{"name": "W", "value": "{{ workflow.name"}]),
        "spec.env[0].value", ("'{{' is not closed",),
        id="workflow-env-unclosed-template",
    ),
    pytest.param(
        workflow(step("map", colour="blue")), "spec.steps[0].colour", ("unknown field",),
        id="unknown-field-in-a-step",
    ),
    pytest.param(
        workflow(step("map"), retry={"limit": 2}), "spec.retry", ("unknown field",),
        id="unknown-field-in-spec",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "valueFrom2": "y"}])),
        "spec.steps[0].env[0].valueFrom2", ("unknown field",),
        id="unknown-field-in-env",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "value": "v",
                                   "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}])),
        "spec.steps[0].env[0]", ("value or valueFrom",),
        id="env-with-value-and-value-from",
    ),
    pytest.param(
        workflow(step("map"), env=[{"name": "X", "valueFrom": {
            "secretKeyRef": {"name": "s", "key": "k"},
            "configMapKeyRef": {"name": "c", "key": "k"}}}]),
        "spec.env[0].valueFrom", ("exactly one of secretKeyRef or configMapKeyRef",),
        id="env-from-a-secret-and-a-config-map",
    ),
    pytest.param(
        workflow(step("map", env=[{"name": "X", "valueFrom": {
            "secretKeyRef": {"name": "Not_A_Name", "key": "k"}}}])),
        "spec.steps[0].env[0].valueFrom.secretKeyRef.name", ("DNS-1123",),
        id="secret-name-not-a-dns-name",
    ),
    pytest.param(
        workflow(step("map", resources={"cpu": "1", "gpu": "1"})),
        "spec.steps[0].resources.gpu", ("unknown field",),
        id="unknown-field-in-resources",
    ),
    pytest.param(
        workflow(step("map", retries={"limit": -1})),
        "spec.steps[0].retries.limit", ("greater than or equal to 0",),
        id="negative-retry-limit",
    ),
    pytest.param(
        workflow(step("map", timeoutSeconds=0)),
        "spec.steps[0].timeoutSeconds", ("greater than or equal to 1",),
        id="step-timeout-zero",
    ),
    pytest.param(
        workflow(step("map"), cleanup="Sometimes"), "spec.cleanup", ("'Always'", "'Never'"),
        id="unknown-cleanup-policy",
    ),
    pytest.param(
        workflow(step("map"), backend="nomad"), "spec.backend", ("'docker'", "'kubernetes'"),
        id="unknown-backend",
    ),
    pytest.param(
        workflow(), "spec.steps", ("at least 1 item",),
        id="no-steps",
    ),
    pytest.param(
        {**workflow(step("map")), "apiVersion": "agentainer.dev/v1"}, "apiVersion",
        ("must be 'agentainer.dev/v1alpha1'", "not 'agentainer.dev/v1'"),
        id="wrong-api-version",
    ),
    pytest.param(
        {**workflow(step("map")), "kind": "AgentPool"}, "kind",
        ("must be 'Workflow'", "not 'AgentPool'"),
        id="wrong-kind",
    ),
    pytest.param(
        {**workflow(step("map")), "metadata": {"name": "Word_Count"}}, "metadata.name",
        ("'Word_Count'", "DNS-1123 name"),
        id="workflow-name-invalid",
    ),
    pytest.param(
        {**workflow(step("map")), "specs": {}}, "specs", ("unknown field",),
        id="unknown-top-level-field",
    ),
]


@pytest.mark.parametrize(("document", "path", "words"), REFUSED)
def test_invalid_workflow_is_refused_at_the_field_path_with_a_message_saying_why(
    document: dict[str, Any], path: str, words: tuple[str, ...]
) -> None:
    assert_reported(problems_of(document), path, words)


ACCEPTED = [
    pytest.param(workflow(step("a" * 63)), id="step-name-of-63-characters"),
    pytest.param(workflow(step("map-2"), step("0x")), id="step-names-with-digits-and-dash"),
    pytest.param(
        workflow(step("map", parallel={"items": ["a", "b"], "maxWorkers": 1},
                      command=["echo", "{{ item }}"])),
        id="item-in-an-items-fan-out",
    ),
    pytest.param(
        workflow(step("map", parallel={"replicas": 3}),
                 step("reduce", env=[{"name": "C", "value": "{{ steps.map.outputs }}"}])),
        id="outputs-of-a-fan-out",
    ),
    pytest.param(
        workflow(step("map", parallel={"items": ["only"]}),
                 step("reduce", env=[{"name": "C", "value": "{{ steps.map.output }}"}])),
        id="output-of-a-fan-out-of-one",
    ),
    pytest.param(
        workflow(step("init"), step("map"),
                 step("reduce", args=["{{ steps.init.output }}", "{{ steps.map.output }}"])),
        id="output-of-an-ancestor-through-default-dependencies",
    ),
    pytest.param(
        workflow(step("left", dependsOn=[]), step("right", dependsOn=[]),
                 step("join", dependsOn=["left", "right"],
                      command=["echo", "{{ steps.left.output }}{{ steps.right.output }}"])),
        id="diamond-join-reads-both-branches",
    ),
    pytest.param(
        workflow(step("map", command=["echo", '{{ "{{" }} not a template }}'])),
        id="literal-braces",
    ),
    pytest.param(
        workflow(step("map"), env=[{"name": "RUN", "value": "{{ workflow.name }}-{{ workflow.uid }}"}]),
        id="workflow-env-with-workflow-templates",
    ),
    pytest.param(workflow({"name": "report", "pool": "busybox-pool", "command": ["true"]}),
                 id="pooled-step-without-image"),
    pytest.param(
        workflow(step("map", resources={"cpu": "500m", "memory": "64Mi"})),
        id="kubernetes-quantities",
    ),
]


@pytest.mark.parametrize("document", ACCEPTED)
def test_valid_workflow_is_accepted(document: dict[str, Any]) -> None:
    parse_workflow(document)


# --- the DAG ------------------------------------------------------------------------------------


def test_cycle_is_refused_with_the_cycle_in_the_message() -> None:
    problems = problems_of(workflow(
        step("fetch", dependsOn=["merge"]),
        step("split", dependsOn=["fetch"]),
        step("merge", dependsOn=["split"]),
    ))
    assert_reported(problems, "spec.steps[0].dependsOn",
                    ("dependency cycle", "fetch -> merge -> split -> fetch"))


def test_cycle_through_the_default_dependency_is_refused() -> None:
    problems = problems_of(workflow(step("a", dependsOn=["b"]), step("b")))
    assert_reported(problems, "spec.steps[0].dependsOn", ("dependency cycle: a -> b -> a",))


def test_duplicate_step_name_is_not_also_reported_as_a_cycle() -> None:
    problems = problems_of(workflow(step("map"), step("map")))
    assert problems == [("spec.steps[1].name", "duplicate step name 'map'")]


def test_default_dependency_is_the_previous_step_and_an_empty_list_makes_a_root() -> None:
    spec = parse_workflow(workflow(
        step("init"),
        step("map"),
        step("side", dependsOn=[]),
        step("reduce", dependsOn=["map", "side"]),
        step("report"),
    )).spec
    assert spec.dependency_map() == {
        "init": [],
        "map": ["init"],
        "side": [],
        "reduce": ["map", "side"],
        "report": ["reduce"],
    }


# --- items: how deep they nest, checked in bounded work -----------------------------------------


def nested(depth: int) -> Any:
    """An item of lists and objects ``depth`` levels deep."""
    item: Any = "leaf"
    for level in range(depth):
        item = [item] if level % 2 else {"in": item}
    return item


def test_items_nesting_up_to_the_limit_are_accepted_and_deeper_ones_refused_by_index() -> None:
    parse_workflow(workflow(step("map", parallel={"items": [nested(MAX_ITEM_NESTING)]})))
    problems = problems_of(workflow(step("map", parallel={
        "items": ["a", nested(MAX_ITEM_NESTING), nested(MAX_ITEM_NESTING + 1)]})))
    assert_reported(problems, "spec.steps[0].parallel.items",
                    ("items[2] is nested more than 64 levels deep",))


def test_an_item_that_contains_itself_is_refused_as_too_deep() -> None:
    in_itself: list[Any] = ["a"]
    in_itself.append({"again": in_itself})
    problems = problems_of(workflow(step("map", parallel={"items": [1, in_itself]})))
    assert_reported(problems, "spec.steps[0].parallel.items", ("items[1] is nested more than",))
    assert nesting(in_itself) == MAX_ITEM_NESTING + 1


@pytest.mark.timeout(10)
def test_items_that_share_their_parts_are_checked_in_work_linear_in_the_parts() -> None:
    # Nine levels of nine references to one list stand for 9**11 leaves, as YAML aliases may.
    shared: Any = ["x"] * 9
    for _ in range(10):
        shared = [shared] * 9
    started = time.monotonic()
    parse_workflow(workflow(step("map", parallel={"items": [shared] * 1000})))
    assert nesting(shared) == 11
    assert time.monotonic() - started < 1


# --- resources ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("cpu", "nano_cpus"), [
    ("500m", 500_000_000),
    ("1.5", 1_500_000_000),
    ("2", 2_000_000_000),
    ("250u", 250_000),
])
def test_cpu_quantity_is_converted_exactly_to_nano_cpus(cpu: str, nano_cpus: int) -> None:
    assert Resources(cpu=cpu).nano_cpus == nano_cpus


@pytest.mark.parametrize(("memory", "memory_bytes"), [
    ("64Mi", 64 * 1024 * 1024),
    ("1G", 1_000_000_000),
    ("1Gi", 1024**3),
    ("500M", 500_000_000),
    ("1.5", 2),  # fractions of a byte round up, as in Kubernetes
])
def test_memory_quantity_is_converted_exactly_to_bytes(memory: str, memory_bytes: int) -> None:
    assert Resources(memory=memory).memory_bytes == memory_bytes


def test_unset_limits_convert_to_none() -> None:
    assert Resources().nano_cpus is None
    assert Resources().memory_bytes is None


@pytest.mark.parametrize(("quantity", "words"), [
    ("lots", ("'lots' is not a Kubernetes quantity", "500m", "64Mi")),
    ("1.5.5", ("is not a Kubernetes quantity",)),
    ("-1", ("'-1' must be greater than zero",)),
    ("0", ("'0' must be greater than zero",)),
])
@pytest.mark.parametrize("field", ["cpu", "memory"])
def test_resource_that_is_not_a_positive_quantity_is_refused(
    field: str, quantity: str, words: tuple[str, ...]
) -> None:
    problems = problems_of(workflow(step("map", resources={field: quantity})))
    assert_reported(problems, f"spec.steps[0].resources.{field}", words)


# --- several problems at once -------------------------------------------------------------------


def test_every_structural_problem_is_reported_at_once() -> None:
    problems = problems_of(workflow(
        step("Map", parallel={"replicas": 2, "maxWorkers": 0}),
        step("reduce", colour="blue", resources={"cpu": "lots"}),
    ))
    paths = {path for path, _ in problems}
    assert {
        "spec.steps[0].name",
        "spec.steps[0].parallel.maxWorkers",
        "spec.steps[1].colour",
        "spec.steps[1].resources.cpu",
    } <= paths


def test_every_semantic_problem_is_reported_at_once() -> None:
    problems = problems_of(workflow(
        step("map", parallel={"items": ["a"], "replicas": 2}),
        step("map"),
        step("reduce", dependsOn=["nothing"], env=[{"name": "AGENTAINER_X", "value": "1"}]),
        {"name": "report", "command": ["echo", "{{ item }}"]},
    ))
    paths = {path for path, _ in problems}
    assert {
        "spec.steps[0].parallel",
        "spec.steps[1].name",
        "spec.steps[2].dependsOn[0]",
        "spec.steps[2].env[0].name",
        "spec.steps[3].image",
        "spec.steps[3].command[1]",
    } <= paths


def test_error_message_names_the_file_and_every_problem() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_workflow(workflow(step("map"), step("map", image="")), source="wordcount.yaml")
    message = str(caught.value)
    assert message.startswith("wordcount.yaml: ")
    assert "spec.steps[1].image: " in message


# --- AgentPool ----------------------------------------------------------------------------------


def test_pool_with_min_size_above_max_size_is_refused() -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_agent_pool(pool(minSize=5, maxSize=3))
    assert [(p.path, p.message) for p in caught.value.problems] == [
        ("spec.minSize", "5 is above maxSize 3")
    ]


def test_pool_with_min_size_equal_to_max_size_is_accepted() -> None:
    parsed = parse_agent_pool(pool(minSize=3, maxSize=3))
    assert (parsed.spec.min_size, parsed.spec.max_size) == (3, 3)


@pytest.mark.parametrize(("document", "path", "words"), [
    pytest.param({**pool(), "spec": {"minSize": 1}}, "spec.image", ("Field required",),
                 id="image-missing"),
    pytest.param(pool(maxSize=0), "spec.maxSize", ("greater than or equal to 1",),
                 id="max-size-zero"),
    pytest.param(pool(size=3), "spec.size", ("unknown field",), id="unknown-field"),
    pytest.param({**pool(), "kind": "Workflow"}, "kind", ("must be 'AgentPool'",),
                 id="wrong-kind"),
])
def test_invalid_pool_is_refused_at_the_field_path(
    document: dict[str, Any], path: str, words: tuple[str, ...]
) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_agent_pool(document)
    assert_reported([(p.path, p.message) for p in caught.value.problems], path, words)


# --- types: integers and booleans as the CRD's schema has them, not as pydantic would coerce ----

NOT_AN_INTEGER = ['"5"', "true", "5.5"]
NOT_A_BOOLEAN = ['"yes"', '"true"', "1"]
NOT_A_NUMBER = ['"1.5"', "true"]


def loose(field: str, written: list[str], kind: str) -> list[Any]:
    """One row for each way of writing ``field``'s value that its kind is not."""
    return [pytest.param(field, json.loads(value), f"must be {kind}, not {value}",
                         id=f"{field}={value}") for value in written]


@pytest.mark.parametrize(("path", "value", "message"), [
    *loose("spec.timeoutSeconds", NOT_AN_INTEGER, "an integer"),
    *loose("spec.ttlSecondsAfterFinished", NOT_AN_INTEGER, "an integer"),
    *loose("spec.suspend", NOT_A_BOOLEAN, "a boolean"),
    *loose("spec.steps[0].timeoutSeconds", NOT_AN_INTEGER, "an integer"),
    *loose("spec.steps[0].continueOn.failed", NOT_A_BOOLEAN, "a boolean"),
    *loose("spec.steps[0].parallel.replicas", NOT_AN_INTEGER, "an integer"),
    *loose("spec.steps[0].parallel.maxWorkers", NOT_AN_INTEGER, "an integer"),
    *loose("spec.steps[0].retries.limit", ["false", '"2"', "2.5"], "an integer"),
    *loose("spec.steps[0].retries.backoffSeconds", NOT_A_NUMBER, "a number"),
    *loose("spec.steps[0].retries.backoffFactor", NOT_A_NUMBER, "a number"),
    *loose("spec.steps[0].pod.runAsUser", NOT_AN_INTEGER, "an integer"),
    *loose("spec.steps[0].pod.runAsNonRoot", NOT_A_BOOLEAN, "a boolean"),
    *loose("spec.steps[0].env[0].valueFrom.secretKeyRef.optional", NOT_A_BOOLEAN, "a boolean"),
    *loose("spec.steps[0].env[0].value", ["5", "true"], "a string"),
])
def test_a_value_of_the_wrong_type_is_refused_not_coerced(path: str, value: Any,
                                                          message: str) -> None:
    document = workflow(step("map", parallel={"replicas": 2}, retries={"limit": 1},
                             continueOn={"failed": True}, pod={},
                             env=[{"name": "X", "valueFrom": {"secretKeyRef": {
                                 "name": "s", "key": "k"}}}]))
    if path.endswith(".value"):
        del document["spec"]["steps"][0]["env"][0]["valueFrom"]
    set_at(document, path, value)
    assert (path, message) in problems_of(document)


@pytest.mark.parametrize(("field", "value", "message"), [
    *loose("minSize", NOT_AN_INTEGER, "an integer"),
    *loose("maxSize", NOT_AN_INTEGER, "an integer"),
    *loose("idleTimeoutSeconds", NOT_AN_INTEGER, "an integer"),
    *loose("maxUses", NOT_AN_INTEGER, "an integer"),
    *loose("leaseTimeoutSeconds", NOT_AN_INTEGER, "an integer"),
    *loose("runAsUser", NOT_AN_INTEGER, "an integer"),
    *loose("runAsGroup", NOT_AN_INTEGER, "an integer"),
    *loose("warmUp", NOT_A_BOOLEAN, "a boolean"),
])
def test_a_pool_value_of_the_wrong_type_is_refused_not_coerced(field: str, value: Any,
                                                               message: str) -> None:
    with pytest.raises(InvalidSpecError) as caught:
        parse_agent_pool(pool(**{field: value}))
    assert (f"spec.{field}", message) in [(p.path, p.message) for p in caught.value.problems]


def set_at(document: dict[str, Any], path: str, value: Any) -> None:
    """Set the field at ``path`` (spec.steps[0].pod.runAsUser), making objects on the way."""
    parts = [int(part) if part.isdigit() else part
             for part in path.replace("[", ".").replace("]", "").split(".")]
    where: Any = document
    for part in parts[:-1]:
        where = where[part] if isinstance(part, int) else where.setdefault(part, {})
    where[parts[-1]] = value


def test_enums_numbers_and_booleans_written_as_such_are_read_the_same_from_yaml_and_json() -> None:
    document = workflow(
        step("map", parallel={"replicas": 2, "maxWorkers": 1}, timeoutSeconds=5,
             retries={"limit": 2, "backoffSeconds": 1, "backoffFactor": 1.5},
             continueOn={"failed": True}, pod={"runAsNonRoot": False, "runAsUser": 0}),
        backend="docker", cleanup="Always", shutdown="Stop", suspend=False, timeoutSeconds=60,
        ttlSecondsAfterFinished=0)
    spec = parse_workflow(document).spec
    assert (spec.backend, spec.cleanup, spec.shutdown) == ("docker", "Always", "Stop")
    assert spec.steps[0].retries is not None and spec.steps[0].retries.backoff_seconds == 1.0
    # As the store keeps a run's spec, and as the API server sends it back: JSON.
    stored = spec.model_dump_json(by_alias=True, exclude_none=True)
    assert WorkflowSpec.model_validate(json.loads(stored)) == spec
    assert WorkflowSpec.model_validate_json(stored) == spec
    agent_pool = parse_agent_pool(pool(backend="kubernetes", minSize=0, warmUp=False)).spec
    assert AgentPoolSpec.model_validate_json(agent_pool.model_dump_json(by_alias=True)) == agent_pool
