"""Residual (skip) connection: the input is added to the output of a branch.

Forward::

    y = x + body(x)

Backward: the sum sends dy unchanged down both paths, and the two input
gradients add up::

    dx = dy + body.backward(dy)

The skip path's slope is exactly 1, so the gradient reaches early layers
undiminished however deep the body is: the reason ResNets train.
"""

from __future__ import annotations

from minicnn.layers.base import Module, Sequential


class Residual(Module):
    """Residual(*layers): y = x + Sequential(*layers)(x); the body keeps x's shape."""

    def __init__(self, *layers: Module):
        super().__init__()
        self.body = layers[0] if len(layers) == 1 else Sequential(*layers)

    def children(self):
        return [("body", self.body)]

    def set_needs_input_grad(self, needed: bool) -> Residual:
        """dx = dy + body's dx: the body's dx is needed exactly when this one is."""
        super().set_needs_input_grad(needed)
        self.body.set_needs_input_grad(needed)
        return self

    def forward(self, x):
        y = self.body.forward(x)
        if y.shape != x.shape:
            raise ValueError(f"Residual body changed the shape {tuple(x.shape)} to "
                             f"{tuple(y.shape)}; the two cannot be added")
        return x + y

    def backward(self, dy):
        d_body = self.body.backward(dy)
        if not self.needs_input_grad:
            return None
        return dy + d_body

    def __repr__(self) -> str:
        return f"{self.layer_name()}({self.body!r})"
