"""The run's decisions about a step before it starts, as pure functions."""

from __future__ import annotations

from controller.engine.steps import quote, topological


def test_steps_are_taken_up_after_every_step_they_depend_on() -> None:
    dependencies = {"report": ["fix", "publish"], "fix": ["review"], "publish": ["review"],
                    "review": ["work"], "work": ["plan"], "plan": []}
    order = topological(dependencies)
    assert sorted(order) == sorted(dependencies)
    for name, needs in dependencies.items():
        assert all(order.index(need) < order.index(name) for need in needs), order


def test_a_long_output_is_quoted_by_its_start_and_its_length() -> None:
    assert quote("short") == "'short'"
    assert quote("x" * 500) == repr("x" * 200) + " (500 characters)"
