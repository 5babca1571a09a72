"""Inference with BatchNorm folded into the conv before it (minicnn/fast/folded.py),
against the reference layers one by one, and FastConv2d's ReLU on its output."""

from __future__ import annotations

import pytest

from minicnn import backend, kernels
from minicnn.fast import parallel
from minicnn.fast.folded import FoldedConv
from minicnn.fast.fused import ConvReluPool, plan
from minicnn.layers import BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential
from test_fast_kernels import assert_close, fast_copy


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    parallel.set_workers(request.param)
    yield request.param
    parallel.set_workers(parallel._default_workers())


def norm(channels, affine):
    return BatchNorm2d(channels, momentum=0.5, weight=affine, bias=affine)


def airnet_like(affine=False, bias=False, channels=(5, 6, 7), size=13):
    """airnet's pattern: conv -> BN -> ReLU; conv -> 2x2 pool -> BN -> ReLU (a flat conv:
    fused; a wide one: channels last); conv -> 3x3 pool -> BN (no ReLU); then a head."""
    a, b, c = channels
    return Sequential(
        Conv2d(3, a, 2, bias=bias), norm(a, affine), ReLU(),
        Conv2d(a, b, 3, padding=1, bias=bias), MaxPool2d(2), norm(b, affine), ReLU(),
        Conv2d(b, c, 3, padding=1, bias=bias), MaxPool2d(3), norm(c, affine),
        Flatten(), Linear(c * (((size - 1) // 2) // 3) ** 2, 4))


def trained(net, xp, size=13, steps=3):
    """The net after a few training forwards on size x size images: running statistics
    away from 0 and 1; with affine BatchNorm, gammas (all > 0) and betas away from 1 and
    0 too."""
    rng = backend.make_rng(3)
    for _, module in net.modules():
        if isinstance(module, BatchNorm2d) and "weight" in module.params:
            count = module.num_features
            module.params["weight"][...] = xp.asarray(rng.uniform(0.5, 2.0, count))
            module.params["bias"][...] = xp.asarray(rng.standard_normal(count))
    net.train()
    for _ in range(steps):
        net.forward(rng.standard_normal((8, 3, size, size)) * 3 + 1)
    return net.eval()


def reference_and_fast(net, dtype):
    """(the reference net, a fast copy of it sharing its parameters and buffers)."""
    reference = kernels.prepare(net.astype(dtype), "reference")
    fast = fast_copy(reference)
    fast.layers = [fast_copy(layer) for layer in reference.layers]
    for layer in fast.layers:
        layer.buffers = reference.layers[fast.layers.index(layer)].buffers
    return reference, fast


def convs(net):
    return [layer for layer in net.layers if isinstance(layer, Conv2d)]


# flat: every conv takes the flat path, conv 2 fused with its pool and ReLU; wide: conv 2
# takes the im2col path, conv 3 channels last
SHAPES = {"flat": ((5, 6, 7), 13, ("flat", "flat", "flat")),
          "wide": ((40, 80, 72), 9, ("flat", "im2col", "channels-last"))}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine,bias", [(False, False), (True, True)],
                         ids=["airnet", "affine-and-bias"])
@pytest.mark.parametrize("shapes", SHAPES)
def test_folded_inference_matches_the_reference(xp, threads, dtype, affine, bias, shapes):
    channels, size, paths = SHAPES[shapes]
    net = trained(airnet_like(affine, bias, channels, size), xp, size)
    reference, fast = reference_and_fast(net, getattr(xp, dtype))
    steps = plan(fast.layers, fold=True)
    assert [type(step).__name__ for step in steps] == ["FoldedConv"] * 3 + [
        "Flatten", "Linear"]
    assert [len(step.layers) for step in steps[:3]] == [3, 4, 3]
    assert isinstance(steps[1].fused, ConvReluPool) and steps[2].fused is None
    x = backend.make_rng(4).standard_normal((11, 3, size, size)).astype(dtype)
    inputs = [x, fast.layers[:3], fast.layers[:7]]
    inputs = [x] + [Sequential(*layers).forward(x) for layers in inputs[1:]]
    assert [conv.path(x) for conv, x in zip(convs(fast), inputs)] == list(paths)
    weights = [xp.array(conv.params["weight"]) for conv in convs(fast)]
    assert_close(fast.forward(x), reference.forward(x))
    for before, conv in zip(weights, convs(fast)):     # the model's own weights are
        assert_close(conv.params["weight"], before, exact=True)    # left as they were


def test_each_conv_path_puts_relu_on_its_output(xp, threads):
    x = backend.make_rng(5).standard_normal((6, 4, 9, 8))
    reference = Conv2d(4, 5, 3, padding=1).astype(xp.float64)
    expected = ReLU().forward(reference.eval().forward(x))
    for path in ("flat", "channels-last", "im2col"):
        fast = fast_copy(reference)
        fast.path = lambda x, path=path: path
        fast.relu_output = True
        assert_close(fast.eval().forward(x), expected)


def test_a_pool_between_stops_folding_unless_every_scale_is_positive(xp):
    net = trained(airnet_like(affine=True), xp)
    reference, fast = reference_and_fast(net, xp.float64)
    fast.layers[5].params["weight"][2] = -0.5          # one channel's scale below 0
    steps = plan(fast.layers, fold=True)
    expected = [FoldedConv, Conv2d, MaxPool2d, BatchNorm2d, ReLU, FoldedConv]
    assert len(steps) == 8 and all(map(isinstance, steps, expected))
    fast.layers[1].params["weight"][0] = -1.0          # before BatchNorm with no pool: folds
    assert isinstance(plan(fast.layers, fold=True)[0], FoldedConv)
    x = backend.make_rng(6).standard_normal((5, 3, 13, 13))
    assert_close(fast.forward(x), reference.forward(x))


def test_training_never_folds(xp):
    _, fast = reference_and_fast(trained(airnet_like(), xp), xp.float64)
    x = backend.make_rng(7).standard_normal((4, 3, 13, 13))
    fast.forward(x)
    assert isinstance(fast._steps[0], FoldedConv)
    fast.train().forward(x)
    assert not any(isinstance(step, FoldedConv) for step in fast._steps)
    fast.eval()
    fast.layers[1].train()                      # one BatchNorm in training mode: not folded
    assert not FoldedConv.fits(fast.layers[:2])
    with pytest.raises(RuntimeError, match="eval mode only"):
        FoldedConv(fast.layers[0], None, fast.layers[1], None).backward(None)
