"""Fully connected layer.

Forward, x (N, in), weight W (out, in), bias b (out,)::

    y = x @ W.T + b                     # (N, out)

Backward, dy (N, out)::

    dW = dy.T @ x                       # (out, in): sum over the batch of outer products
    db = dy.sum(axis=0)                 # (out,)
    dx = dy @ W                         # (N, in)
"""

from __future__ import annotations

from minicnn.layers.base import Module
from minicnn.layers.init import kaiming_uniform_params
from minicnn.validation import check_backward, check_input, check_sizes


class Linear(Module):
    """Linear(in_features, out_features, bias=True); weight (out, in) as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        check_sizes(self, in_features=in_features, out_features=out_features)
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.params = kaiming_uniform_params((out_features, in_features), fan_in=in_features,
                                             bias=bias)
        self.cache = None

    def forward(self, x):
        check_input(self, x, expected=f"(N, {self.in_features})")
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expected input (N, {self.in_features}), "
                             f"got {tuple(x.shape)}")
        y = x @ self.params["weight"].T
        if "bias" in self.params:
            y += self.params["bias"]
        self.cache = x
        return y

    def backward(self, dy):
        check_backward(self, self.cache is not None, dy)
        x = self.cache
        self.grads["weight"] = dy.T @ x
        if "bias" in self.params:
            self.grads["bias"] = dy.sum(axis=0)
        if not self.needs_input_grad:
            return None
        return dy @ self.params["weight"]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={'bias' in self.params}")


class Scale(Module):
    """Multiply by a fixed number: y = factor * x, so dx = factor * dy.

    Used after the last Linear layer to shrink the logits at the start of
    training (and with them the effective learning rate of that layer).
    """

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        return x * x.dtype.type(self.factor)

    def backward(self, dy):
        return dy * dy.dtype.type(self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"
