"""Every layer's backward against central finite differences, in float64,
with a random upstream gradient, on every available backend: the reference
layers (minicnn/layers/). tests/test_fast_kernels.py compares the fast kernels
with them.

Inputs and whole models' weights are drawn on the host and copied to the
backend, so every backend checks the same numbers: each backend's generator
has a stream of its own, and a draw that puts a ReLU input or a max within
eps of its kink would fail on one backend and not on another.
"""

from __future__ import annotations

import numpy as np
import pytest

from minicnn import (BatchNorm2d, Conv2d, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,
                     PatchWhitening, ReLU, Residual, Scale, Sequential, SoftmaxCrossEntropy,
                     backend, build_model, kernels)
from minicnn.layers.whitening import whitening_layers
from minicnn.gradcheck import check_loss, check_module

TOLERANCE = 1e-7


@pytest.fixture(autouse=True)
def reference_kernels():
    """Models from build_model run the reference layers here, as layers built by hand do."""
    kernels.use("reference")
    yield
    kernels.use(None)


def randn(shape, seed=1):
    """Standard normal float64 values on the backend, the same on every backend."""
    return backend.to_device(np.random.default_rng(seed).standard_normal(shape))


def tie_free(shape, seed=2):
    """Distinct values at least 0.01 apart, so no +-eps nudge changes a max."""
    n = int(np.prod(shape))
    order = np.argsort(np.random.default_rng(seed).random(n))
    return backend.to_device((order * 0.01 - n * 0.005).reshape(shape))


def host_built(name, **config):
    """build_model(name) with the weights NumPy draws (seed 0), on the current backend."""
    current = backend.name()
    backend.use("numpy", seed=0)
    model = build_model(name, **config)
    backend.use(current, seed=0)
    return model.to_backend()


def away_from_zero(shape, seed=3):
    """Random values with |v| >= 0.1, so ReLU's kink is never crossed by +-eps."""
    xp = backend.xp
    x = randn(shape, seed)
    return xp.where(x >= 0, x + 0.1, x - 0.1)


def assert_gradients_ok(module, x):
    module.astype(backend.xp.float64)
    errors = check_module(module, x)
    assert set(errors) == {"input", *parameter_names(module)}
    assert max(errors.values()) < TOLERANCE, errors


def parameter_names(module) -> set:
    return {name for name, _, _ in module.named_parameters()}


@pytest.mark.parametrize("in_c,out_c,k,stride,padding,hw", [
    (3, 4, 3, 1, 0, (7, 7)),        # plain
    (2, 3, 3, 2, 1, (7, 8)),        # stride 2, padding, non-square input
    (3, 5, 1, 1, 0, (4, 5)),        # 1x1 kernel
    (2, 2, 5, 1, 2, (6, 6)),        # "same" padding
    (1, 2, (2, 3), 2, 0, (7, 9)),   # non-square kernel, stride that leaves a remainder
])
def test_conv2d(xp, in_c, out_c, k, stride, padding, hw):
    conv = Conv2d(in_c, out_c, k, stride=stride, padding=padding)
    assert_gradients_ok(conv, randn((2, in_c, *hw)))


@pytest.mark.parametrize("padding,hw", [(0, (9, 8)), (2, (6, 6))])
def test_fast_conv2d_as_a_first_layer_with_outputs_in_pairs(xp, padding, hw):
    """The fast kernel too, where its backward has no reference formula to follow line
    by line: no dx, so it takes the outputs in pairs (few filters, odd kernel, even
    width)."""
    conv = kernels.prepare(Conv2d(3, 6, 5, padding=padding), "fast")
    x = randn((2, 3, *hw))
    assert conv.takes_pairs_path(x) and not conv.takes_pairs_path(x, dx=True)
    conv.astype(xp.float64)
    errors = check_module(conv, x, input_grad=False)
    assert set(errors) == parameter_names(conv)
    assert max(errors.values()) < TOLERANCE, errors


def test_conv2d_without_bias(xp):
    conv = Conv2d(2, 3, 3, bias=False)
    assert "bias" not in conv.params
    assert_gradients_ok(conv, randn((2, 2, 5, 5)))


