"""Inference with each BatchNorm folded into the convolution before it, and the ReLU after
it into the convolution's output, planned by FastSequential in eval mode.

In eval mode BatchNorm2d is a fixed map per channel o (BatchNorm2d.eval_affine)::

    bn(z)[o] = scale[o] * z[o] + shift[o]

and a convolution is linear in its weights, so BatchNorm after it is the same
convolution with other weights and bias::

    bn(conv(x)) = conv'(x)       W'[o] = scale[o] * W[o],   b'[o] = scale[o] * b[o] + shift[o]

That saves BatchNorm's whole pass over the maps. A max-pool between the two does
not stop it where every scale is positive: z -> scale * z + shift then keeps the
order of the values in a channel, so max(scale * a + shift, scale * b + shift) =
scale * max(a, b) + shift, and bn(pool(conv(x))) = pool(conv'(x)). A ReLU after
BatchNorm then runs on conv' as each chunk of its output is written
(FastConv2d.relu_output), while that chunk is still in the cache; with a pool
in between too, ReLU goes before the pool (ReLU never reorders values, so it
commutes with max), and a conv that takes the flat path runs all three as one
fused ConvReluPool.

The results are the layers' up to rounding (W' * x adds up in another order
than (W * x) * scale); tests/test_fast_kernels.py compares them. Training never
folds: BatchNorm there normalizes with the batch's own statistics.
"""

from __future__ import annotations

import copy

from minicnn.fast.conv import FastConv2d
from minicnn.fast.fused import ConvReluPool
from minicnn.fast.norm import FastBatchNorm2d
from minicnn.fast.pooling import FastMaxPool2d
from minicnn.layers.activation import ReLU


class FoldedConv:
    """A FastConv2d, an optional FastMaxPool2d, a FastBatchNorm2d and an optional ReLU,
    run as one convolution with BatchNorm folded into it (see the module docstring).
    Made afresh by each eval-mode forward (the weights may have changed since); not a
    Module: it holds the folded copy of the conv, not parameters of the model."""

    def __init__(self, conv: FastConv2d, pool, norm: FastBatchNorm2d, relu):
        self.layers = tuple(layer for layer in (conv, pool, norm, relu) if layer is not None)
        self.pool = pool
        weight = conv.params["weight"]
        scale, shift = norm.eval_affine(weight.dtype)
        folded = copy.copy(conv)        # shares the conv's settings and scratch buffers
        folded.params = {"weight": weight * scale.reshape(-1, 1, 1, 1),
                         "bias": shift + (scale * conv.params["bias"]
                                          if "bias" in conv.params else 0)}
        folded.grads, folded.cache = {}, None
        folded.relu_output = relu is not None          # (before the pool, if any)
        self.conv = folded
        self.fused = (ConvReluPool(folded, relu, pool)
                      if relu is not None and ConvReluPool.fits([folded, relu, pool]) else None)

    @staticmethod
    def fits(layers) -> bool:
        """Whether ``layers``, a conv, maybe a max-pool, and BatchNorm, fold into one
        convolution: the exact fast classes, all in eval mode, and a pool only where every
        scale of BatchNorm is positive."""
        if len(layers) not in (2, 3) or any(layer.training for layer in layers):
            return False
        conv, *middle, norm = layers
        if (type(conv) is not FastConv2d or type(norm) is not FastBatchNorm2d
                or any(type(pool) is not FastMaxPool2d for pool in middle)):
            return False
        if middle:
            scale, _ = norm.eval_affine(norm.buffers["running_var"].dtype)
            return bool((scale > 0).all())
        return True

    @classmethod
    def take(cls, layers):
        """The FoldedConv that starts ``layers`` and how many layers it takes, or (None, 0)."""
        for pooled in (False, True):
            count = 3 if pooled else 2
            if cls.fits(layers[:count]):
                conv, *middle, norm = layers[:count]
                relu = layers[count] if (len(layers) > count
                                         and type(layers[count]) is ReLU) else None
                step = cls(conv, middle[0] if pooled else None, norm, relu)
                return step, count + (relu is not None)
        return None, 0

    def __repr__(self) -> str:
        return f"FoldedConv({', '.join(repr(layer) for layer in self.layers)})"

    def forward(self, x):
        if self.fused is not None and self.conv.takes_flat_path(x):
            return self.fused.forward(x)                # conv', pool and ReLU in one pass
        y = self.conv.forward(x)                        # with ReLU on its output
        return y if self.pool is None else self.pool.forward(y)

    def backward(self, dy):
        raise RuntimeError("a folded convolution runs in eval mode only: it has no backward")
