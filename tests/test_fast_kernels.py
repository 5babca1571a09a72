"""Every fast kernel (minicnn/fast/) against the reference layer it computes.

FastConv2d runs over the batch in chunks on worker threads, with flat cols and
one product per image for small stride-1 layers (outputs in pairs where there
are few filters), and recomputes cols in backward: equal to the reference up
to rounding (float64 to 1e-12). FastMaxPool2d's bracket and the fused
conv-ReLU-pool pass of FastSequential are equal bit for bit, ties included.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from minicnn import backend, kernels
from minicnn.fast import FastBatchNorm2d, FastConv2d, FastMaxPool2d, FastSequential, parallel
from minicnn.fast import conv as fast_conv
from minicnn.fast.fused import ConvReluPool, plan
from minicnn.layers import BatchNorm2d, Conv2d, Linear, MaxPool2d, ReLU, Sequential


@pytest.fixture(params=[1, 3], ids=["1-thread", "3-threads"])
def threads(request):
    parallel.set_workers(request.param)
    yield request.param
    parallel.set_workers(parallel._default_workers())


def fast_copy(layer):
    """A fast kernel of ``layer`` sharing its parameters, with ``layer`` left as it is."""
    copy = type(layer).__new__(type(layer))
    copy.__dict__.update(layer.__dict__)
    copy.params, copy.grads = layer.params, {}
    return kernels.prepare(copy, "fast")


def assert_close(actual, expected, exact=False):
    """Equal up to rounding: float64 to 1e-12, float32 to 1e-5 of the largest entry
    (a weight's gradient sums hundreds of products, so small entries are cancellations);
    ``exact``: bit for bit."""
    actual, expected = backend.to_host(actual), backend.to_host(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if exact:
        np.testing.assert_array_equal(actual, expected)
        return
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    eps = 1e-12 if expected.dtype == np.float64 else 1e-5
    np.testing.assert_allclose(actual, expected, rtol=eps, atol=eps * scale)


def run(layer, x, dy_seed=7):
    """forward, then backward with a random dy: (y, dx, {parameter path: grad})."""
    y = layer.forward(x)
    dy = backend.make_rng(dy_seed).standard_normal(y.shape).astype(x.dtype)
    dx = layer.backward(dy)
    grads = {name: module.grads[key] for name, module, key in layer.named_parameters()}
    return y, dx, grads


def assert_same_results(actual, expected, exact=False):
    (y1, dx1, grads1), (y2, dx2, grads2) = actual, expected
    assert_close(y1, y2, exact)
    if dx1 is None or dx2 is None:
        assert dx1 is None and dx2 is None
    else:
        assert_close(dx1, dx2, exact)
    assert grads1.keys() == grads2.keys()
    for key in grads1:
        assert_close(grads1[key], grads2[key], exact)


# --- the switch ----------------------------------------------------------------------

def test_prepare_switches_each_layer_in_place_and_back():
    net = Sequential(Conv2d(3, 4, 3), ReLU(), MaxPool2d(2), Linear(4, 2))
    conv, weight = net.layers[0], net.layers[0].params["weight"]
    assert kernels.of(net) == "reference"
    kernels.prepare(net, "fast")
    assert kernels.of(net) == "fast"
    assert [type(m) for m in net.layers] == [FastConv2d, ReLU, FastMaxPool2d, Linear]
    assert isinstance(net, FastSequential) and net.layers[0] is conv
    assert conv.params["weight"] is weight
    assert repr(conv).startswith("Conv2d(")                  # the layer's name either way
    conv.forward(np.zeros((1, 3, 6, 6), np.float32))
    conv.backward(np.ones((1, 4, 4, 4), np.float32))
    assert conv._scratch                                     # its own dY grid
    kernels.prepare(net, "reference")
    assert [type(m) for m in net.layers] == [Conv2d, ReLU, MaxPool2d, Linear]
    assert type(net) is Sequential and "_scratch" not in conv.__dict__


def test_prepare_leaves_classes_it_does_not_know_alone():
    class MyConv(Conv2d):
        pass

    net = kernels.prepare(Sequential(MyConv(1, 1, 1)), "fast")
    assert type(net.layers[0]) is MyConv and type(net) is FastSequential


def test_the_default_kernels_come_from_use_then_the_environment(monkeypatch):
    from minicnn import build_model
    from minicnn.errors import MinicnnError
    monkeypatch.delenv(kernels.VARIABLE, raising=False)
    assert kernels.default() == "fast" and kernels.of(build_model("lenet")) == "fast"
    monkeypatch.setenv(kernels.VARIABLE, "reference")
    assert kernels.of(build_model("lenet")) == "reference"
    kernels.use("fast")
    assert kernels.of(build_model("lenet")) == "fast"
    kernels.use(None)
    monkeypatch.setenv(kernels.VARIABLE, "quick")
    with pytest.raises(MinicnnError, match="MINICNN_KERNELS must be one of reference, fast"):
        kernels.default()
    with pytest.raises(MinicnnError, match="kernels must be one of"):
        kernels.use("turbo")


# --- FastConv2d ---------------------------------------------------------------------

@pytest.mark.parametrize("k,stride,padding,needs_dx", [(5, 1, 0, False), (3, 2, 1, True),
                                                        (3, 1, 1, True), ((2, 3), 1, 0, True),
                                                        (1, 1, 0, True)])
@pytest.mark.parametrize("chunk", [1, 3, "auto", None])
@pytest.mark.parametrize("path", ["as chosen", "flat", "channels-last", "im2col"])
def test_fast_conv_matches_the_reference(xp, threads, k, stride, padding, needs_dx, chunk,
                                         path):
    x = backend.make_rng(1).standard_normal((7, 3, 9, 8))
    reference = Conv2d(3, 4, k, stride=stride, padding=padding).astype(xp.float64)
    reference.set_needs_input_grad(needs_dx)
    fast = fast_copy(reference)
    fast.chunk_images = chunk
    if path == "flat" and stride != 1:
        pytest.skip("flat cols need stride 1")
    if path != "as chosen":
        fast.path = lambda x: path
    assert_same_results(run(fast, x), run(reference, x))


@pytest.mark.parametrize("k,padding,channels,as_convolution", [
    (3, 1, (5, 4), True), (3, 1, (4, 4), True), ((2, 3), 0, (5, 4), True),
    (5, 2, (5, 5), True), (1, 0, (5, 3), True), (3, 0, (6, 2), True),
    (3, 3, (5, 4), False), (3, 1, (4, 5), False)])
@pytest.mark.parametrize("chunk", [1, "auto"])
def test_channels_last_dx_as_a_convolution_of_dy(xp, threads, k, padding, channels,
                                                 as_convolution, chunk):
    """Channels last at stride 1 computes dx as dY's cols times the turned kernel where
    there are no more filters than input channels and the padding is at most k - 1;
    else by col2im. Both against the reference, float64 and float32."""
    c, oc = channels
    for dtype in (xp.float64, xp.float32):
        x = backend.make_rng(21).standard_normal((5, c, 7, 6)).astype(dtype)
        reference = Conv2d(c, oc, k, padding=padding).astype(dtype)
        fast = fast_copy(reference)
        fast.chunk_images = chunk
        fast.path = lambda x: "channels-last"
        assert fast._dx_as_convolution() is as_convolution
        assert_same_results(run(fast, x), run(reference, x))


@pytest.mark.parametrize("shape,channels,expected", [((2, 3, 32, 32), (3, 6, 5, 1), "flat"),
                                                     ((2, 24, 31, 31), (24, 32, 3, 1), "flat"),
                                                     ((2, 32, 15, 15), (32, 64, 3, 1), "flat"),
                                                     ((2, 32, 15, 15), (32, 128, 3, 1), "im2col"),
                                                     ((2, 128, 7, 7), (128, 128, 3, 1),
                                                      "channels-last")])
def test_each_layer_takes_the_path_its_shape_calls_for(xp, shape, channels, expected):
    c, oc, k, p = channels
    assert fast_copy(Conv2d(c, oc, k, padding=p)).path(xp.zeros(shape)) == expected


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("path", ["flat", "channels-last", "im2col"])
def test_fast_conv_in_float32_and_float64_without_bias(xp, threads, dtype, path):
    x = backend.make_rng(2).standard_normal((6, 2, 10, 10)).astype(dtype)
    reference = Conv2d(2, 5, 3, padding=1, bias=False).astype(getattr(xp, dtype))
    fast = fast_copy(reference)
    fast.path = lambda x: path
    results = run(fast, x)
    assert_same_results(results, run(reference, x))
    assert set(fast.grads) == {"weight"}


def test_a_backward_that_computes_dx_counts_its_dcols_rows_in_the_chunk_size(xp, threads,
                                                                          monkeypatch):
    """A flat backward with dx holds cols and the padded dcols rows at once, so its
    chunks are smaller than forward's; the results do not depend on the chunks."""
    x = backend.make_rng(3).standard_normal((24, 6, 14, 14))
    reference = Conv2d(6, 16, 5).astype(xp.float64)
    fast = fast_copy(reference)
    itemsize = x.dtype.itemsize
    per_image_forward = (150 * 140) * itemsize             # cols: C*kh*kw x OH*Wp
    per_image_dx = per_image_forward + (150 * 14 * 14) * itemsize   # + rows: C*kh*kw x Hp*Wp
    for name in ("CHUNK_BYTES", "ONE_THREAD_CHUNK_BYTES"):
        monkeypatch.setattr(fast_conv, name, 4 * per_image_forward)
    forward_parts, dx_parts = fast.chunks(x, "flat"), fast.chunks(x, "flat", dx=True)
    assert len(dx_parts) > len(forward_parts)
    assert max(p.stop - p.start for p in dx_parts) * per_image_dx <= fast_conv.CHUNK_BYTES
    assert [i for p in dx_parts for i in range(p.start, p.stop)] == list(range(24))
    assert_same_results(run(fast, x), run(reference, x))


def test_training_on_a_thread_that_works_alone_takes_the_smaller_chunks(monkeypatch):
    """ONE_THREAD_CHUNK_BYTES in training where one thread of the process runs the
    kernels (each process of the replicas, or one worker); CHUNK_BYTES where several
    do (inside the parts of inference too: the other parts run meanwhile), and in eval
    mode."""
    x = np.zeros((24, 6, 14, 14))
    conv = fast_copy(Conv2d(6, 16, 5))
    per_image = (150 * 140) * x.dtype.itemsize                  # forward's cols
    monkeypatch.setattr(fast_conv, "CHUNK_BYTES", 6 * per_image)
    monkeypatch.setattr(fast_conv, "ONE_THREAD_CHUNK_BYTES", 2 * per_image)

    def largest_chunk(_=None, __=None):
        return parallel.threads_at_work(), max(p.stop - p.start for p in conv.chunks(x, "flat"))

    parallel.set_workers(2)
    try:
        assert largest_chunk() == (2, 6)
        with parallel.in_calling_thread():
            assert largest_chunk() == (1, 2)
        assert parallel.run_chunks(largest_chunk, [slice(0, 1), slice(1, 2)], x) == [(2, 6)] * 2
        parallel.set_workers(1)
        assert largest_chunk() == (1, 2)
        conv.eval()
        assert largest_chunk() == (1, 6)
    finally:
        parallel.set_workers(parallel._default_workers())


def test_few_filters_take_outputs_in_pairs_only_where_they_can(xp):
    x = xp.zeros((2, 3, 32, 32))
    first = fast_copy(Conv2d(3, 6, 5))
    assert first.takes_pairs_path(x) and not first.takes_pairs_path(x, dx=True)
    assert not fast_copy(Conv2d(3, 16, 5)).takes_pairs_path(x)            # many filters
    assert not fast_copy(Conv2d(3, 6, 4)).takes_pairs_path(x)             # even kernel width
    assert not fast_copy(Conv2d(3, 6, 5, stride=2)).takes_pairs_path(x)   # not flat
    assert not first.takes_pairs_path(xp.zeros((2, 3, 32, 31)))           # odd width


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("padding", [0, 2])
def test_outputs_in_pairs_match_the_reference(xp, threads, monkeypatch, dtype, padding):
    """The layer alone and fused with ReLU and pooling, with pairs and without."""
    x = backend.make_rng(5).standard_normal((9, 3, 12, 10)).astype(dtype)
    reference = Sequential(Conv2d(3, 6, 5, padding=padding), ReLU(), MaxPool2d(2))
    reference = reference.astype(getattr(xp, dtype)).set_needs_input_grad(False)
    expected_conv, expected_run = run(reference.layers[0], x), run(reference, x)
    for limit in (fast_conv.PAIRS_MAX_OUT_CHANNELS, 0):
        monkeypatch.setattr(fast_conv, "PAIRS_MAX_OUT_CHANNELS", limit)
        fast = fast_copy(Sequential(*[fast_copy(layer) for layer in reference.layers]))
        conv = fast.layers[0]
        assert conv.takes_pairs_path(x) == (limit > 0)
        assert_same_results(run(conv, x), expected_conv)
        assert isinstance(plan(fast.layers)[0], ConvReluPool)
        assert_same_results(run(fast, x), expected_run)


def test_fast_conv_reuses_its_scratch_buffers_across_calls(xp, monkeypatch):
    """One thread (which thread takes which chunk varies), and a fresh shared store (other
    tests leave buffers of other sizes in it)."""
    monkeypatch.setattr(fast_conv, "_SHARED_SCRATCH", {})
    monkeypatch.setattr(parallel, "_workers", 1)
    conv = fast_copy(Conv2d(3, 2, 3))
    x = backend.make_rng(0).standard_normal((4, 3, 6, 6)).astype(xp.float32)
    first = conv.forward(x).copy()
    conv.backward(xp.ones_like(first))
    own, shared = dict(conv._scratch), dict(fast_conv._SHARED_SCRATCH)
    second = conv.forward(x)
    conv.backward(xp.ones_like(first))
    assert own and shared
    assert all(conv._scratch[key] is own[key] for key in own)                 # its dY grid
    assert all(fast_conv._SHARED_SCRATCH[key] is shared[key] for key in shared)   # cols, ...
    assert_close(second, first, exact=True)


def test_a_zeroed_scratch_buffer_is_remade_for_a_new_image_layout(xp):
    """The flat path relies on it: cells a user never writes stay 0, and a buffer
    written for one image size is not handed out for another."""
    conv, like = fast_copy(Conv2d(1, 1, 1)), xp.zeros(1, dtype=xp.float32)
    first = conv._buffer("test", 0, (2, 3), like, zeroed=True)
    assert not first.any()
    first[...] = 5
    assert (conv._buffer("test", 0, (1, 3), like, zeroed=True) == 5).all()   # same layout: kept
    assert not conv._buffer("test", 0, (2, 4), like, zeroed=True).any()       # new layout: zeros


def test_fast_conv_keeps_working_when_the_input_size_changes(xp, threads):
    """Its scratch buffers with zeros kept in place are remade for a new image size."""
    rng = backend.make_rng(6)
    reference = Conv2d(2, 3, 3).astype(xp.float64)
    fast = fast_copy(reference)
    for hw in [(9, 9), (6, 11), (9, 9), (5, 4)]:
        x = rng.standard_normal((5, 2, *hw))
        assert_same_results(run(fast, x), run(reference, x))


def test_fast_conv_reads_a_mirrored_view_correctly(xp):
    """Test-time flips hand Conv2d x[..., ::-1], a view with a negative stride."""
    x = backend.make_rng(5).standard_normal((3, 2, 8, 8))
    reference = Conv2d(2, 3, 3, padding=1).astype(xp.float64)
    fast = fast_copy(reference)
    mirrored = x[..., ::-1]
    assert_close(fast.forward(mirrored), reference.forward(mirrored.copy()))


# --- worker threads ---------------------------------------------------------------------

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


def test_run_chunks_inside_a_part_works_in_that_thread_as_that_worker(threads):
    """FastSequential's inference parts run the convs' chunks nested: each in the part's
    own thread, with that worker's index (its scratch space), never on a helper."""
    def inner(part, worker):
        return threading.current_thread().name, worker

    def outer(part, worker):
        inner_results = parallel.run_chunks(inner, [slice(0, 1), slice(1, 2)], np.zeros(2))
        return threading.current_thread().name, worker, parallel.workers(), inner_results

    results = parallel.run_chunks(outer, [slice(i, i + 1) for i in range(6)], np.zeros(6))
    for thread, worker, count, inner_results in results:
        assert count == 1
        assert inner_results == [(thread, worker)] * 2
    assert parallel.workers() == threads            # back to normal outside the parts


def test_batch_parts_give_each_thread_a_part_on_the_cpu_only(xp, threads):
    parts = parallel.batch_parts(xp.zeros((5, 2)))
    expected = min(threads, 5) if backend.on_cpu(xp.zeros(1)) else 1
    assert len(parts) == expected
    assert [i for part in parts for i in range(part.start, part.stop)] == list(range(5))
    assert parallel.batch_parts(xp.zeros((1, 2))) == [slice(0, 1)]


def test_set_workers_rejects_zero():
    with pytest.raises(ValueError, match="at least one"):
        parallel.set_workers(0)


# --- FastBatchNorm2d: the statistics of the threads' parts added up ------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (False, False)],
                         ids=["gamma-beta", "beta", "neither"])
