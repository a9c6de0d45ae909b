"""orchestration/plan_folder.py: a plan writes only into a folder it created (or an earlier plan's), marked as such.

Refusals through `kdtrain chain` / `kdtrain demo` exit 2 and leave the folder as it was; the unit tests cover
each kind of folder.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.kdtrain import app
from orchestration.plan import PlanError
from orchestration.plan_folder import MARKER_FILE, claim_plan_folder, plan_folder_problem

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def quiet(message):
    pass


def tree(folder: Path) -> dict:
    """Every file under folder with its bytes (to show nothing changed)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_or_empty_folder_is_created_and_marked_once(tmp_path):
    for out in (tmp_path / "new" / "plan", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        claim_plan_folder(str(out), quiet)
        marker = json.loads((out / MARKER_FILE).read_text())
        assert (marker["tool"], marker["kind"]) == ("kdtrain", "plan") and len(marker["id"]) == 32
        claim_plan_folder(str(out), quiet)  # the next run of the plan: the same marker
        assert json.loads((out / MARKER_FILE).read_text()) == marker


def users_folder(path: Path) -> None:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    (path / "report.md").write_text("my own report")  # a name a plan writes too, in a folder no plan made


def only_plan_names(path: Path) -> None:
    (path / "runs").mkdir(parents=True)
    (path / "runs" / "mine.txt").write_text("keep")


def run_folder(path: Path) -> None:
    path.mkdir()
    (path / MARKER_FILE).write_text(json.dumps({"tool": "kdtrain", "kind": "run", "id": "ab" * 16, "files": []}))


def cache_folder(path: Path) -> None:
    path.mkdir()
    (path / MARKER_FILE).write_text(json.dumps({"tool": "kdcache", "kind": "cache", "id": "cd" * 16}))
    (path / "manifest.json").write_text("{}")


def damaged_marker(path: Path) -> None:
    path.mkdir()
    (path / MARKER_FILE).write_text("{not json")


def a_file(path: Path) -> None:
    path.write_text("x")


@pytest.mark.parametrize("make,message", [
    (users_folder, "holds notes.txt, which no plan writes, and no owner.json marking it as a plan's folder"),
    (only_plan_names, "holds runs but none of a plan's records (plan.json, stages) and no owner.json"),
    (run_folder, "is a kdtrain run folder (its owner.json says so), not a plan's"),
    (cache_folder, "is a kdcache cache folder (its owner.json says so), not a plan's"),
    (damaged_marker, "its owner.json is not a marker kdcache or kdtrain writes"),
    (a_file, "is a file; pass a folder as --out"),
], ids=["someone's folder", "plan names only, no records", "run folder", "cache", "damaged marker", "file"])
def test_folders_a_plan_did_not_create_are_refused_untouched(tmp_path, make, message):
    out = tmp_path / "out"
    make(out)
    before = tree(out) if out.is_dir() else out.read_bytes()
    assert message in plan_folder_problem(str(out))
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        claim_plan_folder(str(out), quiet)
    assert (tree(out) if out.is_dir() else out.read_bytes()) == before


def test_an_earlier_plans_folder_without_the_marker_is_adopted(tmp_path):
    """A plan run by a kdcache older than the marker: only a plan's names, and its records."""
    out = tmp_path / "old-plan"
    (out / "stages").mkdir(parents=True)
    (out / "plan.json").write_text("{}")
    (out / "report.md").write_text("# report")
    (out / "loss_curves.png").write_bytes(b"png")
    said = []
    claim_plan_folder(str(out), said.append)
    assert json.loads((out / MARKER_FILE).read_text())["kind"] == "plan"
    assert said and "marked it as this plan's" in said[0]


def test_kdtrain_chain_refuses_someones_folder_before_writing_anything(tmp_path):
    """Both the dry run and the run: exit 2, the folder untouched (the plan's report.md would have replaced the
    user's)."""
    out = tmp_path / "mine"
    users_folder(out)
    before = tree(out)
    plan = str(REPO / "examples" / "tiny_chain.yaml")
    for extra in (["--dry-run"], []):
        res = runner.invoke(app, ["chain", plan, "--out", str(out), *extra])
        text = " ".join(res.output.split())
        assert res.exit_code == 2 and "which no plan writes" in text and "Pass a new or empty folder as --out" in text
        assert tree(out) == before


def test_kdtrain_demo_refuses_someones_folder_before_writing_its_plan(tmp_path):
    out = tmp_path / "mine"
    users_folder(out)
    before = tree(out)
    res = runner.invoke(app, ["demo", "--out", str(out), "--dry-run"])
    assert res.exit_code == 2 and "which no plan writes" in " ".join(res.output.split())
    assert tree(out) == before and not os.path.exists(out / "demo_plan.yaml")
    shutil.rmtree(out)


def test_the_plan_file_itself_may_lie_in_its_folder(tmp_path):
    """A plan kept in its experiment's folder (`kdtrain chain exp/plan.yaml --out exp`): its file is not a stranger;
    anything else still is."""
    out = tmp_path / "exp"
    out.mkdir()
    (out / "plan.yaml").write_text("name: x\n")
    claim_plan_folder(str(out), quiet, plan_file=str(out / "plan.yaml"))
    assert sorted(os.listdir(out)) == [MARKER_FILE, "plan.yaml"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "plan.yaml").write_text("name: x\n")
    assert "holds plan.yaml, which no plan writes" in plan_folder_problem(str(other), str(tmp_path / "plan.yaml"))


def test_a_second_run_of_a_plan_into_a_held_folder_is_refused_naming_the_holder(tmp_path):
    """While one `kdtrain chain` holds the folder (plan.lock, flock), another is refused before any stage runs."""
    from orchestration.plan import load_plan
    from orchestration.plan_folder import PLAN_LOCK
    from orchestration.runner import run_plan
    from trainer.run_folder import RunFolderError, drop_lock, take_lock

    out = tmp_path / "plan"
    claim_plan_folder(str(out), quiet)
    held = take_lock(str(out), PLAN_LOCK, "kdtrain chain")
    try:
        plan = load_plan(str(REPO / "examples" / "tiny_chain.yaml"), out=str(out))
        with pytest.raises(RunFolderError, match=rf"--out {out} is in use by another kdtrain chain: pid {os.getpid()}"):
            run_plan(plan, log=quiet)
        assert sorted(os.listdir(out)) == [MARKER_FILE, PLAN_LOCK]  # no stage, no record written
    finally:
        drop_lock(str(out), held, PLAN_LOCK)
