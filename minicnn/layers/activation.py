"""ReLU.

Forward: y = max(x, 0).
Backward: dx = dy * [x > 0]  (the slope is 1 where the input was positive, else 0;
at exactly 0 we take 0, as PyTorch does).
"""

from __future__ import annotations

from minicnn import backend
from minicnn.layers.base import Module


class ReLU(Module):
    def __init__(self):
        super().__init__()
        self.cache = None

    def forward(self, x):
        xp = backend.array_module(x)
        positive = x > 0
        self.cache = positive
        return xp.where(positive, x, 0).astype(x.dtype, copy=False)

    def backward(self, dy):
        xp = backend.array_module(dy)
        return xp.where(self.cache, dy, 0).astype(dy.dtype, copy=False)
