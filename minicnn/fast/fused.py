"""Conv2d -> ReLU -> 2x2 max-pool in one pass per chunk of images, planned by FastSequential.

Layer by layer, each of the three writes its whole output to memory and the
next reads it back; a batch's conv output is often larger than the CPU's
cache, so ReLU and pooling on it wait on memory. Here each worker thread takes
a few images at a time and does all three while they sit in its cache::

    grid = W @ cols + b           the conv on its flat OH x Wp grid (FastConv2d.flat_forward;
                                  for few filters in pairs, FastConv2d.grid_cells)
    m    = 2x2 max of grid        the knockout bracket of fast.pooling.bracket_forward
    y    = max(m, 0)              ReLU, after pooling: a quarter of the values

ReLU and max commute: max(relu(a), relu(b)) = relu(max(a, b)), since ReLU
never reorders values. Only y goes to memory, a quarter of the conv's output,
with four boolean masks the size of y for backward: pooling's three bracket
results, and ``positive = [y > 0]``.

Backward, per chunk, the same steps in reverse::

    d       = dy * positive       ReLU's slope
    dY_grid = bracket back of d   0 in the grid's extra columns and in cells no window covers
    dW, db, dx                    FastConv2d.flat_backward(dY_grid)

Layer by layer, pooling passes each window's gradient to its winning cell
only, and ReLU then multiplies it by that cell's slope [conv output > 0],
which is [y > 0]: y is the winner's value after ReLU. The bracket here
compares values before ReLU, so where two cells are both <= 0 it may pick a
different one of them than layer by layer (which sees two zeros, and takes
the first); but then the window's gradient is 0 in both (positive is 0, or
that pair lost to a positive cell), so the results are the same, bit for bit
(the tests compare them, ties included).

Fusion is a planning step: FastSequential (the fast kernel of Sequential)
runs each FastConv2d, ReLU, FastMaxPool2d(2) run this way when the conv takes
its flat path for the input (stride 1, small products per image or few
filters); every other layer runs on its own.

Inference goes further: in eval mode FastSequential splits a batch into one
part per thread, and each thread runs its part through every layer (the
convs' own chunks then run in that thread, minicnn.fast.parallel). Layer by
layer, only the convs ran on all cores while BatchNorm, ReLU and pooling
waited on one; now every layer does, in arrays a fraction of the size. And each
BatchNorm is folded into the conv before it (minicnn.fast.folded).
"""

from __future__ import annotations

from minicnn import backend
from minicnn.fast import parallel
from minicnn.fast.conv import FastConv2d
from minicnn.fast.pooling import FastMaxPool2d, bracket_backward, bracket_forward
from minicnn.layers.activation import ReLU
from minicnn.layers.base import Sequential
from minicnn.validation import check_input


