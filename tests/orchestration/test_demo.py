"""The embedded demo plan: valid, the stages the README describes, same settings for every student."""

from typer.testing import CliRunner

from cli.kdtrain import app
from orchestration.demo import DEMO_PLAN
from orchestration.plan import parse_plan
from orchestration.stages import stages_of

runner = CliRunner()


def test_demo_plan_has_sequential_parallel_and_ce_baseline(tmp_path):
    plan = parse_plan(DEMO_PLAN, out=str(tmp_path))
    ids = [s.id for s in stages_of(plan)]
    for stage in ("cache:teacher", "train:teacher__assistant", "cache:teacher__assistant",
                  "train:teacher__assistant__student", "train:teacher__student", "train:ce-student",
                  "eval:teacher", "eval:ce-student"):
        assert stage in ids, (stage, ids)
    trains = [s for s in stages_of(plan) if s.id.startswith("train:")]
    # every student trains the same number of steps on the same token budget, KD or CE
    for option in ("--steps", "--batch-tokens", "--lr", "--eval-fraction", "--seed"):
        values = {s.command[s.command.index(option) + 1] for s in trains}
        assert len(values) == 1, (option, values)


def test_demo_dry_run_lists_stages_and_runs_nothing(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--dry-run", "--out", str(out)])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines and all(line.endswith(": to run") for line in lines), res.output
    assert not (out / "caches").exists() and not (out / "runs").exists()


def test_demo_measures_each_student_as_the_teachers_draft(tmp_path):
    """Issue 18: the demo's report has the acceptance column; every eval stage gets the teacher cache and the teacher
    (the embedded default, a folder only once its cache stage has resolved it)."""
    plan = parse_plan(DEMO_PLAN, out=str(tmp_path))
    evals = [s for s in stages_of(plan) if s.kind == "eval"]
    assert len(evals) == 5
    for st in evals:
        assert "acceptance" in st.settings["metrics"]
        assert st.settings["teacher"] == "{teacher_folder}" and st.settings["cache"] == "{cache:teacher}"
        assert st.inputs["teacher"] == ("teacher", "cache:teacher")
