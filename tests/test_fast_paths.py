"""The fast paths against the plain versions they replace.

Conv2d runs over the batch in chunks on worker threads, with flat cols and
one product per image for small stride-1 layers (outputs in pairs where there
are few filters), and recomputes cols in backward; the plain version (``chunk_images=None``) does the whole batch
as one matrix product. MaxPool2d's backward must send each window's gradient
to exactly one input, the first maximum, even when a window is all ties (as
after a ReLU); PyTorch does the same.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from minicnn import backend, parallel
from minicnn.layers import Conv2d, MaxPool2d, ReLU, Sequential
from minicnn.layers import conv as conv_module
from minicnn.layers.fused import ConvReluPool


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    parallel.set_workers(request.param)
    yield request.param
    parallel.set_workers(parallel._default_workers())


@pytest.mark.parametrize("k,stride,padding,needs_dx", [(5, 1, 0, False), (3, 2, 1, True),
                                                        (3, 1, 1, True)])
@pytest.mark.parametrize("chunk", [1, 3, "auto"])
@pytest.mark.parametrize("flat_limit", [conv_module.FLAT_PRODUCT_MACS, 0],
                         ids=["flat-if-stride-1", "never-flat"])
def test_chunked_conv_matches_plain(xp, threads, monkeypatch, k, stride, padding, needs_dx,
                                    chunk, flat_limit):
    monkeypatch.setattr(conv_module, "FLAT_PRODUCT_MACS", flat_limit)
    rng = backend.make_rng(1)
    x = rng.standard_normal((7, 3, 9, 8))
    plain = Conv2d(3, 4, k, stride=stride, padding=padding).astype(xp.float64)
    plain.chunk_images, plain.needs_input_grad = None, needs_dx
    fast = Conv2d(3, 4, k, stride=stride, padding=padding)
    fast.params = dict(plain.params)
    fast.chunk_images, fast.needs_input_grad = chunk, needs_dx
    y_plain, y_fast = plain.forward(x), fast.forward(x)
    dy = rng.standard_normal(y_plain.shape)
    dx_plain, dx_fast = plain.backward(dy), fast.backward(dy)
    np.testing.assert_allclose(backend.to_host(y_fast), backend.to_host(y_plain), rtol=1e-12)
    for key in plain.grads:
        np.testing.assert_allclose(backend.to_host(fast.grads[key]),
                                   backend.to_host(plain.grads[key]), rtol=1e-12)
    if needs_dx:
        np.testing.assert_allclose(backend.to_host(dx_fast), backend.to_host(dx_plain),
                                   rtol=1e-12)
    else:
        assert dx_fast is None


def test_a_backward_that_computes_dx_counts_its_dcols_rows_in_the_chunk_size(xp, threads,
                                                                          monkeypatch):
    """A flat backward with dx holds cols and the padded dcols rows at once, so its
    chunks are smaller than forward's; the results do not depend on the chunks."""
    x = backend.make_rng(3).standard_normal((24, 6, 14, 14))
    plain = Conv2d(6, 16, 5).astype(xp.float64)
    plain.chunk_images = None
    fast = Conv2d(6, 16, 5)
    fast.params = dict(plain.params)
    itemsize = x.dtype.itemsize
    per_image_forward = (150 * 140) * itemsize             # cols: C*kh*kw x OH*Wp
    per_image_dx = per_image_forward + (150 * 14 * 14) * itemsize   # + rows: C*kh*kw x Hp*Wp
    monkeypatch.setattr(conv_module, "CHUNK_BYTES", 4 * per_image_forward)
    forward_parts, dx_parts = fast.chunks(x, flat=True), fast.chunks(x, flat=True, dx=True)
    assert len(dx_parts) > len(forward_parts)
    assert max(p.stop - p.start for p in dx_parts) * per_image_dx <= conv_module.CHUNK_BYTES
    assert [i for p in dx_parts for i in range(p.start, p.stop)] == list(range(24))
    y = plain.forward(x)
    dy = backend.make_rng(4).standard_normal(y.shape)
    np.testing.assert_allclose(backend.to_host(fast.forward(x)), backend.to_host(y), rtol=1e-12)
    np.testing.assert_allclose(backend.to_host(fast.backward(dy)),
                               backend.to_host(plain.backward(dy)), rtol=1e-12)
    for key in plain.grads:
        np.testing.assert_allclose(backend.to_host(fast.grads[key]),
                                   backend.to_host(plain.grads[key]), rtol=1e-12)


