"""Stage identity: a stage reruns when anything that determines its output changed, and so does what reads it.

The stage processes are replaced by a fake that leaves what each command leaves when it succeeds (a cache
copied from `tiny_cache` and its --json report, a complete run.json, an eval JSON file), so these tests see
exactly which stages a plan runs, with which flags.
"""

import json
import os
import shutil
import sys

import pytest

from orchestration import runner as plan_runner
from orchestration.plan import PlanError, parse_plan
from orchestration.report import write_report
from orchestration.runner import describe_stages, run_plan
from orchestration.stages import stages_of
from orchestration.state import CHANGED, DONE, assess
from tests.conftest import SHAKESPEARE


class FakeStages:
    """Stands in for orchestration.runner.run_stage; `ran` lists the commands of the stages that ran."""

    def __init__(self, tiny_cache):
        from shared.reader import CacheReader

        self.tiny_cache, self.key = tiny_cache, CacheReader(tiny_cache).manifest.cache_key
        self.ran: list[list[str]] = []

    def __call__(self, command, log_path, env, on_line=None, poll_s=0.5):
        self.ran.append(command)
        out = command[command.index("--out") + 1]
        with open(log_path, "w") as log:
            if "cli.kdcache" in command:
                shutil.copytree(self.tiny_cache, out)
                log.write(json.dumps({"status": "built", "cache": out, "cache_key": self.key}) + "\n")
            elif "run" in command:
                os.makedirs(out, exist_ok=True)
                with open(os.path.join(out, "run.json"), "w") as f:
                    json.dump({"status": "complete"}, f)
            else:
                os.makedirs(os.path.dirname(out), exist_ok=True)
                with open(out, "w") as f:
                    json.dump({"metrics": {"ppl": {"ppl": 10.0}}}, f)
        return 0

    def stage_ids(self, plan) -> set[str]:
        by_out = {}
        for st in stages_of(plan):
            by_out[st.outputs.get("run") or st.outputs.get("eval") or st.id] = st.id
        found = set()
        for command in self.ran:
            out = command[command.index("--out") + 1]
            found.add(by_out.get(out, "cache:" + os.path.basename(out).split("__", 1)[1].rsplit("-", 1)[0]))
        return found


def spec(teacher, tmp_path, **train):
    return {"name": "ident", "teacher": {"model": str(teacher)},
            "data": {"dataset": str(SHAKESPEARE), "limit": 24, "max_length": 64},
            "cache": {"top_k": 8, "engine": "hf", "dtype": "float32"},
            "train": {"steps": 2, "batch_tokens": 256, "lr": 0.001, "loss": "fkl", **train},
            "students": {"a": {"keep_layers": 1}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]],
            "baselines": ["s"], "eval": {"metrics": ["ppl"]}, "cache_root": str(tmp_path / "caches")}


@pytest.fixture
def fake(monkeypatch, tiny_cache):
    stages = FakeStages(tiny_cache)
    monkeypatch.setattr(plan_runner, "run_stage", stages)
    return stages


def test_changed_loss_reruns_the_stages_it_reaches_and_the_report_states_what_ran(tmp_path, tiny_gpt2_dir, fake):
    """Issue 13 item 1: only train.loss changes (fkl -> jsd). The dry run names the change, the KD train stages and
    everything downstream rerun (train stages with --overwrite), the CE baseline, the teacher's cache and evals
    do not, and the report describes the settings the results were produced with."""
    out = str(tmp_path / "out")
    fkl = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=out)
    run_plan(fkl, log=lambda m: None)
    assert len(fake.ran) == len(stages_of(fkl))
    fake.ran.clear()
    run_plan(fkl, log=lambda m: None)
    assert fake.ran == []  # nothing changed: nothing reruns

    jsd = parse_plan(spec(tiny_gpt2_dir, tmp_path, loss="jsd"), out=out)
    # the report on disk is built from the stages' markers, never from the plan now given
    assert write_report(jsd, stages_of(jsd))["train"]["loss"] == "fkl"
    rows = {r["stage"]: r for r in describe_stages(jsd)}
    row = rows["train:teacher__a"]
    assert row["state"] == CHANGED and row["reasons"] == ["train.loss fkl -> jsd"]
    assert "--overwrite" in rows["train:teacher__a"]["command"].split()
    assert "train.loss fkl -> jsd" in rows["train:teacher__a__s"]["reasons"]  # its own change, and after its input
    assert any("cache:teacher__a" in reason for reason in rows["train:teacher__a__s"]["reasons"])
    assert rows["cache:teacher__a"]["state"] == CHANGED
    assert rows["cache:teacher__a"]["reasons"][0].startswith("input model (from train:teacher__a) ")
    for unchanged in ("cache:teacher", "train:ce-s", "eval:teacher", "eval:ce-s"):
        assert rows[unchanged]["state"] == DONE, rows[unchanged]

    run_plan(jsd, log=lambda m: None)
    reran = {"train:teacher__a", "train:teacher__s", "train:teacher__a__s", "cache:teacher__a", "eval:teacher__a",
             "eval:teacher__s", "eval:teacher__a__s"}
    assert fake.stage_ids(jsd) == reran
    assert all("--overwrite" in c and "--resume" not in c for c in fake.ran if "run" in c and "cli.kdtrain" in c)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["train"]["loss"] == "jsd"
    settings = {r["node"]: r["train_settings"] for r in report["rows"]}
    assert settings["teacher>a>s"]["loss"] == "jsd" and settings["ce:s"]["loss"] == "ce"
    # the retrained assistant's cache went to a new folder: the old one (another plan may use it) is kept
    assert len(os.listdir(tmp_path / "caches")) == 3