@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no-dx"])
def test_batchnorm_in_parts_matches_the_reference(xp, threads, dtype, affine, input_grad):
    """Training on 1 and 3 threads (5 images: uneven parts), against the reference: y,
    dx, the parameter gradients and the running statistics; then eval mode."""
    x = (backend.make_rng(6).standard_normal((5, 4, 3, 3)) * 2 + 1).astype(dtype)
    weight, bias = affine
    reference = BatchNorm2d(4, momentum=0.3, weight=weight, bias=bias).astype(
        getattr(xp, dtype)).set_needs_input_grad(input_grad)
    if weight:
        reference.params["weight"][...] = xp.asarray([0.5, 1.0, 1.5, 2.0], dtype=dtype)
    if bias:
        reference.params["bias"][...] = xp.asarray([0.1, -0.2, 0.3, 0.0], dtype=dtype)
    fast = fast_copy(reference)
    fast.buffers = {key: value.copy() for key, value in reference.buffers.items()}
    assert isinstance(fast, FastBatchNorm2d)
    assert_same_results(run(fast, x), run(reference, x))
    for key in reference.buffers:
        assert_close(fast.buffers[key], reference.buffers[key])
    assert_close(fast.eval().forward(x), reference.eval().forward(x))




def _forward_in_two_processes(layer, halves):
    """layer.forward of each half of a batch, each in a thread that stands in for a
    process of the replicas (one part, on its calling thread), their BatchNorm sums
    added up by the replicas' own all-reduce: [y of each half]."""
    from minicnn.fast.replicas import _AllReduce
    barrier = threading.Barrier(2, timeout=30)
    first = _AllReduce(2, 2 * layer.num_features + 1, barrier)
    second = _AllReduce(0, 0, barrier, spec=first.block.spec, rank=1)
    layers, outputs = [layer, fast_copy(layer)], [None, None]
    for copy, sync in zip(layers, (first, second)):
        copy.sync = sync

    def run_half(rank):
        outputs[rank] = layers[rank].forward(halves[rank])

    try:
        with parallel.in_calling_thread():
            threads = [threading.Thread(target=run_half, args=(rank,)) for rank in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        for copy in layers:
            copy.sync = None
        second.block.close()
        first.block.close()
    return outputs


@pytest.mark.parametrize("parts", ["threads", "processes"])
def test_batchnorm_statistics_of_parts_far_from_zero(xp, threads, parts):
    """Parts whose means differ and lie far from 0 (mean 40, std 1, float32): y is as
    close to the float64 truth as the reference's. ``threads``: the parts of minicnn's
    threads; ``processes``: two halves added up by the replicas' all-reduce (NumPy
    only, as the replicas)."""
    if parts == "processes" and backend.name() != "numpy":
        pytest.skip("the replicas run on the NumPy backend only")
    rng = backend.make_rng(13)
    x64 = rng.standard_normal((6, 3, 5, 5)) + 40.0
    x64[3:] += 0.5                                   # the second half's mean is higher
    x = x64.astype(xp.float32)
    truth = BatchNorm2d(3, weight=False, bias=False).forward(x64)
    reference = BatchNorm2d(3, weight=False, bias=False).astype(xp.float32)
    expected = reference.forward(x)
    fast = fast_copy(reference)
    if parts == "processes":
        y = xp.concatenate(_forward_in_two_processes(fast, [x[:3], x[3:]]))
    else:
        y = fast.forward(x)
    reference_error = float(xp.abs(expected - truth).max())
    assert float(xp.abs(y - truth).max()) <= max(2 * reference_error, 1e-4)
    assert_close(y, expected)

# --- FastMaxPool2d: the bracket --------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 4, 8, 6), (5, 3, 7, 5)], ids=["even", "odd"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_the_bracket_matches_the_reference_bit_for_bit(xp, threads, shape, ties):
    """On 1 and 3 threads (one part of the batch each, uneven for 5 images), in training
    and in eval mode."""
    rng = backend.make_rng(4)
    x = rng.integers(0, 3, shape).astype(xp.float64) if ties else rng.standard_normal(shape)
    reference = MaxPool2d(2)
    fast = fast_copy(reference)
    assert fast.takes_bracket()
    assert_same_results(run(fast, x), run(reference, x), exact=True)
    assert_close(fast.eval().forward(x), reference.eval().forward(x), exact=True)


@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (2, 1, 0), (3, 3, 0)])
def test_other_windows_run_the_reference(xp, k, stride, padding):
    x = backend.make_rng(4).standard_normal((2, 3, 7, 7))
    reference = MaxPool2d(k, stride, padding)
    fast = fast_copy(reference)
    assert not fast.takes_bracket()
    assert_same_results(run(fast, x), run(reference, x), exact=True)


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_maxpool_all_ties_send_the_gradient_to_the_first_cell(xp, kernel):
    pool = kernels.prepare(MaxPool2d(2), kernel)
    x = xp.zeros((1, 1, 4, 4))                  # every window is a four-way tie
    pool.forward(x)
    dx = backend.to_host(pool.backward(xp.ones((1, 1, 2, 2))))
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1                       # top-left of each window
    np.testing.assert_array_equal(dx[0, 0], expected)


