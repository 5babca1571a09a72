"""Fault injection in time: divergence to NaN, Ctrl-C to the process group while the
replica workers start, SIGTERM, a worker killed mid-run. Every case ends (no hang)
with the promised exit code and one line on stderr, and leaves loadable files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from faultkit import (CHILD_ENV, ROOT, assert_one_line, child, finish, npz_metadata, popen,
                      run_cli, strict_json, train_args)

from minicnn import load_model
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.fast.replicas import Replicas
from minicnn.resume import read_resume_config, resume_path


# --- divergence --------------------------------------------------------------------------

def test_a_learning_rate_that_diverges_stops_with_one_line_and_writes_nothing(
        data, tmp_path, capsys, one_process):
    """--lr 1e6 trained to NaN, exited 0, saved NaN weights and NaN into history JSON."""
    out = tmp_path / "m.npz"
    code, _, err = run_cli(train_args(data, out, "--lr", "1e6", "--schedule", "constant"),
                           capsys)
    assert_one_line(code, err, 1, "training diverged", "epoch 1, step", "lower --lr",
                    "nothing was saved")
    assert list(tmp_path.iterdir()) == []


def test_divergence_mid_run_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch,
                                                           capsys, one_process):
    out = tmp_path / "m.npz"
    calls = {"n": 0}
    real_forward = SoftmaxCrossEntropy.forward

    def forward(self, logits, labels):
        calls["n"] += 1
        if calls["n"] == 6:                         # epoch 2, step 2 (4 steps per epoch)
            seen.update({p: p.read_bytes() for p in (out, resume_path(out))})
            logits = logits * np.float32(np.inf)
        return real_forward(self, logits, labels)

    seen = {}
    monkeypatch.setattr(SoftmaxCrossEntropy, "forward", forward)
    code, _, err = run_cli(train_args(data, out), capsys)
    assert_one_line(code, err, 1, "the loss became nan at epoch 2, step 2",
                    "from the end of epoch 1) is unchanged", "lower --lr")
    for path, content in seen.items():
        assert path.read_bytes() == content
    load_model(out)


@pytest.mark.parametrize("option,value", [("--lr", "inf"), ("--lr", "nan"),
                                          ("--momentum", "nan"), ("--weight-decay", "inf"),
                                          ("--warmup", "nan"), ("--label-smoothing", "inf"),
                                          ("--crop-padding", "100000")])
def test_non_finite_or_huge_options_are_refused_at_parse_time(option, value, tmp_path, capsys):
    code, _, err = run_cli(["train", option, value, "--out", tmp_path / "m.npz"], capsys)
    assert_one_line(code, err, 2, option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv,snippet", [
    (["--model", "airnet", "--width", "100000"], "width must be a whole number between 1"),
    (["--nesterov", "--momentum", "0"], "Nesterov momentum needs momentum > 0")])
def test_options_that_cannot_work_are_refused_before_anything_is_written(
        data, tmp_path, capsys, argv, snippet):
    code, _, err = run_cli(["train", "--data-dir", data, "--out", tmp_path / "r" / "m.npz",
                            *argv], capsys)
    assert_one_line(code, err, 1, snippet)
    assert not (tmp_path / "r").exists()


# --- signals -----------------------------------------------------------------------------

@pytest.mark.parametrize("delay", [0.0, 0.1, 0.3, "after epoch 1"])
def test_ctrl_c_to_the_group_while_the_workers_start_never_hangs(data, tmp_path, delay):
    """Ctrl-C to the process group while the replica workers started hung train for 37
    minutes (the parent blocked writing to a pipe it also held open). The last case
    lands in training: the resume point is saved. Shared memory the child left would be
    reported by multiprocessing's resource tracker on its stderr ("leaked")."""
    out = tmp_path / "m.npz"
    process = popen(train_args(data, out, "--epochs", "1000"), env={"MINICNN_PROCESSES": "2"})
    assert process.stdout.readline().startswith("training lenet")   # replicas start now
    if delay == "after epoch 1":
        assert process.stdout.readline().startswith("epoch   1/")
    else:
        time.sleep(delay)
    os.killpg(process.pid, signal.SIGINT)
    code, _, err = finish(process, timeout=60)
    line = assert_one_line(code, err, 130, "interrupted")
    assert "leaked" not in err
    if "saved" in line:
        read_resume_config(resume_path(out))
    else:                                      # before fit (KeyboardInterrupt) or in it
        assert list(tmp_path.iterdir()) == []