def test_a_stage_whose_input_cache_changed_reruns_naming_it(tmp_path, tiny_gpt2_dir, fake):
    """Same settings, but the cache it trained on now has another key: the stage reruns, and says why."""
    plan = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=str(tmp_path / "out"))
    run_plan(plan, log=lambda m: None)
    stages = {st.id: st for st in stages_of(plan)}
    known = {}
    for st in stages.values():
        a = assess(plan, st, known)
        assert a.state == DONE
        known[st.id] = a.output
    known["cache:teacher__a"] = {**known["cache:teacher__a"], "output": "f" * 64}
    a = assess(plan, stages["train:teacher__a__s"], known)
    assert a.state == CHANGED and "--overwrite" in a.command
    assert a.reasons == [f"input cache (from cache:teacher__a) {fake.key[:21]}... -> {'f' * 21}..."]


def test_a_rewritten_teacher_folder_reruns_its_cache_stage_into_a_new_folder(tmp_path, tiny_gpt2_dir, fake):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_gpt2_dir, teacher)
    plan = parse_plan(spec(teacher, tmp_path), out=str(tmp_path / "out"))
    run_plan(plan, log=lambda m: None)
    before = {r["stage"]: r for r in describe_stages(plan)}
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0.2}))  # other weights or config
    after = {r["stage"]: r for r in describe_stages(plan)}
    assert after["cache:teacher"]["state"] == CHANGED
    assert after["cache:teacher"]["reasons"][0].startswith("input model folder:")
    assert after["cache:teacher"]["cache"] != before["cache:teacher"]["cache"]


def test_a_stage_started_with_other_settings_is_overwritten_not_resumed(tmp_path, tiny_gpt2_dir, fake):
    """A train stage killed mid-run (started marker, no done marker) whose settings then changed: resuming
    would continue the other run, so it runs with --overwrite."""
    out = str(tmp_path / "out")
    plan = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=out)
    run_plan(plan, log=lambda m: None)
    stage = next(st for st in stages_of(plan) if st.id == "train:teacher__s")
    os.replace(stage.marker, stage.started_marker)  # as if it had been killed before it finished
    row = next(r for r in describe_stages(plan) if r["stage"] == stage.id)
    assert row["state"] == "interrupted" and "--resume" in row["command"].split()
    steps = parse_plan(spec(tiny_gpt2_dir, tmp_path, steps=3), out=out)
    row = next(r for r in describe_stages(steps) if r["stage"] == stage.id)
    assert row["state"] == CHANGED and row["reasons"] == ["started with other settings or inputs: train.steps 2 -> 3"]
    assert "--overwrite" in row["command"].split() and "--resume" not in row["command"].split()


def test_a_marker_without_identity_reruns_its_stage(tmp_path, tiny_gpt2_dir, fake):
    """A done-marker written before stage identities (only {"stage": ...}) cannot prove what its stage ran with."""
    plan = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=str(tmp_path / "out"))
    run_plan(plan, log=lambda m: None)
    stage = next(st for st in stages_of(plan) if st.id == "train:ce-s")
    with open(stage.marker, "w") as f:
        json.dump({"stage": stage.id}, f)
    row = next(r for r in describe_stages(plan) if r["stage"] == stage.id)
    assert row["state"] == CHANGED and row["reasons"] == ["its marker records no settings (written by an older kdcache)"]


