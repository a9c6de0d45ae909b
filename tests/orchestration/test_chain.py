"""Plans: parsing and validation, the shipped GPU plans by --dry-run, the tiny plan end to end."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from cli.kdtrain import app
from orchestration import runner as chain_runner
from orchestration.caches import reported_cache
from orchestration.checks import check_plan
from orchestration.plan import PlanError, load_plan, parse_plan
from orchestration.runner import describe_stages, run_plan, run_stage
from orchestration.stages import nodes_of, stages_of
from orchestration.state import assess, marker_record, planned_cache_dir
from tests.conftest import REPO_ROOT, SHAKESPEARE, build_tiny_model, train_tokenizer

runner = CliRunner()
EXAMPLES = REPO_ROOT / "examples"


def base_plan(**over):
    plan = {"name": "p", "teacher": {"model": "gpt2"}, "data": {"dataset": "builtin:pydoc-topics"},
            "students": {"a": {"keep_layers": 2}, "s": {"keep_layers": 1}}, "paths": [["a", "s"], ["s"]]}
    plan.update(over)
    return plan


def test_stages_share_prefixes_and_train_before_caching():
    plan = parse_plan(base_plan(paths=[["a", "s"], ["s"], ["a"]]), out="/tmp/x")
    assert nodes_of(plan) == ["teacher>a", "teacher>s", "teacher>a>s"]
    ids = [s.id for s in stages_of(plan)]
    assert ids.count("train:teacher__a") == 1
    assert ids.index("train:teacher__a") < ids.index("cache:teacher__a") < ids.index("train:teacher__a__s")
    assert "train:ce-a" in ids and "train:ce-s" in ids and "eval:teacher" in ids
    # students start from the same init on every path: a layer-dropped copy of the plan's teacher
    train_s = next(s for s in stages_of(plan) if s.id == "train:teacher__a__s")
    assert train_s.command[train_s.command.index("--teacher") + 1] == "{teacher_folder}"  # resolved at run time
    # it trains on the cache its parent's cache stage records (resolved at run time too)
    assert train_s.command[train_s.command.index("--cache") + 1] == "{cache:teacher>a}"


@pytest.mark.parametrize("change,message", [
    ({"studnets": {}}, "unknown key(s) ['studnets']"),
    ({"paths": []}, "paths must be a non-empty list"),
    ({"paths": [["a", "s", "a"]]}, "a cycle"),
    ({"paths": [["teacher", "s"]]}, "lists the teacher"),
    ({"paths": [["x"]]}, "'x', which is not a student"),
    ({"students": {"a": {"keep_layers": 2, "model": "gpt2"}}}, "exactly one of"),
    ({"train": {"lr": 1, "epocs": 2}}, "unknown key(s) ['epocs'] in train"),
    ({"eval": {"metrics": ["bleu"]}}, "eval.metrics has unknown ['bleu']"),
])
def test_bad_plans(change, message):
    with pytest.raises(PlanError) as err:
        parse_plan(base_plan(**change))
    assert message in str(err.value)


def test_unknown_key_lists_valid_ones(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(base_plan(teachr={"model": "x"})))
    res = runner.invoke(app, ["chain", str(path), "--dry-run"])
    assert res.exit_code == 2 and "teachr" in res.output and "students" in res.output


@pytest.mark.parametrize("name", ["gpt2_dolly_chain.yaml", "qwen_gsm8k_chain.yaml", "tiny_chain.yaml"])
def test_shipped_plans_dry_run(name, tmp_path):
    res = runner.invoke(app, ["chain", str(EXAMPLES / name), "--dry-run", "--json", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert any(r["kind"] == "cache" and r["cache_state"] == "missing" for r in rows)
    assert all(not r["done"] for r in rows)
    # train stages always pass --resume: a stage killed before its first checkpoint restarts cleanly
    assert all("--resume" in r["command"].split() for r in rows if r["kind"] == "train")


def test_paper_plan_shape(tmp_path):
    plan = load_plan(str(EXAMPLES / "gpt2_dolly_chain.yaml"))
    # MiniLLM's teacher: GPT-2 xl fine-tuned on dolly (a local copy of MiniLLM/teacher-gpt2-1.5B), not raw gpt2-xl
    assert plan.teacher["model"] == str(REPO_ROOT / "models" / "teacher-gpt2-1.5B")
    assert "MiniLLM/teacher-gpt2-1.5B" in (EXAMPLES / "gpt2_dolly_chain.yaml").read_text()
    assert ["large", "medium", "base"] in plan.paths and ["base"] in plan.paths
    assert "rouge" in plan.eval["metrics"] and plan.eval["split"] == "train[-500:]"
    assert plan.train["alpha"] == 0.5 and plan.train["save_every"] > 0  # MiniLLM's kd-ratio 0.5
    # without the teacher folder --dry-run still lists the stages, and says what to create first
    res = runner.invoke(app, ["chain", str(EXAMPLES / "gpt2_dolly_chain.yaml"), "--dry-run", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0 and "teacher-gpt2-1.5B does not exist" in res.output
    with pytest.raises(PlanError, match="does not exist; create it first"):  # and a real run refuses to start
        run_plan(load_plan(str(EXAMPLES / "gpt2_dolly_chain.yaml"), out=str(tmp_path / "o")), log=lambda m: None)
    assert not (tmp_path / "o" / "caches").exists()


def test_gsm8k_plan_reads_main_and_asks_for_the_marker():
    plan = load_plan(str(EXAMPLES / "qwen_gsm8k_chain.yaml"), out="/tmp/q")
    assert plan.eval["dataset"] == "openai/gsm8k" and plan.eval["dataset_config"] == "main"
    eval_stage = next(s for s in stages_of(plan) if s.id == "eval:teacher__q05b")
    assert eval_stage.command[eval_stage.command.index("--dataset-config") + 1] == "main"
    # the traces are generated from prompts prepared with the eval's instruction (examples/prepare_gsm8k.py)
    assert plan.data["dataset"] == str(EXAMPLES / "data" / "gsm8k_train.jsonl")
    assert "prepare_gsm8k.py" in (EXAMPLES / "qwen_gsm8k_chain.yaml").read_text()
    assert plan.cache["filter"] == "gsm8k-answer"


def test_plan_dataset_config_reaches_kdcache_build(tmp_path):
    plan = parse_plan(base_plan(data={"dataset": "openai/gsm8k", "dataset_config": "main", "prompt_field": "question",
                                      "response_field": "answer"}), out=str(tmp_path))
    build = next(s for s in stages_of(plan) if s.kind == "cache")
    assert build.command[build.command.index("--dataset-config") + 1] == "main"


def test_plan_prompt_template_reaches_build_and_eval(tmp_path):
    """data: prompt_template / input_field go to `kdcache build`; an eval without its own data set reads the
    input field too (its ROUGE-L prompts then match the cache's)."""
    data = {"dataset": str(tmp_path / "dolly.jsonl"), "prompt_field": "instruction", "response_field": "response",
            "prompt_template": "minillm", "input_field": "context"}
    plan = parse_plan(base_plan(data=data, eval={"metrics": ["rouge"]}), out=str(tmp_path))
    build = next(s for s in stages_of(plan) if s.kind == "cache")
    assert build.command[build.command.index("--prompt-template") + 1] == "minillm"
    assert build.command[build.command.index("--input-field") + 1] == "context"
    evaluation = next(s for s in stages_of(plan) if s.id == "eval:teacher__s")
    assert evaluation.command[evaluation.command.index("--input-field") + 1] == "context"


def test_dolly_plan_trains_on_the_prompts_its_rouge_eval_asks():
    plan = load_plan(str(EXAMPLES / "gpt2_dolly_chain.yaml"), out="/tmp/d")
    assert plan.data["prompt_template"] == "minillm" and plan.data["input_field"] == plan.eval["input_field"] == "context"
    for st in stages_of(plan):
        if st.kind == "cache":
            assert st.command[st.command.index("--prompt-template") + 1] == "minillm"
            assert st.command[st.command.index("--input-field") + 1] == "context"
    text = (EXAMPLES / "gpt2_dolly_chain.yaml").read_text()
    assert "no option yet" not in text and "--prompt-template minillm --input-field context" in text


@pytest.mark.slow
def test_tiny_chain_end_to_end_and_resume(tmp_path, capsys):
    teacher = tmp_path / "tiny-teacher"
    subprocess.run([sys.executable, str(EXAMPLES / "make_tiny_teacher.py"), str(teacher), "--steps", "60"], check=True,
                   cwd=REPO_ROOT, capture_output=True)
    out = tmp_path / "run"
    started = time.time()
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    seconds = time.time() - started
    assert res.exit_code == 0, res.output
    with capsys.disabled():  # measured, not asserted: the plan header's "a few minutes"
        print(f"\ntiny_chain.yaml wall time: {seconds:.0f}s ({seconds / 60:.1f} min) on {os.cpu_count()} CPUs")
    report = json.loads((out / "report.json").read_text())
    paths = {r["path"]: r["metrics"] for r in report["rows"]}
    assert set(paths) >= {"teacher", "teacher → student", "teacher → assistant → student", "CE baseline (student)"}
    assert all("ppl" in m and "top-1 agr." in m for m in paths.values())
    for png in ("loss_curves.png", "metric_ppl.png", "agreement_along_chain.png"):
        assert (out / png).stat().st_size > 1000
    assert "| tiny-teacher | assistant | student |" in (out / "report.md").read_text()
    assert any(c["against"] == "direct" and c["path"] == "teacher → assistant → student" for c in report["comparisons"])
    # one cache per teacher (the root teacher and the assistant), named by plan, node and settings digest
    caches = sorted(os.listdir(out / "caches"))
    assert [c.rsplit("-", 1)[0] for c in caches] == ["tiny-chain__teacher", "tiny-chain__teacher__assistant"]
    # a second run recomputes nothing
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    assert res.exit_code == 0 and res.output.count("done earlier, skipped") == len(
        stages_of(load_plan(str(EXAMPLES / "tiny_chain.yaml"), out=str(out), overrides=[f"teacher.model={teacher}"])))
    # a half-done plan resumes: remove the last stages' markers and one run
    shutil.rmtree(out / "runs" / "ce-student")
    for marker in (out / "stages").glob("*ce-student*"):
        marker.unlink()
    res = runner.invoke(app, ["chain", str(EXAMPLES / "tiny_chain.yaml"), "--teacher", str(teacher), "--out", str(out)])
    assert res.exit_code == 0 and "train:ce-student: " in res.output and "cache:teacher: done earlier" in res.output


def test_stage_runner_reports_the_running_stages_last_log_line(tmp_path):
    script = "import sys, time\nfor i in range(6):\n    print(f'step {i}/6', flush=True)\n    time.sleep(0.15)\n"
    seen = []
    log_path = str(tmp_path / "stage.log")
    rc = run_stage([sys.executable, "-c", script], log_path, dict(os.environ), seen.append, poll_s=0.05)
    assert rc == 0
    assert any(line.startswith("step ") for line in seen), seen
    assert (tmp_path / "stage.log").read_text().splitlines()[-1] == "step 5/6"


def test_stage_runner_stops_the_stage_when_the_caller_is_interrupted(tmp_path):
    pid_file = tmp_path / "pid"
    script = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n"

    def interrupt(line):
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage([sys.executable, "-c", script], str(tmp_path / "stage.log"), dict(os.environ), interrupt,
                   poll_s=0.05)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not left running
        os.kill(pid, 0)


def test_plan_can_turn_the_target_bucket_off(tmp_path):
    plan = parse_plan(base_plan(train={"target_bucket": False}), out=str(tmp_path))
    train = next(s for s in stages_of(plan) if s.id == "train:teacher__s")
    assert "--no-target-bucket" in train.command
    default = parse_plan(base_plan(), out=str(tmp_path))
    assert not any("target-bucket" in c for s in stages_of(default) for c in s.command)


def test_plan_cache_tail_samples_reach_kdcache_build(tmp_path):
    plan = parse_plan(base_plan(cache={"top_k": 48, "tail_samples": 16}, train={"tail_samples": False}),
                      out=str(tmp_path))
    build = next(s for s in stages_of(plan) if s.kind == "cache")
    assert build.command[build.command.index("--tail-samples") + 1] == "16"
    train = next(s for s in stages_of(plan) if s.id == "train:teacher__s")
    assert "--no-tail-samples" in train.command


# ---------------------------------------------------------------------------------------------
# Caches shared across plans


def _summary_line(status, url, key):
    """The last line `kdcache build --json` prints (cli/kdcache.py build, cacher.build.BuildResult.to_json)."""
    return json.dumps({"status": status, "cache": url, "cache_key": key, "num_shards": 1, "num_shards_written": 0,
                       "num_sequences": 120, "num_tokens": 7680, "num_bytes": 1258291, "seconds": 0.4}) + "\n"


def _plan_spec(teacher, root, **over):
    spec = {"teacher": {"model": str(teacher)}, "data": {"dataset": str(SHAKESPEARE), "limit": 24, "max_length": 64},
            "cache": {"top_k": 8, "engine": "hf", "dtype": "float32"},
            "train": {"steps": 2, "batch_tokens": 256, "lr": 0.001},
            "students": {"s": {"keep_layers": 1}}, "paths": [["s"]], "baselines": True,
            "eval": {"metrics": ["ppl", "agreement"]}, "cache_root": str(root)}
    spec.update(over)
    return spec


def _fake_kdtrain_output(command):
    """What `kdtrain run` / `kdtrain eval` leave when they finish: a complete run.json, an eval JSON file."""
    out = command[command.index("--out") + 1]
    if "run" in command:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "run.json"), "w") as f:
            json.dump({"status": "complete"}, f)
    else:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"metrics": {}}, f)


