"""Fault injection on a run's files: SIGKILL at any moment of checkpointing, a full
disk, Ctrl-C mid-epoch, files of another run, crafted resume points. Every case: the
exit code, one line on stderr, no traceback, every file still loadable, nothing
overwritten, and a resumed run that ends bit for bit where an uninterrupted one does."""

from __future__ import annotations

import errno
import json
import random
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from faultkit import (CHILD_ENV, assert_one_line, child, finish, npz_arrays,
                      npz_metadata, popen, rewrite_npz, run_cli, train_args)

import minicnn.train as train_module
from minicnn import files, load_model
from minicnn.resume import read_resume_config, resume_path

# Runs the command line, SIGKILLing itself at the Nth os.replace (the rename that
# commits an atomic write), just before or just after it.
KILL_AT_RENAME = """
import os, signal, sys
when, count = sys.argv[1], int(sys.argv[2])
calls, rename = [0], os.replace
def replace(source, target):
    calls[0] += 1
    if calls[0] == count and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    rename(source, target)
    if calls[0] == count and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
from minicnn.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The weights of an uninterrupted run, in a child like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference") / "m.npz"
    result = child(train_args(data, out))
    assert result.returncode == 0, result.stderr
    return npz_arrays(out)


def assert_loadable(out):
    """Whatever of the run's files exist can be read back."""
    if out.exists():
        load_model(out)
    if resume_path(out).exists():
        read_resume_config(resume_path(out))


def assert_same_weights(out, reference):
    arrays = npz_arrays(out)
    assert arrays.keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)


@pytest.mark.parametrize("when,count", [("before", 1), ("after", 1), ("before", 2),
                                        ("after", 3)])
def test_sigkill_while_checkpointing_then_resume_ends_as_an_uninterrupted_run(
        data, reference, tmp_path, when, count):
    """Renames 1-4: resume point of epoch 1, weights of epoch 1, resume point of epoch 2,
    weights of epoch 2. A kill between a resume point and its weights left weights and
    state one epoch apart, and --resume trained that epoch twice."""
    out = tmp_path / "m.npz"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, when, str(count),
                             *map(str, train_args(data, out))], capture_output=True, text=True,
                            env=CHILD_ENV, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert_loadable(out)
    resumed = child([*train_args(data, out), "--resume"])
    if when == "before" and count == 1:          # nothing was committed: start again
        assert_one_line(resumed.returncode, resumed.stderr, 1, "nothing to resume")
        assert files.stray_temp_files(resume_path(out))
        resumed = child(train_args(data, out))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(out, reference)
    assert npz_metadata(out)["training"]["epochs_completed"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]   # cleaned


