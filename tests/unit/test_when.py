"""Conditions on steps (``when``, Tekton's shape): a step runs only if every ``input`` is
``in`` (or ``notin``) its ``values``, else it is Skipped saying which did not hold; a step after
a skipped one still runs unless it reads the skipped step's output. On the fake backend."""

from __future__ import annotations

from typing import Any

import pytest

from controller.models import StepPhase, WorkflowPhase
from tests.conftest import workflow_doc
from tests.unit.test_models import assert_reported, problems_of
from tests.unit.fake_backend import Behaviour
from tests.unit.test_engine import by_step, run, with_uid


def reviewed(verdict: str) -> tuple[dict[str, Any], Any]:
    document = with_uid(workflow_doc(
        {"name": "review"},
        {"name": "fix", "dependsOn": ["review"],
         "when": [{"input": "{{ steps.review.output }}", "operator": "in",
                   "values": ["retry", "{{ params.also }}"]}]},
        {"name": "publish", "dependsOn": ["review"],
         "when": [{"input": "{{ steps.review.output }}", "operator": "notin",
                   "values": ["retry"]}]},
        {"name": "notify", "dependsOn": ["fix", "publish"]},
        {"name": "report", "dependsOn": ["fix"],
         "env": [{"name": "FIX", "value": "{{ steps.fix.output }}"}]},
        params=[{"name": "also", "value": "again"}]))
    return document, by_step({"review": Behaviour(stdout=verdict)})


@pytest.mark.parametrize("verdict", ["retry", "again", "done"])
def test_conditions_choose_which_steps_run_and_say_why_the_others_did_not(verdict: str) -> None:
    status, fake = run(*reviewed(verdict))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    phases = {step.name: step.phase for step in status.steps}
    ran = {a.step for a in fake.started}  # type: ignore[attr-defined]
    retry = verdict in ("retry", "again")
    assert phases["fix"] is (StepPhase.SUCCEEDED if retry else StepPhase.SKIPPED)
    assert phases["publish"] is (StepPhase.SKIPPED if verdict == "retry" else StepPhase.SUCCEEDED)
    assert phases["notify"] is StepPhase.SUCCEEDED  # after a skipped step: it still runs
    assert ("notify" in ran) and ("fix" in ran) == retry
    if not retry:
        assert status.step("fix").message == \
            "skipped: when[0]: 'done' is not in ['retry', 'again']"
        # It reads the skipped step's output: skipped too, saying why.
        assert status.step("report").phase is StepPhase.SKIPPED
        assert status.step("report").message == \
            "skipped: it reads the output of step fix, which was skipped"
        assert status.progress == "3/3"
    if verdict == "retry":
        assert status.step("publish").message == "skipped: when[0]: 'retry' is in ['retry']"


@pytest.mark.parametrize(("when", "path", "words"), [
    ({"input": "x", "operator": "equals", "values": ["x"]}, "spec.steps[1].when[0].operator",
     "'in' or 'notin'"),
    ({"input": "x", "operator": "in", "values": []}, "spec.steps[1].when[0].values",
     "at least 1"),
    ({"input": "{{ steps.later.output }}", "operator": "in", "values": ["x"]},
     "spec.steps[1].when[0].input", "does not depend on 'later'"),
    ({"input": "{{ $(rm -rf /) }}", "operator": "in", "values": ["x"]},
     "spec.steps[1].when[0].input", "unknown template"),
], ids=["operator", "no-values", "not-upstream", "no-expressions"])
def test_conditions_are_checked_before_anything_runs(when: dict[str, Any], path: str,
                                                     words: str) -> None:
    document = workflow_doc({"name": "review"}, {"name": "fix", "when": [when]},
                            {"name": "later"})
    assert_reported(problems_of(document), path, (words,))


def test_a_step_that_may_fail_lets_the_others_run_and_read_how_it_ended() -> None:
    document = with_uid(workflow_doc(
        {"name": "lint", "continueOn": {"failed": True}},
        {"name": "report", "dependsOn": ["lint"],
         "env": [{"name": "LINT", "value": "{{ steps.lint.phase }}"}]},
        {"name": "fix", "dependsOn": ["lint"],
         "when": [{"input": "{{ steps.lint.phase }}", "operator": "in", "values": ["Failed"]}]},
        {"name": "quote", "dependsOn": ["lint"],
         "env": [{"name": "OUT", "value": "{{ steps.lint.output }}"}]}))
    status, fake = run(document, by_step({"lint": Behaviour(exit_code=1, stdout="3 errors")}))

    assert status.phase is WorkflowPhase.SUCCEEDED, status.message
    assert status.step("lint").phase is StepPhase.FAILED
    (report,) = [a for a in fake.started if a.step == "report"]  # type: ignore[attr-defined]
    assert report.spec.env["LINT"] == "Failed"
    assert status.step("fix").phase is StepPhase.SUCCEEDED
    assert status.step("quote").message == \
        "skipped: it reads the output of step lint, which failed"


def test_without_continue_on_a_failure_still_fails_the_workflow() -> None:
    document = with_uid(workflow_doc({"name": "lint"}, {"name": "report"}))
    status, _ = run(document, by_step({"lint": Behaviour(exit_code=1)}))
    assert status.phase is WorkflowPhase.FAILED
    assert status.step("report").phase is StepPhase.SKIPPED


def test_the_outcome_is_a_condition_unknown_while_running_then_true_or_false() -> None:
    import asyncio

    from controller.store import MemoryStore
    from tests.unit.fake_backend import FakeBackend
    from tests.unit.test_engine import new_run, scenario, until

    fake = FakeBackend(by_step({"slow": Behaviour(0.1), "bad": Behaviour(exit_code=1)}))

    async def play() -> tuple[list[Any], Any, Any]:
        workflow_run = new_run(with_uid(workflow_doc({"name": "slow"})), fake, MemoryStore())
        execution = asyncio.ensure_future(workflow_run.execute())
        await until(lambda: bool(fake.running()))
        during = [(c.type, c.status.value) for c in workflow_run.status.conditions]
        done = await execution
        failed = await new_run(with_uid(workflow_doc({"name": "bad"})), fake,
                               MemoryStore()).execute()
        return during, done, failed

    during, done, failed = scenario(play())
    assert during == [("Succeeded", "Unknown")]
    assert [(c.type, c.status.value) for c in done.conditions] == [
        ("Completed", "True"), ("Succeeded", "True")]
    assert [(c.type, c.status.value) for c in failed.conditions] == [
        ("Completed", "True"), ("Succeeded", "False")]