def test_second_plan_trains_from_the_cache_kdcache_build_reused(tmp_path, tiny_cache, tiny_gpt2_dir, monkeypatch):
    """kdcache build finds an identical cache under the root, prints `reused: <that cache>` and writes nothing
    at --out; the second plan's train and eval stages must use that cache, and --dry-run must show it."""
    from shared.reader import CacheReader
    key = CacheReader(tiny_cache).manifest.cache_key
    root = tmp_path / "caches"
    commands = []

    def fake_stage(command, log_path, env, on_line=None, poll_s=0.5):  # what the stage processes print
        commands.append(command)
        with open(log_path, "w") as f:
            if "cli.kdcache" in command:
                assert "--json" in command  # the chain reads the build's JSON report, never its summary line
                existing = sorted(str(root / d) for d in os.listdir(root)) if root.exists() else []
                if existing:
                    f.write(f"already built: {existing[0]} has the same cache_key {key[:12]}; reusing it\n")
                    f.write(_summary_line("reused", existing[0], key))
                else:
                    out = command[command.index("--out") + 1]
                    shutil.copytree(tiny_cache, out)
                    f.write(_summary_line("built", out, key))
            else:
                _fake_kdtrain_output(command)
        return 0

    monkeypatch.setattr(chain_runner, "run_stage", fake_stage)
    first = parse_plan({"name": "first", **_plan_spec(tiny_gpt2_dir, root)}, out=str(tmp_path / "first"))
    run_plan(first, log=lambda m: None)
    built = planned_cache_dir(first)
    assert os.path.isfile(os.path.join(built, "manifest.json"))
    commands.clear()
    second = parse_plan({"name": "second", **_plan_spec(tiny_gpt2_dir, root)}, out=str(tmp_path / "second"))
    run_plan(second, log=lambda m: None)
    assert not os.path.exists(planned_cache_dir(second))  # nothing was built for the second plan
    caches = [c[c.index("--cache") + 1] for c in commands if "--cache" in c]
    assert len(caches) == 2 + 3 and set(caches) == {built}  # KD + CE train stages, 3 evals (ppl, agreement)
    marker = json.loads((tmp_path / "second" / "stages" / "cache-teacher.done.json").read_text())
    assert marker["cache"] == built and marker["status"] == "reused" and marker["cache_key"] == key
    row = next(r for r in describe_stages(second) if r["kind"] == "cache")
    assert row["cache"] == built and row["cache_state"] == "complete" and row["reused"] and row["done"]
    report = json.loads((tmp_path / "second" / "report.json").read_text())
    assert report["caches"] == {"teacher": built}


