"""Flatten: (N, C, H, W) -> (N, C*H*W) in C order, as PyTorch's nn.Flatten.

Backward only undoes the reshape: dx = dy.reshape(x.shape).
"""

from __future__ import annotations

from minicnn.layers.base import Module
from minicnn.validation import check_backward


class Flatten(Module):
    def __init__(self):
        super().__init__()
        self.cache = None

    def forward(self, x):
        self.cache = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        check_backward(self, self.cache is not None, dy)
        return dy.reshape(self.cache)
