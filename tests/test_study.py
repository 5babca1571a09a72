"""The study tools: trace, visualize, and the saliency gradient they rely on."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicnn import backend, cli, data
from minicnn.checkpoint import load_model
from minicnn.gradcheck import numerical_gradient
from minicnn.images import load_images
from minicnn.models import build_model
from minicnn.visualize import feature_map_grids, filter_grid, saliency

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights" / "lenet_cifar10.npz"
CAT = ROOT / "examples" / "images" / "cat.png"


def load_example_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name,config", [("lenet", {}), ("airnet", {"width": 2})])
def test_saliency_matches_finite_differences_on_a_few_pixels(name, config):
    """For airnet: BatchNorm with its running statistics (moved off 0 and 1 first),
    as in eval mode, not the statistics of the one image."""
    backend.use("numpy", seed=3)
    model = build_model(name, **config).astype(np.float64)
    model.forward(backend.make_rng(5).standard_normal((8, 3, 32, 32)) * 2 + 1)
    x = backend.make_rng(4).standard_normal((1, 3, 32, 32))
    gradient = saliency(model, x, class_index=7)

    def logit():
        return model.eval().forward(x)[0, 7]

    entries = [5, 1000, 2047, 3071]
    numeric = numerical_gradient(logit, x, entries=entries).reshape(-1)[entries]
    np.testing.assert_allclose(gradient.reshape(-1)[entries], numeric, rtol=1e-6, atol=1e-9)
    assert np.abs(gradient).sum() > 0


def test_visualize_writes_images_of_the_right_sizes(tmp_path, capsys):
    script = load_example_script("visualize")
    assert script.main([str(WEIGHTS), str(CAT), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    # tile_grid: tiles scaled up, 2-pixel gaps around each, at most 8 per row
    filters = Image.open(tmp_path / "filters.png")
    assert filters.size == (6 * (5 * 12 + 2) + 2, 5 * 12 + 2 + 2) and filters.mode == "RGB"
    first = Image.open(tmp_path / "features_layer0.png")          # 6 maps of 28x28, x4
    assert first.size == (6 * (28 * 4 + 2) + 2, 28 * 4 + 2 + 2)
    second = Image.open(tmp_path / "features_layer3.png")         # 16 maps of 10x10: 2 rows
    assert second.size == (8 * (10 * 4 + 2) + 2, 2 * (10 * 4 + 2) + 2)
    heat = Image.open(tmp_path / "saliency.png")                   # image and map, x8
    assert heat.size == (2 * (32 * 8 + 2) + 2, 32 * 8 + 2 + 2)
    for name in ("filters.png", "features_layer0.png", "features_layer3.png", "saliency.png"):
        assert str(tmp_path / name) in printed
        assert np.asarray(Image.open(tmp_path / name)).std() > 0     # not a blank picture
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "curves.png").stat().st_size > 1000
        assert Image.open(tmp_path / "curves.png").size == (1000, 400)


def test_visualize_bad_weights_is_one_line_and_exit_1(tmp_path, capsys):
    script = load_example_script("visualize")
    assert script.main([str(tmp_path / "missing.npz"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("visualize: error:") and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_feature_maps_are_the_conv_outputs():
    backend.use("numpy")
    model, metadata = load_model(WEIGHTS)
    _, images, _ = load_images([CAT])
    x = data.normalize(images, **metadata["normalization"])
    grids = feature_map_grids(model, x)
    assert sorted(grids) == [0, 3]
    assert filter_grid(model).mode == "RGB"


def test_trace_prints_every_layer_forward_and_backward(capsys):
    assert cli.main(["trace", str(CAT), "--label", "cat"]) == 0
    out = capsys.readouterr().out
    assert "(1, 6, 28, 28)" in out and "(1, 10)" in out
    assert "label 3 (cat)" in out
    backward = out.split("backward")[1]
    for shape in ("(6, 3, 5, 5)", "(16, 6, 5, 5)", "(1, 3, 32, 32)", "(128, 400)"):
        assert shape in backward
    norms = [float(line.split("norm")[1]) for line in backward.splitlines() if "norm" in line]
    assert len(norms) == 1 + 12 + 10 and all(n >= 0 for n in norms) and max(norms) > 0


def test_trace_rejects_an_unknown_label(capsys):
    assert cli.main(["trace", str(CAT), "--label", "unicorn"]) == 1
    err = capsys.readouterr().err
    assert "--label must be a class name" in err and len(err.strip().splitlines()) == 1


def test_shipped_history_has_what_the_curves_plot():
    history = json.loads(WEIGHTS.with_suffix(".history.json").read_text())["history"]
    assert {"epoch", "train_loss", "train_accuracy", "test_accuracy"} <= set(history[0])
