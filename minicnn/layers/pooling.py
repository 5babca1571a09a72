"""Max pooling over k x k windows, with stride and -inf padding; global average pooling.

MaxPool2d forward, x padded with -inf (a padded cell never wins)::

    windows[(i, j), n, c, oh, ow] = x_pad[n, c, oh*s + i, ow*s + j]    # one slice per offset
    y      = max over (i, j) of windows                               # (N, C, OH, OW)
    winner = argmax over (i, j) of windows                            # the first maximum

Backward: only the winner of a window influenced y, with slope 1, so the
window's gradient goes to that one pixel::

    dx_pad[n, c, oh*s + i, ow*s + j] += dy[n, c, oh, ow] * [winner == (i, j)]

When windows overlap (stride < kernel) a pixel can win several windows and
collects the sum of their gradients. Ties go to the first maximum in row-major
order, as in PyTorch, so a window of equal values sends its gradient to one
pixel, not to all of them.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.im2col import output_size, pad_hw, window_view
from minicnn.layers.base import Module
from minicnn.validation import check_sizes


class MaxPool2d(Module):
    """MaxPool2d(kernel_size, stride=None, padding=0); stride defaults to kernel_size."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        check_sizes(self, kernel_pairs=False, kernel_size=kernel_size, stride=stride,
                    padding=padding)
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

    def offsets(self) -> list[tuple[int, int]]:
        """The (i, j) of every cell of a window, in row-major order."""
        k = self.kernel_size
        return [(i, j) for i in range(k) for j in range(k)]

    def output_shape(self, x) -> tuple[int, int]:
        """(OH, OW); raises ValueError if the window does not fit x."""
        if x.ndim != 4:
            raise ValueError(f"MaxPool2d expected (N, C, H, W), got {tuple(x.shape)}")
        k, s, p = self.kernel_size, self.stride, self.padding
        h, w = x.shape[2:]
        oh, ow = output_size(h, k, s, p), output_size(w, k, s, p)
        if oh < 1 or ow < 1:
            raise ValueError(f"MaxPool2d window {k}x{k} does not fit input {h}x{w}")
        return oh, ow

    def forward(self, x):
        xp = backend.array_module(x)
        oh, ow = self.output_shape(x)
        x_pad = pad_hw(x, self.padding, value=-xp.inf)
        windows = xp.stack([window_view(x_pad, i, j, self.stride, oh, ow)
                            for i, j in self.offsets()])              # (k*k, N, C, OH, OW)
        winner = windows.argmax(axis=0)                               # (N, C, OH, OW)
        self.cache = (x.shape, winner) if self.training else None
        return windows.max(axis=0)

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("MaxPool2d.backward needs a forward pass in training mode first")
        xp = backend.array_module(dy)
        (n, c, h, w), winner = self.cache
        s, p = self.stride, self.padding
        oh, ow = dy.shape[2:]
        dx_pad = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dy.dtype)
        for index, (i, j) in enumerate(self.offsets()):
            window_view(dx_pad, i, j, s, oh, ow)[...] += dy * (winner == index)
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
        if self.cache is None:
            raise RuntimeError("GlobalAvgPool2d.backward needs a forward pass first")
        n, c, h, w = self.cache
        xp = backend.array_module(dy)
        return xp.broadcast_to((dy / (h * w))[:, :, None, None], (n, c, h, w)).copy()
