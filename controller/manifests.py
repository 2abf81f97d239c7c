"""Reading manifest files (multi-document YAML) into Workflow and AgentPool models."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import ComposerError

from controller.errors import InvalidSpecError, ManifestError, Problem
from controller.models import (
    GROUP_VERSION,
    KINDS,
    AgentPool,
    Workflow,
    missing_params,
    with_params,
)


@dataclass(frozen=True)
class Document:
    """One YAML document of a file, with where it came from for messages."""

    source: str
    body: Any


STDIN = "-"
"""The path that means standard input."""


MAX_ALIASED_NODES = 1_000_000
"""How many nodes the aliases of a file may stand for, each counted as if written out where it
is used: far more than a manifest repeats (the API server takes at most 3 MiB of one), and few
enough that whatever walks the documents (validation, JSON encoding) ends in time. Go's YAML,
which kubectl reads manifests with, refuses excessive aliasing too."""


class _Loader(yaml.SafeLoader):
    """Safe YAML read as kubectl reads it, with errors where PyYAML would go on: a mapping key
    given twice (PyYAML keeps the last, silently), an alias inside the node it names (a
    structure that contains itself, which no walk of it ends), and aliases standing for more
    than MAX_ALIASED_NODES (a "billion laughs" file of a few lines, which PyYAML reads at once
    as shared objects but which hangs anything that walks it)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.sizes: dict[yaml.Node, int] = {}
        """Each complete node of the document: how many nodes it is, its aliases expanded."""
        self.aliased = 0
        """How many nodes the aliases read so far stand for, in every document of the file."""

    def compose_document(self) -> yaml.Node | None:
        self.sizes = {}  # anchors, hence aliases, are the document's own
        return super().compose_document()

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self._expand(self.peek_event())  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        node = super().compose_node(parent, index)
        assert node is not None  # not an alias: a node made here
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        self.sizes[node] = 1 + sum(self.sizes[child] for child in children)
        return node

    def _expand(self, alias: Any) -> None:
        """Count the nodes ``alias`` (an AliasEvent) stands for, or refuse it."""
        named = self.anchors.get(alias.anchor)
        if named is None:
            return  # an undefined alias: the composer says so
        if named not in self.sizes:
            raise ComposerError(None, None, f"the alias *{alias.anchor} is inside the node "
                                f"&{alias.anchor} it names, which would contain itself",
                                alias.start_mark)
        self.aliased += self.sizes[named]
        if self.aliased > MAX_ALIASED_NODES:
            raise ComposerError(None, None, "excessive aliasing: the aliases stand for more "
                                f"than {MAX_ALIASED_NODES:,} nodes", alias.start_mark)

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        # Keys compare as written, as Go's YAML compares them (1 and "1" are one JSON key), and
        # before merge keys (<<) add theirs, which the mapping's own may override.
        lines: dict[str, int] = {}
        for key, _ in node.value:
            if not isinstance(key, yaml.ScalarNode):
                continue  # a list or mapping as a key: the constructor refuses it
            if key.value in lines:
                raise ComposerError(None, None, f"mapping key {key.value!r} already defined at "
                                    f"line {lines[key.value]}", key.start_mark)
            lines[key.value] = key.start_mark.line + 1
        return node


def _number(loader: _Loader, node: yaml.ScalarNode) -> float | int:
    """A number written with a point: whole (``5.0``), the integer it is, as kubectl sends it
    (its YAML turns into JSON ``5``), which the schema's integers take."""
    value = loader.construct_yaml_float(node)
    return int(value) if value.is_integer() else value


_Loader.add_constructor("tag:yaml.org,2002:float", _number)


def manifest_files(paths: list[str]) -> list[str]:
    """The files named, a folder standing for its YAML and JSON files (its subfolders' too),
    ``-`` for standard input."""
    found: list[str] = []
    for name in paths:
        path = Path(name)
        if name != STDIN and path.is_dir():
            files = sorted(str(p) for p in path.rglob("*")
                           if p.suffix in (".yaml", ".yml", ".json") and p.is_file())
            if not files:
                raise ManifestError(f"{path}: no .yaml, .yml or .json file in it")
            found += files
        else:
            found.append(name)
    return found


def ours(document: Document) -> bool:
    """Whether a document is one of our kinds (or says it is of our API group): other
    documents of a multi-document file (a Secret, a ConfigMap) are left to others."""
    body = document.body
    if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
        return True  # not a manifest at all: parse says why
    api_version = str(body.get("apiVersion") or "")
    return body["kind"] in KINDS or api_version.split("/")[0] == GROUP_VERSION.split("/")[0]


def read_documents(path: str | Path) -> list[Document]:
    """Every non-empty document in a YAML file (``-``: standard input); one-line
    ManifestError when it can't be read."""
    if str(path) == STDIN:
        try:
            return _documents("stdin", sys.stdin.read())
        except UnicodeDecodeError as error:
            raise ManifestError(f"stdin: cannot read it: {error}") from None
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ManifestError(f"{path}: is a directory, not a manifest file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path}: cannot read it: {error}") from None
    return _documents(str(path), text)


def _documents(path: str, text: str) -> list[Document]:
    try:
        bodies = [body for body in yaml.load_all(text, Loader=_Loader) if body is not None]
    except RecursionError:
        raise ManifestError(f"{path}: nested too deeply to be read") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ManifestError(f"{path}: not valid YAML{where}: {problem}") from None
    if not bodies:
        raise ManifestError(f"{path}: no manifest in it")
    documents = []
    for number, body in enumerate(bodies, start=1):
        source = str(path) if len(bodies) == 1 else f"{path} (document {number})"
        documents.append(Document(source, body))
    return documents


def parse(document: Document) -> Workflow | AgentPool:
    """The model for one document, dispatched on its ``kind``."""
    body = document.body
    if not isinstance(body, dict):
        raise ManifestError(f"{document.source}: a manifest is a mapping, not a {type(body).__name__}")
    kind = body.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        known = " or ".join(KINDS)
        raise ManifestError(f"{document.source}: kind is {kind!r}; expected {known} ({GROUP_VERSION})")
    return KINDS[kind](body, document.source)


def load_workflow(path: str | Path) -> Workflow:
    """The one Workflow of a file (AgentPools beside it are checked too)."""
    return load_run(path)[0]


def load_run(path: str | Path, params: dict[str, str] | None = None
             ) -> tuple[Workflow, list[AgentPool]]:
    """The one Workflow of a file, with ``params`` given its parameters (every required one
    must be), and the AgentPools beside it, for ``agentainer run``."""
    workflows = []
    pools: list[AgentPool] = []
    problems: list[InvalidSpecError] = []
    for document in read_documents(path):
        try:
            model = parse(document)
        except InvalidSpecError as error:
            problems.append(error)
            continue
        if isinstance(model, Workflow):
            workflows.append(model)
        else:
            pools.append(model)
    if problems:
        raise problems[0] if len(problems) == 1 else InvalidSpecError(
            [p for error in problems for p in error.problems], str(path))
    if len(workflows) != 1:
        raise ManifestError(f"{path}: expected exactly one Workflow, found {len(workflows)}")
    try:
        workflow = with_params(workflows[0], params or {})
    except InvalidSpecError as error:
        raise InvalidSpecError(error.problems, str(path)) from None
    if missing := missing_params(workflow.spec):
        raise InvalidSpecError([Problem(p.path, f"{p.message}: give -p NAME=VALUE")
                                for p in missing], str(path))
    return workflow, pools