def test_build_summary_is_checked_against_the_cache_key(tmp_path, tiny_cache):
    from shared.reader import CacheReader

    key = CacheReader(tiny_cache).manifest.cache_key
    plan = parse_plan(base_plan(cache_root=str(tmp_path)), out=str(tmp_path / "o"))
    assert reported_cache(plan, "data: ...\n" + _summary_line("reused", tiny_cache, key))["cache"] == tiny_cache
    with pytest.raises(PlanError, match="without printing its JSON report"):
        reported_cache(plan, "error: something\n")
    with pytest.raises(PlanError, match="without printing its JSON report"):  # the human summary line is not read
        reported_cache(plan, f"reused: {tiny_cache}  shards 1 (written now: 0)  cache_key {key[:12]}  0.4s\n")
    # the report is the last JSON line, after the stderr lines (progress, warnings) the stage's log also holds
    log = _summary_line("built", str(tmp_path / "x"), "1" * 64) + "warning: {not json}\n" + _summary_line(
        "already built", tiny_cache, key) + "teacher ━━━━ 120/120 seqs\n"
    assert reported_cache(plan, log) == {"cache": tiny_cache, "cache_key": key, "status": "already built"}
    with pytest.raises(PlanError, match="cannot read"):
        reported_cache(plan, json.dumps({"status": "done", "cache": tiny_cache, "cache_key": key}) + "\n")
    with pytest.raises(PlanError, match="no complete cache with that key"):  # a path that does not hold that key
        reported_cache(plan, _summary_line("reused", str(tmp_path / "elsewhere"), "0" * 64))
    with pytest.raises(PlanError, match="partial: other workers still owe shards"):
        reported_cache(plan, _summary_line("partial", tiny_cache, key))