def assert_close(actual, expected):
    """Equal up to rounding: float64 to 1e-12, float32 to 1e-5 of the largest entry
    (a weight's gradient sums hundreds of products, so small entries are cancellations)."""
    actual, expected = backend.to_host(actual), backend.to_host(expected)
    assert actual.dtype == expected.dtype
    scale = float(np.abs(expected).max())
    eps = 1e-12 if expected.dtype == np.float64 else 1e-5
    np.testing.assert_allclose(actual, expected, rtol=eps, atol=eps * scale)


def test_few_filters_take_outputs_in_pairs_only_where_they_can(xp):
    x = xp.zeros((2, 3, 32, 32))
    first = Conv2d(3, 6, 5)                                   # lenet's first layer
    assert first.takes_pairs_path(x) and not first.takes_pairs_path(x, dx=True)
    assert not Conv2d(3, 16, 5).takes_pairs_path(x)           # many filters
    assert not Conv2d(3, 6, 4).takes_pairs_path(x)            # even kernel width
    assert not Conv2d(3, 6, 5, stride=2).takes_pairs_path(x)  # not flat
    assert not first.takes_pairs_path(xp.zeros((2, 3, 32, 31)))   # odd width


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padding", [0, 2])
def test_outputs_in_pairs_match_the_plain_version(xp, threads, monkeypatch, dtype, padding):
    """The layer alone and fused with ReLU and pooling, with pairs and without."""
    rng = backend.make_rng(5)
    x = rng.standard_normal((9, 3, 12, 10)).astype(dtype)
    plain = Sequential(Conv2d(3, 6, 5, padding=padding), ReLU(), MaxPool2d(2))
    plain = plain.astype(getattr(xp, dtype))
    plain.fuse, plain.layers[0].chunk_images = False, None
    plain.needs_input_grad = plain.layers[0].needs_input_grad = False
    expected_conv = plain.layers[0].forward(x)
    dy_conv = rng.standard_normal(expected_conv.shape).astype(dtype)
    plain.layers[0].backward(dy_conv)
    expected_conv_grads = dict(plain.layers[0].grads)
    expected_run = forward_backward(plain, x)
    for limit in (conv_module.PAIRS_MAX_OUT_CHANNELS, 0):
        monkeypatch.setattr(conv_module, "PAIRS_MAX_OUT_CHANNELS", limit)
        fast = Sequential(Conv2d(3, 6, 5, padding=padding), ReLU(), MaxPool2d(2))
        fast.layers[0].params = dict(plain.layers[0].params)
        conv = fast.layers[0]
        fast.needs_input_grad = conv.needs_input_grad = False
        assert conv.takes_pairs_path(x) == (limit > 0)
        assert_close(conv.forward(x), expected_conv)
        assert conv.backward(dy_conv) is None
        for key in expected_conv_grads:
            assert_close(conv.grads[key], expected_conv_grads[key])
        assert isinstance(fast.steps()[0], ConvReluPool)
        y, dx, grads = forward_backward(fast, x)
        assert_close(y, expected_run[0])
        assert dx is None
        for key in grads:
            assert_close(grads[key], expected_run[2][key])


def test_conv_reuses_its_scratch_buffers_across_calls(xp):
    conv = Conv2d(3, 2, 3)
    x = backend.make_rng(0).standard_normal((4, 3, 6, 6)).astype(xp.float32)
    first = conv.forward(x).copy()
    buffers = dict(conv._scratch)
    second = conv.forward(x)
    assert all(conv._scratch[key] is buffers[key] for key in buffers)
    np.testing.assert_array_equal(backend.to_host(first), backend.to_host(second))


def test_a_zeroed_scratch_buffer_is_remade_for_a_new_image_layout(xp):
    """The flat path relies on it: cells a user never writes stay 0, and a buffer
    written for one image size is not handed out for another."""
    conv, like = Conv2d(1, 1, 1), xp.zeros(1, dtype=xp.float32)
    first = conv._buffer("test", 0, (2, 3), like, zeroed=True)
    assert not first.any()
    first[...] = 5
    assert (conv._buffer("test", 0, (1, 3), like, zeroed=True) == 5).all()   # same layout: kept
    assert not conv._buffer("test", 0, (2, 4), like, zeroed=True).any()       # new layout: zeros


def test_run_chunks_does_every_part_once_and_keeps_order(threads):
    seen = []
    parts = [slice(i, i + 1) for i in range(10)]
    results = parallel.run_chunks(lambda part, worker: (seen.append((part.start, worker)),
                                                        part.start)[1],
                                  parts, np.zeros(1))
    assert results == list(range(10))
    assert sorted(start for start, _ in seen) == list(range(10))
    assert {worker for _, worker in seen} <= set(range(threads))