@pytest.mark.parametrize("kernel", ["reference", "fast"])
def test_maxpool_ties_match_pytorch(kernel):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, (2, 3, 8, 8)).astype(np.float64)   # many ties
    for k, stride in ((3, 2), (2, 2)):
        pool = kernels.prepare(MaxPool2d(k, stride=stride), kernel)
        y = pool.forward(x)
        dy = rng.standard_normal(y.shape)
        dx = pool.backward(dy)
        xt = torch.tensor(x, requires_grad=True)
        torch.nn.functional.max_pool2d(xt, k, stride=stride).backward(torch.tensor(dy))
        np.testing.assert_allclose(dx, xt.grad.numpy())


@pytest.mark.parametrize("kernel", ["reference", "fast"])
@pytest.mark.parametrize("make", [lambda: Conv2d(1, 1, 2), lambda: MaxPool2d(2), ReLU],
                         ids=["conv", "pool", "relu"])
def test_eval_mode_keeps_no_cache_and_backward_says_so(make, kernel):
    layer = kernels.prepare(make(), kernel).eval()
    layer.forward(np.ones((1, 1, 4, 4)))
    with pytest.raises(RuntimeError, match="training mode"):
        layer.backward(np.ones((1, 1, 2, 2)))


# --- FastSequential: conv, ReLU, 2x2 max-pool fused --------------------------------------

