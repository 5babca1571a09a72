"""2-D convolution by im2col and one matrix product.

Forward, with W = weight.reshape(OC, C*kh*kw) and cols = im2col(x)::

    Y = W @ cols + b            # (OC, N*OH*OW), then reshaped to (N, OC, OH, OW)

Backward, with dY = dy rearranged to (OC, N*OH*OW)::

    dW    = dY @ cols.T         # (OC, C*kh*kw): each weight meets every window it saw
    db    = dY.sum(axis=1)      # (OC,): the bias is added at every output position
    dcols = W.T @ dY            # (C*kh*kw, N*OH*OW)
    dx    = col2im(dcols)       # adjoint of im2col: sum back onto the input pixels
"""

from __future__ import annotations

from minicnn.im2col import col2im, im2col, output_size
from minicnn.layers.base import Module
from minicnn.layers.init import kaiming_uniform_params


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    kh, kw = value
    return int(kh), int(kw)


class Conv2d(Module):
    """Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True).

    weight: (out_channels, in_channels, kh, kw), bias: (out_channels,), as in PyTorch.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride: int = 1,
                 padding: int = 0, bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        if stride < 1 or padding < 0:
            raise ValueError(f"Conv2d needs stride >= 1 and padding >= 0, got {stride}, {padding}")
        self.stride, self.padding = stride, padding
        kh, kw = self.kernel_size
        self.params = kaiming_uniform_params((out_channels, in_channels, kh, kw),
                                             fan_in=in_channels * kh * kw, bias=bias)
        self.cache = None

    def forward(self, x):
        n, c, h, w = x.shape
        if c != self.in_channels:
            raise ValueError(f"Conv2d expected {self.in_channels} input channels, got {c} "
                             f"(input shape {tuple(x.shape)})")
        kh, kw = self.kernel_size
        oh = output_size(h, kh, self.stride, self.padding)
        ow = output_size(w, kw, self.stride, self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2d kernel {kh}x{kw} does not fit input {h}x{w} "
                             f"with padding {self.padding}")
        weight = self.params["weight"].reshape(self.out_channels, -1)
        cols = im2col(x, kh, kw, self.stride, self.padding)       # (C*kh*kw, N*OH*OW)
        y = weight @ cols                                            # (OC, N*OH*OW)
        if "bias" in self.params:
            y += self.params["bias"][:, None]
        self.cache = (x.shape, cols)
        return y.reshape(self.out_channels, n, oh, ow).transpose(1, 0, 2, 3)

    def backward(self, dy):
        x_shape, cols = self.cache
        weight = self.params["weight"]
        dy_mat = dy.transpose(1, 0, 2, 3).reshape(self.out_channels, -1)  # (OC, N*OH*OW)
        self.grads["weight"] = (dy_mat @ cols.T).reshape(weight.shape)
        if "bias" in self.params:
            self.grads["bias"] = dy_mat.sum(axis=1)
        if not self.needs_input_grad:
            return None
        dcols = weight.reshape(self.out_channels, -1).T @ dy_mat     # (C*kh*kw, N*OH*OW)
        kh, kw = self.kernel_size
        return col2im(dcols, x_shape, kh, kw, self.stride, self.padding)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")
