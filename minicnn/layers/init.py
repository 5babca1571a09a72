"""Parameter initialization, the same as PyTorch's defaults.

PyTorch initializes Conv2d and Linear weights with Kaiming-uniform, a=sqrt(5),
which works out to U(-b, b) with b = 1/sqrt(fan_in); biases get the same
bound. fan_in = in_channels * kh * kw for a conv, in_features for a linear.
Values are drawn from the backend's seeded generator, in float32.
"""

from __future__ import annotations

import math

from minicnn import backend


def uniform(shape, bound: float):
    """An float32 array of the given shape drawn from U(-bound, bound)."""
    values = backend.rng().uniform(-bound, bound, size=shape)
    return values.astype(backend.float32)


def kaiming_uniform_params(weight_shape, fan_in: int, bias: bool) -> dict:
    """{"weight": ..., "bias": ...} initialized like PyTorch's Conv2d and Linear."""
    bound = 1.0 / math.sqrt(fan_in)
    params = {"weight": uniform(weight_shape, bound)}
    if bias:
        params["bias"] = uniform((weight_shape[0],), bound)
    return params


def dirac_(weight):
    """Identity ("dirac") init of a conv weight (OC, C, kh, kw), in place, as airbench
    does (after PyTorch's ``nn.init.dirac_`` on ``weight[:C]``): the first C filters
    become w[i, i, kh//2, kw//2] = 1 and 0 elsewhere, so filter i copies input channel
    i; filters C..OC-1 keep their random init. A stack of such convs starts close
    to the identity map, like a residual net without the skip connections."""
    out_channels, in_channels, kh, kw = weight.shape
    identity = min(out_channels, in_channels)
    weight[:in_channels] = 0
    for i in range(identity):
        weight[i, i, kh // 2, kw // 2] = 1
    return weight
