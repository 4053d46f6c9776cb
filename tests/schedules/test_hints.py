"""Spec errors that name the fix (service/schedules/hints.py), on pydantic's real errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from service.runs.model import RunSpec
from service.schedules.hints import close_names, improve, unknown_type_message
from service.schedules.spec import NODE_TYPES


def errors_of(body: dict[str, Any], include_context: bool = True) -> list[dict[str, Any]]:
    """pydantic's errors for ``body`` as a run body, located under ``body`` as the API does."""
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(body)
    return [
        {**e, "loc": ["body", *e["loc"]]}
        for e in info.value.errors(include_url=False, include_context=include_context)
    ]


GROUPS = [{"name": "g", "lr": 0.1}]


@pytest.mark.parametrize("include_context", [True, False])
def test_a_mistyped_type_suggests_the_closest(include_context: bool) -> None:
    # (The hot paths drop the error's context: the tag is then read from the message.)
    body = {"groups": GROUPS, "schedule": {"type": "CosineAnealingLR", "T_max": 3}}
    [error] = improve(errors_of(body, include_context))
    assert error["loc"] == ["body", "schedule"]
    assert error["msg"].startswith(
        "unknown schedule type 'CosineAnealingLR'; did you mean 'CosineAnnealingLR'? "
    )
    assert "docs/schedules.md" in error["msg"] and len(error["msg"]) < 200


def test_a_nested_typo_and_a_case_slip() -> None:
    body = {"groups": GROUPS, "schedule": {"type": "SequentialLR", "milestones": [2],
            "schedulers": [{"type": "linearlr"}, {"type": "StepLR", "step_size": 2}]}}  # fmt: skip
    [error] = improve(errors_of(body))
    assert error["loc"][:4] == ["body", "schedule", "SequentialLR", "schedulers"]
    assert "did you mean 'LinearLR'?" in error["msg"]


def test_a_mistyped_argument_names_the_node_and_its_arguments() -> None:
    body = {"groups": GROUPS, "schedule": {"type": "StepLR", "step_size": 3, "gama": 0.5}}
    [error] = improve(errors_of(body))
    assert error == {
        "loc": ["body", "schedule", "StepLR", "gama"],
        "msg": "unknown argument 'gama' for StepLR; did you mean 'gamma'? "
        "(StepLR takes: step_size, gamma)",
    }


def test_an_argument_nothing_like_any_lists_them_without_a_guess() -> None:
    body = {"groups": GROUPS, "schedule": {"type": "StepLR", "step_size": 3, "verbose": True}}
    [error] = improve(errors_of(body))
    assert error["msg"] == "unknown argument 'verbose' for StepLR (StepLR takes: step_size, gamma)"


def test_a_node_without_a_type() -> None:
    [error] = improve(errors_of({"groups": GROUPS, "schedule": {"step_size": 3}}))
    assert error["msg"].startswith('a schedule node needs a "type"')


def test_a_bare_node_as_a_run_body_is_one_error_saying_so() -> None:
    errors = errors_of({"type": "StepLR", "step_size": 3, "gama": 0.5})
    assert len(errors) == 5  # groups, schedule missing; three unknown keys
    [error] = improve(errors)
    assert error["loc"] == ["body"]
    assert error["msg"].startswith(
        "this is a single schedule node (type 'StepLR'), not a run body: put it under \"schedule\""
    )


def test_other_errors_keep_pydantic_messages() -> None:
    errors = errors_of({"groups": [{"name": "g", "lr": -1}], "schedule": {"type": "StepLR",
                        "step_size": 0}})  # fmt: skip
    assert [e["msg"] for e in improve(errors)] == [e["msg"] for e in errors]


def test_close_names() -> None:
    assert close_names("steplr", list(NODE_TYPES)) == ["StepLR"]
    assert close_names("zzzz", list(NODE_TYPES)) == []
    assert "did you mean" not in unknown_type_message("zzzz")