def test_run_chunks_raises_a_workers_error_and_keeps_working(threads):
    """With several threads, the calling thread dawdles so that a helper likely meets
    the bad chunk; either way its error reaches the caller."""
    def work(part, worker):
        if worker == 0:
            time.sleep(0.002)
        if part.start == 5:
            raise ArithmeticError("chunk 5 failed")
        return part.start

    parts = [slice(i, i + 1) for i in range(10)]
    with pytest.raises(ArithmeticError, match="chunk 5"):
        parallel.run_chunks(work, parts, np.zeros(1))
    assert parallel.run_chunks(lambda part, worker: part.start, parts, np.zeros(1)) == list(range(10))


def test_set_workers_rejects_zero():
    with pytest.raises(ValueError, match="at least one"):
        parallel.set_workers(0)


def test_maxpool_all_ties_send_the_gradient_to_the_first_cell(xp):
    pool = MaxPool2d(2)
    x = xp.zeros((1, 1, 4, 4))                  # every window is a four-way tie
    pool.forward(x)
    dx = backend.to_host(pool.backward(xp.ones((1, 1, 2, 2))))
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1                       # top-left of each window
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_maxpool_ties_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, 3, 8, 8)).astype(np.float64)   # many ties
    dy = rng.standard_normal((2, 3, 3, 3))
    pool = MaxPool2d(3, stride=2)
    pool.forward(x)
    dx = pool.backward(dy)
    xt = torch.tensor(x, requires_grad=True)
    torch.nn.functional.max_pool2d(xt, 3, stride=2).backward(torch.tensor(dy))
    np.testing.assert_allclose(dx, xt.grad.numpy())


@pytest.mark.parametrize("layer", [Conv2d(1, 1, 2), MaxPool2d(2), ReLU()],
                         ids=["conv", "pool", "relu"])