def test_sigkill_at_random_moments_then_resume_ends_as_an_uninterrupted_run(
        data, reference, tmp_path):
    """A chain of runs, each resuming the last one and killed at a random moment: three
    at a random rename (during checkpointing), three after a random time (during
    start-up, training or saving); then one that finishes."""
    out = tmp_path / "m.npz"
    draw = random.Random(16)
    for round_ in range(6):
        resume = ["--resume"] if resume_path(out).exists() else []
        argv = [*map(str, train_args(data, out)), *resume]
        if round_ < 3:
            process = subprocess.Popen([sys.executable, "-c", KILL_AT_RENAME,
                                        draw.choice(["before", "after"]), str(draw.randint(1, 4)),
                                        *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=CHILD_ENV, start_new_session=True)
        else:
            process = popen(argv)
            time.sleep(draw.uniform(0.3, 1.2))
            process.kill()
        finish(process)
        assert_loadable(out)
    resume = ["--resume"] if resume_path(out).exists() else []
    result = child([*train_args(data, out), *resume])
    assert result.returncode == 0, result.stderr
    assert_same_weights(out, reference)


def interrupt_at(monkeypatch, step: int, before=None):
    """Ctrl-C right after the given optimizer step (counted from 1); ``before()`` runs
    just before the signal."""
    calls = {"n": 0}
    real_step = train_module.SGD.step

    def step_then_ctrl_c(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == step:
            if before is not None:
                before()
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module.SGD, "step", step_then_ctrl_c)


def test_ctrl_c_mid_epoch_leaves_the_last_complete_epochs_weights(
        data, tmp_path, monkeypatch, capsys, one_process):
    """It replaced them with mid-epoch weights while the metadata still named the
    earlier epoch."""
    out = tmp_path / "m.npz"
    seen = {}
    interrupt_at(monkeypatch, 6, before=lambda: seen.update(weights=out.read_bytes()))
    code, _, err = run_cli(train_args(data, out), capsys)
    assert_one_line(code, err, 130, "interrupted in epoch 2 after 2 steps", "--resume")
    assert out.read_bytes() == seen["weights"]
    assert npz_metadata(out)["training"]["epochs_completed"] == 1
    state = npz_metadata(resume_path(out))
    assert (state["epoch"], state["step"]) == (1, 2)
    assert state["published"]["training"]["epochs_completed"] == 1


def interrupted_run(data, out, monkeypatch, capsys, step=6):
    interrupt_at(monkeypatch, step)
    code, _, _ = run_cli(train_args(data, out), capsys)
    monkeypatch.undo()
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    assert code == 130
    return {path: path.read_bytes() for path in (out, resume_path(out))}


def assert_unchanged(before: dict):
    for path, content in before.items():
        assert path.read_bytes() == content, f"{path} was changed"


def test_weights_of_another_run_beside_a_resume_point_are_refused(
        data, tmp_path, monkeypatch, capsys, one_process):
    out, other = tmp_path / "m.npz", tmp_path / "other.npz"
    code, _, _ = run_cli(train_args(data, other, "--seed", "3"), capsys)
    assert code == 0
    interrupted_run(data, out, monkeypatch, capsys)
    shutil.copyfile(other, out)
    before = {path: path.read_bytes() for path in (out, resume_path(out))}
    code, _, err = run_cli([*train_args(data, out), "--resume"], capsys)
    assert_one_line(code, err, 1, "m.npz is not from the run in", "--force")
    assert_unchanged(before)


def test_a_resume_point_of_another_out_is_refused(data, tmp_path, monkeypatch, capsys,
                                                  one_process):
    out = tmp_path / "m.npz"
    interrupted_run(data, out, monkeypatch, capsys)
    moved = tmp_path / "n.npz"
    shutil.copyfile(resume_path(out), resume_path(moved))
    code, _, err = run_cli([*train_args(data, moved), "--resume"], capsys)
    assert_one_line(code, err, 1, "is the resume point of m.npz, not of n.npz")
    assert not moved.exists()


def test_every_file_a_run_writes_is_covered_by_the_overwrite_check(
        data, tmp_path, monkeypatch, capsys, one_process):
    """--out runs/m after an interrupted --out runs/m.npz replaced that run's state."""
    out = tmp_path / "m.npz"
    before = interrupted_run(data, out, monkeypatch, capsys)
    for other_out in (tmp_path / "m", out):
        code, _, err = run_cli(train_args(data, other_out), capsys)
        assert_one_line(code, err, 1, "m.resume.npz", "--force")
    assert not (tmp_path / "m").exists()
    resume_path(out).rename(tmp_path / "kept.npz")      # only the resume point's name taken
    (tmp_path / "mine.resume.npz").write_text("my own file")
    code, _, err = run_cli(train_args(data, tmp_path / "mine.npz"), capsys)
    assert_one_line(code, err, 1, "mine.resume.npz exists")
    assert (tmp_path / "mine.resume.npz").read_text() == "my own file"
    assert out.read_bytes() == before[out]


def test_force_then_ctrl_c_then_resume(data, tmp_path, monkeypatch, capsys, one_process):
    """--force lets the run replace the old weights: its resume point records which
    file it was, so resuming before the first epoch ends is not refused."""
    out = tmp_path / "m.npz"
    code, _, _ = run_cli(train_args(data, out), capsys)
    assert code == 0
    old = out.read_bytes()
    interrupt_at(monkeypatch, 2)
    code, _, _ = run_cli([*train_args(data, out, "--seed", "1"), "--force"], capsys)
    assert code == 130 and out.read_bytes() == old
    monkeypatch.undo()
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    code, out_text, err = run_cli([*train_args(data, out, "--seed", "1"), "--resume"], capsys)
    assert code == 0, err
    assert npz_metadata(out)["training"]["config"]["seed"] == 1


def test_stray_temp_files_of_the_run_are_removed(data, tmp_path, capsys, one_process):
    """...and files beside --out that the run does not write are left alone (a user's
    own m.history.json was overwritten)."""
    out = tmp_path / "m.npz"
    strays = [tmp_path / ".m.npz.a1b2c3d4.tmp", tmp_path / ".m.resume.npz.zz_9x8y7.tmp"]
    others = [tmp_path / ".m.npz.bak.a1b2c3d4.tmp", tmp_path / ".m.npz.tmp",
              tmp_path / "m.history.json", tmp_path / "m.state.npz"]
    for path in strays + others:
        path.write_bytes(b"left by a killed process")
    code, _, err = run_cli(train_args(data, out), capsys)
    assert code == 0, err
    assert not any(path.exists() for path in strays)
    assert all(path.read_bytes() == b"left by a killed process" for path in others)


def test_a_full_disk_mid_run_keeps_the_last_checkpoint(data, tmp_path, monkeypatch, capsys,
                                                       one_process):
    """The third write (epoch 2's resume point) fails with ENOSPC."""
    out = tmp_path / "m.npz"
    calls = {"n": 0}
    real_fsync = files.os.fsync

    def fsync(fd):
        if files.os.path.isfile(f"/proc/self/fd/{fd}"):     # a file, not the folder
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    code, _, err = run_cli(train_args(data, out), capsys)
    assert_one_line(code, err, 1, "cannot save the checkpoint at the end of epoch 2",
                    "No space left on device")
    monkeypatch.undo()
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert npz_metadata(out)["training"]["epochs_completed"] == 1
    assert npz_metadata(resume_path(out))["epoch"] == 1
    load_model(out)
    code, _, err = run_cli([*train_args(data, out), "--resume"], capsys)
    assert code == 0, err
    assert npz_metadata(out)["training"]["epochs_completed"] == 2


def test_a_file_size_limit_is_one_line_and_leaves_nothing_behind(data, tmp_path):
    """RLIMIT_FSIZE below the size of a weights file: the first write fails (EFBIG)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = tmp_path / "m.npz"
    result = child(train_args(data, out), preexec_fn=limit)
    assert_one_line(result.returncode, result.stderr, 1, "cannot save the checkpoint",
                    "File too large")
    assert list(tmp_path.iterdir()) == []


# --- crafted resume points -------------------------------------------------------------

DELETE = object()


def set_field(path, value):
    """Change one metadata field, given as "a.b.c" (value DELETE deletes it)."""
    def change(metadata):
        keys = path.split(".")
        holder = metadata
        for key in keys[:-1]:
            holder = holder[key]
        if value is DELETE:
            del holder[keys[-1]]
        else:
            holder[keys[-1]] = value
        return metadata
    return change


CRAFTED = {
    "no epoch": (set_field("epoch", DELETE), "field epoch"),
    "epoch as text": (set_field("epoch", "1"), "field epoch"),
    "step beyond the epoch": (set_field("step", 99), "field step"),
    "negative step": (set_field("step", -1), "field step"),
    "format version as text": (set_field("format_version", "2"), "field format_version"),
    "format version null": (set_field("format_version", None), "field format_version"),
    "newer format": (set_field("format_version", 7), "newer"),
    "config a list": (set_field("config", [1, 2]), "field config"),
    "NaN learning rate": (set_field("config.lr", float("nan")), "field lr"),
    "NaN momentum": (set_field("config.momentum", float("nan")), "field momentum"),
    "unknown schedule": (set_field("config.schedule", "sawtooth"), "field schedule"),
    "history a dict": (set_field("history", {"epoch": 1}), "field history"),
    "history with NaN": (set_field("history", [{"epoch": 1, "train_loss": float("nan"),
                                                "train_accuracy": 0.5, "test_accuracy": 0.5}]),
                         "field history[0].train_loss"),
    "run id a number": (set_field("run_id", 5), "field run_id"),
    "elapsed negative": (set_field("elapsed", -3), "field elapsed"),
    "not an object": (lambda metadata: [metadata], "not a JSON object"),
    "fewer images": (set_field("train_images", 7), "7 images"),
    "published of another run": (set_field("published.training.run_id", "f" * 16),
                                 "field published.training.run_id"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_resume_points_are_one_line_errors(data, tmp_path, monkeypatch, capsys,
                                                   one_process, case):
    out = tmp_path / "m.npz"
    interrupted_run(data, out, monkeypatch, capsys)
    change, expected = CRAFTED[case]
    metadata = change(npz_metadata(resume_path(out)))
    rewrite_npz(resume_path(out), resume_path(out), metadata)
    before = {path: path.read_bytes() for path in (out, resume_path(out))}
    code, _, err = run_cli([*train_args(data, out), "--resume"], capsys)
    assert_one_line(code, err, 1, "m.resume.npz", expected)
    assert_unchanged(before)


@pytest.mark.parametrize("case", ["NaN velocity", "infinite weight", "velocity missing",
                                  "weight of another shape", "an extra array"])
def test_crafted_resume_arrays_are_one_line_errors(data, tmp_path, monkeypatch, capsys,
                                                   one_process, case):
    out = tmp_path / "m.npz"
    interrupted_run(data, out, monkeypatch, capsys)
    arrays = npz_arrays(resume_path(out))
    change = {"NaN velocity": ({"velocity/0.weight": np.full((6, 3, 5, 5), np.nan,
                                                             np.float32)}, (), "NaN"),
              "infinite weight": ({"model/9.bias": np.full(84, np.inf, np.float32)}, (),
                                  "NaN or infinite"),
              "velocity missing": ({}, ("velocity/3.bias",), "velocity is incomplete"),
              "weight of another shape": ({"model/0.weight": np.zeros((6, 3, 3, 3),
                                                                      np.float32)}, (),
                                          "has shape (6, 3, 3, 3)"),
              "an extra array": ({"model/99.weight": arrays["model/0.weight"]}, (),
                                 "unexpected")}[case]
    rewrite_npz(resume_path(out), resume_path(out), arrays=change[0], drop=change[1])
    before = {path: path.read_bytes() for path in (out, resume_path(out))}
    code, _, err = run_cli([*train_args(data, out), "--resume"], capsys)
    assert_one_line(code, err, 1, "m.resume.npz", change[2])
    assert_unchanged(before)


def test_a_resume_point_is_not_a_weights_file(data, tmp_path, monkeypatch, capsys,
                                              one_process):
    out = tmp_path / "m.npz"
    interrupted_run(data, out, monkeypatch, capsys)
    code, _, err = run_cli(["evaluate", "--weights", resume_path(out), "--data-dir", data],
                           capsys)
    assert_one_line(code, err, 1, "is the resume point of a training run")
    assert json.loads(json.dumps(npz_metadata(resume_path(out))))   # plain JSON inside


def test_resuming_the_state_of_an_older_minicnn_says_so(data, tmp_path, capsys):
    (tmp_path / "m.state.npz").write_bytes(b"an older minicnn's training state")
    code, _, err = run_cli([*train_args(data, tmp_path / "m.npz"), "--resume"], capsys)
    assert_one_line(code, err, 1, "nothing to resume: ", "m.resume.npz does not exist",
                    "m.state.npz is the training state of an older minicnn")
