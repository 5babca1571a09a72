"""Helpers of the fault-injection tests (tests/test_faults_*.py): run the command line in
this process or in a child, and check the promise for bad input: the expected exit
code, one line on stderr, no traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from minicnn.cli import main

ROOT = Path(__file__).resolve().parents[1]
# children run this checkout's code, on one process and one thread (fast, and the same
# rounding in every run, so interrupted and uninterrupted runs can be compared bit for bit)
CHILD_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
             "MINICNN_PROCESSES": "1", "MINICNN_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
TINY_TRAIN = ["--epochs", "2", "--batch-size", "16", "--limit", "64", "--no-progress"]


def train_args(data, out, *extra) -> list:
    """A tiny run: 2 epochs of 4 steps on 64 images."""
    return ["train", "--data-dir", data, "--out", out, *TINY_TRAIN, *extra]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """main(argv) in this process: (exit code, stdout, stderr); SystemExit (argparse's
    usage errors) gives its code."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def as_in_a_terminal(then=None):
    """What the child runs before the command: Ctrl-C acts as it does at a terminal (a
    shell without job control starts background jobs, `.ci/run &`, with SIGINT ignored,
    and children inherit that; the Ctrl-C tests would send a signal nobody hears), then
    the test's own preexec_fn, if any."""
    def prepare():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if then is not None:
            then()
    return prepare


def child(argv, timeout: float = 60, env=None, **options) -> subprocess.CompletedProcess:
    """python -m minicnn ARGV in a child process (text output); TimeoutExpired is a hang."""
    return subprocess.run([sys.executable, "-m", "minicnn", *map(str, argv)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**CHILD_ENV, **(env or {})},
                          preexec_fn=as_in_a_terminal(options.pop("preexec_fn", None)),
                          **options)


def popen(argv, env=None, **options) -> subprocess.Popen:
    """python -m minicnn ARGV started in a session of its own (its own process group)."""
    return subprocess.Popen([sys.executable, "-m", "minicnn", *map(str, argv)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**CHILD_ENV, **(env or {})}, start_new_session=True,
                            preexec_fn=as_in_a_terminal(options.pop("preexec_fn", None)),
                            **options)


def finish(process: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    """Wait for a child; a hang is killed (its whole group) and fails the test."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"no exit within {timeout} s: a hang") from None
    return process.returncode, out, err


def assert_one_line(code, err: str, expected_code: int = 1, *snippets) -> str:
    """The promise for bad input: this exit code, exactly one line on stderr, no
    traceback, and every snippet in that line."""
    lines = err.splitlines()
    assert code == expected_code, f"exit code {code}, stderr: {err!r}"
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert "Traceback" not in err and "Warning" not in err, err
    for snippet in snippets:
        assert snippet in lines[0], f"{snippet!r} not in {lines[0]!r}"
    return lines[0]


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as RFC 8259 does."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def npz_metadata(path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(str(npz["__metadata__"]))


def npz_arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files if name != "__metadata__"}


def rewrite_npz(source, target, metadata=None, arrays=None, drop=()) -> Path:
    """A copy of an .npz with its metadata and some arrays replaced (crafted files)."""
    content = npz_arrays(source)
    content.update(arrays or {})
    for name in drop:
        content.pop(name, None)
    meta = npz_metadata(source) if metadata is None else metadata
    content["__metadata__"] = np.array(json.dumps(meta))
    with open(target, "wb") as f:
        np.savez(f, **content)
    return Path(target)