def test_sigterm_is_handled_as_ctrl_c_and_the_run_resumes(data, tmp_path):
    out = tmp_path / "m.npz"
    process = popen(train_args(data, out, "--epochs", "20"))
    for line in process.stdout:
        if line.startswith("epoch   1/"):
            break
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert_one_line(code, err, 130, "interrupted", "--resume")
    epochs_done = npz_metadata(resume_path(out))["epoch"]
    assert 1 <= epochs_done < 20
    load_model(out)
    resumed = child([*train_args(data, out, "--epochs", "20"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert npz_metadata(out)["training"]["epochs_completed"] == 20


# classify, with SIGTERM sent to itself while it reads the images
SIGTERM_IN_CLASSIFY = """
import os, signal, sys, time
import minicnn.cli as cli
def load_images(paths):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)
    raise AssertionError("SIGTERM was not delivered")
cli.load_images = load_images
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_outside_training_is_a_clean_interrupt():
    result = subprocess.run([sys.executable, "-c", SIGTERM_IN_CLASSIFY, "classify", "x.png",
                             "--weights", ROOT / "weights" / "lenet_cifar10.npz"],
                            capture_output=True, text=True, env=CHILD_ENV, timeout=60)
    assert_one_line(result.returncode, result.stderr, 130, "minicnn classify: interrupted")


def test_a_worker_killed_mid_run_is_one_line_and_the_run_resumes(data, tmp_path, monkeypatch,
                                                                 capsys):
    """A worker killed by the OOM killer (SIGKILL) gave a RuntimeError traceback."""
    monkeypatch.setenv("MINICNN_PROCESSES", "2")
    calls = {"n": 0}
    real = Replicas.forward_backward

    def forward_backward(self, x, labels):
        calls["n"] += 1
        if calls["n"] == 6:                          # epoch 2, step 2
            os.kill(self.worker_pids[0], signal.SIGKILL)
            self._workers[0]["process"].join()
        return real(self, x, labels)

    monkeypatch.setattr(Replicas, "forward_backward", forward_backward)
    out = tmp_path / "m.npz"
    code, _, err = run_cli(train_args(data, out), capsys)
    assert_one_line(code, err, 1, "killed by SIGKILL", "saved the resume point after step 1 of "
                    "epoch 2", "--resume")
    assert npz_metadata(out)["training"]["epochs_completed"] == 1
    assert (npz_metadata(resume_path(out))["epoch"], npz_metadata(resume_path(out))["step"]) \
        == (1, 1)
    monkeypatch.setattr(Replicas, "forward_backward", real)
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    code, _, err = run_cli([*train_args(data, out), "--resume"], capsys)
    assert code == 0, err


def test_evaluate_json_is_valid_json(data, tmp_path, capsys, one_process):
    out = tmp_path / "m.npz"
    assert run_cli(train_args(data, out), capsys)[0] == 0
    code, text, err = run_cli(["evaluate", "--weights", out, "--data-dir", data, "--json"],
                              capsys)
    assert code == 0, err
    assert strict_json(text)["n"] == 20


# Replicas that nobody closes, with weakref.finalize's exit hook registered before
# multiprocessing's (which then runs first, sends SIGTERM and waits)
UNCLOSED_REPLICAS = """
import weakref
class Early:
    pass
early = Early()
weakref.finalize(early, lambda: None)
from minicnn import models
from minicnn.losses import SoftmaxCrossEntropy
from minicnn.fast.replicas import Replicas
group = Replicas(models.build_model("lenet"), SoftmaxCrossEntropy(), processes=2)
"""


def test_replicas_nobody_closed_do_not_hang_the_exit():
    """Workers ignore SIGTERM (it is the calling process's to handle), so multiprocessing's
    own exit handler would wait for them forever; minicnn stops them first."""
    result = subprocess.run([sys.executable, "-c", UNCLOSED_REPLICAS], capture_output=True,
                            text=True, env=CHILD_ENV, timeout=60)
    assert result.returncode == 0 and result.stderr == ""
