"""The library API's misuses: clear TypeError / ValueError / RuntimeError naming the
layer and what it expects, instead of cryptic errors or silently wrong results; and
save_model for any model built from minicnn's layers."""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import (Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential, SoftmaxCrossEntropy,
                     kernels, load_model, save_model)
from minicnn.checkpoint import CheckpointError, load_weights


def readme_model():
    """The hand-built model of the README's example."""
    return Sequential(Conv2d(3, 8, 3, padding=1), ReLU(), MaxPool2d(2), Flatten(),
                      Linear(8 * 16 * 16, 10))


def test_save_model_on_a_hand_built_model(tmp_path):
    """save_model on the README's own Sequential raised AttributeError: ... 'name'."""
    model = readme_model()
    path = save_model(model, tmp_path / "mine.npz", class_names=[str(i) for i in range(10)])
    x = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    loaded, _ = load_model(path)            # rebuilt from the architecture in the file
    np.testing.assert_allclose(loaded.forward(x), model.forward(x), rtol=1e-6)
    again = readme_model()
    metadata = load_weights(again, path)
    assert metadata["model"] is None and metadata["config"] == {}
    np.testing.assert_array_equal(again.forward(x), model.forward(x))
    with pytest.raises(CheckpointError, match="parameters do not match the model"):
        load_weights(Sequential(Flatten(), Linear(3072, 10)), path)


def test_save_model_refuses_what_load_model_would_refuse(tmp_path):
    model = readme_model()
    model.layers[0].params["bias"][0] = np.nan
    with pytest.raises(ValueError, match="0.bias holds NaN"):
        save_model(model, tmp_path / "nan.npz")
    with pytest.raises(TypeError, match="needs a minicnn Module"):
        save_model({"weight": np.zeros(3)}, tmp_path / "dict.npz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("layer", [Linear(4, 3), readme_model(), Flatten(), SoftmaxCrossEntropy()],
                         ids=["Linear", "Sequential", "Flatten", "SoftmaxCrossEntropy"])
def test_backward_before_forward_names_the_layer(layer):
    """A reference Sequential's backward reaches its last layer, which names itself; the
    fast kernels' Sequential names itself."""
    name = type(layer).__name__
    expected = "(Sequential|Linear)" if name == "Sequential" else name
    with pytest.raises(RuntimeError, match=f"{expected}.backward needs a forward pass"):
        layer.backward() if name == "SoftmaxCrossEntropy" else layer.backward(np.ones((2, 3)))
    if name == "Sequential":
        with pytest.raises(RuntimeError, match="Sequential.backward needs a forward pass"):
            kernels.prepare(readme_model(), "fast").backward(np.ones((2, 3)))


@pytest.mark.parametrize("x,error,message", [
    ([[1.0, 2.0, 3.0, 4.0]], TypeError, "Linear expects a NumPy or CuPy array"),
    (np.ones((2, 4), dtype=np.int64), TypeError, "Linear expects a floating-point array"),
    (np.ones((0, 4), dtype=np.float32), ValueError, "Linear got an empty batch"),
    (np.ones((2, 5), dtype=np.float32), ValueError, r"Linear expected input \(N, 4\)")])
def test_linear_input(x, error, message):
    with pytest.raises(error, match=message):
        Linear(4, 3).forward(x)


@pytest.mark.parametrize("x,error,message", [
    (7, TypeError, "Sequential expects a NumPy or CuPy array"),
    (np.ones((2, 3, 32, 32), dtype=np.uint8), TypeError, "floating-point"),
    (np.ones((0, 3, 32, 32), dtype=np.float32), ValueError, "empty batch"),
    (np.ones((3, 32, 32), dtype=np.float32), ValueError, r"Conv2d expects a 4-d array \(N, 3")])
def test_network_input(x, error, message):
    model = readme_model()
    for kernel in ("reference", "fast"):
        kernels.prepare(model, kernel)
        with pytest.raises(error, match=message):
            model.forward(x)


@pytest.mark.parametrize("labels,error,message", [
    (np.array([1, -1]), ValueError, r"labels must be class indices 0\.\.9, got -1"),
    (np.array([1, 10]), ValueError, "got 10"),
    (np.array([1.0, 2.0]), TypeError, "labels as an integer array"),
    ([1, 2], TypeError, "labels as an integer array"),
    (np.array([1, 2, 3]), ValueError, r"labels of shape \(2,\)")])
def test_loss_labels(labels, error, message):
    """Label -1 was silently class 9."""
    with pytest.raises(error, match=message):
        SoftmaxCrossEntropy().forward(np.zeros((2, 10), np.float32), labels)


@pytest.mark.parametrize("build,message", [
    (lambda: Conv2d(3, 6, 0), "Conv2d: kernel_size must be a whole number >= 1"),
    (lambda: Conv2d(3, 6, (5, 0)), "kernel_size"),
    (lambda: Conv2d(3, 0, 5), "out_channels"),
    (lambda: Conv2d(3.5, 6, 5), "in_channels"),
    (lambda: Conv2d(3, 6, 5, padding=-1), "padding must be a whole number >= 0"),
    (lambda: MaxPool2d(0), "MaxPool2d: kernel_size"),
    (lambda: MaxPool2d(2.5), "MaxPool2d: kernel_size"),
    (lambda: MaxPool2d((2, 2)), "MaxPool2d: kernel_size must be a whole number >= 1, got"),
    (lambda: MaxPool2d(2, stride="2"), "MaxPool2d: stride"),
    (lambda: Linear(0, 3), "Linear: in_features")])
def test_sizes_that_are_not_whole_numbers_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()