def test_plans_with_one_name_but_other_data_never_share_a_cache_folder(tmp_path):
    one = parse_plan(base_plan(cache_root=str(tmp_path)), out=str(tmp_path / "o"))
    same = parse_plan(base_plan(cache_root=str(tmp_path)), out=str(tmp_path / "o"))
    other = parse_plan(base_plan(cache_root=str(tmp_path), data={"dataset": "builtin:pydoc-topics", "limit": 10}),
                       out=str(tmp_path / "o"))
    assert planned_cache_dir(one, "teacher") == planned_cache_dir(same, "teacher")
    assert planned_cache_dir(one, "teacher") != planned_cache_dir(other, "teacher")
    assert os.path.basename(planned_cache_dir(one, "teacher")).startswith("p__teacher-")


@pytest.mark.slow
def test_two_plans_share_one_teacher_cache(tmp_path, tiny_gpt2_dir):
    """Real `kdcache build` and `kdtrain run` processes: the second plan's cache stage reuses the first plan's
    cache (the teacher runs once) and its student trains from that cache."""
    from shared.catalog import find_caches

    root = tmp_path / "caches"

    first = parse_plan({"name": "first", **_plan_spec(tiny_gpt2_dir, root)}, out=str(tmp_path / "first"))
    run_plan(first, log=lambda m: None, only={"cache:teacher"})  # the other stages: not this test's
    second = parse_plan({"name": "second", **_plan_spec(tiny_gpt2_dir, root)}, out=str(tmp_path / "second"))
    run_plan(second, log=lambda m: None, only={"cache:teacher", "train:teacher__s"})
    built = planned_cache_dir(first)
    log = (tmp_path / "second" / "logs" / "cache-teacher.log").read_text()
    assert "reused" in log and built in log
    assert not os.path.exists(planned_cache_dir(second))
    assert [c["path"] for c in find_caches(str(root))] == [os.path.basename(built)]  # the teacher ran once
    run = json.loads((tmp_path / "second" / "runs" / "teacher__s" / "run.json").read_text())
    assert run["status"] == "complete" and run["config"]["cache"] == built


