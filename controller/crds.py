"""The CustomResourceDefinitions, generated from the models so that the two never disagree.

``python -m controller.crds`` (``make crds``) writes ``crds/*.yaml``; a test fails when the
files differ from what the models give.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from controller.models import (
    API_GROUP,
    API_VERSION,
    AgentPoolSpec,
    AgentPoolStatus,
    WorkflowSpec,
    WorkflowStatus,
)

CRD_DIRECTORY = Path(__file__).resolve().parent.parent / "crds"
# The Helm chart carries the same files (helm installs CRDs from its crds/ folder).
CHART_CRD_DIRECTORY = CRD_DIRECTORY.parent / "helm" / "agentainer" / "crds"
KEPT = ("type", "description", "enum", "pattern", "minLength", "maxLength", "minimum",
        "maximum", "minItems", "maxItems", "oneOf", "x-kubernetes-validations")


def structural(schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema node as a Kubernetes structural schema: references inlined,
    optional (``anyOf [X, null]``) folded into X, titles dropped, free values marked, maps kept
    as maps (without ``additionalProperties`` the API server would drop every key)."""
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return structural(merged, definitions)
    if "anyOf" in schema:
        choices = [c for c in schema["anyOf"] if c.get("type") != "null"]
        if len(choices) != 1:
            raise ValueError(f"cannot express {schema} structurally")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return structural({**choices[0], **rest}, definitions)
    result: dict[str, Any] = {k: schema[k] for k in KEPT if k in schema}
    default = schema.get("default")
    if isinstance(default, str | int | float | bool) and not isinstance(default, list):
        result["default"] = default
    if "properties" in schema:
        result["properties"] = {name: structural(sub, definitions)
                                for name, sub in schema["properties"].items()}
        if schema.get("required"):
            result["required"] = list(schema["required"])
    if "items" in schema:
        result["items"] = structural(schema["items"], definitions)
    if isinstance(schema.get("additionalProperties"), dict):  # a map (nodeSelector): keep its
        result["additionalProperties"] = structural(schema["additionalProperties"],  # keys
                                                    definitions)
    if "type" not in result:
        result["x-kubernetes-preserve-unknown-fields"] = True  # any JSON value (items)
    return result


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    return structural(raw, raw.get("$defs", {}))


def definition(kind: str, plural: str, short_names: list[str], spec: type[BaseModel],
               status: type[BaseModel], columns: list[dict[str, Any]],
               description: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/name": "agentainer",
                       "app.kubernetes.io/part-of": "agentainer"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(),
                      "listKind": f"{kind}List", "shortNames": short_names,
                      "categories": ["agentainer"]},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string",
                                       "description": "agentainer.dev/v1alpha1"},
                        "kind": {"type": "string", "description": kind},
                        "metadata": {"type": "object"},
                        "spec": schema_of(spec),
                        "status": schema_of(status),
                    },
                }},
            }],
        },
    }


def column(name: str, path: str, kind: str = "string", description: str = "",
           priority: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if description:
        result["description"] = description
    if priority:
        result["priority"] = priority
    return result


def workflow_crd() -> dict[str, Any]:
    return definition(
        "Workflow", "workflows", ["awf"], WorkflowSpec, WorkflowStatus,
        [column("Phase", ".status.phase", description="Where the workflow is"),
         column("Progress", ".status.progress", description="Agents succeeded / all"),
         column("Suspended", ".spec.suspend", "boolean", "New agents held back", priority=1),
         column("Message", ".status.message", priority=1),
         column("Age", ".metadata.creationTimestamp", "date")],
        "A workflow of agent containers: steps that run one agent, a fan-out of agents, or "
        "agents leased from an AgentPool, in the order their dependencies give.",
    )


def agent_pool_crd() -> dict[str, Any]:
    return definition(
        "AgentPool", "agentpools", ["apool"], AgentPoolSpec, AgentPoolStatus,
        [column("Ready", ".status.ready", "integer", "Warm agents waiting"),
         column("Busy", ".status.busy", "integer", "Agents running a task"),
         column("Min", ".spec.minSize", "integer"),
         column("Max", ".spec.maxSize", "integer"),
         column("Age", ".metadata.creationTimestamp", "date")],
        "A pool of warm agents of one image, leased by pooled workflow steps.",
    )


def rendered() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    header = "# Generated from controller/models.py by `make crds`; do not edit.\n"
    return {
        f"{crd['metadata']['name']}.yaml": header + yaml.safe_dump(crd, sort_keys=False, width=100)
        for crd in (workflow_crd(), agent_pool_crd())
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) crds/*.yaml")
    parser.add_argument("--check", action="store_true", help="exit 1 if the files are stale")
    parser.add_argument("--directory", type=Path, default=CRD_DIRECTORY)
    args = parser.parse_args(argv)
    stale = []
    directories = [args.directory]
    if args.directory == CRD_DIRECTORY and CHART_CRD_DIRECTORY.parent.exists():
        directories.append(CHART_CRD_DIRECTORY)
    for directory in directories:
        for name, text in rendered().items():
            path = directory / name
            if args.check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if stale:
        print("stale CRDs (run `make crds`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
