"""docs/api.md is what the models say (scripts/api_reference.py), and says it as users write it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "api_reference.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_reference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api_reference = load_script()
RENDERED: str = api_reference.render()


def row(field: str, section: str) -> str:
    """The table row of ``field`` in the section of model ``section``."""
    text = RENDERED.split(f"\n### {section}\n", 1)[1].split("\n### ", 1)[0]
    return next(line for line in text.splitlines() if line.startswith(f"| `{field}` |"))


def test_api_doc_matches_the_models() -> None:
    assert api_reference.API_DOC.read_text() == RENDERED, \
        "docs/api.md is stale: run `make api-docs`"


def test_check_fails_on_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "api.md"
    stale.write_text(RENDERED + "edited by hand\n")
    monkeypatch.setattr(api_reference, "API_DOC", stale)
    assert api_reference.main(["--check"]) == 1
    assert "stale: run `make api-docs`" in capsys.readouterr().err
    stale.write_text(RENDERED)
    assert api_reference.main(["--check"]) == 0


def test_enums_list_their_values() -> None:
    assert "| Stop \\| Terminate |" in row("shutdown", "WorkflowSpec")
    assert "Stopped" in row("phase", "WorkflowStatus")


def test_fields_appear_as_users_write_them() -> None:
    assert row("ttlSecondsAfterFinished", "WorkflowSpec")
    assert "[[]Step](#step)" in row("finally", "WorkflowSpec")
    assert "required" in row("steps", "WorkflowSpec")
    assert "map[string]string" in row("nodeSelector", "PodOptions")
    assert "`timeout_seconds`" not in RENDERED


def test_constraints_and_defaults_are_shown() -> None:
    assert "0 to 100" in row("limit", "RetryPolicy")
    assert "1 to 200 items" in row("steps", "WorkflowSpec")
    assert "`OnSuccess`" in row("cleanup", "WorkflowSpec")
    assert "a DNS-1123 label" in row("name", "Step")


def test_every_linked_model_has_a_section() -> None:
    for name in ("Step", "EnvVar", "KeyRef", "Toleration", "StepStatus", "AgentStatus",
                 "Condition", "AgentPoolSpec", "AgentPoolStatus"):
        assert RENDERED.count(f"\n### {name}\n") == 1