def conv_relu_pool_net(padding=1, bias=True, stride=1):
    return Sequential(Conv2d(3, 4, 3, padding=padding, bias=bias, stride=stride), ReLU(),
                      MaxPool2d(2), Conv2d(4, 5, 3, bias=bias), ReLU(), MaxPool2d(2))


def fused_and_layer_by_layer(net):
    """(net on the fast kernels, a plain Sequential of the very same fast layers)."""
    fused = kernels.prepare(net, "fast")
    return fused, Sequential(*fused.layers).set_needs_input_grad(fused.needs_input_grad)


def test_plan_fuses_conv_relu_pool_runs_only():
    net = kernels.prepare(Sequential(Conv2d(3, 4, 3), ReLU(), MaxPool2d(2),   # fused
                                     Conv2d(4, 4, 3), ReLU(), MaxPool2d(3),   # 3x3 pool: not
                                     ReLU(), Conv2d(4, 4, 1), ReLU()), "fast")
    steps = plan(net.layers)
    assert isinstance(steps[0], ConvReluPool)
    assert [step.layer_name() for step in steps[1:]] == ["Conv2d", "ReLU", "MaxPool2d",
                                                         "ReLU", "Conv2d", "ReLU"]
    assert plan(kernels.prepare(net, "reference").layers) == net.layers


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", [(7, 3, 12, 12), (5, 3, 13, 11)], ids=["even", "odd"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("needs_dx", [False, True])
def test_fused_run_matches_layer_by_layer_and_the_reference(xp, threads, dtype, shape, ties,
                                                            needs_dx):
    """Bit for bit against the fast layers one by one (the same products, and ReLU's and
    pooling's steps only reordered), and up to rounding against the reference.
    Ties: integer inputs and weights make many equal values, and all-zero windows."""
    rng = backend.make_rng(8)
    reference = conv_relu_pool_net().astype(getattr(xp, dtype))
    if ties:
        x = rng.integers(-2, 3, shape).astype(dtype)
        for _, holder, key in reference.named_arrays():
            holder[key] = xp.round(holder[key] * 4)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    reference.set_needs_input_grad(needs_dx)
    expected_reference = run(reference, x)
    fused, layer_by_layer = fused_and_layer_by_layer(reference)
    assert all(isinstance(step, ConvReluPool) for step in plan(fused.layers))
    expected = run(layer_by_layer, x)
    assert_same_results(run(fused, x), expected, exact=True)
    assert_same_results(expected, expected_reference)
    # Again, after each conv ran on its own with a dy that is nonzero everywhere: the
    # cells of its scratch grid that the fused pass never writes must still be 0.
    second_input = Sequential(*fused.layers[:3]).forward(x)
    for conv, conv_input in ((fused.layers[0], x), (fused.layers[3], second_input)):
        y = conv.forward(conv_input)
        conv.backward(rng.standard_normal(y.shape).astype(dtype) + 1)
    assert_same_results(run(fused, x), expected, exact=True)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_run_without_bias_and_in_eval_mode(xp, bias):
    x = backend.make_rng(9).standard_normal((3, 3, 10, 10))
    fused, layer_by_layer = fused_and_layer_by_layer(conv_relu_pool_net(bias=bias)
                                                     .astype(xp.float64))
    assert_same_results(run(fused, x), run(layer_by_layer, x), exact=True)
    fused.eval()
    assert_close(fused.forward(x), layer_by_layer.forward(x), exact=True)
    with pytest.raises(RuntimeError, match="training mode"):
        fused.backward(xp.ones((3, 5, 1, 1)))