# ---------------------------------------------------------------------------------------------
# A train stage killed before its first checkpoint


def _record_teacher_cache(plan, url):
    """The root teacher cache stage's done-marker, as run_plan writes it after `kdcache build` reported url."""
    from shared.reader import CacheReader

    stage = next(s for s in stages_of(plan) if s.id == "cache:teacher")
    record = marker_record(assess(plan, stage, {}))
    os.makedirs(os.path.dirname(stage.marker), exist_ok=True)
    with open(stage.marker, "w") as f:
        json.dump({**record, "cache": url, "cache_key": CacheReader(url).manifest.cache_key, "status": "reused"}, f)


def test_rerun_completes_a_train_stage_killed_before_its_first_checkpoint(tmp_path, tiny_cache, tiny_gpt2_dir):
    """The killed stage left its run folder (marker, run.json, metrics.jsonl), no checkpoint and no done-marker.
    The rerun passes --resume, so `kdtrain run` starts that run over instead of refusing a non-empty --out."""
    plan = parse_plan({"name": "killed", **_plan_spec(tiny_gpt2_dir, tmp_path / "caches", baselines=False)},
                      out=str(tmp_path / "out"))
    _record_teacher_cache(plan, tiny_cache)
    from trainer.run_folder import RunFolder

    run_dir = tmp_path / "out" / "runs" / "teacher__s"
    # what `kdtrain run` writes before its first checkpoint (docs/runs-and-plans.md 1): the folder, its marker,
    # run.json and metrics lines; then it was killed
    folder = RunFolder.open(str(run_dir), resume=False, overwrite=False, log=lambda m: None)
    folder.write_json("run.json", {"status": "running"})
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "loss": 9.9}) + "\n")
    folder.release()
    assert run_plan(plan, log=lambda m: None, only={"train:teacher__s"}) == {}  # the evals still to run: no report
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "complete" and run["steps"] == 2 and run["config"]["cache"] == tiny_cache
    assert (run_dir / "model.safetensors").is_file()
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 7 not in steps and max(steps) == 2  # the killed run's lines are gone
    marker = json.loads((tmp_path / "out" / "stages" / "train-teacher__s.done.json").read_text())
    assert "--resume" in marker["command"] and marker["settings"]["steps"] == 2 and marker["settings"]["loss"] == "fkl"