def test_a_selected_stage_whose_inputs_are_not_done_is_refused(tmp_path, tiny_gpt2_dir, fake):
    plan = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(PlanError, match=r"stage train:teacher__s needs cache:teacher done first"):
        run_plan(plan, log=lambda m: None, only={"train:teacher__s"})
    assert fake.ran == []


def test_a_stage_that_exits_0_without_its_output_is_not_marked_done(tmp_path, tiny_gpt2_dir, monkeypatch, tiny_cache):
    """A train stage whose process exits 0 but leaves no complete run.json: no done-marker, the plan stops."""
    fake = FakeStages(tiny_cache)

    def no_run_json(command, log_path, env, on_line=None, poll_s=0.5):
        rc = fake(command, log_path, env)
        if "cli.kdtrain" in command and "run" in command:
            os.remove(os.path.join(command[command.index("--out") + 1], "run.json"))
        return rc

    monkeypatch.setattr(plan_runner, "run_stage", no_run_json)
    plan = parse_plan(spec(tiny_gpt2_dir, tmp_path), out=str(tmp_path / "out"))
    with pytest.raises(PlanError, match=r"stage train:teacher__a exited 0 but left no complete output"):
        run_plan(plan, log=lambda m: None)
    stage = next(st for st in stages_of(plan) if st.id == "train:teacher__a")
    assert not os.path.exists(stage.marker) and os.path.exists(stage.started_marker)


def test_dry_run_prints_whole_commands_with_placeholders_resolved_or_named(tmp_path, tiny_gpt2_dir, fake):
    """Issue 17: --dry-run prints every stage's whole command; what only an earlier stage can tell is named."""
    import yaml
    from typer.testing import CliRunner

    from cli.kdtrain import app

    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec(tiny_gpt2_dir, tmp_path)))
    out = str(tmp_path / "out")
    res = CliRunner().invoke(app, ["chain", str(path), "--dry-run", "--out", out])
    assert res.exit_code == 0, res.output
    commands, current = {}, None
    for line in res.stdout.splitlines():
        if not line.startswith("    "):
            current = line.split(": ")[0]
        elif line.startswith("    $ "):
            commands[current] = line[len("    $ "):]
    assert len(commands) == len(stages_of(parse_plan(spec(tiny_gpt2_dir, tmp_path), out=out))), res.stdout
    first = commands["train:teacher__a"]
    assert first.split()[:4] == [sys.executable, "-P", "-m", "cli.kdtrain"] and first.endswith("--resume")
    assert f"--teacher {tiny_gpt2_dir} " in first and "{" not in first  # a local teacher folder: known now
    assert f"--cache {tmp_path / 'caches'}/ident__teacher-" in first  # the folder cache:teacher asks for
    assert "--cache '<the cache cache:teacher__a reports>'" in commands["train:teacher__a__s"]
    assert "--out '<a folder named by the identity of this stage, known once train:teacher__a ran>'" in commands[
        "cache:teacher__a"]
    assert "runs after cache:teacher, cache:teacher__a" in res.stdout

    run_plan(parse_plan(spec(tiny_gpt2_dir, tmp_path), out=out), log=lambda m: None)
    path.write_text(yaml.safe_dump(spec(tiny_gpt2_dir, tmp_path, loss="jsd")))
    res = CliRunner().invoke(app, ["chain", str(path), "--dry-run", "--out", out])
    assert res.exit_code == 0, res.output
    assert "train:teacher__a: reruns\n    - train.loss fkl -> jsd\n    $ " in res.stdout
    assert "cache:teacher: done: " in res.stdout and "eval:ce-s: done\n" in res.stdout
    recorded = json.loads((tmp_path / "out" / "stages" / "cache-teacher.done.json").read_text())["cache"]
    rerun = next(line for line in res.stdout.splitlines() if "--out " + out + "/runs/teacher__a " in line)
    assert f"--cache {recorded} " in rerun and rerun.endswith("--overwrite") and "<" not in rerun


def test_a_teacher_folder_is_identified_by_its_files_not_the_notes_tools_keep_there(tmp_path, tiny_gpt2_dir):
    """kdcache build keeps the teacher's weights hash in <teacher>/.kdcache-weights-sha256.json: writing it must
    not change the teacher's identity (the plan would then rebuild the cache it just built)."""
    from orchestration.identity import local_identity

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_gpt2_dir, teacher)
    before = local_identity(str(teacher))
    (teacher / ".kdcache-weights-sha256.json").write_text("{}")
    (teacher / ".cache").mkdir()
    (teacher / ".cache" / "note").write_text("x")
    assert local_identity(str(teacher)) == before
    (teacher / "extra.txt").write_text("x")
    assert local_identity(str(teacher)) != before
