"""Reading manifest files: YAML that PyYAML would read but kubectl refuses is refused here too, in
one line naming where, and in bounded time however the file is made."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from controller.errors import ManifestError
from controller.manifests import MAX_ALIASED_NODES, read_documents

HEAD = """\
apiVersion: agentainer.dev/v1alpha1
kind: Workflow
metadata: {name: laughs}
spec:
  steps:
  - name: a
    image: agentainer/busybox:latest
    parallel:
"""

# Nine levels of nine aliases each: a few hundred bytes that stand for 9**9 items.
ALIAS_BOMB = HEAD + "      items: &i [&a0 [x, x, x, x, x, x, x, x, x]" + "".join(
    f", &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]" for level in range(1, 9)) + "]\n"


def read(tmp_path: Path, text: str) -> list[object]:
    path = tmp_path / "workflow.yaml"
    path.write_text(text, encoding="utf-8")
    return [document.body for document in read_documents(path)]


def refusal(tmp_path: Path, text: str) -> str:
    with pytest.raises(ManifestError) as caught:
        read(tmp_path, text)
    return str(caught.value)


@pytest.mark.timeout(10)
def test_aliases_that_expand_past_the_bound_are_refused_at_once_with_their_line(
        tmp_path: Path) -> None:
    started = time.monotonic()
    message = refusal(tmp_path, ALIAS_BOMB)
    assert time.monotonic() - started < 2
    assert "excessive aliasing" in message
    assert f"more than {MAX_ALIASED_NODES:,} nodes" in message
    assert "(line 9, column" in message


@pytest.mark.parametrize("items", [
    pytest.param("&r [*r]", id="list-in-itself"),
    pytest.param("[&m {a: [b, *m]}]", id="mapping-in-itself"),
    pytest.param("&o [[[*o]]]", id="deeper-in-itself"),
])
def test_an_alias_inside_the_node_it_names_is_refused_not_recursed_into(
        tmp_path: Path, items: str) -> None:
    message = refusal(tmp_path, HEAD + f"      items: {items}\n")
    assert "is inside the node" in message and "would contain itself" in message
    assert "(line 9, column" in message


def test_aliases_of_all_documents_of_a_file_count_together(tmp_path: Path) -> None:
    # &b stands for 10,101 nodes (written with aliases itself: a short line to read).
    big = f"&c [{', '.join(['x'] * 100)}], " + ", ".join(["*c"] * 99)
    aliases = ", ".join(["*b"] * (MAX_ALIASED_NODES // 10_101 // 2 + 1))
    document = HEAD + f"      items: [&b [{big}], {aliases}]\n"
    assert len(read(tmp_path, document)) == 1  # about half the bound
    message = refusal(tmp_path, document + "---\n" + document)
    assert "excessive aliasing" in message and "(line 19, column" in message  # the second document's


def test_stdin_is_read_with_the_same_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO(ALIAS_BOMB))
    with pytest.raises(ManifestError, match="^stdin: .*excessive aliasing"):
        read_documents("-")


def test_aliases_and_merge_keys_within_the_bound_are_read_as_kubectl_reads_them(
        tmp_path: Path) -> None:
    [body] = read(tmp_path, HEAD.replace("    parallel:\n", "") + """\
    env: &env [{name: A, value: "1"}]
    pod: &pod {nodeSelector: {disk: ssd}, runAsUser: 1000}
  - name: b
    image: agentainer/busybox:latest
    env: *env
    pod: {<<: *pod, runAsUser: 2000}
""")
    assert isinstance(body, dict)
    first, second = body["spec"]["steps"]
    assert second["env"] == first["env"] == [{"name": "A", "value": "1"}]
    assert second["pod"] == {"nodeSelector": {"disk": "ssd"}, "runAsUser": 2000}


@pytest.mark.parametrize(("text", "refused"), [
    pytest.param(HEAD.replace("    parallel:\n", "    name: b\n"),
                 "(line 8, column 5): mapping key 'name' already defined at line 6",
                 id="key-of-a-step"),
    pytest.param(HEAD.replace("metadata: {name: laughs}", "metadata: {name: a, 'name': b}"),
                 "(line 3, column 21): mapping key 'name' already defined at line 3",
                 id="key-quoted-the-second-time"),
    pytest.param(HEAD + "      replicas: 2\nspec: {}\n",
                 "(line 10, column 1): mapping key 'spec' already defined at line 4",
                 id="top-level-key"),
    pytest.param('{"apiVersion": "v1", "kind": "Workflow", "kind": "AgentPool"}',
                 "(line 1, column 42): mapping key 'kind' already defined at line 1",
                 id="json"),
])
def test_a_mapping_key_given_twice_is_refused_naming_the_key_and_its_lines(
        tmp_path: Path, text: str, refused: str) -> None:
    assert refused in refusal(tmp_path, text)


def test_a_whole_number_written_with_a_point_is_the_integer_as_kubectl_sends_it(
        tmp_path: Path) -> None:
    """kubectl's YAML becomes JSON in which 5.0 is 5, an integer to the schema: the same file
    is read the same here. A fraction stays one (and an integer field refuses it)."""
    [body] = read(tmp_path, HEAD + "      replicas: 2.0\n    timeoutSeconds: 5.5\n"
                  "    retries: {limit: 3.0, backoffSeconds: .inf}\n")
    assert isinstance(body, dict)
    step = body["spec"]["steps"][0]
    assert step["parallel"]["replicas"] == 2 and isinstance(step["parallel"]["replicas"], int)
    assert step["timeoutSeconds"] == 5.5
    assert step["retries"]["limit"] == 3 and isinstance(step["retries"]["limit"], int)
    assert step["retries"]["backoffSeconds"] == float("inf")
