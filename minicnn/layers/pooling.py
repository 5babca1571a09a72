"""Max pooling over kh x kw windows, with stride and -inf padding.

Forward: y[n, c, oh, ow] = max over (i, j) of x_pad[n, c, oh*s + i, ow*s + j],
where x_pad is x padded with -inf (a padded cell never wins). The loop runs
over the kh*kw kernel offsets. ``winners[k]`` marks the windows that offset k
won; ties go to the first offset in row-major order, so every window has
exactly one winner. The masks are built with comparisons and boolean and/or,
and backward multiplies by them: no data-dependent branch per entry, which
on NumPy is several times faster than ``where`` or masked assignment.

Backward: only the winner of a window influenced y, with slope 1::

    dx_pad[n, c, oh*s + i, ow*s + j] += dy[n, c, oh, ow]   if (i, j) won that window

When windows overlap (stride < kernel) a pixel can win several windows and
collects the sum of their gradients.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.im2col import output_size, pad_hw, window_view
from minicnn.layers.base import Module


class MaxPool2d(Module):
    """MaxPool2d(kernel_size, stride=None, padding=0); stride defaults to kernel_size."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size
        self.padding = int(padding)
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError("MaxPool2d needs kernel_size >= 1 and stride >= 1")
        if not 0 <= self.padding <= self.kernel_size // 2:
            raise ValueError(f"MaxPool2d padding must be between 0 and kernel_size // 2 "
                             f"(= {self.kernel_size // 2}), got {self.padding}")
        self.cache = None

    def _offsets(self):
        k = self.kernel_size
        return [(i, j) for i in range(k) for j in range(k)]

    def forward(self, x):
        xp = backend.array_module(x)
        n, c, h, w = x.shape
        k, s, p = self.kernel_size, self.stride, self.padding
        oh, ow = output_size(h, k, s, p), output_size(w, k, s, p)
        if oh < 1 or ow < 1:
            raise ValueError(f"MaxPool2d window {k}x{k} does not fit input {h}x{w}")
        x_pad = pad_hw(x, p, value=-xp.inf)
        windows = [window_view(x_pad, i, j, s, oh, ow) for i, j in self._offsets()]
        y = windows[0].copy()
        for window in windows[1:]:
            xp.maximum(y, window, out=y)
        self.cache = None
        if self.training:
            winners = xp.empty((len(windows), n, c, oh, ow), dtype=bool)
            taken = xp.zeros((n, c, oh, ow), dtype=bool)     # window already has its winner
            for index, window in enumerate(windows):
                xp.equal(window, y, out=winners[index])
                winners[index] &= ~taken                     # first maximum only
                taken |= winners[index]
            self.cache = (x.shape, winners)
        return y

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("MaxPool2d.backward needs a forward pass in training mode first")
        xp = backend.array_module(dy)
        x_shape, winners = self.cache
        n, c, h, w = x_shape
        s, p = self.stride, self.padding
        oh, ow = winners.shape[3:]
        dx_pad = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dy.dtype)
        for index, (i, j) in enumerate(self._offsets()):
            window_view(dx_pad, i, j, s, oh, ow)[...] += dy * winners[index]
        return dx_pad[:, :, p:p + h, p:p + w]

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool2d(Module):
    """Average over all of H and W: (N, C, H, W) -> (N, C).

    Forward: y[n, c] = mean over (h, w) of x[n, c, h, w].
    Backward: every pixel contributed 1/(H*W) of the mean, so
    dx[n, c, h, w] = dy[n, c] / (H*W).
    """

    def __init__(self):
        super().__init__()
        self.cache = None

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2d expected (N, C, H, W), got {tuple(x.shape)}")
        self.cache = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        n, c, h, w = self.cache
        xp = backend.array_module(dy)
        return xp.broadcast_to((dy / (h * w))[:, :, None, None], (n, c, h, w)).copy()