def test_fused_run_falls_back_to_layer_by_layer_where_the_conv_is_not_flat(xp):
    """Stride 2 has no flat version: the run still works, one layer after the other."""
    x = backend.make_rng(10).standard_normal((2, 3, 20, 20))
    reference = conv_relu_pool_net(stride=2).astype(xp.float64)
    expected = run(reference, x)
    fused, _ = fused_and_layer_by_layer(reference)
    assert_same_results(run(fused, x), expected)
    assert fused.layers[0].cache is not None       # the conv ran on its own, and kept x
    assert fused.layers[3].cache is None           # the second run (stride 1) was fused


@pytest.mark.parametrize("hw", [(5, 5), (3, 9)], ids=["conv-1x1", "conv-1x7"])
def test_fused_run_refuses_what_the_pool_would_refuse(hw):
    """A conv output too small for the 2x2 window: the same error as layer by layer."""
    net = kernels.prepare(Sequential(Conv2d(1, 2, 5 if hw[0] == 5 else 3), ReLU(),
                                     MaxPool2d(2)), "fast")
    with pytest.raises(ValueError, match="does not fit"):
        net.forward(np.ones((1, 1, *hw)))


def test_fast_sequential_backward_needs_a_forward_first():
    net = kernels.prepare(Sequential(Linear(2, 2)), "fast")
    with pytest.raises(RuntimeError, match="forward pass first"):
        net.backward(np.ones((1, 2)))


