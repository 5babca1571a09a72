"""docs/own-model.md runs as written: its Python trains and saves a model
(on a tiny CIFAR-10 look-alike), its commands classify, export and convert that file, and
its onnxruntime lines give the logits minicnn gives."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import example_images, make_cifar_folder

from minicnn import load_model

ROOT = Path(__file__).resolve().parents[1]
SECTION = (ROOT / "docs" / "own-model.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", SECTION, flags=re.S)
TRAIN, COMMANDS, ONNXRUNTIME = (code for _, code in BLOCKS)


def test_the_section_is_one_example_in_three_blocks():
    assert [language for language, _ in BLOCKS] == ["python", "bash", "python"]
    assert "fit(" in TRAIN and "save_model(" in SECTION
    assert [line.split()[1] for line in COMMANDS.splitlines()] == ["classify", "export",
                                                                   "convert"]
    assert len(ONNXRUNTIME.splitlines()) == 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder where the page's Python has run, as a user's project would be."""
    folder = tmp_path_factory.mktemp("own_model")
    data = make_cifar_folder(folder / "data", per_batch=20)
    (folder / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "MINICNN_DATA": str(data),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", TRAIN], cwd=folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (folder / "runs" / "mine.npz").is_file()
    return folder, env


def run_command(line: str, workdir) -> subprocess.CompletedProcess:
    """One command line of the page, with `minicnn` this checkout's (python -m minicnn)."""
    folder, env = workdir
    script = f'minicnn() {{ "{sys.executable}" -m minicnn "$@"; }}\n{line}'
    return subprocess.run(["bash", "-c", script], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def command(name: str) -> str:
    return next(line for line in COMMANDS.splitlines() if line.split()[1] == name)


def test_the_model_is_saved_with_its_architecture_and_classified(workdir):
    folder, _ = workdir
    _, metadata = load_model(folder / "runs" / "mine.npz")
    assert metadata["model"] is None and metadata["architecture"]["type"] == "Sequential"
    result = run_command(command("classify"), workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("examples/images/cat.png: ")


def missing(*packages) -> list:
    return [p for p in packages if importlib.util.find_spec(p) is None]


@pytest.mark.skipif(bool(missing("onnx", "onnxruntime")),
                    reason="onnx and onnxruntime are not installed (pip install onnx onnxruntime)")
def test_export_and_the_two_onnxruntime_lines(workdir, monkeypatch):
    folder, _ = workdir
    result = run_command(command("export"), workdir)
    assert result.returncode == 0, result.stderr
    model, metadata = load_model(folder / "runs" / "mine.npz")
    x = example_images(metadata)
    monkeypatch.chdir(folder)
    namespace = {"x": x}
    exec(compile(ONNXRUNTIME, "docs/own-model.md", "exec"), namespace)
    np.testing.assert_allclose(namespace["logits"], model.eval().forward(x), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.skipif(bool(missing("safetensors")),
                    reason="safetensors is not installed (pip install safetensors)")
def test_convert(workdir):
    folder, _ = workdir
    result = run_command(command("convert"), workdir)
    assert result.returncode == 0, result.stderr
    assert (folder / "runs" / "mine.safetensors").is_file()
