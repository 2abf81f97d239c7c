#!/usr/bin/env python3
"""docs/api.md, the field-by-field API reference, generated from the models as the CRDs are.

    scripts/api_reference.py           write docs/api.md (`make api-docs`)
    scripts/api_reference.py --check   exit 1 when docs/api.md is not what the models give

It reads each kind's spec and status models through their JSON schema (the one the CRDs are
made from), so that a field, its type, default, limits and description are written down once:
in controller/models.py.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file: the package beside it, installed or not
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from controller import crds  # noqa: E402
from controller.models import (  # noqa: E402
    API_GROUP,
    API_VERSION,
    DNS_LABEL,
    DNS_SUBDOMAIN,
    QUANTITY,
    AgentPoolSpec,
    AgentPoolStatus,
    WorkflowSpec,
    WorkflowStatus,
)

API_DOC = ROOT / "docs" / "api.md"
HEADER = "Generated from controller/models.py by `make api-docs`; do not edit."
KINDS: list[tuple[Callable[[], dict[str, Any]], type[BaseModel], type[BaseModel]]] = [
    (crds.workflow_crd, WorkflowSpec, WorkflowStatus),
    (crds.agent_pool_crd, AgentPoolSpec, AgentPoolStatus),
]
NAMED_PATTERNS = {
    DNS_LABEL: "a DNS-1123 label",
    DNS_SUBDOMAIN: "a DNS-1123 subdomain",
    QUANTITY: "a Kubernetes quantity",
}
"""Patterns better read by name than as a regular expression."""

Schema = dict[str, Any]


def flat(node: Schema) -> Schema:
    """A field's schema with ``anyOf [X, null]`` (an optional field) folded into X."""
    if "anyOf" in node:
        choices = [choice for choice in node["anyOf"] if choice.get("type") != "null"]
        if len(choices) == 1:
            rest = {key: value for key, value in node.items() if key != "anyOf"}
            return {**choices[0], **rest}
    return node


def anchor(name: str) -> str:
    return f"#{name.lower()}"


def type_of(node: Schema, definitions: Schema) -> str:
    """A field's type as people read it: ``string``, ``[]Step``, ``map[string]string``, the
    values of an enum, a link to a nested model's section."""
    node = flat(node)
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        target = definitions[name]
        if "enum" in target:
            return " | ".join(str(value) for value in target["enum"])
        return f"[{name}]({anchor(name)})"
    if "enum" in node:
        return " | ".join(str(value) for value in node["enum"])
    if "const" in node:
        return str(node["const"])
    kind = node.get("type")
    if kind == "array":
        items = type_of(node.get("items", {}), definitions)
        if items.startswith("["):  # a link: keep the brackets inside its text
            return "[[]" + items[1:]
        return "[]" + items
    if kind == "object":
        values = node.get("additionalProperties")
        if isinstance(values, dict):
            return "map[string]" + type_of(values, definitions)
        return "object"
    if kind is None:
        return "any"
    return str(kind)


def _bounds(low: Any, high: Any) -> str | None:
    """``1 to 5``, ``at least 1``, ``at most 5``, or None when neither is set."""
    if low is not None and high is not None:
        return f"{low} to {high}"
    if low is not None:
        return f"at least {low}"
    return None if high is None else f"at most {high}"


def limits(node: Schema) -> list[str]:
    """What the schema allows of a value beyond its type: ranges, lengths, patterns."""
    node = flat(node)
    found = []
    for low_key, high_key, what in (("minimum", "maximum", "{}"),
                                    ("minLength", "maxLength", "length {}"),
                                    ("minItems", "maxItems", "{} items")):
        if (bounds := _bounds(node.get(low_key), node.get(high_key))) is not None:
            found.append(what.format(bounds).replace("at least 1 items", "at least 1 item"))
    if "pattern" in node:
        pattern = node["pattern"]
        found.append(NAMED_PATTERNS.get(pattern, f"pattern `{pattern}`"))
    if node.get("type") == "array" and "$ref" not in node.get("items", {}):
        found += [f"each {limit}" for limit in limits(node.get("items", {}))]
    return found


