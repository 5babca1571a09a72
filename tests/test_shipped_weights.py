"""The pretrained files in weights/: complete model cards, the promised accuracy,
and the README's first command (classify the sample images) working."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REAL_DATA, first_pass_only, requires_real_data

from minicnn import load_model
from minicnn.cli import WEIGHTS_DIR, default_weights, main, shipped_weights
from minicnn.data import CLASS_NAMES, load_cifar10
from minicnn.train import evaluate

SHIPPED = list(shipped_weights())
SAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "images").glob("*.png"))
PROMISED = {"lenet_cifar10.npz": 0.68, "airnet_cifar10.npz": 0.90, "airnet93_cifar10.npz": 0.93}


def test_weights_are_shipped():
    assert {p.name for p in SHIPPED} >= set(PROMISED)
    for path in SHIPPED:
        assert path.stat().st_size < 8 * 2**20, f"{path} is too large to ship"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_model_card_in_the_file(path):
    model, metadata = load_model(path)
    assert metadata["class_names"] == list(CLASS_NAMES)
    assert len(metadata["normalization"]["mean"]) == 3
    training = metadata["training"]
    assert training["epochs_completed"] == training["config"]["epochs"]
    assert metadata["test_accuracy"] >= PROMISED.get(path.name, 0.0)
    card = (WEIGHTS_DIR / "README.md").read_text()
    assert path.name in card and f"{metadata['test_accuracy']:.2%}" in card


def test_default_weights_is_the_most_accurate():
    best = max(SHIPPED, key=lambda p: load_model(p)[1]["test_accuracy"])
    assert default_weights() == best


@requires_real_data
@first_pass_only("runs on NumPy only, in CI's first pass (minutes per file with six-view "
                 "TTA; the CuPy stand-in would repeat the same NumPy work)")
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_recorded_accuracy_is_reproduced_on_the_test_set(path):
    model, metadata = load_model(path)
    _, test = load_cifar10(REAL_DATA, download=False)
    result = evaluate(model, test, metadata["normalization"], tta=metadata.get("tta", False))
    assert result["accuracy"] == pytest.approx(metadata["test_accuracy"], abs=1e-4)
    assert result["accuracy"] >= PROMISED.get(path.name, 0.0)


def test_sample_images_are_classified(capsys):
    """The README's first command: one sample image per class (the first test image
    of each class, chosen without looking). The shipped lenet gets 5 of 10 right;
    a model at chance would reach 4 about 1% of the time."""
    assert [p.stem for p in SAMPLES] == sorted(CLASS_NAMES)
    assert main(["classify", *map(str, SAMPLES), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    top1 = [r["predictions"][0]["label"] for r in results]
    correct = sum(label == Path(r["path"]).stem for label, r in zip(top1, results, strict=True))
    assert correct >= 4, top1
