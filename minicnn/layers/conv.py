"""2-D convolution by im2col and one matrix product.

Forward, x (N, C, H, W), weight (OC, C, kh, kw), bias b (OC,)::

    cols = im2col(x)                  # (C*kh*kw, N*OH*OW): one column per window
    W    = weight.reshape(OC, C*kh*kw)
    Y    = W @ cols + b               # (OC, N*OH*OW), then y = Y as (N, OC, OH, OW)

Backward, dy (N, OC, OH, OW), with dY = dy rearranged to (OC, N*OH*OW)::

    dW    = dY @ cols.T               # (OC, C*kh*kw): each weight meets every window it saw
    db    = dY.sum(axis=1)            # (OC,): the bias is added at every output position
    dcols = W.T @ dY                  # (C*kh*kw, N*OH*OW)
    dx    = col2im(dcols)             # (N, C, H, W): each window's share back on its pixels

col2im is im2col's adjoint (minicnn/im2col.py): a pixel that sits in several
windows collects the gradient of every one of them.
"""

from __future__ import annotations

from minicnn import validation
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
        validation.check_sizes(self, in_channels=in_channels, out_channels=out_channels,
                               kernel_size=kernel_size, stride=stride, padding=padding)
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

    def geometry(self, x):
        """(OH, OW) of the output, and Hp, Wp of the padded input."""
        kh, kw = self.kernel_size
        h, w = x.shape[2:]
        p, s = self.padding, self.stride
        return output_size(h, kh, s, p), output_size(w, kw, s, p), h + 2 * p, w + 2 * p

    def check_input(self, x) -> None:
        """Raise ValueError unless x is (N, in_channels, H, W) with room for the kernel."""
        validation.check_input(self, x, ndim=4, expected=f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expected input (N, {self.in_channels}, H, W), "
                             f"got {tuple(x.shape)}")
        oh, ow, _, _ = self.geometry(x)
        if oh < 1 or ow < 1:
            kh, kw = self.kernel_size
            raise ValueError(f"Conv2d kernel {kh}x{kw} does not fit input "
                             f"{x.shape[2]}x{x.shape[3]} with padding {self.padding}")

    def weight_and_bias(self):
        """The filters and the bias (None without one) that forward computes with: the
        parameters here; a layer with fixed filters keeps them elsewhere."""
        return self.params["weight"], self.params.get("bias")

    def forward(self, x):
        self.check_input(x)
        kh, kw = self.kernel_size
        n, oc = x.shape[0], self.out_channels
        oh, ow, _, _ = self.geometry(x)
        weight, bias = self.weight_and_bias()
        cols = im2col(x, kh, kw, self.stride, self.padding)          # (C*kh*kw, N*OH*OW)
        y_mat = weight.reshape(oc, -1) @ cols                         # (OC, N*OH*OW)
        if bias is not None:
            y_mat += bias[:, None]
        self.cache = (x.shape, cols) if self.training else None
        return y_mat.reshape(oc, n, oh, ow).transpose(1, 0, 2, 3)    # (N, OC, OH, OW)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("Conv2d.backward needs a forward pass in training mode first")
        x_shape, cols = self.cache
        kh, kw = self.kernel_size
        oc = self.out_channels
        weight = self.params["weight"].reshape(oc, -1)
        dy_mat = dy.transpose(1, 0, 2, 3).reshape(oc, -1)             # dY: (OC, N*OH*OW)
        self.grads["weight"] = (dy_mat @ cols.T).reshape(self.params["weight"].shape)
        if "bias" in self.params:
            self.grads["bias"] = dy_mat.sum(axis=1)
        if not self.needs_input_grad:
            return None
        d_cols = weight.T @ dy_mat                                    # (C*kh*kw, N*OH*OW)
        return col2im(d_cols, x_shape, kh, kw, self.stride, self.padding)

    def extra_repr(self) -> str:
        kh, kw = self.kernel_size
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), "
                f"stride={self.stride}, padding={self.padding}, bias={'bias' in self.params}")