@pytest.mark.parametrize("k,stride,padding,hw", [
    (2, None, 0, (6, 6)),   # the seed network's pooling
    (2, None, 0, (7, 5)),   # odd sizes: the last row/column is dropped
    (3, 2, 1, (7, 7)),      # overlapping windows with -inf padding
    (3, 1, 0, (5, 6)),      # heavy overlap
    (2, 1, 1, (4, 4)),      # padding with stride 1
])
def test_maxpool2d(xp, k, stride, padding, hw):
    pool = MaxPool2d(k, stride=stride, padding=padding)
    assert_gradients_ok(pool, tie_free((2, 3, *hw)))


def test_linear(xp):
    assert_gradients_ok(Linear(7, 5), randn((4, 7)))


def test_relu(xp):
    assert_gradients_ok(ReLU(), away_from_zero((3, 4, 5)))


def test_flatten(xp):
    assert_gradients_ok(Flatten(), randn((2, 3, 4, 5)))


def random_affine(bn, seed=6):
    """BatchNorm's gamma and beta drawn at random (they start at 1 and 0)."""
    for offset, key in enumerate(bn.params):
        bn.params[key] = randn(bn.params[key].shape, seed + offset)
    return bn


@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 5, 5), (2, 3, 1, 4), (4, 2, 3, 1)])
def test_batchnorm2d(xp, weight, shape):
    bn = BatchNorm2d(shape[1], weight=weight).astype(xp.float64)
    assert_gradients_ok(random_affine(bn), randn(shape))


def test_batchnorm2d_eval_mode(xp):
    """In eval mode y is an affine function of x (running statistics): check that too."""
    bn = BatchNorm2d(3).astype(xp.float64)
    random_affine(bn)
    bn.buffers["running_mean"] = randn(3, 7)
    bn.buffers["running_var"] = randn(3, 8) ** 2 + 0.5
    bn.eval()
    x = randn((2, 3, 4, 4))
    y = bn.forward(x)
    expected = ((x - bn.buffers["running_mean"][:, None, None])
                / xp.sqrt(bn.buffers["running_var"][:, None, None] + bn.eps)
                * bn.params["weight"][:, None, None] + bn.params["bias"][:, None, None])
    assert float(xp.abs(y - expected).max()) < 1e-12
    dy = randn(y.shape, 9)     # eval backward: the affine map's slope, no parameter grads
    expected_dx = dy * (bn.params["weight"] / xp.sqrt(bn.buffers["running_var"] + bn.eps))[
        :, None, None]
    assert float(xp.abs(bn.backward(dy) - expected_dx).max()) < 1e-12


def test_global_avg_pool(xp):
    assert_gradients_ok(GlobalAvgPool2d(), randn((2, 3, 4, 5)))


def test_scale(xp):
    assert_gradients_ok(Scale(-0.3), randn((2, 5)))


def test_residual_block(xp):
    """x + BN(conv(ReLU(BN(conv(x))))): the skip path and the body's parameters. (A conv
    bias before BN has a zero gradient, which the relative error cannot check.)"""
    block = Residual(Conv2d(2, 2, 3, padding=1, bias=False), BatchNorm2d(2), ReLU(),
                     Conv2d(2, 2, 3, padding=1, bias=False), BatchNorm2d(2))
    assert_gradients_ok(block, randn((2, 2, 5, 5)))


def fitted_whitening(xp, seed=4):
    """A PatchWhitening whose filters are set from random images, in float64, with a
    random bias (it starts at 0)."""
    layer = PatchWhitening(3, 2)
    layer.fit_to(randn((6, 3, 8, 8), seed) * xp.asarray([1.0, 2.0, 0.5])[:, None, None])
    layer.astype(xp.float64)
    layer.params["bias"] = randn(layer.params["bias"].shape, seed + 1)
    return layer


def test_patch_whitening(xp):
    """dx and the bias's gradient; the fixed filters have none (they are a buffer)."""
    layer = fitted_whitening(xp)
    assert parameter_names(layer) == {"bias"}
    assert_gradients_ok(layer, randn((2, 3, 5, 6)))


def test_patch_whitening_with_its_bias_frozen(xp):
    layer = fitted_whitening(xp)
    layer.freeze_bias()
    assert parameter_names(layer) == set() and set(layer.buffers) == {"weight", "bias"}
    assert_gradients_ok(layer, randn((2, 3, 5, 6)))
    assert layer.grads == {}


