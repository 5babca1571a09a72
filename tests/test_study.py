"""The study tools: the input gradients (against finite differences), the conv outputs
that visualize draws, and ``minicnn trace``. ``minicnn visualize`` itself: test_visualize.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from minicnn import backend, cli, data, kernels
from minicnn.checkpoint import load_model
from minicnn.gradcheck import numerical_gradient
from minicnn.images import load_image
from minicnn.layers import Conv2d, Flatten, Linear, MaxPool2d, ReLU, Residual, Sequential
from minicnn.models import build_model
from minicnn.study.activations import conv_outputs
from minicnn.study.gradients import (gradient_times_input, input_gradient, noise_sigma,
                                     noisy_copies, smoothgrad)
from minicnn.study.inputs import read_history

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "weights" / "lenet_cifar10.npz"
CAT = ROOT / "examples" / "images" / "cat.png"
ENTRIES = [5, 1000, 2047, 3071]          # flat indices of x (1, 3, 32, 32) to check


def float64_model(name, **config):
    """A float64 model whose BatchNorm running statistics were moved off 0 and 1."""
    backend.use("numpy", seed=3)
    model = build_model(name, **config).astype(np.float64)
    model.forward(backend.make_rng(5).standard_normal((8, 3, 32, 32)) * 2 + 1)
    return model


def logit_of(model, x, class_index):
    """z_c(x) in eval mode (BatchNorm on its running statistics), reading x when called."""
    return lambda: model.eval().forward(x)[0, class_index]


# --- the gradients, against finite differences -------------------------------------------

@pytest.mark.parametrize("name,config", [("lenet", {}), ("airnet", {"width": 2})])
def test_input_gradient_matches_finite_differences(name, config):
    model = float64_model(name, **config)
    x = backend.make_rng(4).standard_normal((1, 3, 32, 32))
    gradient = input_gradient(model, x, class_index=7)
    numeric = numerical_gradient(logit_of(model, x, 7), x, entries=ENTRIES).reshape(-1)
    np.testing.assert_allclose(gradient.reshape(-1)[ENTRIES], numeric[ENTRIES],
                               rtol=1e-6, atol=1e-9)
    assert np.abs(gradient).sum() > 0


def test_each_image_of_a_batch_gets_the_gradient_of_its_own_logit():
    model = float64_model("airnet", width=2)           # BatchNorm: running statistics
    x = backend.make_rng(6).standard_normal((3, 3, 32, 32))
    together = input_gradient(model, x, class_index=2)
    for i in range(3):
        np.testing.assert_allclose(together[i:i + 1], input_gradient(model, x[i:i + 1], 2),
                                   rtol=1e-10, atol=1e-14)


def test_smoothgrad_is_the_mean_finite_difference_gradient_over_its_noisy_copies():
    model = float64_model("lenet")
    x = backend.make_rng(4).standard_normal((1, 3, 32, 32))
    samples, noise, seed = 4, 0.3, 11
    smooth = smoothgrad(model, x, 7, samples=samples, noise=noise, seed=seed,
                        batch_size=samples)
    copies = noisy_copies(x, samples, noise_sigma(x, noise), backend.make_rng(seed))
    assert not np.allclose(copies[0], copies[1]) and not np.allclose(copies[0], x)
    numeric = np.zeros(len(ENTRIES))
    for copy in copies:
        copy = copy[None].copy()
        numeric += numerical_gradient(logit_of(model, copy, 7), copy,
                                      entries=ENTRIES).reshape(-1)[ENTRIES]
    np.testing.assert_allclose(smooth.reshape(-1)[ENTRIES], numeric / samples,
                               rtol=1e-6, atol=1e-9)
    # and it is not just the plain gradient
    assert not np.allclose(smooth, input_gradient(model, x, 7))


def test_smoothgrad_is_the_same_whatever_the_batch_size():
    model = float64_model("lenet")
    x = backend.make_rng(4).standard_normal((1, 3, 32, 32))
    np.testing.assert_allclose(smoothgrad(model, x, 1, samples=7, seed=2, batch_size=3),
                               smoothgrad(model, x, 1, samples=7, seed=2, batch_size=7),
                               rtol=1e-10, atol=1e-14)


def test_gradient_times_input_is_the_finite_difference_gradient_times_x():
    model = float64_model("airnet", width=2)
    x = backend.make_rng(8).standard_normal((1, 3, 32, 32))
    times_input = gradient_times_input(model, x, 4)
    numeric = numerical_gradient(logit_of(model, x, 4), x, entries=ENTRIES).reshape(-1)
    np.testing.assert_allclose(times_input.reshape(-1)[ENTRIES],
                               numeric[ENTRIES] * x.reshape(-1)[ENTRIES], rtol=1e-6, atol=1e-9)


def test_the_gradients_are_the_same_on_the_fast_kernels():
    model = float64_model("lenet")
    x = backend.make_rng(4).standard_normal((1, 3, 32, 32))
    fast = input_gradient(kernels.prepare(model, "fast"), x, 3)
    reference = input_gradient(kernels.prepare(model, "reference"), x, 3)
    np.testing.assert_allclose(fast, reference, rtol=1e-10, atol=1e-13)


# --- what the conv layers compute -----------------------------------------------------------

def nested_model():
    """Conv layers at the top, inside a Residual and inside a nested Sequential."""
    backend.use("numpy", seed=1)
    return Sequential(
        Conv2d(3, 4, 3), ReLU(),                                    # 0: 30x30
        Residual(Conv2d(4, 4, 3, padding=1), ReLU()),               # 2: body.0
        MaxPool2d(2),                                               # 3: 15x15
        Sequential(Conv2d(4, 5, 3, stride=2), ReLU()),              # 4: 4.0, 7x7
        Flatten(), Linear(5 * 7 * 7, 10))


def test_conv_outputs_finds_every_conv_layer_with_its_output_and_receptive_field():
    model = nested_model()
    x = backend.make_rng(2).standard_normal((1, 3, 32, 32)).astype(np.float32)
    found, logits = conv_outputs(model, x)
    assert [c.path for c in found] == ["0", "2.body.0", "4.0"]
    np.testing.assert_allclose(logits, model.forward(x), rtol=1e-6)
    first = model[0].forward(x)
    np.testing.assert_allclose(found[0].output, first, rtol=1e-6)
    np.testing.assert_allclose(found[1].output, model[2].body[0].forward(model[1].forward(first)),
                               rtol=1e-6)
    pooled = model[3].forward(model[2].forward(model[1].forward(first)))
    np.testing.assert_allclose(found[2].output, model[4][0].forward(pooled), rtol=1e-6)
    # 3x3 sees 3; another 3x3 adds 2; the 2x2 pool adds 1, then pixels are 2 apart;
    # a 3x3 conv adds 2 * 2
    assert [c.receptive_field for c in found] == [(3, 3), (5, 5), (10, 10)]


def test_receptive_fields_of_the_seed_network():
    backend.use("numpy")
    model, _ = load_model(WEIGHTS)
    found, _ = conv_outputs(model, np.zeros((1, 3, 32, 32), np.float32))
    assert [(c.path, c.receptive_field) for c in found] == [("0", (5, 5)), ("3", (14, 14))]


# --- minicnn trace ------------------------------------------------------------------------

def test_trace_prints_every_layer_forward_and_backward(capsys):
    assert cli.main(["trace", str(CAT), "--label", "cat"]) == 0
    out = capsys.readouterr().out
    assert "label: cat (from --label)" in out
    assert "(1, 6, 28, 28)" in out and "(1, 10)" in out
    assert "label 3 (cat)" in out
    forward, backward = out.split("\nbackward")
    # whole layer names, each on its own line, forward and backward
    backend.use("numpy")
    model, _ = load_model(WEIGHTS)
    for index, layer in enumerate(model.layers):
        assert f"\n{index:>2} {layer!r}\n" in forward
        assert f"\n{index:>2} {layer!r}\n" in backward
    assert "Conv2d(3, 6, kernel_size=(5, 5), stride=1, padding=0, bias=True)" in out
    for shape in ("(6, 3, 5, 5)", "(16, 6, 5, 5)", "(1, 3, 32, 32)", "(128, 400)"):
        assert shape in backward
    norms = [float(line.split("norm")[1]) for line in backward.splitlines() if "norm" in line]
    assert len(norms) == 1 + 12 + 10 and all(n >= 0 for n in norms) and max(norms) > 0


def test_trace_says_the_default_label_is_the_predicted_class(capsys):
    assert cli.main(["trace", str(ROOT / "examples" / "images" / "horse.png")]) == 0
    out = capsys.readouterr().out
    backend.use("numpy")
    model, metadata = load_model(WEIGHTS)
    x = data.normalize(load_image(ROOT / "examples" / "images" / "horse.png")[None],
                       **metadata["normalization"])
    predicted = metadata["class_names"][int(model.eval().forward(x).argmax())]
    assert f"label: {predicted} (the predicted class; --label to choose)" in out


def test_trace_rejects_an_unknown_label(capsys):
    assert cli.main(["trace", str(CAT), "--label", "unicorn"]) == 1
    err = capsys.readouterr().err
    assert "--label must be a class name" in err and len(err.strip().splitlines()) == 1


def test_shipped_histories_have_what_the_curves_plot():
    for name in ("lenet", "airnet"):
        history = read_history(ROOT / "weights" / f"{name}_cifar10.history.json")
        assert all("lr" in entry for entry in history["history"])
