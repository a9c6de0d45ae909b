"""trainer/run_folder.py on its own: the marker, the lock's recovery, and saving a student beside the user's files.

The end-to-end refusals (model folders, caches, links, a second run) are in tests/cli/test_kdtrain_run.py; two real
processes meet in tests/reliability/test_kill_train.py.
"""

import json
import os
import socket

import pytest

from trainer.run_folder import LOCK_FILE, MARKER_FILE, STAGING_DIR, RunFolder, RunFolderError


def quiet(message):
    pass


def test_a_new_folder_is_marked_and_locked_and_released(tmp_path):
    out = tmp_path / "run"
    folder = RunFolder.open(str(out), resume=False, overwrite=False, log=quiet)
    try:
        marker = json.loads((out / MARKER_FILE).read_text())
        assert (marker["tool"], marker["kind"], marker["files"]) == ("kdtrain", "run", [])
        assert len(marker["id"]) == 32 and int(marker["id"], 16) >= 0
        body = json.loads((out / LOCK_FILE).read_text())
        assert (body["pid"], body["host"]) == (os.getpid(), socket.gethostname()) and body["since"].startswith("20")
    finally:
        folder.release()
    assert not (out / LOCK_FILE).exists()


def test_a_dead_holders_lock_file_is_taken_over(tmp_path):
    """A holder killed outright leaves run.lock naming it; the kernel dropped its flock, so the next run takes the
    folder (the file's body is only a description, never trusted to refuse)."""
    out = tmp_path / "run"
    out.mkdir()  # not created by the run, so it stays after the first release
    RunFolder.open(str(out), resume=False, overwrite=False, log=quiet).release()
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7, "since": "2026-01-01"}))
    folder = RunFolder.open(str(out), resume=True, overwrite=False, log=quiet)
    try:
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        folder.release()


def test_a_folder_the_run_created_and_left_unused_is_removed_on_release(tmp_path):
    """A run refused after --out was claimed (a bad cache, a student that does not fit) leaves nothing behind:
    the folder it made, holding only the marker, goes. A folder that was there before stays, and so does one the
    run wrote into."""
    made = tmp_path / "made"
    RunFolder.open(str(made), resume=False, overwrite=False, log=quiet).release()
    assert not made.exists()
    RunFolder.open(str(made / "a" / "b"), resume=False, overwrite=False, log=quiet).release()
    assert sorted(os.listdir(tmp_path)) == []  # the parents it created for --out go too

    there = tmp_path / "there"
    there.mkdir()
    RunFolder.open(str(there), resume=False, overwrite=False, log=quiet).release()
    assert sorted(os.listdir(there)) == [MARKER_FILE]  # marked: the next run may use it

    used = tmp_path / "used"
    folder = RunFolder.open(str(used), resume=False, overwrite=False, log=quiet)
    folder.write_json("run.json", {"status": "failed"})
    folder.release()
    assert sorted(os.listdir(used)) == [MARKER_FILE, "run.json"]


def write_student(files: dict):
    def save(staging):
        os.makedirs(staging)
        for name, text in files.items():
            with open(os.path.join(staging, name), "w") as f:
                f.write(text)
    return save


def test_the_students_files_are_listed_in_the_marker_before_they_move_in(tmp_path):
    out = tmp_path / "run"
    folder = RunFolder.open(str(out), resume=False, overwrite=False, log=quiet)
    try:
        assert folder.save_student(write_student({"config.json": "{}", "model.safetensors": "w"})) == [
            "config.json", "model.safetensors"]
        assert json.loads((out / MARKER_FILE).read_text())["files"] == ["config.json", "model.safetensors"]
        assert (out / "model.safetensors").read_text() == "w" and not (out / STAGING_DIR).exists()
    finally:
        folder.release()


def test_a_student_file_never_replaces_a_file_kdtrain_did_not_write(tmp_path):
    """A user's file that appeared in the run folder under a name the student writes is not replaced: the save is
    refused naming it, and the student stays in .tmp-student."""
    out = tmp_path / "run"
    folder = RunFolder.open(str(out), resume=False, overwrite=False, log=quiet)
    try:
        (out / "tokenizer.json").write_text("the user's")
        with pytest.raises(RunFolderError, match=r"the student's files tokenizer\.json would replace files in .* that "
                                                 r"kdtrain did not write; nothing was replaced: the student is in "):
            folder.save_student(write_student({"tokenizer.json": "new", "model.safetensors": "w"}))
        assert (out / "tokenizer.json").read_text() == "the user's" and not (out / "model.safetensors").exists()
        assert (out / STAGING_DIR / "model.safetensors").exists()
        assert json.loads((out / MARKER_FILE).read_text())["files"] == []
    finally:
        folder.release()


@pytest.mark.parametrize("marker", [
    {"tool": "kdtrain", "kind": "run", "id": "0" * 32, "files": ["../x"]},
    {"tool": "kdtrain", "kind": "run", "id": "short", "files": []},
    {"tool": "kdtrain", "kind": "run", "id": "0" * 32},
    ["not", "a", "dict"],
], ids=["file-outside", "bad-id", "no-files", "not-an-object"])
def test_a_marker_kdtrain_did_not_write_is_refused(tmp_path, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER_FILE).write_text(json.dumps(marker))
    with pytest.raises(RunFolderError, match=r"owner\.json is not a kdtrain run marker .* so kdtrain cannot tell what "
                                             r"it owns in .*; it deletes and writes nothing there"):
        RunFolder.open(str(out), resume=False, overwrite=True, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_FILE]