@pytest.mark.parametrize("frozen", [False, True], ids=["bias-trained", "bias-frozen"])
def test_airnet_with_the_whitening_stem_as_trained(xp, frozen):
    """The airbench93 layout (whitening stem, shift-only BatchNorm) end to end, without
    dx as in training. With the stem's bias frozen nothing before the first block conv
    learns: that conv computes no dx and backward stops there. (Not with the dirac
    init: its identity filters copy ReLU's exact zeros into max-pool windows, whose
    ties finite differences cannot take; the init changes no formula.)"""
    model = build_model("airnet", widths=[2, 8, 8], stem="whiten")
    model.astype(xp.float64)
    x = randn((2, 3, 32, 32))
    stem = whitening_layers(model)[0]
    stem.fit_to(x)
    stem.params["bias"] = randn(24, 5) * 0.1
    if frozen:
        stem.freeze_bias()
    model.set_needs_input_grad(False)
    assert model[2].needs_input_grad is not frozen          # the first block conv
    errors = check_module(model, x, max_entries=30, input_grad=False)
    assert set(errors) == parameter_names(model)
    assert ("0.bias" in errors) is not frozen
    assert max(errors.values()) < 1e-6, errors


def test_residual_rejects_a_shape_change():
    with pytest.raises(ValueError, match="cannot be added"):
        Residual(Conv2d(2, 3, 1)).forward(randn((1, 2, 4, 4)))


def test_airnet_end_to_end(xp):
    model = host_built("airnet", width=2)
    model.astype(xp.float64)
    errors = check_module(model, randn((2, 3, 32, 32)), max_entries=30)
    assert set(errors) == {"input", *parameter_names(model)}
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_small_network_end_to_end(xp, kernel):
    # ReLU kinks are hit with probability ~0 for random data at these scales.
    net = Sequential(Conv2d(2, 3, 3, padding=1), ReLU(), MaxPool2d(2), Conv2d(3, 4, 3, stride=2),
                     ReLU(), Flatten(), Linear(4, 3))
    assert_gradients_ok(kernels.prepare(net, kernel), randn((2, 2, 8, 8)))


@pytest.mark.parametrize("kernel", ["reference", "fast"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["with-dx", "as-trained"])
def test_lenet_end_to_end(xp, input_grad, kernel):
    """as-trained: no gradient for the image; on the fast kernels the first conv's
    backward then takes its outputs in pairs, as in training."""
    model = kernels.prepare(host_built("lenet"), kernel)
    model.astype(xp.float64)
    errors = check_module(model, randn((1, 3, 32, 32)), max_entries=40, input_grad=input_grad)
    assert set(errors) == parameter_names(model) | ({"input"} if input_grad else set())
    assert max(errors.values()) < 1e-6, errors


@pytest.mark.parametrize("smoothing", [0.0, 0.2, 1.0])
@pytest.mark.parametrize("n,k", [(5, 10), (1, 3), (8, 2)])
def test_softmax_cross_entropy(xp, n, k, smoothing):
    logits = randn((n, k)) * 3
    labels = backend.to_device(np.random.default_rng(4).integers(0, k, n))
    assert check_loss(SoftmaxCrossEntropy(smoothing), logits, labels) < TOLERANCE


def test_gradcheck_catches_a_wrong_backward(xp):
    """The checker itself can fail: a Linear whose backward forgets dy's scale."""

    class BrokenLinear(Linear):
        def backward(self, dy):
            dx = super().backward(dy)
            self.grads["weight"] = self.grads["weight"] * 1.01
            return dx

    layer = BrokenLinear(4, 3)
    layer.astype(xp.float64)
    errors = check_module(layer, randn((2, 4)))
    assert errors["weight"] > 1e-3
    assert errors["input"] < TOLERANCE


def test_gradcheck_catches_ignoring_the_upstream_gradient(xp):
    """A backward that assumes dy = 1 passes a ones-check but fails a random one."""

    class OnesReLU(ReLU):
        def backward(self, dy):
            return super().backward(backend.xp.ones_like(dy))

    layer = OnesReLU()
    x = away_from_zero((2, 5))
    assert check_module(layer, x, upstream=xp.ones((2, 5)))["input"] < TOLERANCE
    assert check_module(layer, x)["input"] > 1e-2


def test_gradcheck_refuses_float32(xp):
    with pytest.raises(TypeError):
        check_module(Linear(2, 2), randn((1, 2)).astype(xp.float32))