# ---------------------------------------------------------------------------------------------
# Tokenizers checked before anything runs


def test_plan_accepts_a_student_with_fewer_padded_rows_than_the_teacher(tmp_path, tiny_tokenizer_dir):
    """Teacher 424 embedding rows, student 400, tokenizer 384 ids (Qwen2.5-7B and 0.5B): the check before any stage
    compares the student with the tokenizer's ids, as kdcache build counts them (it compared with 424)."""
    from transformers import AutoModelForCausalLM

    folders = {}
    for name, rows in (("teacher", 424), ("student", 400), ("short", 380)):
        folder = build_tiny_model(tmp_path / name, "gpt2", tiny_tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.resize_token_embeddings(rows, mean_resizing=False)
        model.save_pretrained(folder, safe_serialization=True)
        folders[name] = str(folder)
    spec = base_plan(teacher={"model": folders["teacher"]}, data={"dataset": str(SHAKESPEARE)},
                     students={"s": {"model": folders["student"]}}, paths=[["s"]])
    assert check_plan(parse_plan(spec, out=str(tmp_path / "o"))) == []
    spec["students"] = {"s": {"model": folders["short"]}}
    with pytest.raises(PlanError, match="380 embedding rows but teacher .* emits 384 token ids"):
        check_plan(parse_plan(spec, out=str(tmp_path / "o")))


def test_plan_refuses_a_student_with_another_tokenizer_before_any_stage(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    other_tokenizer = tmp_path / "other-tokenizer"
    train_tokenizer(other_tokenizer, vocab_size=300)
    other = build_tiny_model(tmp_path / "other-student", "gpt2", other_tokenizer)
    spec = base_plan(teacher={"model": str(tiny_gpt2_dir)}, data={"dataset": str(SHAKESPEARE)},
                     students={"same": {"model": str(tiny_llama_dir)}, "other": {"model": str(other)},
                               "dropped": {"keep_layers": 1}},
                     paths=[["same", "other"], ["dropped"]], out=str(tmp_path / "out"))
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(spec))
    res = runner.invoke(app, ["chain", str(path), "--dry-run"])
    assert res.exit_code == 2
    assert "students.other" in res.output and "tokenizer" in res.output and "differs" in res.output
    with pytest.raises(PlanError, match="students.other"):
        run_plan(load_plan(str(path)), log=lambda m: None)
    assert not (tmp_path / "out").exists()  # refused before anything was built or written
    spec["students"].pop("other")
    spec["paths"] = [["same"], ["dropped"]]
    path.write_text(yaml.safe_dump(spec))
    res = runner.invoke(app, ["chain", str(path), "--dry-run"])
    assert res.exit_code == 0, res.output
