"""The fast kernel of MaxPool2d for the common 2x2 window with stride 2: a knockout bracket,
on every CPU thread (one part of the batch each).

It computes what the reference computes (minicnn/layers/pooling.py: the max of
each window, and backward sends dy to the window's first maximum), with less
memory traffic. A 2x2 max is a small knockout: left against right in the top
row and in the bottom row, then the top winner against the bottom winner.
Forward keeps the three results as booleans (a later cell wins only if
strictly greater, so ties still go to the first cell, as argmax does);
backward follows the bracket back: dy goes to the winning row, then to the
winning cell of that row. Each step splits a gradient g in two as g * won
and g - g * won, which is exact, so dx needs no zero fill and no ``+=``.
Multiplying by boolean masks instead of ``where`` or masked assignment
avoids a data-dependent branch per entry.

Other windows, strides and paddings run the reference.
"""

from __future__ import annotations

from minicnn import backend
from minicnn.fast import parallel
from minicnn.layers.pooling import MaxPool2d


class FastMaxPool2d(MaxPool2d):
    """MaxPool2d; 2x2 windows with stride 2 and no padding by the bracket."""

    reference_layer = MaxPool2d

    def takes_bracket(self) -> bool:
        return self.kernel_size == 2 and self.stride == 2 and self.padding == 0

    def forward(self, x):
        if not self.takes_bracket():
            return super().forward(x)
        xp = backend.array_module(x)
        oh, ow = self.output_shape(x)
        n, c = x.shape[:2]
        y = xp.empty((n, c, oh, ow), dtype=x.dtype)
        won = tuple(xp.empty((n, c, oh, ow), dtype=bool) for _ in range(3)) if self.training else None

        def part_forward(part, _):            # the images ``part``, on one thread
            bracket_forward(window_cells(x[part], oh, ow), y[part],
                            None if won is None else tuple(mask[part] for mask in won))

        parallel.run_chunks(part_forward, parallel.batch_parts(x), x)
        self.cache = ("bracket", x.shape, won) if self.training else None
        return y

    def backward(self, dy):
        if self.cache is None or self.cache[0] != "bracket":
            return super().backward(dy)
        xp = backend.array_module(dy)
        _, (n, c, h, w), won = self.cache
        dx = xp.empty((n, c, h, w), dtype=dy.dtype)

        def part_backward(part, _):
            dx[part, :, 2 * (h // 2):] = 0         # the odd last row or column, if any
            dx[part, :, :, 2 * (w // 2):] = 0
            bracket_backward(dy[part], tuple(mask[part] for mask in won),
                             window_cells(dx[part], *dy.shape[2:]))

        parallel.run_chunks(part_backward, parallel.batch_parts(dy), dy)
        return dx


# --- The knockout on the four cells of each window ------------------------------------
#
# Functions rather than methods so that the fused pass (minicnn.fast.fused) can pool
# one chunk of images in place, on its conv's own layout of the cells. ``won`` holds
# three boolean arrays the shape of y: right cell won the top row, right cell won the
# bottom row, bottom row won.

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
