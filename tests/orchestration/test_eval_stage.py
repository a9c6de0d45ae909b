"""A plan's eval stages: acceptance gets the teacher cache and the plan's teacher (an input of the stage's identity,
by its weights); grounding reads the plan's data like the other generation metrics."""

import pytest

from orchestration import runner as plan_runner
from orchestration.identity import typed_settings, validate
from orchestration.plan import parse_plan
from orchestration.runner import run_plan
from orchestration.stages import TEACHER_FOLDER, stages_of
from orchestration.state import DONE, assess
from tests.conftest import SHAKESPEARE
from tests.orchestration.test_identity import FakeStages


def plan_of(teacher, tmp_path, metrics, **data):
    return parse_plan({"name": "ev", "teacher": {"model": str(teacher)},
                       "data": {"dataset": str(SHAKESPEARE), "limit": 24, "max_length": 64, **data},
                       "cache": {"top_k": 8, "engine": "hf", "dtype": "float32"},
                       "train": {"steps": 2, "batch_tokens": 256, "lr": 0.001},
                       "students": {"a": {"keep_layers": 1}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]],
                       "baselines": ["s"], "eval": {"metrics": metrics}, "cache_root": str(tmp_path / "caches")},
                      out=str(tmp_path / "out"))


def evals(plan):
    return [st for st in stages_of(plan) if st.kind == "eval"]


def test_acceptance_gets_the_teacher_cache_and_the_teacher_folder(tmp_path, tiny_gpt2_dir):
    plan = plan_of(tiny_gpt2_dir, tmp_path, ["acceptance"])
    assert len(evals(plan)) == 5
    for st in evals(plan):
        command = st.command
        assert command[command.index("--teacher") + 1] == str(tiny_gpt2_dir)
        assert command[command.index("--cache") + 1] == "{cache:teacher}"
        assert st.inputs["teacher"] == ("teacher", "cache:teacher") and st.inputs["cache"] == ("stage", "cache:teacher")
        validate(st, typed_settings(st))  # EvalConfig takes it (acceptance needs --cache)


def test_acceptance_teacher_from_the_hub_waits_for_its_cache_stage(tmp_path):
    plan = plan_of("smollm2-135m", tmp_path, ["ppl", "acceptance"])
    for st in evals(plan):
        assert st.settings["teacher"] == TEACHER_FOLDER


def test_without_acceptance_no_teacher_is_passed(tmp_path, tiny_gpt2_dir):
    for st in evals(plan_of(tiny_gpt2_dir, tmp_path, ["ppl", "agreement"])):
        assert "--teacher" not in st.command and "teacher" not in st.inputs


def test_grounding_reads_the_plans_prompt_and_context_fields(tmp_path, tiny_gpt2_dir):
    plan = plan_of(tiny_gpt2_dir, tmp_path, ["grounding"], prompt_field="instruction", response_field="response",
                   input_field="context")
    for st in evals(plan):
        assert {k: st.settings.get(k) for k in ("dataset", "prompt_field", "input_field")} == {
            "dataset": str(SHAKESPEARE), "prompt_field": "instruction", "input_field": "context"}
        validate(st, typed_settings(st))


@pytest.fixture
def fake(monkeypatch, tiny_cache):
    stages = FakeStages(tiny_cache)
    monkeypatch.setattr(plan_runner, "run_stage", stages)
    return stages


def test_the_teachers_weights_are_part_of_an_acceptance_stages_identity(tmp_path, tiny_gpt2_dir, fake):
    """The teacher is identified by its weights (the teacher cache's record), not by its folder's path."""
    plan = plan_of(tiny_gpt2_dir, tmp_path, ["ppl", "acceptance"])
    run_plan(plan, log=lambda m: None)
    known = {}
    for st in stages_of(plan):
        a = assess(plan, st, known)
        assert a.state == DONE, (st.id, a.reasons)
        known[st.id] = a.output
        if st.kind == "eval":
            assert a.inputs["teacher"] == known["cache:teacher"]["teacher"] and a.inputs["teacher"]
            assert "teacher" not in a.settings  # the path is not the identity; the weights are
            assert a.values["teacher"] == str(tiny_gpt2_dir)
