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

The common 2x2 window with stride 2 has a faster path (``bracket``, on by
default for it; the tests check it against the general one). A 2x2 max is a
small knockout: left against right in the top row and in the bottom row, then
the top winner against the bottom winner. Forward keeps the three results as
booleans (a later cell wins only if strictly greater, so ties still go to the
first cell); backward follows the bracket back: dy goes to the winning row,
then to the winning cell of that row. Each step splits a gradient g in two as
g * won and g - g * won, which is exact, so no zero-filled dx and no ``+=``.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.im2col import output_size, pad_hw, window_view
from minicnn.layers.base import Module
from minicnn.validation import check_sizes


class MaxPool2d(Module):
    """MaxPool2d(kernel_size, stride=None, padding=0); stride defaults to kernel_size."""

    def __init__(self, kernel_size: int, stride: int | None = None, padding: int = 0):
        check_sizes(self, kernel_size=kernel_size, stride=stride, padding=padding)
        super().__init__()
        self.kernel_size = int(kernel_size)
        self.stride = int(stride) if stride is not None else self.kernel_size
        self.padding = int(padding)
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError("MaxPool2d needs kernel_size >= 1 and stride >= 1")
        if not 0 <= self.padding <= self.kernel_size // 2:
            raise ValueError(f"MaxPool2d padding must be between 0 and kernel_size // 2 "
                             f"(= {self.kernel_size // 2}), got {self.padding}")
        self.bracket = self.kernel_size == 2 and self.stride == 2 and self.padding == 0
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
        if self.bracket:
            return self._forward_bracket(x, oh, ow)
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
            self.cache = ("offsets", x.shape, winners)
        return y

    def backward(self, dy):
        if self.cache is None:
            raise RuntimeError("MaxPool2d.backward needs a forward pass in training mode first")
        if self.cache[0] == "bracket":
            return self._backward_bracket(dy)
        xp = backend.array_module(dy)
        _, (n, c, h, w), winners = self.cache
        s, p = self.stride, self.padding
        oh, ow = winners.shape[3:]
        dx_pad = xp.zeros((n, c, h + 2 * p, w + 2 * p), dtype=dy.dtype)
        for index, (i, j) in enumerate(self._offsets()):
            window_view(dx_pad, i, j, s, oh, ow)[...] += dy * winners[index]
        return dx_pad[:, :, p:p + h, p:p + w]

    def _forward_bracket(self, x, oh, ow):
        """2x2, stride 2: the knockout described in the module docstring."""
        xp = backend.array_module(x)
        n, c = x.shape[:2]
        y = xp.empty((n, c, oh, ow), dtype=x.dtype)
        self.cache = None
        if not self.training:
            bracket_forward(window_cells(x, oh, ow), y)
            return y
        won = tuple(xp.empty((n, c, oh, ow), dtype=bool) for _ in range(3))
        bracket_forward(window_cells(x, oh, ow), y, won)
        self.cache = ("bracket", x.shape, won)
        return y

    def _backward_bracket(self, dy):
        xp = backend.array_module(dy)
        _, (n, c, h, w), won = self.cache
        dx = xp.empty((n, c, h, w), dtype=dy.dtype)
        dx[:, :, 2 * (h // 2):] = 0                # the odd last row or column, if any
        dx[:, :, :, 2 * (w // 2):] = 0
        bracket_backward(dy, won, window_cells(dx, *dy.shape[2:]))
        return dx

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


# --- The 2x2, stride-2 knockout, on the four cells of each window ------------------
#
# Functions rather than methods so that a fused pass (minicnn.layers.fused) can
# pool one chunk of images in place, on its conv's own layout of the cells.
# ``won`` holds three boolean arrays the shape of y: right cell won the top row,
# right cell won the bottom row, bottom row won.

def window_cells(x, oh: int, ow: int):
    """The four cells of the 2x2 windows of x (..., H, W), as views: top left, top right,
    bottom left, bottom right, each (..., OH, OW). An odd last row or column is in none."""
    return (x[..., 0:2 * oh:2, 0:2 * ow:2], x[..., 0:2 * oh:2, 1:2 * ow:2],
            x[..., 1:2 * oh:2, 0:2 * ow:2], x[..., 1:2 * oh:2, 1:2 * ow:2])


def bracket_forward(cells, y, won=None) -> None:
    """y = the max of each 2x2 window, given its four cells (window_cells, or another
    layout's views of them); if ``won`` is given, record the bracket's results in it."""
    xp = backend.array_module(y)
    top_left, top_right, bottom_left, bottom_right = cells
    top, bottom = xp.maximum(top_left, top_right), xp.maximum(bottom_left, bottom_right)
    xp.maximum(top, bottom, out=y)
    if won is not None:                     # a later cell wins only if strictly greater
        top_right_won, bottom_right_won, bottom_won = won
        xp.greater(top_right, top_left, out=top_right_won)
        xp.greater(bottom_right, bottom_left, out=bottom_right_won)
        xp.greater(bottom, top, out=bottom_won)


def bracket_backward(dy, won, cells) -> None:
    """Follow the bracket back: write the four cells of dx's windows, each once."""
    xp = backend.array_module(dy)
    top_right_won, bottom_right_won, bottom_won = won
    top_left, top_right, bottom_left, bottom_right = cells
    d_bottom = dy * bottom_won                 # dy to the winning row ...
    d_top = dy - d_bottom
    for d_row, right_won, left, right in ((d_top, top_right_won, top_left, top_right),
                                          (d_bottom, bottom_right_won, bottom_left, bottom_right)):
        xp.multiply(d_row, right_won, out=right)     # ... then to the winning cell of that row
        xp.subtract(d_row, right, out=left)


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
