"""Rendering ``{{ ... }}`` templates: each form, values kept as data, literal braces, items."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller import templating
from controller.templating import Context, TemplateError, item_text, render


def context(item: str | None = "the quick brown fox") -> Context:
    return Context(
        workflow_name="wordcount",
        workflow_uid="0f8e-uid",
        item=item,
        outputs={"reduce": ["42"], "map": ["4", "5", "é"], "empty": []},
    )


@pytest.mark.parametrize(("text", "rendered"), [
    ("{{ steps.reduce.output }}", "42"),
    ("{{ steps.map.outputs }}", '["4", "5", "é"]'),
    ("{{ item }}", "the quick brown fox"),
    ("{{item}}", "the quick brown fox"),
    ("{{ workflow.name }}", "wordcount"),
    ("{{ workflow.uid }}", "0f8e-uid"),
    ('{{ "literal" }}', "literal"),
    ("total={{ steps.reduce.output }} of {{ workflow.name }}", "total=42 of wordcount"),
    ("no templates here", "no templates here"),
    ("{{ steps.empty.outputs }}", "[]"),
])
def test_each_template_form_renders_its_value(text: str, rendered: str) -> None:
    assert render(text, context()) == rendered


def test_literal_form_writes_opening_braces_that_are_not_rendered() -> None:
    assert render('echo {{ "{{" }} item }}', context()) == "echo {{ item }}"


@pytest.mark.parametrize("value", [
    "$(touch {marker})",
    "`touch {marker}`",
    "'; touch {marker}; echo '",
    "{{ workflow.name }}",
    '{{ "{{" }}',
    "\\n\\t%s %(x)s {0}",
])
def test_values_are_inserted_verbatim_and_never_evaluated(value: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    value = value.replace("{marker}", str(marker))
    ctx = Context(workflow_name="wf", workflow_uid="uid", item=value,
                  outputs={"fetch": [value]})

    assert render("{{ item }}", ctx) == value
    assert render("echo {{ steps.fetch.output }}", ctx) == f"echo {value}"
    assert not marker.exists()


def test_item_outside_a_fan_out_is_an_error_naming_parallel_items() -> None:
    with pytest.raises(TemplateError, match=r"parallel\.items"):
        render("{{ item }}", context(item=None))


def test_output_of_a_step_that_has_not_run_is_an_error_naming_the_step() -> None:
    with pytest.raises(TemplateError, match="step 'later' has no outputs yet"):
        render("{{ steps.later.output }}", context())


def test_unknown_template_is_an_error_listing_the_forms() -> None:
    with pytest.raises(TemplateError, match=r"unknown template '\{\{ env\.HOME \}\}'"):
        render("{{ env.HOME }}", context())


def test_unclosed_template_is_an_error_showing_how_to_write_a_literal() -> None:
    with pytest.raises(TemplateError, match="is not closed"):
        templating.references("echo {{ item")


@pytest.mark.parametrize(("item", "text"), [
    ("hello world", "hello world"),
    ("", ""),
    ("42", "42"),
    (42, "42"),
    (1.5, "1.5"),
    (True, "true"),
    (None, "null"),
    ([1, "two"], '[1, "two"]'),
    ({"word": "é", "count": 3}, '{"count": 3, "word": "é"}'),
])
def test_item_reads_as_itself_for_strings_and_as_json_otherwise(item: object, text: str) -> None:
    assert item_text(item) == text
