"""What a run decides about a step before it starts, as pure functions of what it knows: the
order steps are taken up in, whether a step is skipped and why, the items an ``itemsFrom``
step fans out over, and whether a step's failure fails the workflow."""

from __future__ import annotations

import json

from controller import templating
from controller.models import MAX_ITEM_NESTING, Step, StepPhase, nesting

SKIPPED_BY_CONDITION = "skipped: "
"""How the message of a step skipped by its conditions (or a skipped input) begins."""


class ItemsError(Exception):
    """An itemsFrom output that cannot be a fan-out's items."""


def fails_workflow(step: Step) -> bool:
    """Whether the step failing fails the workflow (not with ``continueOn.failed``)."""
    return not (step.continue_on and step.continue_on.failed)


def quote(text: str, length: int = 200) -> str:
    """The start of an output, quoted, for a message."""
    return repr(text[:length]) + (f" ({len(text)} characters)" if len(text) > length else "")


def topological(dependencies: dict[str, list[str]]) -> list[str]:
    """Step names, each after every step it depends on."""
    order: list[str] = []
    seen: set[str] = set()
    for name in dependencies:
        stack = [(name, iter(dependencies[name]))]
        while stack:
            current, pending = stack[-1]
            if current in seen:
                stack.pop()
                continue
            child = next((d for d in pending if d not in seen), None)
            if child is None:
                seen.add(current)
                order.append(current)
                stack.pop()
            else:
                stack.append((child, iter(dependencies.get(child, []))))
    return order


def skip_reason(step: Step, phases: dict[str, StepPhase],
                context: templating.Context) -> str | None:
    """Why a step whose dependencies are done does not run: it reads the output of a step
    that was skipped or failed, or one of its conditions does not hold. None: it runs."""
    for name in sorted(step.inputs()):
        phase = phases.get(name)
        if phase in (StepPhase.SKIPPED, StepPhase.FAILED):
            ended = "was skipped" if phase is StepPhase.SKIPPED else "failed"
            return f"it reads the output of step {name}, which {ended}"
    for number, when in enumerate(step.when):
        rendered = templating.render(when.input, context)
        values = [templating.render(value, context) for value in when.values]
        if (rendered in values) != (when.operator == "in"):
            return (f"when[{number}]: {quote(rendered, 100)} is "
                    f"{'not ' if when.operator == 'in' else ''}in {values}")
    return None


def _not_json(name: str) -> float:
    """NaN and Infinity, which Python's JSON reads and JSON has not."""
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    """A number that a float holds: 1e400 would be Infinity, handed on as no JSON has it."""
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large a number")
    return number


def items_of(step: Step, context: templating.Context, limit: int) -> list[object]:
    """The items of an ``itemsFrom`` step: the elements of the JSON array its upstream step
    printed. The same output always gives the same items, so a resumed run resolves them
    again rather than keep them. Raises ItemsError saying why they cannot be items."""
    assert step.items_from is not None
    text = templating.render(step.items_from, context)
    where = f"step {step.name}: parallel.itemsFrom ({step.items_from.strip()})"
    try:
        items = json.loads(text, parse_constant=_not_json, parse_float=_finite)
    except (ValueError, RecursionError):
        raise ItemsError(f"{where} is not JSON: {quote(text)}") from None
    if not isinstance(items, list):
        raise ItemsError(f"{where} is not a JSON array: {quote(text)}")
    if len(items) > limit:
        raise ItemsError(f"{where} has {len(items)} items, more than "
                         f"AGENTAINER_MAX_ITEMS_FROM ({limit}): {quote(text)}")
    if any(nesting(item) > MAX_ITEM_NESTING for item in items):
        raise ItemsError(f"{where} nests an item more than {MAX_ITEM_NESTING} levels deep")
    return items
