"""im2col / col2im: the index plumbing that turns convolution into one matrix product.

For an input x of shape (N, C, H, W), a kh x kw kernel, stride s and zero
padding p, the output has OH = (H + 2p - kh) // s + 1 rows (OW likewise).
im2col copies every receptive field into a column::

    cols[(c, i, j), (n, oh, ow)] = x_pad[n, c, oh*s + i, ow*s + j]

so a convolution with weight w (OC, C, kh, kw) is the product
``w.reshape(OC, C*kh*kw) @ cols``. The copy is done by looping over the
kh*kw kernel offsets (i, j): each offset is one strided slice of x_pad, so the
Python loop runs kh*kw times, never once per pixel.

col2im is the adjoint (transpose) of im2col: each column entry is added back
to the pixel it was copied from. Overlapping windows make pixels receive
several contributions; the same offset loop with ``+=`` on slices sums them
without a scatter-add (no ``np.add.at``).
"""

from __future__ import annotations

import math

from minicnn import backend


def output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Number of window positions along one axis: (size + 2p - k) // s + 1."""
    return (size + 2 * padding - kernel) // stride + 1


def pad_hw(x, padding: int, value: float = 0.0):
    """Pad the two spatial axes of an (N, C, H, W) array with ``value``."""
    if padding == 0:
        return x
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    out = xp.full((n, c, h + 2 * padding, w + 2 * padding), value, dtype=x.dtype)
    out[:, :, padding:padding + h, padding:padding + w] = x
    return out


def window_view(x_pad, i: int, j: int, stride: int, oh: int, ow: int):
    """The (N, C, OH, OW) slice of x_pad seen by kernel offset (i, j)."""
    return x_pad[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]


def im2col(x, kh: int, kw: int, stride: int = 1, padding: int = 0, out=None):
    """(N, C, H, W) -> cols of shape (C*kh*kw, N*OH*OW); see the module docstring.

    ``out``: a buffer of at least C*kh*kw*N*OH*OW entries to fill instead of a
    new array (the fast kernels keep one from call to call).
    """
    xp = backend.array_module(x)
    n, c, h, w = x.shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    x_pad = pad_hw(x, padding)
    shape = (c, kh, kw, n, oh, ow)
    cols = xp.empty(shape, x.dtype) if out is None else out.reshape(-1)[:math.prod(shape)]
    cols = cols.reshape(shape)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = window_view(x_pad, i, j, stride, oh, ow).transpose(1, 0, 2, 3)
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kh: int, kw: int, stride: int = 1, padding: int = 0):
    """Adjoint of :func:`im2col`: (C*kh*kw, N*OH*OW) -> (N, C, H, W).

    dx_pad[n, c, oh*s + i, ow*s + j] += cols[(c, i, j), (n, oh, ow)] for every
    offset (i, j); the padding border is then cut off.
    """
    xp = backend.array_module(cols)
    n, c, h, w = x_shape
    oh, ow = output_size(h, kh, stride, padding), output_size(w, kw, stride, padding)
    cols = cols.reshape(c, kh, kw, n, oh, ow)
    dx_pad = xp.zeros((n, c, h + 2 * padding, w + 2 * padding), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            window_view(dx_pad, i, j, stride, oh, ow)[...] += cols[:, i, j].transpose(1, 0, 2, 3)
    return dx_pad[:, :, padding:padding + h, padding:padding + w]
