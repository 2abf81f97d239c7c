"""The ``{{ ... }}`` templates of env values, commands and args: parsing, checking, rendering.

The language is deliberately tiny (no expressions, no filters) so that every reference can be
checked before a workflow starts and so that rendering can never run code:

- ``{{ steps.NAME.output }}``: the output (trimmed stdout) of a single-agent step;
- ``{{ steps.NAME.outputs }}``: a JSON list of the outputs of every agent of a step, in order;
- ``{{ steps.NAME.phase }}``: how a step ended: Succeeded, Failed (``continueOn``) or Skipped;
- ``{{ item }}``: the item of this agent in a fan-out over ``parallel.items``;
- ``{{ workflow.name }}``, ``{{ workflow.uid }}``;
- in a finally step, ``{{ workflow.status }}`` (Succeeded or Failed) and
  ``{{ workflow.failures }}`` (a JSON list of the steps that failed);
- ``{{ params.NAME }}``: the value of the workflow's parameter NAME;
- ``{{ "text" }}``: the text itself, to write a literal ``{{``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum

TEMPLATE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
STEP_REFERENCE = re.compile(
    r"^steps\.([a-z0-9]([-a-z0-9]*[a-z0-9])?)\.(output|outputs|phase)$")
LITERAL = re.compile(r'^"([^"]*)"$')
PARAM_NAME = r"[a-zA-Z_][a-zA-Z0-9_-]*"
PARAM_REFERENCE = re.compile(rf"^params\.({PARAM_NAME})$")

FORMS = (
    "{{ steps.NAME.output }}, {{ steps.NAME.outputs }}, {{ steps.NAME.phase }}, {{ item }}, "
    "{{ params.NAME }}, "
    "{{ workflow.name }}, {{ workflow.uid }}, {{ workflow.status }}, {{ workflow.failures }} "
    'or {{ "literal text" }}'
)


class TemplateError(ValueError):
    """A template that cannot be understood; the message says what is allowed."""


class ReferenceKind(StrEnum):
    STEP_OUTPUT = "output"
    STEP_OUTPUTS = "outputs"
    STEP_PHASE = "phase"
    ITEM = "item"
    WORKFLOW_NAME = "workflow.name"
    WORKFLOW_UID = "workflow.uid"
    WORKFLOW_STATUS = "workflow.status"
    WORKFLOW_FAILURES = "workflow.failures"
    PARAM = "param"
    LITERAL = "literal"


@dataclass(frozen=True)
class Reference:
    """One ``{{ ... }}`` found in a text."""

    kind: ReferenceKind
    step: str = ""
    literal: str = ""
    param: str = ""


def parse_expression(expression: str) -> Reference:
    """Turn the inside of one ``{{ ... }}`` into a reference, or explain why it is not one."""
    text = expression.strip()
    if text == "item":
        return Reference(ReferenceKind.ITEM)
    if text == "workflow.name":
        return Reference(ReferenceKind.WORKFLOW_NAME)
    if text == "workflow.uid":
        return Reference(ReferenceKind.WORKFLOW_UID)
    if text in ("workflow.status", "workflow.failures"):
        return Reference(ReferenceKind(text))
    if literal := LITERAL.match(text):
        return Reference(ReferenceKind.LITERAL, literal=literal.group(1))
    if step := STEP_REFERENCE.match(text):
        return Reference(ReferenceKind(step.group(3)), step=step.group(1))
    if param := PARAM_REFERENCE.match(text):
        return Reference(ReferenceKind.PARAM, param=param.group(1))
    if text.startswith("params."):
        raise TemplateError(f"'{{{{ {text} }}}}' is not a parameter reference: write "
                            "params.NAME with NAME one of spec.params")
    if text.startswith("steps."):
        raise TemplateError(
            f"'{{{{ {text} }}}}' is not a step reference: write steps.NAME.output, "
            "steps.NAME.outputs or steps.NAME.phase with NAME a step's name"
        )
    raise TemplateError(f"unknown template '{{{{ {text} }}}}'; the forms are {FORMS}")


def references(text: str) -> list[Reference]:
    """Every reference in ``text``; raises TemplateError on the first that is not understood."""
    if "{{" not in text:
        return []
    found = [parse_expression(m.group(1)) for m in TEMPLATE.finditer(text)]
    rest = TEMPLATE.sub("", text)
    if "{{" in rest:
        raise TemplateError("'{{' is not closed by '}}' (write {{ \"{{\" }} for a literal '{{')")
    return found


@dataclass
class Context:
    """What templates of one agent can see."""

    workflow_name: str
    workflow_uid: str
    item: str | None = None
    outputs: dict[str, list[str]] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    phases: dict[str, str] = field(default_factory=dict)
    outcome: str | None = None
    """``{{ workflow.status }}``: set for finally steps."""
    failures: list[str] = field(default_factory=list)


def render(text: str, context: Context) -> str:
    """Replace every template in ``text``. The values are data: nothing in them is evaluated."""
    if "{{" not in text:
        return text

    def value(match: re.Match[str]) -> str:
        reference = parse_expression(match.group(1))
        match reference.kind:
            case ReferenceKind.ITEM:
                if context.item is None:
                    raise TemplateError("{{ item }} is only set in a fan-out over parallel.items")
                return context.item
            case ReferenceKind.WORKFLOW_NAME:
                return context.workflow_name
            case ReferenceKind.WORKFLOW_UID:
                return context.workflow_uid
            case ReferenceKind.WORKFLOW_STATUS:
                if context.outcome is None:
                    raise TemplateError("{{ workflow.status }} is only set in a finally step")
                return context.outcome
            case ReferenceKind.WORKFLOW_FAILURES:
                return json.dumps(context.failures)
            case ReferenceKind.LITERAL:
                return reference.literal
            case ReferenceKind.STEP_PHASE:
                if reference.step not in context.phases:
                    raise TemplateError(f"step '{reference.step}' has not ended yet")
                return context.phases[reference.step]
            case ReferenceKind.PARAM:
                if reference.param not in context.params:
                    raise TemplateError(f"parameter '{reference.param}' has no value")
                return context.params[reference.param]
            case ReferenceKind.STEP_OUTPUT | ReferenceKind.STEP_OUTPUTS:
                outputs = context.outputs.get(reference.step)
                if outputs is None:
                    raise TemplateError(f"step '{reference.step}' has no outputs yet")
                if reference.kind is ReferenceKind.STEP_OUTPUTS:
                    return json.dumps(outputs, ensure_ascii=False)
                return outputs[0] if outputs else ""

    return TEMPLATE.sub(value, text)


def item_text(item: object) -> str:
    """How an item of ``parallel.items`` reads in ``{{ item }}`` and ``AGENTAINER_ITEM``:
    strings as they are, everything else (numbers, lists, objects) as JSON."""
    if isinstance(item, str):
        return item
    return json.dumps(item, ensure_ascii=False, sort_keys=True)