def test_eval_mode_keeps_no_cache_and_backward_says_so(layer):
    layer.eval()
    layer.forward(np.ones((1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones((1, 1, 2, 2)))


@pytest.mark.parametrize("shape", [(3, 4, 8, 6), (2, 3, 7, 5)], ids=["even", "odd"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_maxpool_bracket_matches_the_general_path(xp, shape, ties):
    rng = backend.make_rng(4)
    x = rng.integers(0, 3, shape).astype(xp.float64) if ties else rng.standard_normal(shape)
    fast, general = MaxPool2d(2), MaxPool2d(2)
    assert fast.bracket
    general.bracket = False
    y_fast, y_general = fast.forward(x), general.forward(x)
    dy = rng.standard_normal(y_general.shape)
    np.testing.assert_array_equal(backend.to_host(y_fast), backend.to_host(y_general))
    np.testing.assert_array_equal(backend.to_host(fast.backward(dy)),
                                  backend.to_host(general.backward(dy)))


def test_flat_conv_keeps_working_when_the_input_size_changes(xp, threads):
    """Its scratch buffers with zeros kept in place are remade for a new image size."""
    rng = backend.make_rng(6)
    fast = Conv2d(2, 3, 3).astype(xp.float64)
    plain = Conv2d(2, 3, 3)
    plain.params, plain.chunk_images = fast.params, None
    for hw in [(9, 9), (6, 11), (9, 9), (5, 4)]:
        x = rng.standard_normal((5, 2, *hw))
        y_fast, y_plain = fast.forward(x), plain.forward(x)
        dy = rng.standard_normal(y_plain.shape)
        np.testing.assert_allclose(backend.to_host(y_fast), backend.to_host(y_plain), rtol=1e-12)
        np.testing.assert_allclose(backend.to_host(fast.backward(dy)),
                                   backend.to_host(plain.backward(dy)), rtol=1e-12)
        np.testing.assert_allclose(backend.to_host(fast.grads["weight"]),
                                   backend.to_host(plain.grads["weight"]), rtol=1e-12)


def test_conv_reads_a_mirrored_view_correctly(xp):
    """Test-time flips hand Conv2d x[..., ::-1], a view with a negative stride."""
    x = backend.make_rng(5).standard_normal((3, 2, 8, 8))
    conv = Conv2d(2, 3, 3, padding=1).astype(xp.float64)
    mirrored = x[..., ::-1]
    np.testing.assert_allclose(backend.to_host(conv.forward(mirrored)),
                               backend.to_host(conv.forward(mirrored.copy())), rtol=1e-12)


# --- Conv2d, ReLU, MaxPool2d(2) fused (minicnn.layers.fused) ------------------------

def conv_relu_pool_net(padding=1, bias=True, stride=1):
    return Sequential(Conv2d(3, 4, 3, padding=padding, bias=bias, stride=stride), ReLU(),
                      MaxPool2d(2), Conv2d(4, 5, 3, bias=bias), ReLU(), MaxPool2d(2))


def forward_backward(net, x, dy_seed=7):
    y = net.forward(x)
    dy = backend.make_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    dx = net.backward(dy)
    grads = {name: module.grads[key] for name, module, key in net.named_parameters()}
    return y, dx, grads


def assert_same_results(first, second):
    (y1, dx1, grads1), (y2, dx2, grads2) = first, second
    np.testing.assert_array_equal(backend.to_host(y1), backend.to_host(y2))
    if dx1 is None or dx2 is None:
        assert dx1 is None and dx2 is None
    else:
        np.testing.assert_array_equal(backend.to_host(dx1), backend.to_host(dx2))
    assert grads1.keys() == grads2.keys()
    for key in grads1:
        np.testing.assert_array_equal(backend.to_host(grads1[key]), backend.to_host(grads2[key]))


def test_plan_fuses_conv_relu_pool_runs_only():
    net = Sequential(Conv2d(3, 4, 3), ReLU(), MaxPool2d(2),       # fused
                     Conv2d(4, 4, 3), ReLU(), MaxPool2d(3),       # a 3x3 pool: not fused
                     ReLU(), Conv2d(4, 4, 1), ReLU())
    steps = net.steps()
    assert isinstance(steps[0], ConvReluPool)
    assert [type(step).__name__ for step in steps[1:]] == ["Conv2d", "ReLU", "MaxPool2d",
                                                           "ReLU", "Conv2d", "ReLU"]
    net.fuse = False
    assert net.steps() == net.layers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7, 3, 12, 12), (5, 3, 13, 11)], ids=["even", "odd"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("needs_dx", [False, True])
def test_fused_run_matches_layer_by_layer(xp, threads, dtype, shape, ties, needs_dx):
    """Bit for bit: the same products, and ReLU's and pooling's steps only reordered.
    Ties: integer inputs and weights make many equal values, and all-zero windows."""
    rng = backend.make_rng(8)
    fused = conv_relu_pool_net().astype(getattr(xp, dtype))
    if ties:
        x = rng.integers(-2, 3, shape).astype(dtype)
        for _, holder, key in fused.named_arrays():
            holder[key] = xp.round(holder[key] * 4)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    plain = conv_relu_pool_net()
    plain.layers = fused.layers                 # the very same layers and parameters
    plain.fuse = False
    fused.needs_input_grad = plain.needs_input_grad = needs_dx
    assert isinstance(fused.steps()[0], ConvReluPool) and isinstance(fused.steps()[1], ConvReluPool)
    first = forward_backward(fused, x)
    expected = forward_backward(plain, x)
    assert_same_results(first, expected)
    # Again, after each conv ran on its own with a dy that is nonzero everywhere: the
    # cells of its scratch grid that the fused pass never writes must still be 0.
    for conv in fused.layers[0], fused.layers[3]:
        y = conv.forward(x if conv is fused.layers[0] else conv.cache)
        conv.backward(rng.standard_normal(y.shape).astype(dtype) + 1)
    assert_same_results(forward_backward(fused, x), expected)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_run_without_bias_and_in_eval_mode(xp, bias):
    x = backend.make_rng(9).standard_normal((3, 3, 10, 10))
    fused = conv_relu_pool_net(bias=bias).astype(xp.float64)
    plain = conv_relu_pool_net(bias=bias)
    plain.layers, plain.fuse = fused.layers, False
    assert_same_results(forward_backward(fused, x), forward_backward(plain, x))
    fused.eval()
    np.testing.assert_array_equal(backend.to_host(fused.forward(x)),
                                  backend.to_host(plain.forward(x)))
    with pytest.raises(RuntimeError, match="training mode"):
        fused.backward(xp.ones((3, 5, 1, 1)))


def test_fused_run_falls_back_to_layer_by_layer_where_the_conv_is_not_flat(xp):
    """Stride 2 has no flat version: the run still works, one layer after the other."""
    x = backend.make_rng(10).standard_normal((2, 3, 20, 20))
    fused = conv_relu_pool_net(stride=2).astype(xp.float64)
    plain = conv_relu_pool_net(stride=2)
    plain.layers, plain.fuse = fused.layers, False
    expected = forward_backward(plain, x)
    assert_same_results(forward_backward(fused, x), expected)
    assert fused.layers[0].cache is not None       # the conv ran on its own, and kept x
    assert fused.layers[3].cache is None           # the second run (stride 1) was fused


@pytest.mark.parametrize("hw", [(5, 5), (3, 9)], ids=["conv-1x1", "conv-1x7"])
def test_fused_run_refuses_what_the_pool_would_refuse(hw):
    """A conv output too small for the 2x2 window: the same error as layer by layer."""
    net = Sequential(Conv2d(1, 2, 5 if hw[0] == 5 else 3), ReLU(), MaxPool2d(2))
    with pytest.raises(ValueError, match="does not fit"):
        net.forward(np.ones((1, 1, *hw)))
