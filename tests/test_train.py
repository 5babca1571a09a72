"""fit() and evaluate(): learning, reproducibility, Ctrl-C and exact resume."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from minicnn import backend, build_model, load_model
from minicnn.data import CLASS_NAMES, Dataset
from minicnn.train import (TrainConfig, TrainingInterrupted, evaluate, fit, history_path,
                           state_path)

NORMALIZATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def colour_dataset(n, seed):
    """Each class has its own colour plus noise: easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    colours = np.random.default_rng(99).integers(20, 236, size=(10, 3))
    labels = rng.integers(0, 10, n)
    noise = rng.integers(-20, 21, size=(n, 3, 32, 32))
    images = np.clip(colours[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
    return Dataset(images, labels.astype(np.int64), CLASS_NAMES)


SETTINGS = {"epochs": 3, "batch_size": 32, "lr": 0.05, "seed": 5, "crop_padding": 2}


def run(tmp_path, name="w.npz", **overrides):
    config = TrainConfig(**{**SETTINGS, **overrides})
    backend.use(backend.name(), seed=config.seed)
    model = build_model("lenet")
    metadata = fit(model, colour_dataset(256, 0), colour_dataset(100, 1), config, tmp_path / name,
                   progress=False, log=lambda line: None)
    return model, metadata


def test_fit_learns_and_saves_everything(tmp_path, xp):
    model, metadata = run(tmp_path, epochs=8, schedule="cosine", batch_size=16, lr=0.02)
    history = metadata["training"]
    assert history["epochs_completed"] == 8 and history["backend"] == backend.name()
    # Chance is 0.1. Training on 256 images is noisy, and CuPy's generator draws other
    # numbers than NumPy's from the same seed: seeds 5-20 gave 0.36-1.0 (median 0.8)
    # on NumPy and on the CuPy stand-in alike (at batch 32 and lr 0.05, 0.21-1.0).
    assert metadata["test_accuracy"] > 0.3
    saved = json.loads(history_path(tmp_path / "w.npz").read_text())
    losses = [h["train_loss"] for h in saved["history"]]
    assert losses[-1] < losses[0]
    assert model.needs_input_grad          # fit turns input gradients off only while training
    loaded, card = load_model(tmp_path / "w.npz")
    assert card["test_accuracy"] == metadata["test_accuracy"]
    assert set(card["test_per_class"]) == set(CLASS_NAMES)
    assert card["normalization"]["mean"] == pytest.approx([0.4914, 0.4822, 0.4465], abs=1e-4)


def test_same_seed_gives_the_same_weights(tmp_path):
    a, _ = run(tmp_path, "a.npz", epochs=2)
    b, _ = run(tmp_path, "b.npz", epochs=2)
    c, _ = run(tmp_path, "c.npz", epochs=2, seed=6)
    for name, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[name])
    assert not np.array_equal(a.state_dict()["0.weight"], c.state_dict()["0.weight"])


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    reference, _ = run(tmp_path, "ref.npz")

    import minicnn.train as train_module
    calls = {"n": 0}
    real_step = train_module.SGD.step

    def step_then_ctrl_c(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == 13:          # in the middle of epoch 2 (8 steps per epoch)
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module.SGD, "step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run(tmp_path, "w.npz")
    monkeypatch.setattr(train_module.SGD, "step", real_step)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    state = json.loads(str(np.load(state_path(tmp_path / "w.npz"))["__metadata__"]))
    assert (state["epoch"], state["step"]) == (1, 5)   # the step in progress was finished

    model = build_model("lenet")
    fit(model, colour_dataset(256, 0), colour_dataset(100, 1), TrainConfig(**SETTINGS),
        tmp_path / "w.npz", resume=True, progress=False, log=lambda line: None)
    for name, value in reference.state_dict().items():
        np.testing.assert_array_equal(model.state_dict()[name], value)


def test_evaluate_reports_per_class_and_confusion():
    model = build_model("lenet")
    dataset = colour_dataset(50, 3)
    result = evaluate(model, dataset, NORMALIZATION, batch_size=16)
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 50 == result["n"]
    assert result["accuracy"] == pytest.approx(confusion.trace() / 50)
    counts = np.bincount(dataset.labels, minlength=10)
    for i, name in enumerate(CLASS_NAMES):
        expected = confusion[i, i] / counts[i] if counts[i] else None
        assert result["per_class"][name] == expected


def test_tta_averages_the_logits_of_image_and_mirror():
    from minicnn.train import predict_logits
    model = build_model("lenet")
    images = colour_dataset(6, 3).images
    both = predict_logits(model, images, NORMALIZATION, tta=True)
    plain = predict_logits(model, images, NORMALIZATION)
    mirrored = predict_logits(model, np.ascontiguousarray(images[..., ::-1]), NORMALIZATION)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(both, plain)


def test_fit_records_tta_and_the_recipe_options(tmp_path):
    config = TrainConfig(model="airnet", width=4, epochs=2, batch_size=32, lr=0.1, seed=5,
                         nesterov=True, schedule="linear", warmup=0.2, label_smoothing=0.2,
                         decay_norm_and_bias=False, crop_padding=2, tta=True)
    backend.use("numpy", seed=config.seed)
    model = build_model("airnet", **config.model_config())
    metadata = fit(model, colour_dataset(128, 0), colour_dataset(60, 1), config,
                   tmp_path / "a.npz", progress=False, log=lambda line: None)
    assert metadata["tta"] is True
    saved = json.loads(history_path(tmp_path / "a.npz").read_text())["history"]
    assert "test_accuracy_tta" in saved[-1] and "test_accuracy_tta" not in saved[0]
    assert metadata["test_accuracy"] == saved[-1]["test_accuracy_tta"]
    assert metadata["test_accuracy_plain"] == saved[-1]["test_accuracy"]
    loaded, card = load_model(tmp_path / "a.npz")
    assert card["config"] == {"width": 4} and card["tta"] is True
    assert evaluate(loaded, colour_dataset(60, 1), card["normalization"],
                    tta=True)["accuracy"] == metadata["test_accuracy"]


def test_fit_on_several_processes_matches_one_up_to_rounding(tmp_path, monkeypatch):
    """fit splits each batch over processes (minicnn.replicas) on the NumPy backend."""
    if backend.name() != "numpy":
        pytest.skip("replicas run on the NumPy backend only")
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    one, _ = run(tmp_path, "one.npz", epochs=1)
    monkeypatch.setenv("MINICNN_PROCESSES", "2")
    two, metadata = run(tmp_path, "two.npz", epochs=1)
    assert metadata["training"]["epochs_completed"] == 1
    for name, value in one.state_dict().items():
        other = two.state_dict()[name]
        assert other.base is None                   # fit's replicas are closed again
        assert np.abs(other - value).max() <= 1e-4 * np.abs(value).max()