# --- whole models --------------------------------------------------------------------------

@pytest.mark.parametrize("name,config", [("lenet", {}), ("airnet", {"width": 4})])
def test_inference_runs_a_batch_in_parts_one_per_thread(xp, threads, name, config):
    """Eval mode on several CPU threads: one part of the batch per thread, at least
    INFERENCE_MIN_PART_IMAGES images each; the same logits as the reference, and no
    layer keeps a cache of one part (backward says so)."""
    from minicnn import build_model
    from minicnn.fast.fused import INFERENCE_MIN_PART_IMAGES
    reference = kernels.prepare(build_model(name, **config), "reference")
    reference.astype(xp.float64).eval()
    n = 3 * INFERENCE_MIN_PART_IMAGES
    x = backend.make_rng(12).standard_normal((n, 3, 32, 32))
    expected = reference.forward(x)
    fast = kernels.prepare(reference, "fast")
    parts = fast._inference_parts(x)
    if threads == 1 or not backend.on_cpu(x):
        assert parts is None
    else:
        assert [(part.start, part.stop) for part in parts] == [(0, 16), (16, 32), (32, 48)]
        assert fast._inference_parts(x[:2 * INFERENCE_MIN_PART_IMAGES - 1]) is None
    assert_close(fast.forward(x), expected)
    if parts is not None:
        assert all(getattr(module, "cache", None) is None for _, module in fast.modules())
        with pytest.raises(RuntimeError):
            fast.backward(xp.ones((n, 10)))
    fast.train()
    assert fast._inference_parts(x) is None


@pytest.mark.parametrize("name,config,frozen_stem", [
    ("lenet", {}, False), ("airnet", {"width": 4}, False),
    ("airnet", {"widths": [4, 8, 8], "stem": "whiten"}, False),
    ("airnet", {"widths": [4, 8, 8], "stem": "whiten"}, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_registered_models_match_the_reference(xp, threads, name, config, frozen_stem, dtype):
    """A training step (no dx, as fit() runs it) and inference, fast against reference;
    frozen_stem: the whitening stem's bias frozen, so the backward stops after block 1's
    first conv (PatchWhitening itself has no fast kernel: it runs the reference)."""
    from minicnn import build_model
    reference = kernels.prepare(build_model(name, **config), "reference")
    if frozen_stem:
        reference.layers[0].freeze_bias()
    reference.astype(getattr(xp, dtype)).set_needs_input_grad(False)
    x = backend.make_rng(11).standard_normal((6, 3, 32, 32)).astype(dtype)
    expected = run(reference, x)
    fast = kernels.prepare(reference, "fast")
    assert_same_results(run(fast, x), expected)
    fast.eval()
    assert_close(fast.forward(x), kernels.prepare(fast, "reference").forward(x))