def default_of(name: str, node: Schema, required: list[str]) -> str:
    if name in required:
        return "required"
    if "default" not in node or node["default"] is None:
        return ""
    value = node["default"]
    if isinstance(value, str) and value:
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def prose(text: str) -> str:
    """A docstring or description on one line, in Markdown (reST's ``code`` as `code`)."""
    return re.sub(r"``(.+?)``", r"`\1`", " ".join(text.split()))


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def rules(schema: Schema) -> list[str]:
    """The rules across fields that the CRD gives the API server to check."""
    found = [prose(rule["message"]) for rule in schema.get("x-kubernetes-validations", [])]
    if "oneOf" in schema:
        fields = [f"`{name}`" for choice in schema["oneOf"] for name in choice["required"]]
        found.append("exactly one of " + ", ".join(fields))
    return found


def model_section(name: str, schema: Schema, definitions: Schema) -> list[str]:
    lines = [f"### {name}", ""]
    if schema.get("description"):
        lines += [prose(schema["description"]), ""]
    if checked := rules(schema):
        lines += ["Checked by the API server: " + "; ".join(checked) + ".", ""]
    lines += ["| Field | Type | Default | Constraints | Description |",
              "|---|---|---|---|---|"]
    required = schema.get("required", [])
    for field, node in schema.get("properties", {}).items():
        row = [f"`{field}`", type_of(node, definitions), default_of(field, node, required),
               ", ".join(limits(node)), prose(node.get("description", ""))]
        lines.append("| " + " | ".join(cell(text) for text in row) + " |")
    return lines + [""]


def nested(schema: Schema, definitions: Schema) -> list[str]:
    """The models a schema reaches, each once, in the order a reader meets them: a field's
    model, then the models of that one, before the next field's."""
    order: list[str] = []

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if reference is not None:
                name = reference.rsplit("/", 1)[-1]
                if name not in order and "properties" in definitions[name]:
                    order.append(name)
                    visit(definitions[name].get("properties", {}))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema.get("properties", {}))
    return order


def kind_section(crd: Schema, spec: type[BaseModel], status: type[BaseModel],
                 written: set[str]) -> list[str]:
    """A kind as its CRD names it, then its spec and status models and the models they reach
    that no earlier kind has written (those are linked)."""
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    shown = [c["name"].upper() for c in version["additionalPrinterColumns"]
             if not c.get("priority")]
    wide = [c["name"].upper() for c in version["additionalPrinterColumns"] if c.get("priority")]
    identity = (f"`apiVersion: {API_GROUP}/{API_VERSION}`, `kind: {names['kind']}`, "
                f"{crd['spec']['scope'].lower()}; plural `{names['plural']}`, short name "
                + ", ".join(f"`{short}`" for short in names["shortNames"]) + ", category "
                + ", ".join(f"`{category}`" for category in names["categories"]) + ". "
                + "`kubectl get` shows " + ", ".join(shown)
                + ("; `-o wide` adds " + ", ".join(wide) if wide else "") + ".")
    lines = [f"## {names['kind']}", "",
             prose(version["schema"]["openAPIV3Schema"]["description"]), "", identity, "",
             f"`spec`: [{spec.__name__}]({anchor(spec.__name__)}). `status`, written by the "
             f"controller: [{status.__name__}]({anchor(status.__name__)}).", ""]
    for model in (spec, status):
        schema = model.model_json_schema(by_alias=True)
        definitions = schema.get("$defs", {})
        lines += model_section(model.__name__, schema, definitions)
        for name in nested(schema, definitions):
            if name not in written:
                written.add(name)
                lines += model_section(name, definitions[name], definitions)
    return lines


def render() -> str:
    """docs/api.md as the models give it."""
    lines = ["# API reference", "", HEADER, "",
             f"Every field of the two kinds of group `{API_GROUP}`, version `{API_VERSION}`, "
             "as users write them. Unknown fields in a spec are errors. How the fields work "
             "together, with examples: [reference.md](reference.md).", ""]
    written: set[str] = set()
    for crd, spec, status in KINDS:
        lines += kind_section(crd(), spec, status, written)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) docs/api.md")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not API_DOC.exists() or API_DOC.read_text() != text:
            print(f"{API_DOC} is stale: run `make api-docs`", file=sys.stderr)
            return 1
        return 0
    API_DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
