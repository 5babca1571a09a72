"""fit() and evaluate(): learning, reproducibility, Ctrl-C and exact resume."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from minicnn import backend, build_model, load_model
from minicnn.data import CLASS_NAMES, Dataset
from minicnn.resume import resume_path
from minicnn.train import TrainConfig, TrainingInterrupted, evaluate, fit

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


def run(tmp_path, name="w.npz", resume=False, settings=SETTINGS, **overrides):
    config = TrainConfig(**{**settings, **overrides})
    backend.use(backend.name(), seed=config.seed)
    model = build_model(config.model, **config.model_config())
    metadata = fit(model, colour_dataset(256, 0), colour_dataset(100, 1), config, tmp_path / name,
                   resume=resume, progress=False, log=lambda line: None)
    return model, metadata


def ctrl_c_after_step(monkeypatch, count: int):
    """Make SGD.step send SIGINT (as Ctrl-C does) after its count-th call; returns a
    function that restores SGD.step."""
    import minicnn.train as train_module
    calls = {"n": 0}
    real_step = train_module.SGD.step

    def step_then_ctrl_c(self):
        real_step(self)
        calls["n"] += 1
        if calls["n"] == count:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module.SGD, "step", step_then_ctrl_c)
    return lambda: monkeypatch.setattr(train_module.SGD, "step", real_step)


def test_fit_learns_and_saves_everything(tmp_path, xp):
    model, metadata = run(tmp_path, epochs=8, schedule="cosine", batch_size=16, lr=0.02)
    history = metadata["training"]
    assert history["epochs_completed"] == 8 and history["backend"] == backend.name()
    # Chance is 0.1. Training on 256 images is noisy, and CuPy's generator draws other
    # numbers than NumPy's from the same seed: seeds 5-20 gave 0.36-1.0 (median 0.8)
    # on NumPy and on the CuPy stand-in alike (at batch 32 and lr 0.05, 0.21-1.0).
    assert metadata["test_accuracy"] > 0.3
    loaded, card = load_model(tmp_path / "w.npz")
    losses = [h["train_loss"] for h in card["training"]["history"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert model.needs_input_grad          # fit turns input gradients off only while training
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
    handler_before = signal.getsignal(signal.SIGINT)   # SIG_IGN where CI runs in the background
    restore = ctrl_c_after_step(monkeypatch, 13)     # in the middle of epoch 2 (8 steps each)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run(tmp_path, "w.npz")
    restore()
    assert signal.getsignal(signal.SIGINT) is handler_before
    state = json.loads(str(np.load(resume_path(tmp_path / "w.npz"))["__metadata__"]))
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
    assert metadata["tta"] == "flip"          # tta=True: flips, as before the TTA modes
    saved = load_model(tmp_path / "a.npz")[1]["training"]["history"]
    assert "test_accuracy_tta" in saved[-1] and "test_accuracy_tta" not in saved[0]
    assert metadata["test_accuracy"] == saved[-1]["test_accuracy_tta"]
    assert metadata["test_accuracy_plain"] == saved[-1]["test_accuracy"]
    loaded, card = load_model(tmp_path / "a.npz")
    assert card["config"] == {"width": 4} and card["tta"] == "flip"
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


def test_the_recipe_on_several_processes_matches_one_up_to_rounding(tmp_path, monkeypatch):
    """BatchNorm's statistics shared across processes, and the replicas made anew when the
    whitening stem's bias freezes (the model's parameters change) after epoch 1."""
    if backend.name() != "numpy":
        pytest.skip("replicas run on the NumPy backend only")
    monkeypatch.setenv("MINICNN_PROCESSES", "1")
    one, _ = run(tmp_path, "one.npz", settings=RECIPE, epochs=2, lookahead=False)
    monkeypatch.setenv("MINICNN_PROCESSES", "2")
    two, _ = run(tmp_path, "two.npz", settings=RECIPE, epochs=2, lookahead=False)
    assert not two.layers[0].bias_trainable
    for name, value in one.state_dict().items():
        other = two.state_dict()[name]
        assert np.abs(other - value).max() <= 1e-3 * max(np.abs(value).max(), 1e-3), name


RECIPE = {"model": "airnet", "widths": [4, 8, 8], "stem": "whiten", "dirac": True,
          "bn_momentum": 0.4, "bn_eps": 1e-12, "whiten_bias_epochs": 1, "epochs": 3,
          "batch_size": 32, "lr": 0.2, "norm_lr_scale": 64.0, "momentum": 0.85,
          "nesterov": True, "weight_decay": 1.33e-3, "schedule": "linear", "warmup": 0.23,
          "lr_start_factor": 0.2, "lr_end_factor": 0.07, "label_smoothing": 0.2,
          "flip_rule": "alternating", "crop_padding": 2, "crop_mode": "reflect",
          "lookahead": True, "lookahead_every": 2, "lookahead_start_epoch": 1,
          "tta": "flip-translate", "seed": 5}


def run_recipe(tmp_path, name="r.npz", resume=False):
    return run(tmp_path, name, resume, settings=RECIPE)


def test_the_airbench_recipe_trains_and_records_itself(tmp_path):
    """Whitening filters set from the data, its bias frozen after epoch 1, the averaged
    weights saved, TTA recorded; evaluate reproduces the recorded accuracy."""
    model, metadata = run_recipe(tmp_path)
    stem = model.layers[0]
    assert not stem.bias_trainable and float(np.abs(stem.buffers["bias"]).max()) > 0
    weight = stem.buffers["weight"].reshape(24, -1)
    np.testing.assert_allclose(weight[:12], -weight[12:])         # the +-eigenvector pairs
    state = np.load(resume_path(tmp_path / "r.npz"))
    averaged = {k.removeprefix("lookahead/"): state[k] for k in state.files
                if k.startswith("lookahead/")}
    assert set(averaged) == set(model.state_dict())
    for name, value in model.state_dict().items():               # saved = the average
        np.testing.assert_array_equal(averaged[name], value)
    assert metadata["tta"] == "flip-translate" and metadata["test_accuracy"] > 0.3
    loaded, card = load_model(tmp_path / "r.npz")
    assert evaluate(loaded, colour_dataset(100, 1), card["normalization"],
                    tta=card["tta"])["accuracy"] == metadata["test_accuracy"]


def test_ctrl_c_and_resume_with_the_recipe_match_an_uninterrupted_run(tmp_path, monkeypatch):
    """Interrupted in epoch 2 after the lookahead started and the stem's bias froze;
    --resume restores the average, the freeze and the alternating flips, bit for bit."""
    reference, _ = run_recipe(tmp_path, "ref.npz")
    restore = ctrl_c_after_step(monkeypatch, 13)     # epoch 2 of 3, step 5 of 8; pulls at 10, 12
    with pytest.raises(TrainingInterrupted, match="--resume"):
        run_recipe(tmp_path, "w.npz")
    restore()
    state = np.load(resume_path(tmp_path / "w.npz"))
    assert any(k.startswith("lookahead/") for k in state.files)
    resumed, _ = run_recipe(tmp_path, "w.npz", resume=True)
    for name, value in reference.state_dict().items():
        np.testing.assert_array_equal(resumed.state_dict()[name], value)


def test_holdout_eval_at_the_end_and_each_epochs_weights(tmp_path):
    """--holdout evaluates on held-out training images and names them so; without
    per-epoch evaluation only the last epoch has an accuracy; each epoch's weights kept."""
    from minicnn.train import epoch_weights_path
    config = TrainConfig(model="airnet", width=2, epochs=2, batch_size=32, seed=1, holdout=50,
                         eval_each_epoch=False, keep_epoch_weights=True, tta="flip")
    backend.use("numpy", seed=1)
    model = build_model("airnet", **config.model_config())
    metadata = fit(model, colour_dataset(200, 0), colour_dataset(60, 1), config,
                   tmp_path / "h.npz", progress=False, log=lambda line: None)
    history = metadata["training"]["history"]
    assert [h["holdout_accuracy"] is None for h in history] == [True, False]
    assert all("test_accuracy" not in h for h in history)
    assert metadata["training"]["train_images"] == 150
    assert metadata["holdout"] == {"images": 50, "seed": 0} and "test_accuracy" not in metadata
    assert metadata["holdout_accuracy"] == history[-1]["holdout_accuracy_tta"]
    assert metadata["holdout_accuracy_plain"] == history[-1]["holdout_accuracy"]
    for epoch in (1, 2):
        assert load_model(epoch_weights_path(tmp_path / "h.npz", epoch))[1][
            "training"]["epochs_completed"] == epoch
    final = load_model(epoch_weights_path(tmp_path / "h.npz", 2))[0].state_dict()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(final[name], value)
