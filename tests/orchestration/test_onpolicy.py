"""Plans with a made teacher and on-policy rounds: parsing, the stages and their chained identities, end to end."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from cli.kdtrain import app
from orchestration.checks import check_plan
from orchestration.plan import PlanError, load_plan, parse_plan
from orchestration.runner import describe_stages
from orchestration.stages import stages_of
from orchestration.state import assess, predicted_output
from tests.conftest import GSM8K, REPO_ROOT

runner = CliRunner()
EXAMPLES = REPO_ROOT / "examples"


def plan_of(tmp_path, **over):
    raw = {"name": "op", "teacher": {"make": {"dataset": str(GSM8K), "prompt_field": "question",
                                              "response_field": "answer", "steps": 5}},
           "data": {"dataset": str(GSM8K), "prompt_field": "question", "response_field": "answer", "limit": 20},
           "train": {"steps": 8, "seed": 3}, "students": {"s": {"keep_layers": 1}}, "paths": [["s"]],
           "onpolicy": {"rounds": 2, "mix": 0.5, "samples": 2}}
    raw.update(over)
    return parse_plan(raw, out=str(tmp_path / "out"))


def by_id(plan):
    return {st.id: st for st in stages_of(plan)}


def test_a_made_teacher_is_the_first_stage_and_the_teacher_caches_input(tmp_path):
    plan = plan_of(tmp_path)
    stages = stages_of(plan)
    assert stages[0].id == "make:teacher"
    assert stages[0].settings["out"] == os.path.join(str(tmp_path / "out"), "teacher")
    assert plan.teacher["model"] == stages[0].settings["out"] and stages[0].settings["steps"] == 5
    assert by_id(plan)["cache:teacher"].inputs["model"] == ("stage", "make:teacher")
    # the teacher holds out the rows every model is evaluated on: the plan's train.eval_fraction
    assert stages[0].settings["eval_fraction"] == plan.train.get("eval_fraction", 0.05)
    made = stages_of(plan_of(tmp_path, train={"steps": 8, "eval_fraction": 0.2}))[0]
    assert "--eval-fraction 0.2" in " ".join(made.command)
    given = plan_of(tmp_path, teacher={"model": "gpt2", "make": {"dataset": str(GSM8K)}})
    assert given.teacher == {"model": "gpt2"} and "make:teacher" not in by_id(given)  # a given model wins


def test_rounds_are_generate_cache_train_each_from_the_round_before(tmp_path):
    plan = plan_of(tmp_path)
    ids = [st.id for st in stages_of(plan)]
    rounds = ["generate:onpolicy-s@1", "cache:onpolicy-s@1", "train:onpolicy-s@1",
              "generate:onpolicy-s@2", "cache:onpolicy-s@2", "train:onpolicy-s"]
    assert [i for i in ids if i in rounds] == rounds
    assert {"eval:onpolicy-s", "exposure:teacher__s", "exposure:ce-s", "exposure:onpolicy-s"} <= set(ids)
    st = by_id(plan)
    first, second = st["generate:onpolicy-s@1"], st["generate:onpolicy-s@2"]
    assert first.settings["keep_layers"] == 1 and first.settings["round"] == 1 and first.settings["num_samples"] == 2
    assert first.settings["prompts"] == "train" and first.settings["seed"] == 3
    assert second.inputs["model"] == ("stage", "train:onpolicy-s@1") and "keep_layers" not in second.settings
    cache = st["cache:onpolicy-s@2"]
    assert cache.inputs["dataset"] == ("stage", "generate:onpolicy-s@2")
    assert cache.settings["ids_field"] == "token_ids" and "round 2" in cache.settings["samples_from"]
    last = st["train:onpolicy-s"]
    assert last.settings["steps"] == 4 and last.settings["mix"] == 0.5  # train.steps 8 split into 2 rounds
    assert last.settings["student"].endswith("onpolicy-s@1") and "student_from_teacher" not in last.settings
    assert last.inputs["mix_cache"] == ("stage", "cache:teacher") and last.inputs["student"] == (
        "stage", "train:onpolicy-s@1")
    assert st["train:onpolicy-s@1"].settings["student_from_teacher"] is True


def test_identities_are_chained_round_to_round(tmp_path):
    def identities(plan):
        known, out = {"make:teacher": {"output": "m"}, "cache:teacher": {"output": "k", "teacher": "w", "cache": "c",
                                                            "teacher_path": "/t"},
                      }, {}
        for st in stages_of(plan):
            if st.id in ("make:teacher", "cache:teacher"):
                continue
            a = assess(plan, st, known)
            out[st.id] = a.identity
            built = {"output": f"key-{a.identity}", "cache": f"/c/{a.identity}"}  # as if built: its cache_key
            known[st.id] = built if st.kind == "cache" and a.identity else predicted_output(a)
        return out

    base = identities(plan_of(tmp_path))
    assert all(base[i] for i in ("generate:onpolicy-s@1", "train:onpolicy-s@1", "generate:onpolicy-s@2"))
    hotter = identities(plan_of(tmp_path, onpolicy={"rounds": 2, "mix": 0.5, "samples": 2,
                                                    "sample_temperature": 0.7}))
    for stage in ("generate:onpolicy-s@1", "train:onpolicy-s@1", "generate:onpolicy-s@2", "train:onpolicy-s"):
        assert hotter[stage] != base[stage], stage  # round 1's change reaches every later round
    assert hotter["train:teacher__s"] == base["train:teacher__s"]  # the off-policy student is not touched


@pytest.mark.parametrize("change,message", [
    pytest.param({"data": {"dataset": str(GSM8K)}}, "onpolicy needs prompt/response data", id="text data"),
    pytest.param({"onpolicy": {"students": ["nobody"]}}, "onpolicy.students names 'nobody', which is not a student",
                 id="unknown student"),
    pytest.param({"students": {"s": {"config": "c.json"}}}, "onpolicy.students: s is a random init",
                 id="config student"),
    pytest.param({"onpolicy": {"rounds": 0}}, "onpolicy.rounds must be an integer >= 1, got 0", id="no rounds"),
    pytest.param({"onpolicy": {"rounds": 3}}, "train.steps (8) does not split into onpolicy.rounds (3) rounds",
                 id="uneven steps"),
    pytest.param({"onpolicy": {"mix": 1.5}}, "onpolicy.mix is the share of batches drawn from the teacher cache",
                 id="mix above 1"),
    pytest.param({"onpolicy": {"lambda": 0.5}}, "unknown key(s) ['lambda'] in onpolicy", id="unknown key"),
    pytest.param({"teacher": {"make": {"steps": 3}}}, "teacher.make needs dataset", id="make without data"),
    pytest.param({"teacher": {"make": {"dataset": "x.txt", "layer": 3}}}, "unknown key(s) ['layer'] in teacher.make",
                 id="unknown make key"),
    pytest.param({"teacher": {}}, "teacher needs model (a hub id, a local folder, or smollm2-135m) or make",
                 id="no teacher"),
])
def test_bad_onpolicy_and_make_sections_are_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(PlanError) as caught:
        plan_of(tmp_path, **change)
    assert message in str(caught.value)


@pytest.mark.parametrize("change,message", [
    pytest.param({"onpolicy": {"samples": 0, "rounds": 2}}, "plan: onpolicy.samples must be an integer >= 1",
                 id="no samples"),
    pytest.param({"onpolicy": {"sample_temperature": -1, "rounds": 2}},
                 "plan: onpolicy.sample_temperature must be in [0, 100]", id="negative temperature"),
    pytest.param({"teacher": {"make": {"dataset": str(GSM8K), "width": 40}}},
                 "plan: teacher.make.width must be a positive multiple of 32", id="make width"),
])
def test_stage_settings_are_checked_by_their_commands_naming_the_plan_key(tmp_path, change, message):
    with pytest.raises(PlanError) as caught:
        check_plan(plan_of(tmp_path, **change), strict=False)
    assert message in str(caught.value)


@pytest.mark.parametrize("name", ["tiny_onpolicy.yaml", "tiny_chain.yaml"])
def test_shipped_plans_with_a_made_teacher_dry_run(tmp_path, name):
    plan = load_plan(str(EXAMPLES / name), out=str(tmp_path / "out"))
    assert "make" in plan.teacher and check_plan(plan, strict=True) is not None  # no teacher folder needed
    rows = describe_stages(plan)
    assert rows[0]["stage"] == "make:teacher" and all(r["state"] == "new" for r in rows)
    res = runner.invoke(app, ["chain", str(EXAMPLES / name), "--dry-run", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0 and "make-teacher" in res.output, res.output


# ---------------------------------------------------------------------------------------------
# End to end: one command each, nothing made before


def run_chain(plan: str, out, capsys) -> tuple[object, float]:
    started = time.time()
    res = runner.invoke(app, ["chain", plan, "--out", str(out)])
    seconds = time.time() - started
    with capsys.disabled():  # measured, not asserted
        print(f"\n{os.path.basename(plan)} wall time: {seconds:.0f}s ({seconds / 60:.1f} min) on {os.cpu_count()} CPUs")
    return res, seconds


@pytest.mark.slow
def test_tiny_chain_runs_end_to_end_with_no_earlier_step(tmp_path, capsys):
    out = tmp_path / "run"
    res, _ = run_chain(str(EXAMPLES / "tiny_chain.yaml"), out, capsys)
    assert res.exit_code == 0, res.output
    assert json.loads((out / "teacher" / "run.json").read_text())["status"] == "complete"
    report = json.loads((out / "report.json").read_text())
    assert {r["path"] for r in report["rows"]} >= {"teacher", "teacher → student", "teacher → assistant → student"}
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--out", str(out)])
    assert res.exit_code == 0 and "make:teacher: done earlier, skipped" in res.output


@pytest.mark.slow
def test_tiny_onpolicy_runs_end_to_end_and_its_report_compares_the_three_ways(tmp_path, capsys):
    out = tmp_path / "run"
    res, _ = run_chain(str(EXAMPLES / "tiny_onpolicy.yaml"), out, capsys)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    [entry] = report["onpolicy"]
    ways = {w["way"]: w for w in entry["ways"]}
    assert set(ways) == {"on-policy rounds", "off-policy KD", "CE"}
    for way in ways.values():
        assert {"ppl", "KL(T||S)", "KL on own samples"} <= set(way["metrics"]), way
        assert way["cost"]["steps"] == 40
    onpolicy = ways["on-policy rounds"]["cost"]
    assert onpolicy["sampled_tokens"] > 0 and onpolicy["teacher_runs"] == 3  # two round caches + the teacher cache
    assert onpolicy["online_teacher_runs"] == 40
    assert {d["against"] for d in entry["differences"]} == {"off-policy KD", "CE"}
    assert all("KL on own samples" in d["metrics"] for d in entry["differences"])
    text = (out / "report.md").read_text()
    assert "## On-policy rounds against off-policy KD and CE" in text and "Teacher cost against online GKD" in text
    with capsys.disabled():
        print(text[text.index("## On-policy rounds"):])
    with open(out / "samples" / "onpolicy-student@2.jsonl") as f:
        samples = [json.loads(line) for line in f]
    assert {s["round"] for s in samples} == {2} and len({s["model_sha256"] for s in samples}) == 1
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_onpolicy.yaml"), "--out", str(out)])
    assert res.exit_code == 0 and res.output.count("done earlier, skipped") == len(
        stages_of(load_plan(str(EXAMPLES / "tiny_onpolicy.yaml"), out=str(out))))