class ConvReluPool:
    """One FastConv2d, ReLU, FastMaxPool2d(2) run of a FastSequential. Not a Module: it
    holds no parameters of its own and writes the conv's grads."""

    def __init__(self, conv: FastConv2d, relu: ReLU, pool: FastMaxPool2d):
        self.conv, self.relu, self.pool = conv, relu, pool
        self.cache = None

    @staticmethod
    def fits(layers) -> bool:
        """Whether three consecutive layers form a run this class can fuse."""
        if len(layers) != 3:
            return False
        conv, relu, pool = layers
        return (isinstance(conv, FastConv2d) and isinstance(relu, ReLU)
                and isinstance(pool, FastMaxPool2d) and pool.takes_bracket())

    def __repr__(self) -> str:
        return f"ConvReluPool({self.conv!r}, {self.relu!r}, {self.pool!r})"

    def forward(self, x):
        conv, relu, pool = self.conv, self.relu, self.pool
        conv.check_input(x)
        oh, ow, _, _ = conv.geometry(x)
        for layer in (conv, relu, pool):
            layer.cache = None
        if not conv.takes_flat_path(x) or oh < 2 or ow < 2:
            self.cache = "layer by layer" if conv.training else None
            return pool.forward(relu.forward(conv.forward(x)))
        xp = backend.array_module(x)
        x = xp.ascontiguousarray(x)
        y = xp.empty((x.shape[0], conv.out_channels, oh // 2, ow // 2), dtype=x.dtype)
        masks = tuple(xp.empty(y.shape, dtype=bool) for _ in range(4)) if conv.training else None

        def chunk(part, worker):
            grid = conv.flat_forward(x, part, worker)       # (B, OC, OH, Wp), or in pairs
            cells = conv.grid_cells(grid, *y.shape[2:])
            if masks is None:
                bracket_forward(cells, y[part])
            else:
                positive, *won = (mask[part] for mask in masks)
                bracket_forward(cells, y[part], won)
            xp.maximum(y[part], 0, out=y[part])                       # ReLU after pooling
            if masks is not None:
                xp.greater(y[part], 0, out=positive)

        parallel.run_chunks(chunk, conv.chunks(x, "flat"), x)
        self.cache = (x, masks) if conv.training else None
        return y

    def backward(self, dy):
        conv, relu, pool = self.conv, self.relu, self.pool
        if self.cache is None:
            raise RuntimeError("ConvReluPool.backward needs a forward pass in training mode first")
        if self.cache == "layer by layer":
            return conv.backward(relu.backward(pool.backward(dy)))
        x, masks = self.cache
        xp = backend.array_module(dy)
        dx = xp.empty_like(x) if conv.needs_input_grad else None
        pairs = conv.takes_pairs_path(x, dx=dx is not None)

        def chunk(part, worker):
            positive, *won = (mask[part] for mask in masks)
            d = dy[part] * positive
            dy_grid = conv.flat_grid(x, part, worker, "pooled dy grid", pairs)
            bracket_backward(d, won, conv.grid_cells(dy_grid, *dy.shape[2:]))
            # that wrote the cells of the 2x2 windows; the rest of this grid is never written: 0
            return conv.flat_backward(x, dy_grid, dx, part, worker)

        parts = conv.chunks(x, "flat", dx=dx is not None)
        conv.store_grads(parallel.run_chunks(chunk, parts, x))
        return dx


def plan(layers, fold: bool = False) -> list:
    """The steps that run ``layers``: each Conv2d, ReLU, MaxPool2d(2) run becomes one
    ConvReluPool; with ``fold`` (eval mode), each Conv2d, [MaxPool2d,] BatchNorm2d[,
    ReLU] run that folds (minicnn.fast.folded) one FoldedConv; every other layer is its
    own step."""
    from minicnn.fast.folded import FoldedConv        # (that module builds on this one)
    steps, index = [], 0
    while index < len(layers):
        folded, count = FoldedConv.take(layers[index:]) if fold else (None, 0)
        if folded is not None:
            steps.append(folded)
            index += count
        elif ConvReluPool.fits(layers[index:index + 3]):
            steps.append(ConvReluPool(*layers[index:index + 3]))
            index += 3
        else:
            steps.append(layers[index])
            index += 1
    return steps


INFERENCE_MIN_PART_IMAGES = 16     # the smallest part of an inference batch per thread


class FastSequential(Sequential):
    """Sequential whose forward and backward run the steps of :func:`plan`: the same
    layers, with each conv-ReLU-pool run as one fused step. In eval mode on several
    CPU threads, a batch runs in parts, one per thread (_inference_parts); its layers
    then keep no caches, as in eval mode they need none."""

    reference_layer = Sequential
    transient = {**Sequential.transient, "_steps": lambda: None}

    def forward(self, x):
        check_input(self, x)
        self._steps = plan(self.layers, fold=not self.training)
        parts = self._inference_parts(x)
        if parts is None:
            return self._run_steps(x)
        results = parallel.run_chunks(lambda part, _: self._run_steps(x[part]), parts, x)
        for _, module in self.modules():     # each holds one part's cache: none is whole
            module.cache = None
        return backend.array_module(x).concatenate(results)

    def _run_steps(self, x):
        for step in self._steps:
            x = step.forward(x)
        return x

    def _inference_parts(self, x):
        """Inference (eval mode) on several CPU threads: the batch in one part per thread
        (at least INFERENCE_MIN_PART_IMAGES images each), each part run through every
        layer by its own thread, so that every layer works on all cores, not only the
        convs. Else None: the layers one after the other on the whole batch."""
        if self.training or not x.ndim:
            return None
        parts = parallel.batch_parts(x, INFERENCE_MIN_PART_IMAGES)
        return parts if len(parts) > 1 else None

    def backward(self, dy):
        steps = self.__dict__.get("_steps")
        if steps is None:
            raise RuntimeError("Sequential.backward needs a forward pass first")
        for step in reversed(steps):
            if dy is None:          # as Sequential.backward: nothing before it learns
                break
            dy = step.backward(dy)
        return dy
